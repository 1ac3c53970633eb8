"""``python -m der_fast.train``: see :mod:`der_fast.train.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
