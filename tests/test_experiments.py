"""The paper's 2D experiments: a smoke run of each benchmark script on a tiny budget (results in a tmp dir), the
representation tasks' labels, and DAIR's input (the image minus the reconstruction so far)."""

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import bench_dair_generalisation, bench_omniglot, bench_representation, bench_tabletop
from inverse_graphics.air import AIR, AIRConfig
from inverse_graphics.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from inverse_graphics.pretrained import load
from inverse_graphics.tabletop.train_supervised3d import SupervisedTrainConfig, train_supervised
from inverse_graphics.train import TrainConfig, train
from scenes.multi_mnist import MultiMnist
from tests.conftest import SHARED_DATA, assert_close

TINY_TRAIN = ["--steps", "2", "--batch-size", "8", "--threads", "1", "--eval-n", "16"]


def written(out: Path, name: str) -> dict:
    """The record a benchmark wrote, after checking its table and figure exist."""
    assert (out / f"{name}.md").stat().st_size > 100 and (out / f"{name}.png").stat().st_size > 1000
    return json.loads((out / f"{name}.json").read_text())


# ------------------------------------------------------------------------------------------------- smoke runs
def test_dair_generalisation_smoke(tmp_path, data_dir):
    args = TINY_TRAIN + ["--tasks", "interpolation", "--n-train", "64", "--test-n", "16"]
    args += ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--name", "gen"]
    results = bench_dair_generalisation.main(args)
    rows = results["interpolation"]
    assert [r["model"] for r in rows] == ["air", "dair"] and all(r["steps"] == 2 for r in rows)
    assert all(0 <= r["test_count_acc"] <= 1 for r in rows)
    record = written(tmp_path / "out", "gen")
    assert record["budget_steps"] == 2 and "~95%" in (tmp_path / "out" / "gen.md").read_text()
    assert "trained on cpu." in (tmp_path / "out" / "gen.md").read_text()  # read from the runs' own configs
    assert (tmp_path / "out" / "gen_curve.png").is_file()
    # --resume reuses finished runs instead of training again
    again = bench_dair_generalisation.main(args + ["--resume", "--models", "dair"])
    assert again["interpolation"][0] == rows[1]
    # a run killed before its score continues from its checkpoint, up to the new budget
    (tmp_path / "runs" / "interpolation" / "dair_seed0" / "final.json").unlink()
    more = list(args)
    more[more.index("--steps") + 1] = "3"
    longer = bench_dair_generalisation.main(more + ["--resume", "--models", "dair"])["interpolation"][0]
    assert longer["steps"] == 3
    assert not load(tmp_path / "runs" / "interpolation" / "dair_seed0" / CHECKPOINT_NAME).config.difference_memory
    # --skip-missing: a seed without a run is left out, not trained; failures are shown where there are any
    only = bench_dair_generalisation.main(args + ["--resume", "--skip-missing", "--seeds", "0", "1"])
    assert [(r["model"], r["seed"]) for r in only["interpolation"]] == [("air", 0), ("dair", 0)]
    assert not (tmp_path / "runs" / "interpolation" / "dair_seed1").exists()
    figures = sorted(p.name for p in (tmp_path / "out").glob("gen_interpolation_*_failures.png"))
    assert figures == ["gen_interpolation_air_seed0_failures.png", "gen_interpolation_dair_seed0_failures.png"]
    # --search-steps: the count search scores the searched models once per setting, as its own column
    search = args + ["--resume", "--search-steps", "2", "--search-n", "6"]
    searched = bench_dair_generalisation.main(search)["interpolation"]
    assert "search_acc" not in searched[0] and searched[1]["search_n"] == 6 and searched[1]["search_steps"] == 2
    assert 0 <= searched[1]["search_acc"] <= 1 and 0 <= searched[1]["search_guide_acc"] <= 1
    assert sum(searched[1]["search_confusion"].values()) == 6
    assert "; 6 scenes, 2 steps)" in (tmp_path / "out" / "gen.md").read_text()
    cached = bench_dair_generalisation.main(search)["interpolation"][1]
    assert cached["search_seconds"] == searched[1]["search_seconds"]  # not searched again
    # --init-from: a run starts from its namesake's weights (with a zero learning rate it keeps them exactly)
    on = args + ["--models", "dair", "--runs", str(tmp_path / "more"), "--init-from"]
    bench_dair_generalisation.main(on + [str(tmp_path / "runs"), "--lr", "0", "--lr-floor", "0"])
    before = load_checkpoint(tmp_path / "runs" / "interpolation" / "dair_seed0" / CHECKPOINT_NAME)
    after = load_checkpoint(tmp_path / "more" / "interpolation" / "dair_seed0" / CHECKPOINT_NAME)
    for k, v in before["state_dict"].items():
        if not k.startswith(("baseline.", "signal_")):  # the NVIL baseline has its own learning rate
            assert torch.equal(after["state_dict"][k], v), k
    assert after["train_config"]["init_from"].endswith("interpolation/dair_seed0/" + CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="does not exist"):
        bench_dair_generalisation.main(on + [str(tmp_path / "elsewhere")])


def test_dair_generalisation_medians_over_seeds():
    recs = [
        {"model": "dair", "test_count_acc": a, "train_counts_acc": 0.9, "train_time_s": 60.0} for a in (0.7, 0.8, 0.9)
    ]
    recs.append({"model": "air", "test_count_acc": 0.1, "train_counts_acc": 0.9, "train_time_s": 60.0})
    (med,) = bench_dair_generalisation.medians(recs)
    assert med["model"] == "dair" and med["seed"] == "median of 3" and med["test_count_acc"] == 0.8


def test_representation_smoke(tmp_path, data_dir):
    run = tmp_path / "air"
    cfg = TrainConfig(out_dir=str(run), minutes=None, steps=1, batch_size=8, n_train=64, eval_n=8, threads=1)
    train(cfg, progress=False)
    out = tmp_path / "out"
    args = ["--model", str(run / CHECKPOINT_NAME), "--n-labels", "8", "16", "--test-n", "32", "--steps", "2"]
    record = bench_representation.main(args + ["--threads", "1", "--out", str(out), "--name", "rep"])
    assert set(record["curves"]) == {"sum", "ascending"}
    for curves in record["curves"].values():
        assert all(len(accs) == 2 and all(0 <= a <= 1 for a in accs) for accs in curves.values())
    assert written(out, "rep")["model"] == str(run / CHECKPOINT_NAME)
    table = (out / "rep.md").read_text()  # a classifier stuck at the majority class is marked, and the mark explained
    assert (" \\*" in table) == ("of the majority class: that classifier learned nothing" in table)


@pytest.fixture
def omniglot_dir() -> Path:
    path = Path(os.environ.get("INVERSE_GRAPHICS_DATA", SHARED_DATA))
    if not (path / "omniglot" / "images_evaluation.npz").is_file():
        pytest.skip(f"Omniglot files not found under {path / 'omniglot'}")
    return path


def test_omniglot_smoke(tmp_path, omniglot_dir):
    args = TINY_TRAIN + ["--n-train", "64", "--test-n", "24", "--elbo-samples", "1", "--max-steps", "3"]
    args += ["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--data-dir", str(omniglot_dir)]
    record = bench_omniglot.main(args)
    assert np.isfinite(record["elbo_test"]) and record["train_steps"] == 2
    assert len(record["steps_used"]) == 4 and sum(record["steps_used"]) == pytest.approx(1.0)
    assert (tmp_path / "out" / "omniglot_steps.png").stat().st_size > 1000
    assert (tmp_path / "out" / "omniglot.md").is_file()


# ------------------------------------------------------------------------------------------ representation labels
def test_task_labels_read_digits_left_to_right():
    nan = np.nan
    scenes = MultiMnist(
        images=np.zeros((4, 50, 50), np.uint8),
        counts=np.array([2, 2, 1, 2]),
        labels=np.array([[7, 3], [3, 7], [5, -1], [4, 4]]),
        # x0, y0, x1, y1: scene 0 has its 7 on the left, scene 1 its 7 on the left too (placed second)
        boxes=np.array(
            [
                [[0, 0, 20, 20], [25, 0, 45, 20]],
                [[30, 5, 50, 25], [1, 20, 21, 40]],
                [[10, 10, 30, 30], [nan] * 4],
                [[20, 0, 40, 20], [0, 20, 20, 40]],
            ],
            dtype=np.float32,
        ),
    )
    assert bench_representation.task_labels(scenes, "sum").tolist() == [10, 10, 5, 8]
    assert bench_representation.task_labels(scenes, "ascending").tolist() == [0, 0, 1, 1]


def brute_force_sum_probs(p: torch.Tensor, present: torch.Tensor, classes: int) -> torch.Tensor:
    """The slow reference: enumerate every assignment of digits to the present steps of each scene."""
    import itertools

    out = torch.zeros(p.shape[0], classes, dtype=p.dtype)
    for b in range(p.shape[0]):
        steps = [t for t in range(p.shape[1]) if present[b, t, 0]]
        for digits in itertools.product(range(p.shape[2]), repeat=len(steps)):
            prob = torch.prod(torch.stack([p[b, t, d] for t, d in zip(steps, digits)])) if steps else torch.tensor(1.0)
            out[b, sum(digits)] += prob
    return out


def test_object_net_sum_matches_enumeration():
    """The per-object net's exact sum distribution against enumerating every digit assignment, values and
    gradients; steps with z_pres = 0 (any position, none at all) contribute nothing."""
    torch.manual_seed(0)
    T, D = 3, 4
    logits = torch.randn(6, T, D, dtype=torch.float64, requires_grad=True)
    present = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 1, 1]]).bool()[..., None]
    classes = (D - 1) * T + 1
    fast = bench_representation.sum_log_probs(logits.softmax(-1), present, classes).exp()
    slow = brute_force_sum_probs(logits.softmax(-1), present, classes)
    assert_close(fast, slow, atol=1e-9)
    assert_close(fast.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-9)
    w = torch.randn(6, classes, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), logits)
    (g_slow,) = torch.autograd.grad((slow * w).sum(), logits)
    assert_close(g_fast, g_slow, atol=1e-9)
    assert g_fast[3].abs().max() == 0  # an empty scene's answer does not depend on its (absent) steps


def test_digit_reference_matches_steps_to_digits_by_position():
    # Two true digits, a 7 on the left and a 2 on the right (50 px canvas). AIR's steps are ordered by x: the first
    # step sits on the 7, the second on the 2, a third (extra) step finds nothing true left to match.
    scene = MultiMnist(
        images=np.zeros((1, 50, 50), np.uint8),
        counts=np.array([2]),
        labels=np.array([[2, 7]]),  # in order of placement: the 2 (right) was placed first
        boxes=np.array([[[30, 5, 50, 25], [0, 20, 20, 40]]], np.float32),  # centres (40, 15), (10, 30)
    )
    raw = torch.zeros(1, 3, 6)
    raw[0, :, 0] = 1.0  # three present steps: [z_pres, s, x, y, ...]
    raw[0, 0, 2:4] = torch.tensor([10 / 25 - 1, 30 / 25 - 1])  # on the 7
    raw[0, 1, 2:4] = torch.tensor([40 / 25 - 1 + 0.05, 15 / 25 - 1])  # near the 2
    raw[0, 2, 2:4] = torch.tensor([0.9, 0.9])  # the extra step
    assert bench_representation.matched_digits(raw, scene).tolist() == [[7, 2, -1]]


def brute_force_ascending_probs(p: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """P(present digits non-decreasing) by enumerating every assignment of digits to the present steps."""
    out = []
    for b in range(p.shape[0]):
        steps = [t for t in range(p.shape[1]) if present[b, t, 0]]
        total = p.new_zeros(())
        for digits in itertools.product(range(p.shape[2]), repeat=len(steps)):
            if all(d1 <= d2 for d1, d2 in zip(digits, digits[1:])):
                total = total + torch.stack([p.new_ones(())] + [p[b, t, d] for t, d in zip(steps, digits)]).prod()
        out.append(total)
    return torch.stack(out)


def test_ascending_probability_matches_enumeration_with_gradients():
    B, T, D = 6, 3, 4
    logits = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    present = torch.ones(B, T, 1, dtype=torch.bool)
    present[1, 2] = False  # two digits
    present[2, 1:] = False  # one digit: vacuously ascending
    present[3] = False  # empty
    p = logits.softmax(-1)
    logp = bench_representation.ascending_log_probs(p, present)
    fast, slow = logp[:, 1].exp(), brute_force_ascending_probs(p, present)
    assert_close(fast, slow, atol=1e-9)
    assert_close(logp.exp().sum(1), torch.ones(B, dtype=torch.float64), atol=1e-9)
    assert_close(fast[2:4], torch.ones(2, dtype=torch.float64), atol=1e-5)
    # scenes with fewer than two digits (P = 1) must not turn gradients into NaN
    (g_vacuous,) = torch.autograd.grad(logp[2:4].sum(), logits, retain_graph=True)
    assert torch.isfinite(g_vacuous).all()
    (g_fast,) = torch.autograd.grad(fast.sum(), logits, retain_graph=True)
    (g_slow,) = torch.autograd.grad(slow.sum(), logits)
    assert_close(g_fast, g_slow, atol=1e-9)


@pytest.mark.parametrize("task, classes", [("sum", 19), ("ascending", 2)])
def test_object_net_gives_normalised_log_probs(task, classes):
    net = bench_representation.ObjectNet(features=8, task=task, classes=classes)
    z = torch.randn(6, 2, 8)
    z[..., 0] = 1.0  # both steps present
    z[4, 1, 0] = 0.0  # one digit: vacuously ascending, sum of one digit
    z[5, :, 0] = 0.0  # empty
    logp = net(z)
    assert logp.shape == (6, classes) and torch.allclose(logp.exp().sum(1), torch.ones(6), atol=1e-5)
    if task == "ascending":
        assert logp[4:, 1].exp().allclose(torch.ones(2)) and logp[:4, 1].exp().lt(1).all()
    y = torch.arange(6) % classes
    assert_close(net.loss(z, y), torch.nn.functional.nll_loss(logp, y) + net.spread * spread_term(net, z))
    net.loss(z, y).backward()
    assert all(p.grad is not None for p in net.parameters())


def spread_term(net, z) -> torch.Tensor:
    """The negative entropy of the mean digit distribution over present objects, by hand."""
    p = [net.net(z[b, t]).softmax(-1) for b in range(z.shape[0]) for t in range(z.shape[1]) if z[b, t, 0] > 0.5]
    mean = torch.stack(p).mean(0)
    return (mean * mean.log()).sum()


# ----------------------------------------------------------------------------------------------- DAIR's input
def recorded_encoder_inputs(model: AIR) -> list[torch.Tensor]:
    """Every input the image encoder (the recurrence's view of the image) receives from now on."""
    seen: list[torch.Tensor] = []
    model.encoder.register_forward_hook(lambda module, args, output: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("sample", [True, False])
def test_dair_recurrence_sees_image_minus_reconstruction_so_far(sample):
    """Step t's recurrence input is x - sum_{s < t} render(z_pres_s, z_where_s, z_what_s), computed here by hand
    from the latents the guide returns (Eslami et al. 2016, DAIR: x_t = x - reconstruction of steps < t)."""
    model = AIR(AIRConfig(difference_input=True, max_steps=3, decoder_bias=1.0))
    with torch.no_grad():
        model.where_head.fc.bias[0] = 3.0  # z_pres = 1 is likely: the reconstruction is not empty
    seen = recorded_encoder_inputs(model)
    images = torch.rand(5, 50, 50)
    g = model.guide(images, sample=sample)
    assert len(seen) == 3 and g.z_pres[:, 0].sum() > 0
    recon = torch.zeros_like(images)
    for t in range(3):
        assert_close(seen[t], images - recon, atol=1e-6, msg=f"step {t}")
        recon = recon + model.render_step(g.z_pres[:, t], g.z_where[:, t], g.z_what[:, t]).detach()
    assert (seen[1] - images).abs().max() > 0.1  # the check above is not vacuous


def test_memoryless_dair_step_is_a_function_of_the_residual_alone():
    """difference_memory=False: each step's q(z_pres), q(z_where) depend on x - reconstruction only, so a step shown
    the same residual gives the same distribution whatever came before it."""
    torch.manual_seed(0)
    model = AIR(AIRConfig(difference_input=True, difference_memory=False, max_steps=3, decoder_bias=1.0))
    with torch.no_grad():
        model.where_head.fc.bias[0] = 3.0
    images = torch.rand(4, 50, 50)
    g = model.guide(images, sample=True)
    recon = model.render_step(g.z_pres[:, 0], g.z_where[:, 0], g.z_what[:, 0]).detach()
    # Step 1 of a scene x' = x - recon sees the same residual as step 2 of x does.
    fresh = model.guide(images - recon, sample=True)
    assert_close(fresh.pres_prob[:, 0], g.pres_prob[:, 1], atol=1e-5)
    assert_close(fresh.where_loc[:, 0], g.where_loc[:, 1], atol=1e-5)
    with_memory = AIR(AIRConfig(difference_input=True, difference_memory=True, max_steps=3, decoder_bias=1.0))
    with_memory.load_state_dict(model.state_dict())
    g2 = with_memory.guide(images, sample=False)
    assert (g2.pres_prob[:, 1] - model.guide(images, sample=False).pres_prob[:, 1]).abs().max() > 1e-4  # not vacuous


def test_dair_checkpoints_without_the_memory_field_load_with_memory():
    cfg = AIRConfig(difference_input=True).to_dict()
    del cfg["difference_memory"]
    assert AIRConfig.from_dict(cfg).difference_memory is True


def test_air_recurrence_sees_the_image_once():
    model = AIR(AIRConfig(difference_input=False, max_steps=3))
    seen = recorded_encoder_inputs(model)
    images = torch.rand(2, 50, 50)
    model.guide(images)
    assert len(seen) == 1 and torch.equal(seen[0], images)


def test_tabletop_comparison_smoke(tmp_path):
    run = tmp_path / "sup"
    cfg = SupervisedTrainConfig(
        out_dir=str(run), minutes=None, steps=1, batch_size=4, n_train=8, eval_n=4, threads=1,
        model_overrides={"channels": (8, 16), "embed_dim": 16},
    )  # fmt: skip
    train_supervised(cfg, progress=False)
    args = ["--supervised", str(run / CHECKPOINT_NAME), "--naive", str(run / CHECKPOINT_NAME), "--n", "6"]
    args += ["--n-single", "3", "--n-refine", "2", "--refine", "1", "--chain", f"sup={run}", "--out", str(tmp_path)]
    record = bench_tabletop.main([*args, "--threads", "1", "--name", "tt"])
    assert len(record["rows"]) == 3 * 2 * 2  # three methods, two scene sets, K = 0 and 1
    assert {r["objects"] for r in record["rows"]} == {"0-3", "1"}
    saved = written(tmp_path, "tt")
    assert saved["training_cost"][0]["steps"] == 1 and saved["training_cost"][0]["first_met"] == "not met"
    assert (tmp_path / "tt.png").is_file()
