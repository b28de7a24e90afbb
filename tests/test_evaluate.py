"""Evaluation against exact answers: the linear-Gaussian model has closed-form log p(x) and posterior."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyrovae.evaluate as E
from pyrovae.models.linear_gaussian import ExactPosteriorGuide, LinearGaussian, LinearGaussianGuide
from pyrovae.objectives import Objective


def _problem(x_dim=6, z_dim=3, n=40, scale=0.7):
    torch.manual_seed(1)
    model = LinearGaussian(x_dim, z_dim, scale=scale, learnable=False, dtype=torch.float64)
    x = model.sample(n)
    return model, x


def _near_posterior_guide(model, x_dim, z_dim):
    """A diagonal guide near the posterior: exact mean map, the posterior's marginal scales inflated by 20%."""
    guide = LinearGaussianGuide(x_dim, z_dim, dtype=torch.float64)
    eye = torch.eye(x_dim, dtype=torch.float64)
    mean_map, cov = model.posterior(eye)  # rows: posterior mean of each unit vector (linear part)
    offset, _ = model.posterior(torch.zeros(1, x_dim, dtype=torch.float64))
    with torch.no_grad():
        guide.encoder.weight.copy_((mean_map - offset).T)
        guide.encoder.bias.copy_(offset[0])
        guide.log_scale.copy_(torch.log(1.2 * cov.diagonal().sqrt()))
    return guide


@pytest.mark.parametrize("capture", ["off", "replay"])
def test_log_likelihood_matches_the_exact_value_within_its_standard_error(capture):
    model, x = _problem()
    guide = _near_posterior_guide(model, 6, 3)
    ll = E.log_likelihood(model, guide, x, num_samples=5000, batch_size=16, max_elements=16 * 6 * 700, capture=capture)
    assert capture == "off" or ("captured" in ll.capture and "plain" not in ll.capture), ll.capture
    exact = model.log_marginal(x)
    assert ll.values.shape == exact.shape == (40,)
    assert (ll.stderr > 0).all()
    z = (ll.values - exact) / ll.stderr
    assert z.abs().max() < 5, z
    # pooled over data points: the mean error is within 4 pooled standard errors
    assert abs(float((ll.values - exact).mean())) < 4 * float(ll.stderr.pow(2).mean().sqrt() / math.sqrt(40)) + 1e-9


def test_log_likelihood_with_the_exact_posterior_is_exact_with_zero_variance():
    model, x = _problem()
    ll = E.log_likelihood(model, ExactPosteriorGuide(model), x, num_samples=300, batch_size=7)
    assert torch.allclose(ll.values, model.log_marginal(x), atol=1e-9)
    assert ll.stderr.max() < 1e-6


def test_streaming_chunks_equal_one_logsumexp_over_the_same_samples():
    model, x = _problem(n=10)
    guide = LinearGaussianGuide(6, 3, dtype=torch.float64)
    numel_budget = 10 * 6 * 7  # 7 particles per chunk: 100 = 14 chunks of 7 + one of 2
    pyro.set_rng_seed(3)
    streamed = E.log_likelihood(model, guide, x, num_samples=100, batch_size=10, max_elements=numel_budget).values
    pyro.set_rng_seed(3)
    objectives = {}  # one objective per chunk size, as log_likelihood keeps them (each guesses its plate nesting once)
    parts = [objectives.setdefault(k, Objective(num_particles=k)).log_weights(model, guide, x).log_w for k in [7] * 14 + [2]]
    direct = torch.logsumexp(torch.cat(parts), 0) - math.log(100)
    assert torch.allclose(streamed, direct, atol=1e-10)


def test_elbo_terms_match_the_closed_form():
    model, x = _problem(n=200)
    guide = _near_posterior_guide(model, 6, 3)
    loc, scale = guide.loc_scale(x)
    exact = model.elbo(x, loc, scale.expand_as(loc)).mean().item()
    est = E.elbo_terms(model, guide, x, num_particles=50)
    # the estimate's standard error: per-datum log-weights vary with sd ~ a few nats over 200 x 50 draws
    lw = Objective(num_particles=50).log_weights(model, guide, x).log_w
    se = float(lw.detach().std() / math.sqrt(lw.numel()))
    assert abs(est["elbo"] - exact) < 5 * se
    assert est["elbo"] < float(model.log_marginal(x).mean())
    assert est["elbo"] == pytest.approx(est["recon"] - est["kl"], abs=1e-9)


class _PartialGuide(torch.nn.Module):
    """q(z|x) = N(x[:, :k] padded with zeros, 0.1): exactly k latent units carry information about x."""

    def __init__(self, k, z_dim):
        super().__init__()
        self.k, self.z_dim = k, z_dim

    def forward(self, x):
        loc = torch.cat([x[:, : self.k], x.new_zeros(x.shape[0], self.z_dim - self.k)], -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 0.1).to_event(1))


def test_active_units_counts_units_whose_posterior_mean_varies():
    x = torch.randn(500, 6)
    assert E.active_units(_PartialGuide(4, 5), x) == {"z": 4}
    assert E.active_units(_PartialGuide(0, 5), x) == {"z": 0}
    assert E.active_units(_PartialGuide(4, 5), 0.05 * x) == {"z": 0}  # Cov 0.0025 < 1e-2


def test_images_samples_reconstructions_and_manifold(tmp_path):
    from pyrovae.guides import GaussianEncoder
    from pyrovae.models import VAE

    model, guide = VAE(z_dims=(2,), hidden=[(16,)]), GaussianEncoder(z_dims=(2,), hidden=[(16,)])
    x = torch.rand(5, 1, 28, 28).round()
    samples = E.sample(model, 6, (1, 28, 28))
    recon = E.reconstruct(model, guide, x)
    grid = E.decode_grid(model, (1, 28, 28), steps=4)
    assert samples.shape == (6, 1, 28, 28) and recon.shape == x.shape and grid.shape == (16, 1, 28, 28)
    assert ((samples >= 0) & (samples <= 1)).all()  # Bernoulli means
    path = E.save_image_grid(torch.cat([x, recon]), tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scatter = E.latent_scatter(guide, torch.rand(50, 1, 28, 28), torch.arange(50) % 10, tmp_path / "z.png")
    assert scatter.stat().st_size > 1000


def test_a_likelihood_without_a_mean_is_refused_not_answered_with_the_data():
    """Before: reconstruct returned x itself and sample the zero placeholder when p(x | z) had no .mean."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            base = dist.Normal(z.sum(-1, keepdim=True).expand(-1, 3), 1.0)
            pyro.sample("x", dist.TransformedDistribution(base, [dist.transforms.AffineTransform(0.0, 2.0)]).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))

    x = torch.randn(4, 3)
    for call in (lambda: E.reconstruct(model, guide, x), lambda: E.sample(model, 5, (3,))):
        with pytest.raises(ValueError, match="'x' has a TransformedDistribution, which defines no mean"):
            call()


def test_bad_num_samples():
    model, x = _problem(n=2)
    with pytest.raises(ValueError, match="num_samples"):
        E.log_likelihood(model, LinearGaussianGuide(6, 3, dtype=torch.float64), x, num_samples=0)


def test_default_chunking_follows_the_device():
    model, x = _problem(n=10)
    guide = LinearGaussianGuide(6, 3, dtype=torch.float64)
    assert E.default_max_elements(torch.device("cpu")) == 2**22 and E.default_max_elements(torch.device("cuda")) == 2**24
    pyro.set_rng_seed(3)
    default = E.log_likelihood(model, guide, x, num_samples=50).values
    pyro.set_rng_seed(3)
    explicit = E.log_likelihood(model, guide, x, num_samples=50, max_elements=2**22).values
    assert torch.equal(default, explicit)


# --------------------------------------------------------------------------------------------------
# active units: exact for closed-form means, unbiased with a stated error for sample-based ones


class _SampledGuide(torch.nn.Module):
    """q(z|x) = N(c * x[:, :dim], 1) as a distribution without a closed-form mean (a flow with no layers), so that
    E_q[z|x] must come from samples; true activity of unit j: c_j^2 Var_x(x_j), exactly, over the given data."""

    def __init__(self, c):
        super().__init__()
        self.c = torch.as_tensor(c)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            base = dist.Normal(self.c * x[:, : len(self.c)], 1.0).to_event(1)
            pyro.sample("z", dist.TransformedDistribution(base, []))


class _TwoLayerGuide(torch.nn.Module):
    """z1 ~ N(c x, 1), z2 | z1 ~ N(z1, 1): E_q[z2|x] = c x, but each run's mean of z2 given z1 carries z1's noise."""

    def __init__(self, c):
        super().__init__()
        self.c = torch.as_tensor(c)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(self.c * x[:, : len(self.c)], 1.0).to_event(1))
            pyro.sample("z2", dist.Normal(z1, 1.0).to_event(1))


def _first_linear(guide):
    return next(m for m in guide.trunk.modules() if isinstance(m, torch.nn.Linear))


D_AU = 8


def _guide_families():
    from pyrovae.nn.flows import FLOWS
    from pyrovae.guides import BernoulliEncoder, FlowEncoder, GaussianEncoder

    families = {
        "gaussian-1-layer": lambda: GaussianEncoder((D_AU,), (4,), hidden=((16,),)),
        "gaussian-2-layers": lambda: GaussianEncoder((D_AU,), (4, 3), hidden=((16,), (16,))),
        "bernoulli": lambda: BernoulliEncoder((D_AU,), 4, hidden=(16,)),
    }
    families.update({f"flow-{f}": (lambda f=f: FlowEncoder((D_AU,), 4, hidden=(16,), flow=f, num_flows=2)) for f in FLOWS})
    return families


@pytest.mark.parametrize("family", sorted(_guide_families()))
def test_a_guide_that_ignores_x_has_no_active_units_and_one_whose_mean_follows_x_has_all(family):
    x = torch.randn(500, D_AU)
    guide = _guide_families()[family]()
    with torch.no_grad():  # the mean follows x strongly: a steeper trunk and head
        _first_linear(guide).weight.mul_(3)
        for head in (guide.heads if hasattr(guide, "heads") else [guide.head]):
            for layer in head.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.mul_(4)
    strong = E.unit_activity(guide, x)
    for name, a in strong.items():  # every unit far above the threshold, many standard errors away
        assert (a.variance > 0.02).all() and (a.variance > 0.01 + 10 * a.stderr).all(), (name, a.variance, a.stderr)
    assert E.active_units(guide, x) == {name: a.variance.numel() for name, a in strong.items()}

    with torch.no_grad():  # now q(z|x) is the same for every x
        _first_linear(guide).weight.zero_()
    flat = E.unit_activity(guide, x)
    assert E.active_units(guide, x) == {name: 0 for name in flat}
    for name, a in flat.items():
        if a.exact:  # a closed-form mean, the same for every x: zero up to the rounding of the variance's mean
            assert (a.variance.abs() < 1e-10).all() and torch.equal(a.stderr, torch.zeros_like(a.stderr)), (name, a.variance)
        else:  # sample-based: zero within its stated error
            assert (a.variance.abs() < 5 * a.stderr).all(), (name, a.variance, a.stderr)
    closed_form = {"gaussian-1-layer": {"z"}, "gaussian-2-layers": {"z1"}, "bernoulli": {"z"}}.get(family, set())
    assert {name for name, a in flat.items() if a.exact} == closed_form


def test_sample_based_means_of_a_guide_equal_to_the_prior_give_no_active_units():
    # q(z|x) = N(0, I) for every x, E_q[z|x] from 100 samples: the sampling variance of each mean, 1/100, equals the
    # threshold, so the variance over x of the sample means alone counts about half of the units (3 of 10, say)
    x = torch.randn(1000, 10)
    a = E.unit_activity(_SampledGuide(torch.zeros(10)), x, num_samples=100)["z"]
    naive = a.means.var(0)
    assert abs(float(naive.mean()) - 0.01) < 5 * 0.01 * math.sqrt(2 / (1000 * 10))  # the bias that is now subtracted
    assert (a.variance.abs() < 5 * a.stderr).all() and not a.exact
    assert E.active_units(_SampledGuide(torch.zeros(10)), x) == {"z": 0}


@pytest.mark.parametrize("guide_cls, site", [(_SampledGuide, "z"), (_TwoLayerGuide, "z2")])
def test_unit_activity_is_unbiased_and_its_standard_error_is_calibrated(guide_cls, site):
    c = torch.tensor([0.0, 0.05, 0.08, 0.2, 1.0])
    x = torch.randn(500, 5)
    truth = c**2 * x.var(0)  # Var_x(E_q[z|x]) over these data points, exactly: about [0, 0.0025, 0.0064, 0.04, 1]
    z_scores = []
    for _ in range(20):
        a = E.unit_activity(guide_cls(c), x, num_samples=50)[site]
        z_scores.append((a.variance - truth) / a.stderr)
    z = torch.stack(z_scores)  # 20 repeats x 5 units of (estimate - truth) / stated error
    # unbiased: the mean z-score of each unit over 20 repeats is within 4 / sqrt(20) of 0
    assert (z.mean(0).abs() < 4 / math.sqrt(20)).all(), z.mean(0)
    # calibrated: the standard deviation of 100 z-scores is 1 within its sampling error (about 0.07), give or take the
    # Gaussian approximation
    assert 0.75 < float(z.std()) < 1.3, float(z.std())
    assert E.active_units(guide_cls(c), x, num_samples=50)[site] == 2


def test_active_units_need_two_samples():
    with pytest.raises(ValueError, match="num_samples=1 must be an integer >= 2"):
        E.active_units(_SampledGuide(torch.zeros(3)), torch.randn(20, 3), num_samples=1)


def test_kl_by_site_gives_each_layers_closed_form_kl_and_zero_for_a_collapsed_one():
    """Two latent sites: z1 with q(z1|x) = N(x W1, 0.5), z2 with q(z2|x) = p(z2) (a collapsed layer). ``kl_by_site``:
    z1's closed-form KL within 5 standard errors, z2's exactly 0, and the two sum to ``elbo_terms``' kl for the
    same draw."""
    torch.manual_seed(0)
    n, d1, d2 = 4000, 2, 3
    w1 = torch.randn(4, d1, dtype=torch.float64)
    x = torch.randn(n, 4, dtype=torch.float64)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(d1), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(d2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(torch.cat([z1, z2], -1)[..., :4], 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", dist.Normal(x @ w1, 0.5).to_event(1))
            pyro.sample("z2", dist.Normal(x.new_zeros(d2), 1.0).to_event(1))

    mu = x @ w1
    exact = (0.5 * (0.25 + mu**2 - 1) - math.log(0.5)).sum(-1)  # KL(N(mu, 0.5^2) || N(0, 1)) per datum
    pyro.set_rng_seed(3)
    kl = E.kl_by_site(model, guide, x, batch_size=1000)
    pyro.set_rng_seed(3)
    terms = E.elbo_terms(model, guide, x, batch_size=1000)
    assert list(kl) == ["z1", "z2"] and kl["z2"] == 0.0
    se = float(exact.std()) / math.sqrt(n) + math.sqrt(d1 * 0.5 / n)  # spread over x, and the sampling noise of log q - log p
    assert abs(kl["z1"] - float(exact.mean())) < 5 * se, (kl["z1"], float(exact.mean()), se)
    assert kl["z1"] + kl["z2"] == pytest.approx(terms["kl"], rel=1e-9)


def test_kl_by_site_leaves_out_a_global_latent():
    """A latent outside the data plate has no per-datum KL: ``kl_by_site`` leaves it out, as it says, and the local
    site's part is unchanged by it (the same closed form as without the global site)."""
    torch.manual_seed(0)
    n = 3000
    x = torch.randn(n, 2, dtype=torch.float64)

    def model(x):
        g = pyro.sample("g", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + g, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("g", dist.Normal(x.new_tensor(0.3), 0.2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.5 * x, 0.5).to_event(1))

    kl = E.kl_by_site(model, guide, x, batch_size=1000)
    exact = (0.5 * (0.25 + (0.5 * x) ** 2 - 1) - math.log(0.5)).sum(-1)
    assert list(kl) == ["z"]
    se = float(exact.std()) / math.sqrt(n) + math.sqrt(2 * 0.5 / n)
    assert abs(kl["z"] - float(exact.mean())) < 5 * se, (kl["z"], float(exact.mean()))
