"""DeepMask: heads against pure-PyTorch linear layers, patch model against the fully
convolutional one, window geometry at every pyramid scale, the release's decode, the losses by
hand, the output format for ProposalEvaluator, and the proposal-generator wrapper.

Tiny setups: a ResNet-18 with 8 res2 channels, or a stub trunk (one 16 x 16 convolution of
stride 16, no padding: its features of a stride-aligned patch are exactly those of the whole
image, so the patch model and the dense one can be compared end to end); windows of 64 pixels
(f = 4 features), patches of 96, 8 x 8 masks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detframe.engine.setup import load_config
from detframe.evaluation.proposal_evaluation import ProposalEvaluator
from detframe.layers import ShapeSpec
from detframe.modeling import build_model
from detframe.modeling.backbone import Backbone
from detframe.modeling.deepmask import (
    DeepMask,
    DeepMaskHead,
    DeepMaskPaperHead,
    DeepMaskProposals,
    PyramidSettings,
    deepmask_losses,
)
from detframe.modeling.deepmask.inference import release_positions
from detframe.structures import ImageList

STRIDE, WINDOW, F_WIN, MASK = 16, 64, 4, 8
TINY = [
    "MODEL.META_ARCHITECTURE=DeepMask",
    'MODEL.WEIGHTS=""',
    "MODEL.DEVICE=cpu",
    "MODEL.BACKBONE.NAME=ResNet",
    "MODEL.RESNETS.DEPTH=18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS=8",
    "MODEL.RESNETS.STEM_OUT_CHANNELS=8",
    "MODEL.RESNETS.OUT_FEATURES=[res4]",
    "MODEL.RESNETS.FREEZE_AT=0",
    f"MODEL.DEEPMASK.WINDOW_SIZE={WINDOW}",
    "MODEL.DEEPMASK.SHARED_CHANNELS=4",
    "MODEL.DEEPMASK.EMBED_DIM=8",
    f"MODEL.DEEPMASK.MASK_SIZE={MASK}",
    "MODEL.DEEPMASK.SCORE_HIDDEN_DIM=8",
    "MODEL.DEEPMASK.SCALES=[0.5,1.0]",
    "MODEL.DEEPMASK.TOPK=20",
    "INPUT.FORMAT=RGB",
]


def tiny_config(tmp_path: Path, overrides: list[str] = ()):
    path = tmp_path / "deepmask.yaml"
    path.write_text("")
    return load_config(path, [*TINY, *overrides])


class StubTrunk(Backbone):
    """One 16 x 16 convolution of stride 16 without padding: "res4" [N, 5, H/16, W/16]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, STRIDE, STRIDE)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"res4": self.conv(x)}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {"res4": ShapeSpec(channels=5, stride=STRIDE)}


class MarkerHead(nn.Module):
    """Scores -10 except +10 at one window position (`at`, or the last column with
    `last_column`); every mask is +10 on cells [2, 6) x [2, 6) of 8 x 8, -10 elsewhere."""

    window, mask_size = F_WIN, MASK

    def __init__(self, at: tuple[int, int], last_column: bool = False) -> None:
        super().__init__()
        self.at, self.last_column = at, last_column

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        n, _, h, w = features.shape
        scores = torch.full((n, h - F_WIN + 1, w - F_WIN + 1), -10.0)
        col = scores.size(2) - 1 if self.last_column else self.at[1]
        scores[:, self.at[0], col] = 10.0
        return torch.zeros((n, 2, *scores.shape[1:])), scores

    def mask_logits(self, embeddings: Tensor) -> Tensor:
        masks = torch.full((embeddings.size(0), MASK, MASK), -10.0)
        masks[:, 2:6, 2:6] = 10.0
        return masks


def marker_model(scale: float, head: nn.Module, **settings) -> DeepMask:
    pyramid = PyramidSettings(scales=(scale,), topk=1, mask_threshold=0.5, **settings)
    return DeepMask(
        backbone=StubTrunk(),
        in_feature="res4",
        head=head,
        window_size=WINDOW,
        score_loss_weight=1 / 32,
        pyramid=pyramid,
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    ).eval()


@pytest.mark.parametrize("head_class", [DeepMaskHead, DeepMaskPaperHead])
def test_dense_heads_are_the_linear_layers_at_every_window(head_class: type) -> None:
    torch.manual_seed(0)
    head = (
        head_class(
            in_channels=6,
            window=F_WIN,
            shared_channels=5,
            embed_dim=7,
            mask_size=MASK,
            score_hidden_dim=9,
        )
        .double()
        .eval()
    )
    features = torch.randn(1, 6, 7, 9, dtype=torch.float64)
    head.requires_grad_(False)
    embeddings, scores = head(features)
    assert embeddings.shape == (1, 7, 4, 6) and scores.shape == (1, 4, 6)

    def linear(conv: nn.Conv2d, x: Tensor) -> Tensor:  # the paper's linear layer on a vector
        return conv.weight.reshape(conv.out_channels, -1) @ x + conv.bias

    tail = [m for m in head.score if isinstance(m, nn.Conv2d)]
    for r in range(4):
        for c in range(6):
            window = features[0, :, r : r + F_WIN, c : c + F_WIN]
            shared = torch.einsum("oc,chw->ohw", head.shared.weight[:, :, 0, 0], window)
            shared = F.relu(shared + head.shared.bias[:, None, None])
            embedding = linear(head.embed, shared.flatten())
            if head_class is DeepMaskHead:
                hidden = embedding
            else:  # 2 x 2 max pool of stride 2, then a linear layer
                pooled = F.max_pool2d(window[None], 2, 2)[0]
                hidden = F.relu(linear(head.score_embed, pooled.flatten()))
            score = linear(tail[1], F.relu(linear(tail[0], hidden)))
            mask = linear(head.mask_pred, embedding).view(MASK, MASK)
            assert (embeddings[0, :, r, c] - embedding).abs().max() < 1e-10
            assert abs(float(scores[0, r, c]) - float(score[0])) < 1e-10
            assert (head.mask_logits(embeddings[0, :, r, c][None])[0] - mask).abs().max() < 1e-10


def test_patch_model_equals_fully_convolutional_model_on_the_same_windows() -> None:
    torch.manual_seed(0)
    head = DeepMaskHead(
        in_channels=5,
        window=F_WIN,
        shared_channels=4,
        embed_dim=6,
        mask_size=MASK,
        score_hidden_dim=8,
    )
    model = marker_model(1.0, head).double()
    image = torch.randn(3, 40, 56, dtype=torch.float64)
    padded = F.pad(image, (WINDOW // 2,) * 4)  # the pyramid level at scale 1
    embeddings, scores = model.dense_outputs(padded)
    rows, cols = scores.shape
    # The patch of window (r, c): 96 pixels (a map of 6, cropped to the central 4) starting
    # one stride before the window's features; an extra stride of zeros around for r, c = 0.
    outer = F.pad(padded, (STRIDE,) * 4)
    patches = torch.stack(
        [
            outer[:, STRIDE * r : STRIDE * r + 96, STRIDE * c : STRIDE * c + 96]
            for r in range(rows)
            for c in range(cols)
        ]
    )
    patch_embeddings, patch_scores = model.patch_outputs(patches)
    assert (patch_embeddings - embeddings.flatten(1).t()).abs().max() < 1e-10
    assert (patch_scores - scores.flatten()).abs().max() < 1e-10
    dense_masks = head.mask_logits(embeddings.flatten(1).t())
    assert (head.mask_logits(patch_embeddings) - dense_masks).abs().max() < 1e-10


@pytest.mark.parametrize("scale", [0.5, 1.0, 2**0.5])
def test_a_known_mask_comes_back_at_its_window_at_every_scale(scale: float) -> None:
    at = (3, 4)
    model = marker_model(scale, MarkerHead(at))
    image = torch.zeros(3, 200, 260, dtype=torch.uint8)
    out = model([{"image": image, "height": 100, "width": 130}])[0]["proposals"]
    assert out.image_size == (100, 130) and len(out) == 1
    sy, sx = round(200 * scale) / 200, round(260 * scale) / 260
    # Window (r, c) at scale s: [16 c - 32, +64) x [16 r - 32, +64) in the padded-by-32 level;
    # the mask covers its middle half; the output is half the input's size.
    x0, y0 = (16 * at[1] - 32) / sx, (16 * at[0] - 32) / sy
    expected = torch.tensor([x0 + 16 / sx, y0 + 16 / sy, x0 + 48 / sx, y0 + 48 / sy]) / 2
    assert (out.proposal_boxes.tensor[0] - expected).abs().max() <= 1.5
    # The pasted mask is that rectangle, its corners rounded by the bilinear resize.
    x_lo, y_lo, x_hi, y_hi = expected.round().int().tolist()
    rectangle = torch.zeros(100, 130, dtype=torch.bool)
    rectangle[y_lo:y_hi, x_lo:x_hi] = True
    mask = out.proposal_masks.tensor[0]
    iou = (mask & rectangle).sum() / (mask | rectangle).sum()
    assert iou > 0.85
    assert float(out.objectness_logits[0]) == 10.0


def lua_decode(index0: int, width: int) -> tuple[int, int]:
    """InferDeepMask.lua's getTopScores, on the 1-based index of a row-major map: 0-based
    (row, col) it pastes at."""
    temp = index0 + 1
    x, y = math.floor(temp / width), temp % width + 1
    x, y = max(1, x), max(1, y)
    return x - 1, y - 1


def test_release_positions_transcribe_the_lua_decode() -> None:
    for width in (1, 2, 7):
        flat = torch.arange(5 * width)
        rows, cols = release_positions(flat, width)
        expected = [lua_decode(i, width) for i in range(5 * width)]
        assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == expected


@pytest.mark.parametrize("last_column", [False, True])
def test_release_decode_shifts_by_a_stride_and_default_is_centred(last_column: bool) -> None:
    image = [{"image": torch.zeros(3, 128, 160, dtype=torch.uint8)}]
    boxes = {}
    for flag in (False, True):
        model = marker_model(1.0, MarkerHead((3, 4), last_column), release_decode=flag)
        boxes[flag] = model(image)[0]["proposals"].proposal_boxes.tensor[0]
    # Window positions (r, c) at scale 1: the mask's box is [16 c - 16, 16 r - 16, 16 c + 16,
    # 16 r + 16], clipped to the 160 x 128 image; the last column is c = 10.
    if last_column:
        centred, release = [144, 32, 160, 64], [0, 32, 16, 64]  # release: (3, 0)
    else:
        centred, release = [48, 32, 80, 64], [64, 16, 96, 48]  # release: (2, 5)
    assert (boxes[False] - torch.tensor(centred, dtype=torch.float32)).abs().max() <= 1.0
    assert (boxes[True] - torch.tensor(release, dtype=torch.float32)).abs().max() <= 1.0


def test_losses_equal_hand_computation() -> None:
    mask_logits = torch.tensor([[[0.5, 0.5], [0.5, 0.5]], [[-2.0, -2.0], [-2.0, -2.0]]])
    mask_labels = torch.ones(2, 4, 4)
    mask_labels[0, :2] = -1  # half the pixels of patch 0 are background
    score_logits = torch.tensor([1.0, -0.5, 3.0])
    score_labels = torch.tensor([1.0, 1.0, -1.0])
    losses = deepmask_losses(mask_logits, mask_labels, score_logits, score_labels, 0.25)
    # patch 0: 8 pixels log(1 + e^-0.5), 8 pixels log(1 + e^0.5); patch 1: log(1 + e^2)
    patch0 = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))) / 2
    assert float(losses["loss_mask"]) == pytest.approx((patch0 + math.log1p(math.exp(2))) / 3)
    torch_score = F.soft_margin_loss(score_logits, score_labels)
    assert float(losses["loss_score"]) == pytest.approx(0.25 * float(torch_score))


def patches(n_pos: int, n_neg: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n_pos + n_neg):
        mask = torch.where(torch.rand(12, 12, generator=g) > 0.5, 1.0, -1.0)
        score = torch.tensor(1.0 if i < n_pos else -1.0)
        image = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8, generator=g)
        out.append(
            {"image": image, "height": 96, "width": 96, "patch_score": score, "patch_mask": mask}
        )
    return out


def test_training_on_patches_uses_positive_masks_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(tmp_path, ["MODEL.DEEPMASK.DROPOUT=0.0"]))
    inputs = patches(2, 2)
    losses = model(inputs)
    assert set(losses) == {"loss_mask", "loss_score"}
    inputs[3]["patch_mask"] = -inputs[3]["patch_mask"]  # a negative's mask is not read
    assert model(inputs)["loss_mask"].item() == pytest.approx(losses["loss_mask"].item())
    inputs[0]["patch_mask"] = -inputs[0]["patch_mask"]
    assert model(inputs)["loss_mask"].item() != pytest.approx(losses["loss_mask"].item())
    # No positive: a zero mask loss that still backpropagates.
    negatives = model(patches(0, 2))
    assert negatives["loss_mask"].item() == 0.0
    sum(negatives.values()).backward()
    with pytest.raises(ValueError, match="patch_score"):
        model([{"image": torch.zeros(3, 96, 96, dtype=torch.uint8)}])
    with pytest.raises(ValueError, match="WINDOW_SIZE"):
        model([{**p, "image": torch.zeros(3, 80, 80, dtype=torch.uint8)} for p in inputs])


def test_losses_of_patches_that_train_one_head_are_divided_by_the_batch() -> None:
    # A batch of N = 4: the mask term sums the pixel means of the K mask patches, the score
    # term the S score patches' losses, both divided by N (see the module docstring).
    mask_logits = torch.tensor([[[1.0, -1.0], [0.0, 2.0]]])
    mask_labels = torch.tensor([[[1.0, 1.0], [-1.0, 1.0]]])
    score_logits = torch.tensor([0.5, -2.0])
    score_labels = torch.tensor([1.0, -1.0])
    losses = deepmask_losses(
        mask_logits, mask_labels, score_logits, score_labels, 0.25, batch_size=4
    )
    mask = math.log1p(math.exp(-1)) + math.log1p(math.e) + math.log1p(1) + math.log1p(math.exp(-2))
    assert float(losses["loss_mask"]) == pytest.approx(mask / 4 / 4)
    score = math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-2))
    assert float(losses["loss_score"]) == pytest.approx(0.25 * score / 4)
    no_score = deepmask_losses(
        mask_logits, mask_labels, score_logits[:0], score_labels[:0], 0.25, 4
    )
    assert no_score["loss_score"].item() == 0.0


def test_patch_heads_select_the_loss_terms(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(tmp_path, ["MODEL.DEEPMASK.DROPOUT=0.0"]))
    joint = model(patches(2, 2))
    # "both" is the joint loss, exactly
    both = model([{**x, "patch_head": "both"} for x in patches(2, 2)])
    assert all(torch.equal(both[k], joint[k]) for k in joint)
    # a score batch: the score loss of the joint one, no mask loss
    score = model([{**x, "patch_head": "score"} for x in patches(2, 2)])
    assert score["loss_mask"].item() == 0.0
    assert torch.equal(score["loss_score"], joint["loss_score"])
    # a mask batch of the same 4 patches: the 2 positives' masks, divided by 4; no score loss
    mask = model([{**x, "patch_head": "mask"} for x in patches(2, 2)])
    assert mask["loss_score"].item() == 0.0
    torch.testing.assert_close(mask["loss_mask"], joint["loss_mask"], rtol=1e-6, atol=0)
    # mixed: patch 0 trains the mask, patch 1 (positive) and 2 the score, patch 3 both
    inputs = patches(2, 2)
    for x, head in zip(inputs, ["mask", "score", "score", "both"], strict=True):
        x["patch_head"] = head
    mixed = model(inputs)
    embeddings, scores = model.patch_outputs(model.preprocess_image(inputs).tensor)
    mask_logits = model.head.mask_logits(embeddings[:1])
    upsampled = F.interpolate(mask_logits[:, None], size=(12, 12), mode="bilinear")[:, 0]
    expected_mask = F.soft_margin_loss(upsampled, inputs[0]["patch_mask"][None]) / 4
    labels = torch.stack([x["patch_score"] for x in inputs])
    expected_score = F.soft_margin_loss(scores[1:], labels[1:], reduction="sum") / 4 / 32
    torch.testing.assert_close(mixed["loss_mask"], expected_mask)
    torch.testing.assert_close(mixed["loss_score"], expected_score)
    with pytest.raises(ValueError, match=r"'patch_head' must be one of .*got \['masks'\]"):
        model([{**x, "patch_head": "masks"} for x in patches(1, 0)])


def test_a_mask_batch_trains_trunk_and_mask_branch_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(tmp_path, ["MODEL.DEEPMASK.DROPOUT=0.0"]))
    for head, trained, idle in (("mask", "mask_pred", "score."), ("score", "score.", "mask_pred")):
        model.zero_grad(set_to_none=True)
        sum(model([{**x, "patch_head": head} for x in patches(2, 2)]).values()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())  # every parameter in the graph
        assert all(g.abs().sum() == 0 for n, g in grads.items() if idle in n), head
        assert all(g.abs().sum() > 0 for n, g in grads.items() if trained in n), head
        assert grads["backbone.conv1.weight"].abs().sum() > 0


def test_output_is_accepted_by_proposal_evaluator(tmp_path: Path) -> None:
    model = marker_model(1.0, MarkerHead((3, 4)))
    # The marker's mask at scale 1 covers x 48..80, y 32..64 of a 128 x 160 image.
    gt = {
        "images": [{"id": 7, "height": 128, "width": 160, "file_name": "a.png"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "area": 1024.0,
                "bbox": [48, 32, 32, 32],
                "segmentation": [[48, 32, 80, 32, 80, 64, 48, 64]],
            }
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    evaluator = ProposalEvaluator(path, tasks=("box_proposals", "segm_proposals"), limits=(1,))
    inputs = [{"image": torch.zeros(3, 128, 160, dtype=torch.uint8), "image_id": 7}]
    evaluator.process(inputs, model(inputs))
    results = evaluator.evaluate()
    assert results["box_proposals"]["AR@1"] > 80 and results["segm_proposals"]["AR@1"] > 80


def test_proposal_generator_gives_the_deepmask_proposals(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(
        tmp_path, ["MODEL.PIXEL_MEAN=[100.0,110.0,120.0]", "MODEL.PIXEL_STD=[50.0,60.0,70.0]"]
    )
    deepmask = build_model(cfg).eval()
    own = [*TINY, "MODEL.PIXEL_MEAN=[100.0,110.0,120.0]", "MODEL.PIXEL_STD=[50.0,60.0,70.0]"]
    config_path = tmp_path / "own.yaml"
    config_path.write_text(_nested_yaml([item.replace("=", ": ", 1) for item in own]))
    torch.save(deepmask.state_dict(), tmp_path / "deepmask.pth")
    detector = tiny_config(
        tmp_path,
        [
            "MODEL.PROPOSAL_GENERATOR.NAME=DeepMaskProposals",
            f"MODEL.DEEPMASK_PROPOSALS.CONFIG={config_path}",
            f"MODEL.DEEPMASK_PROPOSALS.WEIGHTS={tmp_path / 'deepmask.pth'}",
        ],
    )  # the detector normalises with detframe's default statistics
    generator = DeepMaskProposals(**DeepMaskProposals.from_config(detector, {})).train()
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    mean = torch.tensor(list(detector.MODEL.PIXEL_MEAN)).view(3, 1, 1)
    std = torch.tensor(list(detector.MODEL.PIXEL_STD)).view(3, 1, 1)
    batch = ImageList.from_tensors([(image.float() - mean) / std], 1)
    proposals, losses = generator(batch, {}, None)
    expected = deepmask([{"image": image}])[0]["proposals"]
    assert losses == {} and not generator.deepmask.training
    assert torch.allclose(proposals[0].proposal_boxes.tensor, expected.proposal_boxes.tensor)
    assert torch.allclose(proposals[0].objectness_logits, expected.objectness_logits, atol=1e-5)


def _nested_yaml(lines: list[str]) -> str:
    """'A.B.C: v' lines -> nested YAML."""
    tree: dict = {}
    for line in lines:
        key, value = line.split(": ", 1)
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def render(node: dict, indent: int) -> list[str]:
        out = []
        for k, v in node.items():
            if isinstance(v, dict):
                out += [" " * indent + f"{k}:", *render(v, indent + 2)]
            else:
                out.append(" " * indent + f"{k}: {v}")
        return out

    return "\n".join(render(tree, 0)) + "\n"


def test_release_config_builds_the_released_shapes() -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(
        root / "configs/COCO-Segmentation-Proposals/deepmask_R_50.yaml",
        ['MODEL.WEIGHTS=""', "MODEL.DEVICE=cpu"],
    )
    model = build_model(cfg)
    assert isinstance(model.head, DeepMaskHead) and model.head.window == 10
    assert model.head.embed.weight.shape == (512, 128, 10, 10)
    assert model.head.mask_pred.weight.shape == (56 * 56, 512, 1, 1)
    assert [m.out_channels for m in model.head.score if isinstance(m, nn.Conv2d)] == [1024, 1]
    assert (
        pytest.approx([2**e for e in (-2.5, -2, -1.5, -1, -0.5, 0, 0.5)])
        == cfg.MODEL.DEEPMASK.SCALES
    )
