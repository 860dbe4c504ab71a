"""Attend, Infer, Repeat (Eslami et al., NIPS 2016) for 2D scenes of glyphs.

Generative model, for steps t = 1..T (Sec. 2 of the paper):
    z_pres_t  ~ Bernoulli(rho) if z_pres_{t-1} = 1 else 0          (a geometric prior on the count)
    z_where_t ~ N(mu_where, sd_where) over (log s, x, y)              (docs/conventions.md; the paper: over s)
    z_what_t  ~ N(0, I_D)
    x         ~ N(sum_t z_pres_t * place(decode(z_what_t), z_where_t), sigma^2 I),  sigma = 0.3.
Inference network: a recurrent network that, per step, outputs q(z_pres_t), q(z_where_t), reads the attention
window at z_where_t and encodes it into q(z_what_t); the next step sees the previous latents. Deviation, flagged:
the image enters the recurrence through an embedding computed once per image and projected onto the LSTM's gates
once (the paper and Pyro feed raw pixels to the LSTM at every step); the model is the same, it is just cheaper.

DAIR (`difference_input`): from step 2 on, the recurrence reads x minus the reconstruction of the steps so far instead
of x. By default (`difference_memory=False`) a DAIR step sees nothing else: no recurrent state, no previous latents,
so whether to add an object and where is a function of what is left to explain, and the network cannot count steps
in a memory (the paper's argument for DAIR's generalisation to unseen counts; with memory it generalised less well
here, benchmarks/results/dair_generalisation.md). The residual itself may still hint at how many glyphs were drawn
(the halos and overshoot of blurry glyphs); the variants that remove them did worse
(benchmarks/results/dair_generalisation.notes.md).

Objective: the ELBO, reparameterised for z_where and z_what (KLs in closed form), REINFORCE for z_pres with
per-step learned baselines (NVIL, Mnih & Gregor 2014): the learning signal of z_pres_t is everything downstream of
it (the likelihood, and the KL terms of steps >= t), centred by a running mean and an input-dependent baseline
(NVIL's variance normalisation is left out: see `loss`). Steps after the first z_pres = 0 are masked out of every
term. Optional, not in the paper: a sleep phase (`dream`, `teacher_forced_log_q`; `train.TrainConfig.sleep_weight`)
that also fits the guide to scenes the model dreams; it did not help DAIR's count here
(benchmarks/results/dair_generalisation.notes.md). At test time, `count_search.search_counts` lets the model
choose the count (each count's proposal, `guide(count=k)`, refined and scored by its bound): slower than `infer`,
and far more often right on counts unseen in training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from inverse_graphics.estimators import gaussian_log_likelihood, score_function_surrogate
from inverse_graphics.modules import (
    Baseline,
    GatedRecurrence,
    GlyphDecoder,
    ImageEncoder,
    WhatEncoder,
    WhereHead,
    lstm_update,
)
from renderers.spatial_transformer import canvas_to_window, window_to_canvas, z_where_to_boxes

PROB_EPS = 1e-5  # z_pres probabilities are kept inside [eps, 1 - eps]: no log(0) in the count terms


@dataclass
class AIRConfig:
    """Architecture and prior of an AIR model; saved with every checkpoint."""

    canvas_size: int = 50  # side of the square input image, pixels
    max_steps: int = 3  # T: the most objects a scene can hold
    window_size: int = 20  # side of the decoder's glyph window and of the encoder's attention read, pixels
    z_what_dim: int = 50  # D, as in the paper
    embed_dim: int = 256  # image embedding fed to the recurrence
    rnn_hidden: int = 256  # LSTM state size (the paper: 256)
    encoder_hidden: int = 200  # z_what encoder MLP width
    decoder_hidden: int = 200  # glyph decoder MLP width
    baseline_hidden: int = 128  # NVIL baseline network width
    likelihood_sd: float = 0.3  # sigma of the Gaussian pixel likelihood (the paper: 0.3)
    decoder_bias: float = -2.0  # initial decoder output bias: start by drawing nothing
    z_pres_prior: float = 0.01  # rho: the prior probability of one more object (can be annealed in training)
    # Prior over (log s, x, y): a multi-MNIST digit's 28 px square, resized by 1/N(1.3, 0.1), spans s = 0.43 +- 0.03
    # of the canvas; a tight scale prior stops one window from swallowing two nearby digits and speeds learning.
    where_prior_loc: tuple[float, float, float] = (math.log(0.43), 0.0, 0.0)  # prior mean of (log s, x, y)
    where_prior_scale: tuple[float, float, float] = (0.1, 0.5, 0.5)  # prior sd of (log s, x, y)
    difference_input: bool = False  # DAIR: the recurrence sees x minus the reconstruction so far
    # DAIR only: whether each step also sees the recurrent state and the previous step's latents. Without them
    # (False) a step's q(z_pres, z_where) is a function of what is left to explain alone, so the network cannot
    # count steps in a memory; it has to look. Checkpoints written before this field existed had memory (True).
    difference_memory: bool = False
    model_name: str = field(default="air")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AIRConfig:
        d = dict(d)
        for k in ("where_prior_loc", "where_prior_scale"):
            if k in d:
                d[k] = tuple(d[k])
        d.setdefault("difference_memory", True)  # older DAIR checkpoints
        return cls(**d)


@dataclass(frozen=True)
class GuideStep:
    """One step of the inference network. B = batch.

    z_pres: FloatTensor (B,) of 0/1; z_where: (B, 3) as (s, x, y); z_what: (B, D);
    pres_prob: (B,) q(z_pres = 1) (not yet masked by the previous step); where_loc, where_scale: (B, 3), the
    Gaussian over (log s, x, y); what_loc, what_scale: (B, D); state: the LSTM's (h, c) after this step.
    """

    z_pres: torch.Tensor
    z_where: torch.Tensor
    z_what: torch.Tensor
    pres_prob: torch.Tensor
    where_loc: torch.Tensor
    where_scale: torch.Tensor
    what_loc: torch.Tensor
    what_scale: torch.Tensor
    state: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Guide:
    """All T steps stacked: every field (B, T, ...) as in GuideStep."""

    z_pres: torch.Tensor
    z_where: torch.Tensor
    z_what: torch.Tensor
    pres_prob: torch.Tensor
    where_loc: torch.Tensor
    where_scale: torch.Tensor
    what_loc: torch.Tensor
    what_scale: torch.Tensor
    step_inputs: torch.Tensor  # (B, T, 3 + D + 1): what each step's recurrence saw of the previous step


@dataclass(frozen=True)
class Dream:
    """Scenes sampled from the generative model (`AIR.dream`). z_pres (B, T) of 0/1, present steps first;
    where_latent (B, T, 3) as (log s, x, y); z_where (B, T, 3) as (s, x, y); z_what (B, T, D); images (B, H, W)."""

    z_pres: torch.Tensor
    where_latent: torch.Tensor
    z_where: torch.Tensor
    z_what: torch.Tensor
    images: torch.Tensor


@dataclass(frozen=True)
class InferenceResult:
    """What `AIR.infer` returns (DESIGN.md's public interface).

    counts: LongTensor (B,), objects found; z_pres: FloatTensor (B, T) of 0/1; z_where: FloatTensor (B, T, 3) as
    (s, x, y) (docs/conventions.md); z_what: FloatTensor (B, T, D); pres_prob: FloatTensor (B, T);
    boxes: list of B FloatTensors (n_i, 4), x0, y0, x1, y1 in input pixels of the present objects;
    recon: FloatTensor (B, H, W), the decoded scene, when asked for (else None).
    """

    counts: torch.Tensor
    z_pres: torch.Tensor
    z_where: torch.Tensor
    z_what: torch.Tensor
    pres_prob: torch.Tensor
    boxes: list[torch.Tensor]
    recon: torch.Tensor | None


def normal_kl(loc: torch.Tensor, scale: torch.Tensor, p_loc, p_scale) -> torch.Tensor:
    """KL(N(loc, scale) || N(p_loc, p_scale)) elementwise."""
    var_ratio = (scale / p_scale) ** 2
    return 0.5 * (var_ratio + ((loc - p_loc) / p_scale) ** 2 - 1 - torch.log(var_ratio))


def bernoulli_kl(q: torch.Tensor, p: float) -> torch.Tensor:
    """KL(Bernoulli(q) || Bernoulli(p)) elementwise; q already clamped away from 0 and 1."""
    return q * (torch.log(q) - math.log(p)) + (1 - q) * (torch.log1p(-q) - math.log1p(-p))


def check_float_tensor(images, expect: str) -> None:
    """TypeError unless `images` is a floating-point torch.Tensor (`expect` names the wanted shape)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape {expect}, got {type(images).__name__}")
    if not images.is_floating_point():
        hint = " (uint8 images: divide by 255 first)" if images.dtype == torch.uint8 else ""
        raise TypeError(f"images must be a floating-point tensor in [0, 1], got dtype {images.dtype}{hint}")


def check_unit_range(images: torch.Tensor) -> None:
    """ValueError if `images` holds NaN or values outside [0, 1]."""
    if images.numel():
        lo, hi = torch.aminmax(images)  # one pass; NaN propagates into both
        if torch.isnan(lo) or torch.isnan(hi):
            raise ValueError("images contain NaN values")
        if lo < 0 or hi > 1:
            raise ValueError(f"images must lie in [0, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]")


def where_from_latent(latent: torch.Tensor) -> torch.Tensor:
    """(..., 3) as (log s, x, y), the Gaussian's space -> (..., 3) as (s, x, y), the spatial transformer's."""
    return torch.cat([latent[..., :1].exp(), latent[..., 1:]], dim=-1)


def pres_probability(logit: torch.Tensor) -> torch.Tensor:
    """q(z_pres = 1) from its logit, squashed into [eps, 1 - eps] (not clamped: keeps the gradient)."""
    return PROB_EPS + (1 - 2 * PROB_EPS) * torch.sigmoid(logit)


def reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T) with out[:, t] = sum_{t' >= t} x[:, t']."""
    return x.flip(1).cumsum(1).flip(1)


class AIR(nn.Module):
    """AIR (or DAIR with `config.difference_input`). See the module docstring for the model."""

    where_prior_loc: torch.Tensor  # buffers, declared for the type checker
    where_prior_scale: torch.Tensor
    signal_mean: torch.Tensor

    def __init__(self, config: AIRConfig | None = None):
        super().__init__()
        cfg = self.config = config or AIRConfig()
        n_pixels = cfg.canvas_size**2
        step_dim = 3 + cfg.z_what_dim + 1  # previous z_where, z_what, z_pres
        self.encoder = ImageEncoder(n_pixels, cfg.embed_dim)
        self.rnn = GatedRecurrence(cfg.embed_dim, step_dim, cfg.rnn_hidden)
        self.where_head = WhereHead(cfg.rnn_hidden)
        self.what_encoder = WhatEncoder(cfg.window_size**2, cfg.encoder_hidden, cfg.z_what_dim)
        self.decoder = GlyphDecoder(cfg.z_what_dim, cfg.decoder_hidden, cfg.window_size, cfg.decoder_bias)
        self.baseline = Baseline(n_pixels, step_dim, cfg.baseline_hidden)
        self.register_buffer("where_prior_loc", torch.tensor(cfg.where_prior_loc))
        self.register_buffer("where_prior_scale", torch.tensor(cfg.where_prior_scale))
        # NVIL's input-independent baseline: a running mean of each step's learning signal.
        self.register_buffer("signal_mean", torch.zeros(cfg.max_steps))
        # Sums the running mean's batch statistics over ranks (set by the training engine under torchrun).
        self.stat_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._init_where_head()

    def _init_where_head(self) -> None:
        # Start every window near the prior's mean with a small spread (a known AIR pitfall: wide initial
        # z_where makes the first glyphs land anywhere and the count collapse).
        with torch.no_grad():
            fc = self.where_head.fc
            fc.weight[1:].mul_(0.1)
            fc.bias[1:4].copy_(self.where_prior_loc)
            fc.bias[4:7].fill_(-3.0)  # softplus(-3) = 0.05

    # ----------------------------------------------------------------------------------------------- guide
    def guide_step(
        self,
        images: torch.Tensor,
        image_gates: torch.Tensor,
        prev: torch.Tensor,
        prev_pres: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        sample: bool,
    ) -> GuideStep:
        """One step of the inference network.

        images (B, H, W); image_gates (B, 4 hidden) from the image embedding; prev (B, 3 + D + 1) the previous
        step's [z_where, z_what, z_pres]; prev_pres (B,) the previous z_pres; sample: draw latents (training) or
        take the most probable z_pres and the means (inference).
        """
        h, c = self.rnn(image_gates, prev, state)
        pres_logit, where_loc, where_scale = self.where_head(h)
        pres_prob = pres_probability(pres_logit)
        if sample:
            # A discrete sample carries no pathwise gradient (detach); REINFORCE in `loss` trains pres_prob.
            z_pres = torch.bernoulli(pres_prob.detach()) * prev_pres
            where_latent = where_loc + where_scale * torch.randn_like(where_loc)
        else:
            z_pres = (pres_prob > 0.5).to(images.dtype) * prev_pres
            where_latent = where_loc
        z_where = where_from_latent(where_latent)
        window = canvas_to_window(images, z_where, (self.config.window_size,) * 2)  # (B, h, w)
        what_loc, what_scale = self.what_encoder(window)
        z_what = what_loc + what_scale * torch.randn_like(what_loc) if sample else what_loc
        return GuideStep(z_pres, z_where, z_what, pres_prob, where_loc, where_scale, what_loc, what_scale, (h, c))

    def guide(self, images: torch.Tensor, sample: bool = True, count: int | None = None) -> Guide:
        """Run all T steps on images (B, H, W); returns the stacked latents (see `Guide`).

        count: if given, z_pres is forced to 1 for the first `count` steps and 0 after (whatever q(z_pres) says),
        so the later steps see those objects (DAIR's residual, the step inputs): the guide's proposal for a scene of
        `count` objects, which `count_search` refines. pres_prob is still q's."""
        B = images.shape[0]
        cfg = self.config
        image_gates = self.rnn.image_gates(self.encoder(images))  # (B, 4 hidden), once per image
        zeros = images.new_zeros(B, cfg.rnn_hidden)
        state = (zeros, zeros)
        prev = torch.cat([images.new_zeros(B, 3 + cfg.z_what_dim), images.new_ones(B, 1)], dim=1)
        prev_pres = images.new_ones(B)
        steps: list[GuideStep] = []
        inputs: list[torch.Tensor] = []
        recon = images.new_zeros(images.shape)  # used by DAIR only
        for _ in range(cfg.max_steps):
            inputs.append(prev)
            if cfg.difference_input and steps:  # DAIR: the recurrence sees what is left to explain
                image_gates = self.rnn.image_gates(self.encoder(images - recon))
            if cfg.difference_input and not cfg.difference_memory:  # memoryless DAIR: the residual alone
                state, prev = (zeros, zeros), torch.zeros_like(prev)
            step = self.guide_step(images, image_gates, prev, prev_pres, state, sample)
            if count is not None:
                step = replace(step, z_pres=images.new_full((B,), float(len(steps) < count)))
            if cfg.difference_input:
                recon = recon + self.render_step(step.z_pres, step.z_where, step.z_what)
            steps.append(step)
            state, prev_pres = step.state, step.z_pres
            prev = torch.cat([step.z_where, step.z_what, step.z_pres[:, None]], dim=1)
        stack = lambda name: torch.stack([getattr(s, name) for s in steps], dim=1)  # noqa: E731
        return Guide(
            z_pres=stack("z_pres"),
            z_where=stack("z_where"),
            z_what=stack("z_what"),
            pres_prob=stack("pres_prob"),
            where_loc=stack("where_loc"),
            where_scale=stack("where_scale"),
            what_loc=stack("what_loc"),
            what_scale=stack("what_scale"),
            step_inputs=torch.stack(inputs, dim=1),
        )

    # ------------------------------------------------------------------------------------------ generative
    def render_step(self, z_pres: torch.Tensor, z_where: torch.Tensor, z_what: torch.Tensor) -> torch.Tensor:
        """One object per scene: z_pres (N,), z_where (N, 3), z_what (N, D) -> canvas (N, H, W)."""
        size = (self.config.canvas_size,) * 2
        return z_pres[:, None, None] * window_to_canvas(self.decoder(z_what), z_where, size)

    def render(self, z_pres: torch.Tensor, z_where: torch.Tensor, z_what: torch.Tensor) -> torch.Tensor:
        """Decode and place all objects: z_pres (B, T), z_where (B, T, 3), z_what (B, T, D) -> (B, H, W)."""
        B, T = z_pres.shape
        canvases = self.render_step(z_pres.reshape(B * T), z_where.reshape(B * T, 3), z_what.flatten(0, 1))
        return canvases.view(B, T, *canvases.shape[1:]).sum(1)  # (B, H, W)

    def log_likelihood(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """log p(images | latents) given their rendering: images (..., H, W), recon broadcastable -> (...)."""
        return gaussian_log_likelihood(images, recon, self.config.likelihood_sd, event_dims=2)

    def prior_step(self, n: int, prev_pres: torch.Tensor, z_pres_prior: float | None = None):
        """Sample one step of the generative model for n scenes: returns (z_pres, z_where, z_what)."""
        rho = self.config.z_pres_prior if z_pres_prior is None else z_pres_prior
        z_pres = torch.bernoulli(torch.full_like(prev_pres, rho)) * prev_pres
        latent = self.where_prior_loc + self.where_prior_scale * torch.randn(n, 3, device=prev_pres.device)
        z_where = where_from_latent(latent)
        z_what = torch.randn(n, self.config.z_what_dim, device=prev_pres.device)
        return z_pres, z_where, z_what

    def sample(self, n: int, z_pres_prior: float | None = None) -> torch.Tensor:
        """Scenes from the generative model: (n, H, W) means of the likelihood."""
        pres = torch.ones(n, device=self.where_prior_loc.device)
        canvas = torch.zeros(n, self.config.canvas_size, self.config.canvas_size, device=pres.device)
        for _ in range(self.config.max_steps):
            pres, where, what = self.prior_step(n, pres, z_pres_prior)
            canvas = canvas + self.render_step(pres, where, what)
        return canvas.clamp(0, 1)

    # ----------------------------------------------------------------------------------------- objective
    def baseline_step(self, images: torch.Tensor, step_inputs: torch.Tensor) -> torch.Tensor:
        """NVIL baselines for every step: images (B, H, W), step_inputs (B, T, 3 + D + 1) -> (B, T).

        Inputs are detached here: the baseline is fit to the learning signal and must not shape the guide.
        """
        net = self.baseline
        gates = net.rnn.image_gates(net.encoder(images.detach()))
        zeros = images.new_zeros(images.shape[0], net.rnn.hidden)
        state, outs = (zeros, zeros), []
        for t in range(step_inputs.shape[1]):
            state = net.rnn(gates, step_inputs[:, t].detach(), state)
            outs.append(net.out(state[0]).squeeze(1))
        return torch.stack(outs, dim=1)

    def loss(self, images: torch.Tensor, z_pres_prior: float | None = None) -> tuple[torch.Tensor, dict]:
        """The training loss for a batch images (B, H, W): -surrogate ELBO + baseline regression loss.

        Returns the scalar loss and detached per-batch statistics (elbo per image, mean count, ...).
        """
        rho = self.config.z_pres_prior if z_pres_prior is None else z_pres_prior
        g = self.guide(images, sample=True)
        B, T = g.z_pres.shape
        prev = torch.cat([g.z_pres.new_ones(B, 1), g.z_pres[:, :-1]], dim=1)  # step t is active iff prev[:, t]
        log_lik = self.log_likelihood(images, self.render(g.z_pres, g.z_where, g.z_what))
        kl_where = normal_kl(g.where_loc, g.where_scale, self.where_prior_loc, self.where_prior_scale).sum(-1)
        kl_what = normal_kl(g.what_loc, g.what_scale, 0.0, 1.0).sum(-1)
        kl_obj = g.z_pres * (kl_where + kl_what)  # (B, T): continuous latents of present objects only
        kl_pres = prev * bernoulli_kl(g.pres_prob, rho)  # (B, T): z_pres of active steps only (analytic)
        elbo = log_lik - kl_obj.sum(1) - kl_pres.sum(1)  # (B,)

        # REINFORCE for z_pres_t: the signal is every term downstream of it (the likelihood, the object KLs of
        # steps >= t, the z_pres KLs of steps > t); its own KL is differentiated analytically above.
        signal = log_lik[:, None] - reverse_cumsum(kl_obj) - (reverse_cumsum(kl_pres) - kl_pres)  # (B, T)
        signal = signal.detach()  # a learning signal, not a path for gradients
        baseline = self.baseline_step(images, g.step_inputs)  # (B, T)
        centred = signal - self.signal_mean  # input-independent part of the baseline
        # No division by the signal's spread (NVIL does it when every gradient is a score-function one): here it
        # would shrink REINFORCE against the analytic terms and tilt the balance towards z_pres = 0.
        log_q = g.z_pres * torch.log(g.pres_prob) + (1 - g.z_pres) * torch.log1p(-g.pres_prob)
        surrogate = elbo + score_function_surrogate(log_q, centred, baseline, active=prev)
        baseline_loss = (prev * (baseline - centred) ** 2).sum(1).mean()
        if self.training:
            self._update_signal_mean(centred, prev)
        loss = -surrogate.mean() + baseline_loss
        stats = {
            "elbo": elbo.mean().item(),
            "log_lik": log_lik.mean().item(),
            "count": g.z_pres.sum(1).mean().item(),
            "baseline_loss": baseline_loss.item(),
        }
        return loss, stats

    # ------------------------------------------------------------------------------------------- sleep phase
    @torch.no_grad()
    def dream(self, n: int, counts: tuple[int, ...]) -> Dream:
        """n scenes from the generative model with a count drawn uniformly from `counts` (not the geometric prior,
        whose small rho makes crowded dreams rare): the targets of the sleep phase."""
        cfg, device, dtype = self.config, self.where_prior_loc.device, self.where_prior_loc.dtype
        choices = torch.tensor(counts, device=device)
        k = choices[torch.randint(len(choices), (n,), device=device)]
        z_pres = (torch.arange(cfg.max_steps, device=device) < k[:, None]).to(dtype)  # (n, T)
        noise = torch.randn(n, cfg.max_steps, 3, device=device, dtype=dtype)
        where_latent = self.where_prior_loc + self.where_prior_scale * noise
        z_where = where_from_latent(where_latent)
        z_what = torch.randn(n, cfg.max_steps, cfg.z_what_dim, device=device, dtype=dtype)
        images = self.render(z_pres, z_where, z_what).clamp(0, 1)
        return Dream(z_pres, where_latent, z_where, z_what, images)

    def teacher_forced_log_q(self, d: Dream) -> torch.Tensor:
        """log q(the dream's latents | its image), FloatTensor (B,): the sleep phase's objective (wake-sleep, Hinton
        et al. 1995; not in Eslami et al.; the 3D model's `air3d_objective.sleep_loss` does the same).

        The guide is sequential and the prior exchangeable, so the true objects need an order: each step's target
        is the remaining object whose z_where is most probable under that step's q (greedy matching). Later steps
        see the guide's own estimate of the earlier objects (its means, as `infer` takes them), not the true ones:
        in DAIR's residual and in the step inputs, so that training sees the imperfect residuals of test time."""
        cfg, images = self.config, d.images
        B, T = d.z_pres.shape
        zeros = images.new_zeros(B, cfg.rnn_hidden)
        state = (zeros, zeros)
        prev = torch.cat([images.new_zeros(B, 3 + cfg.z_what_dim), images.new_ones(B, 1)], dim=1)
        image_gates = self.rnn.image_gates(self.encoder(images))
        recon = torch.zeros_like(images)
        count = d.z_pres.sum(1)
        remaining = d.z_pres > 0.5
        window_size = (cfg.window_size,) * 2
        rows = torch.arange(B, device=images.device)
        total = images.new_zeros(B)
        for t in range(T):
            if cfg.difference_input and t:
                image_gates = self.rnn.image_gates(self.encoder(images - recon))
            if cfg.difference_input and not cfg.difference_memory:
                state, prev = (zeros, zeros), torch.zeros_like(prev)
            h, c = self.rnn(image_gates, prev, state)
            pres_logit, where_loc, where_scale = self.where_head(h)
            pres_prob = pres_probability(pres_logit)
            target = (count > t).to(images.dtype)  # (B,): z_pres_t of the dream
            where_q = torch.distributions.Normal(where_loc[:, None], where_scale[:, None])
            candidates = where_q.log_prob(d.where_latent).sum(-1).masked_fill(~remaining, -math.inf)  # (B, T)
            j = candidates.detach().argmax(1)  # the greedy order: an index choice, not a gradient path
            log_where = candidates.gather(1, j[:, None]).squeeze(1)
            what_loc, what_scale = self.what_encoder(canvas_to_window(images, d.z_where[rows, j], window_size))
            log_what = torch.distributions.Normal(what_loc, what_scale).log_prob(d.z_what[rows, j]).sum(-1)
            log_obj = torch.where(target > 0, log_where + log_what, torch.zeros_like(target))
            log_pres = target * torch.log(pres_prob) + (1 - target) * torch.log1p(-pres_prob)
            total = total + (count >= t).to(images.dtype) * (log_pres + log_obj)  # active steps only
            remaining = remaining & ~(F.one_hot(j, T).bool() & (target > 0)[:, None])
            with torch.no_grad():  # the guide's own estimate of this step: an input to later steps, not a path
                est_where = where_from_latent(where_loc)
                est_what = self.what_encoder(canvas_to_window(images, est_where, window_size))[0]
                if cfg.difference_input:
                    recon = recon + self.render_step(target, est_where, est_what)
                prev = torch.cat([est_where, est_what, target[:, None]], dim=1)
            state = (h, c)
        return total

    def sleep_loss(self, n: int, counts: tuple[int, ...]) -> torch.Tensor:
        """-mean log q(latents | image) on n fresh dreams (`dream`, `teacher_forced_log_q`); trains the guide only."""
        return -self.teacher_forced_log_q(self.dream(n, counts)).mean()

    @torch.no_grad()
    def _update_signal_mean(self, centred: torch.Tensor, active: torch.Tensor) -> None:
        sums = torch.stack([(centred * active).sum(0), active.sum(0)])  # (2, T): signal sums, active counts
        if self.stat_reducer is not None:
            sums = self.stat_reducer(sums)  # distributed training: the sums over every rank's part of the batch
        n = sums[1].clamp(min=1)  # (T,)
        self.signal_mean += 0.1 * sums[0] / n  # moves the running mean 10% towards the batch's

    # ----------------------------------------------------------------------------------------- inference
    @torch.inference_mode()
    def infer(self, images: torch.Tensor, reconstruct: bool = False) -> InferenceResult:
        """Amortised inference: the most probable count and the posterior means.

        Args:
            images: FloatTensor (B, H, W) (or (B, 1, H, W)) in [0, 1], H = W = config.canvas_size.
            reconstruct: also decode the scene into `recon` (for figures; inference itself does not need it).
        Returns:
            InferenceResult (counts, z_pres, z_where, z_what, pres_prob, boxes in pixels, recon or None).
        Raises:
            ValueError / TypeError with a clear message for a wrong shape, dtype, NaN or values outside [0, 1].
        """
        images = self.check_images(images)
        if images.shape[0] == 0:  # an empty batch: empty results of the usual shapes (as the 3D models return)
            return self._empty_result(images, reconstruct)
        # No dropout or batch norm: train/eval mode does not matter here.
        g = self.guide(images, sample=False) if self.config.difference_input else self.guide_fast(images)
        recon = self.render(g.z_pres, g.z_where, g.z_what) if reconstruct else None
        present = g.z_pres > 0.5  # (B, T)
        counts = present.sum(1)
        boxes_all = z_where_to_boxes(g.z_where, (self.config.canvas_size,) * 2)  # (B, T, 4)
        boxes = list(boxes_all[present].split(counts.tolist()))  # one gather, then views: cheap for any B
        return InferenceResult(
            counts=counts,
            z_pres=g.z_pres,
            z_where=g.z_where,
            z_what=g.z_what,
            pres_prob=g.pres_prob,
            boxes=boxes,
            recon=recon,
        )

    def _empty_result(self, images: torch.Tensor, reconstruct: bool) -> InferenceResult:
        T, D = self.config.max_steps, self.config.z_what_dim
        return InferenceResult(
            counts=torch.zeros(0, dtype=torch.long, device=images.device),
            z_pres=images.new_zeros(0, T),
            z_where=images.new_zeros(0, T, 3),
            z_what=images.new_zeros(0, T, D),
            pres_prob=images.new_zeros(0, T),
            boxes=[],
            recon=images.new_zeros(images.shape) if reconstruct else None,
        )

    def guide_fast(self, images: torch.Tensor) -> SimpleNamespace:
        """`guide(images, sample=False)` for AIR, with only what inference needs and few tensor ops (one image
        takes ~100 ops, not ~300, and per-op overhead is most of its cost). tests/test_air.py checks it against
        `guide`. Returns z_pres (B, T), z_where (B, T, 3), z_what (B, T, D), pres_prob (B, T)."""
        cfg, B = self.config, images.shape[0]
        H, D, w = cfg.rnn_hidden, cfg.z_what_dim, cfg.window_size
        embedding = F.relu(F.linear(images.reshape(B, -1), self.encoder.fc.weight, self.encoder.fc.bias))
        image_gates = F.linear(embedding, self.rnn.image_proj.weight, self.rnn.image_proj.bias)  # (B, 4H)
        step_weight_t = self.rnn.step_proj.weight.t()
        head = self.where_head.fc
        fc1, fc2 = self.what_encoder.fc1, self.what_encoder.fc2
        h = c = images.new_zeros(B, H)
        prev = torch.cat([images.new_zeros(B, 3 + D), images.new_ones(B, 1)], dim=1)  # [z_where, z_what, z_pres]
        steps, probs = [], []
        for _ in range(cfg.max_steps):
            h, c = lstm_update(torch.addmm(image_gates, torch.cat([prev, h], dim=1), step_weight_t), c, H)
            out = F.linear(h, head.weight[:4], head.bias[:4])  # pres logit, where loc; scales are not needed
            pres_prob = pres_probability(out[:, 0])
            z_pres = (pres_prob > 0.5).to(images.dtype) * prev[:, -1]
            z_where = torch.cat([out[:, 1:2].exp(), out[:, 2:4]], dim=1)
            window = canvas_to_window(images, z_where, (w, w)).reshape(B, -1)
            z_what = F.linear(F.relu(F.linear(window, fc1.weight, fc1.bias)), fc2.weight[:D], fc2.bias[:D])
            prev = torch.cat([z_where, z_what, z_pres[:, None]], dim=1)
            steps.append(prev)
            probs.append(pres_prob)
        z = torch.stack(steps, dim=1)  # (B, T, 3 + D + 1)
        return SimpleNamespace(
            z_pres=z[..., -1], z_where=z[..., :3], z_what=z[..., 3 : 3 + D], pres_prob=torch.stack(probs, dim=1)
        )

    def check_images(self, images) -> torch.Tensor:
        """Validate and normalise an input batch; see `infer`."""
        size = self.config.canvas_size
        check_float_tensor(images, f"(B, {size}, {size})")
        if images.dim() == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.dim() != 3 or tuple(images.shape[1:]) != (size, size):
            raise ValueError(
                f"images must have shape (B, {size}, {size}) (or (B, 1, {size}, {size})), got {tuple(images.shape)}"
            )
        check_unit_range(images)
        param = self.where_prior_loc
        return images.to(device=param.device, dtype=param.dtype)
