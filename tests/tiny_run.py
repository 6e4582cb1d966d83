"""The quickstart config made small enough for tests: with the `tiny_shapes` fixture
(conftest.py) a training step takes a fraction of a second."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart" / "mask_rcnn_R_18_FPN_shapes.yaml"


def tiny_model_overrides(output_dir: Path | str) -> list[str]:
    """The quickstart model made small (32 FPN channels, 64-pixel images, 2 images per step)
    and quick to run, writing to `output_dir`."""
    return [
        f"OUTPUT_DIR={output_dir}",
        "MODEL.FPN.OUT_CHANNELS=32",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN=200",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN=50",
        "MODEL.RPN.PRE_NMS_TOPK_TEST=100",
        "MODEL.RPN.POST_NMS_TOPK_TEST=50",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=32",
        "MODEL.ROI_BOX_HEAD.FC_DIM=64",
        "MODEL.ROI_MASK_HEAD.CONV_DIM=16",
        "INPUT.MIN_SIZE_TRAIN=[64]",
        "INPUT.MAX_SIZE_TRAIN=64",
        "INPUT.MIN_SIZE_TEST=64",
        "INPUT.MAX_SIZE_TEST=64",
        "SOLVER.IMS_PER_BATCH=2",
        "SOLVER.BASE_LR=0.001",
        "SOLVER.WARMUP_ITERS=2",
        "SOLVER.STEPS=[4]",
        "LOG_PERIOD=1",
        "TEST.EVAL_PERIOD=0",
        "SEED=7",
    ]
