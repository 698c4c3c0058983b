"""minitron: Minitron-style structured pruning and logit distillation with custom kernels.

The public kernels live in :mod:`minitron.ops`; the pruning/distillation driver in the other
submodules. Importing the package never requires the compiled extension: ops that need it raise an
error explaining how to build it.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]


def __getattr__(name: str):  # lazy driver API so `import minitron` stays cheap
    if name in {"estimate_importance", "prune", "distill", "evaluate_perplexity", "correct_teacher"}:
        from minitron import api

        return getattr(api, name)
    raise AttributeError(f"module 'minitron' has no attribute {name!r}")
