"""Render-and-compare refinement: pulls perturbed poses back, keeps shapes, counts and the table."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from inverse_graphics.metrics3d import match_scene, summarize
from inverse_graphics.refine import RefineConfig, clamp_to_table, refine
from scenes import tabletop
from scenes.tabletop_objects import footprint

SIZE = 48  # pixels: small, so the test runs in seconds; at 32 px a few degrees of yaw barely change the image


def _errors(preds, truths) -> tuple[float, float]:
    summary = summarize([match_scene(p, t) for p, t in zip(preds, truths)])
    return summary["position_error_mm_mean"], summary["yaw_error_deg_mean"]


@pytest.mark.parametrize("gradient", ["soft", "fd"])
def test_perturbed_poses_are_pulled_back_towards_the_truth(gradient):
    truths = [
        tabletop.Scene.from_dict({"objects": [{"shape": "box", "position": [-0.08, 0.02], "yaw": 0.4}]}),
        tabletop.Scene.from_dict(
            {
                "objects": [
                    {"shape": "wedge", "position": [0.1, -0.05], "yaw": -1.0},
                    {"shape": "cube", "position": [-0.1, 0.1], "yaw": 0.2},
                ]
            }  # fmt: skip
        ),
    ]
    images = tabletop.render_scenes(truths, image_size=SIZE)
    moved = tabletop.perturb_poses(tabletop.scenes_to_tensors(truths), seed=0, position_sigma=0.008, yaw_sigma=0.2)
    start = tabletop.tensors_to_scenes(moved)
    refined = refine(start, images, RefineConfig(steps=12, gradient=gradient))
    before, after = _errors(start, truths), _errors(refined, truths)
    assert after[0] < 0.5 * before[0], (before, after)
    assert after[1] < 0.6 * before[1], (before, after)
    assert [[o["shape"] for o in s["objects"]] for s in refined] == [[o.shape for o in s.objects] for s in truths]


def test_zero_steps_and_empty_scenes_are_returned_unchanged():
    scenes = [{"objects": []}, {"objects": [{"shape": "cube", "position": [0.0, 0.0], "yaw": 0.1}]}]
    images = torch.zeros(2, 3, SIZE, SIZE)
    assert refine(scenes, images, RefineConfig(steps=0)) == scenes
    assert refine(scenes[:1], images[:1]) == scenes[:1]


def test_clamp_to_table_keeps_footprints_on_the_table_and_leaves_inner_objects():
    ids = torch.tensor([[3, 4, 0, -1]])  # box, wedge, cube, empty
    positions = torch.tensor([[[0.30, 0.0], [-0.24, -0.26], [0.0, 0.05], [0.5, 0.5]]])
    yaws = torch.tensor([[0.0, 0.7, 0.3, 0.0]])
    clamped = clamp_to_table(ids, positions, yaws)
    for k, shape in enumerate(("box", "wedge")):
        polygon = footprint(shape, tuple(clamped[0, k].tolist()), float(yaws[0, k]))
        assert abs(polygon).max() == pytest.approx(tabletop.TABLE_HALF_SIZE, abs=1e-6)
    assert clamped[0, 0, 0] == pytest.approx(tabletop.TABLE_HALF_SIZE - 0.08)  # box along x: half length 8 cm
    assert torch.equal(clamped[0, 2:], positions[0, 2:])


def test_bad_input_is_rejected_clearly():
    scene = {"objects": [{"shape": "cube", "position": [0.0, 0.0], "yaw": 0.0}]}
    with pytest.raises(ValueError, match="images must be"):
        refine([scene], torch.zeros(1, 3, 32, 16))
    with pytest.raises(ValueError, match="1 scenes for 2 images"):
        refine([scene], torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="learning rates"):
        RefineConfig(lr_yaw=-math.pi)
    with pytest.raises(ValueError, match="gradient"):
        RefineConfig(gradient="exact")


def test_yaw_invariant_shapes_keep_their_yaw():
    # their yaw gradient is float noise (~1e-5), which Adam would scale up to full steps
    truth = tabletop.Scene.from_dict(
        {
            "objects": [
                {"shape": "sphere", "position": [0.1, 0.05], "yaw": 0.0},
                {"shape": "box", "position": [-0.1, 0.0], "yaw": 0.3},
            ]
        }
    )
    images = tabletop.render_scenes([truth], image_size=SIZE)
    start = tabletop.tensors_to_scenes(tabletop.perturb_poses(tabletop.scenes_to_tensors([truth]), seed=1))
    start[0] = tabletop.Scene(objects=(replace(start[0].objects[0], yaw=0.0), start[0].objects[1]))
    refined = refine(start, images, RefineConfig(steps=10))
    assert refined[0]["objects"][0]["yaw"] == 0.0
