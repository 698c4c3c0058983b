// Host/device qualifiers so the same per-row math compiles in C++ (CPU kernels, CPU tests) and CUDA.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MINITRON_HD __host__ __device__ __forceinline__
#else
#define MINITRON_HD inline
#endif
