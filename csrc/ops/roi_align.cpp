// detframe::roi_align, the operator's schema and its dispatcher entry points.
//
//   roi_align(input [N, C, H, W], rois [K, 5], spatial_scale, PH, PW, sampling_ratio,
//             aligned) -> [K, C, PH, PW]
//
// Each output bin averages bilinear samples of the feature map inside the RoI (He et al.,
// Mask R-CNN, 2017). `rois` rows are (batch_index, x1, y1, x2, y2) in image coordinates;
// `spatial_scale` maps them onto the feature map. `sampling_ratio` > 0 samples that many
// points per bin side; <= 0 chooses ceil(bin size) per RoI. `aligned` shifts the box by
// half a pixel so that pixel centres line up (detectron2); False reproduces the original
// formulation (torchvision's detection models). Gradients flow to `input` only.

#include "roi_align.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace detframe::ops {

at::Tensor roi_align(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_height,
    c10::SymInt pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("detframe::roi_align", "")
                       .typed<decltype(roi_align)>();
  return op.call(
      input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
}

namespace detail {

at::Tensor _roi_align_backward(
    const at::Tensor& grad,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_height,
    c10::SymInt pooled_width,
    c10::SymInt batch_size,
    c10::SymInt channels,
    c10::SymInt height,
    c10::SymInt width,
    int64_t sampling_ratio,
    bool aligned) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("detframe::_roi_align_backward", "")
                       .typed<decltype(_roi_align_backward)>();
  return op.call(
      grad,
      rois,
      spatial_scale,
      pooled_height,
      pooled_width,
      batch_size,
      channels,
      height,
      width,
      sampling_ratio,
      aligned);
}

}  // namespace detail

TORCH_LIBRARY_FRAGMENT(detframe, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
      "SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor");
}

}  // namespace detframe::ops
