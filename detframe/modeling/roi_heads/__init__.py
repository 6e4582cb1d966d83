"""ROI heads: pooled proposal features -> detections, masks and their losses.

`build_roi_heads(cfg, input_shape)` builds MODEL.ROI_HEADS.NAME from ROI_HEADS_REGISTRY;
`StandardROIHeads` composes a box head (ROI_BOX_HEAD_REGISTRY, e.g. `FastRCNNConvFCHead`),
`FastRCNNOutputLayers` and an optional mask head (ROI_MASK_HEAD_REGISTRY, e.g.
`MaskRCNNConvUpsampleHead`).
"""

from .box_head import FastRCNNConvFCHead
from .fast_rcnn import FastRCNNOutputLayers
from .mask_head import MaskRCNNConvUpsampleHead, mask_rcnn_inference, mask_rcnn_loss, mask_targets
from .roi_heads import StandardROIHeads, build_roi_heads

__all__ = [
    "FastRCNNConvFCHead",
    "FastRCNNOutputLayers",
    "MaskRCNNConvUpsampleHead",
    "StandardROIHeads",
    "build_roi_heads",
    "mask_rcnn_inference",
    "mask_rcnn_loss",
    "mask_targets",
]
