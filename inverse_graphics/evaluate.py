"""`inverse-graphics eval`: count accuracy of a 2D model on held-out multi-MNIST scenes (MNIST test digits)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from inverse_graphics.air import AIR
from inverse_graphics.count_search import CountSearchConfig, search_counts
from inverse_graphics.pretrained import WEIGHTS, load, load_pretrained
from scenes import mnist, multi_mnist


@dataclass
class EvalConfig:
    """What to evaluate and on which scenes."""

    model: str = "air-multi-mnist"  # a pretrained name or a checkpoint path
    n: int = 10_000  # held-out scenes
    counts: tuple[int, ...] = (0, 1, 2)  # digit counts, drawn uniformly
    seed: int = 2016  # scene seed (the training runs' periodic evaluation uses the same one)
    overlap: str = "clip"  # "clip" (DESIGN.md) or "reject" (Pyro's generator); see scenes/multi_mnist.py
    data_dir: str | None = None  # MNIST location
    device: str = "cpu"
    batch_size: int = 1000
    # > 0: counts chosen by the model (inverse_graphics.count_search: every count refined for this many Adam steps
    # and scored by its importance-weighted bound) instead of the guide's; ~1 s per scene (T = 4, 200 steps, 1 thread)
    search_steps: int = 0


def load_model(name_or_path: str, device: str = "cpu") -> AIR:
    """A pretrained name (see inverse_graphics.pretrained.WEIGHTS) or a checkpoint path."""
    if name_or_path in WEIGHTS:
        return load_pretrained(name_or_path, device=device)
    if not os.path.exists(name_or_path):
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a pretrained model ({', '.join(sorted(WEIGHTS))}) nor a checkpoint file"
        )
    return load(name_or_path, device=device)


def count_accuracy(
    model: AIR,
    data: multi_mnist.MultiMnist,
    device: str = "cpu",
    batch_size: int = 1000,
    search: CountSearchConfig | None = None,
) -> dict:
    """Fraction of scenes whose inferred count equals the true count, overall and per true count.

    search: count the scenes by `count_search.search_counts` with this configuration instead of the guide."""
    predicted = []
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.float_images(start, start + batch_size)).to(device)
        if search is None:
            predicted.append(model.infer(x).counts.cpu().numpy())
        else:
            predicted.append(search_counts(model, x, search).counts.cpu().numpy())
            print(f"count search: {min(start + batch_size, len(data))}/{len(data)} scenes", flush=True)
    pred = np.concatenate(predicted)
    per_count = {int(c): float((pred[data.counts == c] == c).mean()) for c in np.unique(data.counts)}
    confusion = {
        f"{int(t)}->{int(p)}": int(((data.counts == t) & (pred == p)).sum())
        for t in np.unique(data.counts)
        for p in np.unique(pred)
    }
    return {
        "count_acc": float((pred == data.counts).mean()),
        "per_count": per_count,
        "confusion": confusion,
        "n": len(data),
    }


def main(cfg: EvalConfig) -> dict:
    model = load_model(cfg.model, cfg.device)
    if not isinstance(model, AIR):
        raise ValueError(
            f"`eval` scores multi-MNIST models; {cfg.model!r} is a tabletop model: "
            "score it with `python -m benchmarks.bench_tabletop --air/--supervised MODEL`"
        )
    digits = mnist.load_digits("test", cfg.data_dir)
    data = multi_mnist.generate(digits, cfg.n, np.random.default_rng(cfg.seed), cfg.counts, overlap=cfg.overlap)
    t0 = time.perf_counter()
    search = CountSearchConfig(steps=cfg.search_steps) if cfg.search_steps > 0 else None
    batch = cfg.batch_size if search is None else min(cfg.batch_size, search.batch_size)
    rec = count_accuracy(model, data, cfg.device, batch, search)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    rec["model"] = cfg.model
    rec["overlap"] = cfg.overlap
    rec["search_steps"] = cfg.search_steps
    return rec
