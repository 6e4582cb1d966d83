"""Training and test data loaders: dataset dicts -> mapper -> batches (lists of mapped dicts).

- `build_train_loader(dataset, mapper, total_batch_size, num_workers, seed, ...)`: a
  `TrainLoader`, an infinite iterable of lists of `total_batch_size / world_size` mapped
  dicts for this rank. Indices come from a `TrainingSampler`; the mapper runs in the
  DataLoader workers; samples the mapper returns `None` for are skipped and counted
  (`loader.num_skipped`). `loader.state_dict()` / `load_state_dict()` save and restore the
  position in the data order, so a resumed run draws exactly the batches an uninterrupted
  run would have.
- `build_test_loader(dataset, mapper, num_workers, batch_size)`: a finite iterable of lists
  over this rank's `InferenceSampler` shard; a mapper returning `None` is an error here,
  because evaluation must see every image.
- `build_train_loader_from_config(cfg, dataset, mapper)`: the one place that reads the
  config keys declared below.

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
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from detframe.config import declare

from .samplers import (
    AspectRatioGroupedBatcher,
    Batcher,
    InferenceSampler,
    TrainingSampler,
    resolve_rank,
)

__all__ = [
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


class _MappedDataset(Dataset):
    """`mapper(dataset[i])` for a test loader; the mapper returning `None` is an error."""

    def __init__(self, dataset: Sequence[dict[str, Any]], mapper: Mapper) -> None:
        self.dataset = dataset
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        mapped = self.mapper(self.dataset[index])
        if mapped is None:
            name = self.dataset[index].get("file_name", "?")
            raise ValueError(f"the mapper returned None for test sample {index} ({name})")
        return mapped


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


class _TrainingSamples(Dataset):
    """(position, index, key) -> (position, mapper(dataset[index]) under `_seeded_rngs(key)`);
    the mapped sample may be `None` (skipped by the batcher)."""

    def __init__(self, dataset: Sequence[dict[str, Any]], mapper: Mapper) -> None:
        self.dataset = dataset
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int, int]) -> tuple[int, dict[str, Any] | None]:
        position, index, key = item
        with _seeded_rngs(key):
            return position, self.mapper(self.dataset[index])


def _identity(batch: Any) -> Any:
    """collate_fn that leaves a sample (or a list of samples) as it is."""
    return batch


class TrainLoader:
    """Infinite batches for this rank, resumable at any point of the data order.

    Args:
        sampler: the index stream; repositioned by `load_state_dict`.
        batcher: groups the DataLoader's positioned samples into batches.
    """

    def __init__(self, sampler: TrainingSampler, batcher: Batcher) -> None:
        self.sampler = sampler
        self.batcher = batcher

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return iter(self.batcher)

    @property
    def batch_size(self) -> int:
        """Images per batch on this rank."""
        return self.batcher.batch_size

    @property
    def num_skipped(self) -> int:
        """Samples the mapper rejected so far."""
        return self.batcher.num_skipped

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
) -> TrainLoader:
    """An infinite iterable of batches (lists of mapped dicts) for this rank.

    Args:
        dataset: dataset dicts (see `detframe.data.coco`).
        mapper: dataset dict -> mapped dict, or `None` to skip the sample.
        total_batch_size: images per iteration summed over all ranks.
        num_workers: DataLoader worker processes; 0 maps in this process.
        seed: seed of the index order and of the workers' RNGs; the same on every rank.
        aspect_ratio_grouping: batch landscape and portrait images separately.
        filter_empty: drop dataset dicts with no non-crowd annotation first.
        rank, world_size: this process's shard; default from `torch.distributed`.
        start: indices of this rank's sampler stream to skip (see `TrainingSampler`).

    Returns:
        A `TrainLoader`; its `num_skipped` counts the samples the mapper rejected.

    Raises:
        ValueError: `total_batch_size` not divisible by the world size, or no data left.
    """
    rank, world_size = resolve_rank(rank, world_size)
    if total_batch_size % world_size != 0:
        raise ValueError(
            f"total batch size {total_batch_size} is not divisible by the world size {world_size}"
        )
    if filter_empty:
        kept = [record for record in dataset if _has_instances(record)]
        logger.info(
            "dropped %d of %d images without annotations", len(dataset) - len(kept), len(dataset)
        )
        dataset = kept
    if not dataset:
        raise ValueError("the training dataset is empty (after filtering empty images)")
    sampler = TrainingSampler(
        len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size, start=start
    )
    loader = DataLoader(
        _TrainingSamples(dataset, mapper),
        sampler=_PositionedSampler(sampler),
        batch_size=None,
        collate_fn=_identity,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    batcher = AspectRatioGroupedBatcher if aspect_ratio_grouping else Batcher
    return TrainLoader(sampler, batcher(loader, total_batch_size // world_size))


def build_train_loader_from_config(
    cfg: DictConfig, dataset: Sequence[dict[str, Any]], mapper: Mapper
) -> TrainLoader:
    """`build_train_loader` with SOLVER.IMS_PER_BATCH, DATALOADER.* and SEED from `cfg`.

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
    )


def build_test_loader(
    dataset: Sequence[dict[str, Any]],
    mapper: Mapper,
    num_workers: int = 0,
    batch_size: int = 1,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """A finite iterable of lists of mapped dicts over this rank's shard of `dataset`.

    Args:
        dataset: dataset dicts.
        mapper: dataset dict -> mapped dict; returning `None` raises ValueError.
        num_workers: DataLoader worker processes; 0 maps in this process.
        batch_size: samples per list (the last list may be shorter).
        rank, world_size: this process's shard; default from `torch.distributed`.
    """
    return DataLoader(
        _MappedDataset(dataset, mapper),
        sampler=InferenceSampler(len(dataset), rank=rank, world_size=world_size),
        batch_size=batch_size,
        collate_fn=_identity,
        num_workers=num_workers,
    )
