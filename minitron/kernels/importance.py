"""Triton kernels of the fused importance reduction and of the block-influence metric.

The math mirrors ``csrc/common/importance_math.h`` (shared by the C++ and CUDA kernels); the public ops,
their definitions and validation live in :mod:`minitron.ops.importance`. This module implements the
backend contracts :func:`importance_update` and :func:`block_influence_update`.

Importance, two launches:

* ``_imp_seq_kernel`` -- grid (unit blocks, sequence chunks, samples). Each program streams the tokens
  of its chunk of one sample in ``[BLOCK_S, BLOCK_U, BLOCK_G]`` tiles (``BLOCK_G`` covers a unit's
  ``group_size`` channels; 1 for plain channels), computes magnitudes in fp32, folds the counted tokens
  into per-unit sequence accumulators ``(a1, a2)`` and stores them to an fp32 partial buffer
  ``[B, chunks, 2, U]``.
* ``_imp_batch_kernel`` -- grid (unit blocks). Per unit, the samples in order: combine the chunks,
  finalise the sequence aggregate, fold it into the fp32 state ``[2, U]`` (Welford for ``var``).

Block influence, one launch: a program handles ``BLOCK_T`` tokens, streams ``hidden`` in ``BLOCK_H``
chunks accumulating ``<a, b>``, ``|a|^2`` and ``|b|^2`` in fp32 and writes the partial sum of
``1 - cos`` and the counted tokens; the host adds the partials (float64) into the state.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

__all__ = ["importance_update", "block_influence_update"]

# Aggregation codes (csrc/common/importance_math.h: enum Agg; minitron.ops.importance.AGGREGATIONS).
MEAN, L2, SUM, MAX, VAR = 0, 1, 2, 3, 4

_TILE = 4096  # elements per [BLOCK_S, BLOCK_U, BLOCK_G] tile
_MIN_CHUNK = 64  # tokens per sequence chunk, at least
_CUDA_TARGET_PROGRAMS = 1024


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nonfinite(v):
    """1 where the fp32 ``v`` is NaN or +-inf (exponent bits all ones; importance_math.h: nonfinite_bits)."""
    return ((v.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000).to(tl.int32)


@triton.jit
def _seq_finalize(a1, a2, n, SEQ_AGG: tl.constexpr):
    """importance_math.h: seq_finalize (n >= 1)."""
    if SEQ_AGG == 0:
        v = a1 / n
    elif SEQ_AGG == 1:
        v = tl.sqrt(a1)
    elif SEQ_AGG == 4:
        mu = a1 / n
        v = a2 / n - mu * mu
        v = tl.where(v < 0.0, 0.0, v)
    else:
        v = a1
    return v


@triton.jit
def _batch_update(A, Bs, v, n, BATCH_AGG: tl.constexpr):
    """importance_math.h: batch_update: fold one sample's value ``v`` into the running (A, Bs) after ``n`` samples;
    returns the new (A, Bs) (callers keep the old ones where the sample does not count)."""
    if BATCH_AGG == 1:
        A_new = A + v * v
        B_new = Bs
    elif BATCH_AGG == 3:
        A_new = _max_nan(A, v)
        B_new = Bs
    elif BATCH_AGG == 4:
        d = v - A
        A_new = A + d / (n + 1.0)
        B_new = Bs + d * (v - A_new)
    else:
        A_new = A + v
        B_new = Bs
    return A_new, B_new


@triton.jit
def _imp_seq_kernel(x_ptr, mask_ptr, first_ptr, part_ptr, nf_ptr, S, U, G, sxb, sxs, smb, sms, chunk, nch,
                    HAS_MASK: tl.constexpr, AGG: tl.constexpr, GROUPED: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_U: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_u = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = offs_u < U
    offs_g = tl.arange(0, BLOCK_G)
    ch = offs_u[:, None].to(tl.int64) * G + offs_g[None, :]  # [BLOCK_U, BLOCK_G]
    ch_ok = u_ok[:, None] & (offs_g[None, :] < G)
    xb = x_ptr + b * sxb

    shift = tl.zeros([BLOCK_U], dtype=tl.float32)
    if AGG == 4:
        s0 = tl.minimum(tl.load(first_ptr + b), S - 1)  # first == S: no counted token, sample unused
        row = tl.load(xb + s0 * sxs + ch, mask=ch_ok, other=0.0).to(tl.float32)
        if GROUPED:
            shift = tl.sqrt(tl.sum(row * row, axis=1))
        else:
            shift = tl.abs(tl.sum(row, axis=1))

    a1 = tl.zeros([BLOCK_U], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_U], dtype=tl.float32)
    nf = tl.zeros([BLOCK_U], dtype=tl.int32)  # non-finite values at counted positions (others load as 0)
    s_begin = c * chunk
    s_end = tl.minimum(S, s_begin + chunk)
    for s_start in range(s_begin, s_end, BLOCK_S):
        offs_s = s_start + tl.arange(0, BLOCK_S)
        s_ok = offs_s < s_end
        if HAS_MASK:
            counted = tl.load(mask_ptr + b * smb + offs_s.to(tl.int64) * sms, mask=s_ok, other=0) != 0
            s_ok = s_ok & counted
        ptrs = xb + offs_s[:, None, None].to(tl.int64) * sxs + ch[None, :, :]
        v = tl.load(ptrs, mask=s_ok[:, None, None] & ch_ok[None, :, :], other=0.0).to(tl.float32)
        nf += tl.sum(tl.sum(_nonfinite(v), axis=2), axis=0)
        if GROUPED:
            m = tl.sqrt(tl.sum(v * v, axis=2))  # [BLOCK_S, BLOCK_U]
        else:
            m = tl.abs(tl.sum(v, axis=2))
        # uncounted tokens were loaded as 0: neutral for sum/mean/l2/max (m >= 0); var needs the mask
        if AGG == 0 or AGG == 2:
            a1 += tl.sum(m, axis=0)
        elif AGG == 1:
            a1 += tl.sum(m * m, axis=0)
        elif AGG == 3:
            a1 = _max_nan(a1, tl.reduce(m, 0, _max_nan))
        else:
            d = tl.where(s_ok[:, None], m - shift[None, :], 0.0)
            a1 += tl.sum(d, axis=0)
            a2 += tl.sum(d * d, axis=0)

    out = part_ptr + (b * nch + c) * 2 * U + offs_u
    tl.store(out, a1, mask=u_ok)
    tl.store(out + U, a2, mask=u_ok)
    tl.store(nf_ptr + (b * nch + c) * tl.num_programs(0) + pid_u, tl.sum(nf, axis=0))


@triton.jit
def _imp_batch_kernel(part_ptr, counts_ptr, state_ptr, count_ptr, B, U, nch, SEQ_AGG: tl.constexpr,
                      BATCH_AGG: tl.constexpr, BLOCK_U: tl.constexpr):
    pid = tl.program_id(0)
    offs_u = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = offs_u < U
    A = tl.load(state_ptr + offs_u, mask=u_ok, other=0.0)
    Bs = tl.load(state_ptr + U + offs_u, mask=u_ok, other=0.0)
    n = tl.load(count_ptr).to(tl.float32)
    for b in range(0, B):
        nb = tl.load(counts_ptr + b)
        w = nb > 0
        base = part_ptr + b * nch * 2 * U + offs_u  # < 2**31 (checked by the wrapper)
        a1 = tl.load(base, mask=u_ok, other=0.0)
        a2 = tl.load(base + U, mask=u_ok, other=0.0)
        for c in range(1, nch):
            b1 = tl.load(base + c * 2 * U, mask=u_ok, other=0.0)
            b2 = tl.load(base + c * 2 * U + U, mask=u_ok, other=0.0)
            if SEQ_AGG == 3:
                a1 = _max_nan(a1, b1)
            else:
                a1 += b1
                a2 += b2
        v = _seq_finalize(a1, a2, tl.maximum(nb, 1).to(tl.float32), SEQ_AGG)
        A_new, B_new = _batch_update(A, Bs, v, n, BATCH_AGG)
        A = tl.where(w, A_new, A)
        Bs = tl.where(w, B_new, Bs)
        n += w.to(tl.float32)
    tl.store(state_ptr + offs_u, A, mask=u_ok)
    tl.store(state_ptr + U + offs_u, Bs, mask=u_ok)


def _mask_stats(mask: Optional[torch.Tensor], batch: int, seq: int, device: torch.device):
    """int32 counted tokens ``[B]`` and int64 first counted token ``[B]`` (``seq`` when none)."""
    if mask is None:
        return (torch.full((batch,), seq, dtype=torch.int32, device=device),
                torch.zeros(batch, dtype=torch.int64, device=device))
    counts = mask.sum(1, dtype=torch.int32)
    first = torch.where(counts > 0, mask.to(torch.int8).argmax(1), torch.full_like(counts, seq, dtype=torch.int64))
    return counts, first.to(torch.int64)


def importance_update(state: torch.Tensor, count: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor],
                      group_size: int, seq_agg: int, batch_agg: int) -> None:
    """Backend contract of ``minitron::importance_update`` (see :mod:`minitron.ops.importance`).

    Args:
        state: fp32 ``[2, U]`` contiguous; count: int64 ``[2]`` (counted samples, non-finite values at
            counted positions; both updated in place).
        x: ``[B, S, U * group_size]`` fp32/bf16/fp16 (any strides; copied if the channel stride is not 1).
        mask: ``None`` or bool ``[B, S]``. seq_agg, batch_agg: aggregation codes (0..4).
    """
    B, S, C = x.shape
    U = state.shape[1]
    G = group_size
    if B == 0 or S == 0:
        return
    if x.stride(2) != 1:
        x = x.contiguous()
    counts, first = _mask_stats(mask, B, S, x.device)
    grouped = G > 1
    block_g = triton.next_power_of_2(G) if grouped else 1
    block_u = max(1, min(triton.next_power_of_2(U), max(1, 1024 // block_g)))
    block_s = max(1, min(triton.next_power_of_2(S), _TILE // (block_u * block_g)))
    n_ub = triton.cdiv(U, block_u)
    target = _CUDA_TARGET_PROGRAMS if x.device.type == "cuda" else 1
    nch = 1
    if B * n_ub < target:
        nch = max(1, min(triton.cdiv(target, B * n_ub), S // _MIN_CHUNK))
    chunk = triton.cdiv(S, nch)
    nch = triton.cdiv(S, chunk)
    if B * nch * 2 * U >= 2**31:
        raise ValueError(f"importance (triton): batch * chunks * 2 * units = {B * nch * 2 * U} must be < 2**31")
    part = torch.empty(B * nch * 2 * U, dtype=torch.float32, device=x.device)
    nonfinite = torch.empty(B * nch * n_ub, dtype=torch.int32, device=x.device)
    mask_arg = mask if mask is not None else counts  # dummy pointer when HAS_MASK is False
    smb, sms = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    _imp_seq_kernel[(n_ub, nch, B)](
        x, mask_arg, first, part, nonfinite, S, U, G, x.stride(0), x.stride(1), smb, sms, chunk, nch,
        HAS_MASK=mask is not None, AGG=seq_agg, GROUPED=grouped, BLOCK_S=block_s, BLOCK_U=block_u,
        BLOCK_G=block_g)
    block_ub = min(triton.next_power_of_2(U), 256)
    _imp_batch_kernel[(triton.cdiv(U, block_ub),)](
        part, counts, state, count, B, U, nch, SEQ_AGG=seq_agg, BATCH_AGG=batch_agg, BLOCK_U=block_ub)
    count[0] += (counts > 0).sum()
    count[1] += nonfinite.sum(dtype=torch.int64)


@triton.jit
def _one_minus_cos(dot, na, nb):
    """importance_math.h: one_minus_cos (vectorised)."""
    den = tl.sqrt(na) * tl.sqrt(nb)
    c = dot / tl.where(den == 0.0, 1.0, den)  # zero norms are handled below
    c = tl.where(c > 1.0, 1.0, tl.where(c < -1.0, -1.0, c))
    r = 1.0 - c
    za = na == 0.0
    zb = nb == 0.0
    r = tl.where(za & zb, 0.0, r)
    r = tl.where(za ^ zb, 1.0, r)
    return r


@triton.jit
def _bi_kernel(a_ptr, b_ptr, mask_ptr, out_ptr, cnt_ptr, nf_ptr, T, S, H, sab, sas, sbb, sbs, smb, sms,
               HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = offs_t < T
    bi = (offs_t // S).to(tl.int64)
    si = (offs_t % S).to(tl.int64)
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + bi * smb + si * sms, mask=ok, other=0) != 0)
    ra = a_ptr + bi * sab + si * sas
    rb = b_ptr + bi * sbb + si * sbs
    dot = tl.zeros([BLOCK_T], dtype=tl.float32)
    na = tl.zeros([BLOCK_T], dtype=tl.float32)
    nb = tl.zeros([BLOCK_T], dtype=tl.float32)
    nf = tl.zeros([BLOCK_T], dtype=tl.int32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        m2 = ok[:, None] & (offs_h[None, :] < H)
        va = tl.load(ra[:, None] + offs_h[None, :], mask=m2, other=0.0).to(tl.float32)
        vb = tl.load(rb[:, None] + offs_h[None, :], mask=m2, other=0.0).to(tl.float32)
        nf += tl.sum(_nonfinite(va) + _nonfinite(vb), axis=1)
        dot += tl.sum(va * vb, axis=1)
        na += tl.sum(va * va, axis=1)
        nb += tl.sum(vb * vb, axis=1)
    r = tl.where(ok, _one_minus_cos(dot, na, nb), 0.0)
    tl.store(out_ptr + pid, tl.sum(r, axis=0))
    tl.store(cnt_ptr + pid, tl.sum(ok.to(tl.int32), axis=0))
    tl.store(nf_ptr + pid, tl.sum(nf, axis=0))


def block_influence_update(state: torch.Tensor, count: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor,
                           mask: Optional[torch.Tensor], layer: int) -> None:
    """Backend contract of ``minitron::block_influence_update`` (see :mod:`minitron.ops.importance`).

    Args:
        state: float64 ``[L]``; count: int64 ``[2, L]`` (counted tokens; non-finite values of ``h_in`` and
            ``h_out`` at counted tokens): column ``layer`` updated in place.
        h_in, h_out: ``[B, S, H]`` fp32/bf16/fp16. mask: ``None`` or bool ``[B, S]``.
    """
    B, S, H = h_in.shape
    T = B * S
    if T == 0:
        return
    if h_in.stride(2) != 1:
        h_in = h_in.contiguous()
    if h_out.stride(2) != 1:
        h_out = h_out.contiguous()
    block_h = min(triton.next_power_of_2(H), 1024)
    block_t = max(1, min(triton.next_power_of_2(T), _TILE // block_h))
    grid = triton.cdiv(T, block_t)
    out = torch.empty(grid, dtype=torch.float32, device=h_in.device)
    cnt = torch.empty(grid, dtype=torch.int32, device=h_in.device)
    nonfinite = torch.empty(grid, dtype=torch.int32, device=h_in.device)
    mask_arg = mask if mask is not None else cnt
    smb, sms = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    _bi_kernel[(grid,)](h_in, h_out, mask_arg, out, cnt, nonfinite, T, S, H, h_in.stride(0), h_in.stride(1),
                        h_out.stride(0), h_out.stride(1), smb, sms, HAS_MASK=mask is not None, BLOCK_T=block_t,
                        BLOCK_H=block_h)
    state[layer] += out.to(torch.float64).sum()
    count[0, layer] += cnt.sum().to(torch.int64)
    count[1, layer] += nonfinite.sum(dtype=torch.int64)
