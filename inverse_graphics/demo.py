"""`inverse-graphics demo`: compose multi-MNIST scenes from the bundled digits, run the shipped AIR, show counts;
then render a few scenes of a shipped 3D model's world (`--tabletop-model`: the kitchen world's `air-kitchen`, or the
primitives world's `air-tabletop`), infer them with that 3D AIR (with its render-and-compare refinement and
structure search) and show the inferred scenes re-rendered beside the inputs, with counts and poses against the
truth.

Needs no data files and no network: the digits are the 500-digit MNIST test sample inside the package, the worlds'
meshes ship with it, and its scenes are rendered on the spot.
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
    tabletop_model: str | None = "air-kitchen"  # shipped 3D model of the second part (None: the 2D part only)
    n_tabletop: int = 4  # scenes of its world, rendered under the world's randomised appearance


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
    result = {"count_acc": acc, "n": len(scored), "figure": str(path)}
    if cfg.tabletop_model and cfg.n_tabletop > 0:
        result["tabletop"] = tabletop_part(cfg)
    return result


def tabletop_part(cfg: DemoConfig) -> dict:
    """Scenes of the 3D model's world, inferred and re-rendered; prints counts and per-object errors."""
    from inverse_graphics.tabletop import world3d
    from inverse_graphics.tabletop.metrics3d import match_scene

    assert cfg.tabletop_model is not None  # main calls this part only with a model
    model = load_pretrained(cfg.tabletop_model, device=cfg.device)
    world = model.world
    truths = world.sample_scenes(cfg.n_tabletop, seed=cfg.seed)
    images = world.render_scenes(truths, randomize=True, seed=cfg.seed, backend="auto").to(cfg.device)
    t0 = time.perf_counter()
    out = model.infer(images)
    seconds = time.perf_counter() - t0
    renders = world3d.rerender(model, out.scenes)
    W, H = world.image_size
    look = "its randomised appearance" if world.randomize is not None else "its nominal appearance"
    print(f"\n{cfg.tabletop_model}: {cfg.n_tabletop} scenes of the {world.name!r} world ({W} x {H}, {look}), "
          f"inferred with at most {model.config.refine_steps} refinement iterations in {seconds:.1f} s")  # fmt: skip
    print(f"{'scene':>5}  {'true':>4}  {'inferred':>8}  objects (true -> inferred: position error, yaw error)")
    correct = 0
    for i, (truth, pred) in enumerate(zip(truths, out.scenes, strict=True)):
        m = match_scene(pred, truth, world=world)
        correct += m.n_true == m.n_pred
        cells = []
        for p in m.pairs:
            yaw = "any yaw" if p.yaw_error_deg is None else f"{p.yaw_error_deg:.1f} deg"
            cells.append(f"{p.true_shape} -> {p.pred_shape}: {p.position_error_mm:.1f} mm, {yaw}")
        mark = "" if m.n_true == m.n_pred else "   <- wrong"
        print(f"{i:>5}  {m.n_true:>4}  {m.n_pred:>8}  {'; '.join(cells) or '-'}{mark}")
    path = tabletop_figure(images.cpu(), renders.cpu(), truths, out.scenes, Path(cfg.out_dir) / "tabletop.png")
    print(f"counts right: {correct} of {cfg.n_tabletop}; figure: {path}")
    return {"counts_right": correct, "n": cfg.n_tabletop, "seconds": seconds, "figure": str(path)}


def tabletop_figure(images: torch.Tensor, renders: torch.Tensor, truths: list, preds: list, path: Path) -> Path:
    """Rows of (input, inferred scene re-rendered), titled with the true and inferred counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    fig, axes = plt.subplots(n, 2, figsize=(6.0, 2.3 * n), squeeze=False)
    for i in range(n):
        titles = (f"input: {len(truths[i]['objects'])} objects", f"inferred: {len(preds[i]['objects'])}, re-rendered")
        for ax, im, title in zip(axes[i], (images[i], renders[i]), titles, strict=True):
            ax.imshow(im.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
