// Fused KL divergence (forward KL, reverse KL, generalised JSD) over large vocabularies: CPU kernel.
//
//   _kl_div_fwd_native(student [N, V], teacher [N, V], weight [N] f32, mode, inv_temperature, beta,
//                      scale, need_grad=True) -> (loss [N] f32, grad [N, V] in the input dtype)
//   loss_i = weight_i * scale * D_i,  grad_i = weight_i * scale * dD_i/d student_i  (see kl_math.h).
//   need_grad=False: loss only; grad is an empty [0, V] tensor and the gradient passes are skipped
//   (forward / reverse KL: pass 1 alone; JSD: passes 1 and 2), so nothing [N, V] is written.
//   Vocab-parallel pieces (_kl_div_stats_native, _kl_div_jsd_sums_native, _kl_div_vp_fwd_native): the same
//   passes on one rank's slice of the vocabulary, the row statistics combined across ranks in between
//   (see the section at the end of this file).
//
// Rows run in parallel (at::parallel_for); when N < threads each row is split into chunk-aligned
// segments processed in parallel and their states merged. Per row / segment (vector paths):
//   pass 1  per chunk of kChunk entries: lane-wise maxima of both inputs (this read also brings the
//           chunk into L1; the next chunk is prefetched meanwhile), the lane online-softmax state is
//           rescaled to them (one vector exp per chunk), then e_a = 2^(a2 - max) and e_b are computed
//           (a2 = student * inv_T * log2 e), stored in a per-thread fp32 scratch row (reverse: e_a and
//           s - t) and summed, with the cross sum of forward/reverse KL. Lane states are merged with
//           kl_math.h's kl_state_merge at the end.
//   pass 2  the gradient from the scratch row: Q = e_a * exp(ref_a - lse_a) with one vector exp per
//           chunk, no per-element exp; non-temporal stores when the gradient exceeds the caches.
//           JSD: pass 2 computes the loss and sum_j Q_j g_j (storing g; one exp and one log1p per
//           entry), pass 3 writes the gradient.
// So an entry costs two exps (JSD: three plus a log1p), the inputs are read from memory once (JSD:
// twice) and the only temporaries are 2 V floats per thread.
//
// Vector code: GCC vector extensions (csrc/common/vec_math.h) instantiated inside AVX-512 / AVX2
// target functions, chosen per call by minitron::cpu::detect_isa(). The scalar path feeds every entry
// to kl_math.h's per-element online-softmax update and recomputes the probabilities in pass 2, exactly
// as the CUDA kernel does.
//
// 16/32-byte vector arguments of the always_inline helpers would change the ABI if they were ever
// called out of line; they are not, so silence the note.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "kl_div_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>

#include "common/cpu_features.h"
#include "common/kl_math.h"
#include "common/vec_math.h"
#include "cpu/huge_pages.h"

namespace minitron {
namespace cpu {
namespace kl_impl {

using kl::JsdConsts;
using kl::KlRow;
using kl::KlState;
using kl::kForward;
using kl::kJsd;
using kl::kReverse;
using kl::StdMath;
using simd::Bf16;
using simd::Half;

constexpr int64_t kChunk = 1024;  // entries per chunk (multiple of every vector width)
constexpr int64_t kPad = 16;      // scratch rows are padded so tail vectors can be stored whole
constexpr int64_t kMaxW = 16;     // widest vector (lanes)
constexpr int64_t kScalarChunk = 128;  // scalar path: entries per partial state (like one CUDA thread's share)
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// One row's pointers and scratch. Indices are relative to the row start.
struct RowCtx {
  const void* s;  // student row
  const void* t;  // teacher row
  void* g;        // gradient row
  float* ea;      // scratch: exp(a - ref_a) [V + kPad]
  float* ex;      // scratch: exp(b - ref_b) (reverse: s - t; JSD pass 2: g) [V + kPad]
  float* refa;    // per chunk and lane: the running max of a the chunk's exps are relative to
  float* refb;    // [ceil(V / kChunk) * kMaxW]
  int64_t v;
  float inv_t;
  bool stream;  // write the gradient with non-temporal stores (it is far larger than the caches)
};

typedef kl::JsdPartial JsdSums;  // {sum of the JSD terms, sum_j Q_j g_j, sum_j Q_j} (the last two double)

// ----------------------------------------------------------------------------------------------
// Vector kernel (W lanes). Everything is always_inline; it is compiled inside the target functions
// below. Entry k of a row always sits in lane k % W (chunks start at multiples of kChunk), and each
// lane keeps its own online-softmax state: per chunk, the lane maxima are updated (one vector exp
// rescales the lane sums when they grow), the chunk's exps are taken relative to them and the
// references are recorded so pass 2 can normalise the stored exps with one vector exp per chunk.
// The W lane states are merged with kl_state_merge at the end of the segment.
// ----------------------------------------------------------------------------------------------
template <int W, class E, int MODE>
struct VecKernel {
  typedef typename simd::Vec<W>::F F;
  typedef simd::Mem<W, E> In;
  typedef simd::Mem<W, float> Fl;

  static MINITRON_SIMD_INLINE F load_in(const E* p, int64_t n) {
    return n >= W ? In::load(p) : simd::load_partial_neg_inf<W, E>(p, n);
  }

  // stream: non-temporal store (p aligned to the stored vector's size)
  static MINITRON_SIMD_INLINE void store_grad(E* p, const F& g, int64_t n, bool stream) {
    if (n >= W) {
      if (stream) {
        In::stream(p, g);
      } else {
        In::store(p, g);
      }
    } else {
      simd::store_partial<W, E>(p, g, n);
    }
  }

  // it2 = inv_t * log2(e); ra2 / rb2: the lane references in the same base-2 units, themselves
  // rounded products x_max * it2, so that e = 2^(round(x * it2) - r2) is exactly 1 at the maximum.
  static MINITRON_SIMD_INLINE void p1_step(const F& sv, const F& tv, float it2, const F& ra2, const F& rb2,
                                           float* ea_out, float* ex_out, F& sa, F& sb, F& cc) {
    const F ea = simd::vexp2<true>(simd::rounded<F>(sv * it2) - ra2);
    const F eb = simd::vexp2<true>(simd::rounded<F>(tv * it2) - rb2);
    Fl::store(ea_out, ea);
    if (MODE == kReverse) {
      Fl::store(ex_out, sv - tv);
    } else {
      Fl::store(ex_out, eb);
    }
    sa += ea;
    sb += eb;
    if (MODE == kForward) cc = kl::kl_masked_accum(cc, eb, tv - sv);
    if (MODE == kReverse) cc = kl::kl_masked_accum(cc, ea, sv - tv);
  }

  // Pass-1 lane state: maxima in base-2 units (of round(s * it2), round(t * it2)); the natural-unit
  // maxima handed to kl_math.h and to pass 2 are round(m2 * ln2), computed identically in both places.
  struct P1 {
    F ma2, mb2;  // lane maxima
    F sa, sb;    // lane sums of 2^(a2 - ma2), 2^(b2 - mb2)
    F cc;        // lane cross sums / inv_t (forward: e_b (t - s), reverse: e_a (s - t))
  };

  static MINITRON_SIMD_INLINE P1 p1_init() {
    const F ninf = simd::splat<F>(-__builtin_inff());
    const F zero = simd::splat<F>(0.f);
    return P1{ninf, ninf, zero, zero, zero};
  }

  // pass 1 over the chunk [c, ce)
  static MINITRON_SIMD_INLINE void p1_chunk(const RowCtx& r, int64_t c, int64_t ce, P1& st) {
    const E* s = static_cast<const E*>(r.s);
    const E* t = static_cast<const E*>(r.t);
    float* const ea_buf = r.ea;
    float* const ex_buf = r.ex;
    const float it2 = r.inv_t * kLog2e;
    const F ninf = simd::splat<F>(-__builtin_inff());
    const F zero = simd::splat<F>(0.f);
    const int64_t cf = c + (ce - c) / W * W;  // end of the full vectors
    F xs = ninf, xt = ninf;
    for (int64_t i = c; i < cf; i += W) {
      xs = simd::vmax(xs, In::load(s + i));
      xt = simd::vmax(xt, In::load(t + i));
    }
    if (cf < ce) {
      xs = simd::vmax(xs, load_in(s + cf, ce - cf));
      xt = simd::vmax(xt, load_in(t + cf, ce - cf));
    }
    // it2 > 0 keeps the order, so round(max(s) * it2) == max(round(s * it2)) (rounding is monotonic)
    const F na = simd::vmax(st.ma2, xs * it2);
    const F nb = simd::vmax(st.mb2, xt * it2);
    // rescale the lane sums to the new maxima (-inf - -inf would be NaN: those lanes are empty)
    const F fa = kl::kl_select(na == ninf, zero, simd::vexp2<true>(st.ma2 - na));
    const F fb = kl::kl_select(nb == ninf, zero, simd::vexp2<true>(st.mb2 - nb));
    st.sa = st.sa * fa;
    st.sb = st.sb * fb;
    if (MODE == kForward) st.cc = kl::kl_rescale(st.cc, fb);
    if (MODE == kReverse) st.cc = kl::kl_rescale(st.cc, fa);
    st.ma2 = na;
    st.mb2 = nb;
    const int64_t j = c / kChunk;
    Fl::store(r.refa + j * kMaxW, na * kLn2);
    Fl::store(r.refb + j * kMaxW, nb * kLn2);
    // exps relative to the lane maxima (all -inf so far: reference 0, every e is 0)
    const F ra2 = kl::kl_select(na == ninf, zero, na);
    const F rb2 = kl::kl_select(nb == ninf, zero, nb);
    F csa = zero, csb = zero, ccc = zero;  // chunk sums (added to the row sums: shorter rounding chains)
    for (int64_t i = c; i < cf; i += W) {
      // the next chunk is read by the max loop right after this one: fetch it now, overlapping the
      // memory reads with this loop's exps (the hardware prefetchers do not run a whole chunk ahead)
      __builtin_prefetch(s + i + kChunk, 0, 3);
      __builtin_prefetch(t + i + kChunk, 0, 3);
      p1_step(In::load(s + i), In::load(t + i), it2, ra2, rb2, ea_buf + i, ex_buf + i, csa, csb, ccc);
    }
    if (cf < ce) {  // tail: missing lanes read as -inf; the scratch rows are padded
      p1_step(load_in(s + cf, ce - cf), load_in(t + cf, ce - cf), it2, ra2, rb2, ea_buf + cf, ex_buf + cf, csa, csb,
              ccc);
    }
    st.sa += csa;
    st.sb += csb;
    st.cc += ccc;
  }

  // lane l <- lane (l + sh) mod W
  static MINITRON_SIMD_INLINE F rotate(const F& x, int sh) {
    typedef typename simd::Vec<W>::I I;
    I idx;
    for (int l = 0; l < W; ++l) idx[l] = (l + sh) & (W - 1);
    return __builtin_shuffle(x, idx);
  }

  // The W lane states merged into one: a butterfly of kl_math.h's kl_state_merge on vectors of lane
  // states (like the CUDA kernel's warp shuffles), log2(W) vector merges.
  static MINITRON_SIMD_INLINE KlState p1_finish(const P1& st, float it) {
    kl::KlStateT<F> v;
    v.ma = st.ma2 * kLn2;
    v.sa = st.sa;
    v.mb = st.mb2 * kLn2;
    v.sb = st.sb;
    v.c = MODE == kJsd ? simd::splat<F>(0.f) : st.cc * it;
    for (int sh = W / 2; sh >= 1; sh /= 2) {
      kl::KlStateT<F> o;
      o.ma = rotate(v.ma, sh);
      o.sa = rotate(v.sa, sh);
      o.mb = rotate(v.mb, sh);
      o.sb = rotate(v.sb, sh);
      o.c = rotate(v.c, sh);
      v = kl::kl_state_merge<MODE, simd::VecMath>(v, o);
    }
    KlState out;
    out.ma = v.ma[0];
    out.sa = v.sa[0];
    out.mb = v.mb[0];
    out.sb = v.sb[0];
    out.c = v.c[0];
    return out;
  }

  static MINITRON_SIMD_INLINE KlState pass1(const RowCtx& r, int64_t c0, int64_t c1) {
    P1 st = p1_init();
    for (int64_t c = c0; c < c1; c += kChunk) p1_chunk(r, c, std::min(c + kChunk, c1), st);
    return p1_finish(st, r.inv_t);
  }

  // per-lane normalisers of a chunk: exp(ref - lse) (0 for lanes that were all -inf)
  static MINITRON_SIMD_INLINE F norm(const float* ref, int64_t c, float lse) {
    return simd::vexp(Fl::load(ref + (c / kChunk) * kMaxW) - lse);
  }

  // non-temporal gradient stores when asked for and the segment start is aligned for them
  static MINITRON_SIMD_INLINE bool use_stream(const RowCtx& r, const E* g) {
    return r.stream && reinterpret_cast<uintptr_t>(g) % (W * sizeof(E)) == 0;
  }

  // forward / reverse gradient of the chunk [c, ce) from the scratch row
  static MINITRON_SIMD_INLINE void p2_chunk(const RowCtx& r, int64_t c, int64_t ce, const KlRow& row, float coef,
                                            bool stream) {
    E* g = static_cast<E*>(r.g);
    const float* const ea_buf = r.ea;
    const float* const ex_buf = r.ex;
    if (MODE == kForward) {
      const F qf = norm(r.refa, c, row.lse_a) * coef;
      const F pf = norm(r.refb, c, row.lse_b) * coef;
      for (int64_t i = c; i < ce; i += W) {
        store_grad(g + i, kl::kl_forward_grad_unnorm(Fl::load(ea_buf + i), qf, Fl::load(ex_buf + i), pf), ce - i,
                   stream);
      }
    } else {
      const float it = r.inv_t;
      const float lr0 = row.lse_diff;
      const F qf = norm(r.refa, c, row.lse_a);
      for (int64_t i = c; i < ce; i += W) {
        const F q = Fl::load(ea_buf + i) * qf;
        const F lr = Fl::load(ex_buf + i) * it - lr0;  // log Q - log P
        store_grad(g + i, kl::kl_reverse_grad(q, lr, row.div, coef), ce - i, stream);
      }
    }
  }

  static MINITRON_SIMD_INLINE void pass2(const RowCtx& r, int64_t c0, int64_t c1, const KlRow& row, float coef) {
    const bool stream = use_stream(r, static_cast<E*>(r.g) + c0);
    for (int64_t c = c0; c < c1; c += kChunk) p2_chunk(r, c, std::min(c + kChunk, c1), row, coef, stream);
    if (stream) simd::stream_fence();
  }

  // JSD: loss and sum_j Q_j g_j; g overwrites ex.
  static MINITRON_SIMD_INLINE JsdSums jsd_pass2(const RowCtx& r, int64_t c0, int64_t c1, const KlRow& row,
                                                const JsdConsts& k) {
    const E* s = static_cast<const E*>(r.s);
    const E* t = static_cast<const E*>(r.t);
    const float* const ea_buf = r.ea;
    float* const ex_buf = r.ex;
    const float it = r.inv_t;
    const float d0 = row.lse_diff;
    F lacc{};
    double qg_acc[W] = {}, q_acc[W] = {};  // per lane, in double (see kl_math.h JsdPartial)
    for (int64_t c = c0; c < c1; c += kChunk) {
      const int64_t ce = std::min(c + kChunk, c1);
      const F qf = norm(r.refa, c, row.lse_a);
      const F pf = norm(r.refb, c, row.lse_b);
      F lc{};
      for (int64_t i = c; i < ce; i += W) {
        const F q = Fl::load(ea_buf + i) * qf;
        const F p = Fl::load(ex_buf + i) * pf;
        const F lp_lq = (load_in(t + i, ce - i) - load_in(s + i, ce - i)) * it + d0;
        F loss, gk;
        kl::jsd_element<simd::VecMath>(p, q, lp_lq, k, loss, gk);
        lc += loss;
        for (int l = 0; l < W; ++l) {
          qg_acc[l] += static_cast<double>(q[l]) * static_cast<double>(gk[l]);
          q_acc[l] += static_cast<double>(q[l]);
        }
        Fl::store(ex_buf + i, gk);
      }
      lacc += lc;
    }
    JsdSums out;
    out.loss = simd::hsum<W>(lacc);
    out.qg = 0.0;
    out.q = 0.0;
    for (int l = 0; l < W; ++l) {
      out.qg += qg_acc[l];
      out.q += q_acc[l];
    }
    return out;
  }

  static MINITRON_SIMD_INLINE void jsd_pass3(const RowCtx& r, int64_t c0, int64_t c1, const KlRow& row,
                                             const kl::JsdCentre& centre, float coef) {
    E* g = static_cast<E*>(r.g);
    const bool stream = use_stream(r, g + c0);
    const float* const ea_buf = r.ea;
    const float* const ex_buf = r.ex;
    for (int64_t c = c0; c < c1; c += kChunk) {
      const int64_t ce = std::min(c + kChunk, c1);
      const F qf = norm(r.refa, c, row.lse_a);
      for (int64_t i = c; i < ce; i += W) {
        const F q = Fl::load(ea_buf + i) * qf;
        store_grad(g + i, kl::jsd_grad(q, Fl::load(ex_buf + i), centre, coef), ce - i, stream);
      }
    }
    if (stream) simd::stream_fence();
  }
};

// ----------------------------------------------------------------------------------------------
// Scalar kernel: the per-element online update of kl_math.h (what the CUDA kernel runs).
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
  static KlState pass1(const RowCtx& r, int64_t c0, int64_t c1) {
    const E* s = static_cast<const E*>(r.s);
    const E* t = static_cast<const E*>(r.t);
    // per-chunk states merged into the row's (as the CUDA kernel merges per-thread states): short
    // rounding chains for the sums
    KlState st = kl::kl_state_init();
    for (int64_t c = c0; c < c1; c += kScalarChunk) {
      const int64_t ce = std::min(c + kScalarChunk, c1);
      KlState cs = kl::kl_state_init();
      for (int64_t i = c; i < ce; ++i) {
        kl::kl_state_update<MODE, StdMath>(cs, load1(s + i) * r.inv_t, load1(t + i) * r.inv_t);
      }
      st = kl::kl_state_merge<MODE, StdMath>(st, cs);
    }
    return st;
  }

  static void pass2(const RowCtx& r, int64_t c0, int64_t c1, const KlRow& row, float coef) {
    const E* s = static_cast<const E*>(r.s);
    const E* t = static_cast<const E*>(r.t);
    E* g = static_cast<E*>(r.g);
    const float lr0 = row.lse_diff;
    for (int64_t i = c0; i < c1; ++i) {
      const float a = load1(s + i) * r.inv_t;
      const float b = load1(t + i) * r.inv_t;
      const float q = kl::kl_prob<StdMath>(a, row.lse_a);
      float gr;
      if (MODE == kForward) {
        gr = kl::kl_forward_grad(q, kl::kl_prob<StdMath>(b, row.lse_b), coef);
      } else {
        gr = kl::kl_reverse_grad(q, (a - b) - lr0, row.div, coef);
      }
      store1(g + i, gr);
    }
  }

  static JsdSums jsd_pass2(const RowCtx& r, int64_t c0, int64_t c1, const KlRow& row, const JsdConsts& k) {
    const E* s = static_cast<const E*>(r.s);
    const E* t = static_cast<const E*>(r.t);
    const float d0 = row.lse_diff;
    JsdSums out{0.f, 0.0, 0.0};
    for (int64_t c = c0; c < c1; c += kScalarChunk) {
      const int64_t ce = std::min(c + kScalarChunk, c1);
      JsdSums cs{0.f, 0.0, 0.0};
      for (int64_t i = c; i < ce; ++i) {
        const float a = load1(s + i) * r.inv_t;
        const float b = load1(t + i) * r.inv_t;
        const float q = kl::kl_prob<StdMath>(a, row.lse_a);
        const float p = kl::kl_prob<StdMath>(b, row.lse_b);
        float loss, gk;
        kl::jsd_element<StdMath>(p, q, (b - a) + d0, k, loss, gk);
        cs.loss += loss;
        cs.qg += static_cast<double>(q) * static_cast<double>(gk);
        cs.q += static_cast<double>(q);
      }
      out.loss += cs.loss;
      out.qg += cs.qg;
      out.q += cs.q;
    }
    return out;
  }

  static void jsd_pass3(const RowCtx& r, int64_t c0, int64_t c1, const KlRow& row, const kl::JsdCentre& centre,
                        float coef, const JsdConsts& k) {
    const E* s = static_cast<const E*>(r.s);
    const E* t = static_cast<const E*>(r.t);
    E* g = static_cast<E*>(r.g);
    const float d0 = row.lse_diff;
    for (int64_t i = c0; i < c1; ++i) {
      const float a = load1(s + i) * r.inv_t;
      const float b = load1(t + i) * r.inv_t;
      const float q = kl::kl_prob<StdMath>(a, row.lse_a);
      const float p = kl::kl_prob<StdMath>(b, row.lse_b);
      float loss, gk;
      kl::jsd_element<StdMath>(p, q, (b - a) + d0, k, loss, gk);
      store1(g + i, kl::jsd_grad(q, gk, centre, coef));
    }
  }
};

// ----------------------------------------------------------------------------------------------
// Entry points per ISA (the only functions carrying target attributes) and the dispatch table.
// ----------------------------------------------------------------------------------------------
struct Kernels {
  KlState (*pass1)(const RowCtx&, int64_t, int64_t);
  void (*pass2)(const RowCtx&, int64_t, int64_t, const KlRow&, float);
  JsdSums (*jsd_pass2)(const RowCtx&, int64_t, int64_t, const KlRow&, const JsdConsts&);
  void (*jsd_pass3)(const RowCtx&, int64_t, int64_t, const KlRow&, const kl::JsdCentre&, float, const JsdConsts&);
  KlState (*merge)(const KlState&, const KlState&);
  KlRow (*finalize)(const KlState&);
  bool uses_scratch;
};

#define MINITRON_KL_ENTRY_POINTS(TARGET, SUFFIX, W)                                                          \
  template <class E, int MODE>                                                                              \
  TARGET KlState pass1_##SUFFIX(const RowCtx& r, int64_t c0, int64_t c1) {                                  \
    return VecKernel<W, E, MODE>::pass1(r, c0, c1);                                                         \
  }                                                                                                         \
  template <class E, int MODE>                                                                              \
  TARGET void pass2_##SUFFIX(const RowCtx& r, int64_t c0, int64_t c1, const KlRow& row, float coef) {       \
    VecKernel<W, E, MODE>::pass2(r, c0, c1, row, coef);                                                     \
  }                                                                                                         \
  template <class E>                                                                                        \
  TARGET JsdSums jsd_pass2_##SUFFIX(const RowCtx& r, int64_t c0, int64_t c1, const KlRow& row,              \
                                    const JsdConsts& k) {                                                   \
    return VecKernel<W, E, kJsd>::jsd_pass2(r, c0, c1, row, k);                                             \
  }                                                                                                         \
  template <class E>                                                                                        \
  TARGET void jsd_pass3_##SUFFIX(const RowCtx& r, int64_t c0, int64_t c1, const KlRow& row,                \
                                 const kl::JsdCentre& centre, float coef, const JsdConsts&) {               \
    VecKernel<W, E, kJsd>::jsd_pass3(r, c0, c1, row, centre, coef);                                         \
  }

#if MINITRON_HAS_X86_DISPATCH
MINITRON_KL_ENTRY_POINTS(MINITRON_TARGET_AVX512, avx512, 16)
MINITRON_KL_ENTRY_POINTS(MINITRON_TARGET_AVX2, avx2, 8)
#endif

template <int MODE>
KlState merge_fn(const KlState& x, const KlState& y) {
  return kl::kl_state_merge<MODE, StdMath>(x, y);
}
template <int MODE>
KlRow finalize_fn(const KlState& st) {
  return kl::kl_finalize<MODE, StdMath>(st);
}

template <class E, int MODE>
Kernels kernels_for(Isa isa) {
  Kernels k;
  k.merge = &merge_fn<MODE>;
  k.finalize = &finalize_fn<MODE>;
  k.pass2 = nullptr;
  k.jsd_pass2 = nullptr;
  k.jsd_pass3 = nullptr;
  constexpr int PM = MODE == kJsd ? kForward : MODE;  // pass2 is unused for JSD
#if MINITRON_HAS_X86_DISPATCH
  if (isa == Isa::kAvx512) {
    k.pass1 = &pass1_avx512<E, MODE>;
    k.pass2 = &pass2_avx512<E, PM>;
    k.jsd_pass2 = &jsd_pass2_avx512<E>;
    k.jsd_pass3 = &jsd_pass3_avx512<E>;
    k.uses_scratch = true;
    return k;
  }
  if (isa == Isa::kAvx2) {
    k.pass1 = &pass1_avx2<E, MODE>;
    k.pass2 = &pass2_avx2<E, PM>;
    k.jsd_pass2 = &jsd_pass2_avx2<E>;
    k.jsd_pass3 = &jsd_pass3_avx2<E>;
    k.uses_scratch = true;
    return k;
  }
#endif
  (void)isa;
  k.pass1 = &ScalarKernel<E, MODE>::pass1;
  k.pass2 = &ScalarKernel<E, PM>::pass2;
  k.jsd_pass2 = &ScalarKernel<E, kJsd>::jsd_pass2;
  k.jsd_pass3 = &ScalarKernel<E, kJsd>::jsd_pass3;
  k.uses_scratch = false;
  return k;
}

template <class E>
Kernels kernels_for_mode(Isa isa, int mode) {
  switch (mode) {
    case kForward:
      return kernels_for<E, kForward>(isa);
    case kReverse:
      return kernels_for<E, kReverse>(isa);
    default:
      return kernels_for<E, kJsd>(isa);
  }
}

// ----------------------------------------------------------------------------------------------
// Driver
// ----------------------------------------------------------------------------------------------
struct Problem {
  const char* s;
  const char* t;
  char* g;
  const float* w;
  float* loss;
  int64_t n, v, s_stride, t_stride;  // strides in bytes
  int64_t elem;                      // bytes per element
  int mode;
  float inv_t, scale;
  bool stream;
  JsdConsts jsd;
};

struct Scratch {
  std::unique_ptr<float[]> buf;
  float *ea = nullptr, *ex = nullptr, *refa = nullptr, *refb = nullptr;
  Scratch(int64_t v, bool needed) {
    if (!needed) return;
    const int64_t nc = (v + kChunk - 1) / kChunk;
    const int64_t row = (v + kPad + 15) / 16 * 16;
    buf.reset(new float[static_cast<size_t>(2 * row + 2 * nc * kMaxW)]);
    ea = buf.get();
    ex = ea + row;
    refa = ex + row;
    refb = refa + nc * kMaxW;
  }
};

inline RowCtx row_ctx(const Problem& P, int64_t i, const Scratch& sc) {
  RowCtx r;
  r.s = P.s + i * P.s_stride;
  r.t = P.t + i * P.t_stride;
  r.g = P.g != nullptr ? P.g + i * P.v * P.elem : nullptr;
  r.ea = sc.ea;
  r.ex = sc.ex;
  r.refa = sc.refa;
  r.refb = sc.refb;
  r.v = P.v;
  r.inv_t = P.inv_t;
  r.stream = P.stream;
  return r;
}

// A whole row on the calling thread.
void process_row(const Problem& P, const Kernels& K, int64_t i, const Scratch& sc) {
  const float w = P.w[i];
  if (w == 0.f) {
    P.loss[i] = 0.f;
    if (P.g != nullptr) std::memset(P.g + i * P.v * P.elem, 0, static_cast<size_t>(P.v * P.elem));
    return;
  }
  const RowCtx r = row_ctx(P, i, sc);
  const float ws = w * P.scale;
  const float coef = ws * P.inv_t;
  KlRow row = K.finalize(K.pass1(r, 0, P.v));
  if (row.empty) {  // all -inf teacher: like a masked token (kl_math.h)
    P.loss[i] = 0.f;
    if (P.g != nullptr) std::memset(P.g + i * P.v * P.elem, 0, static_cast<size_t>(P.v * P.elem));
    return;
  }
  if (P.mode != kJsd) {
    P.loss[i] = ws * row.div;
    if (P.g != nullptr) K.pass2(r, 0, P.v, row, coef);
  } else {
    const JsdSums sums = K.jsd_pass2(r, 0, P.v, row, P.jsd);
    P.loss[i] = ws * sums.loss;
    if (P.g != nullptr) K.jsd_pass3(r, 0, P.v, row, kl::jsd_centre(sums.qg, sums.q), coef, P.jsd);
  }
}

// One row split over nseg chunk-aligned segments processed in parallel.
void process_row_split(const Problem& P, const Kernels& K, int64_t i, const Scratch& sc, int64_t nseg) {
  const float w = P.w[i];
  if (w == 0.f) {
    P.loss[i] = 0.f;
    if (P.g != nullptr) std::memset(P.g + i * P.v * P.elem, 0, static_cast<size_t>(P.v * P.elem));
    return;
  }
  const RowCtx r = row_ctx(P, i, sc);
  const int64_t nc = (P.v + kChunk - 1) / kChunk;
  auto seg_begin = [&](int64_t sgi) { return std::min(P.v, (sgi * nc / nseg) * kChunk); };
  std::unique_ptr<KlState[]> states(new KlState[static_cast<size_t>(nseg)]);
  at::parallel_for(0, nseg, 1, [&](int64_t b, int64_t e) {
    for (int64_t sgi = b; sgi < e; ++sgi) states[sgi] = K.pass1(r, seg_begin(sgi), seg_begin(sgi + 1));
  });
  KlState st = kl::kl_state_init();
  for (int64_t sgi = 0; sgi < nseg; ++sgi) st = K.merge(st, states[sgi]);
  const KlRow row = K.finalize(st);
  if (row.empty) {  // all -inf teacher: like a masked token (kl_math.h)
    P.loss[i] = 0.f;
    if (P.g != nullptr) std::memset(P.g + i * P.v * P.elem, 0, static_cast<size_t>(P.v * P.elem));
    return;
  }
  const float ws = w * P.scale;
  const float coef = ws * P.inv_t;
  if (P.mode != kJsd) {
    P.loss[i] = ws * row.div;
    if (P.g == nullptr) return;
    at::parallel_for(0, nseg, 1, [&](int64_t b, int64_t e) {
      for (int64_t sgi = b; sgi < e; ++sgi) K.pass2(r, seg_begin(sgi), seg_begin(sgi + 1), row, coef);
    });
  } else {
    std::unique_ptr<JsdSums[]> sums(new JsdSums[static_cast<size_t>(nseg)]);
    at::parallel_for(0, nseg, 1, [&](int64_t b, int64_t e) {
      for (int64_t sgi = b; sgi < e; ++sgi) sums[sgi] = K.jsd_pass2(r, seg_begin(sgi), seg_begin(sgi + 1), row, P.jsd);
    });
    JsdSums tot{0.f, 0.0, 0.0};
    for (int64_t sgi = 0; sgi < nseg; ++sgi) {
      tot.loss += sums[sgi].loss;
      tot.qg += sums[sgi].qg;
      tot.q += sums[sgi].q;
    }
    const kl::JsdCentre centre = kl::jsd_centre(tot.qg, tot.q);
    P.loss[i] = ws * tot.loss;
    if (P.g == nullptr) return;
    at::parallel_for(0, nseg, 1, [&](int64_t b, int64_t e) {
      for (int64_t sgi = b; sgi < e; ++sgi)
        K.jsd_pass3(r, seg_begin(sgi), seg_begin(sgi + 1), row, centre, coef, P.jsd);
    });
  }
}

void run(const Problem& P, const Kernels& K) {
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nc = (P.v + kChunk - 1) / kChunk;
  if (P.n >= nthreads || nc < 2 || at::in_parallel_region()) {
    at::parallel_for(0, P.n, 1, [&](int64_t b, int64_t e) {
      Scratch sc(P.v, K.uses_scratch);
      for (int64_t i = b; i < e; ++i) process_row(P, K, i, sc);
    });
  } else {
    const int64_t nseg = std::min(nthreads, nc);
    Scratch sc(P.v, K.uses_scratch);
    for (int64_t i = 0; i < P.n; ++i) process_row_split(P, K, i, sc, nseg);
  }
}

std::tuple<at::Tensor, at::Tensor> kl_div_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  const at::Tensor& weight, int64_t mode, double inv_temperature,
                                                  double beta, double scale, bool need_grad) {
  minitron::check_kl_div_native_args(student, teacher, weight, mode, inv_temperature, beta);
  const auto dt = student.scalar_type();
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && weight.device().is_cpu(),
              "_kl_div_fwd_native (CPU): all tensors must be on the CPU");
  const int64_t n = student.size(0), v = student.size(1);

  at::Tensor loss = at::empty({n}, student.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({need_grad ? n : 0, v}, student.options());  // [0, v]: loss only
  if (n == 0) return std::make_tuple(loss, grad);
  if (need_grad) advise_huge_pages(grad.data_ptr(), static_cast<size_t>(grad.nbytes()));  // fresh [N, V]

  int m = static_cast<int>(mode);
  // The kernel works with a float beta: one that rounds to 1 or 0 (e.g. 1e-50) is that KL exactly, where the
  // JSD constants log(beta) / log(1 - beta) would be infinite.
  const float beta_f = static_cast<float>(beta);
  if (m == kJsd && beta_f == 0.f) m = kForward;  // JSD_0 = KL(P || Q) (TRL convention)
  if (m == kJsd && beta_f == 1.f) m = kReverse;  // JSD_1 = KL(Q || P)

  Problem P;
  P.elem = student.element_size();
  P.s = static_cast<const char*>(student.data_ptr());
  P.t = static_cast<const char*>(teacher.data_ptr());
  P.g = need_grad ? static_cast<char*>(grad.data_ptr()) : nullptr;
  P.w = weight.data_ptr<float>();
  P.loss = loss.data_ptr<float>();
  P.n = n;
  P.v = v;
  P.s_stride = student.stride(0) * P.elem;
  P.t_stride = teacher.stride(0) * P.elem;
  P.mode = m;
  P.inv_t = static_cast<float>(inv_temperature);
  P.scale = static_cast<float>(scale);
  P.stream = grad.nbytes() >= (size_t{32} << 20);
  P.jsd = kl::jsd_consts(m == kJsd ? beta : 0.5);

  const Isa isa = detect_isa();
  Kernels K;
  if (dt == at::kFloat) {
    K = kernels_for_mode<float>(isa, m);
  } else if (dt == at::kBFloat16) {
    K = kernels_for_mode<Bf16>(isa, m);
  } else {
    K = kernels_for_mode<Half>(isa, m);
  }
  run(P, K);
  return std::make_tuple(loss, grad);
}


// ----------------------------------------------------------------------------------------------
// Vocab-parallel pieces (minitron.ops.kl: kl_div(..., process_group=...)). Each rank holds the columns
// [v0, v1) of every row; the same per-row passes run on the slice, with the row statistics exchanged in
// between (a KlState per row, then for the JSD its JsdPartial sums):
//   _kl_div_stats_native     pass 1 on the slice -> the slice's KlState [N, 5] (ma, sa, mb, sb, c)
//   _kl_div_jsd_sums_native  given the global KlState: pass 1 (scratch) + JSD pass 2 -> (loss, qg, q) [N, 3] f64
//   _kl_div_vp_fwd_native    given the global KlState (and sums): loss [N] and the slice's gradient
// The global state finalises exactly as a row split over segments (process_row_split above); pass 1 is
// re-run on the slice where a later pass reads its scratch row (vector paths).
// ----------------------------------------------------------------------------------------------
inline Kernels kernels_of(at::ScalarType dt, Isa isa, int mode) {
  if (dt == at::kFloat) return kernels_for_mode<float>(isa, mode);
  if (dt == at::kBFloat16) return kernels_for_mode<Bf16>(isa, mode);
  return kernels_for_mode<Half>(isa, mode);
}

// The effective mode (a JSD beta that rounds to 0 / 1 in float is forward / reverse KL).
inline int effective_mode(int64_t mode, double beta) {
  int m = static_cast<int>(mode);
  const float beta_f = static_cast<float>(beta);
  if (m == kJsd && beta_f == 0.f) m = kForward;
  if (m == kJsd && beta_f == 1.f) m = kReverse;
  return m;
}

inline Problem vp_problem(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight, int mode,
                          double inv_temperature, double beta) {
  Problem P;
  P.elem = student.element_size();
  P.s = static_cast<const char*>(student.data_ptr());
  P.t = static_cast<const char*>(teacher.data_ptr());
  P.g = nullptr;
  P.w = weight.data_ptr<float>();
  P.loss = nullptr;
  P.n = student.size(0);
  P.v = student.size(1);
  P.s_stride = student.stride(0) * P.elem;
  P.t_stride = teacher.stride(0) * P.elem;
  P.mode = mode;
  P.inv_t = static_cast<float>(inv_temperature);
  P.scale = 1.f;
  P.stream = false;
  P.jsd = kl::jsd_consts(mode == kJsd ? beta : 0.5);
  return P;
}

inline void check_vp_stats(const at::Tensor& stats, const at::Tensor& student, const char* op) {
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.size(0) == student.size(0) &&
                  stats.size(1) == 5 && stats.is_contiguous() && stats.device() == student.device(),
              op, ": stats must be a contiguous float32 [N, 5] tensor on the logits' device, got ", stats.scalar_type(),
              " ", stats.sizes());
}

inline KlState state_of(const float* st) {
  KlState s;
  s.ma = st[0];
  s.sa = st[1];
  s.mb = st[2];
  s.sb = st[3];
  s.c = st[4];
  return s;
}

at::Tensor kl_div_stats_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
                            int64_t mode, double inv_temperature) {
  minitron::check_kl_div_native_args(student, teacher, weight, mode, inv_temperature, 0.5);
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && weight.device().is_cpu(),
              "_kl_div_stats_native (CPU): all tensors must be on the CPU");
  const int64_t n = student.size(0);
  at::Tensor out = at::empty({n, 5}, student.options().dtype(at::kFloat));
  if (n == 0) return out;
  const int m = static_cast<int>(mode);
  const Problem P = vp_problem(student, teacher, weight, m, inv_temperature, 0.5);
  const Kernels K = kernels_of(student.scalar_type(), detect_isa(), m);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    Scratch sc(P.v, K.uses_scratch);
    for (int64_t i = b; i < e; ++i) {
      const KlState st = P.w[i] == 0.f ? kl::kl_state_init() : K.pass1(row_ctx(P, i, sc), 0, P.v);
      float* r = o + i * 5;
      r[0] = st.ma;
      r[1] = st.sa;
      r[2] = st.mb;
      r[3] = st.sb;
      r[4] = st.c;
    }
  });
  return out;
}

at::Tensor kl_div_jsd_sums_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
                               const at::Tensor& stats, double inv_temperature, double beta) {
  minitron::check_kl_div_native_args(student, teacher, weight, kJsd, inv_temperature, beta);
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && weight.device().is_cpu(),
              "_kl_div_jsd_sums_native (CPU): all tensors must be on the CPU");
  check_vp_stats(stats, student, "_kl_div_jsd_sums_native");
  TORCH_CHECK(effective_mode(kJsd, beta) == kJsd, "_kl_div_jsd_sums_native: beta must be strictly between 0 and 1 "
              "in float32 (the ends are forward / reverse KL), got ", beta);
  const int64_t n = student.size(0);
  at::Tensor out = at::zeros({n, 3}, student.options().dtype(at::kDouble));
  if (n == 0) return out;
  const Problem P = vp_problem(student, teacher, weight, kJsd, inv_temperature, beta);
  const Kernels K = kernels_of(student.scalar_type(), detect_isa(), kJsd);
  const float* st = stats.data_ptr<float>();
  double* o = out.data_ptr<double>();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    Scratch sc(P.v, K.uses_scratch);
    for (int64_t i = b; i < e; ++i) {
      if (P.w[i] == 0.f) continue;
      const KlRow row = K.finalize(state_of(st + i * 5));
      if (row.empty) continue;
      const RowCtx r = row_ctx(P, i, sc);
      if (K.uses_scratch) K.pass1(r, 0, P.v);  // the scratch row the JSD pass reads
      const JsdSums sums = K.jsd_pass2(r, 0, P.v, row, P.jsd);
      o[i * 3] = sums.loss;
      o[i * 3 + 1] = sums.qg;
      o[i * 3 + 2] = sums.q;
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> kl_div_vp_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                     const at::Tensor& weight, const at::Tensor& stats,
                                                     const std::optional<at::Tensor>& jsd_sums, int64_t mode,
                                                     double inv_temperature, double beta, double scale,
                                                     bool need_grad) {
  minitron::check_kl_div_native_args(student, teacher, weight, mode, inv_temperature, beta);
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && weight.device().is_cpu(),
              "_kl_div_vp_fwd_native (CPU): all tensors must be on the CPU");
  check_vp_stats(stats, student, "_kl_div_vp_fwd_native");
  const int m = effective_mode(mode, beta);
  const int64_t n = student.size(0), v = student.size(1);
  const double* sums = nullptr;
  if (m == kJsd) {
    TORCH_CHECK(jsd_sums.has_value() && jsd_sums->scalar_type() == at::kDouble && jsd_sums->dim() == 2 &&
                    jsd_sums->size(0) == n && jsd_sums->size(1) == 3 && jsd_sums->is_contiguous() &&
                    jsd_sums->device() == student.device(),
                "_kl_div_vp_fwd_native: the JSD needs jsd_sums, a contiguous float64 [N, 3] tensor on the logits' "
                "device");
    sums = jsd_sums->data_ptr<double>();
  }
  at::Tensor loss = at::empty({n}, student.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({need_grad ? n : 0, v}, student.options());
  if (n == 0) return std::make_tuple(loss, grad);
  Problem P = vp_problem(student, teacher, weight, m, inv_temperature, beta);
  P.g = need_grad ? static_cast<char*>(grad.data_ptr()) : nullptr;
  P.loss = loss.data_ptr<float>();
  P.scale = static_cast<float>(scale);
  P.stream = grad.nbytes() >= (size_t{32} << 20);
  const Kernels K = kernels_of(student.scalar_type(), detect_isa(), m);
  const float* st = stats.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    Scratch sc(P.v, K.uses_scratch && need_grad);
    for (int64_t i = b; i < e; ++i) {
      const float w = P.w[i];
      const KlRow row = K.finalize(state_of(st + i * 5));
      if (w == 0.f || row.empty) {
        P.loss[i] = 0.f;
        if (P.g != nullptr) std::memset(P.g + i * P.v * P.elem, 0, static_cast<size_t>(P.v * P.elem));
        continue;
      }
      const float ws = w * P.scale;
      const float coef = ws * P.inv_t;
      if (m != kJsd) {
        P.loss[i] = ws * row.div;
        if (P.g == nullptr) continue;
        const RowCtx r = row_ctx(P, i, sc);
        if (K.uses_scratch) K.pass1(r, 0, P.v);
        K.pass2(r, 0, P.v, row, coef);
      } else {
        const double* sm = sums + i * 3;
        P.loss[i] = std::isnan(row.lse_a) ? row.lse_a : ws * static_cast<float>(sm[0]);
        if (P.g == nullptr) continue;
        const RowCtx r = row_ctx(P, i, sc);
        if (K.uses_scratch) {
          K.pass1(r, 0, P.v);
          K.jsd_pass2(r, 0, P.v, row, P.jsd);  // stores g in the scratch row for pass 3
        }
        K.jsd_pass3(r, 0, P.v, row, kl::jsd_centre(sm[1], sm[2]), coef, P.jsd);
      }
    }
  });
  return std::make_tuple(loss, grad);
}

}  // namespace kl_impl
}  // namespace cpu
}  // namespace minitron

TORCH_LIBRARY_FRAGMENT(minitron, m) {
  m.def(
      "_kl_div_fwd_native(Tensor student, Tensor teacher, Tensor weight, int mode, float inv_temperature, float beta, "
      "float scale, bool need_grad=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(minitron, m) {
  m.def(
      "_kl_div_stats_native(Tensor student, Tensor teacher, Tensor weight, int mode, float inv_temperature) "
      "-> Tensor");
  m.def(
      "_kl_div_jsd_sums_native(Tensor student, Tensor teacher, Tensor weight, Tensor stats, float inv_temperature, "
      "float beta) -> Tensor");
  m.def(
      "_kl_div_vp_fwd_native(Tensor student, Tensor teacher, Tensor weight, Tensor stats, Tensor? jsd_sums, int mode, "
      "float inv_temperature, float beta, float scale, bool need_grad=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minitron, CPU, m) {
  m.impl("_kl_div_fwd_native", &minitron::cpu::kl_impl::kl_div_fwd_cpu);
  m.impl("_kl_div_stats_native", &minitron::cpu::kl_impl::kl_div_stats_cpu);
  m.impl("_kl_div_jsd_sums_native", &minitron::cpu::kl_impl::kl_div_jsd_sums_cpu);
  m.impl("_kl_div_vp_fwd_native", &minitron::cpu::kl_impl::kl_div_vp_fwd_cpu);
}
