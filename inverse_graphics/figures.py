"""Figures: attention boxes over inputs with reconstructions, and learning curves."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STEP_COLOURS = ("tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple")


def attention_figure(images, result, path, truth=None, n: int = 8) -> Path:
    """Inputs with one box per inferred object (colour = step) above their reconstructions.

    images: FloatTensor (B, H, W); result: an InferenceResult for them; truth: optional true counts (B,).
    """
    n = min(n, images.shape[0])
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        ax = axes[0, i]
        ax.imshow(images[i].numpy(), cmap="gray", vmin=0, vmax=1)
        present = np.nonzero(result.z_pres[i].cpu().numpy() > 0.5)[0]
        for box, t in zip(result.boxes[i].cpu().numpy(), present):
            x0, y0, x1, y1 = box - 0.5  # pixel edges -> imshow's pixel-centre coordinates
            ax.add_patch(
                plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, color=STEP_COLOURS[t % len(STEP_COLOURS)])
            )
        title = f"n={int(result.counts[i])}"
        if truth is not None and truth[i] >= 0:
            title += f" (true {int(truth[i])})"
        ax.set_title(title, fontsize=8)
        axes[1, i].imshow(result.recon[i].cpu().clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("input + attention", fontsize=8)
    axes[1, 0].set_ylabel("reconstruction", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve_figure(runs: dict[str, list[dict]], path, thresholds=(0.95, 0.98)) -> Path:
    """Held-out count accuracy against training minutes, one line per run (label -> metrics records)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, records in runs.items():
        ev = [r for r in records if r.get("kind") == "eval"]
        ax.plot([r["train_time_s"] / 60 for r in ev], [r["count_acc"] for r in ev], label=label, lw=1.2)
    for th in thresholds:
        ax.axhline(th, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("training time (minutes, evaluation excluded)")
    ax.set_ylabel("held-out count accuracy")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
