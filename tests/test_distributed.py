"""Training on several processes with torchrun (gloo, 2 CPU processes): DDP equivalence for every recipe, rank-0-only
writes, a worker killed with SIGKILL under --max-restarts, a world-size change on resume, two "machines"."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from inverse_graphics.checkpoint import CHECKPOINT_NAME, load_checkpoint
from inverse_graphics.distributed import Dist
from inverse_graphics.train import train
from tests.conftest import REPO, assert_close
from tests.ddp_cases import CASES, build, one_step
from tests.test_train import tiny

pytestmark = pytest.mark.slow  # each launches torchrun: ~10-30 s on 2 cores

TRAIN = ["-m", "inverse_graphics", "train", "air", "--batch-size", "8", "--n-train", "64", "--eval-n", "16"]
TRAIN += ["--threads", "1", "--no-progress"]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    return env


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def test_two_ranks_take_the_step_of_one_process_on_the_same_scenes(tmp_path):
    # 2 ranks x batch B/2 against 1 process x batch B, on the same scenes (tests/ddp_cases.py), one Adam step.
    # Gradients (averaged by DDP) agree to float rounding: 1e-5 of each tensor's largest entry; the finite-difference
    # ELBO 1e-3, as central differences of a hard rasterizer divide the renders' rounding (which depends on how the
    # batch is laid out) by a one-pixel step. Adam's first step is lr * g / (|g| + 1e-8), about +-lr wherever g is
    # not tiny, so a parameter may differ by up to 2 lr where g is ~1e-8 and its rounding flips its sign; we allow
    # 0.05 lr everywhere but for such flips, in at most 1e-4 of the parameters.
    res = torchrun("-m", "tests.ddp_worker", str(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]
    two = torch.load(tmp_path / "ddp_step.pt")
    for case in CASES:
        one = one_step(case, Dist(), str(tmp_path))
        start = build(case, Dist(), str(tmp_path)).model.state_dict()
        state, grad = one["state"], one["grad"]
        assert any(not torch.equal(state[k], start[k]) for k in state), case  # the step moved the model
        assert sorted(two[case]["grad"]) == sorted(grad), case  # the same parameters got gradients
        fd = case == "air-tabletop-elbo"
        for k in grad:
            assert _max_relative(two[case]["grad"][k], grad[k]) < (1e-3 if fd else 1e-5), f"{case} grad {k}"
        diff = {k: (two[case]["state"][k] - v).abs() / (1e-2 if k.startswith("baseline.") else 1e-3)  # in lr
                for k, v in state.items()}  # fmt: skip
        off = sum(int((d > 0.05).sum()) for d in diff.values())
        assert off <= 1e-4 * sum(v.numel() for v in state.values()), f"{case}: {off} parameters"
        assert all((d <= 2.01).all() for d in diff.values()), case
        if "signal_mean" in state and not case.endswith("sleep"):  # the running mean moved, on the global batch
            assert state["signal_mean"].abs().sum() > 0
            assert_close(two[case]["state"]["signal_mean"], state["signal_mean"], atol=1e-4, rtol=1e-5, msg=case)


def test_only_rank_0_writes_and_each_rank_has_its_own_stream(tmp_path, data_dir):
    out = tmp_path / "run"
    res = torchrun(*TRAIN, "--out", str(out), "--steps", "3", "--eval-every", "0")
    assert res.returncode == 0, res.stderr[-4000:]
    rows = records(out)
    assert [(r["kind"], r["step"]) for r in rows if r["kind"] == "eval"] == [("eval", 1), ("eval", 2), ("eval", 3)]
    assert all(r["world_size"] == 2 for r in rows) and rows[-1]["scenes"] == 24  # global scenes
    assert len(list((out / "tensorboard").glob("events.*"))) in (0, 1)  # one writer, or tensorboard absent
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tmp") == []
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    assert not torch.equal(ckpt["rng_ranks"][0], ckpt["rng_ranks"][1])  # seeded by rank
    assert (out / "figures" / "attention.png").is_file()


def test_a_killed_worker_comes_back_from_the_last_checkpoint_logging_nothing_twice(tmp_path, data_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1"]
    args = [*TRAIN, "--steps", "80", "--checkpoint-every", "0.2", "--eval-every", "0"]
    cmd += [*args, "--out", str(out)]
    launcher = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _has_checkpoint_past(out, 5):
            time.sleep(0.2)
        workers = _children(launcher.pid)
        assert workers, "no torchrun workers found"
        os.kill(workers[-1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=240)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, err[-4000:]
    rows = records(out)
    eval_steps = [r["step"] for r in rows if r["kind"] == "eval"]  # --eval-every 0: one record per step
    assert eval_steps == list(range(1, 81)), "a step logged twice or missing"
    resumes = [r for r in rows if r["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["restart"] == 1 and 5 <= resumes[0]["step"] < 80
    restarted = load_checkpoint(out / CHECKPOINT_NAME)
    assert restarted["step"] == 80
    # and exactly: the same parameters as a run that was never killed (each rank's RNG state is in the checkpoint)
    res = torchrun(*args, "--out", str(tmp_path / "straight"))
    assert res.returncode == 0, res.stderr[-4000:]
    straight = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)["state_dict"]
    assert all(torch.equal(v, restarted["state_dict"][k]) for k, v in straight.items())


def test_sigterm_to_torchrun_stops_every_rank_with_a_checkpoint(tmp_path, data_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [*TRAIN, "--out", str(out), "--steps", "100000", "--checkpoint-every", "0.2"]
    launcher = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _has_checkpoint_past(out, 3):
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)  # as a cluster's scheduler ending the job
        out_text, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert "stopped by signal at step" in out_text, err[-3000:]
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    last = records(out)[-1]
    assert last["kind"] == "eval" and last["step"] == ckpt["step"] > 3 and ckpt["final_eval"] == last


def test_a_refused_launch_stays_refused_when_torchrun_retries_it(tmp_path, data_dir):
    res = torchrun("--max-restarts=1", *TRAIN, "--out", str(tmp_path / "typo"), "--resume", "--steps", "2")
    assert res.returncode != 0 and "holds no checkpoint" in res.stderr
    assert not (tmp_path / "typo" / CHECKPOINT_NAME).exists()  # the retry did not start a run there


def _has_checkpoint_past(out: Path, step: int) -> bool:
    try:
        return load_checkpoint(out / CHECKPOINT_NAME)["step"] >= step
    except Exception:  # not there yet, or being replaced
        return False


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: no pgrep needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def test_a_run_resumed_with_another_world_size_continues(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    train(tiny(out, steps=2, log_every=1), progress=False)  # one process
    res = torchrun(*TRAIN, "--out", str(out), "--resume", "--steps", "4")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "the checkpoint was written by 1" in res.stderr
    rows = records(out)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["world_size"] for r in rows if r["kind"] == "train"] == [1, 1, 2, 2]
    resume = next(r for r in rows if r["kind"] == "resume")
    assert resume["checkpoint_world_size"] == 1 and resume["world_size"] == 2
    # a global batch the ranks cannot share is refused with a clear message
    res = torchrun(*TRAIN[:4], "--batch-size", "7", *TRAIN[6:], "--out", str(tmp_path / "odd"), "--steps", "1")
    assert res.returncode != 0 and "batch_size 7 is the global batch: it must divide by the 2 ranks" in res.stderr


def test_two_machines_through_a_localhost_rendezvous(tmp_path, data_dir):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"]
    base += [f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=test-two-machines"]
    args = [*TRAIN, "--out", str(out), "--steps", "3"]
    nodes = [subprocess.Popen([*base, *args], env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(e[-3000:] for e in errors)
    rows = records(out)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [] and rows[-1]["world_size"] == 2
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 3


def test_scaling_benchmark_smoke(tmp_path, data_dir):
    from benchmarks.bench_ddp_scaling import main

    args = ["--rounds", "1", "--steps", "4", "--log-every", "2", "--batch-size", "4", "--n-train", "32"]
    args += ["--modes", "weak", "--accuracy-target", "0", "--accuracy-minutes", "0.05", "--accuracy-eval-every", "0"]
    record = main([*args, "--accuracy-eval-n", "8", "--out", str(tmp_path), "--others", "a test"])
    assert record["scaling"][0]["median_ratio"] > 0
    assert record["accuracy"]["one_process"]["train_time_s"] is not None  # a target of 0 is met at once
    assert "Other load on the machine: a test" in (tmp_path / "ddp_scaling.md").read_text()
