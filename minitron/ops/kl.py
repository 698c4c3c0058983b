"""Fused KL-divergence losses over large vocabularies.

Definitions (per token, over the vocabulary axis; ``T`` = ``temperature``; see ``docs/kl.md``)::

    z_s = transform(student_logits), z_t = transform(teacher_logits)   # see "Logit transforms"
    P = softmax(z_t / T)        # teacher distribution
    Q = softmax(z_s / T)        # student distribution
    mode="forward":  KL(P || Q) = sum_k P_k (log P_k - log Q_k)      # the Minitron distillation loss
    mode="reverse":  KL(Q || P) = sum_k Q_k (log Q_k - log P_k)
    mode="jsd":      M = beta * P + (1 - beta) * Q
                     JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M)

``mode="jsd"`` is the generalised JSD of TRL's GKD trainer and Liger-Kernel: ``beta=0`` is exactly the
forward KL(P || Q), ``beta=1`` exactly the reverse KL(Q || P) (also for a ``beta`` that rounds to 0 or 1 in
float32, as the kernels see it), ``beta=0.5`` the symmetric Jensen-Shannon divergence. (Earlier versions: the
mixture was ``(1 - beta) P + beta Q`` with the ends swapped.)

Logit transforms (as TRL's chunked distillation loss): per model, ``z = logit_scale * logits``, then
``z = softcap * tanh(z / softcap)`` when a soft cap is given; the temperature divides afterwards. The
student gradient includes the chain rule through both.

With ``scale_by_t2=True`` (default) the loss is multiplied by ``T**2`` so that gradient magnitudes
do not shrink with the temperature (Hinton et al., 2015); pass ``False`` for the raw divergence.

Terms with zero probability contribute zero (``-inf`` logits are legal in either input); the loss
is ``+inf`` where the math is (e.g. forward mode where the student assigns ``-inf`` to a token the
teacher can emit). A teacher row that is entirely ``-inf`` (no target distribution) contributes 0 with a
zero gradient, like a masked token (it still counts in the ``"mean"`` denominator); a student row that is
entirely ``-inf``, or a NaN anywhere in a counted token, gives NaN for that token. Temperatures above
:data:`MAX_TEMPERATURE` are refused (fp32 cannot resolve the divergence of nearly uniform distributions).

Implementation: every backend computes, in one launch, the per-token loss and its gradient with
respect to the student logits (online softmax over the vocabulary, second pass over the cache-hot
row writes the gradient). Backward only rescales that gradient by the incoming gradient, in place,
so the extra memory beyond the gradient is O(tokens). A second backward through the same graph is
therefore refused (the saved gradient has been consumed).

Vocab-parallel logits (tensor-parallel LM heads): ``kl_div(..., process_group=g)`` with each rank holding a
contiguous slice of the vocabulary; the ranks exchange the per-row online-softmax statistics (20 bytes per row,
JSD 40), never a row (ops ``kl_div_stats``, ``kl_div_jsd_sums``, ``kl_div_vp_fwd``; docs/kl.md).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from minitron.ops._common import as_rows as _as_rows
from minitron.ops._common import check_float_tensor as _check_float_tensor
from minitron.ops._common import add_chunk_grads_, default_chunk_size, register_row_loss_autograd, token_weights
from minitron.ops._common import uniform_grad_hook
from minitron.ops._common import is_one as _is_one
from minitron.ops._dispatch import native_unavailable, op_backends, triton_unavailable

__all__ = [
    "MAX_TEMPERATURE",
    "MODES",
    "REDUCTIONS",
    "kl_div",
    "kl_div_reference",
    "fused_linear_kl_div",
    "fused_linear_kl_div_reference",
    "KLDivLoss",
    "FusedLinearKLDivLoss",
    "vp_bytes_per_row",
]

MODES = {"forward": 0, "reverse": 1, "jsd": 2}
REDUCTIONS = ("mean", "sum", "none")
#: Largest accepted temperature (see docs/kl.md, "Large temperatures").
MAX_TEMPERATURE = 100.0
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------------------------
# torch reference (test oracle; differentiable, any float dtype incl. float64 for gradcheck)
# ----------------------------------------------------------------------------------------------


def _transform_reference(x: Tensor, logit_scale: float, softcap: Optional[float]) -> Tensor:
    """``softcap * tanh(logit_scale * x / softcap)`` (or ``logit_scale * x`` without a cap), differentiable."""
    if logit_scale != 1.0:
        x = x * logit_scale
    if softcap is not None:
        x = torch.tanh(x / softcap) * softcap
    return x


def _jsd_end(beta: float) -> Optional[str]:
    """The KL a JSD beta stands for when it is (or rounds to, in float32 as the kernels see it) 0 or 1."""
    b32 = float(torch.tensor(beta, dtype=torch.float32))
    if b32 == 0.0:
        return "forward"
    if b32 == 1.0:
        return "reverse"
    return None


def _empty_teacher_rows(student: Tensor, teacher: Tensor) -> Tensor:
    """Rows whose teacher is entirely -inf (no target distribution: they contribute 0) while the student row
    is a distribution (finite log-sum-exp; otherwise the row stays NaN)."""
    return (teacher == float("-inf")).all(-1) & torch.isfinite(torch.logsumexp(student, dim=-1))


def _divergence_reference(student: Tensor, teacher: Tensor, mode: str, temperature: float, beta: float) -> Tensor:
    """Per-row divergence ``[..., V] -> [...]`` of (already transformed) logits, in plain torch (>= fp32)."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    empty = _empty_teacher_rows(student.detach().to(dtype), teacher.to(dtype))
    teacher = torch.where(empty.unsqueeze(-1), torch.zeros_like(teacher), teacher)  # no NaN (nor NaN gradients)
    lq = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
    lp = torch.log_softmax(teacher.to(dtype) / temperature, dim=-1)

    def kl(la: Tensor, lb: Tensor) -> Tensor:  # KL(A || B) with 0 * log 0 = 0
        pos = la > float("-inf")
        la_s = torch.where(pos, la, torch.zeros_like(la))
        lb_s = torch.where(pos, lb, torch.zeros_like(lb))
        return torch.where(pos, la_s.exp() * (la_s - lb_s), torch.zeros_like(la)).sum(-1)

    if mode == "jsd":
        mode = _jsd_end(beta) or mode
    if mode == "forward":
        d = kl(lp, lq)
    elif mode == "reverse":
        d = kl(lq, lp)
    else:
        lm = _log_mixture(lp, lq, beta)
        d = beta * kl(lp, lm) + (1.0 - beta) * kl(lq, lm)
    # an all -inf teacher row: log_softmax gives NaN everywhere; the row has no target and contributes 0. A
    # student row without a distribution (all -inf, +inf, NaN), or a teacher row with a NaN or +inf, is NaN (KL
    # terms weighted by a NaN probability would otherwise read 0).
    bad = ~torch.isfinite(torch.logsumexp(student.detach().to(dtype), dim=-1)) | \
        ~torch.isfinite(torch.logsumexp(teacher.to(dtype), dim=-1))
    d = torch.where(bad, torch.full_like(d, float("nan")), d)
    return torch.where(empty, torch.zeros_like(d), d)


def _log_mixture(lp: Tensor, lq: Tensor, beta: float) -> Tensor:
    """log(beta P + (1 - beta) Q) from log-probabilities, -inf (with finite gradients) where both are 0."""
    a = lp + math.log(beta)
    b = lq + math.log1p(-beta)
    empty = (a == float("-inf")) & (b == float("-inf"))
    zero = torch.zeros_like(a)
    lm = torch.logaddexp(torch.where(empty, zero, a), torch.where(empty, zero, b))
    return torch.where(empty, torch.full_like(lm, float("-inf")), lm)


def kl_div_reference(student_logits: Tensor, teacher_logits: Tensor, *, mode: str = "forward",
                     temperature: float = 1.0, beta: float = 0.5, reduction: str = "mean",
                     mask: Optional[Tensor] = None, scale_by_t2: bool = True,
                     student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                     student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                     labels: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """Plain-torch :func:`kl_div` (same arguments and result); the oracle of the tests.

    Differentiable w.r.t. ``student_logits`` through autograd. Materialises ``[..., V]`` temporaries.
    """
    _validate_kl_args(student_logits, teacher_logits, mode, temperature, beta, reduction, mask,
                      allowed_dtypes=_KERNEL_DTYPES + (torch.float64,))
    _validate_transforms(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
    mask = _mask_from_labels(mask, labels, ignore_index, student_logits.shape[:-1], student_logits.device,
                             "the logits' shape without the vocabulary axis")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = _transform_reference(student_logits.to(dtype), student_logit_scale, student_softcap)
    t = _transform_reference(teacher_logits.detach().to(dtype), teacher_logit_scale, teacher_softcap)
    per_token = _divergence_reference(s, t, mode, temperature, beta)
    if scale_by_t2:
        per_token = per_token * (temperature * temperature)
    if mask is not None:
        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    count = per_token.numel() if mask is None else mask.sum()
    return per_token.sum() / torch.clamp(torch.as_tensor(count, device=per_token.device), min=1)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _validate_common(mode: str, temperature: float, beta: float, reduction: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if temperature > MAX_TEMPERATURE:
        raise ValueError(f"temperature must be <= {MAX_TEMPERATURE:g} (MAX_TEMPERATURE), got {temperature:g}: the "
                         "softmaxes are then so close to uniform that fp32 cannot resolve the divergence (see "
                         "docs/kl.md)")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    if not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def _validate_mask(mask: Optional[Tensor], lead_shape: torch.Size, device: torch.device, what: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if mask.shape != lead_shape:
        raise ValueError(f"mask must have shape {tuple(lead_shape)} ({what}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the logits are on {device}")


def _validate_transforms(student_logit_scale: float, teacher_logit_scale: float, student_softcap: Optional[float],
                         teacher_softcap: Optional[float]) -> None:
    for name, x in (("student_logit_scale", student_logit_scale), ("teacher_logit_scale", teacher_logit_scale)):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(x).__name__}")
        if not math.isfinite(x) or x == 0:
            raise ValueError(f"{name} must be finite and non-zero, got {x}")
    for name, x in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if x is None:
            continue
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name} must be a float or None, got {type(x).__name__}")
        if not math.isfinite(x) or x <= 0:
            raise ValueError(f"{name} must be finite and > 0 (or None for no soft cap), got {x}")


def _mask_from_labels(mask: Optional[Tensor], labels: Optional[Tensor], ignore_index: int, lead_shape: torch.Size,
                      device: torch.device, what: str) -> Optional[Tensor]:
    """The token mask: ``mask`` as given, or ``labels != ignore_index`` (giving both is an error)."""
    if labels is None:
        return mask
    if mask is not None:
        raise ValueError("give either mask or labels (tokens with label == ignore_index are masked), not both")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype (e.g. torch.long), got {labels.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels.shape != lead_shape:
        raise ValueError(f"labels must have shape {tuple(lead_shape)} ({what}), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {device}")
    return labels != ignore_index


def _validate_kl_args(student: Tensor, teacher: Tensor, mode: str, temperature: float, beta: float,
                      reduction: str, mask: Optional[Tensor],
                      allowed_dtypes: tuple[torch.dtype, ...] = _KERNEL_DTYPES) -> None:
    _check_float_tensor("student_logits", student, allowed_dtypes)
    _check_float_tensor("teacher_logits", teacher, allowed_dtypes)
    if student.dtype != teacher.dtype:
        raise TypeError(f"student_logits and teacher_logits must have the same dtype, got {student.dtype} "
                        f"and {teacher.dtype}")
    if student.device != teacher.device:
        raise ValueError(f"student_logits is on {student.device} but teacher_logits is on {teacher.device}")
    if student.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the vocabulary)")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"vocabulary size mismatch: student_logits has {student.shape[-1]}, teacher_logits has "
                         f"{teacher.shape[-1]}")
    if student.shape != teacher.shape:
        raise ValueError(f"student_logits shape {tuple(student.shape)} != teacher_logits shape {tuple(teacher.shape)}")
    if student.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")
    _validate_common(mode, temperature, beta, reduction)
    _validate_mask(mask, student.shape[:-1], student.device, "the logits' shape without the vocabulary axis")


# ----------------------------------------------------------------------------------------------
# backends of the fused forward (+gradient) kernel
# ----------------------------------------------------------------------------------------------

_kl_backends = op_backends("kl_div")


@_kl_backends.register("cpp", ("cpu",), unavailable=lambda d: native_unavailable("_kl_div_fwd_native", d))
def _kl_fwd_cpp(s: Tensor, t: Tensor, w: Tensor, mode: int, inv_t: float, beta: float, scale: float,
                need_grad: bool = True):
    return torch.ops.minitron._kl_div_fwd_native(s, t, w, mode, inv_t, beta, scale, need_grad)


@_kl_backends.register("cuda", ("cuda",), unavailable=lambda d: native_unavailable("_kl_div_fwd_native", d))
def _kl_fwd_cuda(s: Tensor, t: Tensor, w: Tensor, mode: int, inv_t: float, beta: float, scale: float,
                 need_grad: bool = True):
    return torch.ops.minitron._kl_div_fwd_native(s, t, w, mode, inv_t, beta, scale, need_grad)


@_kl_backends.register("triton", ("cuda", "cpu"), unavailable=triton_unavailable)
def _kl_fwd_triton(s: Tensor, t: Tensor, w: Tensor, mode: int, inv_t: float, beta: float, scale: float,
                   need_grad: bool = True):
    from minitron.kernels.kl_div import kl_div_fwd

    return kl_div_fwd(s, t, w, mode, inv_t, beta, scale, need_grad=need_grad)


@_kl_backends.register("reference", ("cpu", "cuda"), dtypes=_KERNEL_DTYPES + (torch.float64,))
def _kl_fwd_reference(s: Tensor, t: Tensor, w: Tensor, mode: int, inv_t: float, beta: float, scale: float,
                      need_grad: bool = True):
    """Torch version of the fused kernel: closed-form gradients (no autograd inside a custom op)."""
    dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    in_dtype = s.dtype
    s, t = s.to(dtype), t.to(dtype)
    mode_name = {v: k for k, v in MODES.items()}[mode]
    if mode_name == "jsd":
        mode_name = _jsd_end(beta) or mode_name
    d = _divergence_reference(s, t, mode_name, 1.0 / inv_t, beta)
    empty = _empty_teacher_rows(s, t)
    t = torch.where(empty.unsqueeze(-1), torch.zeros_like(t), t)
    lq = torch.log_softmax(s * inv_t, dim=-1)
    lp = torch.log_softmax(t * inv_t, dim=-1)
    q, p = lq.exp(), lp.exp()
    zero = torch.zeros((), dtype=dtype, device=s.device)
    if mode_name == "forward":
        g = q - p
    elif mode_name == "reverse":
        g = torch.where(q > 0, q * (lq - lp - d.unsqueeze(-1)), zero)
    else:
        lm = _log_mixture(lp, lq, beta)
        # dD/dQ_k = (1 - beta) log(Q_k / M_k) + const (M = beta P + (1 - beta) Q)
        dq = torch.where(q > 0, (1.0 - beta) * (lq - lm), zero)
        g = q * (dq - (q * dq).sum(-1, keepdim=True))
    coef = (w.to(dtype) * scale).unsqueeze(-1)
    counted = ((w != 0) & ~empty).unsqueeze(-1)
    grad = torch.where(counted, g * coef * inv_t, zero)
    loss = torch.where(counted.squeeze(-1), d * coef.squeeze(-1), zero)
    if not need_grad:
        return loss.to(torch.float32), s.new_empty((0, s.shape[-1]), dtype=in_dtype)
    return loss.to(torch.float32), grad.to(in_dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# custom op: loss per token and its gradient, in one launch
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("minitron::kl_div_fwd", mutates_args=())
def kl_div_fwd(student: Tensor, teacher: Tensor, weight: Tensor, mode: int, temperature: float, beta: float,
               scale: float, backend: str, need_grad: bool = True) -> tuple[Tensor, Tensor]:
    """Weighted per-token divergence and its gradient w.r.t. ``student``.

    Args:
        student, teacher: ``[N, V]`` logits (fp32/bf16/fp16, unit stride along V).
        weight: ``[N]`` fp32; tokens with weight 0 are skipped (loss 0, gradient 0).
        mode: 0 forward KL, 1 reverse KL, 2 JSD(beta). temperature: > 0. scale: loss multiplier.
        need_grad: False computes the loss only (no gradient pass, no [N, V] output).
    Returns:
        ``loss [N]`` fp32 = weight * scale * D and ``grad [N, V]`` (student dtype) = d loss / d student
        (an empty ``[0, V]`` tensor when ``need_grad`` is False).
    """
    impl = _kl_backends.select(backend, student.device, student.dtype, vocab=student.shape[-1])
    grad_rows = student.shape[0] if need_grad else 0
    if student.shape[0] == 0:
        return (torch.zeros(0, dtype=torch.float32, device=student.device),
                torch.empty((grad_rows, student.shape[1]), dtype=student.dtype, device=student.device))
    return impl.fn(student, teacher, weight, mode, 1.0 / temperature, beta, scale, need_grad)


@kl_div_fwd.register_fake
def _(student, teacher, weight, mode, temperature, beta, scale, backend, need_grad=True):
    grad_rows = student.shape[0] if need_grad else 0
    return (student.new_empty((student.shape[0],), dtype=torch.float32),
            torch.empty((grad_rows, student.shape[1]), dtype=student.dtype, device=student.device))


register_row_loss_autograd(kl_div_fwd, num_inputs=9, need_grad_input=8)


# ----------------------------------------------------------------------------------------------
# vocab-parallel pieces: each rank holds the columns [v0, v1) of every row (see kl_div(process_group=...))
# ----------------------------------------------------------------------------------------------
#
# Per row the ranks exchange O(1) numbers (docs/kl.md, "Vocab-parallel"):
#   1. stats  = kl_div_stats(local slice): the online-softmax state (m_a, s_a, m_b, s_b, c) of the slice, with
#      a = student / T, b = teacher / T, s = sum exp(x - m), c the forward/reverse cross sum relative to its
#      weights' max (csrc/common/kl_math.h KlState);
#   2. all-reduce MAX of (m_a, m_b), rescale the sums to the global maxima, all-reduce SUM of (s_a, s_b[, c]):
#      every rank now holds the global state, hence both log-sum-exps and (forward / reverse) the divergence;
#   3. JSD only: kl_div_jsd_sums(local slice, global state) -> the slice's (loss, sum Q g, sum Q), all-reduce
#      SUM (the mixture's log is per element, so the loss itself is a sum over the vocabulary);
#   4. kl_div_vp_fwd(local slice, global state[, global sums]) -> per-row loss (the same on every rank) and the
#      gradient of the local slice.

#: Columns of a per-row statistics row: max and sum of exp of the student, the same of the teacher, cross sum.
VP_STATS = ("m_student", "s_student", "m_teacher", "s_teacher", "cross")

_stats_backends = op_backends("kl_div_stats")
_jsd_sums_backends = op_backends("kl_div_jsd_sums")
_vp_backends = op_backends("kl_div_vp_fwd")


def _global_rows(stats: Tensor, mode: int) -> dict[str, Tensor]:
    """Per-row log-sum-exps, their difference and the forward/reverse divergence from the global statistics
    (fp32; as csrc/common/kl_math.h kl_finalize). ``bad``: NaN rows; ``empty``: all -inf teacher rows."""
    ma, sa, mb, sb, c = stats.to(torch.float32).unbind(1)
    empty = (sb == 0) & (sa > 0) & (sa < float("inf")) & torch.isfinite(ma)
    bad = ~((sa > 0) & (sb > 0)) & ~empty
    lse_a = ma + torch.log(sa)
    lse_b = mb + torch.log(sb)
    lse_diff = (ma - mb) + torch.log(sa / sb)
    if mode == MODES["forward"]:
        div = c / sb + lse_diff
    elif mode == MODES["reverse"]:
        div = c / sa - lse_diff
    else:
        div = torch.zeros_like(lse_a)
    nan = torch.full_like(lse_a, float("nan"))
    return dict(lse_a=torch.where(bad, nan, lse_a), lse_b=torch.where(bad, nan, lse_b),
                lse_diff=torch.where(bad, nan, lse_diff), div=torch.where(bad, nan, div), empty=empty)


@_stats_backends.register("cpp", ("cpu",), unavailable=lambda d: native_unavailable("_kl_div_stats_native", d))
def _stats_cpp(s: Tensor, t: Tensor, w: Tensor, mode: int, inv_t: float) -> Tensor:
    return torch.ops.minitron._kl_div_stats_native(s, t, w, mode, inv_t)


@_stats_backends.register("cuda", ("cuda",), unavailable=lambda d: native_unavailable("_kl_div_stats_native", d))
def _stats_cuda(s: Tensor, t: Tensor, w: Tensor, mode: int, inv_t: float) -> Tensor:
    return torch.ops.minitron._kl_div_stats_native(s, t, w, mode, inv_t)


@_stats_backends.register("triton", ("cuda", "cpu"), unavailable=triton_unavailable)
def _stats_triton(s: Tensor, t: Tensor, w: Tensor, mode: int, inv_t: float) -> Tensor:
    from minitron.kernels.kl_div import kl_div_stats as stats

    return stats(s, t, w, mode, inv_t)


@_stats_backends.register("reference", ("cpu", "cuda"))
def _stats_reference(s: Tensor, t: Tensor, w: Tensor, mode: int, inv_t: float) -> Tensor:
    """Torch version: the slice's max and sum of exp of both inputs, and the cross sum (fp32)."""
    a = s.to(torch.float32) * inv_t
    b = t.to(torch.float32) * inv_t

    def max_sum(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = x.amax(-1)
        m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
        e = torch.exp(x - m_safe.unsqueeze(-1))
        return m, e.sum(-1), e

    ma, sa, ea = max_sum(a)
    mb, sb, eb = max_sum(b)
    zero = torch.zeros((), dtype=torch.float32, device=s.device)
    if mode == MODES["forward"]:
        c = torch.where(eb == 0, zero, eb * (b - a)).sum(-1)
    elif mode == MODES["reverse"]:
        c = torch.where(ea == 0, zero, ea * (a - b)).sum(-1)
    else:
        c = torch.zeros_like(sa)
    out = torch.stack([ma, sa, mb, sb, c], dim=1)
    skipped = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0, 0.0], device=s.device)
    return torch.where((w == 0).unsqueeze(-1), skipped, out)


@torch.library.custom_op("minitron::kl_div_stats", mutates_args=())
def kl_div_stats(student: Tensor, teacher: Tensor, weight: Tensor, mode: int, temperature: float,
                 backend: str) -> Tensor:
    """Online-softmax statistics of a slice of the vocabulary (the first step of vocab-parallel KL).

    Args:
        student, teacher: ``[N, V_local]`` logits (fp32/bf16/fp16, unit stride along V).
        weight: ``[N]`` fp32; rows with weight 0 are skipped (statistics ``(-inf, 0, -inf, 0, 0)``).
        mode: 0 forward KL, 1 reverse KL, 2 JSD (the cross sum is only formed for 0 and 1).
    Returns:
        fp32 ``[N, 5]``: per row ``(m_a, s_a, m_b, s_b, c)`` (see :data:`VP_STATS`) with ``a = student / T``,
        ``b = teacher / T``, ``m`` the max over the slice, ``s = sum exp(x - m)`` and ``c`` the cross sum
        ``sum exp(b - m_b) (b - a)`` (forward) or ``sum exp(a - m_a) (a - b)`` (reverse), 0 for JSD; statistics of
        disjoint slices combine exactly as in csrc/common/kl_math.h ``kl_state_merge``.
    """
    impl = _stats_backends.select(backend, student.device, student.dtype)
    if student.shape[0] == 0:
        return torch.zeros((0, 5), dtype=torch.float32, device=student.device)
    return impl.fn(student, teacher, weight, mode, 1.0 / temperature)


@kl_div_stats.register_fake
def _(student, teacher, weight, mode, temperature, backend):
    return student.new_empty((student.shape[0], 5), dtype=torch.float32)


@_jsd_sums_backends.register("cpp", ("cpu",), unavailable=lambda d: native_unavailable("_kl_div_jsd_sums_native", d))
def _jsd_sums_cpp(s: Tensor, t: Tensor, w: Tensor, stats: Tensor, inv_t: float, beta: float) -> Tensor:
    return torch.ops.minitron._kl_div_jsd_sums_native(s, t, w, stats, inv_t, beta)


@_jsd_sums_backends.register("cuda", ("cuda",),
                             unavailable=lambda d: native_unavailable("_kl_div_jsd_sums_native", d))
def _jsd_sums_cuda(s: Tensor, t: Tensor, w: Tensor, stats: Tensor, inv_t: float, beta: float) -> Tensor:
    return torch.ops.minitron._kl_div_jsd_sums_native(s, t, w, stats, inv_t, beta)


@_jsd_sums_backends.register("triton", ("cuda", "cpu"), unavailable=triton_unavailable)
def _jsd_sums_triton(s: Tensor, t: Tensor, w: Tensor, stats: Tensor, inv_t: float, beta: float) -> Tensor:
    from minitron.kernels.kl_div import kl_div_jsd_sums as sums

    return sums(s, t, w, stats, inv_t, beta)


def _jsd_local_reference(s: Tensor, t: Tensor, stats: Tensor, inv_t: float, beta: float):
    """Per element of a slice: Q, the loss terms and g = (1 - beta) log(Q / M) (0 where Q = 0), from the global
    statistics."""
    rows = _global_rows(stats, MODES["jsd"])
    a = s.to(torch.float32) * inv_t
    b = t.to(torch.float32) * inv_t
    lq = a - rows["lse_a"].unsqueeze(-1)
    lp = b - rows["lse_b"].unsqueeze(-1)
    lm = _log_mixture(lp, lq, beta)
    zero = torch.zeros((), dtype=torch.float32, device=s.device)
    p, q = lp.exp(), lq.exp()
    terms = beta * torch.where(p == 0, zero, p * (lp - lm)) + (1.0 - beta) * torch.where(q == 0, zero, q * (lq - lm))
    g = torch.where(q == 0, zero, (1.0 - beta) * (lq - lm))
    return rows, q, terms, g


@_jsd_sums_backends.register("reference", ("cpu", "cuda"))
def _jsd_sums_reference(s: Tensor, t: Tensor, w: Tensor, stats: Tensor, inv_t: float, beta: float) -> Tensor:
    rows, q, terms, g = _jsd_local_reference(s, t, stats, inv_t, beta)
    q64 = q.to(torch.float64)
    out = torch.stack([terms.sum(-1).to(torch.float64), (q64 * g.to(torch.float64)).sum(-1), q64.sum(-1)], dim=1)
    skip = ((w == 0) | rows["empty"]).unsqueeze(-1)
    return torch.where(skip, torch.zeros((), dtype=torch.float64, device=s.device), out)


@torch.library.custom_op("minitron::kl_div_jsd_sums", mutates_args=())
def kl_div_jsd_sums(student: Tensor, teacher: Tensor, weight: Tensor, stats: Tensor, temperature: float,
                    beta: float, backend: str) -> Tensor:
    """JSD partial sums of a slice of the vocabulary, given the global statistics (vocab-parallel step 3).

    Args:
        student, teacher: ``[N, V_local]``; weight: ``[N]`` fp32 (rows with weight 0 give zeros);
        stats: fp32 ``[N, 5]`` global statistics (:func:`kl_div_stats` combined over the group).
        beta: the JSD weight, strictly between 0 and 1 in float32.
    Returns:
        fp64 ``[N, 3]``: per row ``(sum of the divergence terms, sum_k Q_k g_k, sum_k Q_k)`` over the slice, with
        ``g_k = (1 - beta) log(Q_k / M_k)`` (see csrc/common/kl_math.h ``JsdPartial``); zeros for skipped rows and
        rows whose teacher is entirely -inf.
    """
    impl = _jsd_sums_backends.select(backend, student.device, student.dtype)
    if student.shape[0] == 0:
        return torch.zeros((0, 3), dtype=torch.float64, device=student.device)
    return impl.fn(student, teacher, weight, stats, 1.0 / temperature, beta)


@kl_div_jsd_sums.register_fake
def _(student, teacher, weight, stats, temperature, beta, backend):
    return student.new_empty((student.shape[0], 3), dtype=torch.float64)


@_vp_backends.register("cpp", ("cpu",), unavailable=lambda d: native_unavailable("_kl_div_vp_fwd_native", d))
def _vp_cpp(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad):
    return torch.ops.minitron._kl_div_vp_fwd_native(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad)


@_vp_backends.register("cuda", ("cuda",), unavailable=lambda d: native_unavailable("_kl_div_vp_fwd_native", d))
def _vp_cuda(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad):
    return torch.ops.minitron._kl_div_vp_fwd_native(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad)


@_vp_backends.register("triton", ("cuda", "cpu"), unavailable=triton_unavailable)
def _vp_triton(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad):
    from minitron.kernels.kl_div import kl_div_vp_fwd as vp

    return vp(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad=need_grad)


@_vp_backends.register("reference", ("cpu", "cuda"))
def _vp_reference(s, t, w, stats, sums, mode, inv_t, beta, scale, need_grad):
    """Torch version: loss from the global statistics (and sums), the slice's gradient in closed form."""
    zero = torch.zeros((), dtype=torch.float32, device=s.device)
    if mode == MODES["jsd"]:
        rows, q, _, g = _jsd_local_reference(s, t, stats, inv_t, beta)
        sums = sums.to(torch.float64)
        div = sums[:, 0].to(torch.float32)
        div = torch.where(torch.isnan(rows["lse_a"]), torch.full_like(div, float("nan")), div)
        centre = torch.where(sums[:, 2] > 0, sums[:, 1] / sums[:, 2], torch.zeros_like(sums[:, 1]))
        hi = centre.to(torch.float32)
        lo = (centre - hi.to(torch.float64)).to(torch.float32)
        grad = torch.where(q == 0, zero, q * ((g - hi.unsqueeze(-1)) - lo.unsqueeze(-1)))
    else:
        rows = _global_rows(stats, mode)
        div = rows["div"]
        a = s.to(torch.float32) * inv_t
        b = t.to(torch.float32) * inv_t
        q = torch.exp(a - rows["lse_a"].unsqueeze(-1))
        if mode == MODES["forward"]:
            grad = q - torch.exp(b - rows["lse_b"].unsqueeze(-1))
        else:
            log_ratio = (a - b) - rows["lse_diff"].unsqueeze(-1)
            grad = torch.where(q == 0, zero, q * (log_ratio - div.unsqueeze(-1)))
    counted = (w != 0) & ~rows["empty"]
    ws = w * scale
    loss = torch.where(counted, ws * div, zero)
    if not need_grad:
        return loss, s.new_empty((0, s.shape[-1]))
    grad = torch.where(counted.unsqueeze(-1), grad * (ws * inv_t).unsqueeze(-1), zero)
    return loss, grad.to(s.dtype).contiguous()


@torch.library.custom_op("minitron::kl_div_vp_fwd", mutates_args=())
def kl_div_vp_fwd(student: Tensor, teacher: Tensor, weight: Tensor, stats: Tensor, jsd_sums: Optional[Tensor],
                  mode: int, temperature: float, beta: float, scale: float, backend: str,
                  need_grad: bool = True) -> tuple[Tensor, Tensor]:
    """Per-row loss and the gradient of a vocabulary slice, given the global statistics (vocab-parallel step 4).

    Args:
        student, teacher: ``[N, V_local]`` logits; weight: ``[N]`` fp32 (rows with weight 0 are skipped).
        stats: fp32 ``[N, 5]`` global statistics (:func:`kl_div_stats` combined over the group).
        jsd_sums: mode 2: fp64 ``[N, 3]`` global :func:`kl_div_jsd_sums`; else None.
        mode: 0 forward, 1 reverse, 2 JSD with ``0 < beta < 1`` in float32 (the ends are run as 0 / 1).
    Returns:
        ``loss [N]`` fp32 = weight * scale * D (the whole row's divergence: the same on every rank) and
        ``grad [N, V_local]`` (student dtype) = d loss / d student for the slice (``[0, V_local]`` when
        ``need_grad`` is False).
    """
    impl = _vp_backends.select(backend, student.device, student.dtype)
    if student.shape[0] == 0:
        return (torch.zeros(0, dtype=torch.float32, device=student.device),
                torch.empty((0, student.shape[1]), dtype=student.dtype, device=student.device))
    return impl.fn(student, teacher, weight, stats, jsd_sums, mode, 1.0 / temperature, beta, scale, need_grad)


@kl_div_vp_fwd.register_fake
def _(student, teacher, weight, stats, jsd_sums, mode, temperature, beta, scale, backend, need_grad=True):
    grad_rows = student.shape[0] if need_grad else 0
    return (student.new_empty((student.shape[0],), dtype=torch.float32),
            torch.empty((grad_rows, student.shape[1]), dtype=student.dtype, device=student.device))


register_row_loss_autograd(kl_div_vp_fwd, num_inputs=11, need_grad_input=10)


def vp_bytes_per_row(mode: str, beta: float = 0.5) -> int:
    """Bytes each rank contributes per row to the all-reduces of vocab-parallel :func:`kl_div` (from the
    shapes): MAX of 2 fp32 maxima, SUM of 3 fp32 sums (2 for JSD, which has no cross sum), and for the JSD
    (0 < beta < 1) a SUM of 3 fp64 partial sums. Independent of the vocabulary size."""
    if mode == "jsd" and _jsd_end(beta) is None:
        return 2 * 4 + 2 * 4 + 3 * 8
    return 2 * 4 + 3 * 4


def _combine_stats(stats: Tensor, mode: int, group) -> Tensor:
    """The global ``[N, 5]`` statistics from every rank's slice statistics: all-reduce MAX of the two maxima,
    rescale the sums to them, all-reduce SUM of the sums."""
    import torch.distributed as dist

    m = stats[:, [0, 2]].contiguous()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    r = torch.where(m == float("-inf"), torch.zeros_like(m), torch.exp(stats[:, [0, 2]] - m))
    cols = [stats[:, 1] * r[:, 0], stats[:, 3] * r[:, 1]]
    if mode != MODES["jsd"]:
        c = stats[:, 4]
        rc = r[:, 1] if mode == MODES["forward"] else r[:, 0]
        cols.append(torch.where(c == float("inf"), c, c * rc))  # a +inf cross sum stays +inf when rc is 0
    sums = torch.stack(cols, dim=1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    c = sums[:, 2] if mode != MODES["jsd"] else torch.zeros_like(sums[:, 0])
    return torch.stack([m[:, 0], sums[:, 0], m[:, 1], sums[:, 1], c], dim=1)


_REDUCTION_CODES = {r: i for i, r in enumerate(REDUCTIONS)}
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _consistency_values(n: int, mask: Optional[Tensor], args: dict[str, float]) -> tuple[list[str], list[float]]:
    if mask is None:
        counted, checksum = float(n), 0.0
    else:
        flat = mask.reshape(-1)
        counted = float(flat.sum())
        # positions of the counted tokens, weighted so that moving a token changes the sum
        idx = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        checksum = float((idx * flat.to(torch.float64) * torch.cos(idx)).sum())
    names = ["student_logits rows (N)", "mask/labels (counted tokens)", "mask/labels (positions)"] + list(args)
    return names, [float(n), counted, checksum] + [float(v) for v in args.values()]


_CONSISTENCY_ARGS = ("mode", "temperature", "beta", "reduction", "scale_by_t2", "dtype", "student_logit_scale",
                     "teacher_logit_scale", "student_softcap", "teacher_softcap")


def _group_max(group, vals: list[float], device: torch.device) -> tuple[list[float], list[float]]:
    """(max, min) over the group of each value: one all-reduce MAX of the values and their negatives."""
    import torch.distributed as dist

    x = torch.tensor(vals + [-v for v in vals], dtype=torch.float64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    k = len(vals)
    return x[:k].tolist(), (-x[k:]).tolist()


def _check_group_consistency(group, n: int, mask: Optional[Tensor], device: torch.device,
                             args: dict[str, float]) -> None:
    """One small all-reduce (MAX of 14 values and their negatives: 224 bytes) checks that every rank passed the
    same rows, mask and arguments and that none rejected its own (:func:`_signal_local_error`); raises
    ``ValueError`` naming the first thing that differs."""
    names, vals = _consistency_values(n, mask, args)
    hi, lo = _group_max(group, [0.0] + vals, device)
    if hi[0] != 0.0:
        raise ValueError("kl_div(process_group=...): another rank of the group rejected its arguments (its own error "
                         "says why); every rank must pass valid, matching arguments")
    for name, a, b, own in zip(names, hi[1:], lo[1:], vals):
        if a != b:
            raise ValueError(f"kl_div(process_group=...): {name} differs across the ranks of the group (this rank "
                             f"has {own:g}, the group ranges over [{b:g}, {a:g}]); every rank must pass the same "
                             "rows and arguments, each with its own slice of the vocabulary")


def _signal_local_error(group, student_logits: object) -> None:
    """A rank whose own arguments are invalid still joins the consistency all-reduce, with its error flag set,
    so the other ranks raise too instead of waiting for the process-group timeout."""
    device = student_logits.device if isinstance(student_logits, Tensor) else torch.device("cpu")
    _group_max(group, [1.0] + [0.0] * (3 + len(_CONSISTENCY_ARGS)), device)


def _check_process_group(group) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD or "
                        f"dist.new_group(...)), got {type(group).__name__}")


def _kl_div_vocab_parallel(student: Tensor, teacher: Tensor, weight: Tensor, mode: str, temperature: float,
                           beta: float, scale: float, backend: str, need_grad: bool, group) -> Tensor:
    """Per-token loss ``[N]`` of vocab-parallel :func:`kl_div` (every rank gets the same values; the gradient
    reaches each rank's own slice of ``student``)."""
    m = MODES[mode]
    if m == MODES["jsd"]:
        end = _jsd_end(beta)
        m = MODES[end] if end is not None else m
    s_const = student.detach()
    stats = torch.ops.minitron.kl_div_stats(s_const, teacher, weight, m, temperature, backend)
    stats = _combine_stats(stats, m, group)
    sums = None
    if m == MODES["jsd"]:
        import torch.distributed as dist

        sums = torch.ops.minitron.kl_div_jsd_sums(s_const, teacher, weight, stats, temperature, beta, backend)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    loss, _ = torch.ops.minitron.kl_div_vp_fwd(student, teacher, weight, stats, sums, m, temperature, beta, scale,
                                               backend, need_grad)
    return loss


# ----------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------


def _kernel_transform(x: Tensor, logit_scale: float, softcap: Optional[float]) -> Tensor:
    """The logit transform for the kernels, in fp32 (differentiable through autograd)."""
    return _transform_reference(x.to(torch.float32), logit_scale, softcap)


def _has_transform(logit_scale: float, softcap: Optional[float]) -> bool:
    return logit_scale != 1.0 or softcap is not None


def kl_div(student_logits: Tensor, teacher_logits: Tensor, *, mode: str = "forward", temperature: float = 1.0,
           beta: float = 0.5, reduction: str = "mean", mask: Optional[Tensor] = None, scale_by_t2: bool = True,
           backend: str = "auto", student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
           student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
           labels: Optional[Tensor] = None, ignore_index: int = -100, process_group=None) -> Tensor:
    """Fused KL/JSD distillation loss between student and teacher logits.

    Args:
        student_logits: ``[..., V]`` fp32/bf16/fp16 (any leading shape; non-contiguous allowed).
            The only differentiable input.
        teacher_logits: ``[..., V]``, same shape/dtype/device; treated as a constant.
        mode: ``"forward"`` KL(P_teacher || Q_student), ``"reverse"`` KL(Q || P) or ``"jsd"``, the generalised
            JSD with ``M = beta P + (1 - beta) Q`` (TRL/Liger convention: ``beta=0`` forward KL, ``beta=1``
            reverse KL; see the module docstring).
        temperature: divides both (transformed) logits; finite, > 0 and <= :data:`MAX_TEMPERATURE`.
        beta: JSD weight in [0, 1] (only used by ``mode="jsd"``).
        reduction: ``"mean"`` over counted tokens, ``"sum"``, or ``"none"`` (per-token ``[...]``, zero where
            masked). With every token masked the loss is 0 with zero gradient.
        mask: bool ``[...]``, True for tokens that count.
        scale_by_t2: multiply the loss by ``temperature**2``.
        backend: ``"auto"`` (CPU -> C++, CUDA -> CUDA C++ or Triton), or ``"cpp"``, ``"cuda"``,
            ``"triton"``, ``"reference"``.
        student_logit_scale, teacher_logit_scale: multiply that model's logits first (finite, non-zero).
        student_softcap, teacher_softcap: then ``softcap * tanh(z / softcap)`` (finite, > 0; None: no cap).
            With any transform the transformed logits are formed in fp32 (``[..., V]`` temporaries); without,
            nothing extra runs.
        labels: integer ``[...]``; tokens whose label equals ``ignore_index`` do not count (an alternative to
            ``mask``; giving both is an error).
        ignore_index: the label value of tokens that do not count (default -100).
        process_group: a ``torch.distributed`` process group for vocab-parallel logits (tensor-parallel LM
            heads, as Megatron-Core's vocab-parallel cross entropy): each rank passes the same rows, mask and
            arguments, with ``student_logits`` / ``teacher_logits`` holding its own contiguous slice
            ``[..., v0:v1]`` of the vocabulary (slices in rank order, sizes may differ, each >= 1). The ranks
            exchange a few numbers per row (:func:`vp_bytes_per_row`: 20 bytes, JSD 40), never a row; every
            rank returns the loss of the whole vocabulary and the gradient reaches its own slice. A small
            all-reduce first checks that the rows, mask and arguments agree across the group (``ValueError``
            naming what differs). None (default): the logits hold the whole vocabulary.

    Returns:
        fp32 scalar (``mean``/``sum``) or fp32 ``[...]`` (``none``). The gradient has the input dtype.
    """
    if process_group is not None:
        _check_process_group(process_group)
    try:
        _validate_kl_args(student_logits, teacher_logits, mode, temperature, beta, reduction, mask)
        _validate_transforms(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
        lead = student_logits.shape[:-1]
        mask = _mask_from_labels(mask, labels, ignore_index, lead, student_logits.device,
                                 "the logits' shape without the vocabulary axis")
    except (TypeError, ValueError):
        if process_group is not None:
            _signal_local_error(process_group, student_logits)
        raise
    student, teacher = student_logits, teacher_logits.detach()
    if _has_transform(student_logit_scale, student_softcap) or _has_transform(teacher_logit_scale, teacher_softcap):
        student = _kernel_transform(student, student_logit_scale, student_softcap)
        teacher = _kernel_transform(teacher, teacher_logit_scale, teacher_softcap)
    s2 = _as_rows(student)
    t2 = _as_rows(teacher)
    weight = token_weights(mask, int(math.prod(lead)), student_logits.device, reduction)
    scale = float(temperature) ** 2 if scale_by_t2 else 1.0
    # Loss only when no gradient can flow (evaluation, torch.no_grad): no gradient pass, no [N, V] output.
    need_grad = bool(torch.is_grad_enabled() and student_logits.requires_grad)
    if process_group is not None:
        _check_group_consistency(
            process_group, s2.shape[0], mask, student_logits.device,
            {"mode": MODES[mode], "temperature": temperature, "beta": beta, "reduction": _REDUCTION_CODES[reduction],
             "scale_by_t2": float(scale_by_t2), "dtype": _DTYPE_CODES[student_logits.dtype],
             "student_logit_scale": student_logit_scale, "teacher_logit_scale": teacher_logit_scale,
             "student_softcap": -1.0 if student_softcap is None else student_softcap,
             "teacher_softcap": -1.0 if teacher_softcap is None else teacher_softcap})
        loss_tok = _kl_div_vocab_parallel(s2, t2, weight, mode, float(temperature), float(beta), scale, backend,
                                          need_grad, process_group)
        if reduction == "none":
            return loss_tok.reshape(lead)
        return loss_tok.sum()
    loss_tok, _ = torch.ops.minitron.kl_div_fwd(s2, t2, weight, MODES[mode], float(temperature), float(beta),
                                                scale, backend, need_grad)
    if reduction == "none":
        return loss_tok.reshape(lead)
    return loss_tok.sum()


class KLDivLoss(nn.Module):
    """``nn.Module`` form of :func:`kl_div`; ``forward(student_logits, teacher_logits, mask=None, labels=None)``.

    ``process_group``: vocab-parallel logits (each rank its slice of the vocabulary), see :func:`kl_div`.
    """

    def __init__(self, *, mode: str = "forward", temperature: float = 1.0, beta: float = 0.5,
                 reduction: str = "mean", scale_by_t2: bool = True, backend: str = "auto",
                 student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                 ignore_index: int = -100, process_group=None) -> None:
        super().__init__()
        self.process_group = process_group
        _validate_common(mode, temperature, beta, reduction)
        _validate_transforms(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
        self.mode, self.temperature, self.beta = mode, float(temperature), float(beta)
        self.reduction, self.scale_by_t2, self.backend = reduction, scale_by_t2, backend
        self.transforms = dict(student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                               student_softcap=student_softcap, teacher_softcap=teacher_softcap)
        self.ignore_index = ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> Tensor:
        return kl_div(student_logits, teacher_logits, mode=self.mode, temperature=self.temperature, beta=self.beta,
                      reduction=self.reduction, mask=mask, scale_by_t2=self.scale_by_t2, backend=self.backend,
                      labels=labels, ignore_index=self.ignore_index, process_group=self.process_group,
                      **self.transforms)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, temperature={self.temperature}, beta={self.beta}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


# ----------------------------------------------------------------------------------------------
# fused linear + KL: logits are produced chunk by chunk and never exist in full
# ----------------------------------------------------------------------------------------------


def _transform_with_derivative(x: Tensor, logit_scale: float, softcap: Optional[float]
                               ) -> tuple[Tensor, Optional[Tensor]]:
    """fp32 transformed logits and d transformed / d raw logit (a tensor, or None when it is 1)."""
    z = x.to(torch.float32)
    if softcap is None:
        if logit_scale == 1.0:
            return z, None
        return z * logit_scale, torch.full((), logit_scale, dtype=torch.float32, device=x.device)
    y = torch.tanh(z * (logit_scale / softcap))
    dz = (1.0 - y * y).mul_(logit_scale)  # d(c tanh(s x / c))/dx = s (1 - tanh^2)
    return y.mul_(softcap), dz


def _fused_linear_impl(sh: Tensor, sw: Tensor, th: Tensor, tw: Tensor, sb: Optional[Tensor], tb: Optional[Tensor],
                       weight: Tensor, mode: int, temperature: float, beta: float, scale: float, chunk_size: int,
                       backend: str, need_grads: bool = True, s_scale: float = 1.0, t_scale: float = 1.0,
                       s_cap: Optional[float] = None, t_cap: Optional[float] = None):
    n, hs = sh.shape
    v = sw.shape[0]
    device = sh.device
    loss = torch.zeros(n, dtype=torch.float32, device=device)
    grad_h = torch.zeros_like(sh) if need_grads else None
    acc_dtype = torch.float32
    grad_w = torch.zeros(sw.shape, dtype=acc_dtype, device=device) if need_grads else None
    grad_b = torch.zeros(v, dtype=acc_dtype, device=device) if (need_grads and sb is not None) else None
    counted = torch.nonzero(weight != 0).flatten() if n else weight.new_zeros(0, dtype=torch.long)
    s_tf, t_tf = _has_transform(s_scale, s_cap), _has_transform(t_scale, t_cap)
    any_tf = s_tf or t_tf
    chunk = max(1, int(chunk_size))
    for start in range(0, counted.numel(), chunk):
        rows = counted[start:start + chunk]
        contiguous_rows = rows.numel() > 0 and int(rows[-1]) - int(rows[0]) + 1 == rows.numel()
        if contiguous_rows:
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            h_s, h_t, w_c = sh[lo:hi], th[lo:hi], weight[lo:hi]
        else:
            h_s, h_t, w_c = sh.index_select(0, rows), th.index_select(0, rows), weight.index_select(0, rows)
        s_logits = h_s @ sw.t()
        if sb is not None:
            s_logits += sb
        with torch.no_grad():
            t_logits = h_t @ tw.t()
            if tb is not None:
                t_logits += tb
        s_logits = s_logits.detach()
        dz = None  # d transformed / d raw student logit (None: 1)
        if any_tf:  # transformed logits in fp32; the chain rule factor of the student's transform kept in dz
            s_logits, dz = _transform_with_derivative(s_logits, s_scale, s_cap)
            t_logits, _ = _transform_with_derivative(t_logits, t_scale, t_cap)
        loss_c, g = torch.ops.minitron.kl_div_fwd(s_logits, t_logits, w_c.contiguous(), mode, temperature,
                                                  beta, scale, backend, need_grads)
        del s_logits, t_logits
        if need_grads and any_tf:
            if dz is not None:
                g.mul_(dz)
            g = g.to(sh.dtype)
        del dz
        add_chunk_grads_(loss, loss_c, rows, (lo, hi) if contiguous_rows else None, g if need_grads else None, h_s,
                         sw, grad_h, grad_w, grad_b)
        del g
    return loss, grad_h, grad_w, grad_b


@torch.library.custom_op("minitron::fused_linear_kl_div_fwd", mutates_args=())
def fused_linear_kl_div_fwd(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                            teacher_weight: Tensor, student_bias: Optional[Tensor], teacher_bias: Optional[Tensor],
                            weight: Tensor, mode: int, temperature: float, beta: float, scale: float,
                            chunk_size: int, backend: str, need_grad: bool = True, student_logit_scale: float = 1.0,
                            teacher_logit_scale: float = 1.0, student_softcap: Optional[float] = None,
                            teacher_softcap: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token weighted loss and the gradients w.r.t. student hidden ``[N, Hs]``, weight ``[V, Hs]`` and bias
    ``[V]`` (an empty tensor when there is no bias), computed chunk by chunk over tokens. ``need_grad=False``:
    loss only (the three gradients are empty ``[0, ...]`` tensors; no gradient pass, no [V, H] accumulator).
    The logit transforms (see :func:`fused_linear_kl_div`) are applied per chunk; the gradients include them."""
    loss, gh, gw, gb = _fused_linear_impl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                          student_bias, teacher_bias, weight, mode, temperature, beta, scale,
                                          chunk_size, backend, need_grads=need_grad, s_scale=student_logit_scale,
                                          t_scale=teacher_logit_scale, s_cap=student_softcap, t_cap=teacher_softcap)
    if not need_grad:
        return (loss, student_hidden.new_empty((0, student_hidden.shape[1])),
                student_weight.new_empty((0, student_weight.shape[1])), student_hidden.new_zeros(0))
    gw = gw.to(student_weight.dtype)
    gb = gb.to(student_bias.dtype) if gb is not None else student_hidden.new_zeros(0)
    return loss, gh, gw, gb


@fused_linear_kl_div_fwd.register_fake
def _(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, weight, mode,
      temperature, beta, scale, chunk_size, backend, need_grad=True, student_logit_scale=1.0, teacher_logit_scale=1.0,
      student_softcap=None, teacher_softcap=None):
    n = student_hidden.shape[0]
    loss = student_hidden.new_empty((n,), dtype=torch.float32)
    if not need_grad:
        return (loss, student_hidden.new_empty((0, student_hidden.shape[1])),
                student_weight.new_empty((0, student_weight.shape[1])), student_hidden.new_empty(0))
    gb = (torch.empty_like(student_bias) if student_bias is not None else student_hidden.new_empty(0))
    return (loss, torch.empty_like(student_hidden), torch.empty_like(student_weight), gb)


def _fl_setup_context(ctx, inputs, output):
    _, gh, gw, gb = output
    ctx.has_bias = inputs[4] is not None
    ctx.need_grad = inputs[13] if len(inputs) > 13 else True
    ctx.save_for_backward(gh, gw, gb)
    ctx.mark_non_differentiable(gh, gw, gb)
    ctx.set_materialize_grads(False)  # no zero-filled [V, H] gradients for the non-differentiable outputs


def _fl_backward(ctx, grad_loss: Tensor, *_unused):
    gh, gw, gb = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 18
    if not ctx.need_grad:
        raise RuntimeError("minitron::fused_linear_kl_div_fwd was called with need_grad=False: it computed no "
                           "gradient (fused_linear_kl_div passes need_grad=True whenever a student input "
                           "requires grad)")
    # The per-token loss is always reduced with a sum by the wrapper (weights carry the mean), so the
    # incoming gradient is uniform; reduction="none" with a non-uniform upstream gradient is rejected
    # by the wrapper's hook below.
    if grad_loss is not None and grad_loss.numel() > 0 and not _is_one(grad_loss):
        c = grad_loss.reshape(-1)[0]
        gh, gw, gb = gh * c.to(gh.dtype), gw * c.to(gw.dtype), gb * c.to(gb.dtype)
    return (gh, gw, None, None, (gb if ctx.has_bias else None)) + (None,) * 13


fused_linear_kl_div_fwd.register_autograd(_fl_backward, setup_context=_fl_setup_context)


def _validate_fused_args(sh, sw, th, tw, sb, tb, mode, temperature, beta, reduction, mask, chunk_size) -> None:
    for name, t in (("student_hidden", sh), ("student_weight", sw), ("teacher_hidden", th), ("teacher_weight", tw)):
        _check_float_tensor(name, t, _KERNEL_DTYPES)
    for name, t in (("student_bias", sb), ("teacher_bias", tb)):
        if t is not None:
            _check_float_tensor(name, t, _KERNEL_DTYPES)
    if sw.dim() != 2:
        raise ValueError(f"student_weight must be 2-D [V, H_student], got shape {tuple(sw.shape)}")
    if tw.dim() != 2:
        raise ValueError(f"teacher_weight must be 2-D [V, H_teacher], got shape {tuple(tw.shape)}")
    if sh.dim() < 1 or sh.shape[-1] != sw.shape[1]:
        raise ValueError(f"student_hidden's last dimension ({sh.shape[-1] if sh.dim() else None}) must equal "
                         f"student_weight.shape[1] ({sw.shape[1]})")
    if th.dim() < 1 or th.shape[-1] != tw.shape[1]:
        raise ValueError(f"teacher_hidden's last dimension ({th.shape[-1] if th.dim() else None}) must equal "
                         f"teacher_weight.shape[1] ({tw.shape[1]})")
    if sw.shape[0] != tw.shape[0]:
        raise ValueError(f"vocabulary size mismatch: student_weight has {sw.shape[0]} rows, teacher_weight has "
                         f"{tw.shape[0]}")
    if sh.shape[:-1] != th.shape[:-1]:
        raise ValueError(f"student_hidden tokens {tuple(sh.shape[:-1])} != teacher_hidden tokens "
                         f"{tuple(th.shape[:-1])}")
    if sb is not None and tuple(sb.shape) != (sw.shape[0],):
        raise ValueError(f"student_bias must have shape ({sw.shape[0]},), got {tuple(sb.shape)}")
    if tb is not None and tuple(tb.shape) != (tw.shape[0],):
        raise ValueError(f"teacher_bias must have shape ({tw.shape[0]},), got {tuple(tb.shape)}")
    if sh.dtype != sw.dtype or (sb is not None and sb.dtype != sh.dtype):
        raise TypeError(f"student_hidden ({sh.dtype}), student_weight ({sw.dtype}) and student_bias must share a dtype")
    if th.dtype != tw.dtype or (tb is not None and tb.dtype != th.dtype):
        raise TypeError(f"teacher_hidden ({th.dtype}), teacher_weight ({tw.dtype}) and teacher_bias must share a dtype")
    if sh.dtype != th.dtype:
        raise TypeError(f"student and teacher tensors must share a dtype, got {sh.dtype} and {th.dtype}")
    devices = {t.device for t in (sh, sw, th, tw, sb, tb) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if sw.shape[0] == 0:
        raise ValueError("student_weight has an empty vocabulary dimension (V = 0)")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    _validate_common(mode, temperature, beta, reduction)
    _validate_mask(mask, sh.shape[:-1], sh.device, "student_hidden's shape without the hidden axis")


def fused_linear_kl_div(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                        teacher_weight: Tensor, *, student_bias: Optional[Tensor] = None,
                        teacher_bias: Optional[Tensor] = None, mode: str = "forward", temperature: float = 1.0,
                        beta: float = 0.5, reduction: str = "mean", mask: Optional[Tensor] = None,
                        chunk_size: Optional[int] = None, scale_by_t2: bool = True, backend: str = "auto",
                        student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                        student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                        labels: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """:func:`kl_div` of ``hidden @ weight.T (+ bias)`` logits without materialising them.

    Args:
        student_hidden: ``[..., Hs]``; student_weight: ``[V, Hs]``; student_bias: ``[V]`` or None.
        teacher_hidden: ``[..., Ht]`` (``Ht`` may differ from ``Hs``: a pruned student);
            teacher_weight: ``[V, Ht]``; teacher_bias: ``[V]`` or None. Teacher inputs are constants.
        chunk_size: tokens per chunk (default: the larger of about ``N / ceil(V / Hs)`` and what fits a
            budget of chunk temporaries, 384 MiB on CPU and 1.5 GiB on CUDA, at most N), so only
            ``chunk_size x V`` logits of each model exist at once. Masked tokens are skipped entirely.
        student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap: the logit transforms of
            :func:`kl_div` (as TRL's ``_chunked_divergence_loss``: scale, then soft cap, then temperature),
            applied per chunk (fp32 chunk temporaries only when used).
        labels, ignore_index: as :func:`kl_div` (``labels`` ``[...]`` like ``student_hidden`` without ``Hs``).
        Other arguments as :func:`kl_div`.

    Returns:
        fp32 scalar, or fp32 ``[...]`` for ``reduction="none"``. Gradients flow to the student hidden
        states, weight and bias; they are computed during the forward pass and only scaled in backward.
        With ``reduction="none"`` the upstream gradient must be uniform across tokens (e.g. ``.sum()`` or
        ``.mean()`` of the result); a non-uniform one raises in backward.
    """
    _validate_fused_args(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                         mode, temperature, beta, reduction, mask, chunk_size)
    _validate_transforms(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
    lead = student_hidden.shape[:-1]
    mask = _mask_from_labels(mask, labels, ignore_index, lead, student_hidden.device,
                             "student_hidden's shape without the hidden axis")
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    weight = token_weights(mask, int(math.prod(lead)), sh.device, reduction)
    if chunk_size is None:
        chunk_size = default_chunk_size(sh.shape[0], student_weight.shape[0], sh.shape[1], sh.device.type, 3)
    scale = float(temperature) ** 2 if scale_by_t2 else 1.0
    tb = teacher_bias.detach() if teacher_bias is not None else None
    # Loss only when no gradient can flow (evaluation, torch.no_grad): no gradient GEMMs, no [V, H] accumulator.
    need_grad = bool(torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)))
    loss_tok, _, _, _ = torch.ops.minitron.fused_linear_kl_div_fwd(
        sh, student_weight, th, teacher_weight.detach(), student_bias, tb, weight, MODES[mode], float(temperature),
        float(beta), scale, int(chunk_size), backend, need_grad, float(student_logit_scale),
        float(teacher_logit_scale), None if student_softcap is None else float(student_softcap),
        None if teacher_softcap is None else float(teacher_softcap))
    if reduction == "none":
        out = loss_tok.reshape(lead)
        if out.requires_grad and not torch.compiler.is_compiling():
            out.register_hook(uniform_grad_hook("fused_linear_kl_div"))
        return out
    return loss_tok.sum()


def fused_linear_kl_div_reference(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                                  teacher_weight: Tensor, *, student_bias: Optional[Tensor] = None,
                                  teacher_bias: Optional[Tensor] = None, mode: str = "forward",
                                  temperature: float = 1.0, beta: float = 0.5, reduction: str = "mean",
                                  mask: Optional[Tensor] = None, scale_by_t2: bool = True,
                                  student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                                  student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                                  labels: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """Unfused plain-torch version of :func:`fused_linear_kl_div` (materialises both logits)."""
    s_logits = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        t_logits = torch.nn.functional.linear(teacher_hidden, teacher_weight, teacher_bias)
    return kl_div_reference(s_logits, t_logits, mode=mode, temperature=temperature, beta=beta, reduction=reduction,
                            mask=mask, scale_by_t2=scale_by_t2, student_logit_scale=student_logit_scale,
                            teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                            teacher_softcap=teacher_softcap, labels=labels, ignore_index=ignore_index)


class FusedLinearKLDivLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_kl_div`.

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None,
    teacher_bias=None, mask=None, labels=None)``.
    """

    def __init__(self, *, mode: str = "forward", temperature: float = 1.0, beta: float = 0.5,
                 reduction: str = "mean", chunk_size: Optional[int] = None, scale_by_t2: bool = True,
                 backend: str = "auto", student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                 ignore_index: int = -100) -> None:
        super().__init__()
        _validate_common(mode, temperature, beta, reduction)
        _validate_transforms(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
        self.mode, self.temperature, self.beta, self.reduction = mode, float(temperature), float(beta), reduction
        self.chunk_size, self.scale_by_t2, self.backend = chunk_size, scale_by_t2, backend
        self.transforms = dict(student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                               student_softcap=student_softcap, teacher_softcap=teacher_softcap)
        self.ignore_index = ignore_index

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> Tensor:
        return fused_linear_kl_div(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                   student_bias=student_bias, teacher_bias=teacher_bias, mode=self.mode,
                                   temperature=self.temperature, beta=self.beta, reduction=self.reduction, mask=mask,
                                   chunk_size=self.chunk_size, scale_by_t2=self.scale_by_t2, backend=self.backend,
                                   labels=labels, ignore_index=self.ignore_index, **self.transforms)
