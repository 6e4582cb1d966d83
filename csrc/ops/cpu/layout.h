#pragma once
// Channels-last (N, H, W, C) to channels-first (N, C, H, W) conversion for the CPU backward
// kernels, which accumulate gradients channels-last. Each image is a [rows, cols] matrix
// transposed in square tiles, so that reads and writes both stay within cache lines; tiles
// are spread over threads. On the benchmark workload this is somewhat faster than ATen's
// strided copy, and it converts float accumulators to the gradient's dtype in the same pass.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace detframe::ops::cpu {

// out[b][j][i] = in[b][i][j] for `batch` matrices of `rows` x `cols`, converting S to D.
template <typename S, typename D>
void transpose_batched(const S* in, D* out, int64_t batch, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 32;
  const int64_t tile_rows = (rows + kTile - 1) / kTile;
  const int64_t tile_cols = (cols + kTile - 1) / kTile;
  at::parallel_for(0, batch * tile_rows * tile_cols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (tile_rows * tile_cols);
      const int64_t i0 = (t / tile_cols % tile_rows) * kTile;
      const int64_t j0 = (t % tile_cols) * kTile;
      const S* src = in + b * rows * cols;
      D* dst = out + b * rows * cols;
      for (int64_t i = i0; i < std::min(i0 + kTile, rows); ++i) {
        for (int64_t j = j0; j < std::min(j0 + kTile, cols); ++j) {
          dst[j * rows + i] = static_cast<D>(src[i * cols + j]);
        }
      }
    }
  });
}

}  // namespace detframe::ops::cpu
