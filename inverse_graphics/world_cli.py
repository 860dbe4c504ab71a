"""`inverse-graphics world {init, show}`: start an editable world file from a built-in world, and look at a world.

A thin layer over `init(InitConfig)` and `show(ShowConfig)`, which tests drive. The world file format is in
docs/tabletop.md.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from scenes.world import BUILTIN_WORLDS, SceneTensors, World, builtin_world_path, load_world

__all__ = ["InitConfig", "ShowConfig", "init", "show", "contact_sheet", "register"]

LABEL_HEIGHT = 14  # pixels of text under each tile and above each row
PADDING = 4  # pixels between tiles


@dataclass(frozen=True)
class InitConfig:
    """What `world init` writes."""

    path: str  # the world file to write (must not exist)
    source: str = "kitchen"  # built-in world to start from


@dataclass(frozen=True)
class ShowConfig:
    """What `world show` draws."""

    world: str  # a world file or a built-in name
    out: str  # PNG to write
    n: int = 8  # sampled scenes per row
    seed: int = 0  # sampler and randomisation seed
    zoom: int = 2  # each image pixel drawn as zoom x zoom pixels (nearest neighbour: what a model sees)


def init(cfg: InitConfig) -> Path:
    """Copy the built-in world `cfg.source` to `cfg.path`, its meshes into `<stem>_meshes/` beside it (paths in the
    file rewritten, still relative). Refuses to overwrite anything; returns the world file's path."""
    target = Path(cfg.path)
    if target.suffix != ".toml":
        raise ValueError(f"a world file ends in .toml, got {str(target)!r}")
    source = builtin_world_path(cfg.source)
    text = source.read_text()
    meshes = re.findall(r'^mesh\s*=\s*"([^"]+)"', text, flags=re.MULTILINE)
    mesh_dir = target.parent / f"{target.stem}_meshes"
    copies = {m: mesh_dir / Path(m).name for m in meshes}
    for path in (target, *copies.values()):
        if path.exists():
            raise ValueError(f"{path} exists; world init never overwrites (choose another FILE)")
    target.parent.mkdir(parents=True, exist_ok=True)
    for relative, copy in copies.items():
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(source.parent / relative, copy)
        text = text.replace(f'"{relative}"', f'"{mesh_dir.name}/{copy.name}"')
    text = re.sub(r'^name = "[^"]*"', f'name = "{target.stem}"', text, count=1, flags=re.MULTILINE)
    target.write_text(text)
    load_world(target)  # the copy must load as it is
    return target


def _to_uint8(images: torch.Tensor, zoom: int) -> list[np.ndarray]:
    """(B, 3, H, W) in [0, 1] -> B arrays (zoom H, zoom W, 3) uint8."""
    pixels = (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [p.repeat(zoom, axis=0).repeat(zoom, axis=1) for p in pixels]


def _object_row(world: World) -> torch.Tensor:
    """(K, 3, H, W) each object alone at the table centre, turned 30 degrees, nominal appearance."""
    K = len(world.objects)
    t = SceneTensors(torch.arange(K)[:, None], torch.zeros(K, 1, 2), torch.full((K, 1), math.radians(30)))
    renderer = world.make_renderer("hard", "pytorch3d")
    return renderer(t.shape_ids, t.positions, t.yaws, world.colors[:, None]).images


def _count(n: int) -> str:
    return f"{n} object" if n == 1 else f"{n} objects"


def _symmetry(period: float) -> str:
    if period == 0.0:
        return "any yaw"
    if period >= 2 * math.pi - 1e-9:
        return "no sym."
    return f"{math.degrees(period):g} deg"


def contact_sheet(world: World, n: int = 8, seed: int = 0, zoom: int = 2) -> Image.Image:
    """Rows: each object alone (named, with its yaw symmetry); `n` sampled scenes, nominal; the same scenes
    randomised by the world's [randomize] ranges (nominal again if it has none). Labelled."""
    scenes = world.sample_scenes(n, seed=seed)
    rows = [
        ("objects", _object_row(world), [f"{o.name} ({_symmetry(o.yaw_period)})" for o in world.objects]),
        ("sampled scenes, nominal", world.render_scenes(scenes), [_count(len(s["objects"])) for s in scenes]),
    ]
    if world.randomize is not None:
        randomised = world.render_scenes(scenes, randomize=True, seed=seed)
        rows.append(("the same scenes, randomised (training images)", randomised, [""] * n))
    W, H = world.image_size[0] * zoom, world.image_size[1] * zoom
    columns = max(n, len(world.objects))
    sheet_w = columns * (W + PADDING) + PADDING
    row_h = LABEL_HEIGHT + H + LABEL_HEIGHT
    sheet = Image.new("RGB", (sheet_w, LABEL_HEIGHT + len(rows) * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    fx, fy, cx, cy = world.camera.intrinsics()
    draw.text((PADDING, 1), f"world {world.name!r}: {world.image_size[0]} x {world.image_size[1]} px, "
              f"f = ({fx:.0f}, {fy:.0f}) px, {world.objects_per_scene[0]}-{world.objects_per_scene[1]} objects, "
              f"table {world.table.size[0]:g} x {world.table.size[1]:g} m"
              f"{'' if world.randomize else ', no [randomize] section: training images are nominal'}",
              fill=(0, 0, 0))  # fmt: skip
    for r, (title, images, labels) in enumerate(rows):
        top = LABEL_HEIGHT + r * row_h
        draw.text((PADDING, top + 1), title, fill=(0, 0, 0))
        for i, (tile, label) in enumerate(zip(_to_uint8(images, zoom), labels, strict=True)):
            left = PADDING + i * (W + PADDING)
            sheet.paste(Image.fromarray(tile), (left, top + LABEL_HEIGHT))
            draw.text((left, top + LABEL_HEIGHT + H + 1), label[: max(4, W // 6)], fill=(0, 0, 0))
    return sheet


def show(cfg: ShowConfig) -> Path:
    """Write the contact sheet of `cfg.world` to `cfg.out`; returns its path."""
    if cfg.n < 1 or cfg.zoom < 1:
        raise ValueError(f"--n and --zoom must be >= 1, got {cfg.n}, {cfg.zoom}")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(load_world(cfg.world), cfg.n, cfg.seed, cfg.zoom).save(out)
    return out


def _run_init(args) -> int:
    path = init(InitConfig(args.file, args.source))
    print(f"wrote {path} (from the built-in {args.source!r} world); edit it, then: inverse-graphics world show {path}"
          " --out sheet.png")  # fmt: skip
    return 0


def _run_show(args) -> int:
    print(f"wrote {show(ShowConfig(args.world, args.out, args.n, args.seed, args.zoom))}")
    return 0


def register(subparsers) -> None:
    """Add `world init` and `world show` to the top-level CLI's subparsers."""
    parser = subparsers.add_parser("world", help="start a world file (objects, camera, light, table) or look at one")
    sub = parser.add_subparsers(dest="world_command", required=True)
    i = sub.add_parser("init", help="write an editable world file (and its meshes) from a built-in world")
    i.add_argument("file", help="the .toml file to write (refuses to overwrite)")
    i.add_argument("--from", dest="source", choices=BUILTIN_WORLDS, default=InitConfig("").source)
    i.set_defaults(func=_run_init)
    d = ShowConfig("", "")
    s = sub.add_parser("show", help="a contact sheet of a world: its objects, sampled scenes nominal and randomised")
    s.add_argument("world", help=f"a world file or a built-in name ({', '.join(BUILTIN_WORLDS)})")
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--n", type=int, default=d.n, help="scenes per row")
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--zoom", type=int, default=d.zoom, help="pixels per image pixel")
    s.set_defaults(func=_run_show)
