"""Tiny training runs of every recipe, built the same way by the torchrun worker (tests/ddp_worker.py) and by the
single-process reference in tests/test_distributed.py, for the DDP equivalence test.

"The same scenes": the global batch of B rows is split in rank order, so ranks see exactly the reference's rows.
The models' own sampling (the guide's latents, the sleep phase's dreams) is made the same too: the guide takes
its means (sample=False), and dreams are slices, by rank, of one fixed pool of B dreams drawn with a fixed seed.
What is then left to differ is what the test is about: gradient averaging, the NVIL signal means, the split.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from inverse_graphics.distributed import Dist
from inverse_graphics.engine import Run
from inverse_graphics.tabletop.train_air3d import AIR3DTrainConfig, TrainingRun
from inverse_graphics.tabletop.train_supervised3d import SupervisedTrainConfig, _Run
from inverse_graphics.train import AIRRun, TrainConfig
from renderers.opengl import opengl_available

B = 4  # the global batch
SIZE = 32
BACKEND = "opengl" if opengl_available() is None else "pytorch3d"
TINY3D = {"channels": (8, 16), "embed_dim": 32, "rnn_hidden": 32, "baseline_channels": (8,), "baseline_hidden": 16}
CASES = ("air", "dair-sleep", "air-tabletop-elbo", "air-tabletop-elbo-soft", "air-tabletop-sleep",
         "supervised-tabletop")  # fmt: skip


class ToyScenes:
    """A few 50x50 multi-blob scenes: what AIR trains on here, without MNIST."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.counts = rng.integers(0, 3, n)
        self.images = np.zeros((n, 50, 50), dtype=np.uint8)
        for i, k in enumerate(self.counts):
            for _ in range(k):
                r, c = rng.integers(5, 40, 2)
                self.images[i, r : r + 8, c : c + 8] = 255

    def float_images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.images[start:stop].astype(np.float32) / 255.0

    def __len__(self) -> int:
        return len(self.counts)


def _pooled(draw, ctx: Dist):
    """A drop-in for model.dream / model.sample: rank r's n of one fixed pool of B draws (the reference: all B)."""

    def sample(n, *args):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            pool = draw(B, *args)
        lo = ctx.rank * n

        def cut(x):
            if isinstance(x, torch.Tensor):
                return x[lo : lo + n]
            return type(x)(**{f.name: cut(getattr(x, f.name)) for f in dataclasses.fields(x)})

        return cut(pool) if not isinstance(pool, tuple) else tuple(cut(x) for x in pool)

    return sample


def _means_only(model) -> None:
    guide = model.guide
    model.guide = lambda images, sample=True, **kw: guide(images, sample=False, **kw)


def build(case: str, ctx: Dist, out_dir: str) -> Run:
    """The run of `case` for this rank (ctx), its model's sampling made deterministic as the module says."""
    torch.manual_seed(0)  # as the engine does before building a run
    common = {"out_dir": out_dir, "minutes": None, "steps": 1, "batch_size": B, "eval_n": 4, "seed": 0}
    run: Run
    if case in ("air", "dair-sleep"):
        sleep = {"model": "dair", "sleep_weight": 1.0, "sleep_start": 0} if case == "dair-sleep" else {}
        cfg = TrainConfig(**common, n_train=16, max_steps=2, **sleep)
        run = AIRRun(cfg, None, ctx, data=(ToyScenes(16, 0), ToyScenes(4, 1)))
        run.model.dream = _pooled(run.model.dream, ctx)
    elif case.startswith("air-tabletop"):
        recipe = "sleep" if case.endswith("sleep") else "wake"
        gradient = "soft" if case.endswith("soft") else "fd"
        cfg3 = AIR3DTrainConfig(**common, n_train=8, recipe=recipe, gradient=gradient, image_size=SIZE,
                                backend=BACKEND, baseline_warmup=0, model_overrides=TINY3D)  # fmt: skip
        from scenes import tabletop

        scenes = tabletop.sample_scenes(8, seed=3, min_objects=1)
        images = (tabletop.render_scenes(scenes, image_size=SIZE) * 255).round().to(torch.uint8)
        run = TrainingRun(cfg3, None, ctx, images)
        run.model.sample = _pooled(run.model.sample, ctx)
    else:
        from inverse_graphics.tabletop.data3d import make_labelled_renders

        cfgs = SupervisedTrainConfig(**common, n_train=8, image_size=SIZE, backend=BACKEND,
                                     model_overrides={"channels": (8, 16), "embed_dim": 16})  # fmt: skip
        run = _Run(cfgs, None, ctx, make_labelled_renders(8, seed=3, image_size=SIZE, backend=BACKEND))
    if hasattr(run.model, "guide"):
        _means_only(run.model)
    return run


def one_step(case: str, ctx: Dist, out_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    """After one training step of `case` on this rank: "state", the parameters and buffers; "grad", the gradients
    the optimiser used (averaged over ranks)."""
    run = build(case, ctx, out_dir)
    run.train_step(run.train_data)
    state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in run.model.named_parameters() if p.grad is not None}
    return {"state": state, "grad": grads}
