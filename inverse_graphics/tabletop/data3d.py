"""Labelled tabletop renders for the 3D methods: rendered once, held in memory as uint8.

Rendering is the cost here: PyTorch3D's hard CPU rasterizer draws about 150 images/s at 64 px on this 2-core CPU,
the OpenGL backend (renderers/opengl.py, headless EGL) about 4,000. `data_renderer` takes OpenGL when an EGL
context can be made and falls back to PyTorch3D otherwise; the two agree to within an edge pixel in 262,144
(tests/test_opengl.py), so a dataset does not depend on which one drew it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from scenes import tabletop
from scenes.tabletop import SceneTensors
from scenes.world import World

__all__ = [
    "HELD_OUT_SEED",
    "LabelledRenders",
    "data_renderer",
    "make_labelled_renders",
    "training_renders",
    "held_out_renders",
]

HELD_OUT_SEED = 2016  # the held-out scenes every 3D method is evaluated on (see `held_out_renders`)


@dataclass(frozen=True)
class LabelledRenders:
    """B scenes and their renders, slots padded to a fixed N (the most objects a scene may have)."""

    images: torch.Tensor  # ByteTensor (B, 3, H, W): the renders, 0..255
    labels: SceneTensors  # shape_ids (B, N) with -1 for empty slots, positions (B, N, 2) metres, yaws (B, N)
    scenes: tuple  # the same B scenes, for metrics: Scene objects (primitives world), or JSON dicts of a World

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, SceneTensors]:
        """The renders at LongTensor (b,) `index` as FloatTensor (b, 3, H, W) in [0, 1], and their labels."""
        t = self.labels
        labels = SceneTensors(t.shape_ids[index], t.positions[index], t.yaws[index])
        return self.images[index].float() / 255.0, labels


def data_renderer(image_size: int, backend: str = "auto") -> torch.nn.Module:
    """A hard-mode tabletop renderer: "opengl", "pytorch3d", or "auto" (OpenGL if EGL works here, else PyTorch3D
    with a warning, since it is about 25x slower)."""
    if backend != "auto":
        return tabletop.make_renderer(image_size, "hard", backend)
    from renderers.opengl import OpenGLUnavailableError

    try:
        return tabletop.make_renderer(image_size, "hard", "opengl")
    except OpenGLUnavailableError as err:
        warnings.warn(f"rendering with PyTorch3D (slow): {err}", RuntimeWarning, stacklevel=2)
        return tabletop.make_renderer(image_size, "hard", "pytorch3d")


def _pad(t: SceneTensors, n: int) -> SceneTensors:
    """`t` with its slot dimension padded to `n` empty slots."""
    extra = n - t.shape_ids.shape[1]
    return SceneTensors(
        torch.nn.functional.pad(t.shape_ids, (0, extra), value=-1),
        torch.nn.functional.pad(t.positions, (0, 0, 0, extra)),
        torch.nn.functional.pad(t.yaws, (0, extra)),
    )


@torch.no_grad()
def make_labelled_renders(
    n: int,
    seed: int | np.random.Generator,
    image_size: int | None = 64,
    min_objects: int = 0,
    max_objects: int = 3,
    backend: str = "auto",
    chunk: int = 512,
    world: World | None = None,
    randomize: bool = False,
) -> LabelledRenders:
    """Sample `n` scenes with `tabletop.sample_scenes(n, seed, min_objects, max_objects)` and render them; or,
    with a `world`, `world.sample_scenes(n, seed)` (its own count range: min/max_objects are ignored) rendered by
    its renderer at its image size (or `image_size`, an int or (W, H), when given and not the default 64).

    Args:
        seed: an int seed or a numpy Generator for the scene sampler (and, with `randomize`, the appearance).
        backend: "auto", "opengl" or "pytorch3d" (see `data_renderer`; "auto" is the OpenGL fast path).
        chunk: scenes rendered per renderer call.
        world: the World to sample and render (None: the primitives world's module functions, as always).
        randomize: apply the world's [randomize] appearance ranges (training data), seeded by `seed`.
    """
    if world is not None:
        return _world_renders(world, n, seed, image_size, backend, chunk, randomize)
    if randomize:
        raise ValueError("randomize needs a world with a [randomize] section (world=...)")
    assert image_size is not None
    scenes = tabletop.sample_scenes(n, seed=seed, min_objects=min_objects, max_objects=max_objects)
    renderer = data_renderer(image_size, backend)
    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, n, chunk):
        t = tabletop.scenes_to_tensors(scenes[start : start + chunk])
        rgb = t.render(renderer).images  # (b, 3, H, W) in [0, 1]
        images[start : start + chunk] = (rgb * 255).round().to(torch.uint8)
    labels = _pad(tabletop.scenes_to_tensors(scenes), max_objects)
    return LabelledRenders(images=images, labels=labels, scenes=tuple(scenes))


def _world_renders(world: World, n: int, seed, image_size, backend: str, chunk: int,
                   randomize: bool) -> LabelledRenders:  # fmt: skip
    """`make_labelled_renders` for a World."""
    from inverse_graphics.tabletop import world3d

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    scenes = world.sample_scenes(n, seed=rng)
    size = world.image_size if image_size in (None, 64) else image_size
    wh = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    renderer = world3d.renderer(world, "hard", wh, backend)
    W, H = wh
    images = torch.empty(n, 3, H, W, dtype=torch.uint8)
    for start in range(0, n, chunk):
        part = scenes[start : start + chunk]
        t = world3d.scenes_to_tensors(world, part)
        colors = world3d.object_colors(world, t.shape_ids)
        if randomize and world.randomize is not None:
            look = world.sample_appearance(t.shape_ids, True, rng)
            rgb = renderer(t.shape_ids, t.positions, t.yaws, look.object_colors, look.appearance()).images
            rgb = rgb * look.gain[:, None, None, None]
            if look.noise_sd > 0:
                g = torch.Generator().manual_seed(int(rng.integers(2**62)))
                rgb = rgb + look.noise_sd * torch.randn(rgb.shape, generator=g)
        else:
            rgb = renderer(t.shape_ids, t.positions, t.yaws, colors).images
        images[start : start + chunk] = (rgb.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = _pad(world3d.scenes_to_tensors(world, scenes), world.objects_per_scene[1])
    return LabelledRenders(images=images, labels=labels, scenes=tuple(scenes))


def training_renders(n: int, seed: int, **kwargs) -> LabelledRenders:
    """Training scenes for run seed `seed`: a random stream that never coincides with the held-out one."""
    return make_labelled_renders(n, np.random.default_rng((seed, 0)), **kwargs)


def run_held_out(cfg) -> LabelledRenders:
    """The periodic evaluation's held-out scenes of a tabletop training config (eval_n, backend, its world or count
    range)."""
    from inverse_graphics.tabletop import world3d

    return held_out_renders(cfg.eval_n, backend=cfg.backend, **world3d.scene_options(cfg))


def held_out_renders(n: int, **kwargs) -> LabelledRenders:
    """The held-out scenes shared by every 3D method's evaluation: the same for the same `n` and count range
    (sample_scenes draws all counts first, so a different `n` gives different scenes)."""
    return make_labelled_renders(n, np.random.default_rng((HELD_OUT_SEED, 1)), **kwargs)
