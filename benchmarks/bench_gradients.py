"""Gradient agreement on random tabletop scenes: soft-mode autograd, finite differences around the PyTorch3D
hard render, and finite differences around the OpenGL black box (skipped without EGL).

For each scene (1-3 objects, --seed) the loss is the squared error between its render and the hard render of
the same objects with Gaussian pose noise (2 cm, 0.3 rad): a render-and-compare step. Gradients w.r.t.
positions and yaws are compared per parameter type between each pair of methods: the cosine of the gradients
of all scenes stacked into one vector, the median per-scene cosine, and sign agreement (fraction of entries
with the same sign). Yaws of sphere and cylinder are left out: every method gives exactly zero there.
Finite differences step about one pixel (FiniteDifferenceSettings defaults, scaled to the image size).
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from benchmarks.common import markdown_table, write_results
from renderers.finite_difference import FiniteDifferenceRenderer, FiniteDifferenceSettings
from renderers.opengl import opengl_available
from scenes import tabletop
from scenes.tabletop_objects import SHAPES, YAW_PERIOD


def methods(image_size: int, with_opengl: bool) -> dict[str, torch.nn.Module]:
    fd = FiniteDifferenceSettings.for_image_size(image_size)
    out = {
        "soft autograd": tabletop.make_renderer(image_size, "soft"),
        "fd pytorch3d hard": FiniteDifferenceRenderer(tabletop.make_renderer(image_size), fd),
    }
    if with_opengl:
        out["fd opengl"] = FiniteDifferenceRenderer(tabletop.make_renderer(image_size, backend="opengl"), fd)
    return out


def gradients(renderers: dict, t: tabletop.SceneTensors, image_size: int, seed: int) -> dict:
    """{method: (d positions (B, N, 2), d yaws (B, N))} for one batch of scenes."""
    target = tabletop.perturb_poses(t, seed).render(tabletop.make_renderer(image_size)).images
    return {name: tabletop.pose_gradients(r, t, target) for name, r in renderers.items()}


def entries(t: tabletop.SceneTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """BoolTensors (B, N) of position and yaw entries to compare (present objects; yaw: not yaw-invariant)."""
    present = t.shape_ids >= 0
    turns = torch.tensor([YAW_PERIOD[s] != 0.0 for s in SHAPES])[t.shape_ids.clamp(min=0)]
    return present, present & turns


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    """a, b: per-scene gradient vectors of one parameter type from two methods."""
    flat_a, flat_b = torch.cat(a), torch.cat(b)
    per_scene = [cosine(x, y) for x, y in zip(a, b, strict=True) if x.norm() > 0 and y.norm() > 0]
    return {
        "cosine": cosine(flat_a, flat_b),
        "median_scene_cosine": statistics.median(per_scene) if per_scene else float("nan"),
        "sign_agreement": float((flat_a.sign() == flat_b.sign()).float().mean()),
        "norm_ratio": float(flat_a.norm() / flat_b.norm().clamp(min=1e-30)),
        "entries": int(flat_a.numel()),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-scenes", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="scenes per render batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--conditions", default="", help="free text on the machine's load, saved with the results")
    p.add_argument("--name", default="bench_gradients")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gl_missing = opengl_available()
    renderers = methods(args.image_size, gl_missing is None)
    vectors: dict[tuple[str, str], list] = {(m, kind): [] for m in renderers for kind in ("position", "yaw")}
    scenes = tabletop.sample_scenes(args.n_scenes, seed=args.seed, min_objects=1, max_objects=3)
    for start in range(0, len(scenes), args.batch):
        t = tabletop.scenes_to_tensors(scenes[start : start + args.batch])
        pos_mask, yaw_mask = entries(t)
        for name, (d_pos, d_yaw) in gradients(renderers, t, args.image_size, args.seed + start).items():
            vectors[name, "position"] += [d_pos[b][pos_mask[b]].flatten() for b in range(len(d_pos))]
            vectors[name, "yaw"] += [d_yaw[b][yaw_mask[b]] for b in range(len(d_yaw))]
    results, rows = [], []
    for (a, b), kind in itertools.product(itertools.combinations(renderers, 2), ("position", "yaw")):
        r = {"a": a, "b": b, "parameter": kind, **agreement(vectors[a, kind], vectors[b, kind])}
        results.append(r)
        rows.append([f"{a} vs {b}", kind, f"{r['cosine']:.3f}", f"{r['median_scene_cosine']:.3f}",
                     f"{r['sign_agreement']:.2f}", f"{r['norm_ratio']:.2f}", r["entries"]])  # fmt: skip
    header = [
        "methods",
        "parameter",
        "cosine",
        "median scene cosine",
        "sign agreement",
        "norm ratio a/b",
        "n",
    ]
    record = {"n_scenes": args.n_scenes, "image_size": args.image_size, "seed": args.seed,
              "conditions": args.conditions, "opengl_unavailable": gl_missing,
              "results": results}  # fmt: skip
    notes = f"\nConditions: {args.conditions or 'not stated'}."
    notes += f"\nOpenGL skipped: {gl_missing}" if gl_missing else ""
    write_results(args.name, record, markdown_table(header, rows) + "\n" + notes)
    return record


if __name__ == "__main__":
    main()
