"""Loading models: `load(path)` for any checkpoint, `load_pretrained(name)` for the weights the package ships."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from inverse_graphics.air import AIR, AIRConfig
from inverse_graphics.checkpoint import CheckpointError, load_checkpoint, restore

WEIGHTS = {
    # name: (file in inverse_graphics/weights, model kinds it may hold)
    "air-multi-mnist": ("air-multi-mnist.safetensors", ("air",)),
    "dair-multi-mnist": ("dair-multi-mnist.safetensors", ("dair",)),
    "air-tabletop": ("air-tabletop.safetensors", ("air-tabletop",)),
    "air-kitchen": ("air-kitchen.safetensors", ("air-tabletop",)),
    "supervised-tabletop": ("supervised-tabletop.safetensors", ("supervised-tabletop",)),
    "supervised-kitchen": ("supervised-kitchen.safetensors", ("supervised-tabletop",)),
}
KINDS_2D = ("air", "dair")
KINDS_3D = ("air-tabletop", "supervised-tabletop")


def build_model(kind: str, config: dict, path: str | os.PathLike = "<checkpoint>") -> torch.nn.Module:
    """An untrained model of a checkpoint's kind and config; CheckpointError, naming `path`, for a kind this
    release does not know or a config that does not make a model."""
    if kind not in (*KINDS_2D, *KINDS_3D):
        raise CheckpointError(f"{path} holds a '{kind}' model, which this release cannot load")
    try:
        return _build(kind, config)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:  # from_dict and the modules' own checks
        raise CheckpointError(f"{path} holds a '{kind}' config that does not make a model: {err}") from err


def _build(kind: str, config: dict) -> torch.nn.Module:
    """An untrained model of a checkpoint's kind and config (the 3D modules are imported only when needed)."""
    if kind in KINDS_2D:
        return AIR(AIRConfig.from_dict(config))
    if kind == "air-tabletop":
        from inverse_graphics.tabletop.air3d import AIR3D, AIR3DConfig

        return AIR3D(AIR3DConfig.from_dict(config))
    from inverse_graphics.tabletop.supervised3d import SupervisedConfig, SupervisedRegressor

    return SupervisedRegressor(SupervisedConfig.from_dict(config))


def load(path: str | os.PathLike, device: str = "cpu", expect_model: tuple[str, ...] | None = None) -> Any:
    """A model from a checkpoint written by `train` (or shipped), in eval mode on `device`: an `AIR` for
    "air" / "dair" checkpoints, an `AIR3D` for "air-tabletop", a `SupervisedRegressor` for "supervised-tabletop".

    Raises CheckpointError for a missing, truncated, corrupt or foreign file (an old pickle checkpoint included:
    it is never unpickled), a model of another kind, or a config that does not fit the weights.
    """
    ckpt = load_checkpoint(path, expect_model=expect_model)
    return restore(build_model(ckpt["model"], ckpt["config"], path), ckpt, path).to(device).eval()


def weights_path(name: str) -> Path:
    if name not in WEIGHTS:
        raise KeyError(f"no pretrained model named {name!r}; available: {', '.join(sorted(WEIGHTS))}")
    return Path(str(resources.files("inverse_graphics").joinpath("weights", WEIGHTS[name][0])))


def load_pretrained(name: str, device: str = "cpu") -> Any:
    """The shipped weights `name`, in eval mode: "air-multi-mnist" and "dair-multi-mnist" (AIR models of
    multi-MNIST), "air-tabletop" and "supervised-tabletop" (3D AIR and the supervised baseline on the built-in
    `primitives` world), "air-kitchen" and "supervised-kitchen" (the same two on the `kitchen` world)."""
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
