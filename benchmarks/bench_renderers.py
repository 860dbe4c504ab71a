"""Tabletop renderer speed: images/s for each backend and mode, forward and forward+backward, at batch 32.

Backends: PyTorch3D hard (forward only: its autograd misses silhouettes), PyTorch3D soft (autograd), finite
differences around the PyTorch3D hard render, OpenGL (forward only; skipped without EGL), and finite
differences around OpenGL. Forward+backward is one render of the batch plus the backward pass of a squared
image error w.r.t. all poses; for finite differences that is 2 x 3N extra renders per scene (N objects), all
in one batch. Scenes hold 1-3 objects (seed 0). Reported: median over --repeats timed calls after a warm-up, and
with --rounds R the median of R such figures, the sweep over all cells repeated (interleaved) R times.

Sizes are W or WxH (e.g. `--sizes 64 128x96`); a non-square image keeps the tabletop camera's 40-degree vertical
field of view and shows more table at the sides. With several sizes, each backend's throughput is also given as a
ratio to the first size, and OpenGL's as a ratio to PyTorch3D hard at the same size, all from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import markdown_table, write_results
from renderers.finite_difference import FiniteDifferenceRenderer, FiniteDifferenceSettings
from renderers.mesh import MeshRenderer3D, MeshRenderSettings, image_width_height
from renderers.opengl import OpenGLRenderer, OpenGLSettings, opengl_available
from scenes import tabletop
from scenes.tabletop_objects import library

BACKENDS = ("pytorch3d-hard", "pytorch3d-soft", "fd-pytorch3d", "opengl", "fd-opengl")
DIFFERENTIABLE = {"pytorch3d-soft", "fd-pytorch3d", "fd-opengl"}


def parse_size(text: str) -> int | tuple[int, int]:
    """A size argument: "64" -> 64 (square), "128x96" -> (128, 96) = (W, H)."""
    if "x" in text:
        width, height = (int(v) for v in text.split("x"))
        return width, height
    return int(text)


def size_label(size: int | tuple[int, int]) -> str:
    width, height = image_width_height(size)
    return f"{width}x{height}"


def make(backend: str, image_size: int | tuple[int, int]) -> torch.nn.Module:
    """The renderer for a backend name of BACKENDS, on the tabletop stage (objects and camera)."""
    stage = tabletop.make_stage()
    if "opengl" in backend:
        base: torch.nn.Module = OpenGLRenderer(library(), stage, OpenGLSettings(image_size=image_size))
    else:
        mode = "soft" if backend == "pytorch3d-soft" else "hard"
        base = MeshRenderer3D(library(), stage, MeshRenderSettings(image_size=image_size, mode=mode))
    if not backend.startswith("fd-"):
        return base
    return FiniteDifferenceRenderer(base, FiniteDifferenceSettings.for_image_size(image_size, stage.camera))


def step(renderer: torch.nn.Module, t: tabletop.SceneTensors, backward: bool) -> Callable[[], None]:
    """A closure doing one forward (and optionally backward) pass over the batch."""
    target = torch.zeros(1)

    def run() -> None:
        if backward:
            tabletop.pose_gradients(renderer, t, target)
        else:
            with torch.no_grad():
                renderer(t.shape_ids, t.positions, t.yaws)

    return run


def images_per_second(fn: Callable[[], None], batch: int, repeats: int) -> float:
    """Wall-clock throughput: batch / median seconds per call."""
    return timed(fn, batch, repeats)[0]


def timed(fn: Callable[[], None], batch: int, repeats: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process, all its threads): the second is
    less disturbed by other processes on a shared machine."""
    fn()  # warm-up: caches, OpenGL context, table image
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return batch / statistics.median(wall), batch / max(statistics.median(cpu), 1e-9)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=parse_size, nargs="+", default=[32, 64, 128], help="W or WxH")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1, help="sweeps over all cells, interleaved; medians reported")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--conditions", default="", help="free text on the machine's load, saved with the results")
    p.add_argument("--name", default="bench_renderers")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gl_missing = opengl_available()
    backends = [b for b in args.backends if "opengl" not in b or gl_missing is None]
    t = tabletop.scenes_to_tensors(tabletop.sample_scenes(args.batch, seed=0, min_objects=1, max_objects=3))
    renderers = {(size_label(size), b): make(b, size) for size in args.sizes for b in backends}
    runs: dict[tuple[str, str], list[tuple[float, float, float | None]]] = {key: [] for key in renderers}
    for _ in range(args.rounds):  # every cell once per round, so load changes on a shared machine hit all cells
        for (label, backend), renderer in renderers.items():
            fwd, fwd_cpu = timed(step(renderer, t, False), args.batch, args.repeats)
            both = None
            if backend in DIFFERENTIABLE:
                both = images_per_second(step(renderer, t, True), args.batch, args.repeats)
            runs[label, backend].append((fwd, fwd_cpu, both))
            print(label, backend, f"{fwd:,.0f}", f"{fwd_cpu:,.0f}", both, flush=True)
    results, rows = [], []
    for (label, backend), cell in runs.items():
        fwd, fwd_cpu = statistics.median(c[0] for c in cell), statistics.median(c[1] for c in cell)
        both = None if cell[0][2] is None else statistics.median(c[2] for c in cell if c[2] is not None)
        results.append({"size": label, "backend": backend, "forward_images_per_s": fwd, "fwd_bwd_images_per_s": both,
                        "forward_images_per_cpu_s": fwd_cpu, "forward_per_round": [c[0] for c in cell],
                        "forward_cpu_per_round": [c[1] for c in cell]})  # fmt: skip
        rows.append([label, backend, f"{fwd:,.0f}", f"{fwd_cpu:,.0f}", "n/a" if both is None else f"{both:,.1f}"])
    record = {"batch": args.batch, "repeats": args.repeats, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "conditions": args.conditions, "opengl_unavailable": gl_missing, "results": results}  # fmt: skip
    header = ["px (WxH)", "backend", "forward images/s", "forward images/CPU-s", "forward+backward images/s"]
    table = markdown_table(header, rows)
    if len(args.sizes) > 1:
        record["ratios"] = ratios(results, size_label(args.sizes[0]))
        table += "\n\nRatios of forward throughput, same run (wall-clock; CPU-time in brackets):\n\n" + markdown_table(
            ["px (WxH)", "backend", f"vs {size_label(args.sizes[0])}", "vs pytorch3d-hard"],
            [[r["size"], r["backend"], r["vs_first_size"], r["vs_pytorch3d_hard"]] for r in record["ratios"]],
        )
    notes = f"\nConditions: {args.conditions or 'not stated'}."
    notes += f"\nOpenGL skipped: {gl_missing}" if gl_missing else ""
    write_results(args.name, record, table + "\n" + notes)
    return record


def ratios(results: list[dict], first: str) -> list[dict]:
    """Each result's forward throughput over its backend's at the first size, and over PyTorch3D hard's at its
    own size, as "wall (cpu)" strings ("n/a" where the other cell was not run)."""
    cells = {(r["size"], r["backend"]): r for r in results}

    def ratio(r: dict, other: dict | None) -> str:
        if other is None:
            return "n/a"
        wall = r["forward_images_per_s"] / other["forward_images_per_s"]
        cpu = r["forward_images_per_cpu_s"] / other["forward_images_per_cpu_s"]
        return f"{wall:.2f} ({cpu:.2f})"

    return [
        {
            "size": r["size"],
            "backend": r["backend"],
            "vs_first_size": ratio(r, cells.get((first, r["backend"]))),
            "vs_pytorch3d_hard": ratio(r, cells.get((r["size"], "pytorch3d-hard"))),
        }  # fmt: skip
        for r in results
    ]


if __name__ == "__main__":
    main()
