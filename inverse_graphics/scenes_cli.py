"""`inverse-graphics scenes {generate, show}`: make a tabletop dataset (PNGs + one JSON of annotations) and
render scene files. A thin layer over `generate(GenerateConfig)` and `show(ShowConfig)`, which tests drive."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scenes import tabletop
from scenes.world import load_world

__all__ = ["GenerateConfig", "ShowConfig", "generate", "show", "register"]

ANNOTATIONS = "annotations.json"  # file name of the annotations that `generate` writes beside the PNGs
RENDER_BATCH = 64  # scenes rendered at once
WORLD_HELP = "a world file or built-in name (primitives, kitchen); default: the primitives, as scenes/tabletop.py"


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
    world: str | None = None  # a world file or built-in name; None: the primitives of scenes/tabletop.py
    randomize: bool = False  # with a world: apply its [randomize] appearance ranges (training images)


@dataclass(frozen=True)
class ShowConfig:
    """What `scenes show` renders."""

    path: str  # a scene JSON ({"objects": [...]}) or an annotations.json written by `generate`
    out: str | None = None  # PNG to write (default: the JSON's path with .png)
    image_size: int = 256  # H = W of each rendered scene (with a world: H, and W in the world's aspect ratio)
    color_by_shape: bool = False
    world: str | None = None  # a world file or built-in name; None: the primitives of scenes/tabletop.py


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _world_scenes(cfg: GenerateConfig) -> tuple[list[dict], Callable[[list, int], torch.Tensor], dict]:
    """(scene dicts, a batch renderer, annotation metadata) for `cfg`: the world's, or the primitives'."""
    if cfg.world is None:
        scenes = tabletop.sample_scenes(cfg.n, seed=cfg.seed, min_objects=cfg.min_objects, max_objects=cfg.max_objects)
        meta = {k: getattr(cfg, k) for k in ("kind", "seed", "image_size", "min_objects", "max_objects")}

        def render(batch: list, start: int) -> torch.Tensor:
            return tabletop.render_scenes(batch, cfg.image_size, color_by_shape=cfg.color_by_shape)

        return [s.to_dict() for s in scenes], render, meta
    d = GenerateConfig(out_dir="")
    if (cfg.image_size, cfg.min_objects, cfg.max_objects, cfg.color_by_shape) != (
        d.image_size,
        d.min_objects,
        d.max_objects,
        d.color_by_shape,
    ):
        raise ValueError("with --world, the image size, object counts and colours come from the world file")
    w = load_world(cfg.world)

    def render_world(batch: list, start: int) -> torch.Tensor:  # seeded per batch: the same images every run
        return w.render_scenes(batch, randomize=cfg.randomize, seed=np.random.default_rng([cfg.seed, start]))

    meta = {"kind": cfg.kind, "seed": cfg.seed, "world": w.name, "image_size": list(w.image_size),
            "min_objects": w.objects_per_scene[0], "max_objects": w.objects_per_scene[1],
            "randomize": cfg.randomize}  # fmt: skip
    return w.sample_scenes(cfg.n, seed=cfg.seed), render_world, meta


def generate(cfg: GenerateConfig) -> Path:
    """Sample, render and write the dataset; returns the annotations path.

    annotations.json: {"kind", "seed", "image_size", "min_objects", "max_objects", ["world", "randomize"],
                       "scenes": [{"image": "000000.png", "scene": {"objects": [...]}}, ...]}
    """
    if cfg.kind != "tabletop":
        raise ValueError(f"unknown scene kind {cfg.kind!r}; available: tabletop")
    scenes, render, meta = _world_scenes(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for start in range(0, len(scenes), RENDER_BATCH):
        batch = scenes[start : start + RENDER_BATCH]
        images = render(batch, start)
        for offset, (scene, pixels) in enumerate(zip(batch, _to_uint8(images), strict=True)):
            name = f"{start + offset:06d}.png"
            Image.fromarray(pixels).save(out / name)
            records.append({"image": name, "scene": scene})
    path = out / ANNOTATIONS
    path.write_text(json.dumps({**meta, "scenes": records}, indent=1))
    return path


def _load_scenes(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "scenes" in data:
        return [r["scene"] for r in data["scenes"]]
    return [data]


def show(cfg: ShowConfig) -> Path:
    """Render the scene(s) of a JSON file side by side into one PNG; returns its path."""
    path = Path(cfg.path)
    scenes = _load_scenes(path)
    if cfg.world is None:
        images = tabletop.render_scenes([tabletop.Scene.from_dict(s) for s in scenes], cfg.image_size,
                                        color_by_shape=cfg.color_by_shape)  # fmt: skip
    else:
        w = load_world(cfg.world)
        for i, scene in enumerate(scenes):
            try:
                w.validate_scene(scene)
            except ValueError as err:
                raise ValueError(f"{path}: scene {i}: {err}") from err
        W, H = w.image_size
        size = (max(1, round(W * cfg.image_size / H)), cfg.image_size)
        t = w.scenes_to_tensors(scenes)
        colors = w.colors[t.shape_ids.clamp(min=0)]
        images = w.make_renderer("hard", "pytorch3d", image_size=size)(t.shape_ids, t.positions, t.yaws, colors).images
    row = np.concatenate(list(_to_uint8(images)), axis=1)  # (H, B W, 3)
    out = Path(cfg.out) if cfg.out else path.with_suffix(".png")
    Image.fromarray(row).save(out)
    return out


def _run_generate(args) -> int:
    cfg = GenerateConfig(
        out_dir=args.out, n=args.n, kind=args.kind, seed=args.seed, image_size=args.image_size,
        min_objects=args.min_objects, max_objects=args.max_objects, color_by_shape=args.color_by_shape,
        world=args.world, randomize=args.randomize,
    )  # fmt: skip
    print(f"wrote {cfg.n} scenes and {generate(cfg)}")
    return 0


def _run_show(args) -> int:
    out = show(ShowConfig(args.file, args.out, args.image_size, args.color_by_shape, args.world))
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
    g.add_argument("--world", default=None, help=WORLD_HELP)
    g.add_argument("--randomize", action="store_true", help="with --world: its randomised appearance")
    g.set_defaults(func=_run_generate)
    s = sub.add_parser("show", help="render a scene JSON (or a generated annotations.json) to a PNG")
    s.add_argument("file", help='a scene JSON {"objects": [...]} or an annotations.json')
    s.add_argument("--out", default=None, help="PNG path (default: FILE with .png)")
    s.add_argument("--image-size", type=int, default=ShowConfig("").image_size)
    s.add_argument("--color-by-shape", action="store_true")
    s.add_argument("--world", default=None, help=WORLD_HELP)
    s.set_defaults(func=_run_show)
