"""Callbacks: what the training loop does besides training, and where users add their own per-epoch work.

A callback subclasses :class:`Callback` and overrides the hooks it needs; each gets the trainer, so it can
read ``trainer.cursor``, ``trainer.history``, ``trainer.model`` and so on, and stop the run cleanly with
``trainer.stop_training = True`` (the loop stops at the next step boundary, as if ``epochs`` were reached)::

    class EarlyStopping(Callback):
        def __init__(self, patience: int):
            self.patience, self.best, self.stale = patience, -math.inf, 0

        def on_epoch_end(self, trainer, record):
            if record["valid_elbo"] > self.best:
                self.best, self.stale = record["valid_elbo"], 0
            else:
                self.stale += 1
                trainer.stop_training = self.stale >= self.patience

    Trainer(model, guide, ELBO(), callbacks=[EarlyStopping(5)]).fit(x, epochs=100, valid=v)

The hooks run in order: the trainer's callbacks, then ``fit``'s, then the built-ins the trainer adds itself
(:class:`MetricsFile` and :class:`Checkpoints` with a ``run_dir``, :class:`Progress`), so that entries a
callback adds to an epoch's record reach ``metrics.jsonl``, the printed line and the checkpoints.
:class:`EachEpoch` turns a plain function ``fn(trainer, record)`` into a callback.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch

import pyrovae.utils.progress as progress
import pyrovae.train.runs as runs


class Callback:
    """Base class of callbacks: every hook does nothing. ``on_step_end`` gets device tensors: reading them
    (``float(loss)``) waits for the device on every step, so read them only now and then."""

    def on_train_begin(self, trainer: "Trainer") -> None:
        """``fit`` is about to take its first step (also when it continues a run)."""

    def on_epoch_begin(self, trainer: "Trainer") -> None:
        """An epoch starts at its first batch (again, after a rollback to its start)."""

    def on_step_end(self, trainer: "Trainer", batch: tuple, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """A step was taken on ``batch`` (the tensors passed to the model); ``loss`` per datum and gradient ``norm``.
        Steps that a divergence rolls back were reported too (the cursor then moves back to the snapshot)."""

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None:
        """An epoch ended; ``record`` (``epoch``, ``step``, ``lr``, ``train_*`` means, ``valid_elbo``, ...) is the
        history's entry, and entries added to it are kept (and written by the built-ins that follow)."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """``fit`` finished its epochs or was stopped by ``trainer.stop_training`` (not when it raised)."""


class CallbackList(Callback):
    """Several callbacks called in order, as one."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = check_callbacks(callbacks)

    def on_train_begin(self, trainer):
        for c in self.callbacks:
            c.on_train_begin(trainer)

    def on_epoch_begin(self, trainer):
        for c in self.callbacks:
            c.on_epoch_begin(trainer)

    def on_step_end(self, trainer, batch, loss, norm):
        for c in self.callbacks:
            c.on_step_end(trainer, batch, loss, norm)

    def on_epoch_end(self, trainer, record):
        for c in self.callbacks:
            c.on_epoch_end(trainer, record)

    def on_train_end(self, trainer):
        for c in self.callbacks:
            c.on_train_end(trainer)


class EachEpoch(Callback):
    """Calls ``fn(trainer, record)`` at the end of each epoch: per-epoch work written as a function (a closure
    keeps its state); ``fn`` may add entries to ``record`` and set ``trainer.stop_training``."""

    def __init__(self, fn: Callable[["Trainer", dict], None]):
        if not callable(fn):
            raise TypeError(f"EachEpoch(fn): fn={fn!r} is not callable; pass a function fn(trainer, record)")
        self.fn = fn

    def on_epoch_end(self, trainer, record):
        self.fn(trainer, record)


def check_callbacks(callbacks: Optional[Iterable[Callback]], name: str = "callbacks") -> list[Callback]:
    """``callbacks`` as a list, or ``TypeError`` naming an entry that is not a :class:`Callback`."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        return [callbacks]
    out = list(callbacks)
    for c in out:
        if not isinstance(c, Callback):
            raise TypeError(f"{name} holds {c!r}, a {type(c).__name__}: pass instances of pyrovae.train.callbacks.Callback subclasses, e.g. {name}=[TensorBoard('runs/tb')]")
    return out


def format_record(record: dict) -> str:
    """An epoch's record as one line: ``epoch=3 step=300 lr=0.001 train_loss=101.2 ...``."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


class Progress(Callback):
    """Progress output that suits where it goes: a live tqdm bar (examples per epoch, the running mean loss at
    every finiteness check) when stderr is a terminal, and one line per epoch (:func:`format_record`) in any case.
    In a log file or CI there are no carriage-return frames, only the epoch lines.

    Args:
        bar: draw the bar (when stderr is a terminal).
        lines: print a line per epoch.
    """

    def __init__(self, bar: bool = True, lines: bool = True):
        self.bar_enabled, self.lines = bool(bar), bool(lines)
        self.bar = None
        self._loss, self._count = 0.0, 0

    def on_train_begin(self, trainer):
        self.bar = progress.bar(total=trainer.num_batches * trainer.batch_size, enabled=self.bar_enabled, unit="ex", leave=False)

    def on_epoch_begin(self, trainer):
        self.bar.reset()
        self.bar.set_description(f"epoch {trainer.cursor.epoch + 1}/{trainer.epochs}")
        self._loss, self._count = 0.0, 0

    def on_step_end(self, trainer, batch, loss, norm):
        self.bar.update(batch[0].shape[0])
        if self.bar.disable:
            return
        self._loss, self._count = self._loss + loss, self._count + 1  # on the device: read only at the loop's own checks
        if trainer.cursor.step % trainer.check_every == 0 or trainer.cursor.pos >= trainer.num_batches:
            self.bar.set_postfix(loss=f"{float(self._loss / self._count):.3f}")

    def on_epoch_end(self, trainer, record):
        if self.lines:
            progress.write(format_record(record))

    def on_train_end(self, trainer):
        self.bar.close()


class MetricsFile(Callback):
    """Appends each epoch's record to ``run_dir/metrics.jsonl`` (:func:`pyrovae.train.runs.append_metrics`; ``run_dir``
    defaults to the trainer's). A resumed run's file is cut back to its checkpoint by ``Trainer.resume``."""

    def __init__(self, run_dir: Optional[Union[str, Path]] = None):
        self.run_dir = None if run_dir is None else Path(run_dir)

    def on_epoch_end(self, trainer, record):
        run_dir = self.run_dir or trainer.run_dir
        if run_dir is None:
            raise ValueError("MetricsFile has no folder: give it one, MetricsFile(run_dir), or the trainer a run_dir")
        runs.append_metrics(run_dir, record)


class Checkpoints(Callback):
    """Writes ``run_dir/checkpoints/last.pt`` after every epoch and at the end (``finished`` when the run ended at
    an epoch boundary), and ``best.pt`` whenever the epoch's score (``valid_elbo``, else ``-train_loss``) beats
    ``trainer.state.best_valid``. Checkpoints go to the trainer's ``run_dir`` (:meth:`Trainer.save`)."""

    def on_epoch_end(self, trainer, record):
        score = record.get("valid_elbo", -record["train_loss"])
        if score > trainer.state.best_valid:
            trainer.state.best_valid = score
            trainer.save("best.pt")
        trainer.save("last.pt")

    def on_train_end(self, trainer):
        trainer.save("last.pt", finished=trainer.cursor.pos == 0)


class TensorBoard(Callback):
    """Writes each epoch's numbers (``train_loss``, ``valid_elbo``, ``lr``, ...) to TensorBoard event files in
    ``log_dir``, at the epoch's global step; view them with ``tensorboard --logdir LOG_DIR``.

    Uses ``torch.utils.tensorboard.SummaryWriter``, which needs the ``tensorboard`` package (not a dependency of
    pyrovae): ``pip install tensorboard``."""

    def __init__(self, log_dir: Union[str, Path]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"the TensorBoard callback needs the tensorboard package ({e}): pip install tensorboard") from e
        self.log_dir, self._writer_cls, self.writer = Path(log_dir), SummaryWriter, None

    def on_train_begin(self, trainer):
        if self.writer is None:
            self.writer = self._writer_cls(log_dir=str(self.log_dir))

    def on_epoch_end(self, trainer, record):
        for key, value in record.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()

    def on_train_end(self, trainer):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
