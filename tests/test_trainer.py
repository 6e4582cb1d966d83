"""The Trainer end to end on a tiny shapes dataset: exact resume, a non-finite loss, what a
run writes (metrics, TensorBoard events, evaluation results, config, checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_run import QUICKSTART, tiny_model_overrides

from detframe.engine import HookBase, Trainer, default_setup
from detframe.engine.setup import load_config, setup_logging


@pytest.fixture(autouse=True)
def _quiet_logging() -> None:
    yield
    setup_logging()  # the runs below log to files in tmp folders; detach them afterwards


class KilledError(Exception):
    """Stands for a run killed after some iterations."""


class StopBefore(HookBase):
    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def before_step(self) -> None:
        if self.trainer.iter == self.iteration:
            raise KilledError


def _trainer(tiny_shapes: list[str], output_dir: Path, *overrides: str) -> Trainer:
    cfg = load_config(QUICKSTART, [*tiny_shapes, *tiny_model_overrides(output_dir), *overrides])
    return Trainer(default_setup(cfg))


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_resume_continues_bitwise_like_an_uninterrupted_run(
    tiny_shapes: list[str], tmp_path: Path
) -> None:
    # flips are random and batches of 2 from 12 images cross epochs: the data position,
    # the per-sample augmentation and the model's sampling RNG must all be restored.
    settings = ("SOLVER.MAX_ITER=8", "SOLVER.CHECKPOINT_PERIOD=3", "INPUT.RANDOM_FLIP=horizontal")
    straight = _trainer(tiny_shapes, tmp_path / "straight", *settings)
    straight.resume_or_load(resume=False)
    straight.train()

    first = _trainer(tiny_shapes, tmp_path / "resumed", *settings)
    first.resume_or_load(resume=False)
    first.register_hooks([StopBefore(4)])  # checkpoint after iteration 2, killed in 4
    with pytest.raises(KilledError):
        first.train()
    assert (tmp_path / "resumed" / "last_checkpoint").read_text() == "model_0000002.pth"
    second = _trainer(tiny_shapes, tmp_path / "resumed", *settings)
    second.resume_or_load(resume=True)
    assert second.start_iter == 3
    second.train()

    a = _weights(tmp_path / "straight" / "model_final.pth")
    b = _weights(tmp_path / "resumed" / "model_final.pth")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resuming: {different[:5]}"
    # the metrics file of the resumed run holds each iteration once, with the same losses
    losses = [{k: v for k, v in r.items() if "loss" in k} for r in _metrics(tmp_path / "straight")]
    resumed = [{k: v for k, v in r.items() if "loss" in k} for r in _metrics(tmp_path / "resumed")]
    assert [r["iteration"] for r in _metrics(tmp_path / "resumed") if "total_loss" in r] == list(
        range(8)
    )
    assert resumed == losses


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_error_and_keeps_the_last_checkpoint(
    tiny_shapes: list[str], tmp_path: Path
) -> None:
    class Poison(HookBase):
        def before_step(self) -> None:
            if self.trainer.iter == 3:
                with torch.no_grad():
                    self.trainer.model.roi_heads.box_predictor.cls_score.bias.fill_(float("inf"))

    trainer = _trainer(tiny_shapes, tmp_path, "SOLVER.MAX_ITER=6", "SOLVER.CHECKPOINT_PERIOD=2")
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([Poison()])
    with pytest.raises(FloatingPointError, match=r"non-finite at iteration 3: loss_cls = nan"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000001.pth"]
    again = _trainer(tiny_shapes, tmp_path, "SOLVER.MAX_ITER=6", "SOLVER.CHECKPOINT_PERIOD=2")
    again.resume_or_load(resume=True)
    assert again.start_iter == 2
    assert all(torch.isfinite(p).all() for p in again.model.parameters())


@pytest.mark.slow
def test_a_run_writes_metrics_events_results_config_and_keeps_n_checkpoints(
    tiny_shapes: list[str], tmp_path: Path
) -> None:
    trainer = _trainer(
        tiny_shapes,
        tmp_path,
        "SOLVER.MAX_ITER=6",
        "SOLVER.CHECKPOINT_PERIOD=1",
        "SOLVER.CHECKPOINTS_TO_KEEP=2",
        "TEST.EVAL_PERIOD=3",
        "TEST.VALIDATION_LOSS=true",
        "LOG_PERIOD=2",
    )
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert set(results) == {"bbox", "segm", "validation_loss", "time_per_image"}
    assert set(results["validation_loss"]) == {
        "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"
    }  # fmt: skip

    records = _metrics(tmp_path)
    steps = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in steps] == [1, 3, 5]
    assert {"lr", "time", "data_time", "max_memory_mb", "loss_mask"} <= set(steps[0])
    evaluations = [r for r in records if "bbox/AP" in r]
    assert [r["iteration"] for r in evaluations] == [2, 5]  # after 3 iterations and at the end
    assert "segm/AP" in evaluations[0] and "validation_loss/loss_cls" in evaluations[0]

    assert list(tmp_path.glob("events.out.tfevents.*"))
    saved = json.loads((tmp_path / "inference" / "tiny_val" / "results.json").read_text())
    assert saved["bbox"]["AP"] == pytest.approx(results["bbox"]["AP"], nan_ok=True)
    assert load_config(tmp_path / "config.yaml").SEED == 7
    assert (tmp_path / "log.txt").read_text().count("iter 6/6") >= 1
    checkpoints = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert checkpoints == ["model_0000003.pth", "model_0000004.pth", "model_final.pth"]


@pytest.mark.slow
def test_a_null_seed_is_resolved_and_saved(tiny_shapes: list[str], tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, [*tiny_shapes, *tiny_model_overrides(tmp_path), "SEED=null"])
    resolved = default_setup(cfg)
    assert isinstance(resolved.SEED, int)
    assert load_config(tmp_path / "config.yaml").SEED == resolved.SEED


@pytest.mark.slow
def test_without_test_datasets_training_runs_and_evaluates_nothing(
    tiny_shapes: list[str], tmp_path: Path
) -> None:
    trainer = _trainer(tiny_shapes, tmp_path, "SOLVER.MAX_ITER=2", "DATASETS.TEST=[]")
    trainer.resume_or_load(resume=False)
    assert trainer.train() == {}
    assert (tmp_path / "model_final.pth").is_file()
    assert not (tmp_path / "inference").exists()
