"""MNIST digits from the original IDX files (LeCun & Cortes), found locally or downloaded and checksum-verified.

Where the files are looked for, in order (first hit wins, file by file):
  1. an explicit `data_dir` argument (the CLI's `--data-dir`), when given;
  2. the environment variable `INVERSE_GRAPHICS_DATA`, when set;
  3. the cache directory `$XDG_CACHE_HOME/inverse_graphics` (default `~/.cache/inverse_graphics`).
Inside a root, a file may sit at `<root>/mnist/<name>`, `<root>/MNIST/raw/<name>` (torchvision's layout) or
`<root>/<name>`, gzipped or not. `download()` fetches the official files into the cache and verifies them.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import urllib.request
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

ENV_VAR = "INVERSE_GRAPHICS_DATA"
FILES = {
    # split: (images file, labels file)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SHA256 = {  # of the gzipped files, as distributed (same as torchvision's md5-verified copies)
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/")
COUNTS = {"train": 60_000, "test": 10_000}
SAMPLE_RESOURCE = "mnist_sample.npz"  # bundled: the first 500 test digits (see scenes/data/README.md)


class DataNotFoundError(FileNotFoundError):
    """Raised when a dataset file is missing or corrupt; the message says where it was expected."""


@dataclass(frozen=True)
class Digits:
    """A set of MNIST digits.

    images: uint8 ndarray (N, 28, 28), 0 = background, 255 = ink.
    labels: int64 ndarray (N,), 0..9.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "inverse_graphics"


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for data files, in order: `data_dir`, $INVERSE_GRAPHICS_DATA, the cache."""
    roots = [] if data_dir is None else [Path(data_dir)]
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    roots.append(cache_dir())
    return roots


def _candidates(root: Path, name: str) -> list[Path]:
    raw = name[:-3]
    return [d / n for d in (root / "mnist", root / "MNIST" / "raw", root) for n in (name, raw)]


def find_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of an MNIST file (gzipped or raw) in the search roots, or a DataNotFoundError naming them."""
    roots = search_roots(data_dir)
    for root in roots:
        for path in _candidates(root, name):
            if path.is_file():
                return path
    where = ", ".join(str(r / "mnist" / name) for r in roots)
    raise DataNotFoundError(
        f"MNIST file {name} not found. Expected it at {where} (or the same folder without 'mnist/', or raw, "
        f"un-gzipped). Pass --data-dir, set {ENV_VAR}, or run `inverse-graphics data download` when online."
    )


def _read_idx(path: Path, magic: int, expected_count: int | None) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip raises zlib.error for a corrupt deflate stream
        raise DataNotFoundError(f"{path} is unreadable or corrupt ({err}); delete it and fetch it again.") from err
    if len(data) < 8 or int.from_bytes(data[:4], "big") != magic:
        raise DataNotFoundError(f"{path} is not an IDX file with magic number {magic}; is it corrupt?")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    size = math.prod(dims)
    if len(data) - offset != size or (expected_count is not None and dims[0] != expected_count):
        raise DataNotFoundError(
            f"{path} holds {len(data) - offset} bytes for dims {dims}; expected {expected_count} items. "
            "The file is truncated or corrupt; delete it and fetch it again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_digits(split: str = "train", data_dir: str | os.PathLike | None = None) -> Digits:
    """Read one split ("train" or "test") of MNIST from the IDX files.

    Raises DataNotFoundError, naming the expected paths, when the files are missing, truncated or corrupt.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    images_name, labels_name = FILES[split]
    images = _read_idx(find_file(images_name, data_dir), 2051, COUNTS[split])
    labels = _read_idx(find_file(labels_name, data_dir), 2049, COUNTS[split])
    return Digits(images=images.copy(), labels=labels.astype(np.int64))


def load_sample() -> Digits:
    """The small bundled sample (500 MNIST test digits), for the demo and first runs with no data or network."""
    with resources.files("scenes.data").joinpath(SAMPLE_RESOURCE).open("rb") as f:
        npz = np.load(f)
        return Digits(images=npz["images"], labels=npz["labels"].astype(np.int64))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(dest: str | os.PathLike | None = None, timeout: float = 60.0) -> Path:
    """Fetch the four official files into `dest/mnist` (default: the cache), verifying each sha256.

    Files already present and valid are kept. Raises DataNotFoundError when no mirror answers or a checksum fails.
    """
    root = Path(dest) if dest is not None else cache_dir()
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for name, digest in SHA256.items():
        target = folder / name
        if target.is_file() and sha256(target) == digest:
            continue
        errors = []
        for mirror in MIRRORS:
            tmp = target.with_suffix(".part")
            try:
                with urllib.request.urlopen(mirror + name, timeout=timeout) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as err:
                errors.append(f"{mirror}: {err}")
                continue
            if sha256(tmp) != digest:
                tmp.unlink()
                errors.append(f"{mirror}: checksum mismatch")
                continue
            os.replace(tmp, target)
            break
        else:
            raise DataNotFoundError(
                f"could not download {name} ({'; '.join(errors)}). Copy the file by hand to {target}."
            )
    return root
