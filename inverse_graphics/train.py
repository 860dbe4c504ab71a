"""Training for the 2D models: `inverse-graphics train air|dair`.

A run directory holds `config.json`, `checkpoint.pt` (written atomically every `checkpoint_every_s` and at the
end, and on SIGINT/SIGTERM), `metrics.jsonl` (one JSON record per log or evaluation) and `figures/`. `--resume`
continues exactly: batch order is a function of (seed, step), and the RNG state, optimiser and step are restored,
while evaluation runs under a forked RNG so that its timing does not change training.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from inverse_graphics.air import AIR, AIRConfig
from inverse_graphics.checkpoint import CHECKPOINT_NAME, load_checkpoint, restore, resume_state, save_atomic
from scenes import mnist, multi_mnist

EVAL_SEED = 2016  # held-out scenes are the same for every run: MNIST test digits, this seed


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as config.json and inside every checkpoint."""

    model: str = "air"  # "air" or "dair"
    out_dir: str = "runs/air"  # run directory
    seed: int = 0  # seeds data order, initialisation and sampling
    minutes: float | None = 10.0  # training wall-clock budget (evaluation time excluded); None: use `steps`
    steps: int | None = None  # step budget; training stops at whichever budget ends first
    batch_size: int = 64
    lr: float = 1e-3  # Adam, inference network and decoder (Pyro: 1e-4; 1e-3 learns ~10x faster here)
    lr_decay_start: int | None = 2000  # step from which the main rate decays (None: constant)
    lr_half_life: int = 2000  # steps for the main rate to halve after lr_decay_start
    lr_floor: float = 5e-5  # the main rate never decays below this
    baseline_lr: float = 1e-2  # Adam, NVIL baseline (10-1000x the main rate; see the paper's appendix / Pyro)
    n_train: int = 60_000  # training scenes, composed from MNIST train digits
    train_counts: tuple[int, ...] = (0, 1, 2)  # digit counts of training scenes
    eval_counts: tuple[int, ...] = (0, 1, 2)  # digit counts of held-out scenes
    overlap: str = "clip"  # multi-MNIST overlaps: "clip" (DESIGN.md) or "reject" (Pyro's generator), train and eval
    eval_n: int = 1000  # held-out scenes for periodic evaluation (benchmarks use 10,000)
    eval_every_s: float = 30.0  # seconds of training between evaluations
    log_every: int = 100  # steps between training-statistics records
    checkpoint_every_s: float = 60.0  # seconds between checkpoints
    z_pres_prior: float = 0.01  # final per-step prior probability of one more object
    z_pres_prior_start: float | None = None  # if set, anneal geometrically from this to z_pres_prior
    anneal_steps: int = 100_000  # steps of that annealing
    max_steps: int = 3  # T, the most objects per scene
    # DAIR: False (default) makes each step see only the image minus the reconstruction so far, no recurrent state;
    # it generalises to unseen counts far better (benchmarks/results/dair_generalisation.md). True: the older variant.
    dair_memory: bool = False
    # Sleep phase (wake-sleep; not in the paper): from step sleep_start on, each step also maximises
    # log q(latents | image) on batch_size scenes dreamt by the model itself, with counts uniform over sleep_counts
    # (None: 0..max_steps), weighted by sleep_weight (0: off). Dreams may hold more objects than any training scene.
    sleep_weight: float = 0.0
    sleep_start: int = 2000  # the decoder first has to draw glyphs worth dreaming
    sleep_counts: tuple[int, ...] | None = None
    data_dir: str | None = None  # MNIST location (else $INVERSE_GRAPHICS_DATA, else the cache)
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    model_overrides: dict = field(default_factory=dict)  # extra AIRConfig fields
    # Start from this checkpoint's weights (fresh optimiser and step count): e.g. DAIR from an AIR trained on the
    # same scenes, whose glyph decoder, encoders and where head it shares. The canvas, T and sizes must match.
    init_from: str | None = None

    def model_config(self) -> AIRConfig:
        return AIRConfig(
            max_steps=self.max_steps,
            z_pres_prior=self.z_pres_prior,
            difference_input=self.model == "dair",
            difference_memory=self.dair_memory,
            model_name=self.model,
            **self.model_overrides,
        )

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        for k in ("train_counts", "eval_counts", "sleep_counts"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        d.setdefault("dair_memory", True)  # runs saved before the field existed had memory
        return cls(**d)


class Scenes(Protocol):
    """What training and evaluation need of a dataset (scenes.multi_mnist.MultiMnist, scenes.omniglot's sets)."""

    @property
    def images(self) -> np.ndarray: ...  # uint8 (N, H, W), ink = 255

    @property
    def counts(self) -> np.ndarray: ...  # int64 (N,), objects per scene; -1 where unknown

    def float_images(self, start: int = 0, stop: int | None = None) -> np.ndarray: ...

    def __len__(self) -> int: ...


def z_pres_prior_at(cfg: TrainConfig, step: int) -> float:
    if cfg.z_pres_prior_start is None:
        return cfg.z_pres_prior
    frac = min(step / max(cfg.anneal_steps, 1), 1.0)
    return math.exp((1 - frac) * math.log(cfg.z_pres_prior_start) + frac * math.log(cfg.z_pres_prior))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The main learning rate at a step: constant, then halving every lr_half_life steps down to lr_floor. A high
    rate finds the count quickly; decaying it removes the REINFORCE noise that otherwise holds accuracy at a plateau."""
    if cfg.lr_decay_start is None or step < cfg.lr_decay_start:
        return cfg.lr
    return max(cfg.lr * 0.5 ** ((step - cfg.lr_decay_start) / cfg.lr_half_life), cfg.lr_floor)


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> torch.Tensor:
    """The training scenes of one step: epochs are seeded permutations, so any step's batch can be recomputed."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)[i * batch_size : (i + 1) * batch_size]


def make_data(cfg: TrainConfig) -> tuple[multi_mnist.MultiMnist, multi_mnist.MultiMnist]:
    train_digits = mnist.load_digits("train", cfg.data_dir)
    test_digits = mnist.load_digits("test", cfg.data_dir)
    rng = np.random.default_rng(cfg.seed)
    train = multi_mnist.generate(train_digits, cfg.n_train, rng, cfg.train_counts, overlap=cfg.overlap)
    held_rng = np.random.default_rng(EVAL_SEED)
    held_out = multi_mnist.generate(test_digits, cfg.eval_n, held_rng, cfg.eval_counts, overlap=cfg.overlap)
    return train, held_out


@torch.no_grad()
def evaluate(model: AIR, data: Scenes, device: str, batch_size: int = 500) -> dict:
    """Count accuracy (the most probable count; None where counts are unknown, i.e. negative) and a one-sample ELBO
    per image on held-out scenes; also the mean inferred count."""
    correct, elbo, steps, n = 0, 0.0, 0.0, len(data)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[] if device == "cpu" else None):  # leave the training RNG streams alone
        torch.manual_seed(0)
        for start in range(0, n, batch_size):
            x = torch.from_numpy(data.float_images(start, start + batch_size)).to(device)
            out = model.infer(x)
            correct += (out.counts.cpu().numpy() == data.counts[start : start + batch_size]).sum()
            steps += out.counts.sum().item()
            elbo += model.loss(x)[1]["elbo"] * len(x)
    model.train(was_training)
    known = bool((data.counts >= 0).all())
    return {"count_acc": float(correct / n) if known else None, "elbo": elbo / n, "mean_count": steps / n}


def build_optimizer(model: AIR, cfg: TrainConfig) -> torch.optim.Optimizer:
    baseline = [p for n, p in model.named_parameters() if n.startswith("baseline.")]
    main = [p for n, p in model.named_parameters() if not n.startswith("baseline.")]
    return torch.optim.Adam([{"params": main, "lr": cfg.lr}, {"params": baseline, "lr": cfg.baseline_lr}])


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


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    data: tuple[Scenes, Scenes] | None = None,
) -> dict:
    """Train (or resume) a run; returns the final evaluation record.

    data: (training scenes, held-out scenes) to use instead of multi-MNIST built from `cfg` (e.g. Omniglot
    characters); images must be cfg's model canvas size, counts -1 where unknown. The caller must pass the same
    data again on resume.
    """
    out = Path(cfg.out_dir)
    ckpt_path = out / CHECKPOINT_NAME
    cfg, state = resume_state(cfg, TrainConfig, ("air", "dair"), resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    train_data, held_out = make_data(cfg) if data is None else data
    model = AIR(cfg.model_config()).to(cfg.device)
    opt = build_optimizer(model, cfg)
    step, train_time = 0, 0.0
    if state is None and cfg.init_from:
        start = load_checkpoint(cfg.init_from, expect_model=("air", "dair"))
        shape = ("canvas_size", "max_steps", "window_size", "z_what_dim", "embed_dim", "rnn_hidden")
        theirs = AIRConfig.from_dict(start["config"])
        if any(getattr(theirs, k) != getattr(model.config, k) for k in shape):
            raise ValueError(f"init_from {cfg.init_from}: its model differs in {shape}: {start['config']}")
        restore(model, start, cfg.init_from)
    if state is not None:
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        step, train_time = state["step"], state["train_time_s"]
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    budget_steps = cfg.steps if cfg.steps is not None else math.inf
    budget_s = cfg.minutes * 60 if cfg.minutes is not None else math.inf
    log = open(out / "metrics.jsonl", "a")

    def write(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()

    def checkpoint() -> None:
        save_atomic(
            {
                "model": cfg.model,
                "config": model.config.to_dict(),
                "state_dict": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "train_time_s": train_time,
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "train_config": asdict(cfg),
            },
            ckpt_path,
        )

    def run_eval() -> dict:
        rec = {
            "kind": "eval",
            "step": step,
            "train_time_s": round(train_time, 2),
            **evaluate(model, held_out, cfg.device),
        }
        write(rec)
        return rec

    from inverse_graphics.figures import attention_figure  # matplotlib only when training

    model.train()
    last_eval = last_ckpt = train_time
    bar = tqdm(
        total=None if budget_steps == math.inf else budget_steps,
        initial=step,
        disable=not progress,
        desc=f"train {cfg.model}",
        unit="step",
        dynamic_ncols=True,
    )
    rec = {}
    acc = {"elbo": 0.0, "count": 0.0, "n": 0}
    dream_counts = cfg.sleep_counts or tuple(range(cfg.max_steps + 1))  # the sleep phase's (if it is on)
    with StopFlag() as flag:
        while step < budget_steps and train_time < budget_s and not flag.stop:
            t0 = time.perf_counter()
            idx = batch_indices(cfg.seed, step, cfg.batch_size, len(train_data)).numpy()
            x = torch.from_numpy(train_data.images[idx].astype(np.float32) / 255.0).to(cfg.device)
            opt.param_groups[0]["lr"] = lr_at(cfg, step)
            loss, stats = model.loss(x, z_pres_prior_at(cfg, step))
            if cfg.sleep_weight and step >= cfg.sleep_start:
                loss = loss + cfg.sleep_weight * model.sleep_loss(cfg.batch_size, dream_counts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            train_time += time.perf_counter() - t0
            acc["elbo"] += stats["elbo"]
            acc["count"] += stats["count"]
            acc["n"] += 1
            bar.update(1)
            if step % cfg.log_every == 0:
                write(
                    {
                        "kind": "train",
                        "step": step,
                        "train_time_s": round(train_time, 2),
                        "elbo": acc["elbo"] / acc["n"],
                        "count": acc["count"] / acc["n"],
                    }
                )
                acc = {"elbo": 0.0, "count": 0.0, "n": 0}
            if train_time - last_eval >= cfg.eval_every_s:
                rec = run_eval()
                last_eval = train_time
                bar.set_postfix(acc=rec["count_acc"], elbo=f"{rec['elbo']:.0f}", count=f"{rec['mean_count']:.2f}")
            if train_time - last_ckpt >= cfg.checkpoint_every_s:
                checkpoint()
                last_ckpt = train_time
    bar.close()
    checkpoint()
    rec = run_eval()
    x = torch.from_numpy(held_out.float_images(0, 8)).to(cfg.device)
    attention_figure(
        x.cpu(), model.infer(x, reconstruct=True), out / "figures" / "attention.png", truth=held_out.counts[:8]
    )
    log.close()
    if flag.stop:
        print(f"stopped by signal at step {step}; checkpoint saved to {ckpt_path}")
    return rec
