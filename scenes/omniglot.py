"""Omniglot characters (Lake, Salakhutdinov & Tenenbaum 2015), found locally or downloaded and checksum-verified.

Two standard layouts are read, inside `<root>/omniglot/` (or `<root>/` itself), where the roots are searched as for
MNIST (`scenes.mnist.search_roots`: an explicit `data_dir`, then $INVERSE_GRAPHICS_DATA, then the cache):
  - npz (../shared/data/omniglot, from bitsandscraps/omniglot): `images_background.npz`, `images_evaluation.npz`,
    each holding `images`, bool (n_characters, 20, 105, 105), True = white background, False = ink, row c the
    character with global id c + FIRST_ID[split], column k drawer k + 1; plus `omniglot_alphabets.tsv` (columns
    split, alphabet, first_id, last_id, n_characters) for the alphabet of each id.
  - the official zips (brendenlake/omniglot, `python/`) or their extracted folders: `images_background.zip`,
    `images_evaluation.zip`, `images_background_small{1,2}.zip`, holding
    `<set>/<Alphabet>/characterNN/<id>_<drawer>.png`: 105x105 1-bit PNGs, white background, black strokes, `<id>`
    the global character id (1..1623), `<drawer>` 01..20.
The npz files are preferred when both are present (one file, a tenth of the zips' decoding time). Every file with a
known checksum is verified before use; a missing or corrupt file raises `DataNotFoundError` naming where it was
expected. `download()` fetches the official full zips into the cache.

Images are returned with the project's convention (docs/conventions.md): ink = 1 (or 255), background = 0, resized
by an exact area average (each output pixel is the ink fraction it covers) to `canvas_size`, default 50.
Why 50: strokes in the 105 px originals are ~5 px wide (median horizontal ink run), so at 50 px they stay ~2.4 px
wide with a solid core, while at 28 px (the size VAE papers use) they shrink to ~1.3 px of grey; 50 is also the
multi-MNIST canvas, so AIR's default architecture (20 px attention window) is reused unchanged. A character spans
~66 px of 105 (median height), i.e. ~31 px of 50. The AIR paper (Eslami et al. 2016, Sec. 3.1) does not state the
resolution it used for Omniglot.
Splits: the background set (30 alphabets, 964 characters) is for training, the evaluation set (20 alphabets,
659 characters, disjoint) for testing, as in the one-shot literature.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from scenes.mnist import DataNotFoundError, cache_dir, search_roots, sha256

SUBDIR = "omniglot"
SOURCE_SIZE = 105  # side of the original images, pixels
CANVAS_SIZE = 50  # default output side (see the module docstring)
DRAWERS = 20  # drawings of each character
SPLITS = ("background", "evaluation", "background_small1", "background_small2")
NPZ = {"background": "images_background.npz", "evaluation": "images_evaluation.npz"}
ALPHABETS_TSV = "omniglot_alphabets.tsv"
FIRST_ID = {"background": 1, "evaluation": 965}  # global id of an npz file's row 0
N_CHARACTERS = {"background": 964, "evaluation": 659, "background_small1": 136, "background_small2": 156}
SHA256 = {  # as stored in ../shared/data/omniglot (its README gives provenance)
    "images_background.npz": "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199",
    "images_evaluation.npz": "0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276",
    "omniglot_alphabets.tsv": "fe51d08a0a7d7ff99eff0f4c8603afb08bfc28fb9f94c1b6145523e0581282f7",
    "images_background_small1.zip": "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    "images_background_small2.zip": "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
}
MD5 = {  # the official full zips, as torchvision's Omniglot lists them (their sha256 is not recorded here)
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
PNG_PATH = re.compile(r"(?:^|/)([^/]+)/character(\d+)/(\d+)_(\d+)\.png$")  # alphabet, NN, global id, drawer


@dataclass(frozen=True)
class Omniglot:
    """N character images with their labels, ordered by character id, then drawer. S = canvas size.

    images: uint8 ndarray (N, S, S), 0 = background, 255 = ink (area-averaged from the 105 px original).
    alphabet: int64 ndarray (N,), index into `alphabets`.
    character: int64 ndarray (N,), the official global character id (1..1623).
    drawer: int64 ndarray (N,), 1..20.
    alphabets: the alphabet names (official folder names) of this split, in id order.
    """

    images: np.ndarray
    alphabet: np.ndarray
    character: np.ndarray
    drawer: np.ndarray
    alphabets: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.character)

    @property
    def counts(self) -> np.ndarray:
        """int64 (N,) of -1: the number of parts of a character is unknown (what `train` expects of such data)."""
        return np.full(len(self), -1, dtype=np.int64)

    def float_images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 (n, S, S) in [0, 1], ink = 1, for a slice of the images."""
        return self.images[start:stop].astype(np.float32) / 255.0

    def subset(self, index: np.ndarray) -> Omniglot:
        """The images at `index` (int ndarray (n,) or a boolean mask (N,)), labels alongside."""
        return Omniglot(
            self.images[index], self.alphabet[index], self.character[index], self.drawer[index], self.alphabets
        )


# ------------------------------------------------------------------------------------------------ finding files
def _file_name(split: str, kind: str) -> str:
    return NPZ[split] if kind == "npz" else f"images_{split}.zip" if kind == "zip" else f"images_{split}"


def find(split: str, data_dir: str | os.PathLike | None = None) -> tuple[str, Path]:
    """The best source of a split: ("npz" | "zip" | "dir", path); DataNotFoundError naming the expected paths."""
    roots = search_roots(data_dir)
    kinds = ("npz", "zip", "dir") if split in NPZ else ("zip", "dir")
    for root in roots:
        for kind in kinds:
            for folder in (root / SUBDIR, root):
                path = folder / _file_name(split, kind)
                if path.is_dir() if kind == "dir" else path.is_file():
                    return kind, path
    names = " or ".join(_file_name(split, k) + ("/" if k == "dir" else "") for k in kinds)
    where = ", ".join(str(r / SUBDIR) for r in roots)
    raise DataNotFoundError(
        f"Omniglot {split} set not found: expected {names} in {where} (or the same folder without 'omniglot/'). "
        f"Pass --data-dir, set INVERSE_GRAPHICS_DATA, or call scenes.omniglot.download() when online."
    )


def verify(path: Path) -> None:
    """Check a file against its known sha256 (or md5 for the official full zips); files of unknown name pass."""
    name = path.name
    if name in SHA256:
        digest, expected, algo = sha256(path), SHA256[name], "sha256"
    elif name in MD5:
        digest, expected, algo = _md5(path), MD5[name], "md5"
    else:
        return
    if digest != expected:
        raise DataNotFoundError(
            f"{path} fails its checksum ({algo} {digest}, expected {expected}): the file is corrupt or another "
            "version; delete it and fetch it again."
        )


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ reading
def area_weights(src: int, dst: int) -> np.ndarray:
    """float64 (dst, src): row i holds the fraction of output pixel i covered by each input pixel (rows sum to 1)."""
    edges = np.arange(dst + 1) * (src / dst)  # output pixel edges in input pixel units
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(src)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)  # (dst, src)
    return overlap / (src / dst)


def resize_ink(ink: np.ndarray, size: int, chunk: int = 2048) -> np.ndarray:
    """bool ndarray (N, 105, 105), True = ink -> uint8 (N, size, size), 255 * the ink fraction of each pixel.

    An exact area average (A @ x @ A^T with `area_weights`), so the ink mass is kept; PIL's BOX filter samples its
    kernel at pixel centres and misses it by ~1.5% at 105 -> 50.
    """
    n, src = ink.shape[0], ink.shape[-1]
    if size == src:
        return ink.astype(np.uint8) * 255
    A = area_weights(src, size).astype(np.float32)
    out = np.empty((n, size, size), dtype=np.uint8)
    for start in range(0, n, chunk):  # chunks: bounded float32 memory for the 19,280-image background set
        x = ink[start : start + chunk].astype(np.float32)
        out[start : start + chunk] = np.rint(255 * (A @ x @ A.T)).clip(0, 255).astype(np.uint8)  # (n, size, size)
    return out


def _read_alphabets(split: str, folder: Path) -> list[tuple[str, int, int]]:
    """(alphabet, first_id, last_id) of a split, from omniglot_alphabets.tsv beside the npz file."""
    path = folder / ALPHABETS_TSV
    if not path.is_file():
        raise DataNotFoundError(f"Omniglot alphabet table not found: expected {path} beside the npz files.")
    verify(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [(r["alphabet"], int(r["first_id"]), int(r["last_id"])) for r in rows if r["split"] == split]


def _load_npz(split: str, path: Path, size: int) -> Omniglot:
    verify(path)
    with np.load(path) as npz:
        background = npz["images"]  # bool (C, 20, 105, 105), True = white background
    C = background.shape[0]
    if background.shape != (N_CHARACTERS[split], DRAWERS, SOURCE_SIZE, SOURCE_SIZE):
        raise DataNotFoundError(f"{path} holds images of shape {background.shape}; is it the {split} set?")
    images = resize_ink(~background.reshape(C * DRAWERS, SOURCE_SIZE, SOURCE_SIZE), size)
    character = np.repeat(np.arange(C, dtype=np.int64) + FIRST_ID[split], DRAWERS)
    alphabets = _read_alphabets(split, path.parent)
    alphabet = np.full(len(character), -1, dtype=np.int64)
    for a, (_, first, last) in enumerate(alphabets):
        alphabet[(character >= first) & (character <= last)] = a
    drawer = np.tile(np.arange(1, DRAWERS + 1, dtype=np.int64), C)
    return Omniglot(images, alphabet, character, drawer, tuple(name for name, _, _ in alphabets))


def _png_entries(kind: str, path: Path) -> list[tuple[str, int, int, bytes]]:
    """(alphabet, global id, drawer, PNG bytes) of every character image in a zip or extracted folder."""
    entries = []
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                m = PNG_PATH.search(name)
                if m:
                    entries.append((m[1], int(m[3]), int(m[4]), zf.read(name)))
    else:
        for file in path.rglob("*.png"):
            m = PNG_PATH.search(file.as_posix())
            if m:
                entries.append((m[1], int(m[3]), int(m[4]), file.read_bytes()))
    return entries


def _load_pngs(split: str, kind: str, path: Path, size: int) -> Omniglot:
    if kind == "zip":
        verify(path)
    entries = sorted(_png_entries(kind, path), key=lambda e: (e[1], e[2]))
    if not entries:
        raise DataNotFoundError(f"{path} holds no <Alphabet>/characterNN/<id>_<drawer>.png images")
    ink = np.stack([~np.asarray(Image.open(io.BytesIO(e[3])).convert("1"), dtype=bool) for e in entries])
    names = sorted({e[0] for e in entries}, key=lambda a: min(e[1] for e in entries if e[0] == a))
    index = {name: i for i, name in enumerate(names)}
    return Omniglot(
        images=resize_ink(ink, size),
        alphabet=np.array([index[e[0]] for e in entries], dtype=np.int64),
        character=np.array([e[1] for e in entries], dtype=np.int64),
        drawer=np.array([e[2] for e in entries], dtype=np.int64),
        alphabets=tuple(names),
    )


def load(
    split: str = "background", data_dir: str | os.PathLike | None = None, canvas_size: int = CANVAS_SIZE
) -> Omniglot:
    """One Omniglot set: "background" (training), "evaluation" (testing), or a small official zip's subset.

    Returns an `Omniglot` at canvas_size x canvas_size, ink = 255. Raises DataNotFoundError, naming the expected
    paths, when the files are missing, corrupt (checksum) or of an unexpected shape.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind, path = find(split, data_dir)
    return _load_npz(split, path, canvas_size) if kind == "npz" else _load_pngs(split, kind, path, canvas_size)


def download(dest: str | os.PathLike | None = None, timeout: float = 120.0) -> Path:
    """Fetch the official full zips into `dest/omniglot` (default: the cache), verifying each md5; valid files are
    kept. Raises DataNotFoundError when the download or its checksum fails."""
    root = Path(dest) if dest is not None else cache_dir()
    folder = root / SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, digest in MD5.items():
        target = folder / name
        if target.is_file() and _md5(target) == digest:
            continue
        tmp = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(URL + name, timeout=timeout) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as err:
            raise DataNotFoundError(f"could not download {URL + name} ({err}); copy it by hand to {target}") from err
        if _md5(tmp) != digest:
            tmp.unlink()
            raise DataNotFoundError(f"{URL + name} failed its md5 check; copy the official file by hand to {target}")
        os.replace(tmp, target)
    return root
