"""Gradients of a black-box (forward-only) renderer by finite differences, as the AIR paper did for its 3D
scenes (Eslami et al. 2016: the renderer is a black box differentiated by finite differences).

`BlackBoxFunction` is the generic `torch.autograd.Function`: any function of a (B, P) parameter tensor whose
output is (B, ...) gets a backward pass that renders every perturbed input in one batch and returns either
- central differences, 2 P renders per input:
      dL/dp = <dL/dout, f(p + h_p e_p) - f(p - h_p e_p)> / (2 h_p), or
- SPSA (Spall 1992), 2 S renders per input whatever P is, D uniform on {-1, +1}^P:
      dL/dp ~ mean over S draws of <dL/dout, f(p + h D) - f(p - h D)> / (2 h_p D_p).
`FiniteDifferenceRenderer` applies it to the tabletop call shape with steps that move an object by about one
pixel, so that a hard (piecewise-constant) image has a useful difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from renderers.mesh import Appearance, Camera, RenderOutput, image_width_height

__all__ = ["FiniteDifferenceSettings", "BlackBoxFunction", "finite_difference", "FiniteDifferenceRenderer"]

BlackBox = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (params (M, P), rows (M,)) -> (M, ...)


@dataclass(frozen=True)
class FiniteDifferenceSettings:
    """How to differentiate a black box. Defaults move a tabletop object about one pixel at 64 x 64."""

    position_step: float = 0.011  # metres; the tabletop camera sees about 11 mm per pixel at 64 px
    yaw_step: float = 0.2  # radians; moves a point 0.055 m from the axis (an object's rim) about one pixel
    method: str = "central"  # "central" (2 P renders per scene) or "spsa" (2 spsa_samples renders per scene)
    spsa_samples: int = 16  # SPSA: random sign vectors averaged
    seed: int = 0  # SPSA: seed of the sign vectors, so a backward pass is reproducible
    max_batch: int | None = None  # render at most this many perturbed inputs at once (None: all in one batch)

    @classmethod
    def for_image_size(
        cls, image_size: int | tuple[int, int], camera: Camera | None = None, **overrides
    ) -> FiniteDifferenceSettings:
        """Steps of about one pixel for an image of `image_size` (int: square, or (W, H)).

        Without `camera`: the defaults (64 x 64 on the 40-degree tabletop camera) scaled by 64 / H, as a
        vertical field of view fixes the pixel size by the height. With `camera`: one pixel at the point the
        camera looks at, |eye - at| / sqrt(fx fy) metres, and the yaw that moves a point at an object's rim
        (0.055 m from its axis, as the defaults assume) that far. `overrides` set any other field.
        """
        width, height = image_width_height(image_size)
        base = cls()
        if camera is None:
            scale = 64 / height
            position, yaw = base.position_step * scale, base.yaw_step * scale
        else:
            fx, fy, _, _ = camera.pixel_intrinsics(width, height)
            distance = sum((e - a) ** 2 for e, a in zip(camera.eye, camera.at, strict=True)) ** 0.5
            position = distance / (fx * fy) ** 0.5
            yaw = position / 0.055
        return cls(**{"position_step": position, "yaw_step": yaw, **overrides})

    def __post_init__(self) -> None:
        if self.method not in ("central", "spsa"):
            raise ValueError(f"method must be 'central' or 'spsa', got {self.method!r}")


def _render(fn: BlackBox, params: torch.Tensor, rows: torch.Tensor, max_batch: int | None) -> torch.Tensor:
    """fn over (M, P) inputs, in chunks of max_batch rows."""
    if max_batch is None or params.shape[0] <= max_batch:
        return fn(params, rows)
    chunks = [fn(p, r) for p, r in zip(params.split(max_batch), rows.split(max_batch), strict=True)]
    return torch.cat(chunks)


def _directions(
    params: torch.Tensor, active: torch.Tensor, steps: torch.Tensor, cfg: FiniteDifferenceSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturbation rows for the active parameters.

    Returns rows LongTensor (M,) (which input each perturbation belongs to) and deltas (M, P): for central
    differences one row per active (b, p) holding steps[p] e_p; for SPSA spsa_samples rows per input holding
    steps * D with D uniform in {-1, +1}^P on the active entries.
    """
    B, P = params.shape
    if cfg.method == "central":
        rows, cols = active.nonzero(as_tuple=True)  # (M,), (M,)
        deltas = params.new_zeros(rows.shape[0], P)
        deltas[torch.arange(rows.shape[0]), cols] = steps[cols]
        return rows, deltas
    generator = torch.Generator().manual_seed(cfg.seed)
    signs = torch.randint(0, 2, (B, cfg.spsa_samples, P), generator=generator).to(params) * 2 - 1  # (B, S, P)
    deltas = signs * steps * active[:, None, :]  # (B, S, P), zero on inactive entries
    rows = torch.arange(B, device=params.device).repeat_interleave(cfg.spsa_samples)
    return rows, deltas.reshape(B * cfg.spsa_samples, P)


class BlackBoxFunction(torch.autograd.Function):
    """out = fn(params, arange(B)) with a finite-difference backward.

    forward args:
        params: FloatTensor (B, P), the continuous inputs.
        fn: black box mapping params (M, P) and rows LongTensor (M,) (the input each row derives from, e.g.
            to look up its discrete scene content) to a FloatTensor (M, ...); only ever called without grad.
        active: BoolTensor (B, P), entries to differentiate (others get zero gradient and cost no renders).
        steps: FloatTensor (P,), step h_p of each parameter.
        cfg: FiniteDifferenceSettings (method, SPSA samples, chunking).
    """

    @staticmethod
    def forward(ctx, params, fn, active, steps, cfg):
        ctx.fn, ctx.cfg = fn, cfg
        ctx.save_for_backward(params, active, steps)
        with torch.no_grad():
            return fn(params, torch.arange(params.shape[0], device=params.device))

    @staticmethod
    def backward(ctx, grad_out):
        params, active, steps = ctx.saved_tensors
        cfg = ctx.cfg
        rows, deltas = _directions(params, active, steps, cfg)  # (M,), (M, P)
        M = rows.shape[0]
        if M == 0:
            return torch.zeros_like(params), None, None, None, None
        with torch.no_grad():
            inputs = torch.cat([params[rows] + deltas, params[rows] - deltas])  # (2M, P): all in one batch
            out = _render(ctx.fn, inputs, torch.cat([rows, rows]), cfg.max_batch)  # (2M, ...)
            # <dL/dout, f(p + d) - f(p - d)> / 2 per perturbation: the directional derivative times |d|
            slope = ((out[:M] - out[M:]) * grad_out[rows]).flatten(1).sum(1) / 2  # (M,)
        grad = torch.zeros_like(params)
        if cfg.method == "central":
            grad[rows, deltas.abs().argmax(1)] = slope / deltas.abs().amax(1)
        else:
            safe = torch.where(deltas == 0, torch.ones_like(deltas), deltas)
            estimates = (slope[:, None] / safe) * (deltas != 0)  # (M, P): slope / (h_p D_p)
            grad.index_add_(0, rows, estimates / cfg.spsa_samples)
        return grad, None, None, None, None


def finite_difference(
    fn: BlackBox,
    params: torch.Tensor,
    steps: torch.Tensor,
    active: torch.Tensor | None = None,
    settings: FiniteDifferenceSettings | None = None,
) -> torch.Tensor:
    """fn(params) with finite-difference gradients w.r.t. params (see BlackBoxFunction for the arguments;
    `active` defaults to all entries)."""
    active = torch.ones_like(params, dtype=torch.bool) if active is None else active
    cfg = settings or FiniteDifferenceSettings()
    return BlackBoxFunction.apply(params, fn, active, steps.to(params), cfg)


class FiniteDifferenceRenderer(torch.nn.Module):
    """Wraps a forward-only tabletop renderer (call shape of `renderers.mesh.MeshRenderer3D`) so that its
    images are differentiable in object positions and yaws by finite differences. Shape ids and colours are
    held fixed, and so is the per-scene `Appearance` (passed through unchanged to the black box, row by row).
    """

    def __init__(self, renderer: torch.nn.Module, settings: FiniteDifferenceSettings | None = None):
        super().__init__()
        self.renderer = renderer
        self.settings = settings or FiniteDifferenceSettings()

    def forward(
        self,
        shape_ids: torch.Tensor,
        positions: torch.Tensor,
        yaws: torch.Tensor,
        colors: torch.Tensor | None = None,
        appearance: Appearance | None = None,
    ) -> RenderOutput:
        """Same arguments as `MeshRenderer3D.forward`. Params per scene are
        (x_1, y_1, ..., x_N, y_N, yaw_1, ..., yaw_N): P = 3 N; empty slots are not perturbed."""
        B, N = shape_ids.shape
        params = torch.cat([positions.reshape(B, 2 * N), yaws], dim=1)  # (B, 3N)
        present = shape_ids >= 0  # (B, N)
        active = torch.cat([present.repeat_interleave(2, dim=1), present], dim=1)  # (B, 3N)
        cfg = self.settings
        steps = torch.tensor([cfg.position_step] * (2 * N) + [cfg.yaw_step] * N)
        masks: list[torch.Tensor] = []

        def black_box(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            M = p.shape[0]
            row_colors = None if colors is None else colors[rows]
            args = (shape_ids[rows], p[:, : 2 * N].reshape(M, N, 2), p[:, 2 * N :], row_colors)
            # a black box with the older 4-argument call shape still works when no appearance is given
            out = self.renderer(*args) if appearance is None else self.renderer(*args, appearance.take(rows))
            if not masks:  # the forward call's mask; backward calls render perturbed scenes
                masks.append(out.object_mask)
            return out.images

        images = finite_difference(black_box, params, steps, active, cfg)
        return RenderOutput(images=images, object_mask=masks[0])
