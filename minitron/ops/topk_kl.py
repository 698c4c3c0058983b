"""Sparse (top-k teacher) KL distillation losses: the teacher is given only at ``k`` vocabulary entries.

Per token (``T`` = ``temperature``; the student is full-vocabulary)::

    log q_j = z_j / T - logsumexp(z / T)            # student log-probabilities over all V entries
    i_1..i_k  teacher_indices (distinct),  lp_k = teacher_logprobs,  p_k = exp(lp_k)

    tail=True  (default): the mass the teacher did not store is one extra bucket against the student's
               remaining mass:
        p_tail = 1 - sum_k p_k  (clamped at 0; 0 when k == V),   q_tail = sum_{j not in I} q_j
        D = sum_k p_k (lp_k - log q_{i_k}) + p_tail (log p_tail - log q_tail)
    tail=False: the teacher renormalised over its k entries (DistillKit's sparse KL):
        p'_k = p_k / sum_k p_k
        D = sum_k p'_k (log p'_k - log q_{i_k})

Terms with zero probability are 0 (``0 log 0 = 0``; ``-inf`` teacher log-probabilities are legal). ``q_tail``
is summed directly over the complement of the index set (``log q_tail = logsumexp_{j not in I}(z_j/T) -
logsumexp(z/T)``), never as ``1 - sum_k q_{i_k}``, so it keeps full relative precision when the student puts
almost all its mass on the k entries. ``D`` is ``+inf`` where the math is (the student gives zero probability
to an entry, or to the tail, that the teacher gives mass to).

The gradient with respect to the student logits is ``(1/T) dD/da`` with ``a = z / T``::

    tail=True:  dD/da_l = q_l - p_l (l in I),   q_l (1 - p_tail / q_tail) (l not in I)
    tail=False: dD/da_l = q_l - p'_l (l in I),  q_l (l not in I)

With ``scale_by_t2=True`` (default) the loss is multiplied by ``T**2``, as :func:`minitron.ops.kl.kl_div` does.

``fused_linear_topk_kl_div`` computes the same from hidden states and the LM head without materialising the
``[tokens x V]`` logits, optionally mixed with the LM cross-entropy on ``labels`` (at temperature 1) from the
same logits chunk: ``ce_weight * CE + kl_weight * KL``.

Implementation: every backend computes, in one launch, the per-token loss and its gradient with respect to
the student logits (max pass, exp pass summing the complement of the index set, gradient pass). Backward only
rescales that gradient by the incoming gradient, in place.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from minitron.ops._common import FusedLinearSpec, check_chunk_size, check_lm_head, check_reduction
from minitron.ops._common import check_temperature, default_chunk_size, fused_linear_chunks, fused_linear_op
from minitron.ops._common import needs_grad, reduce_reference, reduce_token_loss, register_row_loss_autograd
from minitron.ops._common import check_vocab_size, token_weights, vocab_view
from minitron.ops._common import as_rows as _as_rows
from minitron.ops._common import check_float_tensor as _check_float_tensor
from minitron.ops._common import eager as _eager
from minitron.ops._dispatch import native_unavailable, op_backends, triton_unavailable

__all__ = [
    "REDUCTIONS",
    "topk_kl_div",
    "topk_kl_div_reference",
    "fused_linear_topk_kl_div",
    "fused_linear_topk_kl_div_reference",
    "TopKKLDivLoss",
    "FusedLinearTopKKLDivLoss",
]

REDUCTIONS = ("mean", "sum", "none")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_NATIVE = "_topk_kl_div_fwd_native"


def _tol(dtype: torch.dtype) -> float:
    """Rounding allowance for stored teacher log-probabilities (positive values, total mass above 1)."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 1e-2


# ----------------------------------------------------------------------------------------------
# torch reference (dense; the test oracle; differentiable, any float dtype incl. float64)
# ----------------------------------------------------------------------------------------------


def _sparse_divergence(lq: Tensor, idx: Tensor, lp: Tensor, tail: bool
                       ) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Per-row ``D`` from the student log-probabilities ``lq [..., V]`` and the teacher's entries ``idx`` (int64)
    / ``lp [..., k]`` (``lq``'s dtype), in plain torch (differentiable). Also returns what the closed-form
    gradient needs: the teacher probabilities at ``idx`` (``p``, or ``p'`` for ``tail=False``) and, for
    ``tail=True``, ``p_tail`` and ``log q_tail`` (else None)."""
    zero = torch.zeros((), dtype=lq.dtype, device=lq.device)
    lqk = lq.gather(-1, idx)
    if tail:
        p = lp.exp()
        terms = torch.where(p > 0, p * (lp - lqk), zero).sum(-1)
        pt = torch.clamp(1.0 - p.sum(-1), min=0.0) * float(idx.shape[-1] < lq.shape[-1])
        lqt = torch.logsumexp(lq.scatter(-1, idx, float("-inf")), dim=-1)
        safe_pt = torch.where(pt > 0, pt, torch.ones_like(pt))
        return terms + torch.where(pt > 0, pt * (safe_pt.log() - lqt), zero), p, pt, lqt
    lpn = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
    pn = lpn.exp()
    return torch.where(pn > 0, pn * (lpn - lqk), zero).sum(-1), pn, None, None


def _divergence_reference(student: Tensor, indices: Tensor, logprobs: Tensor, temperature: float,
                          tail: bool) -> Tensor:
    """Per-row ``D`` for ``student [..., V]``, ``indices``/``logprobs [..., k]`` in plain torch (>= fp32)."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    lq = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
    return _sparse_divergence(lq, indices.long(), logprobs.to(dtype), tail)[0]


def topk_kl_div_reference(student_logits: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor, *,
                          temperature: float = 1.0, mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                          ignore_index: int = -100, reduction: str = "mean", tail: bool = True,
                          scale_by_t2: bool = True, vocab_size: Optional[int] = None) -> Tensor:
    """Plain-torch :func:`topk_kl_div` (same arguments and result, computed densely); the tests' oracle.

    Differentiable w.r.t. ``student_logits`` through autograd; materialises ``[..., V]`` temporaries.
    """
    _validate_topk_args(student_logits, teacher_indices, teacher_logprobs, temperature, reduction, mask, labels,
                        allowed_dtypes=_KERNEL_DTYPES + (torch.float64,), vocab_size=vocab_size)
    student_logits = vocab_view(student_logits, vocab_size)
    per_token = _divergence_reference(student_logits, teacher_indices, teacher_logprobs.detach(), temperature, tail)
    if scale_by_t2:
        per_token = per_token * (temperature * temperature)
    counted = _counted(mask, labels, ignore_index)
    return reduce_reference(per_token, counted, reduction)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _validate_common(temperature: float, reduction: str) -> None:
    check_reduction(reduction, REDUCTIONS)
    check_temperature(temperature)


def _validate_teacher(indices: Tensor, logprobs: Tensor, lead: torch.Size, vocab: int, device: torch.device,
                      lead_what: str, vocab_what: str = "the vocabulary") -> None:
    if not isinstance(indices, Tensor):
        raise TypeError(f"teacher_indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"teacher_indices must be int32 or int64, got {indices.dtype}")
    _check_float_tensor("teacher_logprobs", logprobs, _KERNEL_DTYPES + (torch.float64,))
    if indices.shape != logprobs.shape:
        raise ValueError(f"teacher_indices shape {tuple(indices.shape)} != teacher_logprobs shape "
                         f"{tuple(logprobs.shape)}")
    if indices.dim() < 1 or indices.shape[:-1] != lead:
        raise ValueError(f"teacher_indices/teacher_logprobs must have shape [{', '.join(map(str, lead))}, k] "
                         f"({lead_what}), got {tuple(indices.shape)}")
    k = indices.shape[-1]
    if k < 1:
        raise ValueError("teacher_indices has k = 0 entries per token (need k >= 1)")
    if k > vocab:
        raise ValueError(f"teacher_indices has k = {k} entries per token, larger than {vocab_what} ({vocab})")
    for name, t in (("teacher_indices", indices), ("teacher_logprobs", logprobs)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the student is on {device}")
    if not (_eager(indices) and _eager(logprobs)) or indices.numel() == 0:
        return
    # value checks on the small [N, k] tensors
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"teacher_indices must be in [0, {vocab}) ({vocab_what}), got values in [{lo}, {hi}]")
    if k > 1:
        srt = indices.reshape(-1, k).sort(-1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("teacher_indices must be distinct within each token's k entries (found a repeat)")
    lp = logprobs.detach()
    if bool(torch.isnan(lp).any()):
        raise ValueError("teacher_logprobs contains NaN (expected log-probabilities)")
    tol = _tol(lp.dtype)
    mx = float(lp.max())
    if mx > tol:
        raise ValueError(f"teacher_logprobs must be log-probabilities (<= 0), got a value of {mx:.4g}")
    mass = float(lp.reshape(-1, k).double().exp().sum(-1).max())  # every lp <= tol here: no overflow
    if mass > 1.0 + tol:
        raise ValueError(f"teacher_logprobs are not log-probabilities: one token's k probabilities sum to "
                         f"{mass:.6g} > 1")


def _validate_tokens(mask: Optional[Tensor], labels: Optional[Tensor], lead: torch.Size, device: torch.device,
                     what: str, allow_both: bool = False) -> None:
    if mask is not None and labels is not None and not allow_both:
        raise ValueError("pass either mask or labels (with ignore_index) to select the counted tokens, not both")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != lead:
            raise ValueError(f"mask must have shape {tuple(lead)} ({what}), got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but the student is on {device}")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype not in _INDEX_DTYPES:
            raise TypeError(f"labels must be an int32/int64 tensor, got {getattr(labels, 'dtype', type(labels))}")
        if labels.shape != lead:
            raise ValueError(f"labels must have shape {tuple(lead)} ({what}), got {tuple(labels.shape)}")
        if labels.device != device:
            raise ValueError(f"labels is on {labels.device} but the student is on {device}")


def _validate_topk_args(student: Tensor, indices: Tensor, logprobs: Tensor, temperature: float, reduction: str,
                        mask: Optional[Tensor], labels: Optional[Tensor],
                        allowed_dtypes: tuple[torch.dtype, ...] = _KERNEL_DTYPES,
                        vocab_size: Optional[int] = None) -> None:
    _check_float_tensor("student_logits", student, allowed_dtypes)
    if student.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the vocabulary)")
    if student.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")
    check_vocab_size(vocab_size, {"student_logits": student.shape[-1]})
    _validate_common(temperature, reduction)
    lead = student.shape[:-1]
    what = "student_logits' shape without the vocabulary axis"
    vocab, vocab_what = _vocab_limit(student.shape[-1], vocab_size)
    _validate_teacher(indices, logprobs, lead, vocab, student.device, what, vocab_what)
    _validate_tokens(mask, labels, lead, student.device, what)


def _vocab_limit(width: int, vocab_size: Optional[int]) -> tuple[int, str]:
    """The exclusive upper bound of valid teacher indices / labels and how errors name it."""
    if vocab_size is None:
        return width, "the vocabulary"
    return vocab_size, "vocab_size, the real vocabulary: columns >= vocab_size are padding"


def _counted(mask: Optional[Tensor], labels: Optional[Tensor], ignore_index: int) -> Optional[Tensor]:
    """bool ``[...]`` of the tokens that count (None: all)."""
    c = mask
    if labels is not None:
        lc = labels != ignore_index
        c = lc if c is None else (c & lc)
    return c


# ----------------------------------------------------------------------------------------------
# backends of the fused forward (+gradient) kernel. Every backend gets the indices sorted ascending per
# row (int64, contiguous) and the log-probabilities permuted alike (fp32, contiguous).
# ----------------------------------------------------------------------------------------------

_backends = op_backends("topk_kl_div")


@_backends.register("cpp", ("cpu",), unavailable=lambda d: native_unavailable(_NATIVE, d))
def _fwd_cpp(s: Tensor, idx: Tensor, lp: Tensor, w: Tensor, labels: Tensor, cw: Tensor, inv_t: float, tail: bool,
             need_grad: bool = True):
    return torch.ops.minitron._topk_kl_div_fwd_native(s, idx, lp, w, labels, cw, inv_t, tail, need_grad)


@_backends.register("cuda", ("cuda",), unavailable=lambda d: native_unavailable(_NATIVE, d))
def _fwd_cuda(s: Tensor, idx: Tensor, lp: Tensor, w: Tensor, labels: Tensor, cw: Tensor, inv_t: float, tail: bool,
              need_grad: bool = True):
    return torch.ops.minitron._topk_kl_div_fwd_native(s, idx, lp, w, labels, cw, inv_t, tail, need_grad)


@_backends.register("triton", ("cuda", "cpu"), unavailable=triton_unavailable)
def _fwd_triton(s: Tensor, idx: Tensor, lp: Tensor, w: Tensor, labels: Tensor, cw: Tensor, inv_t: float,
                tail: bool, need_grad: bool = True):
    from minitron.kernels.topk_kl import topk_kl_div_fwd as triton_fwd

    return triton_fwd(s, idx, lp, w, labels, cw, inv_t, tail, need_grad=need_grad)


@_backends.register("reference", ("cpu", "cuda"), dtypes=_KERNEL_DTYPES + (torch.float64,))
def _fwd_reference(s: Tensor, idx: Tensor, lp: Tensor, w: Tensor, labels: Tensor, cw: Tensor, inv_t: float,
                   tail: bool, need_grad: bool = True):
    """Torch version of the fused kernel: dense, closed-form gradients (no autograd inside a custom op)."""
    dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    z = s.to(dtype)
    lq = torch.log_softmax(z * inv_t, dim=-1)
    q = lq.exp()
    zero = torch.zeros((), dtype=dtype, device=s.device)
    d, p, pt, lqt = _sparse_divergence(lq, idx, lp.to(dtype), tail)
    # dD/da: q - p at the teacher's entries; q (1 - p_tail / q_tail) (tail) or q elsewhere
    if tail:
        q_off = q - torch.where((pt > 0).unsqueeze(-1), pt.unsqueeze(-1) * torch.exp(lq - lqt.unsqueeze(-1)), zero)
    else:
        q_off = q
    g = q_off.scatter(-1, idx, q.gather(-1, idx) - p)
    wd = w.to(dtype)
    loss = torch.where(wd != 0, wd * d, zero)
    grad = g * (wd * inv_t).unsqueeze(-1)
    if labels.numel() > 0:
        cwd = cw.to(dtype)
        lab = labels.clamp(0, s.shape[-1] - 1).unsqueeze(-1)
        lse1 = torch.logsumexp(z, dim=-1)
        ce = lse1 - z.gather(-1, lab).squeeze(-1)
        loss = loss + torch.where(cwd != 0, cwd * ce, zero)
        gce = torch.softmax(z, dim=-1)
        gce = gce.scatter(-1, lab, gce.gather(-1, lab) - 1.0)
        grad = grad + gce * cwd.unsqueeze(-1)
        active = (wd != 0) | (cwd != 0)
    else:
        active = wd != 0
    grad = torch.where(active.unsqueeze(-1), grad, zero)
    if not need_grad:
        return loss.to(torch.float32), s.new_empty((0, s.shape[-1]))
    return loss.to(torch.float32), grad.to(s.dtype).contiguous()


def _sorted_teacher(indices: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Indices sorted ascending per row (int64) and the log-probabilities permuted alike (fp32), contiguous."""
    idx, perm = indices.to(torch.int64).sort(dim=-1)
    lp = logprobs.to(torch.float32).gather(-1, perm)
    return idx.contiguous(), lp.contiguous()


def _run(s: Tensor, idx: Tensor, lp: Tensor, w: Tensor, labels: Tensor, cw: Tensor, temperature: float, tail: bool,
         backend: str, need_grad: bool) -> tuple[Tensor, Tensor]:
    """Select the backend and run it on sorted teacher entries."""
    impl = _backends.select(backend, s.device, s.dtype, vocab=s.shape[-1])
    if s.shape[0] == 0:
        return (torch.zeros(0, dtype=torch.float32, device=s.device),
                torch.empty((s.shape[0] if need_grad else 0, s.shape[1]), dtype=s.dtype, device=s.device))
    return impl.fn(s, idx, lp, w, labels, cw, 1.0 / temperature, tail, need_grad)


# ----------------------------------------------------------------------------------------------
# custom op: loss per token and its gradient, in one launch
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("minitron::topk_kl_div_fwd", mutates_args=())
def topk_kl_div_fwd(student: Tensor, indices: Tensor, teacher_logprobs: Tensor, weight: Tensor, labels: Tensor,
                    ce_weight: Tensor, temperature: float, tail: bool, backend: str,
                    need_grad: bool = True) -> tuple[Tensor, Tensor]:
    """Weighted per-token sparse KL (plus optional CE) and its gradient w.r.t. ``student``.

    Args:
        student: ``[N, V]`` logits (fp32/bf16/fp16, unit stride along V).
        indices: ``[N, k]`` int32/int64, distinct per row, any order. teacher_logprobs: ``[N, k]`` float.
        weight: ``[N]`` fp32 KL coefficient per token (0: no KL for that token).
        labels: ``[N]`` int64 CE targets (valid indices) or an empty tensor (no CE); ce_weight: ``[N]`` fp32
            CE coefficient (or empty). Tokens with both coefficients 0 are skipped (loss 0, gradient 0).
        temperature: > 0 (the KL's; the CE is at temperature 1). tail: see the module docstring.
        need_grad: False computes the loss only (no gradient pass, no [N, V] output).
    Returns:
        ``loss [N]`` fp32 = weight * D + ce_weight * CE and ``grad [N, V]`` (student dtype) = d loss / d student
        (an empty ``[0, V]`` tensor when ``need_grad`` is False).
    """
    idx, lp = _sorted_teacher(indices, teacher_logprobs)
    return _run(student, idx, lp, weight, labels, ce_weight, temperature, tail, backend, need_grad)


@topk_kl_div_fwd.register_fake
def _(student, indices, teacher_logprobs, weight, labels, ce_weight, temperature, tail, backend, need_grad=True):
    grad_rows = student.shape[0] if need_grad else 0
    return (student.new_empty((student.shape[0],), dtype=torch.float32),
            torch.empty((grad_rows, student.shape[1]), dtype=student.dtype, device=student.device))


register_row_loss_autograd(topk_kl_div_fwd)


# ----------------------------------------------------------------------------------------------
# functional API
# ----------------------------------------------------------------------------------------------


def topk_kl_div(student_logits: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor, *,
                temperature: float = 1.0, mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                ignore_index: int = -100, reduction: str = "mean", tail: bool = True, scale_by_t2: bool = True,
                backend: str = "auto", vocab_size: Optional[int] = None) -> Tensor:
    """Forward KL from a sparse (top-k) teacher to the full-vocabulary student.

    Args:
        student_logits: ``[..., V]`` fp32/bf16/fp16 (non-contiguous allowed). The only differentiable input.
        teacher_indices: ``[..., k]`` int32/int64, distinct within a token, any order, in ``[0, V)``.
        teacher_logprobs: ``[..., k]`` float: the teacher's log-probabilities at those indices (at the
            temperature the store recorded). Constant.
        temperature: divides the student logits; finite and > 0.
        mask: bool ``[...]``, True for tokens that count; or ``labels`` ``[...]`` int with ``ignore_index``
            marking tokens that do not count (not both).
        reduction: ``"mean"`` over counted tokens, ``"sum"``, or ``"none"`` (per-token ``[...]``, 0 where not
            counted).
        tail: True: the teacher's missing mass is one bucket against the student's; False: the teacher is
            renormalised over its k entries (see the module docstring for both formulas).
        scale_by_t2: multiply the loss by ``temperature**2``.
        backend: ``"auto"`` (CPU -> C++, CUDA -> CUDA C++ or Triton), ``"cpp"``, ``"cuda"``, ``"triton"``,
            ``"reference"``.
        vocab_size: the real vocabulary when the student's logits are padded: columns ``>= vocab_size`` count as
            ``-inf`` (no probability mass, zero gradient) and ``teacher_indices`` must lie in ``[0, vocab_size)``
            (``ValueError`` otherwise). None (default): every column counts.

    Returns:
        fp32 scalar (``mean``/``sum``) or fp32 ``[...]`` (``none``). The gradient has the input dtype.

    Raises:
        TypeError / ValueError naming the argument for bad dtypes, shapes, out-of-range or repeated indices,
        values that are not log-probabilities (checked in eager mode only).
    """
    _validate_topk_args(student_logits, teacher_indices, teacher_logprobs, temperature, reduction, mask, labels,
                        vocab_size=vocab_size)
    lead = student_logits.shape[:-1]
    k = teacher_indices.shape[-1]
    s2 = _as_rows(vocab_view(student_logits, vocab_size))  # a row-strided view without the padding
    n = s2.shape[0]
    weight = token_weights(_counted(mask, labels, ignore_index), n, s2.device, reduction)
    if scale_by_t2:
        weight = weight * float(temperature) ** 2
    need_grad = needs_grad(student_logits)
    empty_l = torch.empty(0, dtype=torch.int64, device=s2.device)
    empty_w = torch.empty(0, dtype=torch.float32, device=s2.device)
    loss_tok, _ = torch.ops.minitron.topk_kl_div_fwd(s2, teacher_indices.reshape(n, k),
                                                     teacher_logprobs.detach().reshape(n, k), weight, empty_l,
                                                     empty_w, float(temperature), bool(tail), backend, need_grad)
    return reduce_token_loss(loss_tok, lead, reduction)


class TopKKLDivLoss(nn.Module):
    """``nn.Module`` form of :func:`topk_kl_div`;
    ``forward(student_logits, teacher_indices, teacher_logprobs, mask=None, labels=None)``."""

    def __init__(self, *, temperature: float = 1.0, reduction: str = "mean", tail: bool = True,
                 ignore_index: int = -100, scale_by_t2: bool = True, backend: str = "auto",
                 vocab_size: Optional[int] = None) -> None:
        super().__init__()
        _validate_common(temperature, reduction)
        check_vocab_size(vocab_size, {})
        self.temperature, self.reduction, self.tail = float(temperature), reduction, bool(tail)
        self.ignore_index, self.scale_by_t2, self.backend = ignore_index, scale_by_t2, backend
        self.vocab_size = vocab_size

    def forward(self, student_logits: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor,
                mask: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> Tensor:
        return topk_kl_div(student_logits, teacher_indices, teacher_logprobs, temperature=self.temperature,
                           mask=mask, labels=labels, ignore_index=self.ignore_index, reduction=self.reduction,
                           tail=self.tail, scale_by_t2=self.scale_by_t2, backend=self.backend,
                           vocab_size=self.vocab_size)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, tail={self.tail}, "
                f"backend={self.backend!r}")


# ----------------------------------------------------------------------------------------------
# fused linear + sparse KL (+ CE): logits are produced chunk by chunk and never exist in full
# ----------------------------------------------------------------------------------------------



FUSED_LINEAR_TOPK_KL = FusedLinearSpec(name="minitron::fused_linear_topk_kl_div_fwd",
                                       public="fused_linear_topk_kl_div")


@fused_linear_op(FUSED_LINEAR_TOPK_KL)
def fused_linear_topk_kl_div_fwd(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                                 indices: Tensor, teacher_logprobs: Tensor, weight: Tensor, labels: Tensor,
                                 ce_weight: Tensor, temperature: float, tail: bool, chunk_size: int, backend: str,
                                 need_grad: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token weighted loss (``weight * D + ce_weight * CE``) of ``hidden @ weight.T (+ bias)`` and the
    gradients w.r.t. hidden ``[N, H]``, weight ``[V, H]`` and bias ``[V]`` (empty when there is no bias),
    computed chunk by chunk over tokens. ``need_grad=False``: loss only (the gradients are empty tensors)."""
    idx, lp = _sorted_teacher(indices, teacher_logprobs)
    has_ce = labels.numel() > 0
    active = (weight != 0) | (ce_weight != 0) if has_ce else (weight != 0)

    def chunk_loss(logits: Tensor, rows: dict[str, Optional[Tensor]]) -> tuple[Tensor, Tensor]:
        lab, cw = (rows["labels"], rows["ce_weight"]) if has_ce else (labels, ce_weight)
        return _run(logits, rows["indices"], rows["logprobs"], rows["weight"].contiguous(), lab.contiguous(),
                    cw.contiguous(), temperature, tail, backend, need_grad)

    per_row = {"indices": idx, "logprobs": lp, "weight": weight,
               "labels": labels if has_ce else None, "ce_weight": ce_weight if has_ce else None}
    # fp32_out_gemm=False: 16-bit weight gradients through a product in the input dtype, as before
    return fused_linear_chunks(student_hidden, student_weight, student_bias, active, per_row, chunk_size, need_grad,
                               chunk_loss, fp32_out_gemm=False)


def _validate_fused_args(sh, sw, sb, indices, logprobs, temperature, reduction, mask, labels, chunk_size,
                         ce_weight, kl_weight, ignore_index=-100, vocab_size=None) -> None:
    check_lm_head("student", sh, sw, sb, _KERNEL_DTYPES)
    check_vocab_size(vocab_size, {"student_weight": sw.shape[0]})
    devices = {t.device for t in (sh, sw, sb) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"student_hidden, student_weight and student_bias must be on one device, got "
                         f"{sorted(map(str, devices))}")
    if sw.shape[0] == 0:
        raise ValueError("student_weight has an empty vocabulary dimension (V = 0)")
    check_chunk_size(chunk_size)
    for name, x in (("ce_weight", ce_weight), ("kl_weight", kl_weight)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"{name} must be a finite float >= 0, got {x!r}")
    if ce_weight > 0 and labels is None:
        raise ValueError("ce_weight > 0 needs labels (the next-token ids for the cross-entropy term)")
    _validate_common(temperature, reduction)
    lead = sh.shape[:-1]
    what = "student_hidden's shape without the hidden axis"
    vocab, vocab_what = _vocab_limit(sw.shape[0], vocab_size)
    _validate_teacher(indices, logprobs, lead, vocab, sh.device, what, vocab_what)
    _validate_tokens(mask, labels, lead, sh.device, what, allow_both=True)
    if labels is not None and _eager(labels) and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, {vocab}) ({vocab_what}) or the ignore_index")


def fused_linear_topk_kl_div(student_hidden: Tensor, student_weight: Tensor, teacher_indices: Tensor,
                             teacher_logprobs: Tensor, *, student_bias: Optional[Tensor] = None,
                             labels: Optional[Tensor] = None, ignore_index: int = -100, ce_weight: float = 0.0,
                             kl_weight: float = 1.0, temperature: float = 1.0, mask: Optional[Tensor] = None,
                             reduction: str = "mean", tail: bool = True, chunk_size: Optional[int] = None,
                             scale_by_t2: bool = True, backend: str = "auto",
                             vocab_size: Optional[int] = None) -> Tensor:
    """``ce_weight * CE + kl_weight * topk_kl_div`` of the logits ``hidden @ weight.T (+ bias)``, without
    materialising them.

    Args:
        student_hidden: ``[..., H]``; student_weight: ``[V, H]``; student_bias: ``[V]`` or None (fp32/bf16/fp16,
            one dtype).
        teacher_indices, teacher_logprobs: ``[..., k]`` as in :func:`topk_kl_div`.
        labels: ``[...]`` int next-token ids for the cross-entropy term (at temperature 1; tokens equal to
            ``ignore_index`` count for neither term). Needed when ``ce_weight > 0``.
        mask: bool ``[...]``; counted tokens are those of ``mask`` (when given) whose label is not
            ``ignore_index`` (when labels are given). Both terms are averaged over the same tokens for
            ``reduction="mean"``.
        ce_weight, kl_weight: the mix; ``scale_by_t2`` multiplies only the KL term by ``temperature**2``.
        chunk_size: tokens per chunk (default: about ``N / ceil(V / H)`` or what fits a 384 MiB (CPU) /
            1.5 GiB (CUDA) budget of chunk logits + gradient, at most N).
        vocab_size: the real vocabulary when the LM head is padded: rows ``>= vocab_size`` of ``student_weight`` /
            ``student_bias`` are padding (their logits count as ``-inf``, are never computed, and get a zero
            gradient); teacher indices and labels must lie in ``[0, vocab_size)``.
        Other arguments as :func:`topk_kl_div`.

    Returns:
        fp32 scalar, or fp32 ``[...]`` for ``reduction="none"``. Gradients w.r.t. hidden, weight and bias are
        computed in the forward pass (backward only scales them); with ``reduction="none"`` the upstream gradient
        must be uniform across tokens. Extra memory: the fp32 weight gradient, O(N k) and one chunk of logits.
    """
    _validate_fused_args(student_hidden, student_weight, student_bias, teacher_indices, teacher_logprobs,
                         temperature, reduction, mask, labels, chunk_size, ce_weight, kl_weight, ignore_index,
                         vocab_size)
    student_weight, student_bias = vocab_view(student_weight, vocab_size, 0), vocab_view(student_bias, vocab_size, 0)
    lead = student_hidden.shape[:-1]
    k = teacher_indices.shape[-1]
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    n = sh.shape[0]
    w = token_weights(_counted(mask, labels, ignore_index), n, sh.device, reduction)
    scale = float(temperature) ** 2 if scale_by_t2 else 1.0
    kl_w = w * (float(kl_weight) * scale)
    if labels is not None and ce_weight > 0:
        lab = labels.reshape(n).to(torch.int64)
        lab = torch.where(lab == ignore_index, torch.zeros_like(lab), lab).contiguous()
        cw = (w * float(ce_weight)).contiguous()
    else:
        lab = torch.empty(0, dtype=torch.int64, device=sh.device)
        cw = torch.empty(0, dtype=torch.float32, device=sh.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(n, student_weight.shape[0], sh.shape[1], sh.device.type, 2)
    need_grad = needs_grad(student_hidden, student_weight, student_bias)
    loss_tok, _, _, _ = torch.ops.minitron.fused_linear_topk_kl_div_fwd(
        sh, student_weight, student_bias, teacher_indices.reshape(n, k), teacher_logprobs.detach().reshape(n, k),
        kl_w, lab, cw, float(temperature), bool(tail), int(chunk_size), backend, need_grad)
    return reduce_token_loss(loss_tok, lead, reduction, uniform_grad_op=FUSED_LINEAR_TOPK_KL.public)


def fused_linear_topk_kl_div_reference(student_hidden: Tensor, student_weight: Tensor, teacher_indices: Tensor,
                                       teacher_logprobs: Tensor, *, student_bias: Optional[Tensor] = None,
                                       labels: Optional[Tensor] = None, ignore_index: int = -100,
                                       ce_weight: float = 0.0, kl_weight: float = 1.0, temperature: float = 1.0,
                                       mask: Optional[Tensor] = None, reduction: str = "mean", tail: bool = True,
                                       scale_by_t2: bool = True, vocab_size: Optional[int] = None) -> Tensor:
    """Unfused plain-torch :func:`fused_linear_topk_kl_div` (materialises the logits; differentiable)."""
    check_vocab_size(vocab_size, {"student_weight": student_weight.shape[0]})
    student_weight, student_bias = vocab_view(student_weight, vocab_size, 0), vocab_view(student_bias, vocab_size, 0)
    logits = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    counted = _counted(mask, labels, ignore_index)
    d = _divergence_reference(logits, teacher_indices, teacher_logprobs.detach(), temperature, tail)
    per_token = d * (float(kl_weight) * (temperature * temperature if scale_by_t2 else 1.0))
    if labels is not None and ce_weight > 0:
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lab = torch.where(labels == ignore_index, torch.zeros_like(labels), labels).long()
        lz = torch.log_softmax(logits.to(dtype), dim=-1)
        ce = -lz.gather(-1, lab.unsqueeze(-1)).squeeze(-1)
        per_token = per_token + float(ce_weight) * ce
    return reduce_reference(per_token, counted, reduction)


class FusedLinearTopKKLDivLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_topk_kl_div`; ``forward(student_hidden, student_weight,
    teacher_indices, teacher_logprobs, student_bias=None, labels=None, mask=None)``."""

    def __init__(self, *, temperature: float = 1.0, reduction: str = "mean", tail: bool = True,
                 ce_weight: float = 0.0, kl_weight: float = 1.0, ignore_index: int = -100,
                 chunk_size: Optional[int] = None, scale_by_t2: bool = True, backend: str = "auto",
                 vocab_size: Optional[int] = None) -> None:
        super().__init__()
        _validate_common(temperature, reduction)
        check_vocab_size(vocab_size, {})
        self.vocab_size = vocab_size
        self.temperature, self.reduction, self.tail = float(temperature), reduction, bool(tail)
        self.ce_weight, self.kl_weight, self.ignore_index = float(ce_weight), float(kl_weight), ignore_index
        self.chunk_size, self.scale_by_t2, self.backend = chunk_size, scale_by_t2, backend

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_indices: Tensor,
                teacher_logprobs: Tensor, student_bias: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        return fused_linear_topk_kl_div(student_hidden, student_weight, teacher_indices, teacher_logprobs,
                                        student_bias=student_bias, labels=labels, ignore_index=self.ignore_index,
                                        ce_weight=self.ce_weight, kl_weight=self.kl_weight,
                                        temperature=self.temperature, mask=mask, reduction=self.reduction,
                                        tail=self.tail, chunk_size=self.chunk_size, scale_by_t2=self.scale_by_t2,
                                        backend=self.backend, vocab_size=self.vocab_size)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, tail={self.tail}, "
                f"ce_weight={self.ce_weight}, kl_weight={self.kl_weight}, backend={self.backend!r}")
