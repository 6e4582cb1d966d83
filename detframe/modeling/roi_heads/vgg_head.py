"""VGGFCHead: VGG's fc6 and fc7 as the box head (Fast R-CNN, Faster R-CNN on VGG16).

Shapes: R ROIs (all images together), C channels of the pooled features (512 for VGG16's
conv5_3), S x S pooled resolution (7: RoIPool 7x7, the size of VGG's pool5), D = fc7's width.

    input   [R, C, S, S]   pooled by the ROI heads' box pooler
    fc6     [R, C * S * S] -> [R, D6]   ReLU, dropout (training only)
    fc7     [R, D6] -> [R, D]           ReLU, dropout (training only)
    output  [R, D]

This is torchvision's `vgg*` classifier up to its last hidden layer (classifier[0:6]: Linear,
ReLU, Dropout, Linear, ReLU, Dropout), with the pooled ROI in place of pool5: at full width
(D6 = D = 4096, C * S * S = 512 * 7 * 7 = 25088) `imagenet_key_map` takes fc6 from
classifier.0 and fc7 from classifier.3 of torchvision's ImageNet file, the file whose
`features` initialise the VGG backbone, so `detframe.modeling.load_weights` initialises both
from it. Its widths follow MODEL.VGG.WIDTH_MULTIPLIER (4096 x multiplier): the head is the rest
of the VGG, and a narrow VGG gets a narrow head.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.config import declare
from detframe.layers import ShapeSpec
from detframe.registry import ROI_BOX_HEAD_REGISTRY

from ..backbone.backbone import ImageNetKeyMap
from ..backbone.vgg import vgg_width

__all__ = ["VGGFCHead"]

_FC_DIM = 4096  # fc6 and fc7 of VGG at full width

declare(
    "MODEL.ROI_BOX_HEAD.DROPOUT",
    float,
    0.5,
    "dropout probability after fc6 and fc7 of VGGFCHead, in training (Fast R-CNN: 0.5)",
    min=0,
    max=1,
    max_exclusive=True,
)


@ROI_BOX_HEAD_REGISTRY.register()
class VGGFCHead(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout on flattened pooled ROI features.

    Args:
        in_channels: C, channels of the pooled features.
        pooler_resolution: S, side of the pooled features.
        fc_dim: output size of fc6 and fc7 (4096 for VGG at full width).
        dropout: probability of zeroing a feature after each ReLU, in training mode only.

    Initialisation as torchvision's VGG classifier: weights normal with std 0.01, biases 0.
    """

    def __init__(
        self, *, in_channels: int, pooler_resolution: int, fc_dim: int = _FC_DIM, dropout: float
    ) -> None:
        super().__init__()
        if min(in_channels, pooler_resolution, fc_dim) <= 0:
            raise ValueError(
                f"in_channels, pooler_resolution and fc_dim must be positive, got "
                f"{in_channels}, {pooler_resolution} and {fc_dim}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.fc6 = nn.Linear(in_channels * pooler_resolution**2, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.dropout = dropout
        for fc in (self.fc6, self.fc7):
            nn.init.normal_(fc.weight, 0.0, 0.01)
            nn.init.zeros_(fc.bias)

    @classmethod
    def from_config(cls, cfg: DictConfig, input_shape: ShapeSpec) -> dict[str, Any]:
        """`input_shape`: the feature maps the box pooler reads (their channels are C);
        fc_dim is 4096 x MODEL.VGG.WIDTH_MULTIPLIER."""
        return {
            "in_channels": input_shape.channels,
            "pooler_resolution": cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
            "fc_dim": vgg_width(_FC_DIM, cfg.MODEL.VGG.WIDTH_MULTIPLIER),
            "dropout": cfg.MODEL.ROI_BOX_HEAD.DROPOUT,
        }

    @property
    def output_size(self) -> int:
        """D: features per ROI of the output."""
        return self.fc7.out_features

    def imagenet_key_map(self) -> ImageNetKeyMap:
        """fc6 and fc7 from torchvision's VGG classifier (classifier.0 and classifier.3); its
        1000-class layer (classifier.6) is left out. At another width or pooled size than
        torchvision's, `load_weights` names the keys of another shape."""
        keys = {
            f"{own}.{tensor}": f"classifier.{index}.{tensor}"
            for own, index in (("fc6", 0), ("fc7", 3))
            for tensor in ("weight", "bias")
        }
        return ImageNetKeyMap(keys, ignored=("classifier.6.",))

    def forward(self, x: Tensor) -> Tensor:
        """[R, C, S, S] -> [R, D]."""
        x = F.dropout(F.relu(self.fc6(x.flatten(1))), self.dropout, self.training)
        return F.dropout(F.relu(self.fc7(x)), self.dropout, self.training)
