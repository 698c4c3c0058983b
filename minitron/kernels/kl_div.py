"""Triton kernels for the fused KL-divergence op family (forward KL, reverse KL, generalised JSD).

One program handles one row (token) of the ``[N, V]`` student/teacher logits. The vocabulary is
streamed in ``BLOCK_V`` chunks with masks, so ``V`` may be large and not a multiple of the block:

* pass 1 -- online softmax statistics of both distributions (running max and rescaled sum) and,
  for forward/reverse KL, the rescaled cross term, which gives the per-row divergence ``D``;
* JSD only: pass 2 -- with both log-normalisers known, ``D`` and ``sum_k Q_k g_k`` (see below);
* last pass -- the gradient w.r.t. the student logits, written once in the input dtype.

Everything is accumulated in fp32; no ``[N, V]`` fp32 temporary exists. Rows with weight 0 are
skipped (loss 0, gradient row 0). Notation: ``a = student * inv_T``, ``b = teacher * inv_T``,
``Q = softmax(a)``, ``P = softmax(b)``. ``-inf`` logits are legal: terms with zero mass on the
"outer" distribution contribute 0, and a term with mass on the outer side but none on the inner
one makes ``D = +inf`` (never NaN from ``0 * inf``). A row whose teacher is entirely ``-inf`` (and whose
student is a distribution) contributes 0 with a zero gradient, like a masked token; a row with NaN
anywhere, or whose student is entirely ``-inf``, gets a NaN loss.

The public op (validation, reductions, autograd, dispatch) lives in :mod:`minitron.ops.kl`;
this module only implements the backend contract :func:`kl_div_fwd`.
"""
from __future__ import annotations

import logging
import math
import struct

import torch
import triton
import triton.language as tl

from minitron.kernels._launch import block_v as block_v_for
from minitron.kernels._launch import launch, num_warps, require_interpreter

log = logging.getLogger(__name__)

__all__ = ["kl_div_fwd", "kl_div_stats", "kl_div_jsd_sums", "kl_div_vp_fwd", "MODE_FORWARD", "MODE_REVERSE",
           "MODE_JSD"]

MODE_FORWARD = 0  # KL(P || Q)
MODE_REVERSE = 1  # KL(Q || P)
MODE_JSD = 2  # beta * KL(P || M) + (1 - beta) * KL(Q || M),  M = beta P + (1 - beta) Q (TRL convention)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _online_update(x, m, s_vec):
    """One online-softmax step for a chunk ``x`` [BLOCK_V] fp32 (masked lanes are -inf).

    ``m`` is the running max (fp32 scalar, -inf before any finite value), ``s_vec`` the per-lane
    sums [BLOCK_V] of ``exp(x - m)``. Returns ``(m_new, m_safe, alpha, e, s_vec_new)`` where
    ``m_safe`` replaces a still-``-inf`` max by 0 so that ``exp(-inf - m_safe)`` is 0 rather than
    NaN, ``alpha = exp(m - m_safe)`` rescales previous sums and ``e = exp(x - m_safe)``.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe)
    return m_new, m_safe, alpha, e, s_vec * alpha + e


@triton.jit
def _jsd_terms(a, b, lse_a, lse_b, lse_diff, beta, one_m_beta, log_beta, log_1m_beta):
    """Per-element JSD pieces for one chunk (all [BLOCK_V] fp32), M = beta P + (1 - beta) Q.

    Returns ``(d_term, g, log_q)``: ``d_term`` = this element's contribution to
    ``D = beta * KL(P||M) + (1 - beta) * KL(Q||M)``; ``g`` = ``dD/dQ_k = (1 - beta) log(Q_k / M_k)`` without
    the constant (it cancels in the softmax Jacobian), only meaningful where ``log_q > -inf``. As
    csrc/common/kl_math.h jsd_element: from ``z = log(beta P) - log((1 - beta) Q)``, built from the difference
    of the logits and ``lse_diff`` (no difference of two rounded log-probabilities),
    ``log(P/M) = min(z, 0) - log1p(exp(-|z|)) - log(beta)``, ``log(Q/M) = min(-z, 0) - log1p(exp(-|z|)) - log(1-beta)``.
    """
    log_p = b - lse_b
    log_q = a - lse_a
    z = ((b - a) + lse_diff) + (log_beta - log_1m_beta)
    e = tl.exp(-tl.abs(z))
    l1p = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))  # log1p(e), e in [0, 1]
    log_pm = tl.minimum(z, 0.0) - l1p - log_beta
    log_qm = tl.minimum(-z, 0.0) - l1p - log_1m_beta
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    # zero-probability terms are exactly 0 (M_k > 0 wherever P_k > 0 or Q_k > 0 for 0 < beta < 1)
    t_p = tl.where(log_p == float("-inf"), 0.0, p * log_pm)
    t_q = tl.where(log_q == float("-inf"), 0.0, q * log_qm)
    d_term = beta * t_p + one_m_beta * t_q
    g = one_m_beta * log_qm
    return d_term, g, log_q


@triton.jit
def _load_scaled(s_row, t_row, idx, msk, inv_t):
    """Student and teacher logits of one chunk in fp32, divided by T; -inf beyond the row."""
    a = tl.load(s_row + idx, mask=msk, other=float("-inf")).to(tl.float32) * inv_t
    b = tl.load(t_row + idx, mask=msk, other=float("-inf")).to(tl.float32) * inv_t
    return a, b


@triton.jit
def _jsd_row_sums(s_row, t_row, V, inv_t, lse_a, lse_b, lse_diff, beta, one_m_beta, log_beta, log_1m_beta,
                  BLOCK_V: tl.constexpr):
    """One row's JSD sums over its ``V`` columns: ``(sum of the divergence terms (fp32), sum_k Q_k g_k,
    sum_k Q_k)``, the last two in float64 (see csrc/common/kl_math.h JsdPartial: for a peaked Q the gradient
    Q_k (g_k - G) cancels down to the rounding of G)."""
    ninf = float("-inf")
    offs = tl.arange(0, BLOCK_V)
    d_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    qg_vec = tl.zeros([BLOCK_V], dtype=tl.float64)
    qs_vec = tl.zeros([BLOCK_V], dtype=tl.float64)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        a, b = _load_scaled(s_row, t_row, idx, idx < V, inv_t)
        d_term, g, log_q = _jsd_terms(a, b, lse_a, lse_b, lse_diff, beta, one_m_beta, log_beta, log_1m_beta)
        d_vec += d_term
        q = tl.where(log_q == ninf, 0.0, tl.exp(log_q))
        qg_vec += q.to(tl.float64) * tl.where(log_q == ninf, 0.0, g).to(tl.float64)
        qs_vec += q.to(tl.float64)
    return tl.sum(d_vec, axis=0), tl.sum(qg_vec, axis=0), tl.sum(qs_vec, axis=0)


@triton.jit
def _jsd_centre(qg, qs):
    """``G = sum Q g / sum Q`` (fp64 sums) as an fp32 pair ``(hi, lo)`` with ``hi + lo`` ~ G."""
    centre = qg / tl.where(qs > 0.0, qs, 1.0)
    c_hi = centre.to(tl.float32)
    c_lo = (centre - c_hi.to(tl.float64)).to(tl.float32)
    return c_hi, c_lo


@triton.jit
def _jsd_grad(a, b, lse_a, lse_b, lse_diff, beta, one_m_beta, log_beta, log_1m_beta, coef, c_hi, c_lo):
    """The JSD gradient of one chunk: ``coef * Q * (g - G)``, 0 where Q = 0 (``G = c_hi + c_lo``)."""
    d_term, g, log_q = _jsd_terms(a, b, lse_a, lse_b, lse_diff, beta, one_m_beta, log_beta, log_1m_beta)
    return tl.where(log_q == float("-inf"), 0.0, coef * tl.exp(log_q) * ((g - c_hi) - c_lo))


@triton.jit
def _kl_div_fwd_kernel(
    s_ptr, t_ptr, w_ptr, loss_ptr, grad_ptr,
    V, stride_s, stride_t,
    inv_t, beta, one_m_beta, log_beta, log_1m_beta, scale,
    MODE: tl.constexpr, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """One program per row. Loads [BLOCK_V] chunks of student/teacher row ``pid`` (any float dtype),
    writes ``loss[pid]`` (fp32) and, when WRITE_GRAD, ``grad[pid, :]`` (grad dtype, contiguous rows of
    length V); without WRITE_GRAD the gradient passes are compiled out (loss only)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g_row = grad_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    w = tl.load(w_ptr + row)

    if w == 0.0:
        if WRITE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                idx = start + offs
                tl.store(g_row + idx, zeros.to(grad_ptr.dtype.element_ty), mask=idx < V)
        loss = w * 0.0
    else:
        ninf = float("-inf")
        m_a = tl.full((), ninf, tl.float32)
        m_b = tl.full((), ninf, tl.float32)
        s_a = tl.zeros([BLOCK_V], dtype=tl.float32)
        s_b = tl.zeros([BLOCK_V], dtype=tl.float32)
        cross = tl.zeros([BLOCK_V], dtype=tl.float32)
        inf_hit = tl.zeros([BLOCK_V], dtype=tl.int32)
        # ---- pass 1: online softmax statistics (+ cross term for forward / reverse KL) ----
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            msk = idx < V
            a, b = _load_scaled(s_row, t_row, idx, msk, inv_t)
            m_a, m_a_safe, alpha_a, e_a, s_a = _online_update(a, m_a, s_a)
            m_b, m_b_safe, alpha_b, e_b, s_b = _online_update(b, m_b, s_b)
            if MODE == 0:
                # sum_k exp(b_k - m_b) (b_k - a_k) over P_k > 0; P_k > 0 = Q_k -> D = +inf.
                both = (b != ninf) & (a != ninf)
                cross = cross * alpha_b + tl.where(both, e_b * (b - a), 0.0)
                inf_hit = tl.maximum(inf_hit, ((b != ninf) & (a == ninf)).to(tl.int32))
            elif MODE == 1:
                both = (b != ninf) & (a != ninf)
                cross = cross * alpha_a + tl.where(both, e_a * (a - b), 0.0)
                inf_hit = tl.maximum(inf_hit, ((a != ninf) & (b == ninf)).to(tl.int32))
        z_a = tl.sum(s_a, axis=0)
        z_b = tl.sum(s_b, axis=0)
        lse_a = m_a + tl.log(z_a)
        lse_b = m_b + tl.log(z_b)
        # An all -inf teacher row (no target) while the student is a distribution: loss 0, zero gradient, like a
        # masked token (see csrc/common/kl_math.h). Otherwise a distribution with no finite logit gives NaN.
        empty = (z_b == 0.0) & (z_a > 0.0) & (lse_a > ninf) & (lse_a < float("inf"))
        degenerate = ((z_a == 0.0) | (z_b == 0.0)) & (~empty)
        lse_b = tl.where(empty, 0.0, lse_b)
        # lse_a - lse_b as (m_a - m_b) + log(z_a / z_b): for soft (high-temperature) rows the log of the ratio
        # (near 1) avoids the rounding of two large logs (as csrc/common/kl_math.h kl_finalize)
        lse_diff = (m_a - m_b) + tl.log(z_a / z_b)
        coef = w * scale * inv_t

        if MODE == 0:
            # d_extra: 0 normally, +inf when some P_k > 0 = Q_k, NaN for a degenerate row.
            d_extra = tl.where(tl.max(inf_hit, axis=0) > 0, float("inf"), 0.0)
            d_extra = tl.where(degenerate, float("nan"), d_extra)
            d = tl.sum(cross, axis=0) / z_b + lse_diff + d_extra
            # ---- pass 2: grad = coef * (Q - P) ----
            if WRITE_GRAD:
                for start in range(0, V, BLOCK_V):
                    idx = start + offs
                    msk = idx < V
                    a, b = _load_scaled(s_row, t_row, idx, msk, inv_t)
                    g = coef * (tl.exp(a - lse_a) - tl.exp(b - lse_b))
                    g = tl.where(empty, 0.0, g)
                    tl.store(g_row + idx, g.to(grad_ptr.dtype.element_ty), mask=msk)
        elif MODE == 1:
            mean_ab = tl.sum(cross, axis=0) / z_a  # E_Q[a - b] over finite terms
            # d_extra: 0 normally, +inf when some Q_k > 0 = P_k, NaN for a degenerate row.
            d_extra = tl.where(tl.max(inf_hit, axis=0) > 0, float("inf"), 0.0)
            d_extra = tl.where(degenerate, float("nan"), d_extra)
            d = mean_ab - lse_diff + d_extra
            # ---- pass 2: grad = coef * Q * ((log Q - log P) - D), 0 where Q = 0 ----
            # (log Q_k - log P_k) - D = (a_k - b_k) - E_Q[a - b] - d_extra: the log-normalisers
            # cancel exactly, so they add no rounding error to this difference.
            if WRITE_GRAD:
                for start in range(0, V, BLOCK_V):
                    idx = start + offs
                    msk = idx < V
                    a, b = _load_scaled(s_row, t_row, idx, msk, inv_t)
                    g = tl.exp(a - lse_a) * (((a - b) - mean_ab) - d_extra)
                    g = tl.where(empty, 0.0, tl.where(a == ninf, 0.0, coef * g))
                    tl.store(g_row + idx, g.to(grad_ptr.dtype.element_ty), mask=msk)
        else:
            # ---- pass 2: D and G = sum_k Q_k g_k / sum_k Q_k ----
            d, qg, qs = _jsd_row_sums(s_row, t_row, V, inv_t, lse_a, lse_b, lse_diff, beta, one_m_beta, log_beta,
                                      log_1m_beta, BLOCK_V)
            d = tl.where(degenerate, float("nan"), d)
            c_hi, c_lo = _jsd_centre(qg, qs)
            # ---- pass 3: grad = coef * Q * (g - G), 0 where Q = 0 ----
            if WRITE_GRAD:
                for start in range(0, V, BLOCK_V):
                    idx = start + offs
                    msk = idx < V
                    a, b = _load_scaled(s_row, t_row, idx, msk, inv_t)
                    gr = _jsd_grad(a, b, lse_a, lse_b, lse_diff, beta, one_m_beta, log_beta, log_1m_beta, coef,
                                   c_hi, c_lo)
                    gr = tl.where(empty, 0.0, gr)
                    tl.store(g_row + idx, gr.to(grad_ptr.dtype.element_ty), mask=msk)
        loss = tl.where(empty, 0.0, w * scale * d)
    tl.store(loss_ptr + row, loss)


def _float32_end_mode(mode: int, beta: float) -> int:
    """A JSD whose beta is (or rounds to, in float32) 0 / 1 runs as forward / reverse KL exactly (TRL
    convention), as in the C++ kernels; every other mode is returned unchanged."""
    beta_f = struct.unpack("f", struct.pack("f", float(beta)))[0]
    if mode == MODE_JSD and beta_f == 0.0:
        return MODE_FORWARD
    if mode == MODE_JSD and beta_f == 1.0:
        return MODE_REVERSE
    return mode


def _check_mode(mode: int) -> None:
    if mode not in (MODE_FORWARD, MODE_REVERSE, MODE_JSD):
        raise ValueError(f"mode must be 0 (forward), 1 (reverse) or 2 (jsd), got {mode}")


def kl_div_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    mode: int,
    inv_temperature: float,
    beta: float,
    scale: float,
    *,
    block_v: int | None = None,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence and its gradient w.r.t. the student logits, in one launch.

    Args:
        student: [N, V] logits, float32/bfloat16/float16, ``stride(1) == 1``, ``stride(0) >= V``.
        teacher: [N, V] logits, same dtype and device as ``student``, unit inner stride.
        weight: [N] float32 contiguous per-row weights; rows with weight 0 are skipped.
        mode: 0 = KL(P||Q), 1 = KL(Q||P), 2 = generalised JSD with weight ``beta``, where
            ``P = softmax(teacher * inv_temperature)`` and ``Q = softmax(student * inv_temperature)``.
        inv_temperature: 1 / temperature (> 0).
        beta: JSD weight in [0, 1] (ignored by modes 0 and 1).
        scale: multiplies loss and gradient.
        block_v: vocabulary chunk size (power of two); default picks one from V (tests use it to
            force multi-chunk rows).
        need_grad: False computes the loss only (``grad`` is then an empty ``[0, V]`` tensor and the
            gradient passes are compiled out: nothing of size [N, V] is written).

    Returns:
        ``(loss, grad)``: loss [N] float32 with ``loss_i = weight_i * scale * D_i``; grad [N, V]
        contiguous in the input dtype, ``grad_i = weight_i * scale * dD_i / d student_i``.
    """
    n, v = _check_rows(student, teacher, weight, None)
    _check_mode(mode)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n if need_grad else 0, v), dtype=student.dtype, device=student.device)
    if n == 0 or v == 0:
        return loss, grad.zero_()
    require_interpreter(student.device, "kl_div")
    block = block_v_for(v, block_v)
    mode = _float32_end_mode(mode, beta)
    # 1 - beta and the logs are formed in double (1 - beta of a float32 beta near 1 is off).
    jsd = _jsd_args(beta) if mode == MODE_JSD else (float(beta), 1.0 - float(beta), 0.0, 0.0)
    log.debug("kl_div triton: N=%d V=%d mode=%d block=%d dtype=%s", n, v, mode, block, student.dtype)
    launch(student.device, lambda: _kl_div_fwd_kernel[(n,)](
        student, teacher, weight, loss, grad if need_grad else student,  # unused without WRITE_GRAD
        v, student.stride(0), teacher.stride(0), float(inv_temperature), *jsd, float(scale),
        MODE=mode, BLOCK_V=block, WRITE_GRAD=bool(need_grad), num_warps=num_warps(block)))
    return loss, grad


# ------------------------------------------------------------------------------------------------
# Vocab-parallel pieces (minitron.ops.kl_vocab_parallel, kl_div(..., process_group=...)): one program per row of
# one rank's [N, V_local] slice; the row statistics are combined across ranks between the launches.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _kl_div_stats_kernel(
    s_ptr, t_ptr, w_ptr, out_ptr,
    V, stride_s, stride_t, inv_t,
    MODE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Row ``pid``'s online-softmax state of the slice, ``out[pid] = (m_a, s_a, m_b, s_b, c)`` (fp32), as
    csrc/common/kl_math.h KlState: ``c`` = sum e_b (b - a) relative to m_b (forward) or e_a (a - b) relative to
    m_a (reverse), a zero-weight term exactly 0 and a +inf sum kept +inf through rescaling; rows with weight 0
    get ``(-inf, 0, -inf, 0, 0)``."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK_V)
    w = tl.load(w_ptr + row)
    ninf = float("-inf")
    m_a = tl.full((), ninf, tl.float32)
    m_b = tl.full((), ninf, tl.float32)
    s_a = tl.zeros([BLOCK_V], dtype=tl.float32)
    s_b = tl.zeros([BLOCK_V], dtype=tl.float32)
    cross = tl.zeros([BLOCK_V], dtype=tl.float32)
    if w != 0.0:
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            msk = idx < V
            a, b = _load_scaled(s_row, t_row, idx, msk, inv_t)
            m_a, m_a_safe, alpha_a, e_a, s_a = _online_update(a, m_a, s_a)
            m_b, m_b_safe, alpha_b, e_b, s_b = _online_update(b, m_b, s_b)
            if MODE == 0:
                cross = tl.where(cross == float("inf"), cross, cross * alpha_b)
                cross += tl.where(e_b == 0.0, 0.0, e_b * (b - a))
            elif MODE == 1:
                cross = tl.where(cross == float("inf"), cross, cross * alpha_a)
                cross += tl.where(e_a == 0.0, 0.0, e_a * (a - b))
    o = out_ptr + row * 5
    tl.store(o, m_a)
    tl.store(o + 1, tl.sum(s_a, axis=0))
    tl.store(o + 2, m_b)
    tl.store(o + 3, tl.sum(s_b, axis=0))
    tl.store(o + 4, tl.sum(cross, axis=0))


@triton.jit
def _global_row(st_ptr, row, MODE: tl.constexpr):
    """From the global statistics of a row (as csrc/common/kl_math.h kl_finalize): ``(lse_a, lse_b, lse_diff, div,
    empty)``; NaN values for a row without a distribution, ``empty`` for an all -inf teacher row."""
    st = st_ptr + row * 5
    m_a = tl.load(st)
    s_a = tl.load(st + 1)
    m_b = tl.load(st + 2)
    s_b = tl.load(st + 3)
    c = tl.load(st + 4)
    empty = (s_b == 0.0) & (s_a > 0.0) & (s_a < float("inf")) & (m_a > float("-inf")) & (m_a < float("inf"))
    bad = (~((s_a > 0.0) & (s_b > 0.0))) & (~empty)
    nan = float("nan")
    lse_a = tl.where(bad, nan, m_a + tl.log(s_a))
    lse_b = tl.where(bad, nan, m_b + tl.log(s_b))
    lse_diff = tl.where(bad, nan, (m_a - m_b) + tl.log(s_a / s_b))
    if MODE == 0:
        div = c / s_b + lse_diff
    elif MODE == 1:
        div = c / s_a - lse_diff
    else:
        div = lse_diff * 0.0
    return lse_a, lse_b, lse_diff, div, empty


@triton.jit
def _kl_div_jsd_sums_kernel(
    s_ptr, t_ptr, w_ptr, st_ptr, out_ptr,
    V, stride_s, stride_t,
    inv_t, beta, one_m_beta, log_beta, log_1m_beta,
    BLOCK_V: tl.constexpr,
):
    """Row ``pid``'s JSD sums over the slice given the global statistics: ``out[pid] = (sum of the divergence
    terms, sum Q_k g_k, sum Q_k)`` (fp64), zeros for rows with weight 0 and all -inf teacher rows."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    w = tl.load(w_ptr + row)
    lse_a, lse_b, lse_diff, div, empty = _global_row(st_ptr, row, 2)
    d = tl.full((), 0.0, tl.float32)
    qg = tl.full((), 0.0, tl.float64)
    qs = tl.full((), 0.0, tl.float64)
    skip = (w == 0.0) | empty
    if not skip:
        d, qg, qs = _jsd_row_sums(s_row, t_row, V, inv_t, lse_a, lse_b, lse_diff, beta, one_m_beta, log_beta,
                                  log_1m_beta, BLOCK_V)
    o = out_ptr + row * 3
    tl.store(o, d.to(tl.float64))
    tl.store(o + 1, qg)
    tl.store(o + 2, qs)


@triton.jit
def _kl_div_vp_fwd_kernel(
    s_ptr, t_ptr, w_ptr, st_ptr, sums_ptr, loss_ptr, grad_ptr,
    V, stride_s, stride_t,
    inv_t, beta, one_m_beta, log_beta, log_1m_beta, scale,
    MODE: tl.constexpr, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """Row ``pid``'s loss (whole row, from the global statistics and, for the JSD, the global sums) and, when
    WRITE_GRAD, the gradient of the slice (as csrc/common/kl_math.h: forward ``Q - P``, reverse
    ``Q ((log Q - log P) - D)``, JSD ``Q (g - G)``, times ``w * scale / T``)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g_row = grad_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    w = tl.load(w_ptr + row)
    lse_a, lse_b, lse_diff, div, empty = _global_row(st_ptr, row, MODE)
    skip = (w == 0.0) | empty
    coef = w * scale * inv_t
    if MODE == 2:
        sm = sums_ptr + row * 3
        div = tl.where(lse_a == lse_a, tl.load(sm).to(tl.float32), lse_a)  # NaN rows stay NaN
        c_hi, c_lo = _jsd_centre(tl.load(sm + 1), tl.load(sm + 2))
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            msk = idx < V
            a, b = _load_scaled(s_row, t_row, idx, msk, inv_t)
            if MODE == 0:
                g = coef * (tl.exp(a - lse_a) - tl.exp(b - lse_b))
            elif MODE == 1:
                q = tl.exp(a - lse_a)
                g = tl.where(q == 0.0, 0.0, q * (((a - b) - lse_diff) - div) * coef)
            else:
                g = _jsd_grad(a, b, lse_a, lse_b, lse_diff, beta, one_m_beta, log_beta, log_1m_beta, coef, c_hi,
                              c_lo)
            g = tl.where(skip, 0.0, g)
            tl.store(g_row + idx, g.to(grad_ptr.dtype.element_ty), mask=msk)
    tl.store(loss_ptr + row, tl.where(skip, 0.0, w * scale * div))


def _check_rows(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                stats: torch.Tensor | None) -> tuple[int, int]:
    """``(N, V)`` after checking the row inputs of every kernel here (and ``stats`` when given)."""
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"student and teacher must be 2-D of the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.dtype not in _DTYPES or teacher.dtype != student.dtype:
        raise TypeError(f"student/teacher dtype must match and be one of {_DTYPES}, got "
                        f"{student.dtype} and {teacher.dtype}")
    n, v = student.shape
    if weight.shape != (n,) or weight.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous float32 [N={n}] tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if stats is not None and (stats.shape != (n, 5) or stats.dtype != torch.float32 or not stats.is_contiguous()):
        raise ValueError(f"stats must be a contiguous float32 [N={n}, 5] tensor, got {stats.dtype} "
                         f"{tuple(stats.shape)}")
    for name, x in (("student", student), ("teacher", teacher), ("weight", weight)) + (
            (("stats", stats),) if stats is not None else ()):
        if x.device != student.device:
            raise ValueError(f"{name} is on {x.device}, the student on {student.device}")
    for name, x in (("student", student), ("teacher", teacher)):
        if v > 0 and n > 0 and (x.stride(1) != 1 or x.stride(0) < v):
            raise ValueError(f"{name} must have stride(1) == 1 and stride(0) >= V, got stride "
                             f"{tuple(x.stride())} for shape {tuple(x.shape)}")
    return n, v


def _jsd_args(beta: float) -> tuple[float, float, float, float]:
    beta = float(beta)
    return beta, 1.0 - beta, math.log(beta), math.log1p(-beta)


def kl_div_stats(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, mode: int,
                 inv_temperature: float, *, block_v: int | None = None) -> torch.Tensor:
    """fp32 ``[N, 5]`` online-softmax statistics ``(m_a, s_a, m_b, s_b, c)`` of each row of a vocabulary slice
    (see ``minitron.ops.kl_vocab_parallel.kl_div_stats``). Inputs as :func:`kl_div_fwd`."""
    n, v = _check_rows(student, teacher, weight, None)
    require_interpreter(student.device, "kl_div")
    _check_mode(mode)
    out = torch.empty((n, 5), dtype=torch.float32, device=student.device)
    if n == 0:
        return out
    block = block_v_for(v, block_v)
    launch(student.device, lambda: _kl_div_stats_kernel[(n,)](
        student, teacher, weight, out, v, student.stride(0), teacher.stride(0), float(inv_temperature),
        MODE=mode, BLOCK_V=block, num_warps=num_warps(block)))
    return out


def kl_div_jsd_sums(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor,
                    inv_temperature: float, beta: float, *, block_v: int | None = None) -> torch.Tensor:
    """fp64 ``[N, 3]`` JSD sums ``(loss terms, sum Q g, sum Q)`` of each row of a vocabulary slice, given the
    global statistics (see ``minitron.ops.kl_vocab_parallel.kl_div_jsd_sums``); ``0 < beta < 1`` in float32."""
    n, v = _check_rows(student, teacher, weight, stats)
    require_interpreter(student.device, "kl_div")
    beta_f = struct.unpack("f", struct.pack("f", float(beta)))[0]
    if not 0.0 < beta_f < 1.0:
        raise ValueError(f"beta must be strictly between 0 and 1 in float32 (the ends are forward / reverse KL), "
                         f"got {beta}")
    out = torch.empty((n, 3), dtype=torch.float64, device=student.device)
    if n == 0:
        return out
    block = block_v_for(v, block_v)
    launch(student.device, lambda: _kl_div_jsd_sums_kernel[(n,)](
        student, teacher, weight, stats, out, v, student.stride(0), teacher.stride(0), float(inv_temperature),
        *_jsd_args(beta), BLOCK_V=block, num_warps=num_warps(block)))
    return out


def kl_div_vp_fwd(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor,
                  jsd_sums: torch.Tensor | None, mode: int, inv_temperature: float, beta: float, scale: float, *,
                  need_grad: bool = True, block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss ``[N]`` fp32 (the whole row's, from the global statistics) and the gradient ``[N, V_local]``
    of a vocabulary slice (see ``minitron.ops.kl_vocab_parallel.kl_div_vp_fwd``); ``jsd_sums`` fp64 ``[N, 3]`` for
    mode 2."""
    n, v = _check_rows(student, teacher, weight, stats)
    require_interpreter(student.device, "kl_div")
    _check_mode(mode)
    mode = _float32_end_mode(mode, beta)
    if mode == MODE_JSD and (jsd_sums is None or jsd_sums.shape != (n, 3) or jsd_sums.dtype != torch.float64
                             or not jsd_sums.is_contiguous() or jsd_sums.device != student.device):
        raise ValueError("the JSD needs jsd_sums, a contiguous float64 [N, 3] tensor on the logits' device")
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n if need_grad else 0, v), dtype=student.dtype, device=student.device)
    if n == 0:
        return loss, grad
    block = block_v_for(v, block_v)
    jsd = _jsd_args(beta) if mode == MODE_JSD else (0.5, 0.5, 0.0, 0.0)
    launch(student.device, lambda: _kl_div_vp_fwd_kernel[(n,)](
        student, teacher, weight, stats, jsd_sums if mode == MODE_JSD else stats, loss,
        grad if need_grad else student, v, student.stride(0), teacher.stride(0), float(inv_temperature), *jsd,
        float(scale), MODE=mode, BLOCK_V=block, WRITE_GRAD=bool(need_grad), num_warps=num_warps(block)))
    return loss, grad
