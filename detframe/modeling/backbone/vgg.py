"""VGG (Simonyan and Zisserman 2015) as a detection backbone: the conv stack of torchvision's
`vgg11` / `vgg13` / `vgg16` / `vgg19` (and their `_bn` variants), without pool5.

Shapes: x [N, 3, H, W] (N images). The network is five blocks of 3x3 convs (padding 1, each
with an optional norm and a ReLU); a 2x2 max pool (stride 2, floor) precedes blocks 2 to 5.
The output of block b is its last conv's, after the ReLU, named as in the paper:

    block  convs (11 / 13 / 16 / 19)   output (VGG16)   shape
    1      1 / 2 / 2 / 2               conv1_2          [N, 64 w,  H,      W]
    2      1 / 2 / 2 / 2               conv2_2          [N, 128 w, H / 2,  W / 2]
    3      2 / 2 / 3 / 4               conv3_3          [N, 256 w, H / 4,  W / 4]
    4      2 / 2 / 3 / 4               conv4_3          [N, 512 w, H / 8,  W / 8]
    5      2 / 2 / 3 / 4               conv5_3          [N, 512 w, H / 16, W / 16]

(sizes rounded down at each pool; w is the width multiplier, channels rounded to the nearest
integer, at least 1). VGG11 is the paper's configuration A (the DeepMask trunk): its outputs
are conv1_1, conv2_1, conv3_2, conv4_2, conv5_2. There is no pool5: the last block ends at
its last conv and ReLU, and blocks after the last requested output are not built.

Module names follow the paper (conv1_1 ... conv5_3, and bn1_1 ... for the norms), which a
reader of Fast R-CNN's prototxt recognises. `imagenet_key_map` maps them onto the indices of
torchvision's `features` Sequential (conv at i, then [norm at i + 1,] ReLU; a pool after each
block), so torchvision's ImageNet state dicts load through `detframe.modeling.load_weights`;
the classifier (classifier.*) is left to the box head that takes fc6 / fc7
(`detframe.modeling.roi_heads.VGGFCHead`).

Batch norm (the `_bn` variants, eps 1e-5 as torchvision): NORM "FrozenBN" is what detection
with ImageNet weights uses, as detectron2 does for ResNet: with 1 or 2 images per GPU, batch
statistics are noise, so the ImageNet statistics and affine parameters stay fixed (and fold
into the convs). "BN" / "SyncBN" train them (a from-scratch model on larger batches); blocks
frozen by FREEZE_AT get FrozenBN whatever NORM says.

Speed: a convolution followed by a `FrozenBatchNorm2d` runs as one convolution
(`detframe.layers.conv_norm`); the network runs in channels-last memory format by default.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.config import declare
from detframe.layers import ShapeSpec, conv_norm, get_norm
from detframe.registry import BACKBONE_REGISTRY

from .backbone import Backbone, ImageNetKeyMap

__all__ = ["VGG", "vgg_width"]

# Convs per block for each depth (the paper's configurations A, B, D, E).
_CONVS_PER_BLOCK = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
_BLOCK_CHANNELS = (64, 128, 256, 512, 512)
_NORMS = ("", "FrozenBN", "BN", "SyncBN")
_BN_EPS = 1e-5  # torchvision's vgg*_bn (nn.BatchNorm2d's default)


def _block_outputs(depth: int) -> list[str]:
    """The output names of the five blocks of a VGG of `depth`: their last convs."""
    return [f"conv{b}_{n}" for b, n in enumerate(_CONVS_PER_BLOCK[depth], start=1)]


_ALL_OUTPUTS = tuple(sorted({name for d in _CONVS_PER_BLOCK for name in _block_outputs(d)}))

declare(
    "MODEL.VGG.DEPTH",
    int,
    16,
    "VGG depth: 11 (A), 13 (B), 16 (D), 19 (E)",
    choices=tuple(_CONVS_PER_BLOCK),
)
declare(
    "MODEL.VGG.NORM",
    str,
    "",
    "norm after each conv: '' plain VGG, FrozenBN / BN / SyncBN the vgg*_bn variants",
    choices=_NORMS,
)
declare(
    "MODEL.VGG.WIDTH_MULTIPLIER",
    float,
    1.0,
    "factor on every channel count of the VGG and of VGGFCHead's fc6 / fc7 (1.0: full width)",
    min=0,
    min_exclusive=True,
)
declare(
    "MODEL.VGG.OUT_FEATURES",
    list[str],
    ["conv5_3"],
    "block outputs the VGG returns, by their last conv (VGG16: conv3_3, conv4_3, conv5_3)",
    choices=_ALL_OUTPUTS,
)
declare(
    "MODEL.VGG.FREEZE_AT",
    int,
    2,
    "leading blocks frozen (no gradient, FrozenBN): 0 none, 2 conv1 and conv2 (Fast R-CNN)",
    min=0,
    max=5,
)


def vgg_width(channels: int, multiplier: float) -> int:
    """`channels` scaled by `multiplier`, rounded half up, at least 1 (e.g. 64 x 0.25 = 16)."""
    return max(1, math.floor(channels * multiplier + 0.5))


@BACKBONE_REGISTRY.register()
class VGG(Backbone):
    """VGG-11/13/16/19 conv blocks returning the block outputs named in `out_features`.

    Args:
        depth: 11, 13, 16 or 19.
        norm: "" (torchvision's `vgg{depth}`), or "FrozenBN", "BN", "SyncBN" after every
            conv (`vgg{depth}_bn`; see the module docstring).
        width_multiplier: factor on every channel count (> 0; 1.0 is torchvision's).
        out_features: names of block outputs (the last conv of a block, e.g. "conv5_3"
            for VGG16, "conv5_2" for VGG11); blocks after the last are not built.
        freeze_at: leading blocks whose parameters do not require grad (and whose batch
            norms are FrozenBatchNorm2d): 0 none, 2 conv1_* and conv2_*, ... 5 all.
        memory_format: memory format the network runs in (torch.channels_last is faster
            with oneDNN on CPU; outputs are then channels-last too).

    Initialisation as torchvision's VGG: convs He normal (fan out), biases 0, norms weight
    1 and bias 0.
    """

    def __init__(
        self,
        *,
        depth: int = 16,
        norm: str = "",
        width_multiplier: float = 1.0,
        out_features: list[str] | tuple[str, ...] = ("conv5_3",),
        freeze_at: int = 0,
        memory_format: torch.memory_format = torch.channels_last,
    ) -> None:
        super().__init__()
        if depth not in _CONVS_PER_BLOCK:
            raise ValueError(f"depth must be one of {sorted(_CONVS_PER_BLOCK)}, got {depth}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if not width_multiplier > 0:
            raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}")
        outputs = _block_outputs(depth)
        unknown = [f for f in out_features if f not in outputs]
        if unknown or not out_features:
            raise ValueError(
                f"out_features must be a non-empty list of VGG{depth}'s block outputs "
                f"{', '.join(outputs)}; got {list(out_features)}"
            )
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        if memory_format not in (torch.contiguous_format, torch.channels_last):
            raise ValueError(
                f"memory_format must be torch.contiguous_format or torch.channels_last, got "
                f"{memory_format}"
            )
        self.memory_format = memory_format
        self._out_features = [f for f in outputs if f in out_features]
        num_blocks = max(outputs.index(f) for f in out_features) + 1

        # Per built block: its (conv, norm or None) module names. Per built conv or norm: the
        # index of its module in torchvision's `features` (convs, norms, ReLUs and pools in
        # order), which is what the ImageNet state dicts are keyed by.
        self._blocks: list[list[tuple[str, str | None]]] = []
        self._torchvision_index: dict[str, int] = {}
        self._shapes: dict[str, ShapeSpec] = {}
        index, in_channels = 0, 3
        for b in range(num_blocks):
            if b > 0:
                index += 1  # the pool ending the previous block
            block_norm = "FrozenBN" if b < freeze_at and norm in ("BN", "SyncBN") else norm
            channels = vgg_width(_BLOCK_CHANNELS[b], width_multiplier)
            layers = []
            for c in range(1, _CONVS_PER_BLOCK[depth][b] + 1):
                conv_name, norm_name = f"conv{b + 1}_{c}", f"bn{b + 1}_{c}"
                self.add_module(conv_name, nn.Conv2d(in_channels, channels, 3, padding=1))
                self._torchvision_index[conv_name] = index
                norm_layer = get_norm(block_norm, channels, _BN_EPS)
                if norm_layer is None:
                    layers.append((conv_name, None))
                    index += 2  # conv, ReLU
                else:
                    self.add_module(norm_name, norm_layer)
                    self._torchvision_index[norm_name] = index + 1
                    layers.append((conv_name, norm_name))
                    index += 3  # conv, norm, ReLU
                in_channels = channels
            self._blocks.append(layers)
            self._shapes[outputs[b]] = ShapeSpec(channels, 2**b)
        # torchvision's modules from the pool ending the last built block on: not built.
        per_conv = 2 if norm == "" else 3
        self._unbuilt_torchvision_indices = range(
            index, sum(_CONVS_PER_BLOCK[depth]) * per_conv + len(_BLOCK_CHANNELS)
        )

        self._init_weights()
        self._freeze(freeze_at)
        self.to(memory_format=memory_format)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        v = cfg.MODEL.VGG
        return {
            "depth": v.DEPTH,
            "norm": v.NORM,
            "width_multiplier": v.WIDTH_MULTIPLIER,
            "out_features": list(v.OUT_FEATURES),
            "freeze_at": v.FREEZE_AT,
        }

    def _init_weights(self) -> None:
        """torchvision's initialisation: He normal (fan out) convs, biases 0; norms 1, 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _freeze(self, freeze_at: int) -> None:
        for layers in self._blocks[:freeze_at]:
            for conv_name, _ in layers:
                # A frozen block's norm is a FrozenBatchNorm2d, whose tensors are buffers.
                for p in getattr(self, conv_name).parameters():
                    p.requires_grad_(False)

    def imagenet_key_map(self) -> ImageNetKeyMap:
        """torchvision's ImageNet `vgg{depth}[_bn]`: each conv and norm tensor from
        `features.{index}.*` (`num_batches_tracked` aside); the classifier and the blocks
        this VGG did not build are left out. Another depth, or norm, is an error of
        `load_weights` naming the keys; another width, one naming the shapes."""
        keys = {}
        for name, index in self._torchvision_index.items():
            for tensor in getattr(self, name).state_dict():
                if tensor != "num_batches_tracked":
                    keys[f"{name}.{tensor}"] = f"features.{index}.{tensor}"
        # Prefixes end with "." so that features.3. does not cover features.30.
        unbuilt = tuple(f"features.{i}." for i in self._unbuilt_torchvision_indices)
        return ImageNetKeyMap(keys, ignored=("classifier.", *unbuilt))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x [N, 3, H, W] -> {name: [N, C, H // stride, W // stride]} for `out_features`."""
        x = x.contiguous(memory_format=self.memory_format)
        outputs = {}
        for b, layers in enumerate(self._blocks):
            if b > 0:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            for conv_name, norm_name in layers:
                norm = None if norm_name is None else getattr(self, norm_name)
                x = conv_norm(x, getattr(self, conv_name), norm, relu=True)
            name = layers[-1][0]
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {name: self._shapes[name] for name in self._out_features}
