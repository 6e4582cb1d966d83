"""Tests of detframe.data.samplers and detframe.data.build: order, sharding, resume, batching,
weighted draws and per-step conditions."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from detframe.data.build import (
    build_test_loader,
    build_train_loader,
    build_train_loader_from_config,
)
from detframe.data.coco import DatasetError
from detframe.data.samplers import (
    AspectRatioGroupedBatcher,
    Batcher,
    InferenceSampler,
    TrainingSampler,
)
from detframe.engine.setup import load_config


def take(iterable: Any, n: int) -> list[Any]:
    """The first n items of an iterable."""
    return list(itertools.islice(iter(iterable), n))


def make_dataset(n: int) -> list[dict[str, Any]]:
    """n dataset dicts; even ids landscape (w > h), odd ids portrait; all annotated."""
    return [
        {
            "image_id": i,
            "file_name": f"{i}.jpg",
            "width": 40 if i % 2 == 0 else 20,
            "height": 20 if i % 2 == 0 else 40,
            "annotations": [{"bbox": [0, 0, 1, 1], "category_id": 0, "iscrowd": 0}],
        }
        for i in range(n)
    ]


def random_mapper(record: dict[str, Any]) -> dict[str, Any]:
    """Copies the record and adds a draw from numpy's global RNG (an 'augmentation')."""
    return {**record, "r": float(np.random.rand())}


def signature(batches: list[list[dict[str, Any]]]) -> list[list[tuple[int, float]]]:
    """(image_id, r) of every sample of every batch."""
    return [[(s["image_id"], s["r"]) for s in batch] for batch in batches]


def test_training_sampler_is_deterministic_and_seed_dependent() -> None:
    a = take(TrainingSampler(50, seed=3), 200)
    assert a == take(TrainingSampler(50, seed=3), 200)
    assert a != take(TrainingSampler(50, seed=4), 200)
    # each epoch is a permutation, and epochs differ
    assert sorted(a[:50]) == list(range(50)) and sorted(a[50:100]) == list(range(50))
    assert a[:50] != a[50:100]
    assert take(TrainingSampler(5, shuffle=False), 7) == [0, 1, 2, 3, 4, 0, 1]


@pytest.mark.parametrize("size", [12, 13])
def test_training_sampler_ranks_interleave_to_the_single_process_stream(size: int) -> None:
    world = 2
    single = take(TrainingSampler(size, seed=1), size * 3)
    streams = [
        take(TrainingSampler(size, seed=1, rank=r, world_size=world), 3 * size // 2)
        for r in range(world)
    ]
    interleaved = [index for pair in zip(*streams, strict=True) for index in pair]
    assert interleaved == single[: len(interleaved)]
    # so the ranks together see every index exactly once per epoch
    assert sorted(interleaved[:size]) == list(range(size))


def test_training_sampler_keys_depend_on_global_place_only() -> None:
    single = TrainingSampler(13, seed=4)
    ranks = [TrainingSampler(13, seed=4, rank=r, world_size=2) for r in range(2)]
    for position in range(20):
        for rank, sampler in enumerate(ranks):
            assert sampler.sample_key(position) == single.sample_key(2 * position + rank)
    keys = [single.sample_key(p) for p in range(100)]
    assert len(set(keys)) == 100
    assert keys != [TrainingSampler(13, seed=5).sample_key(p) for p in range(100)]


@pytest.mark.parametrize("size", [10, 11, 1])
def test_inference_sampler_contiguous_exact_cover(size: int) -> None:
    world = 3
    shards = [list(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)]
    assert list(itertools.chain(*shards)) == list(range(size))
    lengths = [len(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)]
    assert lengths == [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("start", [0, 4, 6, 7, 20])
def test_training_sampler_resume_continues_uninterrupted_stream(start: int) -> None:
    full = take(TrainingSampler(13, seed=9, rank=1, world_size=2), 40)
    resumed = TrainingSampler(13, seed=9, rank=1, world_size=2, start=start)
    assert take(resumed, 40 - start) == full[start:]
    later = TrainingSampler(13, seed=9, rank=1, world_size=2)
    later.set_start(start)
    assert take(later, 5) == full[start : start + 5]


def test_sampler_argument_errors() -> None:
    with pytest.raises(ValueError, match="rank"):
        TrainingSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="smaller than the world size"):
        TrainingSampler(1, rank=0, world_size=2)
    with pytest.raises(ValueError, match="start"):
        TrainingSampler(10, start=-1)


def test_aspect_grouping_yields_homogeneous_full_batches() -> None:
    samples = list(enumerate([*make_dataset(11), None, *make_dataset(7)]))
    batcher = AspectRatioGroupedBatcher(samples, batch_size=3)
    batches = list(batcher)
    assert batches and all(len(b) == 3 for b in batches)
    for batch in batches:
        assert len({s["width"] >= s["height"] for s in batch}) == 1
    assert batcher.num_skipped == 1
    # the image tensor, when present, decides: a landscape record with a portrait image
    portrait = {"width": 40, "height": 20, "image": torch.zeros(3, 50, 10)}
    assert batcher.group_of(portrait) == 1
    # the plain batcher mixes orientations in arrival order
    plain = list(Batcher(enumerate(make_dataset(6)), batch_size=3))
    assert [[s["image_id"] for s in b] for b in plain] == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("grouping", [True, False])
def test_train_loader_deterministic_and_seed_dependent(grouping: bool) -> None:
    dataset = make_dataset(20)

    def run(seed: int) -> list[list[tuple[int, float]]]:
        loader = build_train_loader(dataset, random_mapper, 4, 0, seed, grouping)
        return signature(take(loader, 8))

    first = run(5)
    assert all(len(b) == 4 for b in first)
    assert first == run(5)
    assert first != run(6)


def test_train_loader_with_two_workers_is_deterministic() -> None:
    dataset = make_dataset(16)

    def run() -> list[list[tuple[int, float]]]:
        loader = build_train_loader(dataset, random_mapper, 2, 2, 7, aspect_ratio_grouping=False)
        return signature(take(loader, 6))

    first = run()
    assert first == run()
    ids = [i for batch in first for i, _ in batch]
    assert ids == take(TrainingSampler(16, seed=7), 12)
    # the two workers' RNG streams differ
    assert len({r for batch in first for _, r in batch}) == 12


def test_train_loader_ranks_split_the_data() -> None:
    dataset = make_dataset(12)
    ids = []
    for rank in range(2):
        loader = build_train_loader(dataset, random_mapper, 4, 0, 1, False, rank=rank, world_size=2)
        batches = take(loader, 3)
        assert all(len(b) == 2 for b in batches)
        ids += [s["image_id"] for b in batches for s in b]
    assert sorted(ids) == list(range(12))


def test_train_loader_skips_and_counts_mapper_none() -> None:
    def mapper(record: dict[str, Any]) -> dict[str, Any] | None:
        return None if record["image_id"] % 3 == 0 else record

    loader = build_train_loader(make_dataset(9), mapper, 2, 0, 0, aspect_ratio_grouping=False)
    batches = take(loader, 6)  # 12 kept samples = two epochs of 6, 6 rejected
    assert all(s["image_id"] % 3 != 0 for b in batches for s in b)
    assert loader.num_skipped == 6


def test_train_loader_batch_size_must_divide() -> None:
    with pytest.raises(ValueError, match=r"total batch size 5 .* world size 2"):
        build_train_loader(make_dataset(4), random_mapper, 5, 0, 0, rank=0, world_size=2)


def test_train_loader_filters_images_without_instances() -> None:
    dataset = make_dataset(6)
    dataset[1]["annotations"] = []
    dataset[2]["annotations"] = [{"bbox": [0, 0, 1, 1], "category_id": 0, "iscrowd": 1}]
    del dataset[3]["annotations"]
    loader = build_train_loader(dataset, random_mapper, 3, 0, 0, aspect_ratio_grouping=False)
    assert Counter(s["image_id"] for b in take(loader, 4) for s in b) == {0: 4, 4: 4, 5: 4}
    unfiltered = build_train_loader(dataset, random_mapper, 6, 0, 0, False, filter_empty=False)
    assert sorted(s["image_id"] for s in take(unfiltered, 1)[0]) == list(range(6))
    dataset[0]["annotations"] = dataset[4]["annotations"] = dataset[5]["annotations"] = []
    with pytest.raises(ValueError, match="empty"):
        build_train_loader(dataset, random_mapper, 3, 0, 0)


def test_test_loader_covers_shard_in_order_and_rejects_none() -> None:
    dataset = make_dataset(7)
    batches = list(build_test_loader(dataset, random_mapper, batch_size=2, rank=1, world_size=2))
    assert [[s["image_id"] for s in b] for b in batches] == [[4, 5], [6]]
    with pytest.raises(ValueError, match=r"skipped test sample 0 \(0.jpg: rejected by the mapper"):
        list(build_test_loader(dataset, lambda record: None))


def test_train_loader_from_config(tmp_path: Any) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("SEED: 3\nSOLVER:\n  IMS_PER_BATCH: 2\nDATALOADER:\n  NUM_WORKERS: 0\n")
    cfg = load_config(path, ["DATALOADER.ASPECT_RATIO_GROUPING=false"])
    loader = build_train_loader_from_config(cfg, make_dataset(8), random_mapper)
    expected = build_train_loader(make_dataset(8), random_mapper, 2, 0, 3, False)
    assert signature(take(loader, 4)) == signature(take(expected, 4))


def test_train_loader_same_samples_whatever_the_workers() -> None:
    dataset = make_dataset(16)

    def run(workers: int) -> list[list[tuple[int, float]]]:
        loader = build_train_loader(dataset, random_mapper, 2, workers, 7, False)
        return signature(take(loader, 6))

    assert run(0) == run(2)


def test_train_loader_ranks_split_each_step_of_the_single_process_run() -> None:
    """W ranks of b images per step draw, together, the W * b samples (image and random
    augmentation) one process with batch W * b draws."""
    dataset = make_dataset(10)
    single = signature(take(build_train_loader(dataset, random_mapper, 4, 0, 3, False), 7))
    ranks = [
        signature(
            take(
                build_train_loader(dataset, random_mapper, 4, 0, 3, False, rank=r, world_size=2), 7
            )
        )
        for r in range(2)
    ]
    for step, batch in enumerate(single):
        assert sorted(batch) == sorted(ranks[0][step] + ranks[1][step])


@pytest.mark.parametrize("grouping", [True, False])
@pytest.mark.parametrize("stop", [1, 3, 4])
def test_train_loader_resumes_exactly_from_its_state(grouping: bool, stop: int) -> None:
    # 7 landscape, 6 portrait: with grouping, samples are held back across batches
    dataset = make_dataset(13)
    full = signature(take(build_train_loader(dataset, random_mapper, 3, 0, 2, grouping), 10))
    first = build_train_loader(dataset, random_mapper, 3, 0, 2, grouping)
    iterator = iter(first)
    assert signature([next(iterator) for _ in range(stop)]) == full[:stop]
    state = first.state_dict()
    if grouping and stop == 3:
        assert state["pending"], "the case meant to hold samples back holds none"
    resumed = build_train_loader(dataset, random_mapper, 3, 0, 2, grouping)
    resumed.load_state_dict(state)
    assert signature(take(resumed, 10 - stop)) == full[stop:]


def test_train_loader_leaves_the_process_rngs_alone() -> None:
    np.random.seed(11)
    torch.manual_seed(11)
    before = np.random.rand(), torch.rand(1).item()
    np.random.seed(11)
    torch.manual_seed(11)
    take(build_train_loader(make_dataset(8), random_mapper, 2, 0, 1, False), 3)
    assert (np.random.rand(), torch.rand(1).item()) == before


# Weighted sampling: dataset index -> weight; 0s are never drawn.
WEIGHTS = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 10.0])


def test_weighted_draws_follow_the_weights() -> None:
    draws = take(TrainingSampler(len(WEIGHTS), seed=5, weights=WEIGHTS), 20_000)
    counts = np.bincount(draws, minlength=len(WEIGHTS))
    assert counts[WEIGHTS == 0].sum() == 0
    drawn = WEIGHTS > 0
    expected = WEIGHTS[drawn] / WEIGHTS.sum() * len(draws)
    chi_square = ((counts[drawn] - expected) ** 2 / expected).sum()
    assert chi_square < 18.47  # the 0.999 quantile of chi-square with 4 degrees of freedom
    # independent draws, not a permutation: an epoch repeats indices
    assert len(set(draws[: len(WEIGHTS)])) < len(WEIGHTS)
    # the same sharding as without weights: the ranks interleave to one process's stream
    ranks = [
        take(TrainingSampler(len(WEIGHTS), seed=5, rank=r, world_size=2, weights=WEIGHTS), 50)
        for r in range(2)
    ]
    assert [i for pair in zip(*ranks, strict=True) for i in pair] == draws[:100]


@pytest.mark.parametrize("start", [0, 3, 7, 20])
def test_weighted_sampler_resumes_the_same_stream(start: int) -> None:
    full = take(TrainingSampler(7, seed=2, rank=1, world_size=2, weights=WEIGHTS), 40)
    resumed = TrainingSampler(7, seed=2, rank=1, world_size=2, start=start, weights=WEIGHTS)
    assert take(resumed, 40 - start) == full[start:]
    assert full != take(TrainingSampler(7, seed=3, rank=1, world_size=2, weights=WEIGHTS), 40)


def test_weights_are_checked() -> None:
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        TrainingSampler(3, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"finite and >= 0.*index 1: -1"):
        TrainingSampler(3, weights=[1.0, -1.0, 2.0])
    with pytest.raises(ValueError, match="all 0"):
        TrainingSampler(3, weights=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="shuffle"):
        TrainingSampler(3, shuffle=False, weights=[1.0, 1.0, 1.0])


class WeightingMapper:
    """`random_mapper` whose `prepare_dataset` weights image i by `weights[i]` and records
    what it was given."""

    def __init__(self, weights: np.ndarray | None) -> None:
        self.weights = weights
        self.prepared: list[tuple[list[int], str]] = []

    def prepare_dataset(self, dataset: list[dict[str, Any]], source: str) -> np.ndarray | None:
        self.prepared.append(([r["image_id"] for r in dataset], source))
        return self.weights

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        return random_mapper(record)


def test_train_loader_draws_images_by_the_mappers_weights() -> None:
    dataset = make_dataset(8)
    dataset[7]["annotations"] = []  # filtered out before the mapper sees the dataset
    mapper = WeightingMapper(WEIGHTS)
    loader = build_train_loader(dataset, mapper, 2, 0, 4, False, source="the data")
    assert mapper.prepared == [(list(range(7)), "the data")]
    ids = [s["image_id"] for b in take(loader, 200) for s in b]
    assert ids == take(TrainingSampler(7, seed=4, weights=WEIGHTS), 400)
    assert Counter(ids).keys() == {1, 2, 3, 4, 6}
    # None: the usual permutations, as a mapper without prepare_dataset
    plain = build_train_loader(make_dataset(7), WeightingMapper(None), 2, 0, 4, False)
    assert signature(take(plain, 5)) == signature(
        take(build_train_loader(make_dataset(7), random_mapper, 2, 0, 4, False), 5)
    )


def test_all_zero_weights_name_the_data() -> None:
    with pytest.raises(
        DatasetError,
        match=r"DATASETS.TRAIN \['mine'\]: the sampling weights of WeightingMapper"
        r"\.prepare_dataset are 0 for all 7 images",
    ):
        build_train_loader(
            make_dataset(7), WeightingMapper(np.zeros(7)), 2, 0, 0, source="DATASETS.TRAIN ['mine']"
        )
    with pytest.raises(ValueError, match=r"have shape \(3,\), not \(7,\)"):
        build_train_loader(make_dataset(7), WeightingMapper(np.ones(3)), 2, 0, 0)


def test_weighted_loader_raises_when_every_drawable_image_is_skipped() -> None:
    """Images of weight 0 are never drawn, so 'every image skipped' counts the others."""

    class Skipping(WeightingMapper):
        def __call__(self, record: dict[str, Any]) -> None:
            return None

    loader = build_train_loader(make_dataset(7), Skipping(WEIGHTS), 2, 0, 0, False)
    with pytest.raises(DatasetError, match="all 5 images were skipped"):
        take(loader, 1)


@pytest.mark.parametrize("stop", [2, 5])
def test_weighted_loader_resumes_exactly(stop: int) -> None:
    def build() -> Any:
        return build_train_loader(make_dataset(7), WeightingMapper(WEIGHTS), 3, 0, 1, True)

    full = signature(take(build(), 10))
    first = build()
    iterator = iter(first)
    assert signature([next(iterator) for _ in range(stop)]) == full[:stop]
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    assert signature(take(resumed, 10 - stop)) == full[stop:]


class StepMapper:
    """A `ConditionsSteps` mapper: each step is "a" or "b" with probability 1/2; image ids
    divisible by `skip_every` are skipped. The sample records its condition."""

    def __init__(self, skip_every: int = 0) -> None:
        self.skip_every = skip_every

    def step_condition(self, rng: np.random.Generator) -> str:
        return "a" if rng.random() < 0.5 else "b"

    def map_conditioned(self, record: dict[str, Any], condition: str) -> dict[str, Any] | None:
        if self.skip_every and record["image_id"] % self.skip_every == 0:
            return None
        return {**random_mapper(record), "condition": condition}

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("a conditioned mapper is called through map_conditioned")


def conditions(batches: list[list[dict[str, Any]]]) -> list[str]:
    """The one condition of each batch."""
    kinds = [{s["condition"] for s in batch} for batch in batches]
    assert all(len(k) == 1 for k in kinds), kinds
    return [k.pop() for k in kinds]


def test_step_conditions_depend_on_seed_and_step_only() -> None:
    dataset = make_dataset(12)
    single = take(build_train_loader(dataset, StepMapper(), 4, 0, 3, False), 40)
    kinds = conditions(single)
    # drawn per step from TrainingSampler.step_key: an independent reference
    sampler = TrainingSampler(12, seed=3)
    expected = [
        StepMapper().step_condition(np.random.default_rng(sampler.step_key(s))) for s in range(40)
    ]
    assert kinds == expected
    assert 10 < kinds.count("a") < 30
    assert kinds != conditions(take(build_train_loader(dataset, StepMapper(), 4, 0, 4, False), 40))
    # workers, ranks: the same samples and the same condition per step
    assert signature(take(build_train_loader(dataset, StepMapper(), 4, 2, 3, False), 6)) == (
        signature(single[:6])
    )
    for rank in range(2):
        loader = build_train_loader(dataset, StepMapper(), 4, 0, 3, False, rank=rank, world_size=2)
        assert conditions(take(loader, 40)) == kinds


@pytest.mark.parametrize("stop", [1, 4, 7])
def test_conditioned_batches_stay_pure_with_skips_and_resume_exactly(stop: int) -> None:
    # every third image skipped: batches borrow samples of later steps of their condition
    def build() -> Any:
        return build_train_loader(make_dataset(13), StepMapper(skip_every=3), 3, 0, 5, True)

    full = take(build(), 12)
    conditions(full)
    first = build()
    iterator = iter(first)
    assert signature([next(iterator) for _ in range(stop)]) == signature(full[:stop])
    state = first.state_dict()
    resumed = build()
    resumed.load_state_dict(state)
    rest = take(resumed, 12 - stop)
    assert signature(rest) == signature(full[stop:])
    assert conditions(rest) == conditions(full[stop:])
