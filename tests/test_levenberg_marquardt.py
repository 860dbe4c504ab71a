"""Levenberg-Marquardt on batched black boxes: the step against its closed form, the Jacobian against analytic
derivatives, and convergence, monotonicity, constraints and the closed-form gain on smooth problems whose
minimum is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inverse_graphics.tabletop.levenberg_marquardt import (
    LMSettings,
    damped_step,
    jacobian,
    levenberg_marquardt,
    normal_equations,
    solve_gain,
)
from tests.conftest import assert_close


def _linear(A: torch.Tensor, c: torch.Tensor):
    """f(p; b) = A_b p + c_b: a black box whose Jacobian is A_b."""

    def fn(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (A[rows] @ p[..., None])[..., 0] + c[rows]

    return fn


def test_damped_step_is_the_closed_form_solve_on_the_active_entries():
    g = torch.Generator().manual_seed(0)
    B, D, P = 3, 40, 5
    J = torch.randn(B, D, P, generator=g, dtype=torch.float64)
    J[1, :, 4] = 0.0  # a parameter the output does not depend on: held, not singular
    r = torch.randn(B, D, generator=g, dtype=torch.float64)
    active = torch.ones(B, P, dtype=torch.bool)
    active[2, [0, 3]] = False
    damping = torch.tensor([1e-3, 0.5, 10.0], dtype=torch.float64)
    JtJ, Jtr = normal_equations(J.transpose(1, 2).contiguous(), r)
    delta = damped_step(JtJ, Jtr, damping, active, torch.ones(P, dtype=torch.float64))
    for b in range(B):
        free = [j for j in range(P) if active[b, j] and J[b, :, j].abs().sum() > 0]
        Jb, rb = J[b][:, free].numpy(), r[b].numpy()
        A = Jb.T @ Jb
        expected = np.zeros(P)
        expected[free] = np.linalg.solve(A + float(damping[b]) * np.diag(np.diag(A)), -Jb.T @ rb)
        assert_close(delta[b], expected, atol=1e-10, msg=f"problem {b}")


def test_damped_step_is_shrunk_to_max_step_along_its_direction():
    J = torch.eye(2, dtype=torch.float64)[None]  # (1, 2, 2)
    r = torch.tensor([[-10.0, -1.0]], dtype=torch.float64)  # Gauss-Newton step (10, 1) / (1 + lambda)
    JtJ, Jtr = normal_equations(J, r)
    steps = torch.tensor([2.0, 0.1], dtype=torch.float64)
    full = damped_step(JtJ, Jtr, torch.tensor([0.0], dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool), steps)
    assert_close(full, [[10.0, 1.0]], atol=1e-12)
    short = damped_step(JtJ, Jtr, torch.zeros(1, dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool), steps, 3.0)
    assert_close(short, full * 0.3, atol=1e-12)  # |1 / 0.1| = 10 steps h -> 3: the whole vector scaled by 0.3


@pytest.mark.parametrize("central", [False, True])
def test_jacobian_matches_the_analytic_derivative_of_a_smooth_black_box(central):
    g = torch.Generator().manual_seed(1)
    B, P, D = 4, 3, 6
    W = torch.randn(B, D, P, generator=g, dtype=torch.float64)

    def fn(p, rows, cols):
        return torch.sin((W[rows] @ p[..., None])[..., 0])  # (M, D)

    p = torch.randn(B, P, generator=g, dtype=torch.float64)
    active = torch.rand(B, P, generator=g) > 0.3
    h = 1e-6 if not central else 1e-4
    JT, evaluations = jacobian(fn, p, torch.full((P,), h, dtype=torch.float64), active, central=central)
    analytic = torch.cos((W @ p[..., None])[..., 0])[..., None] * W  # (B, D, P)
    expected = (analytic * active[:, None, :]).transpose(1, 2)
    assert_close(JT, expected, atol=1e-6 if central else 1e-5)
    assert evaluations == int(active.sum()) * (2 if central else 1) + (0 if central else B)


def test_a_linear_least_squares_problem_is_solved_exactly_and_held_entries_stay():
    g = torch.Generator().manual_seed(2)
    B, P, D = 5, 4, 12
    A = torch.randn(B, D, P, generator=g, dtype=torch.float64)
    c = torch.randn(B, D, generator=g, dtype=torch.float64)
    truth = torch.randn(B, P, generator=g, dtype=torch.float64)
    start = torch.zeros(B, P, dtype=torch.float64)
    active = torch.ones(B, P, dtype=torch.bool)
    active[0, 2] = False
    truth[0, 2] = 0.0  # held at the start's value, which is the truth there
    fn = _linear(A, c)
    target = fn(truth, torch.arange(B))
    steps = torch.full((P,), 1e-3, dtype=torch.float64)
    out = levenberg_marquardt(fn, start, target, steps, active, LMSettings(iterations=6, max_step=1e6))
    assert_close(out.params, truth, atol=1e-6)
    assert out.params[0, 2] == 0.0
    assert (out.loss <= out.start_loss).all() and (out.loss < 1e-9).all()


def test_a_nonlinear_fit_converges_to_the_known_minimum_and_never_raises_the_loss():
    """y = a exp(-b t): from a start 50 % off, LM finds (a, b) to 1e-6; the returned loss is never above the start's."""
    t = torch.linspace(0, 3, 25, dtype=torch.float64)
    truth = torch.tensor([[2.0, 1.3], [0.5, 0.4], [1.0, 2.5]], dtype=torch.float64)

    def fn(p, rows):
        return p[:, :1] * torch.exp(-p[:, 1:] * t)

    target = fn(truth, torch.arange(3))
    start = truth * torch.tensor([[1.5, 0.5], [0.6, 1.4], [1.4, 1.5]], dtype=torch.float64)
    steps = torch.full((2,), 1e-5, dtype=torch.float64)
    out = levenberg_marquardt(fn, start, target, steps, torch.ones(3, 2, dtype=torch.bool),
                              LMSettings(iterations=30, max_step=1e5))  # fmt: skip
    assert_close(out.params, truth, atol=1e-6)
    assert (out.loss <= out.start_loss).all()
    assert (out.iterations < 30).all()  # stopped on convergence, not by the iteration limit


def test_projection_keeps_every_trial_feasible():
    """The minimum lies outside the box [-1, 1]^2: the result is on the box, and so is every point evaluated."""
    A = torch.eye(2, dtype=torch.float64)[None]
    fn = _linear(A, torch.zeros(1, 2, dtype=torch.float64))
    seen = []

    def project(p, rows):
        seen.append(p.clamp(-1, 1))
        return seen[-1]

    target = torch.tensor([[3.0, 0.2]], dtype=torch.float64)
    steps = torch.full((2,), 1e-4, dtype=torch.float64)
    active = torch.ones(1, 2, dtype=torch.bool)
    out = levenberg_marquardt(fn, torch.zeros(1, 2, dtype=torch.float64), target, steps, active,
                              LMSettings(iterations=20, max_step=1e5), project)  # fmt: skip
    assert_close(out.params, [[1.0, 0.2]], atol=1e-6)
    assert all(p.abs().max() <= 1.0 for p in seen)


def test_a_free_gain_is_solved_in_closed_form_beside_the_parameters():
    """Target = 0.7 f(p*) with f linear in p (6 outputs, 2 parameters): LM recovers p* and the gain 0.7."""
    g = torch.Generator().manual_seed(4)
    A = 0.1 * torch.randn(1, 6, 2, generator=g, dtype=torch.float64)
    c = 0.5 + 0.3 * torch.rand(1, 6, generator=g, dtype=torch.float64)  # outputs in (0, 1): nothing saturates
    fn = _linear(A, c)
    truth = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
    target = 0.7 * fn(truth, torch.arange(1))
    steps = torch.full((2,), 1e-4, dtype=torch.float64)
    out = levenberg_marquardt(fn, torch.zeros(1, 2, dtype=torch.float64), target, steps,
                              torch.ones(1, 2, dtype=torch.bool), LMSettings(iterations=30, max_step=1e5),
                              gain=True)  # fmt: skip
    assert_close(out.params, truth, atol=1e-4)
    assert_close(out.gain, [0.7], atol=1e-5)


def test_smoothed_steps_return_the_best_point_by_the_unsmoothed_loss():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, 30, 3, generator=g, dtype=torch.float64)
    c = torch.randn(2, 30, generator=g, dtype=torch.float64)
    fn = _linear(A, c)
    target = fn(torch.randn(2, 3, generator=g, dtype=torch.float64), torch.arange(2))
    target = target + 0.3 * torch.randn(target.shape, generator=g, dtype=torch.float64)  # no exact fit
    smooth = lambda y: y[:, ::2] + y[:, 1::2]  # noqa: E731  a linear map to half the outputs
    steps = torch.full((3,), 1e-3, dtype=torch.float64)
    active = torch.ones(2, 3, dtype=torch.bool)
    out = levenberg_marquardt(fn, torch.zeros(2, 3, dtype=torch.float64), target, steps, active,
                              LMSettings(iterations=10, max_step=1e5), smooth=smooth)  # fmt: skip
    assert_close(out.loss, ((fn(out.params, torch.arange(2)) - target) ** 2).sum(1), atol=1e-9)
    assert (out.loss <= out.start_loss).all()


def test_solve_gain_ignores_saturated_entries():
    raw = torch.tensor([[0.2, 0.4, 0.9]])
    target = torch.tensor([[0.3, 0.6, 1.0]])  # the last entry saturated: 1.5 x 0.9 clamped
    assert_close(solve_gain(raw, target), [1.5], atol=1e-6)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="differences"):
        LMSettings(differences="backward")
    with pytest.raises(ValueError, match="damping"):
        LMSettings(damping_up=0.5)
    with pytest.raises(ValueError, match="iterations"):
        LMSettings(iterations=-1)
