"""SharpMask (Pinheiro, Lin, Collobert, Dollar, ECCV 2016): DeepMask's masks refined top-down.

Shorthand: N patches, R windows, t the stride of DeepMask's map (16), f = W / t the window
side in features (10 = 160 / 16), E the embedding size (512), n refinement stages (4); stage
i = 0..n-1 works at stride t / 2^i, where the window is f_i = f 2^i features (10, 20, 40, 80)
and the trunk map F_i has C_i channels (ResNet-50: 1024, 512, 256, 64); k_m^i channels of the
mask encoding M^i entering stage i, k_s^i of its skip features (both 32, 16, 8, 4 in the
release); M = f 2^n the side of the output logits over the window (160: one per pixel).

Refinement, the paper's refactored form (its Section 3.3), as the release's SharpMask.lua::

    M^0     = Linear(E -> k_m^0 f f)(embedding), viewed [R, k_m^0, f, f]
    M^{i+1} = Up2(ReLU(H_i(F_i) + V_i(M^i)))               [R, k_m^{i+1}, 2 f_i, 2 f_i]
    logits  = conv3x3(M^n -> 1)                             [R, M, M]

    H_i  conv3x3 C_i -> h_i, ReLU, conv3x3 h_i -> k_s^i, ReLU, conv3x3 k_s^i -> k_m^{i+1}
    V_i  conv3x3 k_m^i -> k_m^i, ReLU, conv3x3 k_m^i -> k_m^{i+1}

with k_m^n = k_m^{n-1} / 2 (the release halves the channels at every stage) and h_i = 64,
64, 64, 32. The paper's form builds skip features S_i (k_s^i channels) from F_i, concatenates
them with ReLU(conv(M^i)) and applies one 3 x 3 convolution to k_m^{i+1} channels; split along
its input channels, that convolution is the last layers of H_i and V_i summed, so H_i depends
on the image only and runs once on a whole image's maps. Every 3 x 3 convolution pads by
replicating the border: the release's SpatialSymmetricPadding(1,1,1,1) (Matlab's
'symmetric') of one pixel is the border pixel itself. Up2 is nearest (the release's
SpatialUpSamplingNearest(2)) or bilinear (MODEL.SHARPMASK.UPSAMPLE).

Trunk maps (MODEL.SHARPMASK.IN_FEATURES, strides t, t/2, t/4, t/8): the release taps its
ResNet-50 (fb.resnet.torch modules, `skpos = {8, 6, 5, 3}`) after res4 (cropped as DeepMask
crops it), res3, res2 and the stem's conv1 + BN + ReLU before the max pool (stride 2); in
detframe's ResNet "res4", "res3", "res2" and "conv1". The backbone must output all of them
(e.g. MODEL.RESNETS.OUT_FEATURES: [conv1, res2, res3, res4]).

Training, two stages as the release (train.lua with -dm): a DeepMask is trained first (its own
config); the SharpMask is built from a config with the same MODEL.DEEPMASK.* keys, loads that
checkpoint into its DeepMask (MODEL.SHARPMASK.DEEPMASK_WEIGHTS) and freezes it: no gradient,
evaluation mode whatever the SharpMask's mode (no dropout, normalisation statistics fixed).
Only the refinement trains, on the same patch inputs as DeepMask (`DeepMask` documents them),
with the mask loss of the positive patches (those whose "patch_head" is not "score"):

    loss_mask = 1/N sum over positive patches k of mean over the M x M pixels ij of
                log(1 + exp(-y_kij u_kij)),   u_k = the refined logits

(the release samples positives only, INPUT.DEEPMASK.POSITIVE_FRACTION 1, with labels at the
window's resolution, LABEL_SIZE = WINDOW_SIZE; labels of another side L are resampled to M by
nearest neighbour). On a patch H_i runs on the patch's whole map F_i and its window's central
f_i x f_i part is kept (the release crops F_i first): inside the window it then sees the
context it sees on a whole image, so where the trunk's features do not depend on the patch's
borders, the patch model equals the full-image one.

Inference on a whole image runs DeepMask's pyramid (`inference.py`): per scale, the trunk, the
DeepMask heads and the horizontal branches H_i on the whole padded image; then the top windows
across scales by score; then M^0 from the top windows' embeddings and the vertical path, batched
over those windows only, reading each window's f_i x f_i crop of every H_i(F_i) (zeros where a
map ends before the window, as the release). The M x M masks are pasted as DeepMask's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.config import declare
from detframe.layers import ShapeSpec
from detframe.registry import META_ARCH_REGISTRY
from detframe.structures import ImageList, Instances

from ..backbone import Backbone
from ..meta_arch.base import MetaArchitecture
from ..weights import load_weights
from .inference import release_positions, resize_for_scale, top_windows, window_boxes
from .model import DeepMask

__all__ = ["RefinementStage", "SharpMask", "SharpMaskRefinement", "sharpmask_loss"]

_UPSAMPLING = ("nearest", "bilinear")

declare(
    "MODEL.SHARPMASK.IN_FEATURES",
    list[str],
    ["res4", "res3", "res2", "conv1"],
    "trunk maps of the refinement stages, strides t, t/2, t/4, ... (release: res4, res3, res2, "
    "conv1 of ResNet-50)",
)
declare(
    "MODEL.SHARPMASK.MASK_CHANNELS",
    list[int],
    [32, 16, 8, 4],
    "k_m: channels of the mask encoding entering each stage; the last stage gives half the "
    "last (release km = 32, halved per stage)",
    min=1,
)
declare(
    "MODEL.SHARPMASK.SKIP_CHANNELS",
    list[int],
    [32, 16, 8, 4],
    "k_s: channels of each stage's skip features (release ks = 32, halved per stage)",
    min=1,
)
declare(
    "MODEL.SHARPMASK.SKIP_HIDDEN_CHANNELS",
    list[int],
    [64, 64, 64, 32],
    "channels of the first conv of each stage's horizontal branch (release: 64, 64, 64, 32)",
    min=1,
)
declare(
    "MODEL.SHARPMASK.UPSAMPLE",
    str,
    "nearest",
    "2x upsampling after each stage: 'nearest' (release) or 'bilinear' (paper)",
    choices=_UPSAMPLING,
)
declare(
    "MODEL.SHARPMASK.DEEPMASK_WEIGHTS",
    str,
    "",
    "checkpoint of the trained DeepMask (stage 1), loaded into the SharpMask's frozen DeepMask "
    "when built; '' keeps its initialisation (e.g. MODEL.WEIGHTS is a SharpMask checkpoint)",
)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3 x 3 convolution, stride 1, padded by replicating the border (see the module
    docstring)."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, padding_mode="replicate")


class RefinementStage(nn.Module):
    """One refinement module: M^{i+1} = Up2(ReLU(H_i(F_i) + V_i(M^i))).

    Args:
        in_channels: C_i, channels of the trunk map F_i.
        hidden_channels: h_i, channels of the first convolution of H_i.
        skip_channels: k_s^i.
        mask_channels: k_m^i, channels of M^i.
        out_channels: k_m^{i+1}, channels of M^{i+1}.
        upsample: "nearest" or "bilinear".
    """

    def __init__(
        self,
        *,
        in_channels: int,
        hidden_channels: int,
        skip_channels: int,
        mask_channels: int,
        out_channels: int,
        upsample: str = "nearest",
    ) -> None:
        super().__init__()
        if upsample not in _UPSAMPLING:
            raise ValueError(f"upsample must be one of {_UPSAMPLING}, got {upsample!r}")
        self.upsample = upsample
        self.horizontal = nn.Sequential(
            _conv3x3(in_channels, hidden_channels),
            nn.ReLU(inplace=True),
            _conv3x3(hidden_channels, skip_channels),
            nn.ReLU(inplace=True),
            _conv3x3(skip_channels, out_channels),
        )
        self.vertical = nn.Sequential(
            _conv3x3(mask_channels, mask_channels),
            nn.ReLU(inplace=True),
            _conv3x3(mask_channels, out_channels),
        )

    def forward(self, horizontal: Tensor, mask: Tensor) -> Tensor:
        """H_i(F_i) [R, k_m^{i+1}, s, s] over the windows, M^i [R, k_m^i, s, s] -> M^{i+1}
        [R, k_m^{i+1}, 2 s, 2 s]."""
        merged = F.relu(horizontal + self.vertical(mask))
        if self.upsample == "nearest":
            return F.interpolate(merged, scale_factor=2, mode="nearest")
        return F.interpolate(merged, scale_factor=2, mode="bilinear", align_corners=False)


class SharpMaskRefinement(nn.Module):
    """The top-down path: a window's embedding and the H_i(F_i) over it -> M x M mask logits.

    Args:
        in_channels: C_i of each stage's trunk map (n values).
        window: f, the window side in features at the first stage.
        embed_dim: E.
        mask_channels: k_m^i (n values); the last stage gives k_m^{n-1} / 2.
        skip_channels: k_s^i (n values).
        hidden_channels: h_i (n values).
        upsample: "nearest" (release) or "bilinear" (paper).
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        window: int,
        embed_dim: int,
        mask_channels: Sequence[int],
        skip_channels: Sequence[int],
        hidden_channels: Sequence[int],
        upsample: str = "nearest",
    ) -> None:
        super().__init__()
        lists = {
            "in_channels": list(in_channels),
            "MODEL.SHARPMASK.MASK_CHANNELS": list(mask_channels),
            "MODEL.SHARPMASK.SKIP_CHANNELS": list(skip_channels),
            "MODEL.SHARPMASK.SKIP_HIDDEN_CHANNELS": list(hidden_channels),
        }
        if len({len(v) for v in lists.values()}) != 1 or not in_channels:
            raise ValueError(f"one value per refinement stage (at least one) is needed: {lists}")
        if min(min(v) for v in lists.values()) < 1 or window < 1 or embed_dim < 1:
            raise ValueError(
                f"SharpMask sizes must be positive: window={window}, embed_dim={embed_dim}, {lists}"
            )
        if mask_channels[-1] % 2:
            raise ValueError(
                f"the last of MODEL.SHARPMASK.MASK_CHANNELS {list(mask_channels)} must be even: "
                "the last stage gives half of it"
            )
        self.window = window
        self.coarse_channels = mask_channels[0]
        self.encode = nn.Linear(embed_dim, mask_channels[0] * window * window)
        outs = [*mask_channels[1:], mask_channels[-1] // 2]
        self.stages = nn.ModuleList(
            RefinementStage(
                in_channels=c,
                hidden_channels=h,
                skip_channels=s,
                mask_channels=m,
                out_channels=o,
                upsample=upsample,
            )
            for c, h, s, m, o in zip(
                in_channels, hidden_channels, skip_channels, mask_channels, outs, strict=True
            )
        )
        self.predictor = _conv3x3(outs[-1], 1)

    @property
    def output_size(self) -> int:
        """M = f 2^n, the side of the mask logits."""
        return self.window * 2 ** len(self.stages)

    def horizontal(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Trunk maps F_i [B, C_i, h_i, w_i] -> H_i(F_i) [B, k_m^{i+1}, h_i, w_i], one per
        stage (fully convolutional: patches or whole images)."""
        if len(features) != len(self.stages):
            raise ValueError(f"{len(self.stages)} trunk maps needed, got {len(features)}")
        return [stage.horizontal(x) for stage, x in zip(self.stages, features, strict=True)]

    def forward(self, embeddings: Tensor, horizontal: Sequence[Tensor]) -> Tensor:
        """embeddings [R, E] and per stage H_i(F_i) over the windows [R, k_m^{i+1}, f_i, f_i]
        -> mask logits [R, M, M] (row-major over the window, as DeepMask's)."""
        size = self.window
        mask = self.encode(embeddings).view(-1, self.coarse_channels, size, size)
        for stage, skip in zip(self.stages, horizontal, strict=True):
            mask = stage(skip, mask)
        return self.predictor(mask)[:, 0]


def sharpmask_loss(mask_logits: Tensor, mask_labels: Tensor, num_patches: int) -> Tensor:
    """The mask loss of the K positive patches of a batch of N (see the module docstring).

    Args:
        mask_logits: [K, M, M] refined logits.
        mask_labels: [K, L, L] +-1, resampled to M x M by nearest neighbour if L != M.
        num_patches: N.

    Returns:
        The scalar loss; 0 (in the graph of `mask_logits`) when K = 0.
    """
    if mask_logits.size(0) == 0:
        return mask_logits.sum() * 0.0
    labels = mask_labels.to(mask_logits.dtype)
    if labels.shape[-2:] != mask_logits.shape[-2:]:
        size = tuple(mask_logits.shape[-2:])
        labels = F.interpolate(labels[:, None], size=size, mode="nearest-exact")[:, 0]
    per_pixel = F.softplus(-labels * mask_logits)  # soft margin
    return per_pixel.mean(dim=(1, 2)).sum() / num_patches


def _central(features: Tensor, size: int, name: str) -> Tensor:
    """The central size x size part of a patch's map [N, C, s, s] (an equal margin on each
    side)."""
    height, width = features.shape[-2:]
    margin = height - size
    if height != width or margin < 0 or margin % 2:
        raise ValueError(
            f"a patch's {name!r} map is {height} x {width}; it must be square with a central "
            f"window of {size} features and an equal margin on each side: patch side = "
            "MODEL.DEEPMASK.WINDOW_SIZE + 2 k x the stride of MODEL.DEEPMASK.IN_FEATURE"
        )
    lo = margin // 2
    return features[..., lo : lo + size, lo : lo + size]


def _windows_of(feature: Tensor, rows: Tensor, cols: Tensor, size: int) -> Tensor:
    """The size x size crops at (rows [R], cols [R]) of one map [C, h, w], zeros beyond its
    bottom and right: [R, C, size, size]."""
    need_h, need_w = int(rows.max()) + size, int(cols.max()) + size
    feature = F.pad(
        feature, (0, max(need_w - feature.size(2), 0), 0, max(need_h - feature.size(1), 0))
    )
    offsets = torch.arange(size, device=feature.device)
    ys = (rows[:, None] + offsets)[:, :, None]  # [R, size, 1]
    xs = (cols[:, None] + offsets)[:, None, :]  # [R, 1, size]
    return feature[:, ys, xs].transpose(0, 1)


def _skip_shapes(backbone: Backbone, names: Sequence[str]) -> list[ShapeSpec]:
    """The backbone's shapes of the maps `names` (MODEL.SHARPMASK.IN_FEATURES)."""
    shapes = backbone.output_shape()
    missing = [name for name in names if name not in shapes]
    if missing:
        raise ValueError(
            f"MODEL.SHARPMASK.IN_FEATURES {missing} are not maps of the backbone "
            f"{type(backbone).__name__}, which gives {sorted(shapes)}: add them to its output "
            "features (e.g. MODEL.RESNETS.OUT_FEATURES)"
        )
    return [shapes[name] for name in names]


@META_ARCH_REGISTRY.register()
class SharpMask(MetaArchitecture):
    """A frozen DeepMask and its trainable refinement (see the module docstring).

    Args:
        deepmask: the trained DeepMask; frozen here. Its normalisation is the SharpMask's.
        refinement: built for the window of `deepmask` (`refinement.window` = f) and the
            channels of `in_features`.
        in_features: names of the trunk maps of the stages, at strides t / 2^i (t =
            `deepmask.stride`); `deepmask.backbone` must output them.
    """

    OUTPUT_KEY = "proposals"

    def __init__(
        self, *, deepmask: DeepMask, refinement: SharpMaskRefinement, in_features: Sequence[str]
    ) -> None:
        super().__init__(
            pixel_mean=deepmask.pixel_mean.flatten().tolist(),
            pixel_std=deepmask.pixel_std.flatten().tolist(),
        )
        shapes = _skip_shapes(deepmask.backbone, in_features)
        strides = [shape.stride for shape in shapes]
        wanted = [deepmask.stride / 2**i for i in range(len(in_features))]
        if strides != wanted or len(in_features) != len(refinement.stages):
            raise ValueError(
                f"MODEL.SHARPMASK.IN_FEATURES {list(in_features)} have strides {strides}; the "
                f"{len(refinement.stages)} refinement stages need "
                f"{[f'{w:g}' for w in wanted]} (halving from the stride of "
                "MODEL.DEEPMASK.IN_FEATURE)"
            )
        if refinement.window != deepmask.head.window:
            raise ValueError(
                f"the refinement's window ({refinement.window} features) differs from "
                f"DeepMask's ({deepmask.head.window})"
            )
        self.deepmask = deepmask.eval().requires_grad_(False)
        self.refinement = refinement
        self.in_features = list(in_features)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> dict[str, Any]:
        s = cfg.MODEL.SHARPMASK
        deepmask = DeepMask(**DeepMask.from_config(cfg))
        if s.DEEPMASK_WEIGHTS:
            load_weights(deepmask, s.DEEPMASK_WEIGHTS, strict=True)
        shapes = _skip_shapes(deepmask.backbone, s.IN_FEATURES)
        refinement = SharpMaskRefinement(
            in_channels=[shape.channels for shape in shapes],
            window=deepmask.head.window,
            embed_dim=cfg.MODEL.DEEPMASK.EMBED_DIM,
            mask_channels=list(s.MASK_CHANNELS),
            skip_channels=list(s.SKIP_CHANNELS),
            hidden_channels=list(s.SKIP_HIDDEN_CHANNELS),
            upsample=s.UPSAMPLE,
        )
        return {"deepmask": deepmask, "refinement": refinement, "in_features": list(s.IN_FEATURES)}

    def train(self, mode: bool = True) -> SharpMask:
        """The DeepMask stays in evaluation mode; only the refinement follows `mode`."""
        super().train(mode)
        self.deepmask.eval()
        return self

    def targets(self, batched_inputs: Sequence[dict[str, Any]]) -> None:
        """None: the targets are patch labels (`DeepMask.patch_targets`)."""
        return None

    def patch_mask_logits(self, patches: Tensor) -> Tensor:
        """Normalised patches [K, 3, P, P] -> refined logits [K, M, M] over their windows."""
        deepmask = self.deepmask
        with torch.no_grad():
            features = deepmask.backbone(patches)
            window = _central(features[deepmask.in_feature], deepmask.head.window, "DeepMask")
            embeddings = deepmask.head(window)[0].flatten(1)
        horizontal = self.refinement.horizontal([features[name] for name in self.in_features])
        crops = [
            _central(h, self.refinement.window * 2**i, name)
            for i, (h, name) in enumerate(zip(horizontal, self.in_features, strict=True))
        ]
        return self.refinement(embeddings, crops)

    def run(
        self,
        images: ImageList,
        batched_inputs: Sequence[dict[str, Any]],
        targets: list[Instances] | None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """The mask loss of labelled patches; in evaluation mode also each input's windows
        (`propose`), in the coordinates of `images`."""
        labels = self.deepmask.patch_targets(batched_inputs)
        if labels is None and self.training:
            raise ValueError(
                "SharpMask in training mode needs patches: inputs with 'patch_score' and "
                "'patch_mask' (a patch-sampling DATALOADER.MAPPER); got keys "
                f"{sorted(batched_inputs[0])}"
            )
        losses: dict[str, Tensor] = {}
        if labels is not None:
            if len({tuple(s) for s in images.image_sizes}) != 1:
                raise ValueError(
                    f"patches must all have one size, got {sorted(set(images.image_sizes))}"
                )
            score_labels, mask_labels = labels
            trains_mask, _ = self.deepmask.patch_heads(batched_inputs)
            chosen = (score_labels > 0) & trains_mask
            mask_logits = self.patch_mask_logits(images.tensor[chosen])
            loss = sharpmask_loss(mask_logits, mask_labels[chosen], score_labels.numel())
            losses = {"loss_mask": loss}
        if self.training:
            return [], losses
        results = [
            self.propose(images.tensor[i, :, :height, :width])
            for i, (height, width) in enumerate(images.image_sizes)
        ]
        return results, losses

    def propose(self, image: Tensor) -> Instances:
        """One normalised image [3, h, w] -> its top windows refined: Instances((h, w),
        windows [R, 4] XYXY in its pixels, objectness_logits [R] highest first, mask_logits
        [R, M, M]), the windows and scores of `DeepMask.propose`; `postprocess_one` pastes
        them."""
        deepmask, pyramid = self.deepmask, self.deepmask.pyramid
        window, pad = deepmask.head.window, deepmask.window_size // 2
        levels = []
        for scale in pyramid.scales:
            scaled, sy, sx = resize_for_scale(image, scale)
            features = deepmask.backbone(F.pad(scaled, (pad, pad, pad, pad))[None])
            coarse = features[deepmask.in_feature]
            if min(coarse.shape[-2:]) < window:
                levels.append((coarse.new_zeros((0, 0, 0)), coarse.new_zeros((0, 0)), [], sy, sx))
                continue
            embeddings, scores = deepmask.head(coarse)
            horizontal = self.refinement.horizontal([features[n] for n in self.in_features])
            levels.append((embeddings[0], scores[0], [h[0] for h in horizontal], sy, sx))
        scores, level, flat = top_windows([lv[1] for lv in levels], pyramid.topk)
        num = scores.numel()
        windows = scores.new_zeros((num, 4), dtype=torch.float64)
        codes = scores.new_zeros((num, self.refinement.encode.in_features))
        crops = [
            scores.new_zeros((num, stage.vertical[-1].out_channels, window * 2**i, window * 2**i))
            for i, stage in enumerate(self.refinement.stages)
        ]
        for i, (embeddings, level_scores, horizontal, sy, sx) in enumerate(levels):
            chosen = torch.nonzero(level == i).flatten()
            if chosen.numel() == 0:
                continue
            map_width = level_scores.size(1)
            if pyramid.release_decode:
                rows, cols = release_positions(flat[chosen], map_width)
            else:
                rows, cols = flat[chosen] // map_width, flat[chosen] % map_width
            windows[chosen] = window_boxes(
                rows, cols, sy, sx, stride=deepmask.stride, window=deepmask.window_size
            )
            codes[chosen] = embeddings[:, rows, cols].t()
            for k, h in enumerate(horizontal):
                crops[k][chosen] = _windows_of(h, rows * 2**k, cols * 2**k, window * 2**k)
        return Instances(
            tuple(image.shape[-2:]),
            windows=windows,
            objectness_logits=scores,
            mask_logits=self.refinement(codes, crops),
        )

    def postprocess_one(self, result: Instances, height: int, width: int) -> Instances:
        """The windows' refined masks pasted into (height, width), as DeepMask's
        (`DeepMask.postprocess_one`)."""
        return self.deepmask.postprocess_one(result, height, width)
