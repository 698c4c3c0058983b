// CPU kernel of the grouped (segment) importance reduction (torch.ops.minitron._grouped_importance_update_native).
//
// x [N, U*G] (fp32/bf16/fp16, unit stride along channels, any row stride) holds rows sorted into J = groups *
// samples segments by offsets [J + 1] (csrc/common/grouped_importance_math.h); weights [N] (optional, any
// float dtype and stride) scale each row. x is read once.
//
// Phase 1: work items = (row chunk of a non-empty segment, unit block), handed out dynamically (an atomic
// counter inside at::parallel_for: segments are ragged, so static splits would idle threads). Each item streams
// its rows (group_size == 1: four rows per step across a block of up to 4096 units; group_size > 1: one row at a
// time, a horizontal L2 norm per unit over up to 4096 channels), computes weighted magnitudes in fp32, folds them
// into per-unit sequence accumulators (importance_math.h) and stores them to its own slot of a fp32 partial
// buffer [chunks, 2, U]. Chunking depends on the shape alone and every item writes its own slot, so results are
// deterministic whatever the thread count or scheduling.
// Phase 2 (parallel over group x unit range): per group and unit, the group's segments in sample order:
// combine their chunks, finalise the sequence aggregate, fold into the fp32 state [groups, 2, U].
// Non-finite values of w * x are counted by a scalar rescan of only those items whose accumulators came out
// non-finite (every NaN/inf product makes them so), so the hot loop pays nothing.
//
// The inner loops are written once on GCC vector types (W lanes) and instantiated in functions carrying
// target("avx512...")/target("avx2,fma") attributes, plus a 1-lane scalar fallback; the ISA is picked per call
// by minitron::cpu::detect_isa() (MINITRON_CPU_ISA caps it).
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#define MINITRON_GROUPED_IMPORTANCE_CHECKS 1
#include "common/cpu_features.h"
#include "common/grouped_importance_math.h"
#include "common/importance_math.h"

namespace minitron {
namespace cpu {
namespace {

namespace imp = ::minitron::importance;
namespace gim = ::minitron::grouped_importance;

#define MINITRON_GI_INLINE inline __attribute__((always_inline))

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

template <int W>
struct VT {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
};

template <int W>
MINITRON_GI_INLINE typename VT<W>::f as_float(typename VT<W>::u u) {
  typename VT<W>::f f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <int W>
MINITRON_GI_INLINE typename VT<W>::u as_bits(typename VT<W>::f f) {
  typename VT<W>::u u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Zero-extend W 16-bit lanes to 32 bits (an interleave with zeros: one vpmovzxwd).
template <int W>
MINITRON_GI_INLINE typename VT<W>::u zext16(typename VT<W>::h h) {
  using U = typename VT<W>::u;
  U u;
  if constexpr (W == 16) {
    const typename VT<W>::h z = {};
    const auto w = __builtin_shufflevector(h, z, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25,
                                           10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    std::memcpy(&u, &w, sizeof u);
    return u;
  } else if constexpr (W == 8) {
    const typename VT<W>::h z = {};
    const auto w = __builtin_shufflevector(h, z, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    std::memcpy(&u, &w, sizeof u);
    return u;
  } else {
    return __builtin_convertvector(h, U);
  }
}

// W elements of dtype DT at p (unaligned) as fp32 lanes (exact conversions; NaN stays NaN).
template <int W, int DT>
MINITRON_GI_INLINE typename VT<W>::f load_vec(const void* p) {
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
    } else {  // IEEE half -> float without F16C (rebias; fix up inf/NaN and subnormals)
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
MINITRON_GI_INLINE typename VT<W>::f load_abs(const void* p) {
  return as_float<W>(as_bits<W>(load_vec<W, DT>(p)) & 0x7fffffffu);
}

template <int W>
MINITRON_GI_INLINE float hsum(typename VT<W>::f v) {
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

// One scalar of dtype dt at p as float.
inline float load_scalar(int dt, const char* p) {
  if (dt == kBF16) return load_vec<1, kBF16>(p)[0];
  if (dt == kF16) return load_vec<1, kF16>(p)[0];
  return load_vec<1, kF32>(p)[0];
}

// ---------------------------------------------------------------------------------------------
// phase 1
// ---------------------------------------------------------------------------------------------

constexpr int64_t kUnitBlock = 4096;     // max units per work item, group_size == 1 (multiple of 16)
constexpr int64_t kGroupedBlock = 64;    // max units per work item, group_size > 1
constexpr int64_t kGroupedElems = 4096;  // target channels per row and work item, group_size > 1

struct Chunk {
  int64_t seg;     // segment index j
  int64_t r0, r1;  // rows [r0, r1) of x
};

struct GParams {
  const char* x;
  int64_t sxr;       // byte stride of x rows
  const char* w;     // weights (nullptr: 1)
  int wdt;           // DType of weights
  int64_t swr;       // byte stride of weights
  int64_t U, G;
  const int64_t* off;  // [J + 1]
  float* partial;      // [chunks, 2, U]
};

MINITRON_GI_INLINE float row_weight(const GParams& p, int64_t r) {
  return p.w ? std::fabs(load_scalar(p.wdt, p.w + r * p.swr)) : 1.0f;
}

// group_size == 1: units are channels, W per vector; rows streamed four at a time.
template <int W, int DT, int AGG>
MINITRON_GI_INLINE void chunk_g1(const GParams& p, const Chunk& ch, int64_t slot, int64_t u0, int64_t u1) {
  using V = typename VT<W>::f;
  using V1 = typename VT<1>::f;
  constexpr int64_t ES = elem_size(DT);
  constexpr int MAXV = kUnitBlock / W;
  const int64_t nu = u1 - u0;
  const int64_t nv = nu / W;
  const int64_t nt = nu - nv * W;
  V a1[MAXV], a2[MAXV], K[MAXV];
  V1 t1[W], t2[W], tk[W];
  for (int64_t j = 0; j < nv; ++j) a1[j] = a2[j] = K[j] = V{};
  for (int64_t j = 0; j < nt; ++j) t1[j] = t2[j] = tk[j] = V1{};
  const char* xb = p.x + u0 * ES;
  if constexpr (AGG == imp::kVar) {  // shift: the magnitude at the segment's first row (shared by its chunks)
    const int64_t rf = p.off[ch.seg];
    const char* row = xb + rf * p.sxr;
    const float wf = row_weight(p, rf);
    for (int64_t j = 0; j < nv; ++j) K[j] = gim::weighted_abs(load_abs<W, DT>(row + j * W * ES), V{} + wf);
    for (int64_t j = 0; j < nt; ++j) tk[j] = gim::weighted_abs(load_abs<1, DT>(row + (nv * W + j) * ES), V1{} + wf);
  }
  int64_t r = ch.r0;
  for (; r + 4 <= ch.r1; r += 4) {
    const char* r0 = xb + r * p.sxr;
    const char* r1 = r0 + p.sxr;
    const char* r2 = r1 + p.sxr;
    const char* r3 = r2 + p.sxr;
    const float w0 = row_weight(p, r), w1 = row_weight(p, r + 1), w2 = row_weight(p, r + 2), w3 = row_weight(p, r + 3);
    for (int64_t j = 0; j < nv; ++j) {
      const int64_t o = j * W * ES;
      imp::seq_accumulate4<AGG>(gim::weighted_abs(load_abs<W, DT>(r0 + o), V{} + w0),
                                gim::weighted_abs(load_abs<W, DT>(r1 + o), V{} + w1),
                                gim::weighted_abs(load_abs<W, DT>(r2 + o), V{} + w2),
                                gim::weighted_abs(load_abs<W, DT>(r3 + o), V{} + w3), K[j], a1[j], a2[j]);
    }
    for (int64_t j = 0; j < nt; ++j) {
      const int64_t o = (nv * W + j) * ES;
      imp::seq_accumulate4<AGG>(gim::weighted_abs(load_abs<1, DT>(r0 + o), V1{} + w0),
                                gim::weighted_abs(load_abs<1, DT>(r1 + o), V1{} + w1),
                                gim::weighted_abs(load_abs<1, DT>(r2 + o), V1{} + w2),
                                gim::weighted_abs(load_abs<1, DT>(r3 + o), V1{} + w3), tk[j], t1[j], t2[j]);
    }
  }
  for (; r < ch.r1; ++r) {
    const char* r0 = xb + r * p.sxr;
    const float w0 = row_weight(p, r);
    for (int64_t j = 0; j < nv; ++j)
      imp::seq_accumulate<AGG>(gim::weighted_abs(load_abs<W, DT>(r0 + j * W * ES), V{} + w0), K[j], a1[j], a2[j]);
    for (int64_t j = 0; j < nt; ++j)
      imp::seq_accumulate<AGG>(gim::weighted_abs(load_abs<1, DT>(r0 + (nv * W + j) * ES), V1{} + w0), tk[j], t1[j],
                               t2[j]);
  }
  float* out1 = p.partial + slot * 2 * p.U + u0;
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

// Sum over one unit's G channels of (w * x)^2.
template <int W, int DT>
MINITRON_GI_INLINE float group_sumsq(const char* g, int64_t G, float w) {
  using V = typename VT<W>::f;
  constexpr int64_t ES = elem_size(DT);
  V acc0 = V{}, acc1 = V{};
  int64_t k = 0;
  for (; k + 2 * W <= G; k += 2 * W) {
    acc0 = imp::sumsq_step(acc0, load_vec<W, DT>(g + k * ES) * w);
    acc1 = imp::sumsq_step(acc1, load_vec<W, DT>(g + (k + W) * ES) * w);
  }
  if (k + W <= G) {
    acc0 = imp::sumsq_step(acc0, load_vec<W, DT>(g + k * ES) * w);
    k += W;
  }
  float ss = hsum<W>(acc0 + acc1);
  for (; k < G; ++k) ss = imp::sumsq_step(ss, load_vec<1, DT>(g + k * ES)[0] * w);
  return ss;
}

// group_size > 1: a unit is G consecutive channels; its magnitude is the L2 norm of w * x over them.
template <int W, int DT, int AGG>
MINITRON_GI_INLINE void chunk_grouped(const GParams& p, const Chunk& ch, int64_t slot, int64_t u0, int64_t u1) {
  constexpr int64_t ES = elem_size(DT);
  const int64_t nu = u1 - u0;
  const int64_t G = p.G;
  float a1[kGroupedBlock], a2[kGroupedBlock], K[kGroupedBlock];
  for (int64_t j = 0; j < nu; ++j) a1[j] = a2[j] = K[j] = 0.0f;
  const char* xb = p.x + u0 * G * ES;
  if constexpr (AGG == imp::kVar) {
    const int64_t rf = p.off[ch.seg];
    const char* row = xb + rf * p.sxr;
    const float wf = row_weight(p, rf);
    for (int64_t j = 0; j < nu; ++j) K[j] = imp::magnitude_from_sumsq(group_sumsq<W, DT>(row + j * G * ES, G, wf));
  }
  for (int64_t r = ch.r0; r < ch.r1; ++r) {
    const char* row = xb + r * p.sxr;
    const float wr = row_weight(p, r);
    for (int64_t j = 0; j < nu; ++j) {
      const float m = imp::magnitude_from_sumsq(group_sumsq<W, DT>(row + j * G * ES, G, wr));
      imp::seq_accumulate<AGG>(m, K[j], a1[j], a2[j]);
    }
  }
  float* out1 = p.partial + slot * 2 * p.U + u0;
  float* out2 = out1 + p.U;
  for (int64_t j = 0; j < nu; ++j) {
    out1[j] = a1[j];
    out2[j] = a2[j];
  }
}

template <int W, int DT, int AGG>
MINITRON_GI_INLINE void chunk_block(const GParams& p, const Chunk& ch, int64_t slot, int64_t u0, int64_t u1) {
  if (p.G == 1)
    chunk_g1<W, DT, AGG>(p, ch, slot, u0, u1);
  else
    chunk_grouped<W, DT, AGG>(p, ch, slot, u0, u1);
}

using ChunkFn = void (*)(const GParams&, const Chunk&, int64_t, int64_t, int64_t);

template <int DT, int AGG>
MINITRON_TARGET_AVX512 void chunk_avx512(const GParams& p, const Chunk& ch, int64_t slot, int64_t u0, int64_t u1) {
  chunk_block<16, DT, AGG>(p, ch, slot, u0, u1);
}

template <int DT, int AGG>
MINITRON_TARGET_AVX2 void chunk_avx2(const GParams& p, const Chunk& ch, int64_t slot, int64_t u0, int64_t u1) {
  chunk_block<8, DT, AGG>(p, ch, slot, u0, u1);
}

template <int DT, int AGG>
void chunk_scalar(const GParams& p, const Chunk& ch, int64_t slot, int64_t u0, int64_t u1) {
  chunk_block<1, DT, AGG>(p, ch, slot, u0, u1);
}

template <int DT, int AGG>
ChunkFn pick_isa(Isa isa) {
#if MINITRON_HAS_X86_DISPATCH
  if (isa == Isa::kAvx512) return &chunk_avx512<DT, AGG>;
  if (isa == Isa::kAvx2) return &chunk_avx2<DT, AGG>;
#endif
  (void)isa;
  return &chunk_scalar<DT, AGG>;
}

template <int DT>
ChunkFn pick_agg(Isa isa, int agg) {
  switch (agg) {
    case imp::kMean:
      return pick_isa<DT, imp::kMean>(isa);
    case imp::kL2:
      return pick_isa<DT, imp::kL2>(isa);
    case imp::kSum:
      return pick_isa<DT, imp::kSum>(isa);
    case imp::kMax:
      return pick_isa<DT, imp::kMax>(isa);
    default:
      return pick_isa<DT, imp::kVar>(isa);
  }
}

ChunkFn pick_chunk_fn(Isa isa, int dt, int agg) {
  if (dt == kBF16) return pick_agg<kBF16>(isa, agg);
  if (dt == kF16) return pick_agg<kF16>(isa, agg);
  return pick_agg<kF32>(isa, agg);
}

// Non-finite values of w * x over the rows of a chunk and the channels of units [u0, u1) (scalar rescan).
int64_t count_nonfinite(const GParams& p, int dt, const Chunk& ch, int64_t u0, int64_t u1) {
  const int64_t es = elem_size(dt);
  int64_t n = 0;
  for (int64_t r = ch.r0; r < ch.r1; ++r) {
    const char* row = p.x + r * p.sxr;
    const float w = p.w ? load_scalar(p.wdt, p.w + r * p.swr) : 1.0f;
    for (int64_t k = u0 * p.G; k < u1 * p.G; ++k) {
      const float v = load_scalar(dt, row + k * es) * w;
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      n += imp::nonfinite_bits(bits) ? 1 : 0;
    }
  }
  return n;
}

bool any_nonfinite(const float* p, int64_t n) {
  uint32_t acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, p + i, sizeof bits);
    acc |= imp::nonfinite_bits(bits) ? 1u : 0u;
  }
  return acc != 0;
}

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      return kF32;
  }
}

// Runs fn(i) for i in [0, n) on at::parallel_for's threads, handing indices out dynamically.
// Work below kSerialWork elements runs on the calling thread (a parallel region costs more than it saves).
constexpr int64_t kSerialWork = int64_t{1} << 18;

template <class F>
void parallel_dynamic(int64_t n, int64_t work, const F& fn) {
  if (n <= 0) return;
  if (work < kSerialWork || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t lo, int64_t hi) {
    (void)lo;
    (void)hi;
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(i);
  });
}

void grouped_importance_update_cpu(const at::Tensor& state, const at::Tensor& count, const at::Tensor& x_in,
                                   const at::Tensor& offsets_in, const std::optional<at::Tensor>& weights,
                                   int64_t group_size, int64_t seq_agg, int64_t batch_agg) {
  check_grouped_importance_args(state, count, x_in, offsets_in, weights, group_size, seq_agg, batch_agg);
  TORCH_CHECK(state.device().is_cpu() && count.device().is_cpu() && x_in.device().is_cpu(), "expected CPU tensors");
  const int64_t NG = state.size(0), U = state.size(2);
  const int64_t N = x_in.size(0);
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t J = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(off[0] == 0, "offsets[0] must be 0, got ", off[0]);
  for (int64_t j = 0; j < J; ++j)
    TORCH_CHECK_VALUE(off[j + 1] >= off[j], "offsets must be non-decreasing, but offsets[", j, "]=", off[j],
                      " > offsets[", j + 1, "]=", off[j + 1]);
  TORCH_CHECK_VALUE(off[J] == N, "offsets[-1] must equal the number of rows of x (", N, "), got ", off[J]);
  if (J == 0 || N == 0 || U == 0) return;
  const int64_t NB = J / NG;  // samples per group
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int dt = dtype_code(x);

  // chunks of the non-empty segments; first chunk slot of each segment
  const int64_t chunk = gim::chunk_rows(N);
  std::vector<int64_t> seg_first(J + 1, 0);
  for (int64_t j = 0; j < J; ++j) seg_first[j + 1] = seg_first[j] + gim::segment_chunks(off[j + 1] - off[j], chunk);
  const int64_t nchunks = seg_first[J];
  std::vector<Chunk> chunks(static_cast<size_t>(nchunks));
  for (int64_t j = 0; j < J; ++j)
    for (int64_t c = seg_first[j]; c < seg_first[j + 1]; ++c) {
      const int64_t r0 = off[j] + (c - seg_first[j]) * chunk;
      chunks[c] = Chunk{j, r0, std::min(off[j + 1], r0 + chunk)};
    }

  int64_t ub;
  if (group_size == 1) {  // balanced blocks of at most kUnitBlock units, multiples of 16 lanes
    const int64_t nb = (U + kUnitBlock - 1) / kUnitBlock;
    ub = std::min(kUnitBlock, ((U + nb - 1) / nb + 15) / 16 * 16);
  } else {
    ub = std::max<int64_t>(1, std::min(kGroupedBlock, kGroupedElems / group_size));
  }
  const int64_t nblk = (U + ub - 1) / ub;

  std::vector<float> partial(static_cast<size_t>(nchunks * 2 * U));
  GParams p;
  p.x = static_cast<const char*>(x.data_ptr());
  p.sxr = x.stride(0) * x.element_size();
  p.w = weights.has_value() ? static_cast<const char*>(weights->data_ptr()) : nullptr;
  p.wdt = weights.has_value() ? dtype_code(*weights) : kF32;
  p.swr = weights.has_value() ? weights->stride(0) * weights->element_size() : 0;
  p.U = U;
  p.G = group_size;
  p.off = off;
  p.partial = partial.data();

  const ChunkFn fn = pick_chunk_fn(detect_isa(), dt, static_cast<int>(seq_agg));
  const int64_t items = nchunks * nblk;
  std::vector<int64_t> nonfinite(static_cast<size_t>(items), 0);
  parallel_dynamic(items, N * U * group_size, [&](int64_t w) {
    const int64_t c = w / nblk;
    const int64_t u0 = (w % nblk) * ub;
    const int64_t u1 = std::min(U, u0 + ub);
    fn(p, chunks[c], c, u0, u1);
    const float* out1 = p.partial + c * 2 * U + u0;
    if (any_nonfinite(out1, u1 - u0) || any_nonfinite(out1 + U, u1 - u0))
      nonfinite[w] = count_nonfinite(p, dt, chunks[c], u0, u1);
  });

  // Phase 2: per group and unit, the group's segments in sample order -> fp32 state.
  float* st = state.data_ptr<float>();
  int64_t* cnt = count.data_ptr<int64_t>();
  const int sa = static_cast<int>(seq_agg), ba = static_cast<int>(batch_agg);
  constexpr int64_t kUnitsPerTask = 256;
  const int64_t utasks = (U + kUnitsPerTask - 1) / kUnitsPerTask;
  const int64_t grain = NG * U * NB < kSerialWork ? NG * utasks : 1;  // small: one task, no parallel region
  at::parallel_for(0, NG * utasks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t g = t / utasks;
      const int64_t ua = (t % utasks) * kUnitsPerTask;
      const int64_t ue = std::min(U, ua + kUnitsPerTask);
      float* sg = st + g * 2 * U;
      const int64_t n0 = cnt[g];
      for (int64_t u = ua; u < ue; ++u) {
        float A = sg[u], Bs = sg[U + u];
        int64_t n = n0;
        for (int64_t b = 0; b < NB; ++b) {
          const int64_t j = g * NB + b;
          const int64_t c0 = seg_first[j], c1 = seg_first[j + 1];
          if (c0 == c1) continue;
          float a1 = partial[c0 * 2 * U + u], a2 = partial[c0 * 2 * U + U + u];
          for (int64_t c = c0 + 1; c < c1; ++c) {
            if (sa == imp::kMax)
              imp::seq_combine<imp::kMax>(a1, a2, partial[c * 2 * U + u], partial[c * 2 * U + U + u]);
            else
              imp::seq_combine<imp::kSum>(a1, a2, partial[c * 2 * U + u], partial[c * 2 * U + U + u]);
          }
          const float v = gim::finalize_segment(sa, a1, a2, off[j + 1] - off[j]);
          gim::fold_segment(ba, v, static_cast<float>(n), A, Bs);
          ++n;
        }
        sg[u] = A;
        sg[U + u] = Bs;
      }
    }
  });
  for (int64_t g = 0; g < NG; ++g) {
    int64_t segs = 0;
    for (int64_t b = 0; b < NB; ++b) segs += off[g * NB + b + 1] > off[g * NB + b] ? 1 : 0;
    cnt[g] += segs;
    cnt[2 * NG + g] += off[(g + 1) * NB] - off[g * NB];
  }
  for (int64_t w = 0; w < items; ++w) cnt[NG + chunks[w / nblk].seg / NB] += nonfinite[w];
}

}  // namespace
}  // namespace cpu
}  // namespace minitron

TORCH_LIBRARY_FRAGMENT(minitron, m) {
  m.def(
      "_grouped_importance_update_native(Tensor(a!) state, Tensor(b!) count, Tensor x, Tensor offsets, "
      "Tensor? weights, int group_size, int seq_agg, int batch_agg) -> ()");
}

TORCH_LIBRARY_IMPL(minitron, CPU, m) {
  m.impl("_grouped_importance_update_native", &minitron::cpu::grouped_importance_update_cpu);
}
