"""Fixed inputs for the shipped models and their outputs as plain JSON, so that a change of the weights' file
format can be checked to leave every output unchanged (tests/golden/shipped_outputs.json was computed from the
float16 pickle files that the safetensors files replaced; air-tabletop's entry from the safetensors file of the
model retrained with appearance randomisation, when it replaced the first one on 2026-12-04)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scenes import mnist, multi_mnist

GOLDEN = Path(__file__).parent / "golden"


def model_inputs(name: str) -> torch.Tensor:
    """16 multi-MNIST scenes of the bundled sample digits, or 4 tabletop images made from the golden render."""
    if name.endswith("multi-mnist"):
        data = multi_mnist.generate(mnist.load_sample(), 16, np.random.default_rng(4242), overlap="reject")
        return torch.from_numpy(data.float_images(0, 16))
    with Image.open(GOLDEN / "tabletop_scene_64.png") as im:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    return torch.stack([x, x.flip(-1), x.flip(-2), x.transpose(-1, -2)])


def outputs(model, x: torch.Tensor) -> dict:
    with torch.no_grad():
        if name_is_2d(model):
            out = model.infer(x)
            return {"counts": out.counts.tolist(), "z_where": out.z_where.tolist(), "pres_prob": out.pres_prob.tolist()}
        out = model.infer(x, refine=0)
        return {"scenes": out.scenes, "presence": [[float(p) for p in row] for row in out.presence]}


def name_is_2d(model) -> bool:
    from inverse_graphics.air import AIR

    return isinstance(model, AIR)
