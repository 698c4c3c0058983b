// Per-row math of the sparse (top-k teacher) KL kernels, shared by the CPU kernel (csrc/cpu/topk_kl.cpp)
// and the CUDA kernel (csrc/cuda/topk_kl.cu) so that the CPU tests exercise the arithmetic the GPU runs.
//
// Notation (one row): a = student * inv_T over the full vocabulary V, m = max_j a_j, e_j = exp(a_j - m),
// I = {i_1..i_k} the teacher's (distinct, sorted) indices, lp_k the teacher's log-probabilities there,
// p_k = exp(lp_k), total = sum_j e_j, tail_sum = sum_{j not in I} e_j (summed directly over the complement:
// no cancellation), q_j = e_j / total, log q_j = a_j - m - log(total).
//
//   tail = true:   p_t = 1 - sum_k p_k (clamped at 0), q_t = tail_sum / total
//                  D = sum_k p_k (lp_k - log q_{i_k}) + p_t (log p_t - log q_t)        (0 log 0 = 0)
//                  (k == V: no tail, p_t = 0)
//                  dD/da_l = q_l - p_l                 (l in I)
//                          = e_l (1/total - p_t/tail_sum)   (l not in I)
//   tail = false:  p'_k = p_k / sum_k p_k
//                  D = sum_k p'_k (log p'_k - log q_{i_k})
//                  dD/da_l = q_l - p'_l (l in I),  q_l (l not in I)
//
// topk_row_finish does the O(k) part (in double: k is small) given m, the gathered a_{i_k} and tail_sum;
// the kernels do the O(V) passes (max, exps, complement sum, gradient write).
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/macros.h"

namespace minitron {
namespace topk {

// Result of the O(k) part of one row.
struct TopkRow {
  double loss;       // D (unweighted)
  double log_total;  // log(total): lse(a) = m + log_total
  double rest_coef;  // dD/da_l = e_l * rest_coef for l not in I
};

// lp[k]: teacher log-probabilities (-inf allowed: p = 0); ak[k]: a at the indices (a_{i_k}, same rounding as
// the a the kernel exponentiated); m: the row max of a; tail_sum: sum of e_j over j not in I; v: the vocabulary
// size (k == v: there is no complement and p_tail is 0 by definition, whatever the rounding of sum_k p_k).
// Writes gidx[k] = dD/da at the indices. Returns D, log(total) and the coefficient of the complement.
MINITRON_HD TopkRow topk_row_finish(const float* lp, const float* ak, int64_t k, int64_t v, float m, double tail_sum,
                                    bool tail, float* gidx) {
  const double ninf = -HUGE_VAL;
  double total = tail_sum;
  double sp = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    total += exp(static_cast<double>(ak[i]) - static_cast<double>(m));
    if (static_cast<double>(lp[i]) > ninf) sp += exp(static_cast<double>(lp[i]));
  }
  TopkRow r;
  r.log_total = log(total);
  double loss = 0.0;
  if (tail) {
    for (int64_t i = 0; i < k; ++i) {
      const double lq = static_cast<double>(ak[i]) - static_cast<double>(m) - r.log_total;
      const double l = static_cast<double>(lp[i]);
      double p = 0.0;
      if (l > ninf || l != l) {  // NaN propagates
        p = exp(l);
        loss += p * (l - lq);
      }
      gidx[i] = static_cast<float>(exp(lq) - p);
    }
    const double pt = k < v ? 1.0 - sp : 0.0;
    r.rest_coef = 1.0 / total;
    if (pt > 0.0) {
      const double lqt = log(tail_sum) - r.log_total;  // -inf when the student has no tail mass: D = +inf
      loss += pt * (log(pt) - lqt);
      if (tail_sum > 0.0) r.rest_coef = 1.0 / total - pt / tail_sum;
    }
  } else {
    const double lsp = log(sp);
    for (int64_t i = 0; i < k; ++i) {
      const double lq = static_cast<double>(ak[i]) - static_cast<double>(m) - r.log_total;
      const double l = static_cast<double>(lp[i]) - lsp;
      double p = 0.0;
      if (l > ninf || l != l) {
        p = exp(l);
        loss += p * (l - lq);
      }
      gidx[i] = static_cast<float>(exp(lq) - p);
    }
    r.rest_coef = 1.0 / total;
  }
  r.loss = loss;
  return r;
}

}  // namespace topk
}  // namespace minitron
