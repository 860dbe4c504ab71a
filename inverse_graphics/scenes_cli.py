"""`inverse-graphics scenes {generate, show}`: make a tabletop dataset (PNGs + one JSON of annotations) and
render scene files. A thin layer over `generate(GenerateConfig)` and `show(ShowConfig)`, which tests drive."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scenes import tabletop

__all__ = ["GenerateConfig", "ShowConfig", "generate", "show", "register"]

ANNOTATIONS = "annotations.json"  # file name of the annotations that `generate` writes beside the PNGs
RENDER_BATCH = 64  # scenes rendered at once


@dataclass(frozen=True)
class GenerateConfig:
    """What `scenes generate` makes."""

    out_dir: str  # directory for the PNGs and annotations.json (created)
    n: int = 100  # number of scenes
    kind: str = "tabletop"  # the only kind so far
    seed: int = 0  # sampler seed: same seed, same dataset
    image_size: int = 64  # H = W in pixels
    min_objects: int = 0  # inclusive count range
    max_objects: int = 3
    color_by_shape: bool = False  # colour objects by shape instead of one shared colour


@dataclass(frozen=True)
class ShowConfig:
    """What `scenes show` renders."""

    path: str  # a scene JSON ({"objects": [...]}) or an annotations.json written by `generate`
    out: str | None = None  # PNG to write (default: the JSON's path with .png)
    image_size: int = 256  # H = W of each rendered scene
    color_by_shape: bool = False


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def generate(cfg: GenerateConfig) -> Path:
    """Sample, render and write the dataset; returns the annotations path.

    annotations.json: {"kind", "seed", "image_size", "min_objects", "max_objects",
                       "scenes": [{"image": "000000.png", "scene": {"objects": [...]}}, ...]}
    """
    if cfg.kind != "tabletop":
        raise ValueError(f"unknown scene kind {cfg.kind!r}; available: tabletop")
    scenes = tabletop.sample_scenes(cfg.n, seed=cfg.seed, min_objects=cfg.min_objects, max_objects=cfg.max_objects)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for start in range(0, len(scenes), RENDER_BATCH):
        batch = scenes[start : start + RENDER_BATCH]
        images = tabletop.render_scenes(batch, cfg.image_size, color_by_shape=cfg.color_by_shape)
        for offset, (scene, pixels) in enumerate(zip(batch, _to_uint8(images), strict=True)):
            name = f"{start + offset:06d}.png"
            Image.fromarray(pixels).save(out / name)
            records.append({"image": name, "scene": scene.to_dict()})
    meta = {k: getattr(cfg, k) for k in ("kind", "seed", "image_size", "min_objects", "max_objects")}
    path = out / ANNOTATIONS
    path.write_text(json.dumps({**meta, "scenes": records}, indent=1))
    return path


def _load_scenes(path: Path) -> list[tabletop.Scene]:
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "scenes" in data:
        return [tabletop.Scene.from_dict(r["scene"]) for r in data["scenes"]]
    return [tabletop.Scene.from_dict(data)]


def show(cfg: ShowConfig) -> Path:
    """Render the scene(s) of a JSON file side by side into one PNG; returns its path."""
    path = Path(cfg.path)
    scenes = _load_scenes(path)
    images = tabletop.render_scenes(scenes, cfg.image_size, color_by_shape=cfg.color_by_shape)
    row = np.concatenate(list(_to_uint8(images)), axis=1)  # (H, B W, 3)
    out = Path(cfg.out) if cfg.out else path.with_suffix(".png")
    Image.fromarray(row).save(out)
    return out


def _run_generate(args) -> int:
    cfg = GenerateConfig(
        out_dir=args.out, n=args.n, kind=args.kind, seed=args.seed, image_size=args.image_size,
        min_objects=args.min_objects, max_objects=args.max_objects, color_by_shape=args.color_by_shape,
    )  # fmt: skip
    print(f"wrote {cfg.n} scenes and {generate(cfg)}")
    return 0


def _run_show(args) -> int:
    out = show(ShowConfig(args.file, args.out, args.image_size, args.color_by_shape))
    print(f"wrote {out}")
    return 0


def register(subparsers) -> None:
    """Add `scenes generate` and `scenes show` to the top-level CLI's subparsers."""
    d = GenerateConfig(out_dir="")
    parser = subparsers.add_parser("scenes", help="generate tabletop scene datasets and render scene files")
    sub = parser.add_subparsers(dest="scenes_command", required=True)
    g = sub.add_parser("generate", help="sample and render N scenes: PNGs and annotations.json in --out")
    g.add_argument("--kind", choices=["tabletop"], default=d.kind)
    g.add_argument("--n", type=int, required=True, help="number of scenes")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--image-size", type=int, default=d.image_size)
    g.add_argument("--min-objects", type=int, default=d.min_objects)
    g.add_argument("--max-objects", type=int, default=d.max_objects)
    g.add_argument("--color-by-shape", action="store_true", help="colour objects by shape")
    g.set_defaults(func=_run_generate)
    s = sub.add_parser("show", help="render a scene JSON (or a generated annotations.json) to a PNG")
    s.add_argument("file", help='a scene JSON {"objects": [...]} or an annotations.json')
    s.add_argument("--out", default=None, help="PNG path (default: FILE with .png)")
    s.add_argument("--image-size", type=int, default=ShowConfig("").image_size)
    s.add_argument("--color-by-shape", action="store_true")
    s.set_defaults(func=_run_show)
