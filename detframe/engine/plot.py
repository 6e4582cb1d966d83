"""Loss and AP curves of one or several runs, drawn from their metrics.jsonl to a PNG.

Conventions:

- A run is a directory with the `metrics.jsonl` that `JSONWriter` writes: one JSON object per
  line with "iteration" and metric values (null for undefined values, which are skipped).
- Loss keys are the names containing "loss" without a "/" ("total_loss", "loss_cls", ...);
  they are drawn in the left panel, smoothed by a trailing moving median of `window` points.
  AP keys are the names ending in "/AP" ("bbox/AP", "segm/AP"), drawn unsmoothed with markers
  in the right panel. A panel without data is left out.
- One colour per run; within a run, each key has its own line style (total_loss solid). The
  legend names "run: key", the run being the directory's name.
- matplotlib draws with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from detframe.engine.writers import METRICS_FILE_NAME

__all__ = ["load_metrics", "moving_median", "plot_runs", "select_keys"]

_LINE_STYLES = ("-", "--", ":", "-.")


def load_metrics(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run as {name: [(iteration, value), ...]} in file order.

    Null, NaN and non-numeric values are skipped.

    Raises:
        FileNotFoundError: `run_dir/metrics.jsonl` does not exist.
        ValueError: a line is not a JSON object with "iteration" (file and line are named).
    """
    path = Path(run_dir) / METRICS_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE_NAME} in run directory {run_dir}: {path}")
    series: dict[str, list[tuple[int, float]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            iteration = int(record["iteration"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{path}, line {number}: not a JSON object with 'iteration' ({error})"
            ) from error
        for key, value in record.items():
            if key == "iteration" or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                series.setdefault(key, []).append((iteration, float(value)))
    return series


def moving_median(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving median: output i is the median of values[max(0, i - window + 1) : i + 1].

    Raises:
        ValueError: window < 1.
    """
    if window < 1:
        raise ValueError(f"moving median window must be >= 1, got {window}")
    return [statistics.median(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def select_keys(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(loss keys, AP keys) among metric names, see the module docstring; "total_loss" first."""
    losses = sorted(n for n in names if "loss" in n and "/" not in n and n != "total_loss")
    if "total_loss" in names:
        losses.insert(0, "total_loss")
    aps = sorted(n for n in names if n.endswith("/AP"))
    return losses, aps


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    keys: Sequence[str] | None = None,
    *,
    window: int = 20,
) -> Path:
    """Draws the loss and AP curves of the runs to a PNG.

    Args:
        run_dirs: run directories, each with a metrics.jsonl.
        output: the PNG file to write (its directory is created).
        keys: the metrics to draw (names ending in "/AP" go to the AP panel, the others to the
            loss panel); None draws every loss key and AP key (module docstring).
        window: the moving-median window of the loss curves, in logged points (1: raw).

    Returns:
        The path of the PNG.

    Raises:
        FileNotFoundError: a run has no metrics.jsonl.
        ValueError: no run dirs, or no run has any of the keys to draw (the keys found are
            listed).
    """
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    runs = [(Path(d).resolve().name or str(d), load_metrics(d)) for d in run_dirs]
    found = sorted({name for _, series in runs for name in series})
    if keys is None:
        loss_keys, ap_keys = select_keys(found)
    else:
        loss_keys = [k for k in keys if not k.endswith("/AP")]
        ap_keys = [k for k in keys if k.endswith("/AP")]
    loss_keys = [k for k in loss_keys if any(k in series for _, series in runs)]
    ap_keys = [k for k in ap_keys if any(k in series for _, series in runs)]
    if not loss_keys and not ap_keys:
        wanted = "loss or '/AP' keys" if keys is None else f"keys {list(keys)}"
        raise ValueError(
            f"nothing to plot: runs {[os.fspath(d) for d in run_dirs]} have no {wanted}; "
            f"their metrics are {found}"
        )
    panels = [(title, k) for title, k in (("loss", loss_keys), ("AP", ap_keys)) if k]
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (title, panel_keys) in zip(axes[0], panels, strict=True):
        for run_index, (run_name, series) in enumerate(runs):
            colour = colours[run_index % len(colours)]
            for key_index, key in enumerate(panel_keys):
                if key not in series:
                    continue
                iterations = [i for i, _ in series[key]]
                values = [v for _, v in series[key]]
                style = {
                    "color": colour,
                    "label": f"{run_name}: {key}",
                    "linestyle": _LINE_STYLES[key_index % len(_LINE_STYLES)],
                }
                if title == "loss":
                    values = moving_median(values, window)
                    style["linewidth"] = 1.8 if key == "total_loss" else 1.0
                else:
                    style["marker"] = "o"
                axis.plot(iterations, values, **style)
        axis.set_xlabel("iteration")
        if title == "loss":
            axis.set_ylabel(f"loss (moving median of {window})" if window > 1 else "loss")
        else:
            axis.set_ylabel("AP (%)")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
