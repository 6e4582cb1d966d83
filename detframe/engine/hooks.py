"""The trainer's standard hooks: timing, learning-rate schedule, checkpoints, evaluation.

The metrics writer hook (`PeriodicWriter`) is in writers.py. `Trainer.build_hooks` registers
them in this order: StepMonitor, LRScheduler, EvalHook, PeriodicCheckpointer,
PeriodicWriter, so the writer sees every metric of the step.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from detframe.utils.comm import all_gather, is_main_process, synchronize
from detframe.utils.profiling import peak_memory_mb

from .checkpoint import Checkpointer, capture_rng_state, prune_checkpoints, restore_rng_state
from .train_loop import HookBase

__all__ = ["EvalHook", "LRScheduler", "PeriodicCheckpointer", "StepMonitor"]

logger = logging.getLogger(__name__)


class StepMonitor(HookBase):
    """Adds "time" (seconds of the step, data loading included) and "max_memory_mb" (peak
    memory of `device` so far: allocated CUDA memory, or the process's peak RSS on the CPU)
    to the step's metrics, and logs the total training time at the end.

    Register it first, so that "time" covers the step and nothing else.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._step_start = 0.0
        self._train_start = 0.0

    def before_train(self) -> None:
        self._train_start = time.perf_counter()

    def before_step(self) -> None:
        self._step_start = time.perf_counter()

    def after_step(self) -> None:
        self.trainer.metrics["time"] = time.perf_counter() - self._step_start
        self.trainer.metrics["max_memory_mb"] = peak_memory_mb(self.device)

    def after_train(self) -> None:
        done = self.trainer.iter - self.trainer.start_iter
        seconds = time.perf_counter() - self._train_start
        logger.info(
            "Ran %d iterations in %s (%.3f s per iteration)",
            done,
            datetime.timedelta(seconds=round(seconds)),
            seconds / max(done, 1),
        )


class LRScheduler(HookBase):
    """Records the step's "lr" (of the largest parameter group) and steps the scheduler."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
    ) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler
        self._group = max(
            range(len(optimizer.param_groups)),
            key=lambda i: sum(p.numel() for p in optimizer.param_groups[i]["params"]),
        )

    def after_step(self) -> None:
        self.trainer.metrics["lr"] = self.optimizer.param_groups[self._group]["lr"]
        self.scheduler.step()


class PeriodicCheckpointer(HookBase):
    """Saves a checkpoint after every `period` iterations and after the last one.

    Iteration i (0-based) is saved as model_{i:07d}.pth when (i + 1) % period == 0, the last
    iteration as model_final.pth. Each rank's `rank_state()` (random states, data position)
    is gathered into the checkpoint (see checkpoint.py); rank 0 writes it and then deletes all
    but the `keep` newest periodic checkpoints.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        period: int,
        rank_state: Callable[[], dict[str, Any]],
        keep: int = 3,
    ) -> None:
        if period < 1 or keep < 1:
            raise ValueError(f"period and keep must be >= 1, got {period} and {keep}")
        self.checkpointer = checkpointer
        self.period = period
        self.rank_state = rank_state
        self.keep = keep

    def after_step(self) -> None:
        iteration = self.trainer.iter
        last = iteration == self.trainer.max_iter - 1
        if not last and (iteration + 1) % self.period != 0:
            return
        states = all_gather(self.rank_state())
        name = "model_final" if last else f"model_{iteration:07d}"
        self.checkpointer.save(name, iteration=iteration, world_size=len(states), ranks=states)
        if is_main_process():
            for path in prune_checkpoints(self.checkpointer.save_dir, self.keep):
                logger.info("Deleted old checkpoint %s", path)
        synchronize()


class EvalHook(HookBase):
    """Evaluates after every `period` iterations (0: never during training) and at the end of
    a complete run; passes the results to `on_results(iteration, results)`.

    Evaluation does not change the random states of training (they are saved and restored
    around it), so evaluating more or less often leaves the training run as it is.

    Args:
        period: iterations between evaluations; 0 evaluates only at the end.
        eval_function: runs the evaluation; returns {metric or task: value or {...}} on rank
            0 (what `inference_on_dataset` returns).
        on_results: called on every rank with the 0-based iteration and the results.
    """

    def __init__(
        self,
        period: int,
        eval_function: Callable[[], Mapping[str, Any]],
        on_results: Callable[[int, Mapping[str, Any]], None] | None = None,
    ) -> None:
        if period < 0:
            raise ValueError(f"evaluation period must be >= 0, got {period}")
        self.period = period
        self.eval_function = eval_function
        self.on_results = on_results
        self.latest: Mapping[str, Any] = {}

    def _evaluate(self, iteration: int) -> None:
        rng = capture_rng_state()
        try:
            self.latest = self.eval_function()
        finally:
            restore_rng_state(rng)
        if self.on_results is not None:
            self.on_results(iteration, self.latest)
        synchronize()

    def after_step(self) -> None:
        iteration = self.trainer.iter
        if (
            self.period
            and (iteration + 1) % self.period == 0
            and iteration < self.trainer.max_iter - 1
        ):
            self._evaluate(iteration)

    def after_train(self) -> None:
        if self.trainer.completed and self.trainer.max_iter > self.trainer.start_iter:
            self._evaluate(self.trainer.max_iter - 1)
