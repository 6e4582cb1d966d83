"""Distributed training and evaluation on the CPU: `detframe train --num-processes 2` (gloo)
against one process with the same total batch and seed, through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_run import QUICKSTART, tiny_model_overrides

from detframe import cli

# Group norm instead of batch norm (whose statistics would be per process), every anchor
# and every proposal sampled, so that the random sampling only reorders the same terms, and
# SGD, whose update is linear in the gradient (Adam's g / sqrt(v) would turn rounding noise
# in near-zero gradients into full-size steps of either sign).
EXACT = [
    "MODEL.RESNETS.NORM=GN",
    "SOLVER.OPTIMIZER=SGD",
    "SOLVER.BASE_LR=0.01",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE=2048",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=512",
    "SOLVER.MAX_ITER=4",
    "SOLVER.CHECKPOINT_PERIOD=100",
]


def _losses(output_dir: Path) -> list[dict[str, float]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [{k: v for k, v in r.items() if "loss" in k} for r in records if "total_loss" in r]


def _results(output_dir: Path) -> dict:
    return json.loads((output_dir / "inference" / "tiny_val" / "results.json").read_text())


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one(
    tiny_shapes: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same arithmetic in every process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:

        def config(output_dir: Path) -> list[str]:
            return [str(QUICKSTART), *tiny_shapes, *tiny_model_overrides(output_dir), *EXACT]

        single, double = tmp_path / "single", tmp_path / "double"
        assert cli.main(["train", *config(single)]) == 0
        assert cli.main(["train", *config(double), "--num-processes", "2"]) == 0
        # the same weights evaluated by two processes
        weights = single / "model_final.pth"
        evaluation = ["eval", *config(tmp_path / "eval2"), "--weights", str(weights)]
        assert cli.main([*evaluation, "--num-processes", "2"]) == 0
    finally:
        torch.set_num_threads(threads)

    one, two = _losses(single), _losses(double)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    a = torch.load(weights, weights_only=True)["model"]
    b = torch.load(double / "model_final.pth", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)

    alone, shared = _results(single), _results(tmp_path / "eval2")
    for task in ("bbox", "segm"):
        assert shared[task]["AP"] == pytest.approx(alone[task]["AP"], abs=1e-9)
        assert shared[task]["AP50"] == pytest.approx(alone[task]["AP50"], abs=1e-9)
