// CPU kernels of detframe::roi_align and its backward.
//
//   input  [N, C, H, W]  any memory format; read as channels-last (N, H, W, C) so that the
//                        four taps of a bilinear sample are four contiguous C-vectors
//   rois   [K, 5]
//   output [K, C, PH, PW]
//
// Forward: RoIs are split across threads; each RoI accumulates its PH * PW bins in a
// bin-major [PH * PW, C] buffer (vectorised over C), then writes them out transposed.
//
// Backward: the gradient is scattered into a channels-last buffer. Work is split into tasks
// of (image, channel range), and each task walks that image's RoIs in order, so no two
// threads ever write the same element and the result is bitwise reproducible, independent
// of the thread count. Reduced-precision gradients are accumulated in float32.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../roi_geometry.h"
#include "layout.h"
#include "rois_by_image.h"
#include "vector_loops.h"

namespace detframe::ops {
namespace {

// Calls fn(bin, taps) for every in-map bilinear sample of the RoI, bins in row-major order,
// samples in (iy, ix) order within a bin. Only the runs of samples that can reach the map
// are visited (sample_run), so the cost is bounded whatever the size of the RoI.
template <typename T, typename Fn>
inline void for_each_sample(
    const RoIAlignGeometry<T>& g,
    int64_t pooled_h,
    int64_t pooled_w,
    int64_t height,
    int64_t width,
    Fn&& fn) {
  BilinearTaps<T> taps;
  for (int64_t ph = 0; ph < pooled_h; ++ph) {
    const SampleRun rows = sample_run(g.start_h, ph, g.bin_h, g.grid_h, height);
    for (int64_t pw = 0; pw < pooled_w; ++pw) {
      const int64_t bin = ph * pooled_w + pw;
      const SampleRun cols = sample_run(g.start_w, pw, g.bin_w, g.grid_w, width);
      for (int64_t iy = rows.first; iy < rows.last; ++iy) {
        const T y = sample_coord(g.start_h, ph, g.bin_h, iy, g.grid_h);
        for (int64_t ix = cols.first; ix < cols.last; ++ix) {
          const T x = sample_coord(g.start_w, pw, g.bin_w, ix, g.grid_w);
          if (bilinear_taps(y, x, height, width, taps)) {
            fn(bin, taps);
          }
        }
      }
    }
  }
}

// input [N, C, H, W] gives the sizes; input_nhwc holds its data in channels-last order.
template <typename scalar_t>
void forward_impl(
    const at::Tensor& input,
    const at::Tensor& input_nhwc,
    const at::Tensor& rois,
    at::Tensor& output,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w,
    int64_t sampling_ratio,
    bool aligned) {
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
  const T scale = static_cast<T>(spatial_scale);

  at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(bins * channels);
    for (int64_t k = begin; k < end; ++k) {
      const scalar_t* roi = roi_data + k * 5;
      scalar_t* out_k = out + k * channels * bins;
      RoIAlignGeometry<T> g;
      const int64_t b = roi_batch_index(static_cast<T>(roi[0]), batch);
      if (b < 0 ||
          !roi_align_geometry(roi, scale, pooled_h, pooled_w, sampling_ratio, aligned, g)) {
        std::fill(out_k, out_k + channels * bins, scalar_t(0));
        continue;
      }
      std::fill(acc.begin(), acc.end(), T(0));
      const scalar_t* image = in + b * height * width * channels;
      for_each_sample(g, pooled_h, pooled_w, height, width, [&](int64_t bin, const auto& taps) {
        cpu::accumulate_bilinear(
            acc.data() + bin * channels,
            image + taps.offset[0] * channels,
            image + taps.offset[1] * channels,
            image + taps.offset[2] * channels,
            image + taps.offset[3] * channels,
            taps.weight,
            channels);
      });
      for (int64_t c = 0; c < channels; ++c) {
        for (int64_t bin = 0; bin < bins; ++bin) {
          out_k[c * bins + bin] = static_cast<scalar_t>(acc[bin * channels + c] / g.count);
        }
      }
    }
  });
}

// grad_bmc [K, PH, PW, C] (bin-major); grad_nhwc [N, H, W, C] zero-initialised.
template <typename scalar_t>
void backward_impl(
    const at::Tensor& grad_bmc,
    const at::Tensor& rois,
    at::Tensor& grad_nhwc,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w,
    int64_t sampling_ratio,
    bool aligned) {
  using T = scalar_t;  // float or double: reduced types are accumulated in float upstream
  const int64_t batch = grad_nhwc.size(0);
  const int64_t height = grad_nhwc.size(1);
  const int64_t width = grad_nhwc.size(2);
  const int64_t channels = grad_nhwc.size(3);
  const int64_t bins = pooled_h * pooled_w;
  const T* grad = grad_bmc.const_data_ptr<T>();
  const T* roi_data = rois.const_data_ptr<T>();
  T* out = grad_nhwc.mutable_data_ptr<T>();
  const T scale = static_cast<T>(spatial_scale);

  const RoIsByImage groups(roi_data, rois.size(0), batch);
  const ChannelTasks tasks(batch, channels);
  at::parallel_for(0, tasks.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const auto [b, c0, c1] = tasks.task(t);
      T* image = out + b * height * width * channels;
      for (const int64_t k : groups.rois_of(b)) {
        RoIAlignGeometry<T> g;
        if (!roi_align_geometry(
                roi_data + k * 5, scale, pooled_h, pooled_w, sampling_ratio, aligned, g)) {
          continue;
        }
        const T* grad_k = grad + k * bins * channels;
        for_each_sample(g, pooled_h, pooled_w, height, width, [&](int64_t bin, const auto& taps) {
          const T* gk = grad_k + bin * channels;
          for (int j = 0; j < 4; ++j) {  // taps may coincide at the border: one at a time
            cpu::axpy(image + taps.offset[j] * channels + c0, gk + c0, taps.weight[j] / g.count,
                      c1 - c0);
          }
        });
      }
    }
  });
}

at::Tensor roi_align_forward_cpu(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w,
    int64_t sampling_ratio,
    bool aligned) {
  check_pool_args("roi_align", input, rois, spatial_scale, pooled_h, pooled_w);
  TORCH_CHECK_VALUE(input.is_cpu(), "roi_align: expected CPU tensors, got ", input.device());
  const auto rois_c = rois.contiguous();
  at::Tensor output =
      at::empty({rois.size(0), input.size(1), pooled_h, pooled_w}, input.options());
  if (output.numel() == 0) {
    return output.zero_();
  }
  const bool empty_map = input.size(2) == 0 || input.size(3) == 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cpu", [&] {
        check_batch_indices_cpu(
            "roi_align", rois_c.const_data_ptr<scalar_t>(), rois.size(0), input.size(0));
        if (empty_map) {
          output.zero_();
          return;
        }
        // The input's data in channels-last order (free when it already is channels-last).
        const auto input_nhwc = input.contiguous(at::MemoryFormat::ChannelsLast);
        forward_impl<scalar_t>(
            input, input_nhwc, rois_c, output, spatial_scale, pooled_h, pooled_w,
            sampling_ratio, aligned);
      });
  return output;
}

at::Tensor roi_align_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w,
    int64_t batch_size,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t sampling_ratio,
    bool aligned) {
  check_backward_args(
      "_roi_align_backward", grad, rois, spatial_scale, pooled_h, pooled_w, batch_size,
      channels, height, width);
  TORCH_CHECK_VALUE(
      grad.is_cpu(), "_roi_align_backward: expected CPU tensors, got ", grad.device());
  // Accumulate in float for half and bfloat16, in the tensor's own type otherwise.
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  const auto rois_c = rois.to(acc_type).contiguous();
  at::Tensor grad_input = at::empty({batch_size, channels, height, width}, grad.options());
  if (grad.numel() == 0 || grad_input.numel() == 0) {
    return grad_input.zero_();
  }
  at::Tensor grad_nhwc =
      at::zeros({batch_size, height, width, channels}, grad.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES(acc_type, "roi_align_backward_cpu", [&] {
    check_batch_indices_cpu(
        "_roi_align_backward", rois_c.const_data_ptr<scalar_t>(), rois.size(0), batch_size);
    // [K, C, PH, PW] -> bin-major [K, PH, PW, C], so each bin's gradient is one C-vector.
    const auto grad_bmc = grad.to(acc_type).permute({0, 2, 3, 1}).contiguous();
    backward_impl<scalar_t>(
        grad_bmc, rois_c, grad_nhwc, spatial_scale, pooled_h, pooled_w, sampling_ratio,
        aligned);
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_nchw", [&] {
          cpu::transpose_batched(
              grad_nhwc.const_data_ptr<acc_t>(), grad_input.mutable_data_ptr<scalar_t>(),
              batch_size, height * width, channels);
        });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(detframe, CPU, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_cpu));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_cpu));
}

}  // namespace detframe::ops
