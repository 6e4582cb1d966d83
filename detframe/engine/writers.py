"""Metrics writers: console lines, a JSON-lines file and TensorBoard events, and the hook that
feeds them from the trainer.

Conventions:

- A write is `writer.write(iteration, metrics)`: `iteration` is the trainer's 0-based
  iteration (the step just finished), `metrics` a flat {name: float}. Training metrics are the
  trainer's `metrics` ("total_loss", every loss term, "lr", "time", "data_time",
  "max_memory_mb"); evaluation results are flattened to "task/metric" names ("bbox/AP",
  "segm/AP50", "validation_loss/loss_cls", "time_per_image") by `flatten_results` and written
  at the iteration they were computed (`PeriodicWriter.write_results`).
- The console shows the number of finished iterations (iteration + 1) out of `max_iter`; the
  JSON file and TensorBoard use the 0-based iteration.
- `OUTPUT_DIR/metrics.jsonl` holds one JSON object per write, {"iteration": i, **metrics};
  a NaN or infinite value (e.g. a COCO metric that is undefined) is written as null, so the
  file is strict JSON. Training and evaluation results at the same iteration are separate
  lines.
- Resuming at `start_iter` (the first iteration the resumed run will execute) drops what the
  interrupted run wrote past its last checkpoint: `JSONWriter` removes the lines with
  "iteration" >= start_iter when it opens the file (so start_iter=0, a fresh run, starts an
  empty file), and `TensorboardWriter` purges events from step start_iter on (SummaryWriter's
  `purge_step`).
- Only the main process writes: `default_writers` returns no writers on the other ranks and
  `PeriodicWriter` writes nothing there.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import statistics
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from detframe.engine.train_loop import HookBase
from detframe.utils.comm import is_main_process

__all__ = [
    "METRICS_FILE_NAME",
    "ConsoleWriter",
    "JSONWriter",
    "MetricsWriter",
    "PeriodicWriter",
    "TensorboardWriter",
    "default_writers",
    "flatten_results",
]

logger = logging.getLogger(__name__)

METRICS_FILE_NAME = "metrics.jsonl"
# Metrics the console line formats in a fixed place and style (after the losses).
_CONSOLE_TAIL = ("lr", "time", "data_time", "max_memory_mb")


class MetricsWriter(ABC):
    """Receives flat metric dicts at given iterations."""

    @abstractmethod
    def write(self, iteration: int, metrics: Mapping[str, float]) -> None:
        """Records `metrics` ({name: value}) at the 0-based `iteration`."""

    def close(self) -> None:  # noqa: B027 (a writer without resources needs no close)
        """Releases files; the writer is not used afterwards."""


def flatten_results(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested evaluation results as one flat dict with "/"-joined names.

    Args:
        results: e.g. {"bbox": {"AP": 81.2, ...}, "validation_loss": {"loss_cls": 0.3},
            "time_per_image": 0.05}; values are numbers or nested mappings.
        prefix: prepended to every name with a "/" (no prefix when empty).

    Returns:
        e.g. {"bbox/AP": 81.2, "validation_loss/loss_cls": 0.3, "time_per_image": 0.05}.

    Raises:
        TypeError: a value that is neither a number nor a mapping (its name is given).
    """
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_results(value, name))
        elif isinstance(value, int | float):
            flat[name] = float(value)
        else:
            raise TypeError(f"result {name!r} is a {type(value).__name__}, not a number")
    return flat


class ConsoleWriter(MetricsWriter):
    """Logs one line per write (logging.INFO on the "detframe.engine.writers" logger):

    `iter 120/1000  eta 0:03:21  total_loss 1.234  loss_cls 0.5  ...  lr 0.02  time 0.412
    data_time 0.010  max_mem 812M`

    Losses ("total_loss" first, then the other names containing "loss", sorted) come first,
    other metrics after them, then lr, time, data_time and max_mem. The ETA is the median of
    the last `window` "time" values it was given times the iterations left; it is left out
    before any "time" was seen.
    """

    def __init__(self, max_iter: int, window: int = 20) -> None:
        """
        Args:
            max_iter: the number of iterations of the run.
            window: how many recent "time" values the ETA's median uses.
        """
        self.max_iter = max_iter
        self._times: deque[float] = deque(maxlen=window)

    def write(self, iteration: int, metrics: Mapping[str, float]) -> None:
        logger.info(self.format_line(iteration, metrics))

    def format_line(self, iteration: int, metrics: Mapping[str, float]) -> str:
        """The console line for `metrics` at the 0-based `iteration` (and updates the ETA)."""
        parts = [f"iter {iteration + 1}/{self.max_iter}"]
        if "time" in metrics:
            self._times.append(float(metrics["time"]))
        if self._times:
            remaining = max(self.max_iter - iteration - 1, 0)
            seconds = round(statistics.median(self._times) * remaining)
            parts.append(f"eta {datetime.timedelta(seconds=seconds)}")
        losses = sorted(k for k in metrics if "loss" in k and k != "total_loss")
        if "total_loss" in metrics:
            losses.insert(0, "total_loss")
        parts += [f"{k} {metrics[k]:.4g}" for k in losses]
        others = sorted(k for k in metrics if k not in losses and k not in _CONSOLE_TAIL)
        parts += [f"{k} {metrics[k]:.4g}" for k in others]
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.4g}")
        for key in ("time", "data_time"):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:.3f}")
        if "max_memory_mb" in metrics:
            parts.append(f"max_mem {metrics['max_memory_mb']:.0f}M")
        return "  ".join(parts)


class JSONWriter(MetricsWriter):
    """Appends {"iteration": i, **metrics} lines to `output_dir/metrics.jsonl`, flushed each
    write. Opening it with `start_iter` keeps only the lines with iteration < start_iter (see
    the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike, start_iter: int = 0) -> None:
        """
        Args:
            output_dir: the run's directory (created if missing).
            start_iter: the first iteration this run executes; 0 for a fresh run.
        """
        self.path = Path(output_dir) / METRICS_FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keep_before(start_iter)
        self._file = self.path.open("a")

    def _keep_before(self, start_iter: int) -> None:
        """Rewrites the file (via a temporary file and a rename) without the lines of
        iterations >= start_iter and without unreadable lines (a write cut by a crash)."""
        if not self.path.exists():
            return
        kept = []
        lines = self.path.read_text().splitlines()
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("iteration", math.inf) < start_iter:
                kept.append(line + "\n")
        if len(kept) < len(lines):
            logger.info(
                "%s: dropped %d of %d lines (iterations >= %d, or cut by a crash)",
                self.path,
                len(lines) - len(kept),
                len(lines),
                start_iter,
            )
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(kept))
        os.replace(temporary, self.path)

    def write(self, iteration: int, metrics: Mapping[str, float]) -> None:
        record: dict[str, Any] = {"iteration": int(iteration)}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else None
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorboardWriter(MetricsWriter):
    """Writes every metric as a TensorBoard scalar (tag = metric name, step = iteration) to
    event files in `log_dir`."""

    def __init__(self, log_dir: str | os.PathLike, start_iter: int = 0) -> None:
        """
        Args:
            log_dir: the directory of the event files (created if missing).
            start_iter: the first iteration this run executes; when > 0, events of steps
                >= start_iter left by an interrupted run are purged.
        """
        self._writer = SummaryWriter(
            log_dir=os.fspath(log_dir), purge_step=start_iter if start_iter > 0 else None
        )

    def write(self, iteration: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, float(value), int(iteration))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def default_writers(
    output_dir: str | os.PathLike, max_iter: int, start_iter: int = 0
) -> list[MetricsWriter]:
    """Console, `output_dir/metrics.jsonl` and TensorBoard events in `output_dir` on the main
    process; [] on the other ranks (nothing is created there)."""
    if not is_main_process():
        return []
    return [
        ConsoleWriter(max_iter),
        JSONWriter(output_dir, start_iter=start_iter),
        TensorboardWriter(output_dir, start_iter=start_iter),
    ]


class PeriodicWriter(HookBase):
    """Writes `trainer.metrics` to every writer after every `period`-th iteration (iterations
    period - 1, 2 * period - 1, ... 0-based) and after the last one, on the main process only;
    closes the writers after training."""

    def __init__(self, writers: Sequence[MetricsWriter], period: int = 20) -> None:
        """
        Args:
            writers: e.g. `default_writers(output_dir, max_iter, start_iter)`.
            period: iterations between writes (>= 1).

        Raises:
            ValueError: period < 1.
        """
        if period < 1:
            raise ValueError(f"PeriodicWriter period must be >= 1, got {period}")
        self.writers = list(writers)
        self.period = period

    def after_step(self) -> None:
        iteration = self.trainer.iter
        if (iteration + 1) % self.period == 0 or iteration == self.trainer.max_iter - 1:
            self.write(iteration, self.trainer.metrics)

    def write(self, iteration: int, metrics: Mapping[str, float]) -> None:
        """Writes flat `metrics` at `iteration` to every writer (main process only)."""
        if not is_main_process():
            return
        for writer in self.writers:
            writer.write(iteration, metrics)

    def write_results(self, iteration: int, results: Mapping[str, Any]) -> None:
        """Writes nested evaluation results ({"bbox": {"AP": ...}, ...}, as returned by
        `inference_on_dataset`) at `iteration`, flattened by `flatten_results`."""
        self.write(iteration, flatten_results(results))

    def after_train(self) -> None:
        for writer in self.writers:
            writer.close()
