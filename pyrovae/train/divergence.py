"""What happens when training stops being finite.

The loop keeps an in-memory :class:`Snapshot` of the last state checked finite (every ``check_every`` steps).
A non-finite loss or gradient rolls the run back to it; the failing step is found by replaying from it one
step at a time, and the report names the step, the Pyro sites with non-finite log-densities
(:func:`nonfinite_sites`) and any non-finite parameters. ``on_divergence="stop"`` then raises
:class:`DivergenceError`; ``"reduce_lr"`` halves the learning rate and continues, a bounded number of times.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyrovae.utils.progress import write
from pyrovae.train.resume import Cursor, copy_sums, load_objective_state, objective_state
from pyrovae.utils.rng import get_rng_state, set_rng_state

POLICIES = ("stop", "reduce_lr")


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient and was stopped (the report says where)."""


@dataclass
class Snapshot:
    cursor: Cursor
    params: dict
    optimizer: dict
    objective: dict
    rng: dict
    sums: dict = field(default_factory=dict)


def nonfinite_sites(model, guide, *args, **kwargs) -> list[str]:
    """Names of the sites whose log-density (or sampled value) is not finite in one run of guide and model.

    Runs with validation off: a distribution built from non-finite parameters must be reported, not raise."""
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    except Exception as e:  # a program that cannot run at all on the diverged state (e.g. validate_args=True on a site)
        return [f"(the guide and model could not run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
    bad = []
    for who, trace in (("guide", guide_trace), ("model", model_trace)):
        trace = prune_subsample_sites(trace)
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            try:
                with pyro.validation_enabled(False):
                    lp = site["fn"].log_prob(site["value"])
            except Exception as e:  # a distribution that cannot even be built/scored counts as broken
                bad.append(f"{who}:{name} ({type(e).__name__})")
                continue
            if not bool(torch.isfinite(lp).all()) or not bool(torch.isfinite(site["value"]).all()):
                bad.append(f"{who}:{name}")
    return bad


class Rollback:
    """The last good state of a trainer (parameters, optimiser, objective, RNG, position and the epoch's running
    sums), and the divergence policy applied when a later check finds a non-finite loss or gradient.

    Args:
        trainer: the trainer whose state is kept; its ``step`` replays steps in :meth:`diagnose`.
        on_divergence: ``stop`` or ``reduce_lr`` (at most ``max_lr_reductions`` times in a run).
    """

    def __init__(self, trainer: "Trainer", on_divergence: str = "stop", max_lr_reductions: int = 5):
        if on_divergence not in POLICIES:
            raise ValueError(f"on_divergence={on_divergence!r}: choose 'stop' or 'reduce_lr'")
        self.trainer, self.on_divergence, self.max_lr_reductions = trainer, on_divergence, int(max_lr_reductions)
        self.snapshot: "Snapshot | None" = None

    def take(self, sums: dict) -> None:
        """Remember the trainer's current state (checked finite) and the epoch's running ``sums``."""
        t = self.trainer
        self.snapshot = Snapshot(
            cursor=Cursor(t.cursor.epoch, t.cursor.pos, t.cursor.step, t.cursor.perm),
            params={k: v.detach().clone() for k, v in t.params.items()},
            optimizer=copy.deepcopy(t.optim.state_dict()),
            objective=copy.deepcopy(objective_state(t.objective)),
            rng=get_rng_state(),
            sums=copy_sums(sums),
        )

    def restore(self) -> dict:
        """Put the trainer back into the snapshot's state; returns the snapshot's running sums."""
        t, snap = self.trainer, self.snapshot
        with torch.no_grad():
            for k, v in snap.params.items():
                t.params[k].copy_(v)
        t.optim.load_state_dict(copy.deepcopy(snap.optimizer))
        load_objective_state(t.objective, copy.deepcopy(snap.objective))
        set_rng_state(snap.rng)
        c = snap.cursor
        t.cursor = Cursor(c.epoch, c.pos, c.step, c.perm)
        return copy_sums(snap.sums)

    def diagnose(self, batch: Callable[[Cursor], tuple], upto: int) -> str:
        """Replay from the snapshot one step at a time until the loss or gradient is non-finite, and name the
        sites and parameters that were non-finite just before that step."""
        t = self.trainer
        self.restore()
        start = t.cursor.step
        while t.cursor.step < upto:
            x = batch(t.cursor)
            before = {k: v.detach().clone() for k, v in t.params.items()}
            loss, norm = t.step(*x)
            if bool(torch.isfinite(loss)) and bool(torch.isfinite(norm)):
                t._advance()
                continue
            what = "loss" if not bool(torch.isfinite(loss)) else "gradient"
            with torch.no_grad():
                for k, v in before.items():
                    t.params[k].copy_(v)
            sites = nonfinite_sites(t.model, t.guide, *x)
            params = [k for k, v in before.items() if not bool(torch.isfinite(v).all())]
            where = f"sites with non-finite log-densities: {', '.join(sites)}" if sites else "every site's log-density was finite"
            if params:
                where += f"; non-finite parameters: {', '.join(params)}"
            return f"non-finite {what} at step {t.cursor.step + 1} (epoch {t.cursor.epoch + 1}, batch {t.cursor.pos + 1}); {where}"
        return f"non-finite loss or gradient between steps {start + 1} and {upto}, which did not recur when replayed (non-deterministic kernels?)"

    def diverged(self, batch: Callable[[Cursor], tuple]) -> dict:
        """Diagnose and roll back a divergence found at the trainer's current step; with ``reduce_lr`` (reductions
        left) halve the learning rate and return the running sums to continue with, else raise :class:`DivergenceError`."""
        t = self.trainer
        report = self.diagnose(batch, t.cursor.step)
        sums = self.restore()
        if self.on_divergence == "reduce_lr" and t.lr_reductions < self.max_lr_reductions:
            t.lr_reductions += 1
            for group in t.optim.param_groups:
                group["lr"] *= 0.5
            write(f"pyrovae: {report}; rolled back to step {t.cursor.step} and halved the learning rate (reduction {t.lr_reductions}/{self.max_lr_reductions})")
            return sums
        last = None if t.run_dir is None else t.run_dir / "checkpoints" / "last.pt"
        raise DivergenceError(
            f"training diverged: {report}. The run was rolled back to step {t.cursor.step}; "
            + (f"{last} holds the last good checkpoint. " if last is not None and last.exists() else "")
            + "Lower --lr, set --clip-norm, or use --on-divergence reduce_lr."
        )
