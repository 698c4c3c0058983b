"""Deprecated import path: the module ``minitron.distill`` moved to :mod:`minitron.train` (``DistillConfig``,
``distill_model``, ``make_distillation_loss``, ``check_distillable``, ``final_hidden_and_head``,
``correct_model``, ``KL_MODES``). This re-export goes in the next release.

``minitron.distill`` is also the name of the Python API function :func:`minitron.api.distill`; for this
release the module itself is callable and forwards to it, so ``minitron.distill(student, teacher, data,
output_dir=...)`` works whether or not this module was imported.
"""
from __future__ import annotations

import sys
import types
import warnings
from typing import Any

from minitron.train import (KL_MODES, DistillConfig, check_distillable, correct_model,  # noqa: F401
                            distill_model, final_hidden_and_head, make_distillation_loss)

__all__ = ["DistillConfig", "KL_MODES", "distill_model", "correct_model", "make_distillation_loss",
           "check_distillable", "final_hidden_and_head"]

warnings.warn("minitron.distill (the module) is deprecated; import from minitron.train", DeprecationWarning,
              stacklevel=2)


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from minitron.api import distill

        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
