"""``python -m minitron ...``: the ``minitron`` command line (see :mod:`minitron.cli`)."""
import sys

from minitron.cli import main

if __name__ == "__main__":
    sys.exit(main())
