// CPU kernels of the structured slicing ops:
//   torch.ops.minitron._gather_slices_native(tensors, indices, dims, blocks, outs)   (out of place)
//   torch.ops.minitron._compact_native(tensor, index, dim, block, new_strides)        (in place)
//
// The Python layer (minitron/ops/slicing.py) validates the arguments (raising ValueError/TypeError),
// sorts the indices, converts them to int64 and allocates the outputs; the checks here only guard
// the memory accesses (TORCH_CHECK, RuntimeError).
//
// Work decomposition (csrc/common/slicing_math.h describes the canonical [lines, elements] form):
//   * outer selection (whole lines) with unit-stride lines -> "pieces": contiguous byte ranges,
//     merged across adjacent units when source and destination are dense, split to <= 512 KiB;
//   * inner selection (same positions of every line) -> ranges of lines; each line is copied by
//     one of: RUNS (merged runs of adjacent kept units, vector copies), COMPRESS (AVX-512
//     compress of 64-byte chunks with a per-line-invariant keep mask; for short runs such as
//     block = 1), POS (scalar gather through a position table), GENERIC (any strides);
//   * everything else (non-unit strides) -> GENERIC ranges of lines.
// Items of all tensors of a call go into one list that the threads of one at::parallel_for drain
// through an atomic counter (dynamic balancing: item sizes differ between tensors).
// Large outputs use non-temporal stores on the AVX-512 path (no read-for-ownership of the output).
//
// In-place compaction runs the same kind of items, listed in output order, in one parallel region
// with dependencies: an item starts writing only after every earlier item whose source overlaps its
// destination has finished (see compaction_needs). With a sorted index every destination lies at
// or before its source, so an item only ever waits for earlier items, and only early in the
// tensor: the destination of output line r reaches back to the source of line ~r*k/n, far
// behind the running items. Inside an item data move in increasing address order (forward-safe
// copies), which handles an item overlapping itself.
//
// Environment (testing/benchmarking): MINITRON_CPU_ISA caps the ISA (cpu_features.h);
// MINITRON_SLICING_STRATEGY=runs|compress|pos|generic forces a line strategy where applicable;
// MINITRON_SLICING_NT=0|1 forces non-temporal stores off/on; MINITRON_SLICING_THP=0 disables the
// transparent-huge-page hint on large outputs; MINITRON_SLICING_ITEM_BYTES=n sets the work item
// size and always runs multi-threaded (tests use tiny items to exercise the scheduling).
//
// Fresh outputs: a freshly allocated output is backed by no memory until first touched, and
// first-touch page faults of 4 KiB pages cost more than the copy itself on many machines. Outputs
// of >= 4 MiB are therefore marked MADV_HUGEPAGE before they are written (Linux; a hint, harmless
// for memory already touched), so they fault in 2 MiB pages.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "common/cpu_features.h"
#include "cpu/huge_pages.h"
#include "common/slicing_math.h"

#if MINITRON_HAS_X86_DISPATCH
#define MINITRON_TARGET_AVX512_VBMI2 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx2,fma")))
#endif

namespace minitron {
namespace slicing_cpu {
namespace {

using slicing::Layout;

constexpr int64_t kPieceBytes = 512 * 1024;          // target size of one work item
constexpr int64_t kSerialBytes = 256 * 1024;         // below this a call runs on one thread
constexpr int64_t kNonTemporalBytes = 16ll << 20;    // outputs above this use streaming stores
constexpr int64_t kRunsMinBytes = 96;                // mean run length for the RUNS strategy

enum class Strategy : int { kRuns = 0, kCompress = 1, kPos = 2, kGeneric = 3 };

// ---------------------------------------------------------------------------------------------
// ISA selection
// ---------------------------------------------------------------------------------------------

bool cpu_has_vbmi2() {
#if MINITRON_HAS_X86_DISPATCH
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi2") != 0;
  }();
  return has;
#else
  return false;
#endif
}

struct Config {
  cpu::Isa isa = cpu::Isa::kScalar;
  bool vbmi2 = false;
  bool thp = true;  // huge-page hint on large fresh outputs
  int64_t piece_bytes = kPieceBytes;    // work item size
  int64_t serial_bytes = kSerialBytes;  // calls below this run on one thread
  int forced = -1;  // forced Strategy or -1
  int nt = -1;      // forced non-temporal stores (0/1) or -1 (automatic)
};

Config read_config() {
  Config c;
  c.isa = cpu::detect_isa();
  c.vbmi2 = c.isa == cpu::Isa::kAvx512 && cpu_has_vbmi2();
  if (const char* s = std::getenv("MINITRON_SLICING_STRATEGY")) {
    if (std::strcmp(s, "runs") == 0) c.forced = static_cast<int>(Strategy::kRuns);
    else if (std::strcmp(s, "compress") == 0) c.forced = static_cast<int>(Strategy::kCompress);
    else if (std::strcmp(s, "pos") == 0) c.forced = static_cast<int>(Strategy::kPos);
    else if (std::strcmp(s, "generic") == 0) c.forced = static_cast<int>(Strategy::kGeneric);
  }
  if (const char* s = std::getenv("MINITRON_SLICING_THP")) c.thp = std::strcmp(s, "0") != 0;
  if (const char* s = std::getenv("MINITRON_SLICING_ITEM_BYTES")) {  // tests: many tiny items, always parallel
    const long long v = std::atoll(s);
    if (v > 0) {
      c.piece_bytes = v;
      c.serial_bytes = 0;
    }
  }
  if (const char* s = std::getenv("MINITRON_SLICING_NT")) {
    if (std::strcmp(s, "0") == 0) c.nt = 0;
    else if (std::strcmp(s, "1") == 0) c.nt = 1;
  }
  return c;
}

bool can_compress(const Config& c, int64_t es) {
  if (c.isa != cpu::Isa::kAvx512) return false;
  if (es == 4 || es == 8) return true;
  return (es == 1 || es == 2) && c.vbmi2;
}

// ---------------------------------------------------------------------------------------------
// byte copies (forward-safe: every step loads before it stores and steps go up in address, so a
// move to a lower, overlapping destination is correct, as in-place compaction needs)
// ---------------------------------------------------------------------------------------------

#if MINITRON_HAS_X86_DISPATCH
// The n lowest bits set (n in [0, 64]).
inline uint64_t low_bits(int64_t n) { return n >= 64 ? ~0ull : ((1ull << n) - 1); }

MINITRON_TARGET_AVX512 void copy_avx512(char* d, const char* s, int64_t n, bool nt) {
  if (n <= 0) return;
  if (n < 64) {
    const __mmask64 m = low_bits((n));
    const __m512i v = _mm512_maskz_loadu_epi8(m, s);
    _mm512_mask_storeu_epi8(d, m, v);
    return;
  }
  if (nt) {
    const int64_t head = static_cast<int64_t>((64 - (reinterpret_cast<uintptr_t>(d) & 63)) & 63);
    if (head) {
      const __mmask64 m = low_bits((head));
      const __m512i v = _mm512_maskz_loadu_epi8(m, s);
      _mm512_mask_storeu_epi8(d, m, v);
      d += head;
      s += head;
      n -= head;
    }
    for (; n >= 256; n -= 256, d += 256, s += 256) {
      const __m512i a = _mm512_loadu_si512(s);
      const __m512i b = _mm512_loadu_si512(s + 64);
      const __m512i c = _mm512_loadu_si512(s + 128);
      const __m512i e = _mm512_loadu_si512(s + 192);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d), a);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 64), b);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 128), c);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 192), e);
    }
    for (; n >= 64; n -= 64, d += 64, s += 64)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
  } else {
    for (; n >= 256; n -= 256, d += 256, s += 256) {
      const __m512i a = _mm512_loadu_si512(s);
      const __m512i b = _mm512_loadu_si512(s + 64);
      const __m512i c = _mm512_loadu_si512(s + 128);
      const __m512i e = _mm512_loadu_si512(s + 192);
      _mm512_storeu_si512(d, a);
      _mm512_storeu_si512(d + 64, b);
      _mm512_storeu_si512(d + 128, c);
      _mm512_storeu_si512(d + 192, e);
    }
    for (; n >= 64; n -= 64, d += 64, s += 64) _mm512_storeu_si512(d, _mm512_loadu_si512(s));
  }
  if (n > 0) {
    const __mmask64 m = low_bits((n));
    const __m512i v = _mm512_maskz_loadu_epi8(m, s);
    _mm512_mask_storeu_epi8(d, m, v);
  }
}

MINITRON_TARGET_AVX512 void store_fence() { _mm_sfence(); }
#endif

inline void copy_bytes(char* d, const char* s, int64_t n, const Config& c, bool nt) {
#if MINITRON_HAS_X86_DISPATCH
  if (c.isa == cpu::Isa::kAvx512) {  // measured faster than glibc memmove here, and can stream
    copy_avx512(d, s, n, nt);
    return;
  }
#endif
  (void)c;
  (void)nt;
  if (n > 0) std::memmove(d, s, static_cast<size_t>(n));
}

// ---------------------------------------------------------------------------------------------
// COMPRESS: one line, unit stride, 64-byte chunks of the source line with a keep mask per chunk.
// The destination of a chunk's kept elements starts at (kept before the chunk) <= chunk start, and
// the masked store writes only the kept count, so it never reaches the next chunk's source.
// ---------------------------------------------------------------------------------------------

#if MINITRON_HAS_X86_DISPATCH
#define MINITRON_SLC_COMPRESS_BODY(ES, MASKT, COMPRESS, STORE)                                    \
  constexpr int64_t cw = 64 / (ES);                                                              \
  const int64_t nfull = inner / cw;                                                              \
  const int64_t rem = inner % cw;                                                                \
  char* out = d;                                                                                 \
  for (int64_t c = 0; c < nfull; ++c) {                                                          \
    const uint64_t m = masks[c];                                                                 \
    if (m == 0) continue;                                                                        \
    const __m512i v = _mm512_loadu_si512(s + c * 64);                                            \
    if (m == full) {                                                                             \
      _mm512_storeu_si512(out, v);                                                               \
      out += 64;                                                                                 \
      continue;                                                                                  \
    }                                                                                            \
    const int cnt = __builtin_popcountll(m);                                                     \
    const __m512i p = COMPRESS(static_cast<MASKT>(m), v);                                        \
    STORE(out, static_cast<MASKT>(low_bits((cnt))), p);             \
    out += cnt * (ES);                                                                           \
  }                                                                                              \
  if (rem) {                                                                                     \
    const uint64_t m = masks[nfull];                                                             \
    if (m) {                                                                                     \
      const __mmask64 lm = low_bits((rem * (ES)));                 \
      const __m512i v = _mm512_maskz_loadu_epi8(lm, s + nfull * 64);                             \
      const int cnt = __builtin_popcountll(m);                                                   \
      const __m512i p = COMPRESS(static_cast<MASKT>(m), v);                                      \
      STORE(out, static_cast<MASKT>(low_bits((cnt))), p);           \
    }                                                                                            \
  }

MINITRON_TARGET_AVX512 void compress_line_4(char* d, const char* s, int64_t inner, const uint64_t* masks) {
  const uint64_t full = 0xFFFFull;
  MINITRON_SLC_COMPRESS_BODY(4, __mmask16, _mm512_maskz_compress_epi32, _mm512_mask_storeu_epi32)
}

MINITRON_TARGET_AVX512 void compress_line_8(char* d, const char* s, int64_t inner, const uint64_t* masks) {
  const uint64_t full = 0xFFull;
  MINITRON_SLC_COMPRESS_BODY(8, __mmask8, _mm512_maskz_compress_epi64, _mm512_mask_storeu_epi64)
}

MINITRON_TARGET_AVX512_VBMI2 void compress_line_2(char* d, const char* s, int64_t inner, const uint64_t* masks) {
  const uint64_t full = 0xFFFFFFFFull;
  MINITRON_SLC_COMPRESS_BODY(2, __mmask32, _mm512_maskz_compress_epi16, _mm512_mask_storeu_epi16)
}

MINITRON_TARGET_AVX512_VBMI2 void compress_line_1(char* d, const char* s, int64_t inner, const uint64_t* masks) {
  const uint64_t full = ~0ull;
  MINITRON_SLC_COMPRESS_BODY(1, __mmask64, _mm512_maskz_compress_epi8, _mm512_mask_storeu_epi8)
}
#undef MINITRON_SLC_COMPRESS_BODY
#endif

// ---------------------------------------------------------------------------------------------
// typed fallbacks (sequential order: position j is written after every position < j was read)
// ---------------------------------------------------------------------------------------------

template <typename T>
void pos_line(char* d, const char* s, const int64_t* pos, int64_t n) {
  T* dp = reinterpret_cast<T*>(d);
  const T* sp = reinterpret_cast<const T*>(s);
  for (int64_t j = 0; j < n; ++j) dp[j] = sp[pos[j]];
}

// ---------------------------------------------------------------------------------------------
// per-tensor plans and work items
// ---------------------------------------------------------------------------------------------

struct Run {
  int64_t src;  // element offset in the source line
  int64_t dst;  // element offset in the destination line
  int64_t len;  // elements
};

struct Plan {
  const char* src = nullptr;
  char* dst = nullptr;
  int64_t es = 0;           // element size, bytes
  Layout L;                 // source, canonical
  int64_t dso = 0, dsi = 1; // destination strides in the same orientation, elements
  bool select_inner = false;
  int64_t block = 1, k = 0;
  const int64_t* idx = nullptr;
  int64_t out_outer = 0, out_inner = 0;
  Strategy strat = Strategy::kGeneric;
  std::vector<Run> runs;
  std::vector<uint64_t> masks;
  std::vector<int64_t> pos;
};

struct Item {
  int32_t plan;   // index into the plan list, or -1 for a byte piece
  int64_t a, b;   // line range [a, b) (lines items)
  const char* s;  // piece source
  char* d;        // piece destination
  int64_t bytes;  // piece size
};

bool lines_contiguous(const Plan& p) { return p.L.si == 1 && p.dsi == 1; }

// Prepares the per-line tables of an inner selection and picks its strategy.
void plan_inner(Plan& p, const Config& c) {
  p.runs.clear();
  for (int64_t j = 0; j < p.k; ++j) {
    const int64_t s = p.idx[j] * p.block;
    if (!p.runs.empty() && p.runs.back().src + p.runs.back().len == s) {
      p.runs.back().len += p.block;
    } else {
      p.runs.push_back(Run{s, j * p.block, p.block});
    }
  }
  Strategy st;
  if (!lines_contiguous(p)) {
    st = Strategy::kGeneric;
  } else {
    const int64_t mean_run_bytes = p.runs.empty() ? 0 : p.out_inner * p.es / static_cast<int64_t>(p.runs.size());
    if (mean_run_bytes >= kRunsMinBytes) st = Strategy::kRuns;
    else if (can_compress(c, p.es)) st = Strategy::kCompress;
    else st = Strategy::kPos;
    if (c.forced >= 0) {
      const Strategy f = static_cast<Strategy>(c.forced);
      if (f != Strategy::kCompress || can_compress(c, p.es)) st = f;
    }
  }
  p.strat = st;
  if (st == Strategy::kCompress) {
    const int64_t cw = 64 / p.es;
    p.masks.assign(static_cast<size_t>((p.L.inner + cw - 1) / cw), 0);
    for (const Run& r : p.runs)
      for (int64_t e = r.src; e < r.src + r.len; ++e) p.masks[e / cw] |= 1ull << (e % cw);
  } else if (st == Strategy::kPos || st == Strategy::kGeneric) {
    p.pos.resize(static_cast<size_t>(p.out_inner));
    for (int64_t j = 0; j < p.out_inner; ++j) p.pos[j] = slicing::source_of(p.idx, j, p.block);
  }
}

// Outer selection whose lines are contiguous: byte pieces for output units [u0, u1).
void add_unit_pieces(const Plan& p, int64_t u0, int64_t u1, int64_t piece, std::vector<Item>& items) {
  const int64_t line_bytes = p.L.inner * p.es;
  if (line_bytes == 0) return;
  const bool merge_lines = p.L.so == p.L.inner && p.dso == p.L.inner;  // dense source and destination
  const char* cs = nullptr;
  char* cd = nullptr;
  int64_t cn = 0;
  auto flush = [&]() {
    for (int64_t off = 0; off < cn; off += piece)
      items.push_back(Item{-1, 0, 0, cs + off, cd + off, std::min(piece, cn - off)});
    cn = 0;
  };
  auto add = [&](const char* s, char* d, int64_t n) {
    if (cn > 0 && s == cs + cn && d == cd + cn) {
      cn += n;
      return;
    }
    flush();
    cs = s;
    cd = d;
    cn = n;
  };
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t sl = p.idx[u] * p.block, dl = u * p.block;
    if (merge_lines) {
      add(p.src + sl * p.L.so * p.es, p.dst + dl * p.dso * p.es, p.block * line_bytes);
    } else {
      for (int64_t l = 0; l < p.block; ++l)
        add(p.src + (sl + l) * p.L.so * p.es, p.dst + (dl + l) * p.dso * p.es, line_bytes);
    }
  }
  flush();
}

// Line-range items for output lines [l0, l1) of plan `pi`, about kPieceBytes of output each.
void add_line_items(const Plan& p, int32_t pi, int64_t l0, int64_t l1, int64_t piece,
                    std::vector<Item>& items) {
  const int64_t line_bytes = std::max<int64_t>(1, p.out_inner * p.es);
  const int64_t per = std::max<int64_t>(1, piece / line_bytes);
  for (int64_t a = l0; a < l1; a += per) items.push_back(Item{pi, a, std::min(l1, a + per), nullptr, nullptr, 0});
}

template <typename T>
void generic_lines(const Plan& p, int64_t a, int64_t b) {
  const T* s = reinterpret_cast<const T*>(p.src);
  T* d = reinterpret_cast<T*>(p.dst);
  for (int64_t o = a; o < b; ++o) {
    const int64_t sl = p.select_inner ? o : slicing::source_of(p.idx, o, p.block);
    const T* sline = s + sl * p.L.so;
    T* dline = d + o * p.dso;
    if (p.select_inner) {
      for (int64_t j = 0; j < p.out_inner; ++j) dline[j * p.dsi] = sline[p.pos[j] * p.L.si];
    } else {
      for (int64_t j = 0; j < p.out_inner; ++j) dline[j * p.dsi] = sline[j * p.L.si];
    }
  }
}

void run_lines(const Plan& p, int64_t a, int64_t b, const Config& c, bool nt) {
  if (!p.select_inner || p.strat == Strategy::kGeneric) {
    switch (p.es) {
      case 1: generic_lines<uint8_t>(p, a, b); break;
      case 2: generic_lines<uint16_t>(p, a, b); break;
      case 4: generic_lines<uint32_t>(p, a, b); break;
      default: generic_lines<uint64_t>(p, a, b); break;
    }
    return;
  }
  for (int64_t o = a; o < b; ++o) {
    const char* sl = p.src + o * p.L.so * p.es;
    char* dl = p.dst + o * p.dso * p.es;
    switch (p.strat) {
      case Strategy::kRuns:
        for (const Run& r : p.runs) copy_bytes(dl + r.dst * p.es, sl + r.src * p.es, r.len * p.es, c, nt);
        break;
      case Strategy::kCompress:
#if MINITRON_HAS_X86_DISPATCH
        // (Staging the line and streaming it out was measured slower than the masked stores.)
        switch (p.es) {
          case 1: compress_line_1(dl, sl, p.L.inner, p.masks.data()); break;
          case 2: compress_line_2(dl, sl, p.L.inner, p.masks.data()); break;
          case 4: compress_line_4(dl, sl, p.L.inner, p.masks.data()); break;
          default: compress_line_8(dl, sl, p.L.inner, p.masks.data()); break;
        }
#endif
        break;
      case Strategy::kPos:
        switch (p.es) {
          case 1: pos_line<uint8_t>(dl, sl, p.pos.data(), p.out_inner); break;
          case 2: pos_line<uint16_t>(dl, sl, p.pos.data(), p.out_inner); break;
          case 4: pos_line<uint32_t>(dl, sl, p.pos.data(), p.out_inner); break;
          default: pos_line<uint64_t>(dl, sl, p.pos.data(), p.out_inner); break;
        }
        break;
      default:
        break;
    }
  }
}

int64_t item_bytes(const std::vector<Plan>& plans, const Item& it) {
  if (it.plan < 0) return it.bytes;
  const Plan& p = plans[it.plan];
  return (it.b - it.a) * p.out_inner * p.es;
}

struct Span {
  uintptr_t lo, hi;  // [lo, hi) bytes
};

// Byte span an item reads (src) and writes (dst).
void item_spans(const std::vector<Plan>& plans, const Item& it, Span& src, Span& dst) {
  if (it.plan < 0) {
    src = {reinterpret_cast<uintptr_t>(it.s), reinterpret_cast<uintptr_t>(it.s) + static_cast<uintptr_t>(it.bytes)};
    dst = {reinterpret_cast<uintptr_t>(it.d), reinterpret_cast<uintptr_t>(it.d) + static_cast<uintptr_t>(it.bytes)};
    return;
  }
  const Plan& p = plans[it.plan];
  const int64_t sl0 = p.select_inner ? it.a : slicing::source_of(p.idx, it.a, p.block);
  const int64_t sl1 = p.select_inner ? it.b - 1 : slicing::source_of(p.idx, it.b - 1, p.block);
  const auto base_s = reinterpret_cast<uintptr_t>(p.src);
  const auto base_d = reinterpret_cast<uintptr_t>(p.dst);
  src = {base_s + static_cast<uintptr_t>(sl0 * p.L.so * p.es),
         base_s + static_cast<uintptr_t>((sl1 * p.L.so + (p.L.inner - 1) * p.L.si + 1) * p.es)};
  dst = {base_d + static_cast<uintptr_t>(it.a * p.dso * p.es),
         base_d + static_cast<uintptr_t>(((it.b - 1) * p.dso + (p.out_inner - 1) * p.dsi + 1) * p.es)};
}

// In-place compaction: for each item (in output order), how many leading items must be finished
// before it may start writing. Item i overwrites dst(i); every earlier item whose source overlaps
// dst(i) must have read it. Sources go up with the item order and are disjoint, so those items
// form a run ending before the first source that starts at or after dst(i)'s end; item i waits
// for the prefix through the last of them. (Later items never read what item i writes: their
// sources start after item i's source ends, which is at or after dst(i)'s end, since every
// destination lies at or before its source.)
std::vector<int64_t> compaction_needs(const std::vector<Plan>& plans, const std::vector<Item>& items) {
  const size_t n = items.size();
  std::vector<Span> src(n), dst(n);
  for (size_t i = 0; i < n; ++i) item_spans(plans, items[i], src[i], dst[i]);
  std::vector<uintptr_t> starts(n);
  for (size_t i = 0; i < n; ++i) starts[i] = src[i].lo;
  std::vector<int64_t> need(n, 0);
  for (size_t i = 0; i < n; ++i) {
    // earlier items with src.lo < dst(i).hi
    const size_t hi = static_cast<size_t>(std::lower_bound(starts.begin(), starts.begin() + i, dst[i].hi) - starts.begin());
    need[i] = (hi > 0 && src[hi - 1].hi > dst[i].lo) ? static_cast<int64_t>(hi) : 0;
  }
  return need;
}

// Runs all items with dynamic scheduling over the threads of one at::parallel_for (tickets in
// item order). With `need` (in-place compaction), item i starts only after items [0, need[i])
// have finished: a watermark counts the finished prefix; a thread whose item must wait yields.
// Progress is guaranteed because an item only waits for items with smaller tickets, which are
// held by running threads. Small batches run in order on the calling thread.
void run_items(const std::vector<Plan>& plans, const std::vector<Item>& items, const Config& c, bool nt,
               const std::vector<int64_t>* need = nullptr) {
  if (items.empty()) return;
  int64_t total = 0;
  for (const Item& it : items) total += item_bytes(plans, it);
  const bool fence = nt && c.isa == cpu::Isa::kAvx512;
  auto work = [&](const Item& it) {
    if (it.plan < 0) copy_bytes(it.d, it.s, it.bytes, c, nt);
    else run_lines(plans[it.plan], it.a, it.b, c, nt);
  };
  const int64_t nthreads = at::get_num_threads();
  const size_t n = items.size();
  if (nthreads <= 1 || n == 1 || total < c.serial_bytes || at::in_parallel_region()) {
    for (const Item& it : items) work(it);
#if MINITRON_HAS_X86_DISPATCH
    if (fence) store_fence();
#endif
    return;
  }
  std::atomic<size_t> next{0};
  std::atomic<size_t> watermark{0};
  std::unique_ptr<std::atomic<uint8_t>[]> done;
  if (need != nullptr) {
    done.reset(new std::atomic<uint8_t>[n]);
    for (size_t i = 0; i < n; ++i) done[i].store(0, std::memory_order_relaxed);
  }
  at::parallel_for(0, std::min<int64_t>(nthreads, static_cast<int64_t>(n)), 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      for (size_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
        if (need != nullptr) {
          const size_t want = static_cast<size_t>((*need)[i]);
          while (watermark.load() < want) std::this_thread::yield();
        }
        work(items[i]);
        if (need != nullptr) {
#if MINITRON_HAS_X86_DISPATCH
          if (fence) store_fence();  // streaming stores visible before the item counts as done
#endif
          done[i].store(1);
          size_t w = watermark.load();
          while (w < n && done[w].load()) {
            if (watermark.compare_exchange_weak(w, w + 1)) ++w;
          }
        }
      }
    }
#if MINITRON_HAS_X86_DISPATCH
    // streaming stores are weakly ordered: drain them before this thread's work is published
    if (fence) store_fence();
#endif
  });
}

// ---------------------------------------------------------------------------------------------
// argument checks (memory safety; user-facing validation is in Python)
// ---------------------------------------------------------------------------------------------

bool orientation_col_major(const at::Tensor& t) {
  return t.dim() == 2 && slicing::is_col_major(t.size(0), t.size(1), t.stride(0), t.stride(1));
}

Layout layout_of(const at::Tensor& t, bool col_major) {
  return slicing::make_layout(static_cast<int>(t.dim()), t.sizes().data(), t.strides().data(), col_major);
}

void check_index(const at::Tensor& idx, int64_t units, const char* what) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.device().is_cpu(),
              what, ": index must be a contiguous 1-D int64 CPU tensor");
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t k = idx.numel();
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(p[j] >= 0 && p[j] < units, what, ": index entry ", p[j], " out of range [0, ", units, ")");
    TORCH_CHECK(j == 0 || p[j] > p[j - 1], what, ": index must be sorted and free of duplicates");
  }
}

int64_t element_size_checked(const at::Tensor& t, const char* what) {
  const int64_t es = static_cast<int64_t>(t.element_size());
  TORCH_CHECK(es == 1 || es == 2 || es == 4 || es == 8, what, ": unsupported element size ", es);
  return es;
}

// Fills the common part of a plan: source layout, selection and output extents.
void fill_plan(Plan& p, const at::Tensor& t, const at::Tensor& idx, int64_t dim, int64_t block, const char* what) {
  TORCH_CHECK(t.dim() == 1 || t.dim() == 2, what, ": tensor must be 1-D or 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(dim >= 0 && dim < t.dim(), what, ": dim ", dim, " out of range for a ", t.dim(), "-D tensor");
  TORCH_CHECK(block >= 1 && t.size(dim) % block == 0, what, ": block ", block, " must divide size ", t.size(dim));
  check_index(idx, t.size(dim) / block, what);
  p.es = element_size_checked(t, what);
  p.L = layout_of(t, orientation_col_major(t));
  p.select_inner = dim == p.L.inner_dim;
  p.block = block;
  p.k = idx.numel();
  p.idx = idx.data_ptr<int64_t>();
  p.out_outer = p.select_inner ? p.L.outer : p.k * block;
  p.out_inner = p.select_inner ? p.k * block : p.L.inner;
}

// ---------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------

void gather_slices_cpu(at::TensorList tensors, at::TensorList indices, at::IntArrayRef dims,
                       at::IntArrayRef blocks, at::TensorList outs) {
  const size_t n = tensors.size();
  TORCH_CHECK(indices.size() == n && dims.size() == n && blocks.size() == n && outs.size() == n,
              "_gather_slices_native: tensors, indices, dims, blocks and outs must have the same length");
  const Config c = read_config();
  std::vector<Plan> plans(n);
  int64_t out_bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    const at::Tensor& o = outs[i];
    TORCH_CHECK(t.device().is_cpu() && o.device().is_cpu(), "_gather_slices_native: CPU tensors expected");
    Plan& p = plans[i];
    fill_plan(p, t, indices[i], dims[i], blocks[i], "_gather_slices_native");
    TORCH_CHECK(o.scalar_type() == t.scalar_type() && o.dim() == t.dim(),
                "_gather_slices_native: out[", i, "] must match the tensor's dtype and rank");
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t want = d == dims[i] ? p.k * blocks[i] : t.size(d);
      TORCH_CHECK(o.size(d) == want, "_gather_slices_native: out[", i, "] has wrong size ", o.sizes());
    }
    const bool cm = orientation_col_major(t);
    const Layout dl = layout_of(o, cm);
    p.dso = dl.so;
    p.dsi = dl.si;
    p.src = static_cast<const char*>(t.data_ptr());
    p.dst = static_cast<char*>(o.data_ptr());
    out_bytes += o.numel() * p.es;
    if (c.thp && o.numel() > 0) cpu::advise_huge_pages(p.dst, static_cast<size_t>(o.numel() * p.es));
  }
  const bool nt = c.nt >= 0 ? c.nt == 1 : out_bytes >= kNonTemporalBytes;
  std::vector<Item> items;
  for (size_t i = 0; i < n; ++i) {
    Plan& p = plans[i];
    if (p.out_outer == 0 || p.out_inner == 0) continue;
    if (p.select_inner) {
      plan_inner(p, c);
      add_line_items(p, static_cast<int32_t>(i), 0, p.out_outer, c.piece_bytes, items);
    } else if (lines_contiguous(p) && c.forced != static_cast<int>(Strategy::kGeneric)) {
      add_unit_pieces(p, 0, p.k, c.piece_bytes, items);
    } else {
      p.strat = Strategy::kGeneric;
      add_line_items(p, static_cast<int32_t>(i), 0, p.out_outer, c.piece_bytes, items);
    }
  }
  run_items(plans, items, c, nt);
}

void compact_cpu(const at::Tensor& tensor, const at::Tensor& index, int64_t dim, int64_t block,
                 at::IntArrayRef new_strides) {
  TORCH_CHECK(tensor.device().is_cpu(), "_compact_native: CPU tensor expected");
  const Config c = read_config();
  std::vector<Plan> plans(1);
  Plan& p = plans[0];
  fill_plan(p, tensor, index, dim, block, "_compact_native");
  TORCH_CHECK(slicing::is_non_overlapping(p.L), "_compact_native: tensor has overlapping memory");
  if (p.out_outer == 0 || p.out_inner == 0) return;
  TORCH_CHECK(static_cast<int64_t>(new_strides.size()) == tensor.dim(), "_compact_native: new_strides has wrong length");
  // Destination strides: either the tensor's own, or (inner selection of a dense tensor) packed.
  std::vector<int64_t> new_sizes(tensor.sizes().begin(), tensor.sizes().end());
  new_sizes[dim] = p.k * block;
  const Layout dl = slicing::make_layout(static_cast<int>(tensor.dim()), new_sizes.data(), new_strides.data(),
                                         p.L.outer_dim == 1);
  const Layout same = slicing::make_layout(static_cast<int>(tensor.dim()), new_sizes.data(),
                                           tensor.strides().data(), p.L.outer_dim == 1);
  const bool keep = dl.so == same.so && dl.si == same.si;
  const bool packed = p.select_inner && slicing::is_dense(p.L) && dl.si == 1 && dl.so == p.k * block;
  TORCH_CHECK(keep || packed, "_compact_native: new_strides must be the tensor's strides or (inner selection of a ",
              "dense tensor) the packed strides");
  p.dso = dl.so;
  p.dsi = dl.si;
  p.src = static_cast<const char*>(tensor.data_ptr());
  p.dst = static_cast<char*>(tensor.data_ptr());
  const bool nt = c.nt == 1;  // compaction rewrites memory it just read (cache-hot): regular stores by default
  // All items in output order; compaction_needs() orders the ones that could clobber unread data.
  std::vector<Item> items;
  if (!p.select_inner) {
    // Whole units of lines move down: idx[j] -> j. The prefix with idx[j] == j stays in place.
    int64_t a = 0;
    while (a < p.k && p.idx[a] == a) ++a;
    if (lines_contiguous(p) && c.forced != static_cast<int>(Strategy::kGeneric)) {
      add_unit_pieces(p, a, p.k, c.piece_bytes, items);
    } else {
      p.strat = Strategy::kGeneric;
      add_line_items(p, 0, a * p.block, p.out_outer, c.piece_bytes, items);
    }
  } else {
    if (p.out_inner == p.L.inner) return;  // everything kept: identity
    plan_inner(p, c);
    add_line_items(p, 0, 0, p.out_outer, c.piece_bytes, items);
  }
  const std::vector<int64_t> need = compaction_needs(plans, items);
  run_items(plans, items, c, nt, &need);
}

}  // namespace
}  // namespace slicing_cpu
}  // namespace minitron

TORCH_LIBRARY_FRAGMENT(minitron, m) {
  m.def("_gather_slices_native(Tensor[] tensors, Tensor[] indices, int[] dims, int[] blocks, Tensor(a!)[] outs) -> ()");
  m.def("_compact_native(Tensor(a!) tensor, Tensor index, int dim, int block, int[] new_strides) -> ()");
}

TORCH_LIBRARY_IMPL(minitron, CPU, m) {
  m.impl("_gather_slices_native", &minitron::slicing_cpu::gather_slices_cpu);
  m.impl("_compact_native", &minitron::slicing_cpu::compact_cpu);
}
