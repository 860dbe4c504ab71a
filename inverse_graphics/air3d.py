"""Attend, Infer, Repeat on tabletop scenes (Eslami et al., NIPS 2016, Sec. 3.3): the 2D skeleton of `air.py`
with a fixed renderer as the generative model. Nothing in the generative model is learned. docs/air3d.md is the
design note; letters as in docs/conventions.md, plus S = number of shapes (scenes.tabletop_objects.SHAPES).

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

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from inverse_graphics.air import pres_probability
from inverse_graphics.data3d import data_renderer
from inverse_graphics.modules import GatedRecurrence
from inverse_graphics.modules3d import (
    Baseline3D,
    ConvEncoder,
    GlimpseEncoder,
    ObjectDists,
    ObjectHead3D,
    WhereDists,
    WhereHead3D,
)
from inverse_graphics.refine import clamp_to_table
from inverse_graphics.supervised3d import SceneInference, check_images, scene_inference, yaw_orders
from renderers.finite_difference import FiniteDifferenceRenderer, FiniteDifferenceSettings
from renderers.opengl import world_to_clip
from scenes import tabletop
from scenes.tabletop import CAMERA, TABLE_HALF_SIZE, SceneTensors
from scenes.tabletop_objects import SHAPES

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
GRADIENTS = ("fd", "soft")  # continuous gradient paths: finite differences (black box) or soft-rasterizer autograd


@dataclass
class AIR3DConfig:
    """Architecture, prior and likelihood of a 3D AIR model; saved with every checkpoint."""

    image_size: int = 64  # H = W of the input renders
    max_steps: int = 3  # T: the most objects a scene can hold
    channels: tuple[int, ...] = (32, 64, 64, 64)  # stride-2 convolutions of the guide's encoder
    embed_dim: int = 256  # image embedding fed to the recurrence
    rnn_hidden: int = 256  # LSTM state size (the paper: 256)
    baseline_channels: tuple[int, ...] = (16, 32, 32, 32)  # the NVIL baseline's own, smaller CNN
    baseline_hidden: int = 128  # NVIL baseline width
    likelihood_sd: float = 0.1  # sigma of the Gaussian pixel likelihood (docs/air3d.md: about 0.1)
    z_pres_prior: float | None = None  # rho of a geometric count prior; None: per-step rho, count uniform on 0..T
    difference_input: bool = True  # DAIR: each step also sees x - render(scene so far)
    backend: str = "auto"  # hard renderer: "auto" (OpenGL if EGL works, else PyTorch3D), "opengl", "pytorch3d"
    refine_steps: int = 20  # infer's default render-and-compare steps (refine.RefineConfig: 11 -> 1.5 mm in 20)
    glimpse_size: int = 24  # G: the glimpse's side in samples
    glimpse_window: float = 0.75  # its side in normalised image units (2 = the whole image): 24 pixels at 64
    glimpse_channels: tuple[int, ...] = (32, 64, 64)  # the glimpse encoder's convolutions (first stride 1)
    glimpse_dim: int = 256  # glimpse features fed to the "what" head
    glimpse_height: float = 0.05  # metres above the table of the point the glimpse is centred on

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AIR3DConfig:
        d = dict(d)
        for k in ("channels", "baseline_channels", "glimpse_channels"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


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


POSITION_SD = 0.12  # metres: the prior's spread of object centres (module docstring)


def decode_position(u: torch.Tensor) -> torch.Tensor:
    """u (..., 2) -> (x, y) metres: POSITION_SD * u."""
    return POSITION_SD * u


def decode_yaw(v: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """v (..., 2) and the shape's symmetry order m (...) -> yaw (...) = atan2(v_y, v_x) / m, or 0 where m = 0."""
    angle = torch.atan2(v[..., 1], v[..., 0])
    return torch.where(order > 0, angle / order.clamp(min=1), torch.zeros_like(angle))


def count_prior(config: AIR3DConfig) -> torch.Tensor:
    """FloatTensor (T,): rho_t = p(z_pres_t = 1 | z_pres_{t-1} = 1) (module docstring)."""
    T = config.max_steps
    if config.z_pres_prior is not None:
        return torch.full((T,), float(config.z_pres_prior))
    return torch.tensor([(T - t) / (T - t + 1) for t in range(T)])  # 0-based t: 3/4, 2/3, 1/2 for T = 3


class AIR3D(nn.Module):
    """3D AIR. See the module docstring for the model; training objectives in `air3d_objective.py`."""

    yaw_order: torch.Tensor  # LongTensor (S,): m of each shape (supervised3d.yaw_orders(True))
    pres_prior: torch.Tensor  # FloatTensor (T,): rho_t
    signal_mean: torch.Tensor  # FloatTensor (T,): NVIL's input-independent baseline, a running mean
    world_to_clip: torch.Tensor  # FloatTensor (4, 4): the camera's projection (renderers.opengl.world_to_clip)
    glimpse_offsets: torch.Tensor  # FloatTensor (1, G, G, 2): the glimpse's sampling grid around its centre

    def __init__(self, config: AIR3DConfig | None = None):
        super().__init__()
        cfg = self.config = config or AIR3DConfig()
        S = len(SHAPES)
        self.step_dim = 1 + S + 2 + 2  # previous z_pres, one-hot shape, position / TABLE_HALF_SIZE, v
        self.encoder = ConvEncoder(cfg.image_size, cfg.channels, cfg.embed_dim)
        # The embedding is unbounded (ReLU); unnormalised, it grew to ~80 in 1,000 sleep steps at lr 1e-3, the LSTM's
        # gates saturated (pre-activations ~270) and every image got the same q. LayerNorm keeps it at unit scale.
        self.embed_norm = nn.LayerNorm(cfg.embed_dim)
        self.rnn = GatedRecurrence(cfg.embed_dim, self.step_dim, cfg.rnn_hidden)
        self.where_head = WhereHead3D(cfg.rnn_hidden)
        self.glimpse_encoder = GlimpseEncoder(cfg.glimpse_size, cfg.glimpse_channels, cfg.glimpse_dim)
        self.object_head = ObjectHead3D(cfg.rnn_hidden, cfg.glimpse_dim, S)
        self.baseline = Baseline3D(cfg.image_size, cfg.baseline_channels, self.step_dim, cfg.baseline_hidden)
        self.register_buffer("yaw_order", yaw_orders(True), persistent=False)
        self.register_buffer("pres_prior", count_prior(cfg), persistent=False)
        self.register_buffer("signal_mean", torch.zeros(cfg.max_steps))
        # Sums the running mean's batch statistics over ranks (set by the training engine under torchrun).
        self.stat_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.register_buffer("world_to_clip", torch.from_numpy(world_to_clip(CAMERA)), persistent=False)
        ramp = ((torch.arange(cfg.glimpse_size) + 0.5) / cfg.glimpse_size * 2 - 1) * cfg.glimpse_window / 2
        offsets = torch.stack(torch.meshgrid(ramp, ramp, indexing="xy"), dim=-1)[None]  # (1, G, G, 2): (x, y)
        self.register_buffer("glimpse_offsets", offsets, persistent=False)
        self._renderers: dict[str, nn.Module] = {}  # built on first use; no parameters, not in the state dict

    # -------------------------------------------------------------------------------------------- renderers
    def renderer(self, kind: str) -> nn.Module:
        """The renderer of one kind, built once: "hard" (forward only: inputs and data), "fd" (the hard one with
        finite-difference gradients) or "soft" (PyTorch3D's soft rasterizer, autograd)."""
        if kind not in self._renderers:
            size = self.config.image_size
            if kind == "hard":
                self._renderers[kind] = data_renderer(size, self.config.backend)
            elif kind == "fd":
                steps = FiniteDifferenceSettings.for_image_size(size)
                self._renderers[kind] = FiniteDifferenceRenderer(self.renderer("hard"), steps)
            elif kind == "soft":
                self._renderers[kind] = tabletop.make_renderer(size, "soft")
            else:
                raise ValueError(f"renderer kind must be 'hard' or one of {GRADIENTS}, got {kind!r}")
        return self._renderers[kind]

    @torch.no_grad()
    def render_input(self, scene: SceneTensors) -> torch.Tensor:
        """Hard render (B, 3, H, W) of a scene, as an input to the guide: no gradient path."""
        return scene.render(self.renderer("hard")).images

    # ------------------------------------------------------------------------------------------------ guide
    def step_input(self, z_pres, shape, position, v) -> torch.Tensor:
        """(B,), (B,), (B, 2), (B, 2) -> FloatTensor (B, step_dim): what the next step sees of this one."""
        one_hot = F.one_hot(shape, len(SHAPES)).to(position.dtype) * z_pres[:, None]
        return torch.cat([z_pres[:, None], one_hot, position / TABLE_HALF_SIZE, v], dim=1)

    def image_gates(self, images: torch.Tensor, so_far: SceneTensors | None) -> torch.Tensor:
        """The image's contribution to the LSTM gates (B, 4 hidden); with `difference_input`, of the residual
        images - render(so_far) (so_far None: no objects yet, only the table). The residual is drawn without
        gradients: it is an input, not a path. This drops the dependence of later steps' q on earlier poses
        *through the residual* (a small bias in the pathwise gradient, accepted because the black-box renderer has
        no gradient to give); the step inputs keep that dependence."""
        if self.config.difference_input:  # render_input runs under no_grad: an input only, see docstring
            images = images - self.render_input(self.empty_scene(images) if so_far is None else so_far)
        return self.rnn.image_gates(self.embed_norm(self.encoder(images)))

    def glimpse_centres(self, position: torch.Tensor) -> torch.Tensor:
        """Table positions (B, 2) -> where they appear, (B, 2) in grid_sample's units (x right, y down, -1..1):
        the point `glimpse_height` above the table projected through the camera."""
        height = position.new_full((position.shape[0], 1), self.config.glimpse_height)
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
        features = self.glimpse_encoder(self.glimpse(images, decode_position(wd.u_coarse)))
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
        position = decode_position(u)
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
        """Run all T steps on images (B, 3, H, W) in [0, 1]; returns the stacked latents."""
        prev, prev_pres, state = self.initial_state(images)
        gates = self.image_gates(images, None)
        steps: list[GuideStep3D] = []
        inputs: list[torch.Tensor] = []
        for t in range(self.config.max_steps):
            inputs.append(prev)
            if self.config.difference_input and t > 0:
                gates = self.image_gates(images, self._stack(steps).scene())
            step = self.guide_step(gates, images, prev, prev_pres, state, sample)
            steps.append(step)
            state, prev_pres = step.state, step.z_pres
            prev = self.step_input(step.z_pres, step.shape, step.position, step.v)
        return replace(self._stack(steps), step_inputs=torch.stack(inputs, dim=1))

    @staticmethod
    def empty_scene(images: torch.Tensor) -> SceneTensors:
        """B scenes with no object (only the table), for the first step's residual."""
        B = images.shape[0]
        ids = torch.full((B, 0), -1, dtype=torch.long, device=images.device)
        return SceneTensors(ids, images.new_zeros(B, 0, 2), images.new_zeros(B, 0))

    @staticmethod
    def _stack(steps: list[GuideStep3D]) -> Guide3D:
        names = [f for f in Guide3D.__dataclass_fields__ if f != "step_inputs"]
        fields = {n: torch.stack([getattr(s, n) for s in steps], dim=1) for n in names}
        return Guide3D(**fields, step_inputs=torch.empty(0))

    # ------------------------------------------------------------------------------------------ generative
    def prior_step(self, n: int, prev_pres: torch.Tensor, t: int) -> PriorStep3D:
        """Step t (0-based) of the generative model for n scenes, given the previous z_pres (n,)."""
        z_pres = torch.bernoulli(prev_pres.new_full((n,), float(self.pres_prior[t]))) * prev_pres
        shape = torch.randint(len(SHAPES), (n,), device=prev_pres.device)
        u = torch.randn(n, 2, device=prev_pres.device)
        v = torch.randn(n, 2, device=prev_pres.device)
        return PriorStep3D(z_pres, shape, u, v, decode_position(u), decode_yaw(v, self.yaw_order[shape]))

    def sample_prior(self, n: int) -> PriorStep3D:
        """n scenes from the prior, every field stacked over steps to (n, T, ...). Objects may overlap or
        stand partly off the table: the prior knows nothing of either (data3d's scenes reject both)."""
        pres = self.signal_mean.new_ones(n)
        steps = []
        for t in range(self.config.max_steps):
            steps.append(self.prior_step(n, pres, t))
            pres = steps[-1].z_pres
        return PriorStep3D.stack(steps)

    def sample(self, n: int) -> tuple[PriorStep3D, torch.Tensor]:
        """Prior scenes and their hard renders FloatTensor (n, 3, H, W) in [0, 1] (the likelihood's means)."""
        p = self.sample_prior(n)
        return p, self.render_input(p.scene())

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
    def infer(self, images: torch.Tensor, refine: int | None = None, refine_gradient: str = "fd") -> SceneInference:
        """Scenes from renders: the most probable count and shapes and the means of q(u), q(v).

        Args:
            images: FloatTensor (B, 3, H, W) in [0, 1], H = W = config.image_size.
            refine: K steps of render-and-compare refinement (inverse_graphics.refine) of the poses; None: the
                config's `refine_steps` (20 by default: median position error 11 -> 1.5 mm from 1 cm
                perturbations, finite differences of the black-box render, about 1 s per scene on one CPU thread);
                0: none.
            refine_gradient: "fd" (finite differences of the black-box render) or "soft" (PyTorch3D's soft
                rasterizer, about 20x slower here).
        Returns:
            SceneInference: scenes (B JSON-format dicts, footprints clamped onto the table), counts LongTensor
            (B,), presence FloatTensor (B, T) = q(z_pres = 1) per step, extras["unrefined"] when refined.
        Raises:
            TypeError / ValueError naming the problem for a non-tensor, non-float, wrong shape, NaN or [0, 1].
        """
        images = check_images(images, self.config.image_size).to(self.signal_mean)
        steps = self.config.refine_steps if refine is None else int(refine)
        g = self.guide(images, sample=False)
        t = g.scene()
        t = SceneTensors(t.shape_ids, clamp_to_table(t.shape_ids, t.positions, t.yaws), t.yaws)
        return scene_inference(t, images, steps, g.pres_prob, refine_gradient)
