"""The state of a training run as one value: :class:`TrainState`.

Everything that decides the rest of a run lives here (parameters, optimiser, objective state, position, random
state, the epoch's running sums, the best validation score, learning-rate reductions and the history), and every
reader and writer goes through its methods: checkpoints (:meth:`TrainState.state_dict`,
:meth:`TrainState.load_state_dict`), in-memory rollback (:meth:`TrainState.snapshot`, :meth:`TrainState.restore`,
used by :mod:`pyrovae.train.divergence`), resume (:mod:`pyrovae.train.resume`) and callbacks (which read
``trainer.state``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pyrovae.train.checkpoint import CheckpointError, check_state
from pyrovae.utils.rng import get_rng_state, set_rng_state


@dataclass
class Cursor:
    """Where training is: epoch, position (batch index) inside the epoch's permutation, global step."""

    epoch: int = 0
    pos: int = 0
    step: int = 0
    perm: Optional[torch.Tensor] = None

    def copy(self) -> "Cursor":
        return Cursor(self.epoch, self.pos, self.step, self.perm)


def copy_sums(sums: dict) -> dict:
    """A copy of an epoch's running metric sums (tensors cloned)."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in sums.items()}


def objective_state(objective) -> dict:
    """An objective's state dict (``{}`` for Pyro's own ELBOs, which keep none)."""
    return objective.state_dict() if hasattr(objective, "state_dict") else {}


def load_objective_state(objective, state: dict) -> None:
    if hasattr(objective, "load_state_dict"):
        objective.load_state_dict(state)


@dataclass
class Snapshot:
    """An in-memory copy of a :class:`TrainState` checked finite (the rollback point)."""

    cursor: Cursor
    params: dict
    optimizer: dict
    objective: dict
    rng: dict
    sums: dict = field(default_factory=dict)


@dataclass
class TrainState:
    """A run's state. ``params`` (name -> leaf tensor) and ``optim`` are filled by :meth:`Trainer.setup`.

    Args:
        objective: the objective, whose own state (GECO's multiplier, an annealing step) is part of the run's.
        modules: ``{"model": ..., "guide": ...}``, the ``nn.Module`` programs whose buffers are checkpointed.
        cursor: epoch, position inside the epoch's permutation, global step.
        sums: the current epoch's running metric sums (checkpointed with a mid-epoch stop).
        best_valid: best validation ELBO so far (``best.pt``); lr_reductions: halvings after divergence.
        history: the per-epoch records of this run (``metrics.jsonl``).
    """

    objective: Any
    modules: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    optim: Optional[torch.optim.Optimizer] = None
    cursor: Cursor = field(default_factory=Cursor)
    sums: dict = field(default_factory=dict)
    best_valid: float = -math.inf
    lr_reductions: int = 0
    history: list = field(default_factory=list)

    def advance(self) -> None:
        self.cursor.step += 1
        self.cursor.pos += 1

    def add(self, metrics: dict) -> None:
        """Count a finished step: add its metrics (device tensors) to the epoch's sums and advance the cursor."""
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        self.sums["count"] = self.sums.get("count", 0) + 1
        self.advance()

    def epoch_record(self, examples: int) -> dict:
        """The finished epoch's record (``metrics.jsonl``): position, learning rate, speed and mean metrics; the sums
        are cleared. ``seconds``: the time of the epoch's steps, which the trainer adds to the sums after each step
        (so an epoch stopped and resumed counts the steps of every process that ran it, not the last one's alone)."""
        sums, self.sums = self.sums, {}
        count = float(sums.pop("count"))
        seconds = float(sums.pop("seconds", 0.0))
        record = {"epoch": self.cursor.epoch + 1, "step": self.cursor.step, "lr": self.optim.param_groups[0]["lr"],
                  "seconds": round(seconds, 3), "examples_per_s": round(examples / max(seconds, 1e-9), 1)}
        record.update({f"train_{k}": float(v) / count for k, v in sums.items()})
        return record

    def end_epoch(self, record: dict) -> None:
        """Move to the next epoch's start and keep ``record`` in the history."""
        self.cursor = Cursor(self.cursor.epoch + 1, 0, self.cursor.step, None)
        self.history.append(record)

    def set_lr(self, factor: float) -> None:
        """Learning rate = initial rate x ``factor`` x 0.5^(reductions after divergence)."""
        for group in self.optim.param_groups:
            group["lr"] = group["initial_lr"] * factor * 0.5**self.lr_reductions

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self, config: dict, finished: bool = False) -> dict:
        """Everything a resumed run needs to continue as if never stopped (``config`` is stored with it)."""
        c = self.cursor
        return {
            "config": config,
            "params": {k: v.detach() for k, v in self.params.items()},
            "signature": {k: list(v.shape) for k, v in self.params.items()},
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optim.state_dict(),
            "objective": objective_state(self.objective),
            "rng": get_rng_state(),
            "cursor": {"epoch": c.epoch, "pos": c.pos, "step": c.step, "perm": c.perm},
            "best_valid": self.best_valid,
            "lr_reductions": self.lr_reductions,
            "sums": copy_sums(self.sums),
            "finished": finished,
        }

    def load_weights(self, state: dict) -> None:
        """Restore the parameters (and module buffers) of a checkpoint."""
        missing_keys = [k for k in ("signature", "params", "modules") if k not in state]
        if missing_keys:
            raise CheckpointError(f"the checkpoint has no {missing_keys}: it was not written by Trainer.state_dict")
        check_state(state)
        theirs, ours = state["signature"], {k: list(v.shape) for k, v in self.params.items()}
        if theirs != ours:
            missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            shapes = [f"{k}: {theirs[k]} vs {ours[k]}" for k in sorted(set(ours) & set(theirs)) if theirs[k] != ours[k]]
            problems = (f"missing parameters {missing}" if missing else "", f"unexpected parameters {extra}" if extra else "", f"shape mismatches {shapes}" if shapes else "")
            raise CheckpointError(
                "the checkpoint was written for a different model/guide: " + "; ".join(p for p in problems if p)
                + ". Build the model with the run's config.json (pyrovae evaluate RUN_DIR does this)."
            )
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
        for key, module in self.modules.items():
            if key in state["modules"]:
                try:
                    module.load_state_dict(state["modules"][key])
                except RuntimeError as e:
                    raise CheckpointError(f"the checkpoint's {key} does not fit this {type(module).__name__}: {e}") from e

    def load_state_dict(self, state: dict) -> None:
        """Restore everything :meth:`state_dict` saved: weights, optimiser, objective, RNG and position."""
        self.load_weights(state)
        self._check_optimizer_shapes(state["optimizer"])
        try:
            self.optim.load_state_dict(state["optimizer"])
            load_objective_state(self.objective, state["objective"])
            set_rng_state(state["rng"])
            c = state["cursor"]
            self.cursor = Cursor(c["epoch"], c["pos"], c["step"], c["perm"])
            self.best_valid, self.lr_reductions = state["best_valid"], state["lr_reductions"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"the checkpoint does not fit this trainer ({type(e).__name__}: {e}): it was written with another objective "
                f"or optimiser than {self.objective!r}; resume with the run's own config.json"
            ) from e
        self.sums = copy_sums(state.get("sums") or {})

    def _check_optimizer_shapes(self, opt: dict) -> None:
        """The optimiser's per-parameter tensors (Adam's moments) have their parameters' shapes: a state of another
        shape would load, then fail at the first step with a size mismatch deep inside the optimiser."""
        params = [p for group in self.optim.param_groups for p in group["params"]]
        for index, entry in opt.get("state", {}).items():
            if not (isinstance(index, int) and 0 <= index < len(params)):
                raise CheckpointError(f"the checkpoint's optimiser holds state for parameter {index!r}, but this trainer has {len(params)} parameters")
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[index].shape:
                    name = list(self.params)[index] if index < len(self.params) else index
                    raise CheckpointError(
                        f"the checkpoint's optimiser state {key!r} of parameter {name!r} has shape {list(value.shape)}, but the "
                        f"parameter has {list(params[index].shape)}: the checkpoint is damaged or from another run"
                    )

    # --- in-memory rollback ---------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """A copy of the state as it is now (taken when it was checked finite)."""
        return Snapshot(
            cursor=self.cursor.copy(),
            params={k: v.detach().clone() for k, v in self.params.items()},
            optimizer=copy.deepcopy(self.optim.state_dict()),
            objective=copy.deepcopy(objective_state(self.objective)),
            rng=get_rng_state(),
            sums=copy_sums(self.sums),
        )

    def restore(self, snap: Snapshot) -> None:
        """Put the state back to ``snap`` (the snapshot stays valid for another restore)."""
        with torch.no_grad():
            for k, v in snap.params.items():
                self.params[k].copy_(v)
        self.optim.load_state_dict(copy.deepcopy(snap.optimizer))
        load_objective_state(self.objective, copy.deepcopy(snap.objective))
        set_rng_state(snap.rng)
        self.cursor, self.sums = snap.cursor.copy(), copy_sums(snap.sums)
