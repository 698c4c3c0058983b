// Per-token math of the fused hidden-state losses (cosine, MSE), shared by the CPU kernel
// (csrc/cpu/hidden_loss.cpp), the CUDA kernel (csrc/cuda/hidden_loss.cu) and mirrored by the Triton kernel
// (minitron/kernels/hidden_loss.py). Host + device; no torch.
//
// For one token with student row s and teacher row t of D entries and the token's coefficient w (0: skipped):
//   cosine (kCosine):  sums   st = s . t, ss = |s|^2, tt = |t|^2                       (fp32 accumulation)
//                      loss   w * (1 - clamp(st / (|s| |t|), -1, 1))
//                      grad   w * (cos / ss) * s  -  w / (|s| |t|) * t   = cs * s + ct * t  (unclamped cos)
//                      both zero: loss 0; exactly one zero: loss w (cos taken as 0); gradient 0 in both cases;
//                      a non-finite sum (NaN or inf in the row, or overflow): loss and gradient NaN.
//   MSE (kMse):        sum    sq = |s - t|^2;   loss  w * sq / D;   grad  (2 w / D) * (s - t)
//                      (the gradient needs no sum, so the CPU/CUDA kernels write it in the same pass as sq).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"

namespace minitron {
namespace hidden {

constexpr int kCosine = 0;
constexpr int kMse = 1;

// What a row needs after its sums: the loss and the two gradient coefficients.
struct HlRow {
  float loss;  // w * l
  float cs;    // cosine: coefficient of s; MSE: coefficient of (s - t)
  float ct;    // cosine: coefficient of t; MSE: unused (0)
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

// The cosine row from its sums and the token's coefficient w (!= 0).
MINITRON_HD HlRow hl_cosine_row(float st, float ss, float tt, float w) {
  HlRow r{0.f, 0.f, 0.f};
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
  const float inv = 1.f / (hl_sqrt(ss) * hl_sqrt(tt));  // each factor separately: ss * tt may overflow
  const float cosv = st * inv;
  const float clamped = cosv > 1.f ? 1.f : (cosv < -1.f ? -1.f : cosv);
  r.loss = w * (1.f - clamped);
  r.cs = w * (cosv / ss);
  r.ct = -w * inv;
  return r;
}

// The MSE row: loss from the sum of squared differences; the gradient coefficient needs no sum.
MINITRON_HD float hl_mse_coef(float w, int64_t d) { return 2.f * w / static_cast<float>(d); }

MINITRON_HD HlRow hl_mse_row(float sq, float w, int64_t d) {
  HlRow r;
  r.loss = w * (sq / static_cast<float>(d));
  r.cs = hl_mse_coef(w, d);
  r.ct = 0.f;
  return r;
}

// One gradient element (F: float or a vector of floats).
template <int MODE, class F>
MINITRON_HD F hl_grad(const F& s, const F& t, float cs, float ct) {
  if (MODE == kCosine) return s * cs + t * ct;
  return (s - t) * cs;
}

}  // namespace hidden
}  // namespace minitron
