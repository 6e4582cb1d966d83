"""DeepMaskProposals: a trained, frozen DeepMask as the proposal generator of a detector.

Shorthand: N images of the detector's padded batch, image i of h_i x w_i pixels, R_i proposals.

    proposals, {} = DeepMaskProposals(...)(images, features, gt_instances)

    images     ImageList [N, 3, H', W'], normalised with the detector's PIXEL_MEAN / PIXEL_STD
    proposals  N Instances((h_i, w_i), proposal_boxes Boxes [R_i], objectness_logits [R_i]),
               highest first: DeepMask's segment proposals (its pyramid, TOPK and the rest of
               its own config), each box tight around its mask, in the image's pixels

It reads the images, not the detector's features (a DeepMask has its own trunk): the
generator protocol already hands over the normalised batch, which is undone per channel with
the detector's statistics and redone with DeepMask's. Both configs must use the same
INPUT.FORMAT. The DeepMask is built from its own config file and checkpoint
(MODEL.DEEPMASK_PROPOSALS.CONFIG / .WEIGHTS), never trains (no gradient, always in evaluation
mode) and gives no losses; its parameters are part of the detector's state dict, so a
detector checkpoint carries them. It sets `LOADS_OWN_WEIGHTS`, so ImageNet MODEL.WEIGHTS of
the detector initialise the detector's own trunk and leave the DeepMask's alone.

Cost: the masks are pasted into the image to find the boxes (as for proposal evaluation), R_i
x h_i x w_i booleans per image, then dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.config import declare, load_config
from detframe.layers import ShapeSpec
from detframe.registry import PROPOSAL_GENERATOR_REGISTRY
from detframe.structures import ImageList, Instances

from ..weights import load_weights
from .model import DeepMask

__all__ = ["DeepMaskProposals"]

declare(
    "MODEL.DEEPMASK_PROPOSALS.CONFIG",
    str,
    "",
    "config file of the trained DeepMask that DeepMaskProposals runs (needed by it)",
)
declare(
    "MODEL.DEEPMASK_PROPOSALS.WEIGHTS",
    str,
    "",
    "checkpoint of that DeepMask, path or URL (needed by DeepMaskProposals)",
)


@PROPOSAL_GENERATOR_REGISTRY.register()
class DeepMaskProposals(nn.Module):
    """A frozen DeepMask's proposals for a two-stage detector (see the module docstring).

    Args:
        deepmask: the trained model (its weights loaded).
        pixel_mean, pixel_std: the detector's normalisation, per channel.
    """

    LOADS_OWN_WEIGHTS = True  # ImageNet MODEL.WEIGHTS of the detector leave its trunk alone

    def __init__(
        self, *, deepmask: DeepMask, pixel_mean: Sequence[float], pixel_std: Sequence[float]
    ) -> None:
        super().__init__()
        self.deepmask = deepmask.eval().requires_grad_(False)
        # detector-normalised x -> DeepMask-normalised: x * gain + shift, per channel.
        gain = deepmask.pixel_std.new_tensor(pixel_std).view(-1, 1, 1) / deepmask.pixel_std
        shift = deepmask.pixel_std.new_tensor(pixel_mean).view(-1, 1, 1) - deepmask.pixel_mean
        self.register_buffer("gain", gain, persistent=False)
        self.register_buffer("shift", shift / deepmask.pixel_std, persistent=False)

    @classmethod
    def from_config(cls, cfg: DictConfig, input_shape: dict[str, ShapeSpec]) -> dict[str, Any]:
        del input_shape  # DeepMask reads the images
        keys = cfg.MODEL.DEEPMASK_PROPOSALS
        unset = [f"MODEL.DEEPMASK_PROPOSALS.{k}" for k in ("CONFIG", "WEIGHTS") if not keys[k]]
        if unset:
            raise ValueError(f"the proposal generator DeepMaskProposals needs {', '.join(unset)}")
        own = load_config(keys.CONFIG)
        if own.INPUT.FORMAT != cfg.INPUT.FORMAT:
            raise ValueError(
                f"INPUT.FORMAT {cfg.INPUT.FORMAT} of the detector differs from "
                f"{own.INPUT.FORMAT} of MODEL.DEEPMASK_PROPOSALS.CONFIG "
                f"{cfg.MODEL.DEEPMASK_PROPOSALS.CONFIG}"
            )
        deepmask = DeepMask(**DeepMask.from_config(own))
        load_weights(deepmask, keys.WEIGHTS, strict=True)
        return {
            "deepmask": deepmask,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
        }

    def train(self, mode: bool = True) -> DeepMaskProposals:
        """The DeepMask stays in evaluation mode (dropout off) whatever the detector's mode."""
        super().train(mode)
        self.deepmask.eval()
        return self

    @torch.no_grad()
    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        gt_instances: list[Instances] | None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """Proposals of each image of `images` (see the module docstring) and no losses."""
        del features, gt_instances
        dtype = next(self.deepmask.parameters()).dtype
        batch = images.tensor.to(dtype) * self.gain.to(dtype) + self.shift.to(dtype)
        proposals = []
        for i, (height, width) in enumerate(images.image_sizes):
            windows = self.deepmask.propose(batch[i, :, :height, :width])
            result = self.deepmask.postprocess_one(windows, height, width)
            proposals.append(
                Instances(
                    (height, width),
                    proposal_boxes=result.proposal_boxes,
                    objectness_logits=result.objectness_logits,
                )
            )
        return proposals, {}
