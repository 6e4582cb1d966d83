// CPU kernels of detframe::roi_pool and its backward.
//
//   input  [N, C, H, W]  any memory format; read as channels-last (N, H, W, C) so that the
//                        window scan compares whole C-vectors at a time
//   rois   [K, 5]
//   output [K, C, PH, PW], argmax [K, C, PH, PW] int32 (flat h * W + w, -1 if empty)
//
// Forward: RoIs are split across threads; each bin keeps a running maximum and argmax per
// channel while it scans its window in row-major order (strict '>' so the first maximum
// wins, as in torchvision).
//
// Backward: grad_input[b, c, argmax] += grad. Tasks own an (image, channel range) pair and
// walk that image's RoIs in order: race-free and bitwise reproducible. Reduced-precision
// gradients are accumulated in float32.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../roi_geometry.h"
#include "rois_by_image.h"
#include "vector_loops.h"

namespace detframe::ops {
namespace {

// input [N, C, H, W] gives the sizes; input_nhwc holds its data in channels-last order.
template <typename scalar_t>
void forward_impl(
    const at::Tensor& input,
    const at::Tensor& input_nhwc,
    const at::Tensor& rois,
    at::Tensor& output,
    at::Tensor& argmax,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w) {
  using T = at::opmath_type<scalar_t>;
  const int64_t num_rois = rois.size(0);
  const int64_t batch = input.size(0);
  const int64_t channels = input.size(1);
  const int64_t height = input.size(2);
  const int64_t width = input.size(3);
  const int64_t bins = pooled_h * pooled_w;
  const scalar_t* in = input_nhwc.const_data_ptr<scalar_t>();
  const scalar_t* roi_data = rois.const_data_ptr<scalar_t>();
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  int32_t* arg = argmax.mutable_data_ptr<int32_t>();
  const T scale = static_cast<T>(spatial_scale);
  const T lowest = static_cast<T>(-FLT_MAX);  // torchvision's starting value, for every dtype

  at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> best(channels);
    std::vector<int32_t> best_at(channels);
    for (int64_t k = begin; k < end; ++k) {
      const scalar_t* roi = roi_data + k * 5;
      scalar_t* out_k = out + k * channels * bins;
      int32_t* arg_k = arg + k * channels * bins;
      RoIPoolGeometry<T> g;
      const int64_t b = roi_batch_index(static_cast<T>(roi[0]), batch);
      if (b < 0 || !roi_pool_geometry(roi, scale, pooled_h, pooled_w, g)) {
        std::fill(out_k, out_k + channels * bins, scalar_t(0));
        std::fill(arg_k, arg_k + channels * bins, -1);
        continue;
      }
      const scalar_t* image = in + b * height * width * channels;
      for (int64_t ph = 0; ph < pooled_h; ++ph) {
        for (int64_t pw = 0; pw < pooled_w; ++pw) {
          const Window win = roi_pool_window(g, ph, pw, height, width);
          std::fill(best.begin(), best.end(), win.empty() ? T(0) : lowest);
          std::fill(best_at.begin(), best_at.end(), -1);
          for (int64_t h = win.h0; h < win.h1; ++h) {
            for (int64_t w = win.w0; w < win.w1; ++w) {
              const int64_t cell = h * width + w;
              cpu::update_max(
                  best.data(), best_at.data(), image + cell * channels,
                  static_cast<int32_t>(cell), channels);
            }
          }
          const int64_t bin = ph * pooled_w + pw;
          for (int64_t c = 0; c < channels; ++c) {
            out_k[c * bins + bin] = static_cast<scalar_t>(best[c]);
            arg_k[c * bins + bin] = best_at[c];
          }
        }
      }
    }
  });
}

// grad and argmax [K, C, PH, PW] contiguous; grad_input [N, C, H, W] zero-initialised.
template <typename scalar_t>
void backward_impl(
    const at::Tensor& grad,
    const at::Tensor& rois,
    const at::Tensor& argmax,
    at::Tensor& grad_input) {
  const int64_t batch = grad_input.size(0);
  const int64_t channels = grad_input.size(1);
  const int64_t plane = grad_input.size(2) * grad_input.size(3);
  const int64_t bins = grad.size(2) * grad.size(3);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const int32_t* arg = argmax.const_data_ptr<int32_t>();
  scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();

  const RoIsByImage groups(rois.const_data_ptr<scalar_t>(), rois.size(0), batch);
  const ChannelTasks tasks(batch, channels);
  at::parallel_for(0, tasks.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const auto [b, c0, c1] = tasks.task(t);
      for (int64_t c = c0; c < c1; ++c) {  // one H x W plane at a time: it stays in cache
        scalar_t* dst = out + (b * channels + c) * plane;
        for (const int64_t k : groups.rois_of(b)) {
          const int64_t first = (k * channels + c) * bins;
          for (int64_t bin = 0; bin < bins; ++bin) {
            const int32_t cell = arg[first + bin];
            if (cell >= 0) {
              dst[cell] += g[first + bin];
            }
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w) {
  check_pool_args("roi_pool", input, rois, spatial_scale, pooled_h, pooled_w);
  TORCH_CHECK_VALUE(input.is_cpu(), "roi_pool: expected CPU tensors, got ", input.device());
  TORCH_CHECK_VALUE(
      input.size(2) * input.size(3) <= std::numeric_limits<int32_t>::max(),
      "roi_pool: the H x W plane must have fewer than 2^31 cells, got ",
      input.sizes());
  const auto rois_c = rois.contiguous();
  const std::vector<int64_t> size = {rois.size(0), input.size(1), pooled_h, pooled_w};
  at::Tensor output = at::empty(size, input.options());
  at::Tensor argmax = at::empty(size, input.options().dtype(at::kInt));
  if (output.numel() == 0) {
    return {output, argmax};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cpu", [&] {
        check_batch_indices_cpu(
            "roi_pool", rois_c.const_data_ptr<scalar_t>(), rois.size(0), input.size(0));
        // The input's data in channels-last order (free when it already is channels-last).
        const auto input_nhwc = input.contiguous(at::MemoryFormat::ChannelsLast);
        forward_impl<scalar_t>(
            input, input_nhwc, rois_c, output, argmax, spatial_scale, pooled_h, pooled_w);
      });
  return {output, argmax};
}

at::Tensor roi_pool_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& rois,
    const at::Tensor& argmax,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w,
    int64_t batch_size,
    int64_t channels,
    int64_t height,
    int64_t width) {
  check_backward_args(
      "_roi_pool_backward", grad, rois, spatial_scale, pooled_h, pooled_w, batch_size,
      channels, height, width);
  TORCH_CHECK_VALUE(
      grad.is_cpu() && argmax.is_cpu(),
      "_roi_pool_backward: expected CPU tensors, got ",
      grad.device(),
      " and ",
      argmax.device());
  TORCH_CHECK_TYPE(
      argmax.scalar_type() == at::kInt,
      "_roi_pool_backward: argmax must be int32, got ",
      argmax.scalar_type());
  TORCH_CHECK_VALUE(
      argmax.sizes() == grad.sizes(),
      "_roi_pool_backward: argmax must have the shape of grad ",
      grad.sizes(),
      ", got ",
      argmax.sizes());
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  at::Tensor grad_input =
      at::zeros({batch_size, channels, height, width}, grad.options().dtype(acc_type));
  if (grad.numel() == 0 || grad_input.numel() == 0) {
    return grad_input.to(grad.scalar_type());
  }
  // An argmax that does not come from roi_pool's forward must not write out of bounds.
  const auto [low, high] = at::aminmax(argmax);
  TORCH_CHECK_INDEX(
      low.item<int32_t>() >= -1 && high.item<int32_t>() < height * width,
      "_roi_pool_backward: argmax values must lie in [-1, H * W) = [-1, ",
      height * width,
      "), got [",
      low.item<int32_t>(),
      ", ",
      high.item<int32_t>(),
      "]");
  const auto rois_c = rois.to(acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "roi_pool_backward_cpu", [&] {
    check_batch_indices_cpu(
        "_roi_pool_backward", rois_c.const_data_ptr<scalar_t>(), rois.size(0), batch_size);
    backward_impl<scalar_t>(
        grad.to(acc_type).contiguous(), rois_c, argmax.contiguous(), grad_input);
  });
  return grad_input.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(detframe, CPU, m) {
  m.impl("roi_pool", TORCH_FN(roi_pool_forward_cpu));
  m.impl("_roi_pool_backward", TORCH_FN(roi_pool_backward_cpu));
}

}  // namespace detframe::ops
