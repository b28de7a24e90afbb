"""Bayesian layers, the local reparameterisation handler and variational dropout (KSW15), checked against
closed forms: pre-activation moments, gradient means in standard errors, a numerical integral of the KL."""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine as pp
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from scipy import integrate
from torch import nn

from pyrovae.nn import BayesianLinear, VariationalDropoutLinear, bayesian_mlp, dropout_kl, dropout_neg_kl
from pyrovae.objectives import ELBO
from pyrovae.nn.poutine import local_reparameterization

Z = 5.0  # standard errors allowed in the statistical checks


def _weight_guide(mu, sigma, bias_mu=None, bias_sigma=None, name="net.0"):
    def guide(*args):
        pyro.sample(f"{name}.weight", dist.Normal(mu, sigma).to_event(2))
        if bias_mu is not None:
            pyro.sample(f"{name}.bias", dist.Normal(bias_mu, bias_sigma).to_event(1))
    return guide


def _layer_model(layer):
    def model(x):
        return layer(x)  # outside any plate: the weights are global latents
    return model


def _run(model, guide, x):
    guide_trace = pp.trace(guide).get_trace(x)
    return pp.replay(model, trace=guide_trace)(x)


# --- local reparameterisation: moments -----------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_local_reparameterization_preactivation_moments(bias):
    torch.manual_seed(0)
    n_in, n_out, S = 4, 3, 20000
    layer = BayesianLinear(n_in, n_out, bias=bias, name="net.0")
    mu, sigma = torch.randn(n_out, n_in), torch.rand(n_out, n_in) + 0.2
    b_mu, b_sigma = (torch.randn(n_out), torch.rand(n_out) + 0.1) if bias else (None, None)
    a = torch.randn(2, n_in)
    x = a.repeat(S, 1)  # S copies of two examples in one minibatch: the handler draws each row anew
    with local_reparameterization():
        out = _run(_layer_model(layer), _weight_guide(mu, sigma, b_mu, b_sigma), x).reshape(S, 2, n_out)
    mean_true = a @ mu.T + (b_mu if bias else 0)
    var_true = (a * a) @ (sigma * sigma).T + (b_sigma**2 if bias else 0)
    mean, var = out.mean(0), out.var(0)
    assert ((mean - mean_true).abs() <= Z * (var_true / S).sqrt()).all()
    assert ((var - var_true).abs() <= Z * var_true * math.sqrt(2 / (S - 1))).all()
    # independent across examples (one shared weight sample would correlate them): correlation ~ N(0, 1/S)
    corr = torch.stack([torch.corrcoef(torch.stack([out[:, 0, j], out[:, 1, j]]))[0, 1] for j in range(n_out)])
    assert (corr.abs() <= Z / math.sqrt(S)).all()


def test_local_reparameterization_with_autonormal_and_pyromodule_linear():
    """``AutoNormal`` (a Delta at an identity image of a Normal draw) and ``PyroModule[nn.Linear]``."""
    torch.manual_seed(1)
    n_in, n_out, S = 3, 2, 20000

    class Net(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc = PyroModule[nn.Linear](n_in, n_out)
            self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([n_out, n_in]).to_event(2))
            self.fc.bias = PyroSample(dist.Normal(0.0, 1.0).expand([n_out]).to_event(1))

        def forward(self, x):
            return self.fc(x)

    net = Net()
    guide = AutoNormal(net, init_scale=0.5)
    a = torch.randn(1, n_in)
    guide(a)  # builds the guide's parameters
    loc_w, scale_w = (t.detach() for t in guide._get_loc_and_scale("fc.weight"))
    loc_b, scale_b = (t.detach() for t in guide._get_loc_and_scale("fc.bias"))
    with torch.no_grad(), local_reparameterization():
        out = _run(net, guide, a.repeat(S, 1))
    mean_true = (a @ loc_w.T + loc_b)[0]
    var_true = ((a * a) @ (scale_w**2).T + scale_b**2)[0]
    assert ((out.mean(0) - mean_true).abs() <= Z * (var_true / S).sqrt()).all()
    assert ((out.var(0) - var_true).abs() <= Z * var_true * math.sqrt(2 / (S - 1))).all()
    assert torch.nn.functional.linear is torch._C._nn.linear  # the patch is undone on exit


# --- local reparameterisation: gradients -----------------------------------------------------------------
def _regression(batch=50, n_in=6):
    torch.manual_seed(2)
    x = torch.randn(batch, n_in)
    y = x @ torch.randn(n_in, 1) + 0.5 * torch.randn(batch, 1)
    layer = BayesianLinear(n_in, 1, bias=False, name="net.0")

    def model(x, y):
        f = layer(x)  # weights drawn outside the data plate
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(f, 0.5).to_event(1), obs=y)

    mu = torch.randn(1, n_in).requires_grad_()
    rho = torch.full((1, n_in), -1.0).requires_grad_()

    def guide(x, y):
        pyro.sample("net.0.weight", dist.Normal(mu, nn.functional.softplus(rho)).to_event(2))

    return model, guide, x, y, (mu, rho)


def _grads(loss_fn, model, guide, params, x, y, reps, local):
    out = []
    for _ in range(reps):
        if local:
            with local_reparameterization():
                loss = loss_fn.differentiable_loss(model, guide, x, y)
        else:
            loss = loss_fn.differentiable_loss(model, guide, x, y)
        g = torch.autograd.grad(loss, params)
        out.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(out)


@pytest.mark.parametrize("objective", ["pyro", "pyrovae"])
def test_local_reparameterization_gradient_unbiased_and_lower_variance(objective):
    """Same expected ELBO gradient as sampling one weight per minibatch (difference of means within Z
    standard errors), and a lower variance: the examples' noise is independent."""
    model, guide, x, y, params = _regression()
    loss_fn = Trace_ELBO() if objective == "pyro" else ELBO()
    reps = 400
    g_lr = _grads(loss_fn, model, guide, params, x, y, reps, True)
    g_ws = _grads(loss_fn, model, guide, params, x, y, reps, False)
    se = (g_lr.var(0) / reps + g_ws.var(0) / reps).sqrt()
    assert ((g_lr.mean(0) - g_ws.mean(0)).abs() <= Z * se).all()
    # the variance of a variance estimate from R draws has a relative standard error ~ sqrt(2 / R) (Gaussian),
    # about 7% here; measured ratio 0.10 with either objective
    ratio = g_lr.var(0).sum() / g_ws.var(0).sum()
    assert ratio < 0.5, float(ratio)


def test_handler_leaves_unrecognised_sites_untouched():
    """A weight drawn from a Laplace, a deterministic nn.Linear and a Normal latent not used as a weight are
    what they would be without the handler (same RNG state, same values)."""
    layer = BayesianLinear(3, 2, bias=False, name="net.0")
    plain = nn.Linear(3, 2)

    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        return layer(x) + plain(x) + z

    def guide(x):
        pyro.sample("net.0.weight", dist.Laplace(torch.zeros(2, 3), 1.0).to_event(2))
        pyro.sample("z", dist.Normal(torch.ones(2), 0.1).to_event(1))

    x = torch.randn(4, 3)
    pyro.set_rng_seed(3)
    expected = _run(model, guide, x)
    pyro.set_rng_seed(3)
    with local_reparameterization():
        got = _run(model, guide, x)
    assert torch.equal(expected, got)


def test_handler_as_decorator_and_with_vectorised_particles():
    """The decorator form, and Pyro's vectorised particles (weights of shape [particles, 1, out, in])."""
    model, guide, x, y, params = _regression(batch=8)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    loss = local_reparameterization(elbo.differentiable_loss)(model, guide, x, y)
    assert torch.isfinite(loss)
    assert torch.nn.functional.linear is torch._C._nn.linear


# --- variational dropout ---------------------------------------------------------------------------------
def _exact_neg_kl(alpha: float) -> float:
    """0.5 log alpha - E_{n ~ N(0,1)} log|1 + sqrt(alpha) n| - (gamma + log 2)/2 by quadrature (the log has an
    integrable singularity at n = -1/sqrt(alpha): the range is split there)."""
    s = math.sqrt(alpha)
    f = lambda n: math.log(abs(1 + s * n)) * math.exp(-n * n / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    c = -1 / s
    e = sum(integrate.quad(f, lo, hi, limit=200)[0] for lo, hi in [(-np.inf, c - 1), (c - 1, c), (c, c + 1), (c + 1, np.inf)])
    return 0.5 * math.log(alpha) - e - (0.5772156649015329 + math.log(2)) / 2


@pytest.mark.parametrize("approx,log_alphas,accuracy", [
    ("molchanov", np.linspace(-8, 8, 17), 0.01),  # Molchanov et al. 2017 (measured max error 0.0085)
    ("ksw15", np.linspace(-8, 0, 9), 0.04),  # KSW15 eq. 10, alpha <= 1, constant fixed at alpha = 1
])
def test_dropout_kl_matches_numerical_integral(approx, log_alphas, accuracy):
    approx_values = dropout_neg_kl(torch.tensor(log_alphas), approx).numpy()
    exact = np.array([_exact_neg_kl(math.exp(la)) for la in log_alphas])
    assert np.abs(approx_values - exact).max() <= accuracy
    assert np.abs(approx_values - exact).max() > 1e-4  # the approximation is one, the quadrature is not its copy


@pytest.mark.parametrize("variant,alpha_shape", [("A", "layer"), ("A", "unit"), ("B", "layer"), ("B", "unit"), ("B", "weight")])
def test_variational_dropout_small_alpha_is_the_deterministic_layer(variant, alpha_shape):
    layer = VariationalDropoutLinear(5, 3, variant=variant, alpha_shape=alpha_shape, init_alpha=math.exp(-40))
    x = torch.randn(7, 5)
    assert torch.allclose(layer(x), layer.linear(x), atol=1e-6)
    layer.log_alpha.data.fill_(-1.0)
    assert not torch.allclose(layer(x), layer.linear(x), atol=1e-3)
    layer.eval()
    assert torch.equal(layer(x), layer.linear(x))


@pytest.mark.parametrize("variant", ["A", "B"])
def test_variational_dropout_output_moments(variant):
    """Both variants: mean x theta^T + b, variance sum_i x_i^2 alpha_i theta_ji^2 (alpha per input unit)."""
    torch.manual_seed(4)
    S = 20000
    layer = VariationalDropoutLinear(4, 2, variant=variant, alpha_shape="unit")
    layer.log_alpha.data = torch.tensor([-2.0, -1.0, 0.0, -0.5])
    a = torch.randn(1, 4)
    with torch.no_grad():
        out = layer(a.repeat(S, 1))
    w, alpha = layer.linear.weight.detach(), layer.clipped_log_alpha().exp().detach()
    mean_true = (layer.linear(a)).detach()[0]
    var_true = ((a * a * alpha) @ (w * w).T)[0]
    assert ((out.mean(0) - mean_true).abs() <= Z * (var_true / S).sqrt()).all()
    assert ((out.var(0) - var_true).abs() <= Z * var_true * math.sqrt(2 / (S - 1))).all()


def test_alpha_clip_is_smooth_and_keeps_init_alpha():
    from pyrovae.nn import soft_clip

    m, knee = 0.0, 0.5
    x = torch.linspace(-3, 6, 2001, dtype=torch.float64, requires_grad=True)
    y = soft_clip(x, m, knee)
    (g,) = torch.autograd.grad(y.sum(), x)
    below = x.detach() <= m - knee
    assert torch.equal(y[below], x[below]) and (y < m).all() and (g > 0).all()
    assert (y.diff() > 0).all() and g.diff().abs().max() < 0.01  # increasing, slope continuous (step 0.0045)
    for a in (0.1, 0.5, 0.9, 0.99):  # in the bend too
        layer = VariationalDropoutLinear(3, 2, init_alpha=a)
        assert abs(float(layer.clipped_log_alpha().detach().exp().mean()) - a) < 1e-6
    with pytest.raises(ValueError, match="init_alpha"):
        VariationalDropoutLinear(3, 2, init_alpha=1.0)


@pytest.mark.parametrize("variant", ["A", "B"])
def test_alpha_above_the_clip_gets_a_gradient_and_comes_back(variant):
    # alpha = 1 used to be absorbing: the clamp's gradient is 0 above it. The noise's squared error, minimised by
    # alpha -> 0, must reach log_alpha from above the clip and bring alpha back below 1
    torch.manual_seed(0)
    layer = VariationalDropoutLinear(6, 4, variant=variant, alpha_shape="layer")
    x = torch.randn(256, 6)
    with torch.no_grad():
        layer.log_alpha.fill_(1.0)
    assert float(layer.clipped_log_alpha().detach().exp()) > 0.9

    def loss():
        return (layer(x) - layer.linear(x).detach()).pow(2).mean()
    (g,) = torch.autograd.grad(loss(), layer.log_alpha)
    assert float(g) > 0  # d loss / d log_alpha: alpha should go down
    opt = torch.optim.Adam([layer.log_alpha], lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(layer.clipped_log_alpha().detach().exp()) < 0.5


def test_dropout_kl_counts_every_weight():
    net = nn.Sequential(VariationalDropoutLinear(4, 3, alpha_shape="layer", init_alpha=0.5), nn.Tanh(),
                        VariationalDropoutLinear(3, 2, variant="B", alpha_shape="weight", init_alpha=0.5))
    per = float(-dropout_neg_kl(torch.tensor(math.log(0.5))))
    assert math.isclose(float(dropout_kl(net).detach()), per * (4 * 3 + 3 * 2), rel_tol=1e-5)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="prior_scale"):
        BayesianLinear(3, 2, prior_scale=0.0)
    with pytest.raises(ValueError, match="variant='B'"):
        VariationalDropoutLinear(3, 2, variant="A", alpha_shape="weight")
    with pytest.raises(ValueError, match="approx"):
        dropout_neg_kl(torch.zeros(1), "exact")


def test_bayesian_mlp_sites_are_global_latents():
    net = bayesian_mlp([3, 4, 2], name="dec")
    trace = pp.trace(net).get_trace(torch.randn(5, 3))
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert names == ["dec.0.weight", "dec.0.bias", "dec.2.weight", "dec.2.bias"]
    assert trace.nodes["dec.0.weight"]["value"].shape == (4, 3)


# --- models, guides, trainer, CLI --------------------------------------------------------------------------
def _binary_data(n=256, d=(1, 8, 8)):
    torch.manual_seed(5)
    protos = (torch.rand(4, *d) > 0.5).float()
    return protos[torch.randint(0, 4, (n,))].clone()


@pytest.mark.parametrize("kw,gkw", [
    (dict(bayesian_decoder=True), {}),
    (dict(bayesian_decoder=False, decoder_dropout="A"), dict(encoder_dropout="A")),
    (dict(bayesian_decoder=False, decoder_dropout="B"), dict(encoder_dropout="B")),
])
def test_bayes_vae_trains_with_the_trainer(kw, gkw):
    from pyrovae.guides.bayesian import BayesEncoder
    from pyrovae.models.bayesian import BayesVAE
    from pyrovae.train import Trainer

    x = _binary_data()
    model = BayesVAE((1, 8, 8), 4, (32,), num_data=x.shape[0], **kw)
    guide = BayesEncoder((1, 8, 8), 4, (32,), model=model, num_data=x.shape[0], **gkw)
    history = Trainer(model, guide, ELBO(), lr=1e-2, progress=False).fit(x, epochs=6, batch_size=64)
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 1.0, [h["train_loss"] for h in history]


def test_eval_mode_is_the_posterior_mean_network():
    from pyrovae.guides.bayesian import BayesEncoder
    from pyrovae.models.bayesian import BayesVAE

    x = _binary_data(8)
    model = BayesVAE((1, 8, 8), 4, (16,), bayesian_decoder=True)
    guide = BayesEncoder((1, 8, 8), 4, (16,), model=model)
    guide(x)  # registers the guide's parameters, as any training step does
    model.eval(), guide.eval()
    trace = pp.trace(model).get_trace(x)
    for name, key in guide.weights.sites:
        assert torch.equal(trace.nodes[name]["value"], guide.weights.locs[key].detach())
    assert float(trace.log_prob_sum(lambda name, site: name.startswith("decoder."))) == 0.0
    assert not [n for n, s in pp.trace(guide).get_trace(x).nodes.items() if s["type"] == "sample" and n.startswith("decoder.")]


def test_eval_mode_reads_the_guides_means_before_the_guide_runs():
    # a fresh process: the guide's weights are loaded but it never ran, so Pyro's parameter store is empty; the
    # eval-mode model still uses the guide's means (it used to draw its weights from the prior in silence)
    from pyrovae.guides.bayesian import BayesEncoder
    from pyrovae.models.bayesian import BayesVAE

    x = _binary_data(8)
    model = BayesVAE((1, 8, 8), 4, (16,), bayesian_decoder=True, prior_scale=10.0)
    guide = BayesEncoder((1, 8, 8), 4, (16,), model=model)
    model.eval(), guide.eval()
    assert not pyro.get_param_store().keys()
    trace = pp.trace(model).get_trace(x)
    for name, key in guide.weights.sites:
        assert torch.equal(trace.nodes[name]["value"], guide.weights.locs[key].detach()), name


def test_eval_mode_refuses_unknown_means_and_takes_them_from_autonormal():
    # an AutoNormal guide keeps its means under its own names: the eval-mode model raises (naming the fix) instead
    # of drawing the weights from the prior, and runs at the means once given them
    from pyro.infer.autoguide import AutoNormal

    from pyrovae.models.bayesian import BayesVAE

    x = _binary_data(8)
    model = BayesVAE((1, 8, 8), 4, (16,), bayesian_decoder=True)
    guide = AutoNormal(model)
    guide(x)
    model.eval()
    with pytest.raises(ValueError, match=r"set_posterior_means\(guide.median\(x\)\)"):
        pp.trace(model).get_trace(x)
    model.set_posterior_means(guide.median(x))
    trace = pp.trace(model).get_trace(x)
    medians = guide.median(x)
    for name in model.weight_shapes():
        assert torch.equal(trace.nodes[name]["value"], medians[name].detach()), name
    with pytest.raises(ValueError, match="decoder.0.bias"):
        model.set_posterior_means({"decoder.0.weight": medians["decoder.0.weight"]})
    with pytest.raises(TypeError, match="means"):
        model.set_posterior_means([1, 2])


def test_natural_gradient_trains_a_vae_with_the_trainer():
    from pyrovae.guides import GaussianEncoder
    from pyrovae.models import VAE
    from pyrovae.train.optim import NaturalGradient
    from pyrovae.train import Trainer

    x = _binary_data()
    model, guide = VAE((1, 8, 8), (4,), ((32,),)), GaussianEncoder((1, 8, 8), (4,), ((32,),))
    trainer = Trainer(model, guide, ELBO(), lr=0.1, optimizer=NaturalGradient, optimizer_kwargs={"modules": [model, guide]},
                      capture="off", progress=False)
    history = trainer.fit(x, epochs=6, batch_size=64)
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 1.0, [h["train_loss"] for h in history]
    assert len(trainer.optim.blocks) == 4  # decoder 4-32-64, encoder 64-32 and its head


def test_cli_flags(data_root, tmp_path):
    from pyrovae.cli import main

    common = ["train", "--dataset", "mnist", "--data-dir", str(data_root), "--train-limit", "200", "--valid-size", "100",
              "--epochs", "1", "--eval-samples", "4", "--eval-limit", "20", "--no-progress", "--hidden", "20", "--z-dims", "4"]
    import json
    rc = main(common + ["--model", "bayes_vae", "--guide", "bayes_gaussian", "--decoder-dropout", "A", "--encoder-dropout", "B",
                        "--optimizer", "natural", "--run-dir", str(tmp_path / "a")])
    assert rc == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["optimizer"] == "natural" and cfg["num_data"] == 200
    rc = main(common + ["--model", "bayes_vae", "--guide", "bayes_gaussian", "--bayesian-decoder", "--run-dir", str(tmp_path / "b")])
    assert rc == 0
    assert json.loads((tmp_path / "b" / "evaluation.json").read_text())["test_nll"] > 0
    assert main(common + ["--encoder-dropout", "A", "--run-dir", str(tmp_path / "c")]) == 2  # needs --guide bayes_gaussian


# --- the local reparameterisation as an option of the Bayesian model and guide ----------------------------
def _first_layer_io(model, guide, x):
    """(input A, pre-activations B) of the decoder's first Bayesian layer in one ELBO evaluation."""
    seen = {}
    layer = model.decoder[0]
    handle = layer.register_forward_hook(lambda mod, args, out: seen.update(a=args[0].detach(), b=out.detach()))
    try:
        ELBO().differentiable_loss(model, guide, x)
    finally:
        handle.remove()
    return seen["a"], seen["b"]


@pytest.mark.parametrize("local", [False, True])
def test_local_reparam_option_draws_per_example_preactivations(local):
    """Off: one weight sample for the batch, so B = A W^T + b holds exactly for one W. On: each example's
    pre-activations are an independent draw of N(A mu^T + m_b, A^2 (sigma^2)^T + s_b^2), with the guide's
    posterior moments: standardised residuals have mean 0 and variance 1 (in standard errors) and no linear fit."""
    from pyrovae.guides.bayesian import BayesEncoder
    from pyrovae.models.bayesian import BayesVAE

    n = 2000
    x = _binary_data(n)
    model = BayesVAE((1, 8, 8), 3, (4,), bayesian_decoder=True, local_reparam=local)
    guide = BayesEncoder((1, 8, 8), 3, (4,), model=model, init_scale=0.5)
    assert guide.local_reparam is local  # follows the model by default
    a, b = _first_layer_io(model, guide, x)
    assert a.shape == (n, 3) and b.shape == (n, 4)
    design = torch.cat([a, torch.ones(n, 1)], 1).double()
    fit = torch.linalg.lstsq(design, b.double()).solution
    residual = (b.double() - design @ fit).abs().max().item()
    if not local:
        assert residual < 1e-4
        return
    assert residual > 0.1
    locs, scales = guide.weights.locs, {k: nn.functional.softplus(v) for k, v in guide.weights.rhos.items()}
    with torch.no_grad():
        mean = a @ locs["decoder__0__weight"].T + locs["decoder__0__bias"]
        var = (a * a) @ (scales["decoder__0__weight"] ** 2).T + scales["decoder__0__bias"] ** 2
    u = (b - mean) / var.sqrt()  # iid N(0, 1) under the handler
    assert (u.mean(0).abs() <= Z / math.sqrt(n)).all(), u.mean(0)
    assert ((u.var(0) - 1).abs() <= Z * math.sqrt(2 / n)).all(), u.var(0)
    # independent between examples: the correlation of neighbours is within Z / sqrt(n) of 0
    corr = (u[1:] * u[:-1]).mean(0)
    assert (corr.abs() <= Z / math.sqrt(n)).all(), corr


def test_local_reparam_option_lowers_the_gradient_variance_and_trains_captured():
    """The same ELBO gradient in expectation, a lower variance with the option on; the trainer needs no hook
    and its captured step replays the plain one."""
    from pyrovae.guides.bayesian import BayesEncoder
    from pyrovae.models.bayesian import BayesVAE
    from pyrovae.train import Trainer

    x = _binary_data(64)
    grads = {}
    for local in (False, True):
        torch.manual_seed(1)
        model = BayesVAE((1, 8, 8), 3, (16,), bayesian_decoder=True, local_reparam=local, num_data=64)
        guide = BayesEncoder((1, 8, 8), 3, (16,), model=model, num_data=64, init_scale=0.3)
        params = [guide.weights.locs["decoder__0__weight"], guide.weights.locs["decoder__2__weight"]]
        out = []
        for _ in range(300):
            g = torch.autograd.grad(ELBO().differentiable_loss(model, guide, x), params)
            out.append(torch.cat([t.reshape(-1) for t in g]))
        grads[local] = torch.stack(out)
    se = (grads[True].var(0) / 300 + grads[False].var(0) / 300).sqrt()
    assert ((grads[True].mean(0) - grads[False].mean(0)).abs() <= Z * se).all()
    ratio = grads[True].var(0).sum() / grads[False].var(0).sum()
    assert ratio < 0.7, float(ratio)

    def train(capture):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = BayesVAE((1, 8, 8), 3, (16,), bayesian_decoder=True, local_reparam=True, num_data=64)
        guide = BayesEncoder((1, 8, 8), 3, (16,), model=model, num_data=64)
        trainer = Trainer(model, guide, ELBO(), lr=1e-2, progress=False, capture=capture)
        trainer.setup(x)
        return trainer, [trainer.step(x)[0].clone() for _ in range(4)]

    plain, plain_losses = train("off")
    fast, fast_losses = train("replay")
    assert fast.gradients.capture.captured == 1, fast.capture_report
    assert all(torch.equal(p, q) for p, q in zip(plain_losses, fast_losses))
    assert all(torch.equal(p, q) for p, q in zip(plain.params.values(), fast.params.values()))


def test_local_reparam_option_refuses_what_it_cannot_do():
    from pyrovae.guides.bayesian import BayesEncoder
    from pyrovae.models.bayesian import BayesVAE

    with pytest.raises(ValueError, match="bayesian_decoder=True"):
        BayesVAE((1, 8, 8), 3, (4,), bayesian_decoder=False, local_reparam=True)
    with pytest.raises(ValueError, match="Bayesian decoder"):
        BayesEncoder((1, 8, 8), 3, (4,), local_reparam=True)


def test_cli_local_reparam(data_root, tmp_path):
    import json

    from pyrovae.cli import main
    from pyrovae.models.bayesian import BayesVAE
    from pyrovae.cli.registry import build_guide, build_model

    common = ["train", "--dataset", "mnist", "--data-dir", str(data_root), "--train-limit", "200", "--valid-size", "100",
              "--epochs", "1", "--eval-samples", "4", "--eval-limit", "20", "--no-progress", "--hidden", "20", "--z-dims", "4",
              "--model", "bayes_vae", "--guide", "bayes_gaussian"]
    assert main(common + ["--bayesian-decoder", "--local-reparam", "--run-dir", str(tmp_path / "a")]) == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["local_reparam"] is True
    assert json.loads((tmp_path / "a" / "evaluation.json").read_text())["test_nll"] > 0
    model = build_model(cfg, (1, 28, 28))
    assert isinstance(model, BayesVAE) and model.local_reparam and build_guide(cfg, (1, 28, 28), model).local_reparam
    assert main(common + ["--local-reparam", "--run-dir", str(tmp_path / "b")]) == 2  # needs --bayesian-decoder
