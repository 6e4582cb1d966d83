#pragma once
// Launch configuration and [K, C, PH, PW] indexing shared by the CUDA kernels: one thread per
// output element, grid-stride loops with 64-bit indices.

#include <ATen/ATen.h>
#include <ATen/ceil_div.h>

#include <algorithm>

namespace detframe::ops::cuda {

constexpr int kThreads = 512;
constexpr int64_t kMaxBlocks = 4096;

inline int64_t num_blocks(int64_t n) {
  return std::min(at::ceil_div(n, int64_t{kThreads}), kMaxBlocks);
}

// Element strides of a [K, C, PH, PW] tensor.
struct Strides {
  int64_t k, c, h, w;
};

inline Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Position of an element of a [K, C, PH, PW] tensor.
struct BinIndex {
  int64_t k, c, ph, pw;

  __device__ int64_t offset(const Strides& s) const {
    return k * s.k + c * s.c + ph * s.h + pw * s.w;
  }
};

// The position of flat index `index` in row-major [K, C, PH, PW] order.
__device__ inline BinIndex bin_index(
    int64_t index,
    int64_t channels,
    int64_t pooled_h,
    int64_t pooled_w) {
  BinIndex i;
  i.pw = index % pooled_w;
  index /= pooled_w;
  i.ph = index % pooled_h;
  index /= pooled_h;
  i.c = index % channels;
  i.k = index / channels;
  return i;
}

}  // namespace detframe::ops::cuda
