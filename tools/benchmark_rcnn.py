"""Times detframe's Mask R-CNN R50-FPN against torchvision's, with the same weights, in one run.

Both models are torchvision's `maskrcnn_resnet50_fpn` v1 (FrozenBatchNorm with eps 0,
RoIAlign aligned=False, 91 classes) with one set of random weights, which detframe loads
through its converter (`configs/torchvision/maskrcnn_resnet50_fpn.yaml`). The random weights
are rescaled to give a trained model's workload and value ranges: frozen-BN statistics are
random; RPN objectness logits stay within +-10 and box deltas are small, so NMS keeps the
full 1000 proposals; class scores give 100 detections (the cap) above the 0.05 threshold,
so the mask head and the pasting have a busy COCO image's work; mask logits are a few units.

Workloads, float32, on the CPU (torch's default number of threads, or --threads):

- inference: one 480 x 640 RGB image in 0..1, resized to 800 x 1066 (torchvision's
  bilinear resize; detframe's timed call includes the same resize), detections with masks
  pasted at 480 x 640;
- training step: a batch of two such images with 6 boxes and masks each, forward, backward
  and an SGD step; sampling is made deterministic (torch.randperm -> arange in both) so
  that both see the same RoIs.

Each row is the median of --repeat timed runs after one warm-up, detframe and torchvision
alternating run by run. The script also prints how far apart the outputs are, and where the
time goes in each model (forward stages; the training step's backward and update together).

    python tools/benchmark_rcnn.py [--repeat 5] [--train-repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from benchmark_common import (
    compare_detections,
    measure,
    print_stages,
    print_table,
    resize_like_torchvision,
    sgd,
)
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from detframe.engine.setup import load_config
from detframe.modeling import build_model, convert_torchvision_detection
from detframe.structures import BitMasks, Boxes, Instances
from detframe.utils.profiling import StageTimes

CONFIG = Path(__file__).resolve().parents[1] / "configs/torchvision/maskrcnn_resnet50_fpn.yaml"
IMAGE_H, IMAGE_W, MIN_SIZE, MAX_SIZE = 480, 640, 800, 1333
BOXES_PER_IMAGE = 6
TARGETS = {"inference": 0.85, "training step": 0.9}
# torchvision's normalisation of 0..1 RGB input.
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_models(seed: int) -> tuple[nn.Module, nn.Module]:
    """torchvision's Mask R-CNN R50-FPN v1 with random weights, and detframe's with the same."""
    torch.manual_seed(seed)
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
    tv_model = MaskRCNN(backbone, num_classes=91)
    overwrite_eps(tv_model, 0.0)
    with torch.no_grad():
        for module in tv_model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        tv_model.rpn.head.cls_logits.weight.mul_(0.1)
        tv_model.rpn.head.bbox_pred.weight.mul_(0.005)
        tv_model.roi_heads.box_predictor.cls_score.weight.mul_(0.05)
        tv_model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.01)
        # Where the features are all 0 (ReLU), the logit is the bias: not exactly 0, which
        # would make probabilities tie with the 0.5 threshold.
        tv_model.roi_heads.mask_predictor.mask_fcn_logits.bias.uniform_(-2.0, 2.0)
    overrides = [f"MODEL.PIXEL_MEAN={MEAN}", f"MODEL.PIXEL_STD={STD}", "MODEL.DEVICE=cpu"]
    df_model = build_model(load_config(CONFIG, overrides))
    df_model.load_state_dict(convert_torchvision_detection(tv_model.state_dict()))
    return tv_model, df_model


def make_sample(g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An image [3, H, W] in 0..1, boxes [B, 4], torchvision labels [B] (1..90), masks [B, H, W]."""
    image = F.interpolate(torch.rand(1, 3, IMAGE_H // 8, IMAGE_W // 8, generator=g), scale_factor=8)
    image = (image[0] + 0.1 * torch.rand(3, IMAGE_H, IMAGE_W, generator=g)).clamp(0, 1)
    xy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * torch.tensor([IMAGE_W - 160, IMAGE_H - 160])
    wh = 40 + torch.rand(BOXES_PER_IMAGE, 2, generator=g) * 120
    boxes = torch.cat([xy, xy + wh], dim=1)
    labels = torch.randint(1, 91, (BOXES_PER_IMAGE,), generator=g)
    masks = torch.zeros(BOXES_PER_IMAGE, IMAGE_H, IMAGE_W, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist(), strict=True):
        mask[y0:y1, x0:x1] = 1
    return image, boxes, labels, masks


def detframe_training_input(image: Tensor, boxes: Tensor, labels: Tensor, masks: Tensor) -> dict:
    """What detframe's data pipeline would give for a sample, resized like torchvision."""
    resized = resize_like_torchvision(image, MIN_SIZE, MAX_SIZE)
    size = tuple(resized.shape[-2:])
    resized_masks = F.interpolate(masks[:, None].float(), size=size)[:, 0].byte()
    ratio = torch.tensor([size[1] / IMAGE_W, size[0] / IMAGE_H] * 2)
    instances = Instances(
        size,
        gt_boxes=Boxes(boxes * ratio),
        gt_classes=labels - 1,
        gt_masks=BitMasks(resized_masks.bool()),
    )
    return {"image": resized, "height": IMAGE_H, "width": IMAGE_W, "instances": instances}


def instrument(tv_model: nn.Module, df_model: nn.Module) -> tuple[StageTimes, StageTimes]:
    tv_times, df_times = StageTimes(), StageTimes()
    tv_times.hook_module(tv_model.transform, "preprocess")
    tv_times.wrap_method(tv_model.transform, "postprocess", "postprocess")
    df_times.wrap_method(df_model, "preprocess_image", "preprocess")
    df_times.wrap_method(df_model, "postprocess", "postprocess")
    for times, model, rpn in (
        (tv_times, tv_model, "rpn"),
        (df_times, df_model, "proposal_generator"),
    ):
        times.hook_module(model.backbone, "backbone")
        times.hook_module(getattr(model, rpn), "proposals (RPN)")
        times.hook_module(model.roi_heads, "ROI heads")
    return tv_times, df_times


@contextmanager
def deterministic_sampling() -> Iterator[None]:
    """torch.randperm -> arange, so both models sample the same anchors and RoIs."""
    randperm = torch.randperm
    torch.randperm = lambda n, **kw: torch.arange(n, device=kw.get("device"))
    try:
        yield
    finally:
        torch.randperm = randperm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed inference runs (default 5)")
    parser.add_argument("--train-repeat", type=int, default=3, help="timed training steps")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, cpu")

    tv_model, df_model = build_models(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    samples = [make_sample(g) for _ in range(2)]
    image = samples[0][0]

    # Inference.
    tv_model.eval()
    df_model.eval()
    outputs: dict[str, Any] = {}

    def tv_infer() -> None:
        with torch.no_grad():
            outputs["torchvision"] = tv_model([image])[0]

    def df_infer() -> None:
        with torch.no_grad():
            resized = resize_like_torchvision(image, MIN_SIZE, MAX_SIZE)
            x = {"image": resized, "height": IMAGE_H, "width": IMAGE_W}
            outputs["detframe"] = df_model([x])[0]["instances"]

    tv_times, df_times = instrument(tv_model, df_model)
    infer = measure(
        {"detframe": df_infer, "torchvision": tv_infer}, args.repeat, [tv_times, df_times]
    )
    infer_runs = args.repeat
    infer_stats = {k: (statistics.median(v), sum(v) / len(v)) for k, v in infer.items()}
    detection_check = compare_detections(outputs["torchvision"], outputs["detframe"])
    print_stages("detframe inference", df_times, infer_stats["detframe"][1], infer_runs)
    print_stages("torchvision inference", tv_times, infer_stats["torchvision"][1], infer_runs)

    # Training step.
    tv_model.train()
    df_model.train()
    # lr 0 keeps the weights, and so the losses, the same from step to step; the update is
    # computed all the same.
    tv_opt = sgd([p for p in tv_model.parameters() if p.requires_grad])
    df_opt = sgd([p for p in df_model.parameters() if p.requires_grad])
    tv_inputs = (
        [s[0] for s in samples],
        [{"boxes": b, "labels": lb, "masks": m} for _, b, lb, m in samples],
    )
    losses: dict[str, dict[str, float]] = {}

    def step(
        name: str, model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[], dict]
    ) -> None:
        opt.zero_grad(set_to_none=True)
        loss_dict = loss_fn()
        sum(loss_dict.values()).backward()
        opt.step()
        losses[name] = {k: v.item() for k, v in loss_dict.items()}

    def tv_train() -> None:
        step("torchvision", tv_model, tv_opt, lambda: tv_model(*tv_inputs))

    def df_train() -> None:
        step(
            "detframe",
            df_model,
            df_opt,
            lambda: df_model([detframe_training_input(*s) for s in samples]),
        )

    with deterministic_sampling():
        train = measure(
            {"detframe": df_train, "torchvision": tv_train},
            args.train_repeat,
            [tv_times, df_times],
        )
    train_stats = {k: statistics.median(v) for k, v in train.items()}
    train_runs = args.train_repeat
    for name, times in (("detframe", df_times), ("torchvision", tv_times)):
        mean = sum(train[name]) / len(train[name])
        print_stages(
            f"{name} training step; other = losses, backward, update", times, mean, train_runs
        )

    print("\nResults:")
    print_table(
        [
            (
                "inference, 1 image 480x640 -> 800x1066",
                infer_stats["detframe"][0],
                infer_stats["torchvision"][0],
                TARGETS["inference"],
            ),
            (
                "training step, 2 images 480x640 -> 800x1066",
                train_stats["detframe"],
                train_stats["torchvision"],
                TARGETS["training step"],
            ),
        ]
    )
    print(f"\ninference outputs: {detection_check}")
    names = {
        "loss_rpn_cls": "loss_objectness",
        "loss_rpn_loc": "loss_rpn_box_reg",
        "loss_cls": "loss_classifier",
        "loss_box_reg": "loss_box_reg",
        "loss_mask": "loss_mask",
    }
    diffs = {k: abs(losses["detframe"][k] - losses["torchvision"][v]) for k, v in names.items()}
    print(
        "training losses, |detframe - torchvision|: "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    )


if __name__ == "__main__":
    main()
