"""Checkpoints: one file holding the model kind, its config, weights and (for training) the optimiser, step,
RNG state and train config. Written atomically (temp file + os.replace), so a run killed while saving keeps its
previous checkpoint intact."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "inverse-graphics-checkpoint"
CHECKPOINT_NAME = "checkpoint.pt"  # a run directory's checkpoint file
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, of another format or of another model kind."""


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **obj}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, expect_model: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read a checkpoint; raise CheckpointError with a clear reason if it is not a usable one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an inverse-graphics checkpoint")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has format version {ckpt['version']}; this release reads up to {VERSION}")
    model = ckpt.get("model")
    if expect_model is not None and model not in expect_model:
        raise CheckpointError(f"{path} holds a '{model}' model; expected one of {', '.join(expect_model)}")
    for key in ("model", "config", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"{path} lacks '{key}'; it is incomplete")
    return ckpt


def restore(model: Any, ckpt: dict[str, Any], path: str | os.PathLike) -> Any:
    """Load a checkpoint's weights into `model` (float16 shipped weights back to float32). Training-only state
    (the NVIL baseline, its running mean), which shipped weights drop, may be missing; anything else missing or
    unexpected is a CheckpointError."""
    state = {k: v.float() if torch.is_floating_point(v) else v for k, v in ckpt["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("baseline.", "signal_"))]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its config: missing {missing}, unexpected {unexpected}")
    return model
