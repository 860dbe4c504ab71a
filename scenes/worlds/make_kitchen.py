"""Make the kitchen world's meshes: `python -m scenes.worlds.make_kitchen [--out scenes/worlds/kitchen]`.

Six household objects built from trimesh constructions (revolved profiles, boxes, a swept tube; no booleans),
low-poly, closed or nearly so, at realistic sizes. They are written in four formats and two unit systems on
purpose, so that the built-in world exercises every loader path: OBJ and PLY in metres, STL in millimetres
(`scale = 0.001` in kitchen.toml), GLB with +y up (`up_axis = "y"`). Deterministic: the same files every run.

| object      | file            | size (m)                          | modelled after            |
|-------------|-----------------|-----------------------------------|---------------------------|
| mug         | mug.obj         | 0.080 across the body, 0.095 high, handle to 0.070 from the axis | a coffee mug |
| bowl        | bowl.ply        | 0.150 across, 0.060 high          | a cereal bowl             |
| can         | can.stl (mm)    | 0.066 across, 0.122 high          | a 330 ml drinks can       |
| bottle      | bottle.glb (+y) | 0.070 across, 0.230 high          | a 500 ml bottle           |
| cracker_box | cracker_box.obj | 0.160 x 0.060 x 0.210             | a box of crackers         |
| spatula     | spatula.ply     | 0.250 long, 0.065 wide, 0.012 high | a flat kitchen spatula   |
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import trimesh

SECTIONS = 28  # polygon sides of revolved objects: smooth enough at 128 x 96, few faces


def revolved(profile: list[tuple[float, float]], sections: int = SECTIONS) -> trimesh.Trimesh:
    """A solid of revolution about z from a (radius, height) profile that starts and ends on the axis,
    listed counter-clockwise (outside going up, inside coming down) so normals face out."""
    mesh = trimesh.creation.revolve(np.asarray(profile, dtype=float), sections=sections)
    mesh.merge_vertices()
    return mesh


def tube(path: np.ndarray, radius: float, sides: int = 10) -> trimesh.Trimesh:
    """A closed tube of `radius` along a 3D polyline `path` (P, 3), capped at both ends."""
    P = len(path)
    tangents = np.gradient(path, axis=0)
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    helper = np.array([0.0, 1.0, 0.0])  # the handle's path lies in the x-z plane, so y is never parallel
    normals = np.cross(tangents, helper)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    binormals = np.cross(tangents, normals)
    angles = np.linspace(0, 2 * math.pi, sides, endpoint=False)
    rings = path[:, None] + radius * (np.cos(angles)[None, :, None] * normals[:, None]
                                      + np.sin(angles)[None, :, None] * binormals[:, None])  # fmt: skip
    verts = [rings.reshape(-1, 3), path[[0, -1]]]
    faces = []
    for i in range(P - 1):
        for j in range(sides):
            a, b = i * sides + j, i * sides + (j + 1) % sides
            faces += [[a, b, b + sides], [a, b + sides, a + sides]]
    start, end = P * sides, P * sides + 1
    for j in range(sides):
        faces.append([start, (j + 1) % sides, j])
        faces.append([end, (P - 1) * sides + j, (P - 1) * sides + (j + 1) % sides])
    mesh = trimesh.Trimesh(np.concatenate(verts), np.asarray(faces))
    trimesh.repair.fix_normals(mesh)
    return mesh


def _join(parts: list[trimesh.Trimesh]) -> trimesh.Trimesh:
    """One mesh of overlapping closed parts (no boolean union: each part stays closed)."""
    mesh = trimesh.util.concatenate(parts)
    assert isinstance(mesh, trimesh.Trimesh)
    return mesh


def mug() -> trimesh.Trimesh:
    """A mug: a cup with 4 mm walls and a 7 mm bottom, and a round handle on its +x side."""
    r, h, wall, floor = 0.040, 0.095, 0.004, 0.007
    cup = revolved([(0, 0), (r, 0), (r, h), (r - wall, h), (r - wall, floor), (0, floor)])
    t = np.linspace(-math.pi / 2, math.pi / 2, 9)
    arc = np.stack([r - 0.002 + 0.028 * np.cos(t), np.zeros_like(t), 0.050 + 0.028 * np.sin(t)], axis=1)
    return _join([cup, tube(arc, 0.006)])


def bowl() -> trimesh.Trimesh:
    """A bowl: a foot ring 0.07 m across, flaring to a 0.15 m rim, 5 mm walls."""
    outer = [(0.035, 0.0), (0.040, 0.008), (0.058, 0.022), (0.070, 0.040), (0.075, 0.060)]
    inner = [(0.070, 0.060), (0.065, 0.042), (0.053, 0.026), (0.035, 0.014)]
    return revolved([(0, 0), *outer, *inner, (0, 0.013)])


def can() -> trimesh.Trimesh:
    """A drinks can, in millimetres: tapered ends, a recessed lid."""
    profile = [(0, 0), (26, 0), (33, 8), (33, 110), (27, 120), (27, 122), (25, 122), (24, 118), (0, 118)]
    return revolved([(a, b) for a, b in profile])


def bottle() -> trimesh.Trimesh:
    """A bottle with a shoulder, neck and cap, built z up (the caller turns it to +y up for the GLB)."""
    profile = [(0, 0), (0.033, 0), (0.035, 0.005), (0.035, 0.140), (0.030, 0.165), (0.016, 0.185),
               (0.013, 0.200), (0.015, 0.202), (0.015, 0.230), (0, 0.230)]  # fmt: skip
    return revolved(profile)


def cracker_box() -> trimesh.Trimesh:
    """A box of crackers standing upright, wide side facing y."""
    box = trimesh.creation.box(extents=(0.160, 0.060, 0.210))
    box.apply_translation((0, 0, 0.105))
    return box


def spatula() -> trimesh.Trimesh:
    """A flat spatula lying on the table: a 0.18 m handle along -x and a 0.075 x 0.065 m blade at +x."""
    handle = trimesh.creation.box(extents=(0.180, 0.022, 0.012))
    handle.apply_translation((-0.035, 0, 0.006))
    blade = trimesh.creation.box(extents=(0.075, 0.065, 0.005))
    blade.apply_translation((0.0875, 0, 0.0025))
    return _join([handle, blade])


def write_all(out: Path) -> dict[str, int]:
    """Write the six meshes into `out`; returns {file name: bytes}."""
    out.mkdir(parents=True, exist_ok=True)
    y_up = trimesh.transformations.rotation_matrix(-math.pi / 2, (1.0, 0.0, 0.0))  # z up -> y up
    files = {
        "mug.obj": mug(),
        "bowl.ply": bowl(),
        "can.stl": can(),
        "bottle.glb": bottle().apply_transform(y_up),
        "cracker_box.obj": cracker_box(),
        "spatula.ply": spatula(),
    }
    sizes = {}
    for name, mesh in files.items():
        path = out / name
        mesh.export(path)
        sizes[name] = path.stat().st_size
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "kitchen"), help="output directory")
    args = parser.parse_args(argv)
    sizes = write_all(Path(args.out))
    for name, n in sizes.items():
        print(f"{name:16s} {n / 1024:7.1f} KiB")
    print(f"{'total':16s} {sum(sizes.values()) / 1024:7.1f} KiB")


if __name__ == "__main__":
    main()
