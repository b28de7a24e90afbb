"""The training loop's callbacks: hooks, records, clean stops, progress output, metrics, checkpoints, TensorBoard."""
from __future__ import annotations

import json
import sys

import pyro
import pytest
import torch

import pyrovae.nn.checks as nn_checks
import pyrovae.train.checks as checks
import pyrovae.utils.progress as progress
from pyrovae.train.callbacks import Callback, Checkpoints, EachEpoch, MetricsFile, Progress, TensorBoard
from pyrovae.train.checkpoint import load_checkpoint
from pyrovae.guides import GaussianEncoder
from pyrovae.models import VAE
from pyrovae.objectives import ELBO
from pyrovae.train import DivergenceError, Trainer

D = 6


def pair():
    return VAE((D,), (2,), hidden=((8,),)), GaussianEncoder((D,), (2,), hidden=((8,),))


def data(n=40, seed=0):
    return torch.rand(n, D, generator=torch.Generator().manual_seed(seed))


def trainer(**kwargs) -> Trainer:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    return Trainer(*pair(), ELBO(), lr=1e-2, progress=False, **kwargs)


def params(t: Trainer) -> dict:
    return {k: v.detach().clone() for k, v in t.params.items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, trainer):
        self.calls.append(("train_begin", trainer.cursor.step))

    def on_epoch_begin(self, trainer):
        self.calls.append(("epoch_begin", trainer.cursor.epoch))

    def on_step_end(self, trainer, batch, loss, norm):
        self.calls.append(("step", trainer.cursor.step, batch[0].shape[0], loss.dim(), norm.dim()))

    def on_epoch_end(self, trainer, record):
        self.calls.append(("epoch_end", record["epoch"], record["step"]))

    def on_train_end(self, trainer):
        self.calls.append(("train_end", trainer.cursor.step))


def test_hooks_are_called_in_order_with_the_loops_position():
    rec = Recorder()
    trainer(callbacks=[rec]).fit(data(40), epochs=2, batch_size=16)  # 3 batches an epoch: 16, 16, 8
    steps = [("step", s, b, 0, 0) for s, b in zip(range(1, 4), (16, 16, 8))]
    steps2 = [("step", s, b, 0, 0) for s, b in zip(range(4, 7), (16, 16, 8))]
    assert rec.calls == [("train_begin", 0), ("epoch_begin", 0), *steps, ("epoch_end", 1, 3), ("epoch_begin", 1), *steps2, ("epoch_end", 2, 6), ("train_end", 6)]


def test_trainer_and_fit_callbacks_run_in_that_order_before_the_builtins(tmp_path):
    order = []

    class Named(Callback):
        def __init__(self, name):
            self.name = name

        def on_epoch_end(self, trainer, record):
            order.append(self.name)
            record[f"seen_by_{self.name}"] = len(order)

    t = trainer(callbacks=[Named("a")], run_dir=tmp_path / "run")
    history = t.fit(data(20), epochs=2, batch_size=10, callbacks=[Named("b")])
    assert order == ["a", "b", "a", "b"]
    assert [(r["seen_by_a"], r["seen_by_b"]) for r in history] == [(1, 2), (3, 4)]
    written = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert written == history  # the entries a callback added reach metrics.jsonl


def test_a_callback_that_is_not_one_is_refused_before_training():
    t = trainer()
    with pytest.raises(TypeError, match="pyrovae.train.callbacks.Callback"):
        t.fit(data(20), epochs=1, batch_size=10, callbacks=[lambda trainer: None])
    assert t.optim is None and t.cursor.step == 0
    with pytest.raises(TypeError, match="Callback"):
        Trainer(*pair(), ELBO(), callbacks=["progress"])
    with pytest.raises(TypeError, match="fn\\(trainer, record\\)"):
        EachEpoch("log")


def test_each_epoch_runs_a_function_that_may_add_to_the_record_and_stop():
    def fn(trainer, record):
        record["double_step"] = 2 * record["step"]
        trainer.stop_training = record["epoch"] == 2

    history = trainer().fit(data(20), epochs=5, batch_size=10, callbacks=[EachEpoch(fn)])
    assert [(r["epoch"], r["double_step"]) for r in history] == [(1, 4), (2, 8)]


class StopAfter(Callback):
    def __init__(self, epochs=None, steps=None):
        self.epochs, self.steps = epochs, steps

    def on_step_end(self, trainer, batch, loss, norm):
        if self.steps is not None and trainer.cursor.step >= self.steps:
            trainer.stop_training = True

    def on_epoch_end(self, trainer, record):
        if self.epochs is not None and record["epoch"] >= self.epochs:
            trainer.stop_training = True


def test_stopping_at_an_epoch_end_is_a_run_of_that_many_epochs(tmp_path):
    x = data(40)
    stopped = trainer(run_dir=tmp_path / "stopped")
    history = stopped.fit(x, epochs=10, batch_size=10, callbacks=[StopAfter(epochs=3)])
    plain = trainer(run_dir=tmp_path / "plain")
    plain.fit(x, epochs=3, batch_size=10)
    assert [r["epoch"] for r in history] == [1, 2, 3] and stopped.cursor.step == plain.cursor.step == 12
    assert same(params(stopped), params(plain))
    state = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert state["finished"] and state["cursor"]["epoch"] == 3 and state["cursor"]["pos"] == 0
    # the next fit continues the run: stop_training is reset
    assert [r["epoch"] for r in stopped.fit(x, epochs=4, batch_size=10)] == [1, 2, 3, 4]


def test_stopping_mid_epoch_checkpoints_the_epoch_so_far_and_fit_continues_it(tmp_path):
    x = data(40)
    t = trainer(run_dir=tmp_path / "run", check_every=3)
    assert t.fit(x, epochs=2, batch_size=10, callbacks=[StopAfter(steps=6)]) == t.history
    assert [r["epoch"] for r in t.history] == [1] and (t.cursor.epoch, t.cursor.pos, t.cursor.step) == (1, 2, 6)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert not state["finished"] and state["cursor"]["pos"] == 2 and state["sums"]["count"] == 2
    t.fit(x, epochs=2, batch_size=10)  # the rest of epoch 2
    plain = trainer()
    plain.fit(x, epochs=2, batch_size=10)
    assert same(params(t), params(plain)) and t.cursor.step == 8
    assert t.history[1]["train_loss"] == pytest.approx(plain.history[1]["train_loss"], rel=1e-6)  # the epoch's mean spans the stop
    # and from the checkpoint, in a new process's worth of state
    expected = params(plain)
    trainer(run_dir=tmp_path / "run2").fit(x, epochs=2, batch_size=10, callbacks=[StopAfter(steps=6)])
    resumed = trainer(run_dir=tmp_path / "run2")
    resumed.resume(tmp_path / "run2" / "checkpoints" / "last.pt", x[:10])
    resumed.fit(x, epochs=2, batch_size=10)
    assert same(params(resumed), expected)


def test_per_epoch_work_in_a_callback_matches_reentering_fit():
    """What the benchmarks did before callbacks (fit(train, epoch + 1) in a loop) and what they do now agree."""
    x, seen = data(40), []

    class Log(Callback):
        def on_epoch_end(self, trainer, record):
            seen.append((record["epoch"], record["train_loss"]))

    t = trainer(schedule="iwae")
    t.fit(x, epochs=4, batch_size=10, callbacks=[Log()])
    old = trainer(schedule="iwae")
    for epoch in range(4):
        old.fit(x, epoch + 1, 10)
    assert same(params(t), params(old)) and seen == [(r["epoch"], r["train_loss"]) for r in old.history]


def test_train_end_is_not_called_when_training_diverges():
    rec = Recorder()
    t = Trainer(*pair(), ELBO(), lr=1e20, check_every=2, progress=False, callbacks=[rec])
    with pytest.raises(DivergenceError):
        t.fit(data(40), epochs=3, batch_size=10)
    assert rec.calls[0][0] == "train_begin" and "train_end" not in [c[0] for c in rec.calls]


# --- progress output ----------------------------------------------------------------------------------

def test_progress_in_a_log_file_is_one_line_per_epoch_without_carriage_returns(capfd):
    Trainer(*pair(), ELBO(), progress=True).fit(data(40), epochs=3, batch_size=10)
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    lines = [line for line in (out + err).splitlines() if line]
    assert len(lines) == 3 and all(line.startswith(f"epoch={i} step={4 * i} ") for i, line in zip((1, 2, 3), lines)), lines


def test_progress_on_a_terminal_draws_a_live_bar(monkeypatch, capfd):
    monkeypatch.setattr(progress, "is_terminal", lambda stream=None: True)
    Trainer(*pair(), ELBO(), progress=True, check_every=2).fit(data(40), epochs=2, batch_size=10)
    out, err = capfd.readouterr()
    assert "\r" in err and "epoch 2/2" in err and "loss=" in err
    assert [line.split()[0] for line in out.splitlines() if line.startswith("epoch=")] == ["epoch=1", "epoch=2"]


def test_no_progress_and_no_run_dir_print_nothing(capfd):
    trainer().fit(data(20), epochs=2, batch_size=10)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_builtins_compose_without_a_trainer_run_dir(tmp_path, capfd):
    """MetricsFile given its own folder, Progress lines only: what a user assembles by hand."""
    t = trainer()
    t.fit(data(20), epochs=2, batch_size=10, callbacks=[MetricsFile(tmp_path), Progress(bar=False)])
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == t.history and len(capfd.readouterr().out.splitlines()) == 2
    with pytest.raises(ValueError, match="MetricsFile"):
        trainer().fit(data(20), epochs=1, batch_size=10, callbacks=[MetricsFile()])


def test_checkpoints_track_the_best_epoch(tmp_path):
    t = trainer(run_dir=tmp_path / "run")
    history = t.fit(data(40), epochs=3, batch_size=10, valid=data(20, seed=1))
    best = max(history, key=lambda r: r["valid_elbo"])
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert state["cursor"]["epoch"] == best["epoch"] and t.state.best_valid == best["valid_elbo"]
    assert isinstance(Checkpoints(), Callback)


# --- TensorBoard ---------------------------------------------------------------------------------------

def test_tensorboard_without_the_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoard("tb")


def test_tensorboard_writes_each_epochs_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = trainer()
    t.fit(data(40), epochs=2, batch_size=10, valid=data(20, seed=1), callbacks=[TensorBoard(tmp_path / "tb")])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train_loss", "valid_elbo", "lr"} <= set(events.Tags()["scalars"])
    got = [(e.step, e.value) for e in events.Scalars("valid_elbo")]
    assert [s for s, _ in got] == [4, 8]
    assert [v for _, v in got] == pytest.approx([r["valid_elbo"] for r in t.history], rel=1e-6)


# --- checks in the core ---------------------------------------------------------------------------------

def test_guides_take_their_size_checks_from_the_core():
    import pyrovae.guides.discrete as gd
    import pyrovae.guides.gaussian as gg
    import pyrovae.models.discrete as md
    import pyrovae.models.vae as mv

    assert gg.check_layers is mv.check_layers is nn_checks.check_layers
    assert gd.check_z_dim is md.check_z_dim is nn_checks.check_z_dim
    with pytest.raises(ValueError, match="one hidden-size tuple per stochastic layer"):
        GaussianEncoder((D,), (2, 2), hidden=((8,),))


# --- the command line ------------------------------------------------------------------------------------

from test_reliability import data_dir, train_args  # noqa: E402,F401  (the tiny CLI data set and its arguments)


def test_cli_tensorboard_without_the_package_is_a_usage_error(monkeypatch, data_dir, tmp_path, capsys):
    from pyrovae.cli import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(train_args(data_dir, tmp_path / "run", "--epochs", "1", "--tensorboard", str(tmp_path / "tb"))) == 2
    err = capsys.readouterr().err
    assert "--tensorboard" in err and "pip install tensorboard" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_tensorboard_writes_events_and_a_resume_may_change_the_folder(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from pyrovae.cli import main

    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "--epochs", "1", "--tensorboard", str(tmp_path / "tb"))) == 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert json.loads((run / "config.json").read_text())["tensorboard"] == str(tmp_path / "tb")
    assert main(train_args(data_dir, run, "--resume", "--epochs", "2", "--tensorboard", str(tmp_path / "tb2"))) == 0
    assert list((tmp_path / "tb2").glob("events.out.tfevents.*"))


def test_trainer_adam_is_the_fused_kernel_unless_the_caller_chose(tmp_path):
    """``adam_defaults``: the trainer's Adam gets ``fused=True`` when the caller set neither ``fused`` nor ``foreach``;
    the caller's choice, other optimisers and a resumed checkpoint's saved settings are left as they are."""
    x = torch.rand(8, 6).round()

    def optimiser(**kwargs):
        pyro.clear_param_store()
        t = Trainer(VAE((6,), (2,), hidden=((4,),)), GaussianEncoder((6,), (2,), hidden=((4,),)), ELBO(), progress=False, **kwargs)
        t.setup(x)
        return t.optim

    assert optimiser().param_groups[0]["fused"] is True
    assert not optimiser(optimizer_kwargs={"foreach": True}).param_groups[0]["fused"]
    assert optimiser(optimizer_kwargs={"fused": False}).param_groups[0]["fused"] is False
    assert not optimiser(optimizer=torch.optim.SGD).param_groups[0].get("fused")
    assert checks.adam_defaults(torch.optim.Adam, {"eps": 1e-4}, []) == {"eps": 1e-4}  # no parameters to look at: nothing added
    plain = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])  # a checkpoint saved before: fused None
    fused = optimiser()
    fused.load_state_dict({"state": {}, "param_groups": [{**plain.param_groups[0], "params": list(range(len(fused.param_groups[0]["params"])))}]})
    assert fused.param_groups[0]["fused"] is None  # torch restores the saved optimiser settings
