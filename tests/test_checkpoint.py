"""Checkpoints: the exact round trip of the format, refusals with clear reasons, no code run by any reader (a
pickle payload fed to every entry point that reads a checkpoint), conversion of old files, stale temp files, and the
shipped weights giving the outputs of the pickle files they were converted from."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

import inverse_graphics as ig
from inverse_graphics import pretrained
from inverse_graphics.air import AIR, AIRConfig
from inverse_graphics.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    CheckpointError,
    decode,
    encode,
    load_checkpoint,
    save_atomic,
)
from inverse_graphics.cli import main as cli_main
from tests.shipped_outputs import GOLDEN, model_inputs, outputs

SMALL = AIRConfig(
    canvas_size=20,
    window_size=8,
    z_what_dim=4,
    embed_dim=8,
    rnn_hidden=8,
    encoder_hidden=8,
    decoder_hidden=8,
    baseline_hidden=8,
)


def small_checkpoint(config: AIRConfig = SMALL) -> dict:
    model = AIR(config)
    return {"model": "air", "config": model.config.to_dict(), "state_dict": model.state_dict()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same(a, b) -> bool:
    """Equal values of equal types, recursively (tensors: dtype, shape and bits; floats: nan equals nan)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b


# --- the format ---------------------------------------------------------------------------------------------


def test_round_trip_is_exact_for_every_listed_type():
    gen = np.random.default_rng(7)
    gen.random()
    obj = {
        "nested": {0: {"exp_avg": torch.randn(3, 2)}, 1: [1, (2, "x")], "$dollar": None, "": True},
        "tuple": (1, 2.5, ("a", False)),
        "ints": [0, -1, 2**63 - 1, 2**63, -(2**63) - 1, 2**127 + 12345, 10**40],
        "floats": [float("nan"), float("inf"), -float("inf"), -0.0, 5e-324, 1.0, 1 / 3],
        "torch_rng": torch.get_rng_state(),  # uint8
        "numpy_rng": gen.bit_generator.state,  # PCG64: 128-bit ints
        "tensors": [
            torch.zeros(0),
            torch.zeros(0, 3),
            torch.tensor(2.0),
            torch.ones(2, dtype=torch.bfloat16),
            torch.tensor([True, False]),
            torch.arange(6, dtype=torch.int32).reshape(2, 3).t(),
            torch.randn(4, dtype=torch.float64),
            torch.randn(3).half(),
        ],
        "arrays": [
            np.arange(6, dtype=np.uint16).reshape(2, 3),
            np.array(3.5),
            np.ones((2, 2), bool)[:, ::-1],
            np.array([2**64 - 1], dtype=np.uint64),
        ],
        "strings": ["", "ünï", "$tensor"],
        "empty": [{}, [], ()],
    }
    back = decode(encode(obj))
    assert same(back, obj)
    g2 = np.random.default_rng()
    g2.bit_generator.state = back["numpy_rng"]  # usable as a generator state
    assert g2.random() == gen.random()


def test_optimiser_state_and_rng_resume_exactly():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    back = decode(encode({"optimizer": opt.state_dict(), "rng": torch.get_rng_state()}))
    assert same(back["optimizer"], opt.state_dict())  # int param ids as keys, tensors and floats as they were
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    torch.set_rng_state(back["rng"])


def test_cuda_tensors_come_back_on_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert decode(encode({"w": torch.ones(2, device="cuda")}))["w"].device.type == "cpu"


@pytest.mark.parametrize(
    "obj, where",
    [
        ({"a": {"b": [1, object()]}}, "a/b/1"),
        ({"opt": {"lr": complex(1, 2)}}, "opt/lr"),
        ({"k": {(1, 2): 3}}, "k"),
        ({"k": {1.5: 3}}, "k"),
        ({"s": {1, 2}}, "s"),
        ({"t": torch.zeros(2, dtype=torch.complex64)}, "t"),
        ({"n": np.array(["a"])}, "n"),
        ({"n": np.int64(3)}, "n"),
    ],
)
def test_values_outside_the_format_are_a_type_error_naming_the_key_path(tmp_path, obj, where):
    with pytest.raises(TypeError, match=where):
        save_atomic(obj, tmp_path / CHECKPOINT_NAME)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temp file


def test_the_metadata_is_plain_json_a_reader_can_inspect(tmp_path):
    from safetensors import safe_open

    save_atomic(small_checkpoint(), tmp_path / CHECKPOINT_NAME)
    with safe_open(tmp_path / CHECKPOINT_NAME, "pt") as f:
        meta = f.metadata()
        assert "state_dict/encoder.fc.weight" in f.keys()
    structure = json.loads(meta["structure"])
    assert meta["format"] == FORMAT and structure["config"]["canvas_size"] == 20 and structure["version"] == 2


# --- old files, payloads and every reader ---------------------------------------------------------------------


class _Payload:
    """Unpickling this creates `marker`: the stand-in for any code a hostile checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(params=["torch-zip", "raw-pickle", "pickle-protocol-0"])
def payload(request, tmp_path):
    """(a hostile old-format checkpoint file, the marker file its unpickling would create)."""
    marker = tmp_path / "PWNED"
    record = {"format": FORMAT, "version": 1, "model": "air", "config": {}, "state_dict": {}, "x": _Payload(marker)}
    path = tmp_path / "hostile" / "model.pt"
    path.parent.mkdir()
    if request.param == "torch-zip":
        torch.save(record, path)
    else:
        path.write_bytes(pickle.dumps(record, protocol=0 if request.param.endswith("0") else 4))
    return path, marker


def _image(tmp_path, size=50, channels=1):
    from PIL import Image

    p = tmp_path / f"img{size}.png"
    Image.fromarray(np.zeros((size, size, 3) if channels == 3 else (size, size), np.uint8)).save(p)
    return str(p)


def _in_run_dir(path, tmp_path):
    """A run directory whose checkpoint is `path`'s bytes (what --resume reads)."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / CHECKPOINT_NAME).write_bytes(path.read_bytes())
    return str(run)


CLI_READERS = {
    "infer": lambda p, t: ["infer", _image(t), "--model", str(p), "--out", str(t / "o")],
    "infer-tabletop-name": lambda p, t: ["infer", _image(t, 64, 3), "--model", str(p), "--out", str(t / "o")],
    "eval": lambda p, t: ["eval", "--model", str(p), "--n", "4"],
    "export": lambda p, t: ["export", str(p), str(t / "exported.safetensors")],
    "convert-untrusted": lambda p, t: ["convert", str(p), str(t / "new.safetensors")],
    "train-air-resume": lambda p, t: ["train", "air", "--out", _in_run_dir(p, t), "--resume", "--steps", "1"],
    "train-dair-resume": lambda p, t: ["train", "dair", "--out", _in_run_dir(p, t), "--resume", "--steps", "1"],
    "train-air-init-from": lambda p, t: [
        "train",
        "air",
        "--out",
        str(t / "r"),
        "--init-from",
        str(p),
        "--steps",
        "0",
        "--n-train",
        "8",
        "--batch-size",
        "8",
        "--eval-n",
        "8",
        "--no-progress",
    ],
    "train-dair-init-from": lambda p, t: [
        "train",
        "dair",
        "--out",
        str(t / "r"),
        "--init-from",
        str(p),
        "--steps",
        "0",
        "--n-train",
        "8",
        "--batch-size",
        "8",
        "--eval-n",
        "8",
        "--no-progress",
    ],
    "train-air-tabletop-init-from": lambda p, t: [
        "train",
        "air-tabletop",
        "--out",
        str(t / "r"),
        "--init-from",
        str(p),
        "--recipe",
        "sleep",
        "--steps",
        "0",
        "--eval-n",
        "2",
        "--no-progress",
    ],
    "train-air-tabletop-resume": lambda p, t: [
        "train",
        "air-tabletop",
        "--out",
        _in_run_dir(p, t),
        "--resume",
        "--steps",
        "0",
    ],
    "train-supervised-tabletop-resume": lambda p, t: [
        "train",
        "supervised-tabletop",
        "--out",
        _in_run_dir(p, t),
        "--resume",
        "--steps",
        "0",
    ],
}


@pytest.mark.parametrize("reader", list(CLI_READERS))
def test_no_cli_entry_point_unpickles_a_checkpoint(reader, payload, tmp_path, capsys, data_dir):
    path, marker = payload
    assert cli_main(CLI_READERS[reader](path, tmp_path)) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "the payload ran"
    if reader == "convert-untrusted":
        assert "--trusted" in err and "run any code" in err
    elif path.read_bytes()[:1] in (b"P", b"\x80"):  # recognisably torch.save or pickle: named, with the fix
        assert "old-format (pickle)" in err and "inverse-graphics convert" in err and "--trusted" in err
    else:
        assert "not a readable checkpoint" in err


@pytest.mark.parametrize("model", ["air", "dair", "air-tabletop", "supervised-tabletop"])
def test_resume_of_an_old_run_directory_names_the_conversion(model, payload, tmp_path, capsys):
    path, marker = payload
    run = tmp_path / "old_run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(path.read_bytes())  # a run of an earlier release
    assert cli_main(["train", model, "--out", str(run), "--resume", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"inverse-graphics convert {run / 'checkpoint.pt'} {run / CHECKPOINT_NAME} --trusted" in err
    assert not marker.exists()


def test_no_python_entry_point_unpickles_a_checkpoint(payload, tmp_path, monkeypatch):
    from inverse_graphics.evaluate import load_model
    from inverse_graphics.tabletop.train_air3d import load_air3d
    from inverse_graphics.tabletop.train_supervised3d import load_supervised

    path, marker = payload
    monkeypatch.setattr(pretrained, "weights_path", lambda name: path)  # as if the installed weights were hostile
    readers = [
        ig.load,
        load_checkpoint,
        load_air3d,
        load_supervised,
        load_model,
        pretrained.export,
        lambda p: ig.load_pretrained("air-multi-mnist"),
        lambda p: load_model("air-tabletop"),
    ]
    for read in readers:
        args = (path, tmp_path / "out.safetensors") if read is pretrained.export else (path,)
        with pytest.raises(CheckpointError):
            read(*args)
    assert not marker.exists(), "the payload ran"


def test_convert_reads_an_old_file_only_when_trusted(tmp_path, capsys):
    old, new = tmp_path / "old.pt", tmp_path / "new.safetensors"
    ckpt = small_checkpoint()
    torch.save({"format": FORMAT, "version": 1, **ckpt, "step": 7, "train_config": {"counts": (0, 1)}}, old)
    assert cli_main(["convert", str(old), str(new)]) == 2
    assert "--trusted" in capsys.readouterr().err and not new.exists()
    assert cli_main(["convert", str(old), str(new), "--trusted"]) == 0
    back = load_checkpoint(new)
    assert back["step"] == 7 and back["train_config"] == {"counts": (0, 1)} and back["version"] == 2
    assert same(back["state_dict"], dict(ckpt["state_dict"]))  # an OrderedDict comes back a dict
    x = torch.rand(2, 20, 20)
    reference = AIR(SMALL)
    reference.load_state_dict(ckpt["state_dict"])
    assert torch.equal(ig.load(new).infer(x).z_where, reference.eval().infer(x).z_where)
    assert cli_main(["convert", str(new), str(tmp_path / "again.safetensors"), "--trusted"]) == 2  # not a pickle


# --- refusals -------------------------------------------------------------------------------------------------


def test_a_config_that_does_not_fit_its_weights_is_a_checkpoint_error(tmp_path):
    ckpt = small_checkpoint()
    bigger = {**ckpt, "config": {**ckpt["config"], "z_what_dim": 6}}
    save_atomic(bigger, tmp_path / "shapes.safetensors")
    with pytest.raises(CheckpointError, match="does not match its config"):
        ig.load(tmp_path / "shapes.safetensors")
    unknown = {**ckpt, "config": {**ckpt["config"], "no_such_field": 1}}
    save_atomic(unknown, tmp_path / "field.safetensors")
    with pytest.raises(CheckpointError, match="does not make a model"):
        ig.load(tmp_path / "field.safetensors")
    junk = {**ckpt, "state_dict": {"encoder.fc.weight": [1, 2]}}
    save_atomic(junk, tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="state_dict"):
        ig.load(tmp_path / "junk.safetensors")
    for kind in ("air-tabletop", "supervised-tabletop"):  # the 3D kinds with a 2D config
        save_atomic({**ckpt, "model": kind}, tmp_path / f"{kind}.safetensors")
        with pytest.raises(CheckpointError):
            ig.load(tmp_path / f"{kind}.safetensors")


def test_a_directory_given_as_model_says_it_is_a_directory(tmp_path, capsys):
    assert cli_main(["eval", "--model", str(tmp_path), "--n", "4"]) == 2
    assert "is a directory" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is a directory"):
        ig.load(tmp_path)


# --- atomic saves ---------------------------------------------------------------------------------------------


def test_a_save_removes_the_temp_files_a_killed_save_left(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    stale = [tmp_path / f"{CHECKPOINT_NAME}.k1ll3d.tmp", tmp_path / f"{CHECKPOINT_NAME}.x.tmp"]
    for s in stale:
        s.write_bytes(b"half a checkpoint")  # what SIGKILL during a save leaves
    other = tmp_path / "other.safetensors.abc.tmp"  # another checkpoint's: not ours to remove
    other.write_bytes(b"")
    save_atomic(small_checkpoint(), path)
    assert not any(s.exists() for s in stale) and other.exists()
    assert load_checkpoint(path)["model"] == "air"


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import os

    path = tmp_path / CHECKPOINT_NAME
    save_atomic(small_checkpoint(), path)
    before = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({**small_checkpoint(), "step": 1}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


# --- the shipped weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["air-multi-mnist", "dair-multi-mnist", "air-tabletop", "supervised-tabletop"])
def test_shipped_models_give_the_outputs_of_the_pickle_files(name):
    """tests/golden/shipped_outputs.json: these inputs' outputs computed from the float16 `.pt` files that the
    `.safetensors` files were converted from (weights_path's file is safetensors now); air-tabletop's, retrained
    since with appearance randomisation, from its own safetensors file when it was shipped (a regression pin)."""
    expected = json.loads((GOLDEN / "shipped_outputs.json").read_text())[name]
    assert pretrained.weights_path(name).suffix == ".safetensors"
    got = outputs(ig.load_pretrained(name), model_inputs(name))
    assert got.keys() == expected.keys()
    for key in got:
        if key in ("counts",):
            assert got[key] == expected[key]
        elif key == "scenes":
            assert [[o["shape"] for o in s["objects"]] for s in got[key]] == [
                [o["shape"] for o in s["objects"]] for s in expected[key]
            ]
            flat = [[*o["position"], o["yaw"]] for s in got[key] for o in s["objects"]]
            want = [[*o["position"], o["yaw"]] for s in expected[key] for o in s["objects"]]
            np.testing.assert_allclose(flat, want, atol=1e-5)
        else:
            np.testing.assert_allclose(got[key], expected[key], atol=1e-5)


def test_resume_refuses_a_checkpoint_whose_training_config_does_not_fit(tmp_path):
    from inverse_graphics.rundir import open_run
    from inverse_graphics.train import TrainConfig

    cfg = TrainConfig(out_dir=str(tmp_path), steps=1)
    save_atomic({**small_checkpoint(), "train_config": {"no_such_option": 1}}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="training config does not fit"):
        open_run(cfg, TrainConfig, ("air",), resume=True, overwrite=False)
    save_atomic(small_checkpoint(), tmp_path / CHECKPOINT_NAME)  # exported weights: nothing to resume
    with pytest.raises(CheckpointError, match="no training config"):
        open_run(cfg, TrainConfig, ("air",), resume=True, overwrite=False)


def test_restore_names_what_does_not_fit(tmp_path):
    from inverse_graphics.checkpoint import restore
    from inverse_graphics.pretrained import build_model

    ckpt = small_checkpoint()
    shipped = {**ckpt, "state_dict": {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("baseline.")}}
    restore(AIR(SMALL), shipped, "shipped")  # shipped weights lack the training-only baseline: fine
    with pytest.raises(CheckpointError, match="missing .*baseline"):
        restore(AIR(SMALL), shipped, "resumed", strict=True)  # a resume needs all of it
    other = AIR(AIRConfig(**{**SMALL.to_dict(), "rnn_hidden": 6}))
    with pytest.raises(CheckpointError, match=r"another shape: .*\(model"):
        restore(other, ckpt, "x")
    with pytest.raises(CheckpointError, match="cannot load"):
        build_model("gan", {}, "x")
