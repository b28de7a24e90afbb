"""Data beyond one tensor: conditional models ``model(x, y)`` and masked sequence models ``model(tokens, lengths)``
through the trainer, the objectives, the evaluation and the captured fast path, with no special case."""
import math
import os
import signal

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace

import pyrovae.evaluate as E
from pyrovae.data import Batches, as_inputs
from pyrovae.objectives import ELBO, IWAE, Objective
from pyrovae.train import DivergenceError, Trainer, TrainingInterrupted

X_DIM, Z_DIM, CLASSES = 6, 2, 3


def conditional_data(n: int, seed: int = 0):
    """x = W z + offset[y] + noise, with well-separated class offsets: a model that pairs x with the wrong y
    cannot explain it."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=g)
    y = torch.nn.functional.one_hot(labels, CLASSES).double()
    w = torch.randn(X_DIM, Z_DIM, generator=g, dtype=torch.float64)
    offsets = 3.0 * torch.randn(CLASSES, X_DIM, generator=g, dtype=torch.float64)
    z = torch.randn(n, Z_DIM, generator=g, dtype=torch.float64)
    x = z @ w.T + y @ offsets + 0.3 * torch.randn(n, X_DIM, generator=g, dtype=torch.float64)
    return x, y


def conditional_vae():
    """A conditional VAE written as a user writes it, as plain Pyro functions ``model(x, y)``, ``guide(x, y)``
    (linear-Gaussian, so that log p(x | y) has a closed form: N(B y + c, W W^T + s^2 I))."""
    decoder = torch.nn.ModuleDict({"z": torch.nn.Linear(Z_DIM, X_DIM), "y": torch.nn.Linear(CLASSES, X_DIM, bias=False)}).double()
    encoder = torch.nn.Linear(X_DIM + CLASSES, 2 * Z_DIM).double()

    def model(x, y):
        pyro.module("decoder", decoder)
        noise = pyro.param("noise", torch.tensor(1.0, dtype=x.dtype), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder["z"](z) + decoder["y"](y), noise).to_event(1), obs=x)

    def guide(x, y):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = encoder(torch.cat([x, y], -1)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    @torch.no_grad()
    def exact_log_likelihood(x, y):
        w = decoder["z"].weight
        cov = w @ w.T + pyro.param("noise").pow(2) * torch.eye(X_DIM, dtype=x.dtype)
        return dist.MultivariateNormal(decoder["y"](y) + decoder["z"].bias, cov).log_prob(x)

    return model, guide, exact_log_likelihood


def test_a_conditional_vae_of_plain_pyro_functions_trains_and_evaluates_on_tuple_data():
    x, y = conditional_data(600)
    model, guide, exact = conditional_vae()
    trainer = Trainer(model, guide, IWAE(num_particles=4), lr=0.05, progress=False)
    history = trainer.fit((x, y), epochs=12, batch_size=50, valid=(x[:200], y[:200]))
    assert "plain" not in trainer.capture_report and "captured" in trainer.capture_report, trainer.capture_report
    assert history[-1]["valid_elbo"] > history[0]["valid_elbo"]
    # the decoder learned how x depends on its own label: every batch paired x and y by the same permutation
    paired, shuffled = exact(x, y).mean(), exact(x, y[torch.randperm(600)]).mean()
    assert paired > shuffled + 3, (float(paired), float(shuffled))

    # evaluated on tuple data in chunks of 128 (the last one ragged): the estimate matches log p(x | y) in closed form
    ll = E.log_likelihood(model, guide, (x, y), num_samples=1000, batch_size=128)
    truth = exact(x, y)
    assert ll.values.shape == truth.shape == (600,)
    pooled = float(ll.stderr.pow(2).mean().sqrt() / math.sqrt(600))
    assert abs(float((ll.values - truth).mean())) < 4 * pooled + 1e-9, (float((ll.values - truth).mean()), pooled)
    assert float(((ll.values - truth) / ll.stderr).abs().max()) < 6

    # extra arguments, positional or by keyword, are chunked with the data: the same numbers as the tuple
    results = []
    for call in (
        lambda: E.log_likelihood(model, guide, (x, y), num_samples=20, batch_size=128),
        lambda: E.log_likelihood(model, guide, x, 20, 128, None, y),
        lambda: E.log_likelihood(model, guide, x, num_samples=20, batch_size=128, y=y),
    ):
        pyro.set_rng_seed(4)
        results.append(call().values)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    terms = []
    for call in (lambda: E.elbo_terms(model, guide, (x, y), 2, 128), lambda: E.elbo_terms(model, guide, x, 2, 128, y)):
        pyro.set_rng_seed(4)
        terms.append(call())
    assert terms[0] == terms[1]
    assert E.active_units(guide, (x, y)) == E.active_units(guide, x, y=y) == {"z": 2}
    assert E.reconstruct(model, guide, (x[:5], y[:5])).shape == (5, X_DIM)
    assert E.sample(model, 4, (X_DIM,), inputs=(y[:4],), dtype=y.dtype).shape == (4, X_DIM)


def test_mismatched_first_dimensions_are_named():
    x, y = conditional_data(40)
    model, guide, _ = conditional_vae()
    shapes = r"\(40, 6\), \(39, 3\)"
    with pytest.raises(ValueError, match=f"different first dimensions.*{shapes}"):
        Trainer(model, guide, ELBO(), progress=False).fit((x, y[:-1]), epochs=1, batch_size=8)
    with pytest.raises(ValueError, match=f"different first dimensions.*{shapes}"):
        Trainer(model, guide, ELBO(), progress=False).fit((x, y), epochs=1, batch_size=8, valid=(x, y[:-1]))
    with pytest.raises(ValueError, match=f"different first dimensions.*{shapes}"):
        E.log_likelihood(model, guide, (x, y[:-1]), num_samples=2)
    with pytest.raises(ValueError, match=r"positional argument 1 has shape \(39, 3\) but the data has N=40 rows"):
        E.log_likelihood(model, guide, x, 2, 100, None, y[:-1])
    with pytest.raises(ValueError, match=r"keyword argument 'y' has shape \(39, 3\)"):
        E.active_units(guide, x, y=y[:-1])
    with pytest.raises(ValueError, match=f"different first dimensions.*{shapes}"):
        Batches((x, y[:-1]), 8)
    with pytest.raises(TypeError, match="tuple of tensors"):
        as_inputs((x, [1, 2]))


def test_tuple_batches_share_one_permutation_and_only_the_first_tensor_is_binarised():
    index = torch.arange(20)
    probs = (index % 2).float()[:, None].expand(20, 4)  # 0/1 rows: their Bernoulli draw is the row itself
    extra = torch.rand(20, 3)  # grey levels that must stay as they are
    seen = []
    for xb, ib, eb in Batches((probs, index, extra), 6, dynamic_binarize=True):
        assert torch.equal(xb, probs[ib]) and torch.equal(eb, extra[ib])
        seen += ib.tolist()
    assert sorted(seen) == list(range(20))
    assert isinstance(next(iter(Batches(probs, 6))), torch.Tensor)  # one tensor in, tensors out, as before


def _fit_pair(capture: str, data, objective=ELBO, seed: int = 0, **kwargs):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, guide, _ = conditional_vae()
    trainer = Trainer(model, guide, objective(), lr=1e-2, progress=False, capture=capture, **kwargs)
    history = trainer.fit(data, epochs=2, batch_size=16)  # 40 examples: two batches of 16 and one of 8 per epoch
    return trainer, history, torch.get_rng_state()


@pytest.mark.parametrize("objective", [ELBO, lambda: IWAE(num_particles=3)], ids=["elbo", "iwae"])
def test_tuple_batches_replay_bit_for_bit_like_the_plain_step(objective):
    x, y = conditional_data(40)
    plain, plain_history, plain_rng = _fit_pair("off", (x, y), objective)
    fast, fast_history, fast_rng = _fit_pair("replay", (x, y), objective)
    assert fast.gradients.capture.captured == 2 and "plain" not in fast.capture_report, fast.capture_report
    for (name, p0), p1 in zip(plain.params.items(), fast.params.values()):
        assert torch.equal(p0, p1), name
    assert [r["train_loss"] for r in plain_history] == [r["train_loss"] for r in fast_history]
    assert torch.equal(plain_rng, fast_rng)


def test_a_tensor_and_a_one_tensor_tuple_train_identically():
    x, y = conditional_data(40)

    def fit(data):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model, guide = IgnoringY(), IgnoringYGuide()
        trainer = Trainer(model, guide, ELBO(), lr=1e-2, progress=False)
        trainer.fit(data, epochs=2, batch_size=16)
        return trainer

    a, b = fit(x), fit((x,))
    for p0, p1 in zip(a.params.values(), b.params.values()):
        assert torch.equal(p0, p1)


class IgnoringY(torch.nn.Module):
    """``model(x)`` only: a single-tensor program for the tensor-vs-tuple comparison."""

    def __init__(self):
        super().__init__()
        self.decoder = torch.nn.Linear(Z_DIM, X_DIM).double()

    def forward(self, x):
        pyro.module("decoder", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)


class IgnoringYGuide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(X_DIM, 2 * Z_DIM).double()

    def forward(self, x):
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


posix_only = pytest.mark.skipif(os.name != "posix", reason="sends a POSIX signal to this process")


@posix_only
def test_mid_epoch_resume_with_tuple_data_gives_the_same_parameters(tmp_path):
    x, y = conditional_data(40)
    reference, _, _ = _fit_pair("replay", (x, y), run_dir=tmp_path / "ref")

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide, _ = conditional_vae()
    interrupted = Trainer(model, guide, ELBO(), lr=1e-2, progress=False, run_dir=tmp_path / "run")
    step = interrupted.step

    def signalling_step(*batch):
        if interrupted.cursor.step + 1 == 5:  # epoch 2, batch 2
            os.kill(os.getpid(), signal.SIGINT)
        return step(*batch)

    interrupted.step = signalling_step
    with pytest.raises(TrainingInterrupted):
        interrupted.fit((x, y), epochs=2, batch_size=16)
    assert (interrupted.cursor.epoch, interrupted.cursor.pos) == (1, 2)

    pyro.clear_param_store()
    pyro.set_rng_seed(123)  # other weights and RNG: all must come from the checkpoint
    model, guide, _ = conditional_vae()
    resumed = Trainer(model, guide, ELBO(), lr=1e-2, progress=False, run_dir=tmp_path / "run")
    resumed.resume(tmp_path / "run" / "checkpoints" / "last.pt", x[:16], y[:16])
    resumed.fit((x, y), epochs=2, batch_size=16)
    for (name, p0), p1 in zip(reference.params.items(), resumed.params.values()):
        assert torch.equal(p0, p1), name


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_divergence_with_tuple_data_is_diagnosed_and_rolled_back_like_a_single_tensor(tmp_path):
    x, y = conditional_data(64)
    y[45] = float("nan")  # poisons whichever step draws example 45 (the trainer refuses NaN in x, the observed data)
    pyro.enable_validation(False)
    reports, params = {}, {}
    for capture in ("off", "replay"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model, guide, _ = conditional_vae()
        trainer = Trainer(model, guide, ELBO(), progress=False, check_every=5, capture=capture, run_dir=tmp_path / capture)
        with pytest.raises(DivergenceError) as e:
            trainer.fit((x, y), epochs=3, batch_size=8)
        reports[capture] = str(e.value).replace(str(tmp_path / capture), "RUN")
        params[capture] = list(trainer.params.values())
    assert trainer.gradients.capture.captured == 1
    assert "non-finite loss at step" in reports["replay"] and "model:x" in reports["replay"], reports["replay"]
    assert reports["replay"] == reports["off"]
    for p0, p1 in zip(params["off"], params["replay"]):
        assert torch.equal(p0, p1)


def test_a_tracing_failure_is_reported_in_one_readable_line():
    def model(x, y):
        if float(y.sum()) > 0:  # Python control flow on a tensor's value
            conditional_model(x, y)

    x, y = conditional_data(16)
    conditional_model, guide, _ = conditional_vae()
    trainer = Trainer(model, guide, ELBO(), progress=False)
    trainer.fit((x, y), epochs=1, batch_size=8)
    report = trainer.capture_report
    assert "capture failed (the program reads a tensor's value in Python" in report and "\n" not in report, report
    assert "make_fx" not in report and "tracing_mode" not in report
    ll = E.log_likelihood(model, guide, (x, y), num_samples=4, capture="replay")
    assert "reads a tensor's value in Python" in ll.capture and "make_fx" not in ll.capture, ll.capture


# --------------------------------------------------------------------------------------------------
# a masked variable-length sequence model: padding changes nothing

VOCAB, MAX_LEN, Z_SEQ = 5, 7, 3


class SequenceVAE(torch.nn.Module):
    """model(tokens, lengths): z ~ N(0, I) per sequence, token t ~ Categorical(W z + position_t), the padded steps
    masked out with ``poutine.mask``; guide(tokens, lengths): a Gaussian from the mean embedding of the real steps."""

    def __init__(self):
        super().__init__()
        self.decoder = torch.nn.Linear(Z_SEQ, VOCAB).double()
        self.position = torch.nn.Parameter(torch.randn(MAX_LEN, VOCAB, dtype=torch.float64))
        self.embed = torch.nn.Embedding(VOCAB, 2 * Z_SEQ).double()

    @staticmethod
    def mask(tokens, lengths):
        return torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]

    def model(self, tokens, lengths):
        pyro.module("sequence_vae", self)
        b, steps = tokens.shape
        with pyro.plate("data", b, dim=-2):
            z = pyro.sample("z", dist.Normal(tokens.new_zeros(b, 1, Z_SEQ, dtype=torch.float64), 1.0).to_event(1))
            logits = self.decoder(z) + self.position[:steps]
            with pyro.plate("steps", steps, dim=-1), poutine.mask(mask=self.mask(tokens, lengths)):
                pyro.sample("x", dist.Categorical(logits=logits), obs=tokens)

    def guide(self, tokens, lengths):
        pyro.module("sequence_vae", self)
        b = tokens.shape[0]
        h = (self.embed(tokens) * self.mask(tokens, lengths)[..., None]).sum(1) / lengths[:, None]
        loc, log_scale = h.chunk(2, -1)
        with pyro.plate("data", b, dim=-2):
            pyro.sample("z", dist.Normal(loc[:, None], log_scale.exp()[:, None]).to_event(1))


def sequences(n: int, seed: int = 0, pad: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, MAX_LEN + 1, (n,), generator=g)
    tokens = torch.randint(VOCAB, (n, MAX_LEN), generator=g)
    tokens[torch.arange(MAX_LEN) >= lengths[:, None]] = pad
    return tokens, lengths


def _log_weights_at(objective, vae, z, tokens, lengths):
    """Per-datum log weights of the sequences at the given z ([P, B, 1, Z_SEQ])."""
    values = Trace()
    values.add_node("z", name="z", type="sample", value=z, is_observed=False, infer={})
    return objective.rescore(vae.model, vae.guide, (tokens, lengths), {}, values).log_w


def test_a_masked_sequence_model_trains_and_its_bound_equals_the_one_on_unpadded_sequences():
    tokens, lengths = sequences(96)
    vae = SequenceVAE()
    trainer = Trainer(vae.model, vae.guide, IWAE(num_particles=4), lr=0.05, progress=False)
    history = trainer.fit((tokens, lengths), epochs=4, batch_size=32)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert "plain" not in trainer.capture_report, trainer.capture_report

    objective = Objective(num_particles=8)
    batch = tokens[:12], lengths[:12]
    z = objective.log_weights(vae.model, vae.guide, *batch).guide_trace.nodes["z"]["value"].detach()
    padded = _log_weights_at(objective, vae, z, *batch)
    # other tokens in the padding: nothing changes
    other = batch[0].masked_fill(~SequenceVAE.mask(*batch), VOCAB - 1)
    assert torch.equal(padded, _log_weights_at(objective, vae, z, other, batch[1]))
    for i in range(12):
        n = int(lengths[i])
        alone = _log_weights_at(objective, vae, z[:, i : i + 1], tokens[i : i + 1, :n], lengths[i : i + 1])
        # the same per-datum log weights and IWAE bound as the sequence alone (bit for bit on the development
        # machine; to float64 rounding, where a sum over 7 padded steps may be associated otherwise than over n)
        assert torch.allclose(padded[:, i], alone[:, 0], rtol=0, atol=1e-12), (i, padded[:, i] - alone[:, 0])
        bound = lambda lw: torch.logsumexp(lw, 0) - math.log(lw.shape[0])  # noqa: E731
        assert torch.allclose(bound(padded[:, i]), bound(alone[:, 0]), rtol=0, atol=1e-12)

    # the evaluation takes the tuple as the trainer does, captured or not, with the same numbers
    results = {}
    for capture in ("off", "replay"):
        pyro.set_rng_seed(2)
        results[capture] = E.log_likelihood(vae.model, vae.guide, (tokens, lengths), num_samples=30, batch_size=40, max_elements=40 * MAX_LEN * 7, capture=capture)
    assert "plain" not in results["replay"].capture, results["replay"].capture
    assert torch.equal(results["off"].values, results["replay"].values)


def test_setup_takes_a_batch_as_separate_tensors_or_as_one_tuple():
    x, y = conditional_data(8)
    names = []
    for batch in ((x, y), ((x, y),)):
        pyro.clear_param_store()
        model, guide, _ = conditional_vae()
        trainer = Trainer(model, guide, ELBO(), progress=False)
        trainer.setup(*batch)
        names.append(sorted(trainer.params))
    assert names[0] == names[1] and "noise" in names[0]
