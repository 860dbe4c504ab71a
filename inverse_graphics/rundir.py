"""What a training may do with its run directory: start afresh, replace a run (--overwrite), or resume one.

- A directory that already holds a run (config.json, metrics.jsonl or a checkpoint) is never written over by a new
  run: that is refused unless `overwrite`, which removes the old run's files first.
- `resume` needs a checkpoint in the directory; without one (a typo in --out) it is refused, not started afresh.
- On resume the run's saved training config is used; options given now that differ from it are applied when they
  change only budgets, cadence or where things run (`APPLY_ON_RESUME`), and refused otherwise, naming each.
- A worker restarted by torchrun (--max-restarts) resumes from the checkpoint if there is one, else starts afresh;
  but only in a run directory that this torchrun job itself started (JOB_FILE holds its TORCHELASTIC_RUN_ID), so
  that a refused launch (a typo in --out, a run already there) stays refused when torchrun retries it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inverse_graphics import distributed
from inverse_graphics.checkpoint import CHECKPOINT_NAME, LEGACY_NAME, CheckpointError, load_checkpoint

RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT_NAME, LEGACY_NAME)  # a directory with any of them holds a run
RUN_DIRS = ("figures", "tensorboard")
JOB_FILE = "torchrun_job"  # the id of the torchrun job training in this directory
# Options that a resume applies when they differ from the run's (budgets, cadence, where things are and run);
# any other difference would silently change the experiment and is refused.
APPLY_ON_RESUME = frozenset(
    {"minutes", "steps", "eval_every_s", "checkpoint_every_s", "log_every", "threads", "device", "data_dir",
     "data_cache", "eval_n", "eval_refine"}
)  # fmt: skip
IGNORED_ON_RESUME = frozenset({"out_dir", "init_from"})  # the run's weights come from its checkpoint


@dataclass
class Opened:
    """The outcome of opening a run directory: the config to train with, the checkpoint to resume from (None for a
    new run) and the options a resume applied ({name: [old, new]})."""

    cfg: Any
    state: dict | None
    applied: dict


def has_run(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_FILES)


def saved_config(out_dir: str | Path, kinds: tuple[str, ...] | None = None) -> dict | None:
    """The training config saved in a run's checkpoint (None when there is no checkpoint to read); CheckpointError
    if the checkpoint holds a model of none of `kinds`."""
    path = Path(out_dir) / CHECKPOINT_NAME
    return load_checkpoint(path, expect_model=kinds)["train_config"] if path.is_file() else None


def open_run(cfg: Any, config_cls: Any, kinds: tuple[str, ...], resume: bool, overwrite: bool) -> Opened:
    """Apply the rules of the module docstring to cfg.out_dir; ValueError with the reason when refused."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run directory")
    ckpt = out / CHECKPOINT_NAME
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if distributed.restart_count() > 0 and _job_of(out) == job:  # torchrun restarted the workers of this run
        resume, overwrite = ckpt.is_file(), not ckpt.is_file()
    opened = _open(out, cfg, config_cls, kinds, resume, overwrite)
    if job is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / JOB_FILE).write_text(job)
    return opened


def _job_of(out: Path) -> str | None:
    path = out / JOB_FILE
    return path.read_text() if path.is_file() else None


def _open(out: Path, cfg: Any, config_cls: Any, kinds: tuple[str, ...], resume: bool, overwrite: bool) -> Opened:
    ckpt = out / CHECKPOINT_NAME
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: choose one")
    if resume:
        legacy = out / LEGACY_NAME
        if not ckpt.is_file() and legacy.is_file():
            raise CheckpointError(
                f"{legacy} is an old-format (pickle) checkpoint, which is not read: unpickling can run arbitrary "
                f"code. If you trust its source, convert it with `inverse-graphics convert {legacy} {ckpt} --trusted`"
            )
        if not ckpt.is_file():
            raise ValueError(f"--resume: {out} holds no checkpoint ({CHECKPOINT_NAME}) to resume; check --out")
        state = load_checkpoint(ckpt, expect_model=kinds)
        saved = state.get("train_config")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{ckpt} has no training config, so it cannot be resumed (is it an exported model?)")
        try:
            new_cfg, applied = resume_config(cfg, saved, config_cls)
        except (TypeError, KeyError) as err:
            raise CheckpointError(f"{ckpt}: its training config does not fit this release's: {err}") from err
        return Opened(new_cfg, state, applied)
    if has_run(out):
        if not overwrite:
            raise ValueError(
                f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it "
                "(or choose another --out)"
            )
        remove_run(out)
    return Opened(cfg, None, {})


def remove_run(out: Path) -> None:
    for name in (*RUN_FILES, JOB_FILE):
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, so that a config compares with its saved JSON form


def resume_config(cfg: Any, saved: dict, config_cls: Any) -> tuple[Any, dict]:
    """The saved config with the options of `cfg` that may change on resume; ValueError naming the others."""
    given = _plain(dataclasses.asdict(cfg))
    saved = _plain(saved)
    changed = {k: [saved[k], v] for k, v in given.items() if k in saved and saved[k] != v}
    changed = {k: v for k, v in changed.items() if k not in IGNORED_ON_RESUME}
    refused = {k: v for k, v in changed.items() if k not in APPLY_ON_RESUME}
    if refused:
        listed = ", ".join(f"{k} = {new!r} (the run's: {old!r})" for k, (old, new) in refused.items())
        raise ValueError(
            f"--resume cannot change {listed}: they would change the experiment mid-run; resume without them, "
            "or start a new run (another --out, or --overwrite)"
        )
    merged = {**saved, **{k: new for k, (_, new) in changed.items()}, "out_dir": cfg.out_dir}
    return config_cls.from_dict(merged), changed
