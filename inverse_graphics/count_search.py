"""Choosing a 2D scene's count by the model, not only by the guide: refine each count hypothesis, compare bounds.

Amortised inference (`AIR.infer`) takes the guide's most probable count. Where the guide has not seen a count in
training (DAIR's strong generalisation), its count is often wrong although the generative model would prefer the
right one. This module asks the model: for every count k in 0..T (or the given ones),
1. propose: the guide with z_pres forced on for the first k steps (`AIR.guide(count=k)`) gives Gaussian posteriors
   q_k(z_where, z_what) of k objects (DAIR's later steps see the earlier objects' residual, as in training);
2. refine: Adam on q_k's means and log standard deviations, per scene, maximising the ELBO of the k-object scene
   (reparameterised, `samples` draws per step, KLs in closed form) with the decoder fixed;
3. score: the importance-weighted bound (IWAE, Burda et al. 2016) on log p(x, k) from `score_samples` draws of
   the refined q_k, plus the count's prior log probability under the model's geometric prior;
and returns, per scene, the count with the highest score, with its refined latents (posterior means).

The scores are lower bounds on log p(x, count = k), so the choice favours a count whose bound is tight; the IWAE
bound, tighter than the ELBO, is what makes the comparison fair. A hypothesis is only as good as its proposal:
refinement moves windows locally, so a glyph that the guide drew over two touching digits is rarely split. Hence a
second proposal for k objects (`deletion`): the refined k + 1 minus the object whose removal costs least, keeping
the better bound of the two (3-digit scenes 85.7% -> 91.7% right, for 1.6x the time). With the defaults, on the
first 1,000 test scenes of `benchmarks/bench_dair_generalisation.py`, seeds 0 / 1: extrapolation 91.9% / 92.4%
(guide 76.6% / 69.4%), interpolation 91.7% / 92.9% (guide 84.7% / 88.4%); the alternatives measured, and why they
lost: `benchmarks/results/dair_generalisation.notes.md`.
Cost: about (2 x number of counts - 2) x `steps` forward and backward passes of the decoder per scene with
deletion (~1 s per scene for T = 4 at 200 steps on one CPU thread); scenes of a batch are independent (Adam's
update is elementwise and the objective a sum over scenes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inverse_graphics.air import AIR, normal_kl, where_from_latent

__all__ = ["CountSearchConfig", "CountSearch", "Posterior", "count_log_prior", "elbo", "iwae", "search_counts"]


@dataclass(frozen=True)
class CountSearchConfig:
    """How hard to look. The defaults scored best of those measured (results/dair_generalisation.notes.md)."""

    steps: int = 200  # Adam steps per count hypothesis
    samples: int = 2  # reparameterised draws per step for the ELBO's gradient
    score_samples: int = 64  # importance samples for the final IWAE score
    lr_what: float = 0.1  # Adam rate of the z_what means (prior sd 1)
    lr_where: float = 0.03  # of the (log s, x, y) means (canvas units: x, y in [-1, 1])
    lr_scale: float = 0.1  # of every log standard deviation
    counts: tuple[int, ...] | None = None  # hypotheses; None: 0..T
    # Also propose k objects as the refined k + 1 minus the object whose removal costs least, refine that too and
    # keep the better bound (module docstring: against overcounting when the guide's k-object proposal is poor).
    deletion: bool = True
    batch_size: int = 500  # scenes refined together
    seed: int = 0  # the draws of every estimate

    def __post_init__(self) -> None:
        if self.steps < 0 or self.samples < 1 or self.score_samples < 1 or self.batch_size < 1:
            raise ValueError(f"need steps >= 0 and samples, score_samples, batch_size >= 1, got {self}")
        if min(self.lr_what, self.lr_where, self.lr_scale) <= 0:
            raise ValueError(f"learning rates must be positive, got {self}")
        if self.counts is not None and (len(self.counts) == 0 or min(self.counts) < 0):
            raise ValueError(f"counts must be a non-empty tuple of counts >= 0, got {self.counts}")


@dataclass(frozen=True)
class Posterior:
    """Gaussian q over k objects' latents, per scene: where_loc, where_scale (B, k, 3) over (log s, x, y);
    what_loc, what_scale (B, k, D)."""

    where_loc: torch.Tensor
    where_scale: torch.Tensor
    what_loc: torch.Tensor
    what_scale: torch.Tensor

    @property
    def k(self) -> int:
        return self.where_loc.shape[1]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.where_loc, self.where_scale, self.what_loc, self.what_scale


@dataclass(frozen=True)
class CountSearch:
    """What `search_counts` returns. counts: LongTensor (B,); scores: FloatTensor (B, K), the bound on
    log p(x, k) of each hypothesis in `hypotheses` (K of them); guide_counts: LongTensor (B,), `AIR.infer`'s;
    z_pres (B, T), z_where (B, T, 3) as (s, x, y), z_what (B, T, D): the chosen hypothesis's refined means,
    zero for absent steps (as `AIR.infer` lays them out)."""

    counts: torch.Tensor
    scores: torch.Tensor
    hypotheses: tuple[int, ...]
    guide_counts: torch.Tensor
    z_pres: torch.Tensor
    z_where: torch.Tensor
    z_what: torch.Tensor


def count_log_prior(model: AIR, k: int) -> float:
    """log p(count = k) under the model's geometric prior: k successes of rho, then a failure unless k = T."""
    rho, T = model.config.z_pres_prior, model.config.max_steps
    if not 0 <= k <= T:
        raise ValueError(f"count {k} outside 0..{T}")
    return k * math.log(rho) + (math.log1p(-rho) if k < T else 0.0)


def propose(model: AIR, images: torch.Tensor, k: int) -> Posterior:
    """The guide's posterior for k objects (z_pres forced on for the first k steps, means elsewhere)."""
    g = model.guide(images, sample=False, count=k)
    return Posterior(g.where_loc[:, :k], g.where_scale[:, :k], g.what_loc[:, :k], g.what_scale[:, :k])


def _render(model: AIR, where_latent: torch.Tensor, what: torch.Tensor) -> torch.Tensor:
    """(N, k, 3) as (log s, x, y) and (N, k, D) -> (N, H, W)."""
    return model.render(what.new_ones(what.shape[:2]), where_from_latent(where_latent), what)


def _draw(q: Posterior, n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """n reparameterised draws: (n, B, k, 3) and (n, B, k, D)."""
    eps_where = torch.randn((n, *q.where_loc.shape), generator=generator, dtype=q.where_loc.dtype)
    eps_what = torch.randn((n, *q.what_loc.shape), generator=generator, dtype=q.what_loc.dtype)
    where = q.where_loc + q.where_scale * eps_where.to(q.where_loc.device)
    what = q.what_loc + q.what_scale * eps_what.to(q.what_loc.device)
    return where, what


def _empty_log_lik(model: AIR, images: torch.Tensor) -> torch.Tensor:
    return model.log_likelihood(images, torch.zeros_like(images))


def elbo(model: AIR, images: torch.Tensor, q: Posterior, samples: int, generator=None) -> torch.Tensor:
    """The ELBO of the k-object scene (k = q.k) without its count prior, FloatTensor (B,): the likelihood averaged
    over `samples` reparameterised draws, minus the closed-form KLs of the objects' latents."""
    if q.k == 0:
        return _empty_log_lik(model, images)
    where, what = _draw(q, samples, generator)
    recon = _render(model, where.flatten(0, 1), what.flatten(0, 1)).view(samples, *images.shape)
    log_lik = model.log_likelihood(images, recon).mean(0)
    kl = normal_kl(q.where_loc, q.where_scale, model.where_prior_loc, model.where_prior_scale).sum((1, 2))
    kl = kl + normal_kl(q.what_loc, q.what_scale, 0.0, 1.0).sum((1, 2))
    return log_lik - kl


@torch.no_grad()
def iwae(model: AIR, images: torch.Tensor, q: Posterior, samples: int, generator=None, chunk: int = 16):
    """The importance-weighted bound on log p(x | k objects), FloatTensor (B,), from `samples` draws of q (in chunks
    of `chunk` draws, to bound memory); exact for k = 0."""
    if q.k == 0:
        return _empty_log_lik(model, images)
    prior_where = torch.distributions.Normal(model.where_prior_loc, model.where_prior_scale)
    prior_what = torch.distributions.Normal(0.0, 1.0)
    q_where = torch.distributions.Normal(q.where_loc, q.where_scale)
    q_what = torch.distributions.Normal(q.what_loc, q.what_scale)
    log_w = []
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        where, what = _draw(q, n, generator)
        recon = _render(model, where.flatten(0, 1), what.flatten(0, 1)).view(n, *images.shape)
        lw = model.log_likelihood(images, recon)
        lw = lw + prior_where.log_prob(where).sum((2, 3)) + prior_what.log_prob(what).sum((2, 3))
        lw = lw - q_where.log_prob(where).sum((2, 3)) - q_what.log_prob(what).sum((2, 3))
        log_w.append(lw)
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(samples)


def refine(model: AIR, images: torch.Tensor, q: Posterior, cfg: CountSearchConfig, generator=None) -> Posterior:
    """cfg.steps of Adam on q's means and log standard deviations, maximising `elbo` (the decoder fixed)."""
    if q.k == 0 or cfg.steps == 0:
        return q
    params = {
        name: value.detach().clone().requires_grad_(True)
        for name, value in (
            ("where_loc", q.where_loc),
            ("what_loc", q.what_loc),
            ("where_log_scale", q.where_scale.log()),
            ("what_log_scale", q.what_scale.log()),
        )
    }
    opt = torch.optim.Adam(
        [
            {"params": [params["where_loc"]], "lr": cfg.lr_where},
            {"params": [params["what_loc"]], "lr": cfg.lr_what},
            {"params": [params["where_log_scale"], params["what_log_scale"]], "lr": cfg.lr_scale},
        ]
    )

    def current() -> Posterior:
        return Posterior(
            params["where_loc"],
            params["where_log_scale"].exp(),
            params["what_loc"],
            params["what_log_scale"].exp(),
        )

    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # gradients for q only: faster, and the model is left untouched
    try:
        with torch.enable_grad():
            for _ in range(cfg.steps):
                opt.zero_grad()
                (-elbo(model, images, current(), cfg.samples, generator).sum()).backward()
                opt.step()
    finally:
        for p, flag in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    return Posterior(*(t.detach() for t in current().tensors()))


def drop_weakest(model: AIR, images: torch.Tensor, q: Posterior, generator=None) -> Posterior:
    """q without, in each scene, the object whose removal leaves the highest ELBO (4 draws): a (k-1)-object
    proposal made from a k-object fit."""
    k = q.k
    if k == 0:
        raise ValueError("no object to drop")
    fields = q.tensors()
    without = [[i for i in range(k) if i != j] for j in range(k)]  # object indices kept when j is dropped
    values = [elbo(model, images, Posterior(*(t[:, keep] for t in fields)), 4, generator) for keep in without]
    keep = torch.tensor(without, device=images.device)[torch.stack(values, 1).argmax(1)]  # (B, k - 1)
    return Posterior(*(torch.gather(t, 1, keep[..., None].expand(-1, -1, t.shape[-1])) for t in fields))


def _where(mask: torch.Tensor, a: Posterior, b: Posterior) -> Posterior:
    """Per scene, a where mask (B,) is true, else b."""
    m = mask.view(-1, 1, 1)
    return Posterior(*(torch.where(m, x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True)))


def search_counts(model: AIR, images, cfg: CountSearchConfig | None = None, progress=None) -> CountSearch:
    """Choose each scene's count by the refined, importance-weighted bound of every count hypothesis.

    Args:
        model: a 2D AIR or DAIR.
        images: FloatTensor (B, H, W) (or (B, 1, H, W)) in [0, 1], as for `AIR.infer`.
        cfg: see CountSearchConfig.
        progress: optional callable(done_scenes, total_scenes), called after every batch.
    Returns:
        CountSearch (counts, scores per hypothesis, the guide's counts, the chosen latents).
    Raises:
        ValueError for a bad image batch (as `AIR.infer`) or a hypothesis outside 0..T.
    """
    cfg = cfg or CountSearchConfig()
    images = model.check_images(images)
    T = model.config.max_steps
    hypotheses = tuple(range(T + 1)) if cfg.counts is None else tuple(sorted(set(cfg.counts)))
    if max(hypotheses) > T:
        raise ValueError(f"count hypotheses {hypotheses} exceed the model's T = {T}")
    generator = torch.Generator().manual_seed(cfg.seed)
    B, D = images.shape[0], model.config.z_what_dim
    scores = images.new_empty(B, len(hypotheses))
    z_where = images.new_zeros(B, T, 3)  # the chosen hypothesis's means, filled batch by batch
    z_what = images.new_zeros(B, T, D)
    for start in range(0, B, cfg.batch_size):
        x = images[start : start + cfg.batch_size]
        batch_fits: dict[int, Posterior] = {}
        rows = slice(start, start + len(x))
        for j, k in reversed(list(enumerate(hypotheses))):  # from the most objects down, for the deletion proposals
            with torch.no_grad():
                q = propose(model, x, k)
            q = refine(model, x, q, cfg, generator)
            score = iwae(model, x, q, cfg.score_samples, generator)
            if cfg.deletion and k > 0 and k + 1 in batch_fits:
                with torch.no_grad():
                    q_del = drop_weakest(model, x, batch_fits[k + 1], generator)
                q_del = refine(model, x, q_del, cfg, generator)
                score_del = iwae(model, x, q_del, cfg.score_samples, generator)
                q = _where(score_del > score, q_del, q)
                score = torch.maximum(score, score_del)
            scores[rows, j] = score + count_log_prior(model, k)
            batch_fits[k] = q
        best = scores[rows].argmax(1)
        for j, k in enumerate(hypotheses):
            chosen = (best == j).nonzero().squeeze(1)  # within the batch
            z_where[start + chosen, :k] = where_from_latent(batch_fits[k].where_loc[chosen])
            z_what[start + chosen, :k] = batch_fits[k].what_loc[chosen]
        if progress is not None:
            progress(min(start + cfg.batch_size, B), B)
    counts = torch.tensor(hypotheses, device=images.device)[scores.argmax(1)]
    z_pres = (torch.arange(T, device=images.device) < counts[:, None]).to(images.dtype)
    with torch.no_grad():
        guide_counts = model.infer(images).counts
    return CountSearch(counts, scores, hypotheses, guide_counts, z_pres, z_where, z_what)
