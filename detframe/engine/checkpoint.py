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
a write leaves the previous checkpoint and `last_checkpoint` as they were; a failed write
(e.g. a full disk) raises OSError naming the file and the cause, and removes its temporary
file. Temporary files a killed process left are removed, with a log line, by
`remove_stale_temporaries`.

Resuming never destroys a run: `load_for_resume` loads the newest checkpoint that can be read
(by the iteration it holds; the one `last_checkpoint` names wins a tie) and logs why any newer
one was passed over (missing, truncated, unreadable). When OUTPUT_DIR holds a run (a
checkpoint, `last_checkpoint` or metrics.jsonl) but no checkpoint can be read, it raises
`ResumeError` naming every file and why, and writes nothing; an OUTPUT_DIR without a run is a
fresh start.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from fvcore.common.checkpoint import Checkpointer as _FvcoreCheckpointer

from .writers import METRICS_FILE_NAME

__all__ = [
    "Checkpointer",
    "ResumeError",
    "capture_rng_state",
    "checkpoint_iteration",
    "prune_checkpoints",
    "restore_rng_state",
]

logger = logging.getLogger(__name__)

_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")


_TEMPORARY_SUFFIX = ".tmp"


class ResumeError(RuntimeError):
    """OUTPUT_DIR holds a run, but none of its checkpoints can be resumed from."""


class _KeptWriteErrors:
    """A binary file that keeps the OSError of a failed write: torch.save reports one as a
    RuntimeError of its zip writer ("enforce fail at inline_container.cc"), without the cause."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str) -> Any:  # the file's other methods (flush, tell, ...)
        return getattr(self.file, name)


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Calls `write(file)` on `path.tmp`, fsyncs it and renames it to `path`.

    Raises:
        OSError: the file cannot be written (the message names `path` and the cause, e.g. no
            space left on device); `path` is as it was and `path.tmp` is removed.
    """
    temporary = path.with_name(path.name + _TEMPORARY_SUFFIX)
    try:
        with open(temporary, "wb") as f:
            file = _KeptWriteErrors(f)
            try:
                write(file)
            except Exception as error:
                if file.error is None:
                    raise
                raise file.error from error
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        cause = os.strerror(error.errno) if error.errno else str(error)
        name = f" ({errno.errorcode[error.errno]})" if error.errno in errno.errorcode else ""
        raise OSError(
            error.errno, f"cannot write {path}: {cause}{name}; nothing was replaced"
        ) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _reason(error: BaseException) -> str:
    """Why a file cannot be read, in one line, from the exception torch.load raised."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, pickle.UnpicklingError):
        refusal = [line for line in lines if "WeightsUnpickler error" in line]
        return "it needs code to load (refused: " + (refusal or lines or ["?"])[0] + ")"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


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

    def remove_stale_temporaries(self) -> list[Path]:
        """Deletes the `*.pth.tmp` and `last_checkpoint.tmp` files an interrupted write left in
        save_dir (on the process that saves), logging each; returns their paths."""
        if not self.save_dir or not self.save_to_disk:
            return []
        folder = Path(self.save_dir)
        stale = [*folder.glob(f"*.pth{_TEMPORARY_SUFFIX}")]
        stale += [*folder.glob(f"last_checkpoint{_TEMPORARY_SUFFIX}")]
        for path in stale:
            path.unlink(missing_ok=True)
            logger.info("Deleted %s, left by an interrupted checkpoint write", path)
        return stale

    def _candidates(self) -> tuple[list[tuple[int, Path]], dict[Path, str]]:
        """The checkpoints of save_dir that open, newest first, as (iteration, path), and the
        reason each other checkpoint (or the file last_checkpoint names) cannot be used."""
        folder = Path(self.save_dir)
        tagged = (folder / "last_checkpoint").read_text().strip() if self.has_checkpoint() else ""
        unusable: dict[Path, str] = {}
        if tagged and not (folder / tagged).is_file():
            unusable[folder / tagged] = "last_checkpoint names it, but it does not exist"
        found = []
        for path in folder.glob("model_*.pth"):
            try:
                # mmap reads the structure, not the tensors; a truncated file fails here.
                header = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:
                unusable[path] = _reason(error)
                continue
            iteration = header.get("iteration") if isinstance(header, dict) else None
            if iteration is None:
                iteration = checkpoint_iteration(path)
            found.append((-1 if iteration is None else int(iteration), path.name == tagged, path))
        found.sort(key=lambda item: item[:2], reverse=True)
        return [(iteration, path) for iteration, _, path in found], unusable

    def load_for_resume(
        self, run_files: Sequence[str] = (METRICS_FILE_NAME,)
    ) -> dict[str, Any] | None:
        """Loads the newest readable checkpoint of save_dir into the model and every
        checkpointable, strictly (see the module docstring).

        Args:
            run_files: other files whose presence in save_dir means that a run was there.

        Returns:
            The rest of the checkpoint ("iteration", "world_size", "ranks"), or None when
            save_dir holds no run (no checkpoint, no last_checkpoint, none of `run_files`).

        Raises:
            ResumeError: save_dir holds a run, but no checkpoint in it can be read.
            ValueError: the checkpoint read is not a detframe checkpoint, its model keys
                differ from the model's, or it lacks a checkpointable (a resume must restore
                everything).
        """
        folder = Path(self.save_dir)
        candidates, unusable = self._candidates()
        for iteration, path in candidates:
            try:
                checkpoint = self._load_file(str(path))
            except ValueError:
                raise
            except Exception as error:
                unusable[path] = _reason(error)
                continue
            for skipped, reason in unusable.items():
                logger.warning("Not resuming from %s: %s", skipped, reason)
            logger.info("Resuming from %s (iteration %d)", path, iteration)
            return self._restore(path, checkpoint)
        present = [
            *(path.name for path in unusable),
            *(name for name in ("last_checkpoint", *run_files) if (folder / name).is_file()),
        ]
        if not present:
            return None
        details = "; ".join(f"{path}: {reason}" for path, reason in unusable.items())
        raise ResumeError(
            f"cannot resume the run in {folder}: it holds {', '.join(sorted(set(present)))} "
            f"but no checkpoint that can be read{': ' + details if details else ''}. Nothing "
            "was changed; start a new run in another OUTPUT_DIR, or without resuming (which "
            "overwrites this one)"
        )

    def _restore(self, path: Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Loads `checkpoint` (read from `path`) into the model and the checkpointables;
        returns the rest of it."""
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
