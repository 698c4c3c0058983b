"""Liger-Kernel's distillation losses (and ``torch.nn.KLDivLoss``) as minitron modules with the same arguments.

=================================================  =========================================================
Liger / torch                                      minitron
=================================================  =========================================================
``LigerJSD(beta, ignore_index)``                   :class:`JSD` ``(beta, ignore_index)``
``(log_q, log_p, shift_labels=None)``              same call; ``kl_div(log_q, log_p, mode, beta, mask,
                                                   scale_by_t2=False)`` (log-probabilities are valid logits)
``LigerFusedLinearJSD(jsd_beta, ignore_index,      :class:`FusedLinearJSD` ``(jsd_beta, ignore_index,
temperature)``                                     temperature)``; ``fused_linear_kl_div``
``torch.nn.KLDivLoss(reduction, log_target)`` /    :class:`KLDivLoss` ``(reduction, log_target)``;
``LigerKLDIVLoss``                                 ``kl_div(input, log(target), mode="forward")``
=================================================  =========================================================

Liger's ``beta`` means what TRL's and ours mean (0 forward KL(teacher || student), 1 reverse KL, else the
generalised JSD with ``M = beta P_teacher + (1 - beta) Q_student``). Liger's reduction is the mean over
non-ignored tokens (``shift_labels != ignore_index``; all tokens without labels), our ``reduction="mean"``
with ``mask``. Differences: with every token ignored Liger divides by zero, ours returns 0; ours returns fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from minitron.integrations.trl import beta_to_mode
from minitron.ops import fused_linear_kl_div, kl_div

__all__ = ["JSD", "FusedLinearJSD", "KLDivLoss", "kl_div_loss"]


def _mask(shift_labels: Optional[Tensor], ignore_index: int, lead_shape: torch.Size) -> Optional[Tensor]:
    if shift_labels is None:
        return None
    if not isinstance(shift_labels, Tensor):
        raise TypeError(f"shift_labels must be an integer torch.Tensor or None, got {type(shift_labels).__name__}")
    if shift_labels.numel() != lead_shape.numel():
        raise ValueError(f"shift_labels must have one entry per token ({tuple(lead_shape)}), "
                         f"got shape {tuple(shift_labels.shape)}")
    return (shift_labels != ignore_index).reshape(lead_shape)


class JSD(nn.Module):
    """``LigerJSD`` drop-in: generalised JSD between student and teacher *log-probabilities*.

    ``forward(log_q, log_p, shift_labels=None)``: ``log_q`` student log-probs ``[BT, V]`` (any leading shape),
    differentiable; ``log_p`` teacher log-probs, same shape; ``shift_labels`` int ``[BT]`` or None. Returns the
    fp32 mean over the tokens whose label is not ``ignore_index``. Raw logits work too (same result as their
    log-softmax); the gradient reaching the logits through a ``log_softmax`` equals Liger's.
    """

    def __init__(self, beta: float = 0.5, ignore_index: int = -100, *, backend: str = "auto") -> None:
        super().__init__()
        self.mode = beta_to_mode(beta)
        self.beta, self.ignore_index, self.backend = float(beta), int(ignore_index), backend

    def forward(self, log_q: Tensor, log_p: Tensor, shift_labels: Optional[Tensor] = None) -> Tensor:
        mask = _mask(shift_labels, self.ignore_index, log_q.shape[:-1])
        return kl_div(log_q, log_p, mode=self.mode, beta=self.beta, reduction="mean", mask=mask, scale_by_t2=False,
                      backend=self.backend)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, ignore_index={self.ignore_index}"


class FusedLinearJSD(nn.Module):
    """``LigerFusedLinearJSD`` drop-in: JSD of ``input @ weight.T`` logits without materialising them.

    ``forward(student_input [BT, Hs], student_weight [V, Hs], teacher_input [BT, Ht], teacher_weight [V, Ht],
    shift_labels [BT] or None)`` -> fp32 mean over non-ignored tokens of the JSD at ``temperature`` (no ``T**2``).
    Gradients flow to the student input and weight.
    """

    def __init__(self, jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0, *,
                 chunk_size: Optional[int] = None, backend: str = "auto") -> None:
        super().__init__()
        self.mode = beta_to_mode(jsd_beta)
        self.jsd_beta, self.ignore_index, self.temperature = float(jsd_beta), int(ignore_index), float(temperature)
        self.chunk_size, self.backend = chunk_size, backend

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                shift_labels: Optional[Tensor] = None) -> Tensor:
        mask = _mask(shift_labels, self.ignore_index, student_input.shape[:-1])
        return fused_linear_kl_div(student_input, student_weight, teacher_input, teacher_weight, mode=self.mode,
                                   beta=self.jsd_beta, temperature=self.temperature, reduction="mean", mask=mask,
                                   scale_by_t2=False, chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        return f"jsd_beta={self.jsd_beta}, ignore_index={self.ignore_index}, temperature={self.temperature}"


_TORCH_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def kl_div_loss(input: Tensor, target: Tensor, *, reduction: str = "mean", log_target: bool = False,
                backend: str = "auto") -> Tensor:
    """``torch.nn.functional.kl_div(input, target, reduction, log_target)`` for distillation, fused.

    Args:
        input: student log-probabilities ``[N, V]`` (any leading shape; raw logits give the same result, ours
            normalises them; torch's does not, so torch needs real log-probabilities).
        target: teacher probabilities (``log_target=False``; zeros allowed) or log-probabilities, same shape.
            Each row must be a normalised distribution: ours treats ``log(target)`` as logits and so renormalises
            it, torch takes it as is (the results differ for unnormalised targets).
        reduction: ``"batchmean"`` (sum / ``input.size(0)``), ``"sum"``, ``"mean"`` (sum / number of elements,
            like torch) or ``"none"``: torch's is elementwise ``[N, V]``; this returns its sum over the last axis,
            the per-row KL ``[N]`` (fp32), without materialising the elements.

    Returns:
        fp32 KL(target || softmax(input)) reduced as asked (no ``T**2``; divide the inputs by a temperature first
        if you want one).
    """
    if reduction not in _TORCH_REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(_TORCH_REDUCTIONS)}, got {reduction!r}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    teacher = target if log_target else target.log()
    if reduction == "none":
        return kl_div(input, teacher, mode="forward", reduction="none", scale_by_t2=False, backend=backend)
    total = kl_div(input, teacher, mode="forward", reduction="sum", scale_by_t2=False, backend=backend)
    if reduction == "batchmean":
        return total / max(input.shape[0] if input.dim() > 0 else 1, 1)
    if reduction == "mean":
        return total / input.numel()
    return total


class KLDivLoss(nn.Module):
    """``torch.nn.KLDivLoss(reduction=..., log_target=...)`` drop-in for distillation (see :func:`kl_div_loss`).

    Unlike ``minitron.ops.KLDivLoss`` (ours: student and teacher *logits*, temperature, ``T**2``), this takes
    torch's arguments in torch's order: ``forward(input=student log-probs, target=teacher (log-)probs)``.
    """

    def __init__(self, reduction: str = "mean", log_target: bool = False, *, backend: str = "auto") -> None:
        super().__init__()
        if reduction not in _TORCH_REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(_TORCH_REDUCTIONS)}, got {reduction!r}")
        self.reduction, self.log_target, self.backend = reduction, bool(log_target), backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return kl_div_loss(input, target, reduction=self.reduction, log_target=self.log_target, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, log_target={self.log_target}"
