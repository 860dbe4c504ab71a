"""Tabletop renderer speed: images/s for each backend and mode, forward and forward+backward, at batch 32.

Backends: PyTorch3D hard (forward only: its autograd misses silhouettes), PyTorch3D soft (autograd), finite
differences around the PyTorch3D hard render, OpenGL (forward only; skipped without EGL), and finite
differences around OpenGL. Forward+backward is one render of the batch plus the backward pass of a squared
image error w.r.t. all poses; for finite differences that is 2 x 3N extra renders per scene (N objects), all
in one batch. Scenes hold 1-3 objects (seed 0). Reported: median over --repeats timed calls after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import markdown_table, write_results
from renderers.finite_difference import FiniteDifferenceRenderer, FiniteDifferenceSettings
from renderers.opengl import opengl_available
from scenes import tabletop

BACKENDS = ("pytorch3d-hard", "pytorch3d-soft", "fd-pytorch3d", "opengl", "fd-opengl")
DIFFERENTIABLE = {"pytorch3d-soft", "fd-pytorch3d", "fd-opengl"}


def make(backend: str, image_size: int) -> torch.nn.Module:
    """The renderer for a backend name of BACKENDS."""
    if backend == "pytorch3d-soft":
        return tabletop.make_renderer(image_size, "soft")
    base = tabletop.make_renderer(image_size, backend="opengl" if "opengl" in backend else "pytorch3d")
    if not backend.startswith("fd-"):
        return base
    return FiniteDifferenceRenderer(base, FiniteDifferenceSettings.for_image_size(image_size))


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
    fn()  # warm-up: caches, OpenGL context, table image
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
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
    results, rows = [], []
    for size in args.sizes:
        for backend in backends:
            renderer = make(backend, size)
            fwd = images_per_second(step(renderer, t, False), args.batch, args.repeats)
            both = None
            if backend in DIFFERENTIABLE:
                both = images_per_second(step(renderer, t, True), args.batch, args.repeats)
            results.append(
                {"size": size, "backend": backend, "forward_images_per_s": fwd, "fwd_bwd_images_per_s": both}
            )
            rows.append([size, backend, f"{fwd:,.0f}", "n/a" if both is None else f"{both:,.1f}"])
            print(rows[-1], flush=True)
    record = {"batch": args.batch, "repeats": args.repeats, "conditions": args.conditions,
              "opengl_unavailable": gl_missing, "results": results}  # fmt: skip
    table = markdown_table(["px", "backend", "forward images/s", "forward+backward images/s"], rows)
    notes = f"\nConditions: {args.conditions or 'not stated'}."
    notes += f"\nOpenGL skipped: {gl_missing}" if gl_missing else ""
    write_results(args.name, record, table + "\n" + notes)
    return record


if __name__ == "__main__":
    main()
