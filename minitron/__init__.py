"""minitron: Minitron-style structured pruning and logit distillation with custom kernels.

Layout (the folders follow the recipe):

* :mod:`minitron.ops` / :mod:`minitron.kernels`: the custom kernels behind ``torch.ops.minitron.*``;
* :mod:`minitron.models`: adapters saying where the prunable axes of each Hugging Face family live;
* :mod:`minitron.compress`: importance estimation, width and depth pruning;
* :mod:`minitron.train`: the training loop, logit distillation and teacher correction;
* :mod:`minitron.eval`: perplexity;
* :mod:`minitron.io`: data loading/packing, checkpoints, tokenizers, atomic writes, the output-safety rule;
* :mod:`minitron.api`, :mod:`minitron.cli`, :mod:`minitron.pipeline`, :mod:`minitron.demo`: the driver on top.

The driver functions ``estimate_importance``, ``prune``, ``distill``, ``correct_teacher`` and
``evaluate_perplexity`` are importable from ``minitron`` itself. Importing the package never requires the compiled extension: ops that need it raise an
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
