"""A World: the fixed parts of the tabletop generative model, written in one place.

Object library (meshes of any data format trimesh reads, or primitives), table, camera (a vertical field of view
or pixel intrinsics), light, image size, the range of objects per scene and the appearance randomisation of
training images. Read from a TOML file (docs/tabletop.md gives every key) or by a built-in name:

    from scenes.world import load_world
    w = load_world("kitchen")                 # "primitives", "kitchen", or a path to a world file
    scenes = w.sample_scenes(8, seed=0)       # tabletop JSON dicts {"objects": [{"shape", "position", "yaw"}]}
    images = w.render_scenes(scenes)          # FloatTensor (B, 3, H, W), nominal appearance
    train = w.render_scenes(scenes, randomize=True, seed=1)   # the [randomize] ranges applied

Conventions (the same as `renderers/mesh.py` and `scenes/tabletop.py`):
- Table frame = world frame: metres, origin at the centre of the table top, x to the right and y away from the
  camera, z up. The table is the rectangle |x| <= size[0] / 2, |y| <= size[1] / 2 at z = 0.
- Object frame: metres, z up, resting on z = 0. A pose (x, y, yaw) puts the object frame's origin at (x, y, 0),
  turned by yaw radians counter-clockwise seen from above. For a mesh file the origin is the file's own origin
  (see `scenes.world_meshes` for what that means for yaw symmetry).
- `yaw_period` is the smallest turn about the origin's vertical axis mapping the object onto itself, in radians:
  0 = any turn (drawn at yaw 0, so its yaw gradient is exactly zero), 2 pi = no symmetry.
- Images: (B, 3, H, W) floats in [0, 1]; `image_size` is (W, H), width first.

Nothing read executes code: TOML is data (tomllib), meshes are data formats read without resolvers
(`scenes.world_meshes.read_mesh_file`), and `to_dict` / `from_dict` use plain JSON types only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import torch

from renderers.mesh import Appearance, Light, MeshLibrary, MeshRenderer3D, MeshRenderSettings, Stage
from scenes import world_file
from scenes.world_file import FORMAT, Reader, WorldError
from scenes.world_meshes import render_mesh
from scenes.world_parts import (
    AppearanceSample,
    Randomize,
    SceneTensors,
    WorldCamera,
    WorldLight,
    WorldObject,
    WorldTable,
    ball,
    cone_directions,
    unit,
)

__all__ = [
    "BUILTIN_WORLDS",
    "WorldError",
    "WorldCamera",
    "WorldLight",
    "WorldTable",
    "Randomize",
    "WorldObject",
    "SceneTensors",
    "AppearanceSample",
    "World",
    "load_world",
    "builtin_world_path",
]

WORLDS_DIR = Path(__file__).parent / "worlds"
BUILTIN_WORLDS = ("primitives", "kitchen")  # names load_world knows: scenes/worlds/NAME.toml
MAX_TRIES = 100  # positions tried for one object before the scene is restarted
MAX_RESTARTS = 1000  # restarts of one scene before sampling gives up (load-time validation makes this rare)
CAPACITY_RESTARTS = 10  # restarts allowed when validating that the largest count fits
MAX_COVER = 0.5  # a count whose largest footprints would cover more of the table is refused without trying
TOP_KEYS = ("name", "image_size", "objects_per_scene", "min_gap", "camera", "light", "table", "randomize", "objects")


def _footprints_overlap(a: np.ndarray, b: np.ndarray, gap: float) -> bool:
    from scenes.tabletop_objects import footprints_overlap

    return footprints_overlap(a, b, gap=gap)


@dataclass(frozen=True, eq=False)
class World:
    """The fixed parts of the tabletop generative model. Build with `load_world` or `World.from_dict`."""

    name: str
    image_size: tuple[int, int]  # (W, H) pixels
    objects_per_scene: tuple[int, int]  # inclusive (min, max)
    objects: tuple[WorldObject, ...]  # the library; scene JSON "shape" = an object's name
    camera: WorldCamera
    light: WorldLight
    table: WorldTable
    randomize: Randomize | None = None  # None: training images are nominal too
    min_gap: float = 0.01  # metres kept between sampled footprints and to the table's edge
    _renderers: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ---- the library -------------------------------------------------------------------------------------
    @property
    def shape_names(self) -> tuple[str, ...]:
        """Object names in library order (= shape ids)."""
        return tuple(o.name for o in self.objects)

    def object_named(self, name: str) -> WorldObject:
        for obj in self.objects:
            if obj.name == name:
                return obj
        raise ValueError(f"unknown shape {name!r} in world {self.name!r}; known: {', '.join(self.shape_names)}")

    @cached_property
    def library(self) -> MeshLibrary:
        """All objects as renderer tensors, in library order (render meshes: sharp edges shade flat)."""
        meshes = [render_mesh(o.mesh) for o in self.objects]
        verts = tuple(torch.tensor(np.asarray(m.vertices), dtype=torch.float32) for m in meshes)
        faces = tuple(torch.tensor(np.asarray(m.faces), dtype=torch.long) for m in meshes)
        return MeshLibrary(verts=verts, faces=faces, yaw_invariant=tuple(o.yaw_period == 0.0 for o in self.objects))

    @cached_property
    def stage(self) -> Stage:
        """The renderers' stage: camera, light, table; objects are coloured per object by `render_scenes`."""
        verts, faces = self.table.mesh()
        light = Light(self.light.direction, self.light.ambient, self.light.diffuse)
        return Stage(self.camera.renderer_camera(), light, verts, faces, table_color=self.table.color)

    @property
    def colors(self) -> torch.Tensor:
        """FloatTensor (K, 3) the objects' nominal albedos."""
        return torch.tensor([o.color for o in self.objects], dtype=torch.float32)

    # ---- renderers ---------------------------------------------------------------------------------------
    def make_renderer(self, mode: str = "hard", backend: str = "auto",
                      image_size: int | tuple[int, int] | None = None) -> torch.nn.Module:  # fmt: skip
        """A renderer of this world with the shared call shape
        `renderer(shape_ids, positions, yaws, colors=None, appearance=None) -> RenderOutput`.

        Args:
            mode: "hard" (data, figures) or "soft" (differentiable at silhouettes; PyTorch3D only).
            backend: "pytorch3d", "opengl" (hard only; needs the `gl` extra and EGL, else raises
                `renderers.opengl.OpenGLUnavailableError`) or "auto" (OpenGL for hard mode when it works here,
                else PyTorch3D).
            image_size: render at another size than the world's: an int (square) or (W, H); intrinsics are
                rescaled so the view is the same.
        """
        if backend not in ("auto", "pytorch3d", "opengl"):
            raise ValueError(f"backend must be 'auto', 'pytorch3d' or 'opengl', got {backend!r}")
        size = self.image_size if image_size is None else image_size
        wh = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        stage = self.stage
        if wh != self.image_size and self.camera.pixel is not None:
            from dataclasses import replace

            stage = replace(stage, camera=self.camera.renderer_camera(wh))  # type: ignore[arg-type]
        settings_size = wh[0] if wh[0] == wh[1] else wh  # an int for square images, as the renderers always took
        if backend == "auto" and mode == "hard":
            from renderers.opengl import OpenGLUnavailableError

            try:
                return self.make_renderer(mode, "opengl", image_size)
            except OpenGLUnavailableError:
                backend = "pytorch3d"
        if backend in ("auto", "pytorch3d"):
            return MeshRenderer3D(self.library, stage, MeshRenderSettings(image_size=settings_size, mode=mode))
        if mode != "hard":
            raise ValueError("the OpenGL backend renders hard images only; use backend='pytorch3d' for soft")
        from renderers.opengl import OpenGLRenderer, OpenGLSettings

        return OpenGLRenderer(self.library, stage, OpenGLSettings(image_size=settings_size))

    def _renderer(self, mode: str, backend: str) -> torch.nn.Module:
        key = (mode, backend)
        if key not in self._renderers:
            self._renderers[key] = self.make_renderer(mode, backend)
        return self._renderers[key]

    # ---- scenes ------------------------------------------------------------------------------------------
    def inside_table(self, polygon: np.ndarray, margin: float = 0.0) -> bool:
        """Whether a footprint (P, 2), table frame, metres, lies on the table at least `margin` from its edge."""
        hx, hy = self.table.size[0] / 2 - margin, self.table.size[1] / 2 - margin
        return bool(np.abs(polygon[:, 0]).max() <= hx and np.abs(polygon[:, 1]).max() <= hy)

    def _place(self, rng: np.random.Generator, k: int, placed: list[np.ndarray]):
        """(object dict, footprint) of object k at a uniform pose clear of `placed`, or None after MAX_TRIES."""
        obj = self.objects[k]
        hx, hy = self.table.size[0] / 2, self.table.size[1] / 2
        for _ in range(MAX_TRIES):
            x, y = rng.uniform((-hx, -hy), (hx, hy))
            yaw = float(rng.uniform(-math.pi, math.pi))
            polygon = obj.footprint_at((float(x), float(y)), yaw)
            if self.inside_table(polygon, self.min_gap) and not any(
                _footprints_overlap(polygon, other, self.min_gap) for other in placed
            ):
                return {"shape": obj.name, "position": [float(x), float(y)], "yaw": yaw}, polygon
        return None

    def _sample_scene(self, rng: np.random.Generator, count: int, identities: Sequence[int] | None = None,
                      max_restarts: int = MAX_RESTARTS) -> dict | None:  # fmt: skip
        """One scene of `count` objects (identities uniform, or the given ones); None after `max_restarts`."""
        for _ in range(max_restarts):
            objects: list[dict] = []
            polygons: list[np.ndarray] = []
            while len(objects) < count:
                k = int(rng.integers(len(self.objects))) if identities is None else identities[len(objects)]
                placed = self._place(rng, k, polygons)
                if placed is None:
                    break
                objects.append(placed[0])
                polygons.append(placed[1])
            if len(objects) == count:
                return {"objects": objects}
        return None

    def sample_scenes(self, n: int, seed: int | np.random.Generator = 0) -> list[dict]:
        """Sample `n` scenes: count uniform on objects_per_scene, identity uniform over the objects, the pose
        origin uniform on the table (rejected while a footprint leaves the table or comes within min_gap of
        another), yaw uniform on [-pi, pi). Same seed (an int or a numpy Generator), same scenes.

        Returns a list of tabletop JSON dicts {"objects": [{"shape", "position": [x, y], "yaw"}]}.
        """
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        low, high = self.objects_per_scene
        scenes = []
        for count in rng.integers(low, high + 1, size=n):
            scene = self._sample_scene(rng, int(count))
            if scene is None:
                raise WorldError(f"world {self.name!r}: could not place {count} objects on the table in "
                                 f"{MAX_RESTARTS} tries; lower objects_per_scene's maximum or enlarge the "
                                 "table")  # fmt: skip
            scenes.append(scene)
        return scenes

    def validate_scene(self, scene: dict, allow_overlap: bool = False) -> None:
        """ValueError naming the object for an unknown shape, a malformed or non-finite pose, a footprint off
        the table or (unless `allow_overlap`) two footprints that overlap."""
        if not isinstance(scene, dict) or set(scene) != {"objects"} or not isinstance(scene["objects"], list):
            raise ValueError('a tabletop scene must be {"objects": [...]}; got ' + repr(scene)[:200])
        polygons = []
        for i, o in enumerate(scene["objects"]):
            if not isinstance(o, dict) or set(o) != {"shape", "position", "yaw"}:
                raise ValueError(f'object {i}: expected keys "shape", "position", "yaw"; got {o!r}')
            obj = self.object_named(o["shape"])
            pose = [*o["position"], o["yaw"]] if isinstance(o["position"], list | tuple) else []
            if len(pose) != 3 or not all(isinstance(v, int | float) and math.isfinite(v) for v in pose):
                raise ValueError(f"object {i} ({obj.name}): position must be [x, y] and yaw a number, finite")
            polygon = obj.footprint_at((pose[0], pose[1]), pose[2])
            if not self.inside_table(polygon, -1e-9):
                raise ValueError(f"object {i} ({obj.name}) at {o['position']} is (partly) off the "
                                 f"{self.table.size[0]:g} x {self.table.size[1]:g} m table")  # fmt: skip
            polygons.append(polygon)
        for i in range(len(polygons)):
            for j in range(i + 1, len(polygons)):
                if not allow_overlap and _footprints_overlap(polygons[i], polygons[j], 0.0):
                    raise ValueError(f"objects {i} and {j} interpenetrate (their footprints overlap)")

    def scenes_to_tensors(self, scenes: Sequence[dict], device: str | torch.device = "cpu") -> SceneTensors:
        """Pad scene dicts (or objects with `to_dict()`) into tensors with N = the most objects in any scene."""
        parsed = [s.to_dict() if hasattr(s, "to_dict") else s for s in scenes]
        for s in parsed:
            self.validate_scene(s, allow_overlap=True)
        B, N = len(parsed), max((len(s["objects"]) for s in parsed), default=0)
        ids = {name: k for k, name in enumerate(self.shape_names)}
        shape_ids = torch.full((B, N), -1, dtype=torch.long)
        positions = torch.zeros(B, N, 2)
        yaws = torch.zeros(B, N)
        for b, scene in enumerate(parsed):
            for i, o in enumerate(scene["objects"]):
                shape_ids[b, i] = ids[o["shape"]]
                positions[b, i] = torch.tensor([float(v) for v in o["position"]])
                yaws[b, i] = float(o["yaw"])
        return SceneTensors(shape_ids.to(device), positions.to(device), yaws.to(device))

    # ---- appearance and rendering ------------------------------------------------------------------------
    def sample_appearance(self, shape_ids: torch.Tensor, randomize: bool = False,
                          seed: int | np.random.Generator | None = None) -> AppearanceSample:  # fmt: skip
        """The appearance of B images with objects `shape_ids` (LongTensor (B, N)): nominal, or with every
        quantity of the world's [randomize] ranges drawn independently per image (per object for colours).
        Nominal when `randomize` is False or the world has no [randomize] section."""
        B, N = shape_ids.shape
        r = self.randomize if randomize and self.randomize is not None else Randomize()
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        axis = unit(self.light.direction)
        base_colors = self.colors[shape_ids.clamp(min=0).cpu()].double().numpy()  # (B, N, 3)

        def jitter(amount: float, shape) -> np.ndarray:
            return rng.uniform(-amount, amount, size=shape) if amount > 0 else np.zeros(shape)

        gain = 1.0 + jitter(r.brightness, (B,))
        if r.light_direction_degrees > 0:
            light = cone_directions(rng, axis, math.radians(r.light_direction_degrees), B)
        else:
            light = np.tile(axis, (B, 1))
        ambient = np.maximum(self.light.ambient + jitter(r.ambient, (B,)), 0.0)
        object_colors = np.clip(base_colors + jitter(r.object_color, (B, N, 3)), 0.0, 1.0)
        table_color = np.clip(np.asarray(self.table.color) + jitter(r.table_color, (B, 3)), 0.0, 1.0)
        eye = np.asarray(self.camera.eye) + (ball(rng, r.camera_position, B) if r.camera_position > 0 else 0.0)
        eye = np.broadcast_to(eye, (B, 3))

        def f32(a) -> torch.Tensor:
            return torch.tensor(np.asarray(a), dtype=torch.float32)

        return AppearanceSample(f32(gain), f32(light), f32(ambient), f32(object_colors), f32(table_color), f32(eye),
                                float(r.pixel_noise))  # fmt: skip

    def render_scenes(self, scenes: Sequence[dict], randomize: bool = False,
                      seed: int | np.random.Generator | None = None, mode: str = "hard", backend: str = "pytorch3d",
                      device: str | torch.device = "cpu") -> torch.Tensor:  # fmt: skip
        """Render scene dicts at the world's image size.

        Args:
            scenes: tabletop JSON dicts (validated; overlap allowed here).
            randomize: apply the world's [randomize] ranges (training images); False: the nominal appearance.
            seed: an int or numpy Generator for the randomisation (and the pixel noise); same seed, same images.
            mode, backend: as `make_renderer` (PyTorch3D by default: the reference renderer).
        Returns:
            FloatTensor (B, 3, H, W) in [0, 1].
        """
        t = self.scenes_to_tensors(scenes, device)
        renderer = self._renderer(mode, backend)
        if not randomize or self.randomize is None:
            colors = self.colors.to(device)[t.shape_ids.clamp(min=0)]
            return renderer(t.shape_ids, t.positions, t.yaws, colors).images
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        sample = self.sample_appearance(t.shape_ids, True, rng)
        appearance = Appearance(light_direction=sample.light_direction.to(device), ambient=sample.ambient.to(device),
                                table_color=sample.table_color.to(device), eye=sample.eye.to(device))  # fmt: skip
        images = renderer(t.shape_ids, t.positions, t.yaws, sample.object_colors.to(device), appearance).images
        images = images * sample.gain.to(device)[:, None, None, None]
        if sample.noise_sd > 0:
            g = torch.Generator().manual_seed(int(rng.integers(2**62)))
            images = images + sample.noise_sd * torch.randn(images.shape, generator=g).to(device)
        return images.clamp(0.0, 1.0)

    # ---- serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The whole world as plain JSON types (mesh geometry inline), for checkpoints; `from_dict` inverts it
        exactly."""
        cam = self.camera
        camera: dict = {"eye": list(cam.eye), "at": list(cam.at), "up": list(cam.up), "znear": cam.znear,
                        "zfar": cam.zfar}  # fmt: skip
        if cam.pixel is None:
            camera["fov_degrees"] = cam.fov_degrees
        else:
            camera.update(zip(("fx", "fy", "cx", "cy"), cam.pixel, strict=True))
        out = {
            "format": FORMAT,
            "name": self.name,
            "image_size": list(self.image_size),
            "objects_per_scene": list(self.objects_per_scene),
            "min_gap": self.min_gap,
            "camera": camera,
            "light": {
                "direction": list(self.light.direction),
                "ambient": self.light.ambient,
                "diffuse": self.light.diffuse,
            },  # fmt: skip
            "table": {"size": list(self.table.size), "color": list(self.table.color)},
            "objects": [
                {
                    "name": o.name,
                    "source": o.source,
                    "color": list(o.color),
                    "yaw_period": o.yaw_period,
                    "vertices": np.asarray(o.mesh.vertices, dtype=np.float64).tolist(),
                    "faces": np.asarray(o.mesh.faces, dtype=np.int64).tolist(),
                }  # fmt: skip
                for o in self.objects
            ],
        }
        if self.randomize is not None:
            out["randomize"] = {f.name: getattr(self.randomize, f.name) for f in fields(Randomize)}
        return out

    def same_scenes(self, other: World) -> bool:
        """Whether `other` is this world but for its [randomize] ranges: the same name, objects, camera, light,
        table, image size and counts, so the same nominal renders. The ranges only shape training images, so a
        model trained under random appearances is scored on the scenes of the world without them."""

        def scene_part(world: World) -> dict:
            return {k: v for k, v in world.to_dict().items() if k != "randomize"}

        return scene_part(self) == scene_part(other)

    @classmethod
    def from_dict(cls, data: dict, source: str = "world dict") -> World:
        """The world of a `to_dict` dict (e.g. from a checkpoint); WorldError naming the key if malformed."""
        if not isinstance(data, dict):
            raise WorldError(f"{source}: a world dict must be a dict, got {type(data).__name__}")
        r = Reader(source, data)
        r.check_keys(("format", *TOP_KEYS))
        if data.get("format") != FORMAT:
            raise r.fail("format", f"expected {FORMAT!r}, got {data.get('format')!r}")
        objects = world_file.parse_dict_objects(r.tables("objects"))
        return _build(r, objects)


def _build(r: Reader, objects: list) -> World:
    """The World from a validated top-level reader and parsed objects (shared by files and dicts)."""
    source = r.source
    name = r.string("name", required=True)
    W, H = (int(v) for v in r.vector("image_size", 2, (64, 64), low=1.0, high=4096.0))
    if any(not isinstance(v, int) or isinstance(v, bool) for v in r.raw("image_size", [64, 64])):
        raise r.fail("image_size", f"must be [width, height] in whole pixels, got {r.raw('image_size')!r}")
    counts = r.raw("objects_per_scene", [0, 3])
    if not isinstance(counts, list | tuple) or len(counts) != 2:
        raise r.fail("objects_per_scene", f"must be [min, max], got {counts!r}")
    count_reader = Reader(source, {"min": counts[0], "max": counts[1]}, "objects_per_scene")
    low = count_reader.integer("min", low=0, high=64)
    high = count_reader.integer("max", low=0, high=64)
    if high < low:
        raise r.fail("objects_per_scene", f"need min <= max, got [{low}, {high}]")
    min_gap = r.number("min_gap", 0.01, low=0.0)
    table_r = r.table("table", required=True)
    assert table_r is not None
    table_r.check_keys(("size", "color"))
    table = WorldTable(table_r.vector("size", 2, required=True, low=0.0, low_open=True),  # type: ignore[arg-type]
                       table_r.color("color", world_file.DEFAULT_TABLE_COLOR))  # fmt: skip
    light_r = r.table("light") or Reader(source, {}, "light")
    light_r.check_keys(("direction", "ambient", "diffuse"))
    direction = light_r.vector("direction", 3, (-0.4, -0.5, 1.0))
    if np.linalg.norm(direction) == 0:
        raise light_r.fail("direction", "must not be the zero vector")
    light = WorldLight(direction, light_r.number("ambient", 0.35, low=0.0),  # type: ignore[arg-type]
                       light_r.number("diffuse", 0.65, low=0.0))  # fmt: skip
    height = max(float(o[1].bounds[1, 2]) for o in objects)
    camera_r = r.table("camera", required=True)
    assert camera_r is not None
    eye = camera_r.vector("eye", 3, required=True)
    camera = world_file.parse_camera(camera_r, (W, H), world_file.depth_reach(eye, table.size, height))
    randomize = None
    rand_r = r.table("randomize")
    if rand_r is not None:
        rand_r.check_keys(tuple(f.name for f in fields(Randomize)))
        highs = {"brightness": 1.0, "light_direction_degrees": 90.0, "object_color": 1.0, "table_color": 1.0}
        randomize = Randomize(**{f.name: rand_r.number(f.name, 0.0, low=0.0, high=highs.get(f.name))
                                 for f in fields(Randomize)})  # fmt: skip
    world_objects = tuple(WorldObject(n, m, c, p, s) for n, m, c, p, s in objects)
    world = World(name, (W, H), (low, high), world_objects, camera, light, table, randomize, min_gap)
    _check_fit(world, source)
    return world


def _check_fit(world: World, source: str) -> None:
    """WorldError unless every object fits on the table and the largest count of the largest object can be
    placed by the sampler (so that `sample_scenes` never loops for long)."""
    for i, obj in enumerate(world.objects):
        span = obj.footprint.max(0) - obj.footprint.min(0)
        fits = any(world.inside_table(obj.footprint_at((0.0, 0.0), math.radians(a)), world.min_gap) for a in range(180))
        if not fits:
            raise WorldError(
                f"{source}: objects[{i}] ({obj.name}): its footprint ({span[0]:.3g} x {span[1]:.3g} m about its "
                f"origin) does not fit on the {world.table.size[0]:g} x {world.table.size[1]:g} m table; is `scale` "
                "right (mesh units to metres)?"
            )
    high = world.objects_per_scene[1]
    areas = [_area(o.footprint) for o in world.objects]
    largest = int(np.argmax(areas))
    table = f"{world.table.size[0]:g} x {world.table.size[1]:g} m table"
    cover = high * areas[largest] / (world.table.size[0] * world.table.size[1])
    if cover > MAX_COVER:  # random placement jams long before: no need to try
        raise WorldError(f"{source}: objects_per_scene: {high} objects may not fit on the {table}: {high} x "
                         f"{world.objects[largest].name!r} (the largest footprint) would cover {cover:.0%} of it; "
                         "lower the maximum or enlarge the table")  # fmt: skip
    scene = world._sample_scene(np.random.default_rng(0), high, [largest] * high, CAPACITY_RESTARTS)
    if scene is None:
        raise WorldError(
            f"{source}: objects_per_scene: {high} objects may not fit on the {table}: {high} x "
            f"{world.objects[largest].name!r} (the largest footprint) could not be placed {world.min_gap:g} m apart "
            f"in {CAPACITY_RESTARTS} tries; lower the maximum or enlarge the table"
        )


def _area(polygon: np.ndarray) -> float:
    """Area of a simple polygon (P, 2) (shoelace)."""
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def builtin_world_path(name: str) -> Path:
    """The world file of a built-in world (scenes/worlds/NAME.toml)."""
    if name not in BUILTIN_WORLDS:
        raise WorldError(f"no built-in world {name!r}; built-in: {', '.join(BUILTIN_WORLDS)}")
    return WORLDS_DIR / f"{name}.toml"


@cache
def _load_builtin(name: str) -> World:
    return load_world_file(builtin_world_path(name))


def load_world_file(path: str | Path) -> World:
    """The World of a TOML world file; paths inside it are relative to the file."""
    path = Path(path)
    data = world_file.read_toml(path)
    r = Reader(path.name, data)
    r.check_keys(TOP_KEYS)
    if "name" not in data:
        data = {**data, "name": path.stem}
        r = Reader(path.name, data)
    objects = world_file.parse_file_objects(r.tables("objects"), path.parent)
    return _build(r, objects)


def load_world(name_or_path: str | Path) -> World:
    """A built-in world by name ("primitives", "kitchen"; cached, shared) or a world file by path.

    Raises WorldError (a ValueError) naming the file and the key for anything invalid."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_WORLDS and not Path(name_or_path).exists():
        return _load_builtin(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise WorldError(f"no world file {str(path)!r} (built-in worlds: {', '.join(BUILTIN_WORLDS)})")
    return load_world_file(path)
