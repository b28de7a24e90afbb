"""The speed benchmark compares like with like: the hand-written reference (benchmarks/reference.py) computes the
same bound as pyrovae, with the same weights and the same noise, and benchmarks/speed.py runs end to end."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from pyrovae.evaluate import log_likelihood
from pyrovae.models import VAE
from pyrovae.guides import GaussianEncoder
from pyrovae.objectives import ELBO, IWAE

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"pyrovae_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load("reference")

X_SHAPE = (1, 28, 28)
ARCHS = {
    "kingma-welling relu": dict(z_dims=(20,), hidden=[(400,)], activation="relu"),
    "iwae 2-layer tanh": dict(z_dims=(100, 50), hidden=[(200, 200), (100, 100)], activation="tanh"),
}


def _pair(kwargs, flow: bool = False):
    model = VAE(x_shape=X_SHAPE, **kwargs)
    if flow:
        from pyrovae.guides import FlowEncoder

        guide = FlowEncoder(x_shape=X_SHAPE, z_dim=kwargs["z_dims"][0], hidden=kwargs["hidden"][0], flow="planar", num_flows=3, activation=kwargs["activation"])
    else:
        guide = GaussianEncoder(x_shape=X_SHAPE, **kwargs)
    return model, guide


def _data(n=12):
    return torch.bernoulli(torch.full((n, *X_SHAPE), 0.3))


def _same_noise(objective, model, guide, x, seed=7):
    """pyrovae's loss per datum and its gradients, drawn after seeding the RNG with ``seed``."""
    objective.differentiable_loss(model, guide, x)  # the first call guesses the plate nesting (draws noise)
    for p in list(model.parameters()) + list(guide.parameters()):
        p.grad = None
    pyro.set_rng_seed(seed)
    loss = objective.differentiable_loss(model, guide, x) / x.shape[0]
    loss.backward()
    grads = [p.grad.clone() for p in list(model.parameters()) + list(guide.parameters())]
    return loss.detach(), grads


def _hand(loss_fn, model, guide, x, seed=7):
    for p in list(model.parameters()) + list(guide.parameters()):
        p.grad = None
    pyro.set_rng_seed(seed)
    loss = loss_fn(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in list(model.parameters()) + list(guide.parameters())]


def _assert_grads_close(ours, theirs):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_reference_matches_pyrovae(arch, objective):
    model, guide = _pair(ARCHS[arch])
    hand = reference.HandVAE(model, guide)
    x = _data()
    if objective == "elbo":
        ours, fn = ELBO(), hand.elbo_loss
    else:
        ours, fn = IWAE(num_particles=5), lambda x: hand.iwae_loss(x, 5)
    loss, grads = _same_noise(ours, model, guide, x)
    ref_loss, ref_grads = _hand(fn, model, guide, x)
    # float32 sums of ~800 terms of size ~1 in a different order: agreement to ~1e-5 relative
    torch.testing.assert_close(ref_loss, loss, rtol=1e-5, atol=1e-4)
    _assert_grads_close(grads, ref_grads)


def test_reference_differs_with_other_noise():
    """The agreement above comes from the shared noise, not from a loss that ignores it."""
    model, guide = _pair(ARCHS["kingma-welling relu"])
    hand = reference.HandVAE(model, guide)
    x = _data()
    loss, _ = _same_noise(IWAE(num_particles=5), model, guide, x, seed=7)
    pyro.set_rng_seed(8)
    other = hand.iwae_loss(x, 5).detach()
    assert (other - loss).abs() > 1e-3


def test_reference_matches_planar_flow_guide():
    kwargs = dict(z_dims=(8,), hidden=[(32, 32)], activation="tanh")
    model, guide = _pair(kwargs, flow=True)
    hand = reference.HandVAE(model, guide)
    x = _data()
    for ours, fn in ((ELBO(), hand.elbo_loss), (IWAE(num_particles=4), lambda x: hand.iwae_loss(x, 4))):
        loss, grads = _same_noise(ours, model, guide, x)
        ref_loss, ref_grads = _hand(fn, model, guide, x)
        torch.testing.assert_close(ref_loss, loss, rtol=1e-5, atol=1e-4)
        _assert_grads_close(grads, ref_grads)


def test_reference_log_likelihood_matches_pyrovae():
    """Same chunking and the same noise give the same importance-sampled log p(x)."""
    model, guide = _pair(dict(z_dims=(10,), hidden=[(64, 64)], activation="tanh"))
    hand = reference.HandVAE(model, guide)
    x = _data(6)
    budget = x.shape[0] * 784 * 20  # chunks of 20 particles: 60 samples are three chunks of one size
    pyro.set_rng_seed(3)
    ours = log_likelihood(model, guide, x, num_samples=60, batch_size=6, max_elements=budget).values
    pyro.set_rng_seed(3)  # log_likelihood's objective guesses the plate nesting without drawing random numbers
    theirs = hand.log_likelihood(x, num_samples=60, batch_size=6, max_elements=budget)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-3)


def test_reference_rejects_what_it_does_not_implement():
    model = VAE(x_shape=X_SHAPE, z_dims=(4,), hidden=[(8,)], likelihood="gaussian", scale=1.0)
    guide = GaussianEncoder(x_shape=X_SHAPE, z_dims=(4,), hidden=[(8,)])
    with pytest.raises(ValueError, match="Bernoulli"):
        reference.HandVAE(model, guide)


def test_speed_quick_runs(tmp_path):
    out = tmp_path / "speed.md"
    env = {k: v for k, v in os.environ.items() if k != "PYROVAE_DATA"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # no real data anywhere: exercises the synthetic fallback
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--threads", "1", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "SYNTHETIC" in proc.stdout
    text = out.read_text()
    assert "| 784-400-20 relu | ELBO | 128 |" in text
    assert "IWAE K=5" in text and "log p(x), k=5000" in text
    assert "## Targets" in text and "torch threads: 1" in text
    assert not list(tmp_path.glob(".speed.md.*.tmp"))  # written atomically, nothing left behind
    # speed_ab.py reads each row's ratios back from such a file
    row = next(line for line in text.splitlines() if line.startswith("| 784-400-20 relu | ELBO | 128 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    parsed = _load("speed_ab").ratios(out)
    assert parsed["784-400-20 relu · ELBO · batch 128"]["pyrovae"] == float(cells[9].strip("*"))
    assert set(parsed["784-200-200-50 tanh · IWAE K=5 · batch 128"]) == {"pyrovae"}  # --quick times no compile column


def test_time_breakdown_sorts_ops_by_kind():
    """``common.time_breakdown`` puts each op's self time in its kind's column (matrix products, softmax, optimiser,
    fills and copies) and the rest in "everything else"; the columns add up to the profiled total."""
    common = _load("common")
    assert common._category("aten::addmm") == "matrix products" and common._category("aten::mkldnn_rnn_layer_backward") == "fused LSTM kernel"
    assert common._category("aten::_log_softmax_backward_data") == "softmax" and common._category("aten::_fused_adam_") == "optimiser"
    assert common._category("aten::fill_") == "zero-fills and copies" and common._category("aten::sigmoid") == "everything else"
    a = torch.randn(300, 300)
    split = common.time_breakdown(lambda: torch.log_softmax(a @ a, -1).sigmoid(), 3)
    assert split["matrix products"] > 0 and split["softmax"] > 0 and split["everything else"] > 0
    assert split["optimiser"] == 0 and split["fused LSTM kernel"] == 0
    parts = sum(v for k, v in split.items() if k != "total (profiled)")
    assert abs(split["total (profiled)"] - parts) < 1e-9
