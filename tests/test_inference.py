"""The shipped model: count accuracy on fresh held-out scenes, the public interface, `infer` and `demo` CLIs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import inverse_graphics as ig
from inverse_graphics.cli import main as cli_main
from scenes import mnist, multi_mnist


@pytest.fixture(scope="module")
def shipped():
    return ig.load_pretrained("air-multi-mnist")


@pytest.fixture(scope="module")
def fresh_scenes():
    # MNIST test digits, a seed no training or benchmark run uses.
    digits = mnist.load_digits("test") if _has_mnist() else mnist.load_sample()
    # Pyro's scene rule, as in the shipped model's benchmark (DESIGN.md's clipped overlaps: see below).
    return multi_mnist.generate(digits, 500, np.random.default_rng(12345), overlap="reject")


def _has_mnist() -> bool:
    try:
        mnist.find_file("t10k-images-idx3-ubyte.gz")
        return True
    except mnist.DataNotFoundError:
        return False


def test_shipped_model_counts_fresh_scenes(shipped, fresh_scenes):
    out = shipped.infer(torch.from_numpy(fresh_scenes.float_images()))
    acc = (out.counts.numpy() == fresh_scenes.counts).mean()
    assert acc >= 0.97, f"count accuracy {acc:.3f} on 500 fresh scenes"


def test_shipped_model_on_clipped_overlaps(shipped):
    # Heavily overlapping pairs are often ambiguous (they merge into one glyph), so the bar is lower.
    digits = mnist.load_digits("test") if _has_mnist() else mnist.load_sample()
    scenes = multi_mnist.generate(digits, 500, np.random.default_rng(54321), overlap="clip")
    out = shipped.infer(torch.from_numpy(scenes.float_images()))
    acc = (out.counts.numpy() == scenes.counts).mean()
    assert acc >= 0.88, f"count accuracy {acc:.3f} on 500 fresh scenes with clipped overlaps"


def test_public_interface_shapes(shipped, fresh_scenes):
    x = torch.from_numpy(fresh_scenes.float_images(0, 6))
    out = shipped.infer(x)
    T = shipped.config.max_steps
    assert out.counts.dtype == torch.long and out.counts.shape == (6,)
    assert out.z_pres.dtype == torch.float32 and out.z_pres.shape == (6, T)
    assert set(out.z_pres.unique().tolist()) <= {0.0, 1.0}
    assert out.z_where.shape == (6, T, 3)
    assert len(out.boxes) == 6
    for n, b in zip(out.counts.tolist(), out.boxes):
        assert b.shape == (n, 4) and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert (out.counts == out.z_pres.sum(1).long()).all()


def test_boxes_find_the_digits(shipped, fresh_scenes):
    # For one-digit scenes, the inferred box centre lies near the true digit's box centre.
    ones = np.nonzero(fresh_scenes.counts == 1)[0][:100]
    out = shipped.infer(torch.from_numpy(fresh_scenes.images[ones].astype(np.float32) / 255))
    ok = out.counts.numpy() == 1
    pred = torch.stack([b[0] for b, k in zip(out.boxes, ok) if k]).numpy()
    true = fresh_scenes.boxes[ones][ok, 0]
    centre_err = np.hypot(*(((pred[:, :2] + pred[:, 2:]) - (true[:, :2] + true[:, 2:])) / 2).T)
    assert np.median(centre_err) < 3.0, np.median(centre_err)


def test_infer_cli_writes_json_and_overlays(tmp_path, fresh_scenes, capsys):
    paths = []
    for i in range(3):
        p = tmp_path / f"scene{i}.png"
        Image.fromarray(fresh_scenes.images[i]).save(p)
        paths.append(str(p))
    big = tmp_path / "big.png"  # another size: resized, boxes reported in its own pixels
    Image.fromarray(fresh_scenes.images[0]).resize((100, 100)).save(big)
    out_dir = tmp_path / "out"
    assert cli_main(["infer", *paths, str(big), "--out", str(out_dir)]) == 0
    record = json.loads((out_dir / "results.json").read_text())
    assert [r["count"] for r in record["images"][:3]] == [len(r["objects"]) for r in record["images"][:3]]
    small, large = record["images"][0], record["images"][3]
    assert large["size"] == [100, 100] and large["count"] == small["count"]
    if small["count"]:
        assert large["objects"][0]["box"][2] == pytest.approx(2 * small["objects"][0]["box"][2], abs=4)
    for r in record["images"]:
        with Image.open(r["overlay"]) as im:
            assert im.size[0] >= 300


def test_infer_cli_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert cli_main(["infer", str(bad), "--out", str(tmp_path)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_infer_cli_unknown_model(tmp_path, capsys):
    assert cli_main(["infer", "x.png", "--model", "nope"]) == 2
    assert "neither a pretrained model" in capsys.readouterr().err


def test_demo_runs_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INVERSE_GRAPHICS_DATA", str(tmp_path / "nowhere"))  # the demo needs no data files
    assert cli_main(["demo", "--out", str(tmp_path), "--n-tabletop", "2"]) == 0
    text = capsys.readouterr().out
    assert "count accuracy" in text and (tmp_path / "demo.png").stat().st_size > 5000
    assert "counts right:" in text and (tmp_path / "tabletop.png").stat().st_size > 5000  # the 3D part


def test_shipped_dair_model_loads_and_counts(fresh_scenes):
    dair = ig.load_pretrained("dair-multi-mnist")
    assert dair.config.difference_input and not dair.config.difference_memory and dair.config.max_steps == 4
    out = dair.infer(torch.from_numpy(fresh_scenes.float_images()))
    acc = (out.counts.numpy() == fresh_scenes.counts).mean()
    assert acc >= 0.94, f"count accuracy {acc:.3f} on 500 fresh scenes (benchmark: 97.02% on 10,000)"
