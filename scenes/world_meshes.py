"""Meshes of a World's objects: primitives, mesh files (data formats only), yaw symmetry, footprints.

Object frame (the same as `renderers/mesh.py`): metres, z up, resting on z = 0. A pose (x, y, yaw) places the
*origin of the object frame* at (x, y, 0) and turns the object about the vertical axis through that origin.
For a mesh file the origin is the file's own origin (scaled; moved only by `recenter`), so a mesh modelled
with its origin at a corner is posed, and turned, about that corner.

Yaw symmetry is defined about that same axis: the smallest turn about the vertical axis through the pose origin
that maps the mesh onto itself. Only then do the poses (x, y, yaw) and (x, y, yaw + period) render the same image,
which is what yaw errors modulo the period assume. A cube whose origin is off its centre therefore has no yaw
symmetry in this sense (turning it about its corner moves it); `recenter = true` in the world file moves the
origin to the centre of the mesh's bounding box first.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import trimesh
from scipy.spatial import ConvexHull, cKDTree

__all__ = [
    "MESH_FORMATS",
    "PRIMITIVE_SIZES",
    "primitive_mesh",
    "read_mesh_file",
    "prepare_mesh",
    "render_mesh",
    "detect_yaw_period",
    "footprint_hull",
]

MESH_FORMATS = ("obj", "stl", "ply", "glb", "off")  # data-only formats; none can reference remote files or code
# primitive -> {size key: (kind, default or None = required)}; lengths in metres, subdivisions and sections counts
PRIMITIVE_SIZES: dict[str, dict[str, tuple[str, Any]]] = {
    "box": {"extents": ("vec3", None)},
    "cube": {"size": ("float", None)},
    "sphere": {"radius": ("float", None), "subdivisions": ("int", 2)},
    "cylinder": {"radius": ("float", None), "height": ("float", None), "sections": ("int", 32)},
    "wedge": {"length": ("float", None), "width": ("float", None), "height": ("float", None)},
}
SMOOTH_ANGLE = math.radians(30)  # edges sharper than this are shaded flat (cube edges), softer ones smooth
SYMMETRY_TOLERANCE = 0.025  # a turn is a symmetry if no surface point lands farther than this x R off the surface
SYMMETRY_MAX_ORDER = 36  # n-fold symmetries tested: n = 2..36 (turns down to 10 degrees)
ANY_YAW_TEST_DEGREES = (13.0, 37.0, 71.0, 143.0)  # turns that no n-fold symmetry with n <= 36 contains


def _wedge(length: float, width: float, height: float) -> trimesh.Trimesh:
    """A triangular prism lying on a rectangular face: a ramp from height 0 at -x to `height` at +x."""
    x, y = length / 2, width / 2
    corners = [(-x, -y, 0), (x, -y, 0), (x, -y, height), (-x, y, 0), (x, y, 0), (x, y, height)]
    return trimesh.Trimesh(vertices=np.array(corners, dtype=float)).convex_hull


def primitive_mesh(kind: str, **sizes) -> trimesh.Trimesh:
    """The trimesh primitive `kind` with `sizes` (PRIMITIVE_SIZES), resting on z = 0, centred on the z axis."""
    if kind == "cube":
        mesh = trimesh.creation.box(extents=(sizes["size"],) * 3)
    elif kind == "box":
        mesh = trimesh.creation.box(extents=tuple(sizes["extents"]))
    elif kind == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=sizes.get("subdivisions", 2), radius=sizes["radius"])
    elif kind == "cylinder":
        sections = sizes.get("sections", 32)
        mesh = trimesh.creation.cylinder(radius=sizes["radius"], height=sizes["height"], sections=sections)
    elif kind == "wedge":
        return _wedge(sizes["length"], sizes["width"], sizes["height"])
    else:
        raise ValueError(f"unknown primitive {kind!r}; known: {', '.join(PRIMITIVE_SIZES)}")
    mesh.apply_translation((0.0, 0.0, -mesh.bounds[0, 2]))
    return mesh


def read_mesh_file(path: Path) -> trimesh.Trimesh:
    """Read a mesh file of a data format (MESH_FORMATS) into one Trimesh, in the file's units and axes.

    The bytes are read here and handed to trimesh without a resolver and with remote loading off, so a file
    cannot make trimesh open other files or URLs (an OBJ's material library is ignored: objects are coloured by
    the world file). A GLB or any other multi-part file is concatenated into one mesh, node transforms applied.
    Raises ValueError for another format, an empty mesh, or anything trimesh cannot parse.
    """
    ext = path.suffix.lower().lstrip(".")
    if ext not in MESH_FORMATS:
        raise ValueError(f"unsupported mesh format {path.suffix!r}; use one of {', '.join(MESH_FORMATS)}")
    data = path.read_bytes()
    try:
        scene = trimesh.load_scene(io.BytesIO(data), file_type=ext, resolver=None, allow_remote=False)
        mesh = scene.to_mesh()
    except Exception as err:  # trimesh raises many types for malformed input; all mean "not a mesh"
        raise ValueError(f"cannot read it as a {ext.upper()} mesh ({type(err).__name__}: {err})") from err
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"it holds no triangles (read as {ext.upper()})")
    if not np.isfinite(mesh.vertices).all():
        raise ValueError("it has non-finite vertex coordinates")
    return trimesh.Trimesh(vertices=np.asarray(mesh.vertices, float), faces=np.asarray(mesh.faces), process=True)


def prepare_mesh(mesh: trimesh.Trimesh, scale: float, up_axis: str = "z", recenter: bool = False) -> trimesh.Trimesh:
    """A copy of `mesh` in the object frame: y-up files turned to z up, scaled to metres, optionally moved so the
    bounding box's centre is above the origin, then lifted so that its lowest point rests on z = 0."""
    out = mesh.copy()
    if up_axis == "y":  # +y up -> +z up, keeping the frame right-handed: (x, y, z) -> (x, -z, y)
        out.apply_transform(trimesh.transformations.rotation_matrix(math.pi / 2, (1.0, 0.0, 0.0)))
    elif up_axis != "z":
        raise ValueError(f"up_axis must be 'z' or 'y', got {up_axis!r}")
    out.apply_scale(scale)
    if recenter:
        centre = out.bounds.mean(0)
        out.apply_translation((-centre[0], -centre[1], 0.0))
    out.apply_translation((0.0, 0.0, -out.bounds[0, 2]))
    return out


def render_mesh(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The mesh the renderers draw: vertices split along sharp edges so that they shade flat (cube edges) while
    curved surfaces shade smooth."""
    return trimesh.graph.smooth_shade(mesh, angle=SMOOTH_ANGLE, facet_minarea=None)


def _radius(mesh: trimesh.Trimesh) -> float:
    """The largest horizontal distance of a vertex from the vertical axis through the origin: how far a turn can
    move a point of the mesh per radian, the length that symmetry tolerances are relative to."""
    return float(np.linalg.norm(np.asarray(mesh.vertices)[:, :2], axis=1).max())


def _probe_points(mesh: trimesh.Trimesh, seed: int = 0) -> np.ndarray:
    """(P, 3) points on the surface that a turn is tested on: the vertices (corners deviate most) and an even
    surface sample (so that large flat faces count), deterministic."""
    rng = np.random.default_rng(seed)
    verts = np.asarray(mesh.vertices)
    if len(verts) > 300:
        verts = verts[rng.choice(len(verts), 300, replace=False)]
    samples, _ = trimesh.sample.sample_surface(mesh, 300, seed=seed)
    return np.concatenate([verts, np.asarray(samples)])


class _SurfaceDistance:
    """Exact distances from points to a mesh's surface (no spatial-index dependency): for each point, only the
    triangles that can be nearer than its nearest vertex (centre distance minus the triangle's reach) are
    measured, with `trimesh.triangles.closest_point`."""

    def __init__(self, mesh: trimesh.Trimesh):
        self.triangles = np.asarray(mesh.triangles)  # (F, 3, 3)
        self.centres = self.triangles.mean(1)  # (F, 3)
        self.reaches = np.linalg.norm(self.triangles - self.centres[:, None], axis=2).max(1)  # (F,) centre to corner
        self.centre_tree = cKDTree(self.centres)
        self.vertex_tree = cKDTree(np.asarray(mesh.vertices))

    def exceeds(self, points: np.ndarray, tolerance: float) -> bool:
        """True if any of `points` (P, 3) is farther than `tolerance` from the surface."""
        upper = self.vertex_tree.query(points)[0]  # (P,) a vertex is on the surface
        far = upper > tolerance  # only these need an exact distance
        points, upper = points[far], upper[far]
        if len(points) == 0:
            return False
        candidates = self.centre_tree.query_ball_point(points, upper + self.reaches.max())
        owner = np.repeat(np.arange(len(points)), [len(c) for c in candidates])  # (Q,) point of each pair
        faces = np.concatenate([np.asarray(c, dtype=int) for c in candidates])  # (Q,)
        near = np.linalg.norm(self.centres[faces] - points[owner], axis=1) - self.reaches[faces] <= upper[owner]
        owner, faces = owner[near], faces[near]
        nearest = trimesh.triangles.closest_point(self.triangles[faces], points[owner])  # (Q, 3)
        best = upper.copy()
        np.minimum.at(best, owner, np.linalg.norm(nearest - points[owner], axis=1))
        return bool((best > tolerance).any())


def _turn_exceeds(distance: _SurfaceDistance, points: np.ndarray, angle: float, tolerance: float) -> bool:
    """True if some of `points`, turned by `angle` about the z axis, land farther than `tolerance` from the
    surface (checked in chunks, so that a clear asymmetry is found after the first)."""
    c, s = math.cos(angle), math.sin(angle)
    turned = points @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T
    return any(distance.exceeds(turned[i : i + 100], tolerance) for i in range(0, len(turned), 100))


def detect_yaw_period(mesh: trimesh.Trimesh) -> float:
    """The smallest turn (radians) about the vertical axis through the origin that maps `mesh` onto itself:
    0.0 = any turn does (a solid of revolution), 2 pi = none does.

    A turn counts as a symmetry when no probe point of the surface (the vertices and an even sample) lands
    farther than SYMMETRY_TOLERANCE (2.5%) of the mesh's radius R (its largest horizontal distance from the axis)
    from the surface; an n-fold symmetry needs every multiple of 360/n degrees to pass. Distances are exact
    (point to triangle). The slack absorbs tessellation (turned by 13 degrees, measured): a 32-sided cylinder
    deviates by 0.25% of R, a 16-sided one by 1.9% and a twice-subdivided icosphere by 1.8% (all "any yaw"); a
    12-sided cylinder by 3.4% (found as 30 degrees) and a hexagonal prism by 9% (60 degrees). 2.5% of R is a
    tenth of a pixel for an object 10 pixels across.
    """
    radius = _radius(mesh)
    if radius == 0.0:  # a degenerate mesh on the axis: every turn maps it onto itself
        return 0.0
    tolerance = SYMMETRY_TOLERANCE * radius
    tree = _SurfaceDistance(mesh)
    points = _probe_points(mesh)

    def symmetric(angles) -> bool:
        return not any(_turn_exceeds(tree, points, a, tolerance) for a in angles)

    if symmetric([math.radians(a) for a in ANY_YAW_TEST_DEGREES]):
        return 0.0
    for n in range(SYMMETRY_MAX_ORDER, 1, -1):
        if symmetric([2 * math.pi * k / n for k in range(1, n // 2 + 1)]):  # k and n - k are mirror turns
            return 2 * math.pi / n
    return 2 * math.pi


def footprint_hull(mesh: trimesh.Trimesh) -> np.ndarray:
    """(P, 2) counter-clockwise convex hull of the mesh seen from above (object frame, metres): the footprint
    that placement keeps on the table and apart. For a non-convex mesh (a mug's handle) it covers the gaps too,
    so objects never interlock."""
    xy = np.asarray(mesh.vertices)[:, :2]
    return xy[ConvexHull(xy).vertices]
