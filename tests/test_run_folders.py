"""Run folders as input and output (issues 26 and 28): text runs carry their vocabulary, outputs are named by
what produced them and never replace each other, ``--overwrite`` and ``--resume`` see the whole folder, and a
run folder from a stranger cannot exhaust the machine.

Tiny synthetic data sets (registered for the test) and tiny models; the ``--overwrite`` and ``--resume`` tests
run the CLI in processes of their own.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrovae.data.core as D
from pyrovae.train.checkpoint import load_checkpoint, save_checkpoint
from pyrovae.cli import main

D_X = 20
TINY = "tiny-test"


def _read_tiny(folder: Path) -> D.RawData:
    z = np.load(folder / "tiny.npz")
    return D.RawData(train=torch.from_numpy(z["train"]), test=torch.from_numpy(z["test"]))


def _write_tiny(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / TINY).mkdir(parents=True, exist_ok=True)
    np.savez(root / TINY / "tiny.npz", train=rng.random((120, D_X)).astype(np.float32), test=rng.random((30, D_X)).astype(np.float32))
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """``tiny-test``: 120 + 30 examples in [0, 1]."""
    root = _write_tiny(tmp_path_factory.mktemp("data"))
    with pytest.MonkeyPatch.context() as mp:  # register on copies, so the registry is back as it was afterwards
        mp.setattr(D, "DATASETS", dict(D.DATASETS))
        mp.setattr(D, "_SPECS", dict(D._SPECS))
        D.register_dataset(TINY, ["tiny.npz"])(_read_tiny)
        yield root


def train_args(data_dir, run_dir, *extra):
    return [
        "train", "--dataset", TINY, "--data-dir", str(data_dir), "--valid-size", "20", "--z-dims", "2", "--hidden", "16",
        "--batch-size", "10", "--device", "cpu", "--eval-samples", "0", "--no-progress", "--capture", "off", "--run-dir", str(run_dir), *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_args(data_dir, run, "--epochs", "1")) == 0
    return run


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def cli_error(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


from test_reliability import CLI_SCRIPT  # noqa: E402  (a CLI process with the tiny data set registered)


def cli_process(tmp_path: Path, argv: list, extra: str = "") -> subprocess.Popen:
    """The CLI in a process of its own (tiny-test registered, one thread), with ``extra`` code run before ``main``."""
    script = tmp_path / "pyrovae_tiny.py"
    script.write_text(CLI_SCRIPT.replace("from pyrovae.cli import main", extra + "\nfrom pyrovae.cli import main"))
    return subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_cli(tmp_path: Path, argv: list, extra: str = "") -> tuple[int, str, str]:
    p = cli_process(tmp_path, argv, extra)
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


#: ``extra`` code that makes ``FUNCTION`` (``module:attribute.path``) touch ``MARKER`` and wait (at most 60 s) for ``MARKER.go``
PAUSE = r"""
import importlib, os, time
from pathlib import Path
_module, _path = "{function}".split(":")
_module = importlib.import_module(_module)
*_owners, _name = _path.split(".")
for _owner in _owners:
    _module = getattr(_module, _owner)
_real = getattr(_module, _name)
def _paused(*args, **kwargs):
    Path("{marker}").touch()
    deadline = time.monotonic() + 60
    while not Path("{marker}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return _real(*args, **kwargs)
setattr(_module, _name, _paused)
"""


def paused_cli(tmp_path: Path, argv: list, function: str) -> tuple[subprocess.Popen, Path]:
    """The CLI in a process of its own, paused on entering ``function`` until ``marker.go`` exists; returns it and
    ``marker`` once the process has reached the pause."""
    marker = tmp_path / "paused"
    p = cli_process(tmp_path, argv, PAUSE.format(function=function, marker=marker))
    deadline = time.monotonic() + 120
    while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), p.communicate()[1]
    return p, marker


# ================================================================================================
# issue 26, item 1: a text run carries its vocabulary


def _write_corpus(root: Path, words: list) -> Path:
    """A PTB-like folder: 60/10/10 sentences of 3-6 words drawn from ``words`` (same frequencies for any list)."""
    rng = np.random.default_rng(0)
    (root / "ptb").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 60), ("valid", 10), ("test", 10)):
        lines = [" ".join(words[i] for i in rng.integers(0, len(words), rng.integers(3, 7))) for _ in range(n)]
        (root / "ptb" / f"ptb.{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def text_args(data, run, *extra):
    return ["train", "--dataset", "ptb", "--data-dir", str(data), "--model", "lm", "--embed-dim", "8", "--hidden", "8", "--epochs", "1",
            "--batch-size", "16", "--eval-samples", "0", "--capture", "off", "--device", "cpu", "--no-progress", "--run-dir", str(run), *extra]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    ours = _write_corpus(root / "ours", ["apple", "banana", "cherry", "date", "elder", "fig"])
    theirs = _write_corpus(root / "theirs", ["uno", "dos", "tres", "cuatro", "cinco", "seis"])  # same size and counts, other words
    run = root / "run"
    assert main(text_args(ours, run)) == 0
    return run, ours, theirs


def test_a_text_run_refuses_data_with_another_vocabulary(text_run, capsys):
    run, ours, theirs = text_run
    assert json.loads((run / "vocab.json").read_text())["itos"][4:] != []
    capsys.readouterr()
    for command in (["sample", str(run), "-n", "3"], ["evaluate", str(run), "-k", "2"]):
        err = cli_error(capsys, [*command, "--device", "cpu", "--data-dir", str(theirs)])
        assert "vocabulary" in err and "vocab.json" in err and "--data-dir" in err, err
    assert main(["sample", str(run), "-n", "3", "--device", "cpu", "--data-dir", str(ours)]) == 0
    words = set(capsys.readouterr().out.split()) - {"greedy:", "sampled:"}
    assert words <= {"apple", "banana", "cherry", "date", "elder", "fig", "<unk>"}, words


# ================================================================================================
# issue 26, item 2: outputs named by what produced them, written atomically, and a lock --overwrite respects


def test_a_partial_evaluation_never_takes_the_full_evaluations_name(data_dir, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    assert not (run / "evaluation.json").exists()
    # a partial evaluation first: it must not take evaluation.json, which a full one started beside it would write
    assert main(["evaluate", str(run), "-k", "2", "--limit", "10", "--device", "cpu", "--data-dir", str(data_dir)]) == 0
    assert json.loads((run / "evaluation-limit10.json").read_text())["limit"] == 10
    assert not (run / "evaluation.json").exists() and not (run / "samples.png").exists()
    assert (run / "samples-limit10.png").is_file() and (run / "reconstructions-limit10.png").is_file()
    # the last checkpoint's evaluation does not replace the best one's
    assert main(["evaluate", str(run), "-k", "2", "--device", "cpu", "--data-dir", str(data_dir)]) == 0
    best = (run / "evaluation.json").read_bytes()
    assert main(["evaluate", str(run), "-k", "2", "--checkpoint", "last", "--device", "cpu", "--data-dir", str(data_dir)]) == 0
    assert (run / "evaluation.json").read_bytes() == best and (run / "evaluation-last.json").is_file()
    assert not list(run.rglob("*.tmp"))


def test_a_partial_text_evaluation_names_its_text_outputs(text_run, tmp_path, capsys):
    run, ours, _ = text_run
    run = copy_run(run, tmp_path)
    assert main(["evaluate", str(run), "-k", "2", "--limit", "3", "--device", "cpu", "--data-dir", str(ours)]) == 0
    assert (run / "evaluation-limit3.json").is_file() and (run / "samples-limit3.txt").read_text().strip()
    assert not (run / "samples.txt").exists() and not (run / "evaluation.json").exists()
    assert json.loads((run / "evaluation-limit3.json").read_text())["outputs"] == ["samples-limit3.txt"]


def test_overwrite_waits_for_no_evaluation_and_evaluations_wait_for_no_overwrite(data_dir, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    # an evaluate of the old run, paused before its log-likelihood: --overwrite is refused, and the folder unchanged
    evaluate, marker = paused_cli(tmp_path, ["evaluate", str(run), "-k", "2", "--device", "cpu", "--data-dir", str(data_dir), "--no-progress"],
                                  "pyrovae.train.distributed:log_likelihood")
    try:
        before = sorted(p.name for p in run.iterdir())
        err = cli_error(capsys, train_args(data_dir, run, "--epochs", "1", "--overwrite"))
        assert "being read by 'pyrovae evaluate' or 'pyrovae sample'" in err and "--overwrite" in err, err
        assert sorted(p.name for p in run.iterdir()) == before and not (run / ".replaced").exists()
    finally:
        Path(f"{marker}.go").touch()
        out, err = evaluate.communicate(timeout=120)
    assert evaluate.returncode == 0, err
    assert (run / "evaluation.json").is_file()
    # a train --overwrite paused in its first epoch: evaluate and sample are refused, and write nothing
    marker.unlink(), Path(f"{marker}.go").unlink()
    train, marker = paused_cli(tmp_path, train_args(data_dir, run, "--epochs", "1", "--overwrite"), "pyrovae.train.trainer:Trainer.fit")
    try:
        for argv in (["evaluate", str(run), "-k", "2"], ["sample", str(run), "-n", "4"]):
            err = cli_error(capsys, [*argv, "--device", "cpu", "--data-dir", str(data_dir)])
            assert "being replaced by 'pyrovae train --overwrite'" in err and f"process {train.pid}" in err, err
        assert not (run / "evaluation.json").exists() and not list(run.glob("samples*"))
    finally:
        Path(f"{marker}.go").touch()
        out, err = train.communicate(timeout=120)
    assert train.returncode == 0, err
    assert sorted(p.name for p in run.iterdir() if p.name not in (".lock", ".readers")) == ["checkpoints", "config.json", "metrics.jsonl"]


# ================================================================================================
# issue 26, item 3: --prior-scale 0 is refused, not replaced by 1 while config.json records 0


def test_prior_scale_zero_is_refused_naming_the_flag(data_dir, tmp_path, capsys):
    bayes = ["--model", "bayes_vae", "--guide", "bayes_gaussian", "--bayesian-decoder", "--epochs", "1"]
    err = cli_error(capsys, train_args(data_dir, tmp_path / "run", *bayes, "--prior-scale", "0"))
    assert "--prior-scale 0" in err and "positive" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
    # a scale that is given is the one used (and the one recorded)
    from pyrovae.cli import load_run

    assert main(train_args(data_dir, tmp_path / "ok", *bayes, "--prior-scale", "0.5")) == 0
    run = load_run(tmp_path / "ok", "cpu")
    assert run.config["prior_scale"] == 0.5
    assert {m.prior_scale for m in run.model.modules() if hasattr(m, "prior_scale")} == {0.5}


# ================================================================================================
# issue 26, item 4: Trainer.fit checks the validation data before the first step


@pytest.mark.parametrize("valid, message", [
    (torch.rand(10, D_X + 3), "shape"),
    (torch.rand(10, D_X).double(), "dtype"),
    ((torch.rand(10, D_X), torch.rand(10, D_X)), r"2 tensor\(s\)"),
])
def test_fit_refuses_validation_data_unlike_the_training_data_before_the_first_step(valid, message, tmp_path):
    from pyrovae.guides import GaussianEncoder
    from pyrovae.models import VAE
    from pyrovae.objectives import ELBO
    from pyrovae.train import Trainer

    steps = []
    trainer = Trainer(VAE((D_X,), (2,), hidden=((16,),)), GaussianEncoder((D_X,), (2,), hidden=((16,),)), ELBO(), run_dir=tmp_path / "run", progress=False)
    real_step = trainer.step
    trainer.step = lambda *batch: steps.append(1) or real_step(*batch)
    with pytest.raises((ValueError, TypeError), match=message) as e:
        trainer.fit(torch.rand(40, D_X), epochs=1, batch_size=10, valid=valid)
    assert "valid" in str(e.value) and not steps and not (tmp_path / "run" / "checkpoints").exists()


# ================================================================================================
# issue 28, item 1: train --overwrite moves every output of the old run, not only the known names


def _entries(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name not in (".lock", ".readers")}


def test_overwrite_replaces_every_output_of_the_old_run(data_dir, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    for name in ("evaluation.json", "evaluation-limit5.json", "samples-limit5.png", "samples-seed1-n4.png", "samples.txt",
                 "homotopies-limit3.txt", "draw_generation-samples-seed0-n64.gif", "notes.md"):
        (run / name).write_bytes(b"old " + name.encode())
    (run / "tb").mkdir()
    (run / "tb" / "events.out").write_bytes(b"old events")
    old = _entries(run)
    # a new run that diverges before its first checkpoint: the old run comes back whole
    code, _, err = run_cli(tmp_path, train_args(data_dir, run, "--epochs", "1", "--overwrite", "--activation", "relu", "--lr", "1e20"))
    assert code == 3, err
    assert _entries(run) == old and not (run / ".replaced").exists()
    # a new run that gets going: nothing of the old one is left beside it
    code, _, err = run_cli(tmp_path, train_args(data_dir, run, "--epochs", "1", "--overwrite"))
    assert code == 0, err
    assert sorted(p.name for p in run.iterdir() if p.name not in (".lock", ".readers")) == ["checkpoints", "config.json", "metrics.jsonl"]


# ================================================================================================
# issue 28, item 2: --resume refuses a config.json edited after the run started


OTHER_DATASET = r"""
from pyrovae.data import RawData, register_dataset

@register_dataset("tiny-test-other", ["tiny.npz"])
def read_other(folder):
    z = np.load(folder / "tiny.npz")
    return RawData(train=torch.from_numpy(z["train"]), test=torch.from_numpy(z["test"]))
"""


def test_resume_refuses_a_config_edited_to_other_data(data_dir, tmp_path):
    shutil.copytree(data_dir / TINY, data_dir / "tiny-test-other", dirs_exist_ok=True)
    run = tmp_path / "run"
    code, _, err = run_cli(tmp_path, train_args(data_dir, run, "--epochs", "1"), OTHER_DATASET)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "dataset": "tiny-test-other", "lr": 0.5}))
    before = (run / "checkpoints" / "last.pt").read_bytes()
    code, _, err = run_cli(tmp_path, ["train", "--resume", "--epochs", "2", "--run-dir", str(run), "--data-dir", str(data_dir)], OTHER_DATASET)
    assert code == 2 and "Traceback" not in err, err
    assert "dataset: 'tiny-test-other' in config.json, 'tiny-test' in the checkpoint" in err and "lr: 0.5" in err, err
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_evaluate_refuses_a_config_edited_to_other_data_and_names_its_data(data_dir, finished_run, tmp_path, capsys):
    """An evaluation names the data set and split it was computed on; one whose config.json was edited to another
    data set is refused, naming the field, instead of evaluating silently on the other data."""
    run = copy_run(finished_run, tmp_path)
    assert main(["evaluate", str(run), "-k", "2", "--limit", "10", "--device", "cpu", "--data-dir", str(data_dir), "--no-progress"]) == 0
    written = json.loads((run / "evaluation-limit10.json").read_text())
    assert written["dataset"] == TINY and written["split"] == "test", written
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "dataset": "fashion-mnist"}))
    for argv in (["evaluate", str(run), "-k", "2", "--data-dir", str(data_dir)], ["sample", str(run), "-n", "4"]):
        err = cli_error(capsys, [*argv, "--device", "cpu"])
        assert f"dataset: 'fashion-mnist' in config.json, '{TINY}' in the checkpoint" in err and "Restore those fields" in err, err


# ================================================================================================
# issue 28, item 3: a run folder from a stranger cannot exhaust the machine


@pytest.mark.parametrize("edit, message", [
    ({"z_dims": [2e9]}, "parameters, but"),
    ({"z_dims": [2_000_000_000]}, "parameters, but"),
    ({"hidden": [[2_000_000_000]]}, "parameters, but"),
    ({"x_shape": [100_000, 100_000]}, "parameters, but"),
])
def test_a_config_describing_a_huge_model_is_refused_before_anything_is_built(edit, message, data_dir, finished_run, tmp_path, capsys, monkeypatch):
    import pyrovae.cli.commands as cli

    run = copy_run(finished_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, **edit}))
    for name in ("best.pt", "last.pt"):  # a stranger's folder whose checkpoints agree with its config.json
        state = load_checkpoint(run / "checkpoints" / name)
        save_checkpoint({k: v for k, v in state.items() if k not in ("format", "config")}, run / "checkpoints" / name)
    built = []
    monkeypatch.setattr(cli, "_build", lambda *a, **k: built.append(a) or pytest.fail("built the modules"))
    commands = [["sample", str(run), "-n", "4"]] + ([] if "x_shape" in edit else [["evaluate", str(run), "-k", "2", "--data-dir", str(data_dir)]])  # evaluate: the data's shape
    for argv in commands:
        err = cli_error(capsys, [*argv, "--device", "cpu"])
        assert message in err and "config.json" in err, err
    with pytest.raises(ValueError, match="config.json"):
        cli.load_run(run, "cpu")
    assert not built


@pytest.mark.parametrize("text, message", [("[" * 10_000_000, "larger than"), ("[" * 200_000, "nested too deeply")])
def test_a_config_that_is_too_large_or_too_deep_is_refused(text, message, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    (run / "config.json").write_text(text)
    err = cli_error(capsys, ["sample", str(run), "-n", "4", "--device", "cpu"])
    assert message in err and "config.json" in err, err


# ================================================================================================
# issue 28, items 6 and 7: bounded sample counts; NaN checkpoints named; --out for text samples


def test_sample_refuses_a_count_past_its_limit_before_loading(finished_run, capsys, monkeypatch):
    import pyrovae.cli.commands as cli

    monkeypatch.setattr(cli, "_load_run", lambda *a, **k: pytest.fail("loaded the run"))
    err = cli_error(capsys, ["sample", str(finished_run), "-n", "10000000", "--device", "cpu"])
    assert "--num 10000000" in err and "10,000" in err and "--seed" in err, err


def test_a_checkpoint_with_nan_weights_is_named_with_its_tensors(data_dir, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(run / "checkpoints" / name)
        key = sorted(state["params"])[0]
        state["params"][key] = torch.full_like(state["params"][key], float("nan"))
        state.pop("format")
        save_checkpoint(state, run / "checkpoints" / name)
    for argv in (["sample", str(run), "-n", "4"], ["evaluate", str(run), "-k", "2", "--data-dir", str(data_dir)]):
        err = cli_error(capsys, [*argv, "--device", "cpu"])
        assert "best.pt holds non-finite weights" in err and key in err and "--checkpoint last" in err, err
        assert len(err.splitlines()) == 1


def test_text_samples_go_to_out(text_run, tmp_path, capsys):
    run, ours, _ = text_run
    out = tmp_path / "sentences.txt"
    capsys.readouterr()
    assert main(["sample", str(run), "-n", "3", "--out", str(out), "--device", "cpu", "--data-dir", str(ours)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 3 samples to {out}" in printed and len(out.read_text().splitlines()) == 3  # one line per sentence (an empty one too)
