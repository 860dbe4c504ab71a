"""Training 3D AIR (tabletop/air3d.py) without labels: the ELBO on tabletop renders ("wake"), optionally
with the sleep phase on scenes drawn from the model's own prior (inverse_graphics/tabletop/air3d_objective.py).

Recipes (`recipe`), to be recorded beside every number they produce:
- "wake": the ELBO only (the paper's recipe).
- "sleep": the sleep phase only (the guide learns from the generative model's own samples; no data images).
- "sleep-then-wake": the sleep phase for the first `sleep_fraction` of the budget (or `sleep_steps` steps), then
  the ELBO.
The schedule (learning-rate drop, phase switch, the baseline's warm-up) is written in fractions of the run's budget
(its steps, or its minutes, whichever ends first), so `--minutes 60` on any world gets the same shape of training
as the 40-minute default; explicit step counts override it. A step budget makes the schedule a function of the step
(bit-exact resume); a time budget makes it a function of the training clock, the same on every rank (the engine
keeps one clock for all of them).
- "wake-sleep": both losses summed at every step.
Labels are never used for training: the training renders' scenes are dropped; the held-out scenes are used only
by the evaluation (metrics3d, Hungarian matching).

The training renders are drawn once (OpenGL when EGL works: 20,000 at 64 px in about 5 s) and may be cached on
disk (`data_cache`; an unreadable or mismatched cache is rebuilt, with a warning when unreadable). Batch order is
a function of (seed, step), as in the 2D training, so `resume` continues a run exactly. `TrainingRun` is this
recipe for the training engine (inverse_graphics/engine.py), which owns the run directory, budgets, evaluation,
checkpoints, resume and distribution.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from inverse_graphics import distributed
from inverse_graphics.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_file, restore, save_atomic
from inverse_graphics.distributed import Dist
from inverse_graphics.engine import Run, check_training_options, run_training
from inverse_graphics.pretrained import load
from inverse_graphics.tabletop import world3d
from inverse_graphics.tabletop.air3d import AIR3D, GRADIENTS, MODEL_KIND, AIR3DConfig
from inverse_graphics.tabletop.air3d_objective import elbo_loss, sleep_loss
from inverse_graphics.tabletop.data3d import LabelledRenders, run_held_out, training_renders
from inverse_graphics.tabletop.metrics3d import evaluate_method
from inverse_graphics.train import batch_indices

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
    # The default: the sleep phase for the whole budget, lr 1e-3 then 2e-4 from half of it (the shipped primitives
    # model's: identity 90% -> 98% in 2 minutes after the drop). Its ELBO phase ("sleep-then-wake", the fractions
    # below: 20, 10 and 10 of 40 minutes there) added 1% of count at 64 x 64, but on the kitchen world (128 x 96,
    # 6 objects) finite-difference ELBO steps took about 6 s and its last quarter lowered count from 65.5% to 48%
    # (benchmarks/results/kitchen_development.notes.md). The ELBO alone from scratch ("wake", the paper's recipe)
    # collapsed to empty scenes (benchmarks/results/air3d_wake_only.md).
    recipe: str = "sleep"  # one of RECIPES (module docstring)
    sleep_fraction: float = 0.75  # "sleep-then-wake": the sleep phase's share of the budget
    sleep_steps: int | None = None  # "sleep-then-wake": steps of the sleep phase instead (overrides the fraction)
    batch_size: int = 32  # training images per wake step (and prior scenes per sleep step)
    lr: float = 1e-3  # Adam, inference network
    lr_drop_fraction: float | None = 0.5  # from this share of the budget the main rate is lr_drop_to (None: never)
    lr_drop_step: int | None = None  # from this step instead (overrides the fraction)
    lr_drop_to: float = 2e-4
    wake_lr: float | None = 1e-4  # "sleep-then-wake": the main rate of the ELBO phase (None: keep the sleep's)
    baseline_lr: float = 1e-2  # Adam, NVIL baseline (10x the main rate, as the 2D training)
    # The World of the scenes (a built-in name or a world file, scenes/world.py): objects, camera, image size, count
    # range and, for the training renders, its appearance randomisation. None: the primitives of the three below.
    world: str | None = None
    image_size: int = 64  # H = W (without a world)
    min_objects: int = 0  # object count range of training and held-out scenes (without a world)
    max_objects: int = 3  # also the model's step count T (without a world)
    n_train: int = 20_000  # training renders (drawn once; only their images are used)
    data_cache: str | None = None  # cache file of the training renders (checkpoint format): read if it matches
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
    # phase meets an untrained baseline, and the first REINFORCE signals (ELBO ~ 1e4 nats, uncentred) would undo it.
    # With a budget-fraction schedule, at most the first third of the ELBO phase (where its steps are slow).
    init_from: str | None = None  # start from this checkpoint's weights (fresh optimiser and step count), e.g. a
    # sleep-phase run continued by the ELBO with another gradient path; its model config must match this run's

    def __post_init__(self) -> None:
        check_training_options(self)
        fractions = {"sleep_fraction": self.sleep_fraction, "lr_drop_fraction": self.lr_drop_fraction}
        bad = [f"{k} = {v!r}" for k, v in fractions.items() if v is not None and not 0.0 <= v <= 1.0]
        if bad:
            raise ValueError(f"{', '.join(bad)}: a share of the budget must be in [0, 1]")
        if self.gradient not in GRADIENTS or self.recipe not in RECIPES:
            raise ValueError(
                f"gradient must be in {GRADIENTS} and recipe in {RECIPES}; got {self.gradient!r}, {self.recipe!r}"
            )

    def model_config(self) -> AIR3DConfig:
        if self.world is not None:  # the model's sizes and count come from its world, which its config carries
            world = world3d.run_world(self.world).to_dict()
            sizes = {"image_size": None, "max_steps": None}
            return AIR3DConfig(world=world, backend=self.backend, **sizes, **self.model_overrides)  # type: ignore[arg-type]
        return AIR3DConfig(
            image_size=self.image_size, max_steps=self.max_objects, backend=self.backend, **self.model_overrides
        )

    @classmethod
    def from_dict(cls, d: dict) -> AIR3DTrainConfig:
        return cls(**d)


def _read_cache(path: Path) -> dict | None:
    """A data cache's contents, or None (with a warning: it will be rebuilt) when the file is not a usable one."""
    try:
        cached = read_checkpoint_file(path)  # the checkpoint format: tensors and plain data, no code
    except CheckpointError as err:
        warnings.warn(f"data cache {path} is unreadable ({err}); rebuilding it", stacklevel=3)
        return None
    images = cached.get("images") if isinstance(cached, dict) else None
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4):
        warnings.warn(f"data cache {path} does not hold training renders; rebuilding it", stacklevel=3)
        return None
    return cached


def training_images(cfg: AIR3DTrainConfig) -> torch.Tensor:
    """ByteTensor (n_train, 3, H, W): the training renders (labels dropped), from `data_cache` when it matches. With
    a world that randomises its appearance, each render is drawn under its own random appearance."""
    key = {k: getattr(cfg, k) for k in ("n_train", "seed", "image_size", "min_objects", "max_objects")}
    key["world"] = world3d.world_digest(cfg)
    path = Path(cfg.data_cache) if cfg.data_cache else None
    if path is not None and path.is_file():
        cached = _read_cache(path)
        if cached is not None and cached.get("key") == key:
            return cached["images"]
    options = world3d.scene_options(cfg)
    randomize = world3d.randomizes(cfg)
    images = training_renders(cfg.n_train, cfg.seed, backend=cfg.backend, randomize=randomize, **options).images
    if path is not None:
        save_atomic({"key": key, "images": images}, path)  # atomic: a killed run leaves no half-written cache
    return images


@torch.no_grad()
def evaluate_air3d(model: AIR3D, data: LabelledRenders, refine: int = 0, gradient: str = "fd") -> dict:
    """metrics3d's summary (count, identity, position, yaw, images/s) of `model` on `data`, plus the mean
    one-sample ELBO of up to 64 of its images (under a forked RNG, so that training's stream is untouched)."""
    was_training = model.training
    model.eval()
    device = model.signal_mean.device
    images = data.images.float() / 255.0
    predict = lambda x: model.infer(x.to(device), refine=refine).scenes  # noqa: E731
    summary = evaluate_method(predict, images, data.scenes, world=None if model.legacy else model.world)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        summary["elbo"] = elbo_loss(model, images[:64].to(device), gradient)[1]["elbo"]
    model.train(was_training)
    return summary


def load_air3d(path: str | os.PathLike, device: str = "cpu") -> AIR3D:
    """A trained 3D AIR from a checkpoint, in eval mode; CheckpointError if the file is not one."""
    return load(path, device, expect_model=(MODEL_KIND,))


def _air3d_loss(model: AIR3D, x: torch.Tensor | None, n_sleep: int, gradient: str, device: str):
    """This step's losses: the ELBO on images x (b, 3, H, W) when given, the sleep loss on n_sleep prior scenes."""
    loss, stats = torch.zeros((), device=device), dict[str, float]()
    if x is not None:
        wake_loss, wake_stats = elbo_loss(model, x, gradient)
        loss, stats = loss + wake_loss, {**stats, **wake_stats}
    if n_sleep:
        s_loss, s_stats = sleep_loss(model, n_sleep)
        loss, stats = loss + s_loss, {**stats, **s_stats}
    return loss, stats


class TrainingRun(Run):
    """The air-tabletop recipe: model, optimiser and step (ELBO, sleep phase or both, by the recipe's schedule)."""

    unused_parameters = True  # a sleep step leaves the NVIL baseline without a gradient
    model: AIR3D

    def __init__(
        self,
        cfg: AIR3DTrainConfig,
        state: dict | None,
        ctx: Dist | None = None,
        images: torch.Tensor | None = None,
    ):
        self.cfg = cfg
        self.model = AIR3D(cfg.model_config()).to(cfg.device)
        baseline = [p for n, p in self.model.named_parameters() if n.startswith("baseline.")]
        main = [p for n, p in self.model.named_parameters() if not n.startswith("baseline.")]
        self.opt = torch.optim.Adam([{"params": main, "lr": cfg.lr}, {"params": baseline, "lr": cfg.baseline_lr}])
        if state is None and cfg.init_from:
            start = load_checkpoint(cfg.init_from, expect_model=(MODEL_KIND,))
            if AIR3DConfig.from_dict(start["config"]) != self.model.config:
                raise ValueError(f"init_from {cfg.init_from} has another model config: {start['config']}")
            restore(self.model, start, cfg.init_from)
        self.train_data = images  # ByteTensor (n_train, 3, H, W), the training renders
        self.desc = f"train {MODEL_KIND} ({cfg.recipe}, {cfg.gradient})"
        self._start(state, ctx)

    @property
    def images_seen(self) -> int:
        return self.scenes  # wake images and sleep scenes

    def load_extra(self, state: dict) -> None:
        self.scenes = state.get("scenes", state.get("images_seen", 0))
        self.wake_start = state.get("wake_start")

    wake_start: int | None = None  # "sleep-then-wake": the step of the first ELBO step, once there was one

    def progress(self) -> float:
        """The share of the budget used so far: of its steps or its minutes, whichever is further."""
        cfg, parts = self.cfg, [0.0]
        if cfg.steps is not None:
            parts.append(self.step / max(cfg.steps, 1))
        if cfg.minutes is not None:
            parts.append(self.train_time / (cfg.minutes * 60))
        return max(parts)

    def phases(self) -> tuple[bool, bool]:
        """(wake, sleep): which losses this step trains on."""
        cfg = self.cfg
        if cfg.recipe == "sleep-then-wake":
            if self.wake_start is not None:  # the switch happens once
                return True, False
            sleeping = (
                self.step < cfg.sleep_steps if cfg.sleep_steps is not None else self.progress() < cfg.sleep_fraction
            )
            return not sleeping, sleeping
        return cfg.recipe in ("wake", "wake-sleep"), cfg.recipe in ("sleep", "wake-sleep")

    def main_lr(self, wake_only: bool) -> float:
        """The inference network's learning rate at this step (wake_only: an ELBO step of sleep-then-wake)."""
        cfg = self.cfg
        if wake_only and cfg.recipe == "sleep-then-wake" and cfg.wake_lr is not None:
            return cfg.wake_lr
        if cfg.lr_drop_step is not None:
            dropped = self.step >= cfg.lr_drop_step
        else:
            dropped = cfg.lr_drop_fraction is not None and self.progress() >= cfg.lr_drop_fraction
        return cfg.lr_drop_to if dropped else cfg.lr

    def warming_up(self) -> bool:
        """Whether this ELBO step trains only the baseline: the first `baseline_warmup` ELBO steps, and with a
        budget-fraction schedule at most the first third of the ELBO phase."""
        cfg = self.cfg
        start = self.wake_start if cfg.recipe == "sleep-then-wake" else 0
        if start is None or self.step - start >= cfg.baseline_warmup:
            return False
        if cfg.recipe == "sleep-then-wake" and cfg.sleep_steps is None:
            return self.progress() < cfg.sleep_fraction + (1.0 - cfg.sleep_fraction) / 3
        return True

    def _baseline_only(self) -> None:
        for name, p in self.model.named_parameters():
            if not name.startswith("baseline."):
                p.grad = None  # Adam leaves parameters without a gradient untouched

    def train_step(self, images: torch.Tensor) -> dict:
        """One optimiser step on the losses of this step's phases; images: the ByteTensor training renders."""
        cfg = self.cfg
        wake, sleep = self.phases()
        if wake and not sleep and self.wake_start is None and cfg.recipe == "sleep-then-wake":
            self.wake_start = self.step
        self.opt.param_groups[0]["lr"] = self.main_lr(wake and not sleep)
        x = None
        if wake:
            rows = self.local_rows(batch_indices(cfg.seed, self.step, cfg.batch_size, len(images)))
            x = (images[rows].float() / 255.0).to(cfg.device)
        warm_up = wake and not sleep and self.warming_up()
        args = (x, self.local_batch if sleep else 0, cfg.gradient, cfg.device)
        scenes = cfg.batch_size * (wake + sleep)
        return self.optimise(_air3d_loss, *args, scenes=scenes, before_step=self._baseline_only if warm_up else None)

    @cached_property
    def held_out(self) -> LabelledRenders:
        return run_held_out(self.cfg)  # rendered when first evaluated, on the one rank that evaluates

    def evaluate(self) -> dict:
        return evaluate_air3d(self.model, self.held_out, self.cfg.eval_refine, self.cfg.gradient)

    def payload(self) -> dict:
        config = self.model.config.to_dict()
        return {"model": MODEL_KIND, "config": config, "train_config": asdict(self.cfg), "images_seen": self.scenes,
                "wake_start": self.wake_start}  # fmt: skip

    def record_fields(self) -> dict:
        return {"images_seen": self.scenes, "recipe": self.cfg.recipe, "gradient": self.cfg.gradient}

    def postfix(self, rec: dict) -> dict:
        return {"count": f"{rec['count_acc']:.3f}", "pos_mm": rec["position_error_mm_median"]}


def shared_training_images(cfg: AIR3DTrainConfig, ctx: Dist) -> torch.Tensor:
    """`training_images` on every rank; with a data cache, rank 0 reads or writes it first and the others then read
    it (so that ranks never write one file at once)."""
    if cfg.recipe == "sleep":
        return torch.empty(0, dtype=torch.uint8)
    if not (cfg.data_cache and ctx.active):
        return training_images(cfg)
    images = training_images(cfg) if ctx.is_main else None
    distributed.barrier()
    return images if images is not None else training_images(cfg)


def train_air3d(cfg: AIR3DTrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Train (or resume) a run; returns the final held-out evaluation record. resume / overwrite: what to do with a
    run already in cfg.out_dir (inverse_graphics.rundir). Under torchrun, cfg.batch_size is the global batch."""

    def make_run(c: AIR3DTrainConfig, state: dict | None, ctx: Dist) -> TrainingRun:
        return TrainingRun(c, state, ctx, shared_training_images(c, ctx))

    return run_training(cfg, AIR3DTrainConfig, (MODEL_KIND,), make_run, resume, progress, overwrite)
