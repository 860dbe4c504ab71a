"""Multi-MNIST: MNIST digits scattered on a 50x50 canvas (Eslami et al. 2016, Sec. 3.1; Pyro's recipe).

Recipe: the number of digits is drawn uniformly from `counts`; each 28x28 digit is resized to
int(28 / scale) pixels with scale ~ N(1.3, 0.1) (bilinear), placed with its square box uniformly at random fully
inside the canvas, and overlapping digits are summed and clipped to 255 (`overlap="clip"`, the default, as
DESIGN.md asks). Pyro's generator instead redraws a scene whose summed ink exceeds 255 anywhere
(`overlap="reject"`): that removes nearly every pair whose strokes cross, i.e. most pairs whose centres are within
~8 px, which are the scenes where counting is genuinely ambiguous. The paper's words are "non-overlapping" digits:
`overlap="separate"` reads them literally and redraws a scene while any two digits' ink bounding boxes (the nonzero
pixels of the resized digits) intersect, so neighbours never share a row and a column of ink. Benchmarks say which
rule they use.
Train scenes use MNIST train digits and test scenes MNIST test digits (the caller passes the `Digits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from scenes.mnist import Digits

CANVAS_SIZE = 50
DIGIT_SIZE = 28
SCALE_MEAN, SCALE_SD = 1.3, 0.1
MIN_SIZE = 8  # guard against the Gaussian's far tail
OVERLAP_RULES = ("clip", "reject", "separate")
MAX_REDRAWS = 10_000  # draws of one scene before "reject" / "separate" give up (3 separate digits need ~10)


@dataclass(frozen=True)
class MultiMnist:
    """N scenes with per-digit ground truth. M = max(counts).

    images: uint8 ndarray (N, H, W).
    counts: int64 ndarray (N,), digits in each scene.
    labels: int64 ndarray (N, M), digit classes, -1 for absent slots (in order of placement).
    boxes: float32 ndarray (N, M, 4), x0, y0, x1, y1 in pixels of each digit's resized 28x28 square, NaN when absent.
    """

    images: np.ndarray
    counts: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.counts)

    def float_images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 (n, H, W) in [0, 1] for a slice of the scenes."""
        return self.images[start:stop].astype(np.float32) / 255.0


def _intersect(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Whether two boxes (x0, y0, x1, y1), ends exclusive, share a pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _resize(digit: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint16)


def generate(
    digits: Digits,
    n: int,
    rng: np.random.Generator,
    counts: Sequence[int] = (0, 1, 2),
    canvas_size: int = CANVAS_SIZE,
    overlap: str = "clip",
) -> MultiMnist:
    """Compose `n` multi-MNIST scenes.

    Args:
        digits: the glyph source (MNIST train digits for training scenes, test digits for test scenes).
        n: number of scenes.
        rng: the only source of randomness.
        counts: the allowed digit counts, drawn uniformly (e.g. (0, 1, 3) for interpolation experiments).
        canvas_size: side of the square canvas in pixels.
        overlap: "clip" (sum and clip overlapping ink), "reject" (redraw scenes whose summed ink exceeds 255,
            as Pyro's examples/air does) or "separate" (redraw scenes where two digits' ink boxes intersect).
    """
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"overlap must be one of {OVERLAP_RULES}, got {overlap!r}")
    counts_arr = np.asarray(sorted(set(int(c) for c in counts)), dtype=np.int64)
    if len(counts_arr) == 0 or counts_arr.min() < 0:
        raise ValueError(f"counts must be a non-empty set of non-negative integers, got {counts}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    M = int(counts_arr.max())
    scene_counts = rng.choice(counts_arr, size=n)
    images = np.zeros((n, canvas_size, canvas_size), dtype=np.uint16)
    labels = np.full((n, M), -1, dtype=np.int64)
    boxes = np.full((n, M, 4), np.nan, dtype=np.float32)
    for i, k in enumerate(scene_counts):
        for _ in range(MAX_REDRAWS):
            images[i] = 0
            ink: list[tuple[int, int, int, int]] = []  # x0, y0, x1, y1 (exclusive) of each digit's nonzero pixels
            for j in range(k):
                idx = rng.integers(len(digits))
                scale = SCALE_MEAN + SCALE_SD * rng.standard_normal()
                size = int(np.clip(int(DIGIT_SIZE / max(scale, 1e-3)), MIN_SIZE, canvas_size))
                left, top = rng.integers(0, canvas_size - size + 1, size=2)
                glyph = _resize(digits.images[idx], size)
                images[i, top : top + size, left : left + size] += glyph
                labels[i, j] = digits.labels[idx]
                boxes[i, j] = (left, top, left + size, top + size)
                if overlap == "separate" and glyph.any():  # a blank glyph has no ink to keep apart
                    rows, cols = np.nonzero(glyph.any(1))[0], np.nonzero(glyph.any(0))[0]
                    ink.append((left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1))
            if overlap == "clip" or (overlap == "reject" and images[i].max() <= 255):
                break
            if overlap == "separate" and not any(_intersect(a, b) for j, a in enumerate(ink) for b in ink[:j]):
                break
        else:
            raise ValueError(
                f"overlap={overlap!r}: no scene of {k} digits on a {canvas_size}-pixel canvas passed the rule in "
                f"{MAX_REDRAWS} draws; use fewer digits, a larger canvas or overlap='clip'"
            )
    return MultiMnist(images=np.minimum(images, 255).astype(np.uint8), counts=scene_counts, labels=labels, boxes=boxes)
