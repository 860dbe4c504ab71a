"""What the tabletop models take from their World (scenes/world.py): identities, symmetries, footprints, the table,
image size, and the glimpse and position-prior scales derived from the world's own geometry.

Every 3D model keeps its world as `model.world` and carries it in its config as `world.to_dict()` (plain JSON), so
a checkpoint restores the world it was trained for. A config without a world (every checkpoint written before
worlds existed) means the built-in "primitives" world with the scales those checkpoints were trained with
(`LEGACY`), so they give exactly the outputs they always gave.

Derived scales (`derived_scales`), for a world no one here has seen (other units, object sizes, cameras), all
measured on the world's own scene sampler (200 scenes, seed 0), so they follow its table, objects and camera:
- position prior sd, per table axis: the standard deviation of the sampled object centres (the prior then has
  the data's spread; the primitives world: 0.107 m, where its hand-set value was 0.12).
- glimpse height: the mean over objects of half their height (the point the glimpse is centred on, metres).
- glimpse side, in pixels (square whatever the image's aspect): GLIMPSE_MARGIN times the 90th percentile of the
  sampled objects' projected extents (the larger side of the pixel bounding box of the posed mesh), so nine in
  ten objects fit with a margin for the coarse position's error. The margin 1.25 is the ratio of the primitives
  world's hand-set 24 pixels (which trained to the targets) to that percentile there (19 pixels).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inverse_graphics.air import check_float_tensor, check_unit_range
from scenes.world import SceneTensors, World, load_world

__all__ = [
    "LEGACY",
    "GLIMPSE_MARGIN",
    "WorldScales",
    "world_from_config",
    "primitives",
    "derived_scales",
    "yaw_orders",
    "count_prior",
    "footprint_table",
    "table_half_sizes",
    "clamp_to_table",
    "scenes_to_tensors",
    "tensors_to_scenes",
    "object_colors",
    "check_images",
    "prepare_images",
    "renderer",
]

GLIMPSE_MARGIN = 1.25  # glimpse side / the 90th percentile of objects' projected extents (module docstring)
SCALE_SCENES = 200  # scenes of the world's sampler that the scales are measured on
SCALE_OBJECTS = 150  # objects of those whose projected extent is measured


@dataclass(frozen=True)
class WorldScales:
    """The world-dependent scales of 3D AIR."""

    position_sd: tuple[float, float]  # metres: (x, y) = position_sd * u, u ~ N(0, I_2)
    glimpse_height: float  # metres above the table of the point each glimpse is centred on
    glimpse_pixels: float  # the glimpse's side in pixels of the model's image


# The primitives world's scales as the pre-world checkpoints were trained with: 0.12 m, 5 cm, 0.75 normalised units
# of a 64-pixel image = 24 pixels (glimpse_pixels is scaled with the image: 0.75 / 2 of its side).
LEGACY = {"position_sd": 0.12, "glimpse_height": 0.05, "glimpse_window": 0.75, "glimpse_size": 24, "glimpse_stride": 1}


@cache
def primitives() -> World:
    """The built-in primitives world (what a config without a world means)."""
    return load_world("primitives")


def world_from_config(world: dict | None) -> World:
    """The World of a config's `world` field: None = the primitives world, else `World.from_dict`."""
    return primitives() if world is None else World.from_dict(world, source="model config 'world'")


def table_half_sizes(world: World) -> tuple[float, float]:
    """(x, y) half sides of the table, metres."""
    return world.table.size[0] / 2, world.table.size[1] / 2


def _project(world: World, points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """World points (P, 3) -> continuous pixel coordinates (P, 2) (from the top left) in an image of (W, H)."""
    from renderers.opengl import world_to_clip

    m = world_to_clip(world.camera.renderer_camera(size), size).astype(np.float64)
    clip = np.concatenate([points, np.ones((len(points), 1))], 1) @ m.T
    ndc = clip[:, :2] / clip[:, 3:]
    W, H = size
    return np.stack([(ndc[:, 0] + 1) * W / 2, (1 - ndc[:, 1]) * H / 2], 1)


@cache
def derived_scales(world: World, image_size: tuple[int, int] | None = None) -> WorldScales:
    """The scales of the module docstring for `world` seen at `image_size` (W, H; default the world's), measured
    on SCALE_SCENES scenes of the world's own sampler (seed 0: the same world, the same scales)."""
    size = image_size or world.image_size
    scenes = world.sample_scenes(SCALE_SCENES, seed=0)
    objects = [o for s in scenes for o in s["objects"]]
    if len(objects) < 2:  # a world of empty scenes only: place one object of each kind at the centre
        objects = [{"shape": o.name, "position": [0.0, 0.0], "yaw": 0.0} for o in world.objects]
    xy = np.array([o["position"] for o in objects])
    sd = xy.std(0) if len(objects) > 1 else np.zeros(2)
    half = np.array(table_half_sizes(world))
    sd = np.where(sd > 0.05 * half, sd, half / math.sqrt(3))  # degenerate samples: uniform over the table
    extents = []
    for o in objects[:SCALE_OBJECTS]:
        v = np.asarray(world.object_named(o["shape"]).mesh.vertices, dtype=np.float64)
        c, s = math.cos(o["yaw"]), math.sin(o["yaw"])
        posed = v @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T + np.array([*o["position"], 0.0])
        extents.append(float(np.ptp(_project(world, posed, size), axis=0).max()))
    heights = [float(o.mesh.bounds[1, 2]) for o in world.objects]
    pixels = GLIMPSE_MARGIN * float(np.percentile(extents, 90))
    return WorldScales((float(sd[0]), float(sd[1])), float(np.mean(heights)) / 2, pixels)


def yaw_orders(world: World, symmetric: bool = True) -> torch.Tensor:
    """LongTensor (S,): the m of each object's yaw code (cos m yaw, sin m yaw); 0 for any-yaw objects.

    symmetric: m = 2 pi / the object's yaw period (a cube 4, a box 2, no symmetry 1); else m = 1 for every object
    with a yaw."""
    periods = [o.yaw_period for o in world.objects]
    return torch.tensor([0 if p == 0.0 else max(round(2 * math.pi / p), 1) if symmetric else 1 for p in periods])


def count_prior(low: int, high: int, steps: int) -> torch.Tensor:
    """FloatTensor (T,) rho_t = p(z_pres_t = 1 | z_pres_{t-1} = 1) making the count uniform on [low, high] with
    T = steps >= high: 1 before `low`, (high - t) / (high - t + 1) from there (0 past `high`), kept within
    [1e-6, 1 - 1e-6] so that every KL stays finite."""
    rho = [1.0 if t < low else (high - t) / (high - t + 1) if t < high else 0.0 for t in range(steps)]
    return torch.tensor(rho).clamp(1e-6, 1 - 1e-6) if (low > 0 or steps > high) else torch.tensor(rho)


_FOOTPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def footprint_table(world: World) -> torch.Tensor:
    """FloatTensor (S, P, 2): each object's footprint polygon in its object frame, padded by repeating a corner."""
    if world not in _FOOTPRINTS:
        polygons = [torch.tensor(o.footprint, dtype=torch.float32) for o in world.objects]
        P = max(len(p) for p in polygons)
        _FOOTPRINTS[world] = torch.stack([torch.cat([p, p[:1].expand(P - len(p), 2)]) for p in polygons])
    return _FOOTPRINTS[world]


def clamp_to_table(world: World, shape_ids: torch.Tensor, positions: torch.Tensor, yaws: torch.Tensor):
    """Move each object the least distance that puts its whole footprint on the world's table.

    shape_ids LongTensor (B, N) (-1 empty), positions FloatTensor (B, N, 2), yaws (B, N) -> positions (B, N, 2)."""
    local = footprint_table(world).to(positions)[shape_ids.clamp(min=0)]  # (B, N, P, 2)
    c, s = torch.cos(yaws)[..., None], torch.sin(yaws)[..., None]
    x, y = local[..., 0], local[..., 1]
    rx, ry = c * x - s * y, s * x + c * y  # (B, N, P) posed offsets
    half = positions.new_tensor(table_half_sizes(world))
    low = -half + torch.stack([(-rx).amax(-1), (-ry).amax(-1)], -1)  # the centre may go this far left / down
    high = half - torch.stack([rx.amax(-1), ry.amax(-1)], -1)
    clamped = torch.maximum(torch.minimum(positions, high), low)
    return torch.where(shape_ids[..., None] >= 0, clamped, positions)


def scenes_to_tensors(world: World, scenes: Sequence, device: str | torch.device = "cpu") -> SceneTensors:
    """Scenes (JSON dicts or objects with `to_dict()`) -> padded tensors; only names and finite poses are checked
    (predictions may overlap or stand off the table)."""
    parsed = [s.to_dict() if hasattr(s, "to_dict") else s for s in scenes]
    ids = {name: k for k, name in enumerate(world.shape_names)}
    B, N = len(parsed), max((len(s["objects"]) for s in parsed), default=0)
    shape_ids = torch.full((B, N), -1, dtype=torch.long)
    positions, yaws = torch.zeros(B, N, 2), torch.zeros(B, N)
    for b, scene in enumerate(parsed):
        for i, o in enumerate(scene["objects"]):
            if o["shape"] not in ids:
                raise ValueError(f"unknown shape {o['shape']!r} in world {world.name!r}; known: {', '.join(ids)}")
            shape_ids[b, i] = ids[o["shape"]]
            positions[b, i] = torch.tensor([float(v) for v in o["position"]])
            yaws[b, i] = float(o["yaw"])
    return SceneTensors(shape_ids.to(device), positions.to(device), yaws.to(device))


def tensors_to_scenes(world: World, t: SceneTensors) -> list[dict]:
    """Padded tensors -> JSON scene dicts in the world's object names (empty slots dropped)."""
    names = world.shape_names
    rows = zip(t.shape_ids.tolist(), t.positions.tolist(), t.yaws.tolist(), strict=True)
    return [
        {"objects": [{"shape": names[k], "position": [p[0], p[1]], "yaw": y} for k, p, y in zip(i, ps, ys) if k >= 0]}
        for i, ps, ys in rows
    ]


def rows_of(x, keep: torch.Tensor):
    """A dataclass of per-scene tensors (first dimension B), e.g. SceneTensors or AppearanceFit, with only the scenes
    `keep` (LongTensor); a field that is None stays None."""
    values = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
    return dataclasses.replace(x, **{k: None if v is None else v[keep] for k, v in values.items()})


def rerender(model, scenes: list[dict]) -> torch.Tensor:
    """Hard renders (B, 3, H, W) of a tabletop model's inferred scene dicts in its world, at its image size, in the
    world's object colours (the pre-world primitives models: the renderer's own, as they were trained)."""
    world = model.world
    t = scenes_to_tensors(world, scenes)  # results, not inputs: no table checks
    colors = None if model.legacy else object_colors(world, t.shape_ids)
    backend = getattr(model.config, "backend", "auto")
    return t.render(renderer(world, "hard", model.image_wh, backend, model.legacy), colors).images


def object_colors(world: World, shape_ids: torch.Tensor) -> torch.Tensor:
    """FloatTensor (B, N, 3): each object's nominal albedo (empty slots get the first object's)."""
    return world.colors.to(shape_ids.device)[shape_ids.clamp(min=0)]


def check_images(images, size: tuple[int, int]) -> torch.Tensor:
    """A float tensor (B, 3, H, W) in [0, 1] without NaN, (W, H) = size; TypeError / ValueError naming both sizes."""
    W, H = size
    expect = f"(B, 3, {H}, {W})"
    check_float_tensor(images, expect)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape {expect} (RGB, channels first), got {tuple(images.shape)}")
    if tuple(images.shape[2:]) != (H, W):
        got = f"{images.shape[3]} x {images.shape[2]}"
        raise ValueError(
            f"images must have shape {expect}: the model's world renders {W} x {H} (W x H) images, got {got}; "
            "resize them (e.g. infer(images, resize=True)) or use a model of that size"
        )
    check_unit_range(images)
    return images


def prepare_images(images, size: tuple[int, int], resize: bool) -> torch.Tensor:
    """`check_images`, after an explicit bilinear resize (antialiased) to `size` when `resize` is True."""
    if resize and isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
        W, H = size
        if tuple(images.shape[2:]) != (H, W):
            images = F.interpolate(images, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
            images = images.clamp(0.0, 1.0)
    return check_images(images, size)


_RENDERERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def renderer(world: World, kind: str, size: tuple[int, int], backend: str = "auto", legacy: bool = False):
    """The world's renderer of one kind at `size` (W, H), built once per world: "hard" (forward only), "fd" (the
    hard one with finite-difference gradients, about one pixel steps) or "soft" (PyTorch3D's soft rasterizer).
    legacy: the finite-difference steps of the pre-world models (64 / H times the 64-pixel defaults)."""
    from renderers.finite_difference import FiniteDifferenceRenderer, FiniteDifferenceSettings

    cache = _RENDERERS.setdefault(world, {})
    key = (kind, size, backend, legacy)
    if key not in cache:
        image_size: int | tuple[int, int] = size[0] if size[0] == size[1] else size
        if kind == "hard":
            cache[key] = _hard(world, backend, image_size)
        elif kind == "fd":
            camera = None if legacy else world.camera.renderer_camera(size)
            steps = FiniteDifferenceSettings.for_image_size(size, camera)
            cache[key] = FiniteDifferenceRenderer(renderer(world, "hard", size, backend, legacy), steps)
        elif kind == "soft":
            cache[key] = world.make_renderer("soft", "pytorch3d", image_size=image_size)
        else:
            raise ValueError(f"renderer kind must be 'hard', 'fd' or 'soft', got {kind!r}")
    return cache[key]


def _hard(world: World, backend: str, image_size):
    """A hard renderer: OpenGL when EGL works (backend "auto", with a warning when it falls back), else PyTorch3D."""
    if backend != "auto":
        return world.make_renderer("hard", backend, image_size=image_size)
    import warnings

    from renderers.opengl import OpenGLUnavailableError

    try:
        return world.make_renderer("hard", "opengl", image_size=image_size)
    except OpenGLUnavailableError as err:
        warnings.warn(f"rendering with PyTorch3D (slow): {err}", RuntimeWarning, stacklevel=3)
        return world.make_renderer("hard", "pytorch3d", image_size=image_size)


# ---- runs: the world of a training config -----------------------------------------------------------------
def run_world(name_or_path: str) -> World:
    """A run's World, read once per process and world file version (parsing a file's meshes and measuring their
    symmetry takes a second or two; an edited file is read again)."""
    path = Path(name_or_path)
    key = (str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else name_or_path
    if key not in _WORLDS:
        _WORLDS[key] = load_world(name_or_path)
    return _WORLDS[key]


_WORLDS: dict[object, World] = {}


def scene_options(cfg) -> dict:
    """data3d's keyword arguments for a run's training or held-out renders: its world, or the primitives' counts and
    size. (A 3D training config: `world`, `image_size`, `min_objects`, `max_objects`.)"""
    if cfg.world is not None:
        return {"world": run_world(cfg.world)}
    return {"min_objects": cfg.min_objects, "max_objects": cfg.max_objects, "image_size": cfg.image_size}


def randomizes(cfg) -> bool:
    """Whether a run's training renders are drawn under random appearances: its world has a [randomize] section."""
    return cfg.world is not None and run_world(cfg.world).randomize is not None


def world_digest(cfg) -> str | None:
    """A short hash of the run's world (None without one): a data cache of another world's renders is not reused."""
    if cfg.world is None:
        return None
    text = json.dumps(run_world(cfg.world).to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
