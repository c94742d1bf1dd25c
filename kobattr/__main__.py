"""``python -m kobattr`` and ``torchrun -m kobattr``: the `kobattr` command (kobattr.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
