"""REINFORCE with baselines against closed-form gradients on toy discrete models."""

import torch

from inverse_graphics.estimators import score_function_surrogate
from tests.conftest import assert_close

N = 400_000  # samples: the Monte Carlo error of the estimates below is about 0.003


def f_one(z):
    return 3.0 * z - 1.0 + 10.0  # a large offset: what baselines are for


def test_single_bernoulli_matches_closed_form_and_baseline_cuts_variance():
    theta = torch.tensor(0.3, requires_grad=True)
    q = torch.sigmoid(theta)
    closed = (q * (1 - q) * (f_one(1.0) - f_one(0.0))).item()  # d/dtheta E[f] = q'(theta) (f(1) - f(0))
    z = torch.bernoulli(q.detach().expand(N, 1))
    log_q = z * torch.log(q) + (1 - z) * torch.log1p(-q)
    grads = {}
    for b in (0.0, 10.5):
        per_sample = []
        sur = score_function_surrogate(log_q, f_one(z), b)
        (g,) = torch.autograd.grad(sur.mean(), theta, retain_graph=True)
        # per-sample gradient = (f - b) * d log q / d theta, for the variance comparison
        dlogq = z - q.detach()
        per_sample = (f_one(z) - b) * dlogq
        grads[b] = (g.item(), per_sample.var().item())
    for b, (g, _) in grads.items():
        assert abs(g - closed) < 0.02, (b, g, closed)
    assert grads[10.5][1] < grads[0.0][1] / 50  # the baseline removes most of the variance


def test_two_step_masked_chain_matches_closed_form():
    # z1 ~ Bern(q1); z2 ~ Bern(q2) only if z1 = 1, else z2 = 0 and no choice is made (AIR's masking).
    theta = torch.tensor([0.2, -0.4], requires_grad=True)
    f = {(0, 0): 1.0, (1, 0): 4.0, (1, 1): 2.5}
    q1, q2 = torch.sigmoid(theta)
    expected = (1 - q1) * f[0, 0] + q1 * (1 - q2) * f[1, 0] + q1 * q2 * f[1, 1]
    (closed,) = torch.autograd.grad(expected, theta)

    q = torch.sigmoid(theta)
    z1 = torch.bernoulli(q[0].detach().expand(N))
    z2 = torch.bernoulli(q[1].detach().expand(N)) * z1
    z = torch.stack([z1, z2], 1)
    active = torch.stack([torch.ones(N), z1], 1)
    log_q = z * torch.log(q) + (1 - z) * torch.log1p(-q)
    value = torch.where(z1 == 0, f[0, 0], torch.where(z2 == 0, f[1, 0], f[1, 1]))
    signal = value[:, None].expand(N, 2)  # everything is downstream of both choices
    sur = score_function_surrogate(log_q, signal, baseline=2.0, active=active)
    (estimate,) = torch.autograd.grad(sur.mean(), theta)
    assert_close(estimate, closed, atol=0.02, rtol=0)
