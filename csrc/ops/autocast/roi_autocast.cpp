// Autocast for detframe's RoI operators: under torch.autocast (CUDA or CPU) they run in
// float32, whatever the reduced precision of the features, and return the input's dtype.
// Box coordinates must not be rounded to half precision: at bfloat16 a coordinate near 800
// would move by up to 2 pixels. float64 inputs are left alone.

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "../roi_align.h"
#include "../roi_pool.h"

namespace detframe::ops {
namespace {

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor roi_align_autocast(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_h,
    c10::SymInt pooled_w,
    int64_t sampling_ratio,
    bool aligned) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  return roi_align(
             at::autocast::cached_cast(at::kFloat, input, device_type),
             at::autocast::cached_cast(at::kFloat, rois, device_type),
             spatial_scale,
             std::move(pooled_h),
             std::move(pooled_w),
             sampling_ratio,
             aligned)
      .to(input.scalar_type());
}

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
std::tuple<at::Tensor, at::Tensor> roi_pool_autocast(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_h,
    c10::SymInt pooled_w) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  auto [output, argmax] = roi_pool(
      at::autocast::cached_cast(at::kFloat, input, device_type),
      at::autocast::cached_cast(at::kFloat, rois, device_type),
      spatial_scale,
      std::move(pooled_h),
      std::move(pooled_w));
  return {output.to(input.scalar_type()), argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(detframe, AutocastCUDA, m) {
  m.impl(
      "roi_align",
      TORCH_FN((roi_align_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
  m.impl(
      "roi_pool",
      TORCH_FN((roi_pool_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
}

TORCH_LIBRARY_IMPL(detframe, AutocastCPU, m) {
  m.impl(
      "roi_align",
      TORCH_FN((roi_align_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
  m.impl(
      "roi_pool",
      TORCH_FN((roi_pool_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
}

}  // namespace detframe::ops
