"""Measuring one case: wall-clock samples and the peak memory of a call (RSS high-water mark on CPU,
``max_memory_allocated`` on CUDA)."""
from __future__ import annotations

import gc
import resource
import sys
import time
from typing import Optional

from benchmarks.cases import Bench
from benchmarks.stats import summarize


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS counts only live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _hwm_bytes() -> int:
    kib = _proc_status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)
    return kib * 1024


def _rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    return (kib or 0) * 1024


class PeakMemory:
    """Peak memory of a block beyond what was resident right before it (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.method = ""
        self.peak = 0
        self._base = 0
        self._hwm_after_setup = _hwm_bytes() if not self.cuda else 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if not self.cuda:
            _malloc_trim()  # otherwise pages freed by the warmup stay resident and hide the call's allocations
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "cuda.max_memory_allocated"
        elif _reset_hwm():
            self._base = _rss_bytes()
            self.method = "rss-hwm(clear_refs)"
        else:
            self._base = self._hwm_after_setup
            self.method = "rss-hwm(after setup)"
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = max(0, torch.cuda.max_memory_allocated() - self._base)
        else:
            self.peak = max(0, _hwm_bytes() - self._base)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure(bench: Bench, device: str, *, warmup: int = 1, repeats: int = 10, max_time_s: float = 30.0,
            measure_memory: bool = True) -> dict:
    """Time ``bench.fn`` (ms samples) and its peak memory; returns ``summarize(...)`` plus peak fields."""
    for _ in range(max(0, warmup)):
        if bench.prepare is not None:
            bench.prepare()
        bench.fn()
        _sync(device)
    samples: list[float] = []
    out: dict = {"peak_bytes": None, "peak_method": None}
    if bench.reset is not None:
        bench.reset()
    if bench.prepare is not None:
        bench.prepare()
    _sync(device)
    if measure_memory:
        mem = PeakMemory(device)
        with mem:
            t0 = time.perf_counter()
            bench.fn()
            _sync(device)
            first = (time.perf_counter() - t0) * 1e3
        out["peak_bytes"] = int(mem.peak)
        out["peak_method"] = mem.method
        if repeats <= 1:  # otherwise leave it out: trimming the heap made it pay extra page faults
            samples.append(first)
    start = time.perf_counter()
    while len(samples) < max(1, repeats):
        if samples and time.perf_counter() - start > max_time_s and len(samples) >= 1:
            break
        if bench.prepare is not None:
            bench.prepare()
        _sync(device)
        t0 = time.perf_counter()
        bench.fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    out.update(summarize(samples))
    out["samples_ms"] = [round(s, 4) for s in samples]
    return out
