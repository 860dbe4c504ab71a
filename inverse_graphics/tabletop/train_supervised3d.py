"""Training the supervised tabletop regressor (inverse_graphics/tabletop/supervised3d.py) on labelled renders.

The training set is rendered once, before the first step, and held in memory as uint8 (20,000 renders at 64 px
are 250 MB; with OpenGL about 5 s to draw, with PyTorch3D's CPU rasterizer about 2 minutes). Batch order is a
function of (seed, step), as in the 2D training, so `resume` continues the same run exactly.

`_Run` is this recipe for the training engine (inverse_graphics/engine.py), which owns the run directory
(config.json, the checkpoint, metrics.jsonl: `images_seen` counts training images, the budget to compare with
AIR's), budgets, evaluation, checkpoints, resume and distribution.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch

from inverse_graphics.distributed import Dist
from inverse_graphics.engine import Run, check_training_options, run_training
from inverse_graphics.pretrained import load
from inverse_graphics.tabletop import world3d
from inverse_graphics.tabletop.data3d import LabelledRenders, run_held_out, training_renders
from inverse_graphics.tabletop.metrics3d import evaluate_method
from inverse_graphics.tabletop.supervised3d import (
    MODEL_KIND,
    LossWeights,
    SupervisedConfig,
    SupervisedRegressor,
    matched_loss,
)
from inverse_graphics.train import batch_indices
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
    # The World of the scenes (a built-in name or a world file, scenes/world.py): objects, camera, image size, count
    # range and, for the training renders, its appearance randomisation. None: the primitives of the three below.
    world: str | None = None
    min_objects: int = 0  # object count range of training and held-out scenes (without a world)
    max_objects: int = 3  # also the regressor's slot count K (without a world)
    image_size: int = 64  # H = W (without a world)
    backend: str = "auto"  # renderer for the data: "auto" (OpenGL if EGL works), "opengl" or "pytorch3d"
    eval_n: int = 500  # held-out scenes for periodic evaluation (data3d.held_out_renders)
    eval_every_s: float = 60.0  # seconds of training between evaluations
    log_every: int = 50  # steps between training-statistics records
    checkpoint_every_s: float = 60.0  # seconds between checkpoints
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    loss: LossWeights = field(default_factory=LossWeights)  # loss weights and position scale
    model_overrides: dict = field(default_factory=dict)  # extra SupervisedConfig fields (e.g. symmetric_yaw)

    def __post_init__(self) -> None:
        check_training_options(self)

    def model_config(self) -> SupervisedConfig:
        if self.world is not None:  # sizes and slots from the world, which the model's config carries
            world = world3d.run_world(self.world).to_dict()
            return SupervisedConfig(world=world, image_size=None, slots=None, **self.model_overrides)
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
    predict = lambda x: model.infer(x.to(device), refine=refine).scenes  # noqa: E731
    summary = evaluate_method(predict, images, data.scenes, world=None if model.legacy else model.world)
    model.train(was_training)
    return summary


def load_supervised(path: str | os.PathLike, device: str = "cpu") -> SupervisedRegressor:
    """A trained regressor from a checkpoint, in eval mode; CheckpointError if the file is not one."""
    return load(path, device, expect_model=(MODEL_KIND,))


def _supervised_loss(model: SupervisedRegressor, images: torch.Tensor, labels: SceneTensors, weights: LossWeights):
    return matched_loss(model(images), labels, model.yaw_order, weights)


class _Run(Run):
    """The supervised-tabletop recipe: labelled renders, the Hungarian-matched loss."""

    model: SupervisedRegressor

    def __init__(self, cfg: SupervisedTrainConfig, state: dict | None, ctx: Dist | None = None, data=None):
        self.cfg = cfg
        self.model = SupervisedRegressor(cfg.model_config()).to(cfg.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.train_data: LabelledRenders | None = data
        self.desc = "train supervised-tabletop"
        self._start(state, ctx)

    def train_step(self, data: LabelledRenders) -> dict:
        cfg = self.cfg
        rows = self.local_rows(batch_indices(cfg.seed, self.step, cfg.batch_size, len(data)))
        images, labels = data.batch(rows)
        device_labels = SceneTensors(*(x.to(cfg.device) for x in (labels.shape_ids, labels.positions, labels.yaws)))
        return self.optimise(_supervised_loss, images.to(cfg.device), device_labels, cfg.loss, scenes=cfg.batch_size)

    @cached_property
    def held_out(self) -> LabelledRenders:
        return run_held_out(self.cfg)  # rendered when first evaluated, on the one rank that evaluates

    def evaluate(self) -> dict:
        return evaluate_supervised(self.model, self.held_out)

    def payload(self) -> dict:
        return {"model": MODEL_KIND, "config": self.model.config.to_dict(), "train_config": asdict(self.cfg)}

    def record_fields(self) -> dict:
        return {"images_seen": self.scenes}

    def postfix(self, rec: dict) -> dict:
        return {"count": f"{rec['count_acc']:.3f}", "pos_mm": rec["position_error_mm_median"]}


def train_supervised(
    cfg: SupervisedTrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False
) -> dict:
    """Train (or resume) a run; returns the final held-out evaluation record. resume / overwrite: what to do with a
    run already in cfg.out_dir (inverse_graphics.rundir). Under torchrun, cfg.batch_size is the global batch."""

    def make_run(c: SupervisedTrainConfig, state: dict | None, ctx: Dist) -> _Run:
        options = world3d.scene_options(c)
        randomize = world3d.randomizes(c)
        data = training_renders(c.n_train, c.seed, backend=c.backend, randomize=randomize, **options)
        return _Run(c, state, ctx, data)

    return run_training(cfg, SupervisedTrainConfig, (MODEL_KIND,), make_run, resume, progress, overwrite)
