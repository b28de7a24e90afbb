"""The trainer on real data, learning-rate schedules, and the CLI's three subcommands."""
import json
import math

import pytest
import torch

import pyrovae.evaluate as E
from pyrovae.cli import main
from pyrovae.data import load_dataset
from pyrovae.guides import GaussianEncoder
from pyrovae.models import VAE
from pyrovae.objectives import ELBO
from pyrovae.train import Trainer, lr_factor


def test_training_on_a_slice_of_mnist_lowers_the_test_loss(data_root):
    splits = load_dataset("binarized-mnist", data_dir=data_root)
    train, test = splits.train[:3000], splits.test[:500]
    model, guide = VAE((1, 28, 28), (20,), hidden=[(100,)]), GaussianEncoder((1, 28, 28), (20,), hidden=[(100,)])
    before = E.elbo_terms(model, guide, test)["elbo"]
    Trainer(model, guide, ELBO(), lr=3e-3, progress=False).fit(train, epochs=6, batch_size=50)
    after = E.elbo_terms(model, guide, test)
    # baseline: independent pixels at their training means (what a VAE that ignores z can reach)
    p = train.mean(0).clamp(1e-3, 1 - 1e-3)
    independent = (test * p.log() + (1 - test) * (1 - p).log()).flatten(1).sum(1).mean()
    assert before < -500  # an untrained decoder: ~784 log 0.5
    assert after["elbo"] > independent + 10, (after, float(independent))
    assert after["kl"] > 5  # the latent code is used
    ll = E.log_likelihood(model, guide, test[:100], num_samples=200)
    # the importance-sampled log-likelihood is a tighter bound than the ELBO on the same data
    assert ll.values.mean() > E.elbo_terms(model, guide, test[:100])["elbo"]


def test_stale_param_store_is_an_error_not_a_silent_no_op():
    x = torch.rand(20, 1, 28, 28).round()
    Trainer(VAE(z_dims=(3,)), GaussianEncoder(z_dims=(3,)), ELBO(), progress=False).fit(x, 1, 10)
    with pytest.raises(ValueError, match="clear_param_store"):
        Trainer(VAE(z_dims=(3,)), GaussianEncoder(z_dims=(3,)), ELBO(), progress=False).fit(x, 1, 10)


def test_lr_schedules():
    assert lr_factor("constant", 7, 10) == 1.0
    assert lr_factor("exponential", 2, 10, gamma=0.5) == 0.25
    assert lr_factor("cosine", 10, 10) == pytest.approx(0.0)
    # Burda et al.: 3^i epochs at 10^(-i/7): epoch 0 -> i=0, epochs 1-3 -> i=1, epochs 4-12 -> i=2
    assert [lr_factor("iwae", e, 0) for e in (0, 1, 3, 4, 12, 13)] == [1.0, 10 ** (-1 / 7), 10 ** (-1 / 7), 10 ** (-2 / 7), 10 ** (-2 / 7), 10 ** (-3 / 7)]
    with pytest.raises(ValueError, match="constant"):
        lr_factor("warm", 0, 1)


def test_cli_train_evaluate_sample(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--data-dir", str(data_root), "--device", "cpu"]
    code = main(["train", "--dataset", "binarized-mnist", "--epochs", "1", "--z-dims", "2", "--hidden", "32", "--run-dir", str(run), "--eval-samples", "20", "--eval-limit", "50", "--no-progress", *common])
    assert code == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert result["num_test"] == 50 and result["num_samples"] == 20
    assert 50 < result["test_nll"] < 400 and result["test_nll"] <= -result["test_elbo"] + 1.0
    for name in ("samples.png", "reconstructions.png", "latent.png", "manifold.png", "config.json", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and math.isfinite(record["valid_elbo"])

    assert main(["evaluate", str(run), "-k", "10", "--limit", "30", "--data-dir", str(data_root), "--device", "cpu"]) == 0
    assert json.loads((run / "evaluation-limit30.json").read_text())["num_test"] == 30  # named by its limit, beside the run's own

    out = tmp_path / "s.png"
    assert main(["sample", str(run), "-n", "9", "--out", str(out), "--device", "cpu"]) == 0
    assert out.is_file() and out.stat().st_size > 100


@pytest.mark.parametrize("command", ["train", "evaluate", "sample"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: pyrovae " + command in capsys.readouterr().out


# issue 26: training data of another dtype, a list of examples, meta and sparse tensors get messages that name them
@pytest.mark.parametrize("make,error,message", [
    (lambda x: x.double(), TypeError, r"dtype torch\.float64 but the model's parameters are torch\.float32"),  # was: "Check ... example shape"
    (lambda x: x.half(), TypeError, r"dtype torch\.float16 but the model's parameters are torch\.float32"),
    (lambda x: list(x), TypeError, r"sequence of 20 tensors of shape \(6,\), one example each.*torch\.stack"),  # was: "examples of shape ()"
    (lambda x: torch.empty(20, 6, device="meta"), ValueError, r"on the meta device"),  # was: RuntimeError from .item()
    (lambda x: x.to_sparse(), TypeError, r"sparse tensor.*to_dense\(\)"),  # was: NotImplementedError
])
def test_fit_names_training_data_it_cannot_use(make, error, message):
    model = VAE(x_shape=(6,), z_dims=(2,), hidden=((8,),))
    trainer = Trainer(model, GaussianEncoder(x_shape=(6,), z_dims=(2,), hidden=((8,),)), ELBO(), progress=False)
    with pytest.raises(error, match=message):
        trainer.fit(make(torch.rand(20, 6)), 1, batch_size=10)
