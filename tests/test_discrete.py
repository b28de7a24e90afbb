"""The discrete (binary-latent) VAE: the model/guide contract, exact answers by enumerating z, objectives
that work without reparameterisation, and training on binarized MNIST."""
import json
import math

import pyro
import pytest
import torch
from pyro import poutine

import pyrovae.evaluate as E
from pyrovae.cli import main
from pyrovae.data import load_dataset
from pyrovae.guides import BernoulliEncoder
from pyrovae.models import BinaryCodeCategorical, DiscreteVAE, EnumeratedPosteriorGuide
from pyrovae.models.discrete import binary_codes
from pyrovae.objectives import ELBO, IWAE, LogVarianceLoss, VarianceLoss
from pyrovae.cli.registry import build_guide, build_model, build_objective
from pyrovae.train import Trainer

X_DIM, K = 6, 3


def _tiny(prior: str = "learned"):
    """A K=3 model (8 codes) whose log p(x) and posterior are exact sums, with a non-uniform prior."""
    model = DiscreteVAE((X_DIM,), K, hidden=(8,), prior=prior).double()
    if prior == "learned":
        with torch.no_grad():
            model.prior_logits.copy_(torch.tensor([1.0, -0.5, 0.3]))
    guide = BernoulliEncoder((X_DIM,), K, hidden=(8,)).double()
    return model, guide


def _data(n: int) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, X_DIM), 0.5, dtype=torch.float64))


# --- the contract -------------------------------------------------------------------------------------------


def test_contract_sites_and_vectorised_particles():
    model, guide = DiscreteVAE((1, 28, 28), 5, hidden=(16,)), BernoulliEncoder((1, 28, 28), 5, hidden=(16,))
    x = torch.rand(7, 1, 28, 28).round()
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    z = guide_trace.nodes["z"]
    assert z["value"].shape == (7, 5) and set(z["value"].unique().tolist()) <= {0.0, 1.0}
    assert not z["fn"].has_rsample
    assert model_trace.nodes["x"]["is_observed"] and torch.equal(model_trace.nodes["x"]["value"], x)
    for trace, names in ((model_trace, ("z", "x")), (guide_trace, ("z",))):
        for name in names:
            assert [f.name for f in trace.nodes[name]["cond_indep_stack"]] == ["data"]
            assert trace.nodes[name]["fn"].batch_shape == (7,)
    lw = ELBO(num_particles=3).log_weights(model, guide, x)
    assert lw.log_w.shape == (3, 7) and torch.isfinite(lw.log_w).all()
    assert lw.nonreparam_sites == ("z",)


def test_uniform_prior_is_bernoulli_half_and_learned_prior_is_trained():
    model = DiscreteVAE((4,), 3, hidden=(5,), prior="uniform")
    assert torch.allclose(model.prior((2,)).log_prob(torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])), torch.full((2,), 3 * math.log(0.5)))
    assert "prior_logits" not in dict(model.named_parameters())
    learned = DiscreteVAE((4,), 3, hidden=(5,), prior="learned")
    assert "prior_logits" in dict(learned.named_parameters())


@pytest.mark.parametrize("bad", [dict(z_dim=0), dict(z_dim=2.5), dict(prior="beta"), dict(likelihood="poisson"), dict(activation="swish")])
def test_bad_arguments_name_the_problem(bad):
    with pytest.raises(ValueError) as e:
        DiscreteVAE((1, 28, 28), **{"z_dim": 4, **bad})
    assert any(k in str(e.value) for k in bad)


def test_enumeration_refuses_large_codes():
    with pytest.raises(ValueError, match="z_dim=30"):
        DiscreteVAE((4,), 30, hidden=(5,)).log_marginal(torch.zeros(2, 4))


# --- exact answers by enumeration -----------------------------------------------------------------------------


def test_enumeration_agrees_with_a_brute_force_sum():
    model, _ = _tiny()
    x = _data(4)
    total = torch.zeros(4, dtype=torch.float64)
    for code in binary_codes(K, torch.float64):
        z = code.expand(4, K)
        total = total + (model.prior((4,)).log_prob(z) + model.decode(z).log_prob(x)).exp()
    assert torch.allclose(model.log_marginal(x), total.log())
    assert torch.allclose(model.posterior_logits(x).exp().sum(-1), torch.ones(4, dtype=torch.float64))


def test_binary_code_categorical_samples_and_scores_codes():
    logits = torch.randn(2, 8, dtype=torch.float64)
    d = BinaryCodeCategorical(logits)
    assert d.batch_shape == (2,) and d.event_shape == (3,)
    codes = binary_codes(3, torch.float64)
    scores = d.log_prob(codes[:, None, :])  # every code against both rows: [8, 2]
    assert torch.allclose(scores.T, torch.log_softmax(logits, -1))
    s = d.expand((5000, 2)).sample()
    freq = torch.stack([(s[:, 1] == c).all(-1).double().mean() for c in codes])
    p = torch.softmax(logits[1], -1)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / 5000).sqrt().max()
    assert torch.allclose(d.mean, torch.softmax(logits, -1) @ codes)


def test_log_likelihood_matches_enumeration_within_its_stderr():
    """pyrovae.evaluate.log_likelihood with an (imperfect) Bernoulli guide against the exact log p(x)."""
    model, guide = _tiny()
    x = _data(64)
    exact = model.log_marginal(x).detach()
    ll = E.log_likelihood(model, guide, x, num_samples=2000, max_elements=2**12)  # small budget: several chunks
    z = (ll.values - exact) / ll.stderr
    assert ll.stderr.max() < 0.05  # the check below has teeth: errors of 0.1 nats would fail it
    assert z.abs().max() < 4.5, z
    # the delta-method stderr is calibrated: z-scores have about unit variance
    assert 0.4 < z.pow(2).mean() < 2.5, z.pow(2).mean()
    # the guide is not the posterior, so a one-sample bound is visibly lower
    assert E.elbo_terms(model, guide, x, num_particles=500)["elbo"] < float(exact.mean()) - 0.05


def test_exact_posterior_gives_constant_weights():
    """q = p(z | x): every log-weight equals log p(x); the variance loss and its gradient vanish."""
    model, guide = _tiny()
    exact_q = EnumeratedPosteriorGuide(model)
    x = _data(16)
    exact = model.log_marginal(x).detach()
    ll = E.log_likelihood(model, exact_q, x, num_samples=50)
    assert torch.allclose(ll.values, exact, atol=1e-10) and ll.stderr.max() < 1e-6
    loss = VarianceLoss(num_particles=16).differentiable_loss(model, exact_q, x)
    assert abs(loss.item()) < 1e-20
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) < 1e-10
    # ... although log p(x) itself is far from a maximum: the variance of log w only sees p(z | x), so on its
    # own VarianceLoss gives the model no push towards the data (train the model with LogVarianceLoss or ELBO)
    model.zero_grad()
    (-model.log_marginal(x).sum()).backward()
    assert max(p.grad.abs().max().item() for p in model.parameters()) > 1e-2
    # an imperfect guide has a clearly positive variance
    assert VarianceLoss(num_particles=16).loss(model, guide, x) / 16 > 1e-3


def test_elbo_score_function_gradient_is_unbiased():
    """ELBO's gradient for the Bernoulli guide (score function with a leave-one-out baseline) against the exact
    gradient of sum_z q(z) [log p(x, z) - log q(z)], summed over the 2^3 codes."""
    model, guide = _tiny()
    x = _data(4)
    params = list(guide.parameters())

    codes = binary_codes(K, torch.float64)
    log_q = torch.distributions.Bernoulli(logits=guide.logits(x)[:, None, :]).log_prob(codes).sum(-1)  # [B, C]
    log_joint = model.log_joint_table(x)[1].detach()
    exact_elbo = (log_q.exp() * (log_joint - log_q)).sum()
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact_elbo, params)])

    estimates = []
    for _ in range(20):
        loss = ELBO(num_particles=500).differentiable_loss(model, guide, x)
        estimates.append(torch.cat([g.flatten() for g in torch.autograd.grad(-loss, params)]))
    estimates = torch.stack(estimates)
    mean, stderr = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    assert exact.abs().max() > 0.05  # a gradient worth estimating
    z = (mean - exact) / stderr.clamp_min(1e-8)
    assert z.abs().max() < 5, z
    # the value is the true bound: its mean over particles matches the enumerated ELBO
    value = -torch.tensor([ELBO(num_particles=2000).loss(model, guide, x) for _ in range(5)]).mean()
    assert abs(value - exact_elbo.item()) < 0.05 * x.shape[0]


# --- objectives -------------------------------------------------------------------------------------------------


def test_iwae_refuses_the_bernoulli_guide_and_elbo_runs():
    model, guide = _tiny()
    x = _data(5)
    with pytest.raises(ValueError, match="reparameterised"):
        IWAE(num_particles=4).loss(model, guide, x)
    with pytest.raises(ValueError, match="cannot be reparameterised"):
        IWAE(num_particles=4, estimator="dreg").differentiable_loss(model, guide, x)
    loss = ELBO(num_particles=4).differentiable_loss(model, guide, x)
    loss.backward()
    assert math.isfinite(loss.item())
    # the score-function term reaches the guide, the pathwise term the decoder
    assert guide.head.weight.grad.abs().sum() > 0 and model.prior_logits.grad.abs().sum() > 0


def test_iwae_with_vimco_trains_discrete_latents_through_the_trainer():
    """IWAE(K=5, estimator='vimco') from the registry trains the Bernoulli-latent VAE through the Trainer: the exact
    log p(x) (enumerating the 8 codes) of the training data rises, and the guide moves towards the posterior."""
    cfg = {"model": "discrete", "guide": "bernoulli", "objective": "iwae", "estimator": "vimco", "num_particles": 5}
    objective = build_objective(cfg)
    assert isinstance(objective, IWAE) and objective.estimator == "vimco"
    model, guide = _tiny()
    codes = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float64)
    x = codes[torch.randint(0, 2, (200,))]
    x = torch.where(torch.rand_like(x) < 0.05, 1 - x, x)  # two modes with 5% bit noise
    before = model.log_marginal(x).mean().item()
    guide_before = guide.head.weight.detach().clone()
    Trainer(model, guide, objective, lr=2e-2, progress=False).fit(x, epochs=15, batch_size=50)
    after = model.log_marginal(x).mean().item()
    assert after > before + 0.5, (before, after)
    assert not torch.equal(guide.head.weight, guide_before)


def test_registry_and_trainer_with_the_variance_loss():
    cfg = {"model": "discrete", "guide": "bernoulli", "objective": "variance", "num_particles": 8, "z_dims": [6], "hidden": [[16]]}
    model, guide = build_model(cfg, (1, 28, 28)), build_guide(cfg, (1, 28, 28))
    assert isinstance(model, DiscreteVAE) and isinstance(guide, BernoulliEncoder) and model.z_dim == guide.z_dim == 6
    objective = build_objective(cfg)
    assert isinstance(objective, VarianceLoss) and objective.num_particles == 8
    x = torch.rand(40, 1, 28, 28).round()
    history = Trainer(model, guide, objective, lr=1e-2, progress=False).fit(x, epochs=3, batch_size=20)
    assert history[-1]["train_variance"] < history[0]["train_variance"]
    with pytest.raises(ValueError, match="one --z-dims"):
        build_model({**cfg, "z_dims": [6, 3]}, (1, 28, 28))


# --- real data ------------------------------------------------------------------------------------------------


def test_discrete_vae_learns_binarized_mnist_and_variance_loss_fits_its_guide(data_root):
    """(1) A discrete VAE (K=32 bits, learned prior) trained on 2000 binarized-MNIST images with LogVarianceLoss
    (the variance loss for the guide, the ELBO gradient for the model) beats the untrained model and independent
    pixels on test data. (2) A fresh Bernoulli guide fitted by VarianceLoss to the trained model, held fixed,
    reaches a comparable test ELBO. VarianceLoss alone does not fit the model (see
    test_exact_posterior_gives_constant_weights)."""
    splits = load_dataset("binarized-mnist", data_dir=data_root)
    train, test = splits.train[:2000], splits.test[:500]
    p = (train.sum(0) + 1) / (train.shape[0] + 2)  # independent pixels at their (smoothed) training means
    independent = float((test * p.log() + (1 - test) * (1 - p).log()).flatten(1).sum(1).mean())
    model, guide = DiscreteVAE(splits.x_shape, 32, hidden=(200,), prior="learned"), BernoulliEncoder(splits.x_shape, 32, hidden=(200,))
    untrained = E.elbo_terms(model, guide, test, num_particles=8)
    Trainer(model, guide, LogVarianceLoss(num_particles=8), lr=3e-3, progress=False).fit(train, epochs=12, batch_size=100)
    trained = E.elbo_terms(model, guide, test, num_particles=8)
    assert untrained["elbo"] < -500  # ~784 log 0.5
    # far above the untrained model and clearly above independent pixels (what a decoder ignoring z reaches)
    assert trained["elbo"] > independent + 20, (trained, independent)
    assert trained["kl"] > 3  # the binary code is used

    pyro.clear_param_store()
    fresh = BernoulliEncoder(splits.x_shape, 32, hidden=(200,))
    fixed_model = poutine.block(model, hide_types=["param"])  # the trainer sees only the guide's parameters
    variance = VarianceLoss(num_particles=8)
    before = E.elbo_terms(model, fresh, test, num_particles=8)
    variance_before = variance.loss(model, fresh, test) / test.shape[0]
    Trainer(fixed_model, fresh, variance, lr=3e-3, progress=False).fit(train, epochs=8, batch_size=100)
    after = E.elbo_terms(model, fresh, test, num_particles=8)
    variance_after = variance.loss(model, fresh, test) / test.shape[0]
    assert variance_after < variance_before / 10, (variance_before, variance_after)
    assert after["elbo"] > before["elbo"] + 50, (before, after)
    assert after["elbo"] > independent + 20, (after, independent)


def test_cli_trains_the_discrete_vae_with_the_variance_loss(data_root, tmp_path):
    run = tmp_path / "run"
    code = main([
        "train", "--dataset", "binarized-mnist", "--model", "discrete", "--guide", "bernoulli", "--objective", "variance", "-k", "8",
        "--epochs", "1", "--z-dims", "8", "--hidden", "32", "--batch-size", "500", "--run-dir", str(run), "--eval-samples", "50",
        "--eval-limit", "50", "--no-progress", "--data-dir", str(data_root), "--device", "cpu",
    ])
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "discrete" and config["guide"] == "bernoulli" and config["z_dims"] == [8]
    result = json.loads((run / "evaluation.json").read_text())
    assert math.isfinite(result["test_nll"]) and result["active_units"].keys() == {"z"}
