"""``python -m benchmarks``: run every ``benchmarks/bench_*.py`` (see :mod:`benchmarks._harness`)."""
from __future__ import annotations

import sys

from benchmarks.runner import main

if __name__ == "__main__":
    sys.exit(main())
