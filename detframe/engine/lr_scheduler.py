"""The learning-rate schedule: a warmup, then multi-step decay or a cosine, from fvcore.

The schedule is a multiplier m(t) of iteration t, built from fvcore's parameter schedulers
over the progress t / MAX_ITER; every parameter group's lr is its own base lr x m(t), so
per-module multipliers (optimizer.py) keep their ratios.

- "WarmupMultiStepLR": m = GAMMA^k after the k-th of SOLVER.STEPS;
- "WarmupCosineLR": m falls from 1 to BASE_LR_END / BASE_LR along half a cosine;
- warmup: over the first WARMUP_ITERS iterations m rises linearly from WARMUP_FACTOR x m(0)
  to the schedule's value at WARMUP_ITERS ("linear"), or stays at WARMUP_FACTOR x m(0)
  ("constant").

`LRMultiplier` is a torch LR scheduler: the trainer calls `step()` after every iteration, so
iteration t runs with m(t).
"""

from __future__ import annotations

import itertools
import logging

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)
from omegaconf import DictConfig

from detframe.config import ConfigError, declare

__all__ = ["LRMultiplier", "build_lr_schedule", "build_lr_scheduler", "warmup"]

logger = logging.getLogger(__name__)

declare(
    "SOLVER.LR_SCHEDULER",
    str,
    "WarmupMultiStepLR",
    "learning-rate schedule after the warmup",
    choices=("WarmupMultiStepLR", "WarmupCosineLR"),
)
declare(
    "SOLVER.STEPS", list[int], [60000, 80000], "iterations at which the learning rate drops", min=1
)
declare("SOLVER.GAMMA", float, 0.1, "factor the learning rate is multiplied by at each step", min=0)
declare("SOLVER.BASE_LR_END", float, 0.0, "learning rate at the end of WarmupCosineLR", min=0)
declare("SOLVER.WARMUP_ITERS", int, 1000, "iterations of learning-rate warmup", min=0)
declare(
    "SOLVER.WARMUP_FACTOR",
    float,
    0.001,
    "learning-rate factor at the start of the warmup",
    min=0,
    max=1,
)
declare(
    "SOLVER.WARMUP_METHOD",
    str,
    "linear",
    "how the warmup factor rises",
    choices=("linear", "constant"),
)


def warmup(
    schedule: ParamScheduler, factor: float, fraction: float, method: str = "linear"
) -> ParamScheduler:
    """`schedule` with a warmup over the first `fraction` of training (module docstring)."""
    if fraction <= 0:
        return schedule
    start = factor * schedule(0.0)
    if method == "linear":
        ramp: ParamScheduler = LinearParamScheduler(start, schedule(fraction))
    else:
        ramp = ConstantParamScheduler(start)
    return CompositeParamScheduler(
        [ramp, schedule],
        lengths=[fraction, 1.0 - fraction],
        interval_scaling=["rescaled", "fixed"],
    )


def build_lr_schedule(cfg: DictConfig) -> ParamScheduler:
    """The multiplier m as a function of progress in [0, 1] (see the module docstring).

    Steps at or after MAX_ITER are never reached: they are dropped with a warning. A warmup
    longer than MAX_ITER is cut to MAX_ITER, with a warning.

    Raises:
        ConfigError: MAX_ITER < 1, WARMUP_ITERS < 0, STEPS not positive and increasing, or
            a cosine schedule with BASE_LR <= 0.
    """
    solver = cfg.SOLVER
    max_iter = solver.MAX_ITER
    if max_iter < 1:
        raise ConfigError(f"SOLVER.MAX_ITER must be >= 1, got {max_iter}")
    if solver.WARMUP_ITERS < 0:
        raise ConfigError(f"SOLVER.WARMUP_ITERS must be >= 0, got {solver.WARMUP_ITERS}")
    warmup_iters = min(solver.WARMUP_ITERS, max_iter)
    if warmup_iters < solver.WARMUP_ITERS:
        logger.warning(
            "SOLVER.WARMUP_ITERS=%d is longer than SOLVER.MAX_ITER=%d: the whole run warms up",
            solver.WARMUP_ITERS,
            max_iter,
        )
    if solver.LR_SCHEDULER == "WarmupMultiStepLR":
        steps = list(solver.STEPS)
        if any(b <= a for a, b in itertools.pairwise(steps)) or any(s <= 0 for s in steps):
            raise ConfigError(f"SOLVER.STEPS must be positive and increasing, got {steps}")
        reached = [s for s in steps if s < max_iter]
        if len(reached) < len(steps):
            logger.warning(
                "SOLVER.STEPS %s at or after SOLVER.MAX_ITER=%d are never reached",
                steps[len(reached) :],
                max_iter,
            )
        schedule: ParamScheduler = MultiStepParamScheduler(
            values=[solver.GAMMA**k for k in range(len(reached) + 1)],
            milestones=reached,
            num_updates=max_iter,
        )
    else:
        if solver.BASE_LR <= 0:
            raise ConfigError(f"WarmupCosineLR needs SOLVER.BASE_LR > 0, got {solver.BASE_LR}")
        schedule = CosineParamScheduler(1.0, solver.BASE_LR_END / solver.BASE_LR)
    return warmup(schedule, solver.WARMUP_FACTOR, warmup_iters / max_iter, solver.WARMUP_METHOD)


class LRMultiplier(torch.optim.lr_scheduler.LRScheduler):
    """Sets each parameter group's lr to its base lr x `multiplier(iteration / max_iter)`.

    Args:
        optimizer: its groups' current lrs are the base lrs.
        multiplier: an fvcore ParamScheduler over progress in [0, 1].
        max_iter: the number of iterations of the run.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, multiplier: ParamScheduler, max_iter: int
    ) -> None:
        self._multiplier = multiplier
        self._max_iter = max_iter
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        factor = self._multiplier(min(self.last_epoch / self._max_iter, 1.0))
        return [base_lr * factor for base_lr in self.base_lrs]

    def state_dict(self) -> dict[str, object]:
        """Base lrs, iteration and last lrs: the multiplier is rebuilt from the config."""
        return {
            "base_lrs": self.base_lrs,
            "last_epoch": self.last_epoch,
            "_last_lr": self.get_last_lr(),
        }


def build_lr_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """`LRMultiplier` over `build_lr_schedule(cfg)` for SOLVER.MAX_ITER iterations."""
    return LRMultiplier(optimizer, build_lr_schedule(cfg), cfg.SOLVER.MAX_ITER)
