"""The conditional VAE model(target, context): shapes, the conditional prior, training with ELBO and GECO,
and the registry's choices on conditional data sets."""
import pyro
import pytest
import torch
from pyro import poutine

import pyrovae.evaluate as E
from pyrovae.data.derived import Pairs
from pyrovae.guides.conditional import ConditionalEncoder
from pyrovae.models.conditional import ConditionalConvDRAW, ConditionalVAE
from pyrovae.objectives import ELBO, GECO
from pyrovae.cli.registry import build_guide, build_model
from pyrovae.train import Trainer

X, C = (1, 8, 8), (2, 8, 8)


def toy_pairs(n=256, seed=0):
    """The target is the context's first channel flipped: it is a function of the context, so a model that
    reads the context explains it far better than one that cannot."""
    g = torch.Generator().manual_seed(seed)
    context = (torch.rand(n, *C, generator=g) > 0.5).float()
    target = context[:, :1].flip(-1)
    return Pairs(target, context)


def test_sites_and_shapes():
    model, guide = ConditionalVAE(X, C, z_dim=3, hidden=(16,)), ConditionalEncoder(X, C, z_dim=3, hidden=(16,))
    t, c = toy_pairs(5)
    tr = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(t, c))).get_trace(t, c)
    assert tr.nodes["z"]["value"].shape == (5, 3) and tr.nodes["x"]["is_observed"]
    # the prior depends on the context: two contexts give two different p(z | c)
    h = model.context_net(c[:2])
    p = model.prior(h)
    assert not torch.allclose(p.mean[0], p.mean[1])


def test_wrong_context_shape():
    model = ConditionalVAE(X, C, z_dim=3, hidden=(16,))
    with pytest.raises(ValueError, match="context_shape"):
        model(torch.zeros(2, *X), torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("objective", [ELBO(), GECO(constraint="RE", tolerance=0.05)])
def test_trains_through_trainer(objective):
    data = toy_pairs()
    model, guide = ConditionalVAE(X, C, z_dim=4, hidden=(64,)), ConditionalEncoder(X, C, z_dim=4, hidden=(64,))
    before = E.elbo_terms(model, guide, data)["recon"]
    Trainer(model, guide, objective, lr=3e-3, progress=False).fit(data, epochs=30, batch_size=64)
    after = E.elbo_terms(model, guide, data)["recon"]
    # 64 random pixels: 64 log 2 = 44.4 nats of reconstruction error for a model that uses neither z nor the context
    assert before < -40 and after > -30


def test_registry_on_conditional_dataset():
    cfg = {"dataset": "mnist-sum", "model": "cvae", "z_dims": [4]}
    model = build_model(cfg, (1, 28, 28))
    guide = build_guide(cfg, (1, 28, 28), model)
    assert isinstance(model, ConditionalVAE) and model.context_shape == (2, 28, 28) and isinstance(guide, ConditionalEncoder)
    draw_cfg = {"dataset": "mnist-rotate", "model": "convdraw", "draw_steps": 2}
    draw = build_model(draw_cfg, (1, 28, 28))
    assert isinstance(draw, ConditionalConvDRAW) and draw.context_shape == (1, 28, 28)
    build_guide(draw_cfg, (1, 28, 28), draw)(torch.zeros(2, 1, 28, 28), torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="mnist-sum"):
        build_model({"dataset": "mnist", "model": "cvae"}, (1, 28, 28))


@pytest.mark.parametrize("model,extra", [("cvae", ["--z-dims", "4", "--hidden", "32", "--objective", "geco", "--tolerance", "0.3"]), ("convdraw", ["--draw-steps", "2"])])
def test_cli_trains_and_evaluates_on_conditional_data(data_root, tmp_path, monkeypatch, model, extra):
    import json
    import math

    from pyrovae.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "run"
    code = main([
        "train", "--dataset", "mnist-sum", "--model", model, *extra, "--train-limit", "200", "--valid-size", "100", "--epochs", "1",
        "--run-dir", str(run), "--eval-samples", "5", "--eval-limit", "20", "--no-progress", "--data-dir", str(data_root), "--device", "cpu",
    ])
    assert code == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert math.isfinite(result["test_nll"]) and result["num_test"] == 20 and (run / "samples.png").stat().st_size > 0
