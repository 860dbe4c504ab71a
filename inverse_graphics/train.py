"""Training for the 2D models: `inverse-graphics train air|dair`.

A run directory holds `config.json`, `checkpoint.safetensors` (written atomically every `checkpoint_every_s` and at the
end, and on SIGINT/SIGTERM), `metrics.jsonl` (one JSON record per log or evaluation) and `figures/`. `--resume`
continues exactly: batch order is a function of (seed, step), and the RNG state, optimiser and step are restored,
while evaluation runs under a forked RNG so that its timing does not change training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from inverse_graphics.air import AIR, AIRConfig
from inverse_graphics.checkpoint import load_checkpoint, restore
from inverse_graphics.distributed import Dist
from inverse_graphics.engine import Run, StopFlag, check_training_options, run_training
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

    def __post_init__(self) -> None:
        check_training_options(self)

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


__all__ = ["TrainConfig", "AIRRun", "StopFlag", "train", "evaluate", "batch_indices", "lr_at", "z_pres_prior_at"]


def _init_from(model: AIR, path: str) -> None:
    """Load the weights of checkpoint `path` into `model`; ValueError if its model has another shape."""
    start = load_checkpoint(path, expect_model=("air", "dair"))
    shape = ("canvas_size", "max_steps", "window_size", "z_what_dim", "embed_dim", "rnn_hidden")
    theirs = AIRConfig.from_dict(start["config"])
    if any(getattr(theirs, k) != getattr(model.config, k) for k in shape):
        raise ValueError(f"init_from {path}: its model differs in {shape}: {start['config']}")
    restore(model, start, path)


def _air_loss(model: AIR, x, rho: float, sleep_weight: float, dreams: int, counts: tuple[int, ...]):
    """AIR's training loss on images x (b, H, W) (+ the sleep phase's on `dreams` dreamt scenes when weighted)."""
    loss, stats = model.loss(x, rho)
    if sleep_weight:
        loss = loss + sleep_weight * model.sleep_loss(dreams, counts)
    return loss, {"elbo": stats["elbo"], "count": stats["count"]}


class AIRRun(Run):
    """The air / dair recipe: multi-MNIST (or any `Scenes`) batches, the AIR loss, optionally the sleep phase."""

    model: AIR
    train_data: Scenes
    held_out: Scenes

    def __init__(self, cfg: TrainConfig, state: dict | None, ctx: Dist | None = None, data=None):
        self.cfg = cfg
        self.train_data, self.held_out = make_data(cfg) if data is None else data
        self.model = AIR(cfg.model_config()).to(cfg.device)
        self.opt = build_optimizer(self.model, cfg)
        if state is None and cfg.init_from:
            _init_from(self.model, cfg.init_from)
        self.dream_counts = cfg.sleep_counts or tuple(range(cfg.max_steps + 1))  # the sleep phase's (if it is on)
        self.desc = f"train {cfg.model}"
        self._start(state, ctx)

    def train_step(self, data: Scenes) -> dict:
        cfg = self.cfg
        idx = self.local_rows(batch_indices(cfg.seed, self.step, cfg.batch_size, len(data))).numpy()
        x = torch.from_numpy(data.images[idx].astype(np.float32) / 255.0).to(cfg.device)
        self.opt.param_groups[0]["lr"] = lr_at(cfg, self.step)
        sleep = cfg.sleep_weight if cfg.sleep_weight and self.step >= cfg.sleep_start else 0.0
        args = (x, z_pres_prior_at(cfg, self.step), sleep, self.local_batch, self.dream_counts)
        return self.optimise(_air_loss, *args, scenes=cfg.batch_size * (2 if sleep else 1))

    def evaluate(self) -> dict:
        return evaluate(self.model, self.held_out, self.cfg.device)

    def payload(self) -> dict:
        return {"model": self.cfg.model, "config": self.model.config.to_dict(), "train_config": asdict(self.cfg)}

    def postfix(self, rec: dict) -> dict:
        return {"acc": rec["count_acc"], "elbo": f"{rec['elbo']:.0f}", "count": f"{rec['mean_count']:.2f}"}

    def figures(self, out: Path) -> None:
        from inverse_graphics.figures import attention_figure  # matplotlib only when training

        x = torch.from_numpy(self.held_out.float_images(0, 8)).to(self.cfg.device)
        result = self.model.infer(x, reconstruct=True)
        attention_figure(x.cpu(), result, out / "attention.png", truth=self.held_out.counts[:8])


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    data: tuple[Scenes, Scenes] | None = None,
    overwrite: bool = False,
) -> dict:
    """Train (or resume) a run; returns the final evaluation record.

    data: (training scenes, held-out scenes) to use instead of multi-MNIST built from `cfg` (e.g. Omniglot
    characters); images must be cfg's model canvas size, counts -1 where unknown. The caller must pass the same
    data again on resume. resume / overwrite: what to do with a run already in cfg.out_dir (inverse_graphics.rundir).
    Under torchrun, cfg.batch_size is the global batch.
    """

    def make_run(c: TrainConfig, state: dict | None, ctx: Dist) -> AIRRun:
        return AIRRun(c, state, ctx, data)

    return run_training(cfg, TrainConfig, ("air", "dair"), make_run, resume, progress, overwrite)
