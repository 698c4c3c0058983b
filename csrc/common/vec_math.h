// Portable SIMD helpers for the CPU kernels, written with GCC vector extensions only.
//
// Nothing here carries a target attribute: every function is always_inline and generic, so it is
// compiled with whatever ISA the (target-attributed) caller was given, e.g. 16-lane float vectors
// become single AVX-512 instructions inside a MINITRON_TARGET_AVX512 function and pairs of AVX2
// instructions elsewhere. (An intrinsic-based helper could not be inlined through a generic
// template without a "target specific option mismatch" error; generic vector code can.)
//
// Contents: vector types, bit casts, unaligned and non-temporal loads/stores with fp32/bf16/fp16
// conversion (round-to-nearest-even on the way out), a horizontal sum, and fast transcendentals
// accurate to ~2 ulp: vexp (Cody-Waite range reduction + minimax polynomial), vexp2 (for callers
// that fold log2 e into their own arguments) and vlog1p_recip01 (log1p and 1/(1+x) on [0, 1]).
#pragma once

#if !defined(__GNUC__)
#error "vec_math.h needs GCC/Clang vector extensions"
#endif

#include <stdint.h>
#include <string.h>

// Passing 32/64-byte vectors between functions compiled for different ISAs changes the ABI; GCC
// warns even though every helper here is always_inline (never called through the ABI).
#pragma GCC diagnostic ignored "-Wpsabi"

#define MINITRON_SIMD_INLINE inline __attribute__((always_inline))

namespace minitron {
namespace simd {

// ----------------------------------------------------------------------------------------------
// Types
// ----------------------------------------------------------------------------------------------
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

// Vec<W>: the W-lane float vector F, its same-width signed/unsigned integer vectors I/U and the
// W-lane 16-bit vector H used for bf16/fp16 storage.
template <int W>
struct Vec;
template <>
struct Vec<8> {
  typedef f32x8 F;
  typedef i32x8 I;
  typedef u32x8 U;
  typedef u16x8 H;
};
template <>
struct Vec<16> {
  typedef f32x16 F;
  typedef i32x16 I;
  typedef u32x16 U;
  typedef u16x16 H;
};

// Storage tags for 16-bit floats (raw bits).
struct Bf16 {
  uint16_t bits;
};
struct Half {
  uint16_t bits;
};

template <class To, class From>
MINITRON_SIMD_INLINE To bitcast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bitcast between different sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

template <class F>
MINITRON_SIMD_INLINE F splat(float x) {
  return F{} + x;
}

// ----------------------------------------------------------------------------------------------
// Element conversions (vector bit tricks; exact for every input, NaN stays NaN)
// ----------------------------------------------------------------------------------------------

// bf16 -> fp32: the bf16 bits are the high half of the fp32 bits.
template <int W>
MINITRON_SIMD_INLINE typename Vec<W>::F bf16_to_f32(const typename Vec<W>::H& h) {
  typedef typename Vec<W>::U U;
  U u = __builtin_convertvector(h, U) << 16;
  return bitcast<typename Vec<W>::F>(u);
}

// fp32 -> bf16, round to nearest even; NaN -> quiet NaN (keeps the sign).
template <int W>
MINITRON_SIMD_INLINE typename Vec<W>::H f32_to_bf16(const typename Vec<W>::F& x) {
  typedef typename Vec<W>::U U;
  U u = bitcast<U>(x);
  U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  U quiet = (u >> 16) | 0x40u;
  U r = (x != x) ? quiet : rounded;
  return __builtin_convertvector(r, typename Vec<W>::H);
}

// fp16 -> fp32 (normals, subnormals, zeros, inf, NaN).
template <int W>
MINITRON_SIMD_INLINE typename Vec<W>::F f16_to_f32(const typename Vec<W>::H& h) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::U U;
  U u = __builtin_convertvector(h, U);
  U o = (u & 0x7fffu) << 13;            // exponent + mantissa in fp32 position
  U exp = o & 0x0f800000u;              // the fp16 exponent field, shifted
  o = o + 0x38000000u;                  // rebias (127 - 15) << 23
  o = (exp == 0x0f800000u) ? o + 0x38000000u : o;  // inf/NaN: exponent to 255
  // zero/subnormal: let the FPU renormalise: (o + 1<<23) as float minus 2^-14.
  F sub = bitcast<F>(o + 0x00800000u) - bitcast<F>(U{} + 0x38800000u);
  F f = (exp == 0u) ? sub : bitcast<F>(o);
  U bits = bitcast<U>(f) | ((u & 0x8000u) << 16);
  return bitcast<F>(bits);
}

// fp32 -> fp16, round to nearest even (overflow -> inf, subnormals rounded, NaN -> quiet NaN).
template <int W>
MINITRON_SIMD_INLINE typename Vec<W>::H f32_to_f16(const typename Vec<W>::F& x) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::U U;
  U f = bitcast<U>(x);
  U sign = f & 0x80000000u;
  f = f ^ sign;
  // |x| >= 65520 rounds to inf (f16max = (127 + 16) << 23); NaN -> 0x7e00.
  U big = (f > 0x7f800000u) ? U{} + 0x7e00u : U{} + 0x7c00u;
  // |x| < 2^-14: subnormal result; adding 0.5 (denorm magic) makes the FPU round the mantissa.
  U den = bitcast<U>(bitcast<F>(f) + splat<F>(0.5f)) - 0x3f000000u;
  // normal: rebias, round to nearest even by adding 0xfff + the kept mantissa's lowest bit.
  U odd = (f >> 13) & 1u;
  U nrm = (f + 0xc8000fffu + odd) >> 13;  // 0xc8000000 = (15 - 127) << 23 (mod 2^32)
  U o = (f >= 0x47800000u) ? big : ((f < 0x38800000u) ? den : nrm);
  o = o | (sign >> 16);
  return __builtin_convertvector(o, typename Vec<W>::H);
}

// ----------------------------------------------------------------------------------------------
// Non-temporal (streaming) stores: write-combined, no read-for-ownership of the destination line.
// p must be aligned to sizeof(V). Inline asm (not intrinsics) keeps this usable from generic
// always_inline code; the register width is the caller's (a 64-byte V needs an AVX-512 caller).
// Call stream_fence() before the written data is handed to other threads.
// ----------------------------------------------------------------------------------------------
template <class V>
MINITRON_SIMD_INLINE void stream_store(void* p, const V& v) {
#if defined(__x86_64__)
  static_assert(sizeof(V) == 16 || sizeof(V) == 32 || sizeof(V) == 64, "stream_store: 16/32/64-byte vectors");
  __asm__ volatile("vmovntdq %1, %0" : "=m"(*static_cast<V*>(p)) : "v"(v));
#else
  memcpy(p, &v, sizeof(V));
#endif
}

MINITRON_SIMD_INLINE void stream_fence() {
#if defined(__x86_64__)
  __asm__ volatile("sfence" ::: "memory");
#endif
}

// ----------------------------------------------------------------------------------------------
// Loads / stores (unaligned). E is float, Bf16 or Half.
// ----------------------------------------------------------------------------------------------
template <int W, class E>
struct Mem;

template <int W>
struct Mem<W, float> {
  typedef typename Vec<W>::F F;
  static MINITRON_SIMD_INLINE F load(const float* p) {
    F v;
    memcpy(&v, p, sizeof(F));
    return v;
  }
  static MINITRON_SIMD_INLINE void store(float* p, const F& v) { memcpy(p, &v, sizeof(F)); }
  static MINITRON_SIMD_INLINE void stream(float* p, const F& v) { stream_store(p, v); }
  static MINITRON_SIMD_INLINE float neg_inf_elem() { return -__builtin_inff(); }
};

template <int W>
struct Mem<W, Bf16> {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::H H;
  static MINITRON_SIMD_INLINE F load(const Bf16* p) {
    H h;
    memcpy(&h, p, sizeof(H));
    return bf16_to_f32<W>(h);
  }
  static MINITRON_SIMD_INLINE void store(Bf16* p, const F& v) {
    H h = f32_to_bf16<W>(v);
    memcpy(p, &h, sizeof(H));
  }
  static MINITRON_SIMD_INLINE void stream(Bf16* p, const F& v) { stream_store(p, f32_to_bf16<W>(v)); }
  static MINITRON_SIMD_INLINE Bf16 neg_inf_elem() { return Bf16{0xff80u}; }
};

template <int W>
struct Mem<W, Half> {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::H H;
  static MINITRON_SIMD_INLINE F load(const Half* p) {
    H h;
    memcpy(&h, p, sizeof(H));
    return f16_to_f32<W>(h);
  }
  static MINITRON_SIMD_INLINE void store(Half* p, const F& v) {
    H h = f32_to_f16<W>(v);
    memcpy(p, &h, sizeof(H));
  }
  static MINITRON_SIMD_INLINE void stream(Half* p, const F& v) { stream_store(p, f32_to_f16<W>(v)); }
  static MINITRON_SIMD_INLINE Half neg_inf_elem() { return Half{0xfc00u}; }
};

// Load n < W elements, the missing lanes read as -inf (zero probability in every formula).
template <int W, class E>
MINITRON_SIMD_INLINE typename Vec<W>::F load_partial_neg_inf(const E* p, int64_t n) {
  E tmp[W];
  for (int i = 0; i < W; ++i) tmp[i] = Mem<W, E>::neg_inf_elem();
  memcpy(tmp, p, sizeof(E) * static_cast<size_t>(n));
  return Mem<W, E>::load(tmp);
}

// Store the first n < W lanes.
template <int W, class E>
MINITRON_SIMD_INLINE void store_partial(E* p, const typename Vec<W>::F& v, int64_t n) {
  E tmp[W];
  Mem<W, E>::store(tmp, v);
  memcpy(p, tmp, sizeof(E) * static_cast<size_t>(n));
}

// ----------------------------------------------------------------------------------------------
// Horizontal reductions
// ----------------------------------------------------------------------------------------------
template <int W>
MINITRON_SIMD_INLINE float hsum(const typename Vec<W>::F& v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// Returns x unchanged, opaque to the optimiser: stops -ffp-contract from fusing the rounding of a
// product into a following add (when an exactly rounded intermediate is wanted).
template <class F>
MINITRON_SIMD_INLINE F rounded(F x) {
#if defined(__x86_64__)
  __asm__("" : "+v"(x));
#endif
  return x;
}

template <class F>
MINITRON_SIMD_INLINE F vmax(const F& a, const F& b) {
  return a > b ? a : b;
}

// ----------------------------------------------------------------------------------------------
// exp / log
// ----------------------------------------------------------------------------------------------

// exp(x), within 2 ulp on the normal range. exp(-inf) = 0, NaN -> NaN, results below ~2.2e-38
// (x < -86.9) are flushed to 0 (subnormal probabilities are irrelevant here); x > ln(FLT_MAX) -> +inf
// unless kNonPositive (the caller guarantees x <= 0 or NaN, e.g. x - max(x): one select saved).
//
// n = round(x / ln2) with the 1.5*2^23 shifter (n lands in the low mantissa bits of t), r = x - n ln2
// in two exact FMA steps (Cody-Waite), e^r by a degree-5 minimax polynomial on |r| <= ln2/2 (relative
// error 9.5e-8), pre-multiplied by 2 so that the scale 2^(n-1) is a normal float for n in [-125, 128].
// 2^(n-1) is built from t's bits: with the shifter 1.5 * 2^23 + 126, bits(t) << 23 == (n + 126) << 23.
template <bool kNonPositive = false, class F>
MINITRON_SIMD_INLINE F vexp(const F& x) {
  typedef F VF;
  typedef uint32_t U __attribute__((vector_size(sizeof(VF))));
  const float kShift = 12583038.0f;  // 1.5 * 2^23 + 126 (see vexp2)
  const VF t = x * 1.44269504088896341f + kShift;
  const VF n = t - kShift;
  VF r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VF p = splat<VF>(2.f * 8.290315047e-03f);
  p = p * r + 2.f * 4.189793020e-02f;
  p = p * r + 2.f * 1.666763574e-01f;
  p = p * r + 2.f * 4.999915063e-01f;
  p = p * r + 2.f * 9.999997020e-01f;
  p = p * r + 2.f;  // 2 e^r
  const U scale = bitcast<U>(t) << 23;  // 2^(n-1)
  VF y = p * bitcast<VF>(scale);
  y = (x < -86.9f) ? splat<VF>(0.f) : y;
  if (!kNonPositive) y = (x > 88.72283935546875f) ? splat<VF>(__builtin_inff()) : y;
  return y;
}

// 2^y, the cheaper sibling of vexp for callers that fold log2(e) into their own argument FMA (e.g.
// exp(a * s - m) == exp2(s * (a * log2e) - m * log2e)): the range reduction r = y - round(y) is
// exact and costs no multiplies, leaving 6 multiply-class ops. Within 2 ulp of 2^y for the y given;
// note that folding log2(e) into an argument adds a rounding of relative size 2^-24 * |y|, the same
// order as the rounding of the argument itself. 2^-inf = 0, NaN -> NaN, y < -125.5 -> 0 (flushed),
// y >= 128 -> +inf unless kNonPositive.
template <bool kNonPositive = false, class F>
MINITRON_SIMD_INLINE F vexp2(const F& y) {
  typedef F VF;
  typedef uint32_t U __attribute__((vector_size(sizeof(VF))));
  // 1.5 * 2^23 + 126: t's low mantissa bits hold n + 126, so (bits(t) << 23) is 2^(n-1)'s bits
  const float kShift = 12583038.0f;
  const VF t = y + kShift;
  const VF r = y - (t - kShift);  // in [-0.5, 0.5]
  VF p = splat<VF>(2.f * 1.326940604e-03f);
  p = p * r + 2.f * 9.671294130e-03f;
  p = p * r + 2.f * 5.550711229e-02f;
  p = p * r + 2.f * 2.402224690e-01f;
  p = p * r + 2.f * 6.931470037e-01f;
  p = p * r + 2.f;  // 2 * 2^r, relative error 9.3e-8
  const U scale = bitcast<U>(t) << 23;  // 2^(n-1) (the shifter's own bits shift out)
  VF res = p * bitcast<VF>(scale);
  res = (y < -125.4f) ? splat<VF>(0.f) : res;
  if (!kNonPositive) res = (y >= 128.f) ? splat<VF>(__builtin_inff()) : res;
  return res;
}

// log1p(x) and 1 / (1 + x) for x in [0, 1], sharing one division: log1p(x) = 2 atanh(u) with
// u = x / (2 + x) in [0, 1/3], atanh(u) / u a degree-4 minimax polynomial in u^2 (relative error
// 4.5e-9); r = 1 / ((1 + x)(2 + x)) gives both u = x (1 + x) r and 1 / (1 + x) = (2 + x) r.
template <class F>
MINITRON_SIMD_INLINE void vlog1p_recip01(const F& x, F& log1p_x, F& recip_1px) {
  const F a = x + 1.f;
  const F b = x + 2.f;
  const F r = 1.f / (a * b);
  recip_1px = b * r;
  const F u = x * a * r;
  const F w = u * u;
  F p = splat<F>(1.400337666e-01f);
  p = p * w + 1.400151402e-01f;
  p = p * w + 2.001071870e-01f;
  p = p * w + 3.333320916e-01f;
  p = p * w + 1.f;
  log1p_x = (u + u) * p;
}

// The math policy handed to the shared formulas in kl_math.h (see kl::StdMath for the contract).
struct VecMath {
  template <class F>
  static MINITRON_SIMD_INLINE F exp(const F& x) {
    return vexp2(x * 1.44269504088896341f);
  }
  template <class F>
  static MINITRON_SIMD_INLINE void log1p_recip01(const F& x, F& log1p_x, F& recip_1px) {
    vlog1p_recip01(x, log1p_x, recip_1px);
  }
};

}  // namespace simd
}  // namespace minitron
