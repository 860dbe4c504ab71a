"""`inverse-graphics infer`: objects in image files -> one JSON and a figure per image.

Multi-MNIST models (air, dair): counts, boxes and z_where, and overlay PNGs. Tabletop models (air-tabletop,
supervised-tabletop): scenes in the tabletop JSON format of DESIGN.md, and a figure per image with the input, the
inferred scene re-rendered, and the per-object labels side by side."""

from __future__ import annotations

import json
import struct
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from inverse_graphics.air import AIR
from inverse_graphics.evaluate import load_model

OVERLAY_SCALE = 6  # overlay PNGs are the input enlarged this many times, so that boxes and labels are legible
BOX_COLOURS = ((230, 60, 60), (60, 200, 60), (70, 120, 255), (240, 160, 40), (180, 80, 220))


@dataclass
class InferConfig:
    """Inputs and outputs of one `infer` call."""

    images: list[str] = field(default_factory=list)  # image files (PNG, JPEG, ...): light ink on a dark ground
    model: str = "air-multi-mnist"  # a pretrained name or a checkpoint path
    out_dir: str = "out/infer"  # receives results.json and <stem>_overlay.png (<stem>_scene.png) per image
    device: str = "cpu"
    refine: int | None = None  # tabletop models: refinement steps (None: the model's default; 0: none)
    refine_gradient: str = "fd"  # tabletop models: "fd" (black-box finite differences) or "soft" (soft rasterizer)
    resize: bool = False  # tabletop models: resize images of another size to the model's world (else an error)
    search: bool | None = None  # tabletop models: the structure search after refinement (None: the model's default)


PIL_BOMB = Image.DecompressionBombError  # an image of more pixels than Pillow's limit (about 179 million)


class ImageReadError(ValueError):
    """An image file that cannot be read as an input: the message names the file and why."""


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL modes of 16-bit, 32-bit int and float images


def _high_depth(im: Image.Image, path: str | Path) -> np.ndarray:
    """A 16-bit, 32-bit int or float PIL image as float32 (H, W) in [0, 1]: 16-bit (and 32-bit int images whose
    values fit 16 bits, as Pillow opens 16-bit PNGs) divided by 65535, floats taken as they are (they must lie in
    [0, 1]). Converting to 8 bits through PIL would clip every value above 255 to white."""
    arr = np.asarray(im).astype(np.float64)
    if im.mode != "F":
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageReadError(f"{path}: 32-bit integer pixels beyond 16 bits are not supported; save 8/16 bits")
        arr = arr / 65535.0
    elif arr.size and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
        raise ImageReadError(f"{path}: a floating-point image must hold finite values in [0, 1]")
    return arr.astype(np.float32)


def _open_image(path: str | Path, rgb: bool, size: int | tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as float32 in [0, 1], (H, W) grey or (H, W, 3) RGB for size = (W, H) (an int: W = H = size),
    resized (bilinear), and its
    original (width, height); ValueError naming the file if it cannot be read. 8-bit images are divided by 255,
    16-bit ones by 65535; float images (TIFF) are kept as they are; grey images read as RGB are repeated."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Pillow warns of e.g. corrupt EXIF: said on stderr, naming the file
        try:
            with Image.open(path) as im:
                im.load()
                original = im.size
                if im.mode in HIGH_DEPTH_MODES:
                    grey = Image.fromarray(_high_depth(im, path))  # mode "F": resized without 8-bit rounding
                    converted = None
                else:
                    converted = im.convert("RGB" if rgb else "L")
        except ImageReadError:
            raise
        # what Pillow raises for truncated or corrupt files (SyntaxError: "broken PNG file", ValueError: "invalid
        # palette size", struct.error, zlib.error, ...), and UnidentifiedImageError (an OSError)
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, PIL_BOMB) as e:
            raise ImageReadError(f"cannot read image {path}: {e}") from e
    for w in caught:
        print(f"warning: {path}: {w.message}", file=sys.stderr)
    wh = (size, size) if isinstance(size, int) else size
    if converted is None:
        if grey.size != wh:
            grey = grey.resize(wh, Image.Resampling.BILINEAR)
        arr = np.clip(np.asarray(grey, dtype=np.float32), 0.0, 1.0)
        return (np.repeat(arr[..., None], 3, axis=-1) if rgb else arr), original
    if converted.size != wh:
        converted = converted.resize(wh, Image.Resampling.BILINEAR)
    return np.asarray(converted, dtype=np.float32) / 255.0, original


def read_image(path: str | Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A grey image as float32 (size, size) in [0, 1], and its original (width, height).

    Images of another size are resized (bilinear); boxes are mapped back to the original pixels by the caller.
    """
    arr, original = _open_image(path, False, size)
    if arr.mean() > 0.5:
        print(
            f"warning: {path} is mostly bright; the model expects light ink on a dark background "
            "(as MNIST). Invert it if the objects are dark.",
            file=sys.stderr,
        )
    return arr, original


def output_stems(paths: list[str]) -> list[str]:
    """One distinct file-name stem per input, for its figure: the stem ("a" for dir/a.png), or, where two inputs
    share a stem, the name with its suffix ("a_png", "a_jpg"), and the input's position where even that repeats."""
    stems = [Path(p).stem for p in paths]
    names = [Path(p).name.replace(".", "_") if stems.count(s) > 1 else s for p, s in zip(paths, stems)]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def overlay(image: np.ndarray, boxes: np.ndarray, steps: list[int], path: Path) -> None:
    """Save image (H, W) in [0, 1], enlarged, with boxes (n, 4) in its own pixels drawn on it."""
    H, W = image.shape
    im = Image.fromarray((image * 255).astype(np.uint8)).convert("RGB")
    im = im.resize((W * OVERLAY_SCALE, H * OVERLAY_SCALE), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(im)
    for box, t in zip(boxes, steps):
        colour = BOX_COLOURS[t % len(BOX_COLOURS)]
        draw.rectangle([float(v) * OVERLAY_SCALE for v in box], outline=colour, width=2)
        draw.text((float(box[0]) * OVERLAY_SCALE + 3, float(box[1]) * OVERLAY_SCALE + 2), f"{t}", fill=colour)
    im.save(path)


def main(cfg: InferConfig) -> dict:
    if not cfg.images:
        raise ValueError("no input images given")
    model = load_model(cfg.model, cfg.device)
    if not isinstance(model, AIR):
        return main_tabletop(cfg, model)
    if cfg.refine is not None or cfg.search is not None:
        raise ValueError(f"--refine and --no-search apply to the tabletop models, not to {cfg.model!r}")
    size = model.config.canvas_size
    loaded = [read_image(p, size) for p in cfg.images]
    x = torch.from_numpy(np.stack([a for a, _ in loaded]))
    out = model.infer(x)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    stems = output_stems(cfg.images)
    for i, (path, (arr, (w, h))) in enumerate(zip(cfg.images, loaded)):
        steps = [int(t) for t in torch.nonzero(out.z_pres[i] > 0.5).flatten()]
        scale = np.array([w / size, h / size, w / size, h / size], dtype=np.float32)
        boxes = out.boxes[i].cpu().numpy() * scale  # in the input file's pixels
        objects = [
            {
                "step": t,
                "box": [round(float(v), 2) for v in b],
                "z_where": [round(float(v), 4) for v in out.z_where[i, t]],
                "pres_prob": round(float(out.pres_prob[i, t]), 4),
            }
            for t, b in zip(steps, boxes)
        ]
        overlay_path = out_dir / f"{stems[i]}_overlay.png"
        overlay(arr, out.boxes[i].cpu().numpy(), steps, overlay_path)
        results.append(
            {
                "file": str(path),
                "size": [w, h],
                "count": int(out.counts[i]),
                "objects": objects,
                "overlay": str(overlay_path),
            }
        )
    record = {"model": cfg.model, "box_format": "x0, y0, x1, y1 in input pixels", "images": results}
    (out_dir / "results.json").write_text(json.dumps(record, indent=2))
    for r in results:
        print(f"{r['file']}: {r['count']} object(s)")
    print(f"wrote {out_dir / 'results.json'} and {len(results)} overlay PNG(s)")
    return record


def read_rgb(path: str | Path, size: int | tuple[int, int], resize: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """An RGB image as float32 (3, H, W) in [0, 1] for size = (W, H), and its original (width, height). An image of
    another size is an ImageReadError naming both sizes unless `resize` (bilinear, with a note on stderr): the
    tabletop models were trained on renders of exactly their world's size and camera, so a resized photo is a
    different camera unless its aspect and field of view match."""
    wh = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    rgb, original = _open_image(path, True, wh)
    sizes = f"{original[0]} x {original[1]}", f"{wh[0]} x {wh[1]} (W x H)"
    if original != wh and not resize:
        raise ImageReadError(
            f"{path} is {sizes[0]} pixels; the model's world renders {sizes[1]}: pass --resize to resize it "
            "(as if the camera's intrinsics scaled with the image) or use a model of that size"
        )
    if original != wh:
        print(f"note: {path} is {sizes[0]}; resized to the model's {sizes[1]}", file=sys.stderr)
    return rgb.transpose(2, 0, 1), original


def object_label(obj: dict) -> str:
    """One line per object: shape, position in cm, yaw in degrees."""
    x, y = (100 * v for v in obj["position"])
    return f"{obj['shape']:<8} x {x:+5.1f} cm  y {y:+5.1f} cm  yaw {np.degrees(obj['yaw']):+6.1f} deg"


def scene_figure(image: np.ndarray, render: np.ndarray, scene: dict, title: str, path: Path) -> None:
    """Input (3, H, W), re-render of the inferred scene (3, H, W) and the per-object labels, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.4), gridspec_kw={"width_ratios": [1, 1, 1.5]})
    for ax, im, name in zip(axes[:2], (image, render), ("input", "inferred scene, re-rendered")):
        ax.imshow(np.clip(im.transpose(1, 2, 0), 0, 1), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    objects = scene["objects"]
    lines = [f"{i + 1}. {object_label(o)}" for i, o in enumerate(objects)] or ["(no objects)"]
    axes[2].text(
        0.0, 0.95, f"{len(objects)} object(s)\n\n" + "\n".join(lines), va="top", family="monospace", fontsize=8
    )
    axes[2].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scene_problems(world, scene: dict) -> list[str]:
    """Why an inferred scene could not be a real one in `world` (an object partly off the table, two that
    interpenetrate): each reason once, [] for a valid scene. An inferred scene is a result, so it is reported,
    never refused."""
    problems = []
    for i, obj in enumerate(scene["objects"]):
        try:
            world.validate_scene({"objects": [obj]})  # one object at a time: its own problems, named by index here
        except ValueError as err:
            problems.append(str(err).replace("object 0", f"object {i}", 1))
    try:
        world.validate_scene(scene)
    except ValueError as err:
        if "interpenetrate" in str(err):
            problems.append(str(err))
    return problems


def main_tabletop(cfg: InferConfig, model) -> dict:
    """`infer` for the tabletop models (AIR3D or SupervisedRegressor): results.json and <stem>_scene.png."""
    from inverse_graphics.tabletop import world3d

    world, size = model.world, model.image_wh
    loaded = [read_rgb(p, size, cfg.resize) for p in cfg.images]
    x = torch.from_numpy(np.stack([a for a, _ in loaded]))
    out = model.infer(x.to(cfg.device), refine=cfg.refine, refine_gradient=cfg.refine_gradient, search=cfg.search)
    renders = world3d.rerender(model, out.scenes)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    stems = output_stems(cfg.images)
    for i, (path, (arr, (w, h))) in enumerate(zip(cfg.images, loaded)):
        figure = out_dir / f"{stems[i]}_scene.png"
        scene_figure(arr, renders[i].cpu().numpy(), out.scenes[i], f"{Path(path).name}: {cfg.model}", figure)
        results.append(
            {
                "file": str(path),
                "size": [w, h],
                "count": len(out.scenes[i]["objects"]),
                "scene": out.scenes[i],
                "presence": [round(float(p), 4) for p in out.presence[i]],
                "figure": str(figure),
                "problems": scene_problems(world, out.scenes[i]),
            }
        )
    refined = "unrefined" in out.extras
    record = {
        "model": cfg.model,
        "world": world.name,
        "refined": refined,
        "units": "metres, radians (table frame)",
        "images": results,
    }
    (out_dir / "results.json").write_text(json.dumps(record, indent=2))
    for r in results:
        print(f"{r['file']}: {r['count']} object(s): " + "; ".join(object_label(o) for o in r["scene"]["objects"]))
        for problem in r["problems"]:
            print(f"warning: {r['file']}: the inferred scene is not physically valid: {problem}", file=sys.stderr)
    print(f"wrote {out_dir / 'results.json'} and {len(results)} figure(s)")
    return record
