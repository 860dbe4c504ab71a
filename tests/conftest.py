"""One testing kit: seeding, `assert_close` with a useful message, data location, GPU skips."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests read the real MNIST/Omniglot files from ../shared/data unless the environment says otherwise.
if "INVERSE_GRAPHICS_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["INVERSE_GRAPHICS_DATA"] = str(SHARED_DATA)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_dir() -> Path:
    path = Path(os.environ.get("INVERSE_GRAPHICS_DATA", SHARED_DATA))
    if not (path / "mnist").is_dir():
        pytest.skip(f"MNIST files not found under {path}")
    return path


def assert_close(actual, expected, atol: float = 1e-6, rtol: float = 1e-5, msg: str = "") -> None:
    """Like torch.testing.assert_close, but always reports the largest difference and where it is."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    tol = atol + rtol * expected.abs()
    if (diff > tol).any():
        where = np.unravel_index(int(torch.argmax(diff - tol)), tuple(diff.shape)) if diff.dim() else ()
        raise AssertionError(
            f"{msg} max |diff| {diff.max().item():.3g} at {tuple(int(i) for i in where)}: "
            f"actual {actual[where].item():.6g}, expected {expected[where].item():.6g} (atol {atol}, rtol {rtol})"
        )
