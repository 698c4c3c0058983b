"""Teacher correction: LM fine-tuning of the teacher on the distillation data before pruning (Minitron)."""
from __future__ import annotations

from typing import Any

import torch

from minitron.train.loop import TrainConfig, TrainResult, lm_loss, train
from minitron.io.data import PackedDataset

__all__ = ["correct_model"]


def correct_model(
    model: torch.nn.Module,
    data: PackedDataset,
    train_config: TrainConfig,
    output_dir: Any,
    **run: Any,
) -> TrainResult:
    """Teacher correction: fine-tune ``model`` in place with the LM loss on the distillation data (``**run``: the
    keywords of :func:`minitron.train.loop.train`: ``eval_data``, ``resume``, ``callbacks``, ``run_info``)."""
    return train(model, lm_loss, data, train_config, output_dir, plot_title="LM fine-tuning", **run)
