"""Training and evaluation on 2 gloo processes on the CPU (pyrovae.train.distributed) against one process.

Exact comparisons need gradients and estimates that do not depend on the ranks' random draws (each rank has
its own stream, so 2 processes cannot reproduce a single process's draws):
- training: a model with no latent variables, so that every objective is its exact log-likelihood and the
  only randomness is the batch order, which every rank takes from rank 0, whose stream is the single
  process's. The parameters after N steps must then equal a single run on the same global batches, up to
  the order of floating-point sums (float64 here, so to 1e-10).
- log-likelihood: a linear-Gaussian model with q the exact posterior: every importance weight equals p(x),
  so the estimate is log p(x) whatever the draws, and the gathered per-datum values equal one process's.
A VAE (latent draws, which differ by rank) must still keep identical parameters on both ranks.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import pyrovae.train.distributed as distributed
import pyrovae.evaluate as E
from pyrovae.data import Batches
from pyrovae.models import ExactPosteriorGuide, LinearGaussian, LinearGaussianGuide
from pyrovae.objectives import ELBO, GECO
from pyrovae.train import Trainer, TrainingInterrupted

WORLD, N, BATCH, EPOCHS, CHECK = 2, 37, 10, 2, 3  # 37 = 3 * 10 + 7: uneven shards (5/5, 4/3) in the last batch


class Regression(nn.Module):
    """y ~ N(net(x), s^2): observed sites only, no latent variable."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    def forward(self, x, y):
        pyro.module("regression", self)
        log_s = pyro.param("log_s", torch.zeros((), dtype=torch.float64))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(self.net(x).squeeze(-1), log_s.exp()), obs=y)


def no_guide(x, y):
    pass


class AtStep(ELBO):
    """An ELBO that counts optimiser steps and calls :meth:`after` once step ``at`` is done (``at`` differs by rank)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.steps = at, 0

    def step(self, state=None):
        super().step(state)
        self.steps += 1
        if self.steps == self.at:
            self.after()

    def after(self):
        pass


class StopAt(AtStep):
    """Sends SIGTERM to its own process after optimiser step ``at``."""

    def after(self):
        os.kill(os.getpid(), signal.SIGTERM)


class PoisonAt(AtStep):
    """Its loss is NaN once, on the step after optimiser step ``at`` (plain steps: a captured step would not call it)."""

    def estimate(self, model, guide, args, kwargs, state):
        est = super().estimate(model, guide, args, kwargs, state)
        if self.steps == self.at and not getattr(self, "done", False):
            self.done = True
            est.loss, est.surrogate = est.loss * float("nan"), est.surrogate * float("nan")
        return est


class NudgeAt(AtStep):
    """Moves one parameter of its process after step ``at``: per-rank state the trainer cannot see."""

    def after(self):
        with torch.no_grad():
            pyro.param("log_s").unconstrained().add_(1e-3)


def regression_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, dtype=torch.float64, generator=g)
    return x, torch.sin(x.sum(1)) + 0.1 * torch.randn(N, dtype=torch.float64, generator=g)


def gaussian_data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(11, 3, dtype=torch.float64, generator=g)  # 11: shards of 6 and 5


def train_regression(objective=None, run_dir=None, epochs=EPOCHS):
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    trainer = Trainer(Regression(), no_guide, objective or ELBO(), lr=0.05, run_dir=run_dir, check_every=CHECK, progress=False)
    trainer.fit(regression_data(), epochs, BATCH)
    return trainer


def exact_pair():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    model = LinearGaussian(3, 2, dtype=torch.float64)
    return model, ExactPosteriorGuide(model)


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.params.items()}


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init("cpu", quiet=False)
    results = {"plain": _params(train_regression(run_dir=os.path.join(out, "run")))}
    geco = train_regression(GECO(tolerance=0.5, nu=2.0))
    results["geco"] = (_params(geco), geco.objective.state_dict())

    # SIGTERM on rank 1 alone after step 1: both ranks stop at the next check (step 3, mid-epoch), then resume
    try:
        train_regression(StopAt(1 if rank == 1 else -1), run_dir=os.path.join(out, "stopped"))
        results["stopped"] = "no"
    except TrainingInterrupted:
        results["stopped"] = "yes"
    pyro.clear_param_store()
    trainer = Trainer(Regression(), no_guide, ELBO(), lr=0.05, run_dir=os.path.join(out, "stopped"), check_every=CHECK, progress=False)
    x, y = regression_data()
    trainer.resume(os.path.join(out, "stopped", "checkpoints", "last.pt"), x[:BATCH], y[:BATCH])
    results["resumed_from"] = trainer.cursor.step
    trainer.fit((x, y), EPOCHS, BATCH)
    results["resumed"] = _params(trainer)

    # a NaN loss on rank 1 alone at step 5: both ranks roll back to step 3 and halve the learning rate
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    trainer = Trainer(Regression(), no_guide, PoisonAt(4 if rank == 1 else -1), lr=0.05, check_every=CHECK, on_divergence="reduce_lr", progress=False, capture="off")
    trainer.fit(regression_data(), EPOCHS, BATCH)
    results["rolled_back"] = (trainer.state.lr_reductions, trainer.cursor.epoch, _params(trainer))

    try:  # parameters that drift apart on one rank are caught at the next check
        train_regression(NudgeAt(1 if rank == 1 else -1))
        results["drift"] = "unnoticed"
    except RuntimeError as e:
        results["drift"] = str(e)

    model, guide = exact_pair()
    ll = distributed.log_likelihood(model, guide, gaussian_data(), num_samples=20, batch_size=4)
    results["ll"] = (ll.values, ll.stderr)

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    model = LinearGaussian(3, 2, dtype=torch.float64)
    guide = LinearGaussianGuide(3, 2, dtype=torch.float64)
    vae = Trainer(model, guide, ELBO(num_particles=2), lr=0.05, check_every=CHECK, progress=False)
    vae.fit(gaussian_data(), 2, 6)
    results["vae"] = _params(vae)
    try:  # ranks that loaded different data
        distributed.ShardedBatches(Batches(gaussian_data() + rank, 4))
        results["different_data"] = "accepted"
    except ValueError as e:
        results["different_data"] = str(e)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return out, [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12, msg=k)


def test_objective_state_is_that_of_the_global_batch(two_ranks):
    # GECO's moving average and multiplier follow the global batch's constraint (the paper's rule, inside its
    # bounds: linear in the batch mean), so two processes take the single process's steps with its multiplier
    _, results = two_ranks
    reference = train_regression(GECO(tolerance=0.5, nu=2.0))
    state = reference.objective.state_dict()
    assert abs(float(state["log_lambda"])) > 1e-3  # the multiplier moved
    for r in range(WORLD):
        params, theirs = results[r]["geco"]
        _assert_close(params, _params(reference))
        for k in state:
            torch.testing.assert_close(theirs[k].double(), state[k].double(), rtol=1e-6, atol=1e-8, msg=k)


def test_two_processes_take_the_steps_of_one_on_the_global_batch(two_ranks):
    out, results = two_ranks
    reference = train_regression()
    for r in range(WORLD):
        _assert_close(results[r]["plain"], _params(reference))
    # the parameters moved: the comparison is not between two untouched initialisations
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    untrained = Trainer(Regression(), no_guide, ELBO(), progress=False)
    untrained.setup(*(t[:BATCH] for t in regression_data()))
    assert any(not torch.allclose(untrained.params[k], v) for k, v in _params(reference).items())
    # rank 0 alone wrote the run: 2 epochs of metrics, the same as the single run's
    lines = open(os.path.join(out, "run", "metrics.jsonl")).read().splitlines()
    assert len(lines) == EPOCHS
    assert os.path.exists(os.path.join(out, "run", "checkpoints", "last.pt"))


def test_a_signal_on_one_rank_stops_both_and_resume_continues_exactly(two_ranks):
    _, results = two_ranks
    reference = _params(train_regression())
    for r in range(WORLD):
        assert results[r]["stopped"] == "yes"
        assert results[r]["resumed_from"] == CHECK  # the check after rank 1's signal at step 1
        _assert_close(results[r]["resumed"], reference)


def test_a_nan_on_one_rank_rolls_both_back_together(two_ranks):
    _, results = two_ranks
    (reductions, epoch, params), (reductions1, epoch1, params1) = results[0]["rolled_back"], results[1]["rolled_back"]
    assert reductions == reductions1 == 1 and epoch == epoch1 == EPOCHS
    for k, v in params.items():
        assert torch.isfinite(v).all() and torch.equal(v, params1[k]), k


def test_parameters_that_drift_apart_are_an_error_on_every_rank(two_ranks):
    _, results = two_ranks
    for r in range(WORLD):
        assert "parameters differ at step 3" in results[r]["drift"]


def test_sharded_log_likelihood_equals_one_process(two_ranks):
    _, results = two_ranks
    model, guide = exact_pair()
    x = gaussian_data()
    single = E.log_likelihood(model, guide, x, num_samples=20, batch_size=4)
    torch.testing.assert_close(single.values, model.log_marginal(x), rtol=1e-10, atol=1e-10)  # q = p(z|x): exact
    for r in range(WORLD):
        values, stderr = results[r]["ll"]
        assert values.shape == (11,)
        torch.testing.assert_close(values, single.values, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(stderr, single.stderr, rtol=0, atol=1e-6)


def test_a_vae_keeps_identical_parameters_on_every_rank(two_ranks):
    _, results = two_ranks
    for k, v in results[0]["vae"].items():
        assert torch.equal(v, results[1]["vae"][k]), k


def test_ranks_with_different_data_are_an_error(two_ranks):
    _, results = two_ranks
    for r in range(WORLD):
        assert "different training data" in results[r]["different_data"]


@pytest.mark.parametrize("n, parts", [(37, 2), (7, 3), (2, 4), (0, 2)])
def test_shards_are_contiguous_cover_everything_and_differ_by_at_most_one(n, parts):
    bounds = [distributed.shard_bounds(n, parts, r) for r in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_one_process_never_touches_torch_distributed():
    assert not distributed.active() and distributed.is_main() and distributed.world_size() == 1
    batches = Batches(gaussian_data(), 4)
    assert distributed.shard_batches(batches) is batches
    loss, norm = torch.tensor(1.0), torch.tensor(2.0)
    assert distributed.average_gradients(None, loss, norm, 4) == (loss, norm)
    assert distributed.sharded_mean(lambda x: float(x.mean()), gaussian_data()) == float(gaussian_data().mean())
    # the trainer's default strategy checks at each call, so it is the identity here and a trainer built before
    # distributed.init() still takes part in the collectives once they exist
    strategy = Trainer(LinearGaussian(3, 2), LinearGaussianGuide(3, 2), ELBO(), progress=False).strategy
    assert isinstance(strategy, distributed.DataParallel)
    assert strategy.is_main and strategy.shard(batches) is batches and strategy.average(None, loss, norm, 4) == (loss, norm)
    assert strategy.agree(torch.tensor(True), None, None)[1] is None and not strategy.stop_requested(None) and strategy.stop_requested(2)


# --- a manual launch of the CLI: two processes started by hand, each with its own options -----------------------
CLI_SCRIPT = """
import sys
import numpy as np
import torch
from pyrovae.data import RawData, register_dataset

@register_dataset("tiny-dist", ["tiny.npz"])
def read(folder):
    z = np.load(folder / "tiny.npz")
    return RawData(train=torch.from_numpy(z["train"]), test=torch.from_numpy(z["test"]))

from pyrovae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _launch(tmp_path: Path, *per_rank: list, timeout: float = 60):
    """``pyrovae train`` on a tiny data set as ranks 0 and 1 of a process group, started by hand (no torchrun to stop
    the survivors), rank r with the extra options ``per_rank[r]``, every collective bounded by ``timeout`` seconds."""
    data = tmp_path / "data" / "tiny-dist"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(data / "tiny.npz", train=rng.random((60, 6)).astype(np.float32), test=rng.random((10, 6)).astype(np.float32))
    script = tmp_path / "pyrovae_tiny.py"
    script.write_text(CLI_SCRIPT)
    common = [
        "train", "--dataset", "tiny-dist", "--data-dir", str(tmp_path / "data"), "--valid-size", "10", "--hidden", "8", "--device", "cpu",
        "--capture", "off", "--eval-samples", "0", "--no-progress", "--run-dir", str(tmp_path / "run"),
    ]
    port = _free_port()
    procs = []
    for r, extra in enumerate(per_rank):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r), "LOCAL_RANK": str(r),
               "WORLD_SIZE": str(len(per_rank)), distributed.TIMEOUT_ENV: str(timeout), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), *common, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout=120):
    """(exit code, stderr) of each process, killing every one still running after ``timeout`` seconds in all."""
    deadline, results = time.monotonic() + timeout, []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def _wait_for_training(tmp_path: Path, procs, timeout=90):
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().strip()):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail(f"the two ranks did not finish an epoch: {[p.communicate()[1][-2000:] for p in procs]}")
        time.sleep(0.1)


def test_ranks_started_with_different_options_refuse_on_every_rank_naming_each_option(tmp_path):
    # issue 26 item 5 (--epochs: both ranks hung in gloo) and issue 28 item 5 (--batch-size, --z-dims, --objective:
    # "collective mismatch" abort on one rank, a raw traceback on the other)
    procs = _launch(
        tmp_path,
        ["--epochs", "2", "--batch-size", "10", "--z-dims", "2", "--objective", "elbo"],
        ["--epochs", "4", "--batch-size", "20", "--z-dims", "3", "--objective", "iwae"],
    )
    for r, (code, err) in enumerate(_finish(procs)):
        assert code == 2 and "Traceback" not in err, (r, code, err[-3000:])
        assert "started with different options" in err, err
        for shown in ("--epochs: 2 on rank 0, 4 on rank 1", "--batch-size: 10 on rank 0, 20 on rank 1", "--z-dims: 2 on rank 0, 3 on rank 1",
                      "--objective: elbo on rank 0, iwae on rank 1"):
            assert shown in err, (shown, err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_rank_killed_in_a_manual_launch_gives_the_survivor_a_message(tmp_path):
    procs = _launch(tmp_path, ["--epochs", "100000"], ["--epochs", "100000"])
    _wait_for_training(tmp_path, procs)
    procs[1].kill()
    (code, err), _ = _finish(procs)
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert "rank 0 of 2:" in err and "another rank left the process group" in err, err


def test_a_rank_that_stops_answering_ends_the_others_after_the_timeout(tmp_path):
    procs = _launch(tmp_path, ["--epochs", "100000"], ["--epochs", "100000"], timeout=5)
    _wait_for_training(tmp_path, procs)
    procs[1].send_signal(signal.SIGSTOP)  # stuck, not dead: its connection stays open
    try:
        start = time.monotonic()
        code, err = _finish(procs[:1], timeout=60)[0]
        waited = time.monotonic() - start
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert "did not reach it within 5 s" in err and distributed.TIMEOUT_ENV in err, err
    assert waited < 30


def test_a_bad_timeout_setting_is_refused_with_the_variable(monkeypatch):
    for text in ("0", "-1", "nan", "soon"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, text)
        with pytest.raises(ValueError, match=f"{distributed.TIMEOUT_ENV}=.*must be a number of seconds > 0"):
            distributed.timeout_seconds()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed.timeout_seconds() == 2.5
