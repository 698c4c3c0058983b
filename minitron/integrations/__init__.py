"""Drop-in replacements for the distillation losses of the trainers people use.

``minitron.integrations.trl``
    :func:`~minitron.integrations.trl.generalized_jsd_loss` (TRL ``GKDTrainer.generalized_jsd_loss``),
    :func:`~minitron.integrations.trl.chunked_divergence_loss` (TRL ``DistillationTrainer``'s
    ``_chunked_divergence_loss``), :class:`~minitron.integrations.trl.MinitronGKDTrainer` and
    :func:`~minitron.integrations.trl.patch_distillation_trainer`.
``minitron.integrations.liger``
    :class:`~minitron.integrations.liger.JSD` (``LigerJSD``),
    :class:`~minitron.integrations.liger.FusedLinearJSD` (``LigerFusedLinearJSD``) and
    :func:`~minitron.integrations.liger.kl_div_loss` (``torch.nn.KLDivLoss`` / ``LigerKLDIVLoss``).

Every function here computes its loss with :func:`minitron.ops.kl_div` or
:func:`minitron.ops.fused_linear_kl_div` with ``scale_by_t2=False`` (neither TRL nor Liger multiplies
by ``T**2``). The argument mapping is tabulated in ``docs/trainers.md``. Neither TRL nor Liger is
imported by this package unless a function needs it (only the trainer subclass and the patch do).
"""
from __future__ import annotations

__all__ = ["trl", "liger"]
