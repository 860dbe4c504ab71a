"""The Omniglot loader on the shared files: both layouts agree, labels, ink convention, resizing, clear errors."""

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from scenes import omniglot
from scenes.mnist import DataNotFoundError
from tests.conftest import SHARED_DATA, assert_close


@pytest.fixture(scope="module")
def omniglot_root() -> Path:
    path = Path(os.environ.get("INVERSE_GRAPHICS_DATA", SHARED_DATA))
    if not (path / "omniglot" / "images_background.npz").is_file():
        pytest.skip(f"Omniglot files not found under {path / 'omniglot'}")
    return path


@pytest.fixture(scope="module")
def background(omniglot_root) -> omniglot.Omniglot:
    return omniglot.load("background", omniglot_root)


def test_background_set_is_the_full_training_split(background):
    assert background.images.shape == (19_280, 50, 50) and background.images.dtype == np.uint8
    assert len(background.alphabets) == 30 and background.alphabets[0] == "Arcadian"
    assert background.character.min() == 1 and background.character.max() == 964
    assert (np.bincount(background.character)[1:] == 20).all()  # 20 drawers per character
    assert background.alphabet.min() == 0 and background.alphabet.max() == 29
    assert (background.counts == -1).all()  # parts per character are unknown (what `train` expects)
    # ink = 1 on a black background: a character covers a small part of its canvas
    x = background.float_images(0, 500)
    assert x.dtype == np.float32 and 0.03 < x.mean() < 0.15 and x.max() == 1.0
    assert (x[:, 0, :] == 0).mean() > 0.9  # the border is background


def test_evaluation_set_is_disjoint_and_labelled(omniglot_root, background):
    ev = omniglot.load("evaluation", omniglot_root)
    assert len(ev) == 13_180 and len(ev.alphabets) == 20
    assert ev.character.min() == 965 and ev.character.max() == 1623
    assert not set(ev.alphabets) & set(background.alphabets)


def test_zip_layout_matches_npz(omniglot_root, background):
    """The official zip layout and the npz hold the same pixels and labels (the shared README checked this for all
    5,840 small-zip PNGs at 105 px; here through both readers, after resizing)."""
    small = omniglot.load("background_small1", omniglot_root)
    assert len(small) == 2720 and small.alphabets == ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")
    row = (small.character - 1) * 20 + (small.drawer - 1)  # the npz order: character-major, then drawer
    assert (background.character[row] == small.character).all() and (background.drawer[row] == small.drawer).all()
    assert np.array_equal(background.images[row], small.images)
    names = np.array(background.alphabets)[background.alphabet[row]]
    assert (names == np.array(small.alphabets)[small.alphabet]).all()


def test_extracted_folder_layout(omniglot_root, tmp_path):
    src = omniglot_root / "omniglot" / "images_background_small1.zip"
    with zipfile.ZipFile(src) as zf:
        members = [n for n in zf.namelist() if "/Greek/character0" in n and n.endswith(".png")][:30]
        zf.extractall(tmp_path / "omniglot", members)
    data = omniglot.load("background_small1", tmp_path, canvas_size=105)
    assert len(data) == 30 and data.alphabets == ("Greek",)
    assert set(np.unique(data.images)) <= {0, 255}  # no resizing at 105 px: the 1-bit originals


def test_area_weights_match_supersampling():
    """Slow reference: repeat each input pixel `dst` times, then average blocks of `src` sub-pixels: exactly the
    area average in 1D (and the 2D resize is separable)."""
    rng = np.random.default_rng(1)
    for src, dst in [(105, 50), (105, 28), (7, 3)]:
        v = rng.random(src)
        reference = np.repeat(v, dst).reshape(dst, src).mean(1)
        assert_close(omniglot.area_weights(src, dst) @ v, reference, atol=1e-12)


def test_resize_keeps_ink_mass():
    rng = np.random.default_rng(0)
    ink = rng.random((4, 105, 105)) < 0.1
    ink[0] = True
    out = omniglot.resize_ink(ink, 50).astype(np.float64) / 255
    assert (out[0] == 1).all()
    scale = (105 / 50) ** 2  # one output pixel covers this many input pixels
    assert_close(out.sum((1, 2)) * scale, ink.sum((1, 2)), rtol=0.01, atol=0)


def test_missing_files_name_the_expected_path(tmp_path, monkeypatch):
    monkeypatch.delenv("INVERSE_GRAPHICS_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="images_background.npz") as err:
        omniglot.load("background", tmp_path)
    assert str(tmp_path / "omniglot") in str(err.value)


def test_environment_variable_is_searched(omniglot_root, monkeypatch):
    monkeypatch.setenv("INVERSE_GRAPHICS_DATA", str(omniglot_root))
    kind, path = omniglot.find("evaluation")
    assert kind == "npz" and path == omniglot_root / "omniglot" / "images_evaluation.npz"


def test_corrupt_file_fails_its_checksum(omniglot_root, tmp_path):
    folder = tmp_path / "omniglot"
    folder.mkdir()
    shutil.copy(omniglot_root / "omniglot" / omniglot.ALPHABETS_TSV, folder)
    data = bytearray((omniglot_root / "omniglot" / "images_evaluation.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "images_evaluation.npz").write_bytes(bytes(data))
    with pytest.raises(DataNotFoundError, match="fails its checksum"):
        omniglot.load("evaluation", tmp_path)


def test_missing_alphabet_table_is_named(omniglot_root, tmp_path):
    folder = tmp_path / "omniglot"
    folder.mkdir()
    shutil.copy(omniglot_root / "omniglot" / "images_evaluation.npz", folder)
    with pytest.raises(DataNotFoundError, match=omniglot.ALPHABETS_TSV):
        omniglot.load("evaluation", tmp_path)


def test_subset_keeps_labels_aligned(background):
    part = background.subset(np.array([0, 25, 19_279]))
    assert len(part) == 3 and list(part.character) == [1, 2, 964] and list(part.drawer) == [1, 6, 20]
    assert np.array_equal(part.images[1], background.images[25])
