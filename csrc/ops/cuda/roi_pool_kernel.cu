// CUDA kernels of detframe::roi_pool and its backward.
//
//   input      [N, C, H, W]    any memory format; read as a contiguous (NCHW) copy
//   rois       [K, 5]          rows (batch_index, x1, y1, x2, y2), dtype of input
//   output     [K, C, PH, PW]  contiguous, dtype of input
//   argmax     [K, C, PH, PW]  contiguous int32: flat index h * W + w of the maximum in its
//                              H x W plane, -1 for an empty window or an invalid RoI
//   grad       [K, C, PH, PW]  any strides; argmax of the same shape, any strides
//   grad_input [N, C, H, W]    contiguous, dtype of grad
//
// Forward: one thread per output element (k, c, ph, pw). It scans the bin's window in
// row-major order, keeping the first maximum (strict '>', as in torchvision), compared in
// at::opmath_type.
//
// Backward: one thread per grad element, which adds it to grad_input[b, c, argmax] with an
// atomic add (several bins can share a maximum): the op reports itself as nondeterministic.
// argmax values outside [0, H * W) and RoIs with an invalid batch index are skipped, so
// that garbage passed to the private op cannot write out of bounds.
//
// Both run as grid-stride loops with 64-bit indices on the current stream. An invalid RoI
// (batch index not an integer in [0, N), or a non-finite coordinate) gives zeros and argmax
// -1 and is never used to index memory: raising from device code would need a sync.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/KernelUtils.h>
#include <ATen/native/cuda/KernelUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <limits>
#include <tuple>
#include <vector>

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
struct PoolParams {
  int64_t batch, channels, height, width;
  int64_t pooled_h, pooled_w;
  T spatial_scale;
};

// input_size is [N, C, H, W]: the input's size, or grad_input's in the backward.
template <typename T>
PoolParams<T> pool_params(
    at::IntArrayRef input_size,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w) {
  return {
      input_size[0],
      input_size[1],
      input_size[2],
      input_size[3],
      pooled_h,
      pooled_w,
      static_cast<T>(spatial_scale)};
}


// n = K * C * PH * PW; input contiguous NCHW; output and argmax contiguous.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) roi_pool_forward_kernel(
    int64_t n,
    const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ rois,
    PoolParams<at::opmath_type<scalar_t>> p,
    scalar_t* __restrict__ output,
    int32_t* __restrict__ argmax) {
  using T = at::opmath_type<scalar_t>;
  CUDA_KERNEL_LOOP_TYPE(index, n, int64_t) {
    const BinIndex i = bin_index(index, p.channels, p.pooled_h, p.pooled_w);
    const scalar_t* roi = rois + i.k * 5;
    const int64_t b = roi_batch_index(static_cast<T>(roi[0]), p.batch);
    RoIPoolGeometry<T> g;
    T best = 0;
    int32_t best_at = -1;
    if (b >= 0 && roi_pool_geometry(roi, p.spatial_scale, p.pooled_h, p.pooled_w, g)) {
      const Window win = roi_pool_window(g, i.ph, i.pw, p.height, p.width);
      best = win.empty() ? T(0) : static_cast<T>(-FLT_MAX);
      const scalar_t* plane = input + (b * p.channels + i.c) * p.height * p.width;
      for (int64_t h = win.h0; h < win.h1; ++h) {
        for (int64_t w = win.w0; w < win.w1; ++w) {
          const int64_t cell = h * p.width + w;
          const T v = static_cast<T>(plane[cell]);
          if (v > best) {
            best = v;
            best_at = static_cast<int32_t>(cell);
          }
        }
      }
    }
    output[index] = static_cast<scalar_t>(best);
    argmax[index] = best_at;
  }
}

// n = K * C * PH * PW; grad and argmax read through their strides; grad_input contiguous
// NCHW with grad_input_numel elements, zero-initialised.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) roi_pool_backward_kernel(
    int64_t n,
    const scalar_t* __restrict__ grad,
    Strides grad_strides,
    const int32_t* __restrict__ argmax,
    Strides argmax_strides,
    const scalar_t* __restrict__ rois,
    PoolParams<at::opmath_type<scalar_t>> p,
    scalar_t* __restrict__ grad_input,
    int64_t grad_input_numel) {
  using T = at::opmath_type<scalar_t>;
  CUDA_KERNEL_LOOP_TYPE(index, n, int64_t) {
    const BinIndex i = bin_index(index, p.channels, p.pooled_h, p.pooled_w);
    const int64_t b = roi_batch_index(static_cast<T>(rois[i.k * 5]), p.batch);
    const int64_t cell = argmax[i.offset(argmax_strides)];
    const int64_t plane_size = p.height * p.width;
    if (b < 0 || cell < 0 || cell >= plane_size) {
      continue;
    }
    at::native::fastAtomicAdd(
        grad_input,
        (b * p.channels + i.c) * plane_size + cell,
        grad_input_numel,
        grad[i.offset(grad_strides)],
        true);
  }
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cuda(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w) {
  check_pool_args("roi_pool", input, rois, spatial_scale, pooled_h, pooled_w);
  TORCH_CHECK_VALUE(input.is_cuda(), "roi_pool: expected CUDA tensors, got ", input.device());
  TORCH_CHECK_VALUE(
      input.size(2) * input.size(3) <= std::numeric_limits<int32_t>::max(),
      "roi_pool: the H x W plane must have fewer than 2^31 cells, got ",
      input.sizes());
  const c10::cuda::CUDAGuard guard(input.device());
  const std::vector<int64_t> size = {rois.size(0), input.size(1), pooled_h, pooled_w};
  at::Tensor output = at::empty(size, input.options());
  at::Tensor argmax = at::empty(size, input.options().dtype(at::kInt));
  if (output.numel() == 0) {
    return {output, argmax};
  }
  if (input.numel() == 0) {  // no image, or an empty feature map: every window is empty
    output.zero_();
    argmax.fill_(-1);
    return {output, argmax};
  }
  const auto input_c = input.contiguous();
  const auto rois_c = rois.contiguous();
  const int64_t n = output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cuda", [&] {
        const auto p = pool_params<at::opmath_type<scalar_t>>(
            input.sizes(), spatial_scale, pooled_h, pooled_w);
        roi_pool_forward_kernel<scalar_t>
            <<<num_blocks(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                n,
                input_c.const_data_ptr<scalar_t>(),
                rois_c.const_data_ptr<scalar_t>(),
                p,
                output.mutable_data_ptr<scalar_t>(),
                argmax.mutable_data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {output, argmax};
}

at::Tensor roi_pool_backward_cuda(
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
  at::globalContext().alertNotDeterministic("detframe::_roi_pool_backward (CUDA)");
  check_backward_args(
      "_roi_pool_backward", grad, rois, spatial_scale, pooled_h, pooled_w, batch_size, channels,
      height, width);
  TORCH_CHECK_VALUE(
      grad.is_cuda(), "_roi_pool_backward: expected CUDA tensors, got ", grad.device());
  TORCH_CHECK_VALUE(
      argmax.device() == grad.device(),
      "_roi_pool_backward: argmax and grad must be on the same device, got ",
      argmax.device(),
      " and ",
      grad.device());
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
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width}, grad.options());
  if (grad.numel() == 0 || grad_input.numel() == 0) {
    return grad_input;
  }
  const auto rois_c = rois.contiguous();
  const int64_t n = grad.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cuda", [&] {
        const auto p = pool_params<at::opmath_type<scalar_t>>(
            grad_input.sizes(), spatial_scale, pooled_h, pooled_w);
        roi_pool_backward_kernel<scalar_t>
            <<<num_blocks(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                n,
                grad.const_data_ptr<scalar_t>(),
                strides_of(grad),
                argmax.const_data_ptr<int32_t>(),
                strides_of(argmax),
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
  m.impl("roi_pool", TORCH_FN(roi_pool_forward_cuda));
  m.impl("_roi_pool_backward", TORCH_FN(roi_pool_backward_cuda));
}

}  // namespace detframe::ops
