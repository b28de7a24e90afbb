"""Programs from Pyro's own ELBO tests (tests/infer/test_gradient.py, test_valid_models.py), written anew, run
under pyrovae's objectives with exact expected gradients.

The score-function cases use ``fakes.NonreparameterizedNormal``, a Normal whose sampler is not
reparameterised, so that the exact gradient is the closed form of the Gaussian ELBO while the estimator is the
score function. Tolerances are standard errors of the mean over independent runs.
"""
from __future__ import annotations

import itertools
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.testing.fakes import NonreparameterizedNormal
from pyro.infer import Trace_ELBO

from pyrovae.objectives import ELBO, IWAE, BetaELBO, Renyi, VarianceLoss
from pyrovae.objectives.sequence import AnnealedELBO

DT = torch.float64
Z = 5.0  # standard errors allowed between a Monte-Carlo mean and its exact value


def param_grads(objective, model, guide, *args) -> dict:
    """One gradient of ``objective`` at freshly made params (the param store cleared first)."""
    pyro.clear_param_store()
    objective.loss_and_grads(model, guide, *args)
    return {name: p.grad.detach().clone() for name, p in pyro.get_param_store().named_parameters()}


def gradient_runs(make, model, guide, names, runs: int, *args) -> torch.Tensor:
    """``[runs, n]``: the flattened gradients of ``runs`` independent estimates."""
    rows = []
    for _ in range(runs):
        g = param_grads(make(), model, guide, *args)
        rows.append(torch.cat([g[n].reshape(-1) for n in names]))
    return torch.stack(rows)


def assert_unbiased(draws: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    bad = (mean - exact).abs() > Z * se + 1e-9
    assert not bad.any(), f"{what}: mean {mean.tolist()} vs exact {exact.tolist()}, SE {se.tolist()}"
    assert Z * se.max() < 0.5 * exact.abs().max(), f"{what}: SE {se.max().item()} too large to test anything"


# --- test_subsample_gradient: poutine.scale and a subsampled data plate ----------------------------------------
DATA = torch.tensor([-0.5, 2.0], dtype=DT)


def _subsample_program(reparameterized: bool, subsample: bool, scale: float):
    Normal = dist.Normal if reparameterized else NonreparameterizedNormal
    size = 1 if subsample else None

    def model():
        with pyro.plate("data", len(DATA), subsample_size=size) as ind:
            z = pyro.sample("z", Normal(torch.zeros(len(ind), dtype=DT), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=DATA[ind])

    def guide():
        s = pyro.param("scale", lambda: torch.tensor([1.0], dtype=DT))
        loc = pyro.param("loc", lambda: torch.zeros(len(DATA), dtype=DT))
        with pyro.plate("data", len(DATA), subsample_size=size) as ind:
            pyro.sample("z", Normal(loc[ind], s))

    if scale != 1.0:
        model, guide = poutine.scale(model, scale=scale), poutine.scale(guide, scale=scale)
    return model, guide


ELBO_FAMILY = [
    pytest.param(lambda: ELBO(num_particles=50), id="elbo"),
    pytest.param(lambda: ELBO(num_particles=50, analytic_kl=True), id="elbo-analytic"),
    pytest.param(lambda: BetaELBO(beta=1.0, num_particles=50), id="beta-1"),
    pytest.param(lambda: AnnealedELBO(beta=1.0, schedule="constant", num_particles=50), id="annealed-1"),
]


@pytest.mark.parametrize("make", ELBO_FAMILY)
@pytest.mark.parametrize("scale", [1.0, 10.0], ids=["unscaled", "scale10"])
@pytest.mark.parametrize("subsample", [False, True], ids=["full", "subsample"])
@pytest.mark.parametrize("reparameterized", [True, False], ids=["reparam", "nonreparam"])
def test_subsample_gradient(make, scale, subsample, reparameterized):
    """-dELBO/dloc = s (-x) = s [0.5, -2] and -dELBO/dscale = s 2 at loc 0, scale 1 (Pyro's test_subsample_gradient).
    Before: the score-function estimate counted the scale twice (s^2 [0.5, -2], [49.4, -199.9] at s = 10)."""
    model, guide = _subsample_program(reparameterized, subsample, scale)
    draws = gradient_runs(make, model, guide, ["loc", "scale"], 400 if subsample else 60)  # which datum: most of the spread
    exact = scale * torch.tensor([0.5, -2.0, 2.0], dtype=DT)
    assert_unbiased(draws, exact, f"scale={scale} subsample={subsample} reparam={reparameterized}")


# --- test_plate: a second plate beside the data plate ------------------------------------------------------------
def _two_plate_program(size: int):
    Normal = NonreparameterizedNormal

    def model():
        rows, data = pyro.plate("rows", size, dim=-2), pyro.plate("data", len(DATA), dim=-1)
        pyro.sample("nuisance_a", Normal(torch.tensor(0.0, dtype=DT), 1.0))
        with rows, data:
            z = pyro.sample("z", Normal(torch.tensor(0.0, dtype=DT), 1.0))
        pyro.sample("nuisance_b", Normal(torch.tensor(2.0, dtype=DT), 3.0))
        with data, rows:
            pyro.sample("x", dist.Normal(z, 1.0), obs=DATA)
        pyro.sample("nuisance_c", Normal(torch.tensor(4.0, dtype=DT), 5.0))

    def guide():
        loc = pyro.param("loc", torch.zeros(len(DATA), dtype=DT))
        s = pyro.param("scale", torch.tensor([1.0], dtype=DT))
        rows, data = pyro.plate("rows", size, dim=-2), pyro.plate("data", len(DATA), dim=-1)
        pyro.sample("nuisance_c", Normal(torch.tensor(4.0, dtype=DT), 5.0))
        with rows, data:
            pyro.sample("z", Normal(loc, s))
        pyro.sample("nuisance_b", Normal(torch.tensor(2.0, dtype=DT), 3.0))
        pyro.sample("nuisance_a", Normal(torch.tensor(0.0, dtype=DT), 1.0))

    return model, guide


def test_a_second_plate_is_rao_blackwellised_like_trace_elbo():
    """Each z[r, b] is weighted by its own terms, not by the whole datum's sum over the 2,000 rows. Before: spread
    676-2532 (per row) against Trace_ELBO's 0.006-0.03 on Pyro's 200,000-row test."""
    size, runs = 2000, 12
    model, guide = _two_plate_program(size)
    names = ["loc", "scale"]
    ours = gradient_runs(lambda: ELBO(), model, guide, names, runs) / size
    pyros = gradient_runs(lambda: Trace_ELBO(max_plate_nesting=2), model, guide, names, runs) / size
    exact = torch.tensor([0.5, -2.0, 2.0], dtype=DT)
    assert_unbiased(ours, exact, "ELBO with a second plate")
    ratio = ours.std(0) / pyros.std(0)
    assert (ratio < 3.0).all(), f"spread against Trace_ELBO's: {ratio.tolist()}"


# --- a site outside the data plate that depends on local discrete latents ------------------------------------
Y = torch.tensor([3.0], dtype=DT)
X3 = torch.tensor([0.3, -0.4, 1.1], dtype=DT)
LOGITS = torch.tensor([0.2, -0.3, 0.5], dtype=DT)


def _global_observation_of_local_latents(keepdim: bool = True):
    def model():
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.5, dtype=DT)))
            pyro.sample("x", dist.Normal(z, 1.0), obs=X3)
        total = z.sum(-1, keepdim=True) if keepdim else z.sum(-1)
        pyro.sample("y", dist.Normal(total, 0.5), obs=Y)

    def guide():
        logits = pyro.param("logits", LOGITS.clone())
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Bernoulli(logits=logits))

    return model, guide


def _enumerated_gradient() -> torch.Tensor:
    logits = LOGITS.clone().requires_grad_()
    q = dist.Bernoulli(logits=logits)
    elbo = 0.0
    for values in itertools.product([0.0, 1.0], repeat=3):
        z = torch.tensor(values, dtype=DT)
        log_q = q.log_prob(z).sum()
        log_p = dist.Bernoulli(torch.tensor(0.5, dtype=DT)).log_prob(z).sum() + dist.Normal(z.sum(), 0.5).log_prob(Y[0])
        log_p = log_p + dist.Normal(z, 1.0).log_prob(X3).sum()
        elbo = elbo + log_q.exp() * (log_p - log_q)
    (grad,) = torch.autograd.grad(-elbo, logits)
    return grad


@pytest.mark.parametrize("make", [lambda: ELBO(num_particles=40), lambda: BetaELBO(beta=1.0, num_particles=40)], ids=["elbo", "beta-1"])
def test_a_global_observation_of_local_discrete_latents(make):
    """y ~ N(sum_b z_b, 0.5) outside the data plate: each z_b's score is weighted by y's term too. Before:
    [-0.136, -0.030, -0.303] against the exact [-1.732, -1.627, -1.900] on the issue's instance."""
    model, guide = _global_observation_of_local_latents()
    draws = gradient_runs(make, model, guide, ["logits"], 100)
    assert_unbiased(draws, _enumerated_gradient(), "global observation of local latents")


def test_a_reduced_plate_dimension_is_refused_or_run_one_particle_at_a_time():
    """``z.sum(-1)`` under vectorised particles moves the particle dimension: refused with the site's name, and
    the default particle mode runs the particles one at a time instead (with a warning), exactly."""
    model, guide = _global_observation_of_local_latents(keepdim=False)
    with pytest.raises(ValueError, match="site 'y'.*keep reduced"):
        ELBO(num_particles=4, vectorize_particles=True).loss(model, guide)
    with pytest.warns(UserWarning, match="one at a time"):
        ELBO(num_particles=4).loss(model, guide)
    draws = gradient_runs(lambda: ELBO(num_particles=20, vectorize_particles=False), model, guide, ["logits"], 60)
    assert_unbiased(draws, _enumerated_gradient(), "one particle at a time")


@pytest.mark.parametrize("make", [lambda: IWAE(num_particles=4, estimator="vimco"), lambda: Renyi(alpha=0.5, num_particles=4, estimator="vimco")], ids=["iwae", "renyi"])
def test_per_datum_bounds_refuse_a_global_observation_of_local_latents(make):
    model, guide = _global_observation_of_local_latents()
    with pytest.raises(ValueError, match="'y'.*outside the data plate.*depends on the latents"):
        make().loss(model, guide)


# --- test_valid_models: what Pyro's ELBOs accept ---------------------------------------------------------------
def test_no_trainable_parameter_returns_the_loss():
    """Before: ``loss_and_grads`` crashed in backward() (16 cases of Pyro's test_valid_models)."""

    def model():
        pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=DT), 1.0))

    def guide():
        pyro.sample("z", dist.Normal(torch.tensor(0.5, dtype=DT), 1.0))

    for objective in (ELBO(), ELBO(num_particles=3), IWAE(num_particles=3), VarianceLoss(num_particles=3)):
        loss = objective.loss_and_grads(model, guide)
        assert isinstance(loss, float) and math.isfinite(loss)


def test_pyros_elbo_keyword_arguments_are_accepted():
    obj = ELBO(num_particles=2, strict_enumeration_warning=False, retain_graph=True, ignore_jit_warnings=True, jit_options={})
    assert obj.retain_graph is True and obj.strict_enumeration_warning is False
    with pytest.raises(TypeError, match="tail_adaptive_beta"):
        ELBO(tail_adaptive_beta=-0.5)


def test_a_guide_site_marked_for_enumeration_warns_as_trace_elbo_does():
    def model():
        pyro.sample("c", dist.Bernoulli(torch.tensor(0.3, dtype=DT)))

    def guide():
        p = pyro.param("p", torch.tensor(0.5, dtype=DT))
        pyro.sample("c", dist.Bernoulli(p), infer={"enumerate": "parallel"})

    with pytest.warns(UserWarning, match="TraceEnum_ELBO"):
        ELBO().loss(model, guide)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ELBO(strict_enumeration_warning=False).loss(model, guide)


def test_elbo_takes_an_ambiguous_data_plate_and_per_datum_bounds_refuse_it():
    """The ELBO's value does not depend on which plate is the data; IWAE's does."""

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.3, dtype=DT))
        with pyro.plate("rows", x.shape[0], dim=-2), pyro.plate("cols", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    x = torch.randn(3, 3, dtype=DT)
    expected = Trace_ELBO().loss(model, lambda x: None, x)
    assert ELBO().loss(model, lambda x: None, x) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="cannot tell which plate"):
        IWAE(num_particles=2).loss(model, lambda x: None, x)


# --- per-datum bounds under subsampling -----------------------------------------------------------------------
def _subsampled_vae(size, reparameterized: bool = True):
    Normal = dist.Normal if reparameterized else NonreparameterizedNormal
    x = torch.tensor([0.4, -1.2, 2.2, 0.1], dtype=DT)

    def model(idx):
        with pyro.plate("data", len(x), subsample=idx if size else None) as ind:
            z = pyro.sample("z", Normal(torch.zeros(len(ind), dtype=DT), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[ind])

    def guide(idx):
        loc = pyro.param("loc", torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=DT))
        with pyro.plate("data", len(x), subsample=idx if size else None) as ind:
            pyro.sample("z", Normal(loc[ind], 0.8))

    return model, guide


@pytest.mark.parametrize("make", [lambda: IWAE(num_particles=5), lambda: Renyi(alpha=0.5, num_particles=5), lambda: IWAE(num_particles=5, estimator="vimco")], ids=["iwae", "renyi", "vimco"])
def test_a_subsampled_datum_counts_n_over_b_times_its_bound(make):
    """Under a data plate of 4 subsampled to 2, the bound is 2 x (IWAE of the two data's unscaled weights), on the
    same samples; before, the weights were scaled inside the log-mean-exp."""
    idx = torch.tensor([1, 3])
    reparam = "vimco" not in repr(make())
    sub_model, sub_guide = _subsampled_vae(2, reparam)
    pyro.set_rng_seed(3)
    subsampled = make().loss(sub_model, sub_guide, idx)

    x = torch.tensor([0.4, -1.2, 2.2, 0.1], dtype=DT)[idx]
    Normal = dist.Normal if reparam else NonreparameterizedNormal

    def model(_):
        with pyro.plate("data", 2):
            z = pyro.sample("z", Normal(torch.zeros(2, dtype=DT), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(_):
        with pyro.plate("data", 2):
            pyro.sample("z", Normal(torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=DT)[idx], 0.8))

    pyro.set_rng_seed(3)
    assert subsampled == pytest.approx(2 * make().loss(model, guide, idx), rel=1e-10)


def test_per_datum_bounds_refuse_a_partly_scaled_datum():
    model, guide = _subsampled_vae(None)
    kl_only = poutine.scale(guide, scale=0.5)  # guide sites down-weighted, the model's not
    with pytest.raises(ValueError, match="different scales"):
        IWAE(num_particles=3).loss(model, kl_only, None)
    with pytest.raises(ValueError, match="dreg.*subsampled"):
        IWAE(num_particles=3, estimator="dreg").loss(poutine.scale(model, scale=2.0), poutine.scale(guide, scale=2.0), None)


def _sequential_program(reparameterized: bool, subsample: bool):
    """Pyro's test_subsample_gradient_sequential: the data plate iterated in Python (``for i in pyro.plate``)."""
    Normal = dist.Normal if reparameterized else NonreparameterizedNormal
    size = 1 if subsample else None

    def model():
        for i in pyro.plate("data", len(DATA), subsample_size=size):
            z = pyro.sample(f"z_{i}", Normal(torch.tensor(0.0, dtype=DT), 1.0))
            pyro.sample(f"x_{i}", dist.Normal(z, 1.0), obs=DATA[i])

    def guide():
        s = pyro.param("scale", lambda: torch.tensor(1.0, dtype=DT))
        loc = pyro.param("loc", lambda: torch.zeros(len(DATA), dtype=DT))
        for i in pyro.plate("data", len(DATA), subsample_size=size):
            pyro.sample(f"z_{i}", Normal(loc[i], s))

    return model, guide


#: estimates per case: enough that 5 SE of the mean is under half the largest exact component (assert_unbiased checks it)
SEQUENTIAL_RUNS = {(True, False): 20, (True, True): 100, (False, False): 60, (False, True): 400}


@pytest.mark.parametrize("subsample", [False, True], ids=["full", "subsample"])
@pytest.mark.parametrize("reparameterized", [True, False], ids=["reparam", "nonreparam"])
def test_sequential_plate_gradient(reparameterized, subsample):
    """A sequential plate declares no tensor dimension: its sites are one datum, each site scaled by N/B when
    subsampled; the exact gradient is the vectorised case's."""
    model, guide = _sequential_program(reparameterized, subsample)
    draws = gradient_runs(lambda: ELBO(num_particles=50, vectorize_particles=False), model, guide, ["loc", "scale"], SEQUENTIAL_RUNS[reparameterized, subsample])
    assert_unbiased(draws, torch.tensor([0.5, -2.0, 2.0], dtype=DT), f"sequential subsample={subsample} reparam={reparameterized}")
