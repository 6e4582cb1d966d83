"""Starting the processes of a run: one, several on this machine, or those torchrun started.

    launch(main, args, num_processes=N, device="cpu")

- Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT in the environment, for
  one machine or many): this process joins the group torchrun described (`env://`) and runs
  `main(*args)`; `num_processes` is ignored.
- Otherwise, with num_processes > 1: N processes are spawned on this machine, rank i on
  "127.0.0.1" and a free port, and each runs `main(*args)`.
- Otherwise `main(*args)` runs in this process, without a process group.

The backend is NCCL for CUDA devices and gloo for the CPU. With CUDA, process i uses GPU
LOCAL_RANK. On the CPU, each of the N processes of this machine gets cores / N threads
(torchrun's own OMP_NUM_THREADS is respected), so that the processes do not oversubscribe.
An exception in any process stops the run and is raised here as `LaunchError`, carrying the
failing process's message.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["LaunchError", "launch", "under_torchrun"]

logger = logging.getLogger(__name__)

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_TIMEOUT = datetime.timedelta(minutes=30)


class LaunchError(RuntimeError):
    """A process of a multi-process run failed; the message is that process's error."""


def under_torchrun() -> bool:
    """Whether torchrun (or another env:// launcher) started this process."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _run_in_group(
    main: Callable[..., Any], args: Sequence[Any], device: str, local_world_size: int
) -> Any:
    """Joins the env:// process group, runs `main(*args)`, and leaves the group."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    dist.init_process_group(backend=_backend(device), init_method="env://", timeout=_TIMEOUT)
    try:
        return main(*args)
    finally:
        dist.destroy_process_group()


def _spawned(
    index: int,
    main: Callable[..., Any],
    args: Sequence[Any],
    num_processes: int,
    device: str,
    port: int,
) -> None:
    os.environ.update(
        RANK=str(index),
        LOCAL_RANK=str(index),
        WORLD_SIZE=str(num_processes),
        LOCAL_WORLD_SIZE=str(num_processes),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    _run_in_group(main, args, device, num_processes)


def launch(
    main: Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    num_processes: int = 1,
    device: str = "cpu",
) -> Any:
    """Runs `main(*args)` in every process of the run (see the module docstring).

    Args:
        main: a module-level function (spawned processes import it by name).
        args: its arguments; picklable when num_processes > 1.
        num_processes: processes to start on this machine when not under torchrun.
        device: "cpu" or "cuda" (the backend and the device of each process).

    Returns:
        `main`'s return value in this process (rank 0's when processes were spawned: None).

    Raises:
        ValueError: num_processes < 1, or more CUDA processes than GPUs.
        LaunchError: a spawned process raised.
    """
    if under_torchrun():
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        return _run_in_group(main, args, device, local_world_size)
    if num_processes < 1:
        raise ValueError(f"the number of processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        return main(*args)
    if torch.device(device).type == "cuda" and num_processes > torch.cuda.device_count():
        raise ValueError(
            f"{num_processes} CUDA processes asked for, but {torch.cuda.device_count()} GPUs "
            "are visible"
        )
    port = _free_port()
    logger.info("Starting %d processes (%s, port %d)", num_processes, _backend(device), port)
    try:
        mp.start_processes(
            _spawned,
            args=(main, tuple(args), num_processes, device, port),
            nprocs=num_processes,
            start_method="spawn",
        )
    except mp.ProcessRaisedException as error:
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        raise LaunchError(
            f"process {error.error_index} of {num_processes} failed: {lines[-1]}"
        ) from error
    except mp.ProcessExitedException as error:
        raise LaunchError(
            f"process {error.error_index} of {num_processes} exited with code {error.exit_code}"
        ) from error
    return None
