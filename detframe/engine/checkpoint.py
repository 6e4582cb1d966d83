"""Checkpoints of a training run: written atomically, read without running code, resumed exactly.

Layout of OUTPUT_DIR:

    model_0004999.pth   after iteration 4999 (0-based), i.e. 5000 iterations done
    model_final.pth     after the last iteration
    last_checkpoint     the file name of the newest checkpoint (what --resume loads)

A checkpoint is a dict that `torch.load(..., weights_only=True)` reads: "model" (state dict),
one entry per registered checkpointable ("optimizer", "scheduler", ...), and what the trainer
adds: "iteration" (the last one done), "world_size", and "ranks", one dict per rank with its
random states ("rng", see `capture_rng_state`) and the position of its data stream ("data").

Writes are atomic: the file is written to `NAME.pth.tmp`, flushed to disk, then renamed over
`NAME.pth`; `last_checkpoint` is replaced the same way, after the checkpoint. A crash during
a write leaves the previous checkpoint and `last_checkpoint` as they were.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fvcore.common.checkpoint import Checkpointer as _FvcoreCheckpointer

__all__ = [
    "Checkpointer",
    "capture_rng_state",
    "checkpoint_iteration",
    "prune_checkpoints",
    "restore_rng_state",
]

logger = logging.getLogger(__name__)

_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")


def _atomic_write(path: Path, write: Any) -> None:
    """Calls `write(file)` on `path.tmp`, fsyncs it and renames it to `path`."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class Checkpointer(_FvcoreCheckpointer):
    """fvcore's Checkpointer with atomic saves and `weights_only` loading.

    Constructor arguments (fvcore's):
        model: the model (a DistributedDataParallel wrapper is unwrapped).
        save_dir: OUTPUT_DIR.
        save_to_disk: False on the ranks other than 0.
        checkpointables: objects with state_dict() / load_state_dict(), saved under their
            keyword, e.g. optimizer=..., scheduler=....
    """

    def save(self, name: str, **extra: Any) -> None:
        """Writes `save_dir/name.pth` atomically and makes it the last checkpoint."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(extra)
        path = Path(self.save_dir) / f"{name}.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("Saving checkpoint to %s", path)
        _atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(path.name)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Atomically points `last_checkpoint` at `last_filename_basename`."""
        path = Path(self.save_dir) / "last_checkpoint"
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, f: str) -> dict[str, Any]:
        """A checkpoint read with `weights_only=True` (no code runs from the file)."""
        checkpoint = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or "model" not in checkpoint:
            raise ValueError(f"{f} is not a detframe checkpoint (no 'model' entry)")
        return checkpoint

    def load_for_resume(self) -> dict[str, Any]:
        """Loads the last checkpoint into the model and every checkpointable, strictly.

        Returns:
            The rest of the checkpoint ("iteration", "world_size", "ranks").

        Raises:
            FileNotFoundError: there is no last checkpoint in save_dir.
            ValueError: the checkpoint's model keys differ from the model's, or it lacks a
                checkpointable (a resume must restore everything).
        """
        path = self.get_checkpoint_file()
        if not self.has_checkpoint() or not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint to resume from in {self.save_dir}")
        checkpoint = self._load_file(path)
        missing = sorted(set(self.checkpointables) - set(checkpoint))
        if missing:
            raise ValueError(f"{path} cannot be resumed from: it has no {', '.join(missing)}")
        result = self.model.load_state_dict(checkpoint.pop("model"), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{path} does not match the model: missing keys {result.missing_keys}, "
                f"unexpected keys {result.unexpected_keys}"
            )
        for key, obj in self.checkpointables.items():
            obj.load_state_dict(checkpoint.pop(key))
        logger.info("Resumed from %s", path)
        return checkpoint


def checkpoint_iteration(path: str | os.PathLike[str]) -> int | None:
    """The iteration in a periodic checkpoint's name (model_0004999.pth -> 4999), else None."""
    match = _PERIODIC.match(Path(path).name)
    return int(match.group(1)) if match else None


def prune_checkpoints(save_dir: str | os.PathLike[str], keep: int) -> list[Path]:
    """Deletes all but the `keep` newest periodic checkpoints (never model_final.pth or the
    one `last_checkpoint` names); returns the deleted paths."""
    folder = Path(save_dir)
    last = folder / "last_checkpoint"
    protected = last.read_text().strip() if last.is_file() else ""
    periodic = sorted(
        (p for p in folder.glob("model_*.pth") if checkpoint_iteration(p) is not None),
        key=checkpoint_iteration,
    )
    deleted = [p for p in periodic[: max(len(periodic) - keep, 0)] if p.name != protected]
    for path in deleted:
        path.unlink()
    return deleted


def capture_rng_state() -> dict[str, Any]:
    """This process's random states (torch, CUDA, numpy's global, Python's), in types that
    `torch.load(weights_only=True)` reads back."""
    numpy_kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": numpy_kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restores the states `capture_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
