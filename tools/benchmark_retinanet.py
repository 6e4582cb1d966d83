"""Times detframe's RetinaNet R50-FPN against torchvision's, with the same weights, in one run.

Both models are torchvision's `retinanet_resnet50_fpn` v1 (FrozenBatchNorm with eps 0, P6 and
P7 from P5, 9 anchors per cell, 91 labels) with one set of random weights, which detframe
loads through its converter (`configs/torchvision/retinanet_resnet50_fpn.yaml`; torchvision's
label l is detframe's class l - 1). The random weights are rescaled to give a trained model's
workload and value ranges: frozen-BN statistics are random; on the benchmark image, the box
deltas have a standard deviation of 0.1 and the class logits of 2 (over every anchor and
class), and the class bias is set so that just over 300 detections (torchvision's cap) score
above 0.05 after NMS, as on a busy COCO image; the logits of torchvision's label 0
(background, never a positive, dropped by the converter) are -100.

Workloads, float32, on the CPU (torch's default number of threads, or --threads):

- inference: one 480 x 640 RGB image in 0..1, resized to 800 x 1066 (torchvision's
  bilinear resize; detframe's timed call includes the same resize), 300 detections
  rescaled to 480 x 640;
- training step: a batch of two such images with 4 boxes each, forward, backward and an SGD
  step (RetinaNet samples nothing: both see the same anchors).

Each row is the median of --repeat timed runs after one warm-up, detframe and torchvision
alternating run by run. The script also prints how far apart the outputs are, and where the
time goes in each model. The stages are the same in both: preprocessing (torchvision's
transform: normalise, resize, batch; detframe's `preprocess_image`: normalise, pad), backbone
(ResNet and FPN), head (the two subnets; torchvision's also flattens its outputs),
anchor_generator, losses (anchor matching, focal and box losses: torchvision's `compute_loss`,
detframe's `label_anchors` and `losses`), decoding + NMS (torchvision's
`postprocess_detections`, detframe's `decode_detections`) and post-processing (boxes rescaled to the
image). "other" is the rest: detframe's resize and flattening, torchvision's split of the
outputs by level, and in a training step the backward pass and the update.

    python tools/benchmark_retinanet.py [--repeat 5] [--train-repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

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
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from detframe.engine.benchmark import POSTPROCESSING, PREPROCESSING
from detframe.engine.benchmark import instrument as instrument_meta_arch
from detframe.engine.setup import load_config
from detframe.modeling import build_model, convert_torchvision_detection
from detframe.structures import Boxes, Instances
from detframe.utils.profiling import StageTimes

CONFIG = Path(__file__).resolve().parents[1] / "configs/torchvision/retinanet_resnet50_fpn.yaml"
IMAGE_H, IMAGE_W, MIN_SIZE, MAX_SIZE = 480, 640, 800, 1333
BOXES_PER_IMAGE = 4
LABELS = 91  # torchvision's, background (0) included
DETECTIONS = 300  # torchvision's detections_per_img, the config's DETECTIONS_PER_IMAGE
TARGETS = {"inference": 0.7, "training step": 0.8}
# torchvision's normalisation of 0..1 RGB input.
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# The head's value ranges (`calibrate_head`): standard deviations of the foreground class
# logits and of the box deltas; the steps of the search for the class bias, and the margin
# added to it so that a score a rounding error from the threshold cannot change the count.
LOGIT_STD, DELTA_STD = 2.0, 0.1
BIAS_STEPS, BIAS_MARGIN = 24, 0.1
LOSSES, DECODING = "losses (matching included)", "decoding + NMS"


def torchvision_model(seed: int) -> TVRetinaNet:
    """torchvision's RetinaNet R50-FPN v1 with random weights: frozen-BN statistics random,
    the class logits' bias 0 and label 0's logits -100 (`calibrate_head` then scales the last
    layers)."""
    torch.manual_seed(seed)
    backbone = _resnet_fpn_extractor(
        resnet50(norm_layer=FrozenBatchNorm2d),
        3,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    model = TVRetinaNet(backbone, num_classes=LABELS, min_size=MIN_SIZE, max_size=MAX_SIZE)
    overwrite_eps(model, 0.0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        head = model.head.classification_head
        head.cls_logits.bias.zero_()
        head.cls_logits.weight.view(head.num_anchors, LABELS, -1)[:, 0] = 0.0
        head.cls_logits.bias.view(head.num_anchors, LABELS)[:, 0] = -100.0
    return model


def calibrate_head(tv_model: TVRetinaNet, image: Tensor) -> float:
    """Rescales the last layers of the head to a trained model's value ranges on `image`
    [3, H, W]; returns the bias it gives the foreground class logits.

    The foreground logits and the box deltas are linear in the weights of the last convs
    (`cls_logits`, whose bias is 0 here, and `bbox_reg`, whose bias is 0 as initialised), so
    one run of the model gives them for any scale and bias. The weights are scaled so that the
    standard deviation, over every anchor of every level, of the foreground logits (every
    class) is LOGIT_STD and that of the deltas DELTA_STD; the bias is the lowest (to
    2**-BIAS_STEPS of the interval searched) at which torchvision's `postprocess_detections`
    returns DETECTIONS detections, plus BIAS_MARGIN.

    Raises:
        RuntimeError: even with every logit above the score threshold, the image has fewer
            than DETECTIONS detections.
    """
    tv_model.eval()
    postprocess = tv_model.postprocess_detections
    spy = mock.patch.object(tv_model, "postprocess_detections", wraps=postprocess)
    with torch.no_grad(), spy as recorded:
        tv_model([image])
    head_outputs, anchors, image_sizes = recorded.call_args.args
    # Per level: logits [1, R_l, LABELS] (label 0 first), deltas [1, R_l, 4].
    foreground = torch.cat([x[..., 1:].flatten() for x in head_outputs["cls_logits"]])
    logit_scale = LOGIT_STD / foreground.std().item()
    delta_scale = DELTA_STD / torch.cat(head_outputs["bbox_regression"], dim=1).std().item()
    deltas = [x * delta_scale for x in head_outputs["bbox_regression"]]

    def detections(bias: float) -> int:
        logits = [
            torch.cat([x[..., :1], x[..., 1:] * logit_scale + bias], dim=-1)
            for x in head_outputs["cls_logits"]
        ]
        outputs = {"cls_logits": logits, "bbox_regression": deltas}
        return len(postprocess(outputs, anchors, image_sizes)[0]["scores"])

    threshold = math.log(tv_model.score_thresh / (1 - tv_model.score_thresh))
    # No logit above the threshold at `low`; every one above it at `high`.
    low = threshold - foreground.max().item() * logit_scale
    high = threshold - foreground.min().item() * logit_scale + 1.0
    if (count := detections(high)) < DETECTIONS:
        raise RuntimeError(
            f"with every logit above the score threshold the image has {count} detections, "
            f"fewer than {DETECTIONS}"
        )
    for _ in range(BIAS_STEPS):
        middle = (low + high) / 2
        if detections(middle) >= DETECTIONS:
            high = middle
        else:
            low = middle
    bias = high + BIAS_MARGIN
    with torch.no_grad():
        head = tv_model.head.classification_head
        head.cls_logits.weight.mul_(logit_scale)  # label 0's weights stay 0
        head.cls_logits.bias.view(head.num_anchors, LABELS)[:, 1:] = bias
        tv_model.head.regression_head.bbox_reg.weight.mul_(delta_scale)
    return bias


def detframe_model(tv_model: TVRetinaNet) -> nn.Module:
    """detframe's RetinaNet from the torchvision config, with `tv_model`'s weights."""
    overrides = [f"MODEL.PIXEL_MEAN={MEAN}", f"MODEL.PIXEL_STD={STD}", "MODEL.DEVICE=cpu"]
    model = build_model(load_config(CONFIG, overrides))
    model.load_state_dict(convert_torchvision_detection(tv_model.state_dict()))
    return model


def make_sample(g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """An image [3, H, W] in 0..1, boxes [B, 4], torchvision labels [B] (1..90)."""
    image = F.interpolate(torch.rand(1, 3, IMAGE_H // 8, IMAGE_W // 8, generator=g), scale_factor=8)
    image = (image[0] + 0.1 * torch.rand(3, IMAGE_H, IMAGE_W, generator=g)).clamp(0, 1)
    xy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * torch.tensor([IMAGE_W - 160, IMAGE_H - 160])
    wh = 40 + torch.rand(BOXES_PER_IMAGE, 2, generator=g) * 120
    boxes = torch.cat([xy, xy + wh], dim=1)
    labels = torch.randint(1, LABELS, (BOXES_PER_IMAGE,), generator=g)
    return image, boxes, labels


def detframe_training_input(image: Tensor, boxes: Tensor, labels: Tensor) -> dict[str, Any]:
    """What detframe's data pipeline would give for a sample, resized like torchvision."""
    resized = resize_like_torchvision(image, MIN_SIZE, MAX_SIZE)
    size = tuple(resized.shape[-2:])
    ratio = torch.tensor([size[1] / IMAGE_W, size[0] / IMAGE_H] * 2)
    instances = Instances(size, gt_boxes=Boxes(boxes * ratio), gt_classes=labels - 1)
    return {"image": resized, "height": IMAGE_H, "width": IMAGE_W, "instances": instances}


def instrument(tv_model: TVRetinaNet, df_model: nn.Module) -> tuple[StageTimes, StageTimes]:
    """Times the same stages in both models (module docstring), under detframe's names."""
    df_times = instrument_meta_arch(df_model)  # preprocessing, children, post-processing
    df_times.wrap_method(df_model, "label_anchors", LOSSES)
    df_times.wrap_method(df_model, "losses", LOSSES)
    df_times.wrap_method(df_model, "decode_detections", DECODING)
    tv_times = StageTimes()
    tv_times.hook_module(tv_model.transform, PREPROCESSING)
    for name in ("backbone", "head", "anchor_generator"):
        tv_times.hook_module(getattr(tv_model, name), name)
    tv_times.wrap_method(tv_model, "compute_loss", LOSSES)
    tv_times.wrap_method(tv_model, "postprocess_detections", DECODING)
    tv_times.wrap_method(tv_model.transform, "postprocess", POSTPROCESSING)
    return tv_times, df_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed inference runs (default 5)")
    parser.add_argument("--train-repeat", type=int, default=3, help="timed training steps")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows through a pipe
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, cpu")

    g = torch.Generator().manual_seed(args.seed)
    samples = [make_sample(g) for _ in range(2)]
    image = samples[0][0]
    tv_model = torchvision_model(args.seed)
    bias = calibrate_head(tv_model, image)
    df_model = detframe_model(tv_model)
    print(f"class-logit bias {bias:.3f}: just over {DETECTIONS} detections pass 0.05")

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
    infer_stats = {k: (statistics.median(v), sum(v) / len(v)) for k, v in infer.items()}
    detection_check = compare_detections(outputs["torchvision"], outputs["detframe"])
    print_stages("detframe inference", df_times, infer_stats["detframe"][1], args.repeat)
    print_stages("torchvision inference", tv_times, infer_stats["torchvision"][1], args.repeat)

    # Training step.
    tv_model.train()
    df_model.train()
    # lr 0 keeps the weights, and so the losses, the same from step to step; the update is
    # computed all the same.
    tv_opt = sgd([p for p in tv_model.parameters() if p.requires_grad])
    df_opt = sgd([p for p in df_model.parameters() if p.requires_grad])
    tv_inputs = ([s[0] for s in samples], [{"boxes": b, "labels": lb} for _, b, lb in samples])
    losses: dict[str, dict[str, float]] = {}

    def step(name: str, opt: torch.optim.Optimizer, loss_fn: Callable[[], dict]) -> None:
        opt.zero_grad(set_to_none=True)
        loss_dict = loss_fn()
        sum(loss_dict.values()).backward()
        opt.step()
        losses[name] = {k: v.item() for k, v in loss_dict.items()}

    def tv_train() -> None:
        step("torchvision", tv_opt, lambda: tv_model(*tv_inputs))

    def df_train() -> None:
        step("detframe", df_opt, lambda: df_model([detframe_training_input(*s) for s in samples]))

    train = measure(
        {"detframe": df_train, "torchvision": tv_train}, args.train_repeat, [tv_times, df_times]
    )
    train_stats = {k: statistics.median(v) for k, v in train.items()}
    for name, times in (("detframe", df_times), ("torchvision", tv_times)):
        mean = sum(train[name]) / len(train[name])
        print_stages(
            f"{name} training step; other = backward, update", times, mean, args.train_repeat
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
    names = {"loss_cls": "classification", "loss_box_reg": "bbox_regression"}
    diffs = {k: abs(losses["detframe"][k] - losses["torchvision"][v]) for k, v in names.items()}
    print(
        "training losses, |detframe - torchvision|: "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    )


if __name__ == "__main__":
    main()
