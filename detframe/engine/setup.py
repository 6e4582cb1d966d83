"""What every run does first: the config, logging, the seed, and a copy of the config.

`load_config(path, overrides)` is `detframe.config.load_config` with every key of detframe's
own components declared: the config layer knows no component, so the layer that builds them
imports their packages (below, and this package, whose `__init__` Python runs before this
module), which declare their keys next to the code that reads them. The command line, the
tools and the tests load configs through it; `schema_markdown()` is the table of those keys
(`detframe schema`, docs/configs.md).

`default_setup(cfg)` (called in every process of a run, after the process group exists):

- logs to the console (rank 0 at INFO, the other ranks WARNING and above only) and, on rank 0,
  to `OUTPUT_DIR/log.txt`;
- resolves a null SEED to a random one, the same on every rank (rank 0's is broadcast), and
  returns a config with that SEED, so the saved config reproduces the run;
- seeds torch, numpy and `random` in each process with SEED + rank (model initialisation is
  the same on every rank anyway: DistributedDataParallel copies rank 0's weights);
- writes the effective config to `OUTPUT_DIR/config.yaml` on rank 0 and logs the
  environment (versions, threads, world size, device).
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, read_write

from detframe import data, evaluation, modeling  # noqa: F401  (declare keys, register parts)
from detframe.config import SCHEMA, format_config, save_config
from detframe.config import load_config as _load_declared
from detframe.utils.comm import all_gather, get_rank, get_world_size, is_main_process

__all__ = [
    "CONFIG_FILE_NAME",
    "LOG_FILE_NAME",
    "default_setup",
    "load_config",
    "schema_markdown",
    "seed_all",
    "setup_logging",
]

CONFIG_FILE_NAME = "config.yaml"
LOG_FILE_NAME = "log.txt"
_FORMAT = "[%(asctime)s %(name)s %(levelname)s] %(message)s"
_HANDLER_MARK = "_detframe_handler"


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> DictConfig:
    """The effective config of `path` and `KEY=VALUE` overrides, validated against the keys
    of detframe's components and of the modules its `IMPORTS` names.

    See `detframe.config.load_config` for the arguments, the result and the errors.
    """
    return _load_declared(path, overrides)


def schema_markdown() -> str:
    """The declared keys of detframe's components as a markdown table, sorted by key."""
    return SCHEMA.markdown()


def setup_logging(output_dir: str | None = None, *, rank: int | None = None) -> logging.Logger:
    """Configures the "detframe" logger (see the module docstring); calling it again replaces
    the handlers it added before. Returns the logger."""
    rank = get_rank() if rank is None else rank
    logger = logging.getLogger("detframe")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(_FORMAT, datefmt="%m/%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [console]
    if output_dir and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / LOG_FILE_NAME))
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _HANDLER_MARK, True)
        logger.addHandler(handler)
    return logger


def seed_all(seed: int) -> None:
    """Seeds torch (CPU and CUDA), numpy's global RNG and `random` with `seed`."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _resolve_seed(cfg: DictConfig) -> DictConfig:
    """`cfg` with a null SEED replaced by one random seed shared by all ranks."""
    if cfg.SEED is not None:
        return cfg
    seed = all_gather(int(np.random.SeedSequence().generate_state(1)[0]) % 2**31)[0]
    resolved = OmegaConf.create(OmegaConf.to_container(cfg))
    with read_write(resolved):
        resolved.SEED = seed
    OmegaConf.set_struct(resolved, True)
    OmegaConf.set_readonly(resolved, True)
    return resolved


def default_setup(cfg: DictConfig) -> DictConfig:
    """Logging, seeding and the saved config of a run (module docstring); returns the config
    with its SEED resolved."""
    logger = setup_logging(cfg.OUTPUT_DIR)
    cfg = _resolve_seed(cfg)
    seed_all(cfg.SEED + get_rank())
    if is_main_process():
        save_config(cfg, Path(cfg.OUTPUT_DIR) / CONFIG_FILE_NAME)
    logger.info(
        "detframe on torch %s, %d threads, %d process(es), rank %d, device %s, seed %d",
        torch.__version__,
        torch.get_num_threads(),
        get_world_size(),
        get_rank(),
        cfg.MODEL.DEVICE,
        cfg.SEED,
    )
    logger.debug("Effective config:\n%s", format_config(cfg))
    return cfg
