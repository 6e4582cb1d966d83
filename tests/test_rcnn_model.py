"""GeneralizedRCNN end to end on small inputs: configs, custom components, edge cases.

A narrow ResNet-18-FPN Mask R-CNN on 64 x 96 images keeps each step well under a second.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from detframe.engine.setup import load_config
from detframe.modeling import GeneralizedRCNN, build_model
from detframe.structures import BitMasks, Boxes, Instances

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "MODEL.DEVICE=cpu",
    "MODEL.WEIGHTS=''",
    "MODEL.MASK_ON=true",
    "MODEL.RESNETS.DEPTH=18",
    "MODEL.RESNETS.FREEZE_AT=0",
    "MODEL.FPN.OUT_CHANNELS=32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN=200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN=100",
    "MODEL.RPN.PRE_NMS_TOPK_TEST=100",
    "MODEL.RPN.POST_NMS_TOPK_TEST=50",
    "MODEL.ROI_HEADS.NUM_CLASSES=3",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=32",
    "MODEL.ROI_BOX_HEAD.FC_DIM=64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM=16",
    "MODEL.ROI_MASK_HEAD.NUM_CONV=2",
]


def sample(h: int, w: int, boxes: list[list[float]], seed: int) -> dict:
    """An input dict: a uint8 image [3, h, w] and instances with box-shaped masks."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, box_tensor.int().tolist(), strict=True):
        mask[y0:y1, x0:x1] = True
    instances = Instances(
        (h, w),
        gt_boxes=Boxes(box_tensor),
        gt_classes=torch.arange(len(boxes)) % 3,
        gt_masks=BitMasks(masks),
    )
    return {"image": image, "height": h, "width": w, "instances": instances}


def small_model(*overrides: str) -> GeneralizedRCNN:
    torch.manual_seed(0)
    config = ROOT / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_1x.yaml"
    return build_model(load_config(config, [*SMALL, *overrides]))


@pytest.mark.parametrize(
    "config", sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml"))
)
def test_every_shipped_config_builds(config: Path) -> None:
    # Without the weights files the configs name (ImageNet, a trained DeepMask for SharpMask).
    no_files = ["MODEL.WEIGHTS=''", "MODEL.SHARPMASK.DEEPMASK_WEIGHTS=''"]
    cfg = load_config(ROOT / "configs" / config, ["MODEL.DEVICE=cpu", *no_files])
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    if isinstance(model, GeneralizedRCNN):
        assert (model.roi_heads.mask_head is not None) == cfg.MODEL.MASK_ON


def test_training_step_on_empty_images_and_unmatched_proposals() -> None:
    model = small_model()
    model.train()
    batch = [
        sample(64, 96, [], seed=0),  # no ground truth at all
        sample(64, 80, [[1.0, 1.0, 3.0, 3.0]], seed=1),  # a 2 x 2 box: no proposal reaches 0.5
    ]
    losses = model(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_evaluation_mode_gives_detections_and_validation_losses() -> None:
    model = small_model()
    model.eval()
    batch = [sample(64, 96, [[10.0, 10.0, 50.0, 40.0]], seed=2), sample(48, 64, [], seed=3)]
    batch[0]["height"], batch[0]["width"] = 128, 192  # report at twice the size
    with torch.no_grad():
        outputs, losses = model.outputs_and_losses(batch)
        plain = [out["instances"] for out in model.inference(batch)]
    detections = [out["instances"] for out in outputs]
    assert set(losses) >= {"loss_rpn_cls", "loss_cls", "loss_mask"}
    assert [d.image_size for d in detections] == [(128, 192), (48, 64)]
    for d, p in zip(detections, plain, strict=True):
        assert torch.equal(d.pred_boxes.tensor, p.pred_boxes.tensor)
        assert d.pred_masks.dtype == torch.bool and d.pred_masks.shape[1:] == d.image_size
        assert (d.pred_boxes.tensor[:, 2] <= d.image_size[1]).all()


def test_fast_rcnn_on_precomputed_proposals() -> None:
    model = small_model("MODEL.PROPOSAL_GENERATOR.NAME=PrecomputedProposals")
    batch = [sample(64, 96, [[10.0, 10.0, 50.0, 40.0]], seed=7)]
    batch[0]["proposals"] = Instances(
        (64, 96),
        proposal_boxes=Boxes(torch.tensor([[8.0, 12.0, 52.0, 38.0], [60.0, 5.0, 90.0, 60.0]])),
        objectness_logits=torch.tensor([1.0, 0.5]),
    )
    model.train()
    losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"}  # no RPN losses
    model.eval()
    with torch.no_grad():
        (output,) = model.inference(batch)
    detections = output["instances"]
    assert detections.image_size == (64, 96)
    with pytest.raises(ValueError, match="PrecomputedProposals"):
        model.inference([{"image": batch[0]["image"]}])


def test_bad_inputs_say_what_is_wrong() -> None:
    model = small_model()
    model.train()
    with pytest.raises(ValueError, match="training mode needs 'instances' in every input"):
        model([{"image": torch.zeros(3, 32, 32, dtype=torch.uint8)}])
    model.eval()
    with pytest.raises(ValueError, match=r"input 0: image must be \[3, H, W\], got \(32, 32\)"):
        model([{"image": torch.zeros(32, 32)}])
    with pytest.raises(ValueError, match="input 0 has no 'image'"):
        model([{"file_name": "x.jpg"}])
    with pytest.raises(ValueError, match=r"inputs \[1\] have no 'instances'"):
        model([sample(32, 32, [], 0), {"image": torch.zeros(3, 32, 32, dtype=torch.uint8)}])
    with pytest.raises(RuntimeError, match="evaluation mode"):
        model.train()
        model.inference([sample(32, 32, [], 0)])


EXTENSION = '''
"""A user's own components, registered from outside detframe."""
import torch.nn.functional as F
from torch import nn

from detframe.layers import ShapeSpec
from detframe.modeling import Backbone
from detframe.registry import BACKBONE_REGISTRY, ROI_BOX_HEAD_REGISTRY


@BACKBONE_REGISTRY.register()
class TinyConvBackbone(Backbone):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.stem = nn.Conv2d(3, channels, 7, stride=4, padding=3)
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    @classmethod
    def from_config(cls, cfg):
        return {"channels": 16}

    def forward(self, x):
        p2 = F.relu(self.stem(x))
        return {"p2": p2, "p3": F.relu(self.down(p2))}

    def output_shape(self):
        return {"p2": ShapeSpec(self.channels, 4), "p3": ShapeSpec(self.channels, 8)}

    @property
    def size_divisibility(self) -> int:
        return 8


@ROI_BOX_HEAD_REGISTRY.register()
class MeanPoolBoxHead(nn.Module):
    def __init__(self, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, hidden)
        self.output_size = hidden

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {"in_channels": input_shape.channels, "hidden": 24}

    def forward(self, x):
        return F.relu(self.fc(x.mean(dim=(2, 3))))
'''

CONFIG = """
_BASE_: {base}
IMPORTS: [my_detframe_ext]
MODEL:
  BACKBONE:
    NAME: TinyConvBackbone
  ANCHOR_GENERATOR:
    SIZES: [[16], [32]]
  RPN:
    IN_FEATURES: [p2, p3]
  ROI_HEADS:
    IN_FEATURES: [p2, p3]
  ROI_BOX_HEAD:
    NAME: MeanPoolBoxHead
"""


def test_custom_backbone_and_box_head_from_a_users_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_detframe_ext.py").write_text(textwrap.dedent(EXTENSION))
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ROOT / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_1x.yaml"
    config = tmp_path / "custom.yaml"
    config.write_text(CONFIG.format(base=base))
    torch.manual_seed(0)
    model = build_model(load_config(config, SMALL))
    assert type(model.backbone).__name__ == "TinyConvBackbone"
    assert type(model.roi_heads.box_head).__name__ == "MeanPoolBoxHead"

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.roi_heads.box_head.fc.weight.detach().clone()
    losses = model([sample(64, 96, [[8.0, 8.0, 40.0, 48.0]], 4), sample(64, 96, [], 5)])
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(model.roi_heads.box_head.fc.weight, before)
    assert model.backbone.stem.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": sample(64, 96, [], 6)["image"]}])
    detections = output["instances"]
    assert detections.image_size == (64, 96)
    assert detections.pred_masks.shape[1:] == (64, 96)
