"""The captured fast path (pyrovae.capture) against the plain Pyro step: same numbers, clean fallbacks."""
import random

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyrovae.evaluate as E
from pyrovae.guides import BernoulliEncoder, FlowEncoder, GaussianEncoder
from pyrovae.models import VAE, DiscreteVAE
from pyrovae.objectives import ELBO, GECO, IWAE, BetaELBO, LogVarianceLoss, Objective, Renyi, VarianceLoss
from pyrovae.train import DivergenceError, Trainer

D_X = 12


def _data(n: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(n, D_X, generator=g) * 0.8 + 0.1, generator=g)


def _vae(z_dims=(3,), hidden=((16,),), **kwargs):
    return VAE((D_X,), z_dims, hidden=hidden, **kwargs), GaussianEncoder((D_X,), z_dims, hidden=hidden)


def _run(build, objective, capture, steps=7, batch=8, seed=0, **kwargs):
    """Train ``steps`` steps from a fixed seed; returns the trainer, per-step (loss, norm, metrics) and the RNG state."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, guide = build()
    trainer = Trainer(model, guide, objective(), lr=1e-2, progress=False, capture=capture, **kwargs)
    x = _data()
    trainer.setup(x[:batch])
    record = []
    for i in range(steps):
        xb = x[(i * batch) % x.shape[0]:][:batch]
        loss, norm = trainer.step(xb)
        metrics = {k: v.clone() for k, v in getattr(trainer.objective, "metrics", {}).items()}
        record.append((loss.clone(), norm.clone(), metrics))
    return trainer, record, torch.get_rng_state()


def assert_same_training(build, objective, **kwargs):
    plain, plain_record, plain_rng = _run(build, objective, "off", **kwargs)
    fast, fast_record, fast_rng = _run(build, objective, "replay", **kwargs)
    assert fast.gradients.capture.captured == 1, fast.capture_report
    for step, ((l0, n0, m0), (l1, n1, m1)) in enumerate(zip(plain_record, fast_record)):
        assert torch.equal(l0, l1) and torch.equal(n0, n1), (step, l0, l1, n0, n1)
        assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0), (step, m0, m1)
    for (name, p0), p1 in zip(plain.params.items(), fast.params.values()):
        assert torch.equal(p0, p1), name
    assert torch.equal(plain_rng, fast_rng)  # the same random draws, no more, no fewer
    return plain, fast


# --------------------------------------------------------------------------------------------------
# the same numbers as the plain step, bit for bit, for every objective


OBJECTIVES = {
    "elbo": ELBO,
    "elbo-analytic-kl": lambda: ELBO(analytic_kl=True),
    "elbo-3-particles": lambda: ELBO(num_particles=3),
    "iwae": lambda: IWAE(num_particles=5),
    "iwae-dreg": lambda: IWAE(num_particles=5, estimator="dreg"),
    "renyi": lambda: Renyi(alpha=0.5, num_particles=4),
    "variance": lambda: VarianceLoss(num_particles=4),
    "logvariance": lambda: LogVarianceLoss(num_particles=4),
    "beta-linear-warmup": lambda: BetaELBO(beta=2.0, schedule="linear", warmup_steps=4),
    "geco": lambda: GECO(tolerance=0.05, nu=5.0),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_replay_trains_exactly_like_the_plain_step(name):
    assert_same_training(_vae, OBJECTIVES[name], clip_norm=1.0)


def test_state_read_by_the_loss_is_an_input_not_a_constant():
    # beta_t moves every step of the warm-up, lambda every GECO step: a graph that froze them would drift
    _, fast = assert_same_training(_vae, lambda: BetaELBO(beta=1.0, schedule="linear", warmup_steps=5), steps=6)
    assert float(fast.objective.beta_t) == 1.0 and float(fast.objective.metrics["beta_t"]) == pytest.approx(1.0)
    plain, fast = assert_same_training(_vae, lambda: GECO(tolerance=0.05, nu=5.0), steps=6)
    assert torch.equal(plain.objective.log_lambda, fast.objective.log_lambda)
    assert float(fast.objective.log_lambda) != 0.0  # it moved


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: _vae(z_dims=(4, 2), hidden=((16,), (8,))), id="two-stochastic-layers"),
        pytest.param(lambda: (VAE((D_X,), (3,), hidden=((16,),), prior_flow="realnvp"), GaussianEncoder((D_X,), (3,), hidden=((16,),))), id="flow-prior"),
        pytest.param(lambda: (VAE((D_X,), (3,), hidden=((16,),)), FlowEncoder((D_X,), 3, hidden=(16,), flow="planar", num_flows=3)), id="planar-guide"),
        pytest.param(lambda: (VAE((D_X,), (3,), hidden=((16,),)), FlowEncoder((D_X,), 3, hidden=(16,), flow="iaf", num_flows=2)), id="iaf-guide"),
        pytest.param(lambda: (VAE((D_X,), (3,), hidden=((16,),), likelihood="gaussian", scale=None), GaussianEncoder((D_X,), (3,), hidden=((16,),))), id="gaussian-learned-scale"),
        pytest.param(lambda: (DiscreteVAE((D_X,), 3, hidden=(16,)), BernoulliEncoder((D_X,), 3, hidden=(16,))), id="discrete-score-function"),
    ],
)
def test_replay_covers_the_library_models_and_guides(build):
    assert_same_training(build, lambda: ELBO(num_particles=2))


def test_user_program_with_pyro_params_and_constraints():
    def model(x):
        loc = pyro.param("loc", torch.zeros(D_X))
        scale = pyro.param("scale", torch.ones(D_X), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, scale).to_event(1), obs=x)

    def guide(x):
        w = pyro.param("w", torch.full((D_X,), 0.5))
        s = pyro.param("s", torch.ones(D_X), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(w * x, s).to_event(1))

    plain, fast = assert_same_training(lambda: (model, guide), IWAE)
    assert sorted(fast.params) == ["loc", "s", "scale", "w"]


def test_replay_skips_the_program_and_rechecks_at_doubling_intervals():
    calls = {"n": 0}

    class Counted(VAE):
        def forward(self, x):
            calls["n"] += 1
            return super().forward(x)

    trainer, _, _ = _run(lambda: (Counted((D_X,), (3,), hidden=((16,),)), GaussianEncoder((D_X,), (3,), hidden=((16,),))), ELBO, "replay", steps=1, check_every=5)
    x = _data()[:8]
    calls["n"] = 0
    trainer.step(x)  # capture: trace, then the plain step it is checked against
    assert calls["n"] == 2
    checks = []
    for replay in range(1, 400):
        calls["n"] = 0
        trainer.step(x)
        if calls["n"]:
            checks.append(replay)
    # the plain step ran beside the graph after 5 replays, then 10, 20, 40 and 80 more (16 x check_every at most)
    assert checks == [5, 15, 35, 75, 155, 235, 315, 395]


def test_ragged_last_batch_gets_its_own_graph_and_extra_signatures_run_plainly():
    pyro.clear_param_store()
    model, guide = _vae()
    trainer = Trainer(model, guide, ELBO(), progress=False)
    trainer.fit(_data(44), epochs=2, batch_size=8)  # 5 batches of 8 and one of 4
    assert trainer.gradients.capture.captured == 2, trainer.capture_report
    trainer.gradients.capture.max_graphs = 2
    trainer.step(_data(3))
    assert "more than 2 input signatures" in trainer.capture_report


# --------------------------------------------------------------------------------------------------
# where a graph cannot stand in for the program, the plain step runs and the report says why


class ItemVAE(VAE):
    """Python control flow on a tensor's value: nothing a graph can record."""

    def forward(self, x):
        if float(x.sum()) > -1:
            super().forward(x)


class PythonRandomVAE(VAE):
    """Draws with Python's RNG each step: a graph would repeat the first draw forever."""

    def forward(self, x):
        with pyro.poutine.scale(scale=1.0 + random.random()):
            super().forward(x)


class StatefulVAE(VAE):
    """Writes a running statistic into a buffer each step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("running", torch.zeros(D_X))

    def forward(self, x):
        self.running.mul_(0.9).add_(0.1 * x.mean(0))
        super().forward(x)


class TemperedVAE(VAE):
    """Its Python reads an attribute a recorded graph cannot see."""

    temperature = 1.0

    def forward(self, x):
        with pyro.poutine.scale(scale=self.temperature):
            super().forward(x)


class CountingELBO(ELBO):
    """An objective with state between steps that it keeps in an attribute, not in its state dict."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def estimate(self, model, guide, args, kwargs, state):
        self.calls += 1
        est = super().estimate(model, guide, args, kwargs, state)
        est.loss = est.loss * (1 + 1 / self.calls)
        return est

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


@pytest.mark.parametrize(
    "model_cls, objective, reason",
    [
        (ItemVAE, ELBO, "capture failed"),
        (PythonRandomVAE, ELBO, "Python's or NumPy's random generator"),
        (StatefulVAE, ELBO, "writes into tensors it did not create"),
        (VAE, CountingELBO, "keeps state between steps outside its state dict"),
        (VAE, Trace_ELBO, "capture failed"),  # Pyro's ELBOs test the loss for NaN on the host every step
    ],
)
def test_refused_capture_falls_back_to_the_plain_step(model_cls, objective, reason):
    build = lambda: (model_cls((D_X,), (3,), hidden=((16,),)), GaussianEncoder((D_X,), (3,), hidden=((16,),)))  # noqa: E731
    plain, plain_record, _ = _run(build, objective, "off", steps=4)
    random.seed(0)
    fast, fast_record, _ = _run(build, objective, "replay", steps=4)
    assert fast.gradients.capture.captured == 0 and reason in fast.capture_report, fast.capture_report
    if model_cls is not PythonRandomVAE:  # the others draw nothing outside torch: the plain steps match exactly
        for (l0, _, _), (l1, _, _) in zip(plain_record, fast_record):
            assert torch.equal(l0, l1)
        for p0, p1 in zip(plain.params.values(), fast.params.values()):
            assert torch.equal(p0, p1)
    if model_cls is StatefulVAE:  # the buffer was updated once per step, not by the trial runs too
        assert torch.equal(plain.model.running, fast.model.running)


def test_a_program_whose_python_changes_is_caught_at_the_next_recheck():
    pyro.clear_param_store()
    model, guide = TemperedVAE((D_X,), (3,), hidden=((16,),)), GaussianEncoder((D_X,), (3,), hidden=((16,),))
    trainer = Trainer(model, guide, ELBO(), progress=False, check_every=4)
    x = _data()[:8]
    trainer.setup(x)
    for _ in range(3):
        trainer.step(x)
    assert trainer.gradients.capture.captured == 1
    model.temperature = 0.5  # a change the graph cannot see ...
    for _ in range(4):
        trainer.step(x)
    # ... until the re-check, which drops the graph: from then on the plain step runs
    assert trainer.gradients.capture.captured == 0 and "disagreed with the plain step at a re-check" in trainer.capture_report
    pyro.set_rng_seed(3)
    expected = trainer.gradients.plain((x,))[0]  # the tempered program, run by Pyro
    pyro.set_rng_seed(3)
    loss, _ = trainer.step(x)
    assert torch.equal(loss, expected)


def test_bad_capture_mode_is_refused():
    with pytest.raises(ValueError, match="capture='fast' is not known"):
        Trainer(*_vae(), ELBO(), capture="fast")
    from pyrovae.capture import GraphCache

    with pytest.raises(ValueError, match="max_compiled=-1 must be a number of signatures"):
        GraphCache(lambda inputs: inputs, "compile", max_compiled=-1)


# --------------------------------------------------------------------------------------------------
# the rest of the trainer works through the fast path


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_divergence_in_a_replayed_step_gets_the_plain_steps_report(tmp_path, monkeypatch):
    x = _data(64)
    x[45] = float("nan")  # poisons whichever step draws example 45: the same step on both paths
    pyro.enable_validation(False)  # else the first step's validation may refuse the NaN before training starts
    monkeypatch.setattr("pyrovae.train.trainer.check_fit_data", lambda *args: None)  # and so would fit's data check
    reports, params = {}, {}
    for capture in ("off", "replay"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model, guide = _vae()
        trainer = Trainer(model, guide, ELBO(), progress=False, check_every=5, capture=capture, run_dir=tmp_path / capture)
        with pytest.raises(DivergenceError) as e:
            trainer.fit(x, epochs=3, batch_size=8)
        reports[capture] = str(e.value).replace(str(tmp_path / capture), "RUN")
        params[capture] = list(trainer.params.values())
    assert trainer.gradients.capture.captured == 1
    assert "non-finite loss at step" in reports["replay"] and "model:x" in reports["replay"]
    assert reports["replay"] == reports["off"]
    for p0, p1 in zip(params["off"], params["replay"]):
        assert torch.equal(p0, p1)  # rolled back to the same good state


def test_compiled_graph_matches_the_plain_step():
    pytest.importorskip("torch._inductor")
    plain, plain_record, _ = _run(_vae, ELBO, "off", steps=4)
    fast, fast_record, _ = _run(_vae, ELBO, "compile", steps=4)
    assert fast.gradients.capture.captured == 1 and "(compile)" in fast.capture_report, fast.capture_report
    for (l0, n0, _), (l1, n1, _) in zip(plain_record, fast_record):
        assert torch.allclose(l0, l1, rtol=1e-5) and torch.allclose(n0, n1, rtol=1e-4)
    for p0, p1 in zip(plain.params.values(), fast.params.values()):
        assert torch.allclose(p0, p1, rtol=1e-4, atol=1e-6)


def test_a_training_step_compiles_its_first_batch_shape_only(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda gm, **kwargs: compiled.append(gm) or gm)  # the kernels are tested above
    model, guide = _vae()
    trainer = Trainer(model, guide, ELBO(), lr=1e-2, progress=False, capture="compile")
    x = _data()
    trainer.setup(x[:8])
    for batch in (x[:8], x[8:16], x[16:21], x[24:32], x[32:37]):  # the first step runs plainly (validation); then an
        # epoch's full batches and its ragged last batch of 5, twice
        trainer.step(batch)
    cache = trainer.gradients.capture
    assert len(compiled) == 1 and cache.captured == 2, cache.summary()
    assert sorted(g.mode for g in cache.graphs.values()) == ["compile", "replay"]
    assert any(e.startswith("[5, 12]") and "replayed, not compiled" in e for e in cache.events), cache.events

@pytest.mark.cuda
@pytest.mark.parametrize("name", ["elbo", "iwae-dreg", "geco"])
def test_replay_on_cuda_matches_the_plain_step(name):
    def build():
        m, g = _vae()
        return m.cuda(), g.cuda()

    results = {}
    for capture in ("off", "replay"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model, guide = build()
        trainer = Trainer(model, guide, OBJECTIVES[name](), lr=1e-2, progress=False, capture=capture)
        x = _data().cuda()
        trainer.setup(x[:8])
        losses = [trainer.step(x[i * 8:(i + 1) * 8])[0] for i in range(5)]
        results[capture] = (trainer, torch.stack(losses))
    plain, fast = results["off"][0], results["replay"][0]
    assert fast.gradients.capture.captured == 1, fast.capture_report
    assert torch.allclose(results["off"][1], results["replay"][1], rtol=1e-5)
    for p0, p1 in zip(plain.params.values(), fast.params.values()):
        assert torch.allclose(p0, p1, rtol=1e-4, atol=1e-6)


def test_objective_state_is_an_explicit_input_and_output_of_the_estimate():
    # the contract the fast path relies on: estimate(state) returns the next state and leaves the objective as it was
    pyro.clear_param_store()
    model, guide = _vae()
    x = _data(8)
    for objective in (BetaELBO(beta=1.0, schedule="linear", warmup_steps=5), GECO(tolerance=0.05, nu=5.0)):
        before = objective.state_dict()
        est = objective.estimate(model, guide, (x,), {}, objective.state)
        assert set(est.state) == set(objective.initial_state()) == set(before)
        after = objective.state_dict()
        assert all(torch.equal(torch.as_tensor(before[k]), torch.as_tensor(after[k])) or torch.isnan(torch.as_tensor(after[k])).all() for k in before)
        assert any(not torch.equal(est.state[k], objective.state[k]) for k in est.state)  # the next state moved
    assert Objective().initial_state() == {}


# --------------------------------------------------------------------------------------------------
# captured evaluation: log_likelihood(capture=...) against Pyro on every chunk


def _ll(model, guide, x, capture, seed=5, **kwargs):
    """log_likelihood from a fixed seed (several chunks of 7 particles and a ragged one, a ragged last batch),
    and the RNG state it leaves."""
    pyro.set_rng_seed(seed)
    kwargs = {"num_samples": 30, "batch_size": 8, "max_elements": 8 * D_X * 7, **kwargs}
    ll = E.log_likelihood(model, guide, x, capture=capture, **kwargs)
    return ll, torch.get_rng_state()


class CountingGuide(GaussianEncoder):
    """Counts how often its Python runs."""

    calls = 0

    def forward(self, x):
        CountingGuide.calls += 1
        return super().forward(x)


def test_replayed_log_likelihood_equals_the_plain_one_bit_for_bit():
    model, guide = _vae(z_dims=(3, 2), hidden=((16,), (8,)))  # two stochastic layers
    x = _data(20)
    plain, plain_rng = _ll(model, guide, x, "off")
    fast, fast_rng = _ll(model, guide, x, "replay")
    assert "plain" not in fast.capture and fast.capture.startswith("4 captured graph(s) (replay)"), fast.capture
    assert torch.equal(plain.values, fast.values) and torch.equal(plain.stderr, fast.stderr)
    assert torch.equal(plain_rng, fast_rng)


def test_compiled_log_likelihood_matches_the_plain_one():
    pytest.importorskip("torch._inductor")
    model, guide = _vae()
    x = _data(16)
    plain, plain_rng = _ll(model, guide, x, "off", batch_size=16, max_elements=16 * D_X * 7)  # chunks of 7 and 2
    fast, fast_rng = _ll(model, guide, x, "compile", batch_size=16, max_elements=16 * D_X * 7)
    assert fast.capture.startswith("2 captured graph(s) (compile)"), fast.capture
    assert torch.allclose(plain.values, fast.values, rtol=1e-5) and torch.allclose(plain.stderr, fast.stderr, rtol=1e-3)
    assert torch.equal(plain_rng, fast_rng)


def test_compile_failure_falls_back_to_replaying_the_graph(monkeypatch):
    def broken(*args, **kwargs):
        def run(*a):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model, guide = _vae()
    x = _data(8)
    plain, _ = _ll(model, guide, x, "off")
    fast, _ = _ll(model, guide, x, "compile")
    assert fast.capture.startswith("2 captured graph(s) (replay)"), fast.capture
    assert torch.equal(plain.values, fast.values)


def test_graphs_are_kept_between_calls_follow_parameter_updates_and_are_rechecked():
    pyro.clear_param_store()
    model, guide = VAE((D_X,), (3,), hidden=((16,),)), CountingGuide((D_X,), (3,), hidden=((16,),))
    x = _data(8)
    _ll(model, guide, x, "replay")
    CountingGuide.calls = 0
    with torch.no_grad():  # an optimiser step, in place
        for p in guide.parameters():
            p.add_(0.1)
    fast, fast_rng = _ll(model, guide, x, "replay")
    # this call ran Pyro only for the re-check of each of its two chunk shapes (plain, then the graph checked against it)
    assert CountingGuide.calls == 2, CountingGuide.calls
    plain, plain_rng = _ll(model, guide, x, "off")
    assert torch.equal(plain.values, fast.values) and torch.equal(plain_rng, fast_rng)


def test_a_program_changed_between_evaluations_is_caught_by_the_recheck():
    model, guide = TemperedVAE((D_X,), (3,), hidden=((16,),)), GaussianEncoder((D_X,), (3,), hidden=((16,),))
    x = _data(8)
    first, _ = _ll(model, guide, x, "replay")
    model.temperature = 0.5  # invisible to the recorded graph
    fast, _ = _ll(model, guide, x, "replay")
    assert "disagreed with the plain call at a re-check" in fast.capture, fast.capture
    plain, _ = _ll(model, guide, x, "off")
    assert torch.equal(plain.values, fast.values) and not torch.allclose(first.values, fast.values)


@pytest.mark.parametrize(
    "model_cls, reason",
    [
        (ItemVAE, "capture failed"),
        (PythonRandomVAE, "Python's or NumPy's random generator"),
        (StatefulVAE, "writes into tensors it did not create"),
    ],
)
def test_refused_evaluation_capture_runs_pyro_on_every_chunk(model_cls, reason):
    model, guide = model_cls((D_X,), (3,), hidden=((16,),)), GaussianEncoder((D_X,), (3,), hidden=((16,),))
    x = _data(8)
    random.seed(0)
    running = model.running.clone() if model_cls is StatefulVAE else None
    fast, _ = _ll(model, guide, x, "replay")
    assert fast.capture.startswith("0 captured graph(s)") and reason in fast.capture, fast.capture
    if model_cls is not PythonRandomVAE:  # draws nothing outside torch: the same values as Pyro on every chunk
        twin = model_cls((D_X,), (3,), hidden=((16,),))
        twin.load_state_dict(model.state_dict())
        if model_cls is StatefulVAE:
            twin.running.copy_(running)
        plain, _ = _ll(twin, guide, x, "off")
        assert torch.equal(plain.values, fast.values)
        if model_cls is StatefulVAE:  # the trial runs left the buffer as the plain chunks alone leave it
            assert torch.equal(model.running, twin.running)


def test_the_evaluation_cache_does_not_keep_models_alive():
    import gc
    import weakref

    model, guide = _vae()
    _ll(model, guide, _data(8), "replay")
    refs = weakref.ref(model), weakref.ref(guide)
    import pyrovae.capture as C

    key = (C.identity(model), C.identity(guide), "log_likelihood", "replay")
    assert key in C._SHARED
    del model, guide
    gc.collect()
    assert refs[0]() is None and refs[1]() is None
    assert key not in C._SHARED  # nor their graphs and parameters


def test_bad_evaluation_capture_mode_is_refused():
    with pytest.raises(ValueError, match="capture='fast' is not known"):
        E.log_likelihood(*_vae(), _data(4), num_samples=3, capture="fast")


def test_cli_eval_capture_auto_compiles_large_cpu_evaluations_only():
    from pyrovae.cli import AUTO_COMPILE_WORK, eval_capture_mode

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert eval_capture_mode("auto", 10000, 5000, cpu) == "compile"
    assert eval_capture_mode("auto", AUTO_COMPILE_WORK // 5000 - 1, 5000, cpu) == "off"
    assert eval_capture_mode("auto", 10000, 5000, cuda) == "off"
    assert eval_capture_mode("replay", 10, 10, cpu) == "replay"


def test_pointwise_ops_write_into_dead_temporaries_only():
    from torch.fx.experimental.proxy_tensor import make_fx

    from pyrovae.capture.fx_passes import lift_params

    def inplace_ops(fn, *args):
        gm, _ = lift_params(make_fx(fn)(*args))
        saved = [a.clone() for a in args]
        assert all(torch.equal(torch.as_tensor(o), torch.as_tensor(e)) for o, e in zip(torch.utils._pytree.tree_leaves(gm(*args)), torch.utils._pytree.tree_leaves(fn(*args))))
        assert all(torch.equal(a, s) for a, s in zip(args, saved))  # inputs are never written
        return sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target).split(".")[1].endswith("_"))

    a, b = torch.randn(3, 4), torch.randn(3, 4)
    # sigmoid's result is used once, by sub; sub's once, by mul: both reuse it
    assert inplace_ops(lambda a, b: (torch.sigmoid(a) - b) * 2, a, b) == ["aten.mul_.Tensor", "aten.sub_.Tensor"]
    assert inplace_ops(lambda a, b: b * torch.exp(a), a, b) == ["aten.mul_.Tensor"]  # commutative: the fresh operand is reused
    assert inplace_ops(lambda a, b: a - b, a, b) == []  # graph inputs
    assert inplace_ops(lambda a: (lambda s: (s - 1, s * 2))(torch.sigmoid(a)), a) == []  # a temporary used twice
    assert inplace_ops(lambda a, b: torch.sigmoid(a[:, :1]) + b, a, b) == []  # broadcast: the result is larger
    assert inplace_ops(lambda a, b: torch.sigmoid(a) * b, a, b.double()) == []  # type promotion: float64 result
    assert inplace_ops(lambda a, b: torch.sigmoid(a).t() - b.t(), a, b) == []  # a view of the temporary


def _products(gm: torch.fx.GraphModule) -> list:
    return sorted(tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default)


def test_compile_sums_a_reused_weights_gradient_with_one_product_over_all_steps():
    from torch.fx.experimental.proxy_tensor import make_fx

    from pyrovae.capture.fx_passes import _batch_summed_products, lift_params

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 48, generator=g).requires_grad_()  # input weights of a recurrence: [out, in]
    U = (0.1 * torch.randn(64, 64, generator=g)).requires_grad_()
    xs = torch.randn(6, 5, 48, generator=g)  # 6 steps of a batch of 5

    def step(xs):
        h = torch.zeros(5, 64)
        for x in xs:
            h = torch.tanh(x @ W.t() + h @ U.t())
        return torch.autograd.grad(h.square().sum(), [W, U])

    gm, _ = lift_params(make_fx(step)(xs), [W, U])
    want = step(xs)
    assert _products(gm).count((64, 48)) == 6  # one weight-gradient product per step, summed
    assert _batch_summed_products(gm.graph) == 2
    gm.recompile()
    assert _products(gm).count((64, 48)) == 1 and _products(gm).count((64, 64)) == 1
    for got, w in zip(gm(xs, W, U), want):  # the same sum, reassociated: to rounding
        assert torch.allclose(got, w, rtol=0, atol=1e-6 * float(w.abs().max()))


def test_summed_products_are_batched_only_where_it_pays_and_the_sum_is_used_once():
    from torch.fx.experimental.proxy_tensor import make_fx

    from pyrovae.capture.fx_passes import _batch_summed_products

    def summed(gs, hs, keep_partial=False, overwrite=False):
        acc = gs[0].t() @ hs[0]
        partial = acc
        for i in range(1, gs.shape[0]):
            g = gs[i] * 1.0
            acc = acc + g.t() @ hs[i]
            if overwrite:  # the operand changes after its product: one product at the end would read the new values
                g.mul_(2.0)
            partial = acc if i == 1 else partial
        return (acc, partial) if keep_partial else acc

    def rewritten(steps, rows, **kwargs):
        gs, hs = torch.randn(steps, rows, 64), torch.randn(steps, rows, 48)
        gm = make_fx(lambda a, b: summed(a, b, **kwargs))(gs, hs)
        n = _batch_summed_products(gm.graph)
        gm.recompile()
        for got, want in zip(torch.utils._pytree.tree_leaves(gm(gs, hs)), torch.utils._pytree.tree_leaves(summed(gs, hs, **kwargs))):
            assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
        return n, _products(gm)

    assert rewritten(6, 5) == (1, [(64, 48)])
    assert rewritten(3, 5)[0] == 0  # too few terms
    assert rewritten(6, 40)[0] == 0  # 40 rows: copying them costs more than the per-step sums
    assert rewritten(6, 5, keep_partial=True)[0] == 0  # a partial sum is used elsewhere
    assert rewritten(6, 5, overwrite=True)[0] == 0


@pytest.mark.cuda
@pytest.mark.parametrize("capture", ["replay", "compile"])
def test_captured_log_likelihood_on_cuda_matches_the_plain_one(capture):
    model, guide = _vae()
    model, guide = model.cuda(), guide.cuda()
    x = _data(16).cuda()
    results = {}
    for mode in ("off", capture):
        pyro.set_rng_seed(5)
        results[mode] = E.log_likelihood(model, guide, x, num_samples=30, batch_size=16, max_elements=16 * D_X * 7, capture=mode)
    assert results[capture].capture.startswith(f"2 captured graph(s) ({capture})"), results[capture].capture
    assert torch.allclose(results["off"].values, results[capture].values, rtol=1e-5)
