"""Camera conventions of every tabletop renderer: pinhole intrinsics against the pinhole formula (a closed form),
intrinsics against the equivalent fov camera, non-square images, OpenGL against PyTorch3D, and soft-mode pose
gradients on a non-square image against central differences of the hard render.

The closed-form check renders squares that face the camera: the pinhole projection of such a square is an
axis-aligned rectangle [u0, u1] x [v0, v1] in continuous pixel coordinates, so the object mask must be exactly
the pixels whose centres (col + 0.5, row + 0.5) lie inside it."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from renderers import opengl
from renderers.finite_difference import FiniteDifferenceRenderer, FiniteDifferenceSettings
from renderers.mesh import Appearance, Camera, MeshLibrary, MeshRenderer3D, MeshRenderSettings, image_width_height
from scenes import tabletop
from scenes.tabletop_objects import library
from tests.conftest import assert_close

UNAVAILABLE = opengl.opengl_available()
requires_egl = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"OpenGL renderer unavailable: {UNAVAILABLE}")

SIZE = (56, 40)  # (W, H)
# non-square pixels (fx != fy) and a principal point well off the image centre (28, 20)
CAMERA = Camera(eye=(0.03, -0.45, 0.62), at=(0.02, 0.03, 0.0), intrinsics=(61.0, 53.0, 21.3, 24.6), znear=0.2, zfar=1.6)


def camera_axes(camera: Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors of the computer-vision camera frame in the world: right (x), down (y), forward (z)."""
    eye, at, up = (np.asarray(v, dtype=np.float64) for v in (camera.eye, camera.at, camera.up))
    forward = (at - eye) / np.linalg.norm(at - eye)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    return right, np.cross(forward, right), forward


def project(camera: Camera, point: np.ndarray, width: int, height: int) -> np.ndarray:
    """The pinhole formula: u = cx + fx x / z, v = cy + fy y / z (continuous pixels from the top left)."""
    fx, fy, cx, cy = camera.pixel_intrinsics(width, height)
    right, down, forward = camera_axes(camera)
    d = point - np.asarray(camera.eye)
    return np.array([cx + fx * (d @ right) / (d @ forward), cy + fy * (d @ down) / (d @ forward)])


def facing_squares(camera: Camera, centres: list[np.ndarray], half: float) -> MeshLibrary:
    """One shape per centre: a square of side 2 * half facing the camera, both windings (so back-face culling
    keeps one), already in world coordinates (drawn at pose (0, 0, 0))."""
    right, down, _ = camera_axes(camera)
    verts, faces = [], []
    for c in centres:
        corners = [c + half * (sx * right + sy * down) for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        verts.append(torch.tensor(np.stack(corners), dtype=torch.float32))
        faces.append(torch.tensor([[0, 1, 2], [0, 2, 3], [0, 2, 1], [0, 3, 2]]))
    return MeshLibrary(tuple(verts), tuple(faces))


def expected_rectangle_mask(camera, centre, half, width, height) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact mask of a facing square and a mask of pixels whose centre is within 1e-3 px of its edges."""
    right, down, _ = camera_axes(camera)
    u0, v0 = project(camera, centre - half * (right + down), width, height)
    u1, v1 = project(camera, centre + half * (right + down), width, height)
    cols, rows = np.arange(width) + 0.5, np.arange(height) + 0.5
    inside = ((cols > u0) & (cols < u1))[None, :] & ((rows > v0) & (rows < v1))[:, None]
    near_u = (np.abs(cols - u0) < 1e-3) | (np.abs(cols - u1) < 1e-3)
    near_v = (np.abs(rows - v0) < 1e-3) | (np.abs(rows - v1) < 1e-3)
    return torch.from_numpy(inside), torch.from_numpy(near_u[None, :] | near_v[:, None])


def centroid(mask: torch.Tensor) -> np.ndarray:
    """(u, v) mean of the pixel centres in a BoolTensor (H, W) mask."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return np.array([cols.double().mean() + 0.5, rows.double().mean() + 0.5])


def square_renderers(camera: Camera, library: MeshLibrary, size) -> dict:
    stage = replace(tabletop.make_stage(), camera=camera)
    renderers = {
        mode: MeshRenderer3D(library, stage, MeshRenderSettings(image_size=size, mode=mode))
        for mode in ("hard", "soft")
    }
    if UNAVAILABLE is None:
        renderers["opengl"] = opengl.OpenGLRenderer(library, stage, opengl.OpenGLSettings(image_size=size))
    return renderers


@pytest.mark.parametrize("size", [SIZE, (40, 56)])
def test_facing_squares_land_where_the_pinhole_formula_puts_them(size):
    """Closed form: a square centred on the optical axis lands centred on (cx, cy); one off the axis where the
    pinhole formula says; each object mask is exactly the rectangle of its projected corners."""
    W, H = size
    right, down, forward = camera_axes(CAMERA)
    on_axis = np.asarray(CAMERA.eye) + 0.5 * forward  # 0.5 m in front of the camera, above the table
    off_axis = on_axis + 0.06 * right - 0.05 * down + 0.04 * forward
    half = 0.03
    library = facing_squares(CAMERA, [on_axis, off_axis], half)
    shape_ids = torch.tensor([[0], [1]])
    positions, yaws = torch.zeros(2, 1, 2), torch.zeros(2, 1)
    for name, renderer in square_renderers(CAMERA, library, size).items():
        out = renderer(shape_ids, positions, yaws)
        assert out.images.shape == (2, 3, H, W) and out.object_mask.shape == (2, H, W), name
        for b, centre in enumerate([on_axis, off_axis]):
            expected, ambiguous = expected_rectangle_mask(CAMERA, centre, half, W, H)
            assert expected.sum() >= 9, "the square must cover several pixels"
            wrong = (out.object_mask[b] != expected) & ~ambiguous
            assert not wrong.any(), (name, b, torch.nonzero(wrong)[:5])
            assert np.abs(centroid(out.object_mask[b]) - project(CAMERA, centre, W, H)).max() < 0.5, (name, b)
    fx, fy, cx, cy = CAMERA.intrinsics
    assert_close(project(CAMERA, on_axis, W, H), [cx, cy], atol=1e-9)


def test_world_to_clip_projects_by_the_pinhole_formula():
    """3D AIR projects points into the image with `world_to_clip`; OpenGL's NDC maps to pixels as
    u = (x + 1) W / 2, v = (1 - y) H / 2."""
    W, H = SIZE
    rng = np.random.default_rng(0)
    points = np.asarray(CAMERA.at) + rng.uniform(-0.2, 0.2, (20, 3))
    for camera in (CAMERA, replace(CAMERA, intrinsics=None, fov_degrees=35.0)):
        clip = np.c_[points, np.ones(20)] @ opengl.world_to_clip(camera, SIZE).T.astype(np.float64)
        ndc = clip[:, :2] / clip[:, 3:]
        pixels = np.stack([(ndc[:, 0] + 1) * W / 2, (1 - ndc[:, 1]) * H / 2], axis=1)
        expected = np.stack([project(camera, p, W, H) for p in points])
        assert_close(pixels, expected, atol=1e-3)
    with pytest.raises(ValueError, match="image size"):
        opengl.world_to_clip(CAMERA)


def test_closed_form_look_at_is_pytorch3d_s():
    """`world_to_clip`'s view matrix is computed in closed form (fast for per-scene eyes); it must be PyTorch3D's
    look_at_view_transform for any eye, including one straight above `at` (PyTorch3D's replacement axis)."""
    from renderers.mesh import pytorch3d_cameras

    rng = np.random.default_rng(1)
    eyes = [tuple(rng.uniform(-0.8, 0.8, 3) + (0, 0, 1.0)) for _ in range(20)] + [(0.0, 0.0, 0.9)]
    for eye in eyes:
        camera = replace(CAMERA, eye=eye)
        view = pytorch3d_cameras(camera, 1, torch.device("cpu")).get_world_to_view_transform().get_matrix()[0]
        assert_close(opengl._look_at(camera), view.T.double().numpy(), atol=1e-6)


def test_batched_world_to_clips_are_world_to_clip_one_at_a_time():
    """The OpenGL renderer builds a per-scene camera's matrices in one batch (`world_to_clips`): the same as
    `world_to_clip` for each eye, the degenerate one straight above `at` included, for fov and intrinsics."""
    rng = np.random.default_rng(2)
    eyes = np.concatenate([rng.uniform(-0.8, 0.8, (20, 3)) + (0, 0, 1.0), [[0.0, 0.0, 0.9]]])
    for camera, size in ((CAMERA, SIZE), (Camera(eye=(0, -1, 1), at=(0, 0, 0), fov_degrees=50.0), (80, 48))):
        batched = opengl.world_to_clips(camera, size, eyes)
        for eye, clip in zip(eyes, batched):
            assert_close(clip, opengl.world_to_clip(camera, size, tuple(eye)), atol=1e-6, rtol=1e-6)


def test_pixel_intrinsics_of_a_fov_camera_and_validation():
    fov = Camera(eye=(0, -1, 1), at=(0, 0, 0), fov_degrees=60.0)
    f = 48 / (2 * math.tan(math.radians(30)))
    assert_close(fov.pixel_intrinsics(80, 48), [f, f, 40, 24], atol=1e-12)  # vertical fov: from the height
    assert CAMERA.pixel_intrinsics(10, 10) == CAMERA.intrinsics  # given in pixels of the rendered image
    assert Camera(eye=(0, -1, 1), at=(0, 0, 0), intrinsics=[50, 50, 32, 32]).intrinsics == (50.0, 50.0, 32.0, 32.0)
    for bad in [(0.0, 50.0, 32.0, 32.0), (50.0, 50.0, 32.0), (50.0, float("nan"), 1.0, 1.0)]:
        with pytest.raises(ValueError, match="intrinsics"):
            Camera(eye=(0, -1, 1), at=(0, 0, 0), intrinsics=bad)
    with pytest.raises(ValueError, match="znear"):
        Camera(eye=(0, -1, 1), at=(0, 0, 0), znear=1.0, zfar=0.5)


def test_image_sizes_are_an_int_or_width_height():
    s = MeshRenderSettings(image_size=[80, 48])  # a list from a file becomes a tuple
    assert (s.image_size, s.width, s.height) == ((80, 48), 80, 48)
    assert (MeshRenderSettings(image_size=32).width, MeshRenderSettings(image_size=32).height) == (32, 32)
    assert image_width_height(7) == (7, 7)
    for bad in [0, (64,), (64, 0), (64.0, 48), "64", True]:
        with pytest.raises(ValueError, match="image_size"):
            MeshRenderSettings(image_size=bad)
        with pytest.raises(ValueError, match="image_size"):
            opengl.OpenGLSettings(image_size=bad)


def _scenes(n=6, seed=9, max_objects=4):
    t = tabletop.scenes_to_tensors(tabletop.sample_scenes(n, seed=seed, min_objects=1, max_objects=max_objects))
    return t, tabletop.shape_colors(t.shape_ids)


def _renderer(camera, size, mode="hard", backend="pytorch3d"):
    stage = replace(tabletop.make_stage(), camera=camera)
    if backend == "opengl":
        return opengl.OpenGLRenderer(library(), stage, opengl.OpenGLSettings(image_size=size))
    return MeshRenderer3D(library(), stage, MeshRenderSettings(image_size=size, mode=mode))


def _assert_same_images(a, b, msg):
    """Equal up to rasterizer edge ties: mean |diff| < 1e-4, under 0.2 % of pixels off by > 0.05."""
    diff = (a.images - b.images).abs()
    assert a.images.shape == b.images.shape, msg
    assert diff.mean() < 1e-4 and diff.amax(1).gt(0.05).float().mean() < 2e-3, (msg, diff.mean())
    assert (a.object_mask != b.object_mask).float().mean() < 2e-3, msg


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_intrinsics_equal_to_a_fov_camera_give_the_same_images(mode):
    """(a) fx = fy = H / (2 tan(fov / 2)), cx = W / 2, cy = H / 2. On a square image the fov camera is PyTorch3D's
    FoVPerspectiveCameras and the intrinsics one its PerspectiveCameras: two code paths; on a non-square image
    the fov is the vertical one."""
    t, colors = _scenes()
    fov = tabletop.CAMERA
    for size in [48, (64, 40)]:
        W, H = image_width_height(size)
        f = H / (2 * math.tan(math.radians(fov.fov_degrees) / 2))
        pinhole = replace(fov, intrinsics=(f, f, W / 2, H / 2))
        a = _renderer(fov, size, mode)(t.shape_ids, t.positions, t.yaws, colors)
        b = _renderer(pinhole, size, mode)(t.shape_ids, t.positions, t.yaws, colors)
        _assert_same_images(a, b, (mode, size))
    square = _renderer(fov, 48, mode)(t.shape_ids, t.positions, t.yaws, colors)
    assert_close(square.images, tabletop.make_renderer(48, mode)(t.shape_ids, t.positions, t.yaws, colors).images)


def test_a_wider_image_shows_more_of_the_same_picture():
    """The same fov camera at (80, 48) and (48, 48): the square image is the wide one's central 48 columns."""
    t, colors = _scenes()
    wide = _renderer(tabletop.CAMERA, (80, 48))(t.shape_ids, t.positions, t.yaws, colors)
    square = _renderer(tabletop.CAMERA, 48)(t.shape_ids, t.positions, t.yaws, colors)
    crop = replace(wide, images=wide.images[..., 16:64], object_mask=wide.object_mask[..., 16:64])
    _assert_same_images(crop, square, "crop")


@pytest.mark.skipif(UNAVAILABLE is not None, reason=f"OpenGL renderer unavailable: {UNAVAILABLE}")
@pytest.mark.parametrize("size", [(56, 40), (40, 56)])
def test_opengl_matches_pytorch3d_on_non_square_intrinsics_with_appearance(size):
    """(c) The tolerance of tests/test_opengl.py: mean |difference| < 1e-3, at most 0.1 % of pixels off by more
    than 0.05, masks differing on under 0.1 % of pixels."""
    t, colors = _scenes(16)
    camera = replace(CAMERA, eye=(0.0, -0.5, 0.75), at=(0.0, 0.0, 0.0), znear=0.4)
    stage = replace(tabletop.make_stage(), camera=camera)
    g = torch.Generator().manual_seed(0)
    look = Appearance(
        light_direction=torch.randn(16, 3, generator=g) * 0.5 + torch.tensor([0.0, 0.0, 1.0]),
        ambient=0.2 + 0.3 * torch.rand(16, generator=g),
        diffuse=0.4 + 0.4 * torch.rand(16, generator=g),
        table_color=torch.rand(16, 3, generator=g),
        eye=torch.tensor(camera.eye) + 0.03 * torch.randn(16, 3, generator=g),
    )
    p3d = MeshRenderer3D(library(), stage, MeshRenderSettings(image_size=size))
    gl = opengl.OpenGLRenderer(library(), stage, opengl.OpenGLSettings(image_size=size))
    for appearance in (None, look):
        a = p3d(t.shape_ids, t.positions, t.yaws, colors, appearance)
        b = gl(t.shape_ids, t.positions, t.yaws, colors, appearance)
        diff = (a.images - b.images).abs()
        assert a.images.shape == b.images.shape == (16, 3, size[1], size[0])
        assert diff.mean() < 1e-3 and diff.amax(1).gt(0.05).float().mean() < 1e-3, diff.mean()
        assert (a.object_mask != b.object_mask).float().mean() < 1e-3
        assert a.object_mask.any(), "objects must be in view"


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.flatten() @ b.flatten() / (a.norm() * b.norm()))


def test_soft_pose_gradients_on_a_non_square_intrinsics_image_agree_with_differences_of_the_hard_render():
    """(d) As tests/test_mesh_renderer.py at 64 x 64 (cosine 0.96 there), on 80 x 60 pixels with fx != fy and an
    off-centre principal point: the soft render's autograd against central differences of the hard render with
    one-pixel steps. Measured: position cosine 0.93 here (0.95 on seed 12), yaw 0.78. The reference coarsens
    with the pixel: at 72 x 48 a fov camera gives 0.91, as does a pinhole one."""
    size = (80, 60)
    camera = replace(CAMERA, eye=(0.0, -0.5, 0.75), at=(0.0, 0.0, 0.0), intrinsics=(88.0, 84.0, 37.5, 32.5))
    t, _ = _scenes(8, seed=11, max_objects=3)
    hard, soft = _renderer(camera, size), _renderer(camera, size, "soft")
    target = tabletop.perturb_poses(t, seed=0).render(hard).images
    fd = FiniteDifferenceRenderer(hard, FiniteDifferenceSettings.for_image_size(size, camera))
    (soft_pos, soft_yaw), (fd_pos, fd_yaw) = (tabletop.pose_gradients(r, t, target) for r in (soft, fd))
    present = t.shape_ids >= 0
    assert _cosine(soft_pos[present], fd_pos[present]) > 0.9
    assert _cosine(soft_yaw[present], fd_yaw[present]) > 0.5  # coarse reference, as at 64 x 64
    assert 0.5 < soft_pos.norm() / fd_pos.norm() < 2.0


def test_finite_difference_steps_are_one_pixel():
    assert FiniteDifferenceSettings.for_image_size(64) == FiniteDifferenceSettings()
    assert FiniteDifferenceSettings.for_image_size((96, 32)).position_step == pytest.approx(0.022)  # by the height
    steps = FiniteDifferenceSettings.for_image_size(SIZE, CAMERA, method="spsa")
    distance = math.dist(CAMERA.eye, CAMERA.at)
    assert steps.position_step == pytest.approx(distance / math.sqrt(61.0 * 53.0)) and steps.method == "spsa"
    assert steps.yaw_step == pytest.approx(steps.position_step / 0.055)
