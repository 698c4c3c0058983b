"""Sample statistics of timings: linear-interpolation quantiles and the summary a record stores."""
from __future__ import annotations

import math
from typing import Sequence


def quantile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), ``0 <= q <= 1``."""
    if not samples:
        return float("nan")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(samples)
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float]) -> dict:
    return {
        "median_ms": quantile(samples_ms, 0.5),
        "p20_ms": quantile(samples_ms, 0.2),
        "p80_ms": quantile(samples_ms, 0.8),
        "min_ms": min(samples_ms) if samples_ms else float("nan"),
        "repeats": len(samples_ms),
    }
