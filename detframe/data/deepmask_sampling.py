"""DeepMask training patches: one dataset dict -> one positive or negative patch with its labels.

DeepMask (Pinheiro, Collobert, Dollar, NIPS 2015) learns from square patches. A *positive*
patch has an object centred in it at a canonical size; its labels are score +1 and the
object's mask over the patch's central window. A *negative* patch is off every object in
position or in scale; its labels are score -1 and an all -1 mask (which the model's mask loss
ignores). `DeepMaskPatchMapper` (in MAPPER_REGISTRY, chosen by DATALOADER.MAPPER) draws one
patch per dataset dict in training, and at evaluation maps full images as `DatasetMapper` does,
since DeepMask is evaluated on whole images. The training loader (`detframe.data.build`)
first gives it the dataset (`prepare_dataset`: category counts and image weights) and, with
alternating batches, a head per training step (`step_condition`, `map_conditioned`).

Shapes and frames::

    P   patch (input) side, INPUT.DEEPMASK.INPUT_SIZE       release 192, paper 224
    W   central window side, INPUT.DEEPMASK.WINDOW_SIZE     release 160, paper 224
    O   canonical object size, INPUT.DEEPMASK.OBJECT_SIZE   release 92,  paper 128
    L   mask label side, INPUT.DEEPMASK.LABEL_SIZE          release 112
    image  continuous pixel coordinates: pixel (x, y) covers [x, x + 1] x [y, y + 1]
    patch  a patch with centre (cx, cy) in the image and scale s (patch pixels per image
           pixel) maps image point x to s * (x - cx) + P / 2; the window is its central
           W x W square, and the label grid divides the window into L x L cells

Training output (the interface of the DeepMask model)::

    {"image": uint8 Tensor[3, P, P] in INPUT.FORMAT order, "height": P, "width": P,
     "patch_score": float32 Tensor[] (+1 positive, -1 negative),
     "patch_mask": float32 Tensor[L, L] (+1 on the centred object, -1 elsewhere, including
                   other objects; all -1 for a negative),
     "patch_head": "mask" | "score" (alternating batches only: the head the patch trains)}

Sampling (sizes in patch pixels; sources: the release is facebookresearch/deepmask, its
`DataSampler.lua` and the options of `train.lua`):

- Positive or negative: positive with probability INPUT.DEEPMASK.POSITIVE_FRACTION (0.5: the
  paper trains on equal numbers; the release's score sampler draws either with 0.5).
- A positive centres a *valid* annotation of the image: not a crowd, with a segmentation,
  mask area >= MIN_AREA (100) and box sides >= MIN_SIDE (5) image pixels, the release's
  `maskSampling` test. Among the image's valid annotations one is drawn with probability
  proportional to its category's weight: 1 / (valid annotations of the category in the
  dataset) with CATEGORY_BALANCE, else uniformly. The training loader draws the images in
  proportion to the weights `prepare_dataset` returns: with CATEGORY_BALANCE
  `CategoryBalance.image_weights`, which gives the release's choice, a category uniformly
  and one of its instances uniformly, over the dataset's own categories (the release
  hard-codes COCO's 80); else 1 for every image with a valid annotation. Either way an
  image without one is never drawn (the release would loop forever on a dataset without
  any: here `category_balance` raises). Negatives come from the same images (the release's
  score sampler draws its images uniformly). The scale makes the object's larger box side
  O * 2^u with u uniform in
  +-SCALE_JITTER octaves (0.25: the release's `-scale`, the paper's 2^(+-1/4)); the centre is
  the box centre moved by a uniform +-SHIFT on each axis (16: the release's `-shift`, the
  paper's +-16 px). The label is the object's mask, rasterised directly on the L x L grid
  (the release's `cropMask` rasterises the polygons at label resolution too); polygons and
  RLE both work (the release reads polygons only).
- A negative has a scale 2^v with v uniform in NEGATIVE_LOG2_SCALES ([-3, 2]: the release's
  score-sampling scales) and a centre uniform over the image, redrawn until, for every
  annotation of the image (crowds and tiny ones included, so that nothing that could be a
  positive is labelled negative), the object centre is at least NEGATIVE_SHIFT (32) from the
  patch centre on some axis or its size is off O by at least NEGATIVE_SCALE (1) octave: the
  paper's "at least +-32 pixels or 2^(+-1) in scale from any canonical positive example".
  The release instead demands 48 px of Euclidean distance, mixes coordinates of different
  scales, and after 100 failed draws keeps the last one, which may be a false negative.
  Here after `MAX_NEGATIVE_DRAWS` failures the patch zooms out until the largest object is
  NEGATIVE_SCALE octaves below O, which is a negative by the scale margin.
- Batches: by default every patch is positive with probability POSITIVE_FRACTION and
  trains both heads (the paper's joint loss). With ALTERNATE_BATCHES (the release's
  TrainerDeepMask.lua), each training step is, with probability SCORE_BATCH_FRACTION (the
  release's `-hfreq` 0.5), a score batch (positives with probability POSITIVE_FRACTION,
  "patch_head" "score") and otherwise a mask batch (positives only, "patch_head" "mask");
  the step's kind is drawn from SEED and the step (`step_condition`), and the model trains
  only that head on it (`detframe.modeling.deepmask.deepmask_losses`). Positives for the
  score and for the mask are drawn alike; the release's score positives are not jittered
  (an object's size is quantised to (1, 2^(1/4)] x O and its centre exact).
- The image is resampled bilinearly (as the release's `image.scale`); outside the image the
  patch is INPUT.DEEPMASK.PAD_VALUE (128: the release fills with 0.5 of its 0..1 range).
- Flip (INPUT.RANDOM_FLIP, the release's horizontal flip with probability 0.5) mirrors the
  image and the mask label together.

Randomness comes from the `rng` given to `__call__` (or `map_conditioned`), or the mapper's
own Generator, or one seeded from numpy's global state, which the training loader seeds per
sample (the convention of `DatasetMapper`): the same sample gives the same patch whatever the
workers or resumption. A step's head comes from the Generator the loader seeds per step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch

from detframe.config import declare
from detframe.registry import MAPPER_REGISTRY
from detframe.structures.coco_format import polygons_to_bitmask, rle_to_bitmask

from .coco import DatasetError
from .mapper import DatasetMapper, image_to_tensor

__all__ = [
    "CategoryBalance",
    "DeepMaskPatchMapper",
    "Patch",
    "PatchGeometry",
    "annotation_area",
    "category_balance",
    "invalid_reason",
]

declare(
    "INPUT.DEEPMASK.INPUT_SIZE",
    int,
    192,
    "DeepMask training patch side P (release: iSz + 32 = 192; paper: 224)",
    min=1,
)
declare(
    "INPUT.DEEPMASK.WINDOW_SIZE",
    int,
    160,
    "side of the patch's central window that the mask label covers (release iSz: 160; "
    "paper: 224, the whole patch)",
    min=1,
)
declare(
    "INPUT.DEEPMASK.OBJECT_SIZE",
    int,
    92,
    "canonical size of a positive's object, its larger box side in patch pixels (release: "
    "ceil(160 * 128 / 224) = 92; paper: 128)",
    min=1,
)
declare(
    "INPUT.DEEPMASK.LABEL_SIZE",
    int,
    112,
    "side of the mask label grid over the window (release gSz: 112)",
    min=1,
)
declare(
    "INPUT.DEEPMASK.SHIFT",
    float,
    16.0,
    "positives: uniform centre shift per axis, +- this many patch pixels (release, paper: 16)",
    min=0,
)
declare(
    "INPUT.DEEPMASK.SCALE_JITTER",
    float,
    0.25,
    "positives: object size O * 2^u, u uniform in +- this many octaves (release, paper: 1/4)",
    min=0,
)
declare(
    "INPUT.DEEPMASK.NEGATIVE_SHIFT",
    float,
    32.0,
    "negatives: every object centre at least this many patch pixels off the patch centre on "
    "some axis, or off in scale (paper: 32)",
    min=0,
)
declare(
    "INPUT.DEEPMASK.NEGATIVE_SCALE",
    float,
    1.0,
    "negatives: or every object's size off OBJECT_SIZE by at least this many octaves (paper: 1)",
    min=0,
)
declare(
    "INPUT.DEEPMASK.NEGATIVE_LOG2_SCALES",
    list[float],
    [-3.0, 2.0],
    "negatives: [low, high] of the uniform log2 of the patch scale, patch pixels per image "
    "pixel (release: -3 .. 2)",
)
declare(
    "INPUT.DEEPMASK.POSITIVE_FRACTION",
    float,
    0.5,
    "probability that a training patch is positive (release, paper: 0.5)",
    min=0,
    max=1,
)
declare(
    "INPUT.DEEPMASK.PAD_VALUE",
    int,
    128,
    "value of the patch pixels outside the image, 0..255 (release: 0.5 of 0..1)",
    min=0,
    max=255,
)
declare(
    "INPUT.DEEPMASK.MIN_AREA",
    float,
    100.0,
    "a positive's object needs a mask area of at least this many image pixels (release: 100)",
    min=0,
)
declare(
    "INPUT.DEEPMASK.MIN_SIDE",
    float,
    5.0,
    "a positive's object needs box sides of at least this many image pixels (release: 5)",
    min=0,
)
declare(
    "INPUT.DEEPMASK.CATEGORY_BALANCE",
    bool,
    True,
    "draw a category uniformly, then one of its valid objects (the release), over the "
    "training data; false: an image with a valid object uniformly, then one of its objects",
)
declare(
    "INPUT.DEEPMASK.ALTERNATE_BATCHES",
    bool,
    False,
    "per training step, a batch of positives training the mask head only, or a 1:1 batch "
    "training the score head only (the release); false: every batch trains both (the paper)",
)
declare(
    "INPUT.DEEPMASK.SCORE_BATCH_FRACTION",
    float,
    0.5,
    "with ALTERNATE_BATCHES: probability that a step is a score batch (release -hfreq: 0.5; "
    "0 trains the mask head only, as the release's SharpMask refinement)",
    min=0,
    max=1,
)

# Draws of a negative before falling back to a zoomed-out one (the release's 100 tries).
MAX_NEGATIVE_DRAWS = 100


@dataclass(frozen=True)
class PatchGeometry:
    """Sizes of a DeepMask training patch (see the module docstring for their meaning).

    Attributes:
        input_size: P, the patch side.
        window_size: W, the central window's side, at most P.
        object_size: O, a positive object's canonical larger side.
        label_size: L, the mask label grid's side.
    """

    input_size: int = 192
    window_size: int = 160
    object_size: int = 92
    label_size: int = 112

    def __post_init__(self) -> None:
        for name in ("input_size", "window_size", "object_size", "label_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PatchGeometry.{name} must be >= 1, got {getattr(self, name)}")
        if self.window_size > self.input_size:
            raise ValueError(
                f"PatchGeometry.window_size ({self.window_size}) exceeds input_size "
                f"({self.input_size}): the window is the central part of the patch"
            )


@dataclass(frozen=True)
class Patch:
    """Where a patch lies in its image and how it is labelled.

    Attributes:
        center: (x, y) of the patch centre in image coordinates.
        scale: patch pixels per image pixel.
        annotation: index in the dataset dict's "annotations" of the centred object of a
            positive; None for a negative.
        flip: mirror the patch and its label (along INPUT.RANDOM_FLIP's axis).
    """

    center: tuple[float, float]
    scale: float
    annotation: int | None
    flip: bool = False

    @property
    def positive(self) -> bool:
        """Whether the patch is positive (centres an object)."""
        return self.annotation is not None


def annotation_area(annotation: Mapping[str, Any], height: int, width: int) -> float:
    """The mask area in pixels of an annotation's segmentation (polygons in an image of
    `height` x `width`, or RLE), as COCO's "area" field; 0 without a segmentation."""
    segm = annotation.get("segmentation")
    if not segm:
        return 0.0
    if isinstance(segm, dict):
        return float(mask_util.area(segm))
    polygons = [np.asarray(p, np.float64) for p in segm]
    return float(mask_util.area(mask_util.merge(mask_util.frPyObjects(polygons, height, width))))


def invalid_reason(
    annotation: Mapping[str, Any], height: int, width: int, min_area: float, min_side: float
) -> str | None:
    """Why an annotation (box XYXY) of a `height` x `width` image cannot be a positive's
    object, or None when it can (the release's test: not a crowd, area >= min_area, box sides
    >= min_side; plus a segmentation to make the label from)."""
    if annotation.get("iscrowd", 0):
        return "crowd"
    if not annotation.get("segmentation"):
        return "no segmentation"
    x0, y0, x1, y1 = annotation["bbox"]
    if min(x1 - x0, y1 - y0) < min_side:
        return f"box side < {min_side:g}"
    if annotation_area(annotation, height, width) < min_area:
        return f"area < {min_area:g}"
    return None


@dataclass(frozen=True)
class CategoryBalance:
    """The release's category-balanced choice of a positive's object, over one dataset.

    Attributes:
        category_weights: category id -> 1 / (valid annotations of that category); only the
            categories with a valid annotation appear.
        image_weights: [N] per dataset dict, the sum of its valid annotations' weights
            divided by the number of categories: the probability of drawing the image, when
            the object in it is then drawn in proportion to `category_weights`, so that each
            category comes with probability 1 / (number of categories).
    """

    category_weights: dict[int, float]
    image_weights: np.ndarray


def category_balance(
    dataset: Sequence[Mapping[str, Any]],
    min_area: float = 100.0,
    min_side: float = 5.0,
    source: str = "the dataset",
) -> CategoryBalance:
    """Counts the valid annotations (see `invalid_reason`) of `dataset` by category.

    Raises:
        DatasetError: no annotation is valid; the message names `source` and counts the
            reasons (the release would loop forever).
    """
    counts: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    valid_categories = []
    for record in dataset:
        categories = []
        for ann in record.get("annotations", ()):
            why = invalid_reason(ann, record["height"], record["width"], min_area, min_side)
            if why is None:
                categories.append(int(ann["category_id"]))
            else:
                reasons[why] += 1
        counts.update(categories)
        valid_categories.append(categories)
    if not counts:
        found = ", ".join(f"{why}: {n}" for why, n in sorted(reasons.items())) or "none"
        raise DatasetError(
            f"{source}: no annotation of its {len(dataset)} images can be a DeepMask "
            f"positive (a non-crowd object with a segmentation, area >= {min_area:g} and box "
            f"sides >= {min_side:g}); annotations by reason: {found}"
        )
    weights = {category: 1.0 / n for category, n in counts.items()}
    image_weights = np.array(
        [sum(weights[c] for c in categories) / len(weights) for categories in valid_categories]
    )
    return CategoryBalance(weights, image_weights)


def _label_affine(patch: Patch, geometry: PatchGeometry) -> np.ndarray:
    """[2, 3] affine from image to label-grid coordinates (continuous, see the module
    docstring): x -> g * (x - cx) + L / 2 with g = scale * L / W."""
    g = patch.scale * geometry.label_size / geometry.window_size
    (cx, cy), half = patch.center, geometry.label_size / 2
    return np.array([[g, 0.0, half - g * cx], [0.0, g, half - g * cy]])


def _pixel_affine(affine: np.ndarray) -> np.ndarray:
    """A continuous-coordinate affine as OpenCV's, whose integer coordinates are pixel
    centres: u + 0.5 = A (x + 0.5)."""
    out = affine.copy()
    out[:, 2] += affine[:, :2].sum(axis=1) * 0.5 - 0.5
    return out


@MAPPER_REGISTRY.register()
class DeepMaskPatchMapper(DatasetMapper):
    """DeepMask's training patches (see the module docstring); at evaluation, `DatasetMapper`.

    Args:
        is_train: patches in training; full images (DatasetMapper) otherwise.
        geometry: P, W, O and L.
        shift: positives' centre shift, +- patch pixels per axis.
        scale_jitter: positives' size jitter, +- octaves around O.
        negative_shift, negative_scale: negatives' margins (patch pixels, octaves).
        negative_log2_scales: (low, high) of the negatives' uniform log2 scale.
        positive_fraction: probability of a positive patch.
        flip: "none", "horizontal" or "vertical": mirror with probability 0.5.
        pad_value: patch value outside the image, 0..255.
        min_area, min_side: what a positive's object needs (see `invalid_reason`).
        category_balance: weight a positive's object by its category's weight in the
            dataset given to `prepare_dataset` (which must come first); False: uniformly
            among the image's valid objects.
        alternate_batches: give the training loader a head per step (see the module
            docstring); False: every patch trains both heads.
        score_batch_fraction: with `alternate_batches`, the probability of a score step.
        kwargs: DatasetMapper's arguments (image_format, on_bad and seed serve both modes;
            augmentations, mask_on, ... only evaluation).
    """

    def __init__(
        self,
        is_train: bool,
        geometry: PatchGeometry = PatchGeometry(),
        shift: float = 16.0,
        scale_jitter: float = 0.25,
        negative_shift: float = 32.0,
        negative_scale: float = 1.0,
        negative_log2_scales: tuple[float, float] = (-3.0, 2.0),
        positive_fraction: float = 0.5,
        flip: Literal["none", "horizontal", "vertical"] = "horizontal",
        pad_value: int = 128,
        min_area: float = 100.0,
        min_side: float = 5.0,
        category_balance: bool = False,
        alternate_batches: bool = False,
        score_batch_fraction: float = 0.5,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("augmentations", ())
        super().__init__(is_train, **kwargs)
        low, high = negative_log2_scales
        if not low <= high:
            raise ValueError(
                f"negative_log2_scales must be (low, high), got {negative_log2_scales}"
            )
        if flip not in ("none", "horizontal", "vertical"):
            raise ValueError(f"flip must be 'none', 'horizontal' or 'vertical', got {flip!r}")
        for name, value in (
            ("positive_fraction", positive_fraction),
            ("score_batch_fraction", score_batch_fraction),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.geometry = geometry
        self.shift, self.scale_jitter = shift, scale_jitter
        self.negative_shift, self.negative_scale = negative_shift, negative_scale
        self.negative_log2_scales = (float(low), float(high))
        self.positive_fraction, self.flip, self.pad_value = positive_fraction, flip, pad_value
        self.min_area, self.min_side = min_area, min_side
        self.category_balance = category_balance
        self.alternate_batches, self.score_batch_fraction = alternate_batches, score_batch_fraction
        # category id -> weight of a positive's object, from `prepare_dataset`
        self.category_weights: dict[int, float] | None = None

    @classmethod
    def from_config(cls, cfg: Any, is_train: bool) -> dict[str, Any]:
        """Constructor arguments from INPUT.DEEPMASK.*, INPUT.RANDOM_FLIP and, at evaluation,
        `DatasetMapper.from_config(cfg, False)`."""
        deepmask = cfg.INPUT.DEEPMASK
        kwargs = DatasetMapper.from_config(cfg, is_train)
        if is_train:
            kwargs["augmentations"] = []
        kwargs.update(
            geometry=PatchGeometry(
                deepmask.INPUT_SIZE, deepmask.WINDOW_SIZE, deepmask.OBJECT_SIZE, deepmask.LABEL_SIZE
            ),
            shift=deepmask.SHIFT,
            scale_jitter=deepmask.SCALE_JITTER,
            negative_shift=deepmask.NEGATIVE_SHIFT,
            negative_scale=deepmask.NEGATIVE_SCALE,
            negative_log2_scales=_pair(deepmask.NEGATIVE_LOG2_SCALES),
            positive_fraction=deepmask.POSITIVE_FRACTION,
            flip=cfg.INPUT.RANDOM_FLIP,
            pad_value=deepmask.PAD_VALUE,
            min_area=deepmask.MIN_AREA,
            min_side=deepmask.MIN_SIDE,
            category_balance=deepmask.CATEGORY_BALANCE,
            alternate_batches=deepmask.ALTERNATE_BATCHES,
            score_batch_fraction=deepmask.SCORE_BATCH_FRACTION,
        )
        return kwargs

    def prepare_dataset(
        self, dataset: Sequence[Mapping[str, Any]], source: str = "the dataset"
    ) -> np.ndarray | None:
        """The training images' sampling weights [len(dataset)], and with category balance
        the category weights of their positives (`category_balance`); None at evaluation.

        A weight is the image's `CategoryBalance.image_weights` with category balance, else
        1 for an image with a valid annotation; 0 (never drawn) for an image without one.

        Raises:
            DatasetError: in training, no annotation of `dataset` is valid (naming `source`).
        """
        if not self.is_train:
            return None
        balance = category_balance(dataset, self.min_area, self.min_side, source)
        if self.category_balance:
            self.category_weights = balance.category_weights
            return balance.image_weights
        return (balance.image_weights > 0).astype(np.float64)

    def step_condition(self, rng: np.random.Generator) -> Literal["mask", "score"] | None:
        """The head a training step trains with alternating batches, drawn with `rng`:
        "score" with probability `score_batch_fraction`, else "mask"; None otherwise."""
        if not (self.is_train and self.alternate_batches):
            return None
        return "score" if rng.random() < self.score_batch_fraction else "mask"

    def map_conditioned(
        self,
        dataset_dict: dict[str, Any],
        condition: Literal["mask", "score"],
        rng: np.random.Generator | None = None,
    ) -> dict[str, Any] | None:
        """A training patch of a step that trains head `condition`: a positive for "mask",
        positive with probability `positive_fraction` for "score"; with "patch_head":
        `condition`. `rng`, returns and raises as `__call__`."""
        if condition not in ("mask", "score"):
            raise ValueError(f"condition must be 'mask' or 'score', got {condition!r}")
        rng = self._rng(rng)
        positive = condition == "mask" or bool(rng.random() < self.positive_fraction)
        mapped = self.patch(dataset_dict, rng, positive)
        if mapped is not None:
            mapped["patch_head"] = condition
        return mapped

    def __call__(
        self, dataset_dict: dict[str, Any], rng: np.random.Generator | None = None
    ) -> dict[str, Any] | None:
        """A training patch of `dataset_dict` (not modified), positive with probability
        `positive_fraction`; at evaluation, `DatasetMapper.__call__`.

        Args:
            rng: draws every random choice; if None, the mapper's own Generator (`seed`) or
                one seeded from numpy's global state.

        Returns:
            The patch dict of the module docstring; None (counted in `skipped`) when the
            image cannot be read, or a positive is drawn from an image without a valid
            annotation, with on_bad="skip".

        Raises:
            DatasetError: with on_bad="error", as DatasetMapper, or for a positive from an
                image without a valid annotation (the message names the file and why).
        """
        if not self.is_train:
            return super().__call__(dataset_dict, rng)
        rng = self._rng(rng)
        return self.patch(dataset_dict, rng, bool(rng.random() < self.positive_fraction))

    def _rng(self, rng: np.random.Generator | None) -> np.random.Generator:
        """`rng`, else the mapper's own Generator, else one seeded from numpy's global RNG."""
        if rng is not None:
            return rng
        return self.rng if self.rng is not None else np.random.default_rng(np.random.randint(2**31))

    def patch(
        self, dataset_dict: dict[str, Any], rng: np.random.Generator, positive: bool
    ) -> dict[str, Any] | None:
        """A positive or a negative training patch of `dataset_dict`, drawn with `rng`.
        Returns and raises as `__call__`."""
        annotations = dataset_dict.get("annotations", [])
        if positive:
            placed = self.sample_positive(dataset_dict, rng)
            if placed is None:
                return None
        else:
            placed = self.sample_negative(
                annotations, dataset_dict["height"], dataset_dict["width"], rng
            )
        image = self.read_image(dataset_dict)
        if image is None:
            return None
        return self.render(image, annotations, placed)

    def _flip(self, rng: np.random.Generator) -> bool:
        return self.flip != "none" and bool(rng.random() < 0.5)

    def sample_positive(
        self, dataset_dict: Mapping[str, Any], rng: np.random.Generator
    ) -> Patch | None:
        """A positive `Patch` centred on one of the valid annotations of `dataset_dict`;
        None (counted) with on_bad="skip" when it has none.

        Raises:
            DatasetError: with on_bad="error", no valid annotation; the message names the
                file and each annotation's reason. Also a category without a weight.
            RuntimeError: category balance before `prepare_dataset`.
        """
        height, width = dataset_dict["height"], dataset_dict["width"]
        annotations = dataset_dict.get("annotations", [])
        reasons = [
            invalid_reason(ann, height, width, self.min_area, self.min_side) for ann in annotations
        ]
        valid = [i for i, why in enumerate(reasons) if why is None]
        if not valid:
            file_name = dataset_dict.get("file_name", "?")
            found = ", ".join(f"{why}: {n}" for why, n in sorted(Counter(reasons).items()))
            return self._bad(
                "no valid annotation for a positive patch",
                f"{file_name}: none of its {len(annotations)} annotations can be a DeepMask "
                f"positive (annotations by reason: {found or 'none'}); drop such images from "
                "the training data or set DATALOADER.ON_BAD_DATA=skip",
            )
        if not self.category_balance:
            weights = np.ones(len(valid))
        elif self.category_weights is None:
            raise RuntimeError(
                "DeepMaskPatchMapper(category_balance=True) weights a positive's object by "
                "the category counts of its dataset: call prepare_dataset(dataset) first (the "
                "training loader does)"
            )
        else:
            categories = [int(annotations[i]["category_id"]) for i in valid]
            missing = sorted(set(categories) - self.category_weights.keys())
            if missing:
                raise DatasetError(
                    f"{dataset_dict.get('file_name', '?')}: categories {missing} have no "
                    f"weight in category_weights (which has {sorted(self.category_weights)}): "
                    "the weights were counted over another dataset"
                )
            weights = np.array([self.category_weights[c] for c in categories])
        chosen = valid[rng.choice(len(valid), p=weights / weights.sum())]
        x0, y0, x1, y1 = annotations[chosen]["bbox"]
        jitter = rng.uniform(-self.scale_jitter, self.scale_jitter)
        scale = self.geometry.object_size * 2.0**jitter / max(x1 - x0, y1 - y0)
        dx, dy = rng.uniform(-self.shift, self.shift, size=2)
        center = ((x0 + x1) / 2 + dx / scale, (y0 + y1) / 2 + dy / scale)
        return Patch(center, scale, chosen, self._flip(rng))

    def sample_negative(
        self,
        annotations: Sequence[Mapping[str, Any]],
        height: int,
        width: int,
        rng: np.random.Generator,
    ) -> Patch:
        """A negative `Patch` of a `height` x `width` image with `annotations` (boxes XYXY),
        off every one of them by the margins (see the module docstring)."""
        boxes = np.array([ann["bbox"] for ann in annotations], np.float64).reshape(-1, 4)
        centers = (boxes[:, :2] + boxes[:, 2:]) / 2
        sizes = (boxes[:, 2:] - boxes[:, :2]).max(axis=1)
        low, high = self.negative_log2_scales
        for _ in range(MAX_NEGATIVE_DRAWS):
            scale = 2.0 ** rng.uniform(low, high)
            center = rng.uniform((0.0, 0.0), (width, height))
            offsets = np.abs(centers - center).max(axis=1) * scale
            octaves = np.abs(np.log2(sizes * scale / self.geometry.object_size))
            if np.all((offsets >= self.negative_shift) | (octaves >= self.negative_scale)):
                return Patch((float(center[0]), float(center[1])), scale, None, self._flip(rng))
        scale = self.geometry.object_size * 2.0**-self.negative_scale / sizes.max()
        center = rng.uniform((0.0, 0.0), (width, height))
        return Patch((float(center[0]), float(center[1])), scale, None, self._flip(rng))

    def render(
        self, image: np.ndarray, annotations: Sequence[Mapping[str, Any]], patch: Patch
    ) -> dict[str, Any]:
        """The patch dict (see the module docstring) of `patch` in `image` [H, W, 3] uint8
        (already in `image_format`), whose objects are `annotations`."""
        geometry = self.geometry
        size = geometry.input_size
        to_patch = np.array(
            [
                [patch.scale, 0.0, size / 2 - patch.scale * patch.center[0]],
                [0.0, patch.scale, size / 2 - patch.scale * patch.center[1]],
            ]
        )
        pixels = cv2.warpAffine(
            image,
            _pixel_affine(to_patch),
            (size, size),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(self.pad_value,) * 3,
        )
        if patch.annotation is None:
            mask = np.zeros((geometry.label_size, geometry.label_size), bool)
        else:
            mask = self._label(annotations[patch.annotation], patch)
        if patch.flip:
            axis = 1 if self.flip == "horizontal" else 0
            pixels, mask = np.flip(pixels, axis), np.flip(mask, axis)
        label = np.where(mask, 1.0, -1.0).astype(np.float32)
        return {
            "image": image_to_tensor(pixels),
            "height": size,
            "width": size,
            "patch_score": torch.tensor(1.0 if patch.positive else -1.0),
            "patch_mask": torch.from_numpy(np.ascontiguousarray(label)),
        }

    def _label(self, annotation: Mapping[str, Any], patch: Patch) -> np.ndarray:
        """[L, L] bool: the annotation's mask on the label grid. Polygons are moved to the
        grid and rasterised there; an RLE is decoded and resampled bilinearly, then
        thresholded at 0.5."""
        side = self.geometry.label_size
        affine = _label_affine(patch, self.geometry)
        segm = annotation["segmentation"]
        if isinstance(segm, dict):
            full = rle_to_bitmask(segm).astype(np.float32)
            grid = cv2.warpAffine(full, _pixel_affine(affine), (side, side), flags=cv2.INTER_LINEAR)
            return grid >= 0.5
        polygons = []
        for polygon in segm:
            points = np.asarray(polygon, np.float64).reshape(-1, 2)
            polygons.append((points * affine[:, :2].diagonal() + affine[:, 2]).ravel())
        return polygons_to_bitmask(polygons, side, side)


def _pair(values: Sequence[float]) -> tuple[float, float]:
    """INPUT.DEEPMASK.NEGATIVE_LOG2_SCALES as (low, high)."""
    if len(values) != 2 or not values[0] <= values[1]:
        raise ValueError(
            f"INPUT.DEEPMASK.NEGATIVE_LOG2_SCALES must be [low, high], got {list(values)}"
        )
    return float(values[0]), float(values[1])
