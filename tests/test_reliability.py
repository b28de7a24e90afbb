"""Reliability: bad input fails early with a clear message, divergence is caught and rolled back, an
interruption (signal or crash) never loses the last good state, and loading never executes code.

Everything runs on tiny synthetic data (a dataset registered for the test) and tiny models; the signal
and crash tests use real subprocesses.
"""
import copy
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyrovae.data.core as D
import pyrovae.cli.registry as registry
from pyrovae.train.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from pyrovae.cli import main
from pyrovae.nn.flows import FLOWS
from pyrovae.guides import GaussianEncoder
from pyrovae.models import VAE
from pyrovae.objectives import ELBO, GECO, OBJECTIVES, BetaELBO
from pyrovae.train import DivergenceError, Trainer, TrainingInterrupted

posix_only = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs POSIX signals and fork")

D_X = 20  # features of the synthetic data
TINY, WIDE = "tiny-test", "tiny-test-wide"


def tiny_pair(x_shape=(D_X,), z=2):
    return VAE(x_shape, (z,), hidden=((16,),)), GaussianEncoder(x_shape, (z,), hidden=((16,),))


def unit_data(n, seed=0, d=D_X):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed))


def params_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# A dataset the CLI can load: registered under a test-only name, read from an .npz file


def _read_npz(name):
    def read(folder: Path) -> D.RawData:
        z = np.load(folder / name)
        return D.RawData(train=torch.from_numpy(z["train"]), test=torch.from_numpy(z["test"]))

    return read


def _write_npz(path: Path, train: np.ndarray, test: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, train=train.astype(np.float32), test=test.astype(np.float32))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data folder with ``tiny-test`` (120 + 30 examples in [0, 1]) and ``tiny-test-wide`` (values in [0, 2])."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    _write_npz(root / TINY / "tiny.npz", rng.random((120, D_X)), rng.random((30, D_X)))
    _write_npz(root / WIDE / "wide.npz", 2 * rng.random((120, D_X)), rng.random((30, D_X)))
    with pytest.MonkeyPatch.context() as mp:  # register on copies, so the registry is back as it was afterwards
        mp.setattr(D, "DATASETS", dict(D.DATASETS))
        mp.setattr(D, "_SPECS", dict(D._SPECS))
        D.register_dataset(TINY, ["tiny.npz"])(_read_npz("tiny.npz"))
        D.register_dataset(WIDE, ["wide.npz"])(_read_npz("wide.npz"))
        yield root


def train_args(data_dir, run_dir, *extra):
    """``pyrovae train`` on tiny-test: 100 training examples in batches of 10, 20 for validation."""
    return [
        "train", "--dataset", TINY, "--data-dir", str(data_dir), "--valid-size", "20", "--z-dims", "2", "--hidden", "16",
        "--batch-size", "10", "--device", "cpu", "--eval-samples", "0", "--no-progress", "--run-dir", str(run_dir), *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """A finished one-epoch CLI run; tests copy it before changing anything."""
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_args(data_dir, run, "--epochs", "1")) == 0
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def cli_error(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ================================================================================================
# 1. Bad input: a clear error naming the problem and the fix, before any work is lost


def test_data_shape_that_does_not_fit_the_model_is_named_before_training(tmp_path):
    model, guide = tiny_pair((1, 28, 28))
    trainer = Trainer(model, guide, ELBO(), run_dir=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"examples of shape \(20,\).*x_shape=\(1, 28, 28\).*x_shape=\(20,\)"):
        trainer.fit(unit_data(32), epochs=1, batch_size=8)
    assert not (tmp_path / "run").exists()

    # programs that declare no x_shape: torch's bare shape error is re-raised with the batch shape and the fix
    vae, enc = tiny_pair((1, 28, 28))
    with pytest.raises(ValueError, match=r"batch of shape \(8, 20\) failed: mat1 and mat2.*data's example shape matches"):
        Trainer(lambda x: vae(x), lambda x: enc(x), ELBO(), progress=False).fit(unit_data(32), epochs=1, batch_size=8)


def test_cli_refuses_data_outside_the_unit_interval_for_a_bernoulli_likelihood(data_dir, tmp_path, capsys):
    argv = train_args(data_dir, tmp_path / "run", "--epochs", "1")
    argv[argv.index(TINY)] = WIDE
    err = cli_error(capsys, argv)
    assert err.startswith("pyrovae train: error: ")
    assert "outside [0, 1]" in err and "Bernoulli" in err and "rescale" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, bad, valid", [
    ("--model", "vea", "vae"), ("--guide", "gausian", "gaussian"), ("--objective", "elbow", "iwae"),
    ("--flow", "plannar", "planar"), ("--dataset", "mnsit", "mnist"),
])
def test_unknown_names_list_the_valid_ones(option, bad, valid, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", option, bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"invalid choice: '{bad}'" in err and f"'{valid}'" in err


@pytest.mark.parametrize("build, cfg, names", [
    (registry.build_model, {"model": "vea"}, lambda: registry.MODELS),
    (registry.build_guide, {"guide": "gausian"}, lambda: registry.GUIDES),
    (registry.build_guide, {"guide": "flow", "flow": "plannar", "z_dims": [2]}, lambda: FLOWS),
    (lambda cfg, _: registry.build_objective(cfg), {"objective": "elbow"}, lambda: registry.ALL_OBJECTIVES),
])
def test_registry_names_list_the_valid_ones(build, cfg, names):
    with pytest.raises(ValueError, match="is not known; choose one of") as e:
        build(cfg, (D_X,))
    assert str(sorted(names())) in str(e.value)


@pytest.mark.parametrize("extra, message", [
    (["--objective", "elbo", "-k", "0"], "--num-particles 0 must be an integer >= 1"),
    (["--objective", "iwae", "-k", "-3"], "--num-particles -3 must be an integer >= 1"),
    (["--objective", "variance", "-k", "1"], "--num-particles 1 must be an integer >= 2: a variance needs at least two samples"),
    (["--objective", "logvariance", "-k", "1"], "--num-particles 1 must be an integer >= 2"),
    (["--objective", "geco", "--tolerance", "-1"], "--tolerance -1.0 must be a finite number >= 0"),
    # the CLI's flag, not the Python argument (GECO's alpha is --geco-alpha)
    (["--objective", "geco", "--geco-alpha", "2"], "--geco-alpha 2.0"),
])
def test_cli_refuses_bad_objective_settings_before_loading_data(extra, message, tmp_path, capsys):
    # the data folder does not exist: the objective is checked first, so its message is the one shown
    argv = train_args(tmp_path / "no-data", tmp_path / "run", "--epochs", "1", *extra)
    err = cli_error(capsys, argv)
    assert err.startswith("pyrovae train: error: ") and message in err
    assert not (tmp_path / "run").exists()


def test_cli_device_cuda_on_a_machine_without_cuda(monkeypatch, data_dir, finished_run, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = train_args(data_dir, tmp_path / "run", "--epochs", "1")
    argv[argv.index("--device") + 1] = "cuda"
    err = cli_error(capsys, argv)
    assert "--device cuda: this machine has no usable CUDA device" in err and "--device cpu" in err
    err = cli_error(capsys, ["evaluate", str(finished_run), "--device", "cuda:0", "--data-dir", str(data_dir)])
    assert err.startswith("pyrovae evaluate: error: --device cuda:0")


def test_checkpoint_of_another_model_is_refused(tmp_path):
    x = unit_data(40)
    model, guide = tiny_pair()
    Trainer(model, guide, ELBO(), run_dir=tmp_path / "a", progress=False).fit(x, epochs=1, batch_size=10)
    pyro.clear_param_store()
    other = Trainer(*tiny_pair(z=3), ELBO(), progress=False)
    with pytest.raises(CheckpointError, match=r"different model/guide: shape mismatches .*: \[16, 2\] vs \[16, 3\].*config\.json"):
        other.resume(tmp_path / "a" / "checkpoints" / "last.pt", x[:10])
    # a checkpoint of another objective (GECO state into an ELBO trainer) is refused too, not a KeyError
    pyro.clear_param_store()
    model, guide = tiny_pair()
    Trainer(model, guide, GECO(tolerance=0.3), run_dir=tmp_path / "g", progress=False).fit(x, epochs=1, batch_size=10)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="ELBO has no state"):
        Trainer(*tiny_pair(), ELBO(), progress=False).resume(tmp_path / "g" / "checkpoints" / "last.pt", x[:10])
    pyro.clear_param_store()
    with pytest.raises(CheckpointError, match="another objective"):
        Trainer(*tiny_pair(), GECO(tolerance=0.3), progress=False).resume(tmp_path / "a" / "checkpoints" / "last.pt", x[:10])


def _without_stored_config(run: Path) -> None:
    """Checkpoints without their copy of the configuration (older ones, or a stranger's): config.json alone says
    what the run is, and the checks behind the configuration comparison are what refuse it."""
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(run / "checkpoints" / name)
        save_checkpoint({k: v for k, v in state.items() if k not in ("format", "config")}, run / "checkpoints" / name)


def test_cli_evaluate_refuses_a_checkpoint_of_another_model(data_dir, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg["z_dims"] = [3]
    (run / "config.json").write_text(json.dumps(cfg))
    err = cli_error(capsys, ["evaluate", str(run), "--device", "cpu", "--data-dir", str(data_dir)])
    assert "z_dims: [3] in config.json, [2] in the checkpoint" in err  # the checkpoint's own configuration disagrees
    _without_stored_config(run)
    err = cli_error(capsys, ["evaluate", str(run), "--device", "cpu", "--data-dir", str(data_dir)])
    assert "pyrovae evaluate: error: the checkpoint was written for a different model/guide" in err


def _write_random(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _write_tensor(path):
    torch.save(torch.zeros(3), path)


def _write_text(path):
    path.write_text("epoch,loss\n1,0.5\n")


def _write_empty(path):
    path.write_bytes(b"")


def _write_truncated(path):
    save_checkpoint({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:3000])


@pytest.mark.parametrize("write, message", [
    (_write_random, "refused"), (_write_tensor, "not a pyrovae checkpoint"), (_write_text, "not a readable checkpoint"),
    (_write_empty, "not a readable checkpoint"), (_write_truncated, "not a readable checkpoint"),
])
def test_files_that_are_not_checkpoints_are_refused(write, message, data_dir, finished_run, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    write(bad)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(bad)
    # and from the command line: evaluate and --resume print the message and exit 2
    run = copy_run(finished_run, tmp_path)
    for name in ("best.pt", "last.pt"):
        shutil.copy(bad, run / "checkpoints" / name)
    err = cli_error(capsys, ["evaluate", str(run), "--device", "cpu", "--data-dir", str(data_dir)])
    assert err.startswith("pyrovae evaluate: error: ") and message in err
    err = cli_error(capsys, train_args(data_dir, run, "--resume", "--epochs", "2"))
    assert err.startswith("pyrovae train: error: ") and message in err


def test_run_folder_with_a_finished_run_is_not_overwritten_by_accident(data_dir, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    err = cli_error(capsys, train_args(data_dir, run, "--epochs", "1"))
    assert f"{run} already holds a finished run" in err and "--overwrite" in err and "--resume" in err
    # --resume without a larger --epochs: the run's own 1 epoch are done (not the parser's default of 10)
    err = cli_error(capsys, train_args(data_dir, run, "--resume"))
    assert "is finished (1 of 1 epochs)" in err and "--epochs N with N > 1" in err
    assert last.read_bytes() == before

    assert main(train_args(data_dir, run, "--resume", "--epochs", "2")) == 0  # a finished run can be extended
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert load_checkpoint(last)["cursor"]["epoch"] == 2 and load_checkpoint(last)["finished"]

    assert main(train_args(data_dir, run, "--epochs", "1", "--overwrite")) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_resume_without_a_checkpoint_or_config_says_so(data_dir, finished_run, tmp_path, capsys):
    err = cli_error(capsys, train_args(data_dir, tmp_path / "empty", "--resume"))
    assert "nothing to resume" in err and "drop --resume" in err
    run = copy_run(finished_run, tmp_path)
    (run / "config.json").unlink()
    err = cli_error(capsys, train_args(data_dir, run, "--resume", "--epochs", "3"))
    assert "config.json is missing" in err


# ================================================================================================
# 2. Divergence: found at the step it happens, reported with the Pyro sites, rolled back

nan_warnings = pytest.mark.filterwarnings("ignore:Encountered NaN")


def poison(x):
    """An observed site ``poison`` whose log-density is NaN (validation off: the NaN must reach the loss)."""
    pyro.sample("poison", dist.Normal(x.new_zeros(()), 1.0, validate_args=False), obs=x.new_tensor(float("nan")))


class PoisonedVAE(VAE):
    """A VAE with an extra site ``poison`` of log-density NaN whenever ``poisoned()`` is true."""

    def __init__(self, *args, poisoned=lambda: False, **kwargs):
        super().__init__(*args, **kwargs)
        self.poisoned = poisoned

    def forward(self, x):
        super().forward(x)
        if self.poisoned():
            poison(x)


def _poisoned_trainer(tmp_path, when, **kwargs):
    """A trainer whose model turns NaN at the steps where ``when(step, trainer)`` holds; records every step
    run (replays included) and the parameters the first time each step starts."""
    model = PoisonedVAE((D_X,), (2,), hidden=((16,),))
    guide = GaussianEncoder((D_X,), (2,), hidden=((16,),))
    # the poison is a Python decision per step, which a captured graph would repeat: these tests run Pyro every step
    kwargs.setdefault("capture", "off")
    trainer = Trainer(model, guide, ELBO(), lr=1e-2, run_dir=tmp_path / "run", progress=False, **kwargs)
    clock = {"step": 0, "ran": [], "params_before": {}}
    model.poisoned = lambda: when(clock["step"], trainer)
    step = trainer.step

    def counted_step(x):
        clock["step"] = trainer.cursor.step + 1
        clock["ran"].append(clock["step"])
        clock["params_before"].setdefault(clock["step"], {k: v.detach().clone() for k, v in trainer.params.items()})
        return step(x)

    trainer.step = counted_step
    return trainer, clock


@nan_warnings
def test_divergence_is_reported_at_its_step_with_the_site_and_rolled_back(tmp_path):
    # 64 examples in batches of 8: 8 steps an epoch; checks every 3 steps -> at 3, 6, 8 (epoch end), 9, 12, 15
    trainer, clock = _poisoned_trainer(tmp_path, lambda step, _: step == 13, check_every=3)
    with pytest.raises(DivergenceError) as e:
        trainer.fit(unit_data(64), epochs=3, batch_size=8)
    report = str(e.value)
    assert "non-finite loss at step 13 (epoch 2, batch 5)" in report
    assert "sites with non-finite log-densities: model:poison" in report
    assert "rolled back to step 12" in report and "last.pt holds the last good checkpoint" in report
    # no host sync per step: steps 14 and 15 ran before the check at 15; then step 13 was replayed from step 12
    assert clock["ran"] == list(range(1, 16)) + [13]
    # the trainer holds the last good state (after step 12), finite
    assert trainer.cursor.step == 12
    assert params_equal(trainer.params, clock["params_before"][13])
    assert all(torch.isfinite(v).all() for v in trainer.params.values())
    # the checkpoint on disk is the end of epoch 1 (step 8), never the diverged state
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["cursor"]["step"] == 8 and not state["finished"]
    assert params_equal(state["params"], clock["params_before"][9])
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


@nan_warnings
def test_divergence_at_an_epoch_end_is_caught_before_the_checkpoint(tmp_path):
    # the last step of epoch 1 (step 8) diverges: the end-of-epoch check must run before last.pt is written
    trainer, clock = _poisoned_trainer(tmp_path, lambda step, _: step == 8, check_every=100)
    with pytest.raises(DivergenceError, match="non-finite loss at step 8 .epoch 1, batch 8.; sites with non-finite log-densities: model:poison"):
        trainer.fit(unit_data(64), epochs=2, batch_size=8)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert trainer.cursor.step == 0 and params_equal(trainer.params, clock["params_before"][1])


@nan_warnings
def test_reduce_lr_halves_the_learning_rate_and_finishes(tmp_path):
    lr0 = 1e-2
    # the model blows up at step 13 unless the learning rate has been reduced (a divergence caused by the lr)
    trainer, clock = _poisoned_trainer(
        tmp_path, lambda step, t: step == 13 and t.optim.param_groups[0]["lr"] > 0.75 * lr0, check_every=3, on_divergence="reduce_lr"
    )
    history = trainer.fit(unit_data(64), epochs=3, batch_size=8)
    assert trainer.state.lr_reductions == 1
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["lr"] for r in history] == [lr0, lr0 / 2, lr0 / 2]
    assert clock["ran"] == list(range(1, 16)) + [13] + list(range(13, 25))
    assert all(torch.isfinite(v).all() for v in trainer.params.values())
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["finished"] and state["cursor"]["step"] == 24 and state["lr_reductions"] == 1


@nan_warnings
def test_reduce_lr_gives_up_after_max_reductions(tmp_path):
    trainer, clock = _poisoned_trainer(tmp_path, lambda step, _: step >= 5, check_every=4, on_divergence="reduce_lr", max_lr_reductions=2)
    with pytest.raises(DivergenceError, match="non-finite loss at step 5 .*model:poison"):
        trainer.fit(unit_data(64), epochs=2, batch_size=8)
    assert trainer.state.lr_reductions == 2 and trainer.cursor.step == 4


class NaNAfterCalls(VAE):
    """A VAE whose log-density is NaN from its ``after``-th call on (a model that blows up mid-run)."""

    def __init__(self, *args, after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.after, self.calls = after, 0

    def forward(self, x):
        super().forward(x)
        self.calls += 1
        if self.calls > self.after:
            poison(x)


@nan_warnings
def test_cli_divergence_exits_3_with_the_report(monkeypatch, data_dir, tmp_path, capsys):
    monkeypatch.setitem(registry.MODELS, "nan-after-30", lambda cfg, x_shape: NaNAfterCalls(x_shape, (2,), ((16,),), after=30))
    run = tmp_path / "run"
    err = cli_error(capsys, train_args(data_dir, run, "--epochs", "5", "--model", "nan-after-30", "--check-every", "4", "--capture", "off"), code=3)
    assert "training diverged: non-finite loss at step" in err and "model:poison" in err and "rolled back" in err
    # an epoch calls the model 12 times (10 steps, 2 for validation): NaN from epoch 3 on, so last.pt is epoch 2
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["cursor"]["epoch"] == 2 and not state["finished"]
    assert all(torch.isfinite(v).all() for v in state["params"].values())


# ================================================================================================
# 3. Interruption: signals checkpoint and stop; a crash while writing keeps the previous checkpoint


def test_atomic_write_error_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint({"version": 1, "w": torch.ones(10)}, path)

    for error in (RuntimeError("disk full"), KeyboardInterrupt()):
        def write(f, error=error):
            f.write(b"half a checkpoint" * 100)
            raise error

        with pytest.raises(type(error)):
            atomic_write(path, write)
        assert load_checkpoint(path)["version"] == 1
        assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


KILL_SCRIPT = r"""
import json, os, random, signal, sys, time
import torch
torch.set_num_threads(1)
from pyrovae.train.checkpoint import atomic_write, load_checkpoint, save_checkpoint

path, kills, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
folder, rng, N = os.path.dirname(path), random.Random(seed), 2_000_000  # 8 MB of float32

def version(v):
    return {"version": v, "data": torch.full((N,), float(v))}

def check():
    state = load_checkpoint(path)  # must load, and be one complete version: every value equals its version
    leftovers = [f for f in os.listdir(folder) if f.endswith(".tmp")]
    for f in leftovers:
        os.unlink(os.path.join(folder, f))
    return {"version": state["version"], "complete": bool((state["data"] == state["version"]).all()), "tmp_left": len(leftovers)}

def writer(w, mid_write):
    if mid_write:  # write half of a new version, tell the parent, and wait to be killed
        data = __import__("io").BytesIO()
        torch.save({"format": "pyrovae-checkpoint-v1", **version(-1)}, data)
        def stall(f):
            f.write(data.getvalue()[: len(data.getvalue()) // 2])
            f.flush()
            os.write(w, b"x")
            time.sleep(60)
        atomic_write(path, stall)
    v = 1000 * (os.getpid() % 1000)
    while True:
        v += 1
        save_checkpoint(version(v), path)
        os.write(w, b"x")

save_checkpoint(version(0), path)
results = []
for k in range(kills + 1):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            writer(w, mid_write=(k == 0))
        finally:
            os._exit(1)
    os.close(w)
    assert os.read(r, 1) == b"x"  # the writer has written (k > 0: a complete version; k == 0: half a file)
    if k > 0:
        time.sleep(rng.uniform(0.0, 0.15))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(r)
    results.append(check())
print(json.dumps(results))
"""


@posix_only
def test_sigkill_while_writing_a_checkpoint_leaves_a_complete_one(tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "ck" / "last.pt"), "8", "0"], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(r["complete"] for r in results), results
    # killed half-way through writing version -1: the previous version 0 is intact (the half file was a temporary)
    assert results[0] == {"version": 0, "complete": True, "tmp_left": 1}
    # killed at random times while writing in a loop: always some complete version this writer wrote
    assert all(r["version"] > 0 for r in results[1:]), results


def _fit_interrupted(trainer, x, at_step, sig, **fit_kwargs):
    """Fit, sending ``sig`` to this process during step ``at_step``; returns the TrainingInterrupted message."""
    step = trainer.step

    def signalling_step(batch):
        if trainer.cursor.step + 1 == at_step:
            os.kill(os.getpid(), sig)
        return step(batch)

    trainer.step = signalling_step
    with pytest.raises(TrainingInterrupted) as e:
        trainer.fit(x, **fit_kwargs)
    trainer.step = step
    return str(e.value)


STATEFUL_OBJECTIVES = {  # objectives with state of their own that a checkpoint must carry
    "geco": lambda: GECO(tolerance=0.3, alpha=0.9, nu=0.5),
    "beta": lambda: BetaELBO(beta=1.0, schedule="linear", warmup_steps=10),
}


def _metrics(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "examples_per_s")} for r in history]


@posix_only
@pytest.mark.parametrize("name", sorted(STATEFUL_OBJECTIVES))
@pytest.mark.parametrize("via", ["checkpoint_file", "state_dict"])
def test_mid_epoch_resume_gives_the_same_parameters_as_an_uninterrupted_run(name, via, tmp_path):
    x, valid = unit_data(60, seed=1), unit_data(12, seed=2)
    fit = dict(epochs=3, batch_size=8, valid=valid, dynamic_binarize=True)  # 8 steps an epoch, the last one of 4

    def fresh(run_dir, seed):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model, guide = tiny_pair()
        return Trainer(model, guide, STATEFUL_OBJECTIVES[name](), lr=1e-2, run_dir=run_dir, check_every=3, progress=False)

    reference = fresh(tmp_path / "ref", 0)
    ref_history = reference.fit(x, **fit)

    interrupted = fresh(tmp_path / "run", 0)
    message = _fit_interrupted(interrupted, x, 11, signal.SIGINT, **fit)
    assert "SIGINT received" in message and "--resume" in message
    assert (interrupted.cursor.epoch, interrupted.cursor.pos, interrupted.cursor.step) == (1, 3, 11)  # mid-epoch 2
    state = copy.deepcopy(interrupted.state_dict())

    # other initial weights and RNG: everything must come from the checkpoint
    resumed = fresh(tmp_path / "run" if via == "checkpoint_file" else None, 123)
    if via == "checkpoint_file":
        last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
        assert last["cursor"]["step"] == 11 and last["cursor"]["pos"] == 3 and torch.is_tensor(last["cursor"]["perm"])
        resumed.resume(tmp_path / "run" / "checkpoints" / "last.pt", x[:8])
    else:
        resumed.setup(torch.bernoulli(x[:8]))
        resumed.load_state_dict(state)
    history = resumed.fit(x, **fit)

    assert params_equal(resumed.params, reference.params)
    assert resumed.cursor.step == reference.cursor.step == 24
    ref_state, new_state = reference.objective.state_dict(), resumed.objective.state_dict()
    assert ref_state.keys() == new_state.keys()
    for k in ref_state:
        assert (torch.equal(ref_state[k], new_state[k]) if torch.is_tensor(ref_state[k]) else ref_state[k] == new_state[k]), k
    # the interrupted epoch's metrics include the steps before the interruption
    if via == "checkpoint_file":
        assert _metrics(history) == _metrics(ref_history)
        on_disk = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert _metrics(on_disk) == _metrics(ref_history)
    else:
        assert _metrics(history) == _metrics(ref_history)[1:]


def test_an_epoch_stopped_and_resumed_counts_the_time_of_all_its_steps(tmp_path):
    """An epoch's ``seconds`` and ``examples_per_s`` cover every step of the epoch, those before a mid-epoch stop too
    (a segmented or resumed run once reported the last part's time alone: thousands of examples per second)."""
    from pyrovae.train.callbacks import Callback

    class SlowSteps(Callback):  # each step takes at least `pause` seconds; the first fit stops after 3 steps
        def __init__(self, stop_at=None, pause=0.1):
            self.stop_at, self.pause = stop_at, pause

        def on_step_end(self, trainer, x, loss, norm):
            time.sleep(self.pause)
            if trainer.cursor.step == self.stop_at:
                trainer.stop_training = True

    x = unit_data(32, seed=1)
    pyro.set_rng_seed(0)
    model, guide = tiny_pair()
    first = Trainer(model, guide, ELBO(), lr=1e-2, run_dir=tmp_path / "run", progress=False)
    assert first.fit(x, epochs=1, batch_size=8, callbacks=[SlowSteps(stop_at=3)]) == [] and first.cursor.pos == 3
    resumed = Trainer(model, guide, ELBO(), lr=1e-2, run_dir=tmp_path / "run", progress=False)
    resumed.resume(tmp_path / "run" / "checkpoints" / "last.pt", x[:8])
    [record] = resumed.fit(x, epochs=1, batch_size=8, callbacks=[SlowSteps()])
    assert record["seconds"] >= 4 * 0.1  # 4 steps of at least 0.1 s, 3 of them before the stop
    assert record["examples_per_s"] <= 32 / 0.4


@posix_only
@pytest.mark.cuda
def test_mid_epoch_resume_on_cuda(tmp_path):
    # load_checkpoint(map_location=cuda) moves every tensor, RNG states included, onto the GPU
    device = torch.device("cuda")
    x, valid = unit_data(60, seed=1).to(device), unit_data(12, seed=2).to(device)
    fit = dict(epochs=2, batch_size=8, valid=valid, dynamic_binarize=True)

    def fresh(run_dir, seed):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model, guide = tiny_pair()
        return Trainer(model.to(device), guide.to(device), GECO(tolerance=0.3), lr=1e-2, run_dir=run_dir, check_every=3, progress=False)

    reference = fresh(tmp_path / "ref", 0)
    reference.fit(x, **fit)
    _fit_interrupted(fresh(tmp_path / "run", 0), x, 11, signal.SIGINT, **fit)
    resumed = fresh(tmp_path / "run", 123)
    resumed.resume(tmp_path / "run" / "checkpoints" / "last.pt", x[:8])
    assert resumed.cursor.step == 11 and resumed.cursor.perm.device.type == "cuda"
    resumed.fit(x, **fit)
    assert resumed.cursor.step == reference.cursor.step == 16
    for k, v in reference.params.items():
        assert v.device.type == "cuda" and torch.allclose(resumed.params[k], v, rtol=1e-4, atol=1e-6), k


def test_resume_drops_metrics_of_epochs_the_checkpoint_does_not_hold(tmp_path):
    # a crash between writing an epoch's metrics line and its checkpoint (or mid-line) must not duplicate that epoch
    x = unit_data(40)
    trainer = Trainer(*tiny_pair(), ELBO(), run_dir=tmp_path / "run", progress=False)
    trainer.fit(x, epochs=1, batch_size=10)
    metrics = tmp_path / "run" / "metrics.jsonl"
    first = metrics.read_text()
    metrics.write_text(first + json.dumps({"epoch": 2, "step": 8}) + "\n" + '{"epoch": 3, "st')
    pyro.clear_param_store()
    resumed = Trainer(*tiny_pair(), ELBO(), run_dir=tmp_path / "run", progress=False)
    resumed.resume(tmp_path / "run" / "checkpoints" / "last.pt", x[:10])
    assert metrics.read_text() == first
    resumed.fit(x, epochs=3, batch_size=10)
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


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


@posix_only
def test_sigterm_then_resume_from_the_cli_matches_an_uninterrupted_run(data_dir, tmp_path, capsys):
    # the CLI with its defaults, dynamic binarization included, in a process of its own that gets SIGTERM
    script = tmp_path / "pyrovae_tiny.py"
    script.write_text(CLI_SCRIPT)
    epochs = 12
    options = ["--epochs", str(epochs), "--seed", "3", "--objective", "beta", "--beta-schedule", "linear", "--warmup-steps", "30", "--lr", "3e-3"]
    run = subprocess.Popen([sys.executable, str(script), *train_args(data_dir, tmp_path / "run", *options)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().strip()) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # into a later epoch, most likely mid-epoch (the first epoch is the slow one)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "SIGTERM received: saved" in err and "continue with --resume" in err and "Traceback" not in err
    stopped = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert not stopped["finished"] and 1 <= stopped["cursor"]["epoch"] < epochs

    # --resume takes everything but the data folder from the run (epochs, seed, objective, batch size, ...)
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "run"), "--data-dir", str(data_dir)]) == 0
    assert f"resumed at epoch {stopped['cursor']['epoch']}, step {stopped['cursor']['step']}" in capsys.readouterr().out
    assert main(train_args(data_dir, tmp_path / "ref", *options)) == 0

    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert a["finished"] and b["finished"]
    assert params_equal(a["params"], b["params"])
    assert a["objective"] == b["objective"] == {"num_steps": 10 * epochs}
    assert a["cursor"]["step"] == b["cursor"]["step"] == 10 * epochs
    read = lambda run: _metrics([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()])
    assert read("run") == read("ref") and [r["epoch"] for r in read("run")] == list(range(1, epochs + 1))


# ================================================================================================
# 4. Safe loading: nothing in a checkpoint or config is executed


class Payload:
    """Unpickling this object would call ``open(marker, "w")``: creating the file proves the code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("save", ["torch.save", "pickle"])
def test_crafted_pickle_is_refused_and_does_not_run(save, data_dir, finished_run, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    evil = {"format": "pyrovae-checkpoint-v1", "params": Payload(marker)}
    path = tmp_path / "evil.pt"
    if save == "torch.save":
        torch.save(evil, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(evil, f, protocol=2)
    with pytest.raises(CheckpointError, match="is refused"):
        load_checkpoint(path)
    assert not marker.exists()

    run = copy_run(finished_run, tmp_path)
    shutil.copy(path, run / "checkpoints" / "best.pt")
    err = cli_error(capsys, ["evaluate", str(run), "--device", "cpu", "--data-dir", str(data_dir)])
    assert "is refused" in err and "untrusted" in err
    assert not marker.exists()


def test_config_is_read_as_data_not_code(data_dir, finished_run, tmp_path, capsys):
    marker = tmp_path / "config-ran"
    run = copy_run(finished_run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"] = f"__import__('pathlib').Path({str(marker)!r}).touch() or 'vae'"
    (run / "config.json").write_text(json.dumps(cfg))
    _without_stored_config(run)
    err = cli_error(capsys, ["evaluate", str(run), "--device", "cpu", "--data-dir", str(data_dir)])
    assert f"is not known; choose one of {sorted(registry.MODELS)}" in err
    assert not marker.exists()


# ================================================================================================
# 5. Second pass (issue 12): recovery that never crashes, run folders that cannot be corrupted, no tracebacks

def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _files(run: Path) -> dict:
    """Every file of a run folder (but the lock) and its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def _script(tmp_path: Path, extra: str = "") -> Path:
    """The CLI in a process of its own (tiny-test registered), with ``extra`` code run before ``main``."""
    script = tmp_path / "pyrovae_tiny.py"
    script.write_text(CLI_SCRIPT.replace("from pyrovae.cli import main", extra + "\nfrom pyrovae.cli import main"))
    return script


# --- bug 1: the divergence report on NaN distribution parameters --------------------------------

@nan_warnings
@pytest.mark.parametrize("extra", [
    ["--activation", "relu", "--lr", "1e20"],
    ["--activation", "relu", "--lr", "1e20", "--on-divergence", "reduce_lr"],
    ["--guide", "flow", "--flow", "planar", "--flow-length", "2", "--lr", "1e10"],
])
def test_divergence_with_nan_distribution_parameters_is_rolled_back_and_exits_3(extra, data_dir, tmp_path, capsys):
    # validation is on (as in a user's Python): the diagnosis must not die building Normal(loc=nan)
    assert pyro.infer.util.is_validation_enabled()
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "--epochs", "2", "--check-every", "2", *extra)) == 3
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Expected parameter" not in err
    assert "training diverged: non-finite" in err and "rolled back to step" in err
    assert "non-finite parameters:" in err or "sites with non-finite log-densities" in err
    if "reduce_lr" in extra:  # rolled back and halved five times before giving up
        assert "halved the learning rate (reduction 5/5)" in out
    if (run / "checkpoints" / "last.pt").exists():
        assert all(torch.isfinite(v).all() for v in load_checkpoint(run / "checkpoints" / "last.pt")["params"].values())


@nan_warnings
def test_reduce_lr_recovers_from_nan_distribution_parameters_in_the_python_api(tmp_path):
    # NaN loc after the first batch; the step is replayed, the report names the non-finite parameters, the lr halves
    x = unit_data(64)
    model, guide = VAE((D_X,), (2,), hidden=((16,),), activation="relu"), GaussianEncoder((D_X,), (2,), hidden=((16,),), activation="relu")
    trainer = Trainer(model, guide, ELBO(), lr=1e20, check_every=2, on_divergence="reduce_lr", max_lr_reductions=2, progress=False)
    with pytest.raises(DivergenceError, match=r"training diverged: non-finite (loss|gradient) at step \d+ .*rolled back"):
        trainer.fit(x, epochs=2, batch_size=8)
    assert trainer.state.lr_reductions == 2
    assert all(torch.isfinite(v).all() for v in trainer.params.values())


# --- bug 2: --overwrite replaces the old run only once the new one is valid ------------------------

@nan_warnings
def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(data_dir, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    (run / "evaluation.json").write_text('{"test_nll": 1.0}')
    (run / "samples.png").write_bytes(b"old picture")
    old = _files(run)
    # an invalid objective argument, a corrupt data folder, a run that diverges before its first checkpoint
    bad_data = tmp_path / "bad-data"
    (bad_data / TINY).mkdir(parents=True)
    (bad_data / TINY / "tiny.npz").write_bytes(b"not an npz file")
    for argv, code in [
        (train_args(data_dir, run, "--epochs", "1", "--overwrite", "--objective", "geco", "--tolerance", "-1"), 2),
        (train_args(bad_data, run, "--epochs", "1", "--overwrite"), 2),
        (train_args(data_dir, run, "--epochs", "1", "--overwrite", "--activation", "relu", "--lr", "1e20"), 3),
    ]:
        cli_error(capsys, argv, code=code)
        assert _files(run) == old, argv
    # a valid new run replaces everything, the old evaluation and pictures included
    assert main(train_args(data_dir, run, "--epochs", "2", "--overwrite")) == 0
    assert [r["epoch"] for r in _records(run)] == [1, 2]
    assert not (run / "evaluation.json").exists() and not (run / "samples.png").exists()
    assert not (run / ".replaced").exists()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["cursor"]["epoch"] == 2


# --- bug 3: metrics without last.pt, stale temporaries, torn lines -----------------------------------

SIGKILL_AT_FIRST_CHECKPOINT = r"""
import os, signal
import pyrovae.train.trainer as T
from pyrovae.utils.files import atomic_write

def killed_while_saving(state, path):  # the first checkpoint (best.pt, after epoch 1's metrics line): half written, then SIGKILL
    def half(f):
        f.write(b"\0" * 100_000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_write(path, half)

T.save_checkpoint = killed_while_saving
"""


@posix_only
def test_sigkill_before_the_first_checkpoint_leaves_a_folder_a_new_run_cleans(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    script = _script(tmp_path, SIGKILL_AT_FIRST_CHECKPOINT)
    out = subprocess.run([sys.executable, str(script), *train_args(data_dir, run, "--epochs", "2")], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    assert [r["epoch"] for r in _records(run)] == [1] and not (run / "checkpoints" / "last.pt").exists()
    assert list((run / "checkpoints").glob(".best.pt.*.tmp"))  # what the kill left behind
    # a new run in that folder: it holds no run (no last.pt), so it starts afresh without the stale metrics and temporary
    assert main(train_args(data_dir, run, "--epochs", "2")) == 0
    assert [r["epoch"] for r in _records(run)] == [1, 2]
    assert not list(run.rglob("*.tmp"))


def test_torn_metrics_of_a_run_without_checkpoint_are_not_glued_to(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 4}) + "\n" + '{"epoch": 2, "st')
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"\0" * 1000)
    Trainer(*tiny_pair(), ELBO(), run_dir=run, progress=False).fit(unit_data(40), epochs=2, batch_size=10)
    assert [r["epoch"] for r in _records(run)] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


# --- bug 4: one writer per run folder --------------------------------------------------------------

@posix_only
def test_a_second_writer_is_refused_with_the_holders_process_id(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    script = _script(tmp_path)
    first = subprocess.Popen([sys.executable, str(script), *train_args(data_dir, run, "--epochs", "100000")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "checkpoints" / "last.pt").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1]
        before = _records(run)
        holder = f"in use by process {first.pid}"
        done = load_checkpoint(run / "checkpoints" / "last.pt")["cursor"]["epoch"]
        for extra in (["--resume", "--epochs", str(done + 1)], ["--epochs", "1"], ["--epochs", "1", "--overwrite"]):
            err = cli_error(capsys, train_args(data_dir, run, *extra))
            assert holder in err, err
        with pytest.raises(ValueError, match=holder):
            Trainer(*tiny_pair(), ELBO(), run_dir=run, progress=False).fit(unit_data(40), epochs=1, batch_size=10)
        assert not (run / ".replaced").exists() and _records(run)[: len(before)] == before
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    # the lock went with its holder: the run resumes (for a few more epochs) in this process
    epoch = load_checkpoint(run / "checkpoints" / "last.pt")["cursor"]["epoch"]
    assert main(train_args(data_dir, run, "--resume", "--epochs", str(epoch + 1))) == 0
    epochs = [r["epoch"] for r in _records(run)]
    assert epochs == list(range(1, epoch + 2))


# --- bug 5: --resume --epochs N at or below the current epoch -------------------------------------

def _cli_interrupted_at(monkeypatch, at_step, argv):
    """Run the CLI in this process, sending it SIGINT during step ``at_step`` (it checkpoints mid-epoch and exits 130)."""
    step = Trainer.step

    def signalling_step(self, x):
        if self.cursor.step + 1 == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, x)

    monkeypatch.setattr(Trainer, "step", signalling_step)
    assert main(argv) == 130
    monkeypatch.setattr(Trainer, "step", step)


@posix_only
def test_resume_to_an_epoch_the_run_is_already_past_is_refused_and_changes_nothing(monkeypatch, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _cli_interrupted_at(monkeypatch, 13, train_args(data_dir, run, "--epochs", "3"))  # 10 steps an epoch: 3 batches into epoch 2
    last = run / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["cursor"]["pos"] == 3
    before = _files(run)
    err = cli_error(capsys, train_args(data_dir, run, "--resume", "--epochs", "1"))
    assert "already at epoch 1 and 3 batches into epoch 2" in err and "--epochs N with N >= 2" in err
    with pytest.raises(SystemExit) as stop:  # --epochs 0 is refused where it is parsed
        main(train_args(data_dir, run, "--resume", "--epochs", "0"))
    assert stop.value.code == 2 and "--epochs: 0 must be a positive integer" in capsys.readouterr().err
    assert _files(run) == before
    # the Python API refuses too
    pyro.clear_param_store()
    trainer = Trainer(*tiny_pair(), ELBO(), run_dir=run, progress=False)
    trainer.resume(last, unit_data(10))
    with pytest.raises(ValueError, match=r"epochs=1, but the run is already at epoch 1 and 3 batches into epoch 2: pass epochs >= 2"):
        trainer.fit(unit_data(100), epochs=1, batch_size=10)
    assert _files(run) == before
    # and the epoch's running sums survived: resuming to 2 epochs logs what an uninterrupted run logs
    assert main(train_args(data_dir, run, "--resume", "--epochs", "2")) == 0
    assert main(train_args(data_dir, tmp_path / "ref", "--epochs", "2")) == 0
    assert _metrics(_records(run)) == _metrics(_records(tmp_path / "ref"))


# --- bug 6: messages and exit 2, not tracebacks ----------------------------------------------------

def test_run_dir_naming_a_file_and_an_absurd_lr_are_refused(data_dir, tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    err = cli_error(capsys, train_args(data_dir, path, "--epochs", "1"))
    assert f"--run-dir {path} is an existing file, not a folder" in err
    assert path.read_text() == "not a folder"
    err = cli_error(capsys, ["evaluate", str(path), "--device", "cpu"])
    assert f"the run folder {path} does not exist or is not a folder" in err
    err = cli_error(capsys, train_args(data_dir, tmp_path / "run", "--epochs", "1", "--lr", "1e38"))
    assert "--lr 1e+38 is too large" in err  # the CLI's flag, not the Python argument lr=
    err = cli_error(capsys, train_args(data_dir, tmp_path / "run", "--epochs", "1", "--likelihood", "gaussian", "--scale", "-1"))
    assert "--scale -1.0 must be positive" in err


@pytest.mark.parametrize("argv", [
    ["evaluate", "RUN", "--limit", "-9999"], ["evaluate", "RUN", "--limit", "0"],
    ["train", "--eval-limit", "0"], ["train", "--eval-limit", "-5"], ["train", "--eval-samples", "-1"],
])
def test_counts_that_would_evaluate_everything_or_nothing_silently_are_refused(argv, finished_run, capsys):
    argv = [str(finished_run) if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[-2]}" in err and "must be" in err


@pytest.mark.parametrize("text, what", [("[1, 2]", "holds a JSON list, not a run configuration"), ('{"model": "vae",', "cannot be read as a run configuration")])
def test_a_config_that_is_not_an_object_names_the_file(text, what, data_dir, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    (run / "config.json").write_text(text)
    for argv in (["evaluate", str(run), "--device", "cpu", "--data-dir", str(data_dir)], ["sample", str(run), "--device", "cpu"],
                 train_args(data_dir, run, "--resume", "--epochs", "2")):
        err = cli_error(capsys, argv)
        assert f"{run / 'config.json'} {what}" in err, err


def test_sample_into_a_missing_folder_says_so(finished_run, tmp_path, capsys):
    out = tmp_path / "missing" / "s.png"
    err = cli_error(capsys, ["sample", str(finished_run), "--device", "cpu", "--out", str(out)])
    assert f"the folder {out.parent} does not exist" in err


def _cursor_list(state):
    state["cursor"] = [1, 0, 10]


def _params_strings(state):
    state["params"] = {k: "0.5" for k in state["params"]}


def _perm_out_of_range(state):
    state["cursor"] = {"epoch": 0, "pos": 3, "step": 3, "perm": torch.arange(100) + 1000}
    state["finished"] = False


def _rng_string(state):
    state["rng"] = {**state["rng"], "torch": "0123"}


def _lr_string(state):
    state["optimizer"]["param_groups"][0]["lr"] = "0.1"


def _adam_moment_of_another_shape(state):
    entry = next(iter(state["optimizer"]["state"].values()))
    entry["exp_avg"] = torch.zeros(3, 3, 3)


@pytest.mark.parametrize("damage, message", [
    (_cursor_list, "its 'cursor' is not a table"), (_params_strings, "is not a floating-point tensor"),
    (_perm_out_of_range, "not a permutation of the 100 training examples"),
    (_rng_string, "its torch random-number state is not a 1-D byte tensor"),
    (_lr_string, "its optimiser's 'lr' in param group 0 is '0.1', not a number"),
    (_adam_moment_of_another_shape, "optimiser state 'exp_avg' of parameter"),
])
def test_checkpoints_with_the_format_tag_but_wrong_contents_are_refused(damage, message, data_dir, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run / "checkpoints" / name)
        damage(state)
        save_checkpoint({k: v for k, v in state.items() if k != "format"}, run / "checkpoints" / name)
    err = cli_error(capsys, train_args(data_dir, run, "--resume", "--epochs", "2"))
    assert message in err, err
    if damage is _params_strings:
        err = cli_error(capsys, ["evaluate", str(run), "--device", "cpu", "--data-dir", str(data_dir)])
        assert message in err, err


needs_namespaces = pytest.mark.skipif(
    shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0,
    reason="needs unshare -rm (user and mount namespaces) to mount a read-only or a full file system",
)


@posix_only
@needs_namespaces
def test_evaluate_on_a_read_only_file_system_says_so_before_computing(data_dir, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    script = _script(tmp_path)
    command = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" "$3" evaluate "$1" --device cpu --data-dir "$4" -k 50000'
    out = subprocess.run(["unshare", "-rm", "sh", "-c", command, "sh", str(run), sys.executable, str(script), str(data_dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and f"the run folder {run} is not writable (Read-only file system)" in out.stderr
    assert "log-likelihood chunks" not in out.stdout  # refused before the (here 50,000-sample) log-likelihood


@posix_only
@needs_namespaces
def test_a_full_disk_gives_a_message_and_keeps_no_temporary(data_dir, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = _script(tmp_path)
    # 16 KiB: room for config.json and a metrics line, not for a checkpoint
    command = 'd="$1"; shift; mount -t tmpfs -o size=16k tmpfs "$d" && "$@"; code=$?; ls -A "$d/run" "$d/run/checkpoints"; exit $code'
    argv = train_args(data_dir, disk / "run", "--epochs", "1")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", command, "sh", str(disk), sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "pyrovae train: error: " in out.stderr and ("No space left on device" in out.stderr or "could not write the checkpoint" in out.stderr)
    assert ".tmp" not in out.stdout  # the listing of the run folder: no temporary left behind


# --- bug 7: the Python API checks the data and the run folder --------------------------------------

@pytest.mark.parametrize("value", [255.0, -3.0])
def test_fit_refuses_data_a_bernoulli_model_cannot_have(value, tmp_path):
    x = unit_data(1000)
    x[517, 3] = value
    with pytest.raises(ValueError, match=r"the training data has values in .*outside \[0, 1\].*\(the model's likelihood is bernoulli\)"):
        Trainer(*tiny_pair(), ELBO(), run_dir=tmp_path / "run", progress=False).fit(x, epochs=1, batch_size=100)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"the validation data has values"):
        Trainer(*tiny_pair(), ELBO(), progress=False).fit(unit_data(100), epochs=1, batch_size=100, valid=x)
    # a Gaussian likelihood takes any finite value; NaN is refused by every model
    pyro.clear_param_store()
    gaussian = VAE((D_X,), (2,), hidden=((16,),), likelihood="gaussian"), GaussianEncoder((D_X,), (2,), hidden=((16,),))
    Trainer(*gaussian, ELBO(), progress=False).fit(x, epochs=1, batch_size=500)
    x[3, 3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        Trainer(*gaussian, ELBO(), progress=False).fit(x, epochs=1, batch_size=500)


def test_fit_names_uint8_data_and_checks_the_first_tensor_of_a_tuple():
    from pyrovae.train import check_fit_data

    model, _ = tiny_pair()
    with pytest.raises(TypeError, match=r"dtype torch.uint8; the models need floating-point data: convert it, e.g. x.float\(\) / 255"):
        Trainer(*tiny_pair(), ELBO(), progress=False).fit((255 * unit_data(100)).to(torch.uint8), epochs=1, batch_size=10)
    x, y = unit_data(100), torch.arange(100)
    check_fit_data(model, (x, y))
    x[0, 0] = 2.0
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        check_fit_data(model, (x, y))


def test_a_trainer_on_a_folder_with_a_finished_run_refuses_to_write_over_it(tmp_path):
    x = unit_data(40)
    Trainer(*tiny_pair(), ELBO(), run_dir=tmp_path / "run", progress=False).fit(x, epochs=2, batch_size=10)
    before = _files(tmp_path / "run")
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"already holds a finished run: continue it with Trainer.resume\(.*last.pt'?, x\) before fit"):
        Trainer(*tiny_pair(), ELBO(), run_dir=tmp_path / "run", progress=False).fit(x, epochs=2, batch_size=10)
    assert _files(tmp_path / "run") == before
    # resuming it explicitly continues the same records
    pyro.clear_param_store()
    trainer = Trainer(*tiny_pair(), ELBO(), run_dir=tmp_path / "run", progress=False)
    trainer.resume(tmp_path / "run" / "checkpoints" / "last.pt", x[:10])
    trainer.fit(x, epochs=3, batch_size=10)
    assert [r["epoch"] for r in _records(tmp_path / "run")] == [1, 2, 3]


# --- weaker spots -----------------------------------------------------------------------------------

def test_resume_refuses_options_that_would_change_the_run(data_dir, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    before = _files(run)
    err = cli_error(capsys, train_args(data_dir, run, "--resume", "--epochs", "2", "--lr", "0.5", "--objective", "iwae", "--batch-size", "7"))
    assert "these options would change it" in err
    assert "--lr 0.5 (the run has 0.001)" in err and "--objective iwae (the run has elbo)" in err and "--batch-size 7 (the run has 10)" in err
    assert _files(run) == before


def _guide_with_extra_site(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("w", dist.Normal(x.new_zeros(x.shape[0]), 1.0))


def _model_without_observation(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))


@pytest.mark.parametrize("model, guide, message", [
    (VAE((D_X,), (2,), hidden=((16,),)), _guide_with_extra_site, r"the guide samples a site 'w' that the model does not have \(the model's sample sites: \['x', 'z'\]\)"),
    (_model_without_observation, _guide_with_extra_site, r"the model has no observed site \(sample sites: \['z'\]\)"),
    (VAE((D_X,), (2,), hidden=((16,),)), GaussianEncoder((D_X,), (3,), hidden=((16,),)), r"the guide's site 'z' has event shape \(3,\) but the model's has \(2,\)"),
])
def test_model_guide_pairs_that_cannot_train_are_named(model, guide, message):
    with pytest.raises(ValueError, match=message):
        Trainer(model, guide, ELBO(), progress=False).fit(unit_data(20), epochs=1, batch_size=10)


def test_cli_discrete_model_with_a_gaussian_guide_is_an_invalid_pairing(data_dir, tmp_path, capsys):
    err = cli_error(capsys, train_args(data_dir, tmp_path / "run", "--epochs", "1", "--model", "discrete", "--guide", "gaussian"))
    assert "the guide's samples of site 'z' (Normal) lie outside the support of the model's distribution there" in err
    assert "cannot be paired" in err and "tensor(" not in err


@pytest.mark.parametrize("hidden", [[(0,)], [(-3,)]])
def test_vae_refuses_hidden_sizes_that_are_not_positive(hidden):
    with pytest.raises(ValueError, match="every hidden size must be a positive integer"):
        VAE((D_X,), (2,), hidden=hidden)
    with pytest.raises(ValueError, match="every hidden size must be a positive integer"):
        GaussianEncoder((D_X,), (2,), hidden=hidden)


def test_metrics_are_not_appended_through_a_planted_symlink(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(target)
    with pytest.raises(ValueError, match="metrics.jsonl is a symbolic link; pyrovae does not follow links"):
        Trainer(*tiny_pair(), ELBO(), run_dir=run, progress=False).fit(unit_data(40), epochs=1, batch_size=10)
    assert target.read_text() == "precious\n"
    # planted after the start (between two epochs): the append refuses it too
    (run / "metrics.jsonl").unlink()
    import pyrovae.train.runs as runs

    runs.append_metrics(run, {"epoch": 1})
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        runs.append_metrics(run, {"epoch": 2})
    assert target.read_text() == "precious\n"


def test_an_empty_data_dir_does_not_fall_back_to_the_environment(monkeypatch, data_dir, tmp_path, capsys):
    monkeypatch.setenv("PYROVAE_DATA", str(data_dir))  # the data is there, but --data-dir names an empty folder
    (tmp_path / "empty").mkdir()
    err = cli_error(capsys, train_args(tmp_path / "empty", tmp_path / "run", "--epochs", "1"))
    assert f"--data-dir {tmp_path / 'empty'} holds no {TINY} files" in err and f"--data-dir {data_dir}" in err
    assert not (tmp_path / "run").exists()
