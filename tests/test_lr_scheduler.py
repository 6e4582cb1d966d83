"""detframe.engine.lr_scheduler: warmup + multi-step / cosine multipliers and LRMultiplier.

The expected multipliers are computed by hand from the documented formulas (module docstring
of detframe/engine/lr_scheduler.py): iteration t of a MAX_ITER run uses m(t / MAX_ITER);
linear warmup from WARMUP_FACTOR x m(0) to the schedule's value at WARMUP_ITERS; GAMMA^k after
the k-th step; the cosine falls from 1 to BASE_LR_END / BASE_LR.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fvcore.common.param_scheduler import LinearParamScheduler
from omegaconf import DictConfig
from torch import nn

import detframe.engine  # noqa: F401  (declares the SOLVER keys)
from detframe.config import ConfigError
from detframe.engine.lr_scheduler import (
    LRMultiplier,
    build_lr_schedule,
    build_lr_scheduler,
    warmup,
)
from detframe.engine.setup import load_config

LOGGER = "detframe.engine.lr_scheduler"


def config(tmp_path: Path, **solver: object) -> DictConfig:
    path = tmp_path / "config.yaml"
    path.write_text("SOLVER: {BASE_LR: 0.1}\n")
    return load_config(path, [f"SOLVER.{k}={v}" for k, v in solver.items()])


def multipliers(cfg: DictConfig, iterations: list[int]) -> list[float]:
    schedule = build_lr_schedule(cfg)
    max_iter = cfg.SOLVER.MAX_ITER
    return [schedule(t / max_iter) for t in iterations]


@pytest.fixture
def propagating() -> Iterator[None]:
    """caplog sees detframe's records even if a setup_logging() elsewhere stopped them."""
    logger = logging.getLogger("detframe")
    old = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = old


# --- warmup() on its own ------------------------------------------------------------------


def test_warmup_of_a_schedule_not_starting_at_one() -> None:
    # m(p) = 2 - p: warmup starts at 0.1 x m(0) = 0.2 and ramps to m(0.25) = 1.75.
    schedule = LinearParamScheduler(2.0, 1.0)
    linear = warmup(schedule, 0.1, 0.25, "linear")
    assert [linear(p) for p in (0.0, 0.125, 0.2, 0.25, 0.5, 1.0)] == pytest.approx(
        [0.2, 0.2 + 1.55 * 0.5, 0.2 + 1.55 * 0.8, 1.75, 1.5, 1.0]
    )
    constant = warmup(schedule, 0.1, 0.25, "constant")
    assert [constant(p) for p in (0.0, 0.125, 0.24, 0.25, 0.5)] == pytest.approx(
        [0.2, 0.2, 0.2, 1.75, 1.5]
    )
    assert warmup(schedule, 0.1, 0.0) is schedule


# --- WarmupMultiStepLR -------------------------------------------------------------------

MULTISTEP = {
    "MAX_ITER": 100,
    "STEPS": "[30,70]",
    "GAMMA": 0.2,
    "WARMUP_ITERS": 10,
    "WARMUP_FACTOR": 0.01,
}


def test_multistep_with_linear_warmup(tmp_path: Path) -> None:
    cfg = config(tmp_path, **MULTISTEP, WARMUP_METHOD="linear")
    # Warmup: 0.01 + (1 - 0.01) * t / 10 for t < 10.
    expected = {
        0: 0.01,
        1: 0.01 + 0.99 * 0.1,  # 0.109
        5: 0.01 + 0.99 * 0.5,  # 0.505
        9: 0.01 + 0.99 * 0.9,  # 0.901
        10: 1.0,
        11: 1.0,
        29: 1.0,
        30: 0.2,
        31: 0.2,
        69: 0.2,
        70: 0.04,
        99: 0.04,
        100: 0.04,
    }
    got = multipliers(cfg, list(expected))
    assert got == pytest.approx(list(expected.values()), rel=1e-9, abs=1e-12)


def test_multistep_with_constant_warmup(tmp_path: Path) -> None:
    cfg = config(tmp_path, **MULTISTEP, WARMUP_METHOD="constant")
    expected = {0: 0.01, 1: 0.01, 5: 0.01, 9: 0.01, 10: 1.0, 29: 1.0, 30: 0.2, 70: 0.04, 99: 0.04}
    assert multipliers(cfg, list(expected)) == pytest.approx(list(expected.values()))


def test_multistep_without_warmup(tmp_path: Path) -> None:
    cfg = config(tmp_path, **{**MULTISTEP, "WARMUP_ITERS": 0})
    expected = {0: 1.0, 1: 1.0, 9: 1.0, 29: 1.0, 30: 0.2, 69: 0.2, 70: 0.04, 99: 0.04}
    assert multipliers(cfg, list(expected)) == pytest.approx(list(expected.values()))


def test_linear_warmup_ends_at_the_value_after_a_step_inside_it(tmp_path: Path) -> None:
    # A step at 5 falls inside a 10-iteration warmup: the ramp goes from 0.01 x m(0) = 0.01 to
    # the schedule's value at 10, i.e. 0.2.
    cfg = config(tmp_path, **{**MULTISTEP, "STEPS": "[5,70]"})
    expected = {0: 0.01, 5: 0.01 + 0.19 * 0.5, 9: 0.01 + 0.19 * 0.9, 10: 0.2, 69: 0.2, 70: 0.04}
    assert multipliers(cfg, list(expected)) == pytest.approx(list(expected.values()))


def test_every_iteration_of_a_short_multistep_run(tmp_path: Path) -> None:
    cfg = config(
        tmp_path, MAX_ITER=12, STEPS="[6,9]", GAMMA=0.5, WARMUP_ITERS=4, WARMUP_FACTOR=0.25
    )
    expected = [0.25, 0.4375, 0.625, 0.8125, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert multipliers(cfg, list(range(12))) == pytest.approx(expected)


# --- WarmupCosineLR ----------------------------------------------------------------------


def cosine(t: int, max_iter: int, end: float) -> float:
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t / max_iter))


def test_cosine_after_linear_warmup(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        LR_SCHEDULER="WarmupCosineLR",
        MAX_ITER=100,
        WARMUP_ITERS=10,
        WARMUP_FACTOR=0.01,
        BASE_LR_END=0.005,  # end ratio 0.005 / 0.1 = 0.05
    )
    end = 0.05
    c10 = cosine(10, 100, end)  # 0.05 + 0.95 * 0.5 * (1 + cos(0.1 pi))
    assert c10 == pytest.approx(0.05 + 0.95 * 0.5 * (1 + 0.9510565162951535))
    expected = {
        0: 0.01,
        5: 0.01 + (c10 - 0.01) * 0.5,
        9: 0.01 + (c10 - 0.01) * 0.9,
        10: c10,
        25: cosine(25, 100, end),
        50: 0.05 + 0.95 * 0.5,
        75: cosine(75, 100, end),
        99: cosine(99, 100, end),
        100: 0.05,
    }
    assert multipliers(cfg, list(expected)) == pytest.approx(list(expected.values()))


def test_cosine_without_warmup_to_zero(tmp_path: Path) -> None:
    cfg = config(tmp_path, LR_SCHEDULER="WarmupCosineLR", MAX_ITER=40, WARMUP_ITERS=0)
    ts = [0, 1, 10, 20, 30, 39, 40]
    expected = [0.5 * (1 + math.cos(math.pi * t / 40)) for t in ts]
    assert expected[:4] == pytest.approx([1.0, expected[1], 0.5 * (1 + math.sqrt(0.5)), 0.5])
    assert multipliers(cfg, ts) == pytest.approx(expected, abs=1e-12)


# --- warnings and errors -----------------------------------------------------------------


def test_steps_at_or_after_max_iter_are_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, propagating: None
) -> None:
    cfg = config(tmp_path, MAX_ITER=50, STEPS="[30,50,80]", GAMMA=0.1, WARMUP_ITERS=0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = multipliers(cfg, [0, 29, 30, 49, 50])
    assert got == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.1])
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "SOLVER.STEPS" in message
    assert "[50, 80]" in message
    assert "50" in message


def test_all_steps_beyond_max_iter_keep_the_schedule_at_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, propagating: None
) -> None:
    cfg = config(tmp_path, MAX_ITER=20, STEPS="[20,60000]", WARMUP_ITERS=0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = multipliers(cfg, list(range(21)))
    assert got == [1.0] * 21
    assert any("SOLVER.STEPS" in r.getMessage() for r in caplog.records if r.name == LOGGER)


def test_no_warning_when_every_step_is_reached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, propagating: None
) -> None:
    cfg = config(tmp_path, **MULTISTEP)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        build_lr_schedule(cfg)
    assert [r for r in caplog.records if r.name == LOGGER] == []


def test_warmup_longer_than_max_iter_is_cut_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, propagating: None
) -> None:
    cfg = config(tmp_path, MAX_ITER=20, STEPS="[]", WARMUP_ITERS=50, WARMUP_FACTOR=0.01)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = multipliers(cfg, [0, 10, 19])
    # The ramp spans the 20 iterations (not 50): 0.01 + 0.99 * t / 20.
    assert got == pytest.approx([0.01, 0.505, 0.01 + 0.99 * 0.95])
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1
    assert "SOLVER.WARMUP_ITERS" in messages[0]
    assert "50" in messages[0]
    assert "20" in messages[0]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"STEPS": "[30,30]"}, "SOLVER.STEPS"),
        ({"STEPS": "[30,20]"}, "SOLVER.STEPS"),
        ({"STEPS": "[0,10]"}, "SOLVER.STEPS"),
        ({"STEPS": "[-5]"}, "SOLVER.STEPS"),
        ({"WARMUP_ITERS": -1}, "SOLVER.WARMUP_ITERS"),
        ({"MAX_ITER": 0}, "SOLVER.MAX_ITER"),
        ({"MAX_ITER": -3}, "SOLVER.MAX_ITER"),
    ],
)
def test_bad_schedule_settings_raise(tmp_path: Path, overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):  # at load or at build
        build_lr_schedule(config(tmp_path, **{**MULTISTEP, **overrides}))


# --- LRMultiplier as the trainer drives it ------------------------------------------------

SHORT = {"MAX_ITER": 12, "STEPS": "[6,9]", "GAMMA": 0.5, "WARMUP_ITERS": 4, "WARMUP_FACTOR": 0.25}
SHORT_M = [0.25, 0.4375, 0.625, 0.8125, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
BASE_LRS = (0.1, 0.02)


def two_group_optimizer() -> torch.optim.Optimizer:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    return torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": BASE_LRS[0]},
            {"params": model[1].parameters(), "lr": BASE_LRS[1]},
        ],
        lr=1.0,
        momentum=0.9,
    )


def run(
    optimizer: torch.optim.Optimizer, scheduler: LRMultiplier, iterations: range
) -> list[list[float]]:
    """Each iteration's group lrs: recorded, optimizer.step(), scheduler.step()."""
    lrs = []
    for _ in iterations:
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()  # before scheduler.step(), as in the trainer (no gradients: a no-op)
        scheduler.step()
    return lrs


def expected_lrs(iterations: range) -> list[list[float]]:
    return [[base * SHORT_M[t] for base in BASE_LRS] for t in iterations]


def test_lr_multiplier_over_a_whole_run_keeps_group_ratios(tmp_path: Path) -> None:
    cfg = config(tmp_path, **SHORT)
    optimizer = two_group_optimizer()
    scheduler = build_lr_scheduler(cfg, optimizer)
    assert isinstance(scheduler, LRMultiplier)
    assert scheduler.base_lrs == pytest.approx(list(BASE_LRS))
    lrs = run(optimizer, scheduler, range(12))
    assert len(lrs) == 12
    for t, (got, want) in enumerate(zip(lrs, expected_lrs(range(12)), strict=True)):
        assert got == pytest.approx(want, rel=1e-12), t
        assert got[0] / got[1] == pytest.approx(5.0), t
    # After the last step the run is over: the final multiplier stays.
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.025, 0.005])


def test_lr_multiplier_directly(tmp_path: Path) -> None:
    cfg = config(tmp_path, **SHORT)
    optimizer = two_group_optimizer()
    scheduler = LRMultiplier(optimizer, build_lr_schedule(cfg), max_iter=12)
    assert run(optimizer, scheduler, range(12)) == [
        pytest.approx(lrs) for lrs in expected_lrs(range(12))
    ]


@pytest.mark.parametrize("stop", [1, 4, 7, 11])
def test_state_dict_resume_continues_the_sequence(tmp_path: Path, stop: int) -> None:
    cfg = config(tmp_path, **SHORT)
    optimizer = two_group_optimizer()
    scheduler = build_lr_scheduler(cfg, optimizer)
    first = run(optimizer, scheduler, range(stop))

    # Through bytes, as a checkpoint would be written (and loaded with weights_only).
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    # The trainer builds a fresh optimizer and scheduler, then loads the checkpoint.
    fresh_optimizer = two_group_optimizer()
    fresh_scheduler = build_lr_scheduler(cfg, fresh_optimizer)
    assert [g["lr"] for g in fresh_optimizer.param_groups] == pytest.approx(
        [b * SHORT_M[0] for b in BASE_LRS]
    )
    fresh_optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    fresh_scheduler.load_state_dict(copy.deepcopy(saved["scheduler"]))
    assert fresh_scheduler.last_epoch == stop
    rest = run(fresh_optimizer, fresh_scheduler, range(stop, 12))

    whole = first + rest
    assert len(whole) == 12
    for t, (got, want) in enumerate(zip(whole, expected_lrs(range(12)), strict=True)):
        assert got == pytest.approx(want, rel=1e-12), t
