"""The contract over the whole registry (in the style of zuko's one test over every flow): every registered model
x every registered guide x every objective either trains through the library's Trainer and through
``pyro.infer.SVI`` and evaluates, or is refused before any step with a ``ValueError``/``TypeError`` that says
why. No other outcome: no raw ``RuntimeError``/``IndexError``/``AttributeError`` from deep inside a pairing
that the registry lets the user ask for.

Each model gets the data kind its entry needs (images, sentences, or (target, context) pairs of a
conditional data set), at small sizes so that the whole grid runs in the default suite.
"""
from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from pyrovae.cli.registry import GUIDES, MODEL_GUIDES, MODELS, OBJECTIVES, build_guide, build_model, build_objective, default_guide
from pyrovae.data.derived import Pairs
from pyrovae.data.text import Sentences
from pyrovae.evaluate import elbo_terms
from pyrovae.train import Trainer

TEXT_MODELS = {"sentence", "lm"}
CONDITIONAL_MODELS = {name for name, entry in MODELS.items() if getattr(entry, "conditional", False) and name != "convdraw"}
VOCAB = 12
SMALL = {
    "z_dims": [2], "hidden": [[8]], "draw_steps": 2, "draw_z": 2, "lstm_size": 8, "embed_dim": 6, "flow_length": 2,
    "num_particles": 2, "tolerance": 0.5, "warmup_steps": 10,
}


def _data(model: str):
    """``(cfg additions, x_shape, data)`` for a model: images, sentences or conditional pairs."""
    g = torch.Generator().manual_seed(0)
    if model in TEXT_MODELS:
        lengths = torch.randint(2, 6, (12,), generator=g)
        tokens = torch.zeros(12, 7, dtype=torch.long)
        tokens[:, 0] = 1  # <sos>
        for i, n in enumerate(lengths.tolist()):
            tokens[i, 1:n] = torch.randint(4, VOCAB, (n - 1,), generator=g)
            tokens[i, n] = 2  # <eos>
        return {}, (VOCAB,), Sentences(tokens, lengths)
    if model in CONDITIONAL_MODELS:
        target = torch.rand(12, 1, 28, 28, generator=g).round()
        context = torch.rand(12, 2, 28, 28, generator=g).round()
        return {"dataset": "mnist-sum"}, (1, 28, 28), Pairs(target, context)
    return {}, (1, 8, 8), torch.rand(12, 1, 8, 8, generator=g).round()


def _pairings():
    """Every model x guide under the ELBO and every model's default guide under every objective in the default
    suite; the rest of the grid (the same kinds of pairings again) under ``-m slow``."""
    for model in MODELS:
        for guide in [*GUIDES, *MODEL_GUIDES]:
            for objective in OBJECTIVES:
                fast = objective == "elbo" or guide == default_guide(model)
                marks = () if fast else (pytest.mark.slow,)
                yield pytest.param(model, guide, objective, id=f"{model}-{guide}-{objective}", marks=marks)


REFUSED = (ValueError, TypeError, NotImplementedError)


def _build(model: str, guide: str, objective: str):
    extra, x_shape, data = _data(model)
    cfg = {**SMALL, **extra, "model": model, "guide": guide, "objective": objective}
    if objective in ("variance", "logvariance"):
        cfg["num_particles"] = 3
    m = build_model(cfg, x_shape)
    q = build_guide(cfg, x_shape, m)
    return m, q, build_objective(cfg), data


@pytest.mark.parametrize("model,guide,objective", list(_pairings()))
def test_every_pairing_trains_or_is_refused_with_a_message(model, guide, objective):
    pyro.set_rng_seed(0)
    try:
        m, q, obj, data = _build(model, guide, objective)
        trainer = Trainer(m, q, obj, lr=1e-3, progress=False)
        history = trainer.fit(data, epochs=1, batch_size=6)
    except REFUSED as e:
        message = str(e)
        assert len(message) > 30, f"{model}/{guide}/{objective} refused without saying why: {type(e).__name__}: {message!r}"
        return
    losses = [r["train_loss"] for r in history]
    assert losses and all(math.isfinite(v) for v in losses), (model, guide, objective, losses)
    # the same pairing through Pyro's SVI, and an evaluation of the trained pair
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    m, q, obj, data = _build(model, guide, objective)
    svi = SVI(m, q, Adam({"lr": 1e-3}), loss=obj)
    batch = tuple(data[:6]) if isinstance(data, tuple) else (data[:6],)
    assert math.isfinite(svi.step(*batch))
    for module in (m, q):
        module.eval()
    terms = elbo_terms(m, q, data[:6] if not isinstance(data, tuple) else type(data)(*(t[:6] for t in data)))
    assert math.isfinite(terms["elbo"]), (model, guide, objective, terms)


def test_each_model_trains_with_its_default_guide_under_the_elbo():
    """The grid above must not pass by refusing everything: every model trains with its default guide."""
    for model in MODELS:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        m, q, obj, data = _build(model, default_guide(model), "elbo")
        history = Trainer(m, q, obj, lr=1e-3, progress=False).fit(data, epochs=1, batch_size=6)
        assert math.isfinite(history[-1]["train_loss"]), model
