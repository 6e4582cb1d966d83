"""DeepMask (Pinheiro, Collobert, Dollar, NIPS 2015): segment proposals from image patches.

Shorthand: N inputs, P x P a training patch (192 in the release), W x W its central window (160),
t the trunk's stride (16), f = W / t (10), E the embedding size (512), m x m the predicted mask
(56), L x L the mask label (112), R proposals of an output image of H x W pixels.

Training inputs are patches, one dict each, from a patch-sampling mapper:

    {"image": uint8 [3, P, P] (INPUT.FORMAT), "height": P, "width": P,
     "patch_score": float [] (+1 an object centred at the canonical scale, -1 not),
     "patch_mask": float [L, L] (+1 the centred object's pixels in the window, -1 elsewhere;
                   read for positive patches only),
     "patch_head": optional, "mask" | "score" | "both" (absent: "both"): the heads the
                   patch trains (INPUT.DEEPMASK.ALTERNATE_BATCHES gives "mask" or "score")}

The trunk (any backbone; its map MODEL.DEEPMASK.IN_FEATURE at stride t) runs on the patch, its
map is cropped to the central f x f features (the release's `SpatialZeroPadding(-1,-1,-1,-1)`
on the 12 x 12 res4 map of a 192 patch), and the heads (`DeepMaskHead`, or the paper's
`DeepMaskPaperHead` with VARIANT "paper") give an embedding, m x m mask logits and a score.

Losses (`deepmask_losses`), the paper's objective divided by the batch size N:

    loss_mask  = 1/N sum over positive patches k that train the mask of mean over the
                 L x L pixels ij of log(1 + exp(-y_kij u_kij)),
                 u_k = the mask logits upsampled bilinearly to L
    loss_score = lambda * 1/N sum over patches k that train the score of log(1 + exp(-y_k s_k))

with lambda = SCORE_LOSS_WEIGHT (the paper's 1/32). A patch trains both heads unless its
"patch_head" says one. The paper's joint loss: every patch trains both. The release
(TrainerDeepMask.lua, with INPUT.DEEPMASK.ALTERNATE_BATCHES) alternates batches of positives
that train trunk and mask branch and 1:1 batches that train trunk and score branch. Its
SoftMarginCriterion averages over the batch (and the pixels), and it multiplies the mask
gradient by the batch size, so its objective per batch is N x loss_mask above (the sum over
patches of their pixel means) or loss_score / lambda (the mean over patches). Here with
lambda = 1/N (the paper's 1/32 for the release's batches of 32) each batch's loss is the
release's divided by N: the same SGD steps with BASE_LR x N and WEIGHT_DECAY / N. One
difference remains: the head a batch does not train gets a zero gradient (its parameters stay
in the graph, as DistributedDataParallel needs), so momentum and weight decay still move it,
where the release leaves it alone.

Evaluation inputs are whole images (`detframe.data.DatasetMapper`); the model runs fully
convolutionally on an image pyramid and outputs {"proposals": Instances(proposal_boxes,
objectness_logits, proposal_masks BitMasks [R, H, W])} in each input's (height, width); see
`inference.py` for the geometry, the release's decode and the pasting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.config import declare
from detframe.registry import META_ARCH_REGISTRY
from detframe.structures import Boxes, ImageList, Instances

from ..backbone import Backbone, build_backbone
from ..meta_arch.base import MetaArchitecture
from .heads import DeepMaskHead, DeepMaskPaperHead
from .inference import (
    PyramidSettings,
    paste_proposals,
    release_positions,
    resize_for_scale,
    top_windows,
    window_boxes,
)

__all__ = ["DeepMask", "deepmask_losses"]

_HEADS = {"release": DeepMaskHead, "paper": DeepMaskPaperHead}
# Values of a patch's "patch_head": the heads it trains.
_PATCH_HEADS = ("mask", "score", "both")

declare("MODEL.DEEPMASK.IN_FEATURE", str, "res4", "trunk feature map the heads read (stride 16)")
declare(
    "MODEL.DEEPMASK.VARIANT",
    str,
    "release",
    "heads: 'release' (DeepMask.lua) or 'paper' (NIPS 2015, Figure 1)",
    choices=tuple(_HEADS),
)
declare(
    "MODEL.DEEPMASK.WINDOW_SIZE",
    int,
    160,
    "side in pixels of the window a mask and score describe (release iSz 160, paper 224)",
    min=1,
)
declare(
    "MODEL.DEEPMASK.SHARED_CHANNELS",
    int,
    128,
    "channels of the 1x1 conv on the trunk (release: shared, 128; paper: mask branch, 512)",
    min=1,
)
declare("MODEL.DEEPMASK.EMBED_DIM", int, 512, "size of the window embedding", min=1)
declare("MODEL.DEEPMASK.MASK_SIZE", int, 56, "side of the predicted mask (release oSz)", min=1)
declare("MODEL.DEEPMASK.SCORE_HIDDEN_DIM", int, 1024, "hidden size of the score branch", min=1)
declare(
    "MODEL.DEEPMASK.DROPOUT", float, 0.5, "dropout probability in the score branch", min=0, max=1
)
declare(
    "MODEL.DEEPMASK.SCORE_LOSS_WEIGHT",
    float,
    1 / 32,
    "lambda: weight of the score loss against the mask loss (paper 1/32)",
    min=0,
)
declare(
    "MODEL.DEEPMASK.SCALES",
    list[float],
    [2**e for e in (-2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5)],
    "image scales of the inference pyramid (release: 2^-2.5 .. 2^0.5, step 2^0.5)",
    min=0,
    min_exclusive=True,
)
declare(
    "MODEL.DEEPMASK.TOPK", int, 500, "proposals per image, by score over all scales (np)", min=1
)
declare(
    "MODEL.DEEPMASK.MASK_THRESHOLD",
    float,
    0.2,
    "probability at which a pasted mask pixel is in the proposal (release 0.2)",
    min=0,
    max=1,
    min_exclusive=True,
    max_exclusive=True,
)
declare(
    "MODEL.DEEPMASK.NMS_THRESH",
    float,
    1.0,
    "box IoU for NMS over the top proposals; 1.0: none (release)",
    min=0,
    max=1,
)
declare(
    "MODEL.DEEPMASK.RELEASE_DECODE",
    bool,
    False,
    "decode top windows as InferDeepMask.lua: shifted a stride up and right (its bug)",
)


def deepmask_losses(
    mask_logits: Tensor,
    mask_labels: Tensor,
    score_logits: Tensor,
    score_labels: Tensor,
    score_loss_weight: float,
    batch_size: int | None = None,
) -> dict[str, Tensor]:
    """The paper's loss over a batch of N patches, divided by N (see the module docstring).

    Args:
        mask_logits: [K, m, m] of the K positive patches that train the mask.
        mask_labels: [K, L, L] +-1 labels of those patches.
        score_logits, score_labels: [S] logits and +-1 labels of the S patches that train
            the score (all N in the paper's joint loss).
        score_loss_weight: lambda.
        batch_size: N, which divides both sums; None: S.

    Returns:
        {"loss_mask", "loss_score"} scalars, the score loss multiplied by lambda. A loss
        without patches is 0 and still backpropagates (zeros) into its head.
    """
    num = score_logits.numel() if batch_size is None else batch_size
    if num < 1:
        raise ValueError(f"batch_size must be >= 1, got {num}")
    if mask_logits.size(0) == 0:
        loss_mask = mask_logits.sum() * 0.0  # keeps the mask branch in the graph
    else:
        size = tuple(mask_labels.shape[-2:])
        upsampled = F.interpolate(
            mask_logits[:, None], size=size, mode="bilinear", align_corners=False
        )[:, 0]
        per_pixel = F.softplus(-mask_labels.to(upsampled.dtype) * upsampled)  # soft margin
        loss_mask = per_pixel.mean(dim=(1, 2)).sum() / num
    per_patch = F.softplus(-score_labels.to(score_logits.dtype) * score_logits)
    return {"loss_mask": loss_mask, "loss_score": score_loss_weight * (per_patch.sum() / num)}


@META_ARCH_REGISTRY.register()
class DeepMask(MetaArchitecture):
    """DeepMask: a trunk and its heads, trained on patches, run on whole images.

    Args:
        backbone: the trunk; its map `in_feature` has stride t.
        in_feature: name of that map.
        head: `DeepMaskHead` or `DeepMaskPaperHead` (or any module with `window` = f,
            forward(features) -> (embeddings, score logits) and `mask_logits`), built for a
            window of f = window_size / t features.
        window_size: W, the window side in pixels.
        score_loss_weight: lambda.
        pyramid: the full-image inference settings.
        pixel_mean, pixel_std: see `MetaArchitecture`.
    """

    OUTPUT_KEY = "proposals"

    def __init__(
        self,
        *,
        backbone: Backbone,
        in_feature: str,
        head: nn.Module,
        window_size: int,
        score_loss_weight: float,
        pyramid: PyramidSettings,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> None:
        super().__init__(pixel_mean=pixel_mean, pixel_std=pixel_std)
        shapes = backbone.output_shape()
        if in_feature not in shapes:
            raise ValueError(
                f"MODEL.DEEPMASK.IN_FEATURE {in_feature!r} is not a map of the backbone "
                f"{type(backbone).__name__}, which gives {sorted(shapes)}"
            )
        self.stride = shapes[in_feature].stride
        if window_size % self.stride or head.window != window_size // self.stride:
            raise ValueError(
                f"MODEL.DEEPMASK.WINDOW_SIZE {window_size} must be the head's window "
                f"({head.window} features) times the stride {self.stride} of {in_feature!r}"
            )
        self.backbone = backbone
        self.in_feature = in_feature
        self.head = head
        self.window_size = window_size
        self.score_loss_weight = score_loss_weight
        self.pyramid = pyramid

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        d = cfg.MODEL.DEEPMASK
        backbone = build_backbone(cfg)
        shape = backbone.output_shape().get(d.IN_FEATURE)
        if shape is None:
            raise ValueError(
                f"MODEL.DEEPMASK.IN_FEATURE {d.IN_FEATURE!r} is not a map of the backbone "
                f"{cfg.MODEL.BACKBONE.NAME}, which gives {sorted(backbone.output_shape())}"
            )
        if d.WINDOW_SIZE % shape.stride:
            raise ValueError(
                f"MODEL.DEEPMASK.WINDOW_SIZE {d.WINDOW_SIZE} is not a multiple of the stride "
                f"{shape.stride} of {d.IN_FEATURE!r}"
            )
        head = _HEADS[d.VARIANT](
            in_channels=shape.channels,
            window=d.WINDOW_SIZE // shape.stride,
            shared_channels=d.SHARED_CHANNELS,
            embed_dim=d.EMBED_DIM,
            mask_size=d.MASK_SIZE,
            score_hidden_dim=d.SCORE_HIDDEN_DIM,
            dropout=d.DROPOUT,
        )
        pyramid = PyramidSettings(
            scales=tuple(d.SCALES),
            topk=d.TOPK,
            mask_threshold=d.MASK_THRESHOLD,
            nms_thresh=d.NMS_THRESH,
            release_decode=d.RELEASE_DECODE,
        )
        return {
            "backbone": backbone,
            "in_feature": d.IN_FEATURE,
            "head": head,
            "window_size": d.WINDOW_SIZE,
            "score_loss_weight": d.SCORE_LOSS_WEIGHT,
            "pyramid": pyramid,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
        }

    def targets(self, batched_inputs: Sequence[dict[str, Any]]) -> None:
        """None: DeepMask's targets are patch labels, read by `patch_targets`, not
        Instances."""
        return None

    def patch_targets(
        self, batched_inputs: Sequence[dict[str, Any]]
    ) -> tuple[Tensor, Tensor] | None:
        """The inputs' patch labels: (scores [N] +-1, masks [N, L, L] +-1) on the model's
        device; None when no input has them (whole images).

        Raises:
            ValueError: training mode without labels, labels in only some inputs, or labels
                of the wrong shape.
        """
        has = ["patch_score" in x for x in batched_inputs]
        if not any(has):
            if self.training:
                raise ValueError(
                    "DeepMask in training mode needs patches: inputs with 'patch_score' and "
                    "'patch_mask' (a patch-sampling DATALOADER.MAPPER); got keys "
                    f"{sorted(batched_inputs[0])}"
                )
            return None
        if not all(has):
            missing = [i for i, h in enumerate(has) if not h]
            raise ValueError(f"inputs {missing} have no 'patch_score' but others do")
        scores = torch.stack(
            [torch.as_tensor(x["patch_score"]).reshape(()) for x in batched_inputs]
        )
        masks = [torch.as_tensor(x["patch_mask"]) for x in batched_inputs]
        shapes = {tuple(m.shape) for m in masks}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"'patch_mask' must be [L, L], one L for all; got shapes {shapes}")
        return scores.to(self.device), torch.stack(masks).to(self.device)

    def patch_heads(self, batched_inputs: Sequence[dict[str, Any]]) -> tuple[Tensor, Tensor]:
        """Which patches train which head, from their "patch_head" ("mask", "score" or
        "both"; absent: "both"): (trains_mask [N] bool, trains_score [N] bool) on the
        model's device.

        Raises:
            ValueError: another "patch_head".
        """
        heads = [x.get("patch_head", "both") for x in batched_inputs]
        unknown = sorted({h for h in heads if h not in _PATCH_HEADS}, key=str)
        if unknown:
            raise ValueError(f"'patch_head' must be one of {_PATCH_HEADS}, got {unknown}")
        trains_mask = torch.tensor([h != "score" for h in heads], device=self.device)
        trains_score = torch.tensor([h != "mask" for h in heads], device=self.device)
        return trains_mask, trains_score

    def patch_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised patches [N, 3, P, P] -> (embeddings [N, E], score logits [N]).

        Raises:
            ValueError: the patch's trunk map is not f + 2k features square.
        """
        features = self.backbone(images)[self.in_feature]
        height, width = features.shape[-2:]
        window = self.head.window
        margin = height - window
        if height != width or margin < 0 or margin % 2:
            raise ValueError(
                f"patches of {tuple(images.shape[-2:])} pixels give a {height} x {width} "
                f"{self.in_feature!r} map, which must be square with a central window of "
                f"{window} features (MODEL.DEEPMASK.WINDOW_SIZE {self.window_size}) and an "
                f"equal margin on each side: patch side = WINDOW_SIZE + 2 k x {self.stride}"
            )
        crop = features[..., margin // 2 : margin // 2 + window, margin // 2 : margin // 2 + window]
        embeddings, scores = self.head(crop)
        return embeddings.flatten(1), scores.flatten()

    def run(
        self,
        images: ImageList,
        batched_inputs: Sequence[dict[str, Any]],
        targets: list[Instances] | None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """Losses of labelled patches; in evaluation mode also each input's windows
        (`propose`), in the coordinates of `images`."""
        labels = self.patch_targets(batched_inputs)
        losses: dict[str, Tensor] = {}
        if labels is not None:
            if len({tuple(s) for s in images.image_sizes}) != 1:
                raise ValueError(
                    f"patches must all have one size, got {sorted(set(images.image_sizes))}"
                )
            score_labels, mask_labels = labels
            trains_mask, trains_score = self.patch_heads(batched_inputs)
            embeddings, score_logits = self.patch_outputs(images.tensor)
            mask_patches = (score_labels > 0) & trains_mask
            mask_logits = self.head.mask_logits(embeddings[mask_patches])
            losses = deepmask_losses(
                mask_logits,
                mask_labels[mask_patches],
                score_logits[trains_score],
                score_labels[trains_score],
                self.score_loss_weight,
                batch_size=len(batched_inputs),
            )
        if self.training:
            return [], losses
        results = [
            self.propose(images.tensor[i, :, :height, :width])
            for i, (height, width) in enumerate(images.image_sizes)
        ]
        return results, losses

    def dense_outputs(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """One padded pyramid level [3, h, w] -> (embeddings [E, h', w'], score logits
        [h', w']) of every window position (none when the map is smaller than f)."""
        features = self.backbone(image[None])[self.in_feature]
        if min(features.shape[-2:]) < self.head.window:
            return features.new_zeros((0, 0, 0)), features.new_zeros((0, 0))
        embeddings, scores = self.head(features)
        return embeddings[0], scores[0]

    def propose(self, image: Tensor) -> Instances:
        """One normalised image [3, h, w] -> its top windows: Instances((h, w), windows
        [R, 4] XYXY in its pixels, objectness_logits [R] highest first, mask_logits
        [R, m, m]), R <= TOPK; `postprocess_one` pastes them."""
        pad = self.window_size // 2
        levels = []
        for scale in self.pyramid.scales:
            scaled, sy, sx = resize_for_scale(image, scale)
            embeddings, scores = self.dense_outputs(F.pad(scaled, (pad, pad, pad, pad)))
            levels.append((embeddings, scores, sy, sx))
        scores, level, flat = top_windows([lv[1] for lv in levels], self.pyramid.topk)
        windows = scores.new_zeros((scores.numel(), 4), dtype=torch.float64)
        mask_logits = scores.new_zeros((scores.numel(), self.head.mask_size, self.head.mask_size))
        for i, (embeddings, level_scores, sy, sx) in enumerate(levels):
            chosen = torch.nonzero(level == i).flatten()
            if chosen.numel() == 0:
                continue
            map_width = level_scores.size(1)
            if self.pyramid.release_decode:
                rows, cols = release_positions(flat[chosen], map_width)
            else:
                rows, cols = flat[chosen] // map_width, flat[chosen] % map_width
            windows[chosen] = window_boxes(
                rows, cols, sy, sx, stride=self.stride, window=self.window_size
            )
            mask_logits[chosen] = self.head.mask_logits(embeddings[:, rows, cols].t())
        return Instances(
            tuple(image.shape[-2:]),
            windows=windows,
            objectness_logits=scores,
            mask_logits=mask_logits,
        )

    def postprocess_one(self, result: Instances, height: int, width: int) -> Instances:
        """The windows' masks pasted into (height, width): Instances(proposal_boxes,
        objectness_logits, proposal_masks BitMasks [R', height, width]) (`paste_proposals`)."""
        windows = Boxes(result.windows.clone())
        windows.scale(width / result.image_size[1], height / result.image_size[0])
        return paste_proposals(
            windows.tensor,
            result.mask_logits,
            result.objectness_logits,
            (height, width),
            mask_threshold=self.pyramid.mask_threshold,
            nms_thresh=self.pyramid.nms_thresh,
        )
