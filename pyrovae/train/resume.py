"""A trainer's state on disk: checkpoints of everything that decides the rest of a run, resuming from them
(with ``metrics.jsonl`` cut back to the checkpoint), ownership of the run folder, and clean stops on
SIGINT/SIGTERM (a checkpoint at the next step boundary, then :class:`TrainingInterrupted`).

The functions take the :class:`~pyrovae.train.Trainer` whose state they read or write; the trainer's
``state_dict``, ``load_state_dict``, ``load_weights`` and ``resume`` methods call them.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NoReturn, Optional, Union

import torch

import pyrovae.train.distributed as distributed
import pyrovae.train.runs as runs
from pyrovae.train.checkpoint import CheckpointError, check_state, load_checkpoint, write_json
from pyrovae.data import as_inputs
from pyrovae.utils.rng import get_rng_state, set_rng_state


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; ``--resume`` continues."""


@dataclass
class Cursor:
    """Where training is: epoch, position (batch index) inside the epoch's permutation, global step."""

    epoch: int = 0
    pos: int = 0
    step: int = 0
    perm: Optional[torch.Tensor] = None


def copy_sums(sums: dict) -> dict:
    """A copy of an epoch's running metric sums (tensors cloned)."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in sums.items()}


def objective_state(objective) -> dict:
    return objective.state_dict() if hasattr(objective, "state_dict") else {}


def load_objective_state(objective, state: dict) -> None:
    if hasattr(objective, "load_state_dict"):
        objective.load_state_dict(state)


def state_dict(trainer: "Trainer", finished: bool = False) -> dict:
    """Everything a resumed run needs to continue as if never stopped: weights, optimiser, objective, RNG,
    position (with the epoch's permutation and running sums), best score and learning-rate reductions."""
    modules = {k: m.state_dict() for k, m in (("model", trainer.model), ("guide", trainer.guide)) if isinstance(m, torch.nn.Module)}
    c = trainer.cursor
    return {
        "config": trainer.config,
        "params": {k: v.detach() for k, v in trainer.params.items()},
        "signature": {k: list(v.shape) for k, v in trainer.params.items()},
        "modules": modules,
        "optimizer": trainer.optim.state_dict(),
        "objective": objective_state(trainer.objective),
        "rng": get_rng_state(),
        **distributed.rank_rng_states(),  # distributed: every rank's RNG state (a collective)
        "cursor": {"epoch": c.epoch, "pos": c.pos, "step": c.step, "perm": c.perm},
        "best_valid": trainer.best_valid,
        "lr_reductions": trainer.lr_reductions,
        "sums": copy_sums(trainer.epoch_sums),
        "finished": finished,
    }


def load_weights(trainer: "Trainer", state: dict) -> None:
    """Restore the parameters (and module buffers) of a checkpoint; the trainer must be set up."""
    missing_keys = [k for k in ("signature", "params", "modules") if k not in state]
    if missing_keys:
        raise CheckpointError(f"the checkpoint has no {missing_keys}: it was not written by Trainer.state_dict")
    check_state(state)
    theirs, ours = state["signature"], {k: list(v.shape) for k, v in trainer.params.items()}
    if theirs != ours:
        missing = sorted(set(ours) - set(theirs))
        extra = sorted(set(theirs) - set(ours))
        shapes = [f"{k}: {theirs[k]} vs {ours[k]}" for k in sorted(set(ours) & set(theirs)) if theirs[k] != ours[k]]
        raise CheckpointError(
            "the checkpoint was written for a different model/guide: "
            + "; ".join(x for x in (f"missing parameters {missing}" if missing else "", f"unexpected parameters {extra}" if extra else "", f"shape mismatches {shapes}" if shapes else "") if x)
            + ". Build the model with the run's config.json (pyrovae evaluate RUN_DIR does this)."
        )
    with torch.no_grad():
        for k, v in state["params"].items():
            trainer.params[k].copy_(v)
    for key, module in (("model", trainer.model), ("guide", trainer.guide)):
        if key in state["modules"] and isinstance(module, torch.nn.Module):
            try:
                module.load_state_dict(state["modules"][key])
            except RuntimeError as e:
                raise CheckpointError(f"the checkpoint's {key} does not fit this {type(module).__name__}: {e}") from e


def load_state_dict(trainer: "Trainer", state: dict) -> None:
    """Restore everything :func:`state_dict` saved: weights, optimiser, objective, RNG and position."""
    load_weights(trainer, state)
    _check_optimizer_shapes(trainer, state["optimizer"])
    try:
        trainer.optim.load_state_dict(state["optimizer"])
        load_objective_state(trainer.objective, state["objective"])
        set_rng_state(state["rng"])
        distributed.restore_rank_rng(state)  # distributed: this rank's own RNG state
        c = state["cursor"]
        trainer.cursor = Cursor(c["epoch"], c["pos"], c["step"], c["perm"])
        trainer.best_valid, trainer.lr_reductions = state["best_valid"], state["lr_reductions"]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"the checkpoint does not fit this trainer ({type(e).__name__}: {e}): it was written with another objective "
            f"or optimiser than {trainer.objective!r}; resume with the run's own config.json"
        ) from e
    trainer.epoch_sums = copy_sums(state.get("sums") or {})


def _check_optimizer_shapes(trainer: "Trainer", opt: dict) -> None:
    """The optimiser's per-parameter tensors (Adam's moments) have their parameters' shapes: a state of another shape
    would load, then fail at the first step with a size mismatch deep inside the optimiser."""
    params = [p for group in trainer.optim.param_groups for p in group["params"]]
    for index, entry in opt.get("state", {}).items():
        if not (isinstance(index, int) and 0 <= index < len(params)):
            raise CheckpointError(f"the checkpoint's optimiser holds state for parameter {index!r}, but this trainer has {len(params)} parameters")
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[index].shape:
                name = list(trainer.params)[index] if index < len(trainer.params) else index
                raise CheckpointError(
                    f"the checkpoint's optimiser state {key!r} of parameter {name!r} has shape {list(value.shape)}, but the parameter has "
                    f"{list(params[index].shape)}: the checkpoint is damaged or from another run"
                )


def resume(trainer: "Trainer", path: Union[str, Path], *batch: torch.Tensor) -> None:
    """Continue from a checkpoint file; ``batch``: a batch of the data's tensors, to set up the parameters.
    Records of ``metrics.jsonl`` after the checkpoint's epoch (written just before a crash) are dropped."""
    batch = as_inputs(batch[0] if len(batch) == 1 else batch, "the batch")  # resume(path, x, y) or resume(path, (x, y))
    writer = distributed.is_writer(trainer)  # distributed: rank 0 locks the run and keeps the metrics
    with runs.RunLock(trainer.run_dir) if writer else contextlib.nullcontext():  # no other process writes the run
        state = load_checkpoint(path, map_location=batch[0].device)
        trainer.setup(*batch)
        load_state_dict(trainer, state)
        trainer.owns_run = True
        if writer:
            trainer.history = runs.truncate_metrics(trainer.run_dir, trainer.cursor.epoch)


@contextlib.contextmanager
def run_folder(trainer: "Trainer") -> Iterator[None]:
    """Hold the run folder while training: its lock, a fresh start unless the trainer resumed it, ``config.json``."""
    try:
        if distributed.is_writer(trainer):  # distributed: rank 0 alone writes under run_dir
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


def interrupt(trainer: "Trainer", sums: dict) -> NoReturn:
    """Checkpoint the run where it is (``sums``: the epoch's running sums) and raise :class:`TrainingInterrupted`."""
    trainer.epoch_sums = sums
    path = trainer.save("last.pt")
    name = signal.Signals(trainer.stop_signal).name
    raise TrainingInterrupted(f"{name} received: saved {path} at step {trainer.cursor.step}; continue with --resume" if path else f"{name} received at step {trainer.cursor.step}")
