"""Where the benchmarks live and write: the committed results, the untracked scratch directory, record version."""
from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"  # committed records: written only by an explicit ``--save``
SCRATCH_DIR = REPO_ROOT / ".bench-out" / "results"  # untracked (.gitignore): where ordinary runs write
RECORD_VERSION = 1
