"""ResNet-C4 ROI heads: res5 run on every ROI (He et al. 2016, appendix A; detectron2's R50-C4).

Shapes: N images, R ROIs (all images together), R_i of image i, R_fg foreground ROIs, S x S
pooled resolution (MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION, 14), C_4 channels of the pooled
feature map (res4: 1024 for ResNet-50), C_5 channels out of res5 (2048), K foreground classes.

    pooled        [R, C_4, S, S]          RoIAlign of one feature map (res4, stride 16)
    res5          [R, C_5, S/2, S/2]      `Res5Stage`, stride 2 in its first block: 7 x 7
    box features  [R, C_5]                the mean over the S/2 x S/2 cells
    predictions   scores [R, K + 1], deltas [R, K * 4] (the box predictor)
    mask logits   [R_fg, K, S, S]         the mask head on res5 features (a 2x deconv)

A C4 model's backbone stops at res4 (`ResNet` with OUT_FEATURES [res4]); `Res5ROIHeads` pools
every ROI from it and runs res5, the stage the backbone did not build, per ROI. The box
predictor reads the mean of res5's output and the mask head (MaskRCNNConvUpsampleHead with
NUM_CONV 0: deconv C_5 -> 256, then the predictor) reads that output itself: at training the
res5 features of the sampled foreground proposals, computed once for both branches; at
inference those of the detected boxes (a second res5 pass, on the detections only).

Config: the pooler is MODEL.ROI_BOX_HEAD's (POOLER_*; IN_FEATURES, or MODEL.ROI_HEADS.
IN_FEATURES when empty: one feature map); res5 takes the backbone's MODEL.RESNETS keys
(DEPTH, NORM, NORM_EPS, RES2_OUT_CHANNELS, NUM_GROUPS, WIDTH_PER_GROUP, STRIDE_IN_1X1; never
frozen); the box predictor is MODEL.ROI_BOX_HEAD.PREDICTOR_NAME on C_5 features, the mask
head MODEL.ROI_MASK_HEAD.NAME on C_5 channels. res5 is the box head, and the mask branch
shares the box pooler, so MODEL.ROI_BOX_HEAD.NAME and MODEL.ROI_MASK_HEAD's IN_FEATURES and
POOLER_* keys are not read.

ImageNet weights: res5 is torchvision's layer4 of the same depth and widths.
`Res5Stage.imagenet_key_map` takes the "layer4.*" tensors of an ImageNet ResNet file, which
the backbone built to res4 leaves out, so one file (MODEL.WEIGHTS) initialises both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.layers import ShapeSpec
from detframe.registry import BOX_PREDICTOR_REGISTRY, ROI_HEADS_REGISTRY, ROI_MASK_HEAD_REGISTRY
from detframe.registry import build as build_component
from detframe.structures import Boxes, Instances

from ..backbone.backbone import ImageNetKeyMap
from ..backbone.resnet import init_resnet_weights, make_stage
from .fast_rcnn import foreground_mask
from .roi_heads import ROIHeads, build_roi_pooler

__all__ = ["Res5ROIHeads", "Res5Stage"]


class Res5Stage(nn.Sequential):
    """res5 of a ResNet (torchvision's layer4, from `make_stage`) on pooled ROI features.

    [R, in_channels, S, S] -> [R, out_channels, ceil(S / 2), ceil(S / 2)]; out_channels is
    8 x res2_out_channels (2048 for ResNet-50). Blocks are named "0", "1", ... as in
    torchvision's layer4, and initialised as torchvision's ResNet (`init_resnet_weights`).

    Args:
        depth: the ResNet's depth: 3 Bottleneck blocks for 50, 101 and 152; 2 or 3
            BasicBlocks for 18 and 34.
        in_channels: C_4, channels of the pooled features (res4's: 4 x res2_out_channels).
        res2_out_channels, num_groups, width_per_group, stride_in_1x1: the backbone's (see
            `ResNet`); None: 256 for Bottleneck, 64 for BasicBlock.
        norm: the norm after every conv ("FrozenBN", "BN", "SyncBN" or "GN").
        norm_eps: eps of those norms.
        memory_format: the memory format res5 runs in (channels-last is faster with oneDNN
            on the CPU); its output is in it too.
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        in_channels: int = 1024,
        res2_out_channels: int | None = None,
        num_groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = True,
        norm: str = "FrozenBN",
        norm_eps: float = 1e-5,
        memory_format: torch.memory_format = torch.channels_last,
    ) -> None:
        stage = make_stage(
            depth,
            "res5",
            in_channels=in_channels,
            res2_out_channels=res2_out_channels,
            num_groups=num_groups,
            width_per_group=width_per_group,
            stride_in_1x1=stride_in_1x1,
            norm=norm,
            eps=norm_eps,
        )
        super().__init__(*stage)
        self.out_channels: int = stage[-1].out_channels
        self.memory_format = memory_format
        init_resnet_weights(self)
        self.to(memory_format=memory_format)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features [R, C_4, S, S] -> [R, C_5, ceil(S / 2), ceil(S / 2)]."""
        return super().forward(x.contiguous(memory_format=self.memory_format))

    def imagenet_key_map(self) -> ImageNetKeyMap:
        """Every tensor from torchvision's ImageNet ResNet of the same depth and widths, under
        "layer4." (`num_batches_tracked` aside)."""
        keys = [k for k in self.state_dict() if not k.endswith("num_batches_tracked")]
        return ImageNetKeyMap({k: f"layer4.{k}" for k in keys})


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeads(ROIHeads):
    """res5 on every ROI pooled from one feature map, shared by the box and mask branches
    (see the module docstring).

    Args:
        in_features: the one feature map the pooler reads (res4).
        pooler: (feature maps, boxes) -> [R, C_4, S, S].
        res5: [R, C_4, S, S] -> [R, C_5, S', S'] (e.g. `Res5Stage`).
        box_predictor: [R, C_5] features -> scores and deltas; `losses(predictions,
            sampled)` and `inference(predictions, proposals)` (e.g. FastRCNNOutputLayers).
        mask_head: None (no masks), or res5 features -> mask logits, with `losses(logits,
            fg_proposals, gt_masks)` and `inference(logits, detections)` (e.g.
            MaskRCNNConvUpsampleHead with no convs).
        **kwargs: the base's arguments (`ROIHeads`).
    """

    def __init__(
        self,
        *,
        in_features: Sequence[str],
        pooler: nn.Module,
        res5: nn.Module,
        box_predictor: nn.Module,
        mask_head: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if len(in_features) != 1:
            raise ValueError(f"in_features must name one feature map, got {list(in_features)}")
        self.in_features = list(in_features)
        self.pooler = pooler
        self.res5 = res5
        self.box_predictor = box_predictor
        self.mask_head = mask_head

    @classmethod
    def from_config(cls, cfg: DictConfig, input_shape: Mapping[str, ShapeSpec]) -> dict[str, Any]:
        """`input_shape`: the backbone's output shapes by feature name. The mask head with
        MODEL.MASK_ON.

        Raises:
            ValueError: the pooler's features are not exactly one map of the backbone (the
                key is named).
        """
        kwargs = super().from_config(cfg, input_shape)
        box = cfg.MODEL.ROI_BOX_HEAD
        in_features, pooler, pooled_shape = build_roi_pooler(
            box, "MODEL.ROI_BOX_HEAD", cfg, input_shape
        )
        if len(in_features) != 1:
            key = "MODEL.ROI_BOX_HEAD" if box.IN_FEATURES else "MODEL.ROI_HEADS"
            raise ValueError(
                f"{key}.IN_FEATURES: Res5ROIHeads pools one feature map (res4), got {in_features}"
            )
        res5 = cls._build_res5(cfg, pooled_shape.channels)
        kwargs.update(
            in_features=in_features,
            pooler=pooler,
            res5=res5,
            box_predictor=build_component(
                BOX_PREDICTOR_REGISTRY, box.PREDICTOR_NAME, cfg, res5.out_channels
            ),
        )
        if cfg.MODEL.MASK_ON:
            res5_shape = ShapeSpec(channels=res5.out_channels, stride=2 * pooled_shape.stride)
            kwargs["mask_head"] = build_component(
                ROI_MASK_HEAD_REGISTRY, cfg.MODEL.ROI_MASK_HEAD.NAME, cfg, res5_shape
            )
        return kwargs

    @classmethod
    def _build_res5(cls, cfg: DictConfig, in_channels: int) -> Res5Stage:
        """res5 with the backbone's MODEL.RESNETS settings, on `in_channels` pooled channels."""
        r = cfg.MODEL.RESNETS
        return Res5Stage(
            depth=r.DEPTH,
            in_channels=in_channels,
            res2_out_channels=r.RES2_OUT_CHANNELS,
            num_groups=r.NUM_GROUPS,
            width_per_group=r.WIDTH_PER_GROUP,
            stride_in_1x1=r.STRIDE_IN_1X1,
            norm=r.NORM,
            norm_eps=r.NORM_EPS,
        )

    def losses(
        self,
        features: Mapping[str, Tensor],
        proposals: Sequence[Instances],
        targets: Sequence[Instances],
    ) -> dict[str, Tensor]:
        """{"loss_cls", "loss_box_reg"[, "loss_mask"]} on proposals sampled against
        `targets` (which need gt_masks when the mask branch is on); the mask head reads the
        res5 features of the foreground ones among the sampled proposals."""
        if self.mask_head is not None:
            for i, t in enumerate(targets):
                if not t.has("gt_masks"):
                    raise ValueError(f"targets[{i}] has no gt_masks, which the mask head needs")
        sampled = self.label_and_sample_proposals(proposals, targets)
        x = self._res5_features(features, [p.proposal_boxes for p in sampled])
        predictions = self.box_predictor(x.mean(dim=(2, 3)))
        losses = self.box_predictor.losses(predictions, sampled)
        if self.mask_head is not None:
            fg_masks = [foreground_mask(p.gt_classes, self.num_classes) for p in sampled]
            fg = [p[m] for p, m in zip(sampled, fg_masks, strict=True)]
            mask_logits = self.mask_head(x[torch.cat(fg_masks)])
            losses.update(self.mask_head.losses(mask_logits, fg, [t.gt_masks for t in targets]))
        return losses

    def inference(
        self, features: Mapping[str, Tensor], proposals: Sequence[Instances]
    ) -> list[Instances]:
        """Detections per image from all its proposals, with pred_masks [R_i, 1, S, S] when
        the mask branch is on (from res5 run on the detected boxes)."""
        x = self._res5_features(features, [p.proposal_boxes for p in proposals])
        predictions = self.box_predictor(x.mean(dim=(2, 3)))
        detections = self.box_predictor.inference(predictions, proposals)
        if self.mask_head is not None:
            x = self._res5_features(features, [d.pred_boxes for d in detections])
            self.mask_head.inference(self.mask_head(x), detections)
        return detections

    def _res5_features(self, features: Mapping[str, Tensor], boxes: Sequence[Boxes]) -> Tensor:
        """[R, C_5, S', S']: res5 on the pooled features of every image's `boxes`, image 0's
        first."""
        return self.res5(self.pooler([features[f] for f in self.in_features], boxes))
