"""The structure search's add move screened in windows against its trials rendered whole, side by side in one run.

`infer` (the model's default refinement and structure search) on `--n` held-out scenes of the model's world, one
image at a time, the two arms alternating image by image on the same images and thread count: "windowed" (the
add move ranks its trial placements by losses drawn only in a window about the added object, refine's screen:
the default) and "whole" (every trial rendered whole, gain solved and albedos fitted). Reported per arm: median
and mean ms an image, count accuracy and identity accuracy on the same scenes, and how many scenes the two arms
infer differently. Mesa's llvmpipe draws in the calling thread (LP_NUM_THREADS=0 unless `--gl-threads`), so one
thread means one.

Target (issue 16): one 128 px image with refinement in <= 50 ms on one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.common import markdown_table, write_results

TARGET_MS = 50.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="air-kitchen", help="a shipped model's name or a checkpoint path")
    p.add_argument("--n", type=int, default=40, help="held-out scenes, each inferred by both arms")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gl-threads", default="0", help="LP_NUM_THREADS for llvmpipe ('mesa': its own default)")
    p.add_argument("--seed", type=int, default=2026, help="the scenes' seed (world.sample_scenes)")
    p.add_argument("--name", default="search_speed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.gl_threads != "mesa":
        os.environ["LP_NUM_THREADS"] = str(int(args.gl_threads))  # before the first GL context
    import inverse_graphics as ig
    from inverse_graphics.tabletop import refine
    from inverse_graphics.tabletop.metrics3d import match_scene, summarize

    torch.set_num_threads(args.threads)
    shipped = os.sep not in args.model and "." not in args.model
    model = ig.load_pretrained(args.model) if shipped else ig.load(args.model)
    world = model.world
    scenes = world.sample_scenes(args.n, seed=args.seed)
    images = world.render_scenes(scenes)
    windowed = refine._windowed_screen

    def whole(*_args, **_kwargs):
        return None  # no screen: search_scenes renders every trial whole

    arms = {"windowed": windowed, "whole": whole}
    model.infer(images[:1])  # warm-up: renderers built
    times: dict[str, list[float]] = {k: [] for k in arms}
    preds: dict[str, list[dict]] = {k: [] for k in arms}
    try:
        for i in range(args.n):
            for name in arms if i % 2 == 0 else reversed(list(arms)):
                refine._windowed_screen = arms[name]
                t0 = time.perf_counter()
                preds[name] += model.infer(images[i : i + 1]).scenes
                times[name].append(time.perf_counter() - t0)
            print(f"{i + 1}/{args.n}: " + ", ".join(f"{k} {1000 * v[-1]:.0f} ms" for k, v in times.items()), flush=True)
    finally:
        refine._windowed_screen = windowed
    rows, record = [], {"model": args.model, "world": world.name, "n": args.n, "arms": {}}
    for name in arms:
        summary = summarize([match_scene(p, s, None, world) for p, s in zip(preds[name], scenes)], world)
        ms = [1000 * t for t in times[name]]
        record["arms"][name] = {"ms_median": statistics.median(ms), "ms_mean": statistics.mean(ms),
                                "count_acc": summary["count_acc"], "identity_acc": summary["identity_acc"],
                                "position_error_mm_median": summary["position_error_mm_median"]}  # fmt: skip
        a = record["arms"][name]
        rows.append([name, f"{a['ms_median']:.0f}", f"{a['ms_mean']:.0f}", f"{100 * a['count_acc']:.1f}",
                     f"{100 * a['identity_acc']:.1f}", f"{a['position_error_mm_median']:.2f}"])  # fmt: skip

    def objects(scene: dict) -> list:
        return [(o["shape"], tuple(o["position"])) for o in scene["objects"]]

    differ = sum(objects(p) != objects(q) for p, q in zip(preds["windowed"], preds["whole"]))
    speedup = record["arms"]["whole"]["ms_median"] / record["arms"]["windowed"]["ms_median"]
    record.update(scenes_inferred_differently=differ, speedup_median=speedup, target_ms=TARGET_MS,
                  target_met=record["arms"]["windowed"]["ms_median"] <= TARGET_MS)  # fmt: skip
    table = markdown_table(["add move's trials", "ms median", "ms mean", "count %", "identity %", "position mm"], rows)
    table += (
        f"\n\n{args.n} scenes of `{world.name}` (seed {args.seed}), one image at a time, arms alternating; windowed "
        f"{speedup:.2f}x faster (medians); {differ} scenes inferred differently (objects or poses). Target "
        f"<= {TARGET_MS:.0f} ms: {'met' if record['target_met'] else 'missed'}. Threads: torch {args.threads}, "
        f"llvmpipe LP_NUM_THREADS {os.environ.get('LP_NUM_THREADS', 'default')}."
    )
    write_results(args.name, record, table)
    return record


if __name__ == "__main__":
    main()
