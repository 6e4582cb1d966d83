#pragma once
// C++ entry points of detframe::roi_pool, calling through the dispatcher (so autograd,
// autocast and the backend kernels all apply). Shapes and semantics: roi_pool.cpp.

#include <ATen/ATen.h>

#include <tuple>

namespace detframe::ops {

std::tuple<at::Tensor, at::Tensor> roi_pool(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_height,
    c10::SymInt pooled_width);

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
    c10::SymInt width);

}  // namespace detail
}  // namespace detframe::ops
