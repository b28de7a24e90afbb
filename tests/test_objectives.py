"""Objectives against exact answers.

The reference is the linear-Gaussian model (:mod:`pyrovae.models.linear_gaussian`), where log p(x), the
posterior and the ELBO of a diagonal-Gaussian q are known in closed form. Monte-Carlo checks compare a mean
over independent draws with the exact value within ``Z`` standard errors, the standard error computed from
the same draws; everything runs in float64 so that "exact" means float round-off.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.poutine.trace_struct import Trace

from pyrovae.models.linear_gaussian import ExactPosteriorGuide, LinearGaussian, LinearGaussianGuide
from pyrovae.objectives import ELBO, GECO, IWAE, OBJECTIVES, BetaELBO, LogVarianceLoss, Objective, Renyi, VarianceLoss, make_objective
from pyrovae.objectives.sequence import AnnealedELBO, TokenGECO
from pyrovae.train import Trainer

DT = torch.float64
Z = 5.0  # standard errors allowed between a Monte-Carlo mean and its exact value
EXACT = 1e-9  # float64 round-off on sums of a few log-densities

W0 = torch.tensor([[1.0, 0.4], [-0.5, 0.9], [0.7, -0.8]], dtype=DT)
B0 = torch.tensor([0.3, -0.2, 0.1], dtype=DT)
S0 = 0.5
X0 = torch.tensor([[0.9, -0.4, 0.6], [-0.7, 0.5, -0.3], [1.5, 0.8, -1.1], [0.2, -1.0, 0.9]], dtype=DT)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every tensor here is small: intra-op threads only add overhead, and on a busy machine their spinning
    makes the file several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- helpers ------------------------------------------------------------------------------------------------
def linear_gaussian(learnable: bool = True) -> LinearGaussian:
    return LinearGaussian(3, 2, scale=S0, weight=W0, bias=B0, learnable=learnable)


def diagonal_guide(model: LinearGaussian, offset: float = 0.3, widen: float = 1.5) -> LinearGaussianGuide:
    """A diagonal q != p(z|x): the posterior's mean map shifted by ``offset``, and a scale ``widen`` times the
    posterior's largest standard deviation, so q is wider than p(z|x) in every direction and the importance
    weights are bounded (relative variance about 1.5 with the defaults). With one latent dimension,
    ``offset=0, widen=1`` is the exact posterior."""
    guide = LinearGaussianGuide(model.x_dim, model.z_dim, dtype=DT)
    with torch.no_grad():
        _, cov = model.posterior(X0)
        enc = cov @ model.weight.T / model.scale**2
        guide.encoder.weight.copy_(enc)
        guide.encoder.bias.copy_(-enc @ model.bias + offset)
        guide.log_scale.fill_(math.log(widen) + 0.5 * torch.linalg.eigvalsh(cov).max().log().item())
    return guide


def params_of(*modules) -> list[torch.Tensor]:
    return [p for m in modules for p in m.parameters()]


def grad_draws(obj: Objective, model, guide, x, params, draws: int, seed: int | None = None) -> torch.Tensor:
    """``[draws, n_params]``: the flattened gradient of ``obj.differentiable_loss`` at independent draws
    (seeded ``seed + i`` when ``seed`` is given, so that two objectives can see the same samples)."""
    rows = []
    for i in range(draws):
        if seed is not None:
            pyro.set_rng_seed(seed + i)
        grads = torch.autograd.grad(obj.differentiable_loss(model, guide, x), params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return torch.stack(rows)


def mean_se(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])


def assert_within_se(samples: torch.Tensor, exact: torch.Tensor, what: str, power: bool = True) -> None:
    """Each component's mean within ``Z`` SE of ``exact``; with ``power``, the SEs are also small enough that
    an estimate off by half the exact gradient's size would have failed (so the check is not vacuous)."""
    mean, se = mean_se(samples)
    bad = (mean - exact).abs() > Z * se + EXACT
    assert not bad.any(), f"{what}: mean {mean[bad].tolist()} vs exact {exact[bad].tolist()}, SE {se[bad].tolist()}"
    if power:
        assert Z * se.max() < 0.5 * exact.abs().max(), f"{what}: SE {se.max().item()} too large to test anything"


def replicate_estimate(obj: Objective, model, guide, x0: torch.Tensor, reps: int, calls: int) -> tuple[float, float]:
    """Per-datum mean (and its SE) of ``-obj.loss`` on one data point: each call scores a batch of ``reps``
    copies of ``x0`` (independent draws per copy), so ``-loss / reps`` is a mean of ``reps`` i.i.d. bounds;
    the SE comes from the spread over ``calls`` such means."""
    xs = x0.expand(reps, -1)
    vals = torch.tensor([-obj.loss(model, guide, xs) / reps for _ in range(calls)], dtype=DT)
    return vals.mean().item(), (vals.std() / math.sqrt(calls)).item()


# --- the reference model itself -------------------------------------------------------------------------------
def test_linear_gaussian_closed_forms_agree_with_bayes_rule():
    model = linear_gaussian()
    with torch.no_grad():
        mean, cov = model.posterior(X0)
        z = torch.randn(7, *mean.shape, dtype=DT)  # any z: log p(z) + log p(x|z) - log p(z|x) = log p(x)
        prior = dist.Normal(torch.zeros(2, dtype=DT), 1.0).to_event(1).log_prob(z)
        lik = dist.Normal(z @ W0.T + B0, S0).to_event(1).log_prob(X0)
        post = dist.MultivariateNormal(mean, covariance_matrix=cov).log_prob(z)
        torch.testing.assert_close(prior + lik - post, model.log_marginal(X0).expand(7, -1), rtol=0, atol=EXACT)
        # the closed-form ELBO is below log p(x), and equal to it when q is the posterior (d = 1: diagonal)
        guide = diagonal_guide(model)
        assert (model.elbo(X0, *guide.loc_scale(X0)) < model.log_marginal(X0) - 0.1).all()
        one = LinearGaussian(3, 1, scale=S0, weight=W0[:, :1], bias=B0)
        m1, c1 = one.posterior(X0)
        torch.testing.assert_close(one.elbo(X0, m1, c1.diagonal().sqrt()), one.log_marginal(X0), rtol=0, atol=EXACT)


# --- q = the exact posterior ------------------------------------------------------------------------------------
BOUNDS_AT_POSTERIOR = [
    pytest.param(lambda: ELBO(num_particles=1), id="elbo-1"),
    pytest.param(lambda: ELBO(num_particles=3), id="elbo-3"),
    pytest.param(lambda: BetaELBO(beta=1.0, num_particles=3), id="beta-1"),
    pytest.param(lambda: IWAE(num_particles=7), id="iwae-7"),
    pytest.param(lambda: IWAE(num_particles=7, estimator="dreg"), id="iwae-7-dreg"),
    pytest.param(lambda: Renyi(alpha=0.5, num_particles=7), id="renyi-0.5"),
    pytest.param(lambda: Renyi(alpha=-1.0, num_particles=7), id="renyi--1"),
    pytest.param(lambda: Renyi(alpha=1.0, num_particles=7), id="renyi-1"),
    pytest.param(lambda: AnnealedELBO(beta=1.0, schedule="constant", num_particles=3), id="annealed-1"),
]


@pytest.mark.parametrize("make", BOUNDS_AT_POSTERIOR)
def test_every_bound_is_log_marginal_at_exact_posterior(make):
    model = linear_gaussian(learnable=False)
    guide = ExactPosteriorGuide(model)
    obj = make()
    log_px = model.log_marginal(X0)
    for _ in range(5):  # repeated draws: zero variance
        lw = obj.log_weights(model, guide, X0)
        torch.testing.assert_close(lw.log_w, log_px.expand_as(lw.log_w), rtol=0, atol=EXACT)
        assert -obj.loss(model, guide, X0) == pytest.approx(log_px.sum().item(), abs=EXACT)
        assert -obj.differentiable_loss(model, guide, X0).item() == pytest.approx(log_px.sum().item(), abs=EXACT)
    for i in range(X0.shape[0]):  # per datum
        assert -obj.loss(model, guide, X0[i : i + 1]) == pytest.approx(log_px[i].item(), abs=EXACT)


def test_variance_losses_vanish_at_exact_posterior():
    model = linear_gaussian()
    guide = ExactPosteriorGuide(model, detach=False)  # gradients reach W, b through q too
    for obj in (VarianceLoss(num_particles=5), LogVarianceLoss(num_particles=5)):
        for _ in range(3):
            assert abs(obj.loss(model, guide, X0)) < 1e-20
    # the variance of a constant has zero gradient w.r.t. everything
    grads = grad_draws(VarianceLoss(num_particles=5), model, guide, X0, params_of(model), draws=5)
    assert grads.abs().max() < 1e-10


def test_guide_gradients_vanish_at_exact_posterior():
    """With one latent dimension the diagonal guide can be the exact posterior. There log w is constant in z,
    so the variance losses and the DReG estimator give the guide exactly zero gradient on every draw, while
    the standard IWAE estimator gives it pure noise (mean zero): the effect DReG removes."""
    model = LinearGaussian(3, 1, scale=S0, weight=W0[:, :1], bias=B0, learnable=False)
    guide = diagonal_guide(model, offset=0.0, widen=1.0)
    assert abs(ELBO(num_particles=3).loss(model, guide, X0) + model.log_marginal(X0).sum().item()) < EXACT
    params = params_of(guide)
    for obj in (VarianceLoss(num_particles=4), LogVarianceLoss(num_particles=4), IWAE(num_particles=8, estimator="dreg")):
        assert grad_draws(obj, model, guide, X0, params, draws=5).abs().max() < 1e-10, repr(obj)
    standard = grad_draws(IWAE(num_particles=8), model, guide, X0, params, draws=100)
    assert standard.std(0).min() > 1e-3
    assert_within_se(standard, torch.zeros(standard.shape[1], dtype=DT), "standard IWAE guide gradient", power=False)


def test_model_gradient_at_exact_posterior_is_fisher_identity():
    """At a fixed q = p(z|x), E_q[grad_theta log p_theta(x, z)] = grad_theta log p_theta(x) (Fisher's identity).
    ELBO and IWAE estimate it; so does LogVarianceLoss, which trains the model by the ELBO gradient by design
    (its guide part, the variance, vanishes), so its model gradient is this and not zero."""
    model = linear_gaussian()
    guide = ExactPosteriorGuide(model, detach=True)
    params = params_of(model)
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-model.log_marginal(X0).sum(), params)])
    for obj in (ELBO(num_particles=16), IWAE(num_particles=16), LogVarianceLoss(num_particles=16)):
        assert_within_se(grad_draws(obj, model, guide, X0, params, draws=60), exact, repr(obj))


# --- q != posterior: the ordering of the bounds ----------------------------------------------------------------
def test_bounds_increase_in_k_towards_log_marginal():
    model = linear_gaussian(learnable=False)
    guide = diagonal_guide(model)
    x0 = X0[2]
    log_px = model.log_marginal(x0[None]).item()
    elbo = replicate_estimate(ELBO(num_particles=1), model, guide, x0, reps=400, calls=20)
    iwae5 = replicate_estimate(IWAE(num_particles=5), model, guide, x0, reps=400, calls=20)
    iwae50 = replicate_estimate(IWAE(num_particles=50), model, guide, x0, reps=400, calls=20)
    # bias of IWAE_K ~ Var(w) / (2 K) ~ 1.5e-4 here, well under the SE of 1000 replicates (~5e-4)
    iwae5000 = replicate_estimate(IWAE(num_particles=5000), model, guide, x0, reps=50, calls=20)
    chain = [elbo, iwae5, iwae50, (log_px, 0.0)]
    for (lo, se_lo), (hi, se_hi) in zip(chain, chain[1:]):
        assert hi - lo > Z * math.hypot(se_lo, se_hi), f"no strict gap: {lo} +- {se_lo} vs {hi} +- {se_hi}"
    mean, se = iwae5000
    assert abs(mean - log_px) < Z * se, f"IWAE_5000 {mean} +- {se} vs log p(x) {log_px}"
    assert Z * se < log_px - iwae50[0]  # ... with an SE small enough to have seen IWAE_50's gap


def test_renyi_limits_on_the_same_samples():
    model = linear_gaussian()
    guide = diagonal_guide(model)
    params = params_of(model, guide)

    def value_and_grad(obj, seed):
        pyro.set_rng_seed(seed)
        loss = obj.differentiable_loss(model, guide, X0)
        return torch.cat([loss.detach()[None]] + [g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    pairs = [
        (Renyi(alpha=0.0, num_particles=6, max_plate_nesting=1), IWAE(num_particles=6, max_plate_nesting=1)),
        (Renyi(alpha=1.0, num_particles=6, max_plate_nesting=1), ELBO(num_particles=6, max_plate_nesting=1)),
        (IWAE(num_particles=1, max_plate_nesting=1), ELBO(num_particles=1, max_plate_nesting=1)),
    ]
    for a, b in pairs:
        for seed in (1, 2):
            torch.testing.assert_close(value_and_grad(a, seed), value_and_grad(b, seed), rtol=1e-12, atol=EXACT)
    # alpha -> 1 is continuous, and the bound decreases in alpha (for the same samples)
    near = value_and_grad(Renyi(alpha=1 - 1e-7, num_particles=6, max_plate_nesting=1), 3)
    torch.testing.assert_close(near, value_and_grad(ELBO(num_particles=6, max_plate_nesting=1), 3), rtol=1e-5, atol=1e-5)
    losses = [value_and_grad(Renyi(alpha=a, num_particles=6, max_plate_nesting=1), 4)[0] for a in (-1.0, 0.0, 0.5, 1.0, 2.0)]
    assert all(lo < hi for lo, hi in zip(losses, losses[1:]))


# --- gradients -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("analytic_kl", [False, True])
def test_elbo_gradient_matches_closed_form(analytic_kl):
    model = linear_gaussian()
    guide = diagonal_guide(model)
    params = params_of(model, guide)
    exact_elbo = model.elbo(X0, *guide.loc_scale(X0)).sum()
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-exact_elbo, params)])
    obj = ELBO(num_particles=8, analytic_kl=analytic_kl)
    assert_within_se(grad_draws(obj, model, guide, X0, params, draws=150), exact, repr(obj))
    values = torch.tensor([-obj.loss(model, guide, X0) for _ in range(50)], dtype=DT)
    mean, se = mean_se(values)
    assert abs(mean - exact_elbo.item()) < Z * se


def test_iwae_dreg_agrees_with_standard_and_has_lower_guide_variance():
    model = linear_gaussian()
    guide = diagonal_guide(model)
    model_params, guide_params = params_of(model), params_of(guide)
    n_model = sum(p.numel() for p in model_params)
    draws = 100
    standard = grad_draws(IWAE(num_particles=50), model, guide, X0, model_params + guide_params, draws, seed=100)
    dreg = grad_draws(IWAE(num_particles=50, estimator="dreg"), model, guide, X0, model_params + guide_params, draws, seed=100)
    # the model's gradient is the same estimator, sum_k w~_k grad log p(x, z_k): equal draw by draw
    torch.testing.assert_close(dreg[:, :n_model], standard[:, :n_model], rtol=1e-9, atol=EXACT)
    # the guide's: equal in expectation (paired differences on the same samples)
    diff = standard[:, n_model:] - dreg[:, n_model:]
    assert_within_se(diff, torch.zeros(diff.shape[1], dtype=DT), "standard - dreg guide gradient", power=False)
    var_standard = standard[:, n_model:].var(0).sum()
    var_dreg = dreg[:, n_model:].var(0).sum()
    assert var_dreg < 0.1 * var_standard, f"DReG guide-gradient variance {var_dreg} vs standard {var_standard}"


# --- discrete latents: the score-function gradient -----------------------------------------------------------
XD = torch.tensor([-1.3, 0.4, 2.1, -0.2, 1.0], dtype=DT)
MU0 = torch.tensor([-1.0, 1.5], dtype=DT)


def _local_discrete():
    def model(x):
        mu = pyro.param("mu", MU0.clone())
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.4, dtype=DT)))
            pyro.sample("x", dist.Normal(mu[c.long()], 1.0), obs=x)

    def guide(x):
        a = pyro.param("a", torch.tensor(0.7, dtype=DT))
        b = pyro.param("b", torch.tensor(-0.2, dtype=DT))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(logits=a * x + b))

    def exact_elbo(x):
        mu, a, b = pyro.param("mu"), pyro.param("a"), pyro.param("b")
        q1 = torch.sigmoid(a * x + b)
        terms = 0.0
        for c, qc in ((0, 1 - q1), (1, q1)):
            prior = math.log(0.4 if c else 0.6)
            terms = terms + qc * (prior + dist.Normal(mu[c], 1.0).log_prob(x) - qc.log())
        return terms.sum()

    return model, guide, exact_elbo, ("mu", "a", "b")


def _global_discrete():
    def model(x):
        mu = pyro.param("mu", MU0.clone())
        c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.4, dtype=DT)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu[c.long()], 1.0), obs=x)

    def guide(x):
        phi = pyro.param("phi", torch.tensor(0.3, dtype=DT))
        pyro.sample("c", dist.Bernoulli(logits=phi))

    def exact_elbo(x):
        mu, phi = pyro.param("mu"), pyro.param("phi")
        q1 = torch.sigmoid(phi)
        terms = 0.0
        for c, qc in ((0, 1 - q1), (1, q1)):
            prior = math.log(0.4 if c else 0.6)
            terms = terms + qc * (prior + dist.Normal(mu[c], 1.0).log_prob(x).sum() - qc.log())
        return terms

    return model, guide, exact_elbo, ("mu", "phi")


@pytest.mark.parametrize("build", [_local_discrete, _global_discrete], ids=["local", "global"])
def test_elbo_score_function_gradient_is_unbiased(build):
    model, guide, exact_elbo, names = build()
    obj = ELBO(num_particles=32)  # the leave-one-out baseline needs several particles
    obj.loss(model, guide, XD)  # creates the params
    params = [pyro.param(n).unconstrained() for n in names]
    exact_value = exact_elbo(XD)
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-exact_value, params)])
    assert_within_se(grad_draws(obj, model, guide, XD, params, draws=100), exact, f"ELBO gradient, {build.__name__}")
    values = torch.tensor([-obj.loss(model, guide, XD) for _ in range(30)], dtype=DT)
    mean, se = mean_se(values)
    assert abs(mean - exact_value.item()) < Z * se


# --- no latent variables: every objective is Trace_ELBO --------------------------------------------------------
def _no_latent(global_factor: bool, guide_factor: bool = False):
    def model(x):
        mu = pyro.param("mu", torch.tensor(0.2, dtype=DT))
        if global_factor:  # an observed term outside the data plate
            pyro.factor("prior_mu", dist.Normal(torch.tensor(0.0, dtype=DT), 2.0).log_prob(mu))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        if guide_factor:  # a factor in the guide: Pyro's ELBOs subtract it as part of log q
            pyro.factor("guide_term", 0.3 * pyro.param("mu", torch.tensor(0.2, dtype=DT)) ** 2, has_rsample=True)

    return model, guide


NO_LATENT = [
    pytest.param(lambda: ELBO(num_particles=1), "elbo", id="elbo-1"),
    pytest.param(lambda: ELBO(num_particles=3, analytic_kl=True), "elbo", id="elbo-3-analytic"),
    pytest.param(lambda: BetaELBO(beta=0.3, num_particles=2), "elbo", id="beta-0.3"),
    pytest.param(lambda: IWAE(num_particles=5), "elbo", id="iwae"),
    pytest.param(lambda: IWAE(num_particles=5, estimator="dreg"), "elbo", id="iwae-dreg"),
    pytest.param(lambda: Renyi(alpha=0.5, num_particles=5), "elbo", id="renyi"),
    pytest.param(lambda: VarianceLoss(num_particles=4), "zero", id="variance"),
    pytest.param(lambda: LogVarianceLoss(num_particles=4), "zero-value-elbo-gradient", id="logvariance"),
    pytest.param(lambda: AnnealedELBO(beta=1.0, schedule="logistic", warmup_steps=100), "elbo", id="annealed-warmup"),
]


@pytest.mark.parametrize("global_factor,guide_factor", [(False, False), (True, False), (True, True)], ids=["plain", "global-factor", "guide-factor"])
@pytest.mark.parametrize("make,expect", NO_LATENT)
def test_no_latents_every_objective_is_trace_elbo(make, expect, global_factor, guide_factor):
    model, guide = _no_latent(global_factor, guide_factor)
    x = torch.tensor([0.3, 1.2, -0.4, 0.9, 2.0], dtype=DT)
    ref_loss = Trace_ELBO().differentiable_loss(model, guide, x)
    mu = pyro.param("mu").unconstrained()
    (ref_grad,) = torch.autograd.grad(ref_loss, mu)
    obj = make()
    if guide_factor and expect != "elbo":  # the guide's factor: no density of z, invisible to a variance over z
        with pytest.raises(ValueError, match="guide has observed or auxiliary sites"):
            obj.loss(model, guide, x)
        return
    loss = obj.differentiable_loss(model, guide, x)
    (grad,) = torch.autograd.grad(loss, mu)
    if expect == "elbo":
        assert obj.loss(model, guide, x) == pytest.approx(ref_loss.item(), abs=EXACT)
        assert loss.item() == pytest.approx(ref_loss.item(), abs=EXACT)
        assert grad.item() == pytest.approx(ref_grad.item(), abs=EXACT)
    else:
        assert obj.loss(model, guide, x) == 0.0 and loss.item() == 0.0
        assert grad.item() == pytest.approx(0.0 if expect == "zero" else ref_grad.item(), abs=EXACT)
    assert obj.metrics["elbo"].item() * x.shape[0] == pytest.approx(-ref_loss.item(), abs=EXACT)
    assert obj.metrics["kl"].item() == 0.0


def test_no_latents_geco_is_lambda_times_constraint():
    model, guide = _no_latent(False)
    x = torch.tensor([0.3, 1.2, -0.4, 0.9, 2.0], dtype=DT)
    obj = GECO(tolerance=0.5, lambda_init=2.0)
    loss = obj.loss(model, guide, x)
    c = ((x - 0.2) ** 2).mean() - 0.25  # RE: mean squared error minus tolerance^2
    assert obj.metrics["kl"].item() == 0.0
    assert loss == pytest.approx(x.shape[0] * 2.0 * c.item(), rel=1e-6)


# --- vectorised particles equal a sequential loop -------------------------------------------------------------
def _two_latents():
    def model(x):
        batch = x.shape[0]
        with pyro.plate("data", batch):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(batch, 2), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(torch.tanh(z2) @ W0[:2].T, 0.7).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ W0.T + B0, S0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(0.3 * x[..., :2], 0.8).to_event(1))
            pyro.sample("z2", dist.Normal(0.5 * z1 - 0.1, 0.9).to_event(1))

    return model, guide, (X0,)


def _nested_plates():
    def model(x):
        batch, feat = x.shape
        with pyro.plate("data", batch, dim=-2):
            s = pyro.sample("s", dist.Normal(x.new_zeros(batch, 1), 1.0))
            with pyro.plate("feat", feat, dim=-1):
                z = pyro.sample("z", dist.Normal(s, 1.0))
                pyro.sample("x", dist.Normal(z, S0), obs=x)

    def guide(x):
        batch, feat = x.shape
        with pyro.plate("data", batch, dim=-2):
            s = pyro.sample("s", dist.Normal(x.mean(-1, keepdim=True), 0.6))
            with pyro.plate("feat", feat, dim=-1):
                pyro.sample("z", dist.Normal(0.5 * (x + s), 0.5))

    return model, guide, (X0,)


YL = torch.tensor([1.0, -0.5, 0.2, 2.0], dtype=DT)


def _extra_args():
    def model(x, y):
        batch = x.shape[0]
        with pyro.plate("data", batch):
            z = pyro.sample("z", dist.Normal(x.new_zeros(batch, 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W0.T + B0, S0).to_event(1), obs=x)
            pyro.sample("y", dist.Normal(z.sum(-1), 0.5), obs=y)

    def guide(x, y):
        with pyro.plate("data", x.shape[0]):
            loc = torch.stack([x[..., 0] + 0.1 * y, x[..., 1] - 0.2 * y], -1)
            pyro.sample("z", dist.Normal(loc, 0.5).to_event(1))

    return model, guide, (X0, YL)


def _linear_gaussian_mismatched():
    model = linear_gaussian(learnable=False)
    return model, diagonal_guide(model), (X0,)


PROGRAMS = [
    pytest.param(_linear_gaussian_mismatched, id="linear-gaussian"),
    pytest.param(_two_latents, id="two-latents"),
    pytest.param(_nested_plates, id="nested-plates"),
    pytest.param(_extra_args, id="extra-args"),
]


def _sequential_log_weights(model, guide, args, guide_trace, num_particles) -> torch.Tensor:
    """log w[p, b] by re-running guide and model one particle and one data point at a time, on the latent
    values of the vectorised guide trace (particle dim first, then the data points)."""
    batch = args[0].shape[0]
    latents = {n: s["value"].detach() for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
    out = torch.empty(num_particles, batch, dtype=DT)
    for p in range(num_particles):
        for b in range(batch):
            one = tuple(a[b : b + 1] for a in args)
            values = Trace()
            for name, v in latents.items():
                values.add_node(name, type="sample", name=name, value=v[p][b : b + 1], is_observed=False, infer={})
            gtrace = poutine.trace(poutine.replay(guide, trace=values)).get_trace(*one)
            mtrace = poutine.trace(poutine.replay(model, trace=gtrace)).get_trace(*one)
            out[p, b] = mtrace.log_prob_sum() - gtrace.log_prob_sum()
    return out


@pytest.mark.parametrize("build", PROGRAMS)
def test_vectorised_particles_equal_sequential_loop(build):
    model, guide, args = build()
    num = 4
    elbo, iwae = ELBO(num_particles=num), IWAE(num_particles=num)
    elbo.loss(model, guide, *args), iwae.loss(model, guide, *args)  # guess max_plate_nesting (uses the RNG)
    pyro.set_rng_seed(7)
    lw = elbo.log_weights(model, guide, *args)
    sequential = _sequential_log_weights(model, guide, args, lw.guide_trace, num)
    torch.testing.assert_close(lw.log_w.detach(), sequential, rtol=0, atol=EXACT)
    # the objectives' values on the same draw are these log-weights, reduced
    pyro.set_rng_seed(7)
    assert -elbo.loss(model, guide, *args) == pytest.approx(sequential.mean(0).sum().item(), abs=EXACT)
    pyro.set_rng_seed(7)
    bound = torch.logsumexp(sequential, 0) - math.log(num)
    assert -iwae.loss(model, guide, *args) == pytest.approx(bound.sum().item(), abs=EXACT)


@pytest.mark.parametrize("build", PROGRAMS[1:])
def test_objectives_on_multi_site_and_extra_arg_programs(build):
    model, guide, args = build()
    batch = args[0].shape[0]
    objectives = [ELBO(num_particles=3), ELBO(num_particles=2, analytic_kl=True), IWAE(num_particles=5), IWAE(num_particles=5, estimator="dreg"), Renyi(alpha=0.5, num_particles=5), VarianceLoss(num_particles=3)]
    for obj in objectives:
        loss = obj.differentiable_loss(model, guide, *args)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert math.isfinite(obj.loss(model, guide, *args))
        assert {"elbo", "recon", "kl"} <= set(obj.metrics)
        for name, value in obj.metrics.items():
            assert value.dim() == 0 and torch.isfinite(value) and not value.requires_grad, name
        lw = obj.log_weights(model, guide, *args)
        assert lw.log_w.shape == (obj.num_particles, batch)
    # the ELBO's parts add up: elbo = recon - kl
    obj = ELBO(num_particles=3)
    obj.loss(model, guide, *args)
    m = obj.metrics
    assert m["elbo"].item() == pytest.approx((m["recon"] - m["kl"]).item(), abs=EXACT)


# --- training through SVI and the Trainer ----------------------------------------------------------------------
def _training_problem():
    """Data from a linear-Gaussian model; a learnable one starting from other weights, and a linear guide."""
    pyro.clear_param_store()
    truth = LinearGaussian(3, 2, scale=S0, weight=W0, bias=B0, learnable=False)
    data = truth.sample(256)
    model = LinearGaussian(3, 2, scale=S0, weight=0.2 * torch.randn(3, 2, dtype=DT), learnable=True)
    guide = LinearGaussianGuide(3, 2, dtype=DT)
    return model, guide, data


TRAINED = [
    pytest.param(lambda: ELBO(num_particles=2), id="elbo"),
    pytest.param(lambda: IWAE(num_particles=5), id="iwae"),
    pytest.param(lambda: IWAE(num_particles=5, estimator="dreg"), id="iwae-dreg"),
    pytest.param(lambda: Renyi(alpha=0.5, num_particles=5), id="renyi"),
    pytest.param(lambda: VarianceLoss(num_particles=4), id="variance"),
    pytest.param(lambda: LogVarianceLoss(num_particles=4), id="logvariance"),
    pytest.param(lambda: BetaELBO(beta=0.5, num_particles=2), id="beta"),
    pytest.param(lambda: GECO(tolerance=0.6, nu=0.1), id="geco"),
]


def _score(obj, model, guide, data, evals: int = 10) -> tuple[float, float]:
    """Mean and SE of what the objective drives down: its loss, or for GECO (whose loss moves with lambda)
    the batch constraint."""
    vals = []
    for _ in range(evals):
        loss = obj.loss(model, guide, data)
        vals.append(obj.metrics["constraint_batch"].item() if isinstance(obj, GECO) else loss)
    vals = torch.tensor(vals, dtype=DT)
    return vals.mean().item(), (vals.std() / math.sqrt(evals)).item()


def _assert_decreased(before, after, what):
    assert after[0] < before[0] - Z * math.hypot(before[1], after[1]), f"{what}: {before} -> {after}"


@pytest.mark.parametrize("make", TRAINED)
def test_training_decreases_the_loss_through_svi(make):
    model, guide, data = _training_problem()
    obj = make()
    before = _score(obj, model, guide, data)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=obj)
    for _ in range(60):
        assert math.isfinite(svi.step(data[torch.randint(0, data.shape[0], (64,))]))
    _assert_decreased(before, _score(obj, model, guide, data), f"SVI with {obj!r}")


@pytest.mark.parametrize("make", TRAINED)
def test_training_decreases_the_loss_through_trainer(make):
    model, guide, data = _training_problem()
    obj = make()
    before = _score(obj, model, guide, data)
    trainer = Trainer(model, guide, obj, lr=0.05, progress=False, check_every=50)
    history = trainer.fit(data, epochs=15, batch_size=64)
    assert len(history) == 15 and all(math.isfinite(r["train_loss"]) for r in history)
    _assert_decreased(before, _score(obj, model, guide, data), f"Trainer with {obj!r}")


def test_every_registered_objective_is_covered_by_the_exact_cases():
    # a new registry entry must come with exact cases: q = the posterior, or no latents (GECO: lambda * C there)
    # (TokenGECO: its loss is the NLL per token for a model without latents, tests/test_text.py::test_language_model_loss_is_its_log_likelihood_under_every_objective)
    exact = {type(p.values[0]()) for p in (*BOUNDS_AT_POSTERIOR, *NO_LATENT)} | {GECO, TokenGECO}
    missing = sorted(name for name, cls in OBJECTIVES.items() if not any(issubclass(c, cls) and c.estimate is cls.estimate for c in exact))
    assert not missing, f"registered objectives without an exact test case: {missing}"


# --- BetaELBO ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(beta=2.0, schedule="constant"), {0: 2.0, 5: 2.0, 1000: 2.0}),
        (dict(beta=2.0, schedule="linear", warmup_steps=10), {0: 0.0, 1: 0.2, 5: 1.0, 10: 2.0, 25: 2.0}),
        (dict(beta=1.0, schedule="cyclical", cycle_steps=10, ratio=0.5), {0: 0.0, 2: 0.4, 5: 1.0, 9: 1.0, 10: 0.0, 13: 0.6, 25: 1.0}),
        (dict(beta=2.0, schedule="logistic", warmup_steps=10), {0: 2.0 / (1 + math.exp(5.0)), 5: 1.0, 10: 2.0 / (1 + math.exp(-5.0))}),
    ],
    ids=["constant", "linear", "cyclical", "logistic"],
)
def test_beta_schedules(kwargs, expected):
    obj = BetaELBO(**kwargs)
    for step in range(max(expected) + 1):
        if step in expected:
            assert obj.current_beta == pytest.approx(expected[step]), step
        obj.step()
    restored = BetaELBO(**kwargs)
    restored.load_state_dict(obj.state_dict())
    assert restored.num_steps == obj.num_steps and restored.current_beta == obj.current_beta


def test_beta_elbo_steps_once_per_svi_step_and_logs_the_true_elbo():
    model = linear_gaussian()
    guide = diagonal_guide(model)
    beta = BetaELBO(beta=0.25, schedule="linear", warmup_steps=4, num_particles=3, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.SGD({"lr": 0.0}), loss=beta)  # lr 0: the parameters stay put
    for _ in range(2):
        svi.step(X0)
    assert beta.num_steps == 2 and beta.current_beta == pytest.approx(0.125)
    elbo = ELBO(num_particles=3, max_plate_nesting=1)
    pyro.set_rng_seed(11)
    loss = beta.loss(model, guide, X0)
    pyro.set_rng_seed(11)
    elbo_loss = elbo.loss(model, guide, X0)
    n = X0.shape[0]
    assert beta.metrics["elbo"].item() == pytest.approx(-elbo_loss / n, abs=EXACT)
    recon, kl = elbo.metrics["recon"].item(), elbo.metrics["kl"].item()
    assert loss == pytest.approx(-n * (recon - 0.125 * kl), abs=EXACT)
    assert beta.metrics["beta_t"].item() == 0.125 and beta.metrics["beta_t"].dtype == DT


def test_analytic_kl_is_the_closed_form_and_respects_scale():
    model = linear_gaussian()
    guide = diagonal_guide(model)
    loc, scale = guide.loc_scale(X0)
    exact_kl = 0.5 * (scale**2 + loc**2 - 1 - 2 * scale.log()).sum(-1)
    obj = ELBO(num_particles=2, analytic_kl=True, max_plate_nesting=1)
    obj.loss(model, guide, X0)
    assert obj.metrics["kl"].item() == pytest.approx(exact_kl.mean().item(), abs=EXACT)
    # poutine.scale multiplies every log-density, the closed-form KL included
    pyro.set_rng_seed(5)
    plain = obj.loss(model, guide, X0)
    pyro.set_rng_seed(5)
    scaled = obj.loss(poutine.scale(model, scale=0.3), poutine.scale(guide, scale=0.3), X0)
    assert scaled == pytest.approx(0.3 * plain, abs=EXACT)


# --- clear errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ELBO, BetaELBO, IWAE, Renyi, VarianceLoss, LogVarianceLoss, GECO])
def test_num_particles_must_be_positive(cls):
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="num_particles"):
            cls(num_particles=bad)


@pytest.mark.parametrize("cls", [VarianceLoss, LogVarianceLoss])
def test_variance_losses_need_two_particles(cls):
    with pytest.raises(ValueError, match="at least two samples"):
        cls(num_particles=1)
    cls(num_particles=2)


@pytest.mark.parametrize("make", [lambda: IWAE(num_particles=3), lambda: IWAE(num_particles=3, estimator="dreg"), lambda: Renyi(alpha=0.5, num_particles=3)])
def test_importance_weighted_bounds_reject_discrete_guides(make):
    model, guide, _, _ = _local_discrete()
    with pytest.raises(ValueError, match=r"\['c'\]"):
        make().loss(model, guide, XD)
    assert math.isfinite(VarianceLoss(num_particles=3).loss(model, guide, XD))  # the variance loss works there


def test_importance_weighted_bounds_reject_global_latents():
    model, guide, _, _ = _global_discrete()
    with pytest.raises(ValueError, match="global latents"):
        IWAE(num_particles=3).loss(model, guide, XD)


def test_unknown_objective_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        make_objective("iwea")
    for name in OBJECTIVES:
        assert repr(name) in str(err.value)
    assert isinstance(make_objective("iwae", num_particles=7), IWAE)


def test_bad_settings_are_rejected():
    for kwargs in (dict(tolerance=-0.1), dict(tolerance=float("nan")), dict(alpha=1.0), dict(nu=0.0), dict(lambda_init=0.0)):
        with pytest.raises(ValueError):
            GECO(**kwargs)
    with pytest.raises(ValueError, match="tolerance=-0.1"):
        GECO(tolerance=-0.1)
    with pytest.raises(ValueError, match="estimator"):
        IWAE(estimator="reinforce")
    with pytest.raises(ValueError, match="schedule"):
        BetaELBO(schedule="sigmoid")  # unknown (logistic is the name)
    with pytest.raises(ValueError, match="beta"):
        BetaELBO(beta=-1.0)


# --- GECO ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("multiplier_step", ["paper", "clamped"])
def test_geco_multiplier_enforces_a_binding_constraint(multiplier_step):
    """RE with tolerance kappa = 0.3 on 8-dimensional data of variance ~0.8 per dimension, generated with
    2 latent dimensions and noise 0.1: reachable (RE can go to ~0.01), binding (the KL minimum, q = prior,
    has RE ~0.8 >> kappa^2). lambda must rise while the constraint is violated, stay bounded, and leave the
    moving-average constraint at ~0 with the code neither collapsed nor unconstrained. The loop is the
    Trainer's protocol (differentiable_loss, optimiser step, objective step) without its bookkeeping."""
    truth = LinearGaussian(8, 2, scale=0.1, learnable=False, dtype=DT)
    data = truth.sample(512)
    model, guide = LinearGaussian(8, 2, scale=0.1, dtype=DT), LinearGaussianGuide(8, 2, dtype=DT)
    kappa2, nu, alpha = 0.3**2, 0.2, 0.98
    obj = GECO(tolerance=0.3, nu=nu, alpha=alpha, multiplier_step=multiplier_step)
    optim = torch.optim.Adam(params_of(model, guide), lr=0.02)
    lams, cmas = [], []
    for _ in range(800):
        optim.zero_grad()
        obj.differentiable_loss(model, guide, data[torch.randint(0, data.shape[0], (64,))]).backward()
        optim.step()
        obj.step()
        lams.append(obj.metrics["lambda"].item())
        cmas.append(obj.metrics["constraint"].item())
        # the update: log lambda moves by nu * C_ma (clamped: at most 1 - alpha per step)
        step = math.log(obj.lagrange_multiplier.item()) - math.log(lams[-1])
        rule = nu * cmas[-1] if multiplier_step == "paper" else max(alpha - 1, min(1 - alpha, nu * cmas[-1]))
        rule = min(math.log(1e6), max(math.log(1e-6), math.log(lams[-1]) + rule)) - math.log(lams[-1])  # lambda's bounds
        assert step == pytest.approx(rule, abs=1e-5)
    lams, cmas = torch.tensor(lams), torch.tensor(cmas)
    assert cmas[0] > 5 * kappa2  # violated at the start ...
    met = torch.nonzero(cmas <= 0)[0].item()
    assert met > 50 and (lams[1 : met + 1] >= lams[:met]).all()  # ... and lambda rises until it is met
    if multiplier_step == "paper":  # the unclamped rule overshoots (measured: lambda hits its 1e6 bound) but recovers
        assert cmas[-100:].abs().max() < kappa2 and lams[-1] < 1e3
        return
    assert lams.max() < 1e3  # no runaway multiplier
    tail = cmas[-100:]
    assert tail.abs().max() < 0.2 * kappa2, tail  # settled at the constraint: RMS error within 10% of kappa
    assert 1.0 < lams[-1] < 1e3 and obj.metrics["kl"] > 1.0  # binding: the code carries information


@pytest.mark.parametrize("multiplier_step", ["paper", "clamped"])
def test_geco_multiplier_follows_the_papers_rule_by_default(multiplier_step):
    """A constant constraint (no latents, a fixed mean): C_ma = C every step, so after n steps the paper's rule gives
    lambda_0 exp(n nu C) exactly, whatever its size, and the clamp lambda_0 exp(n min(nu C, 1 - alpha))."""
    model, guide = _no_latent(False)
    x = torch.tensor([0.3, 1.2, -0.4, 0.9, 2.0], dtype=DT)
    kwargs = {} if multiplier_step == "paper" else {"multiplier_step": "clamped"}
    obj = GECO(tolerance=0.5, lambda_init=3.0, nu=0.2, alpha=0.99, **kwargs)
    for _ in range(4):
        obj.loss_and_grads(model, guide, x)
    c = (((x - 0.2) ** 2).mean() - 0.25).item()
    assert 0.2 * c > 0.01  # the clamp binds here: the two rules differ
    step = 0.2 * c if multiplier_step == "paper" else 0.01
    assert obj.lagrange_multiplier.item() == pytest.approx(3.0 * math.exp(4 * step), rel=1e-6)  # log lambda is float32


def test_geco_passes_the_base_arguments_through():
    obj = GECO(max_plate_nesting=1, data_plate="data", vectorize_particles=False, tolerance=0.2)
    assert obj.max_plate_nesting == 2 and obj.data_plate == "data" and obj.particle_mode is False
    with pytest.raises(ValueError, match="multiplier_step"):
        GECO(multiplier_step="sign")


def test_geco_state_dict_round_trip():
    model = linear_gaussian()
    guide = diagonal_guide(model)
    obj = GECO(tolerance=0.2, nu=0.5)
    svi = SVI(model, guide, pyro.optim.SGD({"lr": 0.0}), loss=obj)
    for _ in range(5):
        svi.step(X0)
    state = obj.state_dict()
    restored = GECO(tolerance=0.2, nu=0.5)
    restored.load_state_dict(state)
    assert restored.lagrange_multiplier.item() == obj.lagrange_multiplier.item() != 1.0
    assert restored.c_ma.item() == obj.c_ma.item()
    restored.loss(model, guide, X0)  # guesses max_plate_nesting (RNG) before the comparison below
    pyro.set_rng_seed(3)
    a = obj.loss(model, guide, X0)
    pyro.set_rng_seed(3)
    b = restored.loss(model, guide, X0)
    assert a == b
    obj.step(), restored.step()
    assert restored.lagrange_multiplier.item() == obj.lagrange_multiplier.item()
    fresh = GECO(tolerance=0.2)
    fresh.load_state_dict(GECO(tolerance=0.2).state_dict())  # no step yet: c_ma is None
    assert fresh.c_ma is None and fresh.lagrange_multiplier.item() == pytest.approx(1.0)


def test_guessing_the_plate_nesting_draws_no_random_numbers():
    from pyrovae.guides import GaussianEncoder
    from pyrovae.models import VAE

    model, guide = VAE((6,), (2,), hidden=((8,),)), GaussianEncoder((6,), (2,), hidden=((8,),))
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    losses = []
    for nesting in (float("inf"), 1):  # guessed on the first call, or given
        pyro.set_rng_seed(3)
        objective = IWAE(num_particles=4, max_plate_nesting=nesting)
        losses.append(objective.loss(model, guide, x))
    assert losses[0] == losses[1]


# --- second pass: every estimator right in every corner ---------------------------------------------------------
def _enumerated_geco_and_beta(lam: float, beta: float, tol: float = 0.5):
    """E_q[KL + lam C] (GECO with RE) and E_q[log p(x|c)] - beta KL (BetaELBO) for ``_local_discrete``, by
    enumerating c in {0, 1} per datum."""
    mu, a, b = pyro.param("mu"), pyro.param("a"), pyro.param("b")
    q1 = torch.sigmoid(a * XD + b)
    geco = beta_elbo = 0.0
    for c, qc in ((0, 1 - q1), (1, q1)):
        kl = qc.log() - math.log(0.4 if c else 0.6)
        re = (XD - mu[c]) ** 2 - tol**2
        geco = geco + (qc * (kl + lam * re)).sum()
        beta_elbo = beta_elbo + (qc * (dist.Normal(mu[c], 1.0).log_prob(XD) - beta * kl)).sum()
    return geco, beta_elbo


def test_geco_and_beta_elbo_train_a_discrete_guide_by_the_score_function():
    """Before: GECO gave the Bernoulli guide no score-function term, so d/d(a, b) was ~0 against an exact 0.0124
    (58 SE off). Now the gradient of L / (1 + lambda) matches enumeration, for the model and the guide."""
    model, guide, _, names = _local_discrete()
    lam = 2.0
    geco = GECO(tolerance=0.5, lambda_init=lam, num_particles=32)
    beta = BetaELBO(beta=0.5, num_particles=32)
    geco.loss(model, guide, XD)
    params = [pyro.param(n).unconstrained() for n in names]
    exact_geco, exact_beta = _enumerated_geco_and_beta(lam, 0.5)
    for obj, target in ((geco, exact_geco / (1 + lam)), (beta, -exact_beta)):
        exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(target, params, retain_graph=True)])
        assert_within_se(grad_draws(obj, model, guide, XD, params, draws=120), exact, repr(obj))


_PRIOR2 = torch.tensor([0.4, 0.7], dtype=DT)


def _two_bit_discrete():
    """c_b in {0, 1}^2 per datum (one event dimension, so free bits apply per bit), x_b ~ N(c_b . mu, 1)."""

    def model(x):
        mu = pyro.param("mu", torch.tensor([0.5, -1.0], dtype=DT))
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(_PRIOR2).to_event(1))
            pyro.sample("x", dist.Normal((c * mu).sum(-1), 1.0), obs=x)

    def guide(x):
        a = pyro.param("a", torch.tensor([0.7, -0.3], dtype=DT))
        b = pyro.param("b", torch.tensor([-0.2, 0.5], dtype=DT))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(logits=a * x[:, None] + b).to_event(1))

    return model, guide


def test_free_bits_on_discrete_latents_match_enumeration():
    """AnnealedELBO with free bits on a Bernoulli guide (score function for the reconstruction, the closed-form KL per
    bit floored at lambda): the gradient of sum_b E_q[log p(x_b|c)] - beta sum_j max(lambda B, sum_b KL_bj), by
    enumerating the 4 codes per datum. lambda sits between the two bits' mean KLs (0.097 and 0.040 at the start), so
    one bit is floored (no KL gradient) and one is not."""
    from torch.distributions import kl_divergence

    model, guide = _two_bit_discrete()
    lam, beta = 0.06, 0.5
    guide(XD), model(XD)
    mu, a, b = (pyro.param(n) for n in ("mu", "a", "b"))
    q = dist.Bernoulli(logits=a * XD[:, None] + b)
    recon = 0.0
    for code in ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)):
        c = torch.tensor(code, dtype=DT)
        recon = recon + (q.log_prob(c.expand(len(XD), 2)).sum(-1).exp() * dist.Normal((c * mu).sum(), 1.0).log_prob(XD)).sum()
    kl = kl_divergence(q, dist.Bernoulli(_PRIOR2.expand(len(XD), 2)))  # [B, 2]
    assert kl.mean(0)[0] > lam > kl.mean(0)[1]
    floored = torch.where(kl.mean(0) > lam, kl.sum(0), torch.full((2,), lam * len(XD), dtype=DT))
    params = [p.unconstrained() for p in (mu, a, b)]
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-(recon - beta * floored.sum()), params)])
    obj = AnnealedELBO(beta=beta, schedule="constant", free_bits=lam, num_particles=32)
    assert_within_se(grad_draws(obj, model, guide, XD, params, draws=120), exact, repr(obj))


def _global_gaussian(shift: float, widen: float = 1.0):
    """mu ~ N(0, 1) outside the data plate, x_b ~ N(mu, 1) inside it: the posterior is N(sum x / (1 + B), 1 / (1 + B)).
    The guide is that posterior with its mean moved by the parameter ``shift`` and its scale times ``widen``:
    d ELBO / d shift = -(1 + B) shift exactly."""
    post_loc = XD.sum() / (1 + XD.shape[0])
    post_scale = (1.0 / (1 + XD.shape[0])) ** 0.5

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=DT), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        s = pyro.param("shift", torch.tensor(shift, dtype=DT))
        pyro.sample("mu", dist.Normal(post_loc + s, widen * post_scale))

    return model, guide


def test_variance_losses_with_a_global_latent_are_exact():
    """Before: at the exact posterior VarianceLoss reported 0.857 (per-datum variances of a shared latent), and
    LogVarianceLoss gave the global site a zero-mean gradient (-0.04 +- 0.03 against an exact 6). Now the loss is
    the variance of the whole batch's log weight: zero at the posterior; and the guide's gradient is -2 (variance)
    and -1 (log-variance, VarGrad's 1/2) times d ELBO / d shift."""
    model, guide = _global_gaussian(0.0)
    for obj in (VarianceLoss(num_particles=6), LogVarianceLoss(num_particles=6)):
        for _ in range(3):
            assert abs(obj.loss(model, guide, XD)) < 1e-20
        assert obj.metrics["variance"].abs().item() < 1e-20
    pyro.clear_param_store()
    shift = 0.4
    model, guide = _global_gaussian(shift, widen=1.3)
    exact_elbo_grad = -(1 + XD.shape[0]) * shift
    ELBO().loss(model, guide, XD)
    params = [pyro.param("shift").unconstrained()]
    assert_within_se(grad_draws(ELBO(num_particles=8), model, guide, XD, params, draws=150), torch.tensor([-exact_elbo_grad], dtype=DT), "ELBO")
    for obj, factor in ((VarianceLoss(num_particles=8), 2.0), (LogVarianceLoss(num_particles=8), 1.0)):
        draws = grad_draws(obj, model, guide, XD, params, draws=300)
        assert_within_se(draws, torch.tensor([-factor * exact_elbo_grad], dtype=DT), repr(obj))


def test_log_variance_guide_gradient_is_minus_the_elbo_gradient():
    """VarGrad (Richter et al. 2020, eq. 16): with the 1/2, the log-variance loss's gradient for the guide is
    -grad_phi ELBO in expectation (before: twice that). Exact on the linear-Gaussian model."""
    model = linear_gaussian(learnable=False)
    guide = diagonal_guide(model)
    params = params_of(guide)
    exact_elbo = model.elbo(X0, *guide.loc_scale(X0)).sum()
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-exact_elbo, params)])
    obj = LogVarianceLoss(num_particles=8)
    assert_within_se(grad_draws(obj, model, guide, X0, params, draws=200), exact, repr(obj))
    lw = obj.detached_log_weights(model, guide, X0)
    assert obj.loss(model, guide, X0) > 0
    pyro.set_rng_seed(5)
    value = obj.loss(model, guide, X0)
    pyro.set_rng_seed(5)
    assert VarianceLoss(num_particles=8).loss(model, guide, X0) == pytest.approx(2 * value, rel=1e-12)
    assert lw.num_particles == 8


def test_analytic_kl_is_used_only_where_exact():
    """The library's two-layer VAE with its bottom-up guide: q draws z1 | x then z2 | z1, the model z2 then
    z1 | z2. Closed-form KL for z1 would integrate z1 with z2 held fixed although z2 was drawn from q(z2 | z1):
    before, a bias of 0.54 nats. Now z1 keeps its Monte-Carlo term (z2, whose prior has no parents, is closed
    form) and the estimate agrees with the Monte-Carlo ELBO; a one-layer model takes every site in closed form."""
    from pyrovae.guides import GaussianEncoder
    from pyrovae.models import VAE

    torch.manual_seed(0)
    x = torch.rand(40, 12, dtype=torch.float32)
    for z_dims, sites in (((4, 2), ("z2",)), ((3,), None)):
        pyro.clear_param_store()
        model = VAE((12,), z_dims, hidden=[(16,)] * len(z_dims), likelihood="gaussian", scale=0.5)
        guide = GaussianEncoder((12,), z_dims, hidden=[(16,)] * len(z_dims))
        analytic, mc = ELBO(num_particles=16, analytic_kl=True), ELBO(num_particles=16)
        a = torch.tensor([-analytic.loss(model, guide, x) for _ in range(40)], dtype=DT)
        m = torch.tensor([-mc.loss(model, guide, x) for _ in range(40)], dtype=DT)
        latent = [n for n in analytic.log_weights(model, guide, x).pairs[0].guide_trace.nodes if n.startswith("z")]
        assert analytic.analytic_sites == (sites or tuple(latent))
        diff = a.mean() - m.mean()
        assert abs(diff) < Z * math.sqrt(a.var() / 40 + m.var() / 40), (z_dims, a.mean(), m.mean())
        if sites is None:
            assert a.var() < m.var()  # closed form removes the KL's sampling noise


def _exact_iwae_by_enumeration(k: int) -> torch.Tensor:
    """E_q[log (1/K) sum_k w_k] summed over the data of ``_local_discrete``, enumerating the 2^K codes per datum."""
    mu, a, b = pyro.param("mu"), pyro.param("a"), pyro.param("b")
    q1 = torch.sigmoid(a * XD + b)
    log_w = torch.stack([math.log(0.6) + dist.Normal(mu[0], 1.0).log_prob(XD) - (1 - q1).log(), math.log(0.4) + dist.Normal(mu[1], 1.0).log_prob(XD) - q1.log()])
    log_q = torch.stack([(1 - q1).log(), q1.log()])
    total = 0.0
    for code in range(2**k):
        bits = [(code >> i) & 1 for i in range(k)]
        total = total + (sum(log_q[c] for c in bits).exp() * (torch.logsumexp(torch.stack([log_w[c] for c in bits]), 0) - math.log(k))).sum()
    return total


@pytest.mark.parametrize("estimator", ["vimco", "score"])
def test_iwae_trains_discrete_latents_with_vimco(estimator):
    """IWAE(K=4) on a Bernoulli latent: the VIMCO and plain score-function gradients match the gradient of the
    bound computed by enumerating all 2^4 codes per datum, and VIMCO's variance is far below the plain one's."""
    model, guide, _, names = _local_discrete()
    obj = IWAE(num_particles=4, estimator=estimator)
    obj.loss(model, guide, XD)
    params = [pyro.param(n).unconstrained() for n in names]
    exact_bound = _exact_iwae_by_enumeration(4)
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-exact_bound, params)])
    draws = grad_draws(obj, model, guide, XD, params, draws=400 if estimator == "vimco" else 1500, seed=10)
    assert_within_se(draws, exact, repr(obj), power=estimator == "vimco")
    values = torch.tensor([-obj.loss(model, guide, XD) for _ in range(100)], dtype=DT)
    assert abs(values.mean() - exact_bound.item()) < Z * values.std() / 10
    if estimator == "vimco":
        plain = grad_draws(IWAE(num_particles=4, estimator="score"), model, guide, XD, params, draws=400, seed=10)
        guide_cols = slice(2, None)  # mu has 2 entries, then a and b
        assert draws[:, guide_cols].var(0).sum() < 0.5 * plain[:, guide_cols].var(0).sum()


def test_renyi_dreg_agrees_with_the_standard_estimator():
    """Renyi's doubly reparameterised gradient, sum_k (alpha v_k + (1 - alpha) v_k^2) (the IWAE form at alpha = 0),
    has the standard pathwise estimator's mean (paired on the same samples) and a lower guide variance."""
    model = linear_gaussian()
    guide = diagonal_guide(model)
    params = params_of(model, guide)
    n_model = sum(p.numel() for p in params_of(model))
    standard = grad_draws(Renyi(alpha=0.5, num_particles=20), model, guide, X0, params, 100, seed=100)
    dreg = grad_draws(Renyi(alpha=0.5, num_particles=20, estimator="dreg"), model, guide, X0, params, 100, seed=100)
    torch.testing.assert_close(dreg[:, :n_model], standard[:, :n_model], rtol=1e-9, atol=EXACT)
    diff = standard[:, n_model:] - dreg[:, n_model:]
    assert_within_se(diff, torch.zeros(diff.shape[1], dtype=DT), "standard - dreg Renyi guide gradient", power=False)
    assert dreg[:, n_model:].var(0).sum() < 0.5 * standard[:, n_model:].var(0).sum()


# --- the data plate, found from the program ----------------------------------------------------------------------
XB = torch.tensor([[0.9, -0.4, 0.6], [-0.7, 0.5, -0.3], [1.5, 0.8, -1.1], [0.2, -1.0, 0.9], [0.1, 0.3, -0.2], [1.1, -0.6, 0.4]], dtype=DT)


def _plate_program(plate: str = "batch", sized: bool = True):
    """A linear-Gaussian program whose data plate is called ``plate`` (and unsized, ``pyro.plate("data")``, when
    ``sized`` is False), with a second plate over the 3 coordinates inside it."""
    def model(x):
        w = pyro.param("w", torch.tensor([1.0, -0.5, 0.3], dtype=DT))
        with pyro.plate(plate, *((x.shape[0],) if sized else ()), dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1, dtype=DT), 1.0))
            with pyro.plate("coords", 3, dim=-1):
                pyro.sample("x", dist.Normal(z * w, 0.7), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.1, dtype=DT))
        with pyro.plate(plate, *((x.shape[0],) if sized else ()), dim=-2):
            pyro.sample("z", dist.Normal(loc + x.mean(-1, keepdim=True), 0.8))

    return model, guide


@pytest.mark.parametrize("plate,sized", [("batch", True), ("data", False)], ids=["named-batch", "unsized-data"])
def test_the_data_plate_is_found_from_the_program(plate, sized):
    """Before: with pyro.plate('batch', N) IWAE folded the batch into one data point (4585 against 4359), and an
    unsized pyro.plate('data') failed with 'zeros: Dimension size must be non-negative'. Now both give the
    per-datum bound: the batch's loss is the sum of each datum's loss on the same draws."""
    import pyrovae.evaluate as evaluate

    model, guide = _plate_program(plate, sized)
    obj = IWAE(num_particles=6)
    pyro.set_rng_seed(1)
    lw = obj.log_weights(model, guide, XB)
    assert lw.log_w.shape == (6, XB.shape[0])
    pyro.set_rng_seed(1)
    batch = obj.loss(model, guide, XB)
    assert batch == pytest.approx(-(torch.logsumexp(lw.log_w, 0) - math.log(6)).sum().item(), abs=EXACT)
    named = IWAE(num_particles=6, data_plate=plate)
    pyro.set_rng_seed(1)
    assert named.loss(model, guide, XB) == pytest.approx(batch, abs=EXACT)
    ll = evaluate.log_likelihood(model, guide, XB.repeat(3, 1), num_samples=50, batch_size=4)
    assert ll.values.shape == (18,)


def test_a_batch_without_a_data_plate_is_refused_not_folded():
    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1, dtype=DT), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(z * torch.ones_like(x), 1.0).to_event(2), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1, dtype=DT), 1.0).to_event(2))

    for obj in (IWAE(num_particles=3), ELBO()):
        with pytest.raises(ValueError, match="no plate.*6 rows.*data_plate=False"):
            obj.loss(model, guide, XB)
    lw = IWAE(num_particles=3, data_plate=False).log_weights(model, guide, XB)
    assert lw.log_w.shape == (3, 1)
    with pytest.raises(ValueError, match="data_plate='nope'"):
        IWAE(num_particles=3, data_plate="nope").loss(model, guide, XB)


def test_ambiguous_data_plates_are_refused():
    def model(x):
        with pyro.plate("rows", x.shape[0], dim=-2), pyro.plate("cols", x.shape[0], dim=-1):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x[:, : x.shape[0]])

    x = torch.randn(3, 3, dtype=DT)
    with pytest.raises(ValueError, match="cannot tell which plate.*data_plate=NAME"):
        IWAE(num_particles=2).loss(model, lambda x: None, x)
    assert IWAE(num_particles=2, data_plate="rows").log_weights(model, lambda x: None, x).log_w.shape == (2, 3)


# --- programs written in the style of Pyro's examples ------------------------------------------------------------
def _masked_cvae_style():
    """In the style of Pyro's examples/cvae: an unsized pyro.plate('data'), boolean-mask indexing of the decoder's
    output (which a particle plate would widen), a .mask() on a site and a poutine.mask around another."""
    dec = torch.nn.Linear(2, 6).double()
    enc = torch.nn.Linear(6, 4).double()

    def model(xs, ys):
        pyro.module("dec", dec)
        batch = xs.shape[0]
        with pyro.plate("data"):
            z = pyro.sample("z", dist.Normal(xs.new_zeros(batch, 2), 1.0).to_event(1))
            loc = dec(z)
            hidden = (xs == -1).view(-1, 6)
            mask_loc = loc[hidden].view(batch, -1)
            mask_ys = ys[hidden].view(batch, -1)
            pyro.sample("y", dist.Normal(mask_loc, 0.5).to_event(1), obs=mask_ys)
            with poutine.mask(mask=xs[:, 0] > -5):
                pyro.sample("extra", dist.Normal(loc[..., 0], 1.0).mask(xs[:, 1] > -5), obs=xs[:, 0])

    def guide(xs, ys):
        pyro.module("enc", enc)
        xc = xs.clone()
        xc[xs == -1] = ys[xs == -1]
        with pyro.plate("data"):
            loc, log_scale = enc(xc).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    torch.manual_seed(0)
    ys = torch.randn(8, 6, dtype=DT)
    xs = ys.clone()
    xs[:, 3:] = -1  # the hidden half: predict ys there from the visible half
    return model, guide, (xs, ys)


def test_programs_in_the_style_of_pyros_examples_run_under_every_objective():
    """Before: IndexError ('The shape of the mask [8, 6] ... does not match ... [1, 8, 6]') under the library's
    ELBO and IWAE, because a particle dimension was always added. Now ELBO(1) equals Trace_ELBO on the same draws,
    and K > 1 particles run one at a time (with a warning) with the same log weights as K separate runs."""
    model, guide, args = _masked_cvae_style()
    pyro.set_rng_seed(3)
    ref = Trace_ELBO().differentiable_loss(model, guide, *args)
    pyro.set_rng_seed(3)
    ours = ELBO().differentiable_loss(model, guide, *args)
    assert ours.item() == pytest.approx(ref.item(), abs=EXACT)
    pyro.set_rng_seed(4)
    singles = torch.cat([ELBO().log_weights(model, guide, *args).log_w for _ in range(5)])
    obj = IWAE(num_particles=5)
    with pytest.warns(UserWarning, match="one at a time"):
        assert obj.log_weights(model, guide, *args).log_w.shape == (5, 8)
    assert obj.particle_mode is False
    for loop in (obj, IWAE(num_particles=5, vectorize_particles=False)):
        pyro.set_rng_seed(4)
        torch.testing.assert_close(loop.log_weights(model, guide, *args).log_w, singles, rtol=0, atol=EXACT)
    with pytest.raises(IndexError):
        IWAE(num_particles=5, vectorize_particles=True).loss(model, guide, *args)
    for make in (lambda: IWAE(num_particles=3, vectorize_particles=False), lambda: IWAE(num_particles=3, estimator="dreg", vectorize_particles=False),
                 lambda: Renyi(num_particles=3, vectorize_particles=False), lambda: ELBO(num_particles=3, analytic_kl=True, vectorize_particles=False),
                 lambda: BetaELBO(beta=0.5, num_particles=2, vectorize_particles=False), lambda: VarianceLoss(num_particles=3, vectorize_particles=False),
                 lambda: LogVarianceLoss(num_particles=3, vectorize_particles=False), lambda: GECO(num_particles=2, obs_site="y", vectorize_particles=False)):
        obj = make()
        loss = obj.differentiable_loss(model, guide, *args)
        assert torch.isfinite(loss), repr(obj)
        loss.backward()


def test_a_subsampled_plate_matches_trace_elbo():
    def model(x):
        mu = pyro.param("mu", torch.tensor(0.3, dtype=DT))
        with pyro.plate("data", 100, subsample=torch.arange(x.shape[0])):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", 100, subsample=torch.arange(x.shape[0])):
            pyro.sample("z", dist.Normal(x, 0.6))

    x = XD
    pyro.set_rng_seed(2)
    ref = Trace_ELBO().differentiable_loss(model, guide, x)
    pyro.set_rng_seed(2)
    assert ELBO().differentiable_loss(model, guide, x).item() == pytest.approx(ref.item(), abs=EXACT)
    assert ELBO().log_weights(model, guide, x).log_w.shape == (1, x.shape[0])


def test_cla_uses_the_true_labels_as_in_the_paper():
    """CLA(target='label'): cross-entropy of the classifier on g(z) against the true label, read from model(x, y)
    as class indices or one-hot; target='predicted' keeps the classifier's class for the data (no labels)."""
    import torch.nn.functional as F

    from pyrovae.objectives import CLA

    clf = torch.nn.Linear(3, 4).double()
    x = XB[:4]
    x_hat = x[None] + 0.1 * torch.randn(2, 4, 3, dtype=DT)
    labels = torch.tensor([0, 3, 1, 1])
    cla = CLA(0.1, classifier=clf)
    expect = F.cross_entropy(clf(x_hat.reshape(-1, 3)), labels.repeat(2), reduction="none").reshape(2, 4) - 0.1
    torch.testing.assert_close(cla.evaluate(x, x_hat, (x, labels)), expect)
    torch.testing.assert_close(cla.evaluate(x, x_hat, (x, F.one_hot(labels, 4))), expect)
    predicted = clf(x).argmax(-1).repeat(2)
    expect_pred = F.cross_entropy(clf(x_hat.reshape(-1, 3)), predicted, reduction="none").reshape(2, 4) - 0.1
    torch.testing.assert_close(CLA(0.1, classifier=clf, target="predicted").evaluate(x, x_hat, (x,)), expect_pred)
    with pytest.raises(ValueError, match="target='predicted'"):
        cla.evaluate(x, x_hat, (x,))

    def model(x, y):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    def guide(x, y):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 0.3).to_event(1))

    obj = GECO("CLA", tolerance=0.1, classifier=clf)
    obj.loss(model, guide, x, labels)
    assert torch.isfinite(obj.metrics["constraint"])
