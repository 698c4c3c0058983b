// Run-time CPU feature detection for the CPU kernels.
//
// The extension is compiled for baseline x86-64. Hot loops are instantiated a second and third time
// inside functions carrying __attribute__((target("..."))) and chosen here at run time, so the
// binary never executes AVX2/AVX-512 instructions on a CPU that lacks them.
// MINITRON_CPU_ISA=avx512|avx2|scalar (environment) forces a lower level for tests and benchmarks.
#pragma once

#include <cstdlib>
#include <cstring>

namespace minitron {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

inline Isa hardware_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

// The ISA the kernels use: the hardware's, capped by MINITRON_CPU_ISA when set. Read per call
// (cheap) so tests can switch it between calls.
inline Isa detect_isa() {
  Isa hw = hardware_isa();
  const char* env = std::getenv("MINITRON_CPU_ISA");
  if (env == nullptr || *env == '\0') return hw;
  Isa want = hw;
  if (std::strcmp(env, "scalar") == 0) want = Isa::kScalar;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
  return static_cast<int>(want) < static_cast<int>(hw) ? want : hw;
}

}  // namespace cpu
}  // namespace minitron

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MINITRON_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MINITRON_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define MINITRON_HAS_X86_DISPATCH 1
#else
#define MINITRON_TARGET_AVX2
#define MINITRON_TARGET_AVX512
#define MINITRON_HAS_X86_DISPATCH 0
#endif
