"""Triton kernel of the fused hidden-state losses (:mod:`minitron.ops.hidden_loss`).

One program handles one row (token) of the ``[N, D]`` student / teacher hidden states; the row is streamed in
``BLOCK_D`` chunks with masks (``D`` need not be a multiple of the block), accumulated in fp32, mirroring
``csrc/common/hidden_loss_math.h``:

* cosine -- pass 1 sums ``s . t``, ``|s|^2``, ``|t|^2``; the row's gradient coefficients follow (zero
  vectors: both zero -> loss 0, one zero -> loss ``w``, gradient 0; a non-finite sum -> NaN); pass 2 writes the
  gradient ``cs * s + ct * t`` in the input dtype and sums ``|s/|s| - t/|t||^2``, whose half is the loss;
* MSE -- one pass: ``|s - t|^2`` is summed while the gradient ``(2 w / D)(s - t)`` is written.

Rows whose weight is 0 get loss 0 and a zero gradient row (their inputs are not read).
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from minitron.kernels._launch import block_v as block_for
from minitron.kernels._launch import launch, num_warps, require_interpreter

log = logging.getLogger(__name__)

__all__ = ["hidden_state_loss_fwd"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _hidden_loss_fwd_kernel(
    s_ptr, t_ptr, w_ptr, loss_ptr, g_ptr,
    D, stride_s, stride_t,
    COSINE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + row)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g_row = g_ptr + row * D
    offs = tl.arange(0, BLOCK_D)
    if w == 0.0:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, D, BLOCK_D):
                j = start + offs
                tl.store(g_row + j, tl.zeros([BLOCK_D], dtype=g_ptr.dtype.element_ty), mask=j < D)
    else:
        acc_a = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_c = tl.zeros([BLOCK_D], dtype=tl.float32)
        df = D * 1.0
        coef = 2.0 * w / df  # MSE gradient coefficient (hl_mse_coef)
        for start in range(0, D, BLOCK_D):
            j = start + offs
            m = j < D
            s = tl.load(s_row + j, mask=m, other=0.0).to(tl.float32)
            t = tl.load(t_row + j, mask=m, other=0.0).to(tl.float32)
            if COSINE:
                acc_a += s * t
                acc_b += s * s
                acc_c += t * t
            else:
                d = s - t
                acc_a += d * d
                if WRITE_GRAD:
                    tl.store(g_row + j, (d * coef).to(g_ptr.dtype.element_ty), mask=m)
        a = tl.sum(acc_a, axis=0)
        if COSINE:
            b = tl.sum(acc_b, axis=0)
            c = tl.sum(acc_c, axis=0)
            ok = ((a - a) == 0.0) & ((b - b) == 0.0) & ((c - c) == 0.0)  # all three finite
            zs = b == 0.0
            zt = c == 0.0
            regular = ok & (~zs) & (~zt)
            ns = tl.sqrt(tl.where(regular, b, 1.0))
            nt = tl.sqrt(tl.where(regular, c, 1.0))
            inv = 1.0 / (ns * nt)
            us = 1.0 / ns
            ut = 1.0 / nt
            cs = tl.where(regular, w * ((a * inv) / tl.where(regular, b, 1.0)), tl.where(ok, 0.0, float("nan")))
            ct = tl.where(regular, -w * inv, tl.where(ok, 0.0, float("nan")))
            # pass 2: the gradient and |s/|s| - t/|t||^2 (half of it is 1 - cos, without cancellation)
            acc_e = tl.zeros([BLOCK_D], dtype=tl.float32)
            for start in range(0, D, BLOCK_D):
                j = start + offs
                m = j < D
                s = tl.load(s_row + j, mask=m, other=0.0).to(tl.float32)
                t = tl.load(t_row + j, mask=m, other=0.0).to(tl.float32)
                dd = s * us - t * ut
                acc_e += dd * dd
                if WRITE_GRAD:
                    tl.store(g_row + j, (s * cs + t * ct).to(g_ptr.dtype.element_ty), mask=m)
            half = 0.5 * tl.sum(acc_e, axis=0)
            loss = tl.where(regular, w * tl.minimum(half, 2.0), tl.where(zs & zt, 0.0, w))
            loss = tl.where(ok, loss, float("nan"))
            tl.store(loss_ptr + row, loss)
        else:
            tl.store(loss_ptr + row, w * (a / df))


def hidden_state_loss_fwd(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, loss_kind: int, *,
                          block_d: int | None = None, need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row weighted hidden-state loss and its gradient w.r.t. the student, in one launch.

    Args:
        student, teacher: [N, D] float32/bfloat16/float16 (one dtype), ``stride(1) == 1``, ``stride(0) >= D``.
        weight: [N] float32 per-row coefficients (0: row skipped).
        loss_kind: 0 cosine, 1 MSE (see :mod:`minitron.ops.hidden_loss`).
        block_d: chunk of D per step (power of two; tests use it to force multi-chunk rows).
        need_grad: False computes the loss only (``grad`` is an empty ``[0, D]`` tensor).

    Returns:
        ``(loss [N] fp32, grad [N, D] in the input dtype)``.
    """
    if student.dim() != 2 or student.dtype not in _DTYPES:
        raise TypeError(f"student must be a 2-D float32/bfloat16/float16 tensor, got {student.dtype} "
                        f"{tuple(student.shape)}")
    if teacher.shape != student.shape or teacher.dtype != student.dtype or teacher.device != student.device:
        raise ValueError("teacher must match student in shape, dtype and device")
    n, d = student.shape
    if weight.shape != (n,) or weight.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous float32 [N={n}] tensor")
    if loss_kind not in (0, 1):
        raise ValueError(f"loss_kind must be 0 (cosine) or 1 (mse), got {loss_kind}")
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n if need_grad else 0, d), dtype=student.dtype, device=student.device)
    if n == 0:
        return loss, grad
    for name, x in (("student", student), ("teacher", teacher)):
        if (d > 1 and x.stride(1) != 1) or (n > 1 and x.stride(0) < d):
            raise ValueError(f"{name} must have stride(1) == 1 and stride(0) >= D, got {tuple(x.stride())}")
    require_interpreter(student.device, "hidden_state_loss")
    block = block_for(d, block_d)
    log.debug("hidden_state_loss triton: N=%d D=%d block=%d loss=%d dtype=%s", n, d, block, loss_kind, student.dtype)
    launch(student.device, lambda: _hidden_loss_fwd_kernel[(n,)](
        student, teacher, weight, loss, grad if need_grad else student,
        d, student.stride(0) if n > 1 else d, teacher.stride(0) if n > 1 else d,
        COSINE=loss_kind == 0, WRITE_GRAD=bool(need_grad), BLOCK_D=block, num_warps=num_warps(block)))
    return loss, grad
