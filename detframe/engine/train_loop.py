"""The training loop: a trainer that runs steps, and hooks that act around them.

    trainer.train(start_iter, max_iter)
        hook.before_train()                 for every hook, in order
        for trainer.iter in start_iter .. max_iter - 1:
            hook.before_step()
            trainer.run_step()              metrics = step(iter): one batch, losses, update
            hook.after_step()
        hook.after_train()                  also when a step raised (hooks release files)

Conventions:

- The trainer composes its step: `TrainerBase(step)` runs any `TrainStep`, a callable that
  does one iteration and returns its metrics. `SimpleStep` is the standard one (registered in
  TRAIN_STEP_REGISTRY, chosen by SOLVER.TRAIN_STEP); a custom step (several optimizers, a
  GAN-style alternation, gradient accumulation) is one registered subclass.
- `trainer.iter` is the 0-based iteration being run; after a complete run it is `max_iter`,
  after a failed one it is the iteration that failed, so `after_train` can tell the two apart
  (`trainer.completed`).
- `trainer.metrics` is what the step just measured, a flat {name: float}: for `SimpleStep`
  every loss term, "total_loss" and "data_time", averaged over all ranks, and, when the data
  loader counts skipped samples (`num_skipped`, DATALOADER.ON_BAD_DATA=skip), "data_skipped",
  the total so far over all ranks; hooks add theirs
  ("time", "lr", "max_memory_mb") and the writer hook logs them. Nothing else is shared: no
  global storage.
- A loss that is NaN or infinite stops training before the weights are touched, with a
  `FloatingPointError` naming the iteration and the loss terms; checkpoints written before it
  are left as they were.
- Mixed precision: with `amp=True` the forward runs under `torch.autocast` in bfloat16 on the
  CPU and float16 on CUDA, where a `torch.amp.GradScaler` scales the loss; gradients are
  unscaled before clipping.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from detframe.registry import TRAIN_STEP_REGISTRY
from detframe.utils.comm import get_world_size, mean_over_ranks

from .optimizer import GradientClipper, build_grad_clipper

__all__ = ["HookBase", "SimpleStep", "TrainStep", "TrainerBase"]

logger = logging.getLogger(__name__)


class HookBase:
    """Code run around the steps of a trainer; override any of the four methods.

    A hook reaches the trainer as `self.trainer` (set by `TrainerBase.register_hooks`).
    """

    trainer: TrainerBase

    def before_train(self) -> None:
        """Called once before the first step."""

    def after_train(self) -> None:
        """Called once after the last step, or after a step raised."""

    def before_step(self) -> None:
        """Called before each step."""

    def after_step(self) -> None:
        """Called after each step."""


class TrainStep:
    """One training iteration: `step(iteration)` -> {metric name: float}.

    Subclasses implement `__call__`. A step that holds state worth checkpointing (e.g. a
    gradient scaler) exposes it as attributes the trainer reads.
    """

    def __call__(self, iteration: int) -> dict[str, float]:
        raise NotImplementedError


class TrainerBase:
    """Runs its step from `start_iter` to `max_iter` with hooks around it (module docstring).

    Args:
        step: what one iteration does; None for a subclass that overrides `run_step`.
    """

    def __init__(self, step: TrainStep | None = None) -> None:
        self.step = step
        self.hooks: list[HookBase] = []
        self.iter = 0
        self.start_iter = 0
        self.max_iter = 0
        self.metrics: dict[str, float] = {}

    def register_hooks(self, hooks: Sequence[HookBase | None]) -> None:
        """Appends hooks (None entries are skipped); they run in the order registered."""
        for hook in hooks:
            if hook is not None:
                hook.trainer = self
                self.hooks.append(hook)

    @property
    def completed(self) -> bool:
        """Whether `train` ran every iteration up to `max_iter`."""
        return self.iter >= self.max_iter

    def train(self, start_iter: int, max_iter: int) -> None:
        """Runs iterations start_iter .. max_iter - 1.

        Raises:
            ValueError: start_iter > max_iter.
            FloatingPointError: a non-finite loss (see the module docstring).
        """
        if start_iter > max_iter:
            raise ValueError(f"start_iter {start_iter} is beyond max_iter {max_iter}")
        logger.info("Starting training from iteration %d to %d", start_iter, max_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        try:
            for hook in self.hooks:
                hook.before_train()
            for self.iter in range(start_iter, max_iter):
                for hook in self.hooks:
                    hook.before_step()
                self.run_step()
                for hook in self.hooks:
                    hook.after_step()
            self.iter = max_iter
        finally:
            for hook in self.hooks:
                hook.after_train()

    def run_step(self) -> None:
        """Runs the step of the current iteration and keeps its metrics."""
        if self.step is None:
            raise NotImplementedError("TrainerBase needs a step (or a run_step override)")
        self.metrics = self.step(self.iter)


@TRAIN_STEP_REGISTRY.register()
class SimpleStep(TrainStep):
    """One batch from `data_loader` through `model`, then an optimizer update.

    Args:
        model: in training mode, `model(batch)` returns {loss name: scalar Tensor}; may be
            wrapped in DistributedDataParallel.
        data_loader: an iterable of batches (lists of model inputs); iterated once, lazily.
        optimizer: updates the model's parameters.
        grad_clipper: called with the parameters after backward (and unscaling), e.g.
            `functools.partial(torch.nn.utils.clip_grad_norm_, max_norm=1.0)`; None to skip.
        amp: mixed precision (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable[Any],
        optimizer: torch.optim.Optimizer,
        *,
        grad_clipper: GradientClipper | None = None,
        amp: bool = False,
    ) -> None:
        self.model = model
        self.data_loader = data_loader
        self.optimizer = optimizer
        self.grad_clipper = grad_clipper
        self.amp = amp
        self.device_type = next(model.parameters()).device.type
        self.grad_scaler = (
            torch.amp.GradScaler("cuda") if amp and self.device_type == "cuda" else None
        )
        self._data_iter: Iterator[Any] | None = None

    @classmethod
    def from_config(
        cls,
        cfg: DictConfig,
        model: nn.Module,
        data_loader: Iterable[Any],
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, Any]:
        """The given parts, SOLVER.CLIP_GRADIENTS.* and SOLVER.AMP.ENABLED."""
        return {
            "model": model,
            "data_loader": data_loader,
            "optimizer": optimizer,
            "grad_clipper": build_grad_clipper(cfg),
            "amp": cfg.SOLVER.AMP.ENABLED,
        }

    def __call__(self, iteration: int) -> dict[str, float]:
        """Fetches a batch, computes the losses, checks them, and updates the weights."""
        start = time.perf_counter()
        if self._data_iter is None:
            self._data_iter = iter(self.data_loader)
        batch = next(self._data_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(self.device_type, dtype=self._amp_dtype(), enabled=self.amp):
            loss_dict = self.model(batch)
        total = sum(loss_dict.values())
        metrics = self._reduce_metrics(loss_dict, data_time, iteration)

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is None:
            total.backward()
            self._clip_gradients()
            self.optimizer.step()
        else:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.unscale_(self.optimizer)
            self._clip_gradients()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        return metrics

    def _amp_dtype(self) -> torch.dtype:
        return torch.float16 if self.device_type == "cuda" else torch.bfloat16

    def _reduce_metrics(
        self, loss_dict: dict[str, Tensor], data_time: float, iteration: int
    ) -> dict[str, float]:
        """The losses and data time averaged over ranks; raises on a non-finite loss.

        Every rank sees the same averaged values, so all of them stop together.
        """
        detached = torch.stack([loss.detach().float() for loss in loss_dict.values()])
        values = dict(zip(loss_dict, detached.tolist(), strict=True))  # one device sync
        values["data_time"] = data_time
        skipped = getattr(self.data_loader, "num_skipped", None)
        if skipped is not None:
            values["data_skipped"] = float(skipped)
        metrics = mean_over_ranks(values)
        if skipped is not None:
            metrics["data_skipped"] *= get_world_size()
        losses = {name: metrics[name] for name in loss_dict}
        metrics["total_loss"] = sum(losses.values())
        bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
        if bad:
            terms = ", ".join(f"{name} = {value}" for name, value in sorted(bad.items()))
            raise FloatingPointError(
                f"Loss became non-finite at iteration {iteration}: {terms} (all losses: "
                f"{losses}). Training stopped before updating the weights; the last checkpoint "
                "written is intact. Lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS or "
                "enable SOLVER.CLIP_GRADIENTS."
            )
        return metrics

    def _clip_gradients(self) -> None:
        if self.grad_clipper is not None:
            self.grad_clipper(p for p in self.model.parameters() if p.grad is not None)
