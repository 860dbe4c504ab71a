"""`inverse-graphics eval`: count accuracy of a 2D model on held-out multi-MNIST scenes (MNIST test digits), or
the comparison table of tabletop models (3D AIR, the supervised regressor) on held-out scenes of a World."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from inverse_graphics.air import AIR
from inverse_graphics.count_search import CountSearchConfig, search_counts
from inverse_graphics.pretrained import WEIGHTS, load, load_pretrained
from inverse_graphics.tabletop.metrics3d import evaluate_method
from scenes import mnist, multi_mnist


@dataclass
class EvalConfig:
    """What to evaluate and on which scenes."""

    model: str = "air-multi-mnist"  # a pretrained name or a checkpoint path
    n: int | None = None  # held-out scenes (None: 10,000 for 2D models, 1,000 for tabletop models)
    counts: tuple[int, ...] = (0, 1, 2)  # digit counts, drawn uniformly
    seed: int = 2016  # scene seed (the training runs' periodic evaluation uses the same one)
    overlap: str = "clip"  # "clip" (DESIGN.md) or "reject" (Pyro's generator); see scenes/multi_mnist.py
    data_dir: str | None = None  # MNIST location
    device: str = "cpu"
    batch_size: int = 1000
    # > 0: counts chosen by the model (inverse_graphics.count_search: every count refined for this many Adam steps
    # and scored by its importance-weighted bound) instead of the guide's; ~1 s per scene (T = 4, 200 steps, 1 thread)
    search_steps: int = 0
    # tabletop models: more models scored beside `model` on the same scenes, the world of those scenes (a name or a
    # file; None: the model's own) and refinement steps (None: each model's default; 0: none)
    compare: tuple[str, ...] = ()
    world: str | None = None
    refine: int | None = None


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
        return main_tabletop(cfg, model)
    if cfg.compare or cfg.world is not None or cfg.refine is not None:
        raise ValueError("--compare, --world and --refine apply to tabletop models")
    digits = mnist.load_digits("test", cfg.data_dir)
    n = 10_000 if cfg.n is None else cfg.n
    data = multi_mnist.generate(digits, n, np.random.default_rng(cfg.seed), cfg.counts, overlap=cfg.overlap)
    t0 = time.perf_counter()
    search = CountSearchConfig(steps=cfg.search_steps) if cfg.search_steps > 0 else None
    batch = cfg.batch_size if search is None else min(cfg.batch_size, search.batch_size)
    rec = count_accuracy(model, data, cfg.device, batch, search)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    rec["model"] = cfg.model
    rec["overlap"] = cfg.overlap
    rec["search_steps"] = cfg.search_steps
    return rec


TABLE_COLUMNS = (  # (summary key, column title, format)
    ("count_acc", "count", "{:.1%}"),
    ("identity_acc", "identity", "{:.1%}"),
    ("position_error_mm_median", "position mm", "{:.1f}"),
    ("yaw_error_deg_median", "yaw deg", "{:.1f}"),
    ("mssd_mm_median", "MSSD mm", "{:.1f}"),
    ("images_per_s", "images/s", "{:.1f}"),
)


def comparison_table(rows: dict[str, dict]) -> str:
    """A markdown table, one row per model: count and identity accuracy, median position error, symmetry-reduced
    yaw error and MSSD (metrics3d.summarize), and prediction speed."""
    head = "| model | " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |"
    lines = [head, "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name, rec in rows.items():
        cells = [("-" if rec.get(k) is None else fmt.format(rec[k])) for k, _, fmt in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_tabletop(cfg: EvalConfig, model) -> dict:
    """Every tabletop model of `cfg` (model, then compare) on the same held-out scenes of one World (data3d's
    held-out seed): the metrics of `metrics3d.evaluate_method` per model and their comparison table. A model of
    another world than the scenes' is refused: its object names, camera and image size would not fit them (a world
    differing only in its training-only [randomize] ranges is the same world here: `World.same_scenes`)."""
    from inverse_graphics.tabletop.data3d import held_out_renders
    from scenes.world import load_world

    world = load_world(cfg.world) if cfg.world is not None else model.world
    models = {cfg.model: model} | {name: load_model(name, cfg.device) for name in cfg.compare}
    for name, m in models.items():
        if isinstance(m, AIR):
            raise ValueError(f"{name!r} is a multi-MNIST model; --compare takes tabletop models")
        if not m.world.same_scenes(world):
            theirs = f"world {m.world.name!r}, not for the scenes' world {world.name!r}"
            raise ValueError(f"{name!r} was trained for {theirs} (same name, other contents if the names agree)")
    n = 1000 if cfg.n is None else cfg.n
    data = held_out_renders(n, world=world, backend="auto")
    images = data.images.float().div(255.0).to(cfg.device)
    rows = {}
    for name, m in models.items():
        predict = _tabletop_predict(m, cfg.refine)
        rows[name] = evaluate_method(predict, images, data.scenes, batch_size=min(cfg.batch_size, 64), world=world)
        print(f"{name}: count {rows[name]['count_acc']:.1%}", flush=True)
    table = comparison_table(rows)
    print(table)
    return {"world": world.name, "n": n, "refine": cfg.refine, "models": rows, "table": table}


def _tabletop_predict(model, refine: int | None):
    from tqdm import tqdm

    bar = tqdm(desc="eval", unit="image", dynamic_ncols=True)

    def predict(x: torch.Tensor) -> list[dict]:
        out = model.infer(x, refine=refine)
        bar.update(len(x))
        return out.scenes

    return predict
