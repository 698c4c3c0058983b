// Sparse (top-k teacher) KL divergence over the full student vocabulary, optionally mixed with an LM
// cross-entropy term on the same logits: CPU kernel.
//
//   _topk_kl_div_fwd_native(student [N, V], indices [N, k] int64 (sorted, distinct per row),
//                           teacher_logprobs [N, k] f32, weight [N] f32, labels [N] int64 or [0],
//                           ce_weight [N] f32 or [0], inv_temperature, tail, need_grad=True)
//       -> (loss [N] f32, grad [N, V] in the student dtype; [0, V] when need_grad is False)
//   loss_i = weight_i * D_i + ce_weight_i * CE_i,  grad_i = d loss_i / d student_i,
//   D as in csrc/common/topk_kl_math.h (a = student * inv_T), CE_i = logsumexp(student_i) - student_i[label_i]
//   (at temperature 1). Rows whose weight and ce_weight are both 0 get loss 0 and a zero gradient row.
//
// Per row (vector paths, W = 16 lanes AVX-512 / 8 lanes AVX2):
//   pass 1  max of the row (read only).
//   pass 2  e_j = exp(a_j - m) into a per-thread fp32 scratch row, summed over the complement of the index
//           set segment by segment between the sorted indices (so q_tail has no cancellation); the k
//           entries themselves are summed in double by topk_row_finish.
//   (CE at T != 1 only: one more exp pass for logsumexp(student).)
//   pass 3  gradient: g_j = c * e_j (+ ce_weight * softmax(student)_j at T != 1), then the k index entries
//           and the label entry are overwritten / corrected from the O(k) results.
// The scalar path runs the same passes with libm's expf.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#include "common/cpu_features.h"
#include "common/topk_kl_math.h"
#include "common/vec_math.h"
#include "cpu/huge_pages.h"
#include "topk_kl_checks.h"

namespace minitron {
namespace cpu {
namespace topk_impl {

using simd::Bf16;
using simd::Half;

constexpr int64_t kPad = 16;

// Scalar element conversions.
inline float to_f(float x) { return x; }
inline float to_f(Bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f(Half x) { return static_cast<float>(c10::Half(x.bits, c10::Half::from_bits())); }
template <class E>
inline E from_f(float x);
template <>
inline float from_f<float>(float x) {
  return x;
}
template <>
inline Bf16 from_f<Bf16>(float x) {
  return Bf16{c10::BFloat16(x).x};
}
template <>
inline Half from_f<Half>(float x) {
  return Half{c10::Half(x).x};
}

// The O(V) passes of one row. Vector version: W lanes (compiled inside the target functions below).
template <int W, class E>
struct VecPasses {
  typedef typename simd::Vec<W>::F F;
  typedef simd::Mem<W, E> In;
  typedef simd::Mem<W, float> Fl;

  static MINITRON_SIMD_INLINE F load(const E* p, int64_t n) {
    return n >= W ? In::load(p) : simd::load_partial_neg_inf<W, E>(p, n);
  }

  static MINITRON_SIMD_INLINE float row_max(const E* z, int64_t v) {
    F m0 = simd::splat<F>(-__builtin_inff()), m1 = m0;
    int64_t j = 0;
    for (; j + 2 * W <= v; j += 2 * W) {
      m0 = simd::vmax(m0, In::load(z + j));
      m1 = simd::vmax(m1, In::load(z + j + W));
    }
    for (; j < v; j += W) m0 = simd::vmax(m0, load(z + j, v - j));
    m0 = simd::vmax(m0, m1);
    float m = m0[0];
    for (int l = 1; l < W; ++l) m = m0[l] > m ? m0[l] : m;  // NaN lanes: compare is false, handled by caller
    return m;
  }

  // e_j = exp(z_j * it - m) stored to ex[j] for j in [b, e); returns their sum (ex is padded by kPad).
  static MINITRON_SIMD_INLINE double exp_store(const E* z, float* ex, int64_t b, int64_t e, float it, float m) {
    F acc = simd::splat<F>(0.f);
    int64_t j = b;
    for (; j + W <= e; j += W) {
      const F x = simd::vexp<true>(In::load(z + j) * it - m);
      Fl::store(ex + j, x);
      acc += x;
    }
    if (j < e) {
      const F x = simd::vexp<true>(load(z + j, e - j) * it - m);
      Fl::store(ex + j, x);  // scratch is padded: whole-vector store is fine
      acc += x;
    }
    return static_cast<double>(simd::hsum<W>(acc));
  }

  // sum_j exp(z_j - m1) over the row (CE at temperature 1)
  static MINITRON_SIMD_INLINE double exp_sum(const E* z, int64_t v, float m1) {
    F acc = simd::splat<F>(0.f);
    for (int64_t j = 0; j < v; j += W) acc += simd::vexp<true>(load(z + j, v - j) - m1);
    return static_cast<double>(simd::hsum<W>(acc));
  }

  // g_j = c * ex_j (+ cc * exp(z_j - lse1) when cc != 0)
  static MINITRON_SIMD_INLINE void grad(E* g, const float* ex, const E* z, int64_t v, float c, float cc,
                                        float lse1) {
    int64_t j = 0;
    if (cc == 0.f) {
      for (; j + W <= v; j += W) In::store(g + j, Fl::load(ex + j) * c);
      if (j < v) simd::store_partial<W, E>(g + j, Fl::load(ex + j) * c, v - j);
    } else {
      for (; j + W <= v; j += W) In::store(g + j, Fl::load(ex + j) * c + simd::vexp<true>(In::load(z + j) - lse1) * cc);
      if (j < v) {
        const F x = Fl::load(ex + j) * c + simd::vexp<true>(load(z + j, v - j) - lse1) * cc;
        simd::store_partial<W, E>(g + j, x, v - j);
      }
    }
  }
};

// Scalar version (libm), same interface.
template <class E>
struct ScalarPasses {
  static float row_max(const E* z, int64_t v) {
    float m = -INFINITY;
    for (int64_t j = 0; j < v; ++j) {
      const float x = to_f(z[j]);
      m = x > m ? x : m;
    }
    return m;
  }
  static double exp_store(const E* z, float* ex, int64_t b, int64_t e, float it, float m) {
    float acc = 0.f;
    for (int64_t j = b; j < e; ++j) {
      const float x = std::exp(to_f(z[j]) * it - m);
      ex[j] = x;
      acc += x;
    }
    return acc;
  }
  static double exp_sum(const E* z, int64_t v, float m1) {
    float acc = 0.f;
    for (int64_t j = 0; j < v; ++j) acc += std::exp(to_f(z[j]) - m1);
    return acc;
  }
  static void grad(E* g, const float* ex, const E* z, int64_t v, float c, float cc, float lse1) {
    if (cc == 0.f) {
      for (int64_t j = 0; j < v; ++j) g[j] = from_f<E>(ex[j] * c);
    } else {
      for (int64_t j = 0; j < v; ++j) g[j] = from_f<E>(ex[j] * c + std::exp(to_f(z[j]) - lse1) * cc);
    }
  }
};

struct Problem {
  const char* s;
  int64_t s_stride;  // bytes
  int64_t elem;
  const int64_t* idx;
  const float* lp;
  const float* w;
  const int64_t* labels;  // nullptr: no CE
  const float* cw;
  float* loss;
  char* g;  // nullptr: loss only
  int64_t n, v, k;
  float inv_t;
  bool tail;
};

// Everything about one row, given the O(V) passes P. always_inline: it must be compiled inside the
// target-attributed row_avx512 / row_avx2 below (a separate baseline-x86-64 copy would run the vector code on SSE2).
template <class E, class P>
MINITRON_SIMD_INLINE void process_row(const Problem& pb, int64_t i, float* ex, float* ak, float* gidx) {
  const float w = pb.w[i];
  const float cw = pb.labels != nullptr ? pb.cw[i] : 0.f;
  E* g = pb.g != nullptr ? reinterpret_cast<E*>(pb.g + i * pb.v * pb.elem) : nullptr;
  if (w == 0.f && cw == 0.f) {
    pb.loss[i] = 0.f;
    if (g != nullptr) std::memset(static_cast<void*>(g), 0, static_cast<size_t>(pb.v * pb.elem));
    return;
  }
  const E* z = reinterpret_cast<const E*>(pb.s + i * pb.s_stride);
  const int64_t* idx = pb.idx + i * pb.k;
  const float* lp = pb.lp + i * pb.k;
  const float it = pb.inv_t;
  const float zmax = P::row_max(z, pb.v);
  const float m = zmax * it;
  // complement sum, segment by segment between the sorted indices; a at the indices kept aside
  double tail_sum = 0.0;
  int64_t b = 0;
  for (int64_t t = 0; t < pb.k; ++t) {
    const int64_t j = idx[t];
    if (j > b) tail_sum += P::exp_store(z, ex, b, j, it, m);
    ak[t] = to_f(z[j]) * it;
    b = j + 1;
  }
  if (b < pb.v) tail_sum += P::exp_store(z, ex, b, pb.v, it, m);
  const topk::TopkRow row = topk::topk_row_finish(lp, ak, pb.k, pb.v, m, tail_sum, pb.tail, gidx);
  double loss = w != 0.f ? static_cast<double>(w) * row.loss : 0.0;
  // CE at temperature 1
  float lse1 = 0.f;
  int64_t label = -1;
  if (cw != 0.f) {
    label = pb.labels[i];
    double l1;
    if (it == 1.f) {
      l1 = static_cast<double>(m) + row.log_total;
    } else {
      l1 = static_cast<double>(zmax) + std::log(P::exp_sum(z, pb.v, zmax));
    }
    lse1 = static_cast<float>(l1);
    loss += static_cast<double>(cw) * (l1 - static_cast<double>(to_f(z[label])));
  }
  pb.loss[i] = static_cast<float>(loss);
  if (g == nullptr) return;
  // gradient: d/dz = inv_t * w * dD/da + cw * (softmax(z) - onehot(label))
  const float kc = w * it;
  const bool same_t = it == 1.f;
  float c = kc * static_cast<float>(row.rest_coef);
  float cc = cw;
  if (same_t && cw != 0.f) {  // softmax(z) = e / total
    c += cw * static_cast<float>(std::exp(-row.log_total));
    cc = 0.f;
  }
  for (int64_t t = 0; t < pb.k; ++t) ex[idx[t]] = 0.f;  // index entries are written below
  P::grad(g, ex, z, pb.v, c, cc, lse1);
  for (int64_t t = 0; t < pb.k; ++t) {
    const int64_t j = idx[t];
    float x = kc * gidx[t];
    if (cw != 0.f) {
      x += cw * static_cast<float>(std::exp(static_cast<double>(to_f(z[j])) - static_cast<double>(lse1)));
    }
    g[j] = from_f<E>(x);
  }
  if (cw != 0.f) g[label] = from_f<E>(to_f(g[label]) - cw);
}

typedef void (*RowFn)(const Problem&, int64_t, float*, float*, float*);

#if MINITRON_HAS_X86_DISPATCH
template <class E>
MINITRON_TARGET_AVX512 void row_avx512(const Problem& pb, int64_t i, float* ex, float* ak, float* gidx) {
  process_row<E, VecPasses<16, E>>(pb, i, ex, ak, gidx);
}
template <class E>
MINITRON_TARGET_AVX2 void row_avx2(const Problem& pb, int64_t i, float* ex, float* ak, float* gidx) {
  process_row<E, VecPasses<8, E>>(pb, i, ex, ak, gidx);
}
#endif
template <class E>
void row_scalar(const Problem& pb, int64_t i, float* ex, float* ak, float* gidx) {
  process_row<E, ScalarPasses<E>>(pb, i, ex, ak, gidx);
}

template <class E>
RowFn row_fn(Isa isa) {
#if MINITRON_HAS_X86_DISPATCH
  if (isa == Isa::kAvx512) return &row_avx512<E>;
  if (isa == Isa::kAvx2) return &row_avx2<E>;
#endif
  (void)isa;
  return &row_scalar<E>;
}

std::tuple<at::Tensor, at::Tensor> topk_kl_div_fwd_cpu(const at::Tensor& student, const at::Tensor& indices,
                                                       const at::Tensor& logprobs, const at::Tensor& weight,
                                                       const at::Tensor& labels, const at::Tensor& ce_weight,
                                                       double inv_temperature, bool tail, bool need_grad) {
  check_topk_kl_native_args(student, indices, logprobs, weight, labels, ce_weight, inv_temperature);
  for (const at::Tensor* x : {&student, &indices, &logprobs, &weight, &labels, &ce_weight}) {
    TORCH_CHECK(x->numel() == 0 || x->device().is_cpu(), "_topk_kl_div_fwd_native (CPU): all tensors must be on the CPU");
  }
  const int64_t n = student.size(0), v = student.size(1), k = indices.size(1);
  at::Tensor loss = at::empty({n}, student.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({need_grad ? n : 0, v}, student.options());
  if (n == 0) return std::make_tuple(loss, grad);
  if (need_grad) advise_huge_pages(grad.data_ptr(), static_cast<size_t>(grad.nbytes()));

  Problem pb;
  pb.elem = student.element_size();
  pb.s = static_cast<const char*>(student.data_ptr());
  pb.s_stride = (n > 1 ? student.stride(0) : v) * pb.elem;
  pb.idx = indices.data_ptr<int64_t>();
  pb.lp = logprobs.data_ptr<float>();
  pb.w = weight.data_ptr<float>();
  pb.labels = labels.numel() > 0 ? labels.data_ptr<int64_t>() : nullptr;
  pb.cw = labels.numel() > 0 ? ce_weight.data_ptr<float>() : nullptr;
  pb.loss = loss.data_ptr<float>();
  pb.g = need_grad ? static_cast<char*>(grad.data_ptr()) : nullptr;
  pb.n = n;
  pb.v = v;
  pb.k = k;
  pb.inv_t = static_cast<float>(inv_temperature);
  pb.tail = tail;

  const Isa isa = detect_isa();
  const auto dt = student.scalar_type();
  const RowFn fn = dt == at::kFloat ? row_fn<float>(isa) : (dt == at::kBFloat16 ? row_fn<Bf16>(isa) : row_fn<Half>(isa));
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    std::vector<float> ex(static_cast<size_t>(v + kPad));
    std::vector<float> ak(static_cast<size_t>(k)), gidx(static_cast<size_t>(k));
    for (int64_t i = b; i < e; ++i) fn(pb, i, ex.data(), ak.data(), gidx.data());
  });
  return std::make_tuple(loss, grad);
}

}  // namespace topk_impl
}  // namespace cpu
}  // namespace minitron

TORCH_LIBRARY_FRAGMENT(minitron, m) {
  m.def(
      "_topk_kl_div_fwd_native(Tensor student, Tensor indices, Tensor teacher_logprobs, Tensor weight, "
      "Tensor labels, Tensor ce_weight, float inv_temperature, bool tail, bool need_grad=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minitron, CPU, m) {
  m.impl("_topk_kl_div_fwd_native", &minitron::cpu::topk_impl::topk_kl_div_fwd_cpu);
}
