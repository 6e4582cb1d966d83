"""Normalisation layers: FrozenBatchNorm2d, `get_norm`, which picks one by name, and
`conv_norm`, a convolution followed by a norm that folds a frozen batch norm into the conv.

Shapes: x [N, C, H, W] (N images, C channels); per-channel parameters [C].

A frozen batch norm is the fixed per-channel affine map y = x * scale + shift with
scale = weight / sqrt(running_var + eps) and shift = bias - running_mean * scale. Detection
backbones use it because their batches are too small for batch statistics. torchvision's v1
detection checkpoints were trained with eps = 0.0; detectron2 and torchvision's default is
1e-5. `frozen_bn_affine` returns (scale, shift), so that a convolution followed by a frozen
batch norm can fold the affine map into its weights: `conv_norm` runs conv + FrozenBN as one
convolution whose weight and bias absorb the map (w * scale, b * scale + shift), computed on
every call from the current parameters, so it is exact after loading weights and gradients
still reach w. That saves two passes over each feature map per normalisation (the backbones
that use it: ResNet, FPN, VGG-BN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FrozenBatchNorm2d", "conv_norm", "frozen_bn_affine", "get_norm"]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all buffers.

    State-dict compatible with `torchvision.ops.misc.FrozenBatchNorm2d` and `nn.BatchNorm2d`
    (keys weight, bias, running_mean, running_var; a `num_batches_tracked` entry is ignored).

    Args:
        num_features: C, the number of channels.
        eps: added to running_var before the square root (torchvision's v1 detection
            checkpoints use 0.0).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [N, C, H, W] -> x * scale + shift, [N, C, H, W]."""
        scale, shift = frozen_bn_affine(self)
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def frozen_bn_affine(bn: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """(scale [C], shift [C]) of the map y = x * scale + shift that `bn` computes."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _group_norm(channels: int, eps: float) -> nn.GroupNorm:
    if channels % 32:
        raise ValueError(f"norm 'GN' uses 32 groups; channels={channels} is not divisible by 32")
    return nn.GroupNorm(32, channels, eps=eps)


_NORMS: dict[str, Callable[[int, float], nn.Module]] = {
    "FrozenBN": lambda channels, eps: FrozenBatchNorm2d(channels, eps=eps),
    "BN": lambda channels, eps: nn.BatchNorm2d(channels, eps=eps),
    "SyncBN": lambda channels, eps: nn.SyncBatchNorm(channels, eps=eps),
    "GN": _group_norm,
}


def get_norm(norm: str, channels: int, eps: float = 1e-5) -> nn.Module | None:
    """A normalisation layer for `channels` channels, chosen by name.

    Args:
        norm: "" (none: returns None), "FrozenBN", "BN" (nn.BatchNorm2d), "SyncBN"
            (nn.SyncBatchNorm) or "GN" (nn.GroupNorm with 32 groups).
        channels: C, the number of channels normalised.
        eps: the layer's epsilon.

    Raises:
        ValueError: an unknown `norm`, or GN with `channels` not divisible by 32.
    """
    if norm == "":
        return None
    if norm not in _NORMS:
        raise ValueError(f"norm must be '' or one of {', '.join(_NORMS)}; got {norm!r}")
    return _NORMS[norm](channels, eps)


def conv_norm(x: Tensor, conv: nn.Conv2d, norm: nn.Module | None, relu: bool) -> Tensor:
    """`relu(norm(conv(x)))`, as one convolution when `norm` is a FrozenBatchNorm2d.

    Args:
        x: [N, C_in, H, W].
        conv: a zero-padded convolution; its weight and bias are used through F.conv2d
            (so its forward hooks do not run). Its weight may require grad: the gradient
            flows through the folded weight.
        norm: applied after `conv`, or None. A FrozenBatchNorm2d is folded in: the weight
            becomes w * scale [C_out, 1, 1, 1] and the bias b * scale + shift, recomputed on
            every call.
        relu: apply a ReLU (in place on the fresh output).

    Returns:
        [N, C_out, H', W'].
    """
    weight, bias = conv.weight, conv.bias
    if isinstance(norm, FrozenBatchNorm2d):
        scale, shift = frozen_bn_affine(norm)
        weight = weight * scale.view(-1, 1, 1, 1).to(weight.dtype)
        bias = (shift if bias is None else bias * scale + shift).to(weight.dtype)
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if norm is not None and not isinstance(norm, FrozenBatchNorm2d):
        y = norm(y)
    return F.relu_(y) if relu else y
