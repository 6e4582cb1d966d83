"""Loss / AP curve plotting from metrics.jsonl: moving median against a plain re-implementation,
the series read back, the PNG written, and the errors for missing files or keys."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import matplotlib.image
import pytest

from detframe.engine.plot import load_metrics, moving_median, plot_runs, select_keys

_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "plot_metrics.py"


def plot_metrics_main(argv: list[str]) -> int:
    """tools/plot_metrics.py's main, loaded from the file (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("plot_metrics", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _write_run(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def _training_run(run_dir: Path, scale: float) -> Path:
    records: list[dict] = []
    for iteration in range(0, 40, 2):
        loss = scale / (1 + iteration)
        records.append(
            {"iteration": iteration, "total_loss": 2 * loss, "loss_cls": loss, "lr": 0.01}
        )
        if iteration % 10 == 9 or iteration == 38:
            records.append({"iteration": iteration, "bbox/AP": 40.0 + iteration, "bbox/APl": None})
    return _write_run(run_dir, records)


def test_moving_median_against_a_plain_loop() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 8.0, 3.0]
    assert moving_median(values, 3) == [5.0, 3.0, 4.0, 2.0, 4.0, 3.0]
    assert moving_median(values, 1) == values
    expected = [statistics.median(values[: i + 1]) for i in range(len(values))]
    assert moving_median(values, 100) == expected
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        moving_median(values, 0)


def test_load_metrics_and_select_keys(tmp_path: Path) -> None:
    run = _write_run(
        tmp_path / "run",
        [
            {"iteration": 0, "total_loss": 3.0, "loss_cls": 1.0, "lr": 0.1},
            {"iteration": 0, "bbox/AP": 10.0, "bbox/APl": None, "validation_loss/loss_cls": 2.0},
            {"iteration": 4, "total_loss": 2.0, "loss_cls": 0.5, "lr": 0.1},
        ],
    )
    series = load_metrics(run)
    assert series["total_loss"] == [(0, 3.0), (4, 2.0)]
    assert series["bbox/AP"] == [(0, 10.0)]
    assert "bbox/APl" not in series
    assert select_keys(sorted(series)) == (["total_loss", "loss_cls"], ["bbox/AP"])


def test_plot_two_runs_writes_a_png(tmp_path: Path) -> None:
    runs = [_training_run(tmp_path / "a", 1.0), _training_run(tmp_path / "b", 2.0)]
    output = plot_runs(runs, tmp_path / "out" / "curves.png", window=3)
    assert output == tmp_path / "out" / "curves.png"
    image = matplotlib.image.imread(output)
    assert image.shape[0] == 500 and image.shape[1] == 1400  # two 7 x 5 in panels at 100 dpi


def test_plot_only_losses_draws_one_panel(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", [{"iteration": i, "total_loss": 1.0} for i in range(3)])
    image = matplotlib.image.imread(plot_runs([run], tmp_path / "c.png"))
    assert image.shape[1] == 700


def test_missing_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl in run directory"):
        plot_runs([tmp_path / "empty_run"], tmp_path / "c.png")


def test_no_plottable_keys(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", [{"iteration": 0, "lr": 0.1}])
    with pytest.raises(ValueError, match=r"nothing to plot.*their metrics are \['lr'\]"):
        plot_runs([run], tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"no keys \['segm/AP'\]"):
        plot_runs([run], tmp_path / "c.png", keys=["segm/AP"])


def test_bad_line_names_file_and_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 0, "total_loss": 1}\n{"total_loss": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        load_metrics(run)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _training_run(tmp_path / "a", 1.0)
    output = tmp_path / "curves.png"
    assert plot_metrics_main([str(run), "--output", str(output), "--window", "2"]) == 0
    assert output.is_file()
    assert plot_metrics_main([str(tmp_path / "nothing"), "--output", str(output)]) == 1
    assert capsys.readouterr().err.startswith("detframe plot: error: no metrics.jsonl")
