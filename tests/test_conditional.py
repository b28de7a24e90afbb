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


# ================================================================================================
# issue 26, item 7: pyrovae evaluate --marginal-kl on a conditional run


def _write_idx(path, arr):
    import struct

    import numpy as np

    arr = np.ascontiguousarray(arr, np.uint8)
    path.write_bytes(struct.pack(f">{1 + arr.ndim}I", 0x800 + arr.ndim, *arr.shape) + arr.tobytes())


@pytest.fixture(scope="module")
def fake_mnist_root(tmp_path_factory):
    """MNIST's 4 files with random images: 60 training images, 10 test images (one per label, so mnist-sum's test
    contexts, pairs of test images, repeat once there are more than 100 of them)."""
    import numpy as np

    root = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    (root / "mnist").mkdir()
    for prefix, n in (("train", 60), ("t10k", 10)):
        _write_idx(root / "mnist" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def test_cli_marginal_kl_on_a_conditional_run(fake_mnist_root, tmp_path, monkeypatch, capsys):
    import json

    from pyrovae.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run, data = tmp_path / "run", str(fake_mnist_root)
    assert main([
        "train", "--dataset", "mnist-sum", "--model", "cvae", "--z-dims", "2", "--hidden", "16", "--train-limit", "100", "--valid-size", "50",
        "--epochs", "1", "--batch-size", "50", "--eval-samples", "0", "--no-progress", "--capture", "off", "--device", "cpu",
        "--data-dir", data, "--run-dir", str(run),
    ]) == 0
    # dynamic binarisation (the default) of (target, context) pairs: was AttributeError ('Pairs' has no 'device')
    evaluate = ["evaluate", str(run), "-k", "2", "--marginal-kl", "--device", "cpu", "--data-dir", data, "--no-progress"]
    assert main([*evaluate, "--limit", "200"]) == 0
    r = json.loads((run / "evaluation-limit200.json").read_text())["marginal_kl"]
    assert r["num_components"] == 200 and 1 < r["num_contexts"] < 200  # the conditional value: contexts repeat
    capsys.readouterr()
    assert main([*evaluate, "--limit", "5"]) == 2  # five distinct contexts: refused by marginal_kl, as a message
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--marginal-kl" in err and "distinct" in err and "--limit" in err
