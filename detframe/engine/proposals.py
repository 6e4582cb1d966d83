"""`detframe proposals`: proposals for every image of a dataset, written to a file, resumable.

Shorthand: N images in the dataset, R_i proposals of image i.

    report = write_proposals(cfg, "ss.pkl", method="selective_search")
    print(report.format())      # where the file is, images/s, AR@10/100/1000 by area

Sources (`method`, see `resolve_method`):

- "model" (also the config's MODEL.PROPOSAL_GENERATOR.NAME, e.g. "rpn", in any case): the
  config's model with MODEL.WEIGHTS, loaded strictly. A meta-architecture whose outputs are
  {"proposals": Instances} (`ProposalNetwork`) runs as it is. A detector built on
  `GeneralizedRCNN` runs as the `ProposalNetwork` of the same config: the same backbone and
  proposal generator, so its checkpoint loads (its ROI-head weights are reported as unused)
  and the proposals are those its ROI heads see at test time (after the generator's
  test-time top-k and NMS). Any other meta-architecture has no proposal stage: an error.
  Images go through the test-time mapper (resize, INPUT.FORMAT) in batches of
  TEST.IMS_PER_BATCH; the proposals come back in the original image's pixels.
- an offline method: a name in OFFLINE_PROPOSAL_REGISTRY, in any case and with "_" and "-"
  ignored ("selective_search" is `SelectiveSearch`), built from the config and run on each
  image as read from disk, in `num_workers` worker processes (each with one OpenCV thread
  and one torch thread; 0 runs in this process). The workers are spawned, not forked (a
  forked child can hang in OpenCV), so they start in a few seconds: a one-time cost.

The file, what `detframe.data.load_proposals` and a dataset's proposals file read (the format
by the suffix: .pkl / .pickle pickle, .npz numpy, .pt / .pth torch.save; see
`save_proposals`)::

    {"ids": N image ids in the dataset's order,
     "boxes": N float32 arrays [R_i, 4], XYXY in the pixels of the original image,
     "objectness": N float32 arrays [R_i], higher is better, sorted highest first,
     "masks": N lists of R_i COCO RLE dicts (only when the proposals have masks)}

Resuming. The progress of a run is kept beside the output, in `OUTPUT.partial/`: a
`manifest.json` fingerprinting the run, and chunk files of computed images (`chunk_*.pt`),
every file written to a temporary name and renamed into place. A chunk is written every
`chunk_size` images and when the run stops, also by Ctrl-C, SIGTERM or an error, so a
restart recomputes nothing that was finished (a SIGKILL loses at most the last chunk's
images). Run again with the same arguments, the command continues with the images not yet
done. With other arguments, it refuses (`ResumeError`, naming what differs) unless
`restart=True` (`--restart`), which discards the saved progress. The fingerprint is the
dataset's name and image ids, the method, and what decides the proposals: an offline
method's constructor arguments (from its `from_config`); for the model, the whole effective
config except `_NOT_FINGERPRINTED`, and the size and modification time of the weights file.
When every image is done, the output is written (to a temporary name, then renamed) and the
`.partial` folder removed; an output already there is replaced.

Recall. With COCO ground truth (the dataset's metadata has a json_file), the written
proposals are evaluated by `ProposalEvaluator` with the COCO protocol (COCOeval,
useCats=0, maxDets 10/100/1000): class-agnostic AR of boxes, and of masks for segment
proposals, for all areas and small / medium / large. Images/s counts the images computed
by this run over its wall time (image reading, mapping and worker start included).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, read_write
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from detframe.data import DATASETS, DatasetError, build_test_loader, register_from_config
from detframe.evaluation import ProposalEvaluator, inference_context
from detframe.modeling.meta_arch import GeneralizedRCNN, ProposalNetwork
from detframe.modeling.proposal_generator import OfflineProposalMethod
from detframe.registry import META_ARCH_REGISTRY, OFFLINE_PROPOSAL_REGISTRY, build
from detframe.structures import BitMasks, bitmask_to_rle

from .predictor import read_image
from .trainer import Trainer, load_datasets

__all__ = [
    "MODEL_METHOD",
    "ImageProposals",
    "ProposalsReport",
    "ResumeError",
    "build_proposal_model",
    "resolve_method",
    "save_proposals",
    "write_proposals",
]

logger = logging.getLogger(__name__)

MODEL_METHOD = "model"
PARTIAL_SUFFIX = ".partial"
_FORMATS = {".pkl": "pickle", ".pickle": "pickle", ".npz": "npz", ".pt": "torch", ".pth": "torch"}
# Config keys that do not change the proposals, left out of the model's fingerprint.
_NOT_FINGERPRINTED = ("DATALOADER.NUM_WORKERS", "OUTPUT_DIR", "LOG_PERIOD")
_MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1
_SHOWN_DIFFERENCES = 5


class ResumeError(ValueError):
    """Saved progress that this run cannot continue (other arguments, or unreadable)."""


@dataclass
class ImageProposals:
    """The proposals of one image: boxes [R, 4] float32 XYXY pixels, objectness [R] float32
    sorted highest first, and masks (R COCO RLE dicts) or None."""

    image_id: Any
    boxes: np.ndarray
    objectness: np.ndarray
    masks: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------------------- the sources


def _normalised(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def resolve_method(cfg: DictConfig, name: str) -> str:
    """`MODEL_METHOD` for "model" or the config's MODEL.PROPOSAL_GENERATOR.NAME (any case),
    else the OFFLINE_PROPOSAL_REGISTRY name that `name` spells, ignoring case, "_" and "-".

    Raises:
        ValueError: `name` is neither; the message lists the choices.
    """
    wanted = _normalised(name)
    if wanted in (MODEL_METHOD, _normalised(cfg.MODEL.PROPOSAL_GENERATOR.NAME)):
        return MODEL_METHOD
    for registered in OFFLINE_PROPOSAL_REGISTRY.names():
        if _normalised(registered) == wanted:
            return registered
    choices = [MODEL_METHOD, cfg.MODEL.PROPOSAL_GENERATOR.NAME, *OFFLINE_PROPOSAL_REGISTRY.names()]
    raise ValueError(
        f"unknown proposal method {name!r}: use 'model' (the config's proposal generator, "
        f"{cfg.MODEL.PROPOSAL_GENERATOR.NAME}) or an offline method; choices: "
        f"{', '.join(choices)} (case-insensitive, '_' ignored)"
    )


def _with_key(cfg: DictConfig, key: str, value: Any) -> DictConfig:
    """A read-only copy of `cfg` with `key` set to `value`."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg))
    with read_write(copy):
        OmegaConf.update(copy, key, value, merge=False)
    OmegaConf.set_struct(copy, True)
    OmegaConf.set_readonly(copy, True)
    return copy


def build_proposal_model(cfg: DictConfig) -> nn.Module:
    """The model that makes the config's proposals, with MODEL.WEIGHTS loaded strictly: the
    config's own meta-architecture if it outputs proposals, the `ProposalNetwork` of the same
    config for a `GeneralizedRCNN` detector (see the module docstring).

    Raises:
        ValueError: the meta-architecture has no proposal stage.
    """
    name = cfg.MODEL.META_ARCHITECTURE
    meta_arch = META_ARCH_REGISTRY.get(name)
    if getattr(meta_arch, "OUTPUT_KEY", None) != "proposals":
        if not issubclass(meta_arch, GeneralizedRCNN):
            raise ValueError(
                f"MODEL.META_ARCHITECTURE {name!r} has no proposal stage, so --method model "
                "has nothing to run: choose an offline method (e.g. --method selective_search)"
            )
        cfg = _with_key(cfg, "MODEL.META_ARCHITECTURE", ProposalNetwork.__name__)
    return Trainer.build_model(cfg, strict_weights=True)


def _model_proposals(
    cfg: DictConfig,
    model: nn.Module,
    dicts: Sequence[dict[str, Any]],
    dataset_name: str,
    num_workers: int,
) -> Iterator[ImageProposals]:
    """The proposals of `model` for `dicts` through the test-time mapper, in order (images
    that DATALOADER.ON_BAD_DATA=skip drops are left out)."""
    loader = build_test_loader(
        dicts,
        Trainer.build_mapper(cfg, is_train=False),
        num_workers,
        cfg.TEST.IMS_PER_BATCH,
        on_bad=cfg.DATALOADER.ON_BAD_DATA,
        dataset_name=dataset_name,
    )
    with inference_context(model), torch.no_grad():
        for inputs in loader:
            for input_dict, output in zip(inputs, model(inputs), strict=True):
                instances = output["proposals"].to("cpu")
                order = torch.argsort(instances.objectness_logits, descending=True, stable=True)
                masks = None
                if instances.has("proposal_masks"):
                    bitmaps = instances.proposal_masks
                    bitmaps = bitmaps.tensor if isinstance(bitmaps, BitMasks) else bitmaps
                    masks = [bitmask_to_rle(bitmaps[i]) for i in order.tolist()]
                yield ImageProposals(
                    input_dict["image_id"],
                    instances.proposal_boxes.tensor[order].float().numpy(),
                    instances.objectness_logits[order].float().numpy(),
                    masks,
                )


class _OfflineImages(Dataset):
    """Dataset dicts -> the offline method's proposals of each image, read from disk."""

    def __init__(self, dicts: Sequence[dict[str, Any]], method: OfflineProposalMethod) -> None:
        self.dicts = list(dicts)
        self.method = method

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, index: int) -> ImageProposals:
        record = self.dicts[index]
        image = read_image(record["file_name"])
        expected = (record["height"], record["width"])
        if image.shape[:2] != expected:
            raise DatasetError(
                f"{record['file_name']}: the image is {image.shape[0]} x {image.shape[1]} but "
                f"the dataset says {expected[0]} x {expected[1]} (image id {record['image_id']!r})"
            )
        boxes, scores = self.method(image)
        order = np.argsort(-scores, kind="stable")
        return ImageProposals(record["image_id"], boxes[order], scores[order])


def _single_threaded_worker(worker_id: int) -> None:
    """Worker processes compute one image each: one OpenCV and one torch thread apiece."""
    del worker_id
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _as_is(sample: ImageProposals) -> ImageProposals:
    return sample


def _offline_proposals(
    method: OfflineProposalMethod, dicts: Sequence[dict[str, Any]], num_workers: int
) -> Iterator[ImageProposals]:
    """The proposals of `method` for `dicts`, in order, computed in `num_workers` processes."""
    loader = DataLoader(
        _OfflineImages(dicts, method),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        worker_init_fn=_single_threaded_worker if num_workers else None,
        # Not forked: a child forked after OpenCV started its thread pool in this process
        # can hang in OpenCV (e.g. in setNumThreads) on a lock held by a thread it lacks.
        multiprocessing_context="spawn" if num_workers else None,
    )
    yield from loader


# ---------------------------------------------------------------------------- the files


def _file_format(path: Path) -> str:
    """The file format that the suffix of `path` names ("pickle", "npz" or "torch");
    ValueError naming the file for any other suffix."""
    file_format = _FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise ValueError(
            f"{path}: unknown proposals file type {path.suffix!r}; use .pkl, .npz or .pt"
        )
    return file_format


def _replace_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Calls `write(file)` on a temporary file beside `path`, then renames it to `path`."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _object_array(items: Sequence[Any]) -> np.ndarray:
    """A 1-d object array of `items` (numpy would stack equal-shaped arrays into one)."""
    array = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        array[i] = item
    return array


def save_proposals(path: str | os.PathLike[str], proposals: Sequence[ImageProposals]) -> None:
    """Writes `proposals` (in order) to `path` in the format of its suffix (see the module
    docstring), atomically: a temporary file renamed into place.

    Raises:
        ValueError: an unknown suffix, or masks for some images only.
    """
    path = Path(path)
    file_format = _file_format(path)
    with_masks = [p.masks is not None for p in proposals]
    if any(with_masks) and not all(with_masks):
        raise ValueError(f"{path}: some images have proposal masks and others not")
    ids = [p.image_id.item() if hasattr(p.image_id, "item") else p.image_id for p in proposals]
    boxes = [np.asarray(p.boxes, dtype=np.float32).reshape(-1, 4) for p in proposals]
    objectness = [np.asarray(p.objectness, dtype=np.float32) for p in proposals]
    data: dict[str, Any] = {"ids": ids, "boxes": boxes, "objectness": objectness}
    if proposals and all(with_masks):
        data["masks"] = [p.masks for p in proposals]
    if file_format == "pickle":
        _replace_atomically(path, lambda f: pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL))
    elif file_format == "npz":
        arrays = {"ids": np.asarray(ids)}
        arrays.update({key: _object_array(value) for key, value in data.items() if key != "ids"})
        _replace_atomically(path, lambda f: np.savez(f, **arrays))
    else:
        data["boxes"] = [torch.from_numpy(b) for b in boxes]
        data["objectness"] = [torch.from_numpy(o) for o in objectness]
        _replace_atomically(path, lambda f: torch.save(data, f))


class _Progress:
    """The saved progress of one run in `OUTPUT.partial/` (see the module docstring).

    Args:
        folder: the `.partial` folder.
        manifest: the fingerprint of this run.
        restart: discard progress saved with another fingerprint instead of refusing it.

    Raises:
        ResumeError: the folder holds progress of another run (or an unreadable manifest)
            and `restart` is False.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], restart: bool) -> None:
        self.folder = folder
        self.pending: list[ImageProposals] = []
        if folder.exists():
            saved = self._read_manifest()
            if restart:
                logger.info("--restart: discarding the saved progress in %s", folder)
                shutil.rmtree(folder)
            elif saved != manifest:
                raise ResumeError(
                    f"{folder} holds the progress of a run with other arguments "
                    f"({_differences(saved, manifest)}): run the same command as before to "
                    "continue it, or add --restart to discard it and start over"
                )
        if not folder.exists():
            folder.mkdir(parents=True)
            _replace_atomically(
                folder / _MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode())
            )
        for temporary in folder.glob("*.tmp"):  # of a write that was interrupted
            temporary.unlink()
        self.chunks = sorted(folder.glob("chunk_*.pt"))
        self.done = {image_id for chunk in self.chunks for image_id in self._read(chunk)["ids"]}

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.folder / _MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def _read(self, chunk: Path) -> dict[str, Any]:
        try:
            return torch.load(chunk, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ResumeError(
                f"{chunk}: unreadable saved progress ({e}); add --restart to start over"
            ) from e

    def add(self, proposals: ImageProposals) -> None:
        self.pending.append(proposals)

    def flush(self) -> None:
        """Writes the pending images as the next chunk."""
        if not self.pending:
            return
        chunk = self.folder / f"chunk_{len(self.chunks):06d}.pt"
        data = {
            "ids": [p.image_id for p in self.pending],
            "boxes": [torch.from_numpy(p.boxes) for p in self.pending],
            "objectness": [torch.from_numpy(p.objectness) for p in self.pending],
            "masks": [p.masks for p in self.pending],
        }
        _replace_atomically(chunk, lambda f: torch.save(data, f))
        self.chunks.append(chunk)
        self.done.update(data["ids"])
        self.pending = []

    def load(self) -> dict[Any, ImageProposals]:
        """Image id -> proposals, of every saved chunk."""
        proposals = {}
        for chunk in self.chunks:
            data = self._read(chunk)
            for image_id, boxes, objectness, masks in zip(
                data["ids"], data["boxes"], data["objectness"], data["masks"], strict=True
            ):
                proposals[image_id] = ImageProposals(
                    image_id, boxes.numpy(), objectness.numpy(), masks
                )
        return proposals


def _differences(saved: dict[str, Any] | None, wanted: dict[str, Any]) -> str:
    """What differs between two manifests, for a message."""
    if saved is None:
        return "its manifest is missing or unreadable"
    flat_saved, flat_wanted = _flatten(saved), _flatten(wanted)
    keys = sorted(set(flat_saved) | set(flat_wanted))
    changes = [
        f"{key}: {flat_saved.get(key, '<unset>')!r} -> {flat_wanted.get(key, '<unset>')!r}"
        for key in keys
        if flat_saved.get(key, "<unset>") != flat_wanted.get(key, "<unset>")
    ]
    more = len(changes) - _SHOWN_DIFFERENCES
    return "; ".join(changes[:_SHOWN_DIFFERENCES]) + (f"; and {more} more" if more > 0 else "")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _json_safe(value: Any) -> Any:
    """`value` as it reads back from JSON (non-JSON values by their repr)."""
    return json.loads(json.dumps(value, default=repr))


def _manifest(
    cfg: DictConfig, method: str, dataset: str, dicts: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The fingerprint of a run (see the module docstring)."""
    ids = json.dumps([d["image_id"] for d in dicts], default=repr).encode()
    if method == MODEL_METHOD:
        settings = _flatten(OmegaConf.to_container(cfg, resolve=True))
        for key in _NOT_FINGERPRINTED:
            settings.pop(key, None)
        weights = cfg.MODEL.WEIGHTS
        if weights and os.path.isfile(weights):
            stat = os.stat(weights)
            settings["weights file"] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    else:  # what the method is constructed with
        settings = dict(OFFLINE_PROPOSAL_REGISTRY.get(method).from_config(cfg))
    return _json_safe(
        {
            "version": _MANIFEST_VERSION,
            "dataset": dataset,
            "images": {"count": len(dicts), "ids sha256": hashlib.sha256(ids).hexdigest()},
            "method": method,
            "settings": settings,
        }
    )


# ---------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while inside (main thread only), so that a `kill`
    saves the progress like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class ProposalsReport:
    """What `write_proposals` did.

    Attributes:
        output: the file written.
        method: MODEL_METHOD or the offline method's registered name.
        dataset: the dataset's name.
        num_images: images in the file.
        computed: images computed by this run (the others came from saved progress).
        seconds: wall time of computing them.
        num_workers: worker processes used.
        proposals_per_image: mean R_i over the file.
        recall: {task: {"AR@10", "ARs@10", ...}} in percent ({} without COCO ground truth).
    """

    output: Path
    method: str
    dataset: str
    num_images: int
    computed: int
    seconds: float
    num_workers: int
    proposals_per_image: float
    recall: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else math.nan

    def format(self) -> str:
        """The report as printed by `detframe proposals`."""
        lines = [
            f"wrote {self.output}: proposals of {self.num_images} images of {self.dataset!r} "
            f"by {self.method}, {self.proposals_per_image:.1f} per image on average",
            f"speed: {self.computed} images in {self.seconds:.1f} s, "
            f"{self.images_per_second:.2f} images/s ({self.num_workers} workers)",
        ]
        if self.computed < self.num_images:
            lines.append(f"resumed: {self.num_images - self.computed} images were done before")
        if not self.recall:
            lines.append("recall: not computed (the dataset has no COCO ground truth)")
            return "\n".join(lines)
        limits = sorted({int(k.split("@")[1]) for m in self.recall.values() for k in m})
        lines += [
            "",
            "class-agnostic average recall, COCO protocol (%):",
            "| proposals | area | " + " | ".join(f"AR@{n}" for n in limits) + " |",
            "|---|---|" + "---|" * len(limits),
        ]
        areas = {"AR": "all", "ARs": "small", "ARm": "medium", "ARl": "large"}
        for task, metrics in self.recall.items():
            for prefix, area in areas.items():
                cells = [metrics.get(f"{prefix}@{n}", math.nan) for n in limits]
                shown = ["-" if not math.isfinite(c) else f"{c:.1f}" for c in cells]
                lines.append(f"| {task.split('_')[0]} | {area} | " + " | ".join(shown) + " |")
        return "\n".join(lines)


def _recall(dataset: str, proposals: Sequence[ImageProposals]) -> dict[str, dict[str, float]]:
    """COCO-protocol AR of `proposals` on the dataset's ground truth ({} without any)."""
    json_file = DATASETS.metadata(dataset).get("json_file")
    if not json_file or not proposals:
        return {}
    with_masks = all(p.masks is not None for p in proposals)
    tasks = ("box_proposals", "segm_proposals") if with_masks else ("box_proposals",)
    evaluator = ProposalEvaluator(json_file, tasks, limits=(10, 100, 1000), protocol="coco")
    for p in proposals:
        evaluator.add_proposals(
            p.image_id, torch.from_numpy(p.boxes), torch.from_numpy(p.objectness), p.masks
        )
    return evaluator.evaluate()


def write_proposals(
    cfg: DictConfig,
    output: str | os.PathLike[str],
    *,
    method: str = MODEL_METHOD,
    dataset: str | None = None,
    num_workers: int | None = None,
    restart: bool = False,
    chunk_size: int = 64,
    progress: bool = True,
) -> ProposalsReport:
    """Computes the proposals of every image of a dataset, writes them to `output`, and
    evaluates their recall (see the module docstring).

    Args:
        cfg: the effective config (its MODEL.WEIGHTS for the model).
        output: the proposals file; its suffix picks the format.
        method: "model" (or the config's proposal generator's name), or an offline method.
        dataset: a registered dataset (or one of DATASETS.COCO); default DATASETS.TEST[0].
        num_workers: worker processes; default DATALOADER.NUM_WORKERS, at most the CPUs.
        restart: discard progress saved by a run with other arguments.
        chunk_size: images per saved chunk of progress.
        progress: show a progress bar.

    Raises:
        ValueError: an unknown method or file type, no dataset, or a config without a
            proposal stage for "model".
        ResumeError: saved progress of a run with other arguments, without `restart`.
        KeyboardInterrupt: Ctrl-C or SIGTERM, after saving the progress.
    """
    output = Path(output)
    _file_format(output)  # an unknown suffix is an error before any work
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    method = resolve_method(cfg, method)
    register_from_config(cfg)
    if dataset is None:
        if not cfg.DATASETS.TEST:
            raise ValueError("no dataset: give --dataset or set DATASETS.TEST in the config")
        dataset = cfg.DATASETS.TEST[0]
    dicts = load_datasets([dataset])[dataset]
    if num_workers is None:
        num_workers = min(cfg.DATALOADER.NUM_WORKERS, os.cpu_count() or 1)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")

    offline = None if method == MODEL_METHOD else build(OFFLINE_PROPOSAL_REGISTRY, method, cfg)
    saved = _Progress(
        output.with_name(output.name + PARTIAL_SUFFIX),
        _manifest(cfg, method, dataset, dicts),
        restart,
    )
    todo = [d for d in dicts if d["image_id"] not in saved.done]
    if saved.done:
        logger.info("continuing: %d of %d images were done before", len(saved.done), len(dicts))
    source: Iterator[ImageProposals] = iter(())
    if todo and offline is not None:
        source = _offline_proposals(offline, todo, num_workers)
    elif todo:
        source = _model_proposals(cfg, build_proposal_model(cfg), todo, dataset, num_workers)

    computed = 0
    start = time.perf_counter()
    bar = tqdm(
        total=len(dicts),
        initial=len(dicts) - len(todo),
        unit="img",
        desc=method,
        disable=not progress,
    )
    try:
        with bar, _terminate_as_interrupt():
            for proposals in source:
                saved.add(proposals)
                computed += 1
                bar.update(1)
                if len(saved.pending) >= chunk_size:
                    saved.flush()
    except KeyboardInterrupt:
        logger.warning(
            "interrupted: %d of %d images are saved in %s; run the same command again to continue",
            len(saved.done) + len(saved.pending),
            len(dicts),
            saved.folder,
        )
        raise
    finally:
        saved.flush()
    seconds = time.perf_counter() - start

    found = saved.load()
    proposals = [found[d["image_id"]] for d in dicts if d["image_id"] in found]
    if len(proposals) < len(dicts):
        logger.warning(
            "%d of %d images of %r have no proposals (bad data skipped)",
            len(dicts) - len(proposals),
            len(dicts),
            dataset,
        )
    save_proposals(output, proposals)
    shutil.rmtree(saved.folder)
    return ProposalsReport(
        output=output,
        method=method,
        dataset=dataset,
        num_images=len(proposals),
        computed=computed,
        seconds=seconds,
        num_workers=num_workers,
        proposals_per_image=float(np.mean([len(p.boxes) for p in proposals])) if proposals else 0.0,
        recall=_recall(dataset, proposals),
    )
