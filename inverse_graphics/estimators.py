"""Gradient estimators shared by the models."""

from __future__ import annotations

import math

import torch


def gaussian_log_likelihood(images: torch.Tensor, recon: torch.Tensor, sd: float, event_dims: int) -> torch.Tensor:
    """log N(images; recon, sd^2 I), summed over the last `event_dims` dimensions (the pixels of one image)."""
    log_density = -0.5 * ((images - recon) / sd) ** 2 - math.log(sd * math.sqrt(2 * math.pi))
    return log_density.sum(tuple(range(-event_dims, 0)))


def score_function_surrogate(
    log_q: torch.Tensor, signal: torch.Tensor, baseline: torch.Tensor | float = 0.0, active: torch.Tensor | None = None
) -> torch.Tensor:
    """A surrogate whose gradient is the REINFORCE (score-function) estimate for discrete choices.

    For choices z_t ~ q(z_t) with learning signal f_t (everything downstream of z_t), E[grad f] is estimated by
    (f_t - b_t) grad log q(z_t); b_t must not depend on z_t, which keeps the estimate unbiased.

    Args:
        log_q: FloatTensor (B, T), log q(z_t) of the sampled choices, differentiable in q's parameters.
        signal: FloatTensor (B, T), the learning signal of each choice. Detached here: it is a weight, not a path.
        baseline: FloatTensor (B, T) or a float, subtracted from the signal. Detached here likewise.
        active: FloatTensor (B, T) of 0/1, whether the choice was made at all (AIR: steps after the first
            z_pres = 0 make none); None: all were made.
    Returns:
        FloatTensor (B,): add it to the objective being maximised.
    """
    weight = signal.detach() - (baseline.detach() if isinstance(baseline, torch.Tensor) else baseline)
    terms = weight * log_q
    if active is not None:
        terms = terms * active
    return terms.sum(1)
