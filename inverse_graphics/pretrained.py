"""Loading models: `load(path)` for any checkpoint, `load_pretrained(name)` for the weights the package ships."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from inverse_graphics.air import AIR, AIRConfig
from inverse_graphics.checkpoint import CheckpointError, load_checkpoint

WEIGHTS = {
    # name: (file in inverse_graphics/weights, model kinds it may hold)
    "air-multi-mnist": ("air-multi-mnist.pt", ("air",)),
    "dair-multi-mnist": ("dair-multi-mnist.pt", ("dair",)),
}


def load(path: str | os.PathLike, device: str = "cpu", expect_model: tuple[str, ...] | None = None) -> AIR:
    """A model from a checkpoint written by `train` (or shipped), in eval mode on `device`.

    Raises CheckpointError for a missing, truncated or foreign file, or a model of another kind.
    """
    ckpt = load_checkpoint(path, expect_model=expect_model)
    if ckpt["model"] not in ("air", "dair"):
        raise CheckpointError(f"{path} holds a '{ckpt['model']}' model, which this release cannot load")
    model = AIR(AIRConfig.from_dict(ckpt["config"]))
    state = {k: v.float() if torch.is_floating_point(v) else v for k, v in ckpt["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("baseline.") and not k.startswith("signal_")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


def weights_path(name: str) -> Path:
    if name not in WEIGHTS:
        raise KeyError(f"no pretrained model named {name!r}; available: {', '.join(sorted(WEIGHTS))}")
    return Path(str(resources.files("inverse_graphics").joinpath("weights", WEIGHTS[name][0])))


def load_pretrained(name: str, device: str = "cpu") -> AIR:
    """The shipped weights `name` (e.g. "air-multi-mnist"), in eval mode."""
    path = weights_path(name)
    if not path.is_file():
        raise CheckpointError(f"pretrained weights {name!r} are not installed (expected {path})")
    return load(path, device=device, expect_model=WEIGHTS[name][1])


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, half: bool = True) -> Path:
    """Write a shippable copy of a training checkpoint: the model's weights (float16 by default: half the size,
    and `load` restores float32) and config, without the optimiser, the NVIL baseline or the RNG state."""
    from inverse_graphics.checkpoint import save_atomic

    ckpt = load_checkpoint(checkpoint)
    keep = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("baseline.")}
    if half:
        keep = {k: v.half() if torch.is_floating_point(v) else v for k, v in keep.items()}
    record = {k: ckpt[k] for k in ("model", "config")}
    record.update(
        state_dict=keep,
        step=ckpt.get("step"),
        train_time_s=ckpt.get("train_time_s"),
        train_config=ckpt.get("train_config"),
    )
    save_atomic(record, out)
    return Path(out)
