// CUDA kernels of detframe::roi_align and its backward.
//
//   input      [N, C, H, W]    any memory format; read as a contiguous (NCHW) copy
//   rois       [K, 5]          rows (batch_index, x1, y1, x2, y2), dtype of input
//   output     [K, C, PH, PW]  contiguous, dtype of input
//   grad       [K, C, PH, PW]  any strides
//   grad_input [N, C, H, W]    contiguous, dtype of grad
//
// Forward: one thread per output element (k, c, ph, pw). It averages the bin's bilinear
// samples in the (iy, ix) order of the CPU kernel, accumulating in at::opmath_type.
//
// Backward: one thread per grad element, which scatters g * w / count onto the four taps of
// each sample with atomic adds into the zero-initialised grad_input. The summation order
// therefore varies from run to run: the op reports itself as nondeterministic.
//
// Both run as grid-stride loops with 64-bit indices on the current stream. An invalid RoI
// (batch index not an integer in [0, N), or a non-finite coordinate) gives zeros and no
// gradient and is never used to index memory: raising from device code would need a sync.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/KernelUtils.h>
#include <ATen/native/cuda/KernelUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../roi_geometry.h"
#include "launch.cuh"

namespace detframe::ops {
namespace {

using cuda::BinIndex;
using cuda::bin_index;
using cuda::kThreads;
using cuda::num_blocks;
using cuda::Strides;
using cuda::strides_of;

// Sizes and settings shared by the forward and backward kernels.
template <typename T>
struct AlignParams {
  int64_t batch, channels, height, width;
  int64_t pooled_h, pooled_w, sampling_ratio;
  T spatial_scale;
  bool aligned;
};

// input_size is [N, C, H, W]: the input's size, or grad_input's in the backward.
template <typename T>
AlignParams<T> align_params(
    at::IntArrayRef input_size,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w,
    int64_t sampling_ratio,
    bool aligned) {
  return {
      input_size[0],
      input_size[1],
      input_size[2],
      input_size[3],
      pooled_h,
      pooled_w,
      sampling_ratio,
      static_cast<T>(spatial_scale),
      aligned};
}


// The batch index of RoI k with its geometry in `g`, or -1 when the RoI is invalid.
template <typename scalar_t, typename T>
__device__ inline int64_t align_roi(
    const scalar_t* rois,
    int64_t k,
    const AlignParams<T>& p,
    RoIAlignGeometry<T>& g) {
  const scalar_t* roi = rois + k * 5;
  const int64_t b = roi_batch_index(static_cast<T>(roi[0]), p.batch);
  const bool valid =
      b >= 0 &&
      roi_align_geometry(
          roi, p.spatial_scale, p.pooled_h, p.pooled_w, p.sampling_ratio, p.aligned, g);
  return valid ? b : -1;
}

// Calls fn(taps) for every in-map bilinear sample of bin (ph, pw), in (iy, ix) order. Only
// the runs of samples that can reach the map are visited (sample_run), so the cost is
// bounded whatever the size of the RoI.
template <typename T, typename Fn>
__device__ inline void for_each_sample(
    const RoIAlignGeometry<T>& g,
    int64_t ph,
    int64_t pw,
    int64_t height,
    int64_t width,
    Fn fn) {
  BilinearTaps<T> taps;
  const SampleRun rows = sample_run(g.start_h, ph, g.bin_h, g.grid_h, height);
  const SampleRun cols = sample_run(g.start_w, pw, g.bin_w, g.grid_w, width);
  for (int64_t iy = rows.first; iy < rows.last; ++iy) {
    const T y = sample_coord(g.start_h, ph, g.bin_h, iy, g.grid_h);
    for (int64_t ix = cols.first; ix < cols.last; ++ix) {
      const T x = sample_coord(g.start_w, pw, g.bin_w, ix, g.grid_w);
      if (bilinear_taps(y, x, height, width, taps)) {
        fn(taps);
      }
    }
  }
}

// n = K * C * PH * PW; input contiguous NCHW; output contiguous.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) roi_align_forward_kernel(
    int64_t n,
    const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ rois,
    AlignParams<at::opmath_type<scalar_t>> p,
    scalar_t* __restrict__ output) {
  using T = at::opmath_type<scalar_t>;
  CUDA_KERNEL_LOOP_TYPE(index, n, int64_t) {
    const BinIndex i = bin_index(index, p.channels, p.pooled_h, p.pooled_w);
    RoIAlignGeometry<T> g;
    const int64_t b = align_roi(rois, i.k, p, g);
    T sum = 0;
    if (b >= 0) {
      const scalar_t* plane = input + (b * p.channels + i.c) * p.height * p.width;
      for_each_sample(g, i.ph, i.pw, p.height, p.width, [&](const BilinearTaps<T>& t) {
        sum += t.weight[0] * static_cast<T>(plane[t.offset[0]]) +
            t.weight[1] * static_cast<T>(plane[t.offset[1]]) +
            t.weight[2] * static_cast<T>(plane[t.offset[2]]) +
            t.weight[3] * static_cast<T>(plane[t.offset[3]]);
      });
      sum /= g.count;
    }
    output[index] = static_cast<scalar_t>(sum);
  }
}

// n = K * C * PH * PW; grad read through `grad_strides`; grad_input contiguous NCHW with
// grad_input_numel elements, zero-initialised.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) roi_align_backward_kernel(
    int64_t n,
    const scalar_t* __restrict__ grad,
    Strides grad_strides,
    const scalar_t* __restrict__ rois,
    AlignParams<at::opmath_type<scalar_t>> p,
    scalar_t* __restrict__ grad_input,
    int64_t grad_input_numel) {
  using T = at::opmath_type<scalar_t>;
  CUDA_KERNEL_LOOP_TYPE(index, n, int64_t) {
    const BinIndex i = bin_index(index, p.channels, p.pooled_h, p.pooled_w);
    RoIAlignGeometry<T> g;
    const int64_t b = align_roi(rois, i.k, p, g);
    if (b < 0) {
      continue;
    }
    const T grad_bin = static_cast<T>(grad[i.offset(grad_strides)]);
    const int64_t plane = (b * p.channels + i.c) * p.height * p.width;
    for_each_sample(g, i.ph, i.pw, p.height, p.width, [&](const BilinearTaps<T>& t) {
      for (int j = 0; j < 4; ++j) {
        at::native::fastAtomicAdd(
            grad_input,
            plane + t.offset[j],
            grad_input_numel,
            static_cast<scalar_t>(grad_bin * t.weight[j] / g.count),
            true);
      }
    });
  }
}

at::Tensor roi_align_forward_cuda(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w,
    int64_t sampling_ratio,
    bool aligned) {
  check_pool_args("roi_align", input, rois, spatial_scale, pooled_h, pooled_w);
  TORCH_CHECK_VALUE(input.is_cuda(), "roi_align: expected CUDA tensors, got ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = at::empty({rois.size(0), input.size(1), pooled_h, pooled_w}, input.options());
  if (output.numel() == 0) {
    return output;
  }
  if (input.numel() == 0) {  // no image, or an empty feature map: nothing to sample
    return output.zero_();
  }
  const auto input_c = input.contiguous();
  const auto rois_c = rois.contiguous();
  const int64_t n = output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cuda", [&] {
        const auto p = align_params<at::opmath_type<scalar_t>>(
            input.sizes(), spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
        roi_align_forward_kernel<scalar_t>
            <<<num_blocks(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                n,
                input_c.const_data_ptr<scalar_t>(),
                rois_c.const_data_ptr<scalar_t>(),
                p,
                output.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

at::Tensor roi_align_backward_cuda(
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
  at::globalContext().alertNotDeterministic("detframe::_roi_align_backward (CUDA)");
  check_backward_args(
      "_roi_align_backward", grad, rois, spatial_scale, pooled_h, pooled_w, batch_size, channels,
      height, width);
  TORCH_CHECK_VALUE(
      grad.is_cuda(), "_roi_align_backward: expected CUDA tensors, got ", grad.device());
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width}, grad.options());
  if (grad.numel() == 0 || grad_input.numel() == 0) {
    return grad_input;
  }
  const auto rois_c = rois.contiguous();
  const int64_t n = grad.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
        const auto p = align_params<at::opmath_type<scalar_t>>(
            grad_input.sizes(), spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
        roi_align_backward_kernel<scalar_t>
            <<<num_blocks(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                n,
                grad.const_data_ptr<scalar_t>(),
                strides_of(grad),
                rois_c.const_data_ptr<scalar_t>(),
                p,
                grad_input.mutable_data_ptr<scalar_t>(),
                grad_input.numel());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(detframe, CUDA, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_cuda));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_cuda));
}

}  // namespace detframe::ops
