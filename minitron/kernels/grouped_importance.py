"""Triton kernels of the grouped (segment) importance reduction.

The math mirrors ``csrc/common/importance_math.h`` and ``csrc/common/grouped_importance_math.h`` (shared by
the C++ and CUDA kernels); the public op, its definitions and validation live in
:mod:`minitron.ops.grouped_importance`. This module implements the backend contract
:func:`grouped_importance_update`. No host synchronisation: the offsets are read on the device.

Two launches:

* ``_gi_seq_kernel`` -- grid (unit blocks, segments). Each program streams the rows of one segment in
  ``[BLOCK_R, BLOCK_U, BLOCK_G]`` tiles (``BLOCK_G`` covers a unit's ``group_size`` channels; 1 for plain
  channels), scales each row by its weight, computes magnitudes in fp32, folds them into per-unit sequence
  accumulators ``(a1, a2)`` and stores them to an fp32 partial buffer ``[segments, 2, U]``; it also counts the
  non-finite values of ``w * x``.
* ``_gi_batch_kernel`` -- grid (unit blocks, groups). Per group and unit, the group's segments in sample
  order: finalise the sequence aggregate of each non-empty segment and fold it into the group's fp32 state
  ``[2, U]`` (Welford for ``var``).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from minitron.kernels.importance import _batch_update, _max_nan, _nonfinite, _seq_finalize

log = logging.getLogger(__name__)

__all__ = ["grouped_importance_update"]

_TILE = 4096  # elements per [BLOCK_R, BLOCK_U, BLOCK_G] tile


@triton.jit
def _gi_seq_kernel(x_ptr, w_ptr, off_ptr, part_ptr, nf_ptr, N, U, G, sxr, swr, HAS_W: tl.constexpr, AGG: tl.constexpr,
                   GROUPED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_u = tl.program_id(0)
    j = tl.program_id(1).to(tl.int64)
    r_begin = tl.load(off_ptr + j)
    r_end = tl.load(off_ptr + j + 1)
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = offs_u < U
    offs_g = tl.arange(0, BLOCK_G)
    ch = offs_u[:, None].to(tl.int64) * G + offs_g[None, :]  # [BLOCK_U, BLOCK_G]
    ch_ok = u_ok[:, None] & (offs_g[None, :] < G)

    shift = tl.zeros([BLOCK_U], dtype=tl.float32)
    if AGG == 4:  # the magnitude at the segment's first row (an empty segment loads zeros and is not used)
        r_first = tl.minimum(r_begin, N - 1)  # N >= 1
        row = tl.load(x_ptr + r_first * sxr + ch, mask=ch_ok, other=0.0).to(tl.float32)
        if HAS_W:
            row = tl.where(ch_ok, row * tl.load(w_ptr + r_first * swr).to(tl.float32), 0.0)
        if GROUPED:
            shift = tl.sqrt(tl.sum(row * row, axis=1))
        else:
            shift = tl.abs(tl.sum(row, axis=1))

    a1 = tl.zeros([BLOCK_U], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_U], dtype=tl.float32)
    nf = tl.zeros([BLOCK_U], dtype=tl.int32)
    for r_start in range(r_begin, r_end, BLOCK_R):
        offs_r = r_start + tl.arange(0, BLOCK_R)
        r_ok = offs_r < r_end
        ptrs = x_ptr + offs_r[:, None, None].to(tl.int64) * sxr + ch[None, :, :]
        ok = r_ok[:, None, None] & ch_ok[None, :, :]
        v = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            wr = tl.load(w_ptr + offs_r.to(tl.int64) * swr, mask=r_ok, other=0.0).to(tl.float32)
            v = tl.where(ok, v * wr[:, None, None], 0.0)  # 0 * inf at padding must not count
        nf += tl.sum(tl.sum(_nonfinite(v), axis=2), axis=0)
        if GROUPED:
            m = tl.sqrt(tl.sum(v * v, axis=2))  # [BLOCK_R, BLOCK_U]
        else:
            m = tl.abs(tl.sum(v, axis=2))
        # rows past the segment were loaded as 0: neutral for sum/mean/l2/max (m >= 0); var needs the mask
        if AGG == 0 or AGG == 2:
            a1 += tl.sum(m, axis=0)
        elif AGG == 1:
            a1 += tl.sum(m * m, axis=0)
        elif AGG == 3:
            a1 = _max_nan(a1, tl.reduce(m, 0, _max_nan))
        else:
            d = tl.where(r_ok[:, None], m - shift[None, :], 0.0)
            a1 += tl.sum(d, axis=0)
            a2 += tl.sum(d * d, axis=0)

    out = part_ptr + j * 2 * U + offs_u
    tl.store(out, a1, mask=u_ok)
    tl.store(out + U, a2, mask=u_ok)
    tl.store(nf_ptr + j * tl.num_programs(0) + pid_u, tl.sum(nf, axis=0))


@triton.jit
def _gi_batch_kernel(part_ptr, off_ptr, state_ptr, count_ptr, NB, U, SEQ_AGG: tl.constexpr, BATCH_AGG: tl.constexpr,
                     BLOCK_U: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_u = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = offs_u < U
    st = state_ptr + g * 2 * U
    A = tl.load(st + offs_u, mask=u_ok, other=0.0)
    Bs = tl.load(st + U + offs_u, mask=u_ok, other=0.0)
    n = tl.load(count_ptr + g).to(tl.float32)
    for b in range(0, NB):
        j = g * NB + b
        rows = tl.load(off_ptr + j + 1) - tl.load(off_ptr + j)
        w = rows > 0
        base = part_ptr + j * 2 * U + offs_u
        a1 = tl.load(base, mask=u_ok, other=0.0)
        a2 = tl.load(base + U, mask=u_ok, other=0.0)
        v = _seq_finalize(a1, a2, tl.maximum(rows, 1).to(tl.float32), SEQ_AGG)
        A_new, B_new = _batch_update(A, Bs, v, n, BATCH_AGG)
        A = tl.where(w, A_new, A)
        Bs = tl.where(w, B_new, Bs)
        n += w.to(tl.float32)
    tl.store(st + offs_u, A, mask=u_ok)
    tl.store(st + U + offs_u, Bs, mask=u_ok)


def grouped_importance_update(state: torch.Tensor, count: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor,
                              weights: Optional[torch.Tensor], group_size: int, seq_agg: int, batch_agg: int) -> None:
    """Backend contract of ``minitron::grouped_importance_update`` (see :mod:`minitron.ops.grouped_importance`).

    Args:
        state: fp32 ``[groups, 2, U]`` contiguous; count: int64 ``[3, groups]`` (counted segments, non-finite
            values of ``w * x``, routed rows; updated in place).
        x: ``[N, U * group_size]`` fp32/bf16/fp16 (any strides; copied if the channel stride is not 1).
        offsets: int64 ``[groups * samples + 1]`` (validated by the op). weights: ``None`` or ``[N]`` float.
        seq_agg, batch_agg: aggregation codes (0..4).
    """
    n_groups, _, U = state.shape
    J = offsets.shape[0] - 1
    NB = J // n_groups
    N = x.shape[0]
    if J == 0 or N == 0:
        return
    if x.stride(1) != 1:
        x = x.contiguous()
    G = group_size
    grouped = G > 1
    block_g = triton.next_power_of_2(G) if grouped else 1
    block_u = max(1, min(triton.next_power_of_2(U), max(1, 1024 // block_g)))
    block_r = max(1, min(16, _TILE // (block_u * block_g)))
    n_ub = triton.cdiv(U, block_u)
    if J * 2 * U >= 2**62:
        raise ValueError(f"grouped importance (triton): segments * 2 * units = {J * 2 * U} is too large")
    part = torch.empty(J * 2 * U, dtype=torch.float32, device=x.device)
    nonfinite = torch.empty(J * n_ub, dtype=torch.int32, device=x.device)
    offsets = offsets.contiguous()
    w_arg = weights if weights is not None else offsets  # dummy pointer when HAS_W is False
    swr = weights.stride(0) if weights is not None else 0
    _gi_seq_kernel[(n_ub, J)](x, w_arg, offsets, part, nonfinite, N, U, G, x.stride(0), swr, HAS_W=weights is not None,
                              AGG=seq_agg, GROUPED=grouped, BLOCK_R=block_r, BLOCK_U=block_u, BLOCK_G=block_g)
    block_ub = min(triton.next_power_of_2(U), 256)
    _gi_batch_kernel[(triton.cdiv(U, block_ub), n_groups)](part, offsets, state, count, NB, U, SEQ_AGG=seq_agg,
                                                           BATCH_AGG=batch_agg, BLOCK_U=block_ub)
    lengths = offsets.diff().view(n_groups, NB)
    count[0] += (lengths > 0).sum(1)
    count[1] += nonfinite.view(n_groups, NB * n_ub).sum(1, dtype=torch.int64)
    count[2] += lengths.sum(1)
