"""AIR: module shapes, masking after the first z_pres = 0, the KL pieces against closed forms, bad inputs."""

import math

import pytest
import torch

from inverse_graphics.air import AIR, AIRConfig, bernoulli_kl, normal_kl, reverse_cumsum
from tests.conftest import assert_close


@pytest.fixture
def model():
    return AIR(AIRConfig())


def test_guide_and_render_shapes(model):
    B, T, D = 5, model.config.max_steps, model.config.z_what_dim
    x = torch.rand(B, 50, 50)
    g = model.guide(x)
    assert g.z_pres.shape == (B, T) and g.pres_prob.shape == (B, T)
    assert g.z_where.shape == (B, T, 3) and g.where_loc.shape == (B, T, 3)
    assert g.z_what.shape == (B, T, D) and g.what_scale.shape == (B, T, D)
    assert g.step_inputs.shape == (B, T, 3 + D + 1)
    assert model.render(g.z_pres, g.z_where, g.z_what).shape == (B, 50, 50)
    assert model.baseline_step(x, g.step_inputs).shape == (B, T)
    assert model.sample(4).shape == (4, 50, 50)


def test_module_shapes(model):
    assert model.encoder(torch.rand(2, 50, 50)).shape == (2, model.config.embed_dim)
    assert model.decoder(torch.randn(7, 50)).shape == (7, 20, 20)
    loc, scale = model.what_encoder(torch.rand(3, 20, 20))
    assert loc.shape == scale.shape == (3, 50) and (scale > 0).all()
    logit, wl, ws = model.where_head(torch.randn(4, model.config.rnn_hidden))
    assert logit.shape == (4,) and wl.shape == ws.shape == (4, 3) and (ws > 0).all()


def test_fresh_decoder_draws_almost_nothing(model):
    glyph = model.decoder(torch.randn(16, 50))
    assert glyph.mean() < 0.2  # sigmoid(-2) = 0.12: a fresh model prefers no object to a grey square


def test_steps_after_first_absent_object_are_masked(model):
    # Force q(z_pres = 1) to ~0 at every step: nothing may be drawn, and the decoder and z_what encoder must get
    # exactly zero gradient (their terms are all masked), while the count terms still train the z_pres head.
    with torch.no_grad():
        model.where_head.fc.bias[0] = -12.0
        model.where_head.fc.weight[0] = 0.0
    x = torch.rand(4, 50, 50)
    g = model.guide(x)
    assert (g.z_pres == 0).all()
    loss, _ = model.loss(x)
    loss.backward()
    for p in list(model.decoder.parameters()) + list(model.what_encoder.parameters()):
        assert p.grad is None or p.grad.abs().max() == 0
    assert model.where_head.fc.bias.grad[0] != 0


def test_z_pres_chain_is_monotone(model):
    g = model.guide(torch.rand(64, 50, 50))
    assert (g.z_pres[:, 1:] <= g.z_pres[:, :-1]).all()


def test_normal_kl_closed_form():
    loc, scale = torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0])
    p = torch.distributions.Normal(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5]))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(loc, scale), p)
    assert_close(normal_kl(loc, scale, p.loc, p.scale), expected, atol=1e-6)


def test_bernoulli_kl_closed_form():
    q = torch.tensor([0.2, 0.9, 1e-5])
    expected = q * torch.log(q / 0.01) + (1 - q) * torch.log((1 - q) / 0.99)
    assert_close(bernoulli_kl(q, 0.01), expected, atol=1e-6)
    assert torch.isfinite(bernoulli_kl(torch.tensor([1 - 1e-5]), 1e-5)).all()


def test_reverse_cumsum():
    assert_close(reverse_cumsum(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[6.0, 5.0, 3.0]]))


def test_loss_is_finite_and_elbo_sane(model):
    x = torch.zeros(8, 50, 50)
    loss, stats = model.loss(x)
    assert torch.isfinite(loss)
    # An empty scene explained by an empty canvas: log-lik at most 2500 * log N(0; 0, 0.3) = 725.7
    assert stats["log_lik"] <= 2500 * -math.log(0.3 * math.sqrt(2 * math.pi)) + 1e-3


@pytest.mark.parametrize(
    "bad, error, text",
    [
        (torch.rand(2, 28, 28), ValueError, "shape"),
        (torch.rand(50, 50), ValueError, "shape"),
        ((torch.rand(2, 50, 50) * 255).to(torch.uint8), TypeError, "divide by 255"),
        (torch.full((1, 50, 50), float("nan")), ValueError, "NaN"),
        (torch.rand(1, 50, 50) * 3, ValueError, "[0, 1]"),
        (torch.rand(1, 50, 50) - 0.5, ValueError, "[0, 1]"),
        ([[0.0] * 50] * 50, TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_are_rejected_clearly(model, bad, error, text):
    with pytest.raises(error, match=text.replace("[", r"\[").replace("]", r"\]")):
        model.infer(bad)


def test_accepts_channel_dim_and_float64(model):
    out = model.infer(torch.rand(2, 1, 50, 50, dtype=torch.float64))
    assert out.counts.shape == (2,) and out.counts.dtype == torch.long
    assert len(out.boxes) == 2 and all(b.shape[1] == 4 for b in out.boxes)


def test_fast_inference_path_matches_the_guide(model):
    x = torch.rand(32, 50, 50) * torch.linspace(0, 1, 32)[:, None, None]
    with torch.no_grad():
        model.where_head.fc.weight[0].mul_(100.0)
        model.where_head.fc.bias[0] -= torch.logit(model.guide(x, sample=False).pres_prob[:, 0]).median()
        ref = model.guide(x, sample=False)  # now a mix of present and absent objects
        fast = model.guide_fast(x)
    assert (ref.z_pres == 0).any() and (ref.z_pres == 1).any()
    assert torch.equal(fast.z_pres, ref.z_pres)
    for name in ("z_where", "z_what", "pres_prob"):
        assert_close(getattr(fast, name), getattr(ref, name), atol=1e-5, msg=name)
