// CPU kernels of the fused importance reduction (torch.ops.minitron._importance_update_native) and
// of the block-influence metric (torch.ops.minitron._block_influence_update_native).
//
// Importance: x [B, S, U*G] (fp32/bf16/fp16, unit stride along channels, any batch/seq strides) is
// read once. Phase 1 runs at::parallel_for over work items (sample b, sequence chunk c, unit block):
// each streams the counted tokens of its rows (group_size == 1: four token rows per step, a block
// spanning up to 4096 units so that rows are long sequential reads; group_size > 1: one row of up to
// 4096 channels, a horizontal L2 norm per unit), computes magnitudes in fp32 and folds them into
// per-unit sequence accumulators (importance_math.h), then stores those to a small fp32 partial buffer
// [B, chunks, 2, U]. Sequence chunks exist only when samples x unit blocks are too few to keep the
// threads busy; their count depends on the shape alone. Phase 2 (parallel over units) combines the
// chunks of each sample, finalises the sequence aggregate and folds it, in sample order, into the fp32
// state [2, U]: results are deterministic for a given shape, whatever the thread count.
//
// The inner loops are written once on GCC vector types (W lanes) and instantiated in functions
// carrying target("avx512...")/target("avx2,fma") attributes, plus a 1-lane scalar fallback; the
// ISA is picked per call by minitron::cpu::detect_isa() (MINITRON_CPU_ISA caps it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "common/cpu_features.h"
#include "common/importance_math.h"
#include "importance_checks.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace minitron {
namespace cpu {
namespace {

namespace imp = ::minitron::importance;

#define MINITRON_ALWAYS_INLINE inline __attribute__((always_inline))

// Element types of x: storage as raw bits for the half types.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

template <int W>
struct VT {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
};

template <int W>
MINITRON_ALWAYS_INLINE typename VT<W>::f as_float(typename VT<W>::u u) {
  typename VT<W>::f f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <int W>
MINITRON_ALWAYS_INLINE typename VT<W>::u as_bits(typename VT<W>::f f) {
  typename VT<W>::u u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Zero-extend W 16-bit lanes to 32 bits. Interleaving with zeros through __builtin_shufflevector lowers to
// one vpmovzxwd (GCC 12 splits __builtin_convertvector of 16-bit vectors into several shuffles).
template <int W>
MINITRON_ALWAYS_INLINE typename VT<W>::u zext16(typename VT<W>::h h) {
  using U = typename VT<W>::u;
  if constexpr (W == 16) {
    const typename VT<W>::h z = {};
    const auto w = __builtin_shufflevector(h, z, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25,
                                           10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    U u;
    std::memcpy(&u, &w, sizeof u);
    return u;
  } else if constexpr (W == 8) {
    const typename VT<W>::h z = {};
    const auto w = __builtin_shufflevector(h, z, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    U u;
    std::memcpy(&u, &w, sizeof u);
    return u;
  } else {
    return __builtin_convertvector(h, U);
  }
}

// Load W elements of dtype DT at p (unaligned) as fp32 lanes.
template <int W, int DT>
MINITRON_ALWAYS_INLINE typename VT<W>::f load_vec(const void* p) {
  using U = typename VT<W>::u;
  if constexpr (DT == kF32) {
    typename VT<W>::f f;
    std::memcpy(&f, p, sizeof f);
    return f;
  } else {
    typename VT<W>::h h;
    std::memcpy(&h, p, sizeof h);
    U u = zext16<W>(h);
    if constexpr (DT == kBF16) {
      return as_float<W>(u << 16);
    } else {
      // IEEE half -> float without F16C: move exponent/mantissa into place, rebias, then fix up
      // Inf/NaN (exponent 31) and subnormals (exponent 0, renormalised by a float subtraction).
      U sign = (u & 0x8000u) << 16;
      U em = (u & 0x7fffu) << 13;
      U exp = em & 0x0f800000u;
      U r = em + ((127u - 15u) << 23);
      r = (exp == 0x0f800000u) ? r + ((128u - 16u) << 23) : r;
      typename VT<W>::f sub = as_float<W>(r + (1u << 23)) - as_float<W>(U{} + (113u << 23));
      typename VT<W>::f f = (exp == 0u) ? sub : as_float<W>(r);
      return as_float<W>(as_bits<W>(f) | sign);
    }
  }
}

template <int W, int DT>
MINITRON_ALWAYS_INLINE typename VT<W>::f load_abs(const void* p) {
  return as_float<W>(as_bits<W>(load_vec<W, DT>(p)) & 0x7fffffffu);
}

template <int W>
MINITRON_ALWAYS_INLINE float hsum(typename VT<W>::f v) {
  if constexpr (W == 1) {
    return v[0];
  } else {
    typename VT<W / 2>::f lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return hsum<W / 2>(lo + hi);
  }
}

constexpr int64_t elem_size(int dt) { return dt == kF32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------
// importance, phase 1
// ---------------------------------------------------------------------------------------------

constexpr int64_t kUnitBlock = 4096;     // max units per work item, group_size == 1 (multiple of 16)
constexpr int64_t kGroupedBlock = 64;    // max units per work item, group_size > 1
constexpr int64_t kGroupedElems = 4096;  // target channels per row and work item, group_size > 1
constexpr int64_t kMinChunk = 128;       // min tokens per sequence chunk
constexpr int64_t kTargetItems = 64;     // split the sequence until there are this many work items

struct ImpParams {
  const char* x;
  int64_t B, S, U, G;
  int64_t sxb, sxs;  // byte strides of x along batch and sequence
  const bool* mask;  // nullptr: all tokens count
  int64_t smb, sms;  // element strides of mask
  const int64_t* first;  // [B] first counted token of each sample (S when none)
  int64_t nch, chunk;    // sequence chunks per sample and their length
  float* partial;        // [B, nch, 2, U]
};

// group_size == 1, four counted token rows r[0..3] into the accumulators of nv vectors + nt tail lanes.
template <int W, int DT, int AGG>
MINITRON_ALWAYS_INLINE void g1_rows4(const char* const* r, int64_t nv, int64_t nt, typename VT<W>::f* a1,
                                     typename VT<W>::f* a2, const typename VT<W>::f* K, typename VT<1>::f* t1,
                                     typename VT<1>::f* t2, const typename VT<1>::f* tk) {
  constexpr int64_t ES = elem_size(DT);
  const char *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
  for (int64_t j = 0; j < nv; ++j) {
    const int64_t o = j * W * ES;
    imp::seq_accumulate4<AGG>(load_abs<W, DT>(r0 + o), load_abs<W, DT>(r1 + o), load_abs<W, DT>(r2 + o),
                              load_abs<W, DT>(r3 + o), K[j], a1[j], a2[j]);
  }
  for (int64_t j = 0; j < nt; ++j) {
    const int64_t o = (nv * W + j) * ES;
    imp::seq_accumulate4<AGG>(load_abs<1, DT>(r0 + o), load_abs<1, DT>(r1 + o), load_abs<1, DT>(r2 + o),
                              load_abs<1, DT>(r3 + o), tk[j], t1[j], t2[j]);
  }
}

template <int W, int DT, int AGG>
MINITRON_ALWAYS_INLINE void g1_row1(const char* r0, int64_t nv, int64_t nt, typename VT<W>::f* a1,
                                    typename VT<W>::f* a2, const typename VT<W>::f* K, typename VT<1>::f* t1,
                                    typename VT<1>::f* t2, const typename VT<1>::f* tk) {
  constexpr int64_t ES = elem_size(DT);
  for (int64_t j = 0; j < nv; ++j) imp::seq_accumulate<AGG>(load_abs<W, DT>(r0 + j * W * ES), K[j], a1[j], a2[j]);
  for (int64_t j = 0; j < nt; ++j)
    imp::seq_accumulate<AGG>(load_abs<1, DT>(r0 + (nv * W + j) * ES), tk[j], t1[j], t2[j]);
}

// group_size == 1: units are channels, W units per vector; counted token rows are streamed four at a
// time (contiguous rows when the block spans the whole row: plain sequential reads).
template <int W, int DT, int AGG>
MINITRON_ALWAYS_INLINE void seq_block_g1(const ImpParams& p, int64_t b, int64_t c, int64_t u0, int64_t u1) {
  using V = typename VT<W>::f;
  using V1 = typename VT<1>::f;
  constexpr int64_t ES = elem_size(DT);
  constexpr int MAXV = kUnitBlock / W;
  const int64_t nu = u1 - u0;
  const int64_t nv = nu / W;
  const int64_t nt = nu - nv * W;  // < W
  V a1[MAXV], a2[MAXV], K[MAXV];
  V1 t1[W], t2[W], tk[W];
  for (int64_t j = 0; j < nv; ++j) a1[j] = a2[j] = K[j] = V{};
  for (int64_t j = 0; j < nt; ++j) t1[j] = t2[j] = tk[j] = V1{};
  const char* xb = p.x + b * p.sxb + u0 * ES;
  if constexpr (AGG == imp::kVar) {
    const int64_t s0 = p.first[b];
    if (s0 < p.S) {
      const char* row = xb + s0 * p.sxs;
      for (int64_t j = 0; j < nv; ++j) K[j] = load_abs<W, DT>(row + j * W * ES);
      for (int64_t j = 0; j < nt; ++j) tk[j] = load_abs<1, DT>(row + (nv * W + j) * ES);
    }
  }
  const int64_t s_begin = c * p.chunk;
  const int64_t s_end = std::min(p.S, s_begin + p.chunk);
  const bool* mrow = p.mask ? p.mask + b * p.smb : nullptr;
  const char* rows[4];
  int nr = 0;
  for (int64_t s = s_begin; s < s_end; ++s) {
    if (mrow && !mrow[s * p.sms]) continue;
    rows[nr++] = xb + s * p.sxs;
    if (nr == 4) {
      g1_rows4<W, DT, AGG>(rows, nv, nt, a1, a2, K, t1, t2, tk);
      nr = 0;
    }
  }
  for (int i = 0; i < nr; ++i) g1_row1<W, DT, AGG>(rows[i], nv, nt, a1, a2, K, t1, t2, tk);
  float* out1 = p.partial + ((b * p.nch + c) * 2) * p.U + u0;
  float* out2 = out1 + p.U;
  for (int64_t j = 0; j < nv; ++j) {
    std::memcpy(out1 + j * W, &a1[j], sizeof(V));
    std::memcpy(out2 + j * W, &a2[j], sizeof(V));
  }
  for (int64_t j = 0; j < nt; ++j) {
    out1[nv * W + j] = t1[j][0];
    out2[nv * W + j] = t2[j][0];
  }
}

// Sum of squares over one group of G channels.
template <int W, int DT>
MINITRON_ALWAYS_INLINE float group_sumsq(const char* g, int64_t G) {
  using V = typename VT<W>::f;
  constexpr int64_t ES = elem_size(DT);
  V acc0 = V{}, acc1 = V{};
  int64_t k = 0;
  for (; k + 2 * W <= G; k += 2 * W) {
    acc0 = imp::sumsq_step(acc0, load_vec<W, DT>(g + k * ES));
    acc1 = imp::sumsq_step(acc1, load_vec<W, DT>(g + (k + W) * ES));
  }
  if (k + W <= G) {
    acc0 = imp::sumsq_step(acc0, load_vec<W, DT>(g + k * ES));
    k += W;
  }
  float ss = hsum<W>(acc0 + acc1);
  for (; k < G; ++k) {
    float v = load_vec<1, DT>(g + k * ES)[0];
    ss = imp::sumsq_step(ss, v);
  }
  return ss;
}

// group_size > 1: a unit is G consecutive channels; its magnitude is their L2 norm.
template <int W, int DT, int AGG>
MINITRON_ALWAYS_INLINE void seq_block_grouped(const ImpParams& p, int64_t b, int64_t c, int64_t u0, int64_t u1) {
  constexpr int64_t ES = elem_size(DT);
  const int64_t nu = u1 - u0;
  const int64_t G = p.G;
  float a1[kGroupedBlock], a2[kGroupedBlock], K[kGroupedBlock];
  for (int64_t j = 0; j < nu; ++j) a1[j] = a2[j] = K[j] = 0.0f;
  const char* xb = p.x + b * p.sxb + u0 * G * ES;
  if constexpr (AGG == imp::kVar) {
    const int64_t s0 = p.first[b];
    if (s0 < p.S) {
      const char* row = xb + s0 * p.sxs;
      for (int64_t j = 0; j < nu; ++j) K[j] = imp::magnitude_from_sumsq(group_sumsq<W, DT>(row + j * G * ES, G));
    }
  }
  const int64_t s_begin = c * p.chunk;
  const int64_t s_end = std::min(p.S, s_begin + p.chunk);
  const bool* mrow = p.mask ? p.mask + b * p.smb : nullptr;
  for (int64_t s = s_begin; s < s_end; ++s) {
    if (mrow && !mrow[s * p.sms]) continue;
    const char* row = xb + s * p.sxs;
    for (int64_t j = 0; j < nu; ++j) {
      float m = imp::magnitude_from_sumsq(group_sumsq<W, DT>(row + j * G * ES, G));
      imp::seq_accumulate<AGG>(m, K[j], a1[j], a2[j]);
    }
  }
  float* out1 = p.partial + ((b * p.nch + c) * 2) * p.U + u0;
  float* out2 = out1 + p.U;
  for (int64_t j = 0; j < nu; ++j) {
    out1[j] = a1[j];
    out2[j] = a2[j];
  }
}

// Non-finite values of x at the counted tokens of chunk c of sample b, units [u0, u1). A scalar rescan, run
// only for work items whose sequence accumulators came out non-finite (every NaN/inf input makes them so;
// an fp32 overflow of finite inputs does too, and then the rescan finds 0): the hot loop pays nothing.
template <int DT>
int64_t count_nonfinite_chunk(const ImpParams& p, int64_t b, int64_t c, int64_t u0, int64_t u1) {
  constexpr int64_t ES = elem_size(DT);
  const char* xb = p.x + b * p.sxb;
  const int64_t s_begin = c * p.chunk;
  const int64_t s_end = std::min(p.S, s_begin + p.chunk);
  const bool* mrow = p.mask ? p.mask + b * p.smb : nullptr;
  int64_t n = 0;
  for (int64_t s = s_begin; s < s_end; ++s) {
    if (mrow && !mrow[s * p.sms]) continue;
    const char* row = xb + s * p.sxs;
    for (int64_t k = u0 * p.G; k < u1 * p.G; ++k) {
      uint32_t bits;
      const float v = load_vec<1, DT>(row + k * ES)[0];
      std::memcpy(&bits, &v, sizeof bits);
      n += imp::nonfinite_bits(bits) ? 1 : 0;
    }
  }
  return n;
}

int64_t count_nonfinite_chunk_dt(int dt, const ImpParams& p, int64_t b, int64_t c, int64_t u0, int64_t u1) {
  if (dt == kBF16) return count_nonfinite_chunk<kBF16>(p, b, c, u0, u1);
  if (dt == kF16) return count_nonfinite_chunk<kF16>(p, b, c, u0, u1);
  return count_nonfinite_chunk<kF32>(p, b, c, u0, u1);
}

// True when any of the n floats at p is NaN or +-inf.
bool any_nonfinite(const float* p, int64_t n) {
  uint32_t acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, p + i, sizeof bits);
    acc |= imp::nonfinite_bits(bits) ? 1u : 0u;
  }
  return acc != 0;
}

template <int W, int DT, int AGG>
MINITRON_ALWAYS_INLINE void seq_block(const ImpParams& p, int64_t b, int64_t c, int64_t u0, int64_t u1) {
  if (p.G == 1)
    seq_block_g1<W, DT, AGG>(p, b, c, u0, u1);
  else
    seq_block_grouped<W, DT, AGG>(p, b, c, u0, u1);
}

using SeqFn = void (*)(const ImpParams&, int64_t, int64_t, int64_t, int64_t);

template <int DT, int AGG>
MINITRON_TARGET_AVX512 void seq_block_avx512(const ImpParams& p, int64_t b, int64_t c, int64_t u0, int64_t u1) {
  seq_block<16, DT, AGG>(p, b, c, u0, u1);
}

template <int DT, int AGG>
MINITRON_TARGET_AVX2 void seq_block_avx2(const ImpParams& p, int64_t b, int64_t c, int64_t u0, int64_t u1) {
  seq_block<8, DT, AGG>(p, b, c, u0, u1);
}

template <int DT, int AGG>
void seq_block_scalar(const ImpParams& p, int64_t b, int64_t c, int64_t u0, int64_t u1) {
  seq_block<1, DT, AGG>(p, b, c, u0, u1);
}

template <int DT, int AGG>
SeqFn pick_seq_isa(Isa isa) {
#if MINITRON_HAS_X86_DISPATCH
  if (isa == Isa::kAvx512) return &seq_block_avx512<DT, AGG>;
  if (isa == Isa::kAvx2) return &seq_block_avx2<DT, AGG>;
#endif
  (void)isa;
  return &seq_block_scalar<DT, AGG>;
}

template <int DT>
SeqFn pick_seq_agg(Isa isa, int agg) {
  switch (agg) {
    case imp::kMean:
      return pick_seq_isa<DT, imp::kMean>(isa);
    case imp::kL2:
      return pick_seq_isa<DT, imp::kL2>(isa);
    case imp::kSum:
      return pick_seq_isa<DT, imp::kSum>(isa);
    case imp::kMax:
      return pick_seq_isa<DT, imp::kMax>(isa);
    default:
      return pick_seq_isa<DT, imp::kVar>(isa);
  }
}

SeqFn pick_seq(Isa isa, int dt, int agg) {
  if (dt == kBF16) return pick_seq_agg<kBF16>(isa, agg);
  if (dt == kF16) return pick_seq_agg<kF16>(isa, agg);
  return pick_seq_agg<kF32>(isa, agg);
}

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return kF32;
}

// Per sample: number of counted tokens and index of the first one (S when none).
void mask_stats(const std::optional<at::Tensor>& mask, int64_t B, int64_t S, std::vector<int64_t>& counts,
                std::vector<int64_t>& first) {
  counts.assign(B, S);
  first.assign(B, S > 0 ? 0 : S);
  if (!mask.has_value()) return;
  const bool* m = mask->data_ptr<bool>();
  const int64_t smb = mask->stride(0), sms = mask->stride(1);
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = 0, f = S;
    for (int64_t s = 0; s < S; ++s) {
      if (m[b * smb + s * sms]) {
        if (f == S) f = s;
        ++n;
      }
    }
    counts[b] = n;
    first[b] = f;
  }
}

void importance_update_cpu(const at::Tensor& state, const at::Tensor& count, const at::Tensor& x_in,
                           const std::optional<at::Tensor>& mask, int64_t group_size, int64_t seq_agg,
                           int64_t batch_agg) {
  check_importance_update_args(state, count, x_in, mask, group_size, seq_agg, batch_agg);
  const int64_t U = state.size(1);
  const int64_t B = x_in.size(0), S = x_in.size(1);
  const int dt = dtype_code(x_in, "x");
  for (const at::Tensor* t : {&state, &count, &x_in}) TORCH_CHECK(t->device().is_cpu(), "expected CPU tensors");
  if (B == 0 || S == 0 || U == 0) return;
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();

  std::vector<int64_t> counts, first;
  mask_stats(mask, B, S, counts, first);

  const int64_t G = group_size;
  int64_t ub;
  if (G == 1) {  // balanced blocks of at most kUnitBlock units, multiples of 16 lanes
    const int64_t nb = (U + kUnitBlock - 1) / kUnitBlock;
    ub = std::min(kUnitBlock, ((U + nb - 1) / nb + 15) / 16 * 16);
  } else {
    ub = std::max<int64_t>(1, std::min(kGroupedBlock, kGroupedElems / G));
  }
  const int64_t nblk = (U + ub - 1) / ub;
  const int64_t items0 = B * nblk;
  int64_t nch = 1;
  if (items0 < kTargetItems) {
    nch = std::min((kTargetItems + items0 - 1) / items0, std::max<int64_t>(1, S / kMinChunk));
  }
  const int64_t chunk = (S + nch - 1) / nch;
  nch = (S + chunk - 1) / chunk;

  std::vector<float> partial(static_cast<size_t>(B * nch * 2 * U));
  ImpParams p;
  p.x = static_cast<const char*>(x.data_ptr());
  p.B = B;
  p.S = S;
  p.U = U;
  p.G = G;
  p.sxb = x.stride(0) * x.element_size();
  p.sxs = x.stride(1) * x.element_size();
  p.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  p.smb = mask.has_value() ? mask->stride(0) : 0;
  p.sms = mask.has_value() ? mask->stride(1) : 0;
  p.first = first.data();
  p.nch = nch;
  p.chunk = chunk;
  p.partial = partial.data();

  const SeqFn fn = pick_seq(detect_isa(), dt, static_cast<int>(seq_agg));
  const int64_t items = B * nch * nblk;
  std::vector<int64_t> nonfinite(static_cast<size_t>(items), 0);
  at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t blk = w % nblk;
      const int64_t bc = w / nblk;
      const int64_t c = bc % nch;
      const int64_t b = bc / nch;
      if (counts[b] == 0) continue;
      const int64_t u0 = blk * ub;
      const int64_t u1 = std::min(U, u0 + ub);
      fn(p, b, c, u0, u1);
      const float* out1 = p.partial + ((b * nch + c) * 2) * U + u0;
      if (any_nonfinite(out1, u1 - u0) || any_nonfinite(out1 + U, u1 - u0))
        nonfinite[w] = count_nonfinite_chunk_dt(dt, p, b, c, u0, u1);
    }
  });

  // Phase 2: per unit, samples in order -> fp32 state.
  float* st = state.data_ptr<float>();
  int64_t* cnt = count.data_ptr<int64_t>();
  const int64_t n0 = cnt[0];
  const int sa = static_cast<int>(seq_agg), ba = static_cast<int>(batch_agg);
  at::parallel_for(0, U, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u) {
      float A = st[u], Bs = st[U + u];
      int64_t n = n0;
      for (int64_t b = 0; b < B; ++b) {
        if (counts[b] == 0) continue;
        const float* pb = p.partial + (b * nch * 2) * U + u;
        float a1 = pb[0], a2 = pb[U];
        for (int64_t c = 1; c < nch; ++c) {
          if (sa == imp::kMax)
            imp::seq_combine<imp::kMax>(a1, a2, pb[c * 2 * U], pb[c * 2 * U + U]);
          else
            imp::seq_combine<imp::kSum>(a1, a2, pb[c * 2 * U], pb[c * 2 * U + U]);
        }
        const float v = imp::seq_finalize(sa, a1, a2, static_cast<float>(counts[b]));
        imp::batch_update(ba, v, static_cast<float>(n), A, Bs);
        ++n;
      }
      st[u] = A;
      st[U + u] = Bs;
    }
  });
  int64_t added = 0;
  for (int64_t b = 0; b < B; ++b) added += counts[b] > 0 ? 1 : 0;
  cnt[0] = n0 + added;
  for (const int64_t n : nonfinite) cnt[1] += n;
}

// ---------------------------------------------------------------------------------------------
// block influence
// ---------------------------------------------------------------------------------------------

constexpr int64_t kTokenChunk = 32;  // tokens per work item (fixed: results independent of threads)

struct BiParams {
  const char* a;
  const char* b;
  int64_t S, H;
  int64_t sab, sas, sbb, sbs;  // byte strides
  const bool* mask;
  int64_t smb, sms;
};

template <int W, int DT>
MINITRON_ALWAYS_INLINE void bi_chunk(const BiParams& p, int64_t t0, int64_t t1, double* sum, int64_t* cnt,
                                     int64_t* bad) {
  using V = typename VT<W>::f;
  constexpr int64_t ES = elem_size(DT);
  const int64_t H = p.H;
  double acc = 0.0;
  int64_t n = 0, nbad = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t bi = t / p.S, si = t % p.S;
    if (p.mask && !p.mask[bi * p.smb + si * p.sms]) continue;
    const char* ra = p.a + bi * p.sab + si * p.sas;
    const char* rb = p.b + bi * p.sbb + si * p.sbs;
    V d0 = V{}, d1 = V{}, x0 = V{}, x1 = V{}, y0 = V{}, y1 = V{};
    int64_t k = 0;
    for (; k + 2 * W <= H; k += 2 * W) {
      V va = load_vec<W, DT>(ra + k * ES), vb = load_vec<W, DT>(rb + k * ES);
      V wa = load_vec<W, DT>(ra + (k + W) * ES), wb = load_vec<W, DT>(rb + (k + W) * ES);
      d0 += va * vb;
      x0 += va * va;
      y0 += vb * vb;
      d1 += wa * wb;
      x1 += wa * wa;
      y1 += wb * wb;
    }
    if (k + W <= H) {
      V va = load_vec<W, DT>(ra + k * ES), vb = load_vec<W, DT>(rb + k * ES);
      d0 += va * vb;
      x0 += va * va;
      y0 += vb * vb;
      k += W;
    }
    float dot = hsum<W>(d0 + d1), na = hsum<W>(x0 + x1), nb = hsum<W>(y0 + y1);
    for (; k < H; ++k) {
      float va = load_vec<1, DT>(ra + k * ES)[0], vb = load_vec<1, DT>(rb + k * ES)[0];
      dot += va * vb;
      na += va * va;
      nb += vb * vb;
    }
    uint32_t ba, bb;
    std::memcpy(&ba, &na, sizeof ba);
    std::memcpy(&bb, &nb, sizeof bb);
    if (imp::nonfinite_bits(ba) || imp::nonfinite_bits(bb)) {  // rare: count the row's NaN/inf values
      for (int64_t j = 0; j < H; ++j) {
        const float v[2] = {load_vec<1, DT>(ra + j * ES)[0], load_vec<1, DT>(rb + j * ES)[0]};
        uint32_t bits[2];
        std::memcpy(bits, v, sizeof bits);
        nbad += (imp::nonfinite_bits(bits[0]) ? 1 : 0) + (imp::nonfinite_bits(bits[1]) ? 1 : 0);
      }
    }
    acc += static_cast<double>(imp::one_minus_cos(dot, na, nb));
    ++n;
  }
  *sum = acc;
  *cnt = n;
  *bad = nbad;
}

using BiFn = void (*)(const BiParams&, int64_t, int64_t, double*, int64_t*, int64_t*);

template <int DT>
MINITRON_TARGET_AVX512 void bi_chunk_avx512(const BiParams& p, int64_t t0, int64_t t1, double* s, int64_t* n,
                                            int64_t* bad) {
  bi_chunk<16, DT>(p, t0, t1, s, n, bad);
}
template <int DT>
MINITRON_TARGET_AVX2 void bi_chunk_avx2(const BiParams& p, int64_t t0, int64_t t1, double* s, int64_t* n,
                                        int64_t* bad) {
  bi_chunk<8, DT>(p, t0, t1, s, n, bad);
}
template <int DT>
void bi_chunk_scalar(const BiParams& p, int64_t t0, int64_t t1, double* s, int64_t* n, int64_t* bad) {
  bi_chunk<1, DT>(p, t0, t1, s, n, bad);
}

template <int DT>
BiFn pick_bi_isa(Isa isa) {
#if MINITRON_HAS_X86_DISPATCH
  if (isa == Isa::kAvx512) return &bi_chunk_avx512<DT>;
  if (isa == Isa::kAvx2) return &bi_chunk_avx2<DT>;
#endif
  (void)isa;
  return &bi_chunk_scalar<DT>;
}

void block_influence_update_cpu(const at::Tensor& state, const at::Tensor& count, const at::Tensor& h_in_,
                                const at::Tensor& h_out_, const std::optional<at::Tensor>& mask, int64_t layer) {
  check_block_influence_args(state, count, h_in_, h_out_, mask, layer);
  const int dt = dtype_code(h_in_, "h_in");
  const int64_t B = h_in_.size(0), S = h_in_.size(1), H = h_in_.size(2);
  if (B == 0 || S == 0) return;
  const at::Tensor a = h_in_.stride(2) == 1 ? h_in_ : h_in_.contiguous();
  const at::Tensor b = h_out_.stride(2) == 1 ? h_out_ : h_out_.contiguous();
  BiParams p;
  p.a = static_cast<const char*>(a.data_ptr());
  p.b = static_cast<const char*>(b.data_ptr());
  p.S = S;
  p.H = H;
  p.sab = a.stride(0) * a.element_size();
  p.sas = a.stride(1) * a.element_size();
  p.sbb = b.stride(0) * b.element_size();
  p.sbs = b.stride(1) * b.element_size();
  p.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  p.smb = mask.has_value() ? mask->stride(0) : 0;
  p.sms = mask.has_value() ? mask->stride(1) : 0;

  const Isa isa = detect_isa();
  const BiFn fn = dt == kBF16 ? pick_bi_isa<kBF16>(isa) : dt == kF16 ? pick_bi_isa<kF16>(isa) : pick_bi_isa<kF32>(isa);
  const int64_t T = B * S;
  const int64_t nchunks = (T + kTokenChunk - 1) / kTokenChunk;
  std::vector<double> sums(nchunks);
  std::vector<int64_t> ns(nchunks), bads(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c)
      fn(p, c * kTokenChunk, std::min(T, (c + 1) * kTokenChunk), &sums[c], &ns[c], &bads[c]);
  });
  double total = 0.0;
  int64_t n = 0, bad = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    total += sums[c];
    n += ns[c];
    bad += bads[c];
  }
  const int64_t L = state.size(0);
  state.data_ptr<double>()[layer] += total;
  count.data_ptr<int64_t>()[layer] += n;
  count.data_ptr<int64_t>()[L + layer] += bad;
}

}  // namespace
}  // namespace cpu
}  // namespace minitron

TORCH_LIBRARY_FRAGMENT(minitron, m) {
  m.def(
      "_importance_update_native(Tensor(a!) state, Tensor(b!) count, Tensor x, Tensor? mask, int group_size, "
      "int seq_agg, int batch_agg) -> ()");
  m.def(
      "_block_influence_update_native(Tensor(a!) state, Tensor(b!) count, Tensor h_in, Tensor h_out, "
      "Tensor? mask, int layer) -> ()");
}

TORCH_LIBRARY_IMPL(minitron, CPU, m) {
  m.impl("_importance_update_native", &minitron::cpu::importance_update_cpu);
  m.impl("_block_influence_update_native", &minitron::cpu::block_influence_update_cpu);
}
