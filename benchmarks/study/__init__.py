"""The Minitron study (an experiment, not library code): :mod:`benchmarks.study.experiment`, run by
``python -m benchmarks.minitron_study``."""
