"""The 2D sleep phase (`AIR.dream`, `AIR.teacher_forced_log_q`): against log q written out by hand from the guide's
pieces, invariance to the order of the dreamt objects, what DAIR's later steps see, and where gradients go."""

import math

import pytest
import torch

from inverse_graphics.air import AIR, PROB_EPS, AIRConfig, Dream
from renderers.spatial_transformer import canvas_to_window
from tests.conftest import assert_close


def dair(max_steps: int = 3) -> AIR:
    torch.manual_seed(0)
    model = AIR(AIRConfig(difference_input=True, max_steps=max_steps, decoder_bias=1.0)).double()
    with torch.no_grad():  # spread the where head out so that steps disagree about which object comes first
        model.where_head.fc.weight.normal_(0, 0.1)
    return model


def zero_state(B: int):
    """What a memoryless DAIR step gets besides the image: zero step input, zero LSTM state."""
    prev = torch.zeros(B, 54, dtype=torch.float64)
    zeros = torch.zeros(B, 256, dtype=torch.float64)
    return prev, (zeros, zeros)


def normal_log_prob(x, loc, scale):
    return (-0.5 * ((x - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)


def test_dream_counts_and_images():
    model = dair(4)
    d = model.dream(200, (1, 3))
    counts = d.z_pres.sum(1)
    assert set(counts.tolist()) == {1.0, 3.0}
    assert (d.z_pres[:, 1:] <= d.z_pres[:, :-1]).all()  # present steps first
    assert_close(d.z_where[..., 0], d.where_latent[..., 0].exp())
    assert_close(d.images, model.render(d.z_pres, d.z_where, d.z_what).clamp(0, 1))


def test_one_object_log_q_by_hand():
    # T = 1: log q = log q(z_pres = 1) + log q(where latent) + log q(z_what | window at the true where).
    model = dair(1)
    d = model.dream(3, (1,))
    h, c = model.rnn(model.rnn.image_gates(model.encoder(d.images)), *zero_state(3))
    pres_logit, where_loc, where_scale = model.where_head(h)
    pres_prob = PROB_EPS + (1 - 2 * PROB_EPS) * torch.sigmoid(pres_logit)
    window = canvas_to_window(d.images, d.z_where[:, 0], (20, 20))
    what_loc, what_scale = model.what_encoder(window)
    expected = (
        torch.log(pres_prob)
        + normal_log_prob(d.where_latent[:, 0], where_loc, where_scale)
        + normal_log_prob(d.z_what[:, 0], what_loc, what_scale)
    )
    assert_close(model.teacher_forced_log_q(d), expected)


def test_empty_scene_is_log_q_of_stopping():
    model = dair(3)
    d = model.dream(4, (0,))
    h, _ = model.rnn(model.rnn.image_gates(model.encoder(d.images)), *zero_state(4))
    pres_prob = PROB_EPS + (1 - 2 * PROB_EPS) * torch.sigmoid(model.where_head(h)[0])
    assert_close(model.teacher_forced_log_q(d), torch.log1p(-pres_prob))


def test_log_q_does_not_depend_on_the_order_of_the_dreamt_objects():
    # The prior is exchangeable: the greedy matching, not the dream's object order, decides each step's target.
    model = dair(3)
    d = model.dream(6, (2, 3))
    k = d.z_pres.sum(1).long().tolist()
    order = torch.tensor([[*range(n - 1, -1, -1), *range(n, 3)] for n in k])  # the present objects reversed
    take = lambda x: x.gather(1, order.view(6, 3, *[1] * (x.dim() - 2)).expand_as(x))  # noqa: E731
    shuffled = Dream(d.z_pres, take(d.where_latent), take(d.z_where), take(d.z_what), d.images)
    assert not torch.equal(shuffled.z_what, d.z_what)
    assert_close(model.teacher_forced_log_q(shuffled), model.teacher_forced_log_q(d))


def test_later_steps_see_the_guides_own_estimate():
    # DAIR step 1's encoder input is x minus the render of step 0's own estimate (its means), not of the truth.
    model = dair(2)
    d = model.dream(3, (2,))
    seen = []
    model.encoder.register_forward_hook(lambda module, args, output: seen.append(args[0].detach().clone()))
    model.teacher_forced_log_q(d)
    h, _ = model.rnn(model.rnn.image_gates(model.encoder(d.images)), *zero_state(3))
    _, where_loc, _ = model.where_head(h)
    est_where = torch.cat([where_loc[:, :1].exp(), where_loc[:, 1:]], dim=1)
    est_what = model.what_encoder(canvas_to_window(d.images, est_where, (20, 20)))[0]
    assert len(seen) >= 2
    assert_close(seen[1], d.images - model.render_step(torch.ones(3).double(), est_where, est_what))


@pytest.mark.parametrize("difference_input", [True, False])
def test_sleep_trains_the_guide_only(difference_input):
    model = AIR(AIRConfig(difference_input=difference_input, max_steps=3))
    model.sleep_loss(8, (0, 1, 2, 3)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith(("decoder.", "baseline.")))
    for part in ("encoder.", "rnn.", "where_head.", "what_encoder."):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(part)), part
