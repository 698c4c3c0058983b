"""Shared benchmark harness (a facade): cases, timing, peak memory, machine limits, records, reports, regression
checks. The code lives in modules named for what they do - :mod:`benchmarks.paths` (directories),
:mod:`benchmarks.cases` (describing cases), :mod:`benchmarks.stats`, :mod:`benchmarks.machine` (device, commit,
machine class, machine limits), :mod:`benchmarks.measure` (timing and peak memory), :mod:`benchmarks.records`,
:mod:`benchmarks.compare` (wall-clock ``--compare``), :mod:`benchmarks.summary` (a run's table and plots),
:mod:`benchmarks.runner` (discovery, workers, the CLI) - plus :mod:`benchmarks.instructions` (the CPU gate) and
:mod:`benchmarks.report` (the generated README/docs tables). Bench scripts import from here.

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
* Each case runs in its own subprocess (``python -m benchmarks.runner --worker ...``): ``setup``, ``warmup``
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

import sys

from benchmarks.cases import (MODES, Bench, BenchConfig, Case, Unavailable, autograd_bench, available_memory_bytes,
                              dtype_of, our_backends, require_free_memory, tensor_bytes)
from benchmarks.compare import (CROSS_MACHINE_TOLERANCE, MEMORY_SLACK_BYTES, RATIO_HOW, CompareReport, Finding,
                                _aggregate, _latest, compare, confirm_time_regressions, format_compare)
from benchmarks.machine import (cpu_model, device_name, environment, git_commit, machine_class, machine_limits,
                                sanitize, versions)
from benchmarks.measure import PeakMemory, _sync, measure
from benchmarks.paths import BENCH_DIR, RECORD_VERSION, REPO_ROOT, RESULTS_DIR, SCRATCH_DIR
from benchmarks.records import add_ratios, append_jsonl, load_jsonl, make_record
from benchmarks.runner import (_default_device, _unavailable_types, _worker_main, build_parser, discover, main,
                               module_cases, run_case_inprocess, run_case_subprocess)
from benchmarks.stats import quantile, summarize
from benchmarks.summary import _mib, markdown_table, short_error, speedup_summary, write_plots

__all__ = [
    "BenchConfig", "Case", "Bench", "Unavailable", "autograd_bench", "our_backends", "measure",
    "machine_limits", "device_name", "sanitize", "summarize", "quantile", "make_record", "compare",
    "format_compare", "markdown_table", "discover", "main", "dtype_of", "tensor_bytes", "require_free_memory",
    "available_memory_bytes", "speedup_summary", "MODES", "CROSS_MACHINE_TOLERANCE", "MEMORY_SLACK_BYTES",
    "RATIO_HOW", "CompareReport", "Finding", "confirm_time_regressions", "cpu_model", "environment", "git_commit",
    "machine_class", "versions", "PeakMemory", "BENCH_DIR", "RECORD_VERSION", "REPO_ROOT", "RESULTS_DIR",
    "SCRATCH_DIR", "add_ratios", "append_jsonl", "load_jsonl", "build_parser", "module_cases", "run_case_inprocess",
    "run_case_subprocess", "short_error", "write_plots", "_aggregate", "_latest", "_sync", "_default_device",
    "_unavailable_types", "_worker_main", "_mib",
]

if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        sys.exit(_worker_main(sys.argv[1:]))
    sys.exit(main(sys.argv[1:]))
