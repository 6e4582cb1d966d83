"""The R-CNN line side by side: R-CNN, Fast R-CNN, Faster R-CNN (VGG16, R50-C4, R50-FPN)
and Mask R-CNN, as one table for docs/models.md.

Two kinds of columns, from two kinds of models:

- cost, of the full-width COCO models (configs/COCO-*/...yaml, random weights, 80 classes)
  on one image of --size x 4/3 --size pixels on this CPU: parameters, inference FLOPs
  (fvcore, `detframe.engine.benchmark.count_flops`) and the median inference time of
  --repeat runs after a warm-up. The models that read precomputed proposals get --proposals
  boxes (random, the count selective search gives a COCO image), and their time adds the
  median time of selective search itself (fast mode) on the same image, which they need
  first. R-CNN runs its whole VGG16 once per proposal: it is timed and counted on a few
  region counts (--rcnn-regions) and both figures are extended linearly to --proposals
  (its cost is a fixed part plus the same cost per region), and the table says so.
- box AP, of the narrow shapes recipes (configs/shapes-large/*.yaml) after the same
  training budget, read from their output folders (metrics.jsonl: the last evaluation;
  log.txt: the wall time from the first to the last line). A recipe not yet trained shows
  "not run"; train one with `detframe train configs/shapes-large/NAME.yaml`.

Run from the repository root:

    python tools/rcnn_line_table.py [--size 600] [--repeat 3] [--proposals 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from detframe.data.shapes import ShapesConfig, render_image
from detframe.engine.benchmark import benchmark_inference, count_flops, count_parameters
from detframe.engine.setup import load_config
from detframe.modeling import build_model
from detframe.modeling.proposal_generator import SelectiveSearch
from detframe.structures import Boxes, Instances

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One model of the line: its full-width config, its shapes recipe and its history."""

    name: str
    coco_config: str
    shapes_config: str | None
    uses_selective_search: bool = False
    per_region: bool = False  # R-CNN: the backbone runs once per proposal


ROWS = (
    Row(
        "R-CNN, VGG16 (2014)",
        "COCO-Detection/rcnn_vgg16.yaml",
        "shapes-large/rcnn_vgg16_shapes.yaml",
        uses_selective_search=True,
        per_region=True,
    ),
    Row(
        "Fast R-CNN, VGG16 (2015)",
        "COCO-Detection/fast_rcnn_vgg16.yaml",
        "shapes-large/fast_rcnn_vgg16_shapes.yaml",
        uses_selective_search=True,
    ),
    Row(
        "Faster R-CNN, VGG16 (2015)",
        "COCO-Detection/faster_rcnn_vgg16.yaml",
        "shapes-large/faster_rcnn_vgg16_shapes.yaml",
    ),
    Row(
        "Faster R-CNN, R50-C4",
        "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml",
        "shapes-large/faster_rcnn_R_18_C4_shapes.yaml",
    ),
    Row(
        "Faster R-CNN, R50-FPN",
        "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
        "shapes-large/faster_rcnn_R_18_FPN_shapes.yaml",
    ),
    Row("Mask R-CNN, R50-FPN (2017)", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", None),
)


def test_image(size: int) -> np.ndarray:
    """A [size, 4/3 size, 3] BGR uint8 shapes image with several objects."""
    config = ShapesConfig(
        num_images=1,
        image_size=(size, size * 4 // 3),
        min_instances=6,
        max_instances=10,
        min_size=size / 16,
        max_size=size / 2,
        classes=("circle", "square", "triangle", "pentagon", "hexagon", "star"),
        seed=7,
    )
    return render_image(config, 0).image


def random_proposals(height: int, width: int, count: int) -> Instances:
    """`count` random boxes of 16 pixels to the whole image, ranked as given."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(count, 2, generator=g) * torch.tensor([width - 16.0, height - 16.0])
    wh = 16 + torch.rand(count, 2, generator=g) * torch.tensor([width, height])
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([width, height]))], dim=1)
    return Instances(
        (height, width),
        proposal_boxes=Boxes(boxes),
        objectness_logits=-torch.arange(count, dtype=torch.float32),
    )


def selective_search_seconds(image: np.ndarray, repeat: int) -> tuple[float, int]:
    """Median seconds of selective search (fast mode) on `image`, and its box count."""
    method = SelectiveSearch(mode="fast", topk=100_000)
    method(image)  # warm-up
    seconds, count = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        boxes, _ = method(image)
        seconds.append(time.perf_counter() - start)
        count = len(boxes)
    return statistics.median(seconds), count


def measure(row: Row, image: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    """Parameters (millions), GFLOPs and median seconds of the row's full-width model on
    `image` (extended linearly to --proposals regions for R-CNN)."""
    height, width = image.shape[:2]

    def model_and_input(regions: int) -> tuple[torch.nn.Module, dict]:
        overrides = ["MODEL.DEVICE=cpu", "MODEL.WEIGHTS=''", "INPUT.FORMAT=BGR"]
        if row.uses_selective_search:
            overrides.append(f"MODEL.PRECOMPUTED_PROPOSALS.TOPK_TEST={regions}")
        cfg = load_config(ROOT / "configs" / row.coco_config, overrides)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        x = {"image": torch.from_numpy(image.transpose(2, 0, 1).copy())}
        x.update(height=height, width=width)
        if row.uses_selective_search:
            x["proposals"] = random_proposals(height, width, regions)
        return model, x

    def cost(regions: int) -> tuple[float, float, float]:
        model, x = model_and_input(regions)
        params = count_parameters(model)[0] / 1e6
        gflops = count_flops(model, [x]).gflops
        report = benchmark_inference(model, [x], warmup=1, repeat=args.repeat)
        return params, gflops, report.median_seconds

    if not row.per_region:
        params, gflops, seconds = cost(args.proposals)
        return {"params": params, "gflops": gflops, "seconds": seconds, "extended": 0.0}
    (few, many) = args.rcnn_regions
    params, gflops_few, seconds_few = cost(few)
    _, gflops_many, seconds_many = cost(many)

    def extend(at_few: float, at_many: float) -> float:
        per_region = (at_many - at_few) / (many - few)
        return at_few + per_region * (args.proposals - few)

    return {
        "params": params,
        "gflops": extend(gflops_few, gflops_many),
        "seconds": extend(seconds_few, seconds_many),
        "extended": 1.0,
    }


def shapes_result(config: str | None) -> tuple[str, str]:
    """(box AP, training wall time) of a trained shapes recipe, or why there are none."""
    if config is None:
        return "-", "-"
    cfg = load_config(ROOT / "configs" / config, [])
    folder = ROOT / cfg.OUTPUT_DIR
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        return "not run", "-"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evaluations = [r for r in rows if "bbox/AP" in r]
    if not evaluations:
        return "not evaluated", "-"
    last = evaluations[-1]
    ap = f"{last['bbox/AP']:.2f} (iter {last['iteration'] + 1})"
    lines = (folder / "log.txt").read_text().splitlines()
    stamps = [datetime.strptime(line[1:15], "%m/%d %H:%M:%S") for line in (lines[0], lines[-1])]
    minutes, seconds = divmod(int((stamps[1] - stamps[0]).total_seconds()), 60)
    return ap, f"{minutes} min {seconds:02d} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=600, help="image height; width 4/3 of it")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per model")
    parser.add_argument("--proposals", type=int, default=2000, help="precomputed proposals")
    parser.add_argument(
        "--rcnn-regions",
        type=int,
        nargs=2,
        default=(16, 48),
        help="region counts R-CNN is measured on, then extended to --proposals",
    )
    parser.add_argument("--rows", nargs="*", type=int, help="row indices to run (default all)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    image = test_image(args.size)
    height, width = image.shape[:2]
    ss_seconds, ss_count = selective_search_seconds(image, args.repeat)
    print(
        f"CPU: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
        f"image {height} x {width}; selective search (fast) {ss_seconds:.2f} s, "
        f"{ss_count} boxes; precomputed proposals per image: {args.proposals}"
    )
    rows = [ROWS[i] for i in args.rows] if args.rows else list(ROWS)
    results = []
    for row in rows:
        cost = measure(row, image, args)
        total = cost["seconds"] + (ss_seconds if row.uses_selective_search else 0.0)
        results.append((row, cost, total, *shapes_result(row.shapes_config)))
        print(f"measured {row.name}: {total:.2f} s per image", flush=True)
    reference = next(
        (total for row, _, total, *_ in results if "Faster R-CNN, VGG16" in row.name), None
    )
    print()
    print(
        "| model | params (M) | GFLOPs | s / image (network + selective search) "
        "| x Faster R-CNN VGG16 | shapes box AP | shapes training time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row, cost, total, ap, wall in results:
        network = f"{cost['seconds']:.2f}"
        if row.uses_selective_search:
            network += f" + {ss_seconds:.2f}"
        mark = " *" if cost["extended"] else ""
        ratio = f"{total / reference:.1f}" if reference else "-"
        print(
            f"| {row.name} | {cost['params']:.1f} | {cost['gflops']:.0f}{mark} | "
            f"{total:.2f} ({network}){mark} | {ratio} | {ap} | {wall} |"
        )
    if any(cost["extended"] for _, cost, *_ in results):
        few, many = args.rcnn_regions
        print(f"\n* measured on {few} and {many} regions and extended linearly to {args.proposals}")


if __name__ == "__main__":
    main()
