"""The training engine's run-directory rules, option checks, metrics log and TensorBoard output (one process).

The distributed side (torchrun, DDP equivalence, restarts) is tests/test_distributed.py."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from inverse_graphics.checkpoint import CHECKPOINT_NAME, load_checkpoint
from inverse_graphics.cli import main as cli_main
from inverse_graphics.tabletop.train_air3d import AIR3DTrainConfig, training_images
from inverse_graphics.tabletop.train_supervised3d import SupervisedTrainConfig
from inverse_graphics.train import TrainConfig, train
from tests.test_train import tiny


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_second_run_into_the_same_out_is_refused_unless_overwrite(tmp_path, data_dir):
    train(tiny(tmp_path, steps=2), progress=False)
    before = load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"]
    with pytest.raises(ValueError, match="already holds a run; pass --resume to continue it or --overwrite"):
        train(tiny(tmp_path, steps=1), progress=False)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == before == 2  # untouched
    train(tiny(tmp_path, steps=1), progress=False, overwrite=True)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 1
    assert [r["step"] for r in records(tmp_path)] == [1, 1]  # the old run's records are gone, not appended to


def test_resume_without_a_checkpoint_is_refused(tmp_path, data_dir):
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train(tiny(tmp_path / "typo"), resume=True, progress=False)
    assert not (tmp_path / "typo").exists()


def test_changed_options_on_resume_are_applied_or_refused_by_name(tmp_path, data_dir, capsys):
    train(tiny(tmp_path, steps=2), progress=False)
    with pytest.raises(ValueError, match=r"cannot change batch_size = 4 \(the run's: 8\), lr = 0.1"):
        train(tiny(tmp_path, steps=3, batch_size=4, lr=0.1), resume=True, progress=False)
    train(tiny(tmp_path, steps=3, eval_n=8), resume=True, progress=False)
    assert "resume: applying steps = 3 (the run had 2)" in capsys.readouterr().err
    resume = [r for r in records(tmp_path) if r["kind"] == "resume"]
    assert resume[0]["applied"] == {"steps": [2, 3], "eval_n": [16, 8]} and resume[0]["step"] == 2
    # the CLI resumes with the run's own options where none are given again
    args = ["train", "air", "--out", str(tmp_path), "--resume", "--steps", "4", "--no-progress"]
    assert cli_main(args) == 0 and load_checkpoint(tmp_path / CHECKPOINT_NAME)["train_config"]["batch_size"] == 8
    assert cli_main([*args, "--batch-size", "2"]) == 2
    assert "--resume cannot change batch_size = 2 (the run's: 8)" in capsys.readouterr().err
    assert cli_main(["train", "supervised-tabletop", "--out", str(tmp_path), "--resume"]) == 2
    assert "holds a 'air' model; expected one of supervised-tabletop" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("batch_size", 0, "batch_size must be an integer > 0"),
        ("batch_size", -4, "batch_size must be an integer > 0"),
        ("minutes", 0.0, "minutes must be a number > 0"),
        ("minutes", -1.0, "minutes must be a number > 0"),
        ("minutes", math.nan, "minutes must be a number > 0"),
        ("steps", 0, "steps must be an integer > 0"),
        ("steps", -3, "steps must be an integer > 0"),
        ("n_train", 4, r"n_train \(4\) must be at least the batch size \(8\)"),
    ],
)
def test_bad_training_options_are_refused_by_every_config(field, value, match):
    base = {"minutes": None, "steps": 2, "batch_size": 8, "n_train": 64}
    for cls in (TrainConfig, AIR3DTrainConfig, SupervisedTrainConfig):
        with pytest.raises(ValueError, match=match):
            cls(**{**base, field: value})


def test_cli_refuses_bad_options_and_a_file_as_out(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for args, match in [
        (["--batch-size", "0"], "batch_size must be an integer > 0, got 0"),
        (["--minutes", "-1"], "minutes must be a number > 0"),
        (["--steps", "0"], "steps must be an integer > 0"),
        (["--out", str(tmp_path / "file")], "is a file, not a run directory"),
    ]:
        out = [] if "--out" in args else ["--out", str(tmp_path / "run")]
        assert cli_main(["train", "supervised-tabletop", *out, "--n-train", "64", *args]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_nothing_is_logged_twice_after_a_resume(tmp_path, data_dir):
    train(tiny(tmp_path / "straight", steps=4), progress=False)
    out = tmp_path / "split"
    train(tiny(out, steps=2), progress=False)
    # a run killed after its last checkpoint had logged two more steps: the resumed run repeats those steps
    with open(out / "metrics.jsonl", "a") as f:
        for step in (3, 4):
            f.write(json.dumps({"kind": "train", "step": step, "elbo": 0.0}) + "\n")
    train(tiny(out, steps=4), resume=True, progress=False)
    kinds_steps = [(r["kind"], r["step"]) for r in records(out)]
    assert kinds_steps == [("train", 1), ("train", 2), ("eval", 2), ("resume", 2), ("train", 3), ("train", 4),
                           ("eval", 4)]  # fmt: skip
    straight = [r for r in records(tmp_path / "straight") if r["kind"] == "train"]
    resumed = [r for r in records(out) if r["kind"] == "train"]
    assert [r["elbo"] for r in straight] == [r["elbo"] for r in resumed]  # the same run, logged once
    # a finished run resumed with nothing left to train returns its result instead of evaluating again
    final = train(tiny(out, steps=4), resume=True, progress=False)
    assert final == records(out)[-2] and [r["kind"] for r in records(out)].count("eval") == 2


def test_metrics_rows_carry_step_time_scenes_and_world_size(tmp_path, data_dir):
    train(tiny(tmp_path, steps=3, sleep_weight=1.0, sleep_start=2), progress=False)
    rows = records(tmp_path)
    assert all({"step", "train_time_s", "scenes", "world_size"} <= set(r) for r in rows)
    assert [r["scenes"] for r in rows] == [8, 16, 32, 32]  # the sleep step adds its dreamt scenes
    assert all(r["world_size"] == 1 for r in rows)


def test_tensorboard_events_beside_the_jsonl(tmp_path, data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def steps(tag: str) -> list[int]:
        acc = EventAccumulator(str(tmp_path / "tensorboard"))
        acc.Reload()
        return [e.step for e in acc.Scalars(tag)]

    train(tiny(tmp_path, steps=2), progress=False)
    assert steps("train/elbo") == [1, 2] and steps("eval/count_acc") == [2]
    train(tiny(tmp_path, steps=4), resume=True, progress=False)
    assert steps("train/elbo") == [1, 2, 3, 4] and steps("eval/count_acc") == [2, 4]


def test_training_works_without_tensorboard(tmp_path, data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    train(tiny(tmp_path, steps=1), progress=False)
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "tensorboard").exists()


def test_a_junk_data_cache_is_rebuilt(tmp_path):
    cache = tmp_path / "cache.pt"
    cache.write_bytes(b"not a cache at all")
    cfg = AIR3DTrainConfig(n_train=2, batch_size=2, image_size=16, backend="pytorch3d", data_cache=str(cache), steps=1)
    with pytest.warns(UserWarning, match="unreadable"):
        images = training_images(cfg)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    assert torch.equal(training_images(cfg), images)  # rebuilt and rewritten: now it is read back
