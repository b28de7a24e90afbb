"""Models and guides keep the library's contract: model(x)/guide(x), per-example sites in the data plate."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyrovae.guides import GaussianEncoder
from pyrovae.models import VAE
from pyrovae.objectives import IWAE


def _sites(trace):
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and n != "data"}


@pytest.mark.parametrize("arch,x_shape", [("mlp", (1, 28, 28)), ("mlp", (20,)), ("conv", (1, 28, 28)), ("conv", (3, 32, 32))])
@pytest.mark.parametrize("z_dims", [(5,), (6, 4)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "continuous_bernoulli"])
def test_contract_and_shapes(arch, x_shape, z_dims, likelihood):
    model = VAE(x_shape, z_dims, hidden=[(16,)] * len(z_dims), likelihood=likelihood, arch=arch)
    guide = GaussianEncoder(x_shape, z_dims, hidden=[(16,)] * len(z_dims), arch=arch)
    x = torch.rand(7, *x_shape)
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    msites, gsites = _sites(model_trace), _sites(guide_trace)
    names = ["z"] if len(z_dims) == 1 else ["z1", "z2"]
    assert sorted(gsites) == names
    assert sorted(msites) == sorted(names + ["x"])
    assert msites["x"]["is_observed"] and torch.equal(msites["x"]["value"], x)
    for site in list(msites.values()) + list(gsites.values()):
        assert [f.name for f in site["cond_indep_stack"]] == ["data"]
        assert site["fn"].batch_shape == (7,)
    assert msites["x"]["fn"].event_shape == x_shape
    for name, d in zip(names, z_dims):
        assert gsites[name]["value"].shape == (7, d)
    # vectorised particles broadcast through every layer
    lw = IWAE(num_particles=3).log_weights(model, guide, x)
    assert lw.log_w.shape == (3, 7) and torch.isfinite(lw.log_w).all()


def test_iwae_paper_architectures():
    """x-200-200-z50 and x-200-200-z100-100-100-z50 (Burda et al. 2016)."""
    one, two = VAE(z_dims=(50,)), VAE(z_dims=(100, 50))
    linears = lambda m: [(l.in_features, l.out_features) for l in m.modules() if isinstance(l, torch.nn.Linear)]
    assert linears(one) == [(50, 200), (200, 200), (200, 784)]
    assert linears(two) == [(100, 200), (200, 200), (200, 784), (50, 100), (100, 100), (100, 200)]
    g = GaussianEncoder(z_dims=(100, 50))
    assert linears(g) == [(784, 200), (200, 200), (200, 200), (100, 100), (100, 100), (100, 100)]


def test_bernoulli_likelihood_is_the_cross_entropy():
    model = VAE((4,), (2,), hidden=[(3,)])
    z = torch.randn(5, 2)
    x = torch.rand(5, 4).round()
    logits = model.decoder(z)
    expected = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    assert torch.allclose(model.decode(z).log_prob(x), expected)


def test_fixed_gaussian_scale():
    model = VAE((4,), (2,), hidden=[(3,)], likelihood="gaussian", scale=0.5)
    z = torch.randn(5, 2)
    x = torch.randn(5, 4)
    mean = model.decoder(z)
    assert torch.allclose(model.decode(z).log_prob(x), dist.Normal(mean, 0.5).log_prob(x).sum(-1))


@pytest.mark.parametrize("bad", [dict(z_dims=()), dict(z_dims=(0,)), dict(z_dims=(5, 3), hidden=[(4,)]), dict(likelihood="poisson"), dict(arch="transformer"), dict(activation="swish"), dict(scale=-1.0, likelihood="gaussian")])
def test_bad_arguments_name_the_problem(bad):
    with pytest.raises(ValueError) as e:
        VAE((1, 28, 28), **{"z_dims": (5,), **bad})
    assert any(k in str(e.value) for k in bad)


def test_conv_rejects_unsupported_images():
    with pytest.raises(ValueError, match="28x28"):
        VAE((1, 30, 30), arch="conv")


def test_user_defined_pyro_functions_train_through_the_library():
    """A model and guide written as plain functions with pyro.param / pyro.module (the README's example)."""
    from pyrovae.train import Trainer

    decoder = torch.nn.Linear(2, 6)
    encoder = torch.nn.Linear(6, 4)

    def model(x):
        pyro.module("my_decoder", decoder)
        noise = pyro.param("noise", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), noise).to_event(1), obs=x)

    def guide(x):
        pyro.module("my_encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    w = torch.randn(2, 6)
    data = torch.randn(512, 2) @ w + 0.1 * torch.randn(512, 6)
    trainer = Trainer(model, guide, IWAE(num_particles=4), lr=0.02, progress=False)
    history = trainer.fit(data, epochs=8, batch_size=64)
    assert "noise" in trainer.params and "my_decoder$$$weight" in trainer.params
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 1.0
    # the learned noise scale moved from 1.0 towards the data's 0.1
    assert pyro.param("noise").item() < 0.8


@pytest.mark.parametrize("flow", ["realnvp", "iaf"])
def test_learned_flow_prior_is_a_normalised_density_that_trains(flow):
    from pyrovae.train import Trainer

    model = VAE((6,), (2,), hidden=[(16,)], likelihood="gaussian", scale=0.5, prior_flow=flow, prior_flow_length=2)
    with torch.no_grad():  # move the flow away from its near-identity initialisation
        for p in model.prior_flows.parameters():
            p.add_(0.3 * torch.randn_like(p))
    # the density integrates to 1 on a wide grid (trapezoid error << tolerance at this spacing)
    axis = torch.linspace(-9, 9, 361)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = model.prior(torch.zeros(grid.shape[0], 2)).log_prob(grid).exp().reshape(361, 361)
    integral = torch.trapezoid(torch.trapezoid(density, axis), axis)
    assert abs(float(integral) - 1) < 0.01
    assert (density - torch.distributions.Normal(0, 1).log_prob(grid).sum(-1).exp().reshape(361, 361)).abs().max() > 1e-3

    # trains with IWAE: the prior flow's parameters receive gradients and the loss falls
    before = [p.detach().clone() for p in model.prior_flows.parameters()]
    data = torch.randn(256, 2) @ torch.randn(2, 6)
    history = Trainer(model, GaussianEncoder((6,), (2,), hidden=[(16,)]), IWAE(num_particles=3), lr=1e-2, progress=False).fit(data, 6, 64)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.prior_flows.parameters()))


@pytest.mark.parametrize("flow", ["planar", "householder"])
def test_flow_prior_needs_an_invertible_non_rotation_family(flow):
    with pytest.raises(ValueError, match="realnvp"):
        VAE((6,), (2,), prior_flow=flow)
