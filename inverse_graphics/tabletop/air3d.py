"""Attend, Infer, Repeat on tabletop scenes (Eslami et al., NIPS 2016, Sec. 3.3): the 2D skeleton of `air.py`
with a fixed renderer as the generative model. Nothing in the generative model is learned. docs/air3d.md is the
design note; letters as in docs/conventions.md, plus S = number of objects in the model's World (`model.world`).

Generative model, for steps t = 1..T (T = max objects):
    z_pres_t ~ Bernoulli(rho_t) if z_pres_{t-1} = 1 else 0
        rho_t = (T - t + 1) / (T - t + 2) makes the count uniform on 0..T (a deviation: the paper and the 2D model
        use one rho for every step, a geometric count); a float `z_pres_prior` restores the geometric prior.
    k_t ~ Categorical(1 / S)                                      identity (replaces z_what: the meshes are known)
    u_t ~ N(0, I_2),  (x, y) = POSITION_SD * u_t  (metres, table frame)
        POSITION_SD = 0.12 m is about the spread of object centres in the data (uniform over the +-0.2 m where a
        footprint fits on the table: sd 0.118); 4% of prior objects hang over the table's edge. Why not exactly
        uniform on the table (x = L tanh(u / 2), u logistic, the first version): near the edge tanh saturates,
        the image no longer tells u = 5 from u = 8, and the sleep phase's log q(u) of such objects reached -10^3
        nats, its gradient 1,000 times the identity's, and identity stayed at 33% after 1,450 steps. In metres
        every position is equally legible in the image; q(u) Gaussian, KL(q(u) || N(0, I)) analytic.
    v_t ~ N(0, I_2),  yaw_t = atan2(v_t[1], v_t[0]) / m(k_t)
        m = the yaw symmetry order (cube 4, box 2, wedge 1; spheres and cylinders ignore yaw, m = 0 -> yaw 0).
        Why this yaw code: the angle of a standard 2D normal is uniform, so the prior on yaw is uniform over one
        symmetry period; q(v) Gaussian gives a closed-form KL and a reparameterised sample, and the guide moves a
        point in the plane, never an angle across +-pi (no wrap-around). Dividing by m(k) maps a symmetric shape's
        m equivalent yaws (m modes of the posterior over raw yaw) to one point in v, so a unimodal q suffices.
        |v| is a nuisance latent; the ELBO on (yaw, |v|) still bounds log p(x). (torch's VonMises has no rsample.)
    x ~ N(render(scene), sigma^2 I) on the (3, H, W) render.

Inference network: a CNN embedding (modules3d.ConvEncoder) enters an LSTM through `GatedRecurrence`; each step
sees the previous step's latents and, with `difference_input` (DAIR), the residual `x - render(scene so far)`.
Per step the LSTM state gives q(z_pres) and a coarse position ("where"); that position, projected through the
known camera, places a G x G glimpse of the image (bilinear sampling, differentiable in the position, as the 2D
model's spatial transformer), and a small CNN on the glimpse with the LSTM state gives q(u) as a correction of the
coarse position, q(k) and q(v) ("what"). Why the glimpse: objects are 10-15 pixels at 64 x 64, and a CNN over the
whole image, downsampled 16 times, did not learn to tell them apart (identity at chance after 1,250 sleep steps)
and placed them to ~2 cm; the glimpse sees the object at full resolution, centred, whatever its position.
The objectives (the ELBO, with REINFORCE for the discrete choices and two gradient paths for the continuous
ones, and the optional sleep phase) are in `air3d_objective.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from inverse_graphics.air import pres_probability
from inverse_graphics.modules import GatedRecurrence
from inverse_graphics.tabletop import world3d
from inverse_graphics.tabletop.appearance import AppearanceFit, AppearanceLatent
from inverse_graphics.tabletop.modules3d import (
    Baseline3D,
    ConvEncoder,
    GlimpseEncoder,
    ObjectDists,
    ObjectHead3D,
    WhereDists,
    WhereHead3D,
)
from inverse_graphics.tabletop.refine import DEFAULT_STEPS
from inverse_graphics.tabletop.supervised3d import SceneInference, check_images, default_fit_appearance, scene_inference
from inverse_graphics.tabletop.world3d import LEGACY
from renderers.mesh import Appearance
from renderers.opengl import world_to_clip
from scenes.world import SceneTensors, World

__all__ = [
    "MODEL_KIND",
    "GRADIENTS",
    "POSITION_SD",
    "AIR3DConfig",
    "GuideStep3D",
    "Guide3D",
    "PriorStep3D",
    "AIR3D",
    "check_images",
]

MODEL_KIND = "air-tabletop"  # checkpoint "model" field
ENCODER_MIN_SIDE = 48  # pixels: the derived encoder_pool keeps the pooled image's shorter side at least this
GRADIENTS = ("fd", "soft")  # continuous gradient paths: finite differences (black box) or soft-rasterizer autograd


@dataclass
class AIR3DConfig:
    """Architecture, prior and likelihood of a 3D AIR model; saved with every checkpoint."""

    image_size: int | tuple[int, int] | None = None  # the input renders: an int (H = W) or (W, H); None: the world's
    max_steps: int | None = None  # T: the most objects a scene can hold; None: the world's objects_per_scene max
    channels: tuple[int, ...] = (32, 64, 64, 64)  # stride-2 convolutions of the guide's encoder
    embed_dim: int = 256  # image embedding fed to the recurrence
    rnn_hidden: int = 256  # LSTM state size (the paper: 256)
    baseline_channels: tuple[int, ...] = (16, 32, 32, 32)  # the NVIL baseline's own, smaller CNN
    baseline_hidden: int = 128  # NVIL baseline width
    likelihood_sd: float = 0.1  # sigma of the Gaussian pixel likelihood (docs/air3d.md: about 0.1)
    z_pres_prior: float | None = None  # rho of a geometric count prior; None: per-step rho, count uniform on 0..T
    difference_input: bool = True  # DAIR: each step also sees x - render(scene so far)
    backend: str = "auto"  # hard renderer: "auto" (OpenGL if EGL works, else PyTorch3D), "opengl", "pytorch3d"
    # infer's default refinement (inverse_graphics.tabletop.refine): K = refine_steps iterations of refine_method, "lm"
    # (Levenberg-Marquardt: scenes stop after about 2-4; benchmarks/results/refine_speed.md) or
    # "adam". A config written before refine_method existed counted Adam steps here (20); from_dict reads it as the
    # LM default, since Adam's step count says nothing about LM's.
    refine_steps: int = DEFAULT_STEPS["lm"]
    refine_method: str = "lm"
    # and, after the poses, the structure search (tabletop.scene_search): objects added where the image is
    # unexplained, removed where the image does not support them (LM only)
    refine_search: bool = True
    # the image encoders (guide, residuals, baseline) average-pool their input by this factor; None: derived,
    # the largest that keeps the image's shorter side >= ENCODER_MIN_SIDE pixels (1 up to 95 px, 2 at 128 x 96).
    # The whole-image encoders need only a coarse position (the glimpse sees full resolution) and were most of
    # a step's cost at 128 x 96: six residual encodings and their backward.
    encoder_pool: int | None = None
    # G: the glimpse's side in samples; None: derived, one sample per pixel of the window (at least 24); the
    # first convolution then has stride glimpse_stride (None: G // 24 rounded, so the layers after it see 24 x 24
    # whatever the window). With 24 samples for a 47-pixel window (the kitchen's), a sample was 2 pixels, 14 mm.
    glimpse_size: int | None = None
    glimpse_stride: int | None = None
    # its side in normalised units of the image's shorter side (2 = that side; 0.75 = 24 pixels at 64); square in
    # pixels. None: derived from the world (world3d.derived_scales; the legacy 0.75 without one)
    glimpse_window: float | None = None
    glimpse_channels: tuple[int, ...] = (32, 64, 64)  # the glimpse encoder's convolutions (first stride 1)
    glimpse_dim: int = 256  # glimpse features fed to the "what" head
    glimpse_height: float | None = None  # metres above the table of the glimpse's centre; None: derived (0.05)
    position_sd: float | tuple[float, float] | None = None  # metres, (x, y) = position_sd * u; None: derived (0.12)
    world: dict | None = None  # the World (World.to_dict(), plain JSON); None: the built-in primitives world
    # the per-image appearance latent (appearance.AppearanceLatent: exposure gain, light direction);
    # None: on when the world randomises exposure or light; never without a world
    appearance: bool | None = None

    def __post_init__(self) -> None:
        # Concrete sizes from the world dict (cheap: no meshes parsed), so `image_size` and `max_steps` are always
        # set; without a world, the primitives world's as every earlier checkpoint has them.
        if self.world is None:
            for name, value in LEGACY.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        size = self.image_size if self.image_size is not None else (self.world or {}).get("image_size", 64)
        self.image_size = _size(size)
        if self.max_steps is None:
            self.max_steps = int((self.world or {}).get("objects_per_scene", (0, 3))[1])
        if self.encoder_pool is None:
            self.encoder_pool = max(1, min(image_wh(self.image_size)) // ENCODER_MIN_SIDE)
        if self.refine_method not in DEFAULT_STEPS or self.refine_steps < 0:
            raise ValueError(f"refine_method must be in {tuple(DEFAULT_STEPS)} and refine_steps >= 0, got {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AIR3DConfig:
        d = dict(d)
        d.setdefault("encoder_pool", 1)  # configs saved before the field existed were trained on unpooled images
        d.setdefault("glimpse_stride", 1)  # and had a stride-1 first glimpse convolution
        if "refine_method" not in d:  # written before LM: refine_steps were Adam's (see the field's comment)
            d["refine_steps"], d["refine_method"] = DEFAULT_STEPS["lm"], "lm"
        for k in ("channels", "baseline_channels", "glimpse_channels", "position_sd", "image_size"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)


def _size(size) -> int | tuple[int, int]:
    """An image size as the configs keep it: an int for a square image (as always), else (W, H)."""
    if isinstance(size, int):
        return size
    W, H = (int(v) for v in size)
    return W if W == H else (W, H)


def image_wh(size: int | tuple[int, int]) -> tuple[int, int]:
    """(W, H) of a config's image size."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class GuideStep3D:
    """One step of the inference network (B = batch); stacked over steps in `Guide3D` as (B, T, ...)."""

    z_pres: torch.Tensor  # FloatTensor (B,) of 0/1, already 0 after the first 0
    pres_prob: torch.Tensor  # FloatTensor (B,): q(z_pres = 1), not masked by the previous step
    shape_logits: torch.Tensor  # FloatTensor (B, S): q(k), unnormalised
    shape: torch.Tensor  # LongTensor (B,): the chosen shape id
    u: torch.Tensor  # FloatTensor (B, 2): position latent (sampled, or the mean)
    u_loc: torch.Tensor  # FloatTensor (B, 2)
    u_scale: torch.Tensor  # FloatTensor (B, 2)
    v: torch.Tensor  # FloatTensor (B, 2): yaw latent
    v_loc: torch.Tensor  # FloatTensor (B, 2): q(v) of the chosen shape
    v_scale: torch.Tensor  # FloatTensor (B, 2)
    position: torch.Tensor  # FloatTensor (B, 2): (x, y) metres, table frame
    yaw: torch.Tensor  # FloatTensor (B,): radians
    state: tuple[torch.Tensor, torch.Tensor]  # the LSTM's (h, c) after this step, each (B, rnn_hidden)


@dataclass(frozen=True)
class Guide3D:
    """All T steps: each field of GuideStep3D (but state) stacked to (B, T, ...), plus the recurrence inputs."""

    z_pres: torch.Tensor
    pres_prob: torch.Tensor
    shape_logits: torch.Tensor
    shape: torch.Tensor
    u: torch.Tensor
    u_loc: torch.Tensor
    u_scale: torch.Tensor
    v: torch.Tensor
    v_loc: torch.Tensor
    v_scale: torch.Tensor
    position: torch.Tensor
    yaw: torch.Tensor
    step_inputs: torch.Tensor  # FloatTensor (B, T, 1 + S + 4): what each step saw of the previous one
    # with the appearance latent: q(a)'s loc (B, 3), scale (B, 3) and the latent used (B, 3, sampled or the loc)
    appearance: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def scene(self) -> SceneTensors:
        """The present objects as renderer input (absent slots get shape id -1)."""
        return as_scene_tensors(self.z_pres, self.shape, self.position, self.yaw)


@dataclass(frozen=True)
class PriorStep3D:
    """One step of the generative model for n scenes; fields as in GuideStep3D."""

    z_pres: torch.Tensor  # FloatTensor (n,)
    shape: torch.Tensor  # LongTensor (n,)
    u: torch.Tensor  # FloatTensor (n, 2)
    v: torch.Tensor  # FloatTensor (n, 2)
    position: torch.Tensor  # FloatTensor (n, 2)
    yaw: torch.Tensor  # FloatTensor (n,)

    @classmethod
    def stack(cls, steps: list[PriorStep3D]) -> PriorStep3D:
        """T steps -> one PriorStep3D with every field (n, T, ...)."""
        return cls(*(torch.stack([getattr(s, f) for s in steps], 1) for f in cls.__dataclass_fields__))

    def scene(self) -> SceneTensors:
        """Stacked steps as renderer input (absent slots get shape id -1)."""
        return as_scene_tensors(self.z_pres, self.shape, self.position, self.yaw)


def as_scene_tensors(z_pres: torch.Tensor, shape: torch.Tensor, position: torch.Tensor, yaw: torch.Tensor):
    """z_pres (B, T), shape (B, T), position (B, T, 2), yaw (B, T) -> SceneTensors, absent objects id -1."""
    return SceneTensors(torch.where(z_pres > 0.5, shape, torch.full_like(shape, -1)), position, yaw)


POSITION_SD = LEGACY["position_sd"]  # metres: the primitives model's spread of object centres (module docstring)


def decode_position(u: torch.Tensor) -> torch.Tensor:
    """u (..., 2) -> (x, y) metres for the world-less primitives model: POSITION_SD * u (a World's model:
    `AIR3D.decode_position`, per table axis)."""
    return POSITION_SD * u


def decode_yaw(v: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """v (..., 2) and the shape's symmetry order m (...) -> yaw (...) = atan2(v_y, v_x) / m, or 0 where m = 0."""
    angle = torch.atan2(v[..., 1], v[..., 0])
    return torch.where(order > 0, angle / order.clamp(min=1), torch.zeros_like(angle))


def count_prior(config: AIR3DConfig) -> torch.Tensor:
    """FloatTensor (T,): rho_t = p(z_pres_t = 1 | z_pres_{t-1} = 1) (module docstring): the count uniform on the
    world's objects_per_scene (0..T without a world; 0-based t: 3/4, 2/3, 1/2 for T = 3)."""
    T = config.max_steps
    assert T is not None
    if config.z_pres_prior is not None:
        return torch.full((T,), float(config.z_pres_prior))
    low, high = (0, T) if config.world is None else (int(v) for v in config.world["objects_per_scene"])
    return world3d.count_prior(low, high, T)


class AIR3D(nn.Module):
    """3D AIR for one World (`self.world`, carried in the config as `world.to_dict()`). See the module docstring
    for the model; training objectives in `air3d_objective.py`."""

    yaw_order: torch.Tensor  # LongTensor (S,): m of each object (world3d.yaw_orders)
    pres_prior: torch.Tensor  # FloatTensor (T,): rho_t
    signal_mean: torch.Tensor  # FloatTensor (T,): NVIL's input-independent baseline, a running mean
    world_to_clip: torch.Tensor  # FloatTensor (4, 4): the camera's projection (renderers.opengl.world_to_clip)
    glimpse_offsets: torch.Tensor  # FloatTensor (1, G, G, 2): the glimpse's sampling grid around its centre
    position_sd: torch.Tensor  # FloatTensor (2,): metres per unit of u along x and y
    table_half: torch.Tensor  # FloatTensor (2,): the table's half sides, metres (step inputs are scaled by them)

    def __init__(self, config: AIR3DConfig | None = None):
        super().__init__()
        cfg = self.config = config or AIR3DConfig()
        self.world: World = world3d.world_from_config(cfg.world)
        self.legacy = cfg.world is None  # the pre-world primitives model: its exact scales and steps
        assert cfg.max_steps is not None and cfg.image_size is not None  # set by AIR3DConfig.__post_init__
        size = cfg.image_size
        self.image_wh = image_wh(size)  # (W, H)
        self.max_steps = T = cfg.max_steps
        low, high = (0, T) if self.legacy else self.world.objects_per_scene
        if T < high:
            raise ValueError(f"max_steps = {T} cannot hold the {high} objects a scene of world {self.world.name!r} "
                             "may have (objects_per_scene); use max_steps >= that or None")  # fmt: skip
        S = self.n_shapes = len(self.world.objects)
        self.step_dim = 1 + S + 2 + 2  # previous z_pres, one-hot shape, position / table half sides, v
        assert cfg.encoder_pool is not None  # set by AIR3DConfig.__post_init__
        self.encoder = ConvEncoder(size, cfg.channels, cfg.embed_dim, cfg.encoder_pool)
        # The embedding is unbounded (ReLU); unnormalised, it grew to ~80 in 1,000 sleep steps at lr 1e-3, the LSTM's
        # gates saturated (pre-activations ~270) and every image got the same q. LayerNorm keeps it at unit scale.
        self.embed_norm = nn.LayerNorm(cfg.embed_dim)
        self.rnn = GatedRecurrence(cfg.embed_dim, self.step_dim, cfg.rnn_hidden)
        self.where_head = WhereHead3D(cfg.rnn_hidden)
        self.scales = scales = self._scales()
        G = self.glimpse_samples = cfg.glimpse_size or max(24, math.ceil(scales.glimpse_pixels))
        stride = cfg.glimpse_stride or max(1, round(G / 24))
        self.glimpse_encoder = GlimpseEncoder(G, cfg.glimpse_channels, cfg.glimpse_dim, stride)
        self.object_head = ObjectHead3D(cfg.rnn_hidden, cfg.glimpse_dim, S)
        self.baseline = Baseline3D(size, cfg.baseline_channels, self.step_dim, cfg.baseline_hidden, cfg.encoder_pool)
        use_appearance = default_fit_appearance(self.world) if cfg.appearance is None else cfg.appearance
        use_appearance = use_appearance and not self.legacy
        self.appearance_latent = AppearanceLatent(self.world, cfg.embed_dim) if use_appearance else None
        self.register_buffer("yaw_order", world3d.yaw_orders(self.world, True), persistent=False)
        self.register_buffer("pres_prior", self._count_prior(low, high), persistent=False)
        self.register_buffer("signal_mean", torch.zeros(T))
        # Sums the running mean's batch statistics over ranks (set by the training engine under torchrun).
        self.stat_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None
        camera = self.world.camera.renderer_camera(self.image_wh)
        clip = world_to_clip(camera, None if self.legacy else self.image_wh)
        self.register_buffer("world_to_clip", torch.from_numpy(clip), persistent=False)
        self.register_buffer("position_sd", torch.tensor(scales.position_sd), persistent=False)
        self.register_buffer("table_half", torch.tensor(world3d.table_half_sizes(self.world)), persistent=False)
        W, H = self.image_wh
        ramp = (torch.arange(G) + 0.5) / G * 2 - 1  # (G,) -1..1
        if self.legacy:  # exactly the pre-world grid
            assert cfg.glimpse_window is not None
            ramp_x = ramp_y = ramp * cfg.glimpse_window / 2
        else:  # square in pixels: the window's side in each axis's normalised units
            ramp_x, ramp_y = ramp * scales.glimpse_pixels / W, ramp * scales.glimpse_pixels / H
        offsets = torch.stack(torch.meshgrid(ramp_x, ramp_y, indexing="xy"), dim=-1)[None]  # (1, G, G, 2): (x, y)
        self.register_buffer("glimpse_offsets", offsets, persistent=False)

    def _scales(self) -> world3d.WorldScales:
        """Position-prior sd, glimpse height and side: the config's where set, else derived from the world."""
        cfg = self.config
        derived = world3d.derived_scales(self.world, self.image_wh) if None in (
            cfg.position_sd, cfg.glimpse_height, cfg.glimpse_window) else None  # fmt: skip
        sd = cfg.position_sd if cfg.position_sd is not None else derived.position_sd  # type: ignore[union-attr]
        sd2 = (float(sd), float(sd)) if isinstance(sd, float | int) else (float(sd[0]), float(sd[1]))
        height = cfg.glimpse_height if cfg.glimpse_height is not None else derived.glimpse_height  # type: ignore
        if cfg.glimpse_window is not None:
            pixels = cfg.glimpse_window * min(self.image_wh) / 2
        else:
            pixels = derived.glimpse_pixels  # type: ignore[union-attr]
        return world3d.WorldScales(sd2, float(height), float(pixels))

    def _count_prior(self, low: int, high: int) -> torch.Tensor:
        if self.config.z_pres_prior is not None:
            return torch.full((self.max_steps,), float(self.config.z_pres_prior))
        return world3d.count_prior(low, high, self.max_steps)

    def decode_position(self, u: torch.Tensor) -> torch.Tensor:
        """u (..., 2) -> (x, y) metres: position_sd * u (per table axis)."""
        return u * self.position_sd

    # -------------------------------------------------------------------------------------------- renderers
    def renderer(self, kind: str) -> nn.Module:
        """The world's renderer of one kind at the model's image size, built once: "hard" (forward only: inputs
        and data), "fd" (the hard one with finite-difference gradients) or "soft" (PyTorch3D's soft rasterizer)."""
        if kind not in ("hard", *GRADIENTS):
            raise ValueError(f"renderer kind must be 'hard' or one of {GRADIENTS}, got {kind!r}")
        return world3d.renderer(self.world, kind, self.image_wh, self.config.backend, self.legacy)

    def object_colors(self, shape_ids: torch.Tensor) -> torch.Tensor:
        """FloatTensor (B, N, 3): the world's nominal albedo of each object slot."""
        return world3d.object_colors(self.world, shape_ids)

    @torch.no_grad()
    def render_input(self, scene: SceneTensors, look: AppearanceFit | None = None) -> torch.Tensor:
        """Hard render (B, 3, H, W) of a scene, as an input to the guide: no gradient path."""
        return self.render(scene, "hard", look)

    def render(self, scene: SceneTensors, kind: str, look: AppearanceFit | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) of scene tensors with the world's object colours, by the renderer `kind`; under
        the appearance `look` (light, then gain, clamped to [0, 1]) when given, else the nominal one."""
        colors = self.object_colors(scene.shape_ids)
        if look is None:
            return scene.render(self.renderer(kind), colors).images
        images = self.renderer(kind)(scene.shape_ids, scene.positions, scene.yaws, colors, look.appearance()).images
        return (images * look.gain[:, None, None, None]).clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------------------------ guide
    def step_input(self, z_pres, shape, position, v) -> torch.Tensor:
        """(B,), (B,), (B, 2), (B, 2) -> FloatTensor (B, step_dim): what the next step sees of this one."""
        one_hot = F.one_hot(shape, self.n_shapes).to(position.dtype) * z_pres[:, None]
        return torch.cat([z_pres[:, None], one_hot, position / self.table_half, v], dim=1)

    def image_gates(
        self, images: torch.Tensor, so_far: SceneTensors | None, look: AppearanceFit | None = None
    ) -> torch.Tensor:
        """The image's contribution to the LSTM gates (B, 4 hidden); with `difference_input`, of the residual
        images - render(so_far) (so_far None: no objects yet, only the table). The residual is drawn without
        gradients: it is an input, not a path. This drops the dependence of later steps' q on earlier poses
        *through the residual* (a small bias in the pathwise gradient, accepted because the black-box renderer has
        no gradient to give); the step inputs keep that dependence. look: the appearance the residual's render
        takes (the guide's own estimate), else the nominal one."""
        if self.config.difference_input:  # render_input runs under no_grad: an input only, see docstring
            images = images - self.render_input(self.empty_scene(images) if so_far is None else so_far, look)
        return self.rnn.image_gates(self.embed_norm(self.encoder(images)))

    def glimpse_centres(self, position: torch.Tensor) -> torch.Tensor:
        """Table positions (B, 2) -> where they appear, (B, 2) in grid_sample's units (x right, y down, -1..1):
        the point `glimpse_height` above the table projected through the camera."""
        height = position.new_full((position.shape[0], 1), self.scales.glimpse_height)
        clip = torch.cat([position, height, torch.ones_like(height)], dim=1) @ self.world_to_clip.T  # (B, 4)
        ndc = clip[:, :2] / clip[:, 3:]
        return torch.stack([ndc[:, 0], -ndc[:, 1]], dim=1)  # OpenGL's NDC y points up, image rows down

    def glimpse(self, images: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), table positions (B, 2) -> FloatTensor (B, 3, G, G), differentiable in both."""
        grid = self.glimpse_centres(position)[:, None, None, :] + self.glimpse_offsets
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def where(self, h: torch.Tensor) -> WhereDists:
        """LSTM state (B, hidden) -> q(z_pres) and the glimpse's centre."""
        return self.where_head(h)

    def what(self, h: torch.Tensor, images: torch.Tensor, wd: WhereDists) -> ObjectDists:
        """LSTM state (B, hidden), images (B, 3, H, W), the step's WhereDists -> q(u), q(k), q(v) per shape, from
        the glimpse at the coarse position."""
        features = self.glimpse_encoder(self.glimpse(images, self.decode_position(wd.u_coarse)))
        return self.object_head(h, features, wd.u_coarse)

    def guide_step(self, image_gates, images, prev, prev_pres, state, sample: bool) -> GuideStep3D:
        """One step: image_gates (B, 4 hidden), images (B, 3, H, W), prev (B, step_dim), prev_pres (B,),
        state (h, c) -> GuideStep3D. sample: draw latents (training) or take the most probable z_pres and shape and
        the means (inference)."""
        h, c = self.rnn(image_gates, prev, state)
        wd = self.where(h)
        pres_prob = self.pres_probability(wd.pres_logit)
        d = self.what(h, images, wd)
        u = d.u_loc + d.u_scale * torch.randn_like(d.u_loc) if sample else d.u_loc
        position = self.decode_position(u)
        if sample:
            z_pres = torch.bernoulli(pres_prob.detach()) * prev_pres  # REINFORCE: the sample is no path
            shape = torch.distributions.Categorical(logits=d.shape_logits.detach()).sample()
        else:
            z_pres = (pres_prob > 0.5).to(pres_prob.dtype) * prev_pres
            shape = d.shape_logits.argmax(1)
        pick = shape[:, None, None].expand(-1, 1, 2)
        v_loc, v_scale = d.v_loc.gather(1, pick).squeeze(1), d.v_scale.gather(1, pick).squeeze(1)  # (B, 2)
        v = v_loc + v_scale * torch.randn_like(v_loc) if sample else v_loc
        yaw = decode_yaw(v, self.yaw_order[shape])
        return GuideStep3D(
            z_pres, pres_prob, d.shape_logits, shape, u, d.u_loc, d.u_scale, v, v_loc, v_scale, position, yaw, (h, c)
        )

    @staticmethod
    def pres_probability(logit: torch.Tensor) -> torch.Tensor:
        """q(z_pres = 1) from its logit, squashed into [eps, 1 - eps] (not clamped: keeps the gradient; air.py)."""
        return pres_probability(logit)

    def initial_state(self, images: torch.Tensor):
        """(prev step input, prev_pres, LSTM state) before the first step."""
        B = images.shape[0]
        zeros = images.new_zeros(B, self.config.rnn_hidden)
        prev = torch.cat([images.new_ones(B, 1), images.new_zeros(B, self.step_dim - 1)], dim=1)
        return prev, images.new_ones(B), (zeros, zeros)

    def guide(self, images: torch.Tensor, sample: bool = True) -> Guide3D:
        """Run all T steps on images (B, 3, H, W) in [0, 1]; returns the stacked latents.

        Inference (sample False) computes each step only for the scenes still going (z_pres = 1 so far): a scene
        that has stopped never restarts, and its later steps are reported as absent (z_pres and pres_prob 0, the
        other fields 0). Training computes every step of every scene (the ELBO's terms need them)."""
        B = images.shape[0]
        prev, prev_pres, state = self.initial_state(images)
        appearance, look = self.appearance_q(images, sample)
        gates = self.image_gates(images, None, look)
        steps: list[GuideStep3D] = []
        inputs: list[torch.Tensor] = []
        for t in range(self.max_steps):
            inputs.append(prev)
            rows = None if sample else prev_pres.nonzero().squeeze(1)
            if rows is not None and rows.numel() == B:
                rows = None  # every scene still going: no copies
            if rows is None:
                if self.config.difference_input and t > 0:
                    gates = self.image_gates(images, self._stack(steps).scene(), look)
                step = self.guide_step(gates, images, prev, prev_pres, state, sample)
            else:
                step = self._step_rows(rows, t, steps, gates, images, prev, prev_pres, state, look)
            steps.append(step)
            state, prev_pres = step.state, step.z_pres
            prev = self.step_input(step.z_pres, step.shape, step.position, step.v)
        return replace(self._stack(steps), step_inputs=torch.stack(inputs, dim=1), appearance=appearance)

    def _step_rows(self, rows, t, steps, gates, images, prev, prev_pres, state, look) -> GuideStep3D:
        """An inference step for the scenes `rows` (LongTensor) only, scattered into a full-batch GuideStep3D."""
        if rows.numel() == 0:  # every scene has stopped (t > 0 here: at t = 0 every scene is going)
            last = steps[-1]
            zeros = {n: torch.zeros_like(getattr(last, n)) for n in GuideStep3D.__dataclass_fields__ if n != "state"}
            return GuideStep3D(**zeros, state=state)
        x = images[rows]
        if self.config.difference_input and t > 0:
            sub_look = None if look is None else world3d.rows_of(look, rows)
            g = self.image_gates(x, world3d.rows_of(self._stack(steps).scene(), rows), sub_look)
        else:
            g = gates[rows]
        sub = self.guide_step(g, x, prev[rows], prev_pres[rows], (state[0][rows], state[1][rows]), False)
        out = {}
        for name in GuideStep3D.__dataclass_fields__:
            if name == "state":
                continue
            value = getattr(sub, name)
            full = value.new_zeros((images.shape[0], *value.shape[1:]))
            full[rows] = value
            out[name] = full
        h, c = state[0].clone(), state[1].clone()
        h[rows], c[rows] = sub.state
        return GuideStep3D(**out, state=(h, c))

    def appearance_q(self, images: torch.Tensor, sample: bool):
        """q(a | images) of the appearance latent: ((loc, scale, a) each (B, 3), the AppearanceFit of the loc for
        the residuals' renders, detached: an input), or (None, None) without the latent."""
        if self.appearance_latent is None:
            return None, None
        loc, scale = self.appearance_latent(self.embed_norm(self.encoder(images)))
        a = loc + scale * torch.randn_like(loc) if sample else loc
        return (loc, scale, a), self.appearance_latent.decode(loc.detach())

    @staticmethod
    def empty_scene(images: torch.Tensor) -> SceneTensors:
        """B scenes with no object (only the table), for the first step's residual."""
        B = images.shape[0]
        ids = torch.full((B, 0), -1, dtype=torch.long, device=images.device)
        return SceneTensors(ids, images.new_zeros(B, 0, 2), images.new_zeros(B, 0))

    @staticmethod
    def _stack(steps: list[GuideStep3D]) -> Guide3D:
        names = [f for f in Guide3D.__dataclass_fields__ if f not in ("step_inputs", "appearance")]
        fields = {n: torch.stack([getattr(s, n) for s in steps], dim=1) for n in names}
        return Guide3D(**fields, step_inputs=torch.empty(0))  # type: ignore[arg-type]  # the tensor fields

    # ------------------------------------------------------------------------------------------ generative
    def prior_step(self, n: int, prev_pres: torch.Tensor, t: int) -> PriorStep3D:
        """Step t (0-based) of the generative model for n scenes, given the previous z_pres (n,)."""
        z_pres = torch.bernoulli(prev_pres.new_full((n,), float(self.pres_prior[t]))) * prev_pres
        shape = torch.randint(self.n_shapes, (n,), device=prev_pres.device)
        u = torch.randn(n, 2, device=prev_pres.device)
        v = torch.randn(n, 2, device=prev_pres.device)
        return PriorStep3D(z_pres, shape, u, v, self.decode_position(u), decode_yaw(v, self.yaw_order[shape]))

    def sample_prior(self, n: int) -> PriorStep3D:
        """n scenes from the prior, every field stacked over steps to (n, T, ...). Objects may overlap or
        stand partly off the table: the prior knows nothing of either (data3d's scenes reject both)."""
        pres = self.signal_mean.new_ones(n)
        steps = []
        for t in range(self.max_steps):
            steps.append(self.prior_step(n, pres, t))
            pres = steps[-1].z_pres
        return PriorStep3D.stack(steps)

    def sample(self, n: int) -> tuple[PriorStep3D, torch.Tensor]:
        """Prior scenes and their hard renders FloatTensor (n, 3, H, W) in [0, 1] (the likelihood's means)."""
        p = self.sample_prior(n)
        return p, self.render_input(p.scene())

    @torch.no_grad()
    def sample_with_appearance(self, n: int) -> tuple[PriorStep3D, torch.Tensor, torch.Tensor | None]:
        """Prior scenes rendered, with the appearance latent, under the world's own randomised appearance (all of
        its [randomize] ranges: gain, light, ambient, colours, eye, pixel noise; seeded from torch's generator),
        and the latents a (n, 3) of their gain and light; without the latent, `sample` and None."""
        if self.appearance_latent is None:
            return (*self.sample(n), None)
        p = self.sample_prior(n)
        t = p.scene()
        seed = int(torch.randint(2**62, (1,)))
        drawn = self.world.sample_appearance(t.shape_ids.cpu(), True, seed)
        dev = self.signal_mean.device
        look = Appearance(**{k: getattr(drawn.appearance(), k).to(dev) for k in ("light_direction", "ambient",
                                                                                 "table_color", "eye")})  # fmt: skip
        images = self.renderer("hard")(t.shape_ids, t.positions, t.yaws, drawn.object_colors.to(dev), look).images
        images = images * drawn.gain.to(dev)[:, None, None, None]
        if drawn.noise_sd > 0:
            images = images + drawn.noise_sd * torch.randn_like(images)
        a = self.appearance_latent.encode(drawn.gain.to(dev), drawn.light_direction.to(dev))
        return p, images.clamp(0.0, 1.0), a

    def baseline_step(self, images: torch.Tensor, step_inputs: torch.Tensor) -> torch.Tensor:
        """NVIL baselines for every step: images (B, 3, H, W), step_inputs (B, T, step_dim) -> (B, T).
        Inputs are detached: the baseline is fit to the learning signal and must not shape the guide."""
        return self.baseline(images.detach(), step_inputs.detach())

    @torch.no_grad()
    def update_signal_mean(self, centred: torch.Tensor, active: torch.Tensor) -> None:
        """Move the running mean of each step's learning signal 10% towards the batch's, as air.py."""
        sums = torch.stack([(centred * active).sum(0), active.sum(0)])  # (2, T): signal sums, active counts
        if self.stat_reducer is not None:
            sums = self.stat_reducer(sums)  # distributed training: the sums over every rank's part of the batch
        n = sums[1].clamp(min=1)  # (T,)
        self.signal_mean += 0.1 * sums[0] / n

    # ------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def infer(
        self,
        images: torch.Tensor,
        refine: int | None = None,
        refine_gradient: str = "fd",
        resize: bool = False,
        fit_appearance: bool | None = None,
        search: bool | None = None,
    ) -> SceneInference:
        """Scenes from renders: the most probable count and shapes and the means of q(u), q(v).

        Args:
            images: FloatTensor (B, 3, H, W) in [0, 1], (W, H) = the model's image size (its world's).
            refine: K iterations of render-and-compare refinement (inverse_graphics.tabletop.refine) of the poses; None:
                the config's `refine_steps` of its `refine_method` (8 Levenberg-Marquardt iterations by default,
                scenes stop after about 2-4: benchmarks/results/refine_speed.md); 0: none.
            refine_gradient: "fd" (finite differences of the black-box render: the config's method) or "soft"
                (Adam through PyTorch3D's soft rasterizer, K Adam steps, 20 when refine is None; far slower).
            resize: resize images of another size to the model's (bilinear, antialiased); False: a ValueError
                naming both sizes.
            fit_appearance: with refinement, fit each image's appearance (tabletop.appearance): the exposure gain
                in closed form before the poses, on the guide's light or the nominal one, whichever is closer; the
                light direction (Gauss-Newton on the hard render) and each object's albedo on the refined poses,
                then the poses again; None: when the world randomises them; False: the nominal appearance.
                extras["appearance"] holds the estimate when there is one.
            search: with LM refinement, then search the scenes' structure (tabletop.scene_search: objects added
                where the image is unexplained, removed where it is against them); None: the config's
                `refine_search` (on). Counts and shapes may then differ from the guide's (extras["unrefined"]).
        Returns:
            SceneInference: scenes (B JSON-format dicts in the world's object names, footprints clamped onto the
            table), counts LongTensor (B,), presence FloatTensor (B, T) = q(z_pres = 1) per step,
            extras["unrefined"] when refined.
        Raises:
            TypeError / ValueError naming the problem for a non-tensor, non-float, wrong shape, NaN or [0, 1].
        """
        images = world3d.prepare_images(images, self.image_wh, resize).to(self.signal_mean)
        method = "adam" if refine_gradient == "soft" else self.config.refine_method
        search = self.config.refine_search if search is None else search
        default = self.config.refine_steps if method == self.config.refine_method else DEFAULT_STEPS[method]
        steps = default if refine is None else int(refine)
        g = self.guide(images, sample=False)
        t = g.scene()
        t = SceneTensors(t.shape_ids, world3d.clamp_to_table(self.world, t.shape_ids, t.positions, t.yaws), t.yaws)
        world = None if self.legacy else self.world
        fit = (None if default_fit_appearance(world) else False) if fit_appearance is None else fit_appearance
        guess = None
        if self.appearance_latent is not None and g.appearance is not None:
            guess = self.appearance_latent.decode(g.appearance[0])
        search = search and method == "lm" and steps > 0
        out = scene_inference(t, images, steps, g.pres_prob, refine_gradient, world, fit, guess, method, search)
        if guess is not None and "appearance" not in out.extras:
            out.extras["appearance"] = guess.to_dicts()
        return out
