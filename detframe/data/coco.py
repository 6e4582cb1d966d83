"""Loading a COCO-format annotation file into detframe's dataset dicts.

`load_coco_json(json_file, image_root)` returns one dict per image (detectron2's standard
dataset dicts)::

    {"file_name": str (image_root joined with the image's file_name), "height": int,
     "width": int, "image_id": int (the COCO image id),
     "annotations": [{"bbox": [x1, y1, x2, y2] (XYXY, absolute pixels, floats),
                      "category_id": int (contiguous, 0-based),
                      "segmentation": polygons [[x0, y0, x1, y1, ...], ...] or an RLE dict
                                      {"size": [H, W], "counts": str} (compressed),
                      "iscrowd": 0 or 1}, ...],
     # with a proposals file:
     "proposal_boxes": np.ndarray[R, 4] float32 XYXY,
     "proposal_objectness_logits": np.ndarray[R] float32, highest first}

Conventions:

- COCO category ids (any ints) map to contiguous ids 0..K-1 in increasing COCO id order;
  `coco_metadata` gives both directions and the class names in that order.
- An annotation without `segmentation` (or with an empty list) has no "segmentation" key;
  in a file where other annotations have one, that is bad data (a non-crowd annotation's
  mask target would be empty).
- Every image id is used by one image: the entries of an id used more than once are bad
  (the error names all of them; "skip" drops them all, since their annotations cannot be
  attributed).
  Uncompressed RLE (a list of counts, as COCO's crowd regions use) is converted to a
  compressed RLE with str counts, so every RLE in the output has the same form.
- Crowd regions (`iscrowd: 1`) are kept with iscrowd=1; the mapper ignores them in training
  and evaluation honours them.
- Bad data raises `DatasetError` naming the file and the image id / annotation id / key, or
  with `on_bad="skip"` drops the bad image or annotation, counts it by kind, and logs a
  summary (one warning per file). An invalid JSON file, a missing top-level key and a bad
  proposals file always raise: nothing sensible can be skipped. Image sizes that disagree
  with the file and corrupt image files are found by the mapper when it reads the image.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pycocotools.mask as mask_util
import torch

from detframe.config import declare

__all__ = ["DatasetError", "coco_metadata", "load_coco_json", "load_proposals"]

logger = logging.getLogger(__name__)

OnBad = Literal["error", "skip"]
declare(
    "DATALOADER.ON_BAD_DATA",
    str,
    "error",
    "bad annotations or image files: raise an error naming them, or skip and count them",
    choices=("error", "skip"),
)
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


class DatasetError(ValueError):
    """Bad data in a dataset file; the message names the file and the offending entry."""


class _BadEntryError(Exception):
    """An entry to drop: `kind` is counted, `message` is what an error would say."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _read_json(json_file: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed file, with every top-level key a COCO file needs; DatasetError otherwise."""
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{json_file}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e
    if not isinstance(data, dict):
        raise DatasetError(f"{json_file}: expected a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{json_file}: missing key {key!r} (a list) at the top level")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{json_file}: 'annotations' must be a list")
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise DatasetError(f"{json_file}: categories[{i}] needs the keys 'id' and 'name'")
    return data


def _category_metadata(categories: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(categories, key=lambda c: c["id"])
    dataset_ids = [c["id"] for c in ordered]
    return {
        "thing_classes": [c["name"] for c in ordered],
        "dataset_id_to_contiguous_id": {d: i for i, d in enumerate(dataset_ids)},
        "contiguous_id_to_dataset_id": dict(enumerate(dataset_ids)),
    }


def coco_metadata(json_file: str | os.PathLike[str]) -> dict[str, Any]:
    """The category metadata of a COCO file: `thing_classes` (names in contiguous-id order),
    `dataset_id_to_contiguous_id` and its inverse `contiguous_id_to_dataset_id`."""
    return _category_metadata(_read_json(json_file)["categories"])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _segmentation(segm: Any, where: str, height: int, width: int) -> Any:
    """The segmentation in output form (see the module docstring), or None if absent."""
    if isinstance(segm, list):
        if not segm:
            return None
        for part in segm:
            if (
                not isinstance(part, list)
                or len(part) < 6
                or len(part) % 2
                or not all(_is_number(v) and math.isfinite(v) for v in part)
            ):
                raise _BadEntryError(
                    "bad polygon",
                    f"{where}: a polygon needs at least three points as an even-length list "
                    f"of finite numbers, got {str(part)[:80]}",
                )
        return [[float(v) for v in part] for part in segm]
    if isinstance(segm, dict) and "size" in segm and "counts" in segm:
        if list(segm["size"]) != [height, width]:
            raise _BadEntryError(
                "bad RLE",
                f"{where}: RLE size {segm['size']} differs from the image's "
                f"[height, width] [{height}, {width}]",
            )
        counts = segm["counts"]
        if isinstance(counts, list):
            rle = mask_util.frPyObjects(segm, height, width)
            return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        if isinstance(counts, (str, bytes)):
            text = counts.decode("ascii") if isinstance(counts, bytes) else counts
            return {"size": [height, width], "counts": text}
    raise _BadEntryError("bad segmentation", f"{where}: unrecognised segmentation {str(segm)[:80]}")


def _annotation(
    ann: Any,
    json_file: Any,
    images: dict[Any, dict[str, Any]],
    id_map: dict[int, int],
    masks_expected: bool,
) -> tuple[Any, dict[str, Any]]:
    """(image id, output annotation) of one COCO annotation; raises _BadEntryError if it is
    bad. With `masks_expected` (other annotations of the file have a segmentation), a
    non-crowd annotation without one is bad: its mask target would be empty."""
    if not isinstance(ann, dict):
        raise _BadEntryError("missing key", f"{json_file}: an annotation is not an object: {ann!r}")
    where = f"{json_file}: annotation id {ann.get('id')!r} (image id {ann.get('image_id')!r})"
    for key in _ANNOTATION_KEYS:
        if key not in ann:
            raise _BadEntryError("missing key", f"{where}: missing key {key!r}")
    image = images.get(ann["image_id"])
    if image is None:
        raise _BadEntryError(
            "unknown image id", f"{where}: image id {ann['image_id']!r} is not in images"
        )
    if ann["category_id"] not in id_map:
        raise _BadEntryError(
            "unknown category id",
            f"{where}: category id {ann['category_id']!r} is not in categories "
            f"(known ids: {sorted(id_map)})",
        )
    bbox = ann["bbox"]
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(_is_number(v) and math.isfinite(v) for v in bbox)
        or bbox[2] <= 0
        or bbox[3] <= 0
    ):
        raise _BadEntryError(
            "degenerate box",
            f"{where}: bbox {bbox} is not [x, y, w, h] of finite numbers with w > 0 and h > 0",
        )
    if ann.get("iscrowd", 0) not in (0, 1):
        raise _BadEntryError(
            "bad iscrowd", f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}"
        )
    x, y, w, h = (float(v) for v in bbox)
    out: dict[str, Any] = {
        "bbox": [x, y, x + w, y + h],
        "category_id": id_map[ann["category_id"]],
        "iscrowd": int(ann.get("iscrowd", 0)),
    }
    segm = _segmentation(ann.get("segmentation", []), where, image["height"], image["width"])
    if segm is not None:
        out["segmentation"] = segm
    elif masks_expected and not out["iscrowd"]:
        raise _BadEntryError(
            "no segmentation",
            f"{where}: the segmentation is missing or empty, but other annotations of the file "
            "have one: its mask target would be empty",
        )
    return ann["image_id"], out


def _duplicate_image_ids(images: list[Any], json_file: Any) -> dict[Any, str]:
    """Image id -> a message naming every entry of `images` that uses it, for the ids used
    more than once."""
    entries: dict[Any, list[str]] = {}
    for i, image in enumerate(images):
        if isinstance(image, dict) and isinstance(image.get("id"), int | str):
            entries.setdefault(image["id"], []).append(f"images[{i}] ({image.get('file_name')!r})")
    return {
        image_id: f"{json_file}: image id {image_id!r} is used by {' and '.join(where)}: "
        "their annotations cannot be told apart"
        for image_id, where in entries.items()
        if len(where) > 1
    }


def _image(
    image: Any, json_file: Any, image_root: str, duplicates: dict[Any, str]
) -> dict[str, Any]:
    """The output record (without annotations) of one COCO image; raises _BadEntryError if
    bad, or if its id is one of `duplicates` (see `_duplicate_image_ids`)."""
    if not isinstance(image, dict):
        raise _BadEntryError("missing key", f"{json_file}: an image is not an object: {image!r}")
    where = f"{json_file}: image id {image.get('id')!r}"
    for key in _IMAGE_KEYS:
        if key not in image:
            raise _BadEntryError("missing key", f"{where}: missing key {key!r}")
    if image["id"] in duplicates:
        raise _BadEntryError("duplicate image id", duplicates[image["id"]])
    if not all(isinstance(image[k], int) and image[k] > 0 for k in ("height", "width")):
        raise _BadEntryError(
            "bad image size",
            f"{where}: height and width must be positive ints, got "
            f"{image['height']!r} x {image['width']!r}",
        )
    file_name = os.path.join(image_root, image["file_name"])
    if not os.path.exists(file_name):
        raise _BadEntryError("missing image file", f"{where}: image file not found: {file_name}")
    return {
        "file_name": file_name,
        "height": image["height"],
        "width": image["width"],
        "image_id": image["id"],
        "annotations": [],
    }


# What a proposals pickle may build besides plain containers and numbers: numpy arrays,
# dtypes and scalars (numpy 1 and 2 module names), as numpy pickles them.
_SAFE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        *(
            (module, name)
            for module in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")
        ),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("collections", "OrderedDict"),
    }
)


class _ProposalsUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, plain containers and numbers only: any other global (a
    function or class that loading would call) is refused, so no code runs from the file."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"it needs {module}.{name}")
        return super().find_class(module, name)


def _unpickle(file: IO[bytes], path: Path) -> Any:
    """A pickle from `file` (part of `path`) read by `_ProposalsUnpickler`."""
    try:
        return _ProposalsUnpickler(file).load()
    except pickle.UnpicklingError as e:
        raise DatasetError(
            f"{path}: refused to load: {e}, and a proposals file may hold only numpy arrays, "
            "lists, dicts and numbers (loading it would run code from the file)"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError) as e:
        raise DatasetError(f"{path}: not a readable pickle: {e}") from e


def _read_npz(path: Path) -> dict[str, Any]:
    """The arrays of an .npz file; object arrays (ragged per-image boxes) are unpickled by
    `_ProposalsUnpickler`, the others read with `allow_pickle=False`."""
    arrays = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    _, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    _, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise DatasetError(f"{path}: {member}: unsupported .npy version {version}")
                if dtype.hasobject:
                    arrays[member.removesuffix(".npy")] = _unpickle(f, path)
                    continue
            with archive.open(member) as f:
                arrays[member.removesuffix(".npy")] = np.lib.format.read_array(
                    f, allow_pickle=False
                )
    return arrays


def _read_proposals_file(path: Path) -> dict[str, Any]:
    """The dict a proposals file holds, read without running code from it (see
    `load_proposals`)."""
    suffix = path.suffix.lower()
    if suffix not in (".pkl", ".pickle", ".npz", ".pt", ".pth"):
        raise DatasetError(f"{path}: unknown proposals file type {suffix!r}; use .pkl, .npz or .pt")
    if not path.is_file():
        raise DatasetError(f"{path}: proposals file not found")
    if suffix in (".pkl", ".pickle"):
        with open(path, "rb") as f:
            data = _unpickle(f, path)
    elif suffix == ".npz":
        try:
            data = _read_npz(path)
        except zipfile.BadZipFile as e:
            raise DatasetError(f"{path}: not a readable .npz file: {e}") from e
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            refusal = next((line for line in str(e).splitlines() if "Unsupported" in line), "")
            raise DatasetError(
                f"{path}: refused to load: it needs code to load ({refusal.strip()}); a .pt "
                "proposals file may hold only tensors, lists, dicts and numbers"
            ) from None
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected a dict with ids, boxes, objectness, got {type(data).__name__}"
        )
    return data


def load_proposals(
    proposals_file: str | os.PathLike[str], top_k: int | None = None
) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    """Reads precomputed proposals: image id -> (boxes [R, 4] float32 XYXY, objectness [R]
    float32), sorted by objectness, highest first, and cut to `top_k` if given.

    The file (.pkl/.pickle, .npz or .pt) holds a dict with "ids" (N image ids), "boxes" (N
    arrays [R_i, 4], XYXY absolute pixels) and "objectness" (N arrays [R_i], higher is
    better; detectron2's key "objectness_logits" is accepted too). It is read without
    running code from it: a pickle (and an .npz's object arrays) may hold only numpy arrays,
    plain containers and numbers, a .pt only what `torch.load(weights_only=True)` reads.

    Raises:
        DatasetError: the file is missing, unreadable, needs code to load, or lacks a key
            (the message names the file).
    """
    path = Path(proposals_file)
    data = _read_proposals_file(path)
    scores_key = "objectness" if "objectness" in data else "objectness_logits"
    for key in ("ids", "boxes", scores_key):
        if key not in data:
            raise DatasetError(f"{path}: missing key {key!r} (needs ids, boxes, objectness)")
    ids, all_boxes, all_scores = data["ids"], data["boxes"], data[scores_key]
    if not len(ids) == len(all_boxes) == len(all_scores):
        raise DatasetError(
            f"{path}: ids, boxes and {scores_key} differ in length: "
            f"{len(ids)}, {len(all_boxes)}, {len(all_scores)}"
        )
    proposals: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
    for image_id, boxes, scores in zip(ids, all_boxes, all_scores, strict=True):
        key = image_id.item() if hasattr(image_id, "item") else image_id
        boxes = np.asarray(boxes, dtype=np.float32)
        scores = np.asarray(scores, dtype=np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
            raise DatasetError(
                f"{path}: image id {key!r}: expected boxes [R, 4] and {scores_key} [R], got "
                f"{list(boxes.shape)} and {list(scores.shape)}"
            )
        order = np.argsort(-scores, kind="stable")[:top_k]
        proposals[key] = (boxes[order], scores[order])
    return proposals


def load_coco_json(
    json_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    dataset_name: str | None = None,
    filter_empty: bool = False,
    proposals_file: str | os.PathLike[str] | None = None,
    proposals_top_k: int | None = None,
    on_bad: OnBad = "error",
) -> list[dict[str, Any]]:
    """Loads a COCO annotation file into dataset dicts (see the module docstring).

    Args:
        json_file: the COCO annotation file.
        image_root: folder that the images' `file_name`s are relative to.
        dataset_name: named in log messages.
        filter_empty: drop images without a non-crowd annotation (after bad ones are
            dropped), as training wants; evaluation keeps them.
        proposals_file: precomputed proposals (see `load_proposals`); each kept image must
            have an entry.
        proposals_top_k: keep this many proposals per image, highest objectness first.
        on_bad: "error" raises DatasetError at the first bad entry; "skip" drops it, counts
            it by kind and logs a summary.

    Raises:
        DatasetError: bad data (see the module docstring); the message names the file and
            the image id, annotation id or key.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    data = _read_json(json_file)
    id_map = _category_metadata(data["categories"])["dataset_id_to_contiguous_id"]
    skipped: Counter[str] = Counter()

    def attempt(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except _BadEntryError as bad:
            if on_bad == "error":
                raise DatasetError(str(bad)) from None
            skipped[bad.kind] += 1
            logger.debug("skipping: %s", bad)
            return None

    records: dict[Any, dict[str, Any]] = {}
    raw_images: dict[Any, dict[str, Any]] = {}
    duplicates = _duplicate_image_ids(data["images"], json_file)
    for image in data["images"]:
        record = attempt(lambda image=image: _image(image, json_file, str(image_root), duplicates))
        if record is not None:
            records[record["image_id"]] = record
        if isinstance(image, dict) and "id" in image:
            raw_images[image["id"]] = image
    annotations = data.get("annotations", [])
    masks_expected = any(isinstance(ann, dict) and ann.get("segmentation") for ann in annotations)
    for ann in annotations:
        result = attempt(
            lambda ann=ann: _annotation(ann, json_file, raw_images, id_map, masks_expected)
        )
        if result is not None and result[0] in records:  # else its image was skipped
            records[result[0]]["annotations"].append(result[1])

    dataset = list(records.values())
    if filter_empty:
        dataset = [r for r in dataset if any(a["iscrowd"] == 0 for a in r["annotations"])]
    if proposals_file is not None:
        proposals = load_proposals(proposals_file, proposals_top_k)
        with_proposals = []
        for record in dataset:
            image_id = record["image_id"]
            found = attempt(
                lambda image_id=image_id: _proposals_for(proposals, proposals_file, image_id)
            )
            if found is not None:
                record["proposal_boxes"], record["proposal_objectness_logits"] = found
                with_proposals.append(record)
        dataset = with_proposals

    name = f"dataset {dataset_name!r} " if dataset_name else ""
    if skipped:
        summary = ", ".join(f"{kind}: {n}" for kind, n in sorted(skipped.items()))
        logger.warning("%s%s: skipped bad entries (%s)", name, json_file, summary)
    logger.info(
        "%sloaded %d images, %d annotations from %s",
        name,
        len(dataset),
        sum(len(r["annotations"]) for r in dataset),
        json_file,
    )
    return dataset


def _proposals_for(
    proposals: dict[Any, tuple[np.ndarray, np.ndarray]], proposals_file: Any, image_id: Any
) -> tuple[np.ndarray, np.ndarray]:
    """The proposals of `image_id`; raises _BadEntryError if the file has none for it."""
    if image_id not in proposals:
        raise _BadEntryError(
            "no proposals", f"{proposals_file}: no proposals for image id {image_id!r}"
        )
    return proposals[image_id]
