"""detector_postprocess and paste_masks_in_image.

The paste is compared with torchvision's per-mask loop
(`torchvision.models.detection.roi_heads.paste_masks_in_image`), whose probabilities are
thresholded the same way (>= threshold): every pixel whose torchvision probability is not
within float rounding of the threshold must agree.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

from detframe.modeling import postprocessing
from detframe.modeling.postprocessing import detector_postprocess, paste_masks_in_image
from detframe.structures import Boxes, Instances

H, W = 60, 80


def boxes_of_all_kinds() -> torch.Tensor:
    """Ordinary boxes, boxes partly outside the image on every side, sub-pixel and
    one-pixel boxes, a box covering the whole image and one larger than it."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * torch.tensor([W - 10.0, H - 10.0])
    wh = 2 + torch.rand(20, 2, generator=g) * 40
    ordinary = torch.cat([xy, xy + wh], dim=1)
    special = torch.tensor(
        [
            [-12.3, 5.2, 20.7, 30.1],  # left outside
            [60.5, -8.0, 95.2, 20.0],  # top and right outside
            [10.0, 45.6, 30.0, 75.3],  # bottom outside
            [-20.0, -20.0, 100.0, 90.0],  # larger than the image
            [0.0, 0.0, 80.0, 60.0],  # the image
            [30.2, 20.7, 30.6, 21.0],  # sub-pixel
            [40.0, 30.0, 41.0, 31.0],  # one pixel
            [5.5, 7.25, 6.5, 8.25],  # one pixel, fractional
            [70.0, 50.0, 70.0, 50.0],  # empty
            [12.9, 40.1, 13.1, 55.9],  # thin
        ]
    )
    return torch.cat([ordinary, special])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_size", [28, 7])
def test_paste_matches_torchvision(dtype, mask_size):
    boxes = boxes_of_all_kinds().to(dtype)
    g = torch.Generator().manual_seed(1)
    # Smooth masks (as a mask head gives) and a few pure-noise ones.
    smooth = torch.rand(len(boxes), 1, 4, 4, generator=g, dtype=dtype)
    masks = torch.nn.functional.interpolate(smooth, size=mask_size, mode="bilinear")[:, 0]
    masks[:5] = torch.rand(5, mask_size, mask_size, generator=g, dtype=dtype)
    expected_probs = tv_paste(masks[:, None], boxes, (H, W))[:, 0]
    for threshold in (0.1, 0.5, 0.77, 1.0):
        pasted = paste_masks_in_image(masks, boxes, (H, W), threshold)
        assert pasted.dtype == torch.bool and pasted.shape == (len(boxes), H, W)
        expected = expected_probs >= threshold
        near_threshold = (expected_probs - threshold).abs() < 1e-5
        assert torch.equal(pasted[~near_threshold], expected[~near_threshold]), threshold
        assert (pasted != expected).sum() <= 5
    assert paste_masks_in_image(masks, boxes, (H, W), 0.5).any(dim=(1, 2)).sum() > 20


def test_paste_chunks_and_empty(monkeypatch):
    """Small chunks (one mask each for large boxes) give the same result as one chunk."""
    g = torch.Generator().manual_seed(2)
    boxes = boxes_of_all_kinds()
    masks = torch.rand(len(boxes), 14, 14, generator=g)
    whole = paste_masks_in_image(masks, boxes, (H, W))
    monkeypatch.setattr(postprocessing, "_PASTE_CHUNK_ELEMENTS", 200)
    assert torch.equal(paste_masks_in_image(masks, boxes, (H, W)), whole)
    empty = paste_masks_in_image(torch.zeros(0, 28, 28), torch.zeros(0, 4), (H, W))
    assert empty.shape == (0, H, W) and empty.dtype == torch.bool


def test_paste_rejects_bad_input():
    masks, boxes = torch.rand(2, 28, 28), torch.rand(2, 4)
    with pytest.raises(ValueError, match="masks"):
        paste_masks_in_image(masks[:, None], boxes, (H, W))
    with pytest.raises(ValueError, match="boxes"):
        paste_masks_in_image(masks, boxes[:1], (H, W))
    with pytest.raises(ValueError, match="threshold"):
        paste_masks_in_image(masks, boxes, (H, W), 0.0)
    with pytest.raises(ValueError, match="image_shape"):
        paste_masks_in_image(masks, boxes, (0, W))


def test_detector_postprocess_rescales_and_pastes():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [190.0, 90.0, 200.0, 100.0], [5, 5, 5, 5]])
    masks = torch.zeros(3, 1, 28, 28)
    masks[0, 0, :, :14] = 1.0  # left half of box 0
    instances = Instances(
        (100, 200),
        pred_boxes=Boxes(boxes),
        scores=torch.tensor([0.9, 0.8, 0.7]),
        pred_classes=torch.tensor([3, 1, 2]),
        pred_masks=masks,
    )
    result = detector_postprocess(instances, 50, 400)
    assert result.image_size == (50, 400)
    # x scaled by 400 / 200 = 2, y by 50 / 100 = 0.5; nothing removed (also the empty box).
    expected = torch.tensor(
        [[20.0, 10.0, 100.0, 20.0], [380.0, 45.0, 400.0, 50.0], [10, 2.5, 10, 2.5]]
    )
    torch.testing.assert_close(result.pred_boxes.tensor, expected)
    assert torch.equal(result.scores, instances.scores)
    assert torch.equal(result.pred_classes, instances.pred_classes)
    assert result.pred_masks.shape == (3, 50, 400) and result.pred_masks.dtype == torch.bool
    # Box 0 expanded by 30 / 28 about its centre: x 17.14..102.86 -> ints 17..102 (86 px),
    # y 9..20; the padded mask (30 columns, 1..14 set) is >= 0.5 from column 20 to 59.
    ys, xs = torch.nonzero(result.pred_masks[0], as_tuple=True)
    assert ys.min() == 9 and ys.max() == 20 and xs.min() == 20 and xs.max() == 59
    assert not result.pred_masks[1:].any()
    # The input is not modified.
    assert torch.equal(instances.pred_boxes.tensor, boxes)


def test_detector_postprocess_clips_and_checks_size():
    instances = Instances((10, 10), pred_boxes=Boxes(torch.tensor([[-1.0, 2.0, 11.0, 12.0]])))
    result = detector_postprocess(instances, 20, 30)
    torch.testing.assert_close(result.pred_boxes.tensor, torch.tensor([[0.0, 4.0, 30.0, 20.0]]))
    assert not result.has("pred_masks")
    with pytest.raises(ValueError, match="output size"):
        detector_postprocess(instances, 0, 30)
