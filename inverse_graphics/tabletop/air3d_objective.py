"""Training objectives of 3D AIR (inverse_graphics/tabletop/air3d.py): the ELBO ("wake") and the optional sleep phase.

ELBO = log N(x; render(scene), sigma^2) - sum_t [KL(z_pres_t) + z_pres_t (KL(k_t) + KL(u_t) + KL(v_t))], steps
after the first z_pres = 0 masked out of every term, exactly as `AIR.loss` in 2D.
- Discrete choices (z_pres_t, k_t): REINFORCE (`score_function_surrogate`) on log q(z_pres_t) + z_pres_t log q(k_t),
  with the learning signal of step t = everything downstream of the pair (the likelihood, the object KLs of steps
  >= t, the z_pres KLs of steps > t; the 2D model's `reverse_cumsum` construction), centred by a running mean and
  a learned input-dependent baseline (NVIL, Mnih & Gregor 2014). KL(q(k) || uniform) and KL(z_pres) are analytic.
- Continuous latents (u, v): reparameterised, the likelihood differentiated through the renderer by
  `gradient="soft"` (autograd through PyTorch3D's soft rasterizer) or `gradient="fd"` (central differences of
  the hard black-box render, OpenGL when EGL works: the paper's choice; the likelihood's *value* is then the hard
  render's). KL(q(u) || N(0, I)) and KL(q(v) || N(0, I)) are analytic.

Sleep phase (wake-sleep, Hinton et al. 1995; what Eslami et al. do not do, flagged as an option): scenes drawn from
the model's own prior and rendered, no human labels; maximise log q(latents | image). The guide is sequential and
the prior exchangeable, so the true objects need an order: at each step the remaining object with the highest
log q under that step is its target (greedy matching; a fixed order would make q average over orders), while
later steps see the guide's own estimate of it, as at test time (`_own_estimate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inverse_graphics.air import bernoulli_kl, normal_kl, reverse_cumsum
from inverse_graphics.estimators import gaussian_log_likelihood, score_function_surrogate
from inverse_graphics.tabletop.air3d import (
    AIR3D,
    GRADIENTS,
    Guide3D,
    PriorStep3D,
    decode_yaw,
)
from inverse_graphics.tabletop.modules3d import ObjectDists
from inverse_graphics.tabletop.world3d import rows_of

__all__ = ["ElboTerms", "elbo_terms", "choice_log_q", "elbo_loss", "sleep_loss", "teacher_forced_log_q"]


@dataclass(frozen=True)
class ElboTerms:
    """The ELBO's pieces for a batch of B images and T steps."""

    log_lik: torch.Tensor  # FloatTensor (B,): log N(x; render, sigma^2) summed over (3, H, W)
    kl_obj: torch.Tensor  # FloatTensor (B, T): z_pres_t (KL(k) + KL(u) + KL(v)), zero for absent objects
    kl_pres: torch.Tensor  # FloatTensor (B, T): KL(q(z_pres_t) || Bernoulli(rho_t)) on active steps, else 0
    log_q: torch.Tensor  # FloatTensor (B, T): log q(z_pres_t) + z_pres_t log q(k_t), the REINFORCE score
    active: torch.Tensor  # FloatTensor (B, T) of 0/1: step t made a choice (z_pres_{t-1} = 1)
    kl_appearance: torch.Tensor | None = None  # FloatTensor (B,): KL(q(a) || p(a)) of the appearance latent

    @property
    def elbo(self) -> torch.Tensor:
        """FloatTensor (B,)."""
        kl_a = 0.0 if self.kl_appearance is None else self.kl_appearance
        return self.log_lik - self.kl_obj.sum(1) - self.kl_pres.sum(1) - kl_a


def log_likelihood(images: torch.Tensor, recon: torch.Tensor, sd: float) -> torch.Tensor:
    """(B, 3, H, W) observed and rendered -> (B,) Gaussian log density summed over pixels and channels."""
    return gaussian_log_likelihood(images, recon, sd, event_dims=3)


def elbo_terms(model: AIR3D, images: torch.Tensor, g: Guide3D, gradient: str) -> ElboTerms:
    """The ELBO's terms for guide samples g on images (B, 3, H, W); `gradient` in GRADIENTS picks the renderer."""
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    look = None
    if model.appearance_latent is not None and g.appearance is not None:  # reparameterised: a path into the gain
        look = model.appearance_latent.decode(g.appearance[2])
    recon = model.render(g.scene(), gradient, look)  # (B, 3, H, W)
    log_lik = log_likelihood(images, recon, model.config.likelihood_sd)
    log_k = F.log_softmax(g.shape_logits, dim=-1)  # (B, T, S)
    kl_shape = (log_k.exp() * (log_k + math.log(model.n_shapes))).sum(-1)  # KL(q(k) || uniform), analytic
    kl_u = normal_kl(g.u_loc, g.u_scale, 0.0, 1.0).sum(-1)
    kl_v = normal_kl(g.v_loc, g.v_scale, 0.0, 1.0).sum(-1)
    kl_obj = g.z_pres * (kl_shape + kl_u + kl_v)
    B, T = g.z_pres.shape
    active = torch.cat([g.z_pres.new_ones(B, 1), g.z_pres[:, :-1]], dim=1)  # step t is active iff z_pres_{t-1}
    rho = model.pres_prior.tolist()
    kl_pres = active * torch.stack([bernoulli_kl(g.pres_prob[:, t], rho[t]) for t in range(T)], dim=1)
    log_q = choice_log_q(g.z_pres, g.pres_prob, g.shape_logits, g.shape)
    kl_app = log_lik.new_zeros(B)
    if model.appearance_latent is not None and g.appearance is not None:
        kl_app = model.appearance_latent.kl(g.appearance[0], g.appearance[1])
    return ElboTerms(log_lik, kl_obj, kl_pres, log_q, active, kl_app)


def choice_log_q(
    z_pres: torch.Tensor, pres_prob: torch.Tensor, shape_logits: torch.Tensor, shape: torch.Tensor
) -> torch.Tensor:
    """log q of the discrete choices of each step, log q(z_pres) + z_pres log q(k): the identity is chosen only
    for a present object, so one REINFORCE term per step covers both choices.

    z_pres, pres_prob: FloatTensor (B, T); shape_logits: FloatTensor (B, T, S); shape: LongTensor (B, T).
    Returns FloatTensor (B, T), differentiable in pres_prob and shape_logits.
    """
    log_pres = z_pres * torch.log(pres_prob) + (1 - z_pres) * torch.log1p(-pres_prob)
    log_k = F.log_softmax(shape_logits, dim=-1).gather(-1, shape[..., None]).squeeze(-1)
    return log_pres + z_pres * log_k


def elbo_loss(model: AIR3D, images: torch.Tensor, gradient: str = "fd") -> tuple[torch.Tensor, dict]:
    """The wake loss for images (B, 3, H, W) in [0, 1]: -(surrogate ELBO) + the baselines' regression loss.

    Returns the scalar loss and float statistics (elbo and log_lik per image, mean count, baseline loss).
    """
    g = model.guide(images, sample=True)
    e = elbo_terms(model, images, g, gradient)
    elbo = e.elbo
    signal = e.log_lik[:, None] - reverse_cumsum(e.kl_obj) - (reverse_cumsum(e.kl_pres) - e.kl_pres)  # (B, T)
    signal = signal.detach()  # a learning signal, not a path for gradients
    baseline = model.baseline_step(images, g.step_inputs)  # (B, T)
    centred = signal - model.signal_mean  # input-independent part of the baseline
    # No division by the signal's spread, as in air.py: it would shrink REINFORCE against the pathwise terms.
    surrogate = elbo + score_function_surrogate(e.log_q, centred, baseline, active=e.active)
    baseline_loss = (e.active * (baseline - centred) ** 2).sum(1).mean()
    if model.training:
        model.update_signal_mean(centred, e.active)
    stats = {
        "elbo": elbo.mean().item(),
        "log_lik": e.log_lik.mean().item(),
        "count": g.z_pres.sum(1).mean().item(),
        "baseline_loss": baseline_loss.item(),
    }
    return -surrogate.mean() + baseline_loss, stats


def _candidate_log_q(d: ObjectDists, p: PriorStep3D) -> torch.Tensor:
    """log q(u_j) + log q(k_j) + log q(v_j | k_j) of every true object j under one step's q: FloatTensor (B, N),
    N = p's slots."""
    log_u = torch.distributions.Normal(d.u_loc[:, None], d.u_scale[:, None]).log_prob(p.u).sum(-1)  # (B, N)
    log_k = F.log_softmax(d.shape_logits, dim=-1).gather(1, p.shape)  # (B, N)
    pick = p.shape[..., None].expand(-1, -1, 2)  # (B, N, 2): q(v) of each object's own shape
    q_v = torch.distributions.Normal(d.v_loc.gather(1, pick), d.v_scale.gather(1, pick))
    return log_u + log_k + q_v.log_prob(p.v).sum(-1)


def teacher_forced_log_q(
    model: AIR3D, images: torch.Tensor, p: PriorStep3D, appearance: torch.Tensor | None = None
) -> torch.Tensor:
    """log q(true latents | images) with the greedy order of the module docstring: FloatTensor (B,).

    images: FloatTensor (B, 3, H, W), the renders of p; p: prior samples, fields (B, T, ...); appearance: the
    true appearance latents (B, 3) with the model's appearance latent (their log q is added; the residuals take
    the guide's own estimate of the appearance, as at test time).

    Step t is computed only for the scenes still active there (count >= t: a scene of n objects ends at step n,
    whose z_pres = 0 is its last term); the batch shrinks as scenes end, which saves about a third of the work
    when the count is uniform on 0..T, and gives the same log q per scene as the full batch.
    """
    B = images.shape[0]
    prev, _, state = model.initial_state(images)
    count = p.z_pres.sum(1)  # (B,)
    remaining = p.z_pres > 0.5  # (B, T): true objects not yet explained
    chosen: list[PriorStep3D] = []
    total = images.new_zeros(B)
    q_a, look = model.appearance_q(images, sample=False)
    if q_a is not None and appearance is not None:
        total = total + torch.distributions.Normal(q_a[0], q_a[1]).log_prob(appearance).sum(-1)
    gates = model.image_gates(images, None, look)
    rows = torch.arange(B, device=images.device)  # which of the B scenes the live tensors below hold
    for t in range(model.max_steps):
        live = count >= t
        if not bool(live.all()):  # drop the scenes that ended at an earlier step (they never come back)
            keep = live.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            rows, images, count, remaining, prev, gates = (
                x[keep] for x in (rows, images, count, remaining, prev, gates)
            )
            state = (state[0][keep], state[1][keep])
            p, chosen = rows_of(p, keep), [rows_of(c, keep) for c in chosen]
            look = None if look is None else rows_of(look, keep)
        if model.config.difference_input and chosen:
            gates = model.image_gates(images, PriorStep3D.stack(chosen).scene(), look)
        h, c = model.rnn(gates, prev, state)
        state, wd = (h, c), model.where(h)
        d = model.what(h, images, wd)
        target = (count > t).to(images.dtype)  # (b,): z_pres_t of the true scene
        candidates = _candidate_log_q(d, p).masked_fill(~remaining, -math.inf)  # (b, T)
        j = candidates.detach().argmax(1)  # the greedy order: an index choice, not a gradient path
        log_obj = torch.where(target > 0, candidates.gather(1, j[:, None]).squeeze(1), torch.zeros_like(target))
        pres_prob = model.pres_probability(wd.pres_logit)
        log_pres = target * torch.log(pres_prob) + (1 - target) * torch.log1p(-pres_prob)
        total = total.index_add(0, rows, log_pres + log_obj)  # every live scene is active at step t
        remaining = remaining & ~(F.one_hot(j, remaining.shape[1]).bool() & (target > 0)[:, None])
        chosen.append(_own_estimate(model, d, target))
        prev = model.step_input(target, chosen[-1].shape, chosen[-1].position, chosen[-1].v)
    return total


@torch.no_grad()
def _own_estimate(model: AIR3D, d: ObjectDists, present: torch.Tensor) -> PriorStep3D:
    """The guide's own decision at this step (the means and most probable shape, as `infer` takes them) as one
    PriorStep3D with z_pres = present: what later steps see of this one, in the residual and the step input.
    Why not the true object: with true objects the residual is always exact in training and never at test, and
    the guide learned to read every leftover edge of an imperfect estimate as one more object (held-out precision
    0.40 after 600 sleep steps). An input, not a gradient path."""
    shape = d.shape_logits.argmax(1)
    v = d.v_loc.gather(1, shape[:, None, None].expand(-1, 1, 2)).squeeze(1)
    position = model.decode_position(d.u_loc)
    return PriorStep3D(present, shape, d.u_loc, v, position, decode_yaw(v, model.yaw_order[shape]))


def sleep_loss(model: AIR3D, n: int) -> tuple[torch.Tensor, dict]:
    """The sleep loss on n fresh prior scenes: -mean log q(latents | render). Returns it and float statistics."""
    with torch.no_grad():  # the generative model is fixed; its samples are targets
        p, images, appearance = model.sample_with_appearance(n)
    log_q = teacher_forced_log_q(model, images, p, appearance)
    loss = -log_q.mean()
    return loss, {"sleep_log_q": -loss.item(), "sleep_count": p.z_pres.sum(1).mean().item()}
