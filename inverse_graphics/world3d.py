"""What the tabletop models take from their World (scenes/world.py): identities, symmetries, footprints, the table,
image size, and the glimpse and position-prior scales derived from the world's own geometry.

Every 3D model keeps its world as `model.world` and carries it in its config as `world.to_dict()` (plain JSON), so
a checkpoint restores the world it was trained for. A config without a world (every checkpoint written before
worlds existed) means the built-in "primitives" world with the scales those checkpoints were trained with
(`LEGACY`), so they give exactly the outputs they always gave.

Derived scales (`derived_scales`), for a world no one here has seen (other units, object sizes, cameras):
- position prior sd, per table axis: the spread of object centres if they were uniform over the part of the table
  where a typical footprint fits, (half side - typical reach - min_gap) / sqrt(3); the typical reach is the mean
  over objects of the mean half-extent of their footprint about the pose origin over all yaws.
- glimpse height: the mean over objects of half their height (the point the glimpse is centred on, metres).
- glimpse window: GLIMPSE_MARGIN times the largest projected diameter (pixels) of any object's bounding sphere
  over the table positions where its centre may be (the table's corners and edge midpoints shrunk by the reach
  and the centre), so the glimpse holds the largest object wherever it stands, with a margin for the coarse
  position's error; square in pixels, whatever the image's aspect.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

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

GLIMPSE_MARGIN = 1.4  # glimpse side / the largest object's projected diameter (module docstring)


@dataclass(frozen=True)
class WorldScales:
    """The world-dependent scales of 3D AIR."""

    position_sd: tuple[float, float]  # metres: (x, y) = position_sd * u, u ~ N(0, I_2)
    glimpse_height: float  # metres above the table of the point each glimpse is centred on
    glimpse_pixels: float  # the glimpse's side in pixels of the model's image


# The primitives world's scales as the pre-world checkpoints were trained with: 0.12 m, 5 cm, 0.75 normalised units
# of a 64-pixel image = 24 pixels (glimpse_pixels is scaled with the image: 0.75 / 2 of its side).
LEGACY = {"position_sd": 0.12, "glimpse_height": 0.05, "glimpse_window": 0.75}


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


def _reach(world: World) -> float:
    """Mean over objects of the footprint's mean half-extent (over yaws) about the pose origin, metres."""
    angles = np.linspace(0, math.pi, 12, endpoint=False)
    reaches = []
    for obj in world.objects:
        ext = [np.abs(obj.footprint_at((0.0, 0.0), float(a))).max(0).mean() for a in angles]
        reaches.append(float(np.mean(ext)))
    return float(np.mean(reaches))


def _project(world: World, points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """World points (P, 3) -> pixel coordinates (P, 2) of an image of `size` (W, H), with depth (P,)."""
    from renderers.opengl import world_to_clip

    m = world_to_clip(world.camera.renderer_camera(size), size).astype(np.float64)
    clip = np.concatenate([points, np.ones((len(points), 1))], 1) @ m.T
    ndc = clip[:, :2] / clip[:, 3:]
    W, H = size
    return np.stack([(ndc[:, 0] + 1) * W / 2, (1 - ndc[:, 1]) * H / 2], 1)


def derived_scales(world: World, image_size: tuple[int, int] | None = None) -> WorldScales:
    """The scales of the module docstring for `world` seen at `image_size` (W, H; default the world's)."""
    size = image_size or world.image_size
    hx, hy = table_half_sizes(world)
    reach = _reach(world) + world.min_gap
    sd = tuple(max(h - reach, 0.25 * h) / math.sqrt(3) for h in (hx, hy))
    heights = [float(o.mesh.bounds[1, 2]) for o in world.objects]
    height = float(np.mean(heights)) / 2
    ex, ey = max(hx - reach, 0.0), max(hy - reach, 0.0)
    spots = np.array([(x, y) for x in (-ex, 0.0, ex) for y in (-ey, 0.0, ey)])
    diameter = 0.0
    for obj in world.objects:
        lo, hi = obj.mesh.bounds
        centre = (lo + hi) / 2
        radius = float(np.linalg.norm(hi - lo)) / 2
        for x, y in spots:
            c = np.array([x + centre[0], y + centre[1], centre[2]])
            # the projected diameter of the bounding sphere: two points `radius` apart across the view direction
            view = c - np.asarray(world.camera.eye)
            side = np.cross(view, [0.0, 0.0, 1.0])
            side = side / (np.linalg.norm(side) or 1.0) * radius
            px = _project(world, np.stack([c - side, c + side]), size)
            diameter = max(diameter, float(np.linalg.norm(px[1] - px[0])))
    return WorldScales((float(sd[0]), float(sd[1])), height, GLIMPSE_MARGIN * diameter)


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
