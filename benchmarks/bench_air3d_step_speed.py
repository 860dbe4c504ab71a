"""3D AIR training speed: optimiser steps/s of `train_air3d.TrainingRun.train_step` (the step training runs) for
each gradient path and recipe, at one image size and batch size.

Paths: "wake" with finite differences around the hard black box (OpenGL when EGL works, else PyTorch3D) and with
autograd through PyTorch3D's soft rasterizer; "sleep" (no likelihood gradient: prior samples rendered by the hard
renderer); "wake-sleep" with finite differences. Each case runs twice: with the fresh guide (q(z_pres) = 1/2 per
step, about 0.9 objects per image) and with a guide forced to report all T = 3 objects (the worst case: a wake step
renders more meshes (soft) and more perturbations (fd: 6 renders per present object) the more objects it reports).
Reported: median over --repeats timed steps after --warmup steps, wall-clock and this process's CPU time (all its
threads; on a shared CPU the CPU time is the better estimate of a dedicated core's speed), and the mean count the
guide sampled.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.common import markdown_table, write_results
from inverse_graphics.tabletop.train_air3d import AIR3DTrainConfig, TrainingRun, training_images

CASES = (("wake", "fd"), ("wake", "soft"), ("sleep", "fd"), ("wake-sleep", "fd"))


def time_case(recipe: str, gradient: str, all_present: bool, args: argparse.Namespace, out_dir: str) -> dict:
    """Median seconds per training step of one (recipe, gradient) case; all_present: q(z_pres = 1) ~ 1."""
    cfg = AIR3DTrainConfig(
        out_dir=f"{out_dir}/{recipe}-{gradient}", recipe=recipe, gradient=gradient, batch_size=args.batch,
        image_size=args.size, n_train=max(4 * args.batch, 64), backend=args.backend, threads=args.threads,
        baseline_warmup=0,
    )  # fmt: skip
    torch.manual_seed(0)
    images = training_images(cfg)
    run = TrainingRun(cfg, None)
    if all_present:
        with torch.no_grad():
            run.model.where_head.fc.bias[0] = 10.0  # the presence logit (modules3d.WhereHead3D)
    times, cpu_times, counts = [], [], []
    for i in range(args.warmup + args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        stats = run.train_step(images)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            counts.append(stats.get("count", stats.get("sleep_count", 0.0)))
    wall, cpu = statistics.median(times), statistics.median(cpu_times)
    timing = {"wall_s_per_step": wall, "cpu_s_per_step": cpu, "steps_per_cpu_s": 1 / cpu, "steps_per_wall_s": 1 / wall}
    guide = "all present" if all_present else "fresh"
    return {"recipe": recipe, "gradient": gradient, "guide": guide, **timing, "mean_count": statistics.mean(counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="auto", help="hard renderer: auto, opengl or pytorch3d")
    parser.add_argument("--cases", nargs="+", default=[f"{r}:{g}" for r, g in CASES], help="recipe:gradient")
    parser.add_argument("--name", default="air3d_step_speed", help="results file name (without extension)")
    parser.add_argument("--conditions", default="", help="a note on the machine's load, written with the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [tuple(case.split(":", 1)) for case in args.cases]
        results = [time_case(r, g, full, args, tmp) for full in (False, True) for r, g in cases]
    rows = [
        [r["recipe"], r["gradient"], r["guide"], f"{r['steps_per_cpu_s']:.2f}", f"{r['cpu_s_per_step']:.3f}",
         f"{r['wall_s_per_step']:.3f}", f"{r['mean_count']:.2f}"]
        for r in results
    ]  # fmt: skip
    header = ["recipe", "gradient", "guide", "steps per CPU s", "CPU s/step", "wall s/step", "mean count sampled"]
    table = markdown_table(header, rows) + f"\n\n{args.size} px, batch {args.batch}, freshly initialised networks."
    if args.conditions:
        table += f"\n\nConditions: {args.conditions}."
    write_results(args.name, {"args": vars(args), "results": results}, table)


if __name__ == "__main__":
    main()
