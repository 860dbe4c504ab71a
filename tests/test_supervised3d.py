"""The supervised tabletop regressor: shapes, yaw codes, Hungarian-matched loss, decoding, a smoke run of training."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from inverse_graphics.checkpoint import CHECKPOINT_NAME, CheckpointError
from inverse_graphics.tabletop.data3d import make_labelled_renders
from inverse_graphics.tabletop.modules3d import ConvEncoder, SlotOutput
from inverse_graphics.tabletop.supervised3d import (
    LossWeights,
    SupervisedConfig,
    SupervisedRegressor,
    match_slots,
    matched_loss,
    pair_costs,
    yaw_orders,
)
from inverse_graphics.tabletop.train_supervised3d import SupervisedTrainConfig, _Run, load_supervised, train_supervised
from renderers.opengl import opengl_available
from scenes import tabletop
from scenes.tabletop import Scene, SceneTensors
from scenes.tabletop_objects import SHAPES
from tests.conftest import assert_close

S = len(SHAPES)
CUBE, SPHERE, BOX, WEDGE = (SHAPES.index(s) for s in ("cube", "sphere", "box", "wedge"))


def _ideal_output(t: SceneTensors, slots: int, symmetric: bool = True) -> SlotOutput:
    """The SlotOutput a perfect regressor would give for `t` (objects in slot order, confident logits)."""
    B, N = t.shape_ids.shape
    present = t.shape_ids >= 0
    logits = torch.full((B, slots), -10.0)
    logits[:, :N] = torch.where(present, 10.0, -10.0)
    shapes = torch.full((B, slots, S), -10.0)
    shapes[:, :N] = torch.nn.functional.one_hot(t.shape_ids.clamp(min=0), S) * 20.0 - 10.0
    positions = torch.zeros(B, slots, 2)
    positions[:, :N] = t.positions
    m = yaw_orders(symmetric)[None, None, :].float()  # (1, 1, S)
    yaw = torch.zeros(B, slots)
    yaw[:, :N] = t.yaws
    vectors = torch.stack([torch.cos(m * yaw[..., None]), torch.sin(m * yaw[..., None])], -1)  # (B, K, S, 2)
    return SlotOutput(logits, shapes, positions, vectors)


def _labels(objects: list[tuple[int, float, float, float]], n: int = 3) -> SceneTensors:
    """One scene's labels from (shape id, x, y, yaw) tuples, padded to n slots."""
    ids = torch.full((1, n), -1)
    positions, yaws = torch.zeros(1, n, 2), torch.zeros(1, n)
    for i, (k, x, y, yaw) in enumerate(objects):
        ids[0, i], positions[0, i], yaws[0, i] = k, torch.tensor([x, y]), yaw
    return SceneTensors(ids, positions, yaws)


def test_yaw_orders_follow_each_shapes_symmetry():
    assert dict(zip(SHAPES, yaw_orders(True).tolist())) == {"cube": 4, "sphere": 0, "cylinder": 0, "box": 2, "wedge": 1}
    assert dict(zip(SHAPES, yaw_orders(False).tolist())) == {
        "cube": 1,
        "sphere": 0,
        "cylinder": 0,
        "box": 1,
        "wedge": 1,
    }


def test_shapes_of_every_module():
    assert ConvEncoder(64, (8, 16), 32)(torch.rand(2, 3, 64, 64)).shape == (2, 32)
    model = SupervisedRegressor(SupervisedConfig(channels=(8, 16, 16, 16), embed_dim=32, slots=4))
    out = model(torch.rand(2, 3, 64, 64))
    assert out.presence_logits.shape == (2, 4) and out.shape_logits.shape == (2, 4, S)
    assert out.positions.shape == (2, 4, 2) and out.yaw_vectors.shape == (2, 4, S, 2)
    t = model.decode(out)
    assert t.shape_ids.shape == (2, 4) and t.positions.shape == (2, 4, 2) and t.yaws.shape == (2, 4)


def test_bad_images_are_rejected_clearly():
    model = SupervisedRegressor(SupervisedConfig(channels=(8,), embed_dim=8))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 64, 64\)"):
        model(torch.rand(2, 64, 64))


def test_symmetric_yaw_code_gives_one_target_for_equivalent_yaws():
    """A cube a quarter turn on, or a box a half turn on, costs nothing more; a wedge a half turn on does."""
    truth = _labels([(CUBE, -0.1, 0.0, 0.3), (BOX, 0.1, 0.0, 1.0), (WEDGE, 0.0, 0.15, -0.6)])
    turned = {CUBE: math.pi / 2, BOX: math.pi, WEDGE: math.pi}
    pred = SceneTensors(truth.shape_ids, truth.positions, truth.yaws + torch.tensor([[turned[CUBE], turned[BOX], 0]]))
    out = _ideal_output(pred, slots=3)
    costs = pair_costs(out, truth, yaw_orders(True), LossWeights())
    exact = pair_costs(_ideal_output(truth, slots=3), truth, yaw_orders(True), LossWeights())
    assert_close(costs.diagonal(dim1=1, dim2=2), exact.diagonal(dim1=1, dim2=2), atol=1e-4)
    wedge_turned = SceneTensors(truth.shape_ids, truth.positions, truth.yaws + torch.tensor([[0, 0, math.pi]]))
    wedge_costs = pair_costs(_ideal_output(wedge_turned, slots=3), truth, yaw_orders(True), LossWeights())
    assert wedge_costs[0, 2, 2] - exact[0, 2, 2] == pytest.approx(4.0, abs=1e-4)  # |(-1, 0) - (1, 0)|^2
    plain = pair_costs(_ideal_output(pred, slots=3, symmetric=False), truth, yaw_orders(False), LossWeights())
    assert plain[0, 0, 0] - exact[0, 0, 0] == pytest.approx(2.0, abs=1e-4)  # a quarter turn: |(0, 1) - (1, 0)|^2


def test_matching_pairs_each_object_with_the_slot_that_explains_it():
    truth = _labels([(CUBE, -0.1, 0.0, 0.3), (SPHERE, 0.1, 0.0, 0.0)])
    out = _ideal_output(_labels([(SPHERE, 0.1, 0.0, 0.0), (CUBE, -0.1, 0.0, 0.3)]), slots=3)
    matched = match_slots(pair_costs(out, truth, yaw_orders(True), LossWeights()), truth.shape_ids >= 0)
    assert matched[0].nonzero().tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ValueError, match="3 objects but the regressor has only 2 slots"):
        match_slots(torch.zeros(1, 2, 3), torch.ones(1, 3, dtype=torch.bool))


def test_loss_is_invariant_to_the_order_of_true_objects_and_low_for_a_perfect_output():
    objects = [(CUBE, -0.1, 0.0, 0.3), (BOX, 0.1, 0.05, 1.0), (WEDGE, 0.0, 0.15, -0.6)]
    out = SupervisedRegressor(SupervisedConfig(channels=(8,), embed_dim=8))(torch.rand(1, 3, 64, 64))
    losses = [
        matched_loss(out, _labels(order), yaw_orders(True), LossWeights())[0] for order in (objects, objects[::-1])
    ]
    assert_close(losses[0], losses[1], atol=1e-5)
    perfect, stats = matched_loss(
        _ideal_output(_labels(objects), slots=3), _labels(objects), yaw_orders(True), LossWeights()
    )
    assert float(perfect) < 1e-3 and stats["identity_acc"] == 1.0 and stats["position_error_mm"] == 0.0


def test_decode_recovers_a_scene_modulo_symmetry():
    truth = Scene.from_dict(
        {
            "objects": [
                {"shape": "cube", "position": [-0.12, -0.1], "yaw": 1.3},
                {"shape": "sphere", "position": [0.12, -0.12], "yaw": 0.0},
                {"shape": "wedge", "position": [0.14, 0.14], "yaw": -2.6},
            ]
        }  # fmt: skip
    )
    model = SupervisedRegressor(SupervisedConfig(channels=(8,), embed_dim=8))
    decoded = tabletop.tensors_to_scenes(model.decode(_ideal_output(tabletop.scenes_to_tensors([truth]), slots=3)))[0]
    assert [o.shape for o in decoded.objects] == ["cube", "sphere", "wedge"]
    assert_close([o.position for o in decoded.objects], [o.position for o in truth.objects], atol=1e-6)
    assert decoded.objects[0].yaw == pytest.approx(1.3 - math.pi / 2, abs=1e-5)  # same cube, a quarter turn back
    assert decoded.objects[2].yaw == pytest.approx(-2.6, abs=1e-5)


def test_infer_returns_valid_json_scenes():
    model = SupervisedRegressor(SupervisedConfig(channels=(8,), embed_dim=8)).eval()
    with torch.no_grad():
        model.head.fc.bias[0::18].fill_(5.0)  # every slot's presence logit: all slots report an object
    out = model.infer(torch.rand(3, 3, 64, 64))
    assert out.counts.tolist() == [3, 3, 3] and len(out.scenes) == 3
    for scene in out.scenes:
        parsed = Scene.from_dict(json.loads(json.dumps(scene)), allow_overlap=True)  # on the table, finite
        assert len(parsed.objects) == 3


def test_labelled_renders_are_deterministic_and_padded():
    a = make_labelled_renders(4, seed=1, image_size=32, max_objects=3, backend="pytorch3d")
    b = make_labelled_renders(4, seed=1, image_size=32, max_objects=3, backend="pytorch3d")
    assert a.images.dtype == torch.uint8 and a.images.shape == (4, 3, 32, 32)
    assert a.labels.shape_ids.shape == (4, 3) and torch.equal(a.images, b.images) and a.scenes == b.scenes
    images, labels = a.batch(torch.tensor([2, 0]))
    assert images.shape == (2, 3, 32, 32) and images.max() <= 1.0
    assert torch.equal(labels.shape_ids, a.labels.shape_ids[[2, 0]])


@pytest.mark.skipif(opengl_available() is not None, reason="no EGL context here")
def test_opengl_and_pytorch3d_datasets_agree():
    gl = make_labelled_renders(8, seed=2, backend="opengl")
    p3d = make_labelled_renders(8, seed=2, backend="pytorch3d")
    assert (gl.images.int() - p3d.images.int()).abs().gt(13).float().mean() < 1e-3  # 0.05 of 255


def test_training_smoke_run_checkpoint_load_and_resume(tmp_path):
    cfg = SupervisedTrainConfig(
        out_dir=str(tmp_path / "run"), minutes=None, steps=2, batch_size=4, n_train=8, eval_n=4,
        backend="pytorch3d", log_every=1, threads=1, model_overrides={"channels": (8, 16), "embed_dim": 16},
    )  # fmt: skip
    final = train_supervised(cfg, progress=False)
    assert final["kind"] == "eval" and final["step"] == 2 and final["images_seen"] == 8
    assert 0.0 <= final["count_acc"] <= 1.0 and final["images_per_s"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "train", "eval"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["n_train"] == 8
    model = load_supervised(tmp_path / "run" / CHECKPOINT_NAME)
    assert model.config.channels == (8, 16) and not model.training
    cfg.steps = 3
    assert train_supervised(cfg, resume=True, progress=False)["step"] == 3
    with pytest.raises(CheckpointError, match="does not exist"):
        load_supervised(tmp_path / "nothing.pt")


def test_sigint_stops_training_with_a_checkpoint(tmp_path, monkeypatch):
    cfg = SupervisedTrainConfig(
        out_dir=str(tmp_path / "run"), minutes=None, steps=100, batch_size=4, n_train=8, eval_n=4,
        backend="pytorch3d", threads=1, model_overrides={"channels": (8, 16), "embed_dim": 16},
    )  # fmt: skip
    step = _Run.train_step

    def step_then_interrupt(run, data):
        stats = step(run, data)
        signal.raise_signal(signal.SIGINT)  # as a user's Ctrl-C during the first step
        return stats

    monkeypatch.setattr(_Run, "train_step", step_then_interrupt)
    assert train_supervised(cfg, progress=False)["step"] == 1
    assert load_supervised(tmp_path / "run" / CHECKPOINT_NAME).config.channels == (8, 16)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    data = make_labelled_renders(8, seed=3, max_objects=3, backend="pytorch3d")
    images, labels = data.batch(torch.arange(8))
    model = SupervisedRegressor(SupervisedConfig(channels=(16, 32, 32, 32), embed_dim=64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):
        loss, _ = matched_loss(model(images), labels, model.yaw_order, LossWeights())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::25]
