"""Render-and-compare refinement: object poses fitted to the observed image through the renderer.

Starting from any method's predicted scenes, `refine` moves every object's (x, y) and yaw to lower the squared
difference between the render and the observed image. Shapes and counts stay fixed: refinement polishes poses, it
does not add, remove or re-identify objects. Two methods (RefineConfig.method):

- "lm" (the default): Levenberg-Marquardt on the image residual (inverse_graphics.tabletop.levenberg_marquardt). Each
  iteration differentiates the hard black-box render by forward differences of about one pixel (P + 1 renders
  for P free pose parameters, 3 per object, 2 for a yaw-invariant one), solves the damped Gauss-Newton system of
  each scene (P x P) and keeps the step only if the loss falls; every perturbed and trial pose of every scene of
  the batch is drawn in one renderer call. A hard render is piecewise constant in the pose: its residual changes
  only where an edge crosses a pixel centre, so a linear model of it is poor below a pixel and Gauss-Newton steps
  from it stall (measured on 24 scenes at 64 px perturbed by 1 cm / 0.15 rad: 3.4 mm median left). LM therefore
  models and accepts its steps on a smoothed image (`pooled_blur`, about a 1.4-pixel Gaussian: an edge's
  sub-pixel position becomes a smooth ramp that one-pixel differences measure) and returns each scene's best pose
  by the unsmoothed image loss. The Jacobian's renders, one object moved each, are drawn only in a window about
  that object (`redraw_moved`, OpenGL). Measured side by side with Adam (benchmarks/results/refine_speed.md, one
  thread): from the shipped air-tabletop's guesses (1.9 mm, 2.0 degrees) LM reaches 0.48 mm and 0.44 degrees with
  16 renders a scene, Adam 0.93 mm and 0.67 degrees with 189; from kitchen poses perturbed by 1 cm / 0.15 rad
  (128 x 96, 11.6 mm) LM 0.49 mm and 0.26 degrees with 46 renders, Adam 1.54 mm and 1.02 degrees with 356; LM is
  5.7-10.4x faster per image there (6.5-7.5x on primitives).
- "adam": K first-order Adam steps on the squared image error, gradients by central finite differences of the
  hard render (`gradient="fd"`, 2 P + 1 renders a step) or PyTorch3D's soft rasterizer (`"soft"`). Kept for
  comparison and for the soft gradient.

Scenes of a batch are optimised independently, as if one at a time. Each keeps its best iterate by the image loss
(the start included), so refinement never raises that loss. Constraints, where cheap: every trial pose has its
footprints pushed back inside the table (`clamp_to_table`); a refined scene whose objects interpenetrate, when its
start did not, is returned unrefined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from inverse_graphics.tabletop import world3d
from inverse_graphics.tabletop.appearance import AppearanceFit, fit_albedo, fit_appearance, fit_eye, instance_ids
from inverse_graphics.tabletop.levenberg_marquardt import LMSettings, levenberg_marquardt
from inverse_graphics.tabletop.metrics3d import as_scene
from inverse_graphics.tabletop.scene_search import MIN_SIGNAL, SearchConfig, search_scenes
from renderers.finite_difference import FiniteDifferenceRenderer
from renderers.mesh import Appearance
from scenes import tabletop
from scenes.tabletop import Scene
from scenes.tabletop_objects import footprints_overlap
from scenes.world import SceneTensors, World

__all__ = ["DEFAULT_STEPS", "RefineConfig", "clamp_to_table", "refine"]

DEFAULT_STEPS = {"lm": 8, "adam": 20}  # K of each method by default (RefineConfig.steps; "adam": its old default)


def binomial_blur(images: torch.Tensor) -> torch.Tensor:
    """images FloatTensor (..., H, W) blurred by the 5-tap binomial filter [1, 4, 6, 4, 1] / 16 along each axis
    (a Gaussian of sigma 1 pixel to within 2%, zero outside the image): linear, so a blurred residual is the
    residual of the blurred images. Shifted sums, not a convolution: one CPU thread blurs 64 x 64 x 3 images in
    about 0.1 ms each, where torch's single-channel conv2d or avg_pool2d took 5 to 10 times as long."""
    p = F.pad(images, (2, 2, 2, 2))
    p = p[..., :-4] + p[..., 4:] + 4 * (p[..., 1:-3] + p[..., 3:-1]) + 6 * p[..., 2:-2]
    p = p[..., :-4, :] + p[..., 4:, :] + 4 * (p[..., 1:-3, :] + p[..., 3:-1, :]) + 6 * p[..., 2:-2, :]
    return p / 256


def pooled_blur(images: torch.Tensor) -> torch.Tensor:
    """images FloatTensor (..., H, W) -> (..., H // 2, W // 2): the mean of each 2 x 2 block (an odd last row or
    column dropped), then the binomial filter [1, 2, 1] / 4 along each axis (zero outside): about a Gaussian of
    sigma 1.4 pixels of the input, sampled every 2 pixels. Linear, like `binomial_blur`, at a quarter of the size:
    the area means keep where an edge lies within a pixel (a point sample at half resolution would not)."""
    x = images[..., : images.shape[-2] // 2 * 2, : images.shape[-1] // 2 * 2]
    x = x[..., 0::2, :] + x[..., 1::2, :]
    x = x[..., 0::2] + x[..., 1::2]
    p = F.pad(x, (1, 1, 1, 1))
    p = p[..., :-2] + p[..., 2:] + 2 * p[..., 1:-1]
    p = p[..., :-2, :] + p[..., 2:, :] + 2 * p[..., 1:-1, :]
    return p / 64


SMOOTHING = {"pool": pooled_blur, "blur": binomial_blur}  # RefineConfig.smoothing; "none" = the image itself


@dataclass(frozen=True)
class RefineConfig:
    """The method, length and step sizes of the refinement.

    `steps` is K, the iterations of the method: Levenberg-Marquardt Jacobians for "lm" (the default), Adam steps for
    "adam". The two count different work: an LM iteration renders P + 1 to P + 1 + retries images per scene (P the
    scene's free pose parameters, 3 per object, 2 for a yaw-invariant one; the P Jacobian renders in a window about
    the moved object) and a scene stops early once no step lowers its image loss or its steps fall under a
    twentieth of a pixel; an Adam step renders 2 P + 1 whole images. DEFAULT_STEPS: 8 LM iterations (scenes took
    about 2 on average from the shipped model's guesses, about 4 from 1 cm / 0.15 rad kitchen perturbations: a ceiling,
    not a cost), 20 Adam steps (its former default).
    """

    method: str | None = None  # "lm": Levenberg-Marquardt (inverse_graphics.tabletop.levenberg_marquardt) on the image
    # residual; "adam": first-order Adam steps on the squared image error (the method before LM, kept for
    # comparison and for the soft gradient); None: "adam" for gradient="soft", else "lm"
    steps: int = DEFAULT_STEPS["lm"]  # K: LM iterations (each a finite-difference Jacobian) or Adam steps
    lr_position: float = 0.004  # Adam: metres each coordinate moves per step at first
    lr_yaw: float = 0.05  # Adam: radians (3 degrees) per step at first
    final_lr_fraction: float = 0.1  # Adam: learning rates decay linearly to this fraction at the last step
    color_by_shape: bool = False  # the observed images colour objects by shape (tabletop.SHAPE_COLORS)
    gradient: str = "fd"  # Adam's gradient. "fd": finite differences of the hard black-box render (OpenGL where
    # EGL works); "soft": autograd through PyTorch3D's soft rasterizer. Measured on 24 held-out scenes of 1-3
    # objects, poses perturbed by 1 cm / 0.15 rad (median 11.0 mm, 3.4 degrees), 20 steps, 1 thread: fd 1.5 mm,
    # 1.7 degrees in 21 s; soft 2.2 mm, 1.3 degrees in 452 s (both on a CPU shared with a training). LM always
    # differentiates the hard render by finite differences (one-pixel steps, FiniteDifferenceSettings).
    smoothing: str = "pool"  # LM: the image model its steps are taken on (`_levenberg_marquardt` says why):
    # "pool" (`pooled_blur`: half resolution, sigma ~1.4 px), "blur" (`binomial_blur`: full resolution, sigma
    # 1 px) or "none". The pose returned is each scene's best by the image loss itself, whatever the smoothing.
    lm: LMSettings = LMSettings()  # LM's damping schedule, retries, largest step and differences (`iterations`
    # there is ignored: `steps` is K)

    # The per-image appearance (tabletop.appearance): fit the exposure gain and light direction to the image (and
    # the gain again at every pose step), so that render-and-compare is not pulled by a light that is not the
    # nominal one. With Gauss-Newton and LM: the gain before the poses, the light on the refined poses, then the
    # poses again where the light turned or an albedo changed; with Adam: all before the poses, on PyTorch3D's
    # renders. Off: the nominal appearance, as the models of the primitives world were refined.
    appearance: bool = False
    appearance_method: str = "gauss-newton"  # how the light is fitted (appearance.fit_appearance): "gauss-newton"
    # (finite differences of the hard render, any backend: fast and exact on rendered images) or "adam" (PyTorch3D's
    # shading gradient: seconds an image)
    appearance_steps: int | None = None  # iterations of the light fit; None: 6 Gauss-Newton or 30 Adam steps; 0:
    # the gain alone
    albedo: bool = True  # with `appearance` (and LM): each object's albedo too, in closed form on its pixels
    # (appearance.fit_albedo, within ALBEDO_RANGE of its nominal colour), before the poses are refined again and at
    # every render of the structure search, so that an object of another colour than its nominal one still
    # explains its pixels
    # With `appearance`: each image's camera centre too (appearance.fit_eye), first, on the start's poses; None:
    # when the world randomises the camera's position (a model trained so expects it to move). The pose fit's
    # windowed Jacobians and the search's windowed trials are then drawn under each image's fitted camera
    camera: bool | None = None
    # After the poses: the structure search (inverse_graphics.tabletop.scene_search), which adds objects where the
    # image is unexplained and removes those the image does not support, each move kept only when the image says
    # so (needs method "lm"). None: off (counts and identities stay the start's).
    search: SearchConfig | None = None

    def __post_init__(self) -> None:
        if self.method is None:
            object.__setattr__(self, "method", "adam" if self.gradient == "soft" else "lm")
        if self.steps < 0 or self.lr_position <= 0 or self.lr_yaw <= 0:
            raise ValueError(f"need steps >= 0 and positive learning rates, got {self}")
        if self.method not in ("lm", "adam"):
            raise ValueError(f"method must be 'lm' or 'adam', got {self.method!r}")
        if self.gradient not in ("soft", "fd"):
            raise ValueError(f"gradient must be 'soft' or 'fd', got {self.gradient!r}")
        if self.smoothing not in (*SMOOTHING, "none"):
            raise ValueError(f"smoothing must be one of {(*SMOOTHING, 'none')}, got {self.smoothing!r}")
        if self.appearance_method not in ("gauss-newton", "adam"):
            raise ValueError(f"appearance_method must be 'gauss-newton' or 'adam', got {self.appearance_method!r}")
        if self.appearance_steps is None:
            object.__setattr__(self, "appearance_steps", 6 if self.appearance_method == "gauss-newton" else 30)
        if self.search is not None and self.method != "lm":
            raise ValueError("the structure search (search=...) refines its additions by LM: method must be 'lm'")
        if self.method == "lm" and self.gradient != "fd":
            raise ValueError("gradient='soft' is Adam's (method='adam'); LM differentiates the hard render")


def clamp_to_table(
    shape_ids: torch.Tensor, positions: torch.Tensor, yaws: torch.Tensor, world: World | None = None
) -> torch.Tensor:
    """Move each object the least distance that puts its whole footprint on the table of `world` (None: the
    primitives world).

    Args:
        shape_ids: LongTensor (B, N), -1 for empty slots; positions: FloatTensor (B, N, 2) metres;
        yaws: FloatTensor (B, N) radians.
    Returns:
        FloatTensor (B, N, 2) clamped positions (empty slots unchanged).
    """
    return world3d.clamp_to_table(world or world3d.primitives(), shape_ids, positions, yaws)


def _interpenetrates(world: World, scene: dict) -> bool:
    polygons = [world.object_named(o["shape"]).footprint_at(tuple(o["position"]), o["yaw"]) for o in scene["objects"]]
    return any(footprints_overlap(a, b) for i, a in enumerate(polygons) for b in polygons[i + 1 :])


def image_loss(rendered: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B,) squared image error per scene."""
    return ((rendered - images) ** 2).flatten(1).sum(1)


def _descend(
    renderer: torch.nn.Module,
    world: World,
    t: SceneTensors,
    images: torch.Tensor,
    colors: torch.Tensor | None,
    cfg: RefineConfig,
    look: AppearanceFit | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K Adam steps from `t`'s poses; returns each scene's best positions (B, N, 2) and yaws (B, N). With `look`,
    renders under its light and ambient, the gain solved in closed form at every step."""
    positions = t.positions.clone().requires_grad_(True)
    yaws = t.yaws.clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [positions], "lr": cfg.lr_position}, {"params": [yaws], "lr": cfg.lr_yaw}])
    decay = torch.optim.lr_scheduler.LinearLR(opt, 1.0, cfg.final_lr_fraction, total_iters=max(cfg.steps - 1, 1))
    best_loss = torch.full((images.shape[0],), math.inf)
    best_pos, best_yaw = t.positions.clone(), t.yaws.clone()
    invariant = torch.tensor([o.yaw_period == 0.0 for o in world.objects], device=t.shape_ids.device)
    fixed_yaw = (t.shape_ids < 0) | invariant[t.shape_ids.clamp(min=0)]  # (B, N): yaws that refinement keeps
    appearance = None if look is None else look.appearance()
    for _ in range(cfg.steps):
        rendered = renderer(t.shape_ids, positions, yaws, colors, appearance).images  # (B, 3, H, W)
        if look is not None:
            rendered = (rendered * look.solve_gain(rendered, images)[:, None, None, None]).clamp(max=1.0)
        loss = image_loss(rendered, images)  # (B,) squared image error per scene
        with torch.no_grad():
            better = loss < best_loss  # (B,)
            best_loss = torch.where(better, loss, best_loss)
            best_pos[better], best_yaw[better] = positions[better], yaws[better]
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        if yaws.grad is not None:  # a yaw-invariant shape's yaw has no gradient, but float noise (~1e-5), which
            yaws.grad[fixed_yaw] = 0.0  # Adam would scale up to full steps: its yaw would wander
        opt.step()
        decay.step()
        with torch.no_grad():
            positions.copy_(clamp_to_table(t.shape_ids, positions, yaws, world))
    return best_pos, best_yaw


def _levenberg_marquardt(
    fd: FiniteDifferenceRenderer,
    world: World,
    t: SceneTensors,
    images: torch.Tensor,
    colors: torch.Tensor | None,
    cfg: RefineConfig,
    look: AppearanceFit | None = None,
    free: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K Levenberg-Marquardt iterations from `t`'s poses on the image residual of the hard render, every perturbed
    and trial pose of every scene drawn in one renderer call; returns each scene's best positions (B, N, 2) and yaws
    (B, N). Parameters per scene as FiniteDifferenceRenderer lays them out, (x_1, y_1, ..., x_N, y_N, yaw_1, ...,
    yaw_N), each differenced by its one-pixel step; empty slots and yaw-invariant objects' yaws stay fixed. With
    `look`, renders under its light and ambient, the gain solved in closed form at every evaluated pose. `free`:
    BoolTensor (B, N), the objects whose poses move (None: all)."""
    B, N = t.shape_ids.shape
    hard, settings = fd.renderer, fd.settings
    present = t.shape_ids >= 0  # (B, N)
    if free is not None:
        present = present & free
    invariant = torch.tensor([o.yaw_period == 0.0 for o in world.objects], device=t.shape_ids.device)
    turns = present & ~invariant[t.shape_ids.clamp(min=0)]  # (B, N): yaws that refinement frees
    active = torch.cat([present.repeat_interleave(2, dim=1), turns], dim=1)  # (B, 3N)
    steps = torch.tensor([settings.position_step] * (2 * N) + [settings.yaw_step] * N)
    appearance = None if look is None else look.appearance()

    def split(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q[:, : 2 * N].reshape(-1, N, 2), q[:, 2 * N :]  # (M, N, 2) positions, (M, N) yaws

    def render(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        positions, yaws = split(q)
        row_colors = None if colors is None else colors[rows]
        args = (t.shape_ids[rows], positions, yaws, row_colors)
        out = hard(*args) if appearance is None else hard(*args, appearance.take(rows))
        return out.images.flatten(1)  # (M, 3 H W)

    def project(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        positions, yaws = split(q)
        clamped = clamp_to_table(t.shape_ids[rows], positions, yaws, world)
        return torch.cat([clamped.flatten(1), yaws], dim=1)

    def perturb(q: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, base_q: torch.Tensor, base: torch.Tensor):
        slot = torch.where(cols < 2 * N, cols // 2, cols - 2 * N)  # the object whose x, y or yaw entry cols is
        row_colors = None if colors is None else colors[rows]
        look_rows = None if appearance is None else appearance.take(rows)
        return redraw_moved(hard, t.shape_ids[rows], split(q), split(base_q), slot, base, row_colors, look_rows)

    start = torch.cat([t.positions.reshape(B, 2 * N), t.yaws], dim=1)  # (B, 3N)
    lm = replace(cfg.lm, iterations=cfg.steps)
    H, W = images.shape[2:]
    blur = SMOOTHING.get(cfg.smoothing)
    smooth = None if blur is None else (lambda y: blur(y.view(-1, 3, H, W)).flatten(1))
    windowed = hasattr(hard, "object_boxes")
    x = images.flatten(1)
    result = levenberg_marquardt(render, start, x, steps, active, lm, project, look is not None, smooth,
                                 perturb if windowed else None)  # fmt: skip
    return split(result.params)


def redraw_moved(
    renderer: torch.nn.Module,
    shape_ids: torch.Tensor,
    pose: tuple[torch.Tensor, torch.Tensor],
    base_pose: tuple[torch.Tensor, torch.Tensor],
    moved: torch.Tensor,
    base: torch.Tensor,
    colors: torch.Tensor | None = None,
    appearance: Appearance | None = None,
) -> torch.Tensor:
    """Renders of M scenes that differ from their base renders by the pose of one object each, drawn only about
    where that object is or was (a window holding its `object_boxes` at both poses) and copied from the base
    elsewhere: the same images at the cost of those pixels (a finite-difference Jacobian's renders).

    Args:
        renderer: an OpenGLRenderer (it draws pixel windows); shape_ids LongTensor (M, N).
        pose, base_pose: (positions FloatTensor (M, N, 2), yaws (M, N)), the scenes now and in their base renders.
        moved: LongTensor (M,), the slot whose object moved (the only one whose pose may differ).
        base: FloatTensor (M, 3 H W), the base renders, flattened; colors (M, N, 3) or None; appearance or None.
    Returns:
        FloatTensor (M, 3 H W).
    """
    M = shape_ids.shape[0]
    one = moved[:, None]  # (M, 1)
    ids = shape_ids.gather(1, one)  # (M, 1)

    xy = torch.cat([p.gather(1, one[..., None].expand(M, 1, 2)) for p in (pose[0], base_pose[0])])  # (2M, 1, 2)
    yaw = torch.cat([y.gather(1, one) for y in (pose[1], base_pose[1])])  # (2M, 1)
    eye = None if appearance is None or appearance.eye is None else torch.cat([appearance.eye, appearance.eye])
    boxes = renderer.object_boxes(torch.cat([ids, ids]), xy, yaw, eye)[:, 0]  # type: ignore[operator]  # (2M, 4)
    now, before = boxes[:M], boxes[M:]
    windows = torch.cat([torch.minimum(now[:, :2], before[:, :2]), torch.maximum(now[:, 2:], before[:, 2:])], 1)
    return renderer(shape_ids, *pose, colors, appearance, windows=windows, background=base).images.flatten(1)


def _renderer(world: World, size: tuple[int, int], gradient: str, legacy: bool) -> torch.nn.Module:
    """The refinement's differentiable renderer of `world` at `size` (W, H), built once (RefineConfig.gradient)."""
    return world3d.renderer(world, "soft" if gradient == "soft" else "fd", size, "auto", legacy)


def refine(
    scenes: Sequence[Scene | dict],
    images: torch.Tensor,
    config: RefineConfig | None = None,
    world: World | None = None,
    start_appearance: AppearanceFit | None = None,
) -> list[dict]:
    """Refine the poses of `scenes` against the observed `images` by render and compare.

    Args:
        scenes: B predicted scenes (Scene or JSON-format dicts in the world's object names; objects may stick out
            of the table).
        images: FloatTensor (B, 3, H, W) in [0, 1], the observed renders (any size: the world is rendered at it).
        config: step sizes and length; default RefineConfig().
        world: the World the scenes live in (the model's); None: the built-in primitives world.
        start_appearance: where the appearance fit starts (e.g. the guide's estimate); None: nominal.
    Returns:
        B scenes in the tabletop JSON format, same shapes and counts, refined poses. With `config.appearance`,
        each scene dict also holds "appearance": {"gain", "light_direction", "ambient"}, the fitted appearance.
    """
    cfg = config or RefineConfig()
    legacy = world is None
    w = world or world3d.primitives()
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    if legacy and images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be (B, 3, H, H) in [0, 1] for the primitives world, got {tuple(images.shape)}")
    if len(scenes) != images.shape[0]:
        raise ValueError(f"got {len(scenes)} scenes for {images.shape[0]} images")
    start = [as_scene(s).to_dict() if legacy else _plain(s) for s in scenes]
    t = world3d.scenes_to_tensors(w, start, images.device)
    searching = cfg.search is not None
    objects = bool((t.shape_ids >= 0).any())
    if not searching and (cfg.steps == 0 or not (objects or cfg.appearance)):
        return start
    size = (int(images.shape[3]), int(images.shape[2]))
    renderer = _renderer(w, size, cfg.gradient, legacy)
    colors = _colors_of(cfg, w, legacy, t.shape_ids)
    look = None
    # Gauss-Newton's light is fitted on the refined poses (on the start's, misplaced objects would pull it), then
    # the poses refined again where it turned; before the poses, only the gain on the start's light or the nominal
    staged = cfg.appearance and cfg.appearance_method == "gauss-newton" and _appearance_steps(cfg) > 0
    staged = staged and objects and cfg.steps > 0 and cfg.method == "lm"
    if cfg.appearance:
        steps = 0 if staged else _appearance_steps(cfg)
        look = fit_appearance(w, t, images.detach(), colors, steps, start_appearance, method=cfg.appearance_method)
        moved = w.randomize is not None and w.randomize.camera_position > 0
        if (cfg.camera if cfg.camera is not None else moved) and not legacy and objects:
            look = fit_eye(w, t, images.detach(), colors, look)
    if not objects and not searching:  # only the table: the appearance is all there is to fit
        assert look is not None
        return [{**s, "appearance": a} for s, a in zip(start, look.to_dicts())]
    if objects and cfg.steps > 0:
        if cfg.method == "lm":
            assert isinstance(renderer, FiniteDifferenceRenderer)  # gradient "fd": the hard render with its steps
            positions, yaws = _levenberg_marquardt(renderer, w, t, images.detach(), colors, cfg, look)
        else:
            positions, yaws = _descend(renderer, w, t, images.detach(), colors, cfg, look)
        yaws = torch.remainder(yaws + math.pi, 2 * math.pi) - math.pi  # back to [-pi, pi)
        t = SceneTensors(t.shape_ids, positions.detach(), yaws.detach())
        if staged:
            assert look is not None and isinstance(renderer, FiniteDifferenceRenderer)
            fitted = fit_appearance(w, t, images.detach(), colors, _appearance_steps(cfg), look)
            turned = (fitted.light_direction * look.light_direction).sum(1) < math.cos(math.radians(0.5))
            look = fitted
            if cfg.albedo and colors is not None:
                albedo = _albedo(renderer, t, images.detach(), colors, colors, look)
                turned |= ((albedo - colors).abs() > 0.01).flatten(1).any(1)
                colors = albedo
            t = _refine_rows(renderer, w, t, turned.nonzero(as_tuple=True)[0], images.detach(), colors, cfg, look)
    if searching:
        assert isinstance(renderer, FiniteDifferenceRenderer)
        searched = _search(renderer, w, t, images.detach(), cfg, look, legacy)
        polished = _polish(renderer, w, t, searched, images.detach(), cfg, look, legacy)
        t = _unseen_removed(renderer, w, polished, _changed(t, searched), images.detach(), cfg, look, legacy)
        t = SceneTensors(t.shape_ids, t.positions, torch.remainder(t.yaws + math.pi, 2 * math.pi) - math.pi)
    refined = world3d.tensors_to_scenes(w, t)
    # an interpenetrating result falls back to its start, unless the search changed the scene (it refuses moves
    # that interpenetrate; the start is then another scene)
    out = [
        s if _interpenetrates(w, r) and not _interpenetrates(w, s) and _same_objects(s, r) else r
        for s, r in zip(start, refined)
    ]
    if look is not None:
        out = [{**s, "appearance": a} for s, a in zip(out, look.to_dicts())]
    return out


def _search(
    fd: FiniteDifferenceRenderer,
    world: World,
    t: SceneTensors,
    images: torch.Tensor,
    cfg: RefineConfig,
    look: AppearanceFit | None,
    legacy: bool,
) -> SceneTensors:
    """The structure search (scene_search) after the poses, rendering and refining as `refine` does."""
    assert cfg.search is not None

    def colors_of(shape_ids: torch.Tensor) -> torch.Tensor | None:
        return _colors_of(cfg, world, legacy, shape_ids)

    table = None if legacy else torch.tensor(world.table.color, dtype=images.dtype)  # fitted with the albedos

    def out_eye(rows: torch.Tensor) -> torch.Tensor | None:
        return None if look is None or look.eye is None else look.eye[rows]

    def render(s: SceneTensors, rows: torch.Tensor) -> torch.Tensor:
        colors = colors_of(s.shape_ids)
        if look is None:
            out = fd.renderer(s.shape_ids, s.positions, s.yaws, colors).images
        else:
            out = _lit(fd, s, colors, world3d.rows_of(look, rows), images[rows])
            if cfg.albedo and colors is not None:
                ids = instance_ids(fd.renderer, s, out_eye(rows))
                fitted = fit_albedo(out, ids, images[rows], colors, colors, table)[1]
                return torch.stack([fitted, out], 1)
        return torch.stack([out, out], 1)

    def fit(s: SceneTensors, rows: torch.Tensor, slots: torch.Tensor) -> SceneTensors:
        sub = None if look is None else world3d.rows_of(look, rows)
        lm = replace(cfg, steps=cfg.search.lm_steps)  # type: ignore[union-attr]
        free = torch.zeros_like(s.shape_ids, dtype=torch.bool)
        free[torch.arange(len(slots)), slots] = True
        positions, yaws = _levenberg_marquardt(fd, world, s, images[rows], colors_of(s.shape_ids), lm, sub, free)
        return SceneTensors(s.shape_ids, positions.detach(), yaws.detach())

    def drawn(s: SceneTensors, rows: torch.Tensor) -> torch.Tensor:
        return instance_ids(fd.renderer, s, out_eye(rows)) >= 0

    screen = None
    if hasattr(fd.renderer, "object_boxes"):  # OpenGL: it draws pixel windows
        screen = _windowed_screen(fd.renderer, world, images, cfg, look, legacy)
    with torch.no_grad():
        return search_scenes(world, t, images, render, fit, cfg.search, screen, drawn)


def _windowed_screen(
    renderer: torch.nn.Module,
    world: World,
    images: torch.Tensor,
    cfg: RefineConfig,
    look: AppearanceFit | None,
    legacy: bool,
):
    """The add move's trial losses (scene_search.Screen) from renders drawn only in a window about each added
    object: a trial is its scene (rendered whole once, as `_search`'s render does: gain solved, albedos fitted) with
    one object more, so its loss differs only in the pixels the new object covers. There the trial's pixels are the
    new object's render under the scene's gain, its albedo fitted in closed form on them (as `fit_albedo` would);
    elsewhere the scene's. Not modelled: the gain re-solved and the other objects' albedos refitted with the new
    object in the image (both move little for one object more; the few trials the search refines are rendered
    whole)."""

    table = None if legacy else torch.tensor(world.table.color, dtype=images.dtype)  # fitted with the albedos

    def screen(trial: SceneTensors, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        M = len(rows)
        ar = torch.arange(M)
        scenes, first, inverse = _unique_rows(rows)
        base = world3d.rows_of(trial, first)
        base.shape_ids[torch.arange(len(first)), slot[first]] = -1  # the scenes without their trial object
        x = images[scenes]
        colors = _colors_of(cfg, world, legacy, base.shape_ids)
        appearance = None if look is None else world3d.rows_of(look, scenes).appearance()
        raw = renderer(base.shape_ids, base.positions, base.yaws, colors, appearance).images
        gain = torch.ones(len(scenes)) if look is None else look.solve_gain(raw, x)
        lit = (raw * gain[:, None, None, None]).clamp(max=1.0)
        fitted = lit
        if cfg.albedo and look is not None and colors is not None:
            eye = None if look.eye is None else look.eye[scenes]
            fitted = fit_albedo(lit, instance_ids(renderer, base, eye), x, colors, colors, table)[1]
        base_loss = image_loss(fitted, x)  # (S,)
        # the trials, drawn in a tile about the added object (as the renderer places its tiles)
        one = slot[:, None]
        boxes = renderer.object_boxes(  # type: ignore[operator]
            trial.shape_ids.gather(1, one),
            trial.positions.gather(1, one[..., None].expand(M, 1, 2)),
            trial.yaws.gather(1, one),
            None if look is None or look.eye is None else look.eye[rows],
        )[:, 0]
        trial_colors = _colors_of(cfg, world, legacy, trial.shape_ids)
        trial_look = None if look is None else world3d.rows_of(look, rows).appearance()
        drawn, corner = renderer.tiles(  # type: ignore[operator]
            trial.shape_ids, trial.positions, trial.yaws, trial_colors, trial_look, boxes
        )
        new = drawn.images  # (M, 3, h, w)
        h, w = new.shape[2:]
        u = corner[:, 0, None] + torch.arange(w)  # (M, w)
        v = corner[:, 1, None] + torch.arange(h)  # (M, h)

        def crop_of(per_scene: torch.Tensor) -> torch.Tensor:  # (S, 3, H, W), the trials' scenes
            return per_scene[inverse[:, None, None], :, v[:, :, None], u[:, None, :]].permute(0, 3, 1, 2)

        before, seen, target = crop_of(raw), crop_of(fitted), crop_of(x)
        # the pixels the new object covers (a tile's other pixels match the whole render's to ~1e-5: its camera
        # matrix frames the tile)
        mine = ((new - before).abs() > 1e-3).any(1, keepdim=True)  # (M, 1, h, w)
        r = (new * gain[inverse, None, None, None]).clamp(max=1.0)
        if cfg.albedo and look is not None and trial_colors is not None:  # the new object's albedo on its pixels
            nominal = trial_colors[ar, slot][:, None]  # (M, 1, 3)
            r = fit_albedo(r, torch.where(mine[:, 0], 0, -1), target, nominal, nominal)[1]
        after = torch.where(mine, r, seen)
        change = ((target - after) ** 2 - (target - seen) ** 2).flatten(1).sum(1)
        return base_loss[inverse] + change

    return screen


def _unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct values of `rows` (S,), the index of each one's first occurrence (S,), and each entry's index
    into the distinct values (M,)."""
    scenes, inverse = torch.unique(rows, return_inverse=True)
    first = torch.full((len(scenes),), len(rows), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(rows)), "amin"
    )
    return scenes, first, inverse


def _albedo(
    fd: FiniteDifferenceRenderer,
    t: SceneTensors,
    images: torch.Tensor,
    colors: torch.Tensor,
    nominal: torch.Tensor,
    look: AppearanceFit,
) -> torch.Tensor:
    """(B, N, 3) each object's albedo fitted to `images` (appearance.fit_albedo) under `look`, from `colors`."""
    rendered = _lit(fd, t, colors, look, images)
    return fit_albedo(rendered, instance_ids(fd.renderer, t, look.eye), images, colors, nominal)[0]


def _lit(
    fd: FiniteDifferenceRenderer,
    t: SceneTensors,
    colors: torch.Tensor | None,
    look: AppearanceFit,
    images: torch.Tensor,
) -> torch.Tensor:
    """(B, 3, H, W) hard renders of `t` under `look`'s light, each with its gain solved against `images`."""
    rendered = fd.renderer(t.shape_ids, t.positions, t.yaws, colors, look.appearance()).images
    return (rendered * look.solve_gain(rendered, images)[:, None, None, None]).clamp(max=1.0)


def _colors_of(cfg: RefineConfig, world: World, legacy: bool, shape_ids: torch.Tensor) -> torch.Tensor | None:
    """The nominal albedos (B, N, 3) refinement renders objects in (None: the renderer's own, pre-world models)."""
    if cfg.color_by_shape:
        return tabletop.shape_colors(shape_ids)
    return None if legacy else world3d.object_colors(world, shape_ids)


def _refine_rows(
    fd: FiniteDifferenceRenderer,
    world: World,
    t: SceneTensors,
    rows: torch.Tensor,
    images: torch.Tensor,
    colors: torch.Tensor | None,
    cfg: RefineConfig,
    look: AppearanceFit | None,
) -> SceneTensors:
    """`t` with scenes `rows` refined again by the config's K LM iterations, all their objects together, under
    `colors` (B, N, 3) and `look` (both of the whole batch)."""
    if len(rows) == 0:
        return t
    c = None if colors is None else colors[rows]
    look_rows = None if look is None else world3d.rows_of(look, rows)
    positions, yaws = _levenberg_marquardt(fd, world, world3d.rows_of(t, rows), images[rows], c, cfg, look_rows)
    out = SceneTensors(t.shape_ids, t.positions.clone(), t.yaws.clone())
    out.positions[rows] = positions.detach()
    out.yaws[rows] = torch.remainder(yaws.detach() + math.pi, 2 * math.pi) - math.pi
    return out


def _appearance_steps(cfg: RefineConfig) -> int:
    assert cfg.appearance_steps is not None  # set by __post_init__
    return cfg.appearance_steps


def _polish(
    fd: FiniteDifferenceRenderer,
    world: World,
    before: SceneTensors,
    after: SceneTensors,
    images: torch.Tensor,
    cfg: RefineConfig,
    look: AppearanceFit | None,
    legacy: bool,
) -> SceneTensors:
    """`after` (the searched scenes) with the scenes whose objects the search changed refined again by LM, all
    their objects together, for the config's K iterations: a move refines only its own object, by a few
    iterations, with the others held where they were."""
    rows = _changed(before, after)
    if len(rows) == 0 or cfg.steps == 0:
        return after
    colors = _colors_of(cfg, world, legacy, after.shape_ids)
    if cfg.albedo and look is not None and colors is not None:
        nominal = colors[rows]
        sub, look_rows = world3d.rows_of(after, rows), world3d.rows_of(look, rows)
        colors = colors.clone()
        colors[rows] = _albedo(fd, sub, images[rows], nominal, nominal, look_rows)
    return _refine_rows(fd, world, after, rows, images, colors, cfg, look)


def _changed(before: SceneTensors, after: SceneTensors) -> torch.Tensor:
    """LongTensor: the scenes whose objects differ between `before` and `after` (which may have more slots)."""
    n = before.shape_ids.shape[1]
    same = (after.shape_ids[:, :n] == before.shape_ids).all(1) & (after.shape_ids[:, n:] < 0).all(1)
    return (~same).nonzero(as_tuple=True)[0]


def _unseen_removed(
    fd: FiniteDifferenceRenderer,
    world: World,
    t: SceneTensors,
    rows: torch.Tensor,
    images: torch.Tensor,
    cfg: RefineConfig,
    look: AppearanceFit | None,
    legacy: bool,
) -> SceneTensors:
    """`t` without the objects of scenes `rows` (ascending) that the image cannot see (their own signal, the
    render's change without them, at most scene_search.MIN_SIGNAL): the search's remove move takes them out, but
    polishing all of a searched scene's objects together can move one wholly behind another after the search."""
    slots = (t.shape_ids[rows] >= 0).nonzero(as_tuple=True)
    if len(rows) == 0 or len(slots[0]) == 0:
        return t
    scene, slot = rows[slots[0]], slots[1]

    def nominal(s: SceneTensors, of: torch.Tensor) -> torch.Tensor:
        colors = _colors_of(cfg, world, legacy, s.shape_ids)
        if look is None:
            return fd.renderer(s.shape_ids, s.positions, s.yaws, colors).images
        return _lit(fd, s, colors, world3d.rows_of(look, of), images[of])

    full = nominal(world3d.rows_of(t, rows), rows)
    without = world3d.rows_of(t, scene)
    without.shape_ids[torch.arange(len(scene)), slot] = -1
    base = full[torch.searchsorted(rows, scene)]  # rows ascend (`_changed`)
    signal = ((base - nominal(without, scene)) ** 2).flatten(1).sum(1)
    unseen = signal <= MIN_SIGNAL
    if not unseen.any():
        return t
    out = SceneTensors(t.shape_ids.clone(), t.positions, t.yaws)
    out.shape_ids[scene[unseen], slot[unseen]] = -1
    return out


def _same_objects(a: dict, b: dict) -> bool:
    """Whether two scenes hold the same objects in the same order (poses aside)."""
    return [o["shape"] for o in a["objects"]] == [o["shape"] for o in b["objects"]]


def _plain(scene) -> dict:
    """A scene dict without extra keys (e.g. an earlier "appearance")."""
    d = scene.to_dict() if hasattr(scene, "to_dict") else scene
    if not isinstance(d, dict) or not isinstance(d.get("objects"), list):
        raise ValueError('a scene must be {"objects": [...]}; got ' + repr(scene)[:200])
    return {"objects": [dict(o) for o in d["objects"]]}
