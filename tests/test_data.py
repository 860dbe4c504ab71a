"""MNIST reader (real files), its errors, the bundled sample, and the multi-MNIST generator."""

import gzip
import shutil

import numpy as np
import pytest
from PIL import Image

from scenes import mnist, multi_mnist


def test_reads_real_mnist_test_split(data_dir):
    d = mnist.load_digits("test", data_dir)
    assert d.images.shape == (10_000, 28, 28) and d.images.dtype == np.uint8
    assert d.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first test labels
    assert np.bincount(d.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_environment_variable_and_raw_files(tmp_path, data_dir, monkeypatch):
    # Un-gzipped files in torchvision's layout, found through the environment variable.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in mnist.FILES["test"]:
        with gzip.open(data_dir / "mnist" / name) as src, open(raw / name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path))
    assert len(mnist.load_digits("test")) == 10_000


def test_missing_files_name_the_expected_path(tmp_path, monkeypatch):
    monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path / "env"))  # searched after data_dir: empty here too
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(mnist.DataNotFoundError, match=str(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz")):
        mnist.load_digits("test", tmp_path)


def test_truncated_file_is_reported(tmp_path, data_dir):
    (tmp_path / "mnist").mkdir()
    for name in mnist.FILES["test"]:
        shutil.copy(data_dir / "mnist" / name, tmp_path / "mnist" / name)
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(mnist.DataNotFoundError, match="corrupt"):
        mnist.load_digits("test", tmp_path)


def test_shared_files_match_published_checksums(data_dir):
    for name, digest in mnist.SHA256.items():
        assert mnist.sha256(data_dir / "mnist" / name) == digest


def test_bundled_sample():
    d = mnist.load_sample()
    assert d.images.shape == (500, 28, 28) and d.labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        mnist.load_digits("validation")


def test_multi_mnist_recipe():
    digits = mnist.load_sample()
    data = multi_mnist.generate(digits, 3000, np.random.default_rng(0), counts=(0, 1, 3))
    assert data.images.shape == (3000, 50, 50) and data.images.dtype == np.uint8
    assert set(np.unique(data.counts)) == {0, 1, 3}
    assert abs((data.counts == 3).mean() - 1 / 3) < 0.04  # uniform over the allowed counts
    assert data.labels.shape == (3000, 3) and data.boxes.shape == (3000, 3, 4)
    present = data.labels >= 0
    assert (present.sum(1) == data.counts).all()
    assert np.isnan(data.boxes[~present]).all()
    b = data.boxes[present]
    sides = b[:, 2] - b[:, 0]
    assert (sides == b[:, 3] - b[:, 1]).all() and (b[:, :2] >= 0).all() and (b[:, 2:] <= 50).all()
    # side = int(28 / s), s ~ N(1.3, 0.1): mean about 21.4 px
    assert 20.5 < sides.mean() < 22.5
    assert (data.images[data.counts == 0] == 0).all()
    # every digit's ink lies inside its box
    i = int(np.nonzero(data.counts == 1)[0][0])
    x0, y0, x1, y1 = data.boxes[i, 0].astype(int)
    inside = np.zeros((50, 50), bool)
    inside[y0:y1, x0:x1] = True
    assert data.images[i][~inside].max() == 0 and data.images[i][inside].max() > 100


def test_multi_mnist_is_deterministic_per_seed():
    digits = mnist.load_sample()
    a = multi_mnist.generate(digits, 50, np.random.default_rng(7))
    b = multi_mnist.generate(digits, 50, np.random.default_rng(7))
    c = multi_mnist.generate(digits, 50, np.random.default_rng(8))
    assert (a.images == b.images).all() and not (a.images == c.images).all()


def test_multi_mnist_bad_counts():
    with pytest.raises(ValueError, match="counts"):
        multi_mnist.generate(mnist.load_sample(), 5, np.random.default_rng(0), counts=())


def test_reject_mode_removes_crossing_strokes():
    # Pyro's rule redraws scenes whose summed ink exceeds 255: nearly coincident digit pairs disappear.
    digits = mnist.load_sample()
    close = {}
    for mode in ("clip", "reject"):
        data = multi_mnist.generate(digits, 600, np.random.default_rng(1), counts=(2,), overlap=mode)
        centres = (data.boxes[:, :, :2] + data.boxes[:, :, 2:]) / 2  # (N, 2, 2)
        close[mode] = (np.abs(centres[:, 0] - centres[:, 1]).max(1) < 4).mean()
    assert close["clip"] > 0.01 and close["reject"] < close["clip"] / 5, close
    with pytest.raises(ValueError, match="overlap"):
        multi_mnist.generate(digits, 1, np.random.default_rng(0), overlap="maybe")


def test_separate_mode_keeps_ink_boxes_apart():
    # Glyphs whose ink is a faint block in the middle of the 28x28 square: "reject" lets such blocks overlap (their
    # sum stays under 255), "separate" must not. Each digit's ink box is recomputed from its square box alone.
    glyph = np.zeros((28, 28), np.uint8)
    glyph[9:19, 11:17] = 100
    digits = mnist.Digits(images=np.repeat(glyph[None], 4, 0), labels=np.arange(4))

    def ink_box(square):
        x0, y0, x1, y1 = (int(v) for v in square)
        ys, xs = np.nonzero(np.asarray(Image.fromarray(glyph).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)))
        return x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1

    def any_intersect(scene_boxes):
        ink = [ink_box(b) for b in scene_boxes]
        return any(
            a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3] for i, a in enumerate(ink) for b in ink[:i]
        )

    touching = {}
    for mode in ("reject", "separate"):
        data = multi_mnist.generate(digits, 200, np.random.default_rng(2), counts=(3,), overlap=mode)
        touching[mode] = np.mean([any_intersect(boxes) for boxes in data.boxes])
    assert touching["reject"] > 0.3 and touching["separate"] == 0, touching


@pytest.mark.parametrize("overlap", ["reject", "separate"])
def test_impossible_scenes_fail_clearly_instead_of_looping(overlap):
    with pytest.raises(ValueError, match="passed the rule"):
        multi_mnist.generate(mnist.load_sample(), 1, np.random.default_rng(0), counts=(12,), overlap=overlap)
