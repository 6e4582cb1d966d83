#pragma once
// The innermost loops of the CPU kernels: one pass over a contiguous run of channels.
// They are written branch-free over __restrict__ pointers so the compiler vectorises them,
// and, on x86-64 with GCC or Clang, compiled twice (AVX2 and baseline SSE2) with the
// variant chosen at load time for the running CPU. Neither variant uses FMA, so both give
// bitwise identical results.

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define DETFRAME_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DETFRAME_CPU_CLONES
#endif

namespace detframe::ops::cpu {

// acc[c] += w0 * p0[c] + w1 * p1[c] + w2 * p2[c] + w3 * p3[c], for c in [0, n).
template <typename scalar_t, typename T>
DETFRAME_CPU_CLONES void accumulate_bilinear(
    T* __restrict__ acc,
    const scalar_t* p0,
    const scalar_t* p1,
    const scalar_t* p2,
    const scalar_t* p3,
    const T* w,
    int64_t n) {
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += w0 * static_cast<T>(p0[c]) + w1 * static_cast<T>(p1[c]) +
        w2 * static_cast<T>(p2[c]) + w3 * static_cast<T>(p3[c]);
  }
}

// dst[c] += w * src[c], for c in [0, n).
template <typename T>
DETFRAME_CPU_CLONES void axpy(T* __restrict__ dst, const T* __restrict__ src, T w, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    dst[c] += w * src[c];
  }
}

// Running maximum over cells: where p[c] > best[c], best[c] = p[c] and best_at[c] = cell.
template <typename scalar_t, typename T>
DETFRAME_CPU_CLONES void update_max(
    T* __restrict__ best,
    int32_t* __restrict__ best_at,
    const scalar_t* __restrict__ p,
    int32_t cell,
    int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const T v = static_cast<T>(p[c]);
    const bool greater = v > best[c];
    best[c] = greater ? v : best[c];
    best_at[c] = greater ? cell : best_at[c];
  }
}

}  // namespace detframe::ops::cpu
