"""Count search (`inverse_graphics.count_search`): the guide's forced proposals, the bounds against closed forms and
a slow Monte Carlo reference, the ELBO's gradients against finite differences, and the search on real scenes."""

import json
import math

import numpy as np
import pytest
import torch

import inverse_graphics as ig
from inverse_graphics.air import AIR, AIRConfig, where_from_latent
from inverse_graphics.count_search import (
    CountSearchConfig,
    Posterior,
    count_log_prior,
    drop_weakest,
    elbo,
    iwae,
    propose,
    refine,
    search_counts,
)
from scenes import mnist, multi_mnist
from tests.conftest import assert_close


def tiny(max_steps: int = 1, difference_input: bool = False, sd: float = 0.5) -> AIR:
    """A small model whose decoder draws something (bias +1): 12 px canvas, 6 px window, 2-d z_what."""
    torch.manual_seed(0)
    cfg = AIRConfig(
        canvas_size=12,
        window_size=6,
        z_what_dim=2,
        max_steps=max_steps,
        embed_dim=16,
        rnn_hidden=16,
        encoder_hidden=16,
        decoder_hidden=16,
        baseline_hidden=8,
        likelihood_sd=sd,
        decoder_bias=1.0,
        difference_input=difference_input,
        z_pres_prior=0.3,
    )
    return AIR(cfg).double()


def one_object_scene(model: AIR, n: int = 2) -> torch.Tensor:
    """Scenes drawn by the model itself with one object near the centre, plus a little noise."""
    where = torch.tensor([[[math.log(0.43), 0.1, -0.1]]], dtype=torch.float64).repeat(n, 1, 1)
    where[..., 0] = where[..., 0].exp()
    what = torch.randn(n, 1, model.config.z_what_dim, dtype=torch.float64)
    with torch.no_grad():
        x = model.render(torch.ones(n, 1, dtype=torch.float64), where, what)
    return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)


def test_forced_count_sets_z_pres_and_matches_the_guide_where_it_agrees():
    model = tiny(max_steps=3, difference_input=True)
    with torch.no_grad():
        model.where_head.fc.bias[0] = 20.0  # q(z_pres = 1) ~ 1: the guide itself says "present" at every step
        x = one_object_scene(model, 4)
        free = model.guide(x, sample=False)
        forced = [model.guide(x, sample=False, count=k) for k in range(4)]
    assert (free.z_pres == 1).all()
    for k, g in enumerate(forced):
        assert g.z_pres.tolist() == [[1.0] * k + [0.0] * (3 - k)] * 4
    for field in ("where_loc", "where_scale", "what_loc", "what_scale"):  # all present: the same computation
        assert_close(getattr(forced[3], field), getattr(free, field), atol=0, rtol=0, msg=field)
    # DAIR: step 2 sees the residual of step 1 only if step 1 is present.
    assert_close(forced[1].where_loc[:, 0], free.where_loc[:, 0], atol=0, rtol=0)
    assert not torch.allclose(forced[0].where_loc[:, 1], forced[1].where_loc[:, 1])


def test_count_prior_is_the_geometric_prior():
    model = tiny(max_steps=3)
    probs = [math.exp(count_log_prior(model, k)) for k in range(4)]
    assert_close(torch.tensor(probs), torch.tensor([0.7, 0.3 * 0.7, 0.09 * 0.7, 0.027]))
    with pytest.raises(ValueError, match="outside 0..3"):
        count_log_prior(model, 4)


def test_empty_hypothesis_is_exact():
    model = tiny()
    x = one_object_scene(model, 3)
    empty = propose(model, x, 0)
    assert empty.k == 0
    exact = torch.distributions.Normal(0.0, 0.5).log_prob(x).sum((1, 2))
    assert_close(iwae(model, x, empty, 4), exact)
    assert_close(elbo(model, x, empty, 4), exact)


def test_iwae_and_elbo_against_monte_carlo_over_the_prior():
    # log p(x | one object) = log E_prior[p(x | z)] by brute force (400,000 prior draws of the 5 latents), against the
    # IWAE bound from the refined posterior (tight with many draws) and the ELBO (below it).
    model = tiny(sd=0.5)
    x = one_object_scene(model, 2)
    gen = torch.Generator().manual_seed(1)
    n, chunk = 400_000, 50_000
    log_lik = []
    with torch.no_grad():
        for _ in range(n // chunk):
            where = model.where_prior_loc + model.where_prior_scale * torch.randn(chunk, 1, 3, generator=gen).double()
            what = torch.randn(chunk, 1, 2, generator=gen).double()
            z_where = torch.cat([where[..., :1].exp(), where[..., 1:]], dim=-1)
            recon = model.render(torch.ones(chunk, 1, dtype=torch.float64), z_where, what)
            log_lik.append(model.log_likelihood(x[:, None], recon[None]))  # (2, chunk)
    log_lik = torch.cat(log_lik, dim=1)
    reference = torch.logsumexp(log_lik, dim=1) - math.log(n)
    weights = torch.softmax(log_lik, dim=1)
    assert (1 / (weights**2).sum(1) > 1000).all(), "too few effective prior draws for a reference"

    q = refine(model, x, propose(model, x, 1), CountSearchConfig(steps=300), gen)
    bound = iwae(model, x, q, 20_000, gen)
    lower = elbo(model, x, q, 20_000, gen)
    assert_close(bound, reference, atol=0.05, rtol=0)
    assert (lower < bound).all() and (lower > reference - 1).all(), (lower, bound, reference)  # refined: within a nat


def test_elbo_gradients_against_finite_differences():
    model = tiny(max_steps=2)
    x = one_object_scene(model, 2)
    q0 = propose(model, x, 2)

    def f(where_loc, where_log_scale, what_loc, what_log_scale):
        q = Posterior(where_loc, where_log_scale.exp(), what_loc, what_log_scale.exp())
        return elbo(model, x, q, 3, torch.Generator().manual_seed(0))  # the same draws at every evaluation

    inputs = tuple(
        t.detach().clone().requires_grad_(True)
        for t in (q0.where_loc, q0.where_scale.log(), q0.what_loc, q0.what_scale.log())
    )
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_refinement_raises_the_elbo_and_leaves_the_model_alone():
    model = tiny(max_steps=2)
    x = one_object_scene(model, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    q0 = propose(model, x, 1)
    q = refine(model, x, q0, CountSearchConfig(steps=100))
    gen = torch.Generator().manual_seed(0)
    assert (elbo(model, x, q, 2000, gen) > elbo(model, x, q0, 2000, gen)).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())


def test_drop_weakest_removes_the_object_that_explains_least():
    # Two objects drawn by the model, a third proposed far off the ink: dropping it costs nothing, dropping a drawn
    # one costs its whole glyph; the kept objects keep their order and their posteriors.
    model = tiny(max_steps=3)
    where = torch.tensor([[math.log(0.43), -0.4, -0.4], [math.log(0.43), 0.4, 0.4], [math.log(0.43), -0.5, 0.6]])
    where = where.double().expand(2, 3, 3).clone()
    where[1] = where[1, [2, 0, 1]]  # in the second scene the stray object comes first
    what = torch.randn(2, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        z_where = where_from_latent(where)
        drawn = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
        x = model.render(drawn, z_where, what).clamp(0, 1)
    scale = lambda t: torch.full_like(t, 0.01)  # noqa: E731
    q = Posterior(where, scale(where), what, scale(what))
    kept = drop_weakest(model, x, q, torch.Generator().manual_seed(0))
    assert kept.k == 2
    assert_close(kept.where_loc[0], where[0, :2], atol=0, rtol=0)
    assert_close(kept.where_loc[1], where[1, 1:], atol=0, rtol=0)
    assert_close(kept.what_loc[1], what[1, 1:], atol=0, rtol=0)
    assert_close(kept.what_scale, torch.full((2, 2, 2), 0.01, dtype=torch.float64), atol=0, rtol=0)


def test_deletion_proposals_never_lower_a_score():
    model = tiny(max_steps=2)
    x = one_object_scene(model, 3)
    plain = search_counts(model, x, CountSearchConfig(steps=20, deletion=False, score_samples=256))
    both = search_counts(model, x, CountSearchConfig(steps=20, deletion=True, score_samples=256))
    assert_close(both.scores[:, 2], plain.scores[:, 2], atol=0, rtol=0)  # T objects: nothing to delete from
    assert_close(both.scores[:, 0], plain.scores[:, 0], atol=0, rtol=0)  # exact
    assert (both.scores[:, 1] >= plain.scores[:, 1]).all()  # the same draws up to there, then the better of two


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"steps": -1}, "steps >= 0"),
        ({"score_samples": 0}, "score_samples"),
        ({"lr_what": 0.0}, "positive"),
        ({"counts": ()}, "non-empty"),
    ],
)
def test_bad_configs_are_rejected(kwargs, text):
    with pytest.raises(ValueError, match=text):
        CountSearchConfig(**kwargs)


def test_hypotheses_beyond_t_are_rejected():
    model = tiny(max_steps=2)
    with pytest.raises(ValueError, match="exceed the model's T = 2"):
        search_counts(model, torch.zeros(1, 12, 12), CountSearchConfig(counts=(1, 3)))


def test_search_on_real_scenes(data_dir):
    # The shipped DAIR (trained on 0-2 digits) on 20 scenes of 3 MNIST test digits, a count it never saw: its guide
    # gets 14 right; asking the model (60 steps per hypothesis here, 200 by default) gets 17 (measured when written).
    model = ig.load_pretrained("dair-multi-mnist")
    digits = mnist.load_digits("test", data_dir)
    data = multi_mnist.generate(digits, 20, np.random.default_rng(5), (3,), overlap="separate")
    x = torch.from_numpy(data.float_images(0, 20))
    found = search_counts(model, x, CountSearchConfig(steps=60, score_samples=16, batch_size=4))
    truth = torch.from_numpy(data.counts)
    assert found.scores.shape == (20, 5) and found.hypotheses == (0, 1, 2, 3, 4)
    assert_close(found.guide_counts, model.infer(x).counts, atol=0, rtol=0)
    assert (found.counts == found.scores.argmax(1)).all()
    assert (found.counts == truth).sum() > (found.guide_counts == truth).sum() + 1, (found.counts, found.guide_counts)
    assert_close(found.z_pres.sum(1), found.counts)
    absent = found.z_pres == 0
    assert (found.z_where[absent] == 0).all() and (found.z_what[absent] == 0).all()
    assert (found.z_where[~absent][:, 0] > 0).all()  # scales, not log scales
    with torch.no_grad():  # the chosen latents explain the scene at least as well as the guide's
        ours = model.log_likelihood(x, model.render(found.z_pres, found.z_where, found.z_what))
        guide = model.infer(x, reconstruct=True).recon
    assert ours.mean() > model.log_likelihood(x, guide).mean()


def test_eval_command_counts_by_search(data_dir, capsys):
    from inverse_graphics.cli import main as cli_main

    args = ["eval", "--model", "dair-multi-mnist", "--n", "4", "--counts", "3", "--overlap", "separate"]
    assert cli_main(args + ["--search-steps", "2", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "count search: 4/4 scenes" in out
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["search_steps"] == 2 and rec["n"] == 4 and 0 <= rec["count_acc"] <= 1
