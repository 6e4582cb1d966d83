"""ROI heads: pooled proposal features -> detections, masks and their losses.

`build_roi_heads(cfg, input_shape)` builds MODEL.ROI_HEADS.NAME from ROI_HEADS_REGISTRY;
`ROIHeads` is the base (matching, sampling, the forward protocol); `StandardROIHeads`
composes a pooler (POOLER_REGISTRY), a box head (ROI_BOX_HEAD_REGISTRY, e.g.
`FastRCNNConvFCHead`), a box predictor (BOX_PREDICTOR_REGISTRY, e.g. `FastRCNNOutputLayers`)
and an optional mask branch (ROI_MASK_HEAD_REGISTRY, e.g. `MaskRCNNConvUpsampleHead`).
"""

from .box_head import FastRCNNConvFCHead
from .fast_rcnn import FastRCNNOutputLayers, foreground_mask
from .mask_head import MaskRCNNConvUpsampleHead, mask_rcnn_inference, mask_rcnn_loss, mask_targets
from .res5_heads import Res5ROIHeads, Res5Stage
from .roi_heads import (
    ROIHeads,
    StandardROIHeads,
    build_roi_heads,
    build_roi_pooler,
    select_foreground_proposals,
)
from .vgg_head import VGGFCHead

__all__ = [
    "FastRCNNConvFCHead",
    "FastRCNNOutputLayers",
    "MaskRCNNConvUpsampleHead",
    "ROIHeads",
    "Res5ROIHeads",
    "Res5Stage",
    "StandardROIHeads",
    "VGGFCHead",
    "build_roi_heads",
    "build_roi_pooler",
    "foreground_mask",
    "mask_rcnn_inference",
    "mask_rcnn_loss",
    "mask_targets",
    "select_foreground_proposals",
]
