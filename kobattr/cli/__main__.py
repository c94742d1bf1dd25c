"""``python -m kobattr.cli``, the same as ``python -m kobattr``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
