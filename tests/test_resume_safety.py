"""Resuming never destroys a run: a missing `last_checkpoint` or a truncated checkpoint falls
back to the newest readable one (saying why), a run with nothing readable is an error that
changes nothing, stale temporary files are removed, and a full disk names the file."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_run import QUICKSTART, tiny_model_overrides
from torch import nn

from detframe.config import load_config
from detframe.engine import Trainer, default_setup
from detframe.engine import checkpoint as checkpoint_module
from detframe.engine.checkpoint import Checkpointer, ResumeError
from detframe.engine.setup import setup_logging


def _checkpointer(folder: Path, seed: int = 0) -> Checkpointer:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    return Checkpointer(model, str(folder), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def _save(folder: Path, iteration: int, name: str | None = None) -> dict[str, torch.Tensor]:
    """Saves a checkpoint of a model seeded by `iteration`; returns its weights."""
    saver = _checkpointer(folder, seed=iteration)
    saver.save(name or f"model_{iteration:07d}", iteration=iteration)
    return {k: v.clone() for k, v in saver.model.state_dict().items()}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _assert_loaded(loader: Checkpointer, weights: dict[str, torch.Tensor]) -> None:
    for key, value in loader.model.state_dict().items():
        assert torch.equal(value, weights[key])


def test_missing_last_checkpoint_resumes_from_the_newest_file(tmp_path: Path) -> None:
    _save(tmp_path, 4)
    newest = _save(tmp_path, 9)
    _save(tmp_path, 1)
    (tmp_path / "last_checkpoint").unlink()
    loader = _checkpointer(tmp_path, seed=100)
    assert loader.load_for_resume()["iteration"] == 9
    _assert_loaded(loader, newest)


def test_a_final_checkpoint_older_than_a_periodic_one_is_ordered_by_its_iteration(
    tmp_path: Path,
) -> None:
    _save(tmp_path, 5, "model_final")  # a run of 6 iterations, then continued to 20
    newest = _save(tmp_path, 11)
    (tmp_path / "last_checkpoint").unlink()
    loader = _checkpointer(tmp_path, seed=100)
    assert loader.load_for_resume()["iteration"] == 11
    _assert_loaded(loader, newest)


def test_a_truncated_last_checkpoint_falls_back_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    intact = _save(tmp_path, 4)
    _save(tmp_path, 9)
    _truncate(tmp_path / "model_0000009.pth")
    loader = _checkpointer(tmp_path, seed=100)
    with caplog.at_level(logging.INFO, logger="detframe.engine.checkpoint"):
        assert loader.load_for_resume()["iteration"] == 4
    _assert_loaded(loader, intact)
    assert f"Not resuming from {tmp_path / 'model_0000009.pth'}: RuntimeError: " in caplog.text
    assert "central directory" in caplog.text
    assert f"Resuming from {tmp_path / 'model_0000004.pth'} (iteration 4)" in caplog.text
    assert (tmp_path / "model_0000009.pth").exists()  # nothing is deleted


def test_a_run_without_a_readable_checkpoint_is_an_error_that_changes_nothing(
    tmp_path: Path,
) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 0, "total_loss": 1.0}\n')
    with pytest.raises(ResumeError, match=r"holds metrics.jsonl but no checkpoint"):
        _checkpointer(tmp_path).load_for_resume()
    _save(tmp_path, 4)
    _save(tmp_path, 9)
    for name in ("model_0000004.pth", "model_0000009.pth"):
        _truncate(tmp_path / name)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(
        ResumeError,
        match=r"holds last_checkpoint, metrics.jsonl, model_0000004.pth, model_0000009.pth but "
        r"no checkpoint that can be read: .*model_0000009.pth: RuntimeError: .*central directory",
    ):
        _checkpointer(tmp_path).load_for_resume()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_new_output_dir_is_a_fresh_start(tmp_path: Path) -> None:
    assert _checkpointer(tmp_path / "new").load_for_resume() is None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    assert _checkpointer(tmp_path / "other").load_for_resume() is None


def test_stale_temporary_files_are_removed_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save(tmp_path, 4)
    stale = [tmp_path / "model_0000009.pth.tmp", tmp_path / "last_checkpoint.tmp"]
    for path in stale:
        path.write_bytes(b"half written")
    (tmp_path / "keep.tmp").write_bytes(b"not ours")
    with caplog.at_level(logging.INFO, logger="detframe.engine.checkpoint"):
        removed = _checkpointer(tmp_path).remove_stale_temporaries()
    assert sorted(removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "keep.tmp",
        "last_checkpoint",
        "model_0000004.pth",
    ]
    assert f"Deleted {stale[0]}, left by an interrupted checkpoint write" in caplog.text


class _FullDisk:
    """A binary file on a disk that fills up after `room` bytes (writes raise ENOSPC)."""

    def __init__(self, file: Any, room: int) -> None:
        self.file = file
        self.room = room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *args: Any) -> None:
        self.file.close()


def test_a_full_disk_names_the_file_and_the_cause_and_keeps_the_earlier_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    earlier = _save(tmp_path, 4)
    before = (tmp_path / "model_0000004.pth").read_bytes()

    def open_on_full_disk(path: Any, mode: str = "r", *args: Any) -> _FullDisk:
        return _FullDisk(open(path, mode, *args), room=600)

    monkeypatch.setattr(checkpoint_module, "open", open_on_full_disk, raising=False)
    saver = _checkpointer(tmp_path, seed=9)
    target = tmp_path / "model_0000009.pth"
    with pytest.raises(
        OSError, match=rf"cannot write {target}: No space left on device \(ENOSPC\)"
    ):
        saver.save("model_0000009", iteration=9)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000004.pth"]
    assert (tmp_path / "model_0000004.pth").read_bytes() == before
    loader = _checkpointer(tmp_path, seed=100)
    assert loader.load_for_resume()["iteration"] == 4
    _assert_loaded(loader, earlier)


@pytest.mark.slow
def test_the_trainer_resumes_past_a_missing_tag_and_a_truncated_final(
    tiny_shapes: list[str], tmp_path: Path
) -> None:
    overrides = [
        *tiny_shapes,
        *tiny_model_overrides(tmp_path),
        "SOLVER.MAX_ITER=4",
        "SOLVER.CHECKPOINT_PERIOD=2",
        "DATASETS.TEST=[]",
    ]
    try:
        first = Trainer(default_setup(load_config(QUICKSTART, overrides)))
        first.resume_or_load(resume=False)
        first.train()
        (tmp_path / "last_checkpoint").unlink()
        _truncate(tmp_path / "model_final.pth")
        again = Trainer(default_setup(load_config(QUICKSTART, overrides)))
        again.resume_or_load(resume=True)
        assert again.start_iter == 2  # from model_0000001.pth, not from 0
        again.train()
    finally:
        setup_logging()
    iterations = [
        json.loads(line)["iteration"]
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert iterations == [0, 1, 2, 3]
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 3
