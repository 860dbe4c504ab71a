"""Spatial transformer warps between an attention window and a canvas, for z_where = (s, x, y).

Convention (docs/conventions.md): `s` is the window side as a fraction of the canvas side, `(x, y)` the window
centre in normalised canvas coordinates in [-1, 1] (align_corners=False), x right, y down. A window point
`v` in [-1, 1]^2 sits at canvas point `s * v + (x, y)`; conversely a canvas point `u` sits at window point
`(u - (x, y)) / s`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "window_to_canvas_theta",
    "canvas_to_window_theta",
    "window_to_canvas",
    "canvas_to_window",
    "z_where_to_boxes",
    "boxes_to_z_where",
]

MIN_SCALE = 1e-3  # guards 1 / s; no window of a useful model is smaller than a thousandth of the canvas


# (s, x, y) @ _READ_BASIS = [s, 0, x, 0, s, y]: the read transform in one matmul (it is on the inference hot path)
_READ_BASIS = torch.tensor([[1.0, 0, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]])


def canvas_to_window_theta(z_where: torch.Tensor) -> torch.Tensor:
    """Affine map taking window coordinates to canvas coordinates (used to *read* a window from a canvas).

    Args:
        z_where: FloatTensor (N, 3) of (s, x, y).
    Returns:
        FloatTensor (N, 2, 3) `theta` such that canvas = theta @ [v, 1] for a window point v:
        [[s, 0, x], [0, s, y]].
    """
    basis = _READ_BASIS.to(device=z_where.device, dtype=z_where.dtype)
    return (z_where @ basis).view(-1, 2, 3)


def window_to_canvas_theta(z_where: torch.Tensor) -> torch.Tensor:
    """Affine map taking canvas coordinates to window coordinates (used to *write* a window onto a canvas).

    Args:
        z_where: FloatTensor (N, 3) of (s, x, y), s > 0.
    Returns:
        FloatTensor (N, 2, 3): [[1/s, 0, -x/s], [0, 1/s, -y/s]].
    """
    s, x, y = z_where.unbind(-1)
    inv = 1.0 / s.clamp(min=MIN_SCALE)
    zero = torch.zeros_like(s)
    return torch.stack([inv, zero, -x * inv, zero, inv, -y * inv], dim=-1).view(-1, 2, 3)


def window_to_canvas(windows: torch.Tensor, z_where: torch.Tensor, canvas_size: tuple[int, int]) -> torch.Tensor:
    """Place each window onto an empty canvas (bilinear, zeros outside the window).

    Args:
        windows: FloatTensor (N, h, w) of window contents.
        z_where: FloatTensor (N, 3) of (s, x, y).
        canvas_size: (H, W) of the output.
    Returns:
        FloatTensor (N, H, W).
    """
    N = windows.shape[0]
    H, W = canvas_size
    grid = F.affine_grid(window_to_canvas_theta(z_where), [N, 1, H, W], align_corners=False)  # (N, H, W, 2)
    out = F.grid_sample(windows.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1)


def canvas_to_window(canvas: torch.Tensor, z_where: torch.Tensor, window_size: tuple[int, int]) -> torch.Tensor:
    """Read the window described by z_where out of each canvas (bilinear, zeros outside the canvas).

    Args:
        canvas: FloatTensor (N, H, W).
        z_where: FloatTensor (N, 3) of (s, x, y).
        window_size: (h, w) of the output.
    Returns:
        FloatTensor (N, h, w).
    """
    N = canvas.shape[0]
    h, w = window_size
    grid = F.affine_grid(canvas_to_window_theta(z_where), [N, 1, h, w], align_corners=False)  # (N, h, w, 2)
    out = F.grid_sample(canvas.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1)


def z_where_to_boxes(z_where: torch.Tensor, canvas_size: tuple[int, int]) -> torch.Tensor:
    """Window extents in canvas pixels.

    Args:
        z_where: FloatTensor (..., 3) of (s, x, y).
        canvas_size: (H, W).
    Returns:
        FloatTensor (..., 4) of x0, y0, x1, y1 in pixels (pixel edges: the canvas spans [0, W] x [0, H]).
    """
    H, W = canvas_size
    s, x, y = z_where.unbind(-1)
    return torch.stack([(x - s + 1) * W / 2, (y - s + 1) * H / 2, (x + s + 1) * W / 2, (y + s + 1) * H / 2], dim=-1)


def boxes_to_z_where(boxes: torch.Tensor, canvas_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `z_where_to_boxes` for square-in-normalised-units boxes (the width sets s).

    Args:
        boxes: FloatTensor (..., 4) of x0, y0, x1, y1 in pixels.
        canvas_size: (H, W).
    Returns:
        FloatTensor (..., 3) of (s, x, y).
    """
    H, W = canvas_size
    x0, y0, x1, y1 = boxes.unbind(-1)
    s = (x1 - x0) / W
    x = (x0 + x1) / W - 1
    y = (y0 + y1) / H - 1
    return torch.stack([s, x, y], dim=-1)
