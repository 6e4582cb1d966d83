"""Box2BoxTransform against torchvision's BoxCoder (encode_single / decode_single)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from detframe.modeling.box_coder import Box2BoxTransform

WEIGHTS = [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)]


def random_boxes(n: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 200
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 100 + 1
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_get_deltas_matches_torchvision(weights):
    g = torch.Generator().manual_seed(0)
    src, target = random_boxes(50, g), random_boxes(50, g)
    ours = Box2BoxTransform(weights).get_deltas(src, target)
    theirs = BoxCoder(weights).encode_single(target, src)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("k", [1, 3])
def test_apply_deltas_matches_torchvision(weights, k):
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(40, g)
    deltas = torch.randn(40, k * 4, generator=g)
    deltas[0, 2] = 50.0  # huge dw, dh: clamped to log(1000 / 16)
    deltas[1, 3] = 80.0
    ours = Box2BoxTransform(weights).apply_deltas(deltas, boxes)
    theirs = BoxCoder(weights, bbox_xform_clip=math.log(1000.0 / 16)).decode_single(deltas, boxes)
    assert ours.shape == (40, k * 4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert torch.isfinite(ours).all()


def test_clamp_bounds_decoded_size():
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    deltas = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    out = Box2BoxTransform((1.0, 1.0, 1.0, 1.0)).apply_deltas(deltas, boxes)
    # exp(log(1000 / 16)) * 16 = 1000 wide, centred on 8.
    torch.testing.assert_close(out, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]))


@pytest.mark.parametrize("weights", WEIGHTS)
def test_round_trip(weights):
    g = torch.Generator().manual_seed(2)
    src, target = random_boxes(30, g, torch.float64), random_boxes(30, g, torch.float64)
    transform = Box2BoxTransform(weights)
    decoded = transform.apply_deltas(transform.get_deltas(src, target), src)
    torch.testing.assert_close(decoded, target, rtol=0, atol=1e-9)


def test_class_specific_deltas_decode_per_class():
    g = torch.Generator().manual_seed(3)
    boxes = random_boxes(10, g)
    deltas = torch.randn(10, 3 * 4, generator=g)
    transform = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    out = transform.apply_deltas(deltas, boxes)
    for c in range(3):
        single = transform.apply_deltas(deltas[:, 4 * c : 4 * c + 4], boxes)
        torch.testing.assert_close(out[:, 4 * c : 4 * c + 4], single, rtol=0, atol=0)


def test_box_dim_is_the_width_of_a_delta():
    g = torch.Generator().manual_seed(4)
    transform = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    deltas = transform.get_deltas(random_boxes(5, g), random_boxes(5, g))
    assert transform.box_dim == deltas.shape[1] == 4


def test_empty_inputs():
    transform = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    assert transform.get_deltas(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    assert transform.apply_deltas(torch.zeros(0, 8), torch.zeros(0, 4)).shape == (0, 8)


def test_bad_inputs():
    with pytest.raises(ValueError, match="weights"):
        Box2BoxTransform((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="weights"):
        Box2BoxTransform((1.0, 0.0, 1.0, 1.0))
    transform = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="src_boxes"):
        transform.get_deltas(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same shape"):
        transform.get_deltas(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="deltas"):
        transform.apply_deltas(torch.zeros(3, 6), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="deltas"):
        transform.apply_deltas(torch.zeros(2, 4), torch.zeros(3, 4))
