"""Running a detector over a dataset and evaluating its detections (and, optionally, its losses).

Shapes: B images per batch.

    data_loader        iterable of batches: list[dict] of B dataset dicts ("image", "image_id",
                       and "instances" when validation losses are computed)
    model(batch)       B output dicts, {"instances": Instances} from a detector or
                       {"proposals": Instances} from a proposal network (evaluation mode)
    model.outputs_and_losses(batch)
                       (B output dicts, {loss name: scalar Tensor}), used when
                       validation_loss=True (one pass gives both)

This is the meta-architecture protocol (`detframe.modeling.MetaArchitecture`); nothing else
of the model is used, and the evaluator decides which output key it reads.

Conventions:

- Without validation losses the model is called on the inputs without their "instances" (no
  loss is computed for nothing); the evaluator gets the inputs as they came.
- The model runs in evaluation mode under `torch.no_grad()`; its previous mode is restored
  afterwards (also when an exception is raised), see `inference_context`.
- "time_per_image" is the model's wall time per image (seconds), over the batches after the
  first `NUM_WARMUP_BATCHES` (fewer when the dataset is small: at least one batch is timed), on
  this process; data loading and the evaluator are not counted. CUDA is synchronised around
  each timed call when it is available.
- The validation loss of a term is the image-weighted mean of its per-batch values:
  sum(loss_b * B_b) / sum(B_b), gathered over all processes.
- Under torch.distributed every rank runs its shard of the dataset; the evaluator and the
  validation losses are gathered to rank 0, whose result has everything; the other ranks get
  only "time_per_image".
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from detframe.utils.comm import gather_to_main_process, is_main_process

__all__ = ["NUM_WARMUP_BATCHES", "inference_context", "inference_on_dataset"]

logger = logging.getLogger(__name__)

NUM_WARMUP_BATCHES = 5


class Evaluator(Protocol):
    """The evaluator protocol of detframe.evaluation (COCOEvaluator, ProposalEvaluator)."""

    def reset(self) -> None: ...
    def process(
        self, inputs: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]]
    ) -> None: ...
    def evaluate(self) -> dict[str, dict[str, float]]: ...


@contextlib.contextmanager
def inference_context(model: nn.Module) -> Iterator[None]:
    """Puts `model` in evaluation mode and restores its previous training mode on exit."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _mean_losses(sums: dict[str, float], num_images: int) -> dict[str, float]:
    """The image-weighted mean losses over all ranks, on rank 0 ({} on the other ranks)."""
    gathered = gather_to_main_process([(sums, num_images)])
    if gathered is None:
        return {}
    total_images = sum(n for _, n in gathered)
    if total_images == 0:
        return {}
    names = sorted({name for part, _ in gathered for name in part})
    return {name: sum(part.get(name, 0.0) for part, _ in gathered) / total_images for name in names}


def inference_on_dataset(
    model: nn.Module,
    data_loader: Iterable[Sequence[dict[str, Any]]],
    evaluator: Evaluator,
    *,
    progress: bool = True,
    validation_loss: bool = False,
) -> dict[str, Any]:
    """Runs `model` over `data_loader`, feeds the detections to `evaluator`, and evaluates.

    Args:
        model: a meta-architecture; `model(batch)` returns one output dict per image in
            evaluation mode, and with validation_loss=True `model.outputs_and_losses(batch)`
            returns (outputs, {name: scalar Tensor}).
        data_loader: batches (lists) of dataset dicts; this rank's shard of the dataset.
        evaluator: reset() here, process(batch, outputs) per batch, then evaluate().
        progress: show a tqdm bar (images, images/s) on the main process.
        validation_loss: also compute the mean losses (the inputs need "instances").

    Returns:
        On the main process: {**evaluator.evaluate(), "validation_loss": {name: float}
        (only with validation_loss=True), "time_per_image": float seconds (NaN when no image
        was processed)}. For COCOEvaluator: {"bbox": {"AP": ..., ...}, "segm": {...},
        "validation_loss": {"loss_cls": ..., ...}, "time_per_image": 0.05}. Other ranks get
        {"time_per_image": float}.

    Raises:
        ValueError: validation_loss=True and an input has no "instances" (its image_id is
            named).
    """
    evaluator.reset()
    total = len(data_loader) if hasattr(data_loader, "__len__") else None
    num_warmup = NUM_WARMUP_BATCHES if total is None else max(min(NUM_WARMUP_BATCHES, total - 1), 0)
    loss_sums: dict[str, float] = {}
    num_images = timed_images = 0
    timed_seconds = 0.0
    bar = tqdm(unit="img", desc="inference", disable=not (progress and is_main_process()))
    with inference_context(model), torch.no_grad(), bar:
        for index, inputs in enumerate(data_loader):
            if validation_loss:
                missing = [x.get("image_id") for x in inputs if "instances" not in x]
                if missing:
                    raise ValueError(
                        f"validation_loss needs 'instances' in every input; images {missing} "
                        "have none"
                    )
            _synchronize()
            start = time.perf_counter()
            if validation_loss:
                outputs, losses = model.outputs_and_losses(inputs)
            else:
                outputs = model([{k: v for k, v in x.items() if k != "instances"} for x in inputs])
            _synchronize()
            if index >= num_warmup:
                timed_seconds += time.perf_counter() - start
                timed_images += len(inputs)
            if validation_loss:
                for name, value in losses.items():
                    loss_sums[name] = loss_sums.get(name, 0.0) + float(value) * len(inputs)
            num_images += len(inputs)
            evaluator.process(inputs, outputs)
            bar.update(len(inputs))
    time_per_image = timed_seconds / timed_images if timed_images else math.nan
    logger.info(
        "Inference on %d images: %.4f s per image (after %d warm-up batches)",
        num_images,
        time_per_image,
        num_warmup,
    )
    results: dict[str, Any] = dict(evaluator.evaluate())
    if validation_loss:
        mean_losses = _mean_losses(loss_sums, num_images)
        if is_main_process():
            results["validation_loss"] = mean_losses
    results["time_per_image"] = time_per_image
    return results
