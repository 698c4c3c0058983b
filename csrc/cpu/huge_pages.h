// Transparent-huge-page hint for large, freshly allocated CPU outputs (the KL gradient, gathered slices).
// With 4 KiB pages, first-touch page faults of a fresh buffer can cost more than the kernel that fills it;
// advising the still untouched, 2 MiB-aligned interior lets the kernel back it with huge pages where THP is
// in "madvise" mode. A no-op for small buffers and where THP or madvise is unavailable.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace minitron {
namespace cpu {

inline void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < (size_t{4} << 20)) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

}  // namespace cpu
}  // namespace minitron
