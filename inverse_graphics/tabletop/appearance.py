"""The per-image appearance latent of the tabletop models: exposure gain, light direction and ambient light.

A World fixes the nominal light, but the images a model meets (and, with a [randomize] section, the images it is
trained on) vary in exposure and light. Render-and-compare against a nominal render then explains a brighter
image by moving objects (their lit faces cover more pixels) or not at all: the residual is no longer small at the
right pose. So the appearance is a latent of each image, inferred beside the poses:

    image = clamp(gain * render(scene; light_direction, ambient), 0, 1)

- gain (exposure): solved in closed form for any render r, g* = <r, x> / <r, r> (least squares; the render is
  linear in the gain). Refinement re-solves it at every pose step; by the envelope theorem the poses' gradient at
  g* needs no term through g.
- light direction (a unit 3-vector, towards the light): damped Gauss-Newton on two forward differences of the
  hard render (`fit_light`; any backend, OpenGL where EGL works: shading is smooth in the light), or Adam through
  PyTorch3D's hard renderer, whose Lambertian shading is differentiable in it (silhouettes do not move with the
  light, so the hard render's gradient in it is exact; tests/test_appearance.py checks it against central
  differences).
- ambient and diffuse intensities stay nominal by default (`fit_ambient` frees the ambient). Why: with a free
  gain the image of surfaces whose normals are vertical (table, tops) or horizontal (walls: boxes, cans, most
  household objects) gives g (a + d l_z) and g d l_xy only, so ambient a and the light's elevation l_z trade
  against each other; fitting both, a light turned 30 degrees came back 8-24 degrees off (48 x 32 images, three
  objects), fitting the direction alone within 1 degree (tests/test_world_models.py). A change of ambient light
  is then absorbed, approximately, by the gain and the direction.
- per-object albedo (colour jitter): the render is linear in each object's albedo where the object is seen, so,
  given the poses and each pixel's object (`instance_ids`, one coded render), it is solved in closed form like the
  gain (`fit_albedo`), within ALBEDO_RANGE of the nominal colour.
- the table's tint: rescaled per channel with the albedos in the structure search's renders (`fit_albedo`'s
  `table`), within ALBEDO_RANGE of the world's table colour.
- the camera's position (its eye; `fit_eye`): damped Gauss-Newton on finite differences of the hard render,
  modelled on the blurred half-resolution images as LM models poses (a hard render is piecewise constant in it),
  with the poses held; fitted when the world randomises the camera. On the kitchen's own randomised images (48
  scenes of `sample_scenes(48, seed=0)`, `render_scenes(randomize=True, seed=0)`, its shipped model) the counts
  right went from 23 to 44 with the eye and the table's tint fitted (33 with the eye alone); on its nominal images
  29 of 32 either way.
- not fitted: pixel noise.

The fit starts from the nominal appearance (or a given estimate) and keeps each image's best iterate, so it never
raises the image error it starts from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from renderers.mesh import Appearance
from scenes.world import SceneTensors, World

__all__ = [
    "AppearanceFit",
    "AppearanceLatent",
    "nominal_appearance",
    "fit_appearance",
    "fit_light",
    "fit_eye",
    "eye_steps",
    "fit_albedo",
    "instance_ids",
    "ALBEDO_RANGE",
    "LIGHT_STEP",
    "LR_LIGHT",
    "LR_AMBIENT",
]

LR_LIGHT = 0.05  # Adam rate of the light direction (a unit vector: about 3 degrees per step at first)
LR_AMBIENT = 0.02  # Adam rate of the ambient intensity (nominal values 0.3-0.4)


@dataclass(frozen=True)
class AppearanceFit:
    """The appearance of B images."""

    gain: torch.Tensor  # FloatTensor (B,): exposure gain multiplying the render
    light_direction: torch.Tensor  # FloatTensor (B, 3): unit, world frame, towards the light
    ambient: torch.Tensor  # FloatTensor (B,): ambient intensity
    eye: torch.Tensor | None = None  # FloatTensor (B, 3): the camera centre (`fit_eye`); None: the world's

    def appearance(self) -> Appearance:
        """The renderers' per-scene Appearance (the gain is applied to the images by the caller)."""
        return Appearance(light_direction=self.light_direction, ambient=self.ambient, eye=self.eye)

    @staticmethod
    def solve_gain(rendered: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """(B,) least-squares gain g = <r, x> / <r, r> of renders r against images x (B, 3, H, W), detached, over
        the pixels the image does not saturate (x < 1: there the clamp hides the gain)."""
        r, x = rendered.detach().flatten(1), images.detach().flatten(1)
        r = r * (x < 1.0 - 1e-6)
        return (r * x).sum(1) / (r * r).sum(1).clamp(min=1e-12)

    def to_dicts(self) -> list[dict]:
        """One plain dict per image: {"gain", "light_direction", "ambient"}."""
        rows = zip(self.gain.tolist(), self.light_direction.tolist(), self.ambient.tolist(), strict=True)
        out = [{"gain": g, "light_direction": d, "ambient": a} for g, d, a in rows]
        if self.eye is not None:
            out = [{**o, "eye": e} for o, e in zip(out, self.eye.tolist(), strict=True)]
        return out


def nominal_appearance(world: World, batch: int, device: torch.device | str = "cpu") -> AppearanceFit:
    """The world's nominal appearance for `batch` images: gain 1, its light."""
    direction = F.normalize(torch.tensor(world.light.direction, dtype=torch.float32), dim=0)
    return AppearanceFit(
        torch.ones(batch, device=device),
        direction.to(device).expand(batch, 3).clone(),
        torch.full((batch,), float(world.light.ambient), device=device),
    )


def fit_appearance(
    world: World,
    t: SceneTensors,
    images: torch.Tensor,
    colors: torch.Tensor | None,
    steps: int = 30,
    start: AppearanceFit | None = None,
    fit_ambient: bool = False,
    method: str = "gauss-newton",
) -> AppearanceFit:
    """Fit each image's light direction (and, by Adam, ambient) and gain (closed form) with the poses `t` fixed.

    Args:
        world: the scenes' World (renders at the images' size, hard mode; PyTorch3D for Adam's steps).
        t: the scenes' tensors (B, N); images: FloatTensor (B, 3, H, W) in [0, 1].
        colors: FloatTensor (B, N, 3) object albedos, or None for the stage's.
        steps: iterations of the light fit (0: the gain alone, on the start's light or the nominal one).
        start: the first iterate (default `nominal_appearance`); a start other than the nominal is kept only where
            it beats the nominal appearance (each with its gain solved).
        fit_ambient: also fit the ambient intensity (Adam only; off by default: see the module docstring).
        method: "gauss-newton" (`fit_light`: finite differences of any hard render, OpenGL where EGL works; on 16
            kitchen scenes under a light turned 30 degrees, 6 iterations: the light recovered to 0.0 degrees
            (median) in 0.4 s) or "adam" (through PyTorch3D's shading gradient; the same 16 scenes, 30 steps:
            1.7 degrees in 34 s). A scene of table only leaves the light's tilt to the gain: not identified.
    Returns:
        AppearanceFit, each image's best iterate by the squared image error (the start and the nominal included).
    """
    from inverse_graphics.tabletop import world3d

    if method not in ("gauss-newton", "adam"):
        raise ValueError(f"method must be 'gauss-newton' or 'adam', got {method!r}")
    if fit_ambient and method != "adam":
        raise ValueError("fit_ambient needs method='adam'")
    B = images.shape[0]
    size = (int(images.shape[3]), int(images.shape[2]))
    if method == "gauss-newton":
        renderer = world3d.renderer(world, "hard", size, "auto")
        first = _better_start(world, t, images, colors, start, renderer)
        return fit_light(world, t, images, colors, first, steps, renderer) if steps > 0 else first
    # Adam needs PyTorch3D's shading gradient; without steps (the gain alone, on a given light) any hard render does
    renderer = world3d.renderer(world, "hard", size, "pytorch3d" if steps > 0 else "auto")
    s = start or nominal_appearance(world, B, images.device)
    direction = s.light_direction.detach().clone().requires_grad_(True)
    ambient = s.ambient.detach().clone().requires_grad_(True)
    groups = [{"params": [direction], "lr": LR_LIGHT}]
    groups += [{"params": [ambient], "lr": LR_AMBIENT}] if fit_ambient else []
    opt = torch.optim.Adam(groups)
    best = torch.full((B,), float("inf"), device=images.device)
    best_fit = s
    if start is not None:  # the nominal appearance competes too: a start (the guide's guess) may be worse
        nominal = replace(nominal_appearance(world, B, images.device), eye=s.eye)
        best_fit, best = _with_gain(renderer, t, images, colors, nominal)
    for step in range(steps + 1):
        look = Appearance(light_direction=F.normalize(direction, dim=1), ambient=ambient, eye=s.eye)
        rendered = renderer(t.shape_ids, t.positions, t.yaws, colors, look).images  # (B, 3, H, W)
        gain = AppearanceFit.solve_gain(rendered, images)
        loss = (((gain[:, None, None, None] * rendered).clamp(max=1.0) - images) ** 2).flatten(1).sum(1)  # (B,)
        with torch.no_grad():
            better = loss < best
            best = torch.where(better, loss, best)
            best_fit = AppearanceFit(
                torch.where(better, gain, best_fit.gain),
                torch.where(better[:, None], F.normalize(direction, dim=1), best_fit.light_direction),
                torch.where(better, ambient, best_fit.ambient),
            )
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            ambient.clamp_(min=0.0)
    gain, light, ambient = (v.detach() for v in (best_fit.gain, best_fit.light_direction, best_fit.ambient))
    return AppearanceFit(gain, light, ambient, s.eye)


def _with_gain(
    renderer: torch.nn.Module, t: SceneTensors, images: torch.Tensor, colors: torch.Tensor | None, look: AppearanceFit
) -> tuple[AppearanceFit, torch.Tensor]:
    """`look` with each image's gain solved on its render, and the squared image error (B,) it leaves."""
    r = renderer(t.shape_ids, t.positions, t.yaws, colors, look.appearance()).images
    gain = AppearanceFit.solve_gain(r, images)
    loss = (((gain[:, None, None, None] * r).clamp(max=1.0) - images) ** 2).flatten(1).sum(1)
    return replace(look, gain=gain), loss


def tangent_basis(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit vectors (B, 3) each, orthonormal to the unit directions d (B, 3) and to each other: the chart's axes
    about a light direction."""
    x, y = d.new_tensor([1.0, 0.0, 0.0]), d.new_tensor([0.0, 1.0, 0.0])
    helper = torch.where(d[:, :1].abs() < 0.9, x, y)
    e1 = F.normalize(torch.linalg.cross(d, helper), dim=1)
    return e1, torch.linalg.cross(d, e1)


def _better_start(
    world: World,
    t: SceneTensors,
    images: torch.Tensor,
    colors: torch.Tensor | None,
    start: AppearanceFit | None,
    renderer: torch.nn.Module,
) -> AppearanceFit:
    """Per image, the start's light or the nominal one, whichever renders closer to the image, each with its gain."""
    eye = None if start is None else start.eye  # a fitted camera is kept: the light competes under it
    nominal, nominal_loss = _with_gain(
        renderer, t, images, colors, replace(nominal_appearance(world, images.shape[0], images.device), eye=eye)
    )
    if start is None:
        return nominal
    guess, guess_loss = _with_gain(renderer, t, images, colors, start)
    use = guess_loss < nominal_loss
    return AppearanceFit(
        torch.where(use, guess.gain, nominal.gain),
        torch.where(use[:, None], F.normalize(guess.light_direction, dim=1), nominal.light_direction),
        torch.where(use, guess.ambient, nominal.ambient),
        eye,
    )


LIGHT_STEP = 0.02  # the light fit's finite-difference step in the chart about the light (radians, ~1.1 degrees)
LIGHT_ROBUST_SCALE = 0.1  # the light fit's Cauchy scale, in image intensity (`fit_light`): a pixel misfit by more
# counts less, as one where an object is drawn a few millimetres off shows object against table


def fit_light(
    world: World,
    t: SceneTensors,
    images: torch.Tensor,
    colors: torch.Tensor | None,
    start: AppearanceFit,
    iterations: int = 6,
    renderer: torch.nn.Module | None = None,
) -> AppearanceFit:
    """Fit each image's light direction (and gain, in closed form at every trial) by damped Gauss-Newton on the
    squared image error with the poses `t` fixed, differencing the hard render (any backend: OpenGL renders no
    gradient, and shading is smooth in the light, so two forward differences give the Jacobian).

    The direction is d(u) = normalise(d0 + u_1 e_1 + u_2 e_2) about the start's d0 ((e_1, e_2) orthonormal to it);
    each iteration renders u, u + h e_1 and u + h e_2 (h = LIGHT_STEP) and tries the step
    (J^T W J + lambda diag(J^T W J))^-1 J^T W r, lambda shrinking after a success and growing after a failure, per
    image. 3 renders an iteration: 18 at the default 6 iterations, against Adam's 30 through PyTorch3D.

    W: Cauchy weights 1 / (1 + (r / LIGHT_ROBUST_SCALE)^2) of the iteration's residual (iteratively reweighted least
    squares), a step kept when it lowers the loss so weighted. The poses the light is fitted on are estimates, and
    where an object is drawn a few millimetres off, the pixels between show object against table: under squared
    error they pulled the light far off (on 32 primitives scenes lit 30 degrees from the nominal, from the guide's
    poses: median error 5.1 degrees, a quarter over 18; weighted: 2.6 and 10; from the true poses 0.0 either way:
    benchmarks/results/light_robust.notes.md).

    Returns:
        AppearanceFit: each image's last accepted iterate (the start when no step lowered its weighted loss);
        ambient the start's.
    """
    from inverse_graphics.tabletop import world3d

    B = images.shape[0]
    size = (int(images.shape[3]), int(images.shape[2]))
    renderer = renderer or world3d.renderer(world, "hard", size, "auto")
    d0 = F.normalize(start.light_direction, dim=1)  # (B, 3)
    e1, e2 = tangent_basis(d0)
    x = images.flatten(1)

    def direction(u: torch.Tensor) -> torch.Tensor:
        return F.normalize(d0 + u[:, :1] * e1 + u[:, 1:] * e2, dim=1)

    def residual(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        look = Appearance(light_direction=direction(u), ambient=start.ambient, eye=start.eye)
        r = renderer(t.shape_ids, t.positions, t.yaws, colors, look).images
        gain = AppearanceFit.solve_gain(r, images)
        return (gain[:, None] * r.flatten(1)).clamp(max=1.0) - x, gain  # (B, 3 H W), (B,)

    u = images.new_zeros(B, 2)
    f, gain = residual(u)
    damping = images.new_full((B,), 1e-2)
    for _ in range(iterations):
        w = 1.0 / (1.0 + (f / LIGHT_ROBUST_SCALE) ** 2)  # (B, 3 H W): this iteration's weights
        loss = (w * f**2).sum(1)
        columns = [(residual(u + LIGHT_STEP * torch.eye(2, device=u.device)[i])[0] - f) / LIGHT_STEP for i in (0, 1)]
        J = torch.stack(columns, 2)  # (B, 3 H W, 2)
        JtJ = J.transpose(1, 2) @ (w[:, :, None] * J)  # (B, 2, 2)
        g = (J.transpose(1, 2) @ (w * f)[:, :, None])[:, :, 0]  # (B, 2)
        A = JtJ + damping[:, None, None] * torch.diag_embed(torch.diagonal(JtJ, dim1=1, dim2=2).clamp(min=1e-9))
        solution, info = torch.linalg.solve_ex(A, g)  # a singular system (no pixel the light changes): no step
        step = torch.where((info == 0)[:, None] & solution.isfinite().all(1, keepdim=True), -solution, 0.0)
        step = step * (0.5 / step.norm(dim=1, keepdim=True).clamp(min=0.5))  # at most 0.5 (~27 degrees) a step
        f_new, gain_new = residual(u + step)
        better = (w * f_new**2).sum(1) < loss  # (B,)
        u = torch.where(better[:, None], u + step, u)
        f = torch.where(better[:, None], f_new, f)
        gain = torch.where(better, gain_new, gain)
        damping = torch.where(better, damping * 0.3, damping * 10.0).clamp(1e-6, 1e6)
    return AppearanceFit(gain.detach(), direction(u).detach(), start.ambient.detach(), start.eye)


EYE_DIFFERENCE = 2.0  # the camera fit's forward-difference step, in pixels of the table's motion (`eye_steps`):
# a hard render is piecewise constant, and the residual is taken at half resolution; 12 kitchen scenes, eyes moved
# 18 mm, poses known: median error 1.5 mm with 2 pixels, 3.9 with 1, stuck near the start with 0.5
EYE_MOVE = 2.0  # the largest move of the eye in one Gauss-Newton step, in the same units


def eye_steps(world: World, size: tuple[int, int]) -> torch.Tensor:
    """DoubleTensor (3,): per axis, the eye's move (metres) that moves the table's image by one pixel at most (its
    corners' largest motion, images of `size` (W, H)), from the world's camera: `fit_eye`'s unit and finite-difference
    step, so that its steps mean the same on any camera, table or image size."""
    from renderers.opengl import world_to_clip  # numpy only: it needs no OpenGL context

    stage = world.stage
    corners = stage.table_verts.double().numpy()
    points = np.concatenate([corners, np.ones((len(corners), 1))], 1)  # (V, 4)

    def pixels(eye) -> torch.Tensor:
        clip = points @ world_to_clip(stage.camera, world.image_size, eye).astype("float64").T  # (V, 4)
        ndc = torch.from_numpy(clip[:, :2] / clip[:, 3:])
        return (ndc + 1) * torch.tensor(size, dtype=torch.float64) / 2  # (V, 2)

    eye = torch.tensor(world.camera.eye, dtype=torch.float64)
    delta = 1e-4 * float((eye - torch.tensor(world.camera.at, dtype=torch.float64)).norm())
    here = pixels(tuple(eye.tolist()))
    rates = [float((pixels(tuple((eye + delta * e).tolist())) - here).norm(dim=1).max()) / delta
             for e in torch.eye(3, dtype=torch.float64)]  # fmt: skip  # pixels per metre, per axis
    return torch.tensor([1.0 / max(r, 1e-9) for r in rates], dtype=torch.float64)


def fit_eye(
    world: World,
    t: SceneTensors,
    images: torch.Tensor,
    colors: torch.Tensor | None,
    start: AppearanceFit,
    iterations: int = 8,
    renderer: torch.nn.Module | None = None,
) -> AppearanceFit:
    """Fit each image's camera centre (the eye; the camera still looks at its `at` with its `up`) by damped
    Gauss-Newton on the image error with the poses `t` and the start's light fixed, the gain solved in closed form
    at every trial. A moved camera moves the table's outline and every object's image; render-and-compare at the
    nominal camera then explains the misfit with objects that are not there (on the kitchen's randomised images, 2 cm
    of eye jitter: 15 of 32 scenes with spurious objects; with each image's true eye, none).

    A hard render is piecewise constant in the eye, so the residual is modelled on the images' 2 x 2 means blurred
    (refine.pooled_blur, as LM models poses). The eye is moved in units of `eye_steps` (per axis, the move that
    shifts the table's image by a pixel; forward differences of EYE_DIFFERENCE of them), and by at most EYE_MOVE
    of them in one step; where the world randomises the camera, within its ball (the eyes its model was trained on).
    The eye and the objects' positions trade against each other where only objects are seen; the table's outline
    pins it.

    Returns:
        `start` with `eye` (B, 3) each image's best iterate (the start's eye or the world's included) and its gain.
    """
    from inverse_graphics.tabletop import world3d
    from inverse_graphics.tabletop.refine import pooled_blur

    B = images.shape[0]
    size = (int(images.shape[3]), int(images.shape[2]))
    renderer = renderer or world3d.renderer(world, "hard", size, "auto")
    unit = eye_steps(world, size).to(images)  # (3,) metres per unit
    nominal = torch.tensor(world.camera.eye, dtype=images.dtype, device=images.device)
    eye0 = nominal.expand(B, 3).clone() if start.eye is None else start.eye.clone()
    target = pooled_blur(images).flatten(1)

    def residual(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        look = Appearance(light_direction=start.light_direction, ambient=start.ambient, eye=eye0 + p * unit)
        r = renderer(t.shape_ids, t.positions, t.yaws, colors, look).images
        gain = AppearanceFit.solve_gain(r, images)
        return pooled_blur((gain[:, None, None, None] * r).clamp(max=1.0)).flatten(1) - target, gain

    radius = 0.0 if world.randomize is None else world.randomize.camera_position

    def within(p: torch.Tensor) -> torch.Tensor:  # the eye kept in the world's ball of jitter (when it has one)
        if radius <= 0:
            return p
        offset = eye0 + p * unit - nominal  # (B, 3)
        inside = offset * (radius / offset.norm(dim=1, keepdim=True).clamp(min=radius))
        return (nominal + inside - eye0) / unit

    p = images.new_zeros(B, 3)
    f, gain = residual(p)
    loss = (f**2).sum(1)
    damping = images.new_full((B,), 1e-2)
    basis = torch.eye(3, dtype=images.dtype, device=images.device)
    for _ in range(iterations):
        J = torch.stack([residual(p + EYE_DIFFERENCE * basis[i])[0] - f for i in range(3)], 2) / EYE_DIFFERENCE
        JtJ = J.transpose(1, 2) @ J  # (B, 3, 3)
        g = (J.transpose(1, 2) @ f[:, :, None])[:, :, 0]
        A = JtJ + damping[:, None, None] * torch.diag_embed(torch.diagonal(JtJ, dim1=1, dim2=2).clamp(min=1e-9))
        step = -torch.linalg.solve(A, g)
        step = step * (EYE_MOVE / step.norm(dim=1, keepdim=True).clamp(min=EYE_MOVE))
        trial = within(p + step)
        f_new, gain_new = residual(trial)
        loss_new = (f_new**2).sum(1)
        better = loss_new < loss
        p = torch.where(better[:, None], trial, p)
        f = torch.where(better[:, None], f_new, f)
        gain = torch.where(better, gain_new, gain)
        loss = torch.where(better, loss_new, loss)
        damping = torch.where(better, damping * 0.3, damping * 10.0).clamp(1e-6, 1e6)
    return replace(start, gain=gain.detach(), eye=(eye0 + p * unit).detach())


ALBEDO_RANGE = 0.25  # how far (per channel, absolute) a fitted albedo may go from the object's nominal one


def instance_ids(renderer: torch.nn.Module, t: SceneTensors, eye: torch.Tensor | None = None) -> torch.Tensor:
    """LongTensor (B, H, W): the slot of `t` each pixel sees, -1 for the table, from one hard render that codes
    each slot as its albedo (flat light: ambient 1, no diffuse, a black table), seen from `eye` (B, 3; None: the
    world's camera)."""
    B, N = t.shape_ids.shape
    code = (torch.arange(N, device=t.positions.device, dtype=torch.float32) + 1) / (N + 1)  # (N,)
    flat = Appearance(
        ambient=torch.ones(B, device=t.positions.device),
        diffuse=torch.zeros(B, device=t.positions.device),
        table_color=torch.zeros(B, 3, device=t.positions.device),
        eye=eye,
    )
    coded = renderer(t.shape_ids, t.positions, t.yaws, code[None, :, None].expand(B, N, 3).contiguous(), flat)
    return torch.round(coded.images[:, 0] * (N + 1)).long() - 1


def fit_albedo(
    rendered: torch.Tensor,
    ids: torch.Tensor,
    images: torch.Tensor,
    colors: torch.Tensor,
    nominal: torch.Tensor,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each object's albedo in closed form given its pixels: the render is linear in an object's albedo where it is
    seen (pixel = gain x albedo x shading), so per object and channel the least-squares scale s = <r, x> / <r, r>
    over its unsaturated pixels; the albedo colors x s is kept within ALBEDO_RANGE of the nominal (and in [0, 1]).

    Args:
        rendered: FloatTensor (B, 3, H, W), the render with `colors` (gain applied); ids: LongTensor (B, H, W) from
            `instance_ids`; images: the observed (B, 3, H, W); colors, nominal: FloatTensor (B, N, 3).
        table: FloatTensor (3,), the table's colour in `rendered`: its pixels are rescaled per channel too, within
            ALBEDO_RANGE of it (a tinted table; the world randomises it); None: the table as rendered.
    Returns:
        (the fitted albedos (B, N, 3), the render with them (B, 3, H, W): the object pixels rescaled).
    """
    B, N, _ = colors.shape
    index = (ids + 1).flatten(1)[:, None, :].expand(B, 3, -1)  # (B, 3, H W): 0 the table, 1 + slot
    r = rendered.flatten(2)
    x = images.flatten(2)
    ok = (x < 1.0 - 1e-6).float() * (r < 1.0 - 1e-6).float()
    num = torch.zeros(B, 3, N + 1, device=r.device).scatter_add_(2, index, r * x * ok)
    den = torch.zeros(B, 3, N + 1, device=r.device).scatter_add_(2, index, r * r * ok)
    scales = torch.where(den > 1e-9, num / den.clamp(min=1e-9), torch.ones_like(num))  # (B, 3, N + 1)
    scale = scales[:, :, 1:].transpose(1, 2)
    fitted = torch.minimum(torch.maximum(colors * scale, nominal - ALBEDO_RANGE), nominal + ALBEDO_RANGE).clamp(0, 1)
    ratio = torch.where(colors > 1e-6, fitted / colors.clamp(min=1e-6), torch.ones_like(colors))  # (B, N, 3)
    table_ratio = torch.ones(B, 1, 3, device=r.device)
    if table is not None:
        t0 = table.to(r.device).reshape(1, 3)
        t_fit = torch.minimum(torch.maximum(t0 * scales[:, :, 0], t0 - ALBEDO_RANGE), t0 + ALBEDO_RANGE)
        table_ratio = torch.where(t0 > 1e-6, t_fit.clamp(0, 1) / t0.clamp(min=1e-6), torch.ones_like(t_fit))[:, None]
    per_pixel = torch.cat([table_ratio, ratio], 1).transpose(1, 2).gather(2, index)
    return fitted, (r * per_pixel).view_as(rendered).clamp(max=1.0)


class AppearanceLatent(torch.nn.Module):
    """3D AIR's per-image appearance latent a = (log gain, t_1, t_2) for a World with appearance randomisation:
    gain = exp(a_0), light direction = normalise(l0 + t_1 e_1 + t_2 e_2) with l0 the world's nominal light and
    (e_1, e_2) an orthonormal basis of the plane perpendicular to it (a chart of the sphere about l0, no wrap).

    Prior: a ~ N(0, diag(prior_sd^2)), with prior_sd matched to the world's [randomize] ranges (gain uniform on
    [1 - b, 1 + b]: sd of log gain about b / sqrt(3); a light uniform on a cap of half-angle theta: about
    tan(theta) / 2 per tangent axis). The guide's q(a | x) is a diagonal Gaussian from the image embedding; the
    sleep phase trains it on images drawn with the world's own randomised appearance (`sample_target`), and
    `infer` hands its mean to refinement's appearance fit as the start."""

    basis: torch.Tensor  # FloatTensor (3, 3): rows l0, e_1, e_2
    prior_sd: torch.Tensor  # FloatTensor (3,)

    def __init__(self, world: World, embed_dim: int):
        super().__init__()
        l0 = F.normalize(torch.tensor(world.light.direction, dtype=torch.float32), dim=0)
        e1, e2 = (e[0] for e in tangent_basis(l0[None]))
        self.register_buffer("basis", torch.stack([l0, e1, e2]), persistent=False)
        r = world.randomize
        b = r.brightness if r is not None else 0.0
        theta = math.radians(r.light_direction_degrees) if r is not None else 0.0
        sd = [max(b / math.sqrt(3), 0.01), max(math.tan(theta) / 2, 0.01), max(math.tan(theta) / 2, 0.01)]
        self.register_buffer("prior_sd", torch.tensor(sd), persistent=False)
        self.ambient = float(world.light.ambient)
        self.head = torch.nn.Linear(embed_dim, 6)
        with torch.no_grad():  # start at the nominal appearance with a narrow q
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
            self.head.bias[3:].fill_(-3.0)  # softplus(-3) = 0.05

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding (B, E) -> q(a)'s loc and scale, each FloatTensor (B, 3)."""
        loc, scale = self.head(embedding).split(3, dim=1)
        return loc, F.softplus(scale) + 1e-4

    def decode(self, a: torch.Tensor) -> AppearanceFit:
        """a (B, 3) -> AppearanceFit (gain, light direction; ambient nominal)."""
        light = F.normalize(self.basis[0] + a[:, 1:2] * self.basis[1] + a[:, 2:3] * self.basis[2], dim=1)
        return AppearanceFit(torch.exp(a[:, 0]), light, a.new_full((a.shape[0],), self.ambient))

    def encode(self, gain: torch.Tensor, light_direction: torch.Tensor) -> torch.Tensor:
        """The latent (B, 3) of a gain (B,) and a light direction (B, 3) in front of the nominal one."""
        d = F.normalize(light_direction, dim=1)
        along = (d @ self.basis[0]).clamp(min=1e-3)  # (B,)
        t = (d @ self.basis[1:].T) / along[:, None]  # (B, 2): the chart's coordinates
        return torch.cat([torch.log(gain.clamp(min=1e-3))[:, None], t], dim=1)

    def kl(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(B,) KL(q(a) || p(a)), analytic."""
        var_ratio = (scale / self.prior_sd) ** 2
        return 0.5 * (var_ratio + (loc / self.prior_sd) ** 2 - 1 - torch.log(var_ratio)).sum(-1)
