"""The demo: a detector run over image files, its detections drawn into PNG pictures.

Conventions:

- Inputs are one image file, or the image files directly in a folder (not its subfolders)
  whose extension is one of `IMAGE_EXTENSIONS` in any case, sorted by path. A file named
  directly is taken whatever its extension; reading tells whether it is an image.
- Each picture is written as `output_dir/<stem>.png`, the input's size and BGR colours with
  the detections drawn by `draw_instances`. Inputs that share a stem keep their full name
  (`a.jpg.png`, `a.png.png`); a name still taken after that (the same file name in two
  folders) gets "-1", "-2", ... in input order. Names are decided before anything is
  written, so they do not depend on what the folder already holds (existing files are
  overwritten).
- Pictures are written as the images are processed. An image that cannot be read (missing,
  or not decodable) is, with `on_bad="error"` (DATALOADER.ON_BAD_DATA), an error naming it,
  and the pictures of the images before it stay; with `on_bad="skip"` it is skipped with a
  warning naming it, the skips are counted by kind and summarised at the end, and only when
  no image at all could be read is it an error.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import cv2
from tqdm import tqdm

from detframe.data.coco import OnBad
from detframe.engine.predictor import Predictor, read_image
from detframe.utils.visualizer import draw_instances

__all__ = ["IMAGE_EXTENSIONS", "list_images", "run_demo"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(path: str | os.PathLike) -> list[Path]:
    """The image file `path`, or the image files directly in the folder `path`, sorted.

    Raises:
        FileNotFoundError: nothing exists at `path`.
        ValueError: `path` is a folder without image files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no image file or folder at {path}")
    if not path.is_dir():
        return [path]
    images = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not images:
        raise ValueError(
            f"folder {path} holds no image files (extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return images


def _output_names(images: Sequence[Path]) -> list[str]:
    """A distinct PNG file name for each input, in input order (see the module docstring)."""
    stem_counts = Counter(p.stem for p in images)
    preferred = [p.stem if stem_counts[p.stem] == 1 else p.name for p in images]
    reserved = set(preferred)
    names: list[str] = []
    taken: set[str] = set()
    for name in preferred:
        unique, suffix = name, 0
        while unique in taken or (unique != name and unique in reserved):
            suffix += 1
            unique = f"{name}-{suffix}"
        taken.add(unique)
        names.append(f"{unique}.png")
    return names


def run_demo(
    predictor: Predictor,
    images: Sequence[Path],
    output_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    *,
    score_threshold: float = 0.5,
    on_bad: OnBad = "error",
) -> list[Path]:
    """Predicts on each image, draws the detections with score >= `score_threshold`, and
    writes the pictures into `output_dir` (created if needed).

    Args:
        predictor: runs the detector on one [H, W, 3] uint8 BGR image.
        images: the image files, e.g. from `list_images`.
        output_dir: the folder for the pictures.
        class_names: the name of each contiguous class id, for the labels (ids otherwise).
        score_threshold: detections with a lower score are not drawn.
        on_bad: an image that cannot be read: "error" raises, "skip" skips and counts it.

    Returns:
        The paths written, one per image read, in input order.

    Raises:
        FileNotFoundError, ValueError: with on_bad="error", an image is missing or cannot be
            decoded (named); with "skip", no image could be read.
        OSError: a picture cannot be written.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    skipped: Counter[str] = Counter()
    names = _output_names(images)
    for image_path, name in tqdm(
        zip(images, names, strict=True), total=len(images), unit="img", desc="demo"
    ):
        try:
            image = read_image(image_path)
        except (FileNotFoundError, ValueError) as error:
            if on_bad == "error":
                raise
            kind = "missing image file" if isinstance(error, FileNotFoundError) else "corrupt image"
            skipped[kind] += 1
            logger.warning("skipping %s (%s)", image_path, kind)
            continue
        instances = predictor(image)
        drawn = draw_instances(image, instances, class_names, score_threshold=score_threshold)
        out_path = output_dir / name
        if not cv2.imwrite(str(out_path), drawn):
            raise OSError(f"cannot write picture {out_path}")
        num_drawn = int((instances.scores >= score_threshold).sum())
        logger.info("%s: %d detections drawn -> %s", image_path, num_drawn, out_path)
        written.append(out_path)
    if skipped:
        counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(skipped.items()))
        if not written:
            raise ValueError(f"none of the {len(images)} images could be read ({counts})")
        logger.warning("skipped %d of %d images (%s)", sum(skipped.values()), len(images), counts)
    return written
