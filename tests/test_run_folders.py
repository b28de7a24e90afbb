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
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrovae.data as D
from pyrovae.checkpoint import load_checkpoint, save_checkpoint
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


CLI_SCRIPT = r"""
import sys
import numpy as np
import torch
from pyrovae.data import RawData, register_dataset

@register_dataset("tiny-test", ["tiny.npz"])
def read(folder):
    z = np.load(folder / "tiny.npz")
    return RawData(train=torch.from_numpy(z["train"]), test=torch.from_numpy(z["test"]))

from pyrovae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(tmp_path: Path, argv: list) -> subprocess.CompletedProcess:
    """The CLI in a process of its own (tiny-test registered), one thread."""
    script = tmp_path / "pyrovae_tiny.py"
    script.write_text(CLI_SCRIPT)
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


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
