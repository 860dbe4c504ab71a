"""Write a world that nothing in the package was tuned on, as a user would: the generality check of the worlds issue.

`python -m benchmarks.make_unseen_world DIR` writes two worlds and their meshes (made here with trimesh, never
shipped):

- DIR/workshop.toml: five objects in four file formats and three units, a non-square 112 x 80 camera given by
  intrinsics with its principal point off centre, a low light from another side, a smaller table of another colour,
  1-4 objects a scene, randomisation on;
- DIR/desk.toml: a portrait 96 x 128 camera (taller than wide) looking steeply down, given by intrinsics with
  fx != fy, a light table, six objects in five formats and four units (a ring with a hole, a pen lying on its side,
  an L-shaped bracket, a die, a triangular prism, an eraser primitive), 0-5 objects a scene, randomisation on.

Then train and score each with the defaults:

    inverse-graphics train air-tabletop --world DIR/workshop.toml --minutes 60 --out runs/workshop
    python -m benchmarks.bench_world --world DIR/workshop.toml --air runs/workshop/checkpoint.safetensors \
        --name world_workshop
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import trimesh

WORLD = """\
# A world written for the generality check (benchmarks/make_unseen_world.py); no default was tuned on it.
name = "workshop"
image_size = [112, 80]
objects_per_scene = [1, 4]

[camera]
eye = [0.12, -0.42, 0.52]
at = [0.01, 0.02, 0.0]
fx = 118.0
fy = 112.0
cx = 53.0
cy = 42.5
znear = 0.1
zfar = 1.5

[light]
direction = [0.7, -0.2, 0.8]
ambient = 0.3
diffuse = 0.7

[table]
size = [0.44, 0.36]
color = [0.35, 0.30, 0.26]

[randomize]
brightness = 0.2
light_direction_degrees = 25
ambient = 0.1
object_color = 0.1
table_color = 0.1
camera_position = 0.015
pixel_noise = 0.02

[[objects]]
name = "nut"
mesh = "meshes/nut.stl"
scale = 0.001
color = [0.75, 0.75, 0.78]
yaw_symmetry = "auto"

[[objects]]
name = "block"
mesh = "meshes/block.ply"
scale = 0.01
color = [0.20, 0.55, 0.80]
yaw_symmetry = "auto"

[[objects]]
name = "wedge_stop"
mesh = "meshes/wedge_stop.obj"
scale = 0.0254
color = [0.85, 0.75, 0.20]
yaw_symmetry = "auto"

[[objects]]
name = "spool"
mesh = "meshes/spool.glb"
up_axis = "y"
color = [0.70, 0.25, 0.55]
yaw_symmetry = "auto"

[[objects]]
name = "bracket"
primitive = "box"
extents = [0.07, 0.025, 0.03]
color = [0.30, 0.75, 0.35]
yaw_symmetry = "auto"
"""


DESK = """\
# A second world for the generality check (benchmarks/make_unseen_world.py); no default was tuned on it.
name = "desk"
image_size = [96, 128]
objects_per_scene = [0, 5]

[camera]
eye = [-0.03, -0.14, 0.55]
at = [0.0, 0.01, 0.0]
fx = 150.0
fy = 146.0
cx = 47.0
cy = 65.0
znear = 0.2
zfar = 1.4

[light]
direction = [0.3, -0.6, 0.75]
ambient = 0.45
diffuse = 0.55

[table]
size = [0.30, 0.42]
color = [0.78, 0.76, 0.70]

[randomize]
brightness = 0.2
light_direction_degrees = 30
ambient = 0.12
object_color = 0.12
table_color = 0.08
camera_position = 0.02
pixel_noise = 0.02

[[objects]]
name = "ring"
mesh = "meshes/ring.obj"
scale = 0.001
color = [0.85, 0.65, 0.15]
yaw_symmetry = "auto"

[[objects]]
name = "pen"
mesh = "meshes/pen.stl"
scale = 0.01
color = [0.15, 0.25, 0.75]
yaw_symmetry = "auto"

[[objects]]
name = "l_bracket"
mesh = "meshes/l_bracket.ply"
color = [0.55, 0.55, 0.60]
yaw_symmetry = "auto"

[[objects]]
name = "die"
mesh = "meshes/die.glb"
up_axis = "y"
color = [0.80, 0.15, 0.20]
yaw_symmetry = "auto"

[[objects]]
name = "prism"
mesh = "meshes/prism.off"
scale = 0.0254
color = [0.20, 0.60, 0.30]
yaw_symmetry = "auto"

[[objects]]
name = "eraser"
primitive = "box"
extents = [0.05, 0.022, 0.012]
color = [0.90, 0.45, 0.55]
yaw_symmetry = "auto"
"""


def desk_meshes() -> dict[str, trimesh.Trimesh]:
    """The desk's objects in their files' units and axes (OBJ mm, STL cm, PLY m, GLB m with +y up, OFF inches)."""
    ring = trimesh.creation.torus(major_radius=22.0, minor_radius=6.0, major_sections=48, minor_sections=16)  # mm
    ring.apply_translation([0, 0, 6.0])
    pen = trimesh.creation.cylinder(radius=0.5, height=14.0, sections=12)  # cm, lying along x
    pen.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [0, 1, 0]))
    pen.apply_translation([0.0, 0.0, 0.5])
    arm = trimesh.creation.box(extents=[0.06, 0.015, 0.02])  # metres: an L of two arms, 6 x 4.5 cm
    arm.apply_translation([0.03, 0.0075, 0.01])
    leg = trimesh.creation.box(extents=[0.015, 0.045, 0.02])
    leg.apply_translation([0.0075, 0.0225, 0.01])
    bracket = trimesh.util.concatenate([arm, leg])  # overlapping at the corner: no boolean engine, the same anywhere
    die = trimesh.creation.box(extents=[0.024, 0.024, 0.024])  # metres
    die.apply_translation([0, 0, 0.012])
    die.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))  # z up -> y up (glTF)
    side = 1.6  # inches: an equilateral triangular prism, 0.7 in high
    corners = [[side / np.sqrt(3) * np.cos(a), side / np.sqrt(3) * np.sin(a), z]
               for a in np.radians([90, 210, 330]) for z in (0.0, 0.7)]  # fmt: skip
    prism = trimesh.Trimesh(vertices=np.array(corners)).convex_hull
    return {"ring.obj": ring, "pen.stl": pen, "l_bracket.ply": bracket, "die.glb": die, "prism.off": prism}


def meshes() -> dict[str, trimesh.Trimesh]:
    """The objects in their files' units and axes (STL mm, PLY cm, OBJ inches, GLB metres with +y up)."""
    nut = trimesh.creation.cylinder(radius=22.0, height=14.0, sections=6)  # a hexagonal nut, mm
    nut.apply_translation([0, 0, 7.0])
    block = trimesh.creation.box(extents=[5.0, 3.0, 2.5])  # cm
    block.apply_translation([0, 0, 1.25])
    # a door stop: a triangular prism, inches (no symmetry)
    profile = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 1.2]])  # (x, z): the wedge's side, 3 in long, 1.2 in high
    corners = [[x, y, z] for x, z in profile for y in (-0.8, 0.8)]
    wedge = trimesh.Trimesh(vertices=np.array(corners)).convex_hull
    wedge.apply_translation([-1.0, 0.0, 0.0])  # its frame's origin a third of the way along (not the centroid)
    flange, core = (0.03, 0.008), (0.014, 0.05)  # (radius, height): two flanges and the core between them, metres
    parts = [(flange, 0.004), (core, 0.025), (flange, 0.046)]  # centre heights
    spool = trimesh.util.concatenate([
        trimesh.creation.cylinder(radius=r, height=h, sections=32).apply_translation([0, 0, z]) for (r, h), z in parts
    ])  # fmt: skip
    spool.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))  # z up -> y up (glTF)
    return {"nut.stl": nut, "block.ply": block, "wedge_stop.obj": wedge, "spool.glb": spool}


def write(directory: Path) -> list[Path]:
    """The two world files and their meshes under `directory`; their paths."""
    (directory / "meshes").mkdir(parents=True, exist_ok=True)
    for name, mesh in {**meshes(), **desk_meshes()}.items():
        mesh.export(directory / "meshes" / name)
    paths = [directory / "workshop.toml", directory / "desk.toml"]
    for path, text in zip(paths, (WORLD, DESK)):
        path.write_text(text)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory")
    print("wrote " + " and ".join(str(path) for path in write(Path(p.parse_args(argv).directory))))


if __name__ == "__main__":
    main()
