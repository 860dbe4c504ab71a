"""Training 3D AIR (inverse_graphics/air3d.py) without labels: the ELBO on tabletop renders ("wake"), optionally
with the sleep phase on scenes drawn from the model's own prior (inverse_graphics/air3d_objective.py).

Recipes (`recipe`), to be recorded beside every number they produce:
- "wake": the ELBO only (the paper's recipe).
- "sleep": the sleep phase only (the guide learns from the generative model's own samples; no data images).
- "sleep-then-wake": `sleep_steps` steps of the sleep phase, then the ELBO.
- "wake-sleep": both losses summed at every step.
Labels are never used for training: the training renders' scenes are dropped; the held-out scenes are used only
by the evaluation (metrics3d, Hungarian matching).

The training renders are drawn once (OpenGL when EGL works: 20,000 at 64 px in about 5 s) and may be cached on
disk (`data_cache`). Batch order is a function of (seed, step), as in the 2D training, so `resume` continues a
run exactly. A run directory holds `config.json`, `checkpoint.pt` (atomic, every `checkpoint_every_s`, at the end
and on SIGINT / SIGTERM) and `metrics.jsonl` (one JSON record per log or evaluation).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from inverse_graphics.air3d import AIR3D, GRADIENTS, MODEL_KIND, AIR3DConfig
from inverse_graphics.air3d_objective import elbo_loss, sleep_loss
from inverse_graphics.checkpoint import CHECKPOINT_NAME, load_checkpoint, restore, resume_state, save_atomic
from inverse_graphics.data3d import LabelledRenders, held_out_renders, training_renders
from inverse_graphics.metrics3d import evaluate_method
from inverse_graphics.pretrained import load
from inverse_graphics.train import StopFlag, batch_indices

__all__ = [
    "RECIPES",
    "AIR3DTrainConfig",
    "TrainingRun",
    "train_air3d",
    "load_air3d",
    "evaluate_air3d",
    "training_images",
]

RECIPES = ("wake", "sleep", "sleep-then-wake", "wake-sleep")


@dataclass
class AIR3DTrainConfig:
    """Everything a run depends on; saved as config.json and inside every checkpoint."""

    out_dir: str = "runs/air-tabletop"  # run directory
    seed: int = 0  # seeds the training scenes, initialisation, batch order and every sample
    minutes: float | None = 40.0  # training wall-clock budget (evaluation excluded); None: use `steps`
    steps: int | None = None  # step budget; training stops at whichever budget ends first
    gradient: str = "fd"  # continuous latents: "fd" (finite differences, black box) or "soft" (autograd)
    # The defaults are the shipped model's recipe in one run (inverse_graphics/weights/README.md): sleep at lr 1e-3,
    # then 2e-4 (identity 90% -> 98% in 2 minutes), then the ELBO at 1e-4 after a baseline warm-up. The ELBO alone
    # from scratch ("wake", the paper's recipe) collapsed to empty scenes here (benchmarks/results/air3d_wake_only.md).
    recipe: str = "sleep-then-wake"  # one of RECIPES (module docstring)
    sleep_steps: int = 9600  # "sleep-then-wake": steps of the sleep phase before the ELBO (~30 min here)
    batch_size: int = 32  # training images per wake step (and prior scenes per sleep step)
    lr: float = 1e-3  # Adam, inference network
    lr_drop_step: int | None = 6400  # from this step the main rate is lr_drop_to (None: never)
    lr_drop_to: float = 2e-4
    wake_lr: float | None = 1e-4  # "sleep-then-wake": the main rate of the ELBO phase (None: keep the sleep's)
    baseline_lr: float = 1e-2  # Adam, NVIL baseline (10x the main rate, as the 2D training)
    image_size: int = 64  # H = W
    min_objects: int = 0  # object count range of training and held-out scenes
    max_objects: int = 3  # also the model's step count T
    n_train: int = 20_000  # training renders (drawn once; only their images are used)
    data_cache: str | None = None  # .pt file of the training renders: read if it matches this config, else written
    backend: str = "auto"  # renderer of data and black box: "auto" (OpenGL if EGL works), "opengl", "pytorch3d"
    eval_n: int = 200  # held-out scenes for periodic evaluation (data3d.held_out_renders)
    eval_refine: int = 0  # refinement steps during periodic evaluation (0: the raw amortised inference)
    eval_every_s: float = 120.0  # seconds of training between evaluations
    log_every: int = 20  # steps between training-statistics records
    checkpoint_every_s: float = 180.0  # seconds between checkpoints
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    model_overrides: dict = field(default_factory=dict)  # extra AIR3DConfig fields (e.g. likelihood_sd)
    baseline_warmup: int = 300  # first ELBO steps in which only the NVIL baseline learns: a guide trained by the sleep
    # phase meets an untrained baseline, and the first REINFORCE signals (ELBO ~ 1e4 nats, uncentred) would undo it
    init_from: str | None = None  # start from this checkpoint's weights (fresh optimiser and step count), e.g. a
    # sleep-phase run continued by the ELBO with another gradient path; its model config must match this run's

    def __post_init__(self) -> None:
        if self.gradient not in GRADIENTS or self.recipe not in RECIPES:
            raise ValueError(
                f"gradient must be in {GRADIENTS} and recipe in {RECIPES}; got {self.gradient!r}, {self.recipe!r}"
            )

    def model_config(self) -> AIR3DConfig:
        return AIR3DConfig(
            image_size=self.image_size, max_steps=self.max_objects, backend=self.backend, **self.model_overrides
        )

    def phases(self, step: int) -> tuple[bool, bool]:
        """(wake, sleep): which losses step `step` (0-based) trains on."""
        if self.recipe == "sleep-then-wake":
            return step >= self.sleep_steps, step < self.sleep_steps
        return self.recipe in ("wake", "wake-sleep"), self.recipe in ("sleep", "wake-sleep")

    @classmethod
    def from_dict(cls, d: dict) -> AIR3DTrainConfig:
        return cls(**d)


def training_images(cfg: AIR3DTrainConfig) -> torch.Tensor:
    """ByteTensor (n_train, 3, H, W): the training renders (labels dropped), from `data_cache` when it matches."""
    key = {k: getattr(cfg, k) for k in ("n_train", "seed", "image_size", "min_objects", "max_objects")}
    path = Path(cfg.data_cache) if cfg.data_cache else None
    if path is not None and path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            return cached["images"]
    counts = {"min_objects": cfg.min_objects, "max_objects": cfg.max_objects, "image_size": cfg.image_size}
    images = training_renders(cfg.n_train, cfg.seed, backend=cfg.backend, **counts).images
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"key": key, "images": images}, tmp)
        os.replace(tmp, path)  # atomic: a killed run leaves no half-written cache
    return images


@torch.no_grad()
def evaluate_air3d(model: AIR3D, data: LabelledRenders, refine: int = 0, gradient: str = "fd") -> dict:
    """metrics3d's summary (count, identity, position, yaw, images/s) of `model` on `data`, plus the mean
    one-sample ELBO of up to 64 of its images (under a forked RNG, so that training's stream is untouched)."""
    was_training = model.training
    model.eval()
    device = model.signal_mean.device
    images = data.images.float() / 255.0
    summary = evaluate_method(lambda x: model.infer(x.to(device), refine=refine).scenes, images, data.scenes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        summary["elbo"] = elbo_loss(model, images[:64].to(device), gradient)[1]["elbo"]
    model.train(was_training)
    return summary


def load_air3d(path: str | os.PathLike, device: str = "cpu") -> AIR3D:
    """A trained 3D AIR from a checkpoint, in eval mode; CheckpointError if the file is not one."""
    return load(path, device, expect_model=(MODEL_KIND,))


class TrainingRun:
    """The mutable state of one training run: model, optimiser, step, clock, log file."""

    def __init__(self, cfg: AIR3DTrainConfig, state: dict | None):
        self.cfg = cfg
        self.model = AIR3D(cfg.model_config()).to(cfg.device)
        baseline = [p for n, p in self.model.named_parameters() if n.startswith("baseline.")]
        main = [p for n, p in self.model.named_parameters() if not n.startswith("baseline.")]
        self.opt = torch.optim.Adam([{"params": main, "lr": cfg.lr}, {"params": baseline, "lr": cfg.baseline_lr}])
        self.step, self.train_time, self.images_seen = 0, 0.0, 0
        if state is None and cfg.init_from:
            start = load_checkpoint(cfg.init_from, expect_model=(MODEL_KIND,))
            if AIR3DConfig.from_dict(start["config"]) != self.model.config:
                raise ValueError(f"init_from {cfg.init_from} has another model config: {start['config']}")
            restore(self.model, start, cfg.init_from)
        if state is not None:
            self.model.load_state_dict(state["state_dict"])
            self.opt.load_state_dict(state["optimizer"])
            self.step, self.train_time, self.images_seen = state["step"], state["train_time_s"], state["images_seen"]
            torch.set_rng_state(state["rng"])
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        self.log = open(Path(cfg.out_dir) / "metrics.jsonl", "a")

    def write(self, record: dict) -> dict:
        base = {"step": self.step, "images_seen": self.images_seen, "recipe": self.cfg.recipe}
        record = {**base, "gradient": self.cfg.gradient, "train_time_s": round(self.train_time, 2), **record}
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        return record

    def checkpoint(self) -> None:
        save_atomic(
            {
                "model": MODEL_KIND,
                "config": self.model.config.to_dict(),
                "state_dict": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "step": self.step,
                "train_time_s": self.train_time,
                "images_seen": self.images_seen,
                "rng": torch.get_rng_state(),
                "train_config": asdict(self.cfg),
            },
            Path(self.cfg.out_dir) / CHECKPOINT_NAME,
        )

    def main_lr(self) -> float:
        """The inference network's learning rate at this step: a function of the step, so resuming keeps it."""
        cfg = self.cfg
        if cfg.recipe == "sleep-then-wake" and self.step >= cfg.sleep_steps and cfg.wake_lr is not None:
            return cfg.wake_lr
        if cfg.lr_drop_step is not None and self.step >= cfg.lr_drop_step:
            return cfg.lr_drop_to
        return cfg.lr

    def wake_step(self) -> int:
        """How many ELBO steps came before this one."""
        return self.step - self.cfg.sleep_steps if self.cfg.recipe == "sleep-then-wake" else self.step

    def train_step(self, images: torch.Tensor) -> dict:
        """One optimiser step on the losses of this step's phases; images: the ByteTensor training renders."""
        cfg, t0 = self.cfg, time.perf_counter()
        wake, sleep = cfg.phases(self.step)
        self.opt.param_groups[0]["lr"] = self.main_lr()
        loss, stats = torch.zeros((), device=cfg.device), dict[str, float]()
        if wake:
            x = images[batch_indices(cfg.seed, self.step, cfg.batch_size, len(images))].float() / 255.0
            wake_loss, wake_stats = elbo_loss(self.model, x.to(cfg.device), cfg.gradient)
            loss, stats = loss + wake_loss, {**stats, **wake_stats}
        if sleep:
            s_loss, s_stats = sleep_loss(self.model, cfg.batch_size)
            loss, stats = loss + s_loss, {**stats, **s_stats}
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if wake and not sleep and self.wake_step() < cfg.baseline_warmup:
            for name, p in self.model.named_parameters():
                if not name.startswith("baseline."):
                    p.grad = None  # Adam leaves parameters without a gradient untouched
        self.opt.step()
        self.step += 1
        self.images_seen += cfg.batch_size * (wake + sleep)
        self.train_time += time.perf_counter() - t0
        return stats


def train_air3d(cfg: AIR3DTrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a run; returns the final held-out evaluation record."""
    cfg, state = resume_state(cfg, AIR3DTrainConfig, (MODEL_KIND,), resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    images = training_images(cfg) if cfg.recipe != "sleep" else torch.empty(0, dtype=torch.uint8)
    counts = {"min_objects": cfg.min_objects, "max_objects": cfg.max_objects, "image_size": cfg.image_size}
    held_out = held_out_renders(cfg.eval_n, backend=cfg.backend, **counts)
    run = TrainingRun(cfg, state)
    _loop(run, images, held_out, progress)
    run.checkpoint()
    final = run.write({"kind": "eval", **evaluate_air3d(run.model, held_out, cfg.eval_refine, cfg.gradient)})
    run.log.close()
    return final


def _loop(run: TrainingRun, images: torch.Tensor, held_out: LabelledRenders, progress: bool) -> None:
    """Train until a budget runs out or a signal arrives; log, evaluate and checkpoint on the way."""
    cfg = run.cfg
    budget_steps = cfg.steps if cfg.steps is not None else math.inf
    budget_s = cfg.minutes * 60 if cfg.minutes is not None else math.inf
    last_eval = last_ckpt = run.train_time
    total = None if budget_steps == math.inf else budget_steps
    desc = f"train {MODEL_KIND} ({cfg.recipe}, {cfg.gradient})"
    with StopFlag() as flag, tqdm(total=total, initial=run.step, disable=not progress, desc=desc) as bar:
        while run.step < budget_steps and run.train_time < budget_s and not flag.stop:
            stats = run.train_step(images)
            bar.update(1)
            if run.step % cfg.log_every == 0:
                run.write({"kind": "train", **stats})
            if run.train_time - last_eval >= cfg.eval_every_s:
                rec = run.write({"kind": "eval", **evaluate_air3d(run.model, held_out, cfg.eval_refine, cfg.gradient)})
                bar.set_postfix(count=f"{rec['count_acc']:.3f}", pos_mm=rec["position_error_mm_median"])
                last_eval = run.train_time
            if run.train_time - last_ckpt >= cfg.checkpoint_every_s:
                run.checkpoint()
                last_ckpt = run.train_time
    if flag.stop:
        print(f"stopped by signal at step {run.step}; saving the checkpoint in {cfg.out_dir}")
