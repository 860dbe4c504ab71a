"""Careless and hostile inputs outside training: 16-bit and float images, inferred scenes that are not physically
valid, inputs sharing a stem, bad option values, --device cuda without a GPU, corrupt MNIST files, MNIST search
order, empty batches."""

from __future__ import annotations

import argparse
import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image

import inverse_graphics as ig
from inverse_graphics.cli import main as cli_main
from inverse_graphics.infer import InferConfig, main_tabletop, output_stems, read_image, read_rgb
from scenes import mnist, multi_mnist
from scenes.world import load_world


@pytest.fixture(scope="module")
def scene():
    """One multi-MNIST scene as float64 (50, 50) in [0, 1], and its digit count."""
    data = multi_mnist.generate(mnist.load_sample(), 8, np.random.default_rng(99), counts=(2,), overlap="reject")
    return data.images[0].astype(np.float64) / 255.0, int(data.counts[0])


# --- images ---------------------------------------------------------------------------------------------------


def test_a_dark_16_bit_png_reads_as_its_values(tmp_path, scene):
    x, _ = scene
    dark = 0.02 + 0.5 * x  # a dim scene on a faint ground: every pixel above 255 of 65535
    path = tmp_path / "dark16.png"
    Image.fromarray(np.round(dark * 65535).astype(np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    arr, size = read_image(path, 50)
    assert size == (50, 50) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, dark, atol=1e-4)  # 8-bit conversion would read it all as 1.0
    rgb, _ = read_rgb(path, 50)
    np.testing.assert_allclose(rgb, np.broadcast_to(dark, (3, 50, 50)), atol=1e-4)


def test_16_bit_scene_counts_as_the_8_bit_one(tmp_path, scene, capsys):
    x, count = scene
    Image.fromarray(np.round(x * 65535).astype(np.uint16)).save(tmp_path / "s16.png")
    Image.fromarray(np.round(x * 255).astype(np.uint8)).save(tmp_path / "s8.png")
    out = tmp_path / "out"
    assert cli_main(["infer", str(tmp_path / "s16.png"), str(tmp_path / "s8.png"), "--out", str(out)]) == 0
    counts = [r["count"] for r in json.loads((out / "results.json").read_text())["images"]]
    assert counts[0] == counts[1]


def test_float_tiff_is_taken_as_it_is_and_resized_without_8_bit_rounding(tmp_path, scene):
    x, _ = scene
    path = tmp_path / "f.tiff"
    Image.fromarray((0.001 * x).astype(np.float32)).save(path)  # values far below one 8-bit step
    arr, _ = read_image(path, 50)
    np.testing.assert_allclose(arr, 0.001 * x, atol=1e-7)
    small, _ = read_image(path, 25)
    assert small.shape == (25, 25) and 0 < small.max() <= 0.001 + 1e-7
    bad = tmp_path / "bright.tiff"
    Image.fromarray(np.full((8, 8), 3.0, np.float32)).save(bad)
    with pytest.raises(ValueError, match=r"bright.tiff.*\[0, 1\]"):
        read_image(bad, 50)


def test_32_bit_int_images_beyond_16_bits_are_refused(tmp_path):
    path = tmp_path / "i32.tiff"
    Image.fromarray(np.full((8, 8), 100_000, np.int32)).save(path)
    with pytest.raises(ValueError, match="beyond 16 bits"):
        read_image(path, 50)


def test_inputs_with_the_same_stem_write_distinct_overlays(tmp_path, scene):
    x, _ = scene
    (tmp_path / "b").mkdir()
    names = [tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "b" / "a.png"]
    for p in names:
        Image.fromarray(np.round(x * 255).astype(np.uint8)).save(p)
    out = tmp_path / "out"
    assert cli_main(["infer", *map(str, names), "--out", str(out)]) == 0
    overlays = [r["overlay"] for r in json.loads((out / "results.json").read_text())["images"]]
    assert len(set(overlays)) == 3
    for o in overlays:
        with Image.open(o) as im:
            assert im.size[0] >= 300
    assert output_stems(["x/a.png", "y/b.png"]) == ["a", "b"]  # no collision: the plain stems


def test_infer_tabletop_reports_invalid_inferred_scenes_and_writes_every_image(tmp_path, capsys):
    """The model's own output may be partly off the table or interpenetrating: flagged, never aborting."""
    from inverse_graphics.tabletop.supervised3d import SceneInference

    class Model:  # stands for a tabletop model whose inference returns such scenes
        config = type("C", (), {"image_size": 64, "backend": "auto"})()
        world, image_wh, legacy = load_world("primitives"), (64, 64), True

        def infer(self, images, refine=None, refine_gradient="fd", search=None):
            off = {"objects": [{"shape": "cube", "position": [0.295, 0.0], "yaw": 0.3}]}
            overlap = {
                "objects": [
                    {"shape": "cube", "position": [0.0, 0.0], "yaw": 0.0},
                    {"shape": "sphere", "position": [0.01, 0.0], "yaw": 0.0},
                ]
            }
            ok = {"objects": [{"shape": "cube", "position": [0.0, 0.0], "yaw": 0.0}]}
            scenes = [off, overlap, ok]
            return SceneInference(scenes, torch.tensor([1, 2, 1]), torch.ones(3, 3), {})

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"s{i}.png"))
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(paths[-1])
    out = tmp_path / "out"
    record = main_tabletop(InferConfig(images=paths, model="fake", out_dir=str(out)), Model())
    problems = [r["problems"] for r in record["images"]]
    assert "(partly) off the" in problems[0][0] and "interpenetrate" in problems[1][0] and problems[2] == []
    assert all((out / f"s{i}_scene.png").is_file() for i in range(3))
    assert json.loads((out / "results.json").read_text())["images"][0]["scene"]["objects"][0]["position"][0] == 0.295
    assert "not physically valid" in capsys.readouterr().err


# --- options --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize(
    "option",
    [
        "--lr",
        "--minutes",
        "--baseline-lr",
        "--eval-every",
        "--checkpoint-every",
        "--lr-floor",
        "--z-pres-prior",
        "--z-pres-prior-start",
        "--lr-drop-to",
        "--wake-lr",
        "--likelihood-sd",
    ],
)
def test_non_finite_float_options_are_usage_errors(option, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "air", f"{option}={value}"])
    assert exit_.value.code == 2 and "finite" in capsys.readouterr().err


def test_every_float_option_of_every_command_is_checked():
    """No float option escapes the finite check (a new one must use cli._finite or cli._positive)."""
    from inverse_graphics.cli import _finite, _positive, build_parser

    def float_options(parser) -> list[str]:
        found = [a.dest for a in parser._actions if a.type is float]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += [o for sub in action.choices.values() for o in float_options(sub)]
        return found

    parser = build_parser()
    assert float_options(parser) == [] and _positive("0.5") == 0.5 and _finite("-2") == -2.0
    assert "scenes" in parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]  # nested: searched


def test_tabletop_options_are_refused_for_a_2d_model():
    from inverse_graphics.infer import InferConfig, main

    with pytest.raises(ValueError, match="--refine and --no-search apply to the tabletop models"):
        main(InferConfig(images=["x.png"], model="air-multi-mnist", search=False))


@pytest.mark.parametrize("refine", ["-1", "-20"])
def test_negative_refine_is_refused(refine, capsys):
    with pytest.raises(SystemExit):
        cli_main(["infer", "x.png", "--model", "air-tabletop", "--refine", refine])
    assert ">= 0" in capsys.readouterr().err
    model = ig.load_pretrained("supervised-tabletop")
    with pytest.raises(ValueError, match="refine must be >= 0"):
        model.infer(torch.zeros(1, 3, 64, 64), refine=int(refine))


@pytest.mark.parametrize(
    "argv",
    [
        ["demo"],
        ["eval", "--n", "4"],
        ["infer", "x.png"],
        ["train", "air", "--steps", "1"],
        ["train", "air-tabletop", "--steps", "1"],
        ["train", "supervised-tabletop", "--steps", "1"],
    ],
)
def test_device_cuda_without_cuda_is_a_clear_error_for_every_command(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = ["--out", str(tmp_path / "o")] if argv[0] != "eval" else []
    assert cli_main([*argv, *out, "--device", "cuda"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_a_device_torch_does_not_know_is_a_clear_error(capsys):
    assert cli_main(["eval", "--n", "4", "--device", "gpu0"]) == 2
    assert "is not a device" in capsys.readouterr().err


# --- MNIST files ----------------------------------------------------------------------------------------------


def _mnist_copy(root, data_dir, corrupt_at: int | None = None):
    """The test split's files under root/mnist (gzipped), with one byte inside the images' deflate stream
    changed at `corrupt_at`."""
    (root / "mnist").mkdir(parents=True)
    for name in mnist.FILES["test"]:
        data = bytearray(mnist.find_file(name, data_dir).read_bytes())
        if not name.endswith(".gz"):
            data = bytearray(gzip.compress(bytes(data)))
        if corrupt_at is not None and "images" in name:
            data[corrupt_at] ^= 0xFF
        (root / "mnist" / name).write_bytes(bytes(data))
    return root


@pytest.mark.parametrize("where", [40, 1000, 500_000, -9])
def test_a_corrupt_byte_inside_an_mnist_gz_is_a_data_error_naming_the_file(tmp_path, data_dir, where):
    root = _mnist_copy(tmp_path, data_dir, corrupt_at=where)
    with pytest.raises(mnist.DataNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        mnist.load_digits("test", root)


def test_the_environment_variable_is_searched_after_data_dir(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv(mnist.ENV_VAR, str(data_dir))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert mnist.search_roots(empty)[:2] == [empty, data_dir]
    assert len(mnist.load_digits("test", empty)) == 10_000  # found under $INVERSE_GRAPHICS_DATA
    mine = _mnist_copy(tmp_path / "mine", data_dir)
    assert mnist.find_file("t10k-images-idx3-ubyte.gz", mine).is_relative_to(mine)  # --data-dir first
    monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path / "nowhere"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(mnist.DataNotFoundError, match="nowhere"):
        mnist.load_digits("test", empty)


# --- empty batches --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["air-multi-mnist", "dair-multi-mnist"])
def test_an_empty_2d_batch_gives_empty_results(name):
    model = ig.load_pretrained(name)
    out = model.infer(torch.zeros(0, 50, 50), reconstruct=True)
    T = model.config.max_steps
    assert out.counts.shape == (0,) and out.z_pres.shape == (0, T) and out.z_where.shape == (0, T, 3)
    assert out.boxes == [] and out.recon is not None and out.recon.shape == (0, 50, 50)
