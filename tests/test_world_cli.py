"""`inverse-graphics world {init, show}` and `scenes {generate, show} --world`, driven through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from inverse_graphics import world_cli
from inverse_graphics.cli import main
from scenes.world import load_world
from tests.test_world import write_world


@pytest.mark.parametrize("source", ["primitives", "kitchen"])
def test_world_init_writes_an_editable_copy_that_loads_and_never_overwrites(tmp_path, capsys, source):
    path = tmp_path / "mine.toml"
    assert main(["world", "init", str(path), "--from", source]) == 0
    copy, original = load_world(path), load_world(source)
    assert copy.name == "mine"
    assert copy.to_dict() == {**original.to_dict(), "name": "mine"} | {
        "objects": [
            {**o, "source": o["source"].replace("kitchen/", "mine_meshes/")} for o in original.to_dict()["objects"]
        ]  # fmt: skip
    }
    text = path.read_text()
    if source == "kitchen":
        assert 'mesh = "mine_meshes/mug.obj"' in text and (tmp_path / "mine_meshes" / "bottle.glb").is_file()
    capsys.readouterr()
    assert main(["world", "init", str(path), "--from", source]) == 2
    assert "exists" in capsys.readouterr().err and path.read_text() == text


def test_world_show_writes_a_labelled_contact_sheet(tmp_path):
    """Rows of objects, nominal and randomised scenes; the nominal row holds the world's own renders."""
    world = write_world(tmp_path)
    out = tmp_path / "sheet.png"
    assert main(["world", "show", str(world), "--out", str(out), "--n", "3", "--zoom", "1", "--seed", "4"]) == 0
    with Image.open(out) as sheet:
        pixels = np.asarray(sheet.convert("RGB"))
    w = load_world(world)
    H, W = 32, 48
    row_h = 2 * world_cli.LABEL_HEIGHT + H
    assert pixels.shape == (world_cli.LABEL_HEIGHT + 3 * row_h, world_cli.PADDING + 3 * (W + world_cli.PADDING), 3)
    scenes = w.sample_scenes(3, seed=4)
    for r, images in ((1, w.render_scenes(scenes)), (2, w.render_scenes(scenes, randomize=True, seed=4))):
        top = world_cli.LABEL_HEIGHT + r * row_h + world_cli.LABEL_HEIGHT
        for i in range(3):
            left = world_cli.PADDING + i * (W + world_cli.PADDING)
            expected = (images[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            assert np.array_equal(pixels[top : top + H, left : left + W], expected)
    label_band = pixels[: world_cli.LABEL_HEIGHT]
    assert (label_band.max(-1) < 60).sum() > 50  # the title's text


def test_world_show_reports_a_bad_world_file(tmp_path, capsys):
    bad = write_world(tmp_path, "image_size = [10, 10]\n", "bad.toml")
    assert main(["world", "show", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "bad.toml: objects: missing (required)" in capsys.readouterr().err


def test_scenes_generate_and_show_with_a_world(tmp_path):
    world = write_world(tmp_path)
    out = tmp_path / "data"
    assert main(["scenes", "generate", "--world", str(world), "--n", "3", "--out", str(out), "--randomize"]) == 0
    annotations = json.loads((out / "annotations.json").read_text())
    assert annotations["world"] == "small" and annotations["image_size"] == [48, 32] and annotations["randomize"]
    with Image.open(out / "000000.png") as image:
        assert image.size == (48, 32)
    assert all(1 <= len(r["scene"]["objects"]) <= 3 for r in annotations["scenes"])
    png = tmp_path / "row.png"
    assert main(["scenes", "show", str(out / "annotations.json"), "--world", str(world), "--out", str(png),
                 "--image-size", "40"]) == 0  # fmt: skip
    with Image.open(png) as row:
        assert row.size == (3 * 60, 40)  # the world's 3:2 aspect at 40 px high
    assert main(["scenes", "generate", "--world", str(world), "--n", "1", "--out", str(out), "--image-size", "32"]) == 2
