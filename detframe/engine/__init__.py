"""Training and running detectors: the training loop and its hooks, checkpoints, the
optimizer and learning-rate schedule, metrics writers, distributed launch, and the tools
behind the command line (prediction on images, demo pictures, benchmarks, curves).

Importing this package declares its config keys (SOLVER.*, TEST.*, LOG_PERIOD).
"""

from .checkpoint import Checkpointer, capture_rng_state, restore_rng_state
from .hooks import EvalHook, LRScheduler, PeriodicCheckpointer, StepMonitor
from .launch import launch
from .lr_scheduler import LRMultiplier, build_lr_schedule, build_lr_scheduler
from .optimizer import build_grad_clipper, build_optimizer, param_groups
from .predictor import Predictor, read_image
from .setup import default_setup, load_config, schema_markdown, setup_logging
from .train_loop import HookBase, SimpleStep, TrainerBase, TrainStep
from .trainer import Trainer, load_datasets
from .writers import PeriodicWriter, default_writers

__all__ = [
    "Checkpointer",
    "EvalHook",
    "HookBase",
    "LRMultiplier",
    "LRScheduler",
    "PeriodicCheckpointer",
    "PeriodicWriter",
    "Predictor",
    "SimpleStep",
    "StepMonitor",
    "TrainStep",
    "Trainer",
    "TrainerBase",
    "build_grad_clipper",
    "build_lr_schedule",
    "build_lr_scheduler",
    "build_optimizer",
    "capture_rng_state",
    "default_setup",
    "default_writers",
    "launch",
    "load_config",
    "load_datasets",
    "param_groups",
    "read_image",
    "restore_rng_state",
    "schema_markdown",
    "setup_logging",
]
