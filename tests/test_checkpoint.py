"""Checkpoints: atomic writes that survive an interrupted save, weights_only loading,
keeping the last N, strict resume, and random states that round-trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detframe.engine.checkpoint import (
    Checkpointer,
    ResumeError,
    capture_rng_state,
    checkpoint_iteration,
    prune_checkpoints,
    restore_rng_state,
)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))


def _checkpointer(model: nn.Module, folder: Path) -> Checkpointer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Checkpointer(model, str(folder), optimizer=optimizer)


def test_save_then_resume_restores_model_optimizer_and_extras(tmp_path: Path) -> None:
    model = _model(0)
    saver = _checkpointer(model, tmp_path)
    model(torch.randn(2, 3, 5, 6)).sum().backward()
    saver.checkpointables["optimizer"].step()  # momentum buffers exist now
    saver.save("model_0000009", iteration=9, ranks=[{"note": torch.tensor([1, 2])}])
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"

    other = _model(1)
    loader = _checkpointer(other, tmp_path)
    extra = loader.load_for_resume()
    assert extra["iteration"] == 9 and torch.equal(extra["ranks"][0]["note"], torch.tensor([1, 2]))
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    saved = saver.checkpointables["optimizer"].state_dict()["state"]
    loaded = loader.checkpointables["optimizer"].state_dict()["state"]
    assert torch.equal(saved[0]["momentum_buffer"], loaded[0]["momentum_buffer"])


def test_interrupted_write_leaves_previous_checkpoint_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(0)
    saver = _checkpointer(model, tmp_path)
    saver.save("model_0000004", iteration=4)
    before = (tmp_path / "model_0000004.pth").read_bytes()

    real_save = torch.save

    def crash_midway(obj: object, f: object) -> None:
        real_save(obj, f)  # the bytes reach the temporary file ...
        f.truncate(100)  # ... partly, and then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        saver.save("model_0000009", iteration=9)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000004.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert (tmp_path / "model_0000004.pth").read_bytes() == before
    fresh = _model(3)
    assert _checkpointer(fresh, tmp_path).load_for_resume()["iteration"] == 4
    assert not torch.equal(fresh[0].weight, model[0].weight)  # the pre-crash weights


def test_checkpoints_are_read_with_weights_only(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple:
            return (print, ("code ran from a checkpoint",))

    path = tmp_path / "model_0000000.pth"
    torch.save({"model": {}, "payload": Payload()}, path)
    (tmp_path / "last_checkpoint").write_text(path.name)
    with pytest.raises(ResumeError, match=r"model_0000000.pth: it needs code to load .*print"):
        _checkpointer(_model(0), tmp_path).load_for_resume()


def test_resume_is_strict(tmp_path: Path) -> None:
    assert _checkpointer(_model(0), tmp_path).load_for_resume() is None  # no run: a fresh start
    Checkpointer(_model(0), str(tmp_path)).save("model_final", iteration=3)
    with pytest.raises(ValueError, match="it has no optimizer"):
        _checkpointer(_model(0), tmp_path).load_for_resume()
    bigger = nn.Sequential(*_model(0), nn.ReLU(), nn.Linear(2, 2))
    Checkpointer(_model(0), str(tmp_path), optimizer=torch.optim.SGD(bigger.parameters())).save(
        "model_final"
    )
    with pytest.raises(ValueError, match=r"missing keys \['4.weight', '4.bias'\]"):
        _checkpointer(bigger, tmp_path).load_for_resume()
    torch.save({"weights": {}}, tmp_path / "model_final.pth")
    with pytest.raises(ValueError, match="not a detframe checkpoint"):
        _checkpointer(_model(0), tmp_path).load_for_resume()


def test_prune_keeps_the_newest_and_never_the_final_or_last(tmp_path: Path) -> None:
    for iteration in (9, 19, 29, 39):
        (tmp_path / f"model_{iteration:07d}.pth").write_bytes(b"x")
    (tmp_path / "model_final.pth").write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")  # e.g. resumed from there
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["model_0000019.pth"]
    names = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert names == [
        "model_0000009.pth",
        "model_0000029.pth",
        "model_0000039.pth",
        "model_final.pth",
    ]
    assert checkpoint_iteration("out/model_0000039.pth") == 39
    assert checkpoint_iteration("model_final.pth") is None


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # a cached gaussian is part of numpy's state
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    torch.save(state, tmp_path / "rng.pth")
    torch.manual_seed(10)
    np.random.seed(20)
    random.seed(30)
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]
