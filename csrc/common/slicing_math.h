// Index arithmetic of the structured slicing ops (gather_slices / compact_), shared by the CPU
// kernels, the CUDA kernels and their host launch code.
//
// 3-D tensors and two cut dims (gather_slices). A tensor of up to 3 dims is seen in memory order
// (dim_order: dims by decreasing stride) as three canonical axes: groups G (outermost), lines L and
// the inner axis I (a 2-D tensor has one group, a 1-D tensor one group of one line). Output line o
// (0 <= o < groups * lines_per_group) is group g = o / lines_per_group, line l = o % lines_per_group;
// it reads source line select_source(G, g) * sg + select_source(L, l) * sl, where an axis that is
// not cut maps each position to itself. Any one or two of G, L, I may be cut. The 2-D description
// below is the one-group case.
//
// Canonical form. A 1-D or 2-D tensor is seen in *memory order* as `outer` lines of `inner`
// elements: line l, element e lives at element offset l * so + e * si from the data pointer, with
// so >= si (the line axis is the one with the larger stride). A row-major matrix has lines = rows;
// a column-major matrix (e.g. a transposed row-major one) has lines = its columns, so selecting its
// columns selects whole lines of storage and needs no transpose. A 1-D tensor is one line.
//
// Selection. `idx` holds k sorted, distinct *unit* numbers; unit u covers the `block` consecutive
// positions [u * block, (u + 1) * block) of the selected axis. Output position j (0 <= j < k*block)
// reads source position source_of(idx, j, block). If the selected axis is the line axis
// ("outer selection") whole lines are copied; otherwise ("inner selection") every line keeps the
// same positions.
//
// In-place compaction (compact_) writes output position j of line l to a destination that never
// lies after its source (sorted index: source_of(j) >= j), so moving data in increasing order never
// overwrites data still to be read; the kernels add concurrency on top of that order (CPU:
// per-item dependencies in csrc/cpu/slicing.cpp; GPU: bounded staging slabs).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace minitron {
namespace slicing {

// Source position of output position j (unit idx[j / block], offset j % block inside it).
MINITRON_HD int64_t source_of(const int64_t* idx, int64_t j, int64_t block) {
  return idx[j / block] * block + j % block;
}

// Whether output positions [j, j + n) read n consecutive source positions (n >= 1). The index is sorted and
// distinct, so source_of is strictly increasing in j and the run is contiguous exactly when its ends are
// n - 1 apart. The GPU column gather uses it to turn a thread's n gathered elements into one vector load.
MINITRON_HD bool sources_contiguous(const int64_t* idx, int64_t j, int64_t n, int64_t block) {
  return source_of(idx, j + n - 1, block) - source_of(idx, j, block) == n - 1;
}

// Source position of output position j along an axis that may be uncut (idx == nullptr: identity).
MINITRON_HD int64_t select_source(const int64_t* idx, int64_t j, int64_t block) {
  return idx != nullptr ? source_of(idx, j, block) : j;
}

// ceil(a / b) for a >= 0, b >= 1.
MINITRON_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether a 2-D tensor with sizes (n0, n1) and strides (s0, s1) is stored column-major, i.e. its
// lines are its columns. Dimensions of size <= 1 never decide (their stride is meaningless).
MINITRON_HD bool is_col_major(int64_t n0, int64_t n1, int64_t s0, int64_t s1) {
  return n0 > 1 && n1 > 1 && s0 < s1;
}

struct Layout {
  int64_t outer = 1;  // number of lines
  int64_t inner = 0;  // elements per line
  int64_t so = 0;     // line stride, elements
  int64_t si = 1;     // element stride inside a line, elements
  int outer_dim = -1; // logical dim indexing lines (-1: 1-D tensor, one line)
  int inner_dim = 0;  // logical dim along a line
};

// Canonical layout of a 1-D/2-D tensor in the given orientation (col_major only matters for 2-D).
// Strides of extent-1 axes are normalised (si := 1 when inner <= 1, so := inner * si when
// outer <= 1) so that density checks do not depend on them.
inline Layout make_layout(int ndim, const int64_t* sizes, const int64_t* strides, bool col_major) {
  Layout L;
  if (ndim == 1) {
    L.outer = 1;
    L.inner = sizes[0];
    L.si = strides[0];
    L.outer_dim = -1;
    L.inner_dim = 0;
  } else {
    const int od = col_major ? 1 : 0;
    const int id = 1 - od;
    L.outer = sizes[od];
    L.inner = sizes[id];
    L.so = strides[od];
    L.si = strides[id];
    L.outer_dim = od;
    L.inner_dim = id;
  }
  if (L.inner <= 1) L.si = 1;
  if (L.outer <= 1) L.so = L.inner * L.si;
  return L;
}

// The dims of a tensor (ndim <= 3) in memory order, outermost first, into order[0..ndim): dims of
// extent > 1 by decreasing stride (ties keep the logical order), dims of extent <= 1 at their logical
// positions. Same rule as minitron.kernels._layout.dim_order; for 2-D, {1, 0} exactly when is_col_major.
inline void dim_order(int ndim, const int64_t* sizes, const int64_t* strides, int* order) {
  int big[3];
  int nb = 0;
  for (int d = 0; d < ndim; ++d)
    if (sizes[d] > 1) big[nb++] = d;
  for (int i = 1; i < nb; ++i) {  // stable insertion sort by decreasing stride
    const int v = big[i];
    int j = i;
    while (j > 0 && strides[big[j - 1]] < strides[v]) {
      big[j] = big[j - 1];
      --j;
    }
    big[j] = v;
  }
  int b = 0;
  for (int d = 0; d < ndim; ++d) order[d] = sizes[d] <= 1 ? d : big[b++];
}

// The canonical axes of a tensor in a given memory order: which logical dim is the group axis G, the
// line axis L and the inner axis I (-1: the axis does not exist, extent 1).
struct Axes {
  int g = -1, l = -1, i = 0;
};

inline Axes axes_of(int ndim, const int* order) {
  Axes a;
  if (ndim == 3) {
    a.g = order[0];
    a.l = order[1];
    a.i = order[2];
  } else if (ndim == 2) {
    a.l = order[0];
    a.i = order[1];
  }
  return a;
}

// Extent and stride of logical dim d (-1: a missing axis, extent 1, stride 0).
inline int64_t extent_of(const int64_t* sizes, int d) { return d < 0 ? 1 : sizes[d]; }
inline int64_t stride_of(const int64_t* strides, int d) { return d < 0 ? 0 : strides[d]; }

// Lines are contiguous and packed back to back (the whole tensor is one dense block).
inline bool is_dense(const Layout& L) { return L.si == 1 && L.so == L.inner; }

// Lines do not overlap each other and elements inside a line do not overlap (in-place safe).
inline bool is_non_overlapping(const Layout& L) {
  if (L.inner > 1 && L.si < 1) return false;
  if (L.outer > 1 && L.so < (L.inner > 0 ? (L.inner - 1) * L.si + 1 : 1)) return false;
  return true;
}

}  // namespace slicing
}  // namespace minitron
