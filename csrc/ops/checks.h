#pragma once
// Argument checks shared by the kernels of every backend. The Python face
// (detframe.layers) reports the same problems with friendlier messages; these checks make
// direct torch.ops.detframe calls reject what the Python face rejects (ValueError for
// shapes, sizes and the spatial scale, TypeError for dtypes) and keep them memory-safe.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>

#include "roi_geometry.h"

namespace detframe::ops {

// A finite, positive spatial_scale. (Zero, negative or NaN scales would put every box at
// the origin or nowhere and silently give zeros.)
inline void check_spatial_scale(const char* op, double spatial_scale) {
  TORCH_CHECK_VALUE(
      std::isfinite(spatial_scale) && spatial_scale > 0,
      op,
      ": spatial_scale must be a finite positive number, got ",
      spatial_scale);
}

// input [N, C, H, W] floating point and rois [K, 5] on one device with one dtype; a valid
// spatial scale and a positive output size.
inline void check_pool_args(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w) {
  TORCH_CHECK_VALUE(
      input.dim() == 4, op, ": input must have shape [N, C, H, W], got ", input.sizes());
  TORCH_CHECK_TYPE(
      at::isFloatingType(input.scalar_type()),
      op,
      ": input must be a floating-point tensor, got ",
      input.scalar_type());
  check_spatial_scale(op, spatial_scale);
  TORCH_CHECK_VALUE(
      rois.dim() == 2 && rois.size(1) == 5,
      op,
      ": rois must have shape [K, 5], got ",
      rois.sizes());
  TORCH_CHECK_VALUE(
      pooled_h > 0 && pooled_w > 0,
      op,
      ": output size must be positive, got (",
      pooled_h,
      ", ",
      pooled_w,
      ")");
  TORCH_CHECK_VALUE(
      input.device() == rois.device(),
      op,
      ": input and rois must be on the same device, got ",
      input.device(),
      " and ",
      rois.device());
  TORCH_CHECK_TYPE(
      input.scalar_type() == rois.scalar_type(),
      op,
      ": input and rois must have the same dtype, got ",
      input.scalar_type(),
      " and ",
      rois.scalar_type());
}

// grad [K, C, PH, PW] floating point, matching rois [K, 5] and the recorded input size; a
// valid spatial scale.
inline void check_backward_args(
    const char* op,
    const at::Tensor& grad,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_h,
    int64_t pooled_w,
    int64_t batch_size,
    int64_t channels,
    int64_t height,
    int64_t width) {
  TORCH_CHECK_VALUE(
      rois.dim() == 2 && rois.size(1) == 5,
      op,
      ": rois must have shape [K, 5], got ",
      rois.sizes());
  TORCH_CHECK_TYPE(
      at::isFloatingType(grad.scalar_type()),
      op,
      ": grad must be a floating-point tensor, got ",
      grad.scalar_type());
  check_spatial_scale(op, spatial_scale);
  TORCH_CHECK_VALUE(
      batch_size >= 0 && channels >= 0 && height >= 0 && width >= 0,
      op,
      ": input size must be non-negative, got [",
      batch_size,
      ", ",
      channels,
      ", ",
      height,
      ", ",
      width,
      "]");
  TORCH_CHECK_VALUE(
      grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
          grad.size(2) == pooled_h && grad.size(3) == pooled_w,
      op,
      ": grad must have shape [",
      rois.size(0),
      ", ",
      channels,
      ", ",
      pooled_h,
      ", ",
      pooled_w,
      "], got ",
      grad.sizes());
  TORCH_CHECK_VALUE(
      grad.device() == rois.device(),
      op,
      ": grad and rois must be on the same device, got ",
      grad.device(),
      " and ",
      rois.device());
  TORCH_CHECK_TYPE(
      grad.scalar_type() == rois.scalar_type(),
      op,
      ": grad and rois must have the same dtype, got ",
      grad.scalar_type(),
      " and ",
      rois.scalar_type());
}

// CPU only: every RoI's batch index must be an integer in [0, batch_size). (On CUDA this
// would cost a device synchronisation; the kernels there give such RoIs zero output.)
template <typename scalar_t>
void check_batch_indices_cpu(
    const char* op,
    const scalar_t* rois,
    int64_t num_rois,
    int64_t batch_size) {
  using T = at::opmath_type<scalar_t>;
  for (int64_t k = 0; k < num_rois; ++k) {
    const T value = static_cast<T>(rois[k * 5]);
    TORCH_CHECK_INDEX(
        roi_batch_index(value, batch_size) >= 0,
        op,
        ": RoI ",
        k,
        " has batch index ",
        value,
        ", which is not an integer in [0, ",
        batch_size,
        ")");
  }
}

}  // namespace detframe::ops
