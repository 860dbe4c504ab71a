"""Training entry point: a one-step smoke run, exact resume, checkpoints, the CLI, and loading errors."""

import json

import pytest
import safetensors.torch
import torch

import inverse_graphics as ig
from inverse_graphics.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from inverse_graphics.cli import main as cli_main
from inverse_graphics.train import TrainConfig, batch_indices, train, z_pres_prior_at
from tests.conftest import requires_cuda


def tiny(out, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(out),
        minutes=None,
        steps=1,
        batch_size=8,
        n_train=64,
        eval_n=16,
        eval_every_s=1e9,
        checkpoint_every_s=1e9,
        log_every=1,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("model", ["air", "dair"])
def test_one_step_smoke_run(tmp_path, data_dir, model):
    rec = train(tiny(tmp_path, model=model), progress=False)
    assert 0 <= rec["count_acc"] <= 1 and rec["step"] == 1
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["model"] == model and ckpt["train_config"]["model"] == model
    assert json.loads((tmp_path / "config.json").read_text())["model"] == model
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "train" in kinds and "eval" in kinds
    assert (tmp_path / "figures" / "attention.png").stat().st_size > 1000
    assert isinstance(ig.load(tmp_path / CHECKPOINT_NAME), ig.AIR)


def test_sleep_phase_changes_training_from_its_start_step(tmp_path, data_dir):
    # Same seed and batches: without the sleep term, or before sleep_start, the weights match; with it they do not.
    def weights(name, **kw):
        train(tiny(tmp_path / name, model="dair", steps=2, max_steps=4, **kw), progress=False)
        return load_checkpoint(tmp_path / name / CHECKPOINT_NAME)["state_dict"]["encoder.fc.weight"]

    plain = weights("plain")
    assert torch.equal(weights("late", sleep_weight=1.0, sleep_start=2), plain)
    assert not torch.equal(weights("sleep", sleep_weight=1.0, sleep_start=0, sleep_counts=(3, 4)), plain)
    saved = json.loads((tmp_path / "sleep" / "config.json").read_text())
    assert saved["sleep_weight"] == 1.0 and saved["sleep_counts"] == [3, 4]
    resumed = TrainConfig.from_dict(load_checkpoint(tmp_path / "sleep" / CHECKPOINT_NAME)["train_config"])
    assert resumed.sleep_counts == (3, 4)


def test_resume_continues_exactly(tmp_path, data_dir):
    straight = tmp_path / "straight"
    train(tiny(straight, steps=4), progress=False)
    split = tmp_path / "split"
    train(tiny(split, steps=2), progress=False)
    cfg = tiny(split, steps=4)
    train(cfg, resume=True, progress=False)
    a = load_checkpoint(straight / CHECKPOINT_NAME)
    b = load_checkpoint(split / CHECKPOINT_NAME)
    assert a["step"] == b["step"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_batches_are_a_function_of_seed_and_step():
    a = batch_indices(3, 10, 16, 1000)
    assert torch.equal(a, batch_indices(3, 10, 16, 1000)) and not torch.equal(a, batch_indices(4, 10, 16, 1000))
    epoch = torch.cat([batch_indices(0, i, 10, 100) for i in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))  # an epoch visits every scene once


def test_prior_annealing_is_geometric():
    cfg = TrainConfig(z_pres_prior=1e-5, z_pres_prior_start=0.99, anneal_steps=100)
    assert z_pres_prior_at(cfg, 0) == pytest.approx(0.99)
    assert z_pres_prior_at(cfg, 100) == pytest.approx(1e-5) == z_pres_prior_at(cfg, 1000)
    assert z_pres_prior_at(cfg, 50) == pytest.approx((0.99 * 1e-5) ** 0.5)


def test_cli_train_one_step(tmp_path, data_dir, capsys):
    code = cli_main(
        [
            "train",
            "air",
            "--out",
            str(tmp_path),
            "--steps",
            "1",
            "--minutes",
            "1",
            "--batch-size",
            "4",
            "--n-train",
            "32",
            "--eval-n",
            "8",
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert code == 0 and (tmp_path / CHECKPOINT_NAME).exists()
    assert "count_acc" in capsys.readouterr().out


@pytest.mark.parametrize("memory", [False, True])
def test_cli_train_dair_variant(tmp_path, data_dir, memory):
    args = ["train", "dair", "--out", str(tmp_path), "--steps", "1", "--batch-size", "4", "--n-train", "32"]
    args += ["--eval-n", "8", "--no-progress", "--threads", "1"] + (["--dair-memory"] if memory else [])
    assert cli_main(args) == 0
    model = ig.load(tmp_path / CHECKPOINT_NAME)
    assert model.config.difference_input and model.config.difference_memory is memory
    # --init-from: a second run starts from the first one's weights
    start = ["--init-from", str(tmp_path / CHECKPOINT_NAME), "--steps", "0"]
    assert cli_main(args[:3] + [str(tmp_path / "again")] + args[4:] + start) == 0
    again = ig.load(tmp_path / "again" / CHECKPOINT_NAME)
    assert torch.equal(again.decoder.fc2.weight, model.decoder.fc2.weight)
    # --likelihood-sd: the same weights, trained on under a sharper pixel likelihood
    sharper = start + ["--likelihood-sd", "0.2"]
    assert cli_main(args[:3] + [str(tmp_path / "sharper")] + args[4:] + sharper) == 0
    assert ig.load(tmp_path / "sharper" / CHECKPOINT_NAME).config.likelihood_sd == 0.2 != model.config.likelihood_sd


def test_cli_refuses_dair_memory_for_air(tmp_path, capsys):
    assert cli_main(["train", "air", "--out", str(tmp_path), "--dair-memory"]) == 2
    assert "--dair-memory do(es) not apply to `train air`" in capsys.readouterr().err
    assert cli_main(["train", "air-tabletop", "--out", str(tmp_path), "--likelihood-sd", "0.2"]) == 2
    assert "--likelihood-sd do(es) not apply to `train air-tabletop`" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's usage error
        cli_main(["train", "air", "--out", str(tmp_path), "--likelihood-sd", "0"])
    assert "expected a number > 0, got '0'" in capsys.readouterr().err


def test_dair_starts_from_an_air_checkpoint(tmp_path, data_dir):
    train(tiny(tmp_path / "air", max_steps=4), progress=False)
    air = ig.load(tmp_path / "air" / CHECKPOINT_NAME)
    cfg = tiny(tmp_path / "dair", model="dair", max_steps=4, steps=0, init_from=str(tmp_path / "air" / CHECKPOINT_NAME))
    train(cfg, progress=False)
    dair = ig.load(tmp_path / "dair" / CHECKPOINT_NAME)
    assert dair.config.difference_input and not dair.config.difference_memory
    for (name, a), (_, d) in zip(air.state_dict().items(), dair.state_dict().items()):
        assert torch.equal(a, d), name
    with pytest.raises(ValueError, match="differs"):  # a model of another shape is refused, not half-loaded
        train(tiny(tmp_path / "bad", model="dair", max_steps=3, init_from=cfg.init_from), progress=False)


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path, data_dir):
    train(tiny(tmp_path), progress=False)
    path = tmp_path / CHECKPOINT_NAME
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ig.load(cut)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not an inverse-graphics checkpoint"):
        ig.load(foreign)
    pickled = tmp_path / "old.pt"
    torch.save({"weights": torch.zeros(3)}, pickled)
    with pytest.raises(CheckpointError, match=r"old-format \(pickle\)(.|\n)*inverse-graphics convert"):
        ig.load(pickled)
    with pytest.raises(CheckpointError, match="holds a 'air' model"):
        ig.load(path, expect_model=("tabletop",))
    with pytest.raises(CheckpointError, match="does not exist"):
        ig.load(tmp_path / "nothing.pt")
    with pytest.raises(KeyError, match="air-multi-mnist"):
        ig.load_pretrained("no-such-model")


@requires_cuda
def test_cuda_training_step_and_inference(tmp_path, data_dir):
    rec = train(tiny(tmp_path, device="cuda"), progress=False)
    assert 0 <= rec["count_acc"] <= 1
    model = ig.load(tmp_path / CHECKPOINT_NAME, device="cuda")
    out = model.infer(torch.rand(4, 50, 50, device="cuda"))
    assert out.counts.device.type == "cuda" and len(out.boxes) == 4
