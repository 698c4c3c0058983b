"""Teacher correction: LM fine-tuning of the teacher on the distillation data before pruning (Minitron)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

from minitron.train.loop import Callback, TrainConfig, TrainResult, lm_loss, train
from minitron.io.data import PackedDataset

__all__ = ["correct_model"]


def correct_model(
    model: torch.nn.Module,
    data: PackedDataset,
    train_config: TrainConfig,
    output_dir: Any,
    *,
    eval_data: Optional[PackedDataset] = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    run_info: Optional[Dict[str, Any]] = None,
) -> TrainResult:
    """Teacher correction: fine-tune ``model`` in place with the LM loss on the distillation data."""
    return train(
        model, lm_loss, data, train_config, output_dir, eval_data=eval_data, resume=resume,
        callbacks=callbacks, run_info=run_info, plot_title="LM fine-tuning",
    )
