"""Wall time per named stage of a model, and peak memory, for benchmarks.

Conventions:

- Times are wall-clock seconds from `time.perf_counter`. A stage is timed from its start to
  its end; `StageTimes.seconds[stage]` adds up every run of the stage and
  `StageTimes.calls[stage]` counts them. On a CUDA device, `StageTimes(device)` synchronises
  the device at each stage boundary, so that a stage's time is the device's work and not the
  time to queue it (which makes the whole run a little slower).
- Instrumenting changes the objects it is given (forward hooks on modules, an instance
  attribute that shadows a method); `StageTimes.remove()` undoes all of it, and a
  `StageTimes` used as a context manager removes it on exit.
- Memory is in MB of 2**20 bytes. On CUDA the peak is `torch.cuda.max_memory_allocated`: the
  most memory that tensors held on the device since the last `reset_peak_memory` (the
  caching allocator may reserve more). On the CPU it is the peak resident set size of the
  whole process (`resource.getrusage(RUSAGE_SELF).ru_maxrss`): the high-water mark since the
  process started, which includes everything the process did before and cannot be reset.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["StageTimes", "peak_memory_kind", "peak_memory_mb", "reset_peak_memory"]

_MB = 2**20
_ABSENT = object()  # marks a wrapped method that had no instance attribute to restore


class StageTimes:
    """Adds up the wall time spent in named stages (module forwards, wrapped methods, or
    blocks under `stage()`).

    Args:
        device: where the timed work runs; a CUDA device is synchronised at each stage's
            start and end. None or a CPU device: no synchronisation.

    A stage must end before it starts again: one that runs inside itself (a recursive
    module, or nested objects timed under one name) is not supported.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._start: dict[str, float] = {}
        self._device = torch.device(device) if device is not None else None
        self._handles: list[RemovableHandle] = []
        # (object, attribute name, the instance attribute it shadowed or _ABSENT)
        self._wrapped: list[tuple[Any, str, Any]] = []

    def hook_module(self, module: nn.Module, stage: str) -> None:
        """Times every call of `module`, from a forward pre-hook to a forward hook."""
        self._handles.append(module.register_forward_pre_hook(lambda *_: self._begin(stage)))
        self._handles.append(module.register_forward_hook(lambda *_: self._end(stage)))

    def wrap_method(self, obj: Any, name: str, stage: str) -> None:
        """Times every call of `obj.<name>` made through `obj` (an instance attribute that
        shadows the method until `remove()`)."""
        method = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(stage):
                return method(*args, **kwargs)

        self._wrapped.append((obj, name, vars(obj).get(name, _ABSENT)))
        setattr(obj, name, timed)

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        """Times the block under `stage`."""
        self._begin(stage)
        try:
            yield
        finally:
            self._end(stage)

    def reset(self) -> None:
        """Forgets the times and counts so far (e.g. those of warm-up runs)."""
        self.seconds.clear()
        self.calls.clear()

    def remove(self) -> None:
        """Removes every hook and wrapper this object installed, latest first."""
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        for obj, name, shadowed in reversed(self._wrapped):
            if shadowed is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, shadowed)
        self._wrapped.clear()

    def __enter__(self) -> StageTimes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    def _synchronize(self) -> None:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _begin(self, stage: str) -> None:
        self._synchronize()
        self._start[stage] = time.perf_counter()

    def _end(self, stage: str) -> None:
        self._synchronize()
        self.seconds[stage] += time.perf_counter() - self._start.pop(stage)
        self.calls[stage] += 1


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory in MB (2**20 bytes): on CUDA, the most held by tensors on `device` since
    the last `reset_peak_memory(device)`; on the CPU, the peak resident set size of this
    process since it started (Linux reports it in KiB, macOS in bytes)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak * 1024 / _MB


def reset_peak_memory(device: torch.device | str) -> None:
    """Starts a new CUDA peak for `device`; does nothing on the CPU, whose figure is the
    process's high-water mark and cannot be reset."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_kind(device: torch.device | str) -> str:
    """What `peak_memory_mb(device)` measures, in words for a report."""
    if torch.device(device).type == "cuda":
        return "CUDA max allocated since reset"
    return "process peak RSS since start"
