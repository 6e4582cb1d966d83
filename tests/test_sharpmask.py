"""SharpMask: refinement shapes at every stage, the refactored form against the paper's
concatenation form (with Matlab-'symmetric' padding by numpy), the full-image refinement
against the patch model, the frozen DeepMask during a training step, the output format for
ProposalEvaluator, and the configs.

Tiny setups: a stub trunk of four convolutions whose kernel is their stride (16, 8, 4, 2) and
no padding, so a stride-aligned patch's features are exactly the whole image's; windows of 64
pixels (f = 4 features), four stages, 64 x 64 masks. Config-built models use a ResNet-18 with
8 res2 channels and three stages (res4, res3, res2).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detframe.engine.optimizer import build_optimizer
from detframe.engine.setup import load_config
from detframe.evaluation.proposal_evaluation import ProposalEvaluator
from detframe.layers import ShapeSpec
from detframe.modeling import build_model
from detframe.modeling.backbone import Backbone
from detframe.modeling.backbone import resnet as resnet_module
from detframe.modeling.deepmask import (
    DeepMask,
    DeepMaskHead,
    PyramidSettings,
    SharpMask,
    SharpMaskRefinement,
)
from detframe.modeling.deepmask.sharpmask import RefinementStage

WINDOW, F_WIN = 64, 4
NAMES = ("res4", "res3", "res2", "conv1")
STRIDES = (16, 8, 4, 2)
CHANNELS = (5, 4, 3, 3)
ROOT = Path(__file__).resolve().parents[1]


class StubTrunk(Backbone):
    """Per name one convolution of kernel = stride and no padding (and a batch norm, whose
    statistics must not move while SharpMask trains)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(3, c, s, s) for c, s in zip(CHANNELS, STRIDES, strict=True)
        )
        self.norm = nn.BatchNorm2d(CHANNELS[0])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        maps = {name: conv(x) for name, conv in zip(NAMES, self.convs, strict=True)}
        maps["res4"] = self.norm(maps["res4"])
        return maps

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {n: ShapeSpec(c, s) for n, c, s in zip(NAMES, CHANNELS, STRIDES, strict=True)}


def stub_sharpmask(head: nn.Module | None = None, embed_dim: int = 6, **pyramid) -> SharpMask:
    head = head or DeepMaskHead(
        in_channels=CHANNELS[0],
        window=F_WIN,
        shared_channels=4,
        embed_dim=embed_dim,
        mask_size=8,
        score_hidden_dim=8,
        dropout=0.5,
    )
    settings = {"scales": (1.0,), "topk": 200, "mask_threshold": 0.5, **pyramid}
    deepmask = DeepMask(
        backbone=StubTrunk(),
        in_feature="res4",
        head=head,
        window_size=WINDOW,
        score_loss_weight=1 / 32,
        pyramid=PyramidSettings(**settings),
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    )
    refinement = SharpMaskRefinement(
        in_channels=CHANNELS,
        window=F_WIN,
        embed_dim=embed_dim,
        mask_channels=[6, 4, 4, 2],
        skip_channels=[5, 4, 3, 2],
        hidden_channels=[4, 4, 3, 3],
    )
    return SharpMask(deepmask=deepmask, refinement=refinement, in_features=NAMES)


def test_refinement_shapes_at_every_stage_with_the_release_sizes() -> None:
    torch.manual_seed(0)
    refinement = SharpMaskRefinement(
        in_channels=[1024, 512, 256, 64],
        window=10,
        embed_dim=512,
        mask_channels=[32, 16, 8, 4],
        skip_channels=[32, 16, 8, 4],
        hidden_channels=[64, 64, 64, 32],
    )
    assert refinement.output_size == 160
    assert refinement.encode.weight.shape == (32 * 10 * 10, 512)
    # A 192 patch's maps at strides 16, 8, 4, 2; H_i keeps their size.
    maps = [
        torch.randn(2, c, s, s) for c, s in zip([1024, 512, 256, 64], [12, 24, 48, 96], strict=True)
    ]
    horizontal = refinement.horizontal(maps)
    assert [tuple(h.shape) for h in horizontal] == [
        (2, 16, 12, 12),
        (2, 8, 24, 24),
        (2, 4, 48, 48),
        (2, 2, 96, 96),
    ]
    hidden = [
        [m.out_channels for m in s.horizontal if isinstance(m, nn.Conv2d)]
        for s in refinement.stages
    ]
    assert hidden == [[64, 32, 16], [64, 16, 8], [64, 8, 4], [32, 4, 2]]
    crops = [h[..., 1 * 2**i : (1 + 10) * 2**i, 2**i : 11 * 2**i] for i, h in enumerate(horizontal)]
    mask = refinement.encode(torch.randn(2, 512)).view(2, 32, 10, 10)
    shapes = [tuple(mask.shape)]
    for stage, skip in zip(refinement.stages, crops, strict=True):
        mask = stage(skip, mask)
        shapes.append(tuple(mask.shape))
    assert shapes == [
        (2, 32, 10, 10),
        (2, 16, 20, 20),
        (2, 8, 40, 40),
        (2, 4, 80, 80),
        (2, 2, 160, 160),
    ]
    assert refinement(torch.randn(2, 512), crops).shape == (2, 160, 160)


def _symmetric_conv(x: Tensor, conv: nn.Conv2d | tuple[Tensor, Tensor]) -> Tensor:
    """A 3 x 3 convolution after Matlab's padarray(x, [1 1], 'symmetric'), padded by numpy."""
    weight, bias = (conv.weight, conv.bias) if isinstance(conv, nn.Conv2d) else conv
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), "symmetric"))
    return F.conv2d(padded, weight, bias)


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_refactored_form_equals_the_papers_concatenation_form(upsample: str) -> None:
    torch.manual_seed(0)
    stage = RefinementStage(
        in_channels=7,
        hidden_channels=6,
        skip_channels=5,
        mask_channels=4,
        out_channels=3,
        upsample=upsample,
    ).double()
    features = torch.randn(2, 7, 9, 9, dtype=torch.float64)
    mask = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    refactored = stage(stage.horizontal(features), mask)
    with torch.no_grad():
        h1, _, h2, _, h3 = stage.horizontal
        v1, _, v2 = stage.vertical
        # The paper: skip features S (k_s channels) and mask features (k_m channels),
        # concatenated, then one 3 x 3 convolution to k_m^{i+1} and ReLU, then Up2.
        skip = F.relu(_symmetric_conv(F.relu(_symmetric_conv(features, h1)), h2))
        mask_features = F.relu(_symmetric_conv(mask, v1))
        joint = (torch.cat([h3.weight, v2.weight], dim=1), h3.bias + v2.bias)
        merged = F.relu(_symmetric_conv(torch.cat([skip, mask_features], dim=1), joint))
        if upsample == "nearest":
            expected = merged.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        else:  # half-pixel bilinear by hand: output 2j + 1/2 reads input j +- 1/4
            edge = F.pad(merged, (1, 1, 1, 1), mode="replicate")
            rows = torch.stack(
                [
                    0.25 * edge[:, :, :-2] + 0.75 * edge[:, :, 1:-1],
                    0.75 * edge[:, :, 1:-1] + 0.25 * edge[:, :, 2:],
                ],
                dim=3,
            )
            rows = rows.flatten(2, 3)
            expected = torch.stack(
                [
                    0.25 * rows[..., :-2] + 0.75 * rows[..., 1:-1],
                    0.75 * rows[..., 1:-1] + 0.25 * rows[..., 2:],
                ],
                dim=4,
            )
            expected = expected.flatten(3, 4)
    assert refactored.shape == (2, 3, 18, 18)
    assert (refactored - expected).abs().max() < 1e-10


def test_full_image_refinement_equals_the_patch_model_on_the_top_windows() -> None:
    torch.manual_seed(0)
    model = stub_sharpmask().double().eval()
    image = torch.randn(3, 128, 160, dtype=torch.float64)
    with torch.no_grad():
        result = model.propose(image)
        expected = model.deepmask.propose(image)
    # Same windows and scores as DeepMask's (res4 map 12 x 14: 9 x 11 positions).
    assert len(result) == 99
    assert torch.equal(result.windows, expected.windows)
    assert torch.equal(result.objectness_logits, expected.objectness_logits)
    assert result.mask_logits.shape == (99, 64, 64)
    # Window (r, c) starts at pixel 16 r of the level padded by 32; its patch has a margin of
    # 3 features (48 pixels): H_i's three 3 x 3 convs then see inside the window what they
    # see on the whole image. Compare the windows whose patch is inside the padded image.
    padded = F.pad(image, (32, 32, 32, 32))
    rows = ((result.windows[:, 1] + 32) / 16).round().long()
    cols = ((result.windows[:, 0] + 32) / 16).round().long()
    inside = (rows >= 3) & (rows + F_WIN + 3 <= 12) & (cols >= 3) & (cols + F_WIN + 3 <= 14)
    assert int(inside.sum()) == 15
    patches = torch.stack(
        [
            padded[:, 16 * r - 48 : 16 * r + 112, 16 * c - 48 : 16 * c + 112]
            for r, c in zip(rows[inside].tolist(), cols[inside].tolist(), strict=True)
        ]
    )
    with torch.no_grad():
        patch_logits = model.patch_mask_logits(patches)
    assert (patch_logits - result.mask_logits[inside]).abs().max() < 1e-10
    # A patch with a margin of one feature: H_i's borders replicate inside the window.
    r, c = rows[inside][0].item(), cols[inside][0].item()
    narrow = padded[:, 16 * r - 16 : 16 * r + 80, 16 * c - 16 : 16 * c + 80]
    with torch.no_grad():
        narrow_logits = model.patch_mask_logits(narrow[None])[0]
    assert (narrow_logits - patch_logits[0]).abs().max() > 1e-5


def labelled_patches(n_pos: int, n_neg: int, side: int = 96, label: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n_pos + n_neg):
        mask = torch.where(torch.rand(label, label, generator=g) > 0.5, 1.0, -1.0)
        image = torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=g)
        score = torch.tensor(1.0 if i < n_pos else -1.0)
        out.append({"image": image, "patch_score": score, "patch_mask": mask})
    return out


def test_training_step_changes_the_refinement_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = stub_sharpmask().train()
    assert not model.deepmask.training and model.refinement.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "c.yaml").write_text("")
    cfg = load_config(tmp_path / "c.yaml", ["SOLVER.BASE_LR=0.1", "SOLVER.WEIGHT_DECAY=0.01"])
    optimizer = build_optimizer(cfg, model)
    inputs = labelled_patches(3, 1)
    inputs[2]["patch_head"] = "score"  # DeepMask's alternation: trains the score only
    losses = model(inputs)
    assert set(losses) == {"loss_mask"}
    losses["loss_mask"].backward()
    optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        # DeepMask: weights, biases and the batch norm's running statistics unchanged.
        assert changed == key.startswith("refinement."), key
    assert all(p.grad is None for p in model.deepmask.parameters())
    # Only positives that train the mask: a negative's label and that of a positive that
    # trains the score are not read, another positive's is.
    base = model(inputs)["loss_mask"].item()
    for k in (3, 2):
        inputs[k]["patch_mask"] = -inputs[k]["patch_mask"]
        assert model(inputs)["loss_mask"].item() == pytest.approx(base)
    inputs[0]["patch_mask"] = -inputs[0]["patch_mask"]
    assert model(inputs)["loss_mask"].item() != pytest.approx(base)
    with pytest.raises(ValueError, match="patch_score"):
        model([{"image": torch.zeros(3, 96, 96, dtype=torch.uint8)}])


def test_loss_by_hand_and_labels_resampled_to_the_output() -> None:
    model = stub_sharpmask().train()
    inputs = labelled_patches(1, 1, label=64)
    inputs[0]["patch_mask"] = torch.ones(64, 64)
    inputs[0]["patch_mask"][:, :32] = -1.0
    with torch.no_grad():
        logits = model.patch_mask_logits(inputs[0]["image"].float()[None])[0]
    y = inputs[0]["patch_mask"]
    by_hand = torch.log1p(torch.exp(-y * logits)).mean() / 2  # one positive of N = 2
    assert model(inputs)["loss_mask"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    # A 32 x 32 label is the same label at half the resolution: nearest neighbour.
    inputs[0]["patch_mask"] = y[::2, ::2].clone()
    inputs[1]["patch_mask"] = torch.ones(32, 32)
    assert model(inputs)["loss_mask"].item() == pytest.approx(by_hand.item(), rel=1e-5)


class MarkerHead(nn.Module):
    """Scores -10 except +10 at window position `at`; embeddings of zeros (E = 2)."""

    window = F_WIN
    mask_size = 8

    def __init__(self, at: tuple[int, int]) -> None:
        super().__init__()
        self.at = at

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        n, _, h, w = features.shape
        scores = torch.full((n, h - F_WIN + 1, w - F_WIN + 1), -10.0)
        scores[:, self.at[0], self.at[1]] = 10.0
        return torch.zeros((n, 2, *scores.shape[1:])), scores


def test_output_is_accepted_by_proposal_evaluator(tmp_path: Path) -> None:
    model = stub_sharpmask(MarkerHead((3, 4)), embed_dim=2, topk=1).eval()
    # The refined mask is +10 over the whole window.
    with torch.no_grad():
        model.refinement.predictor.weight.zero_()
        model.refinement.predictor.bias.fill_(10.0)
    # Window (3, 4) at scale 1: [16 * 4 - 32, 16 * 3 - 32] + 64 = x 32..96, y 16..80.
    gt = {
        "images": [{"id": 7, "height": 128, "width": 160, "file_name": "a.png"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "area": 4096.0,
                "bbox": [32, 16, 64, 64],
                "segmentation": [[32, 16, 96, 16, 96, 80, 32, 80]],
            }
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    evaluator = ProposalEvaluator(path, tasks=("box_proposals", "segm_proposals"), limits=(1,))
    inputs = [{"image": torch.zeros(3, 128, 160, dtype=torch.uint8), "image_id": 7}]
    with torch.no_grad():
        outputs = model(inputs)
    proposals = outputs[0]["proposals"]
    assert proposals.proposal_masks.tensor.shape == (1, 128, 160)
    assert (proposals.proposal_boxes.tensor[0] - torch.tensor([32.0, 16, 96, 80])).abs().max() <= 1
    evaluator.process(inputs, outputs)
    results = evaluator.evaluate()
    assert results["box_proposals"]["AR@1"] > 90 and results["segm_proposals"]["AR@1"] > 90


TINY = [
    "MODEL.META_ARCHITECTURE=SharpMask",
    'MODEL.WEIGHTS=""',
    "MODEL.DEVICE=cpu",
    "MODEL.BACKBONE.NAME=ResNet",
    "MODEL.RESNETS.DEPTH=18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS=8",
    "MODEL.RESNETS.STEM_OUT_CHANNELS=8",
    "MODEL.RESNETS.OUT_FEATURES=[res2,res3,res4]",
    f"MODEL.DEEPMASK.WINDOW_SIZE={WINDOW}",
    "MODEL.DEEPMASK.SHARED_CHANNELS=4",
    "MODEL.DEEPMASK.EMBED_DIM=8",
    "MODEL.DEEPMASK.MASK_SIZE=8",
    "MODEL.DEEPMASK.SCORE_HIDDEN_DIM=8",
    "MODEL.DEEPMASK.SCALES=[1.0]",
    "MODEL.DEEPMASK.TOPK=5",
    "MODEL.SHARPMASK.IN_FEATURES=[res4,res3,res2]",
    "MODEL.SHARPMASK.MASK_CHANNELS=[8,4,2]",
    "MODEL.SHARPMASK.SKIP_CHANNELS=[8,4,2]",
    "MODEL.SHARPMASK.SKIP_HIDDEN_CHANNELS=[8,8,4]",
    "INPUT.FORMAT=RGB",
]


def test_config_builds_and_loads_the_trained_deepmask(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "c.yaml"
    path.write_text("")
    deepmask = build_model(load_config(path, [*TINY, "MODEL.META_ARCHITECTURE=DeepMask"]))
    torch.save(deepmask.state_dict(), tmp_path / "deepmask.pth")
    weights = f"MODEL.SHARPMASK.DEEPMASK_WEIGHTS={tmp_path / 'deepmask.pth'}"
    model = build_model(load_config(path, [*TINY, weights]))
    assert isinstance(model, SharpMask) and model.refinement.output_size == 4 * 8
    for key, value in deepmask.state_dict().items():
        assert torch.equal(model.deepmask.state_dict()[key], value), key
    assert not any(p.requires_grad for p in model.deepmask.parameters())
    # A batch without positives: a zero loss that still backpropagates into the refinement.
    negatives = model(labelled_patches(0, 2, label=32))
    assert negatives["loss_mask"].item() == 0.0
    negatives["loss_mask"].backward()
    assert model.refinement.encode.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 256, (3, 96, 112), dtype=torch.uint8)}])
    assert 1 <= len(out[0]["proposals"]) <= 5
    assert out[0]["proposals"].proposal_masks.tensor.shape[1:] == (96, 112)
    with pytest.raises(ValueError, match=r"MODEL\.SHARPMASK\.IN_FEATURES \['stem'\]"):
        build_model(load_config(path, [*TINY, "MODEL.SHARPMASK.IN_FEATURES=[res4,res3,stem]"]))
    with pytest.raises(ValueError, match="strides"):
        build_model(load_config(path, [*TINY, "MODEL.SHARPMASK.IN_FEATURES=[res4,res2,res3]"]))


@pytest.mark.skipif(
    "conv1" not in resnet_module._OUTPUTS,
    reason="needs ResNet's stride-2 'conv1' output (requested in issue 12)",
)
def test_release_config_builds_the_released_shapes() -> None:
    cfg = load_config(
        ROOT / "configs/COCO-Segmentation-Proposals/sharpmask_R_50.yaml",
        ['MODEL.WEIGHTS=""', "MODEL.DEVICE=cpu", 'MODEL.SHARPMASK.DEEPMASK_WEIGHTS=""'],
    )
    model = build_model(cfg)
    refinement = model.refinement
    assert refinement.output_size == 160 and model.in_features == list(NAMES)
    convs = [
        [tuple(m.weight.shape[:2]) for m in part if isinstance(m, nn.Conv2d)]
        for stage in refinement.stages
        for part in (stage.horizontal, stage.vertical)
    ]
    assert convs == [
        [(64, 1024), (32, 64), (16, 32)],
        [(32, 32), (16, 32)],
        [(64, 512), (16, 64), (8, 16)],
        [(16, 16), (8, 16)],
        [(64, 256), (8, 64), (4, 8)],
        [(8, 8), (4, 8)],
        [(32, 64), (4, 32), (2, 4)],
        [(4, 4), (2, 4)],
    ]
    assert cfg.INPUT.DEEPMASK.LABEL_SIZE == 160 and cfg.INPUT.DEEPMASK.POSITIVE_FRACTION == 1.0
