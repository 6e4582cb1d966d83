// detframe::roi_pool, the operator's schema and its dispatcher entry points.
//
//   roi_pool(input [N, C, H, W], rois [K, 5], spatial_scale, PH, PW)
//       -> (output [K, C, PH, PW], argmax [K, C, PH, PW] int32)
//
// Each output bin is the maximum over a window of whole feature-map cells (Girshick, Fast
// R-CNN, 2015): the box is rounded to cells, split into PH x PW windows, and each window
// clipped to the map. An empty window gives 0. `argmax` holds the flat index h * W + w of
// the winning cell in its H x W plane (-1 when the window is empty) and routes the
// gradient; ties go to the first cell in row-major order. Gradients flow to `input` only.

#include "roi_pool.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace detframe::ops {

std::tuple<at::Tensor, at::Tensor> roi_pool(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_height,
    c10::SymInt pooled_width) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("detframe::roi_pool", "")
                       .typed<decltype(roi_pool)>();
  return op.call(input, rois, spatial_scale, pooled_height, pooled_width);
}

namespace detail {

at::Tensor _roi_pool_backward(
    const at::Tensor& grad,
    const at::Tensor& rois,
    const at::Tensor& argmax,
    double spatial_scale,
    c10::SymInt pooled_height,
    c10::SymInt pooled_width,
    c10::SymInt batch_size,
    c10::SymInt channels,
    c10::SymInt height,
    c10::SymInt width) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("detframe::_roi_pool_backward", "")
                       .typed<decltype(_roi_pool_backward)>();
  return op.call(
      grad,
      rois,
      argmax,
      spatial_scale,
      pooled_height,
      pooled_width,
      batch_size,
      channels,
      height,
      width);
}

}  // namespace detail

TORCH_LIBRARY_FRAGMENT(detframe, m) {
  m.def(
      "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width) -> (Tensor, Tensor)");
  m.def(
      "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
      "SymInt height, SymInt width) -> Tensor");
}

}  // namespace detframe::ops
