"""The random layers of kobattr.testing, under the name the tests import."""

from kobattr.testing import KINDS, STRUCTURE_KINDS, random_layer, rope_tables  # noqa: F401
