"""Checkpoints: one file holding the model kind, its config, weights and (for training) the optimiser, step,
RNG state and train config. Reading one never runs code: the file holds no pickle.

Format (version 2): a safetensors file (https://github.com/huggingface/safetensors). Every torch.Tensor and
numpy.ndarray of the saved dict is a safetensors tensor named by its key path ("state_dict/encoder.fc.weight",
"optimizer/state/0/exp_avg"). Everything else is JSON in the safetensors metadata under "structure": a dict whose
keys are all strings (none starting with "$") is a JSON object; lists are arrays; str, bool, None and ints of the
int64 range are themselves; other values are one-key objects tagged with "$":
    {"$dict": [[key, value], ...]}   a dict with int (or "$"-prefixed) keys; keys are str or int
    {"$tuple": [...]}                a tuple
    {"$int": "0x..."}                an int outside the int64 range (numpy's PCG64 state holds 128-bit ints)
    {"$float": "nan"}                a float: finite floats are plain JSON numbers, nan / inf / -inf are tagged
    {"$tensor": name}                a torch.Tensor (comes back on the CPU)
    {"$ndarray": name}               a numpy.ndarray
The metadata also holds "sha256", a digest of the structure and every tensor's name, dtype, shape and bytes, so
that a flipped bit anywhere in the file is a CheckpointError rather than silently different weights.

Written atomically (temp file + os.replace), so a run killed while saving keeps its previous checkpoint intact;
the next save removes the temp files such a kill left behind.

Old checkpoints (version 1: torch.save pickles, `checkpoint.pt`) are refused: unpickling can execute arbitrary
code. `inverse-graphics convert OLD.pt NEW.safetensors --trusted` rewrites one whose source you trust.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "inverse-graphics-checkpoint"
VERSION = 2
CHECKPOINT_NAME = "checkpoint.safetensors"  # a run directory's checkpoint file
LEGACY_NAME = "checkpoint.pt"  # a run directory's checkpoint file in format 1 (pickle), never read
SUFFIX = ".safetensors"

_INT64 = (-(2**63), 2**63 - 1)
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip container; a raw pickle's PROTO opcode


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, of another format or of another model kind, or whose
    config does not fit its weights."""


def convert_command(path: str | os.PathLike) -> str:
    new = Path(path).with_suffix(SUFFIX) if Path(path).suffix != SUFFIX else Path(str(path) + ".converted")
    return f"inverse-graphics convert {path} {new} --trusted"


# --- encoding -------------------------------------------------------------------------------------------------


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


class _Encoder:
    """Turns a nested value into (JSON structure, {name: tensor}); TypeError naming the key path otherwise."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _name(self, path: str) -> str:
        name, n = path or "root", 1
        while name in self.tensors:
            name, n = f"{path}#{n}", n + 1
        return name

    def encode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value) if _INT64[0] <= value <= _INT64[1] else {"$int": hex(value)}
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"$float": repr(float(value))}
        if isinstance(value, torch.Tensor):
            return {"$tensor": self._tensor(value, path)}
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf":
                raise TypeError(f"checkpoint value at {path or '<root>'}: numpy array of dtype {value.dtype}")
            return {"$ndarray": self._tensor(torch.from_numpy(np.array(value, order="C")), path)}
        if isinstance(value, (list, tuple)):
            items = [self.encode(v, _join(path, i)) for i, v in enumerate(value)]
            return {"$tuple": items} if isinstance(value, tuple) else items
        if isinstance(value, dict):
            return self._dict(value, path)
        raise TypeError(f"checkpoint value at {path or '<root>'} is of type {type(value).__name__}, not stored")

    def _dict(self, value: dict, path: str) -> Any:
        for k in value:
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint key {k!r} at {path or '<root>'}: only str and int keys are stored")
        plain = all(isinstance(k, str) and not k.startswith("$") for k in value)
        items = {k: self.encode(v, _join(path, k)) for k, v in value.items()}
        return items if plain else {"$dict": [[k, v] for k, v in items.items()]}

    def _tensor(self, t: torch.Tensor, path: str) -> str:
        if t.dtype.is_complex or t.is_sparse or t.is_quantized:
            raise TypeError(f"checkpoint tensor at {path}: {t.dtype} / {t.layout} tensors are not stored")
        name = self._name(path)
        # a copy of its own: safetensors refuses tensors that share storage (tied weights, views)
        self.tensors[name] = t.detach().to("cpu", copy=True).contiguous()
        return name


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        ((tag, arg),) = node.items()
        if tag == "$dict":
            return {k: _decode(v, tensors) for k, v in arg}
        if tag == "$tuple":
            return tuple(_decode(v, tensors) for v in arg)
        if tag == "$int":
            return int(arg, 16)
        if tag == "$float":
            return float(arg)
        if tag == "$tensor":
            return tensors[arg]
        if tag == "$ndarray":
            return tensors[arg].numpy()
        if tag.startswith("$"):
            raise ValueError(f"unknown tag {tag}")
    return {k: _decode(v, tensors) for k, v in node.items()}


def _digest(structure: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(structure.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encode(obj: dict[str, Any]) -> bytes:
    """The file's bytes for `obj` (see the module docstring); TypeError naming the key path of anything that the
    format does not store."""
    from safetensors.torch import save

    enc = _Encoder()
    structure = json.dumps(enc.encode(obj, ""), separators=(",", ":"), allow_nan=False)
    digest = _digest(structure, enc.tensors)
    return save(enc.tensors, metadata={"format": FORMAT, "structure": structure, "sha256": digest})


def decode(data: bytes, path: str | os.PathLike = "<bytes>") -> Any:
    """The value that `encode` stored; CheckpointError for anything else (no code is run whatever the bytes)."""
    from safetensors.torch import load

    if data.startswith(_PICKLE_MAGIC) and data[8:9] != b"{":  # a safetensors header is JSON from byte 8
        raise CheckpointError(
            f"{path} is an old-format (pickle) checkpoint, which is not read: unpickling can run arbitrary code. "
            f"If you trust its source, convert it with `{convert_command(path)}`"
        )
    try:
        (n,) = np.frombuffer(data[:8], dtype="<u8") if len(data) >= 8 else (len(data) + 1,)
        if not 2 <= n <= len(data) - 8:
            raise ValueError("the header length does not fit the file")
        meta = json.loads(data[8 : 8 + int(n)]).get("__metadata__") or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an inverse-graphics checkpoint")
        tensors = load(data)
        if meta.get("sha256") != _digest(meta["structure"], tensors):
            raise ValueError("its checksum does not match its contents")
        return _decode(json.loads(meta["structure"]), tensors)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors, json and a malformed structure raise several types
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from err


# --- files ----------------------------------------------------------------------------------------------------


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files of `path` left by a save that was killed (they are never read)."""
    for stale in path.parent.glob(path.name + ".*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `obj` (a dict of the types listed in the module docstring) to `path` atomically. TypeError, naming
    the key path, for a value the format does not store. One writer per checkpoint file (in a distributed run,
    rank 0): a save first deletes the temp files of `path` that earlier, killed saves left."""
    path = Path(path)
    data = encode({"format": FORMAT, "version": VERSION, **obj})
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """The decoded contents of a checkpoint file, unchecked; CheckpointError if it is missing or unreadable."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file (a run's is {path / CHECKPOINT_NAME})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    return decode(data, path)


def load_checkpoint(path: str | os.PathLike, expect_model: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read a checkpoint; raise CheckpointError with a clear reason if it is not a usable one."""
    ckpt = read_checkpoint_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an inverse-graphics checkpoint")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{path} has format version {version}; this release reads up to {VERSION}")
    model = ckpt.get("model")
    if expect_model is not None and model not in expect_model:
        raise CheckpointError(f"{path} holds a '{model}' model; expected one of {', '.join(expect_model)}")
    for key in ("model", "config", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"{path} lacks '{key}'; it is incomplete")
    state = ckpt["state_dict"]
    if not isinstance(ckpt["config"], dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: its config and state_dict must be dicts")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: its state_dict must map names to tensors")
    return ckpt


def convert_legacy(old: str | os.PathLike, new: str | os.PathLike, trusted: bool = False) -> Path:
    """Rewrite an old-format (torch.save pickle) checkpoint `old` as a checkpoint of this format at `new`.

    Unpickling runs whatever code the file names, so this reads `old` only when `trusted` is true: the caller
    vouches that the file comes from a source it trusts. CheckpointError otherwise, and for a file that is not an
    old inverse-graphics checkpoint."""
    old, new = Path(old), Path(new)
    if not trusted:
        raise CheckpointError(
            f"converting {old} means unpickling it, and unpickling a file can run any code it names. Convert only "
            f"a file from a source you trust, by adding --trusted: `inverse-graphics convert {old} {new} --trusted`"
        )
    if not old.is_file():
        raise CheckpointError(f"{old} is not a file")
    if old.resolve() == new.resolve():
        raise CheckpointError("the converted checkpoint must go to another file than the old one")
    try:
        ckpt = torch.load(old, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"{old} is not a readable old-format checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{old} is not an old-format inverse-graphics checkpoint")
    ckpt = {k: v for k, v in ckpt.items() if k not in ("format", "version")}
    save_atomic(ckpt, new)
    load_checkpoint(new)  # what was written reads back
    return new


def _misfit(saved: torch.Tensor, own: torch.Tensor | None) -> bool:
    return own is not None and saved.shape != own.shape


def restore(model: Any, ckpt: dict[str, Any], path: str | os.PathLike, strict: bool = False) -> Any:
    """Load a checkpoint's weights into `model` (float16 shipped weights back to float32). Unless `strict`,
    training-only state (the NVIL baseline, its running mean), which shipped weights drop, may be missing;
    anything else missing or unexpected, or a tensor of another shape, is a CheckpointError."""
    state = {k: v.float() if torch.is_floating_point(v) else v for k, v in ckpt["state_dict"].items()}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state.items() if _misfit(v, own.get(k))]
    if wrong:
        raise CheckpointError(f"{path} does not match its config: tensors of another shape: {', '.join(wrong)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if not strict:
        missing = [k for k in missing if not k.startswith(("baseline.", "signal_"))]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its config: missing {missing}, unexpected {unexpected}")
    return model
