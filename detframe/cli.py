"""The `detframe` command: train, evaluate, draw, benchmark, propose, show configs, plot curves.

    detframe train CONFIG [KEY=VALUE ...] [--resume] [--eval-only] [--output-dir DIR]
                   [--num-processes N | --num-gpus N]
    detframe eval CONFIG --weights FILE [KEY=VALUE ...] [--output-dir DIR] [--num-processes N]
    detframe demo CONFIG --weights FILE (--input IMAGE_OR_FOLDER | --dataset NAME)
                  --output DIR [--limit N] [--confidence 0.5] [KEY=VALUE ...]
    detframe benchmark CONFIG [--weights FILE] [--images N] [--train] [KEY=VALUE ...]
    detframe proposals CONFIG --output FILE [--method model|selective_search|NAME]
                       [--weights FILE] [--dataset NAME] [--num-workers N] [--restart]
                       [KEY=VALUE ...]
    detframe config CONFIG [KEY=VALUE ...]
    detframe schema
    detframe plot RUN_DIR [RUN_DIR ...] --output PNG [--keys KEY ...] [--window N]

KEY=VALUE items override config keys (values are YAML) and may stand anywhere after the
command. An error (a missing file, an unknown key or component name, bad data, a failed
process) prints one line, `detframe <command>: error: ...`, and exits with status 1; give
`--traceback` (or set DETFRAME_TRACEBACK=1) to see the traceback too. `python -m detframe`
is the same command.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["format_results", "main"]

logger = logging.getLogger("detframe.cli")

_TABLE_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def format_results(results: Mapping[str, Any]) -> str:
    """The COCO summary of `Trainer.test` results as a markdown table, one row per task (and
    dataset, when there are several): AP, AP50, AP75, APs, APm, APl in percent."""
    rows = []

    def collect(prefix: str, tree: Mapping[str, Any]) -> None:
        for name, value in tree.items():
            if isinstance(value, Mapping) and "AP" in value:
                rows.append((prefix + name, value))
            elif isinstance(value, Mapping):
                collect(f"{prefix}{name} ", value)

    collect("", results)
    lines = [
        "| task | " + " | ".join(_TABLE_METRICS) + " |",
        "|---" * (len(_TABLE_METRICS) + 1) + "|",
    ]
    for name, metrics in rows:
        cells = [
            "-" if not math.isfinite(metrics.get(m, math.nan)) else f"{metrics[m]:.2f}"
            for m in _TABLE_METRICS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "time_per_image" in results:
        lines.append(f"\ninference: {results['time_per_image']:.4f} s per image")
    return "\n".join(lines)


def _load(args: argparse.Namespace, extra: Sequence[str] = ()) -> Any:
    """The config of the command: its file, its KEY=VALUE items, then `extra`."""
    from detframe.engine.setup import load_config

    return load_config(args.config, [*args.overrides, *extra])


def _run(config: str, overrides: Sequence[str], resume: bool, eval_only: bool) -> None:
    """One process of `detframe train` / `eval`: set up, then train or evaluate, and print
    the results table on rank 0."""
    from detframe.engine import Checkpointer, Trainer, default_setup
    from detframe.engine.setup import load_config
    from detframe.utils.comm import is_main_process

    cfg = default_setup(load_config(config, overrides))
    if eval_only:
        # Resuming replaces MODEL.WEIGHTS (which may then be, e.g., an ImageNet file).
        model = Trainer.build_model(cfg, strict_weights=not resume)
        if resume and Checkpointer(model, cfg.OUTPUT_DIR).load_for_resume() is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {cfg.OUTPUT_DIR}")
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=resume)
        results = trainer.train()
    if is_main_process() and results:
        print(format_results(results), flush=True)


def _launch(args: argparse.Namespace, eval_only: bool, extra: Sequence[str] = ()) -> int:
    """Starts `_run` in --num-processes (or --num-gpus) processes, or under torchrun."""
    from detframe.engine import launch

    extra = list(extra)
    if args.output_dir:
        extra.append(f"OUTPUT_DIR={args.output_dir}")
    processes = args.num_processes
    if getattr(args, "num_gpus", 0):
        processes = args.num_gpus
        extra.append("MODEL.DEVICE=cuda")
    cfg = _load(args, extra)  # the config is checked before any process starts
    launch(
        _run,
        (args.config, [*args.overrides, *extra], args.resume, eval_only),
        num_processes=processes,
        device="cuda" if cfg.MODEL.DEVICE.startswith("cuda") else "cpu",
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    return _launch(args, eval_only=args.eval_only)


def _eval(args: argparse.Namespace) -> int:
    args.resume = False
    return _launch(args, eval_only=True, extra=[f"MODEL.WEIGHTS={args.weights}"])


def _class_names(cfg: Any) -> list[str] | None:
    """thing_classes of the first test (else training) dataset, if the config names one."""
    from detframe.data import DATASETS, register_from_config

    register_from_config(cfg)
    names = [*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN]
    return DATASETS.metadata(names[0]).get("thing_classes") if names else None


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detframe.engine import Predictor, Trainer, load_datasets, setup_logging
    from detframe.engine.demo import list_images, run_demo

    setup_logging()
    cfg = _load(args, [f"MODEL.WEIGHTS={args.weights}"])
    if args.dataset:
        from detframe.data import register_from_config

        register_from_config(cfg)
        images = [Path(d["file_name"]) for d in load_datasets([args.dataset])[args.dataset]]
    else:
        images = list_images(args.input)
    if args.limit is not None:
        images = images[: args.limit]
    model = Trainer.build_model(cfg)
    written = run_demo(
        Predictor.from_config(cfg, model),
        images,
        args.output,
        _class_names(cfg),
        score_threshold=args.confidence,
        on_bad=cfg.DATALOADER.ON_BAD_DATA,
    )
    print(f"wrote {len(written)} pictures to {args.output}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    import itertools

    from detframe.data import register_from_config
    from detframe.engine import Trainer, build_optimizer, load_datasets, setup_logging
    from detframe.engine.benchmark import (
        benchmark_inference,
        benchmark_training,
        count_flops,
        count_parameters,
    )

    setup_logging()
    cfg = _load(args, [f"MODEL.WEIGHTS={args.weights}"] if args.weights else [])
    register_from_config(cfg)
    if not cfg.DATASETS.TEST:
        raise ValueError("benchmark needs images: set DATASETS.TEST in the config")
    name = cfg.DATASETS.TEST[0]
    mapper = Trainer.build_mapper(cfg, is_train=False)
    inputs = [mapper(d) for d in load_datasets([name])[name][: args.images]]
    # Without --weights, the config's MODEL.WEIGHTS initialise the model as for training.
    model = Trainer.build_model(cfg, strict_weights=bool(args.weights))
    total, trainable = count_parameters(model)
    size = tuple(inputs[0]["image"].shape[1:])
    millions = f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable"
    print(f"{cfg.MODEL.META_ARCHITECTURE}: {millions}")
    print(f"images: the first {len(inputs)} of {name}, {size} after resizing\n")
    print(benchmark_inference(model, inputs).format(), "\n")
    print(count_flops(model, inputs[: min(len(inputs), 3)]).format())
    if args.train:
        loader = Trainer.build_train_loader(cfg)
        batches = list(itertools.islice(loader, args.train_steps + 1))
        report = benchmark_training(
            model, batches, build_optimizer(cfg, model), warmup=1, repeat=args.train_steps
        )
        print("\n" + report.format())
    return 0


def _proposals(args: argparse.Namespace) -> int:
    from detframe.engine import setup_logging
    from detframe.engine.proposals import MODEL_METHOD, resolve_method, write_proposals

    setup_logging()
    cfg = _load(args, [f"MODEL.WEIGHTS={args.weights}"] if args.weights else [])
    if args.weights and resolve_method(cfg, args.method) != MODEL_METHOD:
        raise ValueError(f"--weights is for --method model; {args.method!r} takes no weights")
    report = write_proposals(
        cfg,
        args.output,
        method=args.method,
        dataset=args.dataset,
        num_workers=args.num_workers,
        restart=args.restart,
    )
    print(report.format())
    return 0


def _config(args: argparse.Namespace) -> int:
    from detframe.config import format_config

    print(format_config(_load(args)), end="")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from detframe.engine.setup import schema_markdown

    print(schema_markdown(), end="")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from detframe.engine.plot import plot_runs

    print(plot_runs(args.run_dirs, args.output, args.keys, window=args.window))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detframe", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, run: Callable[[argparse.Namespace], int], help: str, config: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help, description=help, parents=[common], allow_abbrev=False
        )
        sub.set_defaults(run=run)
        if config:
            sub.add_argument("config", help="YAML config file")
            sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
        return sub

    def processes(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--output-dir", help="OUTPUT_DIR of the run")
        sub.add_argument(
            "--num-processes",
            type=int,
            default=1,
            help="processes on this machine (gloo on the CPU)",
        )

    train = command("train", _train, "train a detector (and evaluate it)")
    train.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR"
    )
    train.add_argument(
        "--eval-only",
        action="store_true",
        help="only evaluate MODEL.WEIGHTS (or, with --resume, the last checkpoint)",
    )
    processes(train)
    train.add_argument("--num-gpus", type=int, default=0, help="one process per GPU (NCCL)")

    evaluate = command("eval", _eval, "evaluate weights on DATASETS.TEST")
    evaluate.add_argument("--weights", required=True, help="checkpoint file or URL")
    processes(evaluate)

    demo = command("demo", _demo, "draw detections on images and write PNGs")
    demo.add_argument("--weights", required=True, help="checkpoint file or URL")
    source = demo.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="an image file or a folder of images")
    source.add_argument("--dataset", help="a registered dataset whose images to draw on")
    demo.add_argument("--output", required=True, help="folder for the pictures")
    demo.add_argument("--limit", type=int, help="draw on the first N images only")
    demo.add_argument("--confidence", type=float, default=0.5, help="lowest score drawn")

    bench = command("benchmark", _benchmark, "time inference per stage, count parameters and FLOPs")
    bench.add_argument("--weights", help="checkpoint file or URL (default: MODEL.WEIGHTS)")
    bench.add_argument("--images", type=int, default=10, help="test images timed (default 10)")
    bench.add_argument("--train", action="store_true", help="also time training steps")
    bench.add_argument("--train-steps", type=int, default=5, help="timed training steps")

    proposals = command(
        "proposals",
        _proposals,
        "write proposals for every image of a dataset (resumable) and print their recall",
    )
    proposals.add_argument(
        "--output", required=True, help="the proposals file to write: .pkl, .npz or .pt"
    )
    proposals.add_argument(
        "--method",
        default="model",
        help="'model' (default): the config's proposal generator (also its name, e.g. rpn); "
        "or an offline method, e.g. selective_search (a name in OFFLINE_PROPOSAL_REGISTRY, "
        "case-insensitive, '_' ignored)",
    )
    proposals.add_argument(
        "--weights", help="checkpoint file or URL for --method model (default: MODEL.WEIGHTS)"
    )
    proposals.add_argument("--dataset", help="a registered dataset (default: DATASETS.TEST[0])")
    proposals.add_argument(
        "--num-workers",
        type=int,
        help="worker processes (default: DATALOADER.NUM_WORKERS, at most the CPU count)",
    )
    proposals.add_argument(
        "--restart",
        action="store_true",
        help="discard any progress saved in OUTPUT.partial/ and start over (without it, the "
        "same arguments continue that progress and other arguments are refused)",
    )

    command("config", _config, "print the effective config")
    command("schema", _schema, "print the declared config keys as a markdown table", config=False)

    plot = command("plot", _plot, "plot loss and AP curves of runs to a PNG", config=False)
    plot.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run folders with metrics.jsonl"
    )
    plot.add_argument("--output", required=True, help="the PNG to write")
    plot.add_argument("--keys", nargs="+", help="metrics to draw (default: losses and */AP)")
    plot.add_argument("--window", type=int, default=20, help="moving-median window of losses")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    stray = [item for item in unknown if "=" not in item or item.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *unknown]
    elif unknown:
        parser.error(f"{args.command} takes no KEY=VALUE overrides: {' '.join(unknown)}")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"detframe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.traceback or os.environ.get("DETFRAME_TRACEBACK") == "1":
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"detframe {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
