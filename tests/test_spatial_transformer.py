"""The spatial transformer against a slow per-pixel reference, round trips, and gradcheck."""

import math

import torch

from renderers.spatial_transformer import (
    boxes_to_z_where,
    canvas_to_window,
    window_to_canvas,
    z_where_to_boxes,
)
from tests.conftest import assert_close


def bilinear_reference(image: torch.Tensor, u: float, v: float) -> float:
    """Sample image (H, W) at normalised coordinates (u, v) (align_corners=False), zeros outside: slow and plain."""
    H, W = image.shape
    px, py = ((u + 1) * W - 1) / 2, ((v + 1) * H - 1) / 2  # continuous pixel-centre coordinates
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < W and 0 <= yi < H:
                total += weight * image[yi, xi].item()
    return total


def test_window_to_canvas_matches_reference():
    window = torch.rand(1, 6, 6, dtype=torch.float64)
    z_where = torch.tensor([[0.5, 0.2, -0.3]], dtype=torch.float64)
    H = W = 12
    out = window_to_canvas(window, z_where, (H, W))[0]
    s, x, y = z_where[0].tolist()
    for i in range(H):
        for j in range(W):
            u, v = (2 * j + 1) / W - 1, (2 * i + 1) / H - 1  # canvas pixel centre
            expected = bilinear_reference(window[0], (u - x) / s, (v - y) / s)
            assert abs(out[i, j].item() - expected) < 1e-10, (i, j)


def test_canvas_to_window_matches_reference():
    canvas = torch.rand(1, 10, 10, dtype=torch.float64)
    z_where = torch.tensor([[0.4, -0.1, 0.25]], dtype=torch.float64)
    h = w = 5
    out = canvas_to_window(canvas, z_where, (h, w))[0]
    s, x, y = z_where[0].tolist()
    for i in range(h):
        for j in range(w):
            a, b = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
            assert abs(out[i, j].item() - bilinear_reference(canvas[0], s * a + x, s * b + y)) < 1e-10


def test_round_trip_window_canvas_window():
    # An 8x8 window written at native resolution (s * 32 = 8) with centres on the canvas's pixel grid
    # (x, y in multiples of 1/16, offset by 1/4) is a pure translation, so reading it back is exact.
    window = torch.rand(3, 8, 8, dtype=torch.float64)
    z_where = torch.tensor([[0.25, 0.25, -0.25], [0.25, 0.625, -0.5 - 0.125], [0.25, -0.25, 0.125]])
    z_where = z_where.double()
    canvas = window_to_canvas(window, z_where, (32, 32))
    assert_close(canvas.sum((1, 2)), window.sum((1, 2)), atol=1e-9)  # nothing lost or smeared
    back = canvas_to_window(canvas, z_where, (8, 8))
    assert_close(back, window, atol=1e-9)


def test_boxes_round_trip_and_pixels():
    z_where = torch.tensor([[0.4, 0.1, -0.2], [1.0, 0.0, 0.0]])
    boxes = z_where_to_boxes(z_where, (50, 50))
    assert_close(boxes[1], torch.tensor([0.0, 0.0, 50.0, 50.0]))  # the whole canvas
    assert_close(boxes[0, 2] - boxes[0, 0], torch.tensor(20.0), atol=1e-5)  # side = s * W
    assert_close(boxes_to_z_where(boxes, (50, 50)), z_where, atol=1e-6)


def test_box_encloses_placed_glyph():
    # A window full of ones lands exactly inside its box.
    z_where = torch.tensor([[0.4, 0.2, -0.2]])
    canvas = window_to_canvas(torch.ones(1, 20, 20), z_where, (50, 50))[0]
    x0, y0, x1, y1 = z_where_to_boxes(z_where, (50, 50))[0].tolist()
    ys, xs = torch.nonzero(canvas > 0.5, as_tuple=True)
    assert xs.min() >= math.floor(x0) and xs.max() < math.ceil(x1)
    assert ys.min() >= math.floor(y0) and ys.max() < math.ceil(y1)


def test_gradcheck_both_warps():
    window = torch.rand(2, 5, 5, dtype=torch.float64, requires_grad=True)
    canvas = torch.rand(2, 9, 9, dtype=torch.float64, requires_grad=True)
    # Keep sample points off pixel centres' kinks: bilinear interpolation is only piecewise smooth.
    z_where = torch.tensor([[0.53, 0.071, -0.113], [0.61, -0.137, 0.097]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, z: window_to_canvas(w, z, (9, 9)), (window, z_where))
    assert torch.autograd.gradcheck(lambda c, z: canvas_to_window(c, z, (5, 5)), (canvas, z_where))
