"""Renders a World's scenes with pyrender (PyPI `pyrender-maintained`, headless through EGL): an independent
renderer for the benchmarks (a benchmark dependency, in the `dev` extra, not the package's).

The scene is the world's own: its table, its meshes posed as `renderers.mesh.place_vertices` poses them (with the
project's vertex normals, so both shade the same surface), its pinhole camera (`IntrinsicsCamera` takes fx, fy,
cx, cy in the same continuous pixel coordinates) and its directional light. pyrender's shader is physically based
(metallic-roughness) and writes pow(c, 1 / 2.2) in 8 bits: images are decoded with c ** 2.2 to linear, as the
project's renderers write. Its Lambertian term is (1 - F)(1 - 0.04) albedo / pi * intensity * n.l with F ~ 0.04 at
roughness 1, so the light's intensity is diffuse * pi / 0.96; ambient is pyrender's ambient light. It draws with
4x multisampling (anti-aliased edges; ours are sampled at pixel centres). tests/test_pyrender_reference.py measures
the agreement on non-square intrinsics scenes (object-mask IoU 1.0, colour within 0.011 away from edges).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from renderers.mesh import place_vertices, vertex_normals
from scenes.world import World

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")  # headless; must be set before PyOpenGL is first imported

__all__ = ["PyrenderUnavailable", "pyrender_mesh", "frame_pose", "render_world_scenes", "render_in_subprocess"]


class PyrenderUnavailable(RuntimeError):
    """pyrender, PyOpenGL's EGL platform or an EGL driver is missing; the message says which and how to get it."""


def _renderer(width: int, height: int):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # third-party import-time deprecations are not this project's
            import pyrender
    except Exception as err:  # ImportError, or PyOpenGL failing to load its EGL platform
        platform = os.environ.get("PYOPENGL_PLATFORM")
        raise PyrenderUnavailable(f"pyrender or PyOpenGL's {platform!r} platform unavailable ({err}); "
                                  "pip install '.[dev]'") from err  # fmt: skip
    try:
        return pyrender.OffscreenRenderer(width, height)
    except Exception as err:  # no EGL driver / display
        raise PyrenderUnavailable(f"pyrender cannot make a headless EGL context: {err}") from err


def pyrender_mesh(verts: torch.Tensor, faces: torch.Tensor, color):
    """A pyrender mesh with the project's vertex normals (so both shade the same surface) and a matte material."""
    import pyrender
    import trimesh

    verts = verts.detach().double()
    normals = vertex_normals(verts, faces)
    surface = trimesh.Trimesh(verts.numpy(), faces.numpy(), vertex_normals=normals.numpy(), process=False)
    material = pyrender.MetallicRoughnessMaterial(
        baseColorFactor=[*map(float, color), 1.0], metallicFactor=0.0, roughnessFactor=1.0
    )
    return pyrender.Mesh.from_trimesh(surface, material=material, smooth=True)


def frame_pose(z: np.ndarray, hint: np.ndarray) -> np.ndarray:
    """(4, 4) pose whose third axis is unit z and whose second is as close to `hint` as possible."""
    z = z / np.linalg.norm(z)
    x = np.cross(hint, z)
    x /= np.linalg.norm(x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2] = x, np.cross(z, x), z
    return pose


def render_world_scenes(world: World, scenes: list[dict]) -> torch.Tensor:
    """The world's scene dicts drawn by pyrender at its image size, nominal appearance: linear RGB FloatTensor
    (B, 3, H, W) in [0, 1]. Raises PyrenderUnavailable without pyrender or EGL."""
    import pyrender

    W, H = world.image_size
    renderer = _renderer(W, H)
    stage, library = world.stage, world.library
    camera, light = stage.camera, stage.light
    fx, fy, cx, cy = camera.pixel_intrinsics(W, H)
    eye, at, up = (np.asarray(v, dtype=np.float64) for v in (camera.eye, camera.at, camera.up))
    camera_pose = frame_pose(eye - at, up)  # pyrender's camera looks along its -z with +y up
    camera_pose[:3, 3] = eye
    towards = np.asarray(light.direction, dtype=np.float64)  # a directional light shines along its pose's -z
    hint = np.array([0.0, 1.0, 0.0]) if abs(towards[1]) < 0.9 * np.linalg.norm(towards) else np.array([1.0, 0, 0])
    t = world.scenes_to_tensors(scenes)
    colors = world.colors
    images = []
    try:
        for b in range(len(scenes)):
            scene = pyrender.Scene(ambient_light=np.array([light.ambient] * 3 + [1.0]), bg_color=[0.0, 0.0, 0.0, 0.0])
            scene.add(pyrender_mesh(stage.table_verts, stage.table_faces, stage.table_color))
            for k, position, yaw in zip(t.shape_ids[b].tolist(), t.positions[b], t.yaws[b], strict=True):
                if k >= 0:
                    verts = place_vertices(
                        library.verts[k].double(), position.double(), library.pose_yaw(k, yaw).double()
                    )
                    scene.add(pyrender_mesh(verts, library.faces[k], colors[k].tolist()))
            scene.add(pyrender.IntrinsicsCamera(fx, fy, cx, cy, znear=camera.znear, zfar=camera.zfar), pose=camera_pose)
            sun = pyrender.DirectionalLight(color=np.ones(3), intensity=light.diffuse * math.pi / 0.96)
            scene.add(sun, pose=frame_pose(towards, hint))
            color, _ = renderer.render(scene)
            images.append((color[..., :3].astype(np.float64) / 255) ** 2.2)  # sRGB-ish gamma 2.2 -> linear
    finally:
        renderer.delete()
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().clamp(0.0, 1.0)


def _child(world_dict: dict, scenes: list[dict]):
    from scenes.world import World

    return render_world_scenes(World.from_dict(world_dict), scenes).numpy()


def render_in_subprocess(world: World, scenes: list[dict]) -> torch.Tensor:
    """`render_world_scenes` in a fresh process: pyrender's EGL context and the project's moderngl one in one
    process crashed Mesa's software rasteriser (a segfault in swrast_dri.so) after a few thousand OpenGL renders,
    so a benchmark that uses both keeps them apart."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return torch.from_numpy(pool.apply(_child, (world.to_dict(), scenes)))
