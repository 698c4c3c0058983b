"""TRL's distillation losses computed by minitron's fused kernels (same arguments, same results).

Two TRL losses have a drop-in here:

* :func:`generalized_jsd_loss` is ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` (TRL 1.16): same
  signature, same value and gradient, computed by :func:`minitron.ops.kl_div` (one fused pass over the
  vocabulary instead of TRL's several ``[B, S, V]`` temporaries). :class:`MinitronGKDTrainer` is ``GKDTrainer`` with
  that function as its loss.
* :func:`chunked_divergence_loss` is ``trl.trainer.distillation_trainer._chunked_divergence_loss``: student and
  teacher hidden states + LM heads in, ``(loss, entropy_sum, n_valid)`` out, computed by
  :func:`minitron.ops.fused_linear_kl_div` (no logits materialised). :func:`patch_distillation_trainer` makes
  ``DistillationTrainer`` use it.

TRL's ``beta`` and ours mean the same thing (``M = beta * P_teacher + (1 - beta) * Q_student``; ``beta=0``
forward KL(P || Q), ``beta=1`` reverse KL(Q || P)); ``beta`` of exactly 0 or 1 is sent to ``mode="forward"`` /
``mode="reverse"``, anything else to ``mode="jsd"``. Neither TRL loss multiplies by ``T**2``, so
``scale_by_t2=False`` throughout. Reductions: every TRL reduction is ours with ``reduction="sum"`` divided by a
divisor (:func:`trl_divisor`); see ``docs/trainers.md`` for the table.

Results are fp32 (our kernels accumulate in fp32 whatever the input dtype); TRL returns the input dtype.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Optional, Union

import torch
from torch import Tensor

from minitron.ops import fused_linear_kl_div, kl_div

log = logging.getLogger(__name__)

__all__ = [
    "TRL_REDUCTIONS",
    "beta_to_mode",
    "trl_divisor",
    "generalized_jsd_loss",
    "chunked_divergence_loss",
    "student_entropy_sum",
    "patch_distillation_trainer",
    "MinitronGKDTrainer",
]

TRL_REDUCTIONS = ("batchmean", "sum", "mean", "none")
IGNORE_INDEX = -100  # TRL hard-codes -100 as the label of positions that do not count

NumItems = Optional[Union[Tensor, int, float]]


def beta_to_mode(beta: float) -> str:
    """Our ``mode`` for TRL's/Liger's ``beta``: 0 -> ``"forward"``, 1 -> ``"reverse"``, else ``"jsd"``.

    Raises:
        TypeError / ValueError: ``beta`` is not a number in [0, 1].
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float in [0, 1], got {type(beta).__name__}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0:
        return "forward"
    if beta == 1:
        return "reverse"
    return "jsd"


def trl_divisor(reduction: str, *, lead_shape: torch.Size, vocab_size: int, mask: Optional[Tensor],
                num_items_in_batch: NumItems = None) -> Union[Tensor, float]:
    """What ``GKDTrainer.generalized_jsd_loss`` divides the masked sum of its per-element terms by.

    TRL's elementwise terms live on ``[*lead_shape, V]`` (``[B, S, V]``), summed over the vocabulary they are
    our per-token divergence. With ``n`` = counted tokens (``mask.sum()``, or every token without labels):

    * ``num_items_in_batch`` given (any reduction): ``num_items_in_batch``;
    * ``"batchmean"``: ``max(n, 1)`` with labels, ``max(lead_shape[0], 1)`` without (TRL divides by
      ``jsd.size(0)``, the batch size, not the token count, when no labels are given);
    * ``"mean"``: ``n * V`` (``jsd.mean()`` over the elements; 0 -> NaN like TRL);
    * ``"sum"``: 1.

    ``"none"`` has no divisor (see :func:`generalized_jsd_loss`).
    """
    if num_items_in_batch is not None:
        return num_items_in_batch
    if reduction == "batchmean":
        if mask is not None:
            return mask.sum().clamp_min(1)
        return float(max(lead_shape[0] if len(lead_shape) else 1, 1))
    if reduction == "mean":
        n = mask.sum() if mask is not None else math.prod(lead_shape)
        return n * vocab_size
    if reduction == "sum":
        return 1.0
    raise ValueError(f"reduction must be one of {list(TRL_REDUCTIONS[:3])} to have a divisor, got {reduction!r}")


def _divide(total: Tensor, divisor: Union[Tensor, float, int]) -> Tensor:
    if isinstance(divisor, Tensor):
        return total / divisor.to(device=total.device)
    return total / divisor


def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                         beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                         num_items_in_batch: NumItems = None, *, backend: str = "auto") -> Tensor:
    """TRL ``GKDTrainer.generalized_jsd_loss`` (trl 1.16) computed by :func:`minitron.ops.kl_div`.

    Args:
        student_logits: ``[B, S, V]`` (any leading shape works) fp32/bf16/fp16; the differentiable input.
        teacher_logits: same shape and dtype; a constant.
        labels: int ``[B, S]`` or None; positions equal to -100 do not count.
        beta: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), else the generalised JSD with
            ``M = beta * P_teacher + (1 - beta) * Q_student``.
        temperature: divides both logits (no ``T**2`` factor, like TRL).
        reduction: ``"batchmean"``, ``"sum"``, ``"mean"`` or ``"none"``; see :func:`trl_divisor`. ``"none"``:
            TRL returns the per-(token, vocabulary entry) terms (``[B, S, V]``, or ``[n_counted, V]`` with
            labels); those cannot be produced without materialising them, so this returns their sum over the
            vocabulary, the per-token divergence: fp32 ``[B, S]`` without labels, ``[n_counted]`` with labels
            (equal to TRL's ``loss.sum(-1)``).
        num_items_in_batch: when given, the loss is ``sum / num_items_in_batch`` whatever ``reduction`` is.
        backend: passed to :func:`minitron.ops.kl_div`.

    Returns:
        fp32 scalar (or per-token fp32 tensor for ``reduction="none"``).
    """
    if reduction not in TRL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(TRL_REDUCTIONS)}, got {reduction!r}")
    if not isinstance(student_logits, Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}")
    mode = beta_to_mode(beta)
    mask = None
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be an integer torch.Tensor or None, got {type(labels).__name__}")
        if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
            raise ValueError(f"labels must have shape {tuple(student_logits.shape[:-1])} (the logits without the "
                             f"vocabulary axis), got {tuple(labels.shape)}")
        mask = labels != IGNORE_INDEX
    kw: dict[str, Any] = dict(mode=mode, temperature=float(temperature), beta=float(beta), mask=mask,
                              scale_by_t2=False, backend=backend)
    if reduction == "none" and num_items_in_batch is None:
        per_token = kl_div(student_logits, teacher_logits, reduction="none", **kw)
        return per_token if mask is None else per_token[mask]
    total = kl_div(student_logits, teacher_logits, reduction="sum", **kw)
    divisor = trl_divisor(reduction, lead_shape=student_logits.shape[:-1], vocab_size=student_logits.shape[-1],
                          mask=mask, num_items_in_batch=num_items_in_batch)
    return _divide(total, divisor)


# ----------------------------------------------------------------------------------------------
# DistillationTrainer: hidden states + LM heads
# ----------------------------------------------------------------------------------------------


def _transform_logits(z: Tensor, logit_scale: float, softcap: Optional[float], temperature: float) -> Tensor:
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


@torch.no_grad()
def student_entropy_sum(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, logit_scale: float = 1.0,
                        softcap: Optional[float] = None, temperature: float = 1.0,
                        chunk_bytes: int = 64 << 20) -> Tensor:
    """Sum over the rows of ``hidden`` of the entropy (nats) of ``softmax(transform(hidden @ weight.T + bias))``.

    The transform is TRL's: ``z * logit_scale``, then ``softcap * tanh(z / softcap)``, then ``/ temperature``.
    Computed in fp32 over row chunks of at most ``chunk_bytes`` of logits (never ``[N, V]`` at once); no gradient.

    Args:
        hidden: ``[N, H]``; weight: ``[V, H]``; bias: ``[V]`` or None.

    Returns:
        fp32 scalar.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = max(1, chunk_bytes // (4 * 2 * max(vocab, 1)))
    w = weight.float()
    b = bias.float() if bias is not None else None
    for start in range(0, n, rows):
        z = torch.nn.functional.linear(hidden[start:start + rows].float(), w, b)
        logp = torch.log_softmax(_transform_logits(z, logit_scale, softcap, temperature), dim=-1)
        total += -(logp.exp() * logp).sum()
    return total


def chunked_divergence_loss(
    student_hidden_states: Tensor,
    teacher_hidden_states: Tensor,
    student_lm_head_weight: Tensor,
    teacher_lm_head_weight: Tensor,
    completion_mask: Tensor,
    beta: float,
    num_items_in_batch: NumItems = None,
    student_lm_head_bias: Optional[Tensor] = None,
    teacher_lm_head_bias: Optional[Tensor] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: Optional[float] = None,
    teacher_final_logit_softcapping: Optional[float] = None,
    temperature: float = 1.0,
    *,
    compute_entropy: bool = True,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """TRL ``DistillationTrainer``'s ``_chunked_divergence_loss`` computed by :func:`minitron.ops.fused_linear_kl_div`.

    Args:
        student_hidden_states: ``[B, K, Hs]``; teacher_hidden_states: ``[B, K, Ht]`` (``Ht`` may differ).
        student_lm_head_weight: ``[V, Hs]``; teacher_lm_head_weight: ``[V, Ht]``; biases ``[V]`` or None.
        completion_mask: ``[B, K]`` (bool or 0/1 integers): nonzero positions count.
        beta: as :func:`generalized_jsd_loss`.
        num_items_in_batch: loss = sum / ``num_items_in_batch`` when given, else sum / ``max(n_valid, 1)``.
        student_logit_scale, teacher_logit_scale, student_final_logit_softcapping,
        teacher_final_logit_softcapping, temperature: each model's logits ``z`` become
            ``softcap * tanh(z * scale / softcap) / temperature`` (TRL's order; ours is the same).
        compute_entropy: TRL returns the summed entropy of the student's (transformed, tempered) distribution
            over the counted tokens, a logging metric without gradient. Our fused op does not produce it, so it is
            computed here by a second, gradient-free chunked pass over the student head (one extra
            ``[n_valid, Hs] x [Hs, V]`` matmul). ``False`` skips it and returns an entropy of 0.
        chunk_size: tokens per chunk of :func:`minitron.ops.fused_linear_kl_div` (default: its own choice).
        backend: passed to :func:`minitron.ops.fused_linear_kl_div`.

    The teacher tensors are cast to the student's dtype when they differ (TRL computes each model in its own
    dtype; our op takes one dtype). Only the counted positions are projected.

    Returns:
        ``(loss, entropy_sum, n_valid)``: fp32 scalar loss, fp32 scalar entropy sum (no gradient), int64 scalar
        number of counted positions; like TRL, raw sums so that callers can reduce across ranks.
    """
    if not isinstance(completion_mask, Tensor):
        raise TypeError(f"completion_mask must be a torch.Tensor, got {type(completion_mask).__name__}")
    for name, t in (("student_hidden_states", student_hidden_states), ("teacher_hidden_states", teacher_hidden_states)):
        if not isinstance(t, Tensor) or t.dim() < 1:
            raise TypeError(f"{name} must be a torch.Tensor [..., H], got {type(t).__name__}")
    tokens = student_hidden_states.shape[:-1]
    if tuple(teacher_hidden_states.shape[:-1]) != tuple(tokens):
        raise ValueError(f"teacher_hidden_states tokens {tuple(teacher_hidden_states.shape[:-1])} != "
                         f"student_hidden_states tokens {tuple(tokens)}")
    if tuple(completion_mask.shape) != tuple(tokens):
        raise ValueError(f"completion_mask must have shape {tuple(tokens)} (the hidden states without the hidden "
                         f"axis), got {tuple(completion_mask.shape)}")
    mode = beta_to_mode(beta)
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    dtype = student_hidden_states.dtype
    h_s = student_hidden_states.reshape(-1, student_hidden_states.shape[-1])[valid]
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1])[valid].to(dtype)
    w_t = teacher_lm_head_weight.to(dtype)
    b_t = teacher_lm_head_bias.to(dtype) if teacher_lm_head_bias is not None else None
    kw: dict[str, Any] = dict(student_bias=student_lm_head_bias, teacher_bias=b_t, mode=mode,
                              temperature=float(temperature), beta=float(beta), reduction="sum", scale_by_t2=False,
                              chunk_size=chunk_size, backend=backend)
    # Transform keywords only when they change something, so the plain case needs nothing beyond the base API.
    if student_logit_scale != 1.0:
        kw["student_logit_scale"] = float(student_logit_scale)
    if teacher_logit_scale != 1.0:
        kw["teacher_logit_scale"] = float(teacher_logit_scale)
    if student_final_logit_softcapping is not None:
        kw["student_softcap"] = float(student_final_logit_softcapping)
    if teacher_final_logit_softcapping is not None:
        kw["teacher_softcap"] = float(teacher_final_logit_softcapping)
    loss = fused_linear_kl_div(h_s, student_lm_head_weight, h_t, w_t, **kw)
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        loss = _divide(loss, num_items_in_batch)
    if compute_entropy:
        entropy_sum = student_entropy_sum(h_s.detach(), student_lm_head_weight.detach(),
                                          None if student_lm_head_bias is None else student_lm_head_bias.detach(),
                                          logit_scale=float(student_logit_scale),
                                          softcap=student_final_logit_softcapping, temperature=float(temperature))
    else:
        entropy_sum = torch.zeros((), dtype=torch.float32, device=loss.device)
    return loss, entropy_sum, n_valid


@contextlib.contextmanager
def patch_distillation_trainer(*, compute_entropy: bool = True) -> Iterator[None]:
    """Within the ``with`` block, TRL's ``DistillationTrainer`` computes its loss with :func:`chunked_divergence_loss`.

    ``DistillationTrainer`` calls the module-level function ``trl.trainer.distillation_trainer.
    _chunked_divergence_loss``; this swaps that attribute and restores it on exit (build and ``train()`` the
    trainer inside the block). ``compute_entropy=False`` drops TRL's entropy metric (logged as 0) to save the
    extra student-head matmul.
    """
    import trl.trainer.distillation_trainer as dt

    original = dt._chunked_divergence_loss

    def _ours(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        return chunked_divergence_loss(*args, compute_entropy=compute_entropy, **kwargs)

    dt._chunked_divergence_loss = _ours
    try:
        yield
    finally:
        dt._chunked_divergence_loss = original


# ----------------------------------------------------------------------------------------------
# GKDTrainer subclass (built on first access: importing this module does not import TRL)
# ----------------------------------------------------------------------------------------------

_GKD_CLASS: Optional[type] = None


def _make_gkd_trainer() -> type:
    from trl.experimental.gkd import GKDTrainer

    class MinitronGKDTrainer(GKDTrainer):
        """TRL ``GKDTrainer`` whose loss is :func:`generalized_jsd_loss` (minitron's fused kernel).

        ``GKDTrainer.compute_loss`` calls ``self.generalized_jsd_loss(...)``; this subclass only replaces that
        static method, so everything else (on-policy generation with ``lmbda``, ``seq_kd``, the label shift,
        ``num_items_in_batch``) is TRL's. Note that TRL 1.16's ``compute_loss`` does not pass
        ``args.temperature`` to the loss (it is the sampling temperature only); the loss runs at temperature 1.
        """

        generalized_jsd_loss = staticmethod(generalized_jsd_loss)

    return MinitronGKDTrainer


def __getattr__(name: str) -> Any:
    global _GKD_CLASS
    if name == "MinitronGKDTrainer":
        if _GKD_CLASS is None:
            _GKD_CLASS = _make_gkd_trainer()
        return _GKD_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
