"""The process group, seen from one process: rank, world size, gathering and averaging.

Every function works without torch.distributed, or with an uninitialised process group, as a
world of one process (rank 0). Collectives must be called by every rank in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather",
    "average_over_ranks",
    "gather_to_main_process",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "mean_over_ranks",
    "synchronize",
]


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """The number of processes in the default group (1 without one)."""
    return dist.get_world_size() if _initialised() else 1


def get_rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if _initialised() else 0


def get_local_rank() -> int:
    """This process's rank on its machine: LOCAL_RANK as set by torchrun or detframe's
    launcher, else 0."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """Whether this is rank 0, the process that writes files and logs."""
    return get_rank() == 0


def synchronize() -> None:
    """A barrier across all ranks; nothing without a process group of more than one."""
    if get_world_size() > 1:
        dist.barrier()


def all_gather(item: Any) -> list[Any]:
    """Every rank's `item` (any picklable object), in rank order, on every rank."""
    if get_world_size() == 1:
        return [item]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, item)
    return gathered


def gather_to_main_process(items: list[Any]) -> list[Any] | None:
    """The concatenation of every rank's `items` on rank 0, None on the other ranks.

    Without a process group of more than one it returns `items`.
    """
    if get_world_size() == 1:
        return items
    gathered: list[Any] | None = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(items, gathered, dst=0)
    if gathered is None:
        return None
    return [item for part in gathered for item in part]


def mean_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """The mean of each value over all ranks, on every rank (same keys on every rank).

    One all-reduce of a float64 tensor; the keys are taken in sorted order.
    """
    if get_world_size() == 1:
        return {k: float(v) for k, v in values.items()}
    names = sorted(values)
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= get_world_size()
    return dict(zip(names, tensor.tolist(), strict=True))


def average_over_ranks(count: torch.Tensor) -> torch.Tensor:
    """A loss normaliser that makes data-parallel training equal single-process training.

    A loss computed as `sum_r / average_over_ranks(n_r)` on each rank r (its summed terms over
    its n_r items) has gradients that, averaged over the ranks as DistributedDataParallel does,
    equal those of `sum over ranks of sum_r / sum over ranks of n_r`: the loss of one process
    holding the whole batch. Returns `max(sum of count over ranks, 1) / world size` as a float
    tensor (no gradient) on `count`'s device; with one process, `max(count, 1)`.

    Every rank must call it the same number of times, so use it in training only.
    """
    total = count.detach().to(torch.float64).reshape(())
    world_size = get_world_size()
    if world_size > 1:
        total = total.clone()
        dist.all_reduce(total)
    return (total.clamp(min=1.0) / world_size).to(torch.float32)
