// CPU kernels of the structured slicing ops:
//   torch.ops.minitron._gather_slices_native(tensors, indices, dims, blocks, outs, dims2=[], blocks2=[])
//       (out of place; tensors of up to 3 dims; dims2[i] != -1: a second cut of tensor i, whose index
//        follows the n first ones in `indices`, in tensor order)
//   torch.ops.minitron._compact_native(tensor, index, dim, block, new_strides)        (in place; 1-D/2-D)
//
// The Python layer (minitron/ops/slicing.py) validates the arguments (raising ValueError/TypeError),
// sorts the indices, converts them to int64 and allocates the outputs; the checks here only guard
// the memory accesses (TORCH_CHECK, RuntimeError).
//
// Work decomposition (csrc/common/slicing_math.h describes the canonical [groups, lines, elements]
// form; output line o reads a source line looked up through the group and line selections):
//   * no inner selection (whole lines) with unit-stride lines -> "pieces": contiguous byte ranges,
//     merged across adjacent lines when source and destination both continue, split to <= 512 KiB;
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

// Selection along one canonical axis: idx == nullptr means "not cut" (position j reads position j).
struct Sel {
  const int64_t* idx = nullptr;
  int64_t block = 1;
  int64_t k = 0;  // index entries (cut axes)
};

// One tensor in canonical form (csrc/common/slicing_math.h): output line o = group o / nl, line o % nl.
struct Plan {
  const char* src = nullptr;
  char* dst = nullptr;
  int64_t es = 0;              // element size, bytes
  int64_t ng = 1, nl = 0, ni = 0;  // output groups, lines per group, elements per line
  int64_t src_inner = 0;       // elements per source line
  int64_t sg = 0, sl = 0, si = 1;  // source strides, elements
  int64_t dg = 0, dl = 0, di = 1;  // destination strides, elements
  Sel gsel, lsel, isel;
  Strategy strat = Strategy::kGeneric;
  std::vector<Run> runs;
  std::vector<uint64_t> masks;
  std::vector<int64_t> pos;

  bool select_inner() const { return isel.idx != nullptr; }
  int64_t out_lines() const { return ng * nl; }
  // Element offsets of output line o in the source and the destination.
  int64_t src_line(int64_t o) const {
    const int64_t g = ng == 1 ? 0 : o / nl;
    const int64_t l = o - g * nl;
    return slicing::select_source(gsel.idx, g, gsel.block) * sg + slicing::select_source(lsel.idx, l, lsel.block) * sl;
  }
  int64_t dst_line(int64_t o) const {
    const int64_t g = ng == 1 ? 0 : o / nl;
    return g * dg + (o - g * nl) * dl;
  }
};

struct Item {
  int32_t plan;   // index into the plan list, or -1 for a byte piece
  int64_t a, b;   // output line range [a, b) (lines items)
  const char* s;  // piece source
  char* d;        // piece destination
  int64_t bytes;  // piece size
};

bool lines_contiguous(const Plan& p) { return p.si == 1 && p.di == 1; }

// Prepares the per-line tables of an inner selection and picks its strategy.
void plan_inner(Plan& p, const Config& c) {
  const int64_t block = p.isel.block;
  p.runs.clear();
  for (int64_t j = 0; j < p.isel.k; ++j) {
    const int64_t s = p.isel.idx[j] * block;
    if (!p.runs.empty() && p.runs.back().src + p.runs.back().len == s) {
      p.runs.back().len += block;
    } else {
      p.runs.push_back(Run{s, j * block, block});
    }
  }
  Strategy st;
  if (!lines_contiguous(p)) {
    st = Strategy::kGeneric;
  } else {
    const int64_t mean_run_bytes = p.runs.empty() ? 0 : p.ni * p.es / static_cast<int64_t>(p.runs.size());
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
    p.masks.assign(static_cast<size_t>((p.src_inner + cw - 1) / cw), 0);
    for (const Run& r : p.runs)
      for (int64_t e = r.src; e < r.src + r.len; ++e) p.masks[e / cw] |= 1ull << (e % cw);
  } else if (st == Strategy::kPos || st == Strategy::kGeneric) {
    p.pos.resize(static_cast<size_t>(p.ni));
    for (int64_t j = 0; j < p.ni; ++j) p.pos[j] = slicing::source_of(p.isel.idx, j, block);
  }
}

// Whole lines (no inner selection) with unit-stride lines: byte pieces for output lines [l0, l1). Lines whose
// source and destination both continue the previous piece are merged (kept units of a dense tensor: one
// piece per run of kept units), then pieces are split to at most `piece` bytes.
void add_line_pieces(const Plan& p, int64_t l0, int64_t l1, int64_t piece, std::vector<Item>& items) {
  const int64_t line_bytes = p.ni * p.es;
  if (line_bytes == 0) return;
  const char* cs = nullptr;
  char* cd = nullptr;
  int64_t cn = 0;
  auto flush = [&]() {
    for (int64_t off = 0; off < cn; off += piece)
      items.push_back(Item{-1, 0, 0, cs + off, cd + off, std::min(piece, cn - off)});
    cn = 0;
  };
  for (int64_t o = l0; o < l1; ++o) {
    const char* s = p.src + p.src_line(o) * p.es;
    char* d = p.dst + p.dst_line(o) * p.es;
    if (cn > 0 && s == cs + cn && d == cd + cn) {
      cn += line_bytes;
      continue;
    }
    flush();
    cs = s;
    cd = d;
    cn = line_bytes;
  }
  flush();
}

// Line-range items for output lines [l0, l1) of plan `pi`, about kPieceBytes of output each.
void add_line_items(const Plan& p, int32_t pi, int64_t l0, int64_t l1, int64_t piece,
                    std::vector<Item>& items) {
  const int64_t line_bytes = std::max<int64_t>(1, p.ni * p.es);
  const int64_t per = std::max<int64_t>(1, piece / line_bytes);
  for (int64_t a = l0; a < l1; a += per) items.push_back(Item{pi, a, std::min(l1, a + per), nullptr, nullptr, 0});
}

template <typename T>
void generic_lines(const Plan& p, int64_t a, int64_t b) {
  const T* s = reinterpret_cast<const T*>(p.src);
  T* d = reinterpret_cast<T*>(p.dst);
  const bool inner = p.select_inner();
  for (int64_t o = a; o < b; ++o) {
    const T* sline = s + p.src_line(o);
    T* dline = d + p.dst_line(o);
    if (inner) {
      for (int64_t j = 0; j < p.ni; ++j) dline[j * p.di] = sline[p.pos[j] * p.si];
    } else {
      for (int64_t j = 0; j < p.ni; ++j) dline[j * p.di] = sline[j * p.si];
    }
  }
}

void run_lines(const Plan& p, int64_t a, int64_t b, const Config& c, bool nt) {
  if (!p.select_inner() || p.strat == Strategy::kGeneric) {
    switch (p.es) {
      case 1: generic_lines<uint8_t>(p, a, b); break;
      case 2: generic_lines<uint16_t>(p, a, b); break;
      case 4: generic_lines<uint32_t>(p, a, b); break;
      default: generic_lines<uint64_t>(p, a, b); break;
    }
    return;
  }
  for (int64_t o = a; o < b; ++o) {
    const char* sl = p.src + p.src_line(o) * p.es;
    char* dl = p.dst + p.dst_line(o) * p.es;
    switch (p.strat) {
      case Strategy::kRuns:
        for (const Run& r : p.runs) copy_bytes(dl + r.dst * p.es, sl + r.src * p.es, r.len * p.es, c, nt);
        break;
      case Strategy::kCompress:
#if MINITRON_HAS_X86_DISPATCH
        // (Staging the line and streaming it out was measured slower than the masked stores.)
        switch (p.es) {
          case 1: compress_line_1(dl, sl, p.src_inner, p.masks.data()); break;
          case 2: compress_line_2(dl, sl, p.src_inner, p.masks.data()); break;
          case 4: compress_line_4(dl, sl, p.src_inner, p.masks.data()); break;
          default: compress_line_8(dl, sl, p.src_inner, p.masks.data()); break;
        }
#endif
        break;
      case Strategy::kPos:
        switch (p.es) {
          case 1: pos_line<uint8_t>(dl, sl, p.pos.data(), p.ni); break;
          case 2: pos_line<uint16_t>(dl, sl, p.pos.data(), p.ni); break;
          case 4: pos_line<uint32_t>(dl, sl, p.pos.data(), p.ni); break;
          default: pos_line<uint64_t>(dl, sl, p.pos.data(), p.ni); break;
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
  return (it.b - it.a) * p.ni * p.es;
}

struct Span {
  uintptr_t lo, hi;  // [lo, hi) bytes
};

// Byte span an item reads (src) and writes (dst). Line items: valid for one group (compaction), whose
// source and destination lines go up with the output line.
void item_spans(const std::vector<Plan>& plans, const Item& it, Span& src, Span& dst) {
  if (it.plan < 0) {
    src = {reinterpret_cast<uintptr_t>(it.s), reinterpret_cast<uintptr_t>(it.s) + static_cast<uintptr_t>(it.bytes)};
    dst = {reinterpret_cast<uintptr_t>(it.d), reinterpret_cast<uintptr_t>(it.d) + static_cast<uintptr_t>(it.bytes)};
    return;
  }
  const Plan& p = plans[it.plan];
  const auto base_s = reinterpret_cast<uintptr_t>(p.src);
  const auto base_d = reinterpret_cast<uintptr_t>(p.dst);
  src = {base_s + static_cast<uintptr_t>(p.src_line(it.a) * p.es),
         base_s + static_cast<uintptr_t>((p.src_line(it.b - 1) + (p.src_inner - 1) * p.si + 1) * p.es)};
  dst = {base_d + static_cast<uintptr_t>(p.dst_line(it.a) * p.es),
         base_d + static_cast<uintptr_t>((p.dst_line(it.b - 1) + (p.ni - 1) * p.di + 1) * p.es)};
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

struct CutArg {
  int64_t dim = -1;  // -1: no cut
  const at::Tensor* idx = nullptr;
  int64_t block = 1;
};

// Fills a plan: canonical axes of `t` in its memory order, the cuts mapped onto them, output extents and
// source strides (destination strides are set by the caller).
void fill_plan(Plan& p, const at::Tensor& t, const CutArg* cuts, int ncuts, const char* what) {
  const int nd = static_cast<int>(t.dim());
  TORCH_CHECK(nd >= 1 && nd <= 3, what, ": tensor must be 1-D, 2-D or 3-D, got ", nd, "-D");
  int order[3];
  slicing::dim_order(nd, t.sizes().data(), t.strides().data(), order);
  const slicing::Axes ax = slicing::axes_of(nd, order);
  const int64_t* sz = t.sizes().data();
  const int64_t* st = t.strides().data();
  int64_t out[3] = {1, 1, 1};
  for (int d = 0; d < nd; ++d) out[d] = sz[d];
  for (int c = 0; c < ncuts; ++c) {
    const CutArg& cut = cuts[c];
    TORCH_CHECK(cut.dim >= 0 && cut.dim < nd, what, ": dim ", cut.dim, " out of range for a ", nd, "-D tensor");
    TORCH_CHECK(c == 0 || cut.dim != cuts[0].dim, what, ": the two cut dims must differ");
    TORCH_CHECK(cut.block >= 1 && sz[cut.dim] % cut.block == 0, what, ": block ", cut.block, " must divide size ",
                sz[cut.dim]);
    check_index(*cut.idx, sz[cut.dim] / cut.block, what);
    Sel s;
    s.idx = cut.idx->data_ptr<int64_t>();
    s.block = cut.block;
    s.k = cut.idx->numel();
    out[cut.dim] = s.k * cut.block;
    if (cut.dim == ax.g) p.gsel = s;
    else if (cut.dim == ax.l) p.lsel = s;
    else p.isel = s;
  }
  p.es = element_size_checked(t, what);
  p.ng = ax.g < 0 ? 1 : out[ax.g];
  p.nl = ax.l < 0 ? 1 : out[ax.l];
  p.ni = out[ax.i];
  p.src_inner = sz[ax.i];
  p.sg = slicing::stride_of(st, ax.g);
  p.sl = slicing::stride_of(st, ax.l);
  p.si = p.src_inner <= 1 ? 1 : st[ax.i];
  if (slicing::extent_of(sz, ax.l) <= 1) p.sl = p.src_inner * p.si;
}

// Destination strides of a plan from `o` (same logical dims as the source; canonical axes of the source).
void set_dst(Plan& p, const at::Tensor& src, const int64_t* sizes, const int64_t* strides) {
  const int nd = static_cast<int>(src.dim());
  int order[3];
  slicing::dim_order(nd, src.sizes().data(), src.strides().data(), order);
  const slicing::Axes ax = slicing::axes_of(nd, order);
  p.dg = slicing::stride_of(strides, ax.g);
  p.dl = slicing::stride_of(strides, ax.l);
  p.di = sizes[ax.i] <= 1 ? 1 : strides[ax.i];
  if (slicing::extent_of(sizes, ax.l) <= 1) p.dl = p.ni * p.di;
}

// Work items of a plan for output lines [l0, l1) (in output order).
void add_plan_items(Plan& p, int32_t pi, int64_t l0, int64_t l1, const Config& c, std::vector<Item>& items) {
  if (p.select_inner()) {
    plan_inner(p, c);
    add_line_items(p, pi, l0, l1, c.piece_bytes, items);
  } else if (lines_contiguous(p) && c.forced != static_cast<int>(Strategy::kGeneric)) {
    add_line_pieces(p, l0, l1, c.piece_bytes, items);
  } else {
    p.strat = Strategy::kGeneric;
    add_line_items(p, pi, l0, l1, c.piece_bytes, items);
  }
}

// ---------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------

// dims2 / blocks2: the second cut of each tensor (dims2[i] == -1: none; empty lists: no tensor has one). The
// second cuts' indices follow the n first ones in `indices`, in tensor order (as in the Python op's schema).
// One parallel region copies every tensor.
void gather_slices_cpu(at::TensorList tensors, at::TensorList indices, at::IntArrayRef dims,
                       at::IntArrayRef blocks, at::TensorList outs, at::IntArrayRef dims2, at::IntArrayRef blocks2) {
  const size_t n = tensors.size();
  const bool two = !dims2.empty();
  size_t m = 0;
  if (two) {
    TORCH_CHECK(dims2.size() == n && blocks2.size() == n,
                "_gather_slices_native: dims2 and blocks2 must be empty or have one entry per tensor");
    for (size_t i = 0; i < n; ++i) m += dims2[i] != -1 ? 1 : 0;
  }
  TORCH_CHECK(indices.size() == n + m && dims.size() == n && blocks.size() == n && outs.size() == n,
              "_gather_slices_native: tensors, indices (plus one per second cut), dims, blocks and outs must have ",
              "the same length");
  size_t next2 = n;
  const Config c = read_config();
  std::vector<Plan> plans(n);
  int64_t out_bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    const at::Tensor& o = outs[i];
    TORCH_CHECK(t.device().is_cpu() && o.device().is_cpu(), "_gather_slices_native: CPU tensors expected");
    Plan& p = plans[i];
    CutArg cuts[2];
    cuts[0] = CutArg{dims[i], &indices[i], blocks[i]};
    const int ncuts = two && dims2[i] != -1 ? 2 : 1;
    if (ncuts == 2) cuts[1] = CutArg{dims2[i], &indices[next2++], blocks2[i]};
    fill_plan(p, t, cuts, ncuts, "_gather_slices_native");
    TORCH_CHECK(o.scalar_type() == t.scalar_type() && o.dim() == t.dim(),
                "_gather_slices_native: out[", i, "] must match the tensor's dtype and rank");
    for (int64_t d = 0; d < t.dim(); ++d) {
      int64_t want = t.size(d);
      for (int q = 0; q < ncuts; ++q)
        if (d == cuts[q].dim) want = cuts[q].idx->numel() * cuts[q].block;
      TORCH_CHECK(o.size(d) == want, "_gather_slices_native: out[", i, "] has wrong size ", o.sizes());
    }
    set_dst(p, t, o.sizes().data(), o.strides().data());
    p.src = static_cast<const char*>(t.data_ptr());
    p.dst = static_cast<char*>(o.data_ptr());
    out_bytes += o.numel() * p.es;
    if (c.thp && o.numel() > 0) cpu::advise_huge_pages(p.dst, static_cast<size_t>(o.numel() * p.es));
  }
  const bool nt = c.nt >= 0 ? c.nt == 1 : out_bytes >= kNonTemporalBytes;
  std::vector<Item> items;
  for (size_t i = 0; i < n; ++i) {
    Plan& p = plans[i];
    if (p.out_lines() == 0 || p.ni == 0) continue;
    add_plan_items(p, static_cast<int32_t>(i), 0, p.out_lines(), c, items);
  }
  run_items(plans, items, c, nt);
}

void compact_cpu(const at::Tensor& tensor, const at::Tensor& index, int64_t dim, int64_t block,
                 at::IntArrayRef new_strides) {
  TORCH_CHECK(tensor.device().is_cpu(), "_compact_native: CPU tensor expected");
  TORCH_CHECK(tensor.dim() == 1 || tensor.dim() == 2, "_compact_native: tensor must be 1-D or 2-D (the Python ",
              "layer compacts a 3-D tensor as a 2-D view)");
  const Config c = read_config();
  std::vector<Plan> plans(1);
  Plan& p = plans[0];
  const CutArg cut{dim, &index, block};
  fill_plan(p, tensor, &cut, 1, "_compact_native");
  {
    Layout L;
    L.outer = p.nl;
    L.inner = p.src_inner;
    L.so = p.sl;
    L.si = p.si;
    TORCH_CHECK(slicing::is_non_overlapping(L), "_compact_native: tensor has overlapping memory");
  }
  if (p.out_lines() == 0 || p.ni == 0) return;
  TORCH_CHECK(static_cast<int64_t>(new_strides.size()) == tensor.dim(), "_compact_native: new_strides has wrong length");
  // Destination strides: either the tensor's own, or (inner selection of a dense tensor) packed.
  std::vector<int64_t> new_sizes(tensor.sizes().begin(), tensor.sizes().end());
  new_sizes[dim] = p.select_inner() ? p.ni : p.nl;
  Plan same = p;
  set_dst(same, tensor, new_sizes.data(), tensor.strides().data());
  set_dst(p, tensor, new_sizes.data(), new_strides.data());
  const bool keep = p.dl == same.dl && p.di == same.di;
  const bool dense = p.si == 1 && p.sl == p.src_inner;
  const bool packed = p.select_inner() && dense && p.di == 1 && p.dl == p.ni;
  TORCH_CHECK(keep || packed, "_compact_native: new_strides must be the tensor's strides or (inner selection of a ",
              "dense tensor) the packed strides");
  p.src = static_cast<const char*>(tensor.data_ptr());
  p.dst = static_cast<char*>(tensor.data_ptr());
  const bool nt = c.nt == 1;  // compaction rewrites memory it just read (cache-hot): regular stores by default
  // All items in output order; compaction_needs() orders the ones that could clobber unread data.
  std::vector<Item> items;
  if (!p.select_inner()) {
    // Whole units of lines move down: idx[j] -> j. The prefix with idx[j] == j stays in place.
    int64_t a = 0;
    while (a < p.lsel.k && p.lsel.idx[a] == a) ++a;
    add_plan_items(p, 0, a * p.lsel.block, p.out_lines(), c, items);
  } else {
    if (p.ni == p.src_inner) return;  // everything kept: identity
    add_plan_items(p, 0, 0, p.out_lines(), c, items);
  }
  const std::vector<int64_t> need = compaction_needs(plans, items);
  run_items(plans, items, c, nt, &need);
}

}  // namespace
}  // namespace slicing_cpu
}  // namespace minitron

TORCH_LIBRARY_FRAGMENT(minitron, m) {
  m.def("_gather_slices_native(Tensor[] tensors, Tensor[] indices, int[] dims, int[] blocks, Tensor(a!)[] outs, "
        "int[] dims2=[], int[] blocks2=[]) -> ()");
  m.def("_compact_native(Tensor(a!) tensor, Tensor index, int dim, int block, int[] new_strides) -> ()");
}

TORCH_LIBRARY_IMPL(minitron, CPU, m) {
  m.impl("_gather_slices_native", &minitron::slicing_cpu::gather_slices_cpu);
  m.impl("_compact_native", &minitron::slicing_cpu::compact_cpu);
}
