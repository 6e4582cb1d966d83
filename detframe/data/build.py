"""Training and test data loaders: dataset dicts -> mapper -> batches (lists of mapped dicts).

- `build_train_loader(dataset, mapper, total_batch_size, num_workers, seed, ...)`: an
  infinite iterable of lists of `total_batch_size / world_size` mapped dicts for this rank.
  Indices come from a `TrainingSampler`; the mapper runs in the DataLoader workers; samples
  the mapper returns `None` for are skipped and counted (`loader.num_skipped`).
- `build_test_loader(dataset, mapper, num_workers, batch_size)`: a finite iterable of lists
  over this rank's `InferenceSampler` shard; a mapper returning `None` is an error here,
  because evaluation must see every image.
- `build_train_loader_from_config(cfg, dataset, mapper)`: the one place that reads the
  config keys declared below.

Determinism: given the seed (and rank), the index order, each worker's numpy / `random` /
torch RNG seeds, and so the mapper's random augmentation, are fixed. Each worker is seeded
from (seed, rank, worker id); with `num_workers=0` the main process's RNGs are seeded that
way (worker id 0) each time iteration starts.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from detframe.config import declare

from .samplers import (
    AspectRatioGroupedBatcher,
    Batcher,
    InferenceSampler,
    TrainingSampler,
    resolve_rank,
)

__all__ = ["build_test_loader", "build_train_loader", "build_train_loader_from_config"]

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
    """`mapper(dataset[i])`; `None` is returned as is, or is an error if `allow_none` is False."""

    def __init__(self, dataset: Sequence[dict[str, Any]], mapper: Mapper, allow_none: bool) -> None:
        self.dataset = dataset
        self.mapper = mapper
        self.allow_none = allow_none

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        mapped = self.mapper(self.dataset[index])
        if mapped is None and not self.allow_none:
            name = self.dataset[index].get("file_name", "?")
            raise ValueError(f"the mapper returned None for test sample {index} ({name})")
        return mapped


def _identity(batch: Any) -> Any:
    """collate_fn that leaves a sample (or a list of samples) as it is."""
    return batch


def _seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """Seeds numpy, `random` and torch in this process from (seed, rank, worker_id)."""
    state = np.random.SeedSequence([seed, rank, worker_id]).generate_state(2)
    np.random.seed(int(state[0]))
    random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


class _SeededDataLoader(DataLoader):
    """A DataLoader that, with no workers, seeds the main process as worker 0 on `iter`."""

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0:
            self.worker_init_fn(0)
        return super().__iter__()


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
) -> Batcher:
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
        A `Batcher`; its `num_skipped` counts the samples the mapper rejected.

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
    loader = _SeededDataLoader(
        _MappedDataset(dataset, mapper, allow_none=True),
        sampler=sampler,
        batch_size=None,
        collate_fn=_identity,
        num_workers=num_workers,
        worker_init_fn=functools.partial(_seed_worker, seed, rank),
        generator=torch.Generator().manual_seed(seed),
    )
    batcher = AspectRatioGroupedBatcher if aspect_ratio_grouping else Batcher
    return batcher(loader, total_batch_size // world_size)


def build_train_loader_from_config(
    cfg: DictConfig, dataset: Sequence[dict[str, Any]], mapper: Mapper
) -> Batcher:
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
        _MappedDataset(dataset, mapper, allow_none=False),
        sampler=InferenceSampler(len(dataset), rank=rank, world_size=world_size),
        batch_size=batch_size,
        collate_fn=_identity,
        num_workers=num_workers,
    )
