"""The parts of a World: camera, light, table, randomisation ranges, objects, and the tensors and appearance of
a batch of scenes. Frozen dataclasses; `scenes.world` assembles them (conventions in its docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import trimesh

from renderers.mesh import Appearance, Camera
from scenes.world_meshes import footprint_hull

__all__ = [
    "WorldCamera",
    "WorldLight",
    "WorldTable",
    "Randomize",
    "WorldObject",
    "SceneTensors",
    "AppearanceSample",
    "unit",
    "cone_directions",
    "ball",
]


@dataclass(frozen=True)
class WorldCamera:
    """A pinhole camera in the table frame; `fov_degrees` or pixel intrinsics (fx, fy, cx, cy), not both."""

    eye: tuple[float, float, float]  # camera centre, metres
    at: tuple[float, float, float]  # a point on the optical axis, metres
    up: tuple[float, float, float]  # world direction that appears upwards in the image
    znear: float  # near clipping depth, metres
    zfar: float  # far clipping depth, metres (soft rendering normalises depth by zfar - znear: keep it tight)
    image_size: tuple[int, int]  # (W, H) that `pixel` refers to
    fov_degrees: float | None = None  # vertical field of view; square pixels, principal point at the centre
    pixel: tuple[float, float, float, float] | None = None  # (fx, fy, cx, cy) in pixels of `image_size`

    def intrinsics(self, image_size: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
        """(fx, fy, cx, cy) in pixels, for the world's image size or the same view at another (W, H)."""
        W, H = image_size or self.image_size
        if self.pixel is None:
            return Camera(self.eye, self.at, self.up, self.fov_degrees or 40.0).pixel_intrinsics(W, H)
        sx, sy = W / self.image_size[0], H / self.image_size[1]
        fx, fy, cx, cy = self.pixel
        return fx * sx, fy * sy, cx * sx, cy * sy

    def renderer_camera(self, image_size: tuple[int, int] | None = None) -> Camera:
        """The `renderers.mesh.Camera` of this camera for images of (W, H) (default: the world's)."""
        if self.pixel is None:
            assert self.fov_degrees is not None
            return Camera(self.eye, self.at, self.up, self.fov_degrees, self.znear, self.zfar)
        return Camera(self.eye, self.at, self.up, znear=self.znear, zfar=self.zfar,
                      intrinsics=self.intrinsics(image_size))  # fmt: skip


@dataclass(frozen=True)
class WorldLight:
    """A directional light plus ambient light, Lambertian: albedo * (ambient + diffuse * max(0, n . l))."""

    direction: tuple[float, float, float]  # from a surface towards the light (any length)
    ambient: float
    diffuse: float


@dataclass(frozen=True)
class WorldTable:
    """The rectangular table top at z = 0, centred on the origin."""

    size: tuple[float, float]  # metres along x, y
    color: tuple[float, float, float]  # albedo, RGB in [0, 1]

    def mesh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FloatTensor (4, 3) vertices and LongTensor (2, 3) triangles facing +z."""
        hx, hy = self.size[0] / 2, self.size[1] / 2
        verts = torch.tensor([[-hx, -hy, 0.0], [hx, -hy, 0.0], [hx, hy, 0.0], [-hx, hy, 0.0]])
        return verts, torch.tensor([[0, 1, 2], [0, 2, 3]])


@dataclass(frozen=True)
class Randomize:
    """Appearance ranges of randomised (training) images; each 0 = that quantity stays nominal."""

    brightness: float = 0.0  # image gain uniform in [1 - b, 1 + b]
    light_direction_degrees: float = 0.0  # light direction uniform on the cone of this half-angle about nominal
    ambient: float = 0.0  # ambient intensity uniform in nominal +- a (kept >= 0)
    object_color: float = 0.0  # each object's albedo channels uniform in nominal +- c (clipped to [0, 1])
    table_color: float = 0.0  # the table's albedo channels likewise
    camera_position: float = 0.0  # eye moved uniformly within a ball of this radius, metres (still looks at `at`)
    pixel_noise: float = 0.0  # Gaussian noise of this standard deviation added to every pixel and channel


@dataclass(frozen=True, eq=False)
class WorldObject:
    """One object of the library."""

    name: str  # the "shape" of scene JSON
    mesh: trimesh.Trimesh  # object frame: metres, z up, resting on z = 0; posed about its origin
    color: tuple[float, float, float]  # albedo, RGB in [0, 1]
    yaw_period: float  # radians: 0 = any yaw, 2 pi = no symmetry
    source: str  # where it came from: the mesh path as written in the world file, or "primitive KIND"

    @cached_property
    def footprint(self) -> np.ndarray:
        """(P, 2) counter-clockwise convex hull of the mesh seen from above, object frame, metres."""
        return footprint_hull(self.mesh)

    def footprint_at(self, position: tuple[float, float], yaw: float) -> np.ndarray:
        """(P, 2) the footprint posed at (x, y, yaw), table frame."""
        c, s = math.cos(yaw), math.sin(yaw)
        return self.footprint @ np.array([[c, -s], [s, c]]).T + np.asarray(position)

    def yaw_distance(self, yaw_a: float, yaw_b: float) -> float:
        """Smallest turn (radians, in [0, period / 2]) between two yaws modulo the object's symmetry."""
        if self.yaw_period == 0.0:
            return 0.0
        d = (yaw_a - yaw_b) % self.yaw_period
        return min(d, self.yaw_period - d)


@dataclass(frozen=True)
class SceneTensors:
    """A batch of scenes as padded tensors, the renderers' input."""

    shape_ids: torch.Tensor  # LongTensor (B, N): index into the world's objects, -1 for an empty slot
    positions: torch.Tensor  # FloatTensor (B, N, 2): (x, y) in metres, zeros for empty slots
    yaws: torch.Tensor  # FloatTensor (B, N): radians, zeros for empty slots

    def render(self, renderer: torch.nn.Module, colors: torch.Tensor | None = None):
        """renderer(shape_ids, positions, yaws, colors): the RenderOutput of any tabletop renderer."""
        return renderer(self.shape_ids, self.positions, self.yaws, colors)


@dataclass(frozen=True)
class AppearanceSample:
    """The appearance of B randomised (or nominal) images: what `render_scenes` applies."""

    gain: torch.Tensor  # FloatTensor (B,) exposure gain multiplying the rendered image
    light_direction: torch.Tensor  # FloatTensor (B, 3) unit direction towards the light
    ambient: torch.Tensor  # FloatTensor (B,)
    object_colors: torch.Tensor  # FloatTensor (B, N, 3) albedo of each object slot
    table_color: torch.Tensor  # FloatTensor (B, 3)
    eye: torch.Tensor  # FloatTensor (B, 3) camera centre
    noise_sd: float  # standard deviation of the added pixel noise

    def appearance(self) -> Appearance:
        """The renderer's per-scene `Appearance` (gain and noise are applied to the images afterwards)."""
        return Appearance(light_direction=self.light_direction, ambient=self.ambient, table_color=self.table_color,
                          eye=self.eye)  # fmt: skip


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def cone_directions(rng: np.random.Generator, axis: np.ndarray, half_angle: float, n: int) -> np.ndarray:
    """(n, 3) unit vectors uniform (in solid angle) on the cap of `half_angle` radians about unit `axis`."""
    cos_t = rng.uniform(math.cos(half_angle), 1.0, size=n)
    phi = rng.uniform(0.0, 2 * math.pi, size=n)
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = unit(np.cross(axis, helper))
    v = np.cross(axis, u)
    sin_t = np.sqrt(1 - cos_t**2)
    return cos_t[:, None] * axis + sin_t[:, None] * (np.cos(phi)[:, None] * u + np.sin(phi)[:, None] * v)


def ball(rng: np.random.Generator, radius: float, n: int) -> np.ndarray:
    """(n, 3) points uniform in a ball of `radius`."""
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return d * (radius * rng.uniform(size=(n, 1)) ** (1 / 3))
