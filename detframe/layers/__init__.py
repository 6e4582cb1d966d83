"""Layers that know nothing of models: detframe's compiled operators and their references.

`roi_align` / `roi_pool` run detframe's own C++/CUDA kernels (`torch.ops.detframe.*`) and
fall back, with one warning, to the pure-PyTorch reference in `detframe.layers.reference`
when the compiled library is missing; `ops_backend()` says which is active. They script,
FX-trace and raise like `torchvision.ops` (`BoxesShapeError` is also an AssertionError).
`FrozenBatchNorm2d` and `get_norm` are the normalisation layers backbones and heads use.
`smooth_l1_loss` and `giou_loss` are the box regression losses, `sigmoid_focal_loss` the
classification loss of RetinaNet.
"""

from ._compiled import OpsBackend, ops_backend
from ._rois import BoxesShapeError
from .batch_norm import FrozenBatchNorm2d, conv_norm, frozen_bn_affine, get_norm
from .losses import giou_loss, sigmoid_focal_loss, smooth_l1_loss
from .roi_align import RoIAlign, roi_align
from .roi_pool import RoIPool, roi_pool
from .shape_spec import ShapeSpec

__all__ = [
    "BoxesShapeError",
    "FrozenBatchNorm2d",
    "OpsBackend",
    "RoIAlign",
    "RoIPool",
    "ShapeSpec",
    "conv_norm",
    "frozen_bn_affine",
    "get_norm",
    "giou_loss",
    "ops_backend",
    "roi_align",
    "roi_pool",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
]
