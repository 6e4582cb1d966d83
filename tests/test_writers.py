"""Metrics writers: console line and ETA, metrics.jsonl (flush, nulls, resume truncation),
TensorBoard events read back with tensorboard's EventAccumulator, and PeriodicWriter's
schedule, rank-0 rule and closing. Expected values are written by hand."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.summary.writer import event_file_writer

from detframe.engine import writers as writers_module
from detframe.engine.writers import (
    ConsoleWriter,
    JSONWriter,
    MetricsWriter,
    PeriodicWriter,
    TensorboardWriter,
    default_writers,
    flatten_results,
)

STEP = {
    "total_loss": 1.234,
    "loss_cls": 0.5,
    "loss_box_reg": 0.734,
    "lr": 0.02,
    "time": 0.412,
    "data_time": 0.01,
    "max_memory_mb": 812.4,
}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_console_line(caplog: pytest.LogCaptureFixture) -> None:
    # ETA: 0.412 s x 880 iterations left = 362.56 s -> 0:06:03.
    with caplog.at_level(logging.INFO, logger="detframe.engine.writers"):
        ConsoleWriter(max_iter=1000).write(119, STEP)
    assert caplog.messages == [
        "iter 120/1000  eta 0:06:03  total_loss 1.234  loss_box_reg 0.734  loss_cls 0.5  "
        "lr 0.02  time 0.412  data_time 0.010  max_mem 812M"
    ]


def test_console_eta_is_the_median_of_recent_times() -> None:
    writer = ConsoleWriter(max_iter=101, window=3)
    for iteration, seconds in enumerate([1.0, 3.0, 2.0]):
        line = writer.format_line(iteration, {"time": seconds})
    assert "eta 0:03:16" in line  # median 2 s x 98 left
    line = writer.format_line(3, {"time": 10.0})  # window [3, 2, 10]: median 3 s x 97 left
    assert "eta 0:04:51" in line


def test_console_without_time_has_no_eta() -> None:
    line = ConsoleWriter(max_iter=10).format_line(4, {"bbox/AP": 81.25})
    assert line == "iter 5/10  bbox/AP 81.25"


def test_json_lines_are_flushed_with_nulls(tmp_path: Path) -> None:
    writer = JSONWriter(tmp_path)
    writer.write(0, {"total_loss": 2.5, "lr": 0.01})
    writer.write(1, {"bbox/AP": 50.0, "bbox/APl": math.nan})
    assert _lines(tmp_path / "metrics.jsonl") == [  # read before close: flushed
        {"iteration": 0, "total_loss": 2.5, "lr": 0.01},
        {"iteration": 1, "bbox/AP": 50.0, "bbox/APl": None},
    ]
    writer.close()


def test_json_resume_drops_lines_past_the_checkpoint(tmp_path: Path) -> None:
    writer = JSONWriter(tmp_path)
    for iteration in range(10):
        writer.write(iteration, {"total_loss": float(iteration)})
    writer.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 10, "total_lo')  # a write cut by the crash
    resumed = JSONWriter(tmp_path, start_iter=5)
    resumed.write(5, {"total_loss": 50.0})
    resumed.close()
    records = _lines(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert records[-1]["total_loss"] == 50.0


def test_json_fresh_run_starts_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 3, "total_loss": 1.0}\n')
    JSONWriter(tmp_path).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_tensorboard_scalars_are_readable(tmp_path: Path) -> None:
    writer = TensorboardWriter(tmp_path)
    writer.write(0, {"total_loss": 2.0, "lr": 0.5})
    writer.write(4, {"total_loss": 1.5, "bbox/AP": 12.5})
    writer.close()
    assert _scalars(tmp_path, "total_loss") == [(0, 2.0), (4, 1.5)]
    assert _scalars(tmp_path, "lr") == [(0, 0.5)]
    assert _scalars(tmp_path, "bbox/AP") == [(4, 12.5)]


def test_tensorboard_resume_purges_later_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = TensorboardWriter(tmp_path)
    for step in range(6):
        writer.write(step, {"total_loss": float(step)})
    writer.close()
    # A resumed run starts later: its event file's name (seconds, then a per-process counter
    # that is not zero-padded) sorts after the first one's, as it does in a new process.
    later = time.time() + 10
    monkeypatch.setattr(event_file_writer.time, "time", lambda: later)
    resumed = TensorboardWriter(tmp_path, start_iter=3)
    resumed.write(3, {"total_loss": 30.0})
    resumed.close()
    assert _scalars(tmp_path, "total_loss") == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


def test_flatten_results() -> None:
    results = {"bbox": {"AP": 81.5, "AP50": 90.0}, "validation_loss": {"loss_cls": 0.25}}
    assert flatten_results({**results, "time_per_image": 0.125}) == {
        "bbox/AP": 81.5,
        "bbox/AP50": 90.0,
        "validation_loss/loss_cls": 0.25,
        "time_per_image": 0.125,
    }
    with pytest.raises(TypeError, match="'bbox/AP' is a str"):
        flatten_results({"bbox": {"AP": "high"}})


class ListWriter(MetricsWriter):
    def __init__(self) -> None:
        self.writes: list[tuple[int, dict[str, float]]] = []
        self.closed = False

    def write(self, iteration: int, metrics: Mapping[str, float]) -> None:
        self.writes.append((iteration, dict(metrics)))

    def close(self) -> None:
        self.closed = True


def _run(hook: PeriodicWriter, max_iter: int) -> None:
    """Drives the hook like the trainer: sets iter and metrics, then after_step."""
    hook.trainer = SimpleNamespace(iter=0, max_iter=max_iter, metrics={})
    hook.before_train()
    for iteration in range(max_iter):
        hook.trainer.iter = iteration
        hook.trainer.metrics = {"total_loss": float(iteration)}
        hook.before_step()
        hook.after_step()
    hook.after_train()


def test_periodic_writer_schedule_and_close() -> None:
    sink = ListWriter()
    _run(PeriodicWriter([sink], period=3), max_iter=8)
    assert sink.writes == [(i, {"total_loss": float(i)}) for i in (2, 5, 7)]
    assert sink.closed


def test_periodic_writer_writes_results_flattened() -> None:
    sink = ListWriter()
    hook = PeriodicWriter([sink], period=5)
    hook.write_results(9, {"bbox": {"AP": 81.25}, "time_per_image": 0.5})
    assert sink.writes == [(9, {"bbox/AP": 81.25, "time_per_image": 0.5})]


def test_only_the_main_process_writes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(writers_module, "is_main_process", lambda: False)
    sink = ListWriter()
    hook = PeriodicWriter([sink], period=1)
    _run(hook, max_iter=3)
    hook.write_results(2, {"bbox": {"AP": 1.0}})
    assert sink.writes == []
    assert default_writers(tmp_path / "run", max_iter=3) == []
    assert not (tmp_path / "run").exists()


def test_default_writers_on_the_main_process(tmp_path: Path) -> None:
    writers = default_writers(tmp_path, max_iter=10, start_iter=0)
    assert [type(w) for w in writers] == [ConsoleWriter, JSONWriter, TensorboardWriter]
    for writer in writers:
        writer.close()
    assert (tmp_path / "metrics.jsonl").exists()


def test_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="period must be >= 1, got 0"):
        PeriodicWriter([], period=0)
