// Autograd for detframe::roi_pool: d(output)/d(input) through _roi_pool_backward, and
// double backward: the backward scatters each bin's gradient to its argmax cell, so its
// derivative with respect to that gradient gathers from the same cells (zero for empty
// bins). Box coordinates receive no gradient; argmax is not differentiable.

#include <torch/autograd.h>
#include <torch/library.h>

#include "../roi_pool.h"

namespace detframe::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

class RoIPoolFunction : public torch::autograd::Function<RoIPoolFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& input,
      const Variable& rois,
      double spatial_scale,
      c10::SymInt pooled_h,
      c10::SymInt pooled_w) {
    ctx->saved_data["spatial_scale"] = spatial_scale;
    ctx->saved_data["pooled_h"] = pooled_h;
    ctx->saved_data["pooled_w"] = pooled_w;
    ctx->saved_data["input_shape"] = input.sym_sizes();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, argmax] = roi_pool(input, rois, spatial_scale, pooled_h, pooled_w);
    ctx->save_for_backward({rois, argmax});
    ctx->mark_non_differentiable({argmax});
    return {output, argmax};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_output) {
    const auto saved = ctx->get_saved_variables();
    const auto shape = ctx->saved_data["input_shape"].toList();
    const auto grad_input = detail::_roi_pool_backward(
        grad_output[0],
        saved[0],
        saved[1],
        ctx->saved_data["spatial_scale"].toDouble(),
        ctx->saved_data["pooled_h"].toSymInt(),
        ctx->saved_data["pooled_w"].toSymInt(),
        shape.get(0).toSymInt(),
        shape.get(1).toSymInt(),
        shape.get(2).toSymInt(),
        shape.get(3).toSymInt());
    return {grad_input, Variable(), Variable(), Variable(), Variable()};
  }
};

// out[k, c, bin] = grad_grad[batch(k), c, argmax[k, c, bin]], or 0 where argmax is -1.
at::Tensor gather_at_argmax(
    const at::Tensor& grad_grad,
    const at::Tensor& rois,
    const at::Tensor& argmax) {
  const int64_t channels = grad_grad.size(1);
  const int64_t plane = grad_grad.size(2) * grad_grad.size(3);
  const auto image = rois.select(1, 0).to(at::kLong).view({-1, 1, 1, 1});
  const auto channel = at::arange(channels, argmax.options().dtype(at::kLong)).view({1, -1, 1, 1});
  const auto found = argmax >= 0;
  // Empty bins (and RoIs the forward skipped) read cell 0 and are then masked out.
  const auto flat = at::where(
      found, (image * channels + channel) * plane + argmax.to(at::kLong), at::zeros_like(image));
  return at::where(found, grad_grad.reshape(-1).take(flat), at::zeros({}, grad_grad.options()));
}

class RoIPoolBackwardFunction : public torch::autograd::Function<RoIPoolBackwardFunction> {
 public:
  static Variable forward(
      AutogradContext* ctx,
      const Variable& grad,
      const Variable& rois,
      const Variable& argmax,
      double spatial_scale,
      c10::SymInt pooled_h,
      c10::SymInt pooled_w,
      c10::SymInt batch_size,
      c10::SymInt channels,
      c10::SymInt height,
      c10::SymInt width) {
    ctx->save_for_backward({rois, argmax});
    at::AutoDispatchBelowADInplaceOrView guard;
    return detail::_roi_pool_backward(
        grad, rois, argmax, spatial_scale, pooled_h, pooled_w, batch_size, channels, height,
        width);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_output) {
    const auto saved = ctx->get_saved_variables();
    variable_list grads(10);
    grads[0] = gather_at_argmax(grad_output[0], saved[0], saved[1]);
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor> roi_pool_autograd(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    c10::SymInt pooled_h,
    c10::SymInt pooled_w) {
  auto result = RoIPoolFunction::apply(
      input, rois, spatial_scale, std::move(pooled_h), std::move(pooled_w));
  return {result[0], result[1]};
}

at::Tensor roi_pool_backward_autograd(
    const at::Tensor& grad,
    const at::Tensor& rois,
    const at::Tensor& argmax,
    double spatial_scale,
    c10::SymInt pooled_h,
    c10::SymInt pooled_w,
    c10::SymInt batch_size,
    c10::SymInt channels,
    c10::SymInt height,
    c10::SymInt width) {
  return RoIPoolBackwardFunction::apply(
      grad, rois, argmax, spatial_scale, std::move(pooled_h), std::move(pooled_w),
      std::move(batch_size), std::move(channels), std::move(height), std::move(width));
}

}  // namespace

TORCH_LIBRARY_IMPL(detframe, Autograd, m) {
  m.impl("roi_pool", TORCH_FN(roi_pool_autograd));
  m.impl("_roi_pool_backward", TORCH_FN(roi_pool_backward_autograd));
}

}  // namespace detframe::ops
