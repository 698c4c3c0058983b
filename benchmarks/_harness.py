"""Shared benchmark harness: cases, timing, peak memory, machine limits, records, reports, regression checks.

How a benchmark script plugs in
===============================
Any ``benchmarks/bench_<name>.py`` that defines ``cases(cfg: BenchConfig) -> list[Case]`` is discovered by
``python -m benchmarks`` (``--only <name>`` selects it; ``<name>`` is the file name without ``bench_``).
The function must be cheap and deterministic: it only *describes* cases; the work happens in each case's
``setup``, which runs inside a fresh worker subprocess (the worker calls ``cases(cfg)`` again with the same
config and picks its case by :attr:`Case.id`). Import the code under test inside ``setup`` (or guard the
import) so one missing op never hides the other benchmarks. Minimal example::

    from benchmarks._harness import BenchConfig, Case, autograd_bench, our_backends

    def cases(cfg: BenchConfig) -> list[Case]:
        out = []
        for n in ([256] if cfg.quick else [256, 4096]):
            shape = {"N": n, "V": 32000}
            for provider in ["minitron-" + b for b in our_backends(cfg.device)] + ["torch-eager"]:
                out.append(Case(bench="my_op", provider=provider, mode="full", shape=shape, dtype="float32",
                                setup=functools.partial(_setup, provider, n), reference="torch-eager"))
        return out

    def _setup(provider, n, case, device):        # called as setup(case=..., device=...)
        x = torch.randn(n, 32000, device=device, requires_grad=True)
        fwd = (lambda: my_op(x).sum()) if provider.startswith("minitron") else (lambda: torch_version(x).sum())
        return autograd_bench(fwd, [x], case.mode)   # -> Bench(fn=..., prepare=..., reset=...)

``setup(case=Case, device=str)`` returns a :class:`Bench`: ``fn()`` is the timed call; ``prepare()`` (optional)
runs untimed before every call (e.g. the forward pass when only backward is timed); ``reset()`` (optional)
runs untimed before the memory-measured call (e.g. drop ``.grad`` so a fresh gradient is counted). Raising
:class:`Unavailable` (or ``ImportError``, ``minitron.ops.BackendUnavailableError``,
``minitron._ext.ExtensionNotBuiltError``) from ``setup`` records the provider as *unavailable* with the
message, instead of failing the run.

:func:`autograd_bench` implements the three modes for a differentiable forward function:
``"forward"`` (under ``torch.no_grad()``: the loss value only), ``"backward"`` (forward untimed in
``prepare``, ``loss.backward()`` timed), ``"full"`` (forward + backward, gradients dropped between calls).

Case fields used in reports: ``bytes_moved`` (compulsory memory traffic of one call, for the fraction of
measured copy bandwidth), ``exps`` (number of exponentials one call needs, for the fraction of measured exp
throughput), ``flops`` (for the fraction of measured fp32 matmul throughput), ``reference`` (provider that
ratios are taken against: speedups in the table, and the CPU regression check), ``size`` (x axis of
plots; defaults to the product of the shape values), ``tolerance`` (a larger regression-check tolerance for a
noisy case), ``warmup``/``repeats``/``max_time_s``/``timeout_s`` (per-case overrides of the run's settings).

Measurement
===========
* Each case runs in its own subprocess (``python -m benchmarks._harness --worker ...``): ``setup``, ``warmup``
  untimed calls, then ``reset()``, then the memory-measured call (a timing sample only when ``repeats == 1``),
  then the timing samples (``prepare()`` untimed before each). Time is wall clock (``torch.cuda.synchronize``
  around calls on CUDA); reported as median, p20, p80 (linear-interpolation quantiles).
* CPU peak memory = process RSS high-water mark during the measured call minus RSS right before it. Freed
  heap pages are first given back (``malloc_trim``), then the high-water mark is reset through
  ``/proc/self/clear_refs`` (Linux >= 4.0), so warmup/compilation memory and pages cached by the allocator
  neither inflate nor hide the call's allocations. Where that reset is impossible it falls back to VmHWM (or ``ru_maxrss``) after the measured
  call minus VmHWM right after setup (then compile-time memory can inflate the number: ``peak_method``
  says which was used). CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats`` minus
  ``memory_allocated()`` before the call.
* :func:`machine_limits` measures, in the same run, copy bandwidth (``dst.copy_(src)`` of 256 MiB, counted as
  read + write), exp throughput (``torch.exp(x, out=y)`` over an L2-sized fp32 buffer; the larger of the all-threads rate and
  threads x the one-thread rate) and fp32
  matmul throughput; records carry achieved fractions of these.

Records (one JSON object per line in ``<results dir>/<device>.jsonl``): see :func:`make_record`. Ordinary runs
write to the untracked ``.bench-out/results/``; only ``--save`` (refused on a dirty tree) appends to the committed
``benchmarks/results/``, whose records the README's tables are generated from (:mod:`benchmarks.report`).
Regression check: :func:`compare` (CPU: ratio of our time to the reference provider's time in the same run;
CUDA: absolute median time per GPU name; both: peak memory).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"  # committed records: written only by an explicit ``--save``
SCRATCH_DIR = REPO_ROOT / ".bench-out" / "results"  # untracked (.gitignore): where ordinary runs write
MODES = ("forward", "backward", "full")
RECORD_VERSION = 1

__all__ = [
    "BenchConfig", "Case", "Bench", "Unavailable", "autograd_bench", "our_backends", "measure",
    "machine_limits", "device_name", "sanitize", "summarize", "quantile", "make_record", "compare",
    "format_compare", "markdown_table", "discover", "main", "dtype_of", "tensor_bytes", "require_free_memory",
    "available_memory_bytes", "speedup_summary",
]


class Unavailable(Exception):
    """Raised by a case's setup when the provider cannot run here (recorded, not a failure)."""


# ----------------------------------------------------------------------------------------------
# case description
# ----------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What a benchmark module's ``cases(cfg)`` is asked for."""

    quick: bool = False  # small shapes, few repeats (CI)
    full: bool = False  # the full (GPU-sized) sweep
    device: str = "cpu"  # "cpu" or "cuda"
    heavy: bool = True  # include the heavy headline cases that take minutes on a CPU

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Bench:
    """What a case's setup returns: the timed callable and optional untimed hooks."""

    fn: Callable[[], Any]
    prepare: Optional[Callable[[], Any]] = None
    reset: Optional[Callable[[], Any]] = None
    keep: Any = None  # anything that must stay alive while timing (inputs)
    bytes_moved: Optional[float] = None  # overrides Case.bytes_moved when only setup knows it (e.g. masked rows)


@dataclass
class Case:
    bench: str  # op / benchmark name, e.g. "kl_div"
    provider: str  # "minitron-cpp", "torch-eager", "torch-compile", "liger", ...
    mode: str  # "forward" | "backward" | "full"
    shape: dict  # sizes, e.g. {"N": 1024, "V": 128256}
    dtype: str  # "float32", "bfloat16", ...
    setup: Callable[..., Bench]  # setup(case=Case, device=str) -> Bench
    params: dict = field(default_factory=dict)  # other options, e.g. {"kl_mode": "forward", "T": 1.0}
    reference: Optional[str] = None  # provider ratios are taken against
    ours: Optional[bool] = None  # defaults to provider.startswith("minitron")
    bytes_moved: Optional[float] = None
    exps: Optional[float] = None
    flops: Optional[float] = None
    size: Optional[float] = None
    size_label: Optional[str] = None
    warmup: Optional[int] = None  # overrides the run's default
    repeats: Optional[int] = None  # overrides the run's default
    max_time_s: Optional[float] = None  # stop sampling after this much time (>= 1 sample)
    timeout_s: Optional[float] = None  # kill the worker after this long
    note: str = ""
    info: dict = field(default_factory=dict)  # recorded verbatim, e.g. {"grad_bytes": ...}
    tolerance: Optional[float] = None  # regression-check tolerance for this case when larger than the run's

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Case.mode must be one of {MODES}, got {self.mode!r}")
        if self.ours is None:
            self.ours = self.provider.startswith("minitron")

    @property
    def shape_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.shape.items())

    @property
    def params_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))

    @property
    def case_key(self) -> str:
        """Identifies the workload (everything but the provider)."""
        parts = [self.bench, self.mode, self.shape_str, self.dtype]
        if self.params:
            parts.append(self.params_str)
        return "|".join(parts)

    @property
    def id(self) -> str:
        return f"{self.case_key}|{self.provider}"

    @property
    def x(self) -> float:
        if self.size is not None:
            return float(self.size)
        return float(math.prod(v for v in self.shape.values() if isinstance(v, (int, float))))


def our_backends(device: str) -> list[str]:
    """minitron backends that run on ``device`` (``cpp`` on CPU; ``cuda`` and ``triton`` on CUDA)."""
    return ["cpp"] if device == "cpu" else ["cuda", "triton"]


def available_memory_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def require_free_memory(nbytes: float, what: str = "this case") -> None:
    """Raise :class:`Unavailable` when the machine has less than ``nbytes`` available (CPU)."""
    avail = available_memory_bytes()
    if avail is not None and avail < nbytes:
        raise Unavailable(f"{what} needs about {nbytes / 2**30:.1f} GiB of memory, {avail / 2**30:.1f} GiB available")


def dtype_of(name: str):
    import torch

    return getattr(torch, name)


def tensor_bytes(*tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def autograd_bench(forward: Callable[[], Any], params: Sequence[Any], mode: str) -> Bench:
    """Bench for a differentiable ``forward() -> scalar loss`` w.r.t. tensors ``params`` in ``mode``.

    forward: ``forward()`` under ``torch.no_grad()``. backward: ``forward()`` untimed, ``loss.backward()``
    timed. full: ``forward().backward()`` timed. ``.grad`` of ``params`` is dropped before each call so
    every call allocates (and the memory measurement counts) a fresh gradient.
    """
    import torch

    def clear() -> None:
        for p in params:
            p.grad = None

    if mode == "forward":
        def fn() -> Any:
            with torch.no_grad():
                return forward()

        return Bench(fn=fn, keep=params)
    if mode == "full":
        def fn_full() -> None:
            clear()
            forward().backward()

        return Bench(fn=fn_full, reset=clear, keep=params)
    if mode == "backward":
        state: dict = {}

        def prep() -> None:
            clear()
            state["loss"] = forward()

        def fn_bwd() -> None:
            state.pop("loss").backward()

        return Bench(fn=fn_bwd, prepare=prep, reset=clear, keep=params)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# device / environment
# ----------------------------------------------------------------------------------------------


def sanitize(name: str) -> str:
    """File-name-safe lower-case device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    s = re.sub(r"\((r|tm|c)\)", "", name.strip().lower())
    s = re.sub(r"\b(cpu|processor)\b", " ", s)
    s = re.sub(r"@.*$", "", s)
    s = re.sub(r"[^a-z0-9.]+", "-", s).strip("-.")
    s = re.sub(r"-{2,}", "-", s)
    return s or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    """Human device name: the CPU model string, or the CUDA device name."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=10)
            return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def versions() -> dict:
    out: dict = {"python": platform.python_version()}
    for mod in ("minitron", "torch", "triton"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            out[mod] = None
    return out


def environment(device: str) -> dict:
    import torch

    env = {
        "device": device_name(device),
        "device_type": "cuda" if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "git_commit": git_commit(),
        "versions": versions(),
        "host": platform.node(),
    }
    env["device_slug"] = sanitize(env["device"])
    env["machine_class"] = machine_class(env)
    return env


def _cpu_cache_kib(level: int) -> Optional[int]:
    """Size of CPU 0's unified cache of ``level`` (KiB) from sysfs; None where unknown."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in sorted(base.glob("index*")):
            if (idx / "level").read_text().strip() == str(level) and (idx / "type").read_text().strip() != "Instruction":
                raw = (idx / "size").read_text().strip().upper()
                mult = 1024 if raw.endswith("M") else 1
                return int(raw.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return None


def machine_class(env: dict) -> str:
    """What must match for CPU time ratios of two runs to be comparable with the normal tolerance.

    Ratios to torch in the same run cancel machine speed and load only to first order: the ISA our
    kernels and torch's run (AVX-512 vs AVX2), the caches and the thread count change them by up to
    2.5x (measured: forcing AVX2 on the AVX-512 dev VM moved the bf16 kl_div ratio +125%; the CI runner
    moved four quick cases by +48% to +154%). GPUs are compared by name (absolute times).
    """
    if env.get("device_type") == "cuda":
        return str(env.get("device"))
    isa = "n/a"
    try:
        from minitron import _ext

        isa = _ext.build_info().get("cpu_isa", "n/a") if _ext.available() else "no-extension"
    except Exception:  # noqa: BLE001 - the class is informative; never fail a run over it
        pass
    try:
        import torch

        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        cap = "n/a"
    return (f"{env.get('device')}|ours={isa}|torch={cap}|threads={env.get('threads')}|"
            f"L2={_cpu_cache_kib(2)}K|L3={_cpu_cache_kib(3)}K")


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# machine limits
# ----------------------------------------------------------------------------------------------


def machine_limits(device: str, quick: bool = False) -> dict:
    """Copy bandwidth (GB/s, read+write), exp throughput (G exp/s, fp32) and fp32 matmul GFLOP/s."""
    import torch

    dev = torch.device(device)

    def best_time(fn: Callable[[], Any], reps: int) -> float:
        fn()
        _sync(device)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return best

    out: dict = {}
    n_copy = (64 if quick else 256) * 2**20 // 4 if dev.type == "cpu" else 1024 * 2**20 // 4
    src = torch.ones(n_copy, device=dev)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), 3 if quick else 7)
    out["copy_gbps"] = 2 * n_copy * 4 / t / 1e9
    del src, dst
    # exp: a buffer that fits in the caches (L2 on CPU) so the exp units, not memory, are the limit. Measured
    # with all threads and with one; the limit is the larger of the two and threads x the single-thread rate
    # (on a shared, oversubscribed CPU the multi-threaded number collapses first).
    n_exp = 2**16 * max(1, torch.get_num_threads()) if dev.type == "cpu" else 2**26
    x = torch.rand(n_exp, device=dev) * -20.0
    y = torch.empty_like(x)
    inner = 20

    def exps() -> None:
        for _ in range(inner):
            torch.exp(x, out=y)

    t = best_time(exps, 3 if quick else 7)
    out["exp_gps_all_threads"] = n_exp * inner / t / 1e9
    out["exp_gps"] = out["exp_gps_all_threads"]
    if dev.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t1 = best_time(exps, 3 if quick else 7)
        finally:
            torch.set_num_threads(threads)
        out["exp_gps_1_thread"] = n_exp * inner / t1 / 1e9
        out["exp_gps"] = max(out["exp_gps_all_threads"], out["exp_gps_1_thread"] * threads)
    del x, y
    m = 1024 if (quick and dev.type == "cpu") else (2048 if dev.type == "cpu" else 8192)
    a = torch.randn(m, m, device=dev)
    b = torch.randn(m, m, device=dev)
    c = torch.empty(m, m, device=dev)
    t = best_time(lambda: torch.mm(a, b, out=c), 2 if quick else 5)
    out["matmul_gflops"] = 2 * m**3 / t / 1e9
    if dev.type == "cuda":
        a16, b16 = a.bfloat16(), b.bfloat16()
        t = best_time(lambda: torch.mm(a16, b16), 5)
        out["matmul_bf16_gflops"] = 2 * m**3 / t / 1e9
    out["threads"] = torch.get_num_threads()
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------


def make_record(case: Case, result: dict, env: dict, run_id: str, limits: Optional[dict] = None) -> dict:
    """One result line. Fields: record version, run id, timestamp, device (name, slug, type), threads, git
    commit, versions, bench, case key, provider, ours, reference provider, mode, shape, params, dtype,
    status ("ok" | "unavailable" | "error" | "timeout"), error, median/p20/p80/min ms, repeats, samples,
    peak bytes + method, input bytes, bytes_moved / exps / flops, achieved fractions of the machine limits."""
    rec = {
        "v": RECORD_VERSION,
        "kind": "result",
        "run_id": run_id,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": env.get("device"),
        "device_slug": env.get("device_slug"),
        "device_type": env.get("device_type"),
        "threads": env.get("threads"),
        "machine_class": env.get("machine_class"),
        "git_commit": env.get("git_commit"),
        "versions": env.get("versions"),
        "bench": case.bench,
        "case": case.case_key,
        "provider": case.provider,
        "ours": bool(case.ours),
        "reference": case.reference,
        "mode": case.mode,
        "shape": dict(case.shape),
        "params": dict(case.params),
        "dtype": case.dtype,
        "size": case.x,
        "size_label": case.size_label or "x".join(case.shape),
        "note": case.note,
        "info": dict(case.info),
        "tolerance": case.tolerance,
        "status": result.get("status", "ok"),
        "error": result.get("error"),
    }
    for key in ("median_ms", "p20_ms", "p80_ms", "min_ms", "repeats", "samples_ms", "peak_bytes", "peak_method",
                "input_bytes", "worker_s"):
        rec[key] = result.get(key)
    moved = result.get("bytes_moved", case.bytes_moved)
    rec["bytes_moved"] = moved
    rec["exps"] = case.exps
    rec["flops"] = case.flops
    med = rec["median_ms"]
    if rec["status"] == "ok" and med and limits:
        sec = med / 1e3
        if moved and limits.get("copy_gbps"):
            rec["bw_frac"] = round(moved / sec / 1e9 / limits["copy_gbps"], 4)
        if case.exps and limits.get("exp_gps"):
            rec["exp_frac"] = round(case.exps / sec / 1e9 / limits["exp_gps"], 4)
        if case.flops and limits.get("matmul_gflops"):
            rec["flop_frac"] = round(case.flops / sec / 1e9 / limits["matmul_gflops"], 4)
    return rec


def add_ratios(records: list[dict]) -> None:
    """Set ``ref_ratio`` = median time / the reference provider's median time (same run, same case key) on each
    record, ``ref_ratio_min`` the same with the fastest samples, and ``ref_mem_ratio`` for peak memory."""
    by_key = {(r["run_id"], r["case"], r["provider"]): r for r in records if r.get("kind") == "result"}
    for r in records:
        if r.get("kind") != "result" or r.get("status") != "ok" or not r.get("reference"):
            continue
        ref = by_key.get((r["run_id"], r["case"], r["reference"]))
        if ref is not None and ref.get("status") == "ok" and ref.get("median_ms"):
            r["ref_ratio"] = round(r["median_ms"] / ref["median_ms"], 5)
            if r.get("min_ms") and ref.get("min_ms"):
                r["ref_ratio_min"] = round(r["min_ms"] / ref["min_ms"], 5)
            if r.get("peak_bytes") is not None and ref.get("peak_bytes"):
                r["ref_mem_ratio"] = round(r["peak_bytes"] / ref["peak_bytes"], 5)


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def load_jsonl(path: Path | str) -> list[dict]:
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc})") from exc
    return out


# ----------------------------------------------------------------------------------------------
# regression comparison
# ----------------------------------------------------------------------------------------------


@dataclass
class Finding:
    case: str
    provider: str
    kind: str  # "time" | "memory" | "status"
    baseline: Optional[float]
    current: Optional[float]
    how: str  # "ratio to <ref>" | "absolute ms" | "peak bytes" | ...
    regressed: bool
    detail: str = ""
    tolerance: Optional[float] = None  # the tolerance applied when not the report's

    @property
    def change(self) -> Optional[float]:
        if self.baseline and self.current is not None:
            return self.current / self.baseline - 1.0
        return None


@dataclass
class CompareReport:
    findings: list[Finding] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    tolerance: float = 0.25
    note: str = ""

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.regressed]

    @property
    def ok(self) -> bool:
        return not self.regressions and bool(self.findings)


RATIO_HOW = "time /"
MEMORY_SLACK_BYTES = 4 * 2**20  # RSS is page/allocator granular: ignore growth below this


def _latest(records: Iterable[dict]) -> dict:
    """Latest record per (case, provider) (file order breaks timestamp ties)."""
    out: dict = {}
    for r in records:
        if r.get("kind", "result") != "result":
            continue
        out[(r["case"], r["provider"])] = r
    return out


def _aggregate(records: Iterable[dict]) -> dict:
    """Per (case, provider): the latest record, with its time ratios, median time and peak replaced by the
    median over every run in ``records`` that measured it (a baseline made of several runs is robust to one
    disturbed run)."""
    runs: dict = {}
    for r in records:
        if r.get("kind", "result") == "result":
            runs.setdefault((r["case"], r["provider"]), []).append(r)
    out = {}
    for key, rs in runs.items():
        agg = dict(rs[-1])
        ok = [r for r in rs if r.get("status") == "ok"]
        if ok and agg.get("status") == "ok":
            for field_ in ("ref_ratio_min", "ref_ratio", "median_ms", "peak_bytes"):
                vals = [r[field_] for r in ok if r.get(field_) is not None]
                if vals:
                    agg[field_] = quantile(vals, 0.5)
            agg["runs"] = len(ok)
        out[key] = agg
    return out


CROSS_MACHINE_TOLERANCE = 2.0


def compare(current: list[dict], baseline: list[dict], tolerance: float = 0.25,
            memory_tolerance: Optional[float] = None,
            cross_machine_tolerance: float = CROSS_MACHINE_TOLERANCE, gate_time: bool = True) -> CompareReport:
    """Compare our providers' records in ``current`` against ``baseline``.

    Time: on CPU (or when the GPU names differ) the ratio of our time to the reference provider's time in the
    same run must not grow by more than ``tolerance`` (relative). The ratio uses each provider's fastest sample
    (``ref_ratio_min``; falls back to medians): on a shared CPU interference only ever adds time, so the
    fastest samples are the most reproducible. On the same GPU the absolute median must not grow. Memory: peak bytes must not grow by more than ``memory_tolerance`` (defaults
    to ``tolerance``) plus 4 MiB. Baseline values are medians over all runs the baseline file holds for a
    case (see :func:`_aggregate`); several quick runs make a robust baseline. A case measured fine in the baseline that is now unavailable/failing is a
    regression. Baseline cases not run now are listed as skipped.

    Machine classes (:func:`machine_class`): ratios measured on another kind of CPU are not comparable at
    ``tolerance``. When the baseline holds records of the current run's class, only those are used; when it
    holds none, all of its records are used and a time ratio fails only past ``cross_machine_tolerance``
    (default +200%: catches a lost kernel or a fallback to a slow path, not a 25% slowdown). The report says
    which applied.

    A case of ours in ``current`` that the baseline lacks fails against a baseline of the same machine class
    (and is listed as skipped against another class). ``gate_time=False``: time findings are reported (their
    verdict in the detail) but never fail; memory, status and missing cases still do.
    """
    mem_tol = tolerance if memory_tolerance is None else memory_tolerance
    add_ratios(current)
    add_ratios(baseline)
    cur = _latest(current)
    classes = {r.get("machine_class") for r in current if r.get("kind", "result") == "result"}
    cur_class = next(iter(classes)) if len(classes) == 1 else None
    # records without a class (older files) match each other, as before classes existed
    same = [r for r in baseline if len(classes) == 1 and r.get("kind", "result") == "result"
            and r.get("machine_class") == cur_class]
    cross = not same
    base = _aggregate(same if same else baseline)
    rep = CompareReport(tolerance=tolerance)
    if cross:
        known = sorted({str(r.get("machine_class")) for r in baseline if r.get("kind", "result") == "result"})
        rep.note = (f"no baseline records of this machine class ({cur_class}); baseline classes: "
                    f"{', '.join(known) or 'none'}. CPU time ratios are compared with the cross-machine tolerance "
                    f"{cross_machine_tolerance:.0%} (ratios differ across CPUs).")
    for key, b in base.items():
        if not b.get("ours"):
            continue
        c = cur.get(key)
        if c is None:
            rep.skipped.append(f"{key[0]} [{key[1]}]: not run now")
            continue
        if b.get("status") != "ok":
            rep.skipped.append(f"{key[0]} [{key[1]}]: baseline status {b.get('status')}")
            continue
        if c.get("status") != "ok":
            rep.findings.append(Finding(key[0], key[1], "status", None, None, "status", True,
                                        f"was ok, now {c.get('status')}: {c.get('error') or ''}".strip()))
            continue
        same_gpu = (c.get("device_type") == "cuda" and b.get("device_type") == "cuda"
                    and c.get("device") == b.get("device"))
        if same_gpu:
            bv, cv, how = b["median_ms"], c["median_ms"], "absolute median ms"
        elif b.get("ref_ratio_min") is not None and c.get("ref_ratio_min") is not None:
            bv, cv, how = b["ref_ratio_min"], c["ref_ratio_min"], f"{RATIO_HOW} {c.get('reference')} fastest time"
        elif b.get("ref_ratio") is not None and c.get("ref_ratio") is not None:
            bv, cv, how = b["ref_ratio"], c["ref_ratio"], f"{RATIO_HOW} {c.get('reference')} median time"
        else:
            rep.skipped.append(f"{key[0]} [{key[1]}]: no reference ratio to compare (time)")
            bv = cv = None
            how = ""
        tol = max(tolerance, c.get("tolerance") or 0.0)
        if cross and not same_gpu:
            tol = max(tol, cross_machine_tolerance)
        if bv is not None and cv is not None:
            rep.findings.append(Finding(key[0], key[1], "time", bv, cv, how, cv > bv * (1.0 + tol),
                                        tolerance=tol))
        bp, cp = b.get("peak_bytes"), c.get("peak_bytes")
        if bp is not None and cp is not None:
            limit = bp * (1.0 + mem_tol) + MEMORY_SLACK_BYTES
            rep.findings.append(Finding(key[0], key[1], "memory", bp, cp, "peak bytes", cp > limit))
    for key, c in cur.items():
        if not c.get("ours") or key in base:
            continue
        if cross:
            rep.skipped.append(f"{key[0]} [{key[1]}]: no baseline entry (baseline of another machine class)")
        else:
            rep.findings.append(Finding(key[0], key[1], "missing", None, None, "baseline entry", True,
                                        "no baseline entry for this case in a baseline of the same machine "
                                        "class: record one (see docs/performance.md)"))
    if not gate_time:
        for f in rep.findings:
            if f.kind == "time" and f.regressed:
                f.regressed = False
                f.detail = (f.detail + " (time is informational: over the tolerance, not gated)").strip()
    return rep


def confirm_time_regressions(rep: CompareReport, remeasure: Callable[[str, str], Optional[float]],
                             attempts: int) -> None:
    """Re-measure each ratio-based time regression up to ``attempts`` times (``remeasure(case, provider)``
    returns the new ratio, or None when it could not be measured); a finding whose re-measured ratio is within
    the tolerance is cleared (noise), otherwise it stays, with the re-measured ratios in its detail."""
    for f in rep.findings:
        if not (f.regressed and f.kind == "time" and f.how.startswith(RATIO_HOW)) or attempts <= 0:
            continue
        seen = []
        for _ in range(attempts):
            ratio = remeasure(f.case, f.provider)
            if ratio is None:
                continue
            seen.append(ratio)
            if ratio <= f.baseline * (1.0 + (f.tolerance if f.tolerance is not None else rep.tolerance)):
                f.regressed = False
                f.current = ratio
                f.detail = f"(passed when re-measured: {', '.join(f'{x:.4g}' for x in seen)})"
                break
        else:
            f.detail = (f"(confirmed by {len(seen)} re-measurements: {', '.join(f'{x:.4g}' for x in seen)})"
                        if seen else "(could not be re-measured)")


def format_compare(rep: CompareReport) -> str:
    lines = [f"Regression check (tolerance {rep.tolerance:.0%}): {len(rep.findings)} checks, "
             f"{len(rep.regressions)} regressions, {len(rep.skipped)} skipped"]
    if rep.note:
        lines.append(f"  note: {rep.note}")

    def fmt(v: Optional[float], kind: str) -> str:
        if v is None:
            return "-"
        if kind == "memory":
            return f"{v / 2**20:.1f} MiB"
        return f"{v:.4g}"

    for f in rep.findings:
        tag = "REGRESSION" if f.regressed else "ok"
        ch = f" ({f.change:+.1%})" if f.change is not None else ""
        if f.tolerance is not None and f.tolerance != rep.tolerance:
            ch += f" [case tolerance {f.tolerance:.0%}]"
        lines.append(f"  [{tag:>10}] {f.case} [{f.provider}] {f.kind}: {f.how}: baseline {fmt(f.baseline, f.kind)}"
                     f" -> now {fmt(f.current, f.kind)}{ch} {f.detail}".rstrip())
    for s in rep.skipped:
        lines.append(f"  [   skipped] {s}")
    if not rep.findings:
        lines.append("  nothing could be compared: no case of the baseline was measured in this run")
    lines.append("RESULT: " + ("PASS" if rep.ok else "FAIL"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# reports: markdown and plots
# ----------------------------------------------------------------------------------------------


def short_error(rec: dict) -> str:
    """One line about a failed record: the last line of a traceback, the first line of other messages."""
    lines = [ln.strip() for ln in (rec.get("error") or "").splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[-1] if rec.get("status") == "error" else lines[0]


def _mib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown_table(records: list[dict], limits: Optional[dict] = None, env: Optional[dict] = None) -> str:
    add_ratios(records)
    lines = []
    if env:
        v = env.get("versions", {})
        lines.append(f"Device: **{env.get('device')}** ({env.get('device_type')}, {env.get('threads')} threads); "
                     f"torch {v.get('torch')}, triton {v.get('triton')}, minitron {v.get('minitron')}; "
                     f"commit {env.get('git_commit')}")
        lines.append("")
    if limits:
        lines.append(f"Machine limits measured in this run: copy {limits.get('copy_gbps')} GB/s (read+write), "
                     f"exp {limits.get('exp_gps')} G/s (fp32), matmul {limits.get('matmul_gflops')} GFLOP/s (fp32)")
        lines.append("")
    lines.append("| bench | shape | dtype | params | mode | provider | median ms [p20, p80] | vs ref | "
                 "peak MiB | mem vs ref | %copy BW | %exp | %matmul |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if r.get("kind", "result") != "result":
            continue
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        params = ",".join(f"{k}={v}" for k, v in sorted(r.get("params", {}).items())) or "-"
        if r.get("status") != "ok":
            msg = short_error(r)[:160].replace("|", "/")
            lines.append(f"| {r['bench']} | {shape} | {r['dtype']} | {params} | {r['mode']} | {r['provider']} | "
                         f"{r.get('status')}: {msg} | - | - | - | - | - | - |")
            continue
        ratio = r.get("ref_ratio")
        vs = "-" if ratio is None or r["provider"] == r.get("reference") else f"{1 / ratio:.2f}x"
        mratio = r.get("ref_mem_ratio")
        mvs = "-" if mratio is None or r["provider"] == r.get("reference") else f"{mratio:.3f}"
        lines.append(
            f"| {r['bench']} | {shape} | {r['dtype']} | {params} | {r['mode']} | {r['provider']} | "
            f"{r['median_ms']:.3f} [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}] | {vs} | {_mib(r.get('peak_bytes'))} | "
            f"{mvs} | {_pct(r.get('bw_frac'))} | {_pct(r.get('exp_frac'))} | {_pct(r.get('flop_frac'))} |")
    summary = speedup_summary(records)
    if summary:
        lines.append("")
        lines.append("Our providers against every other provider measured in the same run (speedup = their time / "
                     "ours; memory = our peak / theirs):")
        lines.append("")
        lines.extend(summary)
    lines.append("")
    lines.append("vs ref = reference provider time / this time (>1: faster than the reference); peak = memory beyond "
                 "the inputs during one call (CPU: RSS high-water mark, subprocess per provider).")
    return "\n".join(lines) + "\n"


def speedup_summary(records: list[dict]) -> list[str]:
    """Markdown bullet lines: per case, each of our providers against each other provider."""
    by_case: dict = {}
    for r in records:
        if r.get("kind", "result") == "result" and r.get("status") == "ok":
            by_case.setdefault((r["run_id"], r["case"]), []).append(r)
    lines = []
    for (_, case), rs in by_case.items():
        for ours in (r for r in rs if r.get("ours")):
            parts = []
            for other in rs:
                if other is ours:
                    continue
                sp = other["median_ms"] / ours["median_ms"] if ours["median_ms"] else float("nan")
                mem = ""
                if ours.get("peak_bytes") is not None and other.get("peak_bytes"):
                    mem = f", mem {ours['peak_bytes'] / other['peak_bytes']:.3f}"
                parts.append(f"{sp:.2f}x vs {other['provider']}{mem}")
            extra = ""
            grad = (ours.get("info") or {}).get("grad_bytes")
            if grad and ours.get("peak_bytes") is not None:
                extra = f"; peak {_mib(ours['peak_bytes'])} MiB = {ours['peak_bytes'] / grad:.2f} x gradient"
            for key, label in (("bw_frac", "copy BW"), ("exp_frac", "exp"), ("flop_frac", "matmul")):
                if ours.get(key) is not None:
                    extra += f"; {100 * ours[key]:.0f}% of {label}"
            lines.append(f"- `{case}` **{ours['provider']}** {ours['median_ms']:.2f} ms: "
                         + ("; ".join(parts) or "no other provider") + extra)
    return lines


def write_plots(records: list[dict], out_dir: Path, slug: str) -> list[Path]:
    """Time and peak memory vs size, one line per provider, one PNG per (bench, mode, dtype, params)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        return []
    groups: dict = {}
    for r in records:
        if r.get("kind", "result") != "result" or r.get("status") != "ok":
            continue
        params = ",".join(f"{k}={v}" for k, v in sorted(r.get("params", {}).items()))
        groups.setdefault((r["bench"], r["mode"], r["dtype"], params), []).append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (bench, mode, dtype, params), rs in sorted(groups.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for provider in sorted({r["provider"] for r in rs}):
            pts = sorted((r["size"], r["median_ms"], r["p20_ms"], r["p80_ms"], r.get("peak_bytes"))
                         for r in rs if r["provider"] == provider)
            xs = [p[0] for p in pts]
            ax_t.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                          marker="o", label=provider, capsize=3)
            mem = [(p[0], p[4] / 2**20) for p in pts if p[4] is not None]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=provider)
        label = rs[0].get("size_label") or "size"
        ticks = sorted({r["size"]: ",".join(f"{k}={v}" for k, v in r["shape"].items()) for r in rs}.items())
        for ax, ylabel in ((ax_t, "median time (ms) [p20, p80]"), (ax_m, "peak memory beyond inputs (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("symlog" if ax is ax_m else "log")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks([t[0] for t in ticks])
            ax.set_xticklabels([t[1] for t in ticks], rotation=25, ha="right", fontsize=7)
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{bench} {mode} {dtype} {params} on {slug}")
        fig.tight_layout()
        name = sanitize(f"{slug}-{bench}-{mode}-{dtype}-{params}") + ".png"
        path = out_dir / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# discovery and execution
# ----------------------------------------------------------------------------------------------


def discover(only: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """``{name: module_or_exception}`` for every ``benchmarks/bench_<name>.py`` (filtered by ``only``)."""
    names = sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))
    if only:
        unknown = [o for o in only if o not in names]
        if unknown:
            raise SystemExit(f"--only: unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}")
        names = [n for n in names if n in only]
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = importlib.import_module(f"benchmarks.bench_{name}")
        except Exception as exc:  # noqa: BLE001 - report, keep the others running
            out[name] = exc
    return out


def module_cases(module: Any, cfg: BenchConfig) -> list[Case]:
    fn = getattr(module, "cases", None)
    if fn is None:
        return []
    cases = list(fn(cfg))
    ids = [c.id for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"{module.__name__}: duplicate case ids {sorted(dup)}")
    return cases


def _unavailable_types() -> tuple[type, ...]:
    types: list[type] = [Unavailable, ImportError]
    try:
        from minitron.ops._dispatch import BackendUnavailableError

        types.append(BackendUnavailableError)
    except Exception:  # noqa: BLE001
        pass
    try:
        from minitron._ext import ExtensionNotBuiltError

        types.append(ExtensionNotBuiltError)
    except Exception:  # noqa: BLE001
        pass
    return tuple(types)


def run_case_inprocess(case: Case, device: str, warmup: int, repeats: int, max_time_s: float) -> dict:
    """Set up and measure one case in this process; never raises for provider problems."""
    t0 = time.perf_counter()
    try:
        bench = case.setup(case=case, device=device)
    except _unavailable_types() as exc:
        return {"status": "unavailable", "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001
        return {"status": "error", "error": "".join(traceback.format_exception_only(type(exc), exc)).strip()}
    try:
        inputs = bench.keep if isinstance(bench.keep, (list, tuple)) else []
        input_bytes = sum(t.numel() * t.element_size() for t in inputs if hasattr(t, "element_size"))
        res = measure(bench, device, warmup=case.warmup if case.warmup is not None else warmup,
                      repeats=case.repeats if case.repeats is not None else repeats,
                      max_time_s=case.max_time_s if case.max_time_s is not None else max_time_s)
        res["input_bytes"] = int(input_bytes)
        if bench.bytes_moved is not None:
            res["bytes_moved"] = float(bench.bytes_moved)
        res["status"] = "ok"
    except _unavailable_types() as exc:
        res = {"status": "unavailable", "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001
        tb = traceback.format_exc(limit=6)
        res = {"status": "error", "error": tb.strip()[-2000:]}
    res["worker_s"] = round(time.perf_counter() - t0, 3)
    return res


def run_case_subprocess(module_name: str, case: Case, cfg: BenchConfig, warmup: int, repeats: int,
                        max_time_s: float, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="minitron-bench-") as tmp:
        out_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "benchmarks._harness", "--worker", "--module", module_name, "--case-id", case.id,
               "--cfg", json.dumps(cfg.to_json()), "--warmup", str(warmup), "--repeats", str(repeats),
               "--max-time", str(max_time_s), "--out", out_path]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                  timeout=case.timeout_s or timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"worker exceeded {case.timeout_s or timeout_s:.0f} s",
                    "worker_s": round(time.perf_counter() - t0, 3)}
        if os.path.exists(out_path):
            with open(out_path) as f:
                return json.load(f)
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        reason = f"worker exited with code {proc.returncode}"
        if proc.returncode in (-9, 137):
            reason += " (killed: out of memory?)"
        return {"status": "error", "error": f"{reason}\n{tail}", "worker_s": round(time.perf_counter() - t0, 3)}


def _worker_main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks._harness --worker")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--module", required=True)
    ap.add_argument("--case-id", required=True)
    ap.add_argument("--cfg", required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--repeats", type=int, required=True)
    ap.add_argument("--max-time", type=float, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    cfg = BenchConfig(**json.loads(a.cfg))
    try:
        module = importlib.import_module(a.module)
        matches = [c for c in module_cases(module, cfg) if c.id == a.case_id]
        if not matches:
            res = {"status": "error", "error": f"case {a.case_id!r} not produced by {a.module}.cases(cfg) in the worker"}
        else:
            res = run_case_inprocess(matches[0], cfg.device, a.warmup, a.repeats, a.max_time)
    except Exception:  # noqa: BLE001
        res = {"status": "error", "error": traceback.format_exc(limit=6)[-2000:]}
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run minitron's benchmarks (every benchmarks/bench_*.py): providers side by side, median time "
                    "[p20, p80] and peak memory, results appended to .bench-out/results/<device>.jsonl (untracked; "
                    "--save: the committed benchmarks/results/<device>.jsonl), a markdown table and plots; "
                    "--compare fails on regressions.")
    ap.add_argument("--only", default=None,
                    help="comma-separated benchmark names (file name without bench_), e.g. kl,fused_linear_kl")
    ap.add_argument("--quick", action="store_true", help="small shapes and few repeats (CI; a few minutes on CPU)")
    ap.add_argument("--full", action="store_true", help="the full shape sweep (meant for GPUs)")
    ap.add_argument("--skip-heavy", action="store_true",
                    help="leave out the heavy headline cases that take minutes on a CPU")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--filter", action="append", default=None,
                    help="only cases whose id contains this substring (repeat the option for several)")
    ap.add_argument("--providers", default=None, help="comma-separated providers to run")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 10, quick 5)")
    ap.add_argument("--max-time", type=float, default=None,
                    help="stop sampling a case after this many seconds (default 20, quick 3)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="kill a case's worker after this many seconds")
    ap.add_argument("--inprocess", action="store_true",
                    help="run cases in this process (faster; peak memory less trustworthy)")
    ap.add_argument("--results-dir", default=None,
                    help="where results, tables and plots go (default: the untracked .bench-out/results; "
                         "with --save: benchmarks/results)")
    ap.add_argument("--save", action="store_true",
                    help="append the records to the committed benchmarks/results/<device>.jsonl (and rewrite its "
                         "-latest.md and plots); refused on a tree with uncommitted changes")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="with --save: allow a tree with uncommitted changes (the records say -dirty)")
    ap.add_argument("--no-save", action="store_true", help="do not write records, tables or plots anywhere")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--print-device-slug", action="store_true",
                    help="print the device's file name (results/<slug>.jsonl, baselines/<slug>.jsonl) and exit")
    ap.add_argument("--compare", default=None, metavar="BASELINE.jsonl",
                    help="compare with a baseline results file; exit 1 on regression")
    ap.add_argument("--tolerance", type=float, default=0.25, help="allowed relative slowdown (default 0.25)")
    ap.add_argument("--confirm", type=int, default=2,
                    help="re-measure a ratio-based time regression up to this many times before failing (default 2)")
    ap.add_argument("--cross-machine-tolerance", type=float, default=CROSS_MACHINE_TOLERANCE,
                    help="allowed relative growth of a CPU time ratio when the baseline has no records of this "
                         "machine class (default 2.0 = +200%%)")
    ap.add_argument("--time-informational", action="store_true",
                    help="with --compare: report time findings but do not fail on them (memory, status and "
                         "missing cases still fail); the CPU gate on time is benchmarks.instructions")
    ap.add_argument("--memory-tolerance", type=float, default=None,
                    help="allowed relative peak-memory growth (default: --tolerance)")
    ap.add_argument("--save-baseline", default=None, metavar="PATH",
                    help="also write this run's records to PATH (overwriting it), to serve as a baseline")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or _default_device()
    if args.print_device_slug:
        print(sanitize(device_name(device)))
        return 0
    cfg = BenchConfig(quick=args.quick, full=args.full, device=device, heavy=not args.skip_heavy)
    warmup = 1 if args.warmup is None else args.warmup
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 10)
    max_time_s = args.max_time if args.max_time is not None else (3.0 if args.quick else 20.0)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    providers = {s.strip() for s in args.providers.split(",")} if args.providers else None
    if args.compare and not os.path.exists(args.compare):
        print(f"--compare: baseline file {args.compare} does not exist", file=sys.stderr)
        return 2
    if args.save and args.no_save:
        print("--save and --no-save contradict each other", file=sys.stderr)
        return 2
    if args.save and not args.allow_dirty and not args.list:
        commit = git_commit()
        if commit is None or commit.endswith("-dirty"):
            print("--save: the tree has uncommitted changes (or is not a git checkout), so the records could not "
                  "name the code they measured; commit first (or pass --allow-dirty)", file=sys.stderr)
            return 2

    modules = discover(only)
    plan: list[tuple[str, Case]] = []
    for name, mod in modules.items():
        if isinstance(mod, Exception):
            print(f"[{name}] import failed: {type(mod).__name__}: {mod}", file=sys.stderr)
            continue
        if not hasattr(mod, "cases"):
            print(f"[{name}] has no cases(cfg) entry point; skipped", file=sys.stderr)
            continue
        try:
            for c in module_cases(mod, cfg):
                if args.filter and not any(f in c.id for f in args.filter):
                    continue
                if providers and c.provider not in providers:
                    continue
                plan.append((mod.__name__, c))
        except Exception as exc:  # noqa: BLE001
            print(f"[{name}] cases() failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    if args.list:
        for mod_name, c in plan:
            print(f"{mod_name}: {c.id}")
        return 0
    if not plan:
        print("no benchmark cases selected", file=sys.stderr)
        return 2

    env = environment(device)
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    print(f"# minitron benchmarks on {env['device']} ({device}, {env['threads']} threads), "
          f"{len(plan)} cases{' (quick)' if args.quick else ''}", flush=True)
    limits = machine_limits(device, quick=args.quick)
    print(f"# machine limits: {limits}", flush=True)
    machine_rec = {"v": RECORD_VERSION, "kind": "machine", "run_id": run_id,
                   "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **env,
                   "limits": limits, "quick": args.quick}
    records: list[dict] = []
    t_start = time.perf_counter()
    for i, (mod_name, case) in enumerate(plan, 1):
        if args.inprocess:
            res = run_case_inprocess(case, device, warmup, repeats, max_time_s)
        else:
            res = run_case_subprocess(mod_name, case, cfg, warmup, repeats, max_time_s, args.timeout)
        rec = make_record(case, res, env, run_id, limits)
        records.append(rec)
        if rec["status"] == "ok":
            msg = (f"{rec['median_ms']:10.3f} ms [{rec['p20_ms']:.3f}, {rec['p80_ms']:.3f}] "
                   f"peak {_mib(rec['peak_bytes'])} MiB")
        else:
            msg = f"{rec['status']}: {short_error(rec)}"
        print(f"[{i}/{len(plan)}] {case.id}: {msg}", flush=True)
    add_ratios(records)
    table = markdown_table(records, limits, env)
    print()
    print(table)
    print(f"# {len(records)} cases in {time.perf_counter() - t_start:.0f} s", flush=True)

    if not args.no_save:
        results_dir = Path(args.results_dir) if args.results_dir else (RESULTS_DIR if args.save else SCRATCH_DIR)
        slug = env["device_slug"]
        append_jsonl(results_dir / f"{slug}.jsonl", [machine_rec] + records)
        (results_dir / f"{slug}-latest.md").write_text(table)
        print(f"# appended to {results_dir / (slug + '.jsonl')}; table in {results_dir / (slug + '-latest.md')}")
        if not args.no_plots:
            paths = write_plots(records, results_dir / "plots", slug)
            print(f"# {len(paths)} plots in {results_dir / 'plots'}")
    if args.save_baseline:
        path = Path(args.save_baseline)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for r in [machine_rec] + records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        print(f"# baseline written to {path}")
    if args.compare:
        rep = compare(records, load_jsonl(args.compare), args.tolerance, args.memory_tolerance,
                      args.cross_machine_tolerance, gate_time=not args.time_informational)
        by_id = {c.id: (m, c) for m, c in plan}

        def run(mod_name: str, case: Case) -> dict:
            if args.inprocess:
                return run_case_inprocess(case, device, warmup, repeats, max_time_s)
            return run_case_subprocess(mod_name, case, cfg, warmup, repeats, max_time_s, args.timeout)

        def remeasure(case_key: str, provider: str) -> Optional[float]:
            ours = by_id.get(f"{case_key}|{provider}")
            if ours is None or not ours[1].reference:
                return None
            ref = by_id.get(f"{case_key}|{ours[1].reference}")
            if ref is None:
                return None
            a, b = run(*ours), run(*ref)
            if a.get("status") != "ok" or b.get("status") != "ok" or not b.get("min_ms"):
                return None
            ratio = a["min_ms"] / b["min_ms"]
            print(f"# re-measured {case_key} [{provider}]: {ratio:.4g} x {ours[1].reference}", flush=True)
            return ratio

        if rep.regressions and args.confirm > 0:
            print(f"\n# {len(rep.regressions)} regression(s): re-measuring ratio regressions up to {args.confirm} "
                  "times to rule out noise", flush=True)
            confirm_time_regressions(rep, remeasure, args.confirm)
        print()
        print(format_compare(rep))
        return 0 if rep.ok else 1
    return 0


if __name__ == "__main__":
    # delegate to the importable module so bench scripts and the worker share one copy of the classes
    from benchmarks import _harness as _h

    if "--worker" in sys.argv[1:]:
        sys.exit(_h._worker_main(sys.argv[1:]))
    sys.exit(_h.main(sys.argv[1:]))
