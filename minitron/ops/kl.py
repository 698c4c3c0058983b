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

Padded vocabularies: ``vocab_size=V`` (every KL op, both families) makes columns ``>= V`` of either input count
as ``-inf`` (no mass, zero gradient), so the two widths may differ (see ``docs/kl.md``; Liger-Kernel instead pads
the student with logit 0, which leaves mass on the padding).

Vocab-parallel logits (tensor-parallel LM heads): ``kl_div(..., process_group=g)`` with each rank holding a
contiguous slice of the vocabulary; the ranks exchange the per-row online-softmax statistics (20 bytes per row,
JSD 40), never a row (:mod:`minitron.ops.kl_vocab_parallel`; docs/kl.md). The fused-linear form, which never
materialises the logits, is :mod:`minitron.ops.fused_linear_kl` (``fused_linear_kl_div``; its names are also
importable from here).

Declared bounds, for callers that validate early (:func:`check_kl_options` raises the errors :func:`kl_div`
would): :data:`KL_MODES`, :data:`REDUCTIONS` (alias ``KL_REDUCTIONS``), :data:`BETA_RANGE`, :data:`MAX_TEMPERATURE`.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from minitron.ops._common import as_rows as _as_rows
from minitron.ops._common import check_float_tensor as _check_float_tensor
from minitron.ops._common import check_reduction, check_temperature, check_vocab_size, needs_grad
from minitron.ops._common import reduce_reference, vocab_view
from minitron.ops._common import reduce_token_loss
from minitron.ops._common import register_row_loss_autograd, token_weights
from minitron.ops._dispatch import native_unavailable, op_backends, triton_unavailable

__all__ = [
    "BETA_RANGE",
    "KL_MODES",
    "KL_REDUCTIONS",
    "MAX_TEMPERATURE",
    "MODES",
    "REDUCTIONS",
    "check_kl_options",
    "kl_div",
    "kl_div_reference",
    "fused_linear_kl_div",
    "fused_linear_kl_div_reference",
    "KLDivLoss",
    "FusedLinearKLDivLoss",
    "vp_bytes_per_row",
]

#: Mode name -> the ``mode`` code of the ops (``torch.ops.minitron.kl_div_fwd`` etc.).
MODES = {"forward": 0, "reverse": 1, "jsd": 2}
#: Accepted ``mode`` values.
KL_MODES = tuple(MODES)
#: Accepted ``reduction`` values (``KL_REDUCTIONS`` in ``minitron.ops``).
REDUCTIONS = ("mean", "sum", "none")
KL_REDUCTIONS = REDUCTIONS
#: Closed interval of accepted JSD ``beta`` values.
BETA_RANGE = (0.0, 1.0)
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
                     labels: Optional[Tensor] = None, ignore_index: int = -100,
                     vocab_size: Optional[int] = None) -> Tensor:
    """Plain-torch :func:`kl_div` (same arguments and result); the oracle of the tests.

    Differentiable w.r.t. ``student_logits`` through autograd. Materialises ``[..., V]`` temporaries.
    """
    _validate_kl_args(student_logits, teacher_logits, mode, temperature, beta, reduction, mask,
                      allowed_dtypes=_KERNEL_DTYPES + (torch.float64,), vocab_size=vocab_size)
    student_logits, teacher_logits = vocab_view(student_logits, vocab_size), vocab_view(teacher_logits, vocab_size)
    _validate_transforms(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
    mask = _mask_from_labels(mask, labels, ignore_index, student_logits.shape[:-1], student_logits.device,
                             "the logits' shape without the vocabulary axis")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = _transform_reference(student_logits.to(dtype), student_logit_scale, student_softcap)
    t = _transform_reference(teacher_logits.detach().to(dtype), teacher_logit_scale, teacher_softcap)
    per_token = _divergence_reference(s, t, mode, temperature, beta)
    if scale_by_t2:
        per_token = per_token * (temperature * temperature)
    return reduce_reference(per_token, mask, reduction)




# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def check_kl_options(mode: str = "forward", temperature: float = 1.0, beta: float = 0.5,
                     reduction: str = "mean") -> None:
    """Check the scalar options of :func:`kl_div` / :func:`fused_linear_kl_div` / :class:`KLDivLoss` without any
    tensor: ``mode`` in :data:`KL_MODES`, ``reduction`` in :data:`REDUCTIONS`, ``temperature`` finite, > 0 and
    <= :data:`MAX_TEMPERATURE`, ``beta`` in :data:`BETA_RANGE`. Raises the ``TypeError``/``ValueError`` (naming
    the argument) that the ops would raise, so a driver can check them where the user typed them."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    check_reduction(reduction, REDUCTIONS)
    check_temperature(temperature)
    if temperature > MAX_TEMPERATURE:
        raise ValueError(f"temperature must be <= {MAX_TEMPERATURE:g} (MAX_TEMPERATURE), got {temperature:g}: the "
                         "softmaxes are then so close to uniform that fp32 cannot resolve the divergence (see "
                         "docs/kl.md)")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    if not (BETA_RANGE[0] <= beta <= BETA_RANGE[1]):
        raise ValueError(f"beta must be in [{BETA_RANGE[0]:g}, {BETA_RANGE[1]:g}], got {beta}")



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
                      allowed_dtypes: tuple[torch.dtype, ...] = _KERNEL_DTYPES,
                      vocab_size: Optional[int] = None) -> None:
    _check_float_tensor("student_logits", student, allowed_dtypes)
    _check_float_tensor("teacher_logits", teacher, allowed_dtypes)
    if student.dtype != teacher.dtype:
        raise TypeError(f"student_logits and teacher_logits must have the same dtype, got {student.dtype} "
                        f"and {teacher.dtype}")
    if student.device != teacher.device:
        raise ValueError(f"student_logits is on {student.device} but teacher_logits is on {teacher.device}")
    if student.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the vocabulary)")
    if vocab_size is not None:
        if teacher.dim() < 1:
            raise ValueError("teacher_logits must have at least one dimension (the vocabulary)")
        check_vocab_size(vocab_size, {"student_logits": student.shape[-1], "teacher_logits": teacher.shape[-1]})
        if student.shape[:-1] != teacher.shape[:-1]:
            raise ValueError(f"student_logits shape {tuple(student.shape)} and teacher_logits shape "
                             f"{tuple(teacher.shape)} differ before the vocabulary axis")
    elif student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"vocabulary size mismatch: student_logits has {student.shape[-1]}, teacher_logits has "
                         f"{teacher.shape[-1]} (pass vocab_size=<the real vocabulary> when one side is padded)")
    if vocab_size is None and student.shape != teacher.shape:
        raise ValueError(f"student_logits shape {tuple(student.shape)} != teacher_logits shape {tuple(teacher.shape)}")
    if student.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")
    check_kl_options(mode, temperature, beta, reduction)
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


register_row_loss_autograd(kl_div_fwd)

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
           labels: Optional[Tensor] = None, ignore_index: int = -100, process_group=None,
           vocab_size: Optional[int] = None) -> Tensor:
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
        vocab_size: the real vocabulary when a model's logits are padded (e.g. to a multiple of 64 or 128):
            columns ``>= vocab_size`` of EITHER input count as ``-inf`` (no probability mass, zero gradient), so
            ``student_logits`` and ``teacher_logits`` may then differ in width (both ``>= vocab_size``; the
            leading shapes must match). Unlike Liger-Kernel, which pads the narrower student with logit 0 (leaving
            probability mass on the padding), the padding is dropped here. None (default): the widths must be
            equal and every column counts. Not supported with ``process_group`` (``NotImplementedError``).

    Returns:
        fp32 scalar (``mean``/``sum``) or fp32 ``[...]`` (``none``). The gradient has the input dtype.
    """
    if process_group is not None and vocab_size is not None:
        raise NotImplementedError("kl_div: vocab_size is not supported with process_group (vocab-parallel logits); "
                                  "narrow each rank's slice to the real vocabulary instead (the rank holding columns "
                                  "[v0, v1) with v1 > vocab_size passes logits[..., :vocab_size - v0])")
    if process_group is not None:
        _vp.check_process_group(process_group)
    try:
        _validate_kl_args(student_logits, teacher_logits, mode, temperature, beta, reduction, mask,
                          vocab_size=vocab_size)
        _validate_transforms(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
        lead = student_logits.shape[:-1]
        mask = _mask_from_labels(mask, labels, ignore_index, lead, student_logits.device,
                                 "the logits' shape without the vocabulary axis")
    except (TypeError, ValueError):
        if process_group is not None:
            _vp.signal_local_error(process_group, student_logits)
        raise
    # padded columns (>= vocab_size) dropped: views with the row stride of the full width (every backend honours
    # row strides), so nothing is copied; autograd gives the dropped student columns a zero gradient
    student, teacher = vocab_view(student_logits, vocab_size), vocab_view(teacher_logits.detach(), vocab_size)
    if _has_transform(student_logit_scale, student_softcap) or _has_transform(teacher_logit_scale, teacher_softcap):
        student = _kernel_transform(student, student_logit_scale, student_softcap)
        teacher = _kernel_transform(teacher, teacher_logit_scale, teacher_softcap)
    s2 = _as_rows(student)
    t2 = _as_rows(teacher)
    weight = token_weights(mask, int(math.prod(lead)), student_logits.device, reduction)
    scale = float(temperature) ** 2 if scale_by_t2 else 1.0
    # Loss only when no gradient can flow (evaluation, torch.no_grad): no gradient pass, no [N, V] output.
    need_grad = needs_grad(student_logits)
    if process_group is not None:
        loss_tok = _vp.vocab_parallel_token_loss(
            s2, t2, weight, mask, mode=mode, temperature=float(temperature), beta=float(beta), scale=scale,
            reduction=reduction, scale_by_t2=scale_by_t2, dtype=student_logits.dtype, backend=backend,
            need_grad=need_grad, group=process_group, transforms=dict(
                student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                student_softcap=student_softcap, teacher_softcap=teacher_softcap))
    else:
        loss_tok, _ = torch.ops.minitron.kl_div_fwd(s2, t2, weight, MODES[mode], float(temperature), float(beta),
                                                    scale, backend, need_grad)
    return reduce_token_loss(loss_tok, lead, reduction)


class KLDivLoss(nn.Module):
    """``nn.Module`` form of :func:`kl_div`; ``forward(student_logits, teacher_logits, mask=None, labels=None)``.

    ``process_group``: vocab-parallel logits (each rank its slice of the vocabulary), see :func:`kl_div`.
    ``vocab_size``: the real vocabulary of padded logits, see :func:`kl_div`.
    """

    def __init__(self, *, mode: str = "forward", temperature: float = 1.0, beta: float = 0.5,
                 reduction: str = "mean", scale_by_t2: bool = True, backend: str = "auto",
                 student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                 ignore_index: int = -100, process_group=None, vocab_size: Optional[int] = None) -> None:
        super().__init__()
        check_vocab_size(vocab_size, {})
        if process_group is not None and vocab_size is not None:
            raise NotImplementedError("KLDivLoss: vocab_size is not supported with process_group")
        self.process_group, self.vocab_size = process_group, vocab_size
        check_kl_options(mode, temperature, beta, reduction)
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
                      vocab_size=self.vocab_size, **self.transforms)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, temperature={self.temperature}, beta={self.beta}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}, vocab_size={self.vocab_size}")


# ----------------------------------------------------------------------------------------------
# the other jobs of the KL family, in their own modules; imported here so that importing this module registers
# every KL op (torch.ops.minitron.kl_div_stats, ..., fused_linear_kl_div_fwd), as it always has
# ----------------------------------------------------------------------------------------------

from minitron.ops import kl_vocab_parallel as _vp  # noqa: E402
from minitron.ops import fused_linear_kl as _fl  # noqa: E402

# Names that lived in this module before the split: still importable from here.
_MOVED = {
    **{name: "kl_vocab_parallel" for name in ("vp_bytes_per_row", "VP_STATS", "kl_div_stats", "kl_div_jsd_sums",
                                              "kl_div_vp_fwd")},
    **{name: "fused_linear_kl" for name in ("fused_linear_kl_div", "fused_linear_kl_div_reference",
                                            "FusedLinearKLDivLoss", "fused_linear_kl_div_fwd")},
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(_vp if module == "kl_vocab_parallel" else _fl, name)
