"""3D evaluation: symmetry-reduced yaw errors, Hungarian matching with gating, summaries, bad input."""

from __future__ import annotations

import math
import random

import pytest
import torch

from inverse_graphics.tabletop.metrics3d import MatchSettings, as_scene, evaluate_method, match_scene, summarize
from scenes import tabletop

TRUE = {
    "objects": [
        {"shape": "cube", "position": [-0.12, -0.10], "yaw": 0.3},
        {"shape": "box", "position": [0.10, -0.10], "yaw": 1.0},
        {"shape": "wedge", "position": [0.00, 0.12], "yaw": -0.6},
    ]
}


def _turned(scene: dict, turn: float, shift: tuple[float, float] = (0.0, 0.0)) -> dict:
    """Every object turned by `turn` radians and moved by `shift` metres."""
    objects = [
        {"shape": o["shape"], "position": [o["position"][0] + shift[0], o["position"][1] + shift[1]],
         "yaw": o["yaw"] + turn}
        for o in scene["objects"]
    ]  # fmt: skip
    return {"objects": objects}


def _yaw_errors(pred: dict) -> dict[str, float | None]:
    return {p.true_shape: p.yaw_error_deg for p in match_scene(pred, TRUE).pairs}


def test_quarter_turn_is_no_error_for_a_cube_only():
    errors = _yaw_errors(_turned(TRUE, math.pi / 2))
    assert errors["cube"] == pytest.approx(0.0, abs=1e-9)
    assert errors["box"] == pytest.approx(90.0)
    assert errors["wedge"] == pytest.approx(90.0)


def test_half_turn_is_no_error_for_a_cube_or_box_but_180_degrees_for_a_wedge():
    errors = _yaw_errors(_turned(TRUE, math.pi))
    assert errors["cube"] == pytest.approx(0.0, abs=1e-9)
    assert errors["box"] == pytest.approx(0.0, abs=1e-9)
    assert errors["wedge"] == pytest.approx(180.0)


def test_small_turns_across_the_wrap_around():
    scene = {"objects": [{"shape": "wedge", "position": [0.0, 0.0], "yaw": math.pi - 0.01}]}
    pred = {"objects": [{"shape": "wedge", "position": [0.0, 0.0], "yaw": -math.pi + 0.02}]}
    assert match_scene(pred, scene).pairs[0].yaw_error_deg == pytest.approx(math.degrees(0.03))


def test_any_yaw_shapes_and_wrong_identities_have_no_yaw_error():
    true = {"objects": [{"shape": "sphere", "position": [0.0, 0.0], "yaw": 0.0},
                        {"shape": "cube", "position": [0.15, 0.0], "yaw": 0.0}]}  # fmt: skip
    pred = {"objects": [{"shape": "sphere", "position": [0.0, 0.0], "yaw": 1.0},
                        {"shape": "box", "position": [0.15, 0.0], "yaw": 0.0}]}  # fmt: skip
    match = match_scene(pred, true)
    assert [p.yaw_error_deg for p in match.pairs] == [None, None]
    summary = summarize([match])
    assert summary["identity_acc"] == 0.5 and summary["n_yaw"] == 0 and summary["yaw_error_deg_median"] is None


def test_position_error_in_millimetres():
    pairs = match_scene(_turned(TRUE, 0.0, shift=(0.003, -0.004)), TRUE).pairs
    assert [p.position_error_mm for p in pairs] == pytest.approx([5.0] * 3)


def test_missing_and_extra_objects():
    """Two of three found, one spurious far from anything, one prediction beyond the gate of its nearest object."""
    pred = {
        "objects": [
            {"shape": "cube", "position": [-0.12, -0.10], "yaw": 0.3},  # found
            {"shape": "wedge", "position": [0.00, 0.125], "yaw": -0.6},  # found, 5 mm off
            {"shape": "sphere", "position": [0.20, 0.20], "yaw": 0.0},  # extra, far from everything
            {"shape": "box", "position": [0.10, -0.05], "yaw": 1.0},  # 50 mm from the box: beyond the gate
        ]
    }
    match = match_scene(pred, TRUE)
    assert match.n_true == 3 and match.n_pred == 4
    assert sorted((p.true_index, p.pred_index) for p in match.pairs) == [(0, 0), (2, 1)]
    summary = summarize([match])
    assert summary["count_acc"] == 0.0
    assert summary["recall"] == pytest.approx(2 / 3) and summary["precision"] == pytest.approx(2 / 4)
    assert summary["position_error_mm_median"] == pytest.approx(2.5)
    wide = match_scene(pred, TRUE, MatchSettings(gate=0.06))
    assert len(wide.pairs) == 3
    # where the errors are: the box missed (and its prediction unmatched), the sphere spurious
    by = summary["by_shape"]
    assert by["box"] == {"true": 1, "missed": 1, "unmatched_predictions": 1, "wrong_identity": 0,
                         "position_error_mm_median": None}  # fmt: skip
    assert by["sphere"]["true"] == 0 and by["sphere"]["unmatched_predictions"] == 1
    assert by["wedge"]["missed"] == 0 and by["wedge"]["position_error_mm_median"] == pytest.approx(5.0)
    assert summary["count_confusion"] == {"3": {"4": 1}}
    relabelled = match_scene({"objects": [{**pred["objects"][0], "shape": "box"}]}, TRUE)
    assert summarize([relabelled])["by_shape"]["cube"]["wrong_identity"] == 1


def test_empty_scenes():
    empty = {"objects": []}
    assert match_scene(empty, TRUE).pairs == () and match_scene(TRUE, empty).n_pred == 3
    summary = summarize([match_scene(empty, empty), match_scene(empty, TRUE)])
    assert summary["count_acc"] == 0.5 and summary["recall"] == 0.0 and summary["precision"] is None


def test_matching_does_not_depend_on_the_order_of_objects():
    truths = tabletop.sample_scenes(20, seed=3, min_objects=1, max_objects=4)
    rng = random.Random(0)
    for true in truths:
        pred = tabletop.Scene(
            tuple(tabletop.TableObject(o.shape, (o.position[0] + 0.004, o.position[1]), o.yaw + 0.05)
                  for o in true.objects)
        )  # fmt: skip
        shuffled = list(pred.objects)
        rng.shuffle(shuffled)
        a = summarize([match_scene(pred, true)])
        b = summarize([match_scene(tabletop.Scene(tuple(shuffled)), true)])
        assert a == b
        assert a["n_matched"] == len(true.objects) and a["position_error_mm_median"] == pytest.approx(4.0)


def test_matching_maximises_the_pairs_within_the_gate():
    """With a 6 cm gate, greedy nearest-first would pair pred 0 with true 1 and leave true 0 unmatched."""
    true = {"objects": [{"shape": "box", "position": [0.0, 0.0], "yaw": 0.0},
                        {"shape": "box", "position": [0.08, 0.0], "yaw": 0.0}]}  # fmt: skip
    pred = {"objects": [{"shape": "box", "position": [0.045, 0.0], "yaw": 0.0},
                        {"shape": "box", "position": [0.13, 0.0], "yaw": 0.0}]}  # fmt: skip
    match = match_scene(pred, true, MatchSettings(gate=0.06))
    assert sorted((p.true_index, p.pred_index) for p in match.pairs) == [(0, 0), (1, 1)]


def test_evaluate_method_with_a_perfect_predictor():
    truths = tabletop.sample_scenes(6, seed=4)
    images = torch.zeros(6, 3, 8, 8)
    lookup = iter(truths)
    summary = evaluate_method(lambda x: [next(lookup) for _ in range(len(x))], images, truths, batch_size=4)
    assert summary["count_acc"] == 1.0 and summary["n_matched"] == summary["n_true"]
    assert summary["images_per_s"] > 0


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"objects": [{"shape": "torus", "position": [0, 0], "yaw": 0}]}, "unknown"),
        ({"objects": [{"shape": "cube", "position": [0, float("nan")], "yaw": 0}]}, "finite"),
        ({"objects": [{"shape": "cube", "position": [0], "yaw": 0}]}, "position"),
        ([], "objects"),
    ],
)
def test_bad_scenes_are_rejected_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        as_scene(bad)


def test_evaluate_method_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="B true scenes"):
        evaluate_method(lambda x: [], torch.zeros(2, 3, 8, 8), [])
