"""Fused linear + KL: :func:`minitron.ops.kl.kl_div` of ``hidden @ weight.T (+ bias)`` logits, produced chunk by
chunk over tokens so that the ``[tokens x V]`` logits never exist in full.

The op ``torch.ops.minitron.fused_linear_kl_div_fwd`` is the shared fused-linear skeleton
(:func:`minitron.ops._common.fused_linear_op`) around a per-chunk loss that runs ``kl_div_fwd`` on the chunk's
(transformed) logits. Definitions, modes and logit transforms: :mod:`minitron.ops.kl`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from minitron.ops._common import FusedLinearSpec, check_chunk_size, check_lm_head, check_vocab_size, vocab_view
from minitron.ops._common import default_chunk_size, fused_linear_chunks, fused_linear_op, needs_grad
from minitron.ops._common import reduce_token_loss, token_weights
from minitron.ops.kl import _KERNEL_DTYPES, MODES, _has_transform, _mask_from_labels, _validate_mask
from minitron.ops.kl import _validate_transforms, check_kl_options, kl_div_reference

__all__ = ["fused_linear_kl_div", "fused_linear_kl_div_reference", "FusedLinearKLDivLoss"]

FUSED_LINEAR_KL = FusedLinearSpec(name="minitron::fused_linear_kl_div_fwd", public="fused_linear_kl_div")


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


@fused_linear_op(FUSED_LINEAR_KL)
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
    any_tf = _has_transform(student_logit_scale, student_softcap) or _has_transform(teacher_logit_scale,
                                                                                     teacher_softcap)

    def chunk_loss(s_logits: Tensor, rows: dict[str, Optional[Tensor]]) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            t_logits = rows["teacher_hidden"] @ teacher_weight.t()
            if teacher_bias is not None:
                t_logits += teacher_bias
        dz = None  # d transformed / d raw student logit (None: 1)
        if any_tf:  # transformed logits in fp32; the chain rule factor of the student's transform kept in dz
            s_logits, dz = _transform_with_derivative(s_logits, student_logit_scale, student_softcap)
            t_logits, _ = _transform_with_derivative(t_logits, teacher_logit_scale, teacher_softcap)
        loss_c, g = torch.ops.minitron.kl_div_fwd(s_logits, t_logits, rows["weight"].contiguous(), mode,
                                                  temperature, beta, scale, backend, need_grad)
        del s_logits, t_logits
        if need_grad and any_tf:
            if dz is not None:
                g.mul_(dz)
            g = g.to(student_hidden.dtype)
        return loss_c, g

    return fused_linear_chunks(student_hidden, student_weight, student_bias, weight != 0,
                               {"teacher_hidden": teacher_hidden, "weight": weight}, chunk_size, need_grad,
                               chunk_loss)


def _validate_fused_args(sh, sw, th, tw, sb, tb, mode, temperature, beta, reduction, mask, chunk_size,
                         vocab_size=None) -> None:
    check_lm_head("student", sh, sw, sb, _KERNEL_DTYPES, hidden_name="H_student")
    check_lm_head("teacher", th, tw, tb, _KERNEL_DTYPES, hidden_name="H_teacher")
    if vocab_size is not None:
        check_vocab_size(vocab_size, {"student_weight": sw.shape[0], "teacher_weight": tw.shape[0]})
    elif sw.shape[0] != tw.shape[0]:
        raise ValueError(f"vocabulary size mismatch: student_weight has {sw.shape[0]} rows, teacher_weight has "
                         f"{tw.shape[0]} (pass vocab_size=<the real vocabulary> when one head is padded)")
    if sh.shape[:-1] != th.shape[:-1]:
        raise ValueError(f"student_hidden tokens {tuple(sh.shape[:-1])} != teacher_hidden tokens "
                         f"{tuple(th.shape[:-1])}")
    if sh.dtype != th.dtype:
        raise TypeError(f"student and teacher tensors must share a dtype, got {sh.dtype} and {th.dtype}")
    devices = {t.device for t in (sh, sw, th, tw, sb, tb) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if sw.shape[0] == 0:
        raise ValueError("student_weight has an empty vocabulary dimension (V = 0)")
    check_chunk_size(chunk_size)
    check_kl_options(mode, temperature, beta, reduction)
    _validate_mask(mask, sh.shape[:-1], sh.device, "student_hidden's shape without the hidden axis")


def fused_linear_kl_div(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                        teacher_weight: Tensor, *, student_bias: Optional[Tensor] = None,
                        teacher_bias: Optional[Tensor] = None, mode: str = "forward", temperature: float = 1.0,
                        beta: float = 0.5, reduction: str = "mean", mask: Optional[Tensor] = None,
                        chunk_size: Optional[int] = None, scale_by_t2: bool = True, backend: str = "auto",
                        student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                        student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                        labels: Optional[Tensor] = None, ignore_index: int = -100,
                        vocab_size: Optional[int] = None) -> Tensor:
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
        vocab_size: the real vocabulary when an LM head is padded: rows ``>= vocab_size`` of either weight (and
            bias) are padding, their logits count as ``-inf`` (they are never computed) and the student's get a
            zero gradient; the two heads may then have different row counts (both ``>= vocab_size``). None
            (default): equal row counts required. See :func:`kl_div`.
        Other arguments as :func:`kl_div`.

    Returns:
        fp32 scalar, or fp32 ``[...]`` for ``reduction="none"``. Gradients flow to the student hidden
        states, weight and bias; they are computed during the forward pass and only scaled in backward.
        With ``reduction="none"`` the upstream gradient must be uniform across tokens (e.g. ``.sum()`` or
        ``.mean()`` of the result); a non-uniform one raises in backward.
    """
    _validate_fused_args(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                         mode, temperature, beta, reduction, mask, chunk_size, vocab_size)
    _validate_transforms(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
    # padded head rows (>= vocab_size) dropped: contiguous row views; autograd gives them a zero gradient
    student_weight = vocab_view(student_weight, vocab_size, 0)
    teacher_weight = vocab_view(teacher_weight, vocab_size, 0)
    student_bias, teacher_bias = vocab_view(student_bias, vocab_size, 0), vocab_view(teacher_bias, vocab_size, 0)
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
    need_grad = needs_grad(student_hidden, student_weight, student_bias)
    loss_tok, _, _, _ = torch.ops.minitron.fused_linear_kl_div_fwd(
        sh, student_weight, th, teacher_weight.detach(), student_bias, tb, weight, MODES[mode], float(temperature),
        float(beta), scale, int(chunk_size), backend, need_grad, float(student_logit_scale),
        float(teacher_logit_scale), None if student_softcap is None else float(student_softcap),
        None if teacher_softcap is None else float(teacher_softcap))
    return reduce_token_loss(loss_tok, lead, reduction, uniform_grad_op=FUSED_LINEAR_KL.public)


def fused_linear_kl_div_reference(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                                  teacher_weight: Tensor, *, student_bias: Optional[Tensor] = None,
                                  teacher_bias: Optional[Tensor] = None, mode: str = "forward",
                                  temperature: float = 1.0, beta: float = 0.5, reduction: str = "mean",
                                  mask: Optional[Tensor] = None, scale_by_t2: bool = True,
                                  student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                                  student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                                  labels: Optional[Tensor] = None, ignore_index: int = -100,
                                  vocab_size: Optional[int] = None) -> Tensor:
    """Unfused plain-torch version of :func:`fused_linear_kl_div` (materialises both logits)."""
    if vocab_size is not None:
        check_vocab_size(vocab_size, {"student_weight": student_weight.shape[0],
                                      "teacher_weight": teacher_weight.shape[0]})
    student_weight = vocab_view(student_weight, vocab_size, 0)
    teacher_weight = vocab_view(teacher_weight, vocab_size, 0)
    student_bias, teacher_bias = vocab_view(student_bias, vocab_size, 0), vocab_view(teacher_bias, vocab_size, 0)
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
                 ignore_index: int = -100, vocab_size: Optional[int] = None) -> None:
        super().__init__()
        check_kl_options(mode, temperature, beta, reduction)
        check_vocab_size(vocab_size, {})
        self.vocab_size = vocab_size
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
                                   labels=labels, ignore_index=self.ignore_index, vocab_size=self.vocab_size,
                                   **self.transforms)
