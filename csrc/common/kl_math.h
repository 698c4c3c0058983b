// Per-row and per-element math of the fused KL-divergence kernels, shared by the CPU kernel
// (csrc/cpu/kl_div.cpp) and the CUDA kernel (csrc/cuda/kl_div.cu) so that the CPU tests exercise the
// arithmetic the GPU runs.
//
// Notation (per row): a = student * inv_T, b = teacher * inv_T, Q = softmax(a), P = softmax(b).
//   mode 0 forward  D = KL(P || Q) = sum_k P_k (log P_k - log Q_k)
//   mode 1 reverse  D = KL(Q || P) = sum_k Q_k (log Q_k - log P_k)
//   mode 2 JSD      M = beta P + (1 - beta) Q,  D = beta KL(P || M) + (1 - beta) KL(Q || M)
//                   (TRL GKD / Liger convention; the ends beta = 0 / 1 are run as forward / reverse KL)
// The gradient returned is w * scale * dD/d(student) = coef * dD/da with coef = w * scale * inv_T.
//
// Online softmax: KlState (KlStateT<float>; the CPU kernel also merges vectors of lane states) keeps,
// for both inputs, a running max m and s = sum exp(x - m), plus the
// "cross" sum of forward/reverse KL, C = sum_k e_k * d_k with e = exp(b - m_b), d = b - a (forward)
// or e = exp(a - m_a), d = a - b (reverse), kept relative to the same max as its weights. Then
//   forward: D = C / s_b + lse_a - lse_b        reverse: D = C / s_a + lse_b - lse_a.
//
// Zero-probability rules: a term weighted by a zero probability (e == 0: a -inf logit, or one that
// underflows) contributes exactly 0, never 0 * inf = NaN; a term whose weight is positive and whose
// log-ratio is +inf makes D = +inf. Rescaling keeps +inf cross sums infinite (inf * 0 would be NaN).
// A row whose teacher is entirely -inf (no target distribution; a fully masked vocabulary) while the
// student is a distribution is "empty": D = 0 and a zero gradient, like a masked token (KlRow::empty;
// the kernels' drivers write the zeros). A row whose student is entirely -inf, or that contains a NaN,
// gets D = NaN.
//
// The element formulas are templates over the value type T so the CPU kernel can instantiate them
// with GCC vector types (float vectors; comparisons give integer-vector masks, `m ? x : y` selects
// lane-wise) and the CUDA kernel with float. Transcendentals come from a Math policy with static
// exp(x) and log1p_recip01(x, log1p(x), 1 / (1 + x)) for x in [0, 1]; StdMath below is the scalar one
// for host and device.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common/macros.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MINITRON_KL_INLINE MINITRON_HD
#else
#define MINITRON_KL_INLINE inline __attribute__((always_inline))
#endif

namespace minitron {
namespace kl {

enum Mode : int { kForward = 0, kReverse = 1, kJsd = 2 };

MINITRON_KL_INLINE float kl_nan() {
  uint32_t bits = 0x7fc00000u;
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

// Scalar math policy (host: libm; device: CUDA's expf/logf, fast intrinsics under --use_fast_math).
struct StdMath {
  static MINITRON_KL_INLINE float exp(float x) { return ::expf(x); }
  static MINITRON_KL_INLINE float log(float x) { return ::logf(x); }
  // log1p(x) and 1 / (1 + x) for x in [0, 1]
  static MINITRON_KL_INLINE void log1p_recip01(float x, float& log1p_x, float& recip_1px) {
    log1p_x = ::log1pf(x);
    recip_1px = 1.f / (1.f + x);
  }
};

// ----------------------------------------------------------------------------------------------
// Generic helpers (T = float or a GCC float vector)
// ----------------------------------------------------------------------------------------------
template <class T>
MINITRON_KL_INLINE T kl_splat(float x) {
  return T{} + x;
}

template <class M, class T>
MINITRON_KL_INLINE T kl_select(const M& mask, const T& a, const T& b) {
  return mask ? a : b;
}

// e * d, or exactly 0 where the weight e is 0 (so 0 * inf never makes a NaN; NaN e stays NaN).
template <class T>
MINITRON_KL_INLINE T kl_masked_term(const T& e, const T& d) {
  const T zero = kl_splat<T>(0.f);
  return kl_select(e == zero, zero, e * d);
}

// acc + e * d, with acc unchanged where e == 0 (the accumulating form of kl_masked_term; one masked
// FMA on AVX-512).
template <class T>
MINITRON_KL_INLINE T kl_masked_accum(const T& acc, const T& e, const T& d) {
  return kl_select(e == kl_splat<T>(0.f), acc, acc + e * d);
}

// x * r for rescaling a sum to a larger max; a +inf sum stays +inf even when r underflows to 0.
template <class T>
MINITRON_KL_INLINE T kl_rescale(const T& x, const T& r) {
  return kl_select(x == kl_splat<T>(INFINITY), x, x * r);
}

// ----------------------------------------------------------------------------------------------
// Per-row online-softmax state
// ----------------------------------------------------------------------------------------------
// T = float for a row / a thread's share; a float vector for W lane-wise states (CPU).
template <class T>
struct KlStateT {
  T ma;  // running max of a
  T sa;  // sum exp(a - ma)
  T mb;  // running max of b
  T sb;  // sum exp(b - mb)
  T c;   // cross sum (forward: relative to mb, reverse: relative to ma; JSD: unused, 0)
};
typedef KlStateT<float> KlState;

MINITRON_KL_INLINE KlState kl_state_init() {
  KlState st;
  st.ma = -INFINITY;
  st.sa = 0.f;
  st.mb = -INFINITY;
  st.sb = 0.f;
  st.c = 0.f;
  return st;
}

// Online update with one element x of one input: returns the rescale factor r applied to the old
// sum (1 if the max did not move) and the weight e = exp(x - m_new) of the new element.
template <class Math>
MINITRON_KL_INLINE void kl_softmax_update(float& m, float& s, float x, float& r, float& e) {
  if (x > m) {  // new max (m = -inf initially: r = exp(-inf) = 0)
    r = Math::exp(m - x);
    e = 1.f;
    s = s * r + 1.f;
    m = x;
  } else {  // also NaN x: e = NaN poisons the sum
    r = 1.f;
    e = (x == -INFINITY) ? 0.f : Math::exp(x - m);
    s += e;
  }
}

// Feed one element pair (a_k, b_k) (already multiplied by inv_T).
template <int MODE, class Math>
MINITRON_KL_INLINE void kl_state_update(KlState& st, float a, float b) {
  float ra, ea, rb, eb;
  kl_softmax_update<Math>(st.ma, st.sa, a, ra, ea);
  kl_softmax_update<Math>(st.mb, st.sb, b, rb, eb);
  if (MODE == kForward) {
    st.c = kl_rescale(st.c, rb) + kl_masked_term(eb, b - a);
  } else if (MODE == kReverse) {
    st.c = kl_rescale(st.c, ra) + kl_masked_term(ea, a - b);
  }
}

// Combine two states (of disjoint parts of a row), e.g. per-thread / per-chunk partial states.
// Branch-free (T may be a vector of lane states) and symmetric in its arguments up to rounding (FMA
// contraction may round s1 r1 + s2 r2 differently from s2 r2 + s1 r1), so butterfly merges must
// take one participant's result. An empty side (max -inf) contributes 0; a NaN max poisons the sum
// through exp(NaN).
template <class Math, class T>
MINITRON_KL_INLINE void kl_merge_softmax(const T& m1, const T& s1, const T& m2, const T& s2, T& m, T& s, T& r1,
                                         T& r2) {
  const T zero = kl_splat<T>(0.f);
  m = kl_select(m1 > m2, m1, m2);
  const auto empty = m == kl_splat<T>(-INFINITY);  // both sides all -inf: exp(-inf - -inf) would be NaN
  r1 = kl_select(empty, zero, Math::exp(m1 - m));
  r2 = kl_select(empty, zero, Math::exp(m2 - m));
  s = s1 * r1 + s2 * r2;
}

template <int MODE, class Math, class T>
MINITRON_KL_INLINE KlStateT<T> kl_state_merge(const KlStateT<T>& x, const KlStateT<T>& y) {
  KlStateT<T> o;
  T xa, ya, xb, yb;
  kl_merge_softmax<Math>(x.ma, x.sa, y.ma, y.sa, o.ma, o.sa, xa, ya);
  kl_merge_softmax<Math>(x.mb, x.sb, y.mb, y.sb, o.mb, o.sb, xb, yb);
  if (MODE == kForward) {
    o.c = kl_rescale(x.c, xb) + kl_rescale(y.c, yb);
  } else if (MODE == kReverse) {
    o.c = kl_rescale(x.c, xa) + kl_rescale(y.c, ya);
  } else {
    o.c = kl_splat<T>(0.f);
  }
  return o;
}

// Row statistics after pass 1: log-sum-exps and (forward/reverse) the divergence D.
struct KlRow {
  float lse_a;
  float lse_b;
  float div;       // JSD: filled in after the second pass
  float lse_diff;  // lse_a - lse_b, as (m_a - m_b) + log(s_a / s_b) (see kl_finalize); use it, not the difference
  bool empty;  // the teacher row is entirely -inf (and the student a distribution): D = 0, gradient 0
};

template <int MODE, class Math>
MINITRON_KL_INLINE KlRow kl_finalize(const KlState& st) {
  KlRow row;
  row.empty = st.sb == 0.f && st.sa > 0.f && st.sa < INFINITY && st.ma > -INFINITY && st.ma < INFINITY;
  if (row.empty) {
    row.lse_a = 0.f;
    row.lse_b = 0.f;
    row.div = 0.f;
    row.lse_diff = 0.f;
    return row;
  }
  if (!(st.sa > 0.f) || !(st.sb > 0.f)) {  // an all -inf student, or NaN somewhere
    row.lse_a = kl_nan();
    row.lse_b = kl_nan();
    row.div = kl_nan();
    row.lse_diff = kl_nan();
    return row;
  }
  row.lse_a = st.ma + Math::log(st.sa);
  row.lse_b = st.mb + Math::log(st.sb);
  // For soft (high-temperature) rows the two log-sum-exps nearly cancel: the log of the ratio of the sums
  // (near 1) avoids the rounding of two large logs (~1e-7 log V each). The gradients use the same value, so
  // it cancels exactly in the reverse-KL gradient's (log Q_k - log P_k) - D.
  row.lse_diff = (st.ma - st.mb) + Math::log(st.sa / st.sb);
  if (MODE == kForward) {
    row.div = st.c / st.sb + row.lse_diff;
  } else if (MODE == kReverse) {
    row.div = st.c / st.sa - row.lse_diff;
  } else {
    row.div = 0.f;
  }
  return row;
}

// Probability from a logit (times inv_T) and its row's log-sum-exp; -inf -> 0.
template <class Math, class T>
MINITRON_KL_INLINE T kl_prob(const T& x, float lse) {
  return Math::exp(x - lse);
}

// ----------------------------------------------------------------------------------------------
// Per-element gradients (dD/da_k times coef)
// ----------------------------------------------------------------------------------------------

// forward KL(P || Q): dD/da = Q - P.
template <class T>
MINITRON_KL_INLINE T kl_forward_grad(const T& q, const T& p, float coef) {
  return (q - p) * coef;
}

// The same from unnormalised weights: Q = ea * qn, P = eb * pn with the normalisers (and coef)
// folded into qn = coef * exp(m_a - lse_a), pn = coef * exp(m_b - lse_b).
template <class T>
MINITRON_KL_INLINE T kl_forward_grad_unnorm(const T& ea, const T& qn, const T& eb, const T& pn) {
  return ea * qn - eb * pn;
}

// reverse KL(Q || P): dD/da_k = Q_k ((log Q_k - log P_k) - D); 0 where Q_k = 0.
// log_ratio = log Q_k - log P_k = (a_k - b_k) - (lse_a - lse_b).
template <class T>
MINITRON_KL_INLINE T kl_reverse_grad(const T& q, const T& log_ratio, float div, float coef) {
  const T zero = kl_splat<T>(0.f);
  return kl_select(q == zero, zero, q * (log_ratio - div) * coef);
}

// ----------------------------------------------------------------------------------------------
// Generalised JSD, 0 < beta < 1 (beta = 0 / 1 are run as forward / reverse KL, as in TRL)
// ----------------------------------------------------------------------------------------------
struct JsdConsts {
  float beta;            // weight of KL(P || M) and of P in M
  float one_minus_beta;  // weight of KL(Q || M) and of Q in M
  float log_beta;
  float log_one_minus_beta;
  float log_odds;  // log(beta) - log(1 - beta)
};

// From the caller's double beta (host side): 1 - beta and the logs are formed in double, so a beta close to 1
// (e.g. 1 - 1e-7, whose float rounding would move 1 - beta by 20%) keeps an accurate 1 - beta.
MINITRON_KL_INLINE JsdConsts jsd_consts(double beta) {
  JsdConsts k;
  k.beta = static_cast<float>(beta);
  k.one_minus_beta = static_cast<float>(1.0 - beta);
  k.log_beta = static_cast<float>(::log(beta));
  k.log_one_minus_beta = static_cast<float>(::log1p(-beta));
  k.log_odds = static_cast<float>(::log(beta) - ::log1p(-beta));
  return k;
}

// One vocabulary entry of the JSD. Inputs: p = P_k, q = Q_k, lp_lq = log P_k - log Q_k
// (= (b_k - a_k) - (lse_b - lse_a); -inf / +inf when one of them is zero). Outputs:
//   loss = beta P_k log(P_k / M_k) + (1 - beta) Q_k log(Q_k / M_k)   (zero-probability terms are 0)
//   g    = dD/dQ_k up to a constant (which cancels in Q_k (g_k - sum_j Q_j g_j)); 0 where Q_k = 0:
//          dD/dQ_k = (1 - beta) (log(Q_k / M_k) + 1) - (1 - beta) (beta P_k + (1 - beta) Q_k) / M_k
//                  = (1 - beta) log(Q_k / M_k)   (the mixture is M itself, so the ratio is 1)
// With u = log(beta P), v = log((1 - beta) Q), z = u - v, e = exp(-|z|):
//   log M = max(u, v) + log1p(e),  log(P/M) = min(z, 0) - log1p(e) - log(beta),
//   log(Q/M) = min(-z, 0) - log1p(e) - log(1 - beta),
// all finite and stable for any logits (no M that underflows, no log of 0).
template <class Math, class T>
MINITRON_KL_INLINE void jsd_element(const T& p, const T& q, const T& lp_lq, const JsdConsts& k, T& loss, T& g) {
  const T zero = kl_splat<T>(0.f);
  const T z = lp_lq + k.log_odds;
  const auto neg = z < zero;
  const T nz = -z;
  const T e = Math::exp(kl_select(neg, z, nz));  // exp(-|z|) in [0, 1]
  T l1p, inv;
  Math::log1p_recip01(e, l1p, inv);  // (the reciprocal is not needed; the compiler drops it)
  (void)inv;
  const T log_pm = kl_select(neg, z, zero) - (l1p + k.log_beta);
  const T log_qm = kl_select(neg, zero, nz) - (l1p + k.log_one_minus_beta);
  loss = kl_masked_term(p, log_pm) * k.beta + kl_masked_term(q, log_qm) * k.one_minus_beta;
  g = kl_select(q == zero, zero, log_qm * k.one_minus_beta);
}

// Per-row (or per-segment) sums of the JSD's second pass: D, sum_j Q_j g_j and sum_j Q_j. The last two are
// accumulated in double from exact products (float x float fits a double): when Q is peaked at k, the
// gradient Q_k (g_k - G) is a difference of two nearly equal numbers of the size of g (up to |log beta|),
// and a float G would leave an error of one float ulp of g in it, far above the true value.
struct JsdPartial {
  float loss;
  double qg;
  double q;
};

// G = sum_j Q_j g_j / sum_j Q_j (normalised, so rounding in the Q_j does not shift it) as a float pair
// hi + lo: (g_k - hi) is exact when g_k is close to G (Sterbenz), so (g_k - hi) - lo keeps the small
// difference accurate.
struct JsdCentre {
  float hi;
  float lo;
};

MINITRON_KL_INLINE JsdCentre jsd_centre(double qg, double q) {
  const double c = q > 0.0 ? qg / q : 0.0;
  JsdCentre out;
  out.hi = static_cast<float>(c);
  out.lo = static_cast<float>(c - static_cast<double>(out.hi));
  return out;
}

// dD/da_k = Q_k (g_k - G), times coef; 0 where Q_k = 0.
template <class T>
MINITRON_KL_INLINE T jsd_grad(const T& q, const T& g, const JsdCentre& c, float coef) {
  const T zero = kl_splat<T>(0.f);
  return kl_select(q == zero, zero, q * ((g - c.hi) - c.lo) * coef);
}

}  // namespace kl
}  // namespace minitron
