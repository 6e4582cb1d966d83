"""Every plug point from a user's own module: a meta-architecture, a mapper, an evaluator,
ROI heads and a pooler, registered by a module named under IMPORTS (detframe is not edited),
trained and evaluated through `detframe train`."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_run import QUICKSTART, tiny_model_overrides

from detframe import cli

EXTENSION = '''
"""A user's own components, registered from outside detframe."""
import torch
from torch import nn

from detframe.data import DatasetMapper
from detframe.evaluation import COCOEvaluator
from detframe.layers import roi_align
from detframe.modeling import GeneralizedRCNN
from detframe.modeling.poolers import convert_boxes_to_pooler_format
from detframe.modeling.roi_heads import StandardROIHeads
from detframe.registry import (
    EVALUATOR_REGISTRY,
    MAPPER_REGISTRY,
    META_ARCH_REGISTRY,
    POOLER_REGISTRY,
    ROI_HEADS_REGISTRY,
)

CALLS = {"meta_arch": 0, "roi_heads": 0, "pooler": 0, "evaluated_images": 0}


@MAPPER_REGISTRY.register()
class TaggingMapper(DatasetMapper):
    """The standard mapper, and a tag the meta-architecture checks."""

    def __call__(self, dataset_dict, rng=None):
        mapped = super().__call__(dataset_dict, rng)
        if mapped is not None:
            mapped["tag"] = "mapped by TaggingMapper"
        return mapped


@META_ARCH_REGISTRY.register()
class TagCheckingRCNN(GeneralizedRCNN):
    """GeneralizedRCNN that insists on the custom mapper's tag."""

    def run(self, images, batched_inputs, targets):
        CALLS["meta_arch"] += 1
        assert all(x["tag"] == "mapped by TaggingMapper" for x in batched_inputs)
        return super().run(images, batched_inputs, targets)


@POOLER_REGISTRY.register()
class MeanOverLevelsPooler(nn.Module):
    """Pools every box from every level with RoIAlign and averages the levels."""

    def __init__(self, output_size, scales, sampling_ratio, pooler_type, box_scale=1.0,
                 canonical_box_size=224, canonical_level=4):
        super().__init__()
        self.output_size, self.scales, self.sampling_ratio = output_size, scales, sampling_ratio

    def output_channels(self, in_channels):
        assert len(set(in_channels)) == 1
        return in_channels[0]

    def forward(self, features, boxes):
        CALLS["pooler"] += 1
        rois = convert_boxes_to_pooler_format(boxes).to(features[0])
        pooled = [
            roi_align(f, rois, self.output_size, scale, self.sampling_ratio, aligned=True)
            for f, scale in zip(features, self.scales)
        ]
        return torch.stack(pooled).mean(dim=0)


@ROI_HEADS_REGISTRY.register()
class CountingROIHeads(StandardROIHeads):
    """StandardROIHeads that counts its calls."""

    def forward(self, images, features, proposals, targets=None):
        CALLS["roi_heads"] += 1
        return super().forward(images, features, proposals, targets)


@EVALUATOR_REGISTRY.register()
class CountingEvaluator(COCOEvaluator):
    """COCO AP, plus how many images it saw."""

    def reset(self):
        super().reset()
        self.images = 0

    def process(self, inputs, outputs):
        self.images += len(inputs)
        super().process(inputs, outputs)

    def evaluate(self):
        CALLS["evaluated_images"] += self.images
        return {**super().evaluate(), "counting": {"images": float(self.images)}}
'''


@pytest.mark.slow
def test_every_plug_point_from_a_users_module(
    tiny_shapes: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_plugins.py").write_text(textwrap.dedent(EXTENSION))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    overrides = [
        "IMPORTS=[my_plugins]",
        "MODEL.META_ARCHITECTURE=TagCheckingRCNN",
        "DATALOADER.MAPPER=TaggingMapper",
        "DATALOADER.NUM_WORKERS=0",
        "TEST.EVALUATOR=CountingEvaluator",
        "MODEL.ROI_HEADS.NAME=CountingROIHeads",
        "MODEL.ROI_BOX_HEAD.POOLER_NAME=MeanOverLevelsPooler",
        "SOLVER.MAX_ITER=2",
    ]
    config = [str(QUICKSTART), *tiny_shapes, *tiny_model_overrides(run), *overrides]
    assert cli.main(["train", *config]) == 0

    calls = sys.modules["my_plugins"].CALLS
    # 2 training steps, then one forward per validation image (6, one per batch).
    assert calls["meta_arch"] == 2 + 6
    assert calls["roi_heads"] == 2 + 6
    # The box branch pools once per call; the mask branch keeps the standard pooler.
    assert calls["pooler"] == 2 + 6
    assert calls["evaluated_images"] == 6
    results = json.loads((run / "inference" / "tiny_val" / "results.json").read_text())
    assert results["counting"] == {"images": 6.0}
    assert {"bbox", "segm"} <= set(results)
    saved = (run / "config.yaml").read_text()
    assert "TagCheckingRCNN" in saved and "CountingEvaluator" in saved


@pytest.mark.slow
def test_a_proposal_network_trains_and_is_evaluated_by_recall(
    tiny_shapes: list[str], tmp_path: Path
) -> None:
    run = tmp_path / "rpn"
    overrides = [
        "MODEL.META_ARCHITECTURE=ProposalNetwork",
        "TEST.EVALUATOR=ProposalEvaluator",
        # A proposal network has no classes: the class count of the ROI heads is not checked.
        "MODEL.ROI_HEADS.NUM_CLASSES=80",
        "TEST.VALIDATION_LOSS=true",
        "SOLVER.MAX_ITER=2",
    ]
    config = [str(QUICKSTART), *tiny_shapes, *tiny_model_overrides(run), *overrides]
    assert cli.main(["train", *config]) == 0
    results = json.loads((run / "inference" / "tiny_val" / "results.json").read_text())
    recall = results["box_proposals"]
    assert {"AR@10", "AR@100", "AR@1000", "ARs@100"} <= set(recall)
    assert 0.0 <= recall["AR@100"] <= 100.0 and recall["AR@10"] <= recall["AR@100"]
    assert set(results["validation_loss"]) == {"loss_rpn_cls", "loss_rpn_loc"}
