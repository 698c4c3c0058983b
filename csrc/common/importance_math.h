// Per-unit, per-sample math of the fused importance reduction and of the block-influence metric,
// shared by the CPU kernels (csrc/cpu/importance.cpp, also instantiated on GCC vector types) and the
// CUDA kernels (csrc/cuda/importance.cu). The Triton kernels (minitron/kernels/importance.py) mirror
// these functions line by line; the Python reference (minitron/ops/importance.py) defines the result.
//
// Importance of a unit (a channel, a neuron, or a head of `group_size` channels):
//   magnitude at a token      m = |x|                       (group_size == 1)
//                               = sqrt(sum_g x_g^2)         (group_size > 1, e.g. a head of head_dim)
//   sequence stage per sample v = SEQ_AGG over the sample's counted tokens of m
//   batch stage               I = BATCH_AGG over the counted samples of v   (streamed across calls)
// with AGG in {mean, l2, sum, max, var}: l2 = sqrt(sum of squares), var = population variance
// (divide by the count, not count - 1). A sample with no counted token is skipped entirely.
//
// Sequence stage accumulators (a1, a2), one pair per unit and sample (or per sample chunk; chunks
// of one sample combine with seq_combine):
//   mean, sum: a1 = sum m          l2: a1 = sum m^2          max: a1 = max m (0 for no token)
//   var:       a1 = sum (m - K), a2 = sum (m - K)^2 with K the magnitude at the sample's first counted
//              token (shifted sums: the variance without the cancellation of sum m^2 - n mean^2).
// Batch stage state per unit (A, B) plus the number of counted samples n (held separately):
//   mean, sum: A = sum v           l2: A = sum v^2           max: A = max v (0 before any sample)
//   var:       A = running mean, B = sum of squared deviations (Welford; merged with Chan's formula).
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/macros.h"

namespace minitron {
namespace importance {

enum Agg : int { kMean = 0, kL2 = 1, kSum = 2, kMax = 3, kVar = 4 };
constexpr int kNumAggs = 5;

// max(a, m) that propagates NaN (either operand). Works on float and on GCC vector types.
template <class V>
MINITRON_HD V max_nan(V a, V m) {
  return ((m > a) | (m != m)) ? m : a;
}

// Squared magnitude contribution of one channel value (group_size > 1).
template <class V>
MINITRON_HD V sumsq_step(V acc, V x) {
  return acc + x * x;
}

// Magnitude of a unit from the sum of squares over its channels.
MINITRON_HD float magnitude_from_sumsq(float ss) { return sqrtf(ss); }

// Sequence stage: fold the magnitude `m` of one counted token into (a1, a2); `shift` is K (var only).
template <int AGG, class V>
MINITRON_HD void seq_accumulate(V m, V shift, V& a1, V& a2) {
  if constexpr (AGG == kMean || AGG == kSum) {
    a1 = a1 + m;
  } else if constexpr (AGG == kL2) {
    a1 = a1 + m * m;
  } else if constexpr (AGG == kMax) {
    a1 = max_nan(a1, m);
  } else {
    V d = m - shift;
    a1 = a1 + d;
    a2 = a2 + d * d;
  }
}

// Fold four counted tokens at once (the same sums up to rounding, a quarter of the accumulator updates;
// the CPU kernel streams four token rows per step).
template <int AGG, class V>
MINITRON_HD void seq_accumulate4(V m0, V m1, V m2, V m3, V shift, V& a1, V& a2) {
  if constexpr (AGG == kMean || AGG == kSum) {
    a1 = a1 + ((m0 + m1) + (m2 + m3));
  } else if constexpr (AGG == kL2) {
    a1 = a1 + ((m0 * m0 + m1 * m1) + (m2 * m2 + m3 * m3));
  } else if constexpr (AGG == kMax) {
    a1 = max_nan(a1, max_nan(max_nan(m0, m1), max_nan(m2, m3)));
  } else {
    V d0 = m0 - shift, d1 = m1 - shift, d2 = m2 - shift, d3 = m3 - shift;
    a1 = a1 + ((d0 + d1) + (d2 + d3));
    a2 = a2 + ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3));
  }
}

// Combine the accumulators (b1, b2) of another chunk of the same sample (same K) into (a1, a2).
template <int AGG, class V>
MINITRON_HD void seq_combine(V& a1, V& a2, V b1, V b2) {
  if constexpr (AGG == kMax) {
    a1 = max_nan(a1, b1);
  } else {
    a1 = a1 + b1;
    a2 = a2 + b2;
  }
}

// The sequence aggregate of one sample from its accumulators and its count n >= 1 of counted tokens.
MINITRON_HD float seq_finalize(int agg, float a1, float a2, float n) {
  switch (agg) {
    case kMean:
      return a1 / n;
    case kL2:
      return sqrtf(a1);
    case kVar: {
      float mu = a1 / n;
      float v = a2 / n - mu * mu;
      return v < 0.0f ? 0.0f : v;  // rounding only; keeps NaN
    }
    default:  // kSum, kMax
      return a1;
  }
}

// Batch stage: fold the aggregate `v` of one more counted sample into the state (A, B) of a unit;
// `n_prev` = counted samples before this one.
MINITRON_HD void batch_update(int agg, float v, float n_prev, float& A, float& B) {
  switch (agg) {
    case kL2:
      A += v * v;
      break;
    case kMax:
      A = max_nan(A, v);
      break;
    case kVar: {
      float n = n_prev + 1.0f;
      float d = v - A;
      A += d / n;
      B += d * (v - A);
      break;
    }
    default:  // kMean, kSum
      A += v;
      break;
  }
}

// The importance of a unit from its state and the number n of counted samples (0 when n == 0).
MINITRON_HD float batch_finalize(int agg, float A, float B, float n) {
  if (n <= 0.0f) return 0.0f;
  switch (agg) {
    case kMean:
      return A / n;
    case kL2:
      return sqrtf(A);
    case kVar:
      return B / n;
    default:
      return A;
  }
}

// ---------------------------------------------------------------------------------------------
// Non-finite activations (NaN, +inf, -inf) at counted positions are counted, never skipped: the
// kernels add their number to a counter in the state (count[1] for importance, count[1][layer] for
// block influence) and the Python accumulators report it (minitron/ops/importance.py). A bit test,
// immune to fast-math flags: exponent all ones.
// ---------------------------------------------------------------------------------------------
MINITRON_HD bool nonfinite_bits(uint32_t bits) { return (bits & 0x7f800000u) == 0x7f800000u; }

// ---------------------------------------------------------------------------------------------
// Block influence: per token, 1 - cos(h_in, h_out) from dot = <h_in, h_out>, na = |h_in|^2,
// nb = |h_out|^2. Zero vectors: both zero -> 0 (the block left the token unchanged); exactly one
// zero -> 1 (cos taken as 0: no direction to compare). cos is clamped to [-1, 1] against rounding,
// so the result lies in [0, 2]; NaN/Inf inputs give NaN.
// ---------------------------------------------------------------------------------------------
MINITRON_HD float one_minus_cos(float dot, float na, float nb) {
  if (na == 0.0f && nb == 0.0f) return 0.0f;
  if (na == 0.0f || nb == 0.0f) return 1.0f;
  float c = dot / (sqrtf(na) * sqrtf(nb));
  c = c > 1.0f ? 1.0f : (c < -1.0f ? -1.0f : c);
  return 1.0f - c;
}

}  // namespace importance
}  // namespace minitron
