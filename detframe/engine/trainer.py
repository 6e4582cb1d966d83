"""Trainer: the standard training run of a config, assembled from its parts.

    from detframe.engine import Trainer, default_setup, load_config

    cfg = default_setup(load_config("configs/quickstart/mask_rcnn_R_18_FPN_shapes.yaml"))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()          # {"bbox": {"AP": ...}, "segm": {...}} on rank 0

What it builds (each in one overridable classmethod, each part chosen by name in the config
from its registry): the model (`build_model`: MODEL.META_ARCHITECTURE, with MODEL.WEIGHTS),
the optimizer (`build_optimizer`, SOLVER.*), the training data (`build_train_loader`:
DATASETS.TRAIN through the mapper DATALOADER.MAPPER), the step (`build_step`:
SOLVER.TRAIN_STEP, e.g. `SimpleStep`), the learning-rate schedule, the checkpointer, and the
hooks: step time and memory, the schedule, evaluation every TEST.EVAL_PERIOD iterations and
at the end (`test`: every dataset of DATASETS.TEST through `build_test_loader`, evaluated by
`build_evaluator`: TEST.EVALUATOR, e.g. COCOEvaluator for detectors, ProposalEvaluator for
proposal networks), checkpoints every SOLVER.CHECKPOINT_PERIOD iterations, and metrics
written every LOG_PERIOD iterations to the console, OUTPUT_DIR/metrics.jsonl and
TensorBoard.

Distributed runs: the model is wrapped in DistributedDataParallel; SOLVER.IMS_PER_BATCH is
the total number of images per iteration summed over all processes (each takes
IMS_PER_BATCH / world size), as in detectron2, so a config means the same optimisation
whatever the number of processes. Metrics are averaged over the ranks; rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detframe.config import declare
from detframe.data import (
    DATASETS,
    TrainLoader,
    build_test_loader,
    build_train_loader_from_config,
    register_from_config,
)
from detframe.data.catalog import check_num_classes
from detframe.evaluation import inference_on_dataset
from detframe.evaluation.inference import Evaluator
from detframe.modeling import build_model
from detframe.registry import (
    EVALUATOR_REGISTRY,
    MAPPER_REGISTRY,
    META_ARCH_REGISTRY,
    TRAIN_STEP_REGISTRY,
    build,
)
from detframe.utils.comm import (
    get_local_rank,
    get_rank,
    get_world_size,
    is_main_process,
    synchronize,
)

from .checkpoint import Checkpointer, capture_rng_state, restore_rng_state
from .hooks import EvalHook, LRScheduler, PeriodicCheckpointer, StepMonitor
from .lr_scheduler import build_lr_scheduler
from .optimizer import build_optimizer
from .train_loop import HookBase, TrainerBase, TrainStep
from .writers import PeriodicWriter, default_writers

__all__ = ["RESULTS_FILE_NAME", "Trainer", "load_datasets"]

logger = logging.getLogger(__name__)

RESULTS_FILE_NAME = "results.json"

declare("SOLVER.CHECKPOINT_PERIOD", int, 5000, "iterations between checkpoints", min=1)
declare(
    "SOLVER.CHECKPOINTS_TO_KEEP", int, 3, "periodic checkpoints kept (model_final.pth too)", min=1
)
declare(
    "SOLVER.AMP.ENABLED",
    bool,
    False,
    "mixed precision: bfloat16 autocast on the CPU, float16 with loss scaling on CUDA",
)
declare("TEST.EVAL_PERIOD", int, 0, "iterations between evaluations; 0: only after training", min=0)
declare(
    "SOLVER.TRAIN_STEP",
    str,
    "SimpleStep",
    "name in TRAIN_STEP_REGISTRY: what one training iteration does",
)
declare(
    "TEST.EVALUATOR",
    str,
    "COCOEvaluator",
    "name in EVALUATOR_REGISTRY: COCOEvaluator (detections), ProposalEvaluator (proposals)",
)
declare("TEST.VALIDATION_LOSS", bool, False, "also compute the losses on DATASETS.TEST")
declare("TEST.IMS_PER_BATCH", int, 1, "images per inference batch, per process", min=1)
declare(
    "LOG_PERIOD", int, 20, "iterations between metric lines, metrics.jsonl and TensorBoard", min=1
)


def load_datasets(names: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """The dataset dicts of `names` from the catalog. Rank 0 loads first (which generates
    or caches a dataset, e.g. the shapes splits), then the other ranks.

    Raises:
        ValueError: `names` is empty.
    """
    if not names:
        raise ValueError("no dataset named: set DATASETS.TRAIN / DATASETS.TEST in the config")
    datasets = {}
    if is_main_process():
        datasets = {name: DATASETS.get(name) for name in names}
    synchronize()
    if not is_main_process():
        datasets = {name: DATASETS.get(name) for name in names}
    return datasets


class Trainer(TrainerBase):
    """The standard training run of `cfg` (see the module docstring).

    Args:
        cfg: the effective config, as `default_setup` returns it (SEED resolved).
    """

    def __init__(self, cfg: DictConfig) -> None:
        register_from_config(cfg)
        # The meta-architecture says which key holds its number of classes (None: none).
        meta_arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        num_classes_key = getattr(meta_arch, "NUM_CLASSES_KEY", None)
        if num_classes_key is not None:
            check_num_classes(
                OmegaConf.select(cfg, num_classes_key),
                [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST],
                key=num_classes_key,
            )
        model = self.build_model(cfg, strict_weights=False)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        parallel_model = self._data_parallel(model)
        super().__init__(self.build_step(cfg, parallel_model, data_loader, optimizer))
        self.model = parallel_model
        self.cfg = cfg
        self.optimizer = optimizer
        self.data_loader: TrainLoader = data_loader
        self.scheduler = build_lr_scheduler(cfg, optimizer)
        checkpointables: dict[str, Any] = {"optimizer": optimizer, "scheduler": self.scheduler}
        grad_scaler = getattr(self.step, "grad_scaler", None)
        if grad_scaler is not None:
            checkpointables["grad_scaler"] = grad_scaler
        self.checkpointer = Checkpointer(
            model, cfg.OUTPUT_DIR, save_to_disk=is_main_process(), **checkpointables
        )
        self.start_iter = 0
        self.eval_hook: EvalHook | None = None

    @staticmethod
    def _data_parallel(model: nn.Module) -> nn.Module:
        if get_world_size() == 1:
            return model
        device = next(model.parameters()).device
        return DistributedDataParallel(
            model,
            device_ids=[device.index if device.index is not None else get_local_rank()]
            if device.type == "cuda"
            else None,
            broadcast_buffers=False,
        )

    def resume_or_load(self, resume: bool = True) -> None:
        """With `resume`, continues the run in OUTPUT_DIR exactly from its newest readable
        checkpoint: weights, optimizer, schedule, iteration, random states and data position
        (see `Checkpointer.load_for_resume`: an OUTPUT_DIR holding a run but no readable
        checkpoint is a `ResumeError`, never a restart). Otherwise, and in an OUTPUT_DIR
        without a run, training starts at iteration 0 from the weights `build_model` loaded
        (MODEL.WEIGHTS). Temporary files of interrupted checkpoint writes are removed."""
        self.checkpointer.remove_stale_temporaries()
        state = self.checkpointer.load_for_resume() if resume else None
        if state is None:
            if resume:
                logger.info("No run to resume in %s: starting at iteration 0", self.cfg.OUTPUT_DIR)
            self.start_iter = 0
            return
        self.start_iter = int(state["iteration"]) + 1
        ranks = state["ranks"]
        if len(ranks) == get_world_size():
            own = ranks[get_rank()]
            restore_rng_state(own["rng"])
            self.data_loader.load_state_dict(own["data"])
        else:
            # Another world size: continue the global data stream where it was (roughly:
            # samples held back in unfilled batches are skipped); the random states differ.
            drawn = sum(r["data"]["next_position"] for r in ranks)
            self.data_loader.load_state_dict(
                {"next_position": drawn // get_world_size(), "pending": []}
            )
            logger.warning(
                "The checkpoint was written by %d processes and this run has %d: resuming at "
                "iteration %d, but not exactly (random states and batch composition differ)",
                len(ranks),
                get_world_size(),
                self.start_iter,
            )
        logger.info("Resuming at iteration %d", self.start_iter)

    def rank_state(self) -> dict[str, Any]:
        """This rank's random states and data position, for a checkpoint."""
        return {"rng": capture_rng_state(), "data": self.data_loader.state_dict()}

    def build_hooks(self) -> list[HookBase]:
        """StepMonitor, LRScheduler, EvalHook (when DATASETS.TEST names datasets),
        PeriodicCheckpointer, PeriodicWriter."""
        cfg = self.cfg
        writer = PeriodicWriter(
            default_writers(cfg.OUTPUT_DIR, cfg.SOLVER.MAX_ITER, self.start_iter),
            period=cfg.LOG_PERIOD,
        )
        if cfg.DATASETS.TEST:
            self.eval_hook = EvalHook(
                cfg.TEST.EVAL_PERIOD,
                lambda: self.test(cfg, self.model_without_ddp),
                on_results=writer.write_results,
            )
        return [
            StepMonitor(next(self.model.parameters()).device),
            LRScheduler(self.optimizer, self.scheduler),
            self.eval_hook,
            PeriodicCheckpointer(
                self.checkpointer,
                cfg.SOLVER.CHECKPOINT_PERIOD,
                self.rank_state,
                keep=cfg.SOLVER.CHECKPOINTS_TO_KEEP,
            ),
            writer,
        ]

    @property
    def model_without_ddp(self) -> nn.Module:
        """The model itself, without its DistributedDataParallel wrapper."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def train(self) -> Mapping[str, Any]:  # type: ignore[override]
        """Trains from `start_iter` (see `resume_or_load`) to SOLVER.MAX_ITER; returns the
        final evaluation's results on rank 0 ({} on the others, without DATASETS.TEST, or if
        nothing was run)."""
        self.register_hooks(self.build_hooks())
        super().train(self.start_iter, self.cfg.SOLVER.MAX_ITER)
        return self.eval_hook.latest if self.eval_hook is not None else {}

    @classmethod
    def build_model(cls, cfg: DictConfig, strict_weights: bool = True) -> nn.Module:
        """`detframe.modeling.build_model` (MODEL.WEIGHTS loaded: strictly, as a model to
        evaluate, or not, to initialise training), logged."""
        model = build_model(cfg, strict_weights=strict_weights)
        parameters = sum(p.numel() for p in model.parameters())
        logger.info("Model %s with %.2fM parameters", type(model).__name__, parameters / 1e6)
        return model

    @classmethod
    def build_optimizer(cls, cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_step(
        cls,
        cfg: DictConfig,
        model: nn.Module,
        data_loader: TrainLoader,
        optimizer: torch.optim.Optimizer,
    ) -> TrainStep:
        """SOLVER.TRAIN_STEP from TRAIN_STEP_REGISTRY, given the parts it drives."""
        return build(TRAIN_STEP_REGISTRY, cfg.SOLVER.TRAIN_STEP, cfg, model, data_loader, optimizer)

    @classmethod
    def build_mapper(cls, cfg: DictConfig, is_train: bool, **overrides: Any) -> Any:
        """DATALOADER.MAPPER from MAPPER_REGISTRY, in its training or test form;
        `overrides` replace keyword arguments of its `from_config(cfg, is_train)`."""
        return build(MAPPER_REGISTRY, cfg.DATALOADER.MAPPER, cfg, is_train, **overrides)

    @classmethod
    def build_train_loader(cls, cfg: DictConfig) -> TrainLoader:
        """DATASETS.TRAIN (concatenated) through the training mapper."""
        datasets = load_datasets(list(cfg.DATASETS.TRAIN))
        dicts = [record for records in datasets.values() for record in records]
        return build_train_loader_from_config(cfg, dicts, cls.build_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(
        cls, cfg: DictConfig, dataset_name: str, dicts: Sequence[dict[str, Any]]
    ) -> Iterable[list[dict[str, Any]]]:
        """The dicts of the test dataset `dataset_name` through the test mapper, in batches
        of TEST.IMS_PER_BATCH, this rank's share; bad images follow DATALOADER.ON_BAD_DATA
        (skipped ones are counted and logged). With TEST.VALIDATION_LOSS the mapper is given
        instances_in_eval=True, to keep the targets."""
        keep_targets = {"instances_in_eval": True} if cfg.TEST.VALIDATION_LOSS else {}
        mapper = cls.build_mapper(cfg, is_train=False, **keep_targets)
        return build_test_loader(
            dicts,
            mapper,
            cfg.DATALOADER.NUM_WORKERS,
            cfg.TEST.IMS_PER_BATCH,
            on_bad=cfg.DATALOADER.ON_BAD_DATA,
            dataset_name=dataset_name,
        )

    @classmethod
    def build_evaluator(
        cls, cfg: DictConfig, dataset_name: str, output_dir: str | None = None
    ) -> Evaluator:
        """TEST.EVALUATOR from EVALUATOR_REGISTRY for the dataset (its catalog metadata)."""
        metadata = {"name": dataset_name, **DATASETS.metadata(dataset_name)}
        return build(EVALUATOR_REGISTRY, cfg.TEST.EVALUATOR, cfg, metadata, output_dir)

    @classmethod
    def test(cls, cfg: DictConfig, model: nn.Module) -> dict[str, Any]:
        """Evaluates `model` on every dataset of DATASETS.TEST (with validation losses when
        TEST.VALIDATION_LOSS). Results, on rank 0, are one dataset's as `inference_on_dataset`
        returns them, or {dataset name: results} for several; they are also written to
        OUTPUT_DIR/inference/<dataset>/results.json."""
        register_from_config(cfg)
        datasets = load_datasets(list(cfg.DATASETS.TEST))
        results: dict[str, Any] = {}
        for name, dicts in datasets.items():
            output_dir = Path(cfg.OUTPUT_DIR) / "inference" / name
            loader = cls.build_test_loader(cfg, name, dicts)
            evaluator_dir = str(output_dir) if is_main_process() else None
            evaluator = cls.build_evaluator(cfg, name, evaluator_dir)
            results[name] = inference_on_dataset(
                model, loader, evaluator, validation_loss=cfg.TEST.VALIDATION_LOSS
            )
            if is_main_process():
                output_dir.mkdir(parents=True, exist_ok=True)
                text = json.dumps(_nan_to_none(results[name]), indent=1, allow_nan=False)
                (output_dir / RESULTS_FILE_NAME).write_text(text + "\n")
        return results[next(iter(results))] if len(results) == 1 else results


def _nan_to_none(value: Any) -> Any:
    """`value` with NaN and infinite floats (undefined COCO metrics) as None, for strict JSON."""
    if isinstance(value, Mapping):
        return {key: _nan_to_none(v) for key, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
