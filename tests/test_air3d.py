"""3D AIR: shapes, the prior's pushforward, the ELBO on both gradient paths, masking, the sleep phase's order,
infer's output and input checks, and a one-step smoke run of every training recipe."""

from __future__ import annotations

import json
import math
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from inverse_graphics.checkpoint import CHECKPOINT_NAME, CheckpointError
from inverse_graphics.estimators import score_function_surrogate
from inverse_graphics.tabletop.air3d import AIR3D, POSITION_SD, AIR3DConfig, check_images, count_prior, decode_yaw
from inverse_graphics.tabletop.air3d_objective import (
    choice_log_q,
    elbo_loss,
    elbo_terms,
    sleep_loss,
    teacher_forced_log_q,
)
from inverse_graphics.tabletop.modules3d import Baseline3D, GlimpseEncoder, ObjectHead3D, WhereHead3D
from inverse_graphics.tabletop.train_air3d import RECIPES, AIR3DTrainConfig, TrainingRun, load_air3d, train_air3d
from renderers.opengl import opengl_available
from scenes import tabletop
from scenes.tabletop import TABLE_HALF_SIZE, Scene
from scenes.tabletop_objects import SHAPES
from tests.conftest import assert_close

S = len(SHAPES)
SIZE = 32  # tiny renders keep every test here to a few seconds
BACKEND = "opengl" if opengl_available() is None else "pytorch3d"
TINY = {"channels": (8, 16), "embed_dim": 32, "rnn_hidden": 32, "baseline_channels": (8,), "baseline_hidden": 16}


def _model(**overrides) -> AIR3D:
    return AIR3D(AIR3DConfig(**{"image_size": SIZE, "backend": BACKEND, **TINY, **overrides}))


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return tabletop.render_scenes(tabletop.sample_scenes(n, seed=seed, min_objects=1), image_size=SIZE)


def _set_presence(model: AIR3D, logit: float) -> None:
    """Make q(z_pres = 1) = sigmoid(logit) at every step, whatever the input."""
    with torch.no_grad():
        model.where_head.fc.weight[0].zero_()
        model.where_head.fc.bias[0] = logit


def test_module_shapes():
    B, T, hidden = 4, 3, 32
    w = WhereHead3D(hidden)(torch.randn(B, hidden))
    features = GlimpseEncoder(24, (8, 16), 20)(torch.rand(B, 3, 24, 24))
    assert features.shape == (B, 20)
    d = ObjectHead3D(hidden, 20, S)(torch.randn(B, hidden), features, w.u_coarse)
    assert w.pres_logit.shape == (B,) and w.u_coarse.shape == (B, 2) and d.shape_logits.shape == (B, S)
    assert d.u_loc.shape == d.u_scale.shape == (B, 2) and d.v_loc.shape == d.v_scale.shape == (B, S, 2)
    assert (d.u_scale > 0).all() and (d.v_scale > 0).all()
    assert Baseline3D(SIZE, (8,), 10, 16)(torch.rand(B, 3, SIZE, SIZE), torch.randn(B, T, 10)).shape == (B, T)
    model = _model()
    g = model.guide(_images(B))
    assert g.z_pres.shape == g.pres_prob.shape == g.shape.shape == g.yaw.shape == (B, T)
    assert g.shape_logits.shape == (B, T, S) and g.shape.dtype == torch.long
    for name in ("u", "u_loc", "u_scale", "v", "v_loc", "v_scale", "position"):
        assert getattr(g, name).shape == (B, T, 2), name
    assert g.step_inputs.shape == (B, T, model.step_dim)
    assert (g.z_pres[:, 1:] <= g.z_pres[:, :-1]).all()  # once 0, always 0
    assert (g.position.abs() < TABLE_HALF_SIZE).all()
    p, renders = model.sample(B)
    assert p.z_pres.shape == p.shape.shape == p.yaw.shape == (B, T) and p.u.shape == (B, T, 2)
    assert renders.shape == (B, 3, SIZE, SIZE)


def test_prior_counts_positions_and_yaw_period():
    model, n = _model(), 20_000
    p = model.sample_prior(n)
    counts = torch.bincount(p.z_pres.sum(1).long(), minlength=4).float() / n
    assert_close(counts, torch.full((4,), 0.25), atol=0.02, msg="count")
    assert_close(count_prior(AIR3DConfig(max_steps=3)), [3 / 4, 2 / 3, 1 / 2])
    x = p.position.flatten()  # N(0, POSITION_SD^2) in metres; 4 % of centres beyond the table's edge
    assert_close(x.std(), POSITION_SD, rtol=0.02) and assert_close(x.mean(), 0.0, atol=0.003)
    assert_close((x.abs() > TABLE_HALF_SIZE).float().mean(), 0.037, atol=0.006)
    cubes = p.shape == SHAPES.index("cube")
    code = p.yaw[cubes] * 4  # the cube's yaw code covers the circle uniformly
    assert_close(torch.histc(code, 4, -math.pi, math.pi) / code.numel(), torch.full((4,), 0.25), atol=0.03)
    spheres = p.shape == SHAPES.index("sphere")
    assert (p.yaw[spheres] == 0).all()


def test_yaw_code_has_no_wrap_and_divides_by_the_symmetry():
    angles = torch.linspace(-3.0, 3.0, 7)
    v = torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    for shape, m in (("cube", 4), ("box", 2), ("wedge", 1), ("sphere", 0)):
        order = torch.full((7,), m)
        expected = angles / m if m else torch.zeros(7)
        assert_close(decode_yaw(v, order), expected, atol=1e-6, msg=shape)
    # a small move of v across the negative x axis moves the cube's yaw code by a small angle modulo 2 pi / 4
    a, b = (
        decode_yaw(torch.tensor([[-1.0, 1e-3]]), torch.tensor([4])),
        decode_yaw(torch.tensor([[-1.0, -1e-3]]), torch.tensor([4])),
    )
    assert abs(math.remainder(float(a - b), math.pi / 2)) < 1e-2


def test_reinforce_on_presence_and_identity_matches_the_closed_form():
    # One step: z ~ Bern(q); if z = 1, k ~ Cat(pi) over 3 shapes; f(0) and f(1, k) known. d E[f] in closed form
    # against the surrogate built from choice_log_q (as the ELBO uses it), with a constant baseline.
    N = 400_000
    theta = torch.tensor([0.3, 0.5, -0.2, 0.1], requires_grad=True)  # pres logit, three shape logits
    f0, f1 = 2.0, torch.tensor([5.0, 1.0, 3.0])
    q, pi = torch.sigmoid(theta[0]), torch.softmax(theta[1:], 0)
    (closed,) = torch.autograd.grad((1 - q) * f0 + q * (pi * f1).sum(), theta)
    z = torch.bernoulli(q.detach().expand(N, 1))
    k = torch.multinomial(pi.detach(), N, replacement=True)[:, None]
    log_q = choice_log_q(z, torch.sigmoid(theta[0]).expand(N, 1), theta[1:].expand(N, 1, 3), k)
    value = torch.where(z > 0, f1[k], torch.full_like(z, f0))
    (estimate,) = torch.autograd.grad(score_function_surrogate(log_q, value, baseline=3.0).mean(), theta)
    assert_close(estimate, closed, atol=0.02, rtol=0)


@pytest.mark.parametrize("gradient, backend", [("fd", BACKEND), ("fd", "pytorch3d"), ("soft", BACKEND)])
def test_elbo_loss_reaches_every_network_on_each_gradient_path(gradient, backend):
    model = _model(backend=backend)  # fd around OpenGL where EGL works, and around PyTorch3D's hard mode
    _set_presence(model, 3.0)  # objects present, so the renderer's gradient path is used
    loss, stats = elbo_loss(model, _images(), gradient)
    loss.backward()
    assert torch.isfinite(loss) and stats["count"] > 0 and math.isfinite(stats["elbo"])
    names = ("encoder.fc.weight", "rnn.step_proj.weight", "where_head.fc.weight", "object_head.fc.weight")
    for name in (*names, "glimpse_encoder.fc.weight", "baseline.out.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    pose_rows = model.object_head.fc.weight.grad[0:2]  # u loc: only the likelihood and KL(u) move it
    assert pose_rows.abs().sum() > 0


def test_absent_objects_give_zero_gradient_to_identity_and_pose():
    model = _model()
    _set_presence(model, -30.0)  # q(z_pres = 1) = 1e-5: every z_pres is 0 (fixed seed)
    images = _images()
    g = model.guide(images)
    assert (g.z_pres == 0).all()
    e = elbo_terms(model, images, g, "fd")
    assert (e.kl_obj == 0).all() and (e.active[:, 1:] == 0).all() and (e.kl_pres[:, 1:] == 0).all()
    table = model.render_input(model.empty_scene(images))
    assert_close(
        e.log_lik,
        -0.5 * (((images - table) / 0.1) ** 2).flatten(1).sum(1)
        - images[0].numel() * math.log(0.1 * math.sqrt(2 * math.pi)),
        rtol=1e-5,
    )
    model.zero_grad()
    elbo_loss(model, images, "fd")[0].backward()
    rows = model.where_head.fc.weight.grad[1:]  # the glimpse's centre
    assert rows.abs().max() == 0 and model.where_head.fc.bias.grad[1:].abs().max() == 0
    for name, param in model.named_parameters():  # q(u), q(k), q(v) and the glimpse: nothing to explain
        if name.startswith(("object_head.", "glimpse_encoder.")):
            assert param.grad is None or param.grad.abs().max() == 0, name


def test_sleep_loss_runs_and_the_greedy_order_ignores_slot_order():
    model = _model()
    loss, stats = sleep_loss(model, 4)
    loss.backward()
    assert torch.isfinite(loss) and "sleep_log_q" in stats
    assert model.where_head.fc.weight.grad.abs().sum() > 0 and model.object_head.fc.weight.grad.abs().sum() > 0
    p, images = model.sample(64)
    flipped = type(p)(*(x.flip(1) for x in (p.z_pres, p.shape, p.u, p.v, p.position, p.yaw)))
    keep = p.z_pres.sum(1) == 3  # all slots full: flipping only reorders the objects
    with torch.no_grad():
        a, b = teacher_forced_log_q(model, images, p), teacher_forced_log_q(model, images, flipped)
    assert keep.any()
    assert_close(a[keep], b[keep], atol=1e-4, rtol=1e-5)


def test_glimpse_samples_every_pixel_of_a_derived_window():
    """A world's glimpse takes one sample per pixel of its window (at least 24), and a large one is read by a
    strided first convolution; an explicit size and the pre-world models keep theirs."""
    from inverse_graphics.tabletop import world3d

    world = world3d.run_world("kitchen")
    model = AIR3D(AIR3DConfig(world=world.to_dict(), image_size=None, max_steps=None, **TINY))
    G = model.glimpse_samples
    assert G == max(24, math.ceil(model.scales.glimpse_pixels)) and G > 24  # the kitchen's window: ~47 pixels
    assert model.glimpse_encoder.conv[0].stride == (round(G / 24),) * 2
    assert model.glimpse(torch.rand(2, 3, 96, 128), torch.zeros(2, 2)).shape == (2, 3, G, G)
    legacy = _model()
    assert legacy.glimpse_samples == 24 and legacy.glimpse_encoder.conv[0].stride == (1, 1)
    old = AIR3DConfig.from_dict({**legacy.config.to_dict(), "glimpse_stride": None} | {"glimpse_size": 24})
    assert AIR3D(old).glimpse_encoder.conv[0].stride == (1, 1)


def test_sleep_log_q_of_a_batch_is_each_scene_s_alone():
    """teacher_forced_log_q drops scenes from the batch as they end; each scene's log q must be what it is alone
    (a batch of one never shrinks before its own end), and its gradient the same."""
    model = _model()
    p, images = model.sample(12)
    counts = p.z_pres.sum(1)
    assert len(set(counts.tolist())) > 2  # scenes that end at different steps
    batch = teacher_forced_log_q(model, images, p)
    alone = torch.cat([teacher_forced_log_q(model, images[i : i + 1], type(p)(*(x[i : i + 1] for x in (
        p.z_pres, p.shape, p.u, p.v, p.position, p.yaw)))) for i in range(12)])  # fmt: skip
    assert_close(batch, alone, atol=1e-4, rtol=1e-5)
    weight = model.where_head.fc.weight
    (g_batch,) = torch.autograd.grad(batch.sum(), weight)
    (g_alone,) = torch.autograd.grad(alone.sum(), weight)
    assert_close(g_batch, g_alone, atol=1e-4, rtol=1e-4)


def test_inference_guide_skips_stopped_scenes_without_changing_them():
    """guide(sample=False) computes a step only for the scenes still going; each scene's result must be the one it
    gets alone, and steps after a scene stops report absent objects."""
    model = _model().eval()
    images = _images(8, seed=3)
    with torch.no_grad():  # presence logits of both signs at the first step: half the scenes stop there
        model.where_head.fc.weight[0].mul_(50.0)
        first = torch.logit(model.guide(images, sample=False).pres_prob[:, 0])
        model.where_head.fc.bias[0] -= first.median() + 1e-3
    batch = model.guide(images, sample=False)
    assert 0 < batch.z_pres.sum() < batch.z_pres.numel()
    for i in range(8):
        alone = model.guide(images[i : i + 1], sample=False)
        present = alone.z_pres[0] > 0.5
        assert torch.equal(batch.z_pres[i], alone.z_pres[0]) and torch.equal(
            batch.shape[i][present], alone.shape[0][present]
        )
        assert_close(batch.position[i][present], alone.position[0][present], atol=1e-5)
        stopped = torch.cat([torch.zeros(1, dtype=torch.bool), alone.z_pres[0, :-1] < 0.5])
        assert (batch.pres_prob[i][stopped] == 0).all()


def test_infer_returns_valid_json_scenes_and_refines():
    model = _model().eval()
    _set_presence(model, 3.0)
    images = _images(2)
    out = model.infer(images, refine=0)
    assert out.counts.tolist() == [3, 3] and out.presence.shape == (2, 3) and "unrefined" not in out.extras
    for scene, n in zip(out.scenes, out.counts.tolist()):
        parsed = Scene.from_dict(json.loads(json.dumps(scene)), allow_overlap=True)  # on the table, finite
        assert len(parsed.objects) == n
    refined = model.infer(images, refine=1)
    assert refined.extras["unrefined"] == out.scenes and len(refined.scenes) == 2


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ([[0.0]], TypeError, "torch.Tensor"),
        (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), TypeError, "divide by 255"),
        (torch.zeros(1, SIZE, SIZE), ValueError, r"\(B, 3, 32, 32\)"),
        (torch.zeros(1, 3, 64, 64), ValueError, "shape"),
        (torch.full((1, 3, SIZE, SIZE), float("nan")), ValueError, "NaN"),
        (torch.full((1, 3, SIZE, SIZE), 2.0), ValueError, r"\[0, 1\]"),
    ],
)
def test_bad_input_is_rejected_clearly(bad, error, match):
    with pytest.raises(error, match=match):
        _model().infer(bad)
    with pytest.raises(error, match=match):
        check_images(bad, SIZE)


def _train_config(tmp_path, recipe: str, gradient: str) -> AIR3DTrainConfig:
    return AIR3DTrainConfig(
        out_dir=str(tmp_path / f"{recipe}-{gradient}"), minutes=None, steps=2, batch_size=2, recipe=recipe,
        gradient=gradient, sleep_steps=1, image_size=SIZE, n_train=4, eval_n=2, backend=BACKEND, log_every=1,
        threads=1, model_overrides=TINY,
    )  # fmt: skip


@pytest.mark.parametrize("recipe, gradient", [(r, "fd") for r in RECIPES] + [("wake", "soft")])
def test_one_step_smoke_run_of_each_recipe_and_gradient_path(tmp_path, recipe, gradient):
    cfg = _train_config(tmp_path, recipe, gradient)
    final = train_air3d(cfg, progress=False)
    assert final["kind"] == "eval" and final["step"] == 2 and final["recipe"] == recipe
    assert 0.0 <= final["count_acc"] <= 1.0 and math.isfinite(final["elbo"])
    records = [json.loads(line) for line in (tmp_path / cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "train", "eval"]
    if recipe == "sleep-then-wake":
        assert "sleep_log_q" in records[0] and "elbo" in records[1] and "sleep_log_q" not in records[1]


def test_checkpoint_config_load_and_resume(tmp_path):
    cfg = _train_config(tmp_path, "wake-sleep", "fd")
    cfg.data_cache = str(tmp_path / "cache" / "train.pt")
    train_air3d(cfg, progress=False)
    assert json.loads((tmp_path / cfg.out_dir / "config.json").read_text())["recipe"] == "wake-sleep"
    assert (tmp_path / "cache" / "train.pt").is_file()
    model = load_air3d(tmp_path / cfg.out_dir / CHECKPOINT_NAME)
    assert not model.training and model.config.channels == (8, 16) and model.config.image_size == SIZE
    cfg.steps = 3
    assert train_air3d(cfg, resume=True, progress=False)["step"] == 3
    # a new run (another recipe and gradient path) from those weights: same parameters at its start
    follow = _train_config(tmp_path, "wake", "soft")
    follow.steps, follow.init_from = 0, str(tmp_path / cfg.out_dir / CHECKPOINT_NAME)
    train_air3d(follow, progress=False)
    started = load_air3d(tmp_path / follow.out_dir / CHECKPOINT_NAME)
    assert all(torch.equal(a, b) for a, b in zip(started.parameters(), load_air3d(follow.init_from).parameters()))
    follow.model_overrides = {**TINY, "rnn_hidden": 16}
    with pytest.raises(ValueError, match="another model config"):
        train_air3d(replace(follow, out_dir=str(tmp_path / "other")), progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_air3d(tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="recipe"):
        AIR3DTrainConfig(recipe="dream")


def test_sigint_stops_training_with_a_checkpoint(tmp_path, monkeypatch):
    cfg = _train_config(tmp_path, "wake", "fd")
    cfg.steps = 100
    step = TrainingRun.train_step

    def step_then_interrupt(run, images):
        stats = step(run, images)
        signal.raise_signal(signal.SIGINT)  # as a user's Ctrl-C during the first step
        return stats

    monkeypatch.setattr(TrainingRun, "train_step", step_then_interrupt)
    assert train_air3d(cfg, progress=False)["step"] == 1
    assert load_air3d(tmp_path / cfg.out_dir / CHECKPOINT_NAME).config.image_size == SIZE


def test_glimpse_is_centred_on_the_object_and_differentiable_in_its_position():
    # Single objects at 64 px: the projected glimpse centre lies within 2 pixels of the object's pixel centroid.
    model = AIR3D(AIR3DConfig(backend=BACKEND, **TINY))
    scenes = tabletop.sample_scenes(12, seed=5, min_objects=1, max_objects=1)
    images = tabletop.render_scenes(scenes, image_size=64)
    table = tabletop.render_scenes([Scene(objects=())], image_size=64)[0]
    positions = tabletop.scenes_to_tensors(scenes).positions[:, 0]
    centres = model.glimpse_centres(positions)
    for image, centre in zip(images, centres):
        ys, xs = torch.nonzero((image - table).abs().sum(0) > 0.04, as_tuple=True)
        centroid = torch.stack([xs.float().mean(), ys.float().mean()]) + 0.5
        assert (centroid / 32 - 1 - centre).abs().max() < 2 / 32, (centroid, centre)
    # the glimpse sees the object: more of its pixels differ from the table than in a glimpse elsewhere
    g, g_off = model.glimpse(images, positions), model.glimpse(images, -positions)
    empty = model.glimpse(table.expand(12, -1, -1, -1), positions)
    assert (
        (g - empty).abs().sum((1, 2, 3))
        > (g_off - model.glimpse(table.expand(12, -1, -1, -1), -positions)).abs().sum((1, 2, 3))
    ).all()
    # gradient in the position against finite differences (float64)
    small = model.double()
    img = images[:2].double()
    pos = (positions[:2].double() * 0.9).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: small.glimpse(img, p), (pos,), eps=1e-5, atol=1e-4)


def test_cli_trains_and_infers_with_both_tabletop_models(tmp_path, capsys):
    from PIL import Image

    from inverse_graphics.cli import main as cli_main

    common = ["--steps", "1", "--batch-size", "2", "--n-train", "4", "--eval-n", "2", "--image-size", str(SIZE)]
    common += ["--backend", BACKEND, "--threads", "1", "--no-progress"]
    air = ["train", "air-tabletop", "--out", str(tmp_path / "air"), "--recipe", "sleep-then-wake", "--sleep-steps", "1"]
    assert cli_main([*air, *common]) == 0
    assert cli_main(["train", "supervised-tabletop", "--out", str(tmp_path / "sup"), *common]) == 0
    assert cli_main(["train", "air", "--recipe", "wake"]) == 2  # an option of another model: a clear error
    assert "--recipe" in capsys.readouterr().err
    paths = []
    for i, image in enumerate(_images(2)):
        paths.append(tmp_path / f"scene{i}.png")
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(paths[-1])
    for run in ("air", "sup"):
        out = tmp_path / f"infer-{run}"
        args = ["infer", *map(str, paths), "--model", str(tmp_path / run / CHECKPOINT_NAME), "--out", str(out)]
        refine = ["--refine", "0"] if run == "air" else ["--refine", "1", "--refine-gradient", "soft"]
        assert cli_main([*args, *refine]) == 0
        record = json.loads((out / "results.json").read_text())
        assert len(record["images"]) == 2 and record["refined"] is (run == "sup")
        for r in record["images"]:
            Scene.from_dict(r["scene"], allow_overlap=True)
            assert (out / f"{Path(r['file']).stem}_scene.png").is_file()


def test_baseline_warmup_trains_only_the_baseline(tmp_path):
    cfg = _train_config(tmp_path, "wake", "fd")
    cfg.baseline_warmup = 2
    run = TrainingRun(cfg, None)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    images = (_images(4) * 255).round().to(torch.uint8)
    for _ in range(2):
        run.train_step(images)
    moved = {n for n, p in run.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("baseline.") for n in moved), moved
    run.train_step(images)  # the warm-up is over: the guide learns too
    assert any(not n.startswith("baseline.") and not torch.equal(p, before[n]) for n, p in run.model.named_parameters())


def test_default_recipe_schedules_by_share_of_the_budget(tmp_path):
    """The default schedule: lr drop at half the budget, the ELBO from three quarters, its baseline warm-up at most
    a third of the ELBO phase; by steps under a step budget, by the training clock under a time budget."""
    assert AIR3DTrainConfig().recipe == "sleep"  # the ELBO alone from scratch collapsed here (docs/air3d.md)
    cfg = AIR3DTrainConfig(out_dir=str(tmp_path / "r"), image_size=SIZE, backend=BACKEND, model_overrides=TINY,
                           minutes=None, steps=100, recipe="sleep-then-wake")  # fmt: skip
    run = TrainingRun(cfg, None)
    seen = {}
    for step in (0, 49, 50, 74, 75, 83, 84):
        run.step = step
        wake, sleep = run.phases()
        if wake and run.wake_start is None:
            run.wake_start = step
        seen[step] = (sleep, run.main_lr(wake and not sleep), wake and run.warming_up())
    assert seen == {0: (True, cfg.lr, False), 49: (True, cfg.lr, False), 50: (True, cfg.lr_drop_to, False),
                    74: (True, cfg.lr_drop_to, False), 75: (False, cfg.wake_lr, True),
                    83: (False, cfg.wake_lr, True), 84: (False, cfg.wake_lr, False)}  # fmt: skip
    timed = TrainingRun(replace(cfg, minutes=10.0, steps=None), None)
    timed.step, timed.train_time = 10_000, 0.74 * 600
    assert timed.phases() == (False, True) and timed.main_lr(False) == cfg.lr_drop_to
    timed.train_time = 0.76 * 600
    assert timed.phases() == (True, False)
    fixed = TrainingRun(replace(cfg, sleep_steps=10, lr_drop_step=5), None)  # explicit steps override
    fixed.step = 5
    assert fixed.phases() == (False, True) and fixed.main_lr(False) == cfg.lr_drop_to
    fixed.step = 10
    assert fixed.phases() == (True, False)
    with pytest.raises(ValueError, match="share of the budget"):
        replace(cfg, sleep_fraction=1.5)
