// Per-token math of the fused hidden-state losses (cosine, MSE), shared by the CPU kernel
// (csrc/cpu/hidden_loss.cpp), the CUDA kernel (csrc/cuda/hidden_loss.cu) and mirrored by the Triton kernel
// (minitron/kernels/hidden_loss.py). Host + device; no torch.
//
// For one token with student row s and teacher row t of D entries and the token's coefficient w (0: skipped):
//   cosine (kCosine):  pass 1 sums  st = s . t, ss = |s|^2, tt = |t|^2                    (fp32 accumulation)
//                      grad   w * (cos / ss) * s  -  w / (|s| |t|) * t  = cs * s + ct * t     (cos = st / (|s||t|))
//                      loss   w * (1 - cos), computed in pass 2 (the gradient pass, which re-reads the row) as
//                             w * min(|s / |s| - t / |t||^2 / 2, 2): the same quantity without the cancellation
//                             of 1 - st / (|s||t|) (whose absolute error is ~1e-7 in fp32 however small the
//                             loss; here the error is relative to the loss itself)
//                      both zero: loss 0; exactly one zero: loss w (cos taken as 0); gradient 0 in both cases;
//                      a non-finite sum (NaN or inf in the row, or overflow): loss and gradient NaN.
//   MSE (kMse):        sum    sq = |s - t|^2;   loss  w * sq / D;   grad  (2 w / D) * (s - t)
//                      (the gradient needs no sum, so the kernels write it in the same pass as sq). NaN and inf
//                      follow the arithmetic (a NaN gives NaN, an inf +inf).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"

namespace minitron {
namespace hidden {

constexpr int kCosine = 0;
constexpr int kMse = 1;

// What a row needs after its pass-1 sums.
struct HlRow {
  float loss;  // MSE: w * l; cosine: the loss of the special rows (zero / non-finite; `regular` false)
  float cs;    // cosine: coefficient of s; MSE: coefficient of (s - t)
  float ct;    // cosine: coefficient of t; MSE: unused (0)
  float us;    // cosine: 1 / |s| (pass 2 sums |s us - t ut|^2)
  float ut;    // cosine: 1 / |t|
  bool regular;  // cosine: both vectors non-zero and finite: the loss comes from pass 2 (hl_cosine_loss)
};

// Per-row sums. MSE uses only `a` (sum of (s - t)^2).
struct HlSums {
  float a;  // cosine: s . t        MSE: |s - t|^2
  float b;  // cosine: |s|^2
  float c;  // cosine: |t|^2
};

MINITRON_HD HlSums hl_sums_zero() { return HlSums{0.f, 0.f, 0.f}; }

MINITRON_HD HlSums hl_sums_add(const HlSums& x, const HlSums& y) { return HlSums{x.a + y.a, x.b + y.b, x.c + y.c}; }

// One element's contribution (F: float or a vector of floats).
template <int MODE, class F>
MINITRON_HD void hl_accum(F& a, F& b, F& c, const F& s, const F& t) {
  if (MODE == kCosine) {
    a += s * t;
    b += s * s;
    c += t * t;
  } else {
    const F d = s - t;
    a += d * d;
  }
}

MINITRON_HD bool hl_finite(float x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

MINITRON_HD float hl_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

MINITRON_HD float hl_nan() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7fc00000);
#else
  return std::numeric_limits<float>::quiet_NaN();
#endif
}

// The cosine row from its pass-1 sums and the token's coefficient w (!= 0).
MINITRON_HD HlRow hl_cosine_row(float st, float ss, float tt, float w) {
  HlRow r{0.f, 0.f, 0.f, 0.f, 0.f, false};
  if (!(hl_finite(st) && hl_finite(ss) && hl_finite(tt))) {
    const float nan = hl_nan();
    r.loss = nan;
    r.cs = nan;
    r.ct = nan;
    return r;
  }
  const bool zs = ss == 0.f, zt = tt == 0.f;
  if (zs && zt) return r;  // both zero: nothing to align
  if (zs || zt) {          // one zero: cos taken as 0, constant in s
    r.loss = w;
    return r;
  }
  const float ns = hl_sqrt(ss), nt = hl_sqrt(tt);
  const float inv = 1.f / (ns * nt);  // the norms separately: ss * tt may overflow
  r.cs = w * ((st * inv) / ss);
  r.ct = -w * inv;
  r.us = 1.f / ns;
  r.ut = 1.f / nt;
  r.regular = true;
  return r;
}

// Pass 2 of a regular cosine row: e += |s us - t ut|^2 per element (F: float or a vector of floats).
template <class F>
MINITRON_HD void hl_cosine_dist(F& e, const F& s, const F& t, float us, float ut) {
  const F d = s * us - t * ut;
  e += d * d;
}

// The loss of a regular cosine row from its pass-2 sum: w (1 - cos) = w |s/|s| - t/|t||^2 / 2, in [0, 2w].
MINITRON_HD float hl_cosine_loss(float e, float w) {
  const float half = 0.5f * e;
  return w * (half > 2.f ? 2.f : half);
}

// The MSE row: loss from the sum of squared differences; the gradient coefficient needs no sum.
MINITRON_HD float hl_mse_coef(float w, int64_t d) { return 2.f * w / static_cast<float>(d); }

MINITRON_HD float hl_mse_loss(float sq, float w, int64_t d) { return w * (sq / static_cast<float>(d)); }

// One gradient element (F: float or a vector of floats).
template <int MODE, class F>
MINITRON_HD F hl_grad(const F& s, const F& t, float cs, float ct) {
  if (MODE == kCosine) return s * cs + t * ct;
  return (s - t) * cs;
}

}  // namespace hidden
}  // namespace minitron
