"""Training and test data loaders: dataset dicts -> mapper -> batches (lists of mapped dicts).

- `build_train_loader(dataset, mapper, total_batch_size, num_workers, seed, ...)`: a
  `TrainLoader`, an infinite iterable of lists of `total_batch_size / world_size` mapped
  dicts for this rank. Indices come from a `TrainingSampler`; the mapper runs in the
  DataLoader workers. `loader.state_dict()` / `load_state_dict()` save and restore the
  position in the data order, so a resumed run draws exactly the batches an uninterrupted
  run would have.
- `build_test_loader(dataset, mapper, num_workers, batch_size, on_bad=...)`: a `TestLoader`,
  a finite iterable of lists over this rank's `InferenceSampler` shard.
- `build_train_loader_from_config(cfg, dataset, mapper)`: the one place that reads the
  config keys declared below.

Optional parts of a training mapper, which the training loader uses when it has them (so
that a model's sampling needs no sampler or loader of its own):

- `PreparesDataset`: `prepare_dataset(dataset, source)` is called once with the dicts the
  loader samples from (after filtering), before any is mapped. The mapper may keep what it
  needs of the whole dataset (DeepMaskPatchMapper: its category counts) and returns
  per-image sampling weights `[len(dataset)]`, or None for the usual shuffled epochs. With
  weights, every image is drawn independently with probability `w_i / sum(w)`
  (`TrainingSampler`'s weighted draws: exact, where detectron2's
  RepeatFactorTrainingSampler rounds repeat factors stochastically per epoch); an image of
  weight 0 is never drawn, and all weights 0 is a `DatasetError` naming the data.
- `ConditionsSteps`: a choice made once per training step and shared by all its samples
  (DeepMask's release alternates batches that train only the mask head or only the score
  head). `step_condition(rng)` draws the condition of step s with a Generator seeded from
  `TrainingSampler.step_key(s)` (SEED and s only: the same on every rank, with any number of
  workers, and after resuming), or returns None for plain `mapper(dataset_dict)` calls; the
  samples of step s, this rank's positions `[s * b, (s + 1) * b)` for b images per rank and
  step, are mapped by `map_conditioned(dataset_dict, condition)`. The batcher never puts
  samples of two conditions in one batch, so a batch has one condition even when a skipped
  sample moves the batch boundaries (the batch is then completed by a later step of the same
  condition, and ranks may train different conditions in that iteration; without skips each
  batch is exactly one step's samples).

Skipped samples: a mapper returns `None` for a sample it skips (DatasetMapper does so for a
missing, corrupt or wrongly sized image under DATALOADER.ON_BAD_DATA=skip) and may count its
skips by kind in a `skipped: Counter[str]` attribute, as DatasetMapper does. Both loaders
count the skipped samples by kind (`loader.skipped`, `loader.num_skipped`), log a warning
naming each file the first time it is skipped, and log a summary: the training loader after
every pass over this rank's share of the data in which something was skipped, the test
loader at its end. A loader whose samples are all skipped raises `DatasetError` naming the
datasets and the count: the training loader once every sample of the dataset was skipped
without one being kept in between (it would otherwise wait forever), the test loader when
none of its shard was kept. With `on_bad="error"` the test loader raises on a skipped
sample, naming its file.

Errors in the mapper: the exception reaches the caller as the mapper raised it (its type and
message), with a note naming the sample (position, dataset index, file). From a DataLoader
worker it also carries the worker's traceback as a note, and the traceback is logged on its
lines, instead of PyTorch's re-raised copy that holds the traceback inside its message.

Determinism: the mapper of a training sample runs with numpy's global RNG, `random` and
torch's CPU RNG seeded from the sample's key (`TrainingSampler.sample_key`: the seed and the
sample's place in the global data stream), and those RNGs are restored afterwards. So a
sample's random augmentation depends on neither the worker that maps it, the number of
workers, the rank or the world size, nor on what ran before; and the loader never changes the
random state of the process that trains.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
import random
import traceback
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, runtime_checkable

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from detframe.config import declare

from .coco import DatasetError, OnBad
from .samplers import (
    AspectRatioGroupedBatcher,
    Batcher,
    InferenceSampler,
    TrainingSampler,
    resolve_rank,
)

__all__ = [
    "ConditionsSteps",
    "DataLoaderWorkerError",
    "PreparesDataset",
    "SkipCounter",
    "TestLoader",
    "TrainLoader",
    "build_test_loader",
    "build_train_loader",
    "build_train_loader_from_config",
]

logger = logging.getLogger(__name__)

declare(
    "DATALOADER.ASPECT_RATIO_GROUPING",
    bool,
    True,
    "batch landscape and portrait training images separately",
)
declare(
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
    bool,
    True,
    "drop training images that have no non-crowd annotation",
)

Mapper = Callable[[dict[str, Any]], dict[str, Any] | None]
# What a worker sends back for one sample: (mapped dict or None, the skip's kind or None),
# or the _Failure of the mapper.
_Mapped = tuple[dict[str, Any] | None, str | None]

_UNKNOWN_KIND = "rejected by the mapper"


@runtime_checkable
class PreparesDataset(Protocol):
    """A training mapper that sees the whole dataset first (see the module docstring)."""

    def prepare_dataset(self, dataset: Sequence[dict[str, Any]], source: str) -> np.ndarray | None:
        """Keeps what the mapper needs of `dataset`; returns its images' sampling weights
        [len(dataset)], >= 0, or None for uniform shuffling. `source` names the data in
        messages."""


@runtime_checkable
class ConditionsSteps(Protocol):
    """A training mapper whose samples depend on a choice made once per training step (see
    the module docstring)."""

    def step_condition(self, rng: np.random.Generator) -> Hashable | None:
        """The condition of one step, drawn with `rng` only; None: map plainly."""

    def map_conditioned(
        self, dataset_dict: dict[str, Any], condition: Hashable
    ) -> dict[str, Any] | None:
        """`dataset_dict` mapped under `condition`, as `__call__` maps it otherwise."""


class DataLoaderWorkerError(RuntimeError):
    """An exception from a DataLoader worker that could not be sent back as itself (it cannot
    be pickled); the message gives its type and message."""


@dataclass(frozen=True)
class _Failure:
    """An exception the mapper raised in a DataLoader worker, sent back to the main process.

    Attributes:
        sample: names the sample, e.g. "training sample 5 (dataset index 3, file a.jpg)".
        worker: the worker's id.
        summary: "<type>: <message>" of the exception.
        traceback: the worker's formatted traceback.
        error: the exception itself, when it survives pickling; else None.
    """

    sample: str
    worker: int
    summary: str
    traceback: str
    error: BaseException | None

    @classmethod
    def of(cls, error: Exception, sample: str, worker: int) -> _Failure:
        try:
            pickle.loads(pickle.dumps(error))
            sendable: BaseException | None = error
        except Exception:
            sendable = None
        summary = "".join(traceback.format_exception_only(error)).strip()
        formatted = "".join(traceback.format_exception(error)).rstrip()
        return cls(sample, worker, summary, formatted, sendable)

    def reraise(self) -> NoReturn:
        """Logs the worker's traceback and raises its exception (see the module docstring)."""
        logger.error(
            "DataLoader worker %d failed on %s:\n%s", self.worker, self.sample, self.traceback
        )
        error = self.error if self.error is not None else DataLoaderWorkerError(self.summary)
        error.add_note(f"while mapping {self.sample} in DataLoader worker {self.worker}")
        error.add_note(f"the worker's traceback:\n{self.traceback}")
        raise error


def _describe(dataset: Sequence[dict[str, Any]], index: int, what: str) -> str:
    """Names a sample for messages: "<what> (dataset index i, file f)"."""
    return f"{what} (dataset index {index}, file {dataset[index].get('file_name', '?')})"


def _map(
    mapper: Mapper,
    dataset: Sequence[dict[str, Any]],
    index: int,
    what: str,
    condition: Hashable | None = None,
) -> Any:
    """`mapper(dataset[index])`, or `mapper.map_conditioned(dataset[index], condition)`, as
    `_Mapped`; in a DataLoader worker an exception becomes a `_Failure`, in the main process
    it is raised with a note naming the sample."""
    counts = getattr(mapper, "skipped", None)
    before = Counter(counts) if isinstance(counts, Counter) else None
    try:
        if condition is None:
            mapped = mapper(dataset[index])
        else:
            mapped = mapper.map_conditioned(dataset[index], condition)
    except Exception as error:
        worker = get_worker_info()
        if worker is None:
            error.add_note(f"while mapping {_describe(dataset, index, what)}")
            raise
        return _Failure.of(error, _describe(dataset, index, what), worker.id)
    if mapped is not None:
        return mapped, None
    kinds = counts - before if before is not None else Counter()
    return None, next(iter(kinds), _UNKNOWN_KIND)


class SkipCounter:
    """Counts skipped samples by kind and logs them (see the module docstring).

    Args:
        source: names the data in messages, e.g. "DATASETS.TRAIN ['a', 'b']".
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.by_kind: Counter[str] = Counter()
        self._files: set[str] = set()

    @property
    def total(self) -> int:
        """Samples skipped so far."""
        return sum(self.by_kind.values())

    def add(self, kind: str, file_name: str) -> None:
        """Counts one skipped sample; warns the first time `file_name` is skipped."""
        self.by_kind[kind] += 1
        if file_name not in self._files:
            self._files.add(file_name)
            logger.warning("%s: skipping %s (%s)", self.source, file_name, kind)

    @staticmethod
    def format(counts: Counter[str]) -> str:
        """ "kind: n, ..." in sorted order."""
        return ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items()))


class _MappedDataset(Dataset):
    """index -> (index, `_map` of dataset[index]), for a test loader."""

    def __init__(self, dataset: Sequence[dict[str, Any]], mapper: Mapper) -> None:
        self.dataset = dataset
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, _map(self.mapper, self.dataset, index, f"test sample {index}")


@contextlib.contextmanager
def _seeded_rngs(key: int) -> Iterator[None]:
    """Seeds numpy's global RNG, `random` and torch's CPU RNG from `key`, and restores their
    states on exit."""
    states = np.random.get_state(), random.getstate(), torch.get_rng_state()
    numpy_seed, python_seed = np.random.SeedSequence(key).generate_state(2)
    np.random.seed(int(numpy_seed))
    random.seed(int(python_seed))
    torch.default_generator.manual_seed(key)
    try:
        yield
    finally:
        np.random.set_state(states[0])
        random.setstate(states[1])
        torch.set_rng_state(states[2])


class _PositionedSampler(Sampler[tuple[int, int, int]]):
    """The `(position, index, key)` stream of a TrainingSampler, for a DataLoader."""

    def __init__(self, sampler: TrainingSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return self.sampler.stream()


class _StepConditions:
    """position -> the condition of its training step (`ConditionsSteps`), drawn from
    `sampler.step_key(position // batch_size)`; the same in every process."""

    def __init__(self, mapper: ConditionsSteps, sampler: TrainingSampler, batch_size: int) -> None:
        self.mapper = mapper
        self.sampler = sampler
        self.batch_size = batch_size
        self._step: int | None = None
        self._condition: Hashable | None = None

    def __call__(self, position: int) -> Hashable | None:
        step = position // self.batch_size
        if step != self._step:
            rng = np.random.default_rng(self.sampler.step_key(step))
            self._step, self._condition = step, self.mapper.step_condition(rng)
        return self._condition


class _TrainingSamples(Dataset):
    """(position, index, key) -> (position, index, `_map` of dataset[index] under
    `_seeded_rngs(key)`, and under its step's condition when `conditions` is given)."""

    def __init__(
        self,
        dataset: Sequence[dict[str, Any]],
        mapper: Mapper,
        conditions: _StepConditions | None = None,
    ) -> None:
        self.dataset = dataset
        self.mapper = mapper
        self.conditions = conditions

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int, int]) -> tuple[int, int, Any]:
        position, index, key = item
        condition = None if self.conditions is None else self.conditions(position)
        with _seeded_rngs(key):
            mapped = _map(
                self.mapper, self.dataset, index, f"training sample {position}", condition
            )
        return position, index, mapped


class _CountedSamples:
    """The (position, sample or None) pairs a Batcher groups, from the DataLoader's
    (position, index, `_Mapped` or `_Failure`) items: raises failures, counts skips, logs a
    summary after every pass with skips, and raises when every one of the `drawable` distinct
    images (those of weight > 0) was skipped with none kept."""

    def __init__(
        self,
        loader: DataLoader,
        dataset: Sequence[dict[str, Any]],
        pass_length: int,
        source: str,
        drawable: int,
    ) -> None:
        self.loader = loader
        self.dataset = dataset
        self.pass_length = pass_length
        self.drawable = drawable
        self.skips = SkipCounter(source)

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any] | None]]:
        unusable: set[int] = set()  # distinct indices skipped since the last kept sample
        in_pass: Counter[str] = Counter()
        for drawn, (position, index, result) in enumerate(self.loader, start=1):
            if isinstance(result, _Failure):
                result.reraise()
            sample, kind = result
            if sample is None:
                self.skips.add(kind, self.dataset[index].get("file_name", "?"))
                in_pass[kind] += 1
                unusable.add(index)
                if len(unusable) == self.drawable:
                    raise DatasetError(
                        f"{self.skips.source}: no training sample can be used: all "
                        f"{self.drawable} images were skipped ({self.skips.total} skips: "
                        f"{SkipCounter.format(self.skips.by_kind)}); fix or remove the files "
                        "named in the warnings above"
                    )
            else:
                unusable.clear()
            if drawn % self.pass_length == 0 and in_pass:
                logger.warning(
                    "%s: skipped %d of the %d samples of the last pass (%s); %d skipped in all",
                    self.skips.source,
                    sum(in_pass.values()),
                    self.pass_length,
                    SkipCounter.format(in_pass),
                    self.skips.total,
                )
                in_pass.clear()
            yield position, sample


def _identity(batch: Any) -> Any:
    """collate_fn that leaves a sample (or a list of samples) as it is."""
    return batch


class TrainLoader:
    """Infinite batches for this rank, resumable at any point of the data order.

    Args:
        sampler: the index stream; repositioned by `load_state_dict`.
        batcher: groups the positioned samples into batches.
        skips: counts the samples the mapper skipped (see the module docstring).
    """

    def __init__(self, sampler: TrainingSampler, batcher: Batcher, skips: SkipCounter) -> None:
        self.sampler = sampler
        self.batcher = batcher
        self.skips = skips

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return iter(self.batcher)

    @property
    def batch_size(self) -> int:
        """Images per batch on this rank."""
        return self.batcher.batch_size

    @property
    def num_skipped(self) -> int:
        """Samples the mapper skipped so far on this rank (a metric to log)."""
        return self.skips.total

    @property
    def skipped(self) -> Counter[str]:
        """Samples the mapper skipped so far on this rank, by kind."""
        return Counter(self.skips.by_kind)

    def state_dict(self) -> dict[str, Any]:
        """Where the data order is: {"next_position", "pending"} (see `Batcher.state_dict`)."""
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Makes the next iteration continue from `state` (call before iterating)."""
        self.sampler.set_start(state["next_position"], replay=state["pending"])
        self.batcher.next_position = state["next_position"]


def _has_instances(record: dict[str, Any]) -> bool:
    """Whether a dataset dict has at least one non-crowd annotation."""
    return any(ann.get("iscrowd", 0) == 0 for ann in record.get("annotations", ()))


def build_train_loader(
    dataset: Sequence[dict[str, Any]],
    mapper: Mapper,
    total_batch_size: int,
    num_workers: int,
    seed: int,
    aspect_ratio_grouping: bool = True,
    filter_empty: bool = True,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    start: int = 0,
    source: str = "the training data",
) -> TrainLoader:
    """An infinite iterable of batches (lists of mapped dicts) for this rank.

    Args:
        dataset: dataset dicts (see `detframe.data.coco`).
        mapper: dataset dict -> mapped dict, or `None` to skip the sample; its optional
            `PreparesDataset` and `ConditionsSteps` parts are used (see the module docstring).
        total_batch_size: images per iteration summed over all ranks.
        num_workers: DataLoader worker processes; 0 maps in this process.
        seed: seed of the index order and of the workers' RNGs; the same on every rank.
        aspect_ratio_grouping: batch landscape and portrait images separately.
        filter_empty: drop dataset dicts with no non-crowd annotation first.
        rank, world_size: this process's shard; default from `torch.distributed`.
        start: indices of this rank's sampler stream to skip (see `TrainingSampler`).
        source: names the data in messages, e.g. "DATASETS.TRAIN ['coco_2017_train']".

    Returns:
        A `TrainLoader`; its `num_skipped` and `skipped` count the samples the mapper
        skipped. Iterating it raises `DatasetError` when every sample is skipped.

    Raises:
        ValueError: `total_batch_size` not divisible by the world size, or no data left.
        DatasetError: the mapper's `prepare_dataset` gives every image weight 0 (or raises
            it, e.g. DeepMaskPatchMapper when no annotation can be a positive).
    """
    rank, world_size = resolve_rank(rank, world_size)
    if total_batch_size % world_size != 0:
        raise ValueError(
            f"total batch size {total_batch_size} is not divisible by the world size {world_size}"
        )
    if filter_empty:
        kept = [record for record in dataset if _has_instances(record)]
        logger.info(
            "%s: dropped %d of %d images without annotations",
            source,
            len(dataset) - len(kept),
            len(dataset),
        )
        dataset = kept
    if not dataset:
        raise ValueError(f"{source} is empty (after filtering images without annotations)")
    weights = _image_weights(mapper, dataset, source)
    sampler = TrainingSampler(
        len(dataset),
        shuffle=True,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start=start,
        weights=weights,
    )
    batch_size = total_batch_size // world_size
    conditions = (
        _StepConditions(mapper, sampler, batch_size)
        if isinstance(mapper, ConditionsSteps)
        else None
    )
    loader = DataLoader(
        _TrainingSamples(dataset, mapper, conditions),
        sampler=_PositionedSampler(sampler),
        batch_size=None,
        collate_fn=_identity,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    drawable = len(dataset) if weights is None else int(np.count_nonzero(weights))
    pass_length = math.ceil(len(dataset) / world_size)
    samples = _CountedSamples(loader, dataset, pass_length, source, drawable)
    batcher = AspectRatioGroupedBatcher if aspect_ratio_grouping else Batcher
    return TrainLoader(sampler, batcher(samples, batch_size, conditions), samples.skips)


def _image_weights(
    mapper: Mapper, dataset: Sequence[dict[str, Any]], source: str
) -> np.ndarray | None:
    """The mapper's `prepare_dataset` weights of `dataset` (None without that part).

    Raises:
        DatasetError: they are all 0.
        ValueError: they are not [len(dataset)] finite values >= 0.
    """
    if not isinstance(mapper, PreparesDataset):
        return None
    weights = mapper.prepare_dataset(dataset, source)
    if weights is None:
        return None
    what = f"{source}: the sampling weights of {type(mapper).__name__}.prepare_dataset"
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(dataset),):
        raise ValueError(f"{what} have shape {weights.shape}, not ({len(dataset)},)")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"{what} must be finite and >= 0")
    zero = len(dataset) - int(np.count_nonzero(weights))
    if zero == len(dataset):
        raise DatasetError(
            f"{what} are 0 for all {len(dataset)} images: no training image can be drawn"
        )
    if zero:
        logger.info(
            "%s: %d of %d images have weight 0 and are never drawn", source, zero, len(dataset)
        )
    return weights


def build_train_loader_from_config(
    cfg: DictConfig, dataset: Sequence[dict[str, Any]], mapper: Mapper
) -> TrainLoader:
    """`build_train_loader` with SOLVER.IMS_PER_BATCH, DATALOADER.* and SEED from `cfg`;
    `dataset` holds the dicts of DATASETS.TRAIN, which messages name.

    A null SEED is replaced by a random one, which is logged; with more than one process
    that would give each rank a different order, so SEED must then be set (the launcher
    resolves it once).
    """
    seed = cfg.SEED
    if seed is None:
        if resolve_rank(None, None)[1] > 1:
            raise ValueError("SEED must be set (not null) when training on more than one process")
        seed = int(np.random.SeedSequence().generate_state(1)[0])
        logger.info("SEED is null; using seed %d", seed)
    return build_train_loader(
        dataset,
        mapper,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        seed=seed,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        source=f"DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}",
    )


class TestLoader:
    """Batches (lists of mapped dicts) over this rank's shard of a dataset, once per
    iteration; skipped samples are left out of the batches (see the module docstring).

    `len()` is the number of batches before skipping. After an iteration, `num_skipped` and
    `skipped` count what it skipped.

    Args:
        loader: a DataLoader over `_MappedDataset` whose batches are lists of its items.
        dataset: the dataset dicts (for the file names in messages).
        on_bad: "error" raises on a skipped sample, "skip" leaves it out and counts it.
        source: names the dataset in messages.
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(
        self,
        loader: DataLoader,
        dataset: Sequence[dict[str, Any]],
        on_bad: OnBad,
        source: str,
    ) -> None:
        self.loader = loader
        self.dataset = dataset
        self.on_bad = on_bad
        self.skips = SkipCounter(source)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_skipped(self) -> int:
        """Samples skipped in the last iteration."""
        return self.skips.total

    @property
    def skipped(self) -> Counter[str]:
        """Samples skipped in the last iteration, by kind."""
        return Counter(self.skips.by_kind)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        self.skips = skips = SkipCounter(self.skips.source)
        total = 0
        for items in self.loader:
            batch = []
            for index, result in items:
                if isinstance(result, _Failure):
                    result.reraise()
                sample, kind = result
                total += 1
                if sample is not None:
                    batch.append(sample)
                    continue
                file_name = self.dataset[index].get("file_name", "?")
                if self.on_bad == "error":
                    raise DatasetError(
                        f"{skips.source}: the mapper skipped test sample {index} ({file_name}: "
                        f"{kind}) but evaluation must see every image: fix the file, or set "
                        "DATALOADER.ON_BAD_DATA=skip to evaluate without it"
                    )
                skips.add(kind, file_name)
            if batch:
                yield batch
        if not skips.total:
            return
        if skips.total == total:
            raise DatasetError(
                f"{skips.source}: no test sample can be used: all {total} images of this "
                f"process's share were skipped ({SkipCounter.format(skips.by_kind)})"
            )
        logger.warning(
            "%s: skipped %d of %d test images (%s); the metrics are of the other %d",
            skips.source,
            skips.total,
            total,
            SkipCounter.format(skips.by_kind),
            total - skips.total,
        )


def build_test_loader(
    dataset: Sequence[dict[str, Any]],
    mapper: Mapper,
    num_workers: int = 0,
    batch_size: int = 1,
    *,
    on_bad: OnBad = "error",
    dataset_name: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> TestLoader:
    """A finite iterable of lists of mapped dicts over this rank's shard of `dataset`.

    Args:
        dataset: dataset dicts.
        mapper: dataset dict -> mapped dict, or `None` to skip the sample.
        num_workers: DataLoader worker processes; 0 maps in this process.
        batch_size: samples mapped per list (a list is shorter when samples were skipped,
            and the last may be shorter).
        on_bad: what a skipped sample does (DATALOADER.ON_BAD_DATA): "error" raises
            `DatasetError` naming its file, "skip" leaves it out, counts and logs it.
        dataset_name: named in messages.
        rank, world_size: this process's shard; default from `torch.distributed`.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    loader = DataLoader(
        _MappedDataset(dataset, mapper),
        sampler=InferenceSampler(len(dataset), rank=rank, world_size=world_size),
        batch_size=batch_size,
        collate_fn=_identity,
        num_workers=num_workers,
    )
    source = f"dataset {dataset_name!r}" if dataset_name else "the test data"
    return TestLoader(loader, dataset, on_bad, source)
