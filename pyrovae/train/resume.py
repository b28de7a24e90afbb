"""A trainer's state on disk: checkpoints of everything that decides the rest of a run, resuming from them
(with ``metrics.jsonl`` cut back to the checkpoint), ownership of the run folder, and clean stops on
SIGINT/SIGTERM (a checkpoint at the next step boundary, then :class:`TrainingInterrupted`).

The functions take the :class:`~pyrovae.train.Trainer` whose run they hold; what a checkpoint holds is the
trainer's :class:`~pyrovae.train.state.TrainState` (:meth:`~pyrovae.train.state.TrainState.state_dict`).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator, NoReturn, Optional, Union

import torch

import pyrovae.train.runs as runs
from pyrovae.train.checkpoint import load_checkpoint, write_json
from pyrovae.data import as_inputs
from pyrovae.train.state import Cursor, copy_sums  # noqa: F401  (re-exported)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; ``--resume`` continues."""


def is_writer(trainer: "Trainer") -> bool:
    """Whether this process writes under the trainer's ``run_dir`` (it has one, and is the strategy's main process)."""
    return trainer.run_dir is not None and trainer.strategy.is_main


def resume(trainer: "Trainer", path: Union[str, Path], *batch: torch.Tensor) -> None:
    """Continue from a checkpoint file; ``batch``: a batch of the data's tensors, to set up the parameters.
    Records of ``metrics.jsonl`` after the checkpoint's epoch (written just before a crash) are dropped."""
    batch = as_inputs(batch[0] if len(batch) == 1 else batch, "the batch")  # resume(path, x, y) or resume(path, (x, y))
    writer = is_writer(trainer)  # distributed: rank 0 locks the run and keeps the metrics
    with runs.RunLock(trainer.run_dir) if writer else contextlib.nullcontext():  # no other process writes the run
        state = load_checkpoint(path, map_location=batch[0].device)
        trainer.setup(*batch)
        trainer.load_state_dict(state)
        trainer.owns_run = True
        if writer:
            trainer.state.history = runs.truncate_metrics(trainer.run_dir, trainer.state.cursor.epoch)


@contextlib.contextmanager
def run_folder(trainer: "Trainer") -> Iterator[None]:
    """Hold the run folder while training: its lock, a fresh start unless the trainer resumed it, ``config.json``."""
    try:
        if is_writer(trainer):  # distributed: rank 0 alone writes under run_dir
            if trainer.run_lock is None:
                trainer.run_lock = runs.RunLock(trainer.run_dir).acquire()
            if not trainer.owns_run:
                runs.start_fresh(trainer.run_dir)
                trainer.owns_run = True
            write_json(trainer.run_dir / "config.json", trainer.config)
        yield
    finally:
        if trainer.run_lock is not None:
            trainer.run_lock.release()
            trainer.run_lock = None


@contextlib.contextmanager
def stop_signals(trainer: "Trainer") -> Iterator[None]:
    """While training, SIGINT/SIGTERM set ``trainer.stop_signal`` (the loop stops at the next step boundary);
    a second one stops at once. Only the main thread can take signals: elsewhere nothing is installed."""
    trainer.stop_signal = None
    old = {}
    if threading.current_thread() is threading.main_thread():

        def handler(signum, frame):
            if trainer.stop_signal is not None:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            trainer.stop_signal = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def interrupt(trainer: "Trainer") -> NoReturn:
    """Checkpoint the run where it is (its state checked finite) and raise :class:`TrainingInterrupted`."""
    path = trainer.save("last.pt")
    name = signal.Signals(trainer.stop_signal).name
    raise TrainingInterrupted(f"{name} received: saved {path} at step {trainer.state.cursor.step}; continue with --resume" if path else f"{name} received at step {trainer.state.cursor.step}")
