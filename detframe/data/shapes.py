"""Synthetic "shapes" instance-segmentation dataset: deterministic, COCO format, small.

The built-in data of detframe's quickstart, tests and demos. `generate_shapes(root, config)`
writes a dataset folder::

    root/annotations.json      COCO: images, annotations, categories, info
    root/images/000000.png     one PNG per image (BGR as written by cv2.imwrite)

Conventions:

- Coordinates are in pixels with pycocotools' convention: pixel (x, y) covers the square
  [x, x + 1] x [y, y + 1], so a polygon vertex at (0, 0) is the top-left corner of the image.
- `image_size` is (height, width) like an array shape; an int means a square image.
- Categories are `config.classes` in order, with ids 1..K (0 stays free for background).
  Image and annotation ids start at 1; an image's `file_name` is relative to `root/images`.
- Every image has a textured background (smooth noise, a gradient or stripes) and
  `min_instances..max_instances` solid-coloured shapes of the kinds in `classes` (varied size,
  position, rotation), each coloured to stand out from what lies under it. Every kind is a
  polygon (a circle or an ellipse has a vertex every ~2 px of its outline), so its mask is
  exactly the polygon rasterised by pycocotools: convex (circle, square, triangle, pentagon,
  hexagon, ellipse) or not (star, cross). `SHAPE_KINDS` lists them all; the default classes
  are `SHAPE_CLASSES`, circle, square and triangle. Shapes are painted in order, so a later
  shape occludes earlier ones, and each annotation describes the *visible* part of its
  instance: `segmentation` is the shape's polygon when nothing covers it (it rasterises
  exactly to the visible mask), otherwise an RLE dict with `counts` as a str;
  `bbox` (XYWH) and `area` are those of the visible mask; `iscrowd` is 0. An instance whose
  visible area is below `min_visible_fraction` of its full area or below `min_visible_pixels`
  is not annotated (its visible pixels stay in the image), so targets stay meaningful; the
  image's count of shapes before this filtering is within [min_instances, max_instances].
- Image i is drawn from `numpy.random.default_rng([seed, i])`, so it does not depend on how
  many images the dataset has; the same config gives byte-identical JSON and PNGs.
- `info["config"]` holds the config that generated the folder. Generating into a folder that
  already holds the same config's dataset reuses it; a different config regenerates it. The
  dataset is built in a temporary folder beside `root` and renamed into place, so an
  interrupted run never leaves a half-written dataset at `root`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "SHAPE_CLASSES",
    "SHAPE_KINDS",
    "RenderedImage",
    "ShapeInstance",
    "ShapesConfig",
    "default_shapes_root",
    "generate_shapes",
    "render_image",
    "shapes_split",
]

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
"""The default `classes`: the shapes of the quickstart's data."""


# Every kind is a polygon given in polar form about its centre: vertex k lies at distance
# size * radii[k] from the centre, at angle rotation + phases[k]. `size` is a circle's
# diameter, a square's side and an equilateral triangle's side; for the other kinds it is
# the diameter of the circle through their outermost vertices (an ellipse's major axis).
def _round_vertex_count(size: float) -> int:
    """Vertices of a circle or an ellipse of `size`: one every ~2 px of a circle's outline."""
    return max(16, math.ceil(math.pi * size / 2))


def _regular(count: int, circumradius: float) -> tuple[np.ndarray, np.ndarray]:
    """A regular `count`-gon whose first vertex is at phase 0."""
    return np.full(count, circumradius), 2 * math.pi * np.arange(count) / count


def _star(size: float) -> tuple[np.ndarray, np.ndarray]:
    """A five-pointed star, inner vertices at 0.45 of the outer radius (not convex)."""
    return np.tile([0.5, 0.5 * 0.45], 5), math.pi * np.arange(10) / 5


def _ellipse(size: float) -> tuple[np.ndarray, np.ndarray]:
    """An ellipse with axes size and size / 2, the major one at phase 0."""
    count = _round_vertex_count(size)
    t = 2 * math.pi * np.arange(count) / count
    x, y = 0.5 * np.cos(t), 0.25 * np.sin(t)
    return np.hypot(x, y), np.arctan2(y, x)


def _cross(size: float) -> tuple[np.ndarray, np.ndarray]:
    """A plus sign of two bars whose width is a third of their length (not convex)."""
    half_length = 0.5 / math.hypot(1, 1 / 3)  # the bars' corners lie on the circumcircle
    a, b = half_length, half_length / 3
    x = np.array([a, a, b, b, -b, -b, -a, -a, -b, -b, b, b])
    y = np.array([-b, b, b, a, a, b, b, -b, -b, -a, -a, -b])
    return np.hypot(x, y), np.arctan2(y, x)


_OUTLINES: dict[str, Callable[[float], tuple[np.ndarray, np.ndarray]]] = {
    "circle": lambda size: _regular(_round_vertex_count(size), 0.5),
    "square": lambda size: _regular(4, 1 / math.sqrt(2)),
    "triangle": lambda size: _regular(3, 1 / math.sqrt(3)),
    "pentagon": lambda size: _regular(5, 0.5),
    "hexagon": lambda size: _regular(6, 0.5),
    "star": _star,
    "ellipse": _ellipse,
    "cross": _cross,
}
# The circumradius of each kind as a fraction of its size: a shape is placed at least this
# far from the image border, so it lies inside the image at any rotation.
_CIRCUMRADIUS: dict[str, float] = {
    kind: float(outline(1.0)[0].max()) for kind, outline in _OUTLINES.items()
}

SHAPE_KINDS: tuple[str, ...] = tuple(_OUTLINES)
"""Every kind of shape the generator can draw: the names `classes` may list."""

_GENERATOR = "detframe.data.shapes"
_FORMAT_VERSION = 1  # bump when the drawing changes, so that caches regenerate
_ANNOTATIONS = "annotations.json"
_IMAGES = "images"
_MIN_IMAGE_SIDE = 16
_MIN_CONTRAST = 80.0  # wanted distance (BGR, 0..255) of a shape's colour from what lies under it
_COLOR_CANDIDATES = 32
_SPLITS: dict[str, tuple[int, int]] = {"shapes_train": (800, 0), "shapes_val": (200, 1)}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _bad(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"ShapesConfig.{name}={value!r} is invalid: {why}")


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate. Validated on construction (ValueError naming the field).

    Attributes:
        num_images: number of images (>= 1).
        image_size: (height, width), or an int for a square image; stored as a tuple.
        min_instances: fewest shapes drawn per image (>= 0).
        max_instances: most shapes drawn per image (>= max(1, min_instances)).
        min_size: smallest shape size in pixels; None means 1/8 of the shorter image side.
        max_size: largest shape size in pixels; None means 3/8 of the shorter image side. A
            shape of this size must fit the image at any rotation: max_size * sqrt(2) <= side
            with squares, max_size <= side without.
        classes: kinds of shape drawn, distinct names from SHAPE_KINDS; category ids follow
            this order.
        seed: dataset seed (>= 0); image i uses `numpy.random.default_rng([seed, i])`.
        min_visible_fraction: instances with less than this fraction of their shape visible
            are not annotated.
        min_visible_pixels: instances with fewer visible pixels are not annotated (>= 1).
    """

    num_images: int
    image_size: int | tuple[int, int] = 128
    min_instances: int = 1
    max_instances: int = 4
    min_size: float | None = None
    max_size: float | None = None
    classes: tuple[str, ...] = SHAPE_CLASSES
    seed: int = 0
    min_visible_fraction: float = 0.3
    min_visible_pixels: int = 16

    def __post_init__(self) -> None:
        if not _is_int(self.num_images) or self.num_images < 1:
            raise _bad("num_images", self.num_images, "expected an int >= 1")
        size = self.image_size
        if _is_int(size):
            size = (size, size)
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(_is_int(s) and s >= _MIN_IMAGE_SIDE for s in size)
        ):
            why = f"expected an int or (height, width), each >= {_MIN_IMAGE_SIDE}"
            raise _bad("image_size", self.image_size, why)
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        side = min(self.image_size)
        if not _is_int(self.min_instances) or self.min_instances < 0:
            raise _bad("min_instances", self.min_instances, "expected an int >= 0")
        if not _is_int(self.max_instances) or self.max_instances < max(1, self.min_instances):
            raise _bad(
                "max_instances", self.max_instances, "expected an int >= max(1, min_instances)"
            )
        classes = self.classes
        if (
            isinstance(classes, str)
            or not isinstance(classes, (tuple, list))
            or not classes
            or len(set(classes)) != len(classes)
            or any(c not in SHAPE_KINDS for c in classes)
        ):
            raise _bad("classes", classes, f"expected distinct names from {SHAPE_KINDS}")
        object.__setattr__(self, "classes", tuple(classes))
        min_size = side / 8 if self.min_size is None else self.min_size
        max_size = 3 * side / 8 if self.max_size is None else self.max_size
        if not _is_number(min_size) or min_size < 1:
            raise _bad("min_size", self.min_size, "expected a number >= 1")
        if not _is_number(max_size) or max_size < min_size:
            raise _bad("max_size", self.max_size, f"expected a number >= min_size={min_size}")
        widest = max(self.classes, key=_CIRCUMRADIUS.__getitem__)
        if max_size * 2 * _CIRCUMRADIUS[widest] > side:
            raise _bad(
                "max_size",
                self.max_size,
                f"a {widest} of this size does not fit the image at every rotation: needs "
                f"max_size * {2 * _CIRCUMRADIUS[widest]:.4g} <= min(image_size) = {side}",
            )
        object.__setattr__(self, "min_size", float(min_size))
        object.__setattr__(self, "max_size", float(max_size))
        if not _is_int(self.seed) or self.seed < 0:
            raise _bad("seed", self.seed, "expected an int >= 0")
        if not _is_number(self.min_visible_fraction) or not 0 <= self.min_visible_fraction <= 1:
            raise _bad("min_visible_fraction", self.min_visible_fraction, "expected 0..1")
        if not _is_int(self.min_visible_pixels) or self.min_visible_pixels < 1:
            raise _bad("min_visible_pixels", self.min_visible_pixels, "expected an int >= 1")

    @property
    def height(self) -> int:
        return self.image_size[0]  # type: ignore[index]

    @property
    def width(self) -> int:
        return self.image_size[1]  # type: ignore[index]

    def to_json(self) -> dict[str, Any]:
        """The config as plain JSON values (what `info["config"]` stores)."""
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True, eq=False)
class ShapeInstance:
    """One drawn shape. Masks are [H, W] bool.

    Attributes:
        category_id: 1-based index into `config.classes`.
        polygon: [V, 2] vertices (x, y), rounded to 0.01 px; rasterises exactly to `mask`.
        color: (B, G, R) fill colour.
        mask: the whole shape.
        visible: the pixels of the shape not covered by later shapes.
        annotated: whether `visible` passes the config's visibility thresholds.
    """

    category_id: int
    polygon: np.ndarray
    color: tuple[int, int, int]
    mask: np.ndarray
    visible: np.ndarray
    annotated: bool


@dataclass(frozen=True, eq=False)
class RenderedImage:
    """One image: `image` and `background` are [H, W, 3] uint8 BGR; `shapes` in paint order,
    including the ones too occluded to annotate."""

    image: np.ndarray
    background: np.ndarray
    shapes: list[ShapeInstance] = field(default_factory=list)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A low-contrast texture: smooth noise, a linear gradient or stripes, plus fine grain."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    theta = rng.uniform(0, 2 * math.pi)
    along = xs * math.cos(theta) + ys * math.sin(theta)
    kind = rng.integers(3)
    if kind == 0:  # smooth noise: a coarse random grid, upsampled
        grid = rng.uniform(-1, 1, size=(int(rng.integers(3, 8)), int(rng.integers(3, 8))))
        pattern = np.clip(cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC), -1, 1)
    elif kind == 1:  # gradient
        pattern = 2 * (along - along.min()) / max(np.ptp(along), 1e-6) - 1
    else:  # stripes
        pattern = np.sin(2 * math.pi * along / rng.uniform(6, 24) + rng.uniform(0, 2 * math.pi))
    base = rng.uniform(40, 215, size=3)
    amplitude = rng.uniform(-40, 40, size=3)
    grain = rng.normal(0, 3, size=(height, width, 3))
    image = base + amplitude * pattern[..., None] + grain
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _polygon(kind: str, size: float, angle: float, cx: float, cy: float) -> np.ndarray:
    """[V, 2] vertices (x, y) of a `kind` of `size` centred at (cx, cy) and rotated by
    `angle`, rounded to 0.01 px."""
    radii, phases = _OUTLINES[kind](size)
    angles = angle + phases
    radius = size * radii
    xy = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    return np.round(xy, 2)


def _rasterize(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W] bool mask of a polygon, rasterised by pycocotools (as `annToMask` does)."""
    rles = mask_utils.frPyObjects([polygon.ravel().tolist()], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _pick_color(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A colour far from the pixels `under` [P, 3]: the first random candidate whose distance
    to 95% of those pixels is >= _MIN_CONTRAST, else the candidate that comes closest."""
    candidates = rng.integers(0, 256, size=(_COLOR_CANDIDATES, 3))
    dist = np.linalg.norm(candidates[:, None, :] - under[None, :, :].astype(np.float64), axis=2)
    score = np.percentile(dist, 5, axis=1)
    good = np.flatnonzero(score >= _MIN_CONTRAST)
    best = good[0] if good.size else int(np.argmax(score))
    blue, green, red = (int(c) for c in candidates[best])
    return blue, green, red


def render_image(config: ShapesConfig, index: int) -> RenderedImage:
    """Draws image `index` (0-based) of the dataset `config` describes. Deterministic."""
    rng = np.random.default_rng([config.seed, index])
    height, width = config.height, config.width
    background = _background(rng, height, width)
    image = background.copy()
    drawn: list[tuple[int, np.ndarray, tuple[int, int, int], np.ndarray]] = []
    for _ in range(int(rng.integers(config.min_instances, config.max_instances + 1))):
        label = int(rng.integers(len(config.classes)))
        kind = config.classes[label]
        size = rng.uniform(config.min_size, config.max_size)
        radius = size * _CIRCUMRADIUS[kind]
        polygon = _polygon(
            kind,
            size,
            rng.uniform(0, 2 * math.pi),
            rng.uniform(radius, width - radius),
            rng.uniform(radius, height - radius),
        )
        mask = _rasterize(polygon, height, width)
        color = _pick_color(rng, image[mask])
        image[mask] = color
        drawn.append((label + 1, polygon, color, mask))

    shapes: list[ShapeInstance] = []
    covered = np.zeros((height, width), dtype=bool)
    for category_id, polygon, color, mask in reversed(drawn):
        visible = mask & ~covered
        covered |= mask
        area, full = int(visible.sum()), int(mask.sum())
        annotated = area >= config.min_visible_pixels and area >= config.min_visible_fraction * full
        shapes.append(ShapeInstance(category_id, polygon, color, mask, visible, annotated))
    shapes.reverse()
    return RenderedImage(image=image, background=background, shapes=shapes)


def _annotation(shape: ShapeInstance, ann_id: int, image_id: int) -> dict[str, Any]:
    height, width = shape.visible.shape
    rle = mask_utils.encode(np.asfortranarray(shape.visible, dtype=np.uint8))
    if np.array_equal(shape.visible, shape.mask):
        segmentation: Any = [shape.polygon.ravel().tolist()]
    else:
        segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": shape.category_id,
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def _info(config: ShapesConfig) -> dict[str, Any]:
    return {
        "description": "detframe synthetic shapes",
        "generator": _GENERATOR,
        "format_version": _FORMAT_VERSION,
        "config": config.to_json(),
    }


def _write_dataset(folder: Path, config: ShapesConfig) -> None:
    (folder / _IMAGES).mkdir()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(config.num_images):
        rendered = render_image(config, index)
        file_name = f"{index:06d}.png"
        path = folder / _IMAGES / file_name
        if not cv2.imwrite(str(path), rendered.image, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
            raise OSError(f"cv2.imwrite could not write {path}")
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": file_name, "height": config.height, "width": config.width}
        )
        for shape in rendered.shapes:
            if shape.annotated:
                annotations.append(_annotation(shape, len(annotations) + 1, image_id))
    dataset = {
        "info": _info(config),
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(config.classes)
        ],
    }
    text = json.dumps(dataset, separators=(",", ":"))
    (folder / _ANNOTATIONS).write_text(text + "\n", encoding="utf-8")


def _read_info(root: Path) -> dict[str, Any] | None:
    """The `info` of a shapes dataset at `root`, or None if `root` holds none."""
    try:
        with open(root / _ANNOTATIONS, encoding="utf-8") as f:
            dataset = json.load(f)
    except (OSError, ValueError):
        return None
    info = dataset.get("info") if isinstance(dataset, dict) else None
    if not isinstance(info, dict) or info.get("generator") != _GENERATOR:
        return None
    return info


def _holds(root: Path, config: ShapesConfig) -> bool:
    """Whether `root` holds the complete dataset of `config`."""
    info = _read_info(root)
    return (
        info is not None
        and info.get("format_version") == _FORMAT_VERSION
        and info.get("config") == config.to_json()
        and all((root / _IMAGES / f"{i:06d}.png").is_file() for i in range(config.num_images))
    )


def generate_shapes(root: str | Path, config: ShapesConfig) -> Path:
    """Writes the dataset of `config` to `root` (see the module docstring) unless it is there.

    Returns the path of `root/annotations.json`. A `root` that holds another shapes dataset
    (or is empty) is replaced; a non-empty `root` that is not a shapes dataset is left alone
    and raises FileExistsError.
    """
    root = Path(root)
    if _holds(root, config):
        return root / _ANNOTATIONS
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and not _read_info(root):
        raise FileExistsError(f"{root} exists and is not a shapes dataset; not overwriting it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must stay readable
        _write_dataset(tmp, config)
        if not _holds(root, config):  # another process may have finished it meanwhile
            if root.exists():  # move the stale dataset aside, then remove it
                stale = Path(
                    tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent)
                )
                os.replace(root, stale / "dataset")
                shutil.rmtree(stale)
            os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root / _ANNOTATIONS


def default_shapes_root() -> Path:
    """Where the shapes splits are cached: `$DETFRAME_DATA/shapes` if DETFRAME_DATA is set,
    else `~/.cache/detframe/shapes`. Each split lives in a subfolder named after it."""
    data = os.environ.get("DETFRAME_DATA")
    return Path(data) / "shapes" if data else Path.home() / ".cache" / "detframe" / "shapes"


def shapes_split(
    name: str, num_images: int | None = None, image_size: int | tuple[int, int] = 128
) -> ShapesConfig:
    """The config of a named split: "shapes_train" (800 images, seed 0) or "shapes_val" (200
    images, seed 1). `num_images` and `image_size` override the defaults."""
    if name not in _SPLITS:
        raise ValueError(f"unknown shapes split {name!r}; known splits: {sorted(_SPLITS)}")
    default_count, seed = _SPLITS[name]
    count = default_count if num_images is None else num_images
    return ShapesConfig(num_images=count, image_size=image_size, seed=seed)
