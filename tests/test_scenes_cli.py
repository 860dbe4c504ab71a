"""`inverse-graphics scenes generate/show`: one-step smoke tests through the real CLI entry point."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from inverse_graphics.cli import main
from scenes import tabletop


def _size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_generate_writes_pngs_and_annotations_that_round_trip(tmp_path):
    out = tmp_path / "data"
    args = ["scenes", "generate", "--kind", "tabletop", "--n", "3", "--out", str(out), "--seed", "5"]
    assert main([*args, "--image-size", "32"]) == 0
    annotations = json.loads((out / "annotations.json").read_text())
    assert annotations["seed"] == 5 and annotations["image_size"] == 32 and len(annotations["scenes"]) == 3
    scenes = [tabletop.Scene.from_dict(r["scene"]) for r in annotations["scenes"]]
    assert scenes == tabletop.sample_scenes(3, seed=5)
    with Image.open(out / annotations["scenes"][0]["image"]) as image:
        first = np.asarray(image)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    expected = tabletop.render_scenes(scenes[:1], 32)[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(first - expected).max() <= 1


def test_show_renders_a_scene_file_and_an_annotations_file(tmp_path):
    scene_file = tmp_path / "scene.json"
    scene_file.write_text(tabletop.scene_to_json(tabletop.sample_scenes(1, seed=2, min_objects=2)[0]))
    assert main(["scenes", "show", str(scene_file), "--image-size", "48"]) == 0
    assert _size(tmp_path / "scene.png") == (48, 48)
    main(["scenes", "generate", "--n", "2", "--out", str(tmp_path / "d"), "--image-size", "16"])
    png = tmp_path / "both.png"
    assert main(["scenes", "show", str(tmp_path / "d" / "annotations.json"), "--out", str(png)]) == 0
    assert _size(png) == (2 * 256, 256)


def test_bad_scene_file_is_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"objects": [{"shape": "cube", "position": [0.0, 9.0], "yaw": 0.0}]}')
    assert main(["scenes", "show", str(bad)]) == 2
    assert "off the table" in capsys.readouterr().err
