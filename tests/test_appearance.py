"""Per-scene `Appearance` in every tabletop renderer: nominal values give the images of no appearance; a batch
with per-scene appearances equals each scene rendered alone on a stage built from its appearance (the slow
reference); the PyTorch3D render is differentiable in it; finite differences pass it through."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from renderers import opengl
from renderers.finite_difference import FiniteDifferenceRenderer, FiniteDifferenceSettings
from renderers.mesh import Appearance, Camera, MeshRenderer3D, MeshRenderSettings
from scenes import tabletop
from scenes.tabletop_objects import library
from tests.conftest import assert_close

UNAVAILABLE = opengl.opengl_available()
SIZE = (40, 32)
CAMERA = Camera(eye=(0.0, -0.5, 0.75), at=(0.0, 0.0, 0.0), intrinsics=(42.0, 40.0, 19.0, 17.5), znear=0.4, zfar=1.6)
STAGE = replace(tabletop.make_stage(), camera=CAMERA)


def _renderer(kind: str, stage=STAGE):
    if kind == "opengl":
        if UNAVAILABLE is not None:
            pytest.skip(f"OpenGL renderer unavailable: {UNAVAILABLE}")
        return opengl.OpenGLRenderer(library(), stage, opengl.OpenGLSettings(image_size=SIZE))
    return MeshRenderer3D(library(), stage, MeshRenderSettings(image_size=SIZE, mode=kind))


def _varied(batch: int, seed: int = 0) -> Appearance:
    g = torch.Generator().manual_seed(seed)
    return Appearance(
        light_direction=torch.randn(batch, 3, generator=g) * 0.5 + torch.tensor([0.0, 0.0, 1.0]),
        ambient=0.2 + 0.3 * torch.rand(batch, generator=g),
        diffuse=0.4 + 0.4 * torch.rand(batch, generator=g),
        table_color=torch.rand(batch, 3, generator=g),
        eye=torch.tensor(CAMERA.eye) + 0.03 * torch.randn(batch, 3, generator=g),
    )


def _scenes(n: int = 4, seed: int = 2):
    t = tabletop.scenes_to_tensors(tabletop.sample_scenes(n, seed=seed, min_objects=1, max_objects=3))
    return t, tabletop.shape_colors(t.shape_ids)


@pytest.mark.parametrize("kind", ["hard", "soft", "opengl"])
def test_nominal_appearance_gives_the_images_of_none(kind):
    t, colors = _scenes()
    renderer = _renderer(kind)
    plain = renderer(t.shape_ids, t.positions, t.yaws, colors)
    for look in (Appearance(), Appearance.nominal(STAGE, 4)):
        out = renderer(t.shape_ids, t.positions, t.yaws, colors, look)
        assert_close(out.images, plain.images, atol=1e-6, msg=kind)
        assert torch.equal(out.object_mask, plain.object_mask)


@pytest.mark.parametrize("kind", ["hard", "soft", "opengl"])
def test_a_batch_of_appearances_equals_each_scene_alone_on_its_own_stage(kind):
    t, colors = _scenes()
    look = _varied(4)
    batch = _renderer(kind)(t.shape_ids, t.positions, t.yaws, colors, look)
    for b in range(4):
        alone = _renderer(kind, look.scene_stage(STAGE, b))
        ref = alone(t.shape_ids[b : b + 1], t.positions[b : b + 1], t.yaws[b : b + 1], colors[b : b + 1])
        assert_close(batch.images[b : b + 1], ref.images, atol=1e-5, msg=f"{kind} scene {b}")
        assert torch.equal(batch.object_mask[b : b + 1], ref.object_mask)
    nominal = _renderer(kind)(t.shape_ids, t.positions, t.yaws, colors)
    assert (batch.images - nominal.images).abs().mean() > 0.02  # the appearance did change the pictures


def test_each_field_alone_changes_what_it_should():
    t, colors = _scenes(2)
    renderer = _renderer("hard")
    plain = renderer(t.shape_ids, t.positions, t.yaws, colors)
    table = (~plain.object_mask & (plain.images.sum(1) > 0))[:, None].expand(-1, 3, -1, -1)  # not the background
    red = renderer(t.shape_ids, t.positions, t.yaws, colors, Appearance(table_color=torch.tensor([[1.0, 0, 0]] * 2)))
    assert red.images[:, 1:][table[:, 1:]].max() == 0 and torch.equal(red.images[~table], plain.images[~table])
    dim = renderer(t.shape_ids, t.positions, t.yaws, colors, Appearance(ambient=torch.tensor([0.1, 0.1])))
    # colour = albedo * (ambient + diffuse * max(0, n . l)): the table (albedo 0.45) loses 0.45 * (0.35 - 0.1)
    assert_close((plain.images - dim.images)[table], torch.full_like(plain.images[table], 0.45 * 0.25), atol=1e-5)
    assert (dim.images <= plain.images + 1e-6).all() and (dim.images < plain.images - 0.05).any()
    moved = renderer(t.shape_ids, t.positions, t.yaws, colors, Appearance(eye=torch.tensor([[0.05, -0.5, 0.75]] * 2)))
    assert (moved.object_mask != plain.object_mask).any()


def test_bad_appearance_shapes_are_refused_naming_the_field():
    t, _ = _scenes(2)
    for bad in (Appearance(ambient=torch.ones(3)), Appearance(eye=torch.ones(2, 2)), Appearance(diffuse=[1.0, 1.0])):
        with pytest.raises(ValueError, match=r"Appearance\.(ambient|eye|diffuse)"):
            _renderer("hard")(t.shape_ids, t.positions, t.yaws, None, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "names"), [("hard", ("ambient", "diffuse", "light_direction", "table_color")), ("soft", ("table_color",))]
)
def test_the_pytorch3d_render_is_differentiable_in_the_appearance(mode, names):
    """Autograd of an image loss w.r.t. the appearance against central differences of the same render (smooth
    in these: no silhouette moves). Soft mode: the table behind the objects is rendered under the appearance."""
    t, colors = _scenes(2)
    renderer = _renderer(mode)
    look = _varied(2)
    weights = torch.rand(2, 3, SIZE[1], SIZE[0], generator=torch.Generator().manual_seed(1))

    def loss(**fields) -> torch.Tensor:
        images = renderer(t.shape_ids, t.positions, t.yaws, colors, replace(look, **fields)).images
        return (images * weights).sum()

    for name in names:
        value = getattr(look, name).clone().requires_grad_(True)
        loss(**{name: value}).backward()
        h = 1e-3
        numeric = torch.zeros_like(value)
        for i in range(value.numel()):
            step = torch.zeros(value.numel())
            step[i] = h
            step = step.reshape(value.shape)
            with torch.no_grad():
                numeric.view(-1)[i] = (loss(**{name: value + step}) - loss(**{name: value - step})) / (2 * h)
        assert_close(value.grad, numeric, atol=0.02 * numeric.abs().max().item(), msg=name)


def _pose_gradients(renderer, t, target, colors=None, look=None):
    positions = t.positions.clone().requires_grad_(True)
    yaws = t.yaws.clone().requires_grad_(True)
    images = renderer(t.shape_ids, positions, yaws, colors, look).images
    ((images - target) ** 2).sum().backward()
    return positions.grad, yaws.grad


def test_finite_differences_pass_the_appearance_through():
    """Around the soft renderer with small steps, finite differences under a varied light and table reproduce its
    autograd under the same appearance (the setting of tests/test_finite_difference.py: 32 px, its scenes), and
    the forward images are the inner renderer's."""
    t = tabletop.scenes_to_tensors(tabletop.sample_scenes(4, seed=21, min_objects=1, max_objects=3))
    soft = tabletop.make_renderer(32, "soft")
    look = replace(_varied(4, seed=4), eye=None)
    moved = tabletop.perturb_poses(t, seed=2)
    target = soft(moved.shape_ids, moved.positions, moved.yaws, None, look).images.detach()
    fd = FiniteDifferenceRenderer(soft, FiniteDifferenceSettings(position_step=2e-4, yaw_step=2e-3))
    images = fd(t.shape_ids, t.positions, t.yaws, None, look).images
    assert_close(images, soft(t.shape_ids, t.positions, t.yaws, None, look).images)
    (auto_pos, auto_yaw), (fd_pos, fd_yaw) = (_pose_gradients(r, t, target, None, look) for r in (soft, fd))
    assert_close(fd_pos, auto_pos, atol=0.03 * auto_pos.abs().max().item(), msg="positions")
    assert_close(fd_yaw, auto_yaw, atol=0.03 * auto_yaw.abs().max().item(), msg="yaws")


def test_finite_differences_under_a_batch_of_appearances_equal_each_scene_alone():
    """Every perturbed copy of a scene is rendered under that scene's appearance (eye included): the gradients of
    the batch equal those of each scene differentiated alone on a stage built from its appearance."""
    t, colors = _scenes(3)
    look = _varied(3, seed=6)
    hard = _renderer("hard")
    target = hard(t.shape_ids, t.positions + 0.01, t.yaws + 0.2, colors, look).images
    settings = FiniteDifferenceSettings.for_image_size(SIZE, CAMERA)
    batch_pos, batch_yaw = _pose_gradients(FiniteDifferenceRenderer(hard, settings), t, target, colors, look)
    assert batch_pos.abs().max() > 0
    for b in range(3):
        one = tabletop.SceneTensors(t.shape_ids[b : b + 1], t.positions[b : b + 1], t.yaws[b : b + 1])
        alone = FiniteDifferenceRenderer(_renderer("hard", look.scene_stage(STAGE, b)), settings)
        pos, yaw = _pose_gradients(alone, one, target[b : b + 1], colors[b : b + 1])
        assert_close(batch_pos[b : b + 1], pos, atol=1e-3, msg=f"positions {b}")
        assert_close(batch_yaw[b : b + 1], yaw, atol=1e-3, msg=f"yaws {b}")


@pytest.mark.parametrize("kind", ["hard", "soft", "opengl"])
def test_an_empty_batch_gives_empty_images(kind):
    t, _ = _scenes(1)
    none = Appearance.nominal(STAGE, 0)
    out = _renderer(kind)(t.shape_ids[:0], t.positions[:0], t.yaws[:0], None, none)
    assert out.images.shape == (0, 3, SIZE[1], SIZE[0]) and out.object_mask.shape == (0, SIZE[1], SIZE[0])


def test_take_selects_rows_and_keeps_unset_fields_unset():
    look = Appearance(ambient=torch.tensor([0.1, 0.2, 0.3]))
    picked = look.take(torch.tensor([2, 2, 0]))
    assert_close(picked.ambient, [0.3, 0.3, 0.1]) and picked.eye is None
    assert Appearance().is_nominal() and not look.is_nominal()


# ---- per-object albedo (RefineConfig.albedo) ------------------------------------------------------------------
@pytest.mark.parametrize("moved", [False, True])
def test_instance_ids_are_each_objects_pixels(moved):
    """Against a slow reference: the pixels where the scene's render changes when one object is taken out; also
    seen from a moved camera (a fitted eye), whose ids differ from the nominal camera's."""
    from inverse_graphics.tabletop import world3d
    from inverse_graphics.tabletop.appearance import instance_ids
    from scenes.world import load_world

    world = load_world("kitchen")
    scenes = [s for s in world.sample_scenes(12, seed=4) if len(s["objects"]) >= 3][:3]
    t = world3d.scenes_to_tensors(world, scenes)
    renderer = world3d.renderer(world, "hard", world.image_size, "auto")
    eye = torch.tensor(world.camera.eye) + torch.tensor([[0.02, -0.01, 0.01], [-0.015, 0.0, -0.01], [0.0, 0.02, 0.0]])
    look = Appearance(eye=eye) if moved else None
    ids = instance_ids(renderer, t, eye if moved else None)
    if moved:
        assert not torch.equal(ids, instance_ids(renderer, t))
    colors = world3d.object_colors(world, t.shape_ids)
    full = renderer(t.shape_ids, t.positions, t.yaws, colors, look).images
    for j in range(t.shape_ids.shape[1]):
        if not (t.shape_ids[:, j] >= 0).any():
            continue
        out = t.shape_ids.clone()
        out[:, j] = -1
        without = renderer(out, t.positions, t.yaws, colors, look).images
        changed = ((full - without).abs().sum(1) > 1e-5) & (t.shape_ids[:, j] >= 0)[:, None, None]
        assert torch.equal(changed, ids == j), j


def test_the_albedo_fit_recovers_jittered_colours_exactly_and_keeps_its_range():
    from inverse_graphics.tabletop import world3d
    from inverse_graphics.tabletop.appearance import ALBEDO_RANGE, fit_albedo, instance_ids
    from scenes.world import load_world

    world = load_world("kitchen")
    t = world3d.scenes_to_tensors(world, world.sample_scenes(8, seed=5))
    nominal = world3d.object_colors(world, t.shape_ids)
    renderer = world3d.renderer(world, "hard", world.image_size, "auto")
    jitter = (torch.rand(nominal.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.15
    truth = (nominal + jitter).clamp(0, 1)
    images = renderer(t.shape_ids, t.positions, t.yaws, truth).images
    rendered = renderer(t.shape_ids, t.positions, t.yaws, nominal).images
    ids = instance_ids(renderer, t)
    fitted, redrawn = fit_albedo(rendered, ids, images, nominal, nominal)
    seen = torch.stack([(ids == j).flatten(1).sum(1) > 20 for j in range(t.shape_ids.shape[1])], 1)  # (B, N)
    assert (fitted - truth).abs()[seen].max() < 1e-3
    assert ((redrawn - images) ** 2).sum() < 1e-4 * ((rendered - images) ** 2).sum()
    # an image far off: the albedo stops at ALBEDO_RANGE from the nominal
    far, _ = fit_albedo(rendered, ids, (images * 0.2), nominal, nominal)
    assert ((far - nominal).abs() <= ALBEDO_RANGE + 1e-6).all()


def test_a_tinted_table_is_fitted_with_the_albedos_within_its_range():
    """The world randomises the table's colour too: given the table's nominal colour, `fit_albedo` rescales its
    pixels per channel like an object's (within ALBEDO_RANGE), so the redrawn table matches a tinted one; without
    it the table stays as rendered."""
    from inverse_graphics.tabletop import world3d
    from inverse_graphics.tabletop.appearance import ALBEDO_RANGE, fit_albedo, instance_ids
    from scenes.world import load_world

    world = load_world("kitchen")
    t = world3d.scenes_to_tensors(world, world.sample_scenes(4, seed=5))
    colors = world3d.object_colors(world, t.shape_ids)
    renderer = world3d.renderer(world, "hard", world.image_size, "auto")
    table = torch.tensor(world.table.color)
    tint = (table + torch.tensor([[0.1, -0.05, 0.0], [-0.1, 0.0, 0.08], [0.0, 0.0, 0.0], [0.4, 0.4, 0.4]])).clamp(0, 1)
    images = renderer(t.shape_ids, t.positions, t.yaws, colors, Appearance(table_color=tint)).images
    rendered = renderer(t.shape_ids, t.positions, t.yaws, colors).images
    ids = instance_ids(renderer, t)
    on_table = (ids == -1)[:, None].expand_as(images) & (rendered > 0.02)  # the table's lit pixels
    _, kept = fit_albedo(rendered, ids, images, colors, colors)
    _, redrawn = fit_albedo(rendered, ids, images, colors, colors, table)
    assert torch.equal(kept[on_table], rendered[on_table])
    error = (redrawn - images).abs().masked_fill(~on_table, 0).flatten(1).amax(1)  # (B,)
    assert error[:3].max() < 1e-3, error
    # a tint beyond the range: the table's colour stops at ALBEDO_RANGE from its nominal
    for c in range(3):
        lit = on_table[3, c] & (redrawn[3, c] < 1.0)
        ratio = redrawn[3, c][lit] / rendered[3, c][lit]
        assert ratio.tolist() == pytest.approx([float((table[c] + ALBEDO_RANGE) / table[c])] * len(ratio), rel=1e-4)


# ---- the camera's position (RefineConfig.camera) --------------------------------------------------------------
def test_the_eye_steps_are_a_pixel_of_the_tables_motion():
    """Closed form: a camera looking straight down from height d with focal length f pixels sees a table corner at
    radius r from the axis at f r / d pixels from the centre, so raising the eye by d^2 / (f r) moves it one pixel.
    The steps halve when the images double."""
    from inverse_graphics.tabletop.appearance import eye_steps
    from scenes.world import load_world

    world = load_world("kitchen")
    d, fov = 0.9, 50.0
    camera = replace(world.camera, eye=(0.0, 0.0, d), at=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0), fov_degrees=fov,
                     pixel=None)  # fmt: skip
    down = replace(world, camera=camera)
    W, H = down.image_size
    f = H / (2 * math.tan(math.radians(fov) / 2))
    r = math.hypot(*(s / 2 for s in world.table.size))
    assert float(eye_steps(down, (W, H))[2]) == pytest.approx(d * d / (f * r), rel=1e-3)
    assert_close(eye_steps(world, (2 * W, 2 * H)), eye_steps(world, (W, H)) / 2, rtol=1e-3)


def test_the_camera_fit_recovers_a_moved_eye_with_the_poses_known():
    """Kitchen scenes seen from eyes moved 18 mm (and one not moved), the poses and light known: Gauss-Newton from
    the nominal eye finds them within 3 mm (median), 10 of 11 within 8 mm (a hard render's residual has shallow
    local minima: the worst, 12 mm off, at an image loss 16% of the nominal eye's), none further than it started,
    and leaves the unmoved one in place."""
    from inverse_graphics.tabletop import world3d
    from inverse_graphics.tabletop.appearance import fit_eye, nominal_appearance
    from scenes.world import load_world

    world = load_world("kitchen")
    scenes = [s for s in world.sample_scenes(40, seed=4) if len(s["objects"]) >= 2][:12]
    t = world3d.scenes_to_tensors(world, scenes)
    offsets = torch.nn.functional.normalize(torch.randn(12, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    offsets = 0.018 * offsets
    offsets[-1] = 0.0
    eye = torch.tensor(world.camera.eye) + offsets
    colors = world3d.object_colors(world, t.shape_ids)
    renderer = world3d.renderer(world, "hard", world.image_size, "auto")
    images = renderer(t.shape_ids, t.positions, t.yaws, colors, Appearance(eye=eye)).images
    fit = fit_eye(world, t, images, colors, nominal_appearance(world, len(scenes)), renderer=renderer)
    assert fit.eye is not None
    error = (fit.eye - eye).norm(dim=1) * 1000  # mm
    assert error.median() < 3.0 and (error[:-1] < 8.0).sum() >= 10 and error.max() < 18.0 and error[-1] < 0.5, error
    assert fit.gain.tolist() == pytest.approx([1.0] * 12, abs=0.01)
