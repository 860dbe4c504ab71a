"""Tabletop scenes of the built-in "primitives" world: a few rigid primitives resting on a square table, seen from
one fixed camera. The general form is `scenes.world.World` (any meshes, table, camera, light, image size): the
constants below are the primitives world's (scenes/worlds/primitives.toml, checked equal by tests/test_world.py),
and `make_renderer` / `render_scenes` render through it.

Conventions (written once, here; docs/tabletop.md summarises them)
- Table frame = world frame: metres, origin at the centre of the table top, x to the right and y away from the
  camera as seen in the image, z up. The table top is the square |x|, |y| <= TABLE_HALF_SIZE at z = 0.
- An object's pose is (x, y, yaw): its footprint centre at (x, y, 0) and a rotation of `yaw` radians about +z,
  counter-clockwise seen from above (object frame defined in `renderers/mesh.py`).
- Object sizes, the camera, the light and the colours are the constants below; at 64 x 64 pixels an object
  covers roughly 100-200 pixels (10-15 pixels across) and the whole table is in view.
- Scene JSON: `{"objects": [{"shape": "cube", "position": [x, y], "yaw": radians}, ...]}`, nothing else.

Objects do not interpenetrate: their footprints (the convex hull of the mesh seen from above, exact for these
upright convex shapes) are disjoint and lie inside the table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from renderers.mesh import Camera, Light, Stage
from scenes.tabletop_objects import SHAPES, footprint, footprints_overlap, library, table_mesh
from scenes.world import SceneTensors, World, load_world

__all__ = [
    "SHAPES",
    "TABLE_HALF_SIZE",
    "CAMERA",
    "LIGHT",
    "SHAPE_COLORS",
    "TableObject",
    "Scene",
    "SceneTensors",
    "validate_scene",
    "sample_scenes",
    "scene_to_json",
    "scene_from_json",
    "scenes_to_tensors",
    "tensors_to_scenes",
    "library",
    "make_stage",
    "primitives_world",
    "make_renderer",
    "render_scenes",
    "perturb_poses",
    "pose_gradients",
]

TABLE_HALF_SIZE = 0.25  # metres; the table top is 0.5 m x 0.5 m
MIN_GAP = 0.01  # metres between sampled footprints, so objects never touch
CAMERA = Camera(eye=(0.0, -0.48, 0.80), at=(0.0, 0.0, 0.0), fov_degrees=40.0, znear=0.4, zfar=1.6)
LIGHT = Light(direction=(-0.4, -0.5, 1.0), ambient=0.35, diffuse=0.65)  # from above left, behind the camera
SHAPE_COLORS = {  # optional per-shape albedo; by default all objects share Stage.object_color
    "cube": (0.90, 0.30, 0.25),
    "sphere": (0.25, 0.60, 0.90),
    "cylinder": (0.30, 0.80, 0.35),
    "box": (0.95, 0.80, 0.25),
    "wedge": (0.75, 0.40, 0.85),
}


@dataclass(frozen=True)
class TableObject:
    """One object on the table."""

    shape: str  # a key of SHAPES
    position: tuple[float, float]  # (x, y) of the footprint centre, metres, table frame
    yaw: float  # radians about +z, counter-clockwise seen from above

    def to_dict(self) -> dict:
        return {"shape": self.shape, "position": [float(p) for p in self.position], "yaw": float(self.yaw)}


@dataclass(frozen=True)
class Scene:
    """A tabletop scene: 0..N objects. Build with `Scene.from_dict` to validate external input."""

    objects: tuple[TableObject, ...] = ()

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict, allow_overlap: bool = False) -> Scene:
        """Parse and validate the JSON format; raises ValueError naming the offending object and field."""
        if not isinstance(data, dict) or set(data) != {"objects"} or not isinstance(data["objects"], list):
            raise ValueError('a tabletop scene must be {"objects": [...]}; got ' + repr(data)[:200])
        scene = cls(tuple(_object_from_dict(i, o) for i, o in enumerate(data["objects"])))
        validate_scene(scene, allow_overlap=allow_overlap)
        return scene


def _object_from_dict(index: int, data: object) -> TableObject:
    if not isinstance(data, dict) or set(data) != {"shape", "position", "yaw"}:
        raise ValueError(f'object {index}: expected keys "shape", "position", "yaw"; got {data!r}')
    position = data["position"]
    if not isinstance(position, (list, tuple)) or len(position) != 2:
        raise ValueError(f"object {index}: position must be [x, y] in metres, got {position!r}")
    try:
        pose = (float(position[0]), float(position[1])), float(data["yaw"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"object {index}: position and yaw must be numbers, got {data!r}") from err
    return TableObject(shape=data["shape"], position=pose[0], yaw=pose[1])


def validate_scene(scene: Scene, allow_overlap: bool = False) -> None:
    """Raise ValueError for an unknown shape, a non-finite pose, an object (partly) off the table or, unless
    `allow_overlap`, two objects that interpenetrate."""
    polygons = []
    for i, obj in enumerate(scene.objects):
        if obj.shape not in SHAPES:
            raise ValueError(f"object {i}: unknown shape {obj.shape!r}; known shapes: {', '.join(SHAPES)}")
        if not all(math.isfinite(v) for v in (*obj.position, obj.yaw)):
            raise ValueError(f"object {i} ({obj.shape}): position and yaw must be finite, got {obj}")
        polygon = footprint(obj.shape, obj.position, obj.yaw)
        if np.abs(polygon).max() > TABLE_HALF_SIZE + 1e-9:
            raise ValueError(
                f"object {i} ({obj.shape}) at {obj.position} is (partly) off the table, "
                f"which spans |x|, |y| <= {TABLE_HALF_SIZE} m"
            )
        polygons.append(polygon)
    for i in range(len(polygons)):
        for j in range(i + 1, len(polygons)):
            if not allow_overlap and footprints_overlap(polygons[i], polygons[j]):
                raise ValueError(f"objects {i} and {j} interpenetrate (their footprints overlap)")


def _sample_object(rng: np.random.Generator, placed: list[np.ndarray]):
    """(object, its footprint) that fits beside the `placed` footprints, or None after 100 rejected tries."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    for _ in range(100):
        x, y = rng.uniform(-TABLE_HALF_SIZE, TABLE_HALF_SIZE, size=2)
        position = (float(x), float(y))
        yaw = float(rng.uniform(-math.pi, math.pi))
        polygon = footprint(shape, position, yaw)
        inside = np.abs(polygon).max() <= TABLE_HALF_SIZE - MIN_GAP
        if inside and not any(footprints_overlap(polygon, other, gap=MIN_GAP) for other in placed):
            return TableObject(shape, position, yaw), polygon
    return None


def _sample_scene(rng: np.random.Generator, count: int) -> Scene:
    while True:  # restart the scene on the (rare) dead end; a handful of objects always fits on the table
        objects: list[TableObject] = []
        polygons: list[np.ndarray] = []
        while len(objects) < count:
            placed = _sample_object(rng, polygons)
            if placed is None:
                break
            objects.append(placed[0])
            polygons.append(placed[1])
        if len(objects) == count:
            return Scene(tuple(objects))


def sample_scenes(
    n: int, seed: int | np.random.Generator = 0, min_objects: int = 0, max_objects: int = 3
) -> list[Scene]:
    """Sample `n` scenes: object count uniform on [min_objects, max_objects], shape uniform over SHAPES,
    position uniform on the table (rejected while off the table or overlapping), yaw uniform on [-pi, pi).

    Args:
        n: number of scenes.
        seed: an int seed or a numpy Generator (never global random state); same seed, same scenes.
        min_objects, max_objects: inclusive count range, 0 <= min <= max <= 6 (more do not reliably fit).
    """
    if not 0 <= min_objects <= max_objects <= 6:
        raise ValueError(f"need 0 <= min_objects <= max_objects <= 6, got {min_objects}, {max_objects}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    counts = rng.integers(min_objects, max_objects + 1, size=n)
    return [_sample_scene(rng, int(c)) for c in counts]


def scene_to_json(scene: Scene) -> str:
    """The scene in the JSON format of the module docstring."""
    return json.dumps(scene.to_dict())


def scene_from_json(text: str) -> Scene:
    """Parse and validate a scene written by `scene_to_json` (or by hand)."""
    return Scene.from_dict(json.loads(text))


def _as_scene(scene: Scene | dict) -> Scene:
    return scene if isinstance(scene, Scene) else Scene.from_dict(scene, allow_overlap=True)


def scenes_to_tensors(scenes: Sequence[Scene | dict], device: str | torch.device = "cpu") -> SceneTensors:
    """Pad a list of scenes (or scene dicts) into tensors with N = the most objects in any scene."""
    parsed = [_as_scene(s) for s in scenes]
    B, N = len(parsed), max((len(s.objects) for s in parsed), default=0)
    shape_ids = torch.full((B, N), -1, dtype=torch.long)
    positions = torch.zeros(B, N, 2)
    yaws = torch.zeros(B, N)
    for b, scene in enumerate(parsed):
        for i, obj in enumerate(scene.objects):
            shape_ids[b, i] = SHAPES.index(obj.shape)
            positions[b, i] = torch.tensor(obj.position)
            yaws[b, i] = obj.yaw
    return SceneTensors(shape_ids.to(device), positions.to(device), yaws.to(device))


def tensors_to_scenes(tensors: SceneTensors) -> list[Scene]:
    """Inverse of `scenes_to_tensors` (empty slots dropped)."""
    scenes = []
    rows = zip(tensors.shape_ids.tolist(), tensors.positions.tolist(), tensors.yaws.tolist(), strict=True)
    for ids, pos, yaw in rows:
        objects = [TableObject(SHAPES[k], (p[0], p[1]), y) for k, p, y in zip(ids, pos, yaw, strict=True) if k >= 0]
        scenes.append(Scene(tuple(objects)))
    return scenes


def shape_colors(shape_ids: torch.Tensor) -> torch.Tensor:
    """FloatTensor (B, N, 3) of SHAPE_COLORS for LongTensor (B, N) shape ids (empty slots get any colour)."""
    palette = torch.tensor([SHAPE_COLORS[s] for s in SHAPES], device=shape_ids.device)
    return palette[shape_ids.clamp(min=0)]


@lru_cache(maxsize=1)
def make_stage() -> Stage:
    """The fixed camera, light, table and colours of every tabletop scene."""
    verts, faces = table_mesh(TABLE_HALF_SIZE)
    return Stage(camera=CAMERA, light=LIGHT, table_verts=verts, table_faces=faces)


def primitives_world() -> World:
    """The built-in "primitives" world (scenes/worlds/primitives.toml): these constants as a World."""
    return load_world("primitives")


def make_renderer(image_size: int = 64, mode: str = "hard", backend: str = "pytorch3d") -> torch.nn.Module:
    """A renderer for tabletop scenes with the shared call shape (shape_ids, positions, yaws, colors, appearance):
    the primitives world's `World.make_renderer` at `image_size` (H = W).

    backend: "pytorch3d" (hard or soft mode), "opengl" (hard only, needs the `gl` extra and EGL; raises
    `renderers.opengl.OpenGLUnavailableError` otherwise, so callers can fall back to "pytorch3d") or "auto".
    """
    return primitives_world().make_renderer(mode, backend, image_size=image_size)


def render_scenes(
    scenes: Iterable[Scene | dict],
    image_size: int = 64,
    mode: str = "hard",
    color_by_shape: bool = False,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Render scenes with PyTorch3D.

    Args:
        scenes: Scene objects or dicts in the JSON format (validated; overlap is allowed here).
        image_size: H = W in pixels.
        mode: "hard" for data and figures, "soft" for gradients at silhouettes.
        color_by_shape: colour each object by its shape (SHAPE_COLORS) instead of the shared colour.
    Returns:
        FloatTensor (B, 3, H, W) in [0, 1].
    """
    t = scenes_to_tensors(list(scenes), device)
    colors = shape_colors(t.shape_ids) if color_by_shape else None
    return make_renderer(image_size, mode)(t.shape_ids, t.positions, t.yaws, colors).images


def perturb_poses(t: SceneTensors, seed: int, position_sigma: float = 0.02, yaw_sigma: float = 0.3) -> SceneTensors:
    """The same objects with Gaussian pose noise (metres, radians): targets for render-and-compare checks."""
    g = torch.Generator().manual_seed(seed)
    d_pos = torch.randn(t.positions.shape, generator=g) * position_sigma
    d_yaw = torch.randn(t.yaws.shape, generator=g) * yaw_sigma
    return SceneTensors(t.shape_ids, t.positions + d_pos.to(t.positions), t.yaws + d_yaw.to(t.yaws))


def pose_gradients(
    renderer: torch.nn.Module, t: SceneTensors, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the squared image error sum((render(t) - target)^2) w.r.t. the poses of `t`.

    Args:
        renderer: any tabletop renderer whose images are differentiable (soft mode, finite differences).
        target: FloatTensor (B, 3, H, W).
    Returns:
        FloatTensor (B, N, 2) d/d positions and FloatTensor (B, N) d/d yaws (zero on empty slots).
    """
    positions = t.positions.detach().clone().requires_grad_(True)
    yaws = t.yaws.detach().clone().requires_grad_(True)
    images = renderer(t.shape_ids, positions, yaws).images
    ((images - target) ** 2).sum().backward()
    if positions.grad is None or yaws.grad is None:  # nothing on any table: the image ignores the poses
        return torch.zeros_like(positions), torch.zeros_like(yaws)
    return positions.grad, yaws.grad
