"""Training the supervised tabletop regressor (inverse_graphics/supervised3d.py) on labelled renders.

The training set is rendered once, before the first step, and held in memory as uint8 (20,000 renders at 64 px
are 250 MB; with OpenGL about 5 s to draw, with PyTorch3D's CPU rasterizer about 2 minutes). Batch order is a
function of (seed, step), as in the 2D training, so `resume` continues the same run exactly.

A run directory holds `config.json`, `checkpoint.pt` (written atomically every `checkpoint_every_s`, at the
end and on SIGINT / SIGTERM) and `metrics.jsonl` (one JSON record per log or evaluation; `images_seen` counts
training images, the budget to compare with AIR's).
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

from inverse_graphics.checkpoint import CHECKPOINT_NAME, resume_state, save_atomic
from inverse_graphics.data3d import LabelledRenders, held_out_renders, training_renders
from inverse_graphics.metrics3d import evaluate_method
from inverse_graphics.pretrained import load
from inverse_graphics.supervised3d import MODEL_KIND, LossWeights, SupervisedConfig, SupervisedRegressor, matched_loss
from inverse_graphics.train import StopFlag, batch_indices
from scenes.tabletop import SceneTensors

__all__ = ["SupervisedTrainConfig", "train_supervised", "load_supervised", "evaluate_supervised"]


@dataclass
class SupervisedTrainConfig:
    """Everything a run depends on; saved as config.json and inside every checkpoint."""

    out_dir: str = "runs/supervised-tabletop"  # run directory
    seed: int = 0  # seeds the training scenes, initialisation and batch order
    minutes: float | None = 10.0  # training wall-clock budget (evaluation excluded); None: use `steps`
    steps: int | None = None  # step budget; training stops at whichever budget ends first
    batch_size: int = 64
    lr: float = 1e-3  # Adam
    n_train: int = 20_000  # labelled training renders (rendered once, before training)
    min_objects: int = 0  # object count range of training and held-out scenes
    max_objects: int = 3  # also the regressor's slot count K
    image_size: int = 64  # H = W
    backend: str = "auto"  # renderer for the data: "auto" (OpenGL if EGL works), "opengl" or "pytorch3d"
    eval_n: int = 500  # held-out scenes for periodic evaluation (data3d.held_out_renders)
    eval_every_s: float = 60.0  # seconds of training between evaluations
    log_every: int = 50  # steps between training-statistics records
    checkpoint_every_s: float = 60.0  # seconds between checkpoints
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    loss: LossWeights = field(default_factory=LossWeights)  # loss weights and position scale
    model_overrides: dict = field(default_factory=dict)  # extra SupervisedConfig fields (e.g. symmetric_yaw)

    def model_config(self) -> SupervisedConfig:
        return SupervisedConfig(image_size=self.image_size, slots=self.max_objects, **self.model_overrides)

    @classmethod
    def from_dict(cls, d: dict) -> SupervisedTrainConfig:
        return cls(**{**d, "loss": LossWeights(**d.get("loss", {}))})


@torch.no_grad()
def evaluate_supervised(model: SupervisedRegressor, data: LabelledRenders, refine: int = 0) -> dict:
    """metrics3d's summary (count, identity, position, yaw, images/s) of `model` on `data`."""
    was_training = model.training
    model.eval()
    images = data.images.float() / 255.0
    device = next(model.parameters()).device
    summary = evaluate_method(lambda x: model.infer(x.to(device), refine=refine).scenes, images, data.scenes)
    model.train(was_training)
    return summary


def load_supervised(path: str | os.PathLike, device: str = "cpu") -> SupervisedRegressor:
    """A trained regressor from a checkpoint, in eval mode; CheckpointError if the file is not one."""
    return load(path, device, expect_model=(MODEL_KIND,))


class _Run:
    """The mutable state of one training run: model, optimiser, step, clock, log file."""

    def __init__(self, cfg: SupervisedTrainConfig, state: dict | None):
        self.cfg = cfg
        self.model = SupervisedRegressor(cfg.model_config()).to(cfg.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.step, self.train_time = 0, 0.0
        if state is not None:
            self.model.load_state_dict(state["state_dict"])
            self.opt.load_state_dict(state["optimizer"])
            self.step, self.train_time = state["step"], state["train_time_s"]
            torch.set_rng_state(state["rng"])
        self.log = open(Path(cfg.out_dir) / "metrics.jsonl", "a")

    def write(self, record: dict) -> dict:
        record = {"step": self.step, "images_seen": self.step * self.cfg.batch_size, **record}
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
                "rng": torch.get_rng_state(),
                "train_config": asdict(self.cfg),
            },
            Path(self.cfg.out_dir) / CHECKPOINT_NAME,
        )

    def train_step(self, data: LabelledRenders) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        images, labels = data.batch(batch_indices(cfg.seed, self.step, cfg.batch_size, len(data)))
        device_labels = SceneTensors(*(x.to(cfg.device) for x in (labels.shape_ids, labels.positions, labels.yaws)))
        out = self.model(images.to(cfg.device))
        loss, stats = matched_loss(out, device_labels, self.model.yaw_order, cfg.loss)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        self.train_time += time.perf_counter() - t0
        return stats


def train_supervised(cfg: SupervisedTrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a run; returns the final held-out evaluation record."""
    cfg, state = resume_state(cfg, SupervisedTrainConfig, (MODEL_KIND,), resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    counts = {"min_objects": cfg.min_objects, "max_objects": cfg.max_objects, "image_size": cfg.image_size}
    data = training_renders(cfg.n_train, cfg.seed, backend=cfg.backend, **counts)
    held_out = held_out_renders(cfg.eval_n, backend=cfg.backend, **counts)
    run = _Run(cfg, state)
    budget_steps = cfg.steps if cfg.steps is not None else math.inf
    budget_s = cfg.minutes * 60 if cfg.minutes is not None else math.inf
    last_eval = last_ckpt = run.train_time
    total = None if budget_steps == math.inf else budget_steps
    desc = "train supervised-tabletop"
    with StopFlag() as flag, tqdm(total=total, initial=run.step, disable=not progress, desc=desc) as bar:
        while run.step < budget_steps and run.train_time < budget_s and not flag.stop:
            stats = run.train_step(data)
            bar.update(1)
            if run.step % cfg.log_every == 0:
                run.write({"kind": "train", "train_time_s": round(run.train_time, 2), **stats})
            if run.train_time - last_eval >= cfg.eval_every_s:
                record = {"kind": "eval", "train_time_s": round(run.train_time, 2)}
                rec = run.write({**record, **evaluate_supervised(run.model, held_out)})
                bar.set_postfix(count=f"{rec['count_acc']:.3f}", pos_mm=rec["position_error_mm_median"])
                last_eval = run.train_time
            if run.train_time - last_ckpt >= cfg.checkpoint_every_s:
                run.checkpoint()
                last_ckpt = run.train_time
    if flag.stop:
        print(f"stopped by signal at step {run.step}; saving the checkpoint in {cfg.out_dir}")
    run.checkpoint()
    final = run.write(
        {"kind": "eval", "train_time_s": round(run.train_time, 2), **evaluate_supervised(run.model, held_out)}
    )
    run.log.close()
    return final
