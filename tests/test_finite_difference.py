"""The finite-difference black-box wrapper: against gradcheck on a smooth toy function (float64), SPSA on a
linear one, and against autograd through the differentiable (soft) renderer on real scenes."""

from __future__ import annotations

import pytest
import torch

from renderers.finite_difference import FiniteDifferenceRenderer, FiniteDifferenceSettings, finite_difference
from scenes import tabletop
from tests.conftest import assert_close

WEIGHTS = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _toy(params: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A smooth black box (M, 3) -> (M, 5) whose output also depends on which input a row came from."""
    return torch.sin(params) @ WEIGHTS + params.prod(1, keepdim=True) ** 2 + rows[:, None].to(params)


def test_central_differences_pass_gradcheck_on_a_smooth_function():
    params = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    steps = torch.full((3,), 1e-6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: finite_difference(_toy, p, steps), (params,), atol=1e-5)


def test_inactive_entries_get_zero_gradient_and_cost_no_renders():
    params = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    active = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    rendered = []

    def counting(p, rows):
        rendered.append(p.shape[0])
        return _toy(p, rows)

    finite_difference(counting, params, torch.full((3,), 1e-6), active).sum().backward()
    assert rendered == [3, 2 * int(active.sum())]  # the forward batch, then all perturbations in one batch
    reference = torch.autograd.functional.jacobian(lambda p: _toy(p, torch.arange(3)).sum(), params.detach())
    assert_close(params.grad, reference * active, atol=1e-6)


def test_chunked_rendering_gives_the_same_gradient():
    params = torch.randn(5, 3, dtype=torch.float64)
    grads = []
    for max_batch in (None, 4):
        p = params.clone().requires_grad_(True)
        cfg = FiniteDifferenceSettings(max_batch=max_batch)
        finite_difference(_toy, p, torch.full((3,), 1e-5), settings=cfg).sum().backward()
        grads.append(p.grad)
    assert_close(grads[0], grads[1], atol=1e-12)


def test_spsa_is_unbiased_on_a_linear_function():
    params = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)

    def linear(p, rows):
        return p @ WEIGHTS

    cfg = FiniteDifferenceSettings(method="spsa", spsa_samples=10_000, seed=1)
    finite_difference(linear, params, torch.tensor([0.1, 0.1, 0.2]), settings=cfg).sum().backward()
    assert_close(params.grad, WEIGHTS.sum(1).expand(2, 3), atol=0.12)  # about 4 standard errors


def test_bad_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        FiniteDifferenceSettings(method="forward")


def test_against_autograd_through_the_soft_renderer_on_real_scenes():
    """Around the (smooth) soft renderer with small steps, finite differences reproduce its autograd."""
    t = tabletop.scenes_to_tensors(tabletop.sample_scenes(4, seed=21, min_objects=1, max_objects=3))
    target = tabletop.render_scenes(tabletop.tensors_to_scenes(tabletop.perturb_poses(t, seed=2)), 32)
    soft = tabletop.make_renderer(32, "soft")
    auto_pos, auto_yaw = tabletop.pose_gradients(soft, t, target)
    fd = FiniteDifferenceRenderer(soft, FiniteDifferenceSettings(position_step=2e-4, yaw_step=2e-3))
    fd_pos, fd_yaw = tabletop.pose_gradients(fd, t, target)
    assert_close(fd_pos, auto_pos, atol=0.03 * auto_pos.abs().max().item(), msg="positions")
    assert_close(fd_yaw, auto_yaw, atol=0.03 * auto_yaw.abs().max().item(), msg="yaws")


def test_renderer_wrapper_keeps_images_and_mask_of_the_wrapped_renderer():
    t = tabletop.scenes_to_tensors(tabletop.sample_scenes(2, seed=0, min_objects=1))
    hard = tabletop.make_renderer(32)
    plain = hard(t.shape_ids, t.positions, t.yaws)
    wrapped = FiniteDifferenceRenderer(hard)(t.shape_ids, t.positions, t.yaws)
    assert torch.equal(plain.images, wrapped.images) and torch.equal(plain.object_mask, wrapped.object_mask)
