"""Triton kernel of the sparse (top-k teacher) KL op family (:mod:`minitron.ops.topk_kl`).

One program handles one row (token) of the ``[N, V]`` student logits; the vocabulary is streamed in
``BLOCK_V`` chunks with masks (``V`` need not be a multiple of the block):

* pass 1 -- the online maximum of ``a = student * inv_T`` over the whole row and the rescaled sum of
  ``exp(a - m)`` over the complement of the teacher's index set (membership by a vectorised binary search
  in the row's sorted indices), so ``q_tail`` is summed directly, never as ``1 - sum_k q_k``; with a
  cross-entropy term at a different temperature also ``logsumexp(student)``;
* the O(k) part on one ``BLOCK_K`` vector: the student's log-probabilities at the k indices, the loss and
  ``dD/da`` at the indices (formulas in the op module's docstring and ``csrc/common/topk_kl_math.h``);
* pass 2 -- the gradient ``c * exp(a - m)`` (plus the CE softmax) written once in the input dtype, then the k
  index entries and the label entry are overwritten after a block barrier.

Everything is accumulated in fp32. Rows whose KL and CE weights are both 0 get loss 0 and a zero gradient.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from minitron.kernels._launch import block_v as block_v_for
from minitron.kernels._launch import launch, num_warps, require_interpreter

log = logging.getLogger(__name__)

__all__ = ["topk_kl_div_fwd"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _members(idx_row, j, K, LOG_K: tl.constexpr):
    """Whether each entry of ``j`` [BLOCK_V] is one of the K sorted indices at ``idx_row`` (lower bound by
    LOG_K >= ceil(log2(K + 1)) bisection steps)."""
    lo = tl.zeros(j.shape, dtype=tl.int32)
    hi = tl.zeros(j.shape, dtype=tl.int32) + K
    for _ in tl.static_range(LOG_K):
        live = lo < hi
        mid = (lo + hi) // 2
        vm = tl.load(idx_row + tl.minimum(mid, K - 1))
        lt = vm < j
        lo = tl.where(live & lt, mid + 1, lo)
        hi = tl.where(live & (~lt), mid, hi)
    found = tl.load(idx_row + tl.minimum(lo, K - 1))
    return (lo < K) & (found == j)


@triton.jit
def _topk_kl_fwd_kernel(
    s_ptr, idx_ptr, lp_ptr, w_ptr, lab_ptr, cw_ptr, loss_ptr, g_ptr,
    V, K, stride_s, inv_t,
    TAIL: tl.constexpr, HAS_CE: tl.constexpr, SAME_T: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, LOG_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    idx_row = idx_ptr + row * K
    lp_row = lp_ptr + row * K
    g_row = g_ptr + row * V
    w = tl.load(w_ptr + row)
    active = w != 0.0
    if HAS_CE:
        cw = tl.load(cw_ptr + row)
        active = active | (cw != 0.0)
    offs = tl.arange(0, BLOCK_V)
    if active:
        # pass 1: max over the row, complement sum relative to it (and lse of the raw logits for CE)
        m = tl.full((), float("-inf"), tl.float32)
        st = tl.zeros([BLOCK_V], dtype=tl.float32)
        m1 = tl.full((), float("-inf"), tl.float32)
        s1 = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            j = start + offs
            z = tl.load(s_row + j, mask=j < V, other=float("-inf")).to(tl.float32)
            a = z * inv_t
            m_new = tl.maximum(m, tl.max(a, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            member = _members(idx_row, j, K, LOG_K)
            e = tl.where(member, 0.0, tl.exp(a - m_safe))
            st = st * tl.exp(m - m_safe) + e
            m = m_new
            if HAS_CE and not SAME_T:
                m1_new = tl.maximum(m1, tl.max(z, axis=0))
                m1_safe = tl.where(m1_new == float("-inf"), 0.0, m1_new)
                s1 = s1 * tl.exp(m1 - m1_safe) + tl.exp(z - m1_safe)
                m1 = m1_new
        tail_sum = tl.sum(st, axis=0)
        # O(k) part
        offk = tl.arange(0, BLOCK_K)
        km = offk < K
        ik = tl.load(idx_row + offk, mask=km, other=0)
        lpk = tl.load(lp_row + offk, mask=km, other=float("-inf"))
        zk = tl.load(s_row + ik, mask=km, other=float("-inf")).to(tl.float32)
        ak = zk * inv_t
        ek = tl.where(km, tl.exp(ak - m), 0.0)
        total = tail_sum + tl.sum(ek, axis=0)
        log_total = tl.log(total)
        lq = ak - m - log_total
        if TAIL:
            p = tl.where(lpk > float("-inf"), tl.exp(lpk), 0.0)
            p = tl.where(lpk != lpk, lpk, p)  # NaN propagates
            terms = tl.where(p != 0.0, p * (lpk - lq), 0.0)
            pt = tl.where(K < V, 1.0 - tl.sum(p, axis=0), 0.0)  # K == V: no tail
            pt_pos = pt > 0.0
            pt_safe = tl.where(pt_pos, pt, 1.0)
            d = tl.sum(terms, axis=0) + tl.where(pt_pos, pt * (tl.log(pt_safe) - (tl.log(tail_sum) - log_total)),
                                                 0.0)
            rest = 1.0 / total - tl.where(pt_pos & (tail_sum > 0.0), pt_safe / tail_sum, 0.0)
            target = p
        else:
            p = tl.where(lpk > float("-inf"), tl.exp(lpk), 0.0)
            lpn = lpk - tl.log(tl.sum(p, axis=0))
            pn = tl.where(lpn > float("-inf"), tl.exp(lpn), 0.0)
            pn = tl.where(lpn != lpn, lpn, pn)
            d = tl.sum(tl.where(pn != 0.0, pn * (lpn - lq), 0.0), axis=0)
            rest = 1.0 / total
            target = pn
        gidx = tl.exp(lq) - target
        loss = tl.where(w != 0.0, w * d, 0.0)
        lse1 = 0.0
        label = 0
        if HAS_CE:
            if SAME_T:
                lse1 = m + log_total
            else:
                lse1 = m1 + tl.log(tl.sum(s1, axis=0))
            label = tl.load(lab_ptr + row)
            z_lab = tl.load(s_row + label).to(tl.float32)
            loss += tl.where(cw != 0.0, cw * (lse1 - z_lab), 0.0)
        tl.store(loss_ptr + row, loss)
        if WRITE_GRAD:
            kc = w * inv_t
            c = kc * rest
            if HAS_CE and SAME_T:
                c += cw / total
            for start in range(0, V, BLOCK_V):
                j = start + offs
                z = tl.load(s_row + j, mask=j < V, other=float("-inf")).to(tl.float32)
                g = c * tl.exp(z * inv_t - m)
                if HAS_CE and not SAME_T:
                    g += cw * tl.exp(z - lse1)
                tl.store(g_row + j, g.to(g_ptr.dtype.element_ty), mask=j < V)
            tl.debug_barrier()
            gk = kc * gidx
            if HAS_CE:
                gk += cw * tl.exp(zk - lse1)
            tl.store(g_row + ik, gk.to(g_ptr.dtype.element_ty), mask=km)
            tl.debug_barrier()
            if HAS_CE:
                gl = tl.load(g_row + label).to(tl.float32)
                tl.store(g_row + label, (gl - cw).to(g_ptr.dtype.element_ty))
    else:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                j = start + offs
                tl.store(g_row + j, tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty), mask=j < V)


def topk_kl_div_fwd(student: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor, weight: torch.Tensor,
                    labels: torch.Tensor, ce_weight: torch.Tensor, inv_temperature: float, tail: bool, *,
                    block_v: int | None = None, need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sparse KL (+ CE) and its gradient w.r.t. the student logits, in one launch.

    Args:
        student: [N, V] logits, float32/bfloat16/float16, ``stride(1) == 1``, ``stride(0) >= V``.
        indices: [N, k] int64 contiguous, sorted ascending and distinct per row, in [0, V).
        logprobs: [N, k] float32 contiguous, the teacher's log-probabilities at ``indices``.
        weight: [N] float32 KL coefficients. labels: [N] int64 valid CE targets or an empty tensor (no CE);
            ce_weight: [N] float32 CE coefficients (or empty).
        inv_temperature: 1 / T (> 0) for the KL; the CE is at temperature 1.
        tail: sparse-KL variant (see :mod:`minitron.ops.topk_kl`).
        block_v: vocabulary chunk (power of two; tests use it to force multi-chunk rows).
        need_grad: False computes the loss only (``grad`` is an empty ``[0, V]`` tensor).

    Returns:
        ``(loss [N] fp32, grad [N, V] in the student dtype)``: ``loss_i = weight_i D_i + ce_weight_i CE_i`` and
        its gradient.
    """
    if student.dim() != 2 or student.dtype not in _DTYPES:
        raise TypeError(f"student must be a 2-D float32/bfloat16/float16 tensor, got {student.dtype} "
                        f"{tuple(student.shape)}")
    n, v = student.shape
    if indices.dim() != 2 or indices.shape[0] != n or indices.dtype != torch.int64 or not indices.is_contiguous():
        raise ValueError("indices must be a contiguous int64 [N, k] tensor")
    k = indices.shape[1]
    if logprobs.shape != indices.shape or logprobs.dtype != torch.float32 or not logprobs.is_contiguous():
        raise ValueError("logprobs must be a contiguous float32 tensor shaped like indices")
    if weight.shape != (n,) or weight.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous float32 [N={n}] tensor")
    has_ce = labels.numel() > 0
    if has_ce and (labels.shape != (n,) or ce_weight.shape != (n,)):
        raise ValueError("labels and ce_weight must be [N] tensors (or labels empty)")
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n if need_grad else 0, v), dtype=student.dtype, device=student.device)
    if n == 0:
        return loss, grad
    if v > 1 and student.stride(1) != 1 or (n > 1 and student.stride(0) < v):
        raise ValueError(f"student must have stride(1) == 1 and stride(0) >= V, got {tuple(student.stride())}")
    require_interpreter(student.device, "topk_kl_div")
    block = block_v_for(v, block_v)
    block_k = max(16, triton.next_power_of_2(k))
    log_k = max(1, int(k).bit_length())  # ceil(log2(k + 1))
    log.debug("topk_kl_div triton: N=%d V=%d k=%d block=%d dtype=%s", n, v, k, block, student.dtype)

    launch(student.device, lambda: _topk_kl_fwd_kernel[(n,)](
        student, indices, logprobs, weight, labels if has_ce else indices, ce_weight if has_ce else weight,
        loss, grad if need_grad else student,
        v, k, student.stride(0) if n > 1 else v, float(inv_temperature),
        TAIL=bool(tail), HAS_CE=has_ce, SAME_T=float(inv_temperature) == 1.0, WRITE_GRAD=bool(need_grad),
        BLOCK_V=block, BLOCK_K=block_k, LOG_K=log_k, num_warps=num_warps(block)))
    return loss, grad
