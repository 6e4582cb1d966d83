"""The `detframe` command end to end: train, resume, eval, demo, benchmark, config, plot, and
one-line errors, each command's exit status checked (in a subprocess for the installed
console script, in process for the rest)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from tiny_run import QUICKSTART, ROOT, tiny_model_overrides

from detframe import cli


@pytest.mark.slow
def test_train_eval_demo_benchmark_and_plot(
    tiny_shapes: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    config = [str(QUICKSTART), *tiny_shapes, *tiny_model_overrides(run)]
    assert cli.main(["train", *config, "SOLVER.MAX_ITER=3", "SOLVER.CHECKPOINT_PERIOD=2"]) == 0
    printed = capsys.readouterr().out
    assert "| task | AP | AP50 | AP75 | APs | APm | APl |" in printed
    assert "| bbox |" in printed and "| segm |" in printed
    assert (run / "model_final.pth").is_file() and (run / "config.yaml").is_file()

    # --resume with a longer schedule continues from model_final (iteration 2) to 5
    assert cli.main(["train", *config, "SOLVER.MAX_ITER=5", "--resume"]) == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in steps if "total_loss" in r] == [0, 1, 2, 3, 4]
    capsys.readouterr()

    # --eval-only --resume evaluates the last checkpoint of the run
    assert cli.main(["train", *config, "--eval-only", "--resume"]) == 0
    assert "| bbox |" in capsys.readouterr().out

    weights = str(run / "model_final.pth")
    assert (
        cli.main(["eval", *config, "--weights", weights, "--output-dir", str(tmp_path / "e")]) == 0
    )
    assert "| segm |" in capsys.readouterr().out
    results = json.loads((tmp_path / "e" / "inference" / "tiny_val" / "results.json").read_text())
    assert {"bbox", "segm", "time_per_image"} <= set(results)

    pictures = tmp_path / "pictures"
    demo = [
        "demo",
        *config,
        "--weights",
        weights,
        "--dataset",
        "tiny_val",
        "--output",
        str(pictures),
    ]
    assert cli.main([*demo, "--limit", "3", "--confidence", "0.0"]) == 0
    written = sorted(pictures.glob("*.png"))
    assert len(written) == 3 and cv2.imread(str(written[0])).shape == (64, 64, 3)
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(written[0], folder / "picture.png")
    from_folder = [*demo[:-4], "--input", str(folder), "--output", str(tmp_path / "p2")]
    assert cli.main(from_folder) == 0
    assert (tmp_path / "p2" / "picture.png").is_file()
    capsys.readouterr()

    assert (
        cli.main(
            [
                "benchmark",
                *config,
                "--weights",
                weights,
                "--images",
                "2",
                "--train",
                "--train-steps",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for expected in (
        "parameters",
        "backbone",
        "post-processing",
        "images/s",
        "GFLOPs",
        "Training step",
    ):
        assert expected in printed, expected

    curves = tmp_path / "curves.png"
    assert cli.main(["plot", str(run), "--output", str(curves)]) == 0
    assert cv2.imread(str(curves)) is not None


def test_config_prints_the_effective_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", str(QUICKSTART), "SOLVER.BASE_LR=0.005"]) == 0
    printed = capsys.readouterr().out
    assert "BASE_LR: 0.005" in printed and "NUM_CLASSES: 3" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["config", "missing.yaml"], "detframe config: error: config file not found: missing.yaml"),
        (
            ["config", str(QUICKSTART), "SOLVER.BASE_LRR=1"],
            "unknown key SOLVER.BASE_LRR; did you mean SOLVER.BASE_LR?",
        ),
        (
            ["train", str(QUICKSTART), "MODEL.BACKBONE.NAME=FPNN"],
            "No BACKBONE named 'FPNN'. Did you mean 'FPN'?",
        ),
        (
            ["eval", str(QUICKSTART), "--weights", "nowhere.pth", "DATASETS.TEST=[]"],
            "weights file 'nowhere.pth' does not exist",
        ),
        (["plot", "no_run_here", "--output", "x.png"], "no metrics.jsonl in run directory"),
    ],
)
def test_errors_are_one_line_with_status_1(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main([*argv, f"OUTPUT_DIR={tmp_path}"] if argv[0] != "plot" else argv) == 1
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_traceback_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exception, match="config file not found"):
        cli.main(["config", "missing.yaml", "--traceback"])


def test_console_script_and_module_entry_points() -> None:
    script = Path(sys.executable).parent / "detframe"
    for command in ([str(script)], [sys.executable, "-m", "detframe"]):
        done = subprocess.run(
            [*command, "config", str(QUICKSTART), "SOLVER.BASE_LRR=1"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert done.returncode == 1
        assert done.stderr.strip().endswith("did you mean SOLVER.BASE_LR?")
