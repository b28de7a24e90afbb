"""Marginal KL of the aggregate posterior against closed forms; the Appendix D decoder re-fit against its optimum."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyrovae.evaluate as E
from pyrovae.models import ExactPosteriorGuide, LinearGaussian, LinearGaussianGuide


def gaussian_kl_to_standard(mean, cov):
    d = mean.shape[0]
    return 0.5 * (torch.trace(cov) + mean @ mean - d - torch.logdet(cov))


def whitened(n, d, seed=0):
    """n points whose empirical mean is exactly 0 and covariance exactly I."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    chol = torch.linalg.cholesky(x.T @ x / n)
    return x @ torch.linalg.inv(chol).T


def test_marginal_kl_linear_gaussian_closed_form():
    # q(z | x) = N(A x + c, s^2 I) with x ~ N(0, I): q(z) = N(c, A A^T + s^2 I) (the data's mean and covariance
    # are exactly the population's, so only the finite mixture's non-Gaussianity, O(1/N), separates them)
    n, d = 3000, 2
    x = whitened(n, d)
    guide = LinearGaussianGuide(d, d, dtype=torch.float64)
    a = torch.tensor([[0.5, 0.2], [0.0, 0.8]], dtype=torch.float64)
    c = torch.tensor([0.3, -0.2], dtype=torch.float64)
    s = 0.7
    with torch.no_grad():
        guide.encoder.weight.copy_(a), guide.encoder.bias.copy_(c), guide.log_scale.fill_(math.log(s))
    exact = float(gaussian_kl_to_standard(c, a @ a.T + s**2 * torch.eye(d, dtype=torch.float64)))
    model = LinearGaussian(d, d, dtype=torch.float64)  # its prior N(0, I) scores the draws
    r = E.marginal_kl(guide, x, model=model, rounds=2)
    assert r.num_samples == 2 * n and r.num_components == n
    assert abs(r.value - exact) < 4 * r.stderr, (r, exact)
    # and the stated bounds: marginal KL <= mean KL, mutual information in [0, log N]
    mean_kl_exact = float(0.5 * (2 * s**2 + (x @ a.T + c).pow(2).sum(1).mean() - d - 2 * d * math.log(s)))
    assert abs(r.mean_kl - mean_kl_exact) < 0.05 and 0 < r.mutual_information < math.log(n)
    assert r.stderr < 0.02  # the estimator is informative at this size


def test_marginal_kl_zero_when_posterior_is_prior():
    guide = LinearGaussianGuide(3, 2)
    with torch.no_grad():
        guide.encoder.weight.zero_(), guide.encoder.bias.zero_(), guide.log_scale.zero_()
    r = E.marginal_kl(guide, torch.randn(200, 3))
    assert abs(r.value) < 1e-5 and abs(r.mean_kl) < 1e-5 and r.stderr < 1e-5


def test_marginal_kl_exact_posterior_and_custom_prior():
    # the exact posterior of data drawn from the model aggregates to (about) the prior: KL ~ 0 within its error
    model = LinearGaussian(4, 2, scale=0.5, learnable=False, dtype=torch.float64)
    x = model.sample(2000)
    r = E.marginal_kl(ExactPosteriorGuide(model), x, model=model)
    assert abs(r.value) < 4 * r.stderr + 0.01
    # a prior that is not the model's: KL(q(z) || N(1, I)) = KL(q(z) || N(0, I)) + |1|^2/2 - E_q[z] . 1 ~ +1 here
    shifted = E.marginal_kl(ExactPosteriorGuide(model), x, prior=dist.Normal(torch.ones(2, dtype=torch.float64), 1.0).to_event(1))
    assert abs(shifted.value - r.value - 1.0) < 0.1


def test_marginal_kl_bad_input():
    with pytest.raises(ValueError, match="rounds"):
        E.marginal_kl(LinearGaussianGuide(3, 2), torch.randn(5, 3), rounds=0)
    with pytest.raises(ValueError, match="site"):
        E.marginal_kl(LinearGaussianGuide(3, 2), torch.randn(5, 3), site="w")


def test_refit_gaussian_scale_closed_form():
    # exact posterior of a linear-Gaussian model: E|x - W z - b|^2 = |x - W m(x) - b|^2 + tr(W S W^T) per datum
    model = LinearGaussian(5, 2, scale=0.3, learnable=False, dtype=torch.float64)
    x = model.sample(2000)
    mean, cov = model.posterior(x)
    w, b = model.weight, model.bias
    exact_var = float(((x - mean @ w.T - b).pow(2).sum(1).mean() + torch.trace(w @ cov @ w.T)) / 5)
    r = E.refit_gaussian_scale(model, ExactPosteriorGuide(model), x, num_samples=4)
    # the squared residual's Monte Carlo part (the draw of z) has relative error ~ sqrt(2 / (N S D)) ~ 0.007
    assert abs(r.sigma**2 / exact_var - 1) < 4 * math.sqrt(2 / (2000 * 4 * 5))
    assert r.recon_nll == pytest.approx(2.5 * math.log(2 * math.pi * r.sigma**2) + 2.5)


def test_refit_reads_the_site_holding_the_data():
    # a second observed site after the data's (a factor-like observation of a constant) must not be taken for g(z)
    import pyro
    import pyro.distributions as dist

    base = LinearGaussian(5, 2, scale=0.3, learnable=False, dtype=torch.float64)

    def model(x):
        base(x)
        pyro.sample("extra", dist.Normal(torch.zeros(()), 1.0), obs=torch.tensor(7.0, dtype=torch.float64))

    x = base.sample(500)
    guide = ExactPosteriorGuide(base)
    torch.manual_seed(0)
    alone = E.refit_gaussian_scale(base, guide, x)
    torch.manual_seed(0)
    assert E.refit_gaussian_scale(model, guide, x).sigma == pytest.approx(alone.sigma, rel=1e-12)


def test_geco_trajectory_reads_history():
    hist = [{"epoch": 1, "train_constraint": 0.2, "train_lambda": 3.0, "train_kl": 1.0, "train_recon": -5.0}, {"epoch": 2, "train_kl": 2.0}]
    t = E.geco_trajectory(hist)
    assert t["epoch"] == [1, 2] and t["lambda"][0] == 3.0 and math.isnan(t["lambda"][1]) and t["kl"] == [1.0, 2.0]


def test_marginal_kl_flow_guide_identical_data():
    # every x the same: q(z) = q(z | x), so the marginal KL equals the mean KL (zero index information)
    from pyrovae.guides import FlowEncoder

    guide = FlowEncoder((1, 8, 8), 2, (32,), "realnvp", 2)
    r = E.marginal_kl(guide, torch.rand(1, 1, 8, 8).expand(40, 1, 8, 8), rounds=2)
    assert r.num_components == 40 and abs(r.mutual_information) < 1e-4 and r.value > 0


def test_cli_evaluate_marginal_kl(data_root, tmp_path):
    import json

    from pyrovae.cli import main

    run = tmp_path / "run"
    common = ["--no-progress", "--data-dir", str(data_root), "--device", "cpu"]
    assert main(["train", "--dataset", "mnist", "--z-dims", "4", "--hidden", "32", "--train-limit", "300", "--epochs", "1",
                 "--run-dir", str(run), "--eval-samples", "0", *common]) == 0
    assert main(["evaluate", str(run), "-k", "5", "--limit", "50", "--marginal-kl", "--data-dir", str(data_root), "--device", "cpu"]) == 0
    r = json.loads((run / "evaluation-limit50.json").read_text())["marginal_kl"]  # beside the --limit 50 evaluation it adds to
    assert r["num_components"] == 50 and math.isfinite(r["value"]) and 0 <= r["mutual_information"] <= math.log(50) + 4 * r["stderr"] + 1e-3


# --- a conditional prior p(z | c): E_c KL(q(z | c) || p(z | c)), q(z | c) aggregated over each context's data ---
PRIOR_LOC, PRIOR_SCALE = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64), torch.tensor([1.0, 0.7, 1.5], dtype=torch.float64)


def _conditional_prior_model(x, c):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(PRIOR_LOC[c.long()][:, None], PRIOR_SCALE[c.long()][:, None]).to_event(1))


def _mixture_kl_to_normal(locs, scale, loc, sd):
    """KL(mean_n N(locs_n, scale^2) || N(loc, sd^2)) by quadrature (1-D)."""
    from scipy import integrate, stats

    def f(z):
        q = stats.norm.pdf(z, locs, scale).mean()
        return q * (math.log(q) - stats.norm.logpdf(z, loc, sd)) if q > 0 else 0.0

    lo, hi = float(locs.min()) - 12 * scale, float(locs.max()) + 12 * scale
    return integrate.quad(f, lo, hi, limit=400, points=sorted(locs.tolist()))[0]


def test_marginal_kl_conditional_prior_gaussian_closed_form():
    # q(z | x, c) = N(a x + b_c, s^2), p(z | c) = N(m_c, v_c): per context the aggregate posterior is a finite Gaussian
    # mixture whose KL to p(z | c) is a 1-D integral; the estimate must match its data-weighted mean within 4 s.e.
    g = torch.Generator().manual_seed(1)
    per, a, s, b = 30, 0.8, 0.6, torch.tensor([-1.5, 0.5, 2.0], dtype=torch.float64)
    c = torch.arange(3, dtype=torch.float64).repeat_interleave(per)
    x = torch.randn(3 * per, dtype=torch.float64, generator=g)

    def guide(x, c):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal((a * x + b[c.long()])[:, None], s).to_event(1))

    exact = sum(_mixture_kl_to_normal((a * x[c == k] + b[k]).numpy(), s, float(PRIOR_LOC[k]), float(PRIOR_SCALE[k])) for k in range(3)) / 3
    r = E.marginal_kl(guide, (x, c), model=_conditional_prior_model, rounds=20)
    assert r.num_contexts == 3 and r.num_components == 3 * per and r.num_samples == 20 * 3 * per
    assert abs(r.value - exact) < 4 * r.stderr, (r, exact)
    assert 0 < r.mutual_information < math.log(per) and r.stderr < 0.05


def test_marginal_kl_conditional_prior_zero_when_posterior_is_prior():
    # q(z | x, c) = p(z | c) for 3 contexts, each repeated ~67 times (N = 200): every q(z | c) is p(z | c), the KL is 0
    # (the pre-fix estimate mixed all contexts against each draw's own prior: -I(n; z), -0.90 nats here)
    c = torch.arange(3, dtype=torch.float64).repeat(67)[:200]

    def guide(x, c):
        _conditional_prior_model(x, c)

    r = E.marginal_kl(guide, (torch.randn(200, 4, dtype=torch.float64), c), model=_conditional_prior_model)
    assert r.num_contexts == 3 and abs(r.value) < 1e-9 and abs(r.mean_kl) < 1e-9 and r.stderr < 1e-9


def test_marginal_kl_conditional_prior_refusals():
    def guide(x, c):
        _conditional_prior_model(x, c)

    x = torch.randn(200, 4, dtype=torch.float64)
    # every context distinct (the cVAE case, N = 200): q(z | c) would be one posterior; refused, not -4.91
    unique = torch.linspace(0, 2, 200, dtype=torch.float64)
    loc = lambda c: c * 3 - 2  # noqa: E731

    def model(x, c):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc(c)[:, None], 1.0).to_event(1))

    with pytest.raises(ValueError, match="every context in data is distinct"):
        E.marginal_kl(model, (x, unique), model=model)

    # a prior that depends on another latent, not on the context: no p(z | c) to compare with
    def hier_model(x, c=None):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
            pyro.sample("z2", dist.Normal(z1, 1.0).to_event(1))

    with pytest.raises(ValueError, match="no context"):
        E.marginal_kl(hier_model, x, model=hier_model, site="z2")
    with pytest.raises(ValueError, match="same context"):
        E.marginal_kl(hier_model, (x, torch.zeros(200)), model=hier_model, site="z2")
