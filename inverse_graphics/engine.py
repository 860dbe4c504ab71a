"""One training engine for every model: budgets, progress, held-out evaluation, metrics, checkpoints, resume,
signals and torch.distributed.

A recipe (train.py's `AIRRun` for air / dair, train_air3d.py's `TrainingRun`, train_supervised3d.py's `_Run`) is a
`Run` subclass: it builds its model and optimiser, holds its training data, and supplies `train_step(data)` (one
optimiser step through `Run.optimise`), `evaluate()` and `payload()`; `run_training` does the rest, identically
for all of them.

A run directory holds `config.json`, `CHECKPOINT_NAME` (written atomically every `checkpoint_every_s` of training
time, at the end and on SIGINT / SIGTERM), `metrics.jsonl` (one JSON record per line: `kind` train / eval / resume,
and always `step`, `train_time_s`, `scenes` = global training scenes seen so far, `world_size`), TensorBoard event
files in `tensorboard/` when the optional `tensorboard` package is installed, and `figures/`.

Resume is exact: batch order is a function of (seed, step), the RNG state of every rank, the optimiser and the
step are restored, and evaluation runs under a forked RNG. The checkpoint records how long metrics.jsonl was when
it was written; a resumed (or torchrun-restarted) run cuts the log back to that length, so that the steps after the
last checkpoint, which it repeats, are not logged twice.

Distributed (torchrun): the configured batch is the global batch, split evenly across ranks; every rank draws its
own random numbers (seeded by rank); gradients are averaged by DistributedDataParallel, and the recipes' running
statistics (the NVIL signal means) are summed across ranks like them; stop, evaluation and checkpoint decisions
are taken on the slowest rank's clock so that all ranks take them together; only rank 0 evaluates and writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from inverse_graphics import distributed
from inverse_graphics.checkpoint import CHECKPOINT_NAME, CheckpointError, restore, save_atomic
from inverse_graphics.distributed import Dist
from inverse_graphics.rundir import open_run


def check_training_options(cfg: Any) -> None:
    """ValueError for training options no run can use (shared by every config's __post_init__ and the engine)."""
    bad = []
    if not (isinstance(cfg.batch_size, int) and cfg.batch_size > 0):
        bad.append(f"batch_size must be an integer > 0, got {cfg.batch_size!r}")
    if cfg.minutes is not None and not (isinstance(cfg.minutes, int | float) and 0 < cfg.minutes < math.inf):
        bad.append(f"minutes must be a number > 0 (or None for no time budget), got {cfg.minutes!r}")
    zero_ok = getattr(cfg, "init_from", None) is not None  # zero steps: evaluate and save the loaded weights
    if cfg.steps is not None and not (isinstance(cfg.steps, int) and (cfg.steps > 0 or (zero_ok and cfg.steps == 0))):
        bad.append(f"steps must be an integer > 0 (0 only with init_from), got {cfg.steps!r}")
    for name in ("eval_every_s", "checkpoint_every_s"):
        value = getattr(cfg, name)
        if not (isinstance(value, int | float) and value >= 0 and not math.isnan(value)):
            bad.append(f"{name} must be a number >= 0, got {value!r}")
    for name in ("log_every", "eval_n", "n_train"):
        value = getattr(cfg, name)
        if not (isinstance(value, int) and value > 0):
            bad.append(f"{name} must be an integer > 0, got {value!r}")
    if isinstance(cfg.n_train, int) and isinstance(cfg.batch_size, int) and 0 < cfg.n_train < cfg.batch_size:
        bad.append(f"n_train ({cfg.n_train}) must be at least the batch size ({cfg.batch_size})")
    if bad:
        raise ValueError("; ".join(bad))


class StopFlag:
    """Turns SIGINT / SIGTERM into a graceful stop: the loop saves a checkpoint and exits."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Objective(nn.Module):
    """The model as one module whose forward is a loss function of it, so that DistributedDataParallel sees every
    loss (ELBO, sleep, supervised) as one forward pass; with one process it is a plain call of the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss_fn: Callable[..., tuple[torch.Tensor, dict]], *args: Any) -> tuple[torch.Tensor, dict]:
        return loss_fn(self.model, *args)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The torch seed of rank >= 1 (rank 0 keeps the run's own stream, so one process is exactly as before)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % 2**63


class Run:
    """A recipe's run state: model, optimiser, step, training clock, scenes seen, this process's rank.

    Subclasses build `model` and `opt`, then call `_start(state, ctx)`; they implement `train_step(data) -> stats`,
    `evaluate() -> dict` and `payload() -> dict` (checkpoint keys "model", "config", "train_config", extras), and
    may override `record_fields`, `postfix`, `figures`, `load_extra`."""

    cfg: Any
    model: nn.Module
    opt: torch.optim.Optimizer
    desc = "train"
    unused_parameters = False  # True where some steps leave parameters without a gradient (DDP must look for them)
    train_data: Any  # what train_step takes (the recipe's training set)
    last_eval: dict | None = None  # the latest evaluation record

    def _start(self, state: dict | None, ctx: Dist | None) -> None:
        self.ctx = ctx or Dist()
        self.step, self.train_time, self.scenes = 0, 0.0, 0
        if self.ctx.rank > 0:  # each rank draws its own samples; rank 0's stream is the single-process one
            torch.manual_seed(rank_seed(self.cfg.seed, self.ctx.rank))
        if state is not None:
            self._load(state)
        self.objective: nn.Module = _Objective(self.model)
        if self.ctx.active:
            cuda = next(self.model.parameters()).device.type == "cuda"
            self.objective = nn.parallel.DistributedDataParallel(
                self.objective,
                device_ids=[self.ctx.local_rank] if cuda else None,
                find_unused_parameters=self.unused_parameters,
                broadcast_buffers=False,  # running statistics are all-reduced by the models themselves
            )
            if hasattr(self.model, "stat_reducer"):
                setattr(self.model, "stat_reducer", distributed.all_reduce_sum)  # noqa: B010 (any recipe's model)

    def _load(self, state: dict) -> None:
        path = Path(self.cfg.out_dir) / CHECKPOINT_NAME
        config = self.model.config.to_dict()  # type: ignore[union-attr, operator]
        built, saved = (json.loads(json.dumps(c)) for c in (config, state["config"]))
        if built != saved:  # e.g. the run's world file was edited since the run started
            changed = sorted(k for k in {*built, *saved} if built.get(k) != saved.get(k))
            raise CheckpointError(
                f"{path}: the run's options now build another model than the one its checkpoint holds (it differs "
                f"in {', '.join(changed)}; was a world file edited?); start a new run or restore the old file"
            )
        restore(self.model, state, path, strict=True)  # CheckpointError naming what does not fit
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: its optimiser state does not fit the model: {err}") from err
        self.step, self.train_time = state["step"], state["train_time_s"]
        self.scenes = state.get("scenes", self.step * self.cfg.batch_size)
        ranks = state.get("rng_ranks") or [state["rng"]]
        if self.ctx.rank < len(ranks):
            torch.set_rng_state(ranks[self.ctx.rank])
        else:  # a rank the saved run did not have: a fresh stream, distinct from every earlier one
            torch.manual_seed(rank_seed(self.cfg.seed, self.ctx.rank, self.step))
        cuda = state.get("cuda_rng_ranks") if self.ctx.active else None
        if cuda and self.ctx.rank < len(cuda) and cuda[self.ctx.rank] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda[self.ctx.rank])
        elif not self.ctx.active and state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.load_extra(state)

    def load_extra(self, state: dict) -> None:
        """Recipe-specific state from a checkpoint (after the common state)."""

    # ------------------------------------------------------------------ what recipes call
    def local_rows(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch of indices (rank r takes the r-th of world_size equal slices)."""
        b = len(index) // self.ctx.world_size
        return index[self.ctx.rank * b : (self.ctx.rank + 1) * b]

    @property
    def local_batch(self) -> int:
        return self.cfg.batch_size // self.ctx.world_size

    def optimise(self, loss_fn: Callable[..., tuple[torch.Tensor, dict]], *args: Any, scenes: int,
                 before_step: Callable[[], None] | None = None) -> dict:  # fmt: skip
        """One optimiser step on loss_fn(model, *args) -> (loss, float stats); scenes: global scenes it trains on.
        before_step runs between backward (gradients already averaged across ranks) and the update."""
        loss, stats = self.objective(loss_fn, *args)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        self.opt.step()
        self.step += 1
        self.scenes += scenes
        return stats

    # ------------------------------------------------------------------ what the engine calls
    def train_step(self, data: Any) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def payload(self) -> dict:
        raise NotImplementedError

    def record_fields(self) -> dict:
        """Extra fields of every metrics record (e.g. the 3D recipe's name)."""
        return {}

    def postfix(self, record: dict) -> dict:
        """The progress bar's summary of an evaluation record."""
        return {}

    def figures(self, out: Path) -> None:
        """Figures written after the final evaluation (rank 0)."""

    def record(self, kind: str, fields: dict) -> dict:
        base = {"kind": kind, "step": self.step, "train_time_s": round(self.train_time, 2), "scenes": self.scenes}
        return {**base, "world_size": self.ctx.world_size, **self.record_fields(), **fields}

    def checkpoint_state(self) -> dict:
        """Everything a resume needs, RNG state of every rank included (a collective: all ranks call it)."""
        cuda = torch.cuda.is_available()
        mine = {"rng": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}
        ranks = distributed.gather(mine)
        return {
            **self.payload(),
            "state_dict": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "train_time_s": self.train_time,
            "scenes": self.scenes,
            "world_size": self.ctx.world_size,
            "rng": mine["rng"],
            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
            "rng_ranks": [r["rng"] for r in ranks],
            "cuda_rng_ranks": [r["cuda"] for r in ranks] if cuda else None,
        }


class MetricsLog:
    """metrics.jsonl (and TensorBoard scalars when tensorboard is installed), written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool, truncate_to: int | None = None, purge_step: int | None = None):
        self.path, self.enabled = out / "metrics.jsonl", enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        if truncate_to is not None and self.path.is_file() and self.path.stat().st_size > truncate_to:
            os.truncate(self.path, truncate_to)  # records after the checkpoint: the resumed run writes them again
        self._file = open(self.path, "a")
        self._tb = _tensorboard_writer(out / "tensorboard", purge_step)

    def write(self, record: dict) -> dict:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self._tb.flush()
        return record

    def position(self) -> int | None:
        return self._file.tell() if self._file is not None else None

    def close(self) -> None:
        for f in (self._file, self._tb):
            if f is not None:
                f.close()


def _tensorboard_writer(path: Path, purge_step: int | None) -> Any:
    """A SummaryWriter when the optional `tensorboard` package is installed (pip install 'inverse-graphics[tb]');
    None otherwise. purge_step: on resume, events from this step on (which the run repeats) are dropped."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path), purge_step=purge_step)


# ---------------------------------------------------------------------------------------------- the run itself
def run_training(
    cfg: Any,
    config_cls: Any,
    kinds: tuple[str, ...],
    make_run: Callable[[Any, dict | None, Dist], Run],
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train (or resume) the run `cfg` describes; returns the final held-out evaluation record (on every rank).

    config_cls: cfg's dataclass (with `from_dict`); kinds: the checkpoint model kinds a resume accepts;
    make_run(cfg, checkpoint or None, ctx): the recipe's Run. resume / overwrite: see inverse_graphics.rundir.
    """
    check_training_options(cfg)
    ctx = distributed.setup(cfg.device)
    try:
        return _train(cfg, config_cls, kinds, make_run, ctx, resume, progress, overwrite)
    finally:
        distributed.teardown(ctx)


def _check_world(cfg: Any, ctx: Dist) -> None:
    if cfg.batch_size % ctx.world_size:
        ranks = ctx.world_size
        raise ValueError(f"batch_size {cfg.batch_size} is the global batch: it must divide by the {ranks} ranks")


def _train(cfg, config_cls, kinds, make_run, ctx: Dist, resume, progress, overwrite) -> dict:
    _check_world(cfg, ctx)  # before anything in --out is touched
    opened = distributed.on_main(lambda: open_run(cfg, config_cls, kinds, resume, overwrite))
    cfg, state = opened.cfg, opened.state
    _check_world(cfg, ctx)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    run = make_run(cfg, state, ctx)
    log_bytes = state.get("log_bytes") if state is not None else None
    # records after the checkpoint's are of later steps: those the resumed run repeats
    log = MetricsLog(out, ctx.is_main, log_bytes, run.step + 1 if state is not None else None)
    try:
        if state is not None:
            _note_resume(run, log, state, opened.applied)
        start_step = run.step
        fit(run, log, progress)
        if state is not None and run.step == start_step and state.get("final_eval") is not None:
            return state["final_eval"]  # a finished run resumed with nothing to add: its result, not a repeat
        return finish(run, log)
    finally:
        log.close()


def _note_resume(run: Run, log: MetricsLog, state: dict, applied: dict) -> None:
    saved_world = state.get("world_size", 1)
    fields = {"restart": distributed.restart_count(), "applied": applied, "checkpoint_world_size": saved_world}
    log.write(run.record("resume", fields))
    if not run.ctx.is_main:
        return
    for name, (old, new) in applied.items():
        print(f"resume: applying {name} = {new!r} (the run had {old!r})", file=sys.stderr)
    if saved_world != run.ctx.world_size:
        print(
            f"resume: {run.ctx.world_size} processes, the checkpoint was written by {saved_world}: the global batch"
            f" and its scenes stay the same; ranks >= {saved_world} start fresh random streams, so the run continues"
            " correctly but not bit-identically to an uninterrupted one",
            file=sys.stderr,
        )


def fit(run: Run, log: MetricsLog, progress: bool = True) -> bool:
    """Train until a budget runs out or a signal arrives; log, evaluate and checkpoint on the way. Returns whether
    a signal stopped it."""
    cfg, ctx = run.cfg, run.ctx
    budget_steps = cfg.steps if cfg.steps is not None else math.inf
    budget_s = cfg.minutes * 60 if cfg.minutes is not None else math.inf
    last_eval = last_ckpt = run.train_time
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # per statistic: a phase switch (sleep -> ELBO) changes which ones a step reports
    total = None if budget_steps == math.inf else budget_steps
    show = progress and ctx.is_main
    bar = tqdm(total=total, initial=run.step, disable=not show, desc=run.desc, unit="step", dynamic_ncols=True)
    stop = False
    with StopFlag() as flag, bar:
        while run.step < budget_steps and run.train_time < budget_s and not stop:
            t0 = time.perf_counter()
            stats = run.train_step(run.train_data)
            # every rank takes the same decisions: on the slowest rank's clock, and stopping if any rank was told to
            dt, stop_any = distributed.all_reduce_max([time.perf_counter() - t0, float(flag.stop)])
            run.train_time += dt
            stop = bool(stop_any)
            for k, v in stats.items():
                sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
            bar.update(1)
            if run.step % cfg.log_every == 0:  # the means since the last record, over all ranks
                log.write(run.record("train", distributed.all_reduce_mean({k: v / counts[k] for k, v in sums.items()})))
                sums, counts = {}, {}
            if run.train_time - last_eval >= cfg.eval_every_s:
                rec = evaluate(run, log)
                if ctx.is_main:
                    bar.set_postfix(run.postfix(rec))
                last_eval = run.train_time
            if run.train_time - last_ckpt >= cfg.checkpoint_every_s:
                save(run, log)
                last_ckpt = run.train_time
    if stop and ctx.is_main:
        print(f"stopped by signal at step {run.step}; saving the checkpoint in {cfg.out_dir}")
    return stop


def evaluate(run: Run, log: MetricsLog) -> dict:
    """The held-out evaluation, once (on rank 0), logged; every rank gets the record."""
    run.last_eval = distributed.on_main(lambda: log.write(run.record("eval", run.evaluate())))
    return run.last_eval


def save(run: Run, log: MetricsLog, final_eval: dict | None = None, state: dict | None = None) -> None:
    """An atomic checkpoint (rank 0 writes; all ranks must call). state: one captured earlier by
    `checkpoint_state`, e.g. before the final evaluation; final_eval: the run's final record."""
    state = run.checkpoint_state() if state is None else state
    if run.ctx.is_main:
        path = Path(run.cfg.out_dir) / CHECKPOINT_NAME
        save_atomic({**state, "log_bytes": log.position(), "final_eval": final_eval}, path)
    distributed.barrier()


def finish(run: Run, log: MetricsLog) -> dict:
    """The final evaluation and figures, then the final checkpoint (holding the log position after them, so that
    a resume neither loses nor repeats them)."""
    state = run.checkpoint_state()  # before the evaluation: training's RNG state as the loop left it
    last = run.last_eval
    rec = last if last is not None and last["step"] == run.step else evaluate(run, log)  # not twice at one step
    if run.ctx.is_main:
        run.figures(Path(run.cfg.out_dir) / "figures")
    save(run, log, final_eval=rec, state=state)
    return rec
