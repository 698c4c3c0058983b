"""Training: the shared loop (:mod:`.loop`: AdamW, warmup + cosine, checkpoints, exact resume), logit
distillation (:mod:`.distill`), teacher correction (:mod:`.correction`) and their runs under torchrun
(:mod:`.distributed`: DDP, FSDP2, sharded checkpoints).

The public names are importable from here (``from minitron.train import TrainConfig, distill_model``).
This package replaced the module ``minitron.train``; that module's helpers that now live elsewhere
(``atomic_write_json``/``atomic_write_text`` in :mod:`minitron.io.files`; ``resolve_device``,
``resolve_bf16``, ``autocast_context``, ``seed_everything`` in :mod:`minitron.runtime`) still resolve
here for one release, with a DeprecationWarning.
"""
from __future__ import annotations

import warnings
from typing import Any

from minitron.train.correction import correct_model
from minitron.train.distill import (HIDDEN_BALANCES, HIDDEN_LOSSES, KL_MODES, PROJECTIONS_NAME, DistillConfig,
                                    DistillationLoss, HiddenPlan, HiddenProjections, capture_layer_outputs,
                                    check_distillable, distill_model, final_hidden_and_head, make_distillation_loss,
                                    parse_layer_map, plan_hidden_distillation, pruning_record, resolve_vocab_size)
from minitron.train.distributed import DistributedError, distributed_session
from minitron.train.loop import (CKPT_DIR, LOG_NAME, PLOT_NAME, RESUMABLE_CHANGES, TrainConfig, TrainResult,
                                 default_eval_fn, latest_checkpoint, lm_loss, make_optimizer, read_log, train)

__all__ = ["TrainConfig", "TrainResult", "train", "lm_loss", "make_optimizer", "latest_checkpoint", "read_log",
           "default_eval_fn", "LOG_NAME", "PLOT_NAME", "CKPT_DIR", "RESUMABLE_CHANGES", "DistillConfig",
           "KL_MODES", "distill_model", "make_distillation_loss", "check_distillable", "final_hidden_and_head",
           "correct_model", "DistillationLoss", "DistributedError", "distributed_session", "HIDDEN_LOSSES",
           "HIDDEN_BALANCES", "PROJECTIONS_NAME", "HiddenPlan", "HiddenProjections", "capture_layer_outputs",
           "parse_layer_map", "plan_hidden_distillation", "pruning_record", "resolve_vocab_size"]

_MOVED = {"atomic_write_json": "minitron.io.files", "atomic_write_text": "minitron.io.files",
          "resolve_device": "minitron.runtime", "resolve_bf16": "minitron.runtime",
          "autocast_context": "minitron.runtime", "seed_everything": "minitron.runtime"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        warnings.warn(f"minitron.train.{name} is deprecated; import it from {_MOVED[name]}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'minitron.train' has no attribute {name!r}")
