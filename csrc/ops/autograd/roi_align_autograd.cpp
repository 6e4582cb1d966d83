// Autograd for detframe::roi_align: d(output)/d(input) through _roi_align_backward, and
// double backward, which is exact and cheap because RoIAlign is linear in its input: the
// backward's own derivative with respect to the incoming gradient is RoIAlign itself.
// Box coordinates receive no gradient.

#include <torch/autograd.h>
#include <torch/library.h>

#include "../roi_align.h"

namespace detframe::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

// Saves what both directions need: the RoIs and the operator's settings.
void save_settings(
    AutogradContext* ctx,
    const at::Tensor& rois,
    double spatial_scale,
    const c10::SymInt& pooled_h,
    const c10::SymInt& pooled_w,
    int64_t sampling_ratio,
    bool aligned) {
  ctx->saved_data["spatial_scale"] = spatial_scale;
  ctx->saved_data["pooled_h"] = pooled_h;
  ctx->saved_data["pooled_w"] = pooled_w;
  ctx->saved_data["sampling_ratio"] = sampling_ratio;
  ctx->saved_data["aligned"] = aligned;
  ctx->save_for_backward({rois});
}

class RoIAlignFunction : public torch::autograd::Function<RoIAlignFunction> {
 public:
  static Variable forward(
      AutogradContext* ctx,
      const Variable& input,
      const Variable& rois,
      double spatial_scale,
      c10::SymInt pooled_h,
      c10::SymInt pooled_w,
      int64_t sampling_ratio,
      bool aligned) {
    save_settings(ctx, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
    ctx->saved_data["input_shape"] = input.sym_sizes();
    at::AutoDispatchBelowADInplaceOrView guard;
    return roi_align(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_output) {
    const auto rois = ctx->get_saved_variables()[0];
    const auto shape = ctx->saved_data["input_shape"].toList();
    const auto grad_input = detail::_roi_align_backward(
        grad_output[0],
        rois,
        ctx->saved_data["spatial_scale"].toDouble(),
        ctx->saved_data["pooled_h"].toSymInt(),
        ctx->saved_data["pooled_w"].toSymInt(),
        shape.get(0).toSymInt(),
        shape.get(1).toSymInt(),
        shape.get(2).toSymInt(),
        shape.get(3).toSymInt(),
        ctx->saved_data["sampling_ratio"].toInt(),
        ctx->saved_data["aligned"].toBool());
    return {grad_input, Variable(), Variable(), Variable(), Variable(), Variable(), Variable()};
  }
};

class RoIAlignBackwardFunction : public torch::autograd::Function<RoIAlignBackwardFunction> {
 public:
  static Variable forward(
      AutogradContext* ctx,
      const Variable& grad,
      const Variable& rois,
      double spatial_scale,
      c10::SymInt pooled_h,
      c10::SymInt pooled_w,
      c10::SymInt batch_size,
      c10::SymInt channels,
      c10::SymInt height,
      c10::SymInt width,
      int64_t sampling_ratio,
      bool aligned) {
    save_settings(ctx, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
    at::AutoDispatchBelowADInplaceOrView guard;
    return detail::_roi_align_backward(
        grad, rois, spatial_scale, pooled_h, pooled_w, batch_size, channels, height, width,
        sampling_ratio, aligned);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_output) {
    const auto rois = ctx->get_saved_variables()[0];
    const auto grad_grad = roi_align(
        grad_output[0],
        rois,
        ctx->saved_data["spatial_scale"].toDouble(),
        ctx->saved_data["pooled_h"].toSymInt(),
        ctx->saved_data["pooled_w"].toSymInt(),
        ctx->saved_data["sampling_ratio"].toInt(),
        ctx->saved_data["aligned"].toBool());
    variable_list grads(11);
    grads[0] = grad_grad;
    return grads;
  }
};

at::Tensor roi_align_autograd(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_h,
    c10::SymInt pooled_w,
    int64_t sampling_ratio,
    bool aligned) {
  return RoIAlignFunction::apply(
      input, rois, spatial_scale, std::move(pooled_h), std::move(pooled_w), sampling_ratio,
      aligned);
}

at::Tensor roi_align_backward_autograd(
    const at::Tensor& grad,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_h,
    c10::SymInt pooled_w,
    c10::SymInt batch_size,
    c10::SymInt channels,
    c10::SymInt height,
    c10::SymInt width,
    int64_t sampling_ratio,
    bool aligned) {
  return RoIAlignBackwardFunction::apply(
      grad, rois, spatial_scale, std::move(pooled_h), std::move(pooled_w),
      std::move(batch_size), std::move(channels), std::move(height), std::move(width),
      sampling_ratio, aligned);
}

}  // namespace

TORCH_LIBRARY_IMPL(detframe, Autograd, m) {
  m.impl("roi_align", TORCH_FN(roi_align_autograd));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_autograd));
}

}  // namespace detframe::ops
