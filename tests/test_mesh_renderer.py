"""PyTorch3D mesh renderer: shapes, conventions, soft vs hard images, and soft-mode gradients against finite
differences of the hard render (the slow, obviously correct reference for what the image does)."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch3d.structures import Meshes

from renderers.finite_difference import FiniteDifferenceRenderer
from renderers.mesh import MeshRenderer3D, MeshRenderSettings, place_vertices, vertex_normals, yaw_matrices
from scenes import tabletop
from scenes.tabletop import Scene, TableObject
from scenes.tabletop_objects import SHAPES, library
from tests.conftest import assert_close, requires_cuda


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.flatten() @ b.flatten() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def scenes_and_gradients():
    """Gradients of an image loss w.r.t. poses on 8 random scenes: soft autograd, hard autograd, and central
    differences of the hard render at about one pixel of motion."""
    t = tabletop.scenes_to_tensors(tabletop.sample_scenes(8, seed=11, min_objects=1, max_objects=3))
    hard = tabletop.make_renderer(64)
    target = tabletop.perturb_poses(t, seed=0).render(hard).images
    grads = {
        "soft": tabletop.pose_gradients(tabletop.make_renderer(64, "soft"), t, target),
        "hard": tabletop.pose_gradients(hard, t, target),
        "fd": tabletop.pose_gradients(FiniteDifferenceRenderer(hard), t, target),
    }
    return t, grads


def test_output_shapes_dtypes_and_mask_for_both_modes():
    t = tabletop.scenes_to_tensors(tabletop.sample_scenes(3, seed=0, min_objects=0, max_objects=2))
    for mode in ("hard", "soft"):
        out = tabletop.make_renderer(32, mode)(t.shape_ids, t.positions, t.yaws)
        assert out.images.shape == (3, 3, 32, 32) and out.images.dtype == torch.float32
        assert out.object_mask.shape == (3, 32, 32) and out.object_mask.dtype == torch.bool
        assert 0 <= out.images.min() and out.images.max() <= 1


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        MeshRenderSettings(mode="blurry")


def test_yaw_is_counter_clockwise_seen_from_above():
    assert_close(yaw_matrices(torch.tensor(math.pi / 2)) @ torch.tensor([1.0, 0, 0]), [0.0, 1, 0], atol=1e-6)
    placed = place_vertices(torch.tensor([[1.0, 0, 0.5]]), torch.tensor([0.1, 0.2]), torch.tensor(math.pi))
    assert_close(placed, [[-0.9, 0.2, 0.5]], atol=1e-6)


def test_vertex_normals_match_pytorch3d():
    for verts, faces in zip(library().verts, library().faces, strict=True):
        expected = Meshes([verts], [faces]).verts_normals_packed()
        assert_close(vertex_normals(verts, faces), expected, atol=1e-5)


def test_soft_images_are_close_to_hard_ones():
    scenes = tabletop.sample_scenes(6, seed=5, min_objects=0, max_objects=3)
    hard = tabletop.render_scenes(scenes, 64)
    soft = tabletop.render_scenes(scenes, 64, mode="soft")
    assert (soft - hard).abs().mean() < 0.005
    empty = tabletop.render_scenes([Scene()], 64, mode="soft")
    assert_close(empty, tabletop.render_scenes([Scene()], 64), atol=1e-6)


def test_soft_gradients_agree_with_finite_differences_of_the_hard_render(scenes_and_gradients):
    t, grads = scenes_and_gradients
    present = t.shape_ids >= 0
    (soft_pos, soft_yaw), (fd_pos, fd_yaw) = grads["soft"], grads["fd"]
    assert _cosine(soft_pos[present], fd_pos[present]) > 0.9
    # the yaw reference is coarse: a pixel at an object's rim is a 0.2 rad step (0.66 here; 0.90 on 12 others)
    assert _cosine(soft_yaw[present], fd_yaw[present]) > 0.5
    assert 0.5 < soft_pos.norm() / fd_pos.norm() < 2.0
    assert soft_pos[~present].abs().max() == 0 and soft_yaw[~present].abs().max() == 0


def test_hard_autograd_misses_silhouettes_which_is_why_soft_mode_exists(scenes_and_gradients):
    t, grads = scenes_and_gradients
    present = t.shape_ids >= 0
    hard_cos = _cosine(grads["hard"][0][present], grads["fd"][0][present])
    soft_cos = _cosine(grads["soft"][0][present], grads["fd"][0][present])
    assert hard_cos < soft_cos - 0.2, (hard_cos, soft_cos)


@pytest.mark.parametrize("shape", ["sphere", "cylinder"])
def test_yaw_gradient_of_rotationally_symmetric_shapes_is_about_zero(shape):
    scene = Scene((TableObject(shape, (-0.05, 0.0), 0.3), TableObject("box", (0.12, 0.05), 0.5)))
    t = tabletop.scenes_to_tensors([scene])
    target = tabletop.perturb_poses(t, seed=1, yaw_sigma=0.5).render(tabletop.make_renderer(64)).images
    for renderer in (
        tabletop.make_renderer(64, "soft"),
        FiniteDifferenceRenderer(tabletop.make_renderer(64)),
    ):
        d_pos, d_yaw = tabletop.pose_gradients(renderer, t, target)
        radius = 0.055  # metres: compare d/dyaw with the position gradient's effect at the rim
        assert d_yaw[0, 0].abs() / radius < 0.1 * d_pos[0, 0].norm(), (d_yaw, d_pos)
        assert d_yaw[0, 1].abs() / radius > 0.1 * d_pos[0, 1].norm()  # the box's yaw does matter


def test_custom_colors_are_used():
    t = tabletop.scenes_to_tensors([Scene((TableObject("cube", (0.0, 0.0), 0.0),))])
    red = torch.tensor([[[1.0, 0.0, 0.0]]])
    out = tabletop.make_renderer(32)(t.shape_ids, t.positions, t.yaws, red)
    inside = out.images[0][:, out.object_mask[0]]  # (3, P)
    assert inside[0].min() > 0.3 and inside[1:].max() == 0


@requires_cuda
def test_cuda_matches_cpu():
    scenes = tabletop.sample_scenes(4, seed=3, min_objects=1)
    for mode in ("hard", "soft"):
        cpu = tabletop.render_scenes(scenes, 64, mode=mode)
        cuda = tabletop.render_scenes(scenes, 64, mode=mode, device="cuda").cpu()
        assert (cpu - cuda).abs().mean() < 1e-3


def test_renderer_accepts_settings_explicitly():
    renderer = MeshRenderer3D(library(), tabletop.make_stage(), MeshRenderSettings(image_size=16))
    t = tabletop.scenes_to_tensors([Scene((TableObject(SHAPES[0], (0.0, 0.0), 0.0),))])
    assert renderer(t.shape_ids, t.positions, t.yaws).images.shape == (1, 3, 16, 16)
