"""`inverse-graphics demo`: compose multi-MNIST scenes from the bundled digits, run the shipped AIR, show counts.

Needs no data files and no network: the digits are the 500-digit MNIST test sample inside the package.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inverse_graphics.figures import attention_figure
from inverse_graphics.pretrained import load_pretrained
from scenes import mnist, multi_mnist


@dataclass
class DemoConfig:
    """The demo's embedded defaults."""

    n: int = 8  # scenes in the figure and the printed table
    n_score: int = 500  # scenes scored for the accuracy line (fast: amortised inference)
    seed: int = 0  # scene seed
    out_dir: str = "out/demo"  # receives demo.png
    device: str = "cpu"
    model: str = "air-multi-mnist"  # shipped weights


def main(cfg: DemoConfig) -> dict:
    if cfg.n < 1:
        raise ValueError(f"--n must be at least 1, got {cfg.n}")
    model = load_pretrained(cfg.model, device=cfg.device)
    digits = mnist.load_sample()
    rng = np.random.default_rng(cfg.seed)
    # Pyro's scene rule (no crossing strokes), as the shipped model's benchmark; see scenes/multi_mnist.py.
    shown = multi_mnist.generate(digits, cfg.n, rng, counts=(1, 2), overlap="reject")
    scored = multi_mnist.generate(digits, cfg.n_score, rng, overlap="reject")
    x = torch.from_numpy(shown.float_images()).to(cfg.device)
    out = model.infer(x, reconstruct=True)
    counts = out.counts.cpu().numpy()
    print(f"{'scene':>5}  {'true':>4}  {'inferred':>8}  boxes (x0, y0, x1, y1 px)")
    for i in range(cfg.n):
        boxes = "  ".join("(" + ", ".join(f"{v:.0f}" for v in b.tolist()) + ")" for b in out.boxes[i])
        mark = "" if counts[i] == shown.counts[i] else "   <- wrong"
        print(f"{i:>5}  {shown.counts[i]:>4}  {counts[i]:>8}  {boxes}{mark}")
    xs = torch.from_numpy(scored.float_images()).to(cfg.device)
    model.infer(xs[:64])  # warm-up, so that the rate below is the steady one
    t0 = time.perf_counter()
    acc = float((model.infer(xs).counts.cpu().numpy() == scored.counts).mean())
    rate = len(scored) / (time.perf_counter() - t0)
    print(
        f"count accuracy on {len(scored)} more scenes (0-2 digits) from the bundled MNIST test digits: {acc:.1%} "
        f"({rate:,.0f} images/s on {cfg.device})"
    )
    path = attention_figure(x.cpu(), out, Path(cfg.out_dir) / "demo.png", truth=shown.counts, n=cfg.n)
    print(f"figure: {path}")
    return {"count_acc": acc, "n": len(scored), "figure": str(path)}
