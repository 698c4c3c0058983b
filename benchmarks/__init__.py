"""minitron benchmarks: one ``bench_<name>.py`` script per op family plus the shared harness.

Run ``python -m benchmarks`` (all), ``python -m benchmarks --only kl --quick``, or
``python -m benchmarks --quick --compare benchmarks/baselines/cpu.jsonl``. See :mod:`benchmarks._harness`
for how a script plugs in (``cases(cfg) -> list[Case]``) and how time and memory are measured,
:mod:`benchmarks.instructions` for the CPU regression gate (instructions per op call under valgrind) and
:mod:`benchmarks.report` for the README/docs tables generated from the committed records.
"""
