"""The structure search (inverse_graphics.tabletop.scene_search): the ray's table point against the projection,
objects' long axes, and searches that add a missing object, remove a spurious one and leave a right scene alone."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmarks.bench_world import jpeg
from inverse_graphics.tabletop import world3d
from inverse_graphics.tabletop.appearance import fit_albedo, fit_appearance, instance_ids
from inverse_graphics.tabletop.metrics3d import match_scene
from inverse_graphics.tabletop.refine import (
    RefineConfig,
    _levenberg_marquardt,
    _lit,
    _unseen_removed,
    _windowed_screen,
    image_loss,
    refine,
)
from inverse_graphics.tabletop.scene_search import (
    SearchConfig,
    _at_edge,
    _diverse,
    _long_axes,
    _residual_regions,
    _window,
    _with_slots,
    search_scenes,
    table_points,
)
from renderers import opengl
from renderers.mesh import Appearance
from scenes.tabletop_objects import footprints_overlap
from scenes.world import load_world

requires_egl = pytest.mark.skipif(opengl.opengl_available() is not None, reason="the screen draws OpenGL windows")


@pytest.fixture(scope="module")
def kitchen():
    return load_world("kitchen")


@pytest.mark.parametrize("name", ["primitives", "kitchen"])
def test_table_points_invert_the_projection(name):
    world = load_world(name)
    g = np.random.default_rng(0)
    for height in (0.0, 0.05):
        xy = g.uniform(-0.2, 0.2, size=(20, 2))
        points = np.concatenate([xy, np.full((20, 1), height)], 1)
        pixels = world3d._project(world, points, world.image_size)
        back = table_points(world, torch.tensor(pixels, dtype=torch.float32), height, world.image_size)
        assert np.abs(back.numpy() - xy).max() < 1e-4


def test_long_axes_follow_the_meshes(kitchen):
    angles, elongated = _long_axes(kitchen)
    named = dict(zip([o.name for o in kitchen.objects], zip(angles, elongated)))
    assert named["spatula"][1] and named["cracker_box"][1]  # 25 x 6 cm, 16 x 6 cm
    assert not named["bowl"][1] and not named["can"][1]
    # both boxes lie along x at yaw 0 (their bounds are longest in x): the axis is 0 modulo pi
    for name in ("spatula", "cracker_box"):
        assert math.sin(named[name][0]) == pytest.approx(0.0, abs=1e-6)


def _scenes(world, n: int, seed: int, least: int = 2) -> list[dict]:
    return [s for s in world.sample_scenes(8 * n, seed=seed) if len(s["objects"]) >= least][:n]


def _same_objects(pred: dict, true: dict, world) -> bool:
    m = match_scene(pred, true, world=world)
    right = sum(p.true_shape == p.pred_shape for p in m.pairs)
    return len(pred["objects"]) == len(true["objects"]) == right


SEARCH = RefineConfig(search=SearchConfig())


def test_the_search_adds_a_missing_object_and_removes_a_spurious_one(kitchen):
    truth = _scenes(kitchen, 4, seed=11)
    images = kitchen.render_scenes(truth)
    missing, spurious = copy.deepcopy(truth), copy.deepcopy(truth)
    for s in missing:
        s["objects"].pop(0)
    for s, x in zip(spurious, ([0.24, 0.19], [-0.24, 0.19], [0.24, -0.19], [-0.24, -0.19])):
        s["objects"].append({"shape": "can", "position": x, "yaw": 0.0})  # a corner of the table: on it, alone
    for start in (missing, spurious):
        out = refine(start, images, SEARCH, world=kitchen)
        assert sum(_same_objects(p, t, kitchen) for p, t in zip(out, truth)) >= 3


def test_the_search_finds_objects_from_an_empty_start(kitchen):
    truth = [{"objects": [{"shape": "spatula", "position": [0.1, -0.05], "yaw": 0.7}]},
             {"objects": [{"shape": "mug", "position": [-0.1, 0.05], "yaw": -2.0},
                          {"shape": "bowl", "position": [0.12, 0.08], "yaw": 0.0}]}]  # fmt: skip
    images = kitchen.render_scenes(truth)
    out = refine([{"objects": []}] * 2, images, SEARCH, world=kitchen)
    for p, t in zip(out, truth):
        assert _same_objects(p, t, kitchen)
        assert all(pair.position_error_mm < 2.0 for pair in match_scene(p, t, world=kitchen).pairs)


def test_a_right_scene_is_left_as_it_is():
    world = load_world("primitives")
    truth = _scenes(world, 6, seed=3, least=1)
    images = world.render_scenes(truth)
    plain = refine(truth, images, RefineConfig(), world=world)
    searched = refine(truth, images, SEARCH, world=world)
    assert [[o["shape"] for o in s["objects"]] for s in searched] == [[o["shape"] for o in s["objects"]] for s in truth]
    for a, b in zip(plain, searched):
        for oa, ob in zip(a["objects"], b["objects"]):
            assert oa["position"] == pytest.approx(ob["position"], abs=1e-6)


@requires_egl
@pytest.mark.parametrize("exposure", [1.0, 0.85])
def test_the_add_moves_windowed_losses_match_whole_renders(kitchen, exposure):
    """The add move ranks its trials by losses drawn in a window about the added object (refine's screen): their
    change from the scene's loss matches that of the trials rendered whole (gain solved, albedos fitted) to a few
    percent for most trials (the most, where the new object hides much of another, whose fitted albedo the
    screen keeps: about a third), and they rank the same trials best."""
    truth = _scenes(kitchen, 3, seed=5)
    images = (kitchen.render_scenes(truth) * exposure).clamp(0, 1)
    t = world3d.scenes_to_tensors(kitchen, truth)
    cfg = RefineConfig(appearance=True, search=SearchConfig())
    look = fit_appearance(kitchen, t, images, world3d.object_colors(kitchen, t.shape_ids), 0)
    fd = world3d.renderer(kitchen, "fd", kitchen.image_size, "opengl", False)
    screen = _windowed_screen(fd.renderer, kitchen, images, cfg, look, False)

    def whole_loss(s, rows):
        colors = world3d.object_colors(kitchen, s.shape_ids)
        lit = _lit(fd, s, colors, world3d.rows_of(look, rows), images[rows])
        return image_loss(fit_albedo(lit, instance_ids(fd.renderer, s), images[rows], colors, colors)[1], images[rows])

    g = torch.Generator().manual_seed(0)
    rows = torch.arange(3).repeat_interleave(20)
    trial = world3d.rows_of(_with_slots(t, t.shape_ids.shape[1] + 1), rows)
    slot = (trial.shape_ids < 0).int().argmax(1)
    ar = torch.arange(len(rows))
    trial.shape_ids[ar, slot] = torch.randint(len(kitchen.objects), (len(rows),), generator=g)
    trial.positions[ar, slot] = (torch.rand(len(rows), 2, generator=g) - 0.5) * 0.4
    trial.yaws[ar, slot] = torch.rand(len(rows), generator=g) * 6.0
    expected, got = whole_loss(trial, rows), screen(trial, rows, slot)
    change = (expected - whole_loss(t, torch.arange(3))[rows]).abs()
    error = (got - expected).abs() / change
    assert error.median() < 0.02 and torch.quantile(error, 0.9) < 0.15 and error.max() < 0.5
    for b in range(3):
        mine = rows == b
        assert got[mine].argmin() == expected[mine].argmin()
        best = [set(x[mine].topk(3, largest=False).indices.tolist()) for x in (got, expected)]
        assert len(best[0] & best[1]) >= 2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="margin"):
        SearchConfig(margin=1.0)
    with pytest.raises(ValueError, match="yaws"):
        SearchConfig(yaws=0)
    with pytest.raises(ValueError, match="method must be 'lm'"):
        RefineConfig(method="adam", search=SearchConfig())


def test_the_residual_regions_are_the_missing_objects_largest_first(kitchen):
    """Two objects missing from the render: two regions, each centred on its object's silhouette, the larger
    object's first; white noise of sd 0.05 over the image moves them by less than 2 pixels (the signed residual
    is averaged before it is squared)."""
    truth = [{"objects": [{"shape": "cracker_box", "position": [-0.12, 0.05], "yaw": 0.0},
                          {"shape": "can", "position": [0.14, -0.06], "yaw": 0.0}]}]  # fmt: skip
    images = kitchen.render_scenes(truth)
    table = kitchen.render_scenes([{"objects": []}])
    window = _window(kitchen, kitchen.image_size)
    silhouettes = [
        ((kitchen.render_scenes([{"objects": [o]}]) - table) ** 2).sum(1)[0] > 1e-4 for o in truth[0]["objects"]
    ]
    noisy = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    found = []
    for x in (images, noisy):
        centres, _, owner = _residual_regions(x, table, window, regions=3)
        assert owner.tolist()[:2] == [0, 0]
        for (u, v), silhouette in zip(centres[:2].tolist(), silhouettes):
            assert silhouette[int(v), int(u)], (u, v)
        found.append(centres[:2])
    assert (found[0] - found[1]).norm(dim=1).max() < 2.0


def test_the_residual_regions_look_past_the_misfits_of_objects_already_drawn(kitchen):
    """A bowl rendered far darker than it is seen (a light or colour the render does not model) outweighs a
    missing spatula's faint residual: over all pixels the one region found is on the bowl, over the pixels where
    the render shows the table (`covered`, the bowl's silhouette) it is on the spatula."""
    bowl = {"shape": "bowl", "position": [-0.1, 0.05], "yaw": 0.0}
    spatula = {"shape": "spatula", "position": [0.12, -0.08], "yaw": 0.4}
    images = kitchen.render_scenes([{"objects": [bowl, spatula]}])
    drawn = kitchen.render_scenes([{"objects": [bowl]}])
    table = kitchen.render_scenes([{"objects": []}])
    covered = ((drawn - table) ** 2).sum(1) > 1e-6  # (1, H, W)
    spatula_pixels = ((images - drawn) ** 2).sum(1)[0] > 1e-6
    rendered = torch.where(covered[:, None], 0.3 * drawn, drawn)  # the bowl misfit
    window = _window(kitchen, kitchen.image_size)
    u, v = _residual_regions(images, rendered, window, regions=1)[0][0].tolist()  # the region's centroid
    assert covered[0, int(v), int(u)]
    u, v = _residual_regions(images, rendered, window, regions=1, covered=covered)[0][0].tolist()
    assert spatula_pixels[int(v), int(u)], (u, v)


def test_a_bent_region_of_two_touching_spatulas_is_also_proposed_by_its_ends(kitchen):
    """Two missing spatulas meeting at a right angle make one L-shaped region: its centroid lies on neither, but
    the pieces about its two ends do, each with its axis along its own spatula."""
    a = {"shape": "spatula", "position": [0.0, 0.0], "yaw": 0.0}
    b = {"shape": "spatula", "position": [0.13, 0.11], "yaw": math.pi / 2}
    images = kitchen.render_scenes([{"objects": [a, b]}])
    table = kitchen.render_scenes([{"objects": []}])
    window = _window(kitchen, kitchen.image_size)
    masks = [((kitchen.render_scenes([{"objects": [o]}]) - table) ** 2).sum(1)[0] > 1e-6 for o in (a, b)]
    centres, axes, owner = _residual_regions(images, table, window, regions=1)
    assert len(centres) == 3 and owner.tolist() == [0, 0, 0]
    on = [[bool(m[int(v), int(u)]) for m in masks] for u, v in centres.tolist()]
    assert on[0] == [False, False], on  # the whole region's centroid: in the bend, on neither
    assert on[1:] in ([[True, False], [False, True]], [[False, True], [True, False]]), on
    for (u, v), axis in zip(centres[1:].tolist(), axes[1:]):
        k = 0 if masks[0][int(v), int(u)] else 1
        vs, us = np.nonzero(masks[k].numpy())  # the spatula's own silhouette axis, in pixels
        uv = np.stack([us, vs], 1).astype(np.float64)
        own = np.linalg.eigh(np.cov((uv - uv.mean(0)).T))[1][:, 1]
        assert abs(float(np.dot(own, axis.numpy()))) > math.cos(math.radians(20))


def test_a_misplaced_object_fitted_to_the_table_colour_is_still_removed(kitchen):
    """With the albedo fitted at every render (RefineConfig.albedo), a spatula where there is only table could
    match the table's colour and change nothing: the test measures its signal with its nominal albedo, so the
    search removes it."""
    truth = [{"objects": [{"shape": "bowl", "position": [-0.1, 0.05], "yaw": 0.0}]}]
    images = kitchen.render_scenes(truth)
    start = copy.deepcopy(truth)
    start[0]["objects"].append({"shape": "spatula", "position": [0.12, -0.08], "yaw": 0.3})
    out = refine(start, images, RefineConfig(search=SearchConfig(), appearance=True), world=kitchen)
    assert [o["shape"] for o in out[0]["objects"]] == ["bowl"]


def test_an_object_the_image_cannot_see_is_removed(kitchen):
    """A can wholly behind a cracker box changes no pixel: it could not be added, so it is not kept (an object
    that only a prior could place is not evidence of one)."""
    box = {"shape": "cracker_box", "position": [0.0, 0.1], "yaw": 0.0}
    hidden = {"shape": "can", "position": [0.0, 0.19], "yaw": 0.0}
    image = kitchen.render_scenes([{"objects": [box]}], backend="auto")
    both = kitchen.render_scenes([{"objects": [box, hidden]}], backend="auto")
    assert (both - image).abs().max() < 1e-6  # the setting: unseen
    out = refine([{"objects": [box, hidden]}], image, SEARCH, world=kitchen)
    assert [o["shape"] for o in out[0]["objects"]] == ["cracker_box"]


def test_objects_that_polishing_hides_are_removed_from_the_searched_scenes_only(kitchen):
    """After the search, the searched scenes' objects are refined together; one that ends wholly behind another
    (no pixel of its own) is taken out, in the scenes the search changed only."""
    box = {"shape": "cracker_box", "position": [0.0, 0.1], "yaw": 0.0}
    hidden = {"shape": "can", "position": [0.0, 0.19], "yaw": 0.0}
    seen = {"shape": "can", "position": [0.15, -0.1], "yaw": 0.0}
    scenes = [{"objects": [box, hidden, seen]}, {"objects": [box, hidden]}]
    images = kitchen.render_scenes(scenes, backend="auto")
    t = world3d.scenes_to_tensors(kitchen, scenes)
    fd = world3d.renderer(kitchen, "fd", kitchen.image_size, "auto", False)
    out = _unseen_removed(fd, kitchen, t, torch.tensor([0]), images, RefineConfig(), None, False)
    assert out.shape_ids[0].tolist() == [t.shape_ids[0, 0], -1, t.shape_ids[0, 2]]
    assert torch.equal(out.shape_ids[1], t.shape_ids[1])  # not searched: left as it is


def test_an_added_thin_object_is_fitted_alone_and_kept_under_jpeg(kitchen):
    """Under JPEG (quality 75) a missing spatula (thin and flat: little signal) is added: its trial fitted alone
    (the scene's other objects held; their JPEG-smeared edges can pull a joint fit off it) reaches its place from
    5 cm along its length, and the search keeps it."""
    truth = kitchen.sample_scenes(80, seed=77)[16]  # 6 objects, a spatula among them
    j = [o["shape"] for o in truth["objects"]].index("spatula")
    images = jpeg(kitchen.render_scenes([truth], backend="auto"))
    start = copy.deepcopy(truth)
    o = start["objects"][j]
    o["position"] = [o["position"][0] + 0.05 * math.cos(o["yaw"]), o["position"][1] + 0.05 * math.sin(o["yaw"])]
    t = world3d.scenes_to_tensors(kitchen, [start])
    fd = world3d.renderer(kitchen, "fd", kitchen.image_size, "auto", False)
    colors = world3d.object_colors(kitchen, t.shape_ids)
    look = fit_appearance(kitchen, t, images, colors, 0)
    free = torch.zeros_like(t.shape_ids, dtype=torch.bool)
    free[0, j] = True
    cfg = RefineConfig(appearance=True, steps=SearchConfig().lm_steps)
    positions, _ = _levenberg_marquardt(fd, kitchen, t, images, colors, cfg, look, free)
    assert math.dist(positions[0, j].tolist(), truth["objects"][j]["position"]) < 0.01
    assert torch.equal(positions[0, :j], t.positions[0, :j]) and torch.equal(
        positions[0, j + 1 :], t.positions[0, j + 1 :]
    )
    missing = {"objects": [o for k, o in enumerate(start["objects"]) if k != j]}
    out = refine([missing], images, RefineConfig(appearance=True, search=SearchConfig()), world=kitchen)
    assert _same_objects(out[0], truth, kitchen)


def test_one_of_two_interpenetrating_objects_is_removed_even_where_the_image_shows_both(kitchen):
    """The world never draws interpenetrating footprints, so such a scene is not kept, however well it explains
    the image (rendered here with the two boxes through each other): one of them goes, and whatever the search
    then adds to explain the rest is placed clear of the other."""
    pair = {"objects": [{"shape": "cracker_box", "position": [0.0, 0.0], "yaw": 0.0},
                        {"shape": "cracker_box", "position": [0.03, 0.02], "yaw": 1.2}]}  # fmt: skip
    image = kitchen.render_scenes([pair], backend="auto")
    objects = refine([pair], image, SEARCH, world=kitchen)[0]["objects"]
    assert [o["shape"] for o in objects].count("cracker_box") == 1
    prints = [kitchen.object_named(o["shape"]).footprint_at(tuple(o["position"]), o["yaw"]) for o in objects]
    assert not any(footprints_overlap(a, b) for i, a in enumerate(prints) for b in prints[i + 1 :])


def test_one_object_drawn_between_two_of_its_kind_gives_way_to_both(kitchen):
    """Two spatulas side by side and one spatula between them: an addition at either would interpenetrate the
    middle one, so it is tried as a relocation (the middle one out), and the next round adds the other."""
    others = [{"shape": "can", "position": [-0.132, 0.057], "yaw": 0.0},
              {"shape": "bottle", "position": [0.04, 0.194], "yaw": 0.0}]  # fmt: skip
    truth = {"objects": [{"shape": "spatula", "position": [0.172, -0.046], "yaw": -2.27},
                         {"shape": "spatula", "position": [0.058, -0.036], "yaw": -2.44}, *others]}  # fmt: skip
    image = kitchen.render_scenes([truth], backend="auto")
    start = {"objects": [{"shape": "spatula", "position": [0.101, -0.029], "yaw": -1.31}, *others]}
    out = refine([start], image, RefineConfig(search=SearchConfig(), appearance=True), world=kitchen)[0]
    assert _same_objects(out, truth, kitchen)
    pairs = match_scene(out, truth, world=kitchen).pairs
    assert all(p.position_error_mm < 2.0 for p in pairs if p.true_shape == "spatula")


def test_under_a_moved_camera_the_search_keeps_the_true_scenes_only_when_the_camera_is_fitted(kitchen):
    """Images seen from eyes moved 2 cm (the kitchen randomises its camera so): started from the true scenes, the
    search with the nominal camera moves the objects to explain the moved table (median error 5.8 mm here; without
    the rule against additions at the table's edge it also adds objects that are not there); with each image's eye
    fitted first (RefineConfig.camera, the default for a world that randomises its camera) every scene stays right
    and its objects' positions within a few millimetres (0.1 mm median here)."""
    truths = [kitchen.sample_scenes(16, seed=5)[i] for i in (0, 1, 3, 4)]
    t = world3d.scenes_to_tensors(kitchen, truths)
    g = torch.Generator().manual_seed(3)
    offset = 0.02 * torch.nn.functional.normalize(torch.randn(16, 3, generator=g), dim=1)[[0, 1, 3, 4]]
    renderer = world3d.renderer(kitchen, "hard", kitchen.image_size, "auto")
    look = Appearance(eye=torch.tensor(kitchen.camera.eye) + offset)
    images = renderer(t.shape_ids, t.positions, t.yaws, world3d.object_colors(kitchen, t.shape_ids), look).images
    cfg = RefineConfig(appearance=True, albedo=True, search=SearchConfig())
    medians = []
    for camera in (False, True):
        out = refine(truths, images, replace(cfg, camera=camera), world=kitchen)
        pairs = [pair for p, q in zip(out, truths) for pair in match_scene(p, q, world=kitchen).pairs]
        medians.append(np.median([pair.position_error_mm for pair in pairs]))
    assert all(_same_objects(p, q, kitchen) for p, q in zip(out, truths))  # the fitted camera's
    assert medians[0] > 3.0 and medians[1] < 1.0, medians


def test_the_trials_refined_are_the_best_of_each_region_then_of_each_object_then_any():
    """A region's trials of one object differ little: the few refined are first the best of each region, then the
    best of each other object in a region already drawn from, then the next best."""
    loss = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    region = torch.tensor([0, 0, 0, 0, 1, 1])
    shape = torch.tensor([2, 2, 5, 5, 2, 2])
    index = torch.arange(10, 16)
    assert _diverse(loss, region, shape, 2, index).tolist() == [10, 14]
    assert _diverse(loss, region, shape, 3, index).tolist() == [10, 14, 12]
    assert _diverse(loss, region, shape, 5, index).tolist() == [10, 14, 12, 11, 13]
    assert _diverse(loss, region, shape, 9, index).tolist() == [10, 14, 12, 11, 13, 15]


def test_an_added_object_is_placed_by_its_middle_not_its_frames_origin(kitchen):
    """The spatula's frame origin is 2 cm from the middle of its surface (the blade is wide, the handle thin): its
    trials are placed so that the middle falls on the residual's centroid. Before any fit (lm_steps 0), at eight
    yaws, every spatula is added, within 1 cm of its place at the median and 3 cm at most (perspective draws the
    nearer end larger); placed by the origin they were 2.5 cm off at the median and one was not added."""
    yaws = [0.7, 2.0, -1.2, 0.0, 1.57, 3.0, -2.5, -0.4]
    truth = [{"objects": [{"shape": "spatula", "position": [0.05, -0.03], "yaw": y}]} for y in yaws]
    images = kitchen.render_scenes(truth)
    renderer = kitchen.make_renderer("hard", "pytorch3d")

    def render(s, rows):
        out = renderer(s.shape_ids, s.positions, s.yaws, world3d.object_colors(kitchen, s.shape_ids)).images
        return torch.stack([out, out], 1)

    empty = world3d.scenes_to_tensors(kitchen, [{"objects": []}] * len(yaws))
    out = search_scenes(kitchen, empty, images, render, lambda s, rows, slots: s, SearchConfig(rounds=1, lm_steps=0))
    errors = []
    for b, scene in enumerate(truth):
        found = world3d.tensors_to_scenes(kitchen, world3d.rows_of(out, torch.tensor([b])))[0]["objects"]
        assert [o["shape"] for o in found] == ["spatula"]
        errors.append(math.dist(found[0]["position"], scene["objects"][0]["position"]))
    assert np.median(errors) < 0.01 and max(errors) < 0.03, errors


def test_an_object_added_beside_a_mug_drawn_the_wrong_way_round_turns_the_mug(kitchen):
    """A mug with its handle turned the wrong way reaches into a missing spatula's footprint: the spatula is not
    refused, nor the mug removed for it; the mug is turned clear (of its 4 turns, the one the image favours) and
    both are kept, the handle where the image has it."""
    mug = {"shape": "mug", "position": [0.02, 0.0], "yaw": 0.0}  # handle towards +x, 7 cm from its middle
    spatula = {"shape": "spatula", "position": [-0.06, 0.0], "yaw": math.pi / 2}  # 2 cm clear of the mug's body
    truth = [{"objects": [mug, spatula]}]
    images = kitchen.render_scenes(truth)
    start = [{"objects": [{**mug, "yaw": math.pi}]}]  # the handle over the spatula
    out = refine(start, images, SEARCH, world=kitchen)
    assert _same_objects(out[0], truth[0], kitchen)
    found = {o["shape"]: o for o in out[0]["objects"]}
    assert abs(math.remainder(found["mug"]["yaw"], 2 * math.pi)) < math.radians(15)


def test_nothing_is_added_at_the_tables_very_edge_where_the_world_never_draws_an_object(kitchen):
    """The world's sampler keeps min_gap (1 cm) between a footprint and the table's edge; an addition nearer it than
    half that is refused (a camera fitted a little off leaves a line of residual along the edge, which a thin object
    clamped against it would explain). A spatula drawn 2 mm from the far edge is not added; the same spatula 8 mm
    from it is."""
    renderer = kitchen.make_renderer("hard", "pytorch3d")

    def render(s, rows):
        out = renderer(s.shape_ids, s.positions, s.yaws, world3d.object_colors(kitchen, s.shape_ids)).images
        return torch.stack([out, out], 1)

    found = []
    for gap in (0.002, 0.008):
        spatula = {"shape": "spatula", "position": [0.05, 0.25 - 0.032 - gap], "yaw": 0.0}
        t = world3d.scenes_to_tensors(kitchen, [{"objects": [spatula]}])
        assert _at_edge(kitchen, t, 0, 0) == (gap < 0.005)
        images = kitchen.render_scenes([{"objects": [spatula]}])
        empty = world3d.scenes_to_tensors(kitchen, [{"objects": []}])
        cfg = SearchConfig(rounds=1, lm_steps=0)
        out = search_scenes(kitchen, empty, images, render, lambda s, rows, slots: s, cfg)
        found.append(int((out.shape_ids >= 0).sum()))
    assert found == [0, 1]


def test_a_mug_drawn_with_its_handle_on_the_wrong_side_is_turned(kitchen):
    """The pose fit does not cross a mug's body to move its handle: started with the handle half a turn off, the
    search's turn move tries the mug at its other turns about its place and keeps the one the image shows."""
    truth = [{"objects": [{"shape": "mug", "position": [0.03, -0.02], "yaw": 0.4},
                          {"shape": "can", "position": [-0.15, 0.08], "yaw": 0.0}]}]  # fmt: skip
    images = kitchen.render_scenes(truth)
    start = copy.deepcopy(truth)
    start[0]["objects"][0]["yaw"] = 0.4 + math.pi
    plain = refine(start, images, RefineConfig(), world=kitchen)
    searched = refine(start, images, SEARCH, world=kitchen)
    for out, turned in ((plain, False), (searched, True)):
        mug = next(o for o in out[0]["objects"] if o["shape"] == "mug")
        assert (abs(math.remainder(mug["yaw"] - 0.4, 2 * math.pi)) < math.radians(10)) == turned
    no_turn = refine(start, images, RefineConfig(search=SearchConfig(turn=False)), world=kitchen)
    mug = next(o for o in no_turn[0]["objects"] if o["shape"] == "mug")
    assert abs(math.remainder(mug["yaw"] - 0.4, 2 * math.pi)) > math.radians(90)


def test_a_mug_off_by_a_turn_between_the_grids_turns_is_turned_and_fitted(kitchen):
    """Seen from above, a mug's handle is a sliver in front of its body: started 150 degrees off (a pose the
    shipped air-kitchen's infer gave on a held-out scene), none of the turn move's 8 turns about the mug lands within
    10 degrees of the truth, and the nearest unfitted one explains less than the start. The best turn refined by
    LM reaches the truth, which the image favours."""
    true_yaw, start_yaw = -1.11, 2.56
    truth = [{"objects": [{"shape": "mug", "position": [-0.16, -0.159], "yaw": true_yaw}]}]
    images = kitchen.render_scenes(truth)
    turns = [start_yaw + k * 2 * math.pi / SearchConfig().turn_yaws for k in range(1, SearchConfig().turn_yaws)]
    assert min(abs(math.remainder(y - true_yaw, 2 * math.pi)) for y in turns) > math.radians(10)
    start = copy.deepcopy(truth)
    start[0]["objects"][0]["yaw"] = start_yaw
    out = refine(start, images, SEARCH, world=kitchen)
    (mug,) = out[0]["objects"]
    assert abs(math.remainder(mug["yaw"] - true_yaw, 2 * math.pi)) < math.radians(3)


SWAP_WORLD = """
name = "parts"
image_size = [112, 80]
objects_per_scene = [1, 3]
[camera]
eye = [0.12, -0.42, 0.52]
at = [0.01, 0.02, 0.0]
fx = 118.0
fy = 112.0
cx = 53.0
cy = 42.5
[light]
direction = [0.7, -0.2, 0.8]
ambient = 0.3
diffuse = 0.7
[table]
size = [0.44, 0.36]
color = [0.35, 0.30, 0.26]
[randomize]
object_color = 0.1
[[objects]]
name = "nut"
mesh = "nut.stl"
scale = 0.001
color = [0.75, 0.75, 0.78]
[[objects]]
name = "block"
primitive = "box"
extents = [0.05, 0.03, 0.025]
color = [0.20, 0.55, 0.80]
[[objects]]
name = "bracket"
primitive = "box"
extents = [0.07, 0.025, 0.03]
color = [0.30, 0.75, 0.35]
"""


def test_a_small_object_of_another_colour_is_swapped_for_the_one_the_image_shows(tmp_path):
    """Under JPEG, a blue block drawn as a grey nut or a green bracket 7 mm off: the wrong object's albedo, fitted
    towards the image's blue, takes up most of the losses' difference, so the swap is kept only by the likelihood
    ratio of the two (swap_margin 0), not with the add move's margin against their nominal colours' difference."""
    import trimesh

    trimesh.creation.cylinder(radius=22.0, height=14.0, sections=6).export(tmp_path / "nut.stl")
    (tmp_path / "parts.toml").write_text(SWAP_WORLD)
    world = load_world(tmp_path / "parts.toml")
    truth = [{"objects": [{"shape": "block", "position": [-0.1, 0.05], "yaw": 0.6},
                          {"shape": "bracket", "position": [0.08, -0.06], "yaw": -0.4}]},
             {"objects": [{"shape": "block", "position": [0.05, 0.08], "yaw": 2.0}]},
             {"objects": [{"shape": "block", "position": [-0.15, -0.1], "yaw": 1.0},
                          {"shape": "nut", "position": [0.1, 0.1], "yaw": 0.3}]}]  # fmt: skip
    images = jpeg(world.render_scenes(truth))
    right = {0.0: 0, 0.25: 0}
    for wrong in ("nut", "bracket"):
        start = copy.deepcopy(truth)
        for s in start:
            s["objects"][0].update(
                shape=wrong, yaw=0.0, position=[s["objects"][0]["position"][0], s["objects"][0]["position"][1] + 0.007]
            )
        for margin in right:
            cfg = RefineConfig(search=SearchConfig(swap_margin=margin), appearance=True)
            out = refine(start, images, cfg, world=world)
            right[margin] += sum(_same_objects(p, t, world) for p, t in zip(out, truth))
    assert right[0.0] == 6
    assert right[0.25] <= 2  # the add move's margin kept most of the wrong objects


def test_a_spatula_mostly_behind_a_box_is_added_from_its_visible_end(kitchen, monkeypatch):
    """Only the handle shows beside the cracker box: centred on that region the spatula's blade lands where the
    image shows table, so it is also tried with the region as either end of it (shifted a third of its length along
    the region's axis). The shipped air-kitchen's infer finds all five objects; with no shift (lengths 0), four."""
    import inverse_graphics as ig
    from inverse_graphics.tabletop import scene_search

    truth = [{"objects": [{"shape": "bowl", "position": [-0.15, -0.143], "yaw": -0.02},
                          {"shape": "can", "position": [-0.196, 0.187], "yaw": 2.1},
                          {"shape": "cracker_box", "position": [0.063, -0.139], "yaw": -2.93},
                          {"shape": "spatula", "position": [-0.014, 0.072], "yaw": 1.65},
                          {"shape": "spatula", "position": [0.17, -0.041], "yaw": 2.42}]}]  # fmt: skip
    images = kitchen.render_scenes(truth)
    model = ig.load_pretrained("air-kitchen")
    found = model.infer(images).scenes
    monkeypatch.setattr(scene_search, "_length_along", lambda obj, angle: 0.0)
    centred = model.infer(images).scenes
    assert _same_objects(found[0], truth[0], kitchen)
    assert len(centred[0]["objects"]) == 4


def test_a_swapped_object_is_put_with_its_middle_on_the_old_objects_middle(kitchen):
    """The swap tries every other object at the old one's place: with the middles of their surfaces together, not
    their frames' origins (a spatula's is 2 cm along its handle; on the unseen desk world an L bracket's is its
    corner, 2.5 cm from its middle: a pen swapped in there started off the pen in the image)."""
    from inverse_graphics.tabletop import scene_search, world3d

    t = world3d.scenes_to_tensors(kitchen, [{"objects": [{"shape": "spatula", "position": [0.02, -0.01], "yaw": 0.7}]}])
    middles = torch.tensor(np.array([o.mesh.centroid[:2] for o in kitchen.objects]), dtype=torch.float32)
    seen = []

    def render(s, rows):
        seen.append(world3d.rows_of(s, torch.arange(len(rows))))
        return torch.zeros(len(rows), 2, 3, 96, 128)

    def fit(s, rows, slots):
        return s

    images, current = torch.zeros(1, 3, 96, 128), torch.zeros(1, 2, 3, 96, 128)
    moved = torch.zeros(1, dtype=torch.bool)
    cfg = scene_search.SearchConfig()
    scene_search._swap(
        kitchen, t, images, current, moved, torch.tensor([0]), torch.tensor([0]), render, fit, cfg, middles
    )
    trials = seen[0]
    where = trials.positions[:, 0] + scene_search._turned(middles[trials.shape_ids[:, 0]], trials.yaws[:, 0])
    middle = t.positions[0, 0] + scene_search._turned(middles[t.shape_ids[:, 0]], t.yaws[:, 0])[0]
    others = set(range(len(kitchen.objects))) - {int(t.shape_ids[0, 0])}
    assert set(trials.shape_ids[:, 0].tolist()) == others
    torch.testing.assert_close(where, middle.expand_as(where), atol=1e-6, rtol=0)
    assert float(middles[kitchen.shape_names.index("spatula")].norm()) > 0.015  # the spatula's middle is off its origin
