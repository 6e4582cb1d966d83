"""Index samplers for training and inference, and the batchers that group mapped samples.

- `TrainingSampler(size, shuffle, seed, rank, world_size, start, weights)`: an infinite
  stream of dataset indices for one rank. The *global stream* is the concatenation of one
  block of `size` indices per epoch, epoch `e` drawn from a generator seeded from
  `(seed, e)`: a permutation of `range(size)`, or with `weights` `size` independent draws,
  index i with probability `weights[i] / sum(weights)` (an index of weight 0 never comes).
  Rank `r` of `W` takes its elements `r, r + W, r + 2W, ...`. So the ranks together see
  every index exactly once per epoch (without weights), and a step in which each of W ranks
  takes `b` samples uses the same `W * b` samples as one process taking `W * b`.
  `stream()` yields `(position, index, key)`: the position in this rank's stream (what
  resuming counts), the dataset index, and a key (a seed) that depends only on `seed` and the
  element's place in the global stream, not on the rank or the world size. `step_key(step)`
  is a seed for a choice made once per training step: the positions `[step * b, (step + 1)
  * b)` of every rank, from `seed` and `step` only.
- `InferenceSampler(size, rank, world_size)`: a finite stream covering every index exactly
  once across ranks, in contiguous shards whose sizes differ by at most one.
- `Batcher(samples, batch_size)`: groups `(position, sample)` pairs into lists of
  `batch_size` samples, skipping (and counting) `None` samples; `AspectRatioGroupedBatcher`
  keeps landscape (w >= h) and portrait images in separate groups, so a batch is one or the
  other. With `condition_of` (position -> a step's condition, see `detframe.data.build`),
  samples of different conditions never share a batch either, even when skipped samples move
  the batch boundaries. Its `state_dict()` records the next position to draw and the
  positions it holds in unfilled groups, which is what resuming needs to continue exactly.

`rank` / `world_size` default to `torch.distributed`'s when it is initialised, else 0 / 1.
Nothing here touches global state.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, Sampler

__all__ = [
    "AspectRatioGroupedBatcher",
    "Batcher",
    "InferenceSampler",
    "TrainingSampler",
    "resolve_rank",
]


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size), with `None`s filled from `torch.distributed` (or 0 / 1); validated."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return rank, world_size


def _epoch_seed(seed: int, epoch: int) -> int:
    """A generator seed for `(seed, epoch)`; distinct pairs give distinct seeds in practice."""
    return (seed * 1_000_003 + epoch) % (2**63)


class TrainingSampler(Sampler[int]):
    """An infinite, deterministic, rank-sharded stream of indices into a dataset of `size`.

    Resuming: `start` (or `set_start`) is the number of indices *this rank* has already
    yielded, i.e. the position in this rank's stream to continue from, and `replay` lists
    earlier positions to yield again first (the samples a batcher held back when the run
    stopped). A run resumed with `start = n` yields exactly what an uninterrupted run yields
    after its first `n` indices.

    Weighted sampling: with `weights`, each epoch is `size` independent draws with
    probabilities `weights / weights.sum()` (numpy's `Generator.choice`) instead of a
    permutation; determinism, sharding and resuming are the same.
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
        weights: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """
        Args:
            size: number of samples in the dataset; at least `world_size`.
            shuffle: permute each epoch; if False, every epoch is `0..size-1` in order.
            seed: seed of the per-epoch permutations; must be the same on every rank.
            rank, world_size: this process's shard; see the module docstring for defaults.
            start: indices of this rank's stream to skip (see the class docstring).
            weights: [size] non-negative sampling weights, not all 0 (see the class
                docstring); None: permutations. Needs `shuffle`.

        Raises:
            ValueError: `weights` of another length, negative, not finite or all 0, or
                given with shuffle=False.
        """
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if size < self.world_size:
            raise ValueError(
                f"dataset size {size} is smaller than the world size {self.world_size}"
            )
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.probabilities = None if weights is None else _probabilities(weights, size, shuffle)
        self.set_start(start)

    def set_start(self, start: int, replay: Sequence[int] = ()) -> None:
        """Makes the next iteration yield the positions in `replay`, then continue after the
        first `start` indices of this rank's stream."""
        if start < 0 or any(not 0 <= p < start for p in replay):
            raise ValueError(f"start must be >= 0 and replay in [0, start), got {start}, {replay}")
        self.start = start
        self.replay = list(replay)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The indices of epoch `epoch` (all ranks), int64 `[size]`: a permutation, or the
        weighted draws."""
        if not self.shuffle:
            return torch.arange(self.size)
        if self.probabilities is not None:
            rng = np.random.default_rng(_epoch_seed(self.seed, epoch))
            return torch.from_numpy(rng.choice(self.size, size=self.size, p=self.probabilities))
        generator = torch.Generator()
        generator.manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=generator)

    def _global(self, position: int) -> int:
        """The place in the global stream of this rank's `position`."""
        return self.rank + position * self.world_size

    def sample_key(self, position: int) -> int:
        """A 64-bit seed for the sample at this rank's `position`, from `seed` and its place
        in the global stream only."""
        state = np.random.SeedSequence([self.seed, self._global(position)]).generate_state(2)
        return int(state[0]) << 32 | int(state[1])

    def step_key(self, step: int) -> int:
        """A 64-bit seed for training step `step`, from `seed` and `step` only: the same on
        every rank, and independent of the samples' keys (another SeedSequence spawn key)."""
        sequence = np.random.SeedSequence([self.seed, step], spawn_key=(1,))
        state = sequence.generate_state(2)
        return int(state[0]) << 32 | int(state[1])

    def stream(self) -> Iterator[tuple[int, int, int]]:
        """(position, dataset index, sample key) for `replay`, then from `start` on."""
        for position in self.replay:
            epoch, offset = divmod(self._global(position), self.size)
            yield position, int(self.epoch_order(epoch)[offset]), self.sample_key(position)
        position = self.start
        epoch, offset = divmod(self._global(position), self.size)
        while True:
            order = self.epoch_order(epoch).tolist()
            while offset < self.size:
                yield position, order[offset], self.sample_key(position)
                position += 1
                offset += self.world_size
            epoch, offset = epoch + 1, offset - self.size

    def __iter__(self) -> Iterator[int]:
        return (index for _, index, _ in self.stream())


def _probabilities(weights: Sequence[float] | np.ndarray, size: int, shuffle: bool) -> np.ndarray:
    """TrainingSampler's `weights` checked and normalised to sum to 1, float64 [size]."""
    if not shuffle:
        raise ValueError("weights need shuffle=True: weighted draws are random")
    array = np.asarray(weights, dtype=np.float64)
    if array.shape != (size,):
        raise ValueError(f"weights must have shape ({size},), one per sample, got {array.shape}")
    if not np.isfinite(array).all() or (array < 0).any():
        bad = np.flatnonzero(~np.isfinite(array) | (array < 0))
        raise ValueError(
            f"weights must be finite and >= 0; {bad.size} are not, e.g. index {bad[0]}: "
            f"{array[bad[0]]}"
        )
    total = array.sum()
    if total <= 0:
        raise ValueError(f"weights are all 0: no sample of the {size} can be drawn")
    return array / total


class InferenceSampler(Sampler[int]):
    """Every index in `range(size)` exactly once across ranks, in contiguous shards.

    Rank `r` of `W` gets `size // W` indices, plus one if `r < size % W`.
    """

    def __init__(self, size: int, rank: int | None = None, world_size: int | None = None) -> None:
        """
        Args:
            size: number of samples in the dataset.
            rank, world_size: this process's shard; see the module docstring for defaults.
        """
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        base, extra = divmod(size, self.world_size)
        begin = self.rank * base + min(self.rank, extra)
        self.indices = range(begin, begin + base + (self.rank < extra))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class Batcher(IterableDataset):
    """Lists of `batch_size` samples from an iterable of `(position, sample)` pairs.

    Positions number the samples in the order they are drawn (see `TrainingSampler`);
    `None` samples (the mapper rejected them) are skipped and counted in `num_skipped`.
    Samples are put in groups by `group_of` and, with `condition_of`, by the condition of
    their position; a group is yielded as a batch when it is full. This class has one group
    per condition; subclasses override `group_of`. A partial group left when `samples` ends
    is dropped (training streams are infinite).
    """

    def __init__(
        self,
        samples: Iterable[tuple[int, dict[str, Any] | None]],
        batch_size: int,
        condition_of: Callable[[int], Hashable] | None = None,
    ) -> None:
        """
        Args:
            samples: the positioned, mapped samples, e.g. a DataLoader with `batch_size=None`.
            batch_size: samples per yielded list; >= 1.
            condition_of: position -> the condition its sample was mapped under (a function
                of the position only); None: no conditions.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.samples = samples
        self.batch_size = batch_size
        self.condition_of = condition_of
        self.num_skipped = 0
        self.next_position = 0
        self._groups: dict[tuple[Hashable, int], list[tuple[int, dict[str, Any]]]] = {}

    def group_of(self, sample: dict[str, Any]) -> int:
        """The group a sample belongs to; batches hold samples of one group."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        """{"next_position": one past the last position drawn, "pending": the positions
        held in unfilled groups, in the order they were drawn}."""
        pending = sorted(p for group in self._groups.values() for p, _ in group)
        return {"next_position": self.next_position, "pending": pending}

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        self._groups = {}
        for position, sample in self.samples:
            self.next_position = max(self.next_position, position + 1)
            if sample is None:
                self.num_skipped += 1
                continue
            condition = None if self.condition_of is None else self.condition_of(position)
            group = self._groups.setdefault((condition, self.group_of(sample)), [])
            group.append((position, sample))
            if len(group) == self.batch_size:
                batch = [s for _, s in group]
                group.clear()
                yield batch


class AspectRatioGroupedBatcher(Batcher):
    """A `Batcher` whose batches are all landscape (w >= h) or all portrait images.

    The size of a sample is the last two dims of its `"image"` tensor `[C, H, W]` when it
    has one (the size after the mapper's resizing), else its `"width"` and `"height"`.
    """

    def group_of(self, sample: dict[str, Any]) -> int:
        """0 for landscape (w >= h), 1 for portrait."""
        if "image" in sample:
            height, width = sample["image"].shape[-2:]
        else:
            height, width = sample["height"], sample["width"]
        return 0 if width >= height else 1
