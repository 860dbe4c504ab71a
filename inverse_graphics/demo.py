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
    data = multi_mnist.generate(digits, max(cfg.n, cfg.n_score), np.random.default_rng(cfg.seed))
    x = torch.from_numpy(data.float_images()).to(cfg.device)
    t0 = time.perf_counter()
    out = model.infer(x, reconstruct=True)
    seconds = time.perf_counter() - t0
    counts = out.counts.cpu().numpy()
    print(f"{'scene':>5}  {'true':>4}  {'inferred':>8}  boxes (x0, y0, x1, y1 px)")
    for i in range(cfg.n):
        boxes = "  ".join("(" + ", ".join(f"{v:.0f}" for v in b.tolist()) + ")" for b in out.boxes[i])
        mark = "" if counts[i] == data.counts[i] else "   <- wrong"
        print(f"{i:>5}  {data.counts[i]:>4}  {counts[i]:>8}  {boxes}{mark}")
    acc = float((counts == data.counts).mean())
    print(
        f"count accuracy on {len(data)} scenes from the bundled MNIST test digits: {acc:.1%} "
        f"({len(data) / seconds:,.0f} images/s)"
    )
    first = slice(0, cfg.n)
    assert out.recon is not None
    sub = type(out)(
        out.counts[first],
        out.z_pres[first],
        out.z_where[first],
        out.z_what[first],
        out.pres_prob[first],
        out.boxes[first],
        out.recon[first],
    )
    path = attention_figure(x[first].cpu(), sub, Path(cfg.out_dir) / "demo.png", truth=data.counts[first], n=cfg.n)
    print(f"figure: {path}")
    return {"count_acc": acc, "n": len(data), "figure": str(path)}
