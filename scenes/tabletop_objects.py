"""The tabletop object library: meshes from trimesh primitives, their yaw symmetry and their footprints.

Object frame (see renderers/mesh.py): metres, z up, origin at the centre of the footprint, resting on z = 0.
Sizes are chosen so every object is 0.09-0.16 m across: 10-15 pixels at 64 x 64 with tabletop.py's camera.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import numpy as np
import torch
import trimesh
from scipy.spatial import ConvexHull

from renderers.mesh import MeshLibrary
from scenes.world_meshes import primitive_mesh

__all__ = [
    "SHAPES",
    "YAW_PERIOD",
    "yaw_distance",
    "shape_mesh",
    "library",
    "footprint",
    "footprints_overlap",
    "table_mesh",
]

SHAPES = ("cube", "sphere", "cylinder", "box", "wedge")  # library order = shape ids
YAW_PERIOD = {  # smallest yaw rotation (radians) that maps the shape onto itself; 0 = any yaw does
    "cube": math.pi / 2,  # quarter turn
    "sphere": 0.0,  # any yaw
    "cylinder": 0.0,  # upright: any yaw
    "box": math.pi,  # elongated block: half turn
    "wedge": 2 * math.pi,  # a ramp rising towards +x: no symmetry
}
CUBE_SIDE = 0.10  # metres
SPHERE_RADIUS = 0.055  # metres
CYLINDER_RADIUS, CYLINDER_HEIGHT = 0.05, 0.10  # metres
BOX_EXTENTS = (0.16, 0.07, 0.07)  # metres, long along the object's x axis
WEDGE_LENGTH, WEDGE_WIDTH, WEDGE_HEIGHT = 0.14, 0.10, 0.10  # along x (the slope), y, z; metres
SMOOTH_ANGLE = math.radians(30)  # edges sharper than this are shaded flat (cube edges), softer ones smooth


def yaw_distance(shape: str, yaw_a: float, yaw_b: float) -> float:
    """Smallest rotation (radians, in [0, period / 2]) between two yaws of `shape`, modulo its symmetry."""
    period = YAW_PERIOD[shape]
    if period == 0.0:
        return 0.0
    d = (yaw_a - yaw_b) % period
    return min(d, period - d)


def _primitive(shape: str) -> trimesh.Trimesh:
    """The trimesh primitive for `shape`, resting on z = 0 and centred on the z axis."""
    sizes: dict[str, dict] = {
        "cube": {"size": CUBE_SIDE},
        "sphere": {"radius": SPHERE_RADIUS},
        "cylinder": {"radius": CYLINDER_RADIUS, "height": CYLINDER_HEIGHT},
        "box": {"extents": BOX_EXTENTS},
        "wedge": {"length": WEDGE_LENGTH, "width": WEDGE_WIDTH, "height": WEDGE_HEIGHT},
    }
    if shape not in sizes:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    return primitive_mesh(shape, **sizes[shape])


@cache
def shape_mesh(shape: str) -> trimesh.Trimesh:
    """The render mesh of `shape`: vertices split along sharp edges so that they shade flat."""
    return trimesh.graph.smooth_shade(_primitive(shape), angle=SMOOTH_ANGLE, facet_minarea=None)


@lru_cache(maxsize=1)
def library() -> MeshLibrary:
    """All SHAPES as renderer tensors, in SHAPES order."""
    meshes = [shape_mesh(s) for s in SHAPES]
    verts = tuple(torch.tensor(np.asarray(m.vertices), dtype=torch.float32) for m in meshes)
    faces = tuple(torch.tensor(np.asarray(m.faces), dtype=torch.long) for m in meshes)
    invariant = tuple(YAW_PERIOD[s] == 0.0 for s in SHAPES)
    return MeshLibrary(verts=verts, faces=faces, yaw_invariant=invariant)


@cache
def _footprint_local(shape: str) -> np.ndarray:
    """(P, 2) counter-clockwise convex footprint of `shape` in its object frame."""
    xy = np.asarray(_primitive(shape).vertices)[:, :2]
    return xy[ConvexHull(xy).vertices]


def footprint(shape: str, position: tuple[float, float], yaw: float) -> np.ndarray:
    """(P, 2) convex footprint polygon (metres, table frame) of `shape` at the pose."""
    c, s = math.cos(yaw), math.sin(yaw)
    rotation = np.array([[c, -s], [s, c]])
    return _footprint_local(shape) @ rotation.T + np.asarray(position)


def footprints_overlap(a: np.ndarray, b: np.ndarray, gap: float = 0.0) -> bool:
    """Separating-axis test for two convex polygons (P, 2): True unless some edge normal separates them by
    more than `gap` metres."""
    for polygon in (a, b):
        edges = np.roll(polygon, -1, axis=0) - polygon
        normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1)
        normals /= np.linalg.norm(normals, axis=1, keepdims=True)
        pa, pb = a @ normals.T, b @ normals.T  # (Pa, E), (Pb, E) projections
        separation = np.maximum(pb.min(0) - pa.max(0), pa.min(0) - pb.max(0))  # (E,)
        if (separation > gap).any():
            return False
    return True


def table_mesh(half_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The table top, a square at z = 0: FloatTensor (4, 3) vertices and LongTensor (2, 3) faces facing +z."""
    h = half_size
    verts = torch.tensor([[-h, -h, 0.0], [h, -h, 0.0], [h, h, 0.0], [-h, h, 0.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    return verts, faces
