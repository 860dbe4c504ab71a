"""A quick A/B probe of `infer` (the structure search above all): counts on a few dozen scenes under shifts.

`bench_world` is the benchmark of record (held-out scenes, every condition, both methods, pyrender, speed). This
probe is for comparing two versions of the search side by side in minutes: the model's default `infer` on `--n`
scenes drawn by the world's sampler (`sample_scenes(n, seed)`), nominal renders shifted by `bench_world.shifted`
(its conditions, by name), and for each condition the count, identity, median position and yaw, and every scene
whose count is wrong (true and inferred object names). Run it once per version (e.g. from two git worktrees) and
compare the totals: on 48 scenes one scene is 2.1 points, so only differences of several scenes over the
conditions together say much.

    python -m benchmarks.search_probe --model air-kitchen --n 48 --conditions clean "world's randomisation" \\
        "colours jittered" "light 30 deg" "jpeg q75" --name search_probe
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_world import CONDITIONS, fmt, shifted
from benchmarks.common import RESULTS, markdown_table, write_results
from inverse_graphics.evaluate import load_model
from inverse_graphics.tabletop.metrics3d import match_scene, summarize

DEFAULT_CONDITIONS = ("clean", "world's randomisation", "colours jittered", "light 30 deg", "jpeg q75")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="air-kitchen", help="a shipped name or a checkpoint path (a tabletop model)")
    p.add_argument("--n", type=int, default=48, help="scenes per condition")
    p.add_argument("--seed", type=int, default=7, help="the sampler's seed (the shifts use seed + 100)")
    p.add_argument("--conditions", nargs="+", default=list(DEFAULT_CONDITIONS),
                   help=f"'clean' or bench_world's: {', '.join(CONDITIONS)}")  # fmt: skip
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="search_probe")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    bad = [c for c in args.conditions if c != "clean" and c not in CONDITIONS]
    if bad:
        p.error(f"unknown conditions {bad}; choose from 'clean' and {list(CONDITIONS)}")
    return args


def names(scene: Any) -> list[str]:
    return sorted(o["shape"] for o in (scene.to_dict() if hasattr(scene, "to_dict") else scene)["objects"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model: Any = load_model(args.model)
    world = model.world
    scenes = world.sample_scenes(args.n, seed=args.seed)
    clean = world.render_scenes(scenes).clamp(0, 1)
    rows, table = [], []
    for condition in args.conditions:
        images = clean if condition == "clean" else shifted(world, scenes, clean, condition, args.seed + 100)
        start, preds = time.perf_counter(), []
        for i in range(0, args.n, args.batch):
            preds.extend(model.infer(images[i : i + args.batch]).scenes)
        ms = 1000 * (time.perf_counter() - start) / args.n
        s = summarize([match_scene(p, t, None, world) for p, t in zip(preds, scenes)], world)
        pairs = [(k, names(t), names(p)) for k, (p, t) in enumerate(zip(preds, scenes))]
        wrong = [(k, true, got) for k, true, got in pairs if len(true) != len(got)]
        for k, true, got in wrong:
            print(f"  {condition}: scene {k}: true {true}, inferred {got}")
        right = args.n - len(wrong)
        print(f"{condition}: {right}/{args.n} counts right, identity {fmt(s['identity_acc'], '.1%')}, "
              f"{ms:.0f} ms an image", flush=True)  # fmt: skip
        rows.append({"condition": condition, "counts_right": right, "n": args.n, "ms_per_image": ms,
                     "wrong": [{"scene": k, "true": t, "inferred": g} for k, t, g in wrong], **s})  # fmt: skip
        table.append([condition, f"{right} / {args.n}", fmt(s["identity_acc"], ".1%"),
                      fmt(s["position_error_mm_median"], ".2f"), fmt(s["yaw_error_deg_median"], ".2f"),
                      f"{ms:.0f}"])  # fmt: skip
    total = sum(r["counts_right"] for r in rows)
    table.append(["all", f"{total} / {args.n * len(rows)}", "", "", "", ""])
    text = markdown_table(["condition", "counts right", "identity", "position mm", "yaw deg", "ms / image"], table)
    record = {"model": args.model, "world": world.name, "rows": rows, "total_right": total, "args": vars(args)}
    write_results(args.name, record, text, Path(args.out))
    return record


if __name__ == "__main__":
    main()
