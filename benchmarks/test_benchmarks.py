"""pytest-benchmark entry: ``pytest benchmarks/ --benchmark-only`` times the small (``--quick``) cases of every
``benchmarks/bench_*.py`` in this process, one pytest-benchmark test per case.

torch.compile providers are left out (compilation takes tens of seconds per case on a CPU) unless
``MINITRON_BENCH_COMPILE=1``. Providers that cannot run here (extension not built, no GPU, library not
installed) are skipped with the reason. Peak memory and the regression check live in ``python -m benchmarks``.
"""
from __future__ import annotations

import os

import pytest

from benchmarks import _harness as h

pytest.importorskip("pytest_benchmark")

DEVICE = h._default_device()
CFG = h.BenchConfig(quick=True, device=DEVICE)


def _collect():
    params = []
    for name, mod in h.discover().items():
        if isinstance(mod, Exception) or not hasattr(mod, "cases"):
            params.append(pytest.param(name, None, id=f"{name}-import-error",
                                       marks=pytest.mark.skip(reason=f"bench_{name} not importable: {mod}")))
            continue
        for case in h.module_cases(mod, CFG):
            if case.provider == "torch-compile" and os.environ.get("MINITRON_BENCH_COMPILE") != "1":
                continue
            params.append(pytest.param(name, case, id=case.id.replace("|", "/")))
    return params


@pytest.mark.parametrize("name, case", _collect())
def test_benchmark(benchmark, name, case):
    try:
        bench = case.setup(case=case, device=DEVICE)
    except h._unavailable_types() as exc:
        pytest.skip(f"{case.provider} unavailable: {exc}")
    benchmark.group = case.case_key
    benchmark.extra_info.update({"provider": case.provider, "shape": case.shape, "dtype": case.dtype,
                                 "mode": case.mode, "params": case.params})
    sync = (lambda: h._sync(DEVICE))

    def call():
        bench.fn()
        sync()

    setup = None
    if bench.prepare is not None:
        def setup():
            bench.prepare()
            sync()

    try:
        benchmark.pedantic(call, setup=setup, rounds=case.repeats or 3, warmup_rounds=1, iterations=1)
    except h._unavailable_types() as exc:
        pytest.skip(f"{case.provider} unavailable: {exc}")
