"""draw_instances on hand-made detections over a random image: mask blending computed by hand,
pixels left alone outside boxes and labels, outlines in the class colour, thresholds, drawing
order, labels kept in the image, and the errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detframe.structures import BitMasks, Boxes, Instances
from detframe.utils.visualizer import class_color, draw_instances

H, W = 100, 120
ALPHA = 0.25  # multiples of 1/4 keep the hand-computed blend exact in floating point
LABEL_HEIGHT = 30  # a generous bound on the height of a label at this image size


def random_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def rect_mask(x1: int, y1: int, x2: int, y2: int) -> torch.Tensor:
    """A bool [H, W] mask of columns x1..x2-1 and rows y1..y2-1."""
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[y1:y2, x1:x2] = True
    return mask


def detections(
    boxes: list[list[float]],
    scores: list[float],
    classes: list[int],
    masks: list[torch.Tensor] | None = None,
) -> Instances:
    fields = {
        "pred_boxes": Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "pred_classes": torch.tensor(classes, dtype=torch.int64),
    }
    if masks is not None:
        fields["pred_masks"] = (
            torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool)
        )
    return Instances((H, W), **fields)


def blend(pixels: np.ndarray, color: tuple[int, int, int], alpha: float = ALPHA) -> np.ndarray:
    """(1 - alpha) * pixels + alpha * color, rounded: the hand computation of a mask fill."""
    out = (1 - alpha) * pixels.astype(np.float64) + alpha * np.array(color, dtype=np.float64)
    return np.round(out).astype(np.uint8)


# One detection of class 1: box columns 30..89, rows 40..79; mask well inside it.
BOX = [30.0, 40.0, 90.0, 80.0]
MASK = (45, 50, 75, 70)


def one_detection(with_mask: bool = True) -> Instances:
    return detections([BOX], [0.9], [1], [rect_mask(*MASK)] if with_mask else None)


def changed(image: np.ndarray, out: np.ndarray) -> np.ndarray:
    return (image != out).any(axis=-1)


def test_palette_is_fixed_and_distinguishable() -> None:
    # Class 0: hue 0, saturation 1, brightness 0.95 -> RGB (242, 0, 0) -> BGR (0, 0, 242).
    assert class_color(0) == (0, 0, 242)
    colors = np.array([class_color(i) for i in range(80)], dtype=np.float64)
    assert colors.min() >= 0 and colors.max() <= 255
    distances = np.linalg.norm(colors[:, None] - colors[None], axis=-1)
    assert distances[~np.eye(80, dtype=bool)].min() > 20


def test_mask_pixels_move_toward_the_class_colour_by_alpha() -> None:
    image = random_image()
    out = draw_instances(image, one_detection(), alpha=ALPHA)
    color = class_color(1)
    # One pixel in the middle of the mask, far from its outline, the box and the label.
    expected = [round(0.75 * int(v) + 0.25 * c) for v, c in zip(image[60, 60], color, strict=True)]
    assert out[60, 60].tolist() == expected
    # The whole interior of the mask (two pixels in from the outline).
    x1, y1, x2, y2 = MASK
    inner = (slice(y1 + 2, y2 - 2), slice(x1 + 2, x2 - 2))
    np.testing.assert_array_equal(out[inner], blend(image[inner], color))
    # Between the mask and the box nothing is filled.
    np.testing.assert_array_equal(out[42:48, 33:87], image[42:48, 33:87])


def test_outlines_in_the_class_colour_and_nothing_outside_box_and_label() -> None:
    image = random_image()
    out = draw_instances(image, one_detection(), alpha=ALPHA)
    color = list(class_color(1))
    # The box's outermost pixels: columns 30 and 89, rows 40 and 79.
    for y, x in [(60, 30), (60, 89), (40, 85), (79, 60)]:
        assert out[y, x].tolist() == color, (y, x)
    # The mask's outline: its first and last rows and columns.
    x1, y1, x2, y2 = MASK
    for y, x in [(y1, 60), (y2 - 1, 60), (60, x1), (60, x2 - 1)]:
        assert out[y, x].tolist() == color, (y, x)
    # Only the box and the label (above the box's top-left corner) may change.
    allowed = np.zeros((H, W), dtype=bool)
    allowed[40:80, 30:90] = True
    allowed[40 - LABEL_HEIGHT : 40, 30:] = True
    diff = changed(image, out)
    assert not diff[~allowed].any()
    assert diff[40 - LABEL_HEIGHT : 40, 30:].any(), "no label drawn above the box"


def test_detections_under_the_threshold_are_not_drawn() -> None:
    image = random_image()
    low_box = [5.0, 85.0, 40.0, 98.0]
    instances = detections(
        [BOX, low_box], [0.9, 0.3], [1, 2], [rect_mask(*MASK), rect_mask(10, 88, 35, 96)]
    )
    out = draw_instances(image, instances, score_threshold=0.5)
    np.testing.assert_array_equal(out, draw_instances(image, instances[:1], score_threshold=0.5))
    assert not changed(image, out)[85:, :40].any()
    out_low = draw_instances(image, instances, score_threshold=0.2)
    assert out_low[90, 5].tolist() == list(class_color(2))  # the low box's left edge
    # A score equal to the threshold is drawn.
    assert changed(image, draw_instances(image, instances, score_threshold=0.3))[85:, :40].any()


def test_best_detection_is_drawn_last() -> None:
    image = random_image()
    # Two masks overlapping at rows 50..69, columns 55..64; listed best first.
    instances = detections(
        [BOX, BOX], [0.9, 0.6], [1, 2], [rect_mask(45, 50, 65, 70), rect_mask(55, 50, 75, 70)]
    )
    out = draw_instances(image, instances, alpha=ALPHA)
    low_then_high = blend(blend(image[60, 60], class_color(2)), class_color(1))
    assert out[60, 60].tolist() == low_then_high.tolist()


def test_without_masks_only_boxes_and_labels_are_drawn() -> None:
    image = random_image()
    out = draw_instances(image, one_detection(with_mask=False), alpha=ALPHA)
    np.testing.assert_array_equal(out[42:78, 32:88], image[42:78, 32:88])
    assert out[60, 30].tolist() == list(class_color(1))
    assert changed(image, out)[40 - LABEL_HEIGHT : 40, 30:].any()


def test_bitmasks_draw_like_a_bool_tensor() -> None:
    image = random_image()
    instances = one_detection()
    as_bitmasks = one_detection()
    as_bitmasks.pred_masks = BitMasks(instances.pred_masks)
    np.testing.assert_array_equal(
        draw_instances(image, as_bitmasks), draw_instances(image, instances)
    )


def test_empty_instances_give_an_equal_copy_and_the_input_is_unchanged() -> None:
    image = random_image()
    original = image.copy()
    out = draw_instances(image, detections([], [], [], []))
    np.testing.assert_array_equal(out, image)
    assert out is not image and not np.shares_memory(out, image)
    draw_instances(image, one_detection())
    np.testing.assert_array_equal(image, original)


def test_labels_use_class_names_or_ids_and_contrasting_text() -> None:
    image = random_image()
    instances = one_detection()
    by_id = draw_instances(image, instances)
    # A list too short for class 1 labels it by its id.
    np.testing.assert_array_equal(draw_instances(image, instances, ["only class 0"]), by_id)
    named = draw_instances(image, instances, ["background", "person"])
    assert not np.array_equal(named, by_id)
    np.testing.assert_array_equal(named[40:], by_id[40:])  # only the label differs
    # Class 1 (BGR (191, 110, 77), luma 109) is dark: white text; class 2 (luma 193) is light:
    # black text.
    band = (slice(40 - LABEL_HEIGHT, 40), slice(30, W))
    label = by_id[band].reshape(-1, 3).tolist()
    assert [255, 255, 255] in label and list(class_color(1)) in label
    light = draw_instances(image, detections([BOX], [0.9], [2]))[band].reshape(-1, 3).tolist()
    assert [0, 0, 0] in light and list(class_color(2)) in light


def test_labels_stay_inside_the_image() -> None:
    image = random_image()
    # A box in the top-right corner: no room above it, and none to its right.
    out = draw_instances(image, detections([[112.0, 0.0, 120.0, 8.0]], [0.9], [1]))
    diff = changed(image, out)
    assert diff[:LABEL_HEIGHT, : W - 10].any(), "the label was not moved left into the image"
    assert list(class_color(1)) in out[:LABEL_HEIGHT, : W - 10].reshape(-1, 3).tolist()
    assert not diff[LABEL_HEIGHT:].any()


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((H, W, 3), dtype=np.float32), "uint8"),
        (np.zeros((H, W), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((H, W, 4), dtype=np.uint8), r"\(100, 120, 4\)"),
        ([[0, 0, 0]], "list"),
    ],
)
def test_bad_images_are_rejected(image: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        draw_instances(image, one_detection())  # type: ignore[arg-type]


def test_masks_of_another_size_are_rejected_naming_both_sizes() -> None:
    instances = one_detection()
    instances.pred_masks = torch.zeros(1, 50, 60, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"50x60.*100x120"):
        draw_instances(random_image(), instances)


def test_missing_fields_are_named() -> None:
    instances = Instances((H, W), pred_boxes=Boxes(torch.tensor([BOX])), pred_classes=[1])
    with pytest.raises(ValueError, match="scores"):
        draw_instances(random_image(), instances)


def test_alpha_outside_zero_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="alpha"):
        draw_instances(random_image(), one_detection(), alpha=1.5)
