"""Fused hidden-state distillation losses (cosine, MSE) between student and teacher hidden states.

Definitions, per token, for ``s`` (student) and ``t`` (teacher) vectors of ``D`` entries (see
``docs/hidden_loss.md``)::

    loss="cosine":  l = 1 - cos(s, t),   cos = (s . t) / (|s| |t|), clamped to [-1, 1]   (l in [0, 2])
    loss="mse":     l = mean_d (s_d - t_d)^2 = |s - t|^2 / D

Zero vectors (the convention of block influence, :mod:`minitron.ops.importance`): both zero -> ``l = 0`` (nothing to
align); exactly one zero -> ``l = 1`` (``cos`` taken as 0). The gradient is 0 in both cases (``1 - cos`` is not
differentiable at ``s = 0``; with ``t = 0`` it is constant). Otherwise the gradient of the cosine loss is ``dl/ds =
cos * s / |s|^2 - t / (|s| |t|)`` (computed with the unclamped ``cos``), that of the MSE ``dl/ds = 2 (s - t) / D``.
For the cosine loss a NaN or an infinity in a counted token gives NaN for that token (loss and gradient row); for
the MSE they follow the arithmetic (a NaN gives NaN, an infinity ``+inf``).

``teacher`` is a constant: no gradient flows to it (it is detached), whatever its ``requires_grad``.

Reductions: ``"mean"`` over the counted tokens (0, with a zero gradient, when none counts), ``"sum"``, or ``"none"``
(per-token ``[...]``, 0 where masked). Masked tokens are skipped: their entries are never read into the loss, and
their gradient rows are 0.

Implementation: every backend computes, in one pass per token (the token's two rows are read once for the sums; the
cosine's gradient pass re-reads them while they are cache-hot), the per-token loss AND its gradient with respect to
the student. The cosine loss is computed in that second pass as ``|s/|s| - t/|t||^2 / 2`` (equal to ``1 - cos``),
which keeps its error relative to the loss: ``1 - s.t / (|s| |t|)`` loses everything below ~1e-7 in fp32 to
cancellation when the student is close to the teacher. Backward only rescales the saved gradient by the upstream
gradient, in place (a no-op for ``"mean"``/``"sum"``). So forward + backward allocate no ``[tokens, D]`` temporary
beyond the gradient itself (plus a contiguous copy of an input whose last axis is not unit-stride). Accumulation is
in fp32 for every input dtype; the gradient has the student's dtype. Backends: CPU C++
(``csrc/cpu/hidden_loss.cpp``), CUDA C++ (``csrc/cuda/hidden_loss.cu``), Triton (``minitron/kernels/hidden_loss.py``), all
sharing the per-token math of ``csrc/common/hidden_loss_math.h``; the torch ``reference`` backend runs only when
asked for by name.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from minitron.ops._common import as_rows, check_float_tensor, check_reduction, needs_grad
from minitron.ops._common import reduce_reference, reduce_token_loss, register_row_loss_autograd, token_weights
from minitron.ops._dispatch import native_unavailable, op_backends, triton_unavailable

__all__ = [
    "HIDDEN_LOSSES",
    "HIDDEN_REDUCTIONS",
    "check_hidden_loss_options",
    "hidden_state_loss",
    "hidden_state_loss_reference",
    "HiddenStateLoss",
]

#: Loss name -> the ``loss`` code of ``torch.ops.minitron.hidden_state_loss_fwd`` (and of the kernels).
LOSS_CODES = {"cosine": 0, "mse": 1}
#: Accepted ``loss`` values.
HIDDEN_LOSSES = tuple(LOSS_CODES)
#: Accepted ``reduction`` values.
HIDDEN_REDUCTIONS = ("mean", "sum", "none")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NATIVE = "_hidden_state_loss_fwd_native"

# ----------------------------------------------------------------------------------------------
# plain-torch reference (the tests' oracle; differentiable, any float dtype incl. float64)
# ----------------------------------------------------------------------------------------------


def _per_token_reference(s: Tensor, t: Tensor, loss: str) -> Tensor:
    """Per-token loss ``[..., D] -> [...]`` in plain torch (differentiable w.r.t. ``s``), >= fp32."""
    if loss == "mse":
        return (s - t).square().mean(-1)
    dot = (s * t).sum(-1)
    ss = s.square().sum(-1)
    tt = t.square().sum(-1)
    zs, zt = ss == 0, tt == 0
    one = torch.ones_like(ss)
    # safe denominators where a vector is zero, so that no NaN reaches the gradient of the masked branch
    den = torch.where(zs, one, ss).sqrt() * torch.where(zt, one, tt).sqrt()
    out = 1.0 - (dot / den).clamp(-1.0, 1.0)
    out = torch.where(zs & zt, torch.zeros_like(out), out)
    out = torch.where(zs ^ zt, torch.ones_like(out), out)
    bad = ~(torch.isfinite(dot) & torch.isfinite(ss) & torch.isfinite(tt))  # NaN/inf in the token: NaN
    return torch.where(bad, torch.full_like(out, float("nan")), out)


def hidden_state_loss_reference(student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None, *,
                                loss: str = "cosine", reduction: str = "mean") -> Tensor:
    """Plain-torch :func:`hidden_state_loss` (same arguments and result; materialises ``[..., D]`` temporaries).

    Computes in fp64 for fp64 inputs, else fp32; differentiable w.r.t. ``student`` through autograd (the
    teacher is detached).
    """
    _validate(student, teacher, mask, loss, reduction, allowed=_KERNEL_DTYPES + (torch.float64,))
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    per_token = _per_token_reference(student.to(dtype), teacher.detach().to(dtype), loss)
    return reduce_reference(per_token, _counted(mask), reduction)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def check_hidden_loss_options(loss: str = "cosine", reduction: str = "mean") -> None:
    """Raise the ``ValueError`` (naming the argument) :func:`hidden_state_loss` would raise for ``loss`` /
    ``reduction``, without any tensor (for a driver validating its settings early)."""
    if loss not in LOSS_CODES:
        raise ValueError(f"loss must be one of {list(HIDDEN_LOSSES)}, got {loss!r}")
    check_reduction(reduction, HIDDEN_REDUCTIONS)


def _validate(student: object, teacher: object, mask: object, loss: str, reduction: str,
              allowed: tuple[torch.dtype, ...] = _KERNEL_DTYPES) -> None:
    check_float_tensor("student", student, allowed)
    check_float_tensor("teacher", teacher, allowed)
    assert isinstance(student, Tensor) and isinstance(teacher, Tensor)
    if student.dim() < 1:
        raise ValueError("student must have at least one dimension (the hidden axis D)")
    if student.shape[-1] == 0:
        raise ValueError("student has an empty hidden dimension (D = 0)")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher shape {tuple(teacher.shape)} != student shape {tuple(student.shape)} (a student "
                         "of another width needs a learned projection to the teacher's width first)")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher dtype {teacher.dtype} != student dtype {student.dtype} (cast one of them, e.g. "
                        "teacher.to(student.dtype))")
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
    check_hidden_loss_options(loss, reduction)
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool or integer torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"mask must have dtype torch.bool or an integer dtype (0 = skipped), got {mask.dtype}")
    if mask.shape != student.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(student.shape[:-1])} (student's shape without the hidden "
                         f"axis), got {tuple(mask.shape)}")
    if mask.device != student.device:
        raise ValueError(f"mask is on {mask.device} but student is on {student.device}")


def _counted(mask: Optional[Tensor]) -> Optional[Tensor]:
    """bool ``[...]``: the tokens that count (None: all)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask != 0


# ----------------------------------------------------------------------------------------------
# backends of the fused forward (+gradient) kernel:
#   fn(student [N, D], teacher [N, D], weight [N] fp32, loss_code, need_grad) -> (loss [N] fp32, grad [N, D])
# rows with unit stride along D (any row stride); loss_i = w_i * l_i, grad_i = w_i * dl_i/ds_i; rows with
# w_i == 0 are skipped (loss 0, gradient row 0).
# ----------------------------------------------------------------------------------------------

_backends = op_backends("hidden_state_loss")


@_backends.register("cpp", ("cpu",), unavailable=lambda d: native_unavailable(_NATIVE, d))
def _fwd_cpp(s: Tensor, t: Tensor, w: Tensor, code: int, need_grad: bool):
    return torch.ops.minitron._hidden_state_loss_fwd_native(s, t, w, code, need_grad)


@_backends.register("cuda", ("cuda",), unavailable=lambda d: native_unavailable(_NATIVE, d))
def _fwd_cuda(s: Tensor, t: Tensor, w: Tensor, code: int, need_grad: bool):
    return torch.ops.minitron._hidden_state_loss_fwd_native(s, t, w, code, need_grad)


@_backends.register("triton", ("cuda", "cpu"), unavailable=triton_unavailable)
def _fwd_triton(s: Tensor, t: Tensor, w: Tensor, code: int, need_grad: bool):
    from minitron.kernels.hidden_loss import hidden_state_loss_fwd as triton_fwd

    return triton_fwd(s, t, w, code, need_grad=need_grad)


@_backends.register("reference", ("cpu", "cuda"), dtypes=_KERNEL_DTYPES + (torch.float64,))
def _fwd_reference(s: Tensor, t: Tensor, w: Tensor, code: int, need_grad: bool):
    """Torch version of the fused kernel: closed-form gradient (no autograd inside a custom op)."""
    dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    sd, td = s.to(dtype), t.to(dtype)
    wd = w.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=s.device)
    counted = wd != 0
    if code == LOSS_CODES["mse"]:
        diff = sd - td
        per = diff.square().mean(-1)
        g = diff * (2.0 / s.shape[-1])
    else:
        ss, tt, dot = sd.square().sum(-1), td.square().sum(-1), (sd * td).sum(-1)
        regular = (ss != 0) & (tt != 0)
        one = torch.ones_like(ss)
        ns, nt = torch.where(regular, ss, one).sqrt(), torch.where(regular, tt, one).sqrt()
        cos = dot / (ns * nt)
        # 1 - cos as |s/|s| - t/|t||^2 / 2 (no cancellation; as the kernels compute it), special rows as defined
        dist = (sd / ns.unsqueeze(-1) - td / nt.unsqueeze(-1)).square().sum(-1).mul(0.5).clamp(max=2.0)
        per = torch.where(regular, dist, _per_token_reference(sd, td, "cosine"))
        g = (cos / torch.where(regular, ss, one)).unsqueeze(-1) * sd - (1.0 / (ns * nt)).unsqueeze(-1) * td
        g = torch.where(regular.unsqueeze(-1), g, zero)
        bad = ~(torch.isfinite(dot) & torch.isfinite(ss) & torch.isfinite(tt))
        g = torch.where(bad.unsqueeze(-1), torch.full_like(g, float("nan")), g)
    loss = torch.where(counted, wd * per, zero).to(torch.float32)
    if not need_grad:
        return loss, s.new_empty((0, s.shape[-1]))
    grad = torch.where(counted.unsqueeze(-1), g * wd.unsqueeze(-1), zero)
    return loss, grad.to(s.dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# custom op: loss per token and its gradient, in one launch
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("minitron::hidden_state_loss_fwd", mutates_args=())
def hidden_state_loss_fwd(student: Tensor, teacher: Tensor, weight: Tensor, loss: int, backend: str,
                          need_grad: bool = True) -> tuple[Tensor, Tensor]:
    """Weighted per-token hidden-state loss and its gradient w.r.t. ``student``.

    Args:
        student, teacher: ``[N, D]`` (fp32/bf16/fp16, one dtype, unit stride along D, any row stride).
        weight: ``[N]`` fp32 per-token coefficient; tokens with weight 0 are skipped (loss 0, gradient 0).
        loss: 0 cosine (``1 - cos``), 1 MSE (mean over D). backend: see :func:`hidden_state_loss`.
        need_grad: False computes the loss only (no ``[N, D]`` output).
    Returns:
        ``loss [N]`` fp32 = weight * l and ``grad [N, D]`` (student dtype) = d loss / d student (an empty
        ``[0, D]`` tensor when ``need_grad`` is False).
    """
    impl = _backends.select(backend, student.device, student.dtype)
    n, d = student.shape
    if n == 0:
        return (torch.zeros(0, dtype=torch.float32, device=student.device),
                torch.empty((0, d), dtype=student.dtype, device=student.device))
    return impl.fn(student, teacher, weight, int(loss), bool(need_grad))


@hidden_state_loss_fwd.register_fake
def _(student, teacher, weight, loss, backend, need_grad=True):
    grad_rows = student.shape[0] if need_grad else 0
    return (student.new_empty((student.shape[0],), dtype=torch.float32),
            torch.empty((grad_rows, student.shape[1]), dtype=student.dtype, device=student.device))


register_row_loss_autograd(hidden_state_loss_fwd)


# ----------------------------------------------------------------------------------------------
# functional API and module
# ----------------------------------------------------------------------------------------------


def hidden_state_loss(student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None, *, loss: str = "cosine",
                      reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Fused hidden-state distillation loss (cosine or MSE) with its gradient made in the same pass.

    Args:
        student: ``[..., D]`` fp32/bf16/fp16 (any leading shape; non-contiguous allowed), usually the output of a
            learned projection of the student's hidden states to the teacher's width. The only differentiable
            input.
        teacher: ``[...,  D]``, same shape, dtype and device. A constant: no gradient flows to it.
        mask: None (every token counts) or ``[...]`` bool/integer; False/0 marks a skipped token (it contributes
            neither loss nor count).
        loss: ``"cosine"`` (per token ``1 - cos(s, t)``; zero vectors: both zero -> 0, one zero -> 1, gradient 0)
            or ``"mse"`` (per token ``mean over D of (s - t)^2``).
        reduction: ``"mean"`` over the counted tokens (0 when none counts), ``"sum"``, or ``"none"`` (fp32
            per-token ``[...]``, 0 where masked).
        backend: ``"auto"`` (CPU -> C++, CUDA -> CUDA C++ or Triton), or ``"cpp"``, ``"cuda"``, ``"triton"``,
            ``"reference"``.

    Returns:
        fp32 scalar (``mean``/``sum``) or fp32 ``[...]`` (``none``). The student's gradient has its dtype.

    Raises:
        TypeError / ValueError naming the argument (before any work) for bad dtypes, shapes, devices, ``loss``
        or ``reduction``; :class:`minitron.ops.BackendUnavailableError` when no backend can run the inputs.
    """
    _validate(student, teacher, mask, loss, reduction)
    lead = student.shape[:-1]
    n = int(math.prod(lead))
    s2 = as_rows(student)
    t2 = as_rows(teacher.detach())
    weight = token_weights(_counted(mask), n, student.device, reduction)
    loss_tok, _ = torch.ops.minitron.hidden_state_loss_fwd(s2, t2, weight, LOSS_CODES[loss], backend,
                                                           needs_grad(student))
    return reduce_token_loss(loss_tok, lead, reduction)


class HiddenStateLoss(nn.Module):
    """``nn.Module`` form of :func:`hidden_state_loss`; ``forward(student, teacher, mask=None)``."""

    def __init__(self, *, loss: str = "cosine", reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        check_hidden_loss_options(loss, reduction)
        self.loss, self.reduction, self.backend = loss, reduction, backend

    def forward(self, student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return hidden_state_loss(student, teacher, mask, loss=self.loss, reduction=self.reduction,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, reduction={self.reduction!r}, backend={self.backend!r}"
