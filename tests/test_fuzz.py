"""Fuzz: truncated and bit-flipped checkpoints, images and MNIST files fed to every reader. Each reader either reads
the file or raises the project's own error (CheckpointError, the image readers' ValueError naming the file,
DataNotFoundError) — never a library's exception. Seeded and small: a few seconds."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
import torch
from PIL import Image

import inverse_graphics as ig
from inverse_graphics.checkpoint import CheckpointError, load_checkpoint, save_atomic
from inverse_graphics.infer import read_image, read_rgb
from scenes import mnist
from tests.test_checkpoint import small_checkpoint

N_CASES = 40  # per file: half truncations, half single-bit flips


def variants(data: bytes, seed: int, protect: int = 0):
    """(label, bytes): N_CASES / 2 truncations at random lengths and N_CASES / 2 copies with one bit flipped, the
    first `protect` bytes spared (to reach past a container's header)."""
    rng = np.random.default_rng(seed)
    for n in sorted(rng.integers(0, len(data), N_CASES // 2)):
        yield f"truncated to {n} of {len(data)} bytes", data[:n]
    for i in rng.integers(protect, len(data), N_CASES // 2):
        flipped = bytearray(data)
        flipped[i] ^= 1 << int(rng.integers(8))
        yield f"bit flipped at byte {i}", bytes(flipped)


def test_checkpoint_readers(tmp_path):
    good = tmp_path / "good.safetensors"
    save_atomic({**small_checkpoint(), "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "lr": 1e-3}}, good)
    data, reference = good.read_bytes(), load_checkpoint(good)
    header = int.from_bytes(data[:8], "little") + 8
    cases = [*variants(data, 0), *variants(data, 1, protect=header)]  # flips in the header, then in the tensors
    path = tmp_path / "case.safetensors"
    errors = 0
    for label, case in cases:
        path.write_bytes(case)
        for read in (load_checkpoint, ig.load):
            try:
                got = read(path)
            except CheckpointError:
                errors += 1
                continue
            if read is load_checkpoint:  # read anyway: then it must be the checkpoint, unaltered
                assert got.keys() == reference.keys(), label
                assert all(torch.equal(v, got["state_dict"][k]) for k, v in reference["state_dict"].items()), label
    assert errors >= len(cases)  # truncations always, flips (checksummed) in practice every time


def _image_files() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    grey = (rng.random((24, 24)) * 255).astype(np.uint8)
    files = {}
    for name, im, fmt in [
        ("grey.png", Image.fromarray(grey), "PNG"),
        ("rgb.jpg", Image.fromarray(np.stack([grey] * 3, -1)), "JPEG"),
        ("grey16.png", Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        ("float.tiff", Image.fromarray(grey.astype(np.float32) / 255), "TIFF"),
        ("rgba.png", Image.fromarray(np.stack([grey] * 4, -1)), "PNG"),
        ("palette.gif", Image.fromarray(grey).convert("P"), "GIF"),
        ("grey.bmp", Image.fromarray(grey), "BMP"),
    ]:
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        files[name] = buf.getvalue()
    return files


@pytest.mark.parametrize("name", list(_image_files()))
def test_image_readers(tmp_path, name):
    data = _image_files()[name]
    path = tmp_path / name
    for label, case in variants(data, seed=len(name)):
        path.write_bytes(case)
        for read, shape in ((read_image, (50, 50)), (read_rgb, (3, 64, 64))):
            try:
                arr, _ = read(path, shape[-1])
            except ValueError as err:
                assert name in str(err), (label, err)
                continue
            assert arr.shape == shape and arr.dtype == np.float32, label
            assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1, label


def _idx(path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


@pytest.mark.parametrize("which", [0, 1])  # the images file, the labels file
@pytest.mark.parametrize("gzipped", [True, False])
def test_mnist_reader(tmp_path, data_dir, which, gzipped):
    root = tmp_path / "root"
    (root / "mnist").mkdir(parents=True)
    paths = []
    for name in mnist.FILES["test"]:
        source = mnist.find_file(name, data_dir)
        paths.append(root / "mnist" / (name if gzipped else name[:-3]))
        if gzipped:
            paths[-1].write_bytes(source.read_bytes() if source.suffix == ".gz" else gzip.compress(_idx(source), 1))
        else:
            paths[-1].write_bytes(_idx(source))
    target = paths[which]
    whole = target.read_bytes()
    cases = list(variants(whole, seed=2 * which + gzipped))
    for label, case in cases[:: 4 if which == 0 else 2]:  # each case reads both files: ~50 ms gzipped
        target.write_bytes(case)
        try:
            digits = mnist.load_digits("test", root)
        except mnist.DataNotFoundError as err:
            assert target.name in str(err), (label, err)
            continue
        assert len(digits) == 10_000 and digits.images.shape == (10_000, 28, 28), label
