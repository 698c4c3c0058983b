// Fused hidden-state distillation losses (cosine, MSE): CPU kernel.
//
//   _hidden_state_loss_fwd_native(student [N, D], teacher [N, D], weight [N] f32, loss, need_grad=True)
//       -> (loss [N] f32, grad [N, D] in the input dtype)
//   loss_i = weight_i * l_i, grad_i = weight_i * dl_i / d student_i (csrc/common/hidden_loss_math.h); rows with
//   weight 0 are skipped (loss 0, gradient row 0, inputs not read). need_grad=False: loss only (grad is an
//   empty [0, D] tensor).
//
// Rows run in parallel (at::parallel_for, a few rows per task). Per row (vector paths, W = 16 / 8 lanes):
//   cosine  pass 1 reads s and t once, accumulating s.t, |s|^2, |t|^2 in two W-lane fp32 accumulator sets;
//           pass 2 re-reads the (cache-hot: a row is D * 2 elements) inputs, writes cs * s + ct * t and sums
//           |s/|s| - t/|t||^2, whose half is the loss 1 - cos without cancellation (hidden_loss_math.h).
//   MSE     one pass: the gradient (2 w / D) (s - t) needs no sum, so it is written while |s - t|^2 is summed.
// Gradients larger than the caches are written with non-temporal stores (no read-for-ownership of the
// destination lines), and the fresh gradient buffer is advised for transparent huge pages.
//
// Vector code: GCC vector extensions (csrc/common/vec_math.h) instantiated inside AVX-512 / AVX2 target
// functions, chosen per call by minitron::cpu::detect_isa(); the scalar path runs the same per-element math of
// hidden_loss_math.h on floats (with per-chunk partial sums).
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "common/cpu_features.h"
#include "common/hidden_loss_math.h"
#include "common/vec_math.h"
#include "cpu/huge_pages.h"
#include "hidden_loss_checks.h"

namespace minitron {
namespace cpu {
namespace hidden_impl {

using hidden::HlRow;
using hidden::kCosine;
using hidden::kMse;
using simd::Bf16;
using simd::Half;

constexpr int64_t kScalarChunk = 128;  // scalar path: entries per partial sum

struct Problem {
  const char* s;
  const char* t;
  char* g;  // nullptr: loss only
  const float* w;
  float* loss;
  int64_t n, d;
  int64_t s_stride, t_stride;  // bytes between rows
  int64_t elem;                // bytes per element
  bool stream;                 // non-temporal gradient stores
};

inline void zero_row(const Problem& P, int64_t i) {
  P.loss[i] = 0.f;
  if (P.g != nullptr) std::memset(P.g + i * P.d * P.elem, 0, static_cast<size_t>(P.d * P.elem));
}

// ----------------------------------------------------------------------------------------------
// Vector kernel (W lanes); always_inline, compiled inside the target functions below.
// ----------------------------------------------------------------------------------------------
template <int W, class E, int MODE>
struct VecKernel {
  typedef typename simd::Vec<W>::F F;
  typedef simd::Mem<W, E> In;

  // n < W elements, the missing lanes 0 (they add nothing to any sum)
  static MINITRON_SIMD_INLINE F load_tail(const E* p, int64_t n) {
    E tmp[W];
    std::memset(tmp, 0, sizeof(tmp));  // +0.0 in every storage dtype
    std::memcpy(tmp, p, sizeof(E) * static_cast<size_t>(n));
    return In::load(tmp);
  }

  static MINITRON_SIMD_INLINE void store(E* p, const F& v, bool stream) {
    if (stream) {
      In::stream(p, v);
    } else {
      In::store(p, v);
    }
  }

  static MINITRON_SIMD_INLINE void row(const Problem& P, int64_t i) {
    const float w = P.w[i];
    if (w == 0.f) {
      zero_row(P, i);
      return;
    }
    const E* s = reinterpret_cast<const E*>(P.s + i * P.s_stride);
    const E* t = reinterpret_cast<const E*>(P.t + i * P.t_stride);
    E* g = P.g != nullptr ? reinterpret_cast<E*>(P.g + i * P.d * P.elem) : nullptr;
    const int64_t d = P.d;
    const int64_t d2 = d / (2 * W) * (2 * W);  // end of the double-vector steps
    const int64_t d1 = d / W * W;              // end of the full vectors
    const bool stream = g != nullptr && P.stream && reinterpret_cast<uintptr_t>(g) % (W * sizeof(E)) == 0;
    const F zero = simd::splat<F>(0.f);
    F a0 = zero, b0 = zero, c0 = zero, a1 = zero, b1 = zero, c1 = zero;
    if (MODE == kMse) {
      const float coef = hidden::hl_mse_coef(w, d);
      for (int64_t j = 0; j < d2; j += 2 * W) {
        const F s0 = In::load(s + j), t0 = In::load(t + j), s1 = In::load(s + j + W), t1 = In::load(t + j + W);
        hidden::hl_accum<MODE>(a0, b0, c0, s0, t0);
        hidden::hl_accum<MODE>(a1, b1, c1, s1, t1);
        if (g != nullptr) {
          store(g + j, hidden::hl_grad<MODE>(s0, t0, coef, 0.f), stream);
          store(g + j + W, hidden::hl_grad<MODE>(s1, t1, coef, 0.f), stream);
        }
      }
      for (int64_t j = d2; j < d; j += W) {
        const int64_t m = std::min<int64_t>(W, d - j);
        const F s0 = m == W ? In::load(s + j) : load_tail(s + j, m);
        const F t0 = m == W ? In::load(t + j) : load_tail(t + j, m);
        hidden::hl_accum<MODE>(a0, b0, c0, s0, t0);
        if (g != nullptr) {
          const F gv = hidden::hl_grad<MODE>(s0, t0, coef, 0.f);
          if (m == W) {
            store(g + j, gv, stream);
          } else {
            simd::store_partial<W, E>(g + j, gv, m);
          }
        }
      }
      if (stream) simd::stream_fence();
      P.loss[i] = hidden::hl_mse_loss(simd::hsum<W>(a0 + a1), w, d);
      return;
    }
    // cosine: pass 1, the three sums
    for (int64_t j = 0; j < d2; j += 2 * W) {
      hidden::hl_accum<MODE>(a0, b0, c0, In::load(s + j), In::load(t + j));
      hidden::hl_accum<MODE>(a1, b1, c1, In::load(s + j + W), In::load(t + j + W));
    }
    for (int64_t j = d2; j < d; j += W) {
      const int64_t m = std::min<int64_t>(W, d - j);
      hidden::hl_accum<MODE>(a0, b0, c0, m == W ? In::load(s + j) : load_tail(s + j, m),
                             m == W ? In::load(t + j) : load_tail(t + j, m));
    }
    const HlRow r = hidden::hl_cosine_row(simd::hsum<W>(a0 + a1), simd::hsum<W>(b0 + b1), simd::hsum<W>(c0 + c1), w);
    if (!r.regular) {  // zero or non-finite vectors: loss known, gradient 0 / NaN
      P.loss[i] = r.loss;
      if (g != nullptr) {
        for (int64_t j = 0; j < d1; j += W) store(g + j, simd::splat<F>(r.cs), stream);
        if (d1 < d) simd::store_partial<W, E>(g + d1, simd::splat<F>(r.cs), d - d1);
        if (stream) simd::stream_fence();
      }
      return;
    }
    // pass 2, over the cache-hot rows: the loss as |s/|s| - t/|t||^2 / 2 and the gradient
    F e0 = zero, e1 = zero;
    for (int64_t j = 0; j < d2; j += 2 * W) {
      const F s0 = In::load(s + j), t0 = In::load(t + j), s1 = In::load(s + j + W), t1 = In::load(t + j + W);
      hidden::hl_cosine_dist(e0, s0, t0, r.us, r.ut);
      hidden::hl_cosine_dist(e1, s1, t1, r.us, r.ut);
      if (g != nullptr) {
        store(g + j, hidden::hl_grad<MODE>(s0, t0, r.cs, r.ct), stream);
        store(g + j + W, hidden::hl_grad<MODE>(s1, t1, r.cs, r.ct), stream);
      }
    }
    for (int64_t j = d2; j < d; j += W) {
      const int64_t m = std::min<int64_t>(W, d - j);
      const F s0 = m == W ? In::load(s + j) : load_tail(s + j, m);
      const F t0 = m == W ? In::load(t + j) : load_tail(t + j, m);
      hidden::hl_cosine_dist(e0, s0, t0, r.us, r.ut);
      if (g != nullptr) {
        const F gv = hidden::hl_grad<MODE>(s0, t0, r.cs, r.ct);
        if (m == W) {
          store(g + j, gv, stream);
        } else {
          simd::store_partial<W, E>(g + j, gv, m);
        }
      }
    }
    if (stream) simd::stream_fence();
    P.loss[i] = hidden::hl_cosine_loss(simd::hsum<W>(e0 + e1), w);
  }

  static MINITRON_SIMD_INLINE void rows(const Problem& P, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) row(P, i);
  }
};

// ----------------------------------------------------------------------------------------------
// Scalar kernel
// ----------------------------------------------------------------------------------------------
inline float load1(const float* p) { return *p; }
inline float load1(const Bf16* p) {
  uint32_t u = static_cast<uint32_t>(p->bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float load1(const Half* p) { return c10::detail::fp16_ieee_to_fp32_value(p->bits); }
inline void store1(float* p, float v) { *p = v; }
inline void store1(Bf16* p, float v) { p->bits = c10::BFloat16(v).x; }
inline void store1(Half* p, float v) { p->bits = c10::detail::fp16_ieee_from_fp32_value(v); }

template <class E, int MODE>
struct ScalarKernel {
  static void row(const Problem& P, int64_t i) {
    const float w = P.w[i];
    if (w == 0.f) {
      zero_row(P, i);
      return;
    }
    const E* s = reinterpret_cast<const E*>(P.s + i * P.s_stride);
    const E* t = reinterpret_cast<const E*>(P.t + i * P.t_stride);
    E* g = P.g != nullptr ? reinterpret_cast<E*>(P.g + i * P.d * P.elem) : nullptr;
    const int64_t d = P.d;
    const float coef = hidden::hl_mse_coef(w, d);
    hidden::HlSums tot = hidden::hl_sums_zero();
    for (int64_t c = 0; c < d; c += kScalarChunk) {
      const int64_t ce = std::min(c + kScalarChunk, d);
      hidden::HlSums cs = hidden::hl_sums_zero();
      for (int64_t j = c; j < ce; ++j) {
        const float sv = load1(s + j), tv = load1(t + j);
        hidden::hl_accum<MODE>(cs.a, cs.b, cs.c, sv, tv);
        if (MODE == kMse && g != nullptr) store1(g + j, hidden::hl_grad<MODE>(sv, tv, coef, 0.f));
      }
      tot = hidden::hl_sums_add(tot, cs);
    }
    if (MODE == kMse) {
      P.loss[i] = hidden::hl_mse_loss(tot.a, w, d);
      return;
    }
    const HlRow r = hidden::hl_cosine_row(tot.a, tot.b, tot.c, w);
    if (!r.regular) {
      P.loss[i] = r.loss;
      if (g != nullptr)
        for (int64_t j = 0; j < d; ++j) store1(g + j, r.cs);
      return;
    }
    float e = 0.f;
    for (int64_t c = 0; c < d; c += kScalarChunk) {
      const int64_t ce = std::min(c + kScalarChunk, d);
      float ec = 0.f;
      for (int64_t j = c; j < ce; ++j) {
        const float sv = load1(s + j), tv = load1(t + j);
        hidden::hl_cosine_dist(ec, sv, tv, r.us, r.ut);
        if (g != nullptr) store1(g + j, hidden::hl_grad<MODE>(sv, tv, r.cs, r.ct));
      }
      e += ec;
    }
    P.loss[i] = hidden::hl_cosine_loss(e, w);
  }

  static void rows(const Problem& P, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) row(P, i);
  }
};

// ----------------------------------------------------------------------------------------------
// Entry points per ISA (the only functions carrying target attributes) and the dispatch.
// ----------------------------------------------------------------------------------------------
typedef void (*RowsFn)(const Problem&, int64_t, int64_t);

#if MINITRON_HAS_X86_DISPATCH
template <class E, int MODE>
MINITRON_TARGET_AVX512 void rows_avx512(const Problem& P, int64_t b, int64_t e) {
  VecKernel<16, E, MODE>::rows(P, b, e);
}
template <class E, int MODE>
MINITRON_TARGET_AVX2 void rows_avx2(const Problem& P, int64_t b, int64_t e) {
  VecKernel<8, E, MODE>::rows(P, b, e);
}
#endif

template <class E, int MODE>
RowsFn rows_for(Isa isa) {
#if MINITRON_HAS_X86_DISPATCH
  if (isa == Isa::kAvx512) return &rows_avx512<E, MODE>;
  if (isa == Isa::kAvx2) return &rows_avx2<E, MODE>;
#endif
  (void)isa;
  return &ScalarKernel<E, MODE>::rows;
}

template <class E>
RowsFn rows_for_loss(Isa isa, int loss) {
  return loss == kCosine ? rows_for<E, kCosine>(isa) : rows_for<E, kMse>(isa);
}

std::tuple<at::Tensor, at::Tensor> hidden_state_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                             const at::Tensor& weight, int64_t loss_kind,
                                                             bool need_grad) {
  const char* op = "_hidden_state_loss_fwd_native";
  check_hidden_loss_native_args(student, teacher, weight, loss_kind, op);
  const auto dt = student.scalar_type();
  const int64_t n = student.size(0), d = student.size(1);
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && weight.device().is_cpu(), op,
              " (CPU): all tensors must be on the CPU");

  at::Tensor loss = at::empty({n}, student.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({need_grad ? n : 0, d}, student.options());
  if (n == 0) return std::make_tuple(loss, grad);
  if (need_grad) advise_huge_pages(grad.data_ptr(), static_cast<size_t>(grad.nbytes()));

  Problem P;
  P.elem = student.element_size();
  P.s = static_cast<const char*>(student.data_ptr());
  P.t = static_cast<const char*>(teacher.data_ptr());
  P.g = need_grad ? static_cast<char*>(grad.data_ptr()) : nullptr;
  P.w = weight.data_ptr<float>();
  P.loss = loss.data_ptr<float>();
  P.n = n;
  P.d = d;
  P.s_stride = (n > 1 ? student.stride(0) : d) * P.elem;
  P.t_stride = (n > 1 ? teacher.stride(0) : d) * P.elem;
  P.stream = need_grad && grad.nbytes() >= (size_t{32} << 20);

  const Isa isa = detect_isa();
  const int lk = static_cast<int>(loss_kind);
  RowsFn fn;
  if (dt == at::kFloat) {
    fn = rows_for_loss<float>(isa, lk);
  } else if (dt == at::kBFloat16) {
    fn = rows_for_loss<Bf16>(isa, lk);
  } else {
    fn = rows_for_loss<Half>(isa, lk);
  }
  // a task covers at least ~32K elements per input, so small rows do not pay one task each
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / d);
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(P, b, e); });
  return std::make_tuple(loss, grad);
}

}  // namespace hidden_impl
}  // namespace cpu
}  // namespace minitron

TORCH_LIBRARY_FRAGMENT(minitron, m) {
  m.def("_hidden_state_loss_fwd_native(Tensor student, Tensor teacher, Tensor weight, int loss, bool need_grad=True) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minitron, CPU, m) {
  m.impl("_hidden_state_loss_fwd_native", &minitron::cpu::hidden_impl::hidden_state_loss_fwd_cpu);
}
