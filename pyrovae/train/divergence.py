"""What happens when training stops being finite.

The loop keeps an in-memory :class:`Snapshot` of the last state checked finite (every ``check_every`` steps).
A non-finite loss or gradient rolls the run back to it; the failing step is found by replaying from it one
step at a time, and the report names the step, the Pyro sites with non-finite log-densities
(:func:`nonfinite_sites`) and any non-finite parameters. ``on_divergence="stop"`` then raises
:class:`DivergenceError`; ``"reduce_lr"`` halves the learning rate and continues, a bounded number of times.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyrovae.utils.progress import write
from pyrovae.train.state import Cursor, Snapshot, TrainState  # noqa: F401  (Snapshot re-exported)

POLICIES = ("stop", "reduce_lr")


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient and was stopped (the report says where)."""


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
    """The last good :class:`~pyrovae.train.state.TrainState` of a run (a :class:`Snapshot`), and the divergence
    policy applied when a later check finds a non-finite loss or gradient.

    Args:
        on_divergence: ``stop`` or ``reduce_lr`` (at most ``max_lr_reductions`` times in a run).
    """

    def __init__(self, on_divergence: str = "stop", max_lr_reductions: int = 5):
        if on_divergence not in POLICIES:
            raise ValueError(f"on_divergence={on_divergence!r}: choose 'stop' or 'reduce_lr'")
        self.on_divergence, self.max_lr_reductions = on_divergence, int(max_lr_reductions)
        self.snapshot: Optional[Snapshot] = None

    def take(self, state: TrainState) -> None:
        """Remember ``state`` as it is now (checked finite)."""
        self.snapshot = state.snapshot()

    def restore(self, state: TrainState) -> None:
        """Put ``state`` back to the last snapshot."""
        state.restore(self.snapshot)

    def diagnose(self, state: TrainState, step: Callable, batch: Callable[[Cursor], tuple], sites: Callable[..., list], upto: int) -> str:
        """Replay from the snapshot one step at a time (``step(*batch)`` -> (loss, gradient norm)) until the loss or
        gradient is non-finite, and name the sites (``sites(*batch)``) and parameters non-finite just before it."""
        self.restore(state)
        start = state.cursor.step
        while state.cursor.step < upto:
            x = batch(state.cursor)
            before = {k: v.detach().clone() for k, v in state.params.items()}
            loss, norm = step(*x)
            if bool(torch.isfinite(loss)) and bool(torch.isfinite(norm)):
                state.advance()
                continue
            what = "loss" if not bool(torch.isfinite(loss)) else "gradient"
            with torch.no_grad():
                for k, v in before.items():
                    state.params[k].copy_(v)
            bad_sites = sites(*x)
            params = [k for k, v in before.items() if not bool(torch.isfinite(v).all())]
            where = f"sites with non-finite log-densities: {', '.join(bad_sites)}" if bad_sites else "every site's log-density was finite"
            if params:
                where += f"; non-finite parameters: {', '.join(params)}"
            c = state.cursor
            return f"non-finite {what} at step {c.step + 1} (epoch {c.epoch + 1}, batch {c.pos + 1}); {where}"
        return f"non-finite loss or gradient between steps {start + 1} and {upto}, which did not recur when replayed (non-deterministic kernels?)"

    def diverged(self, state: TrainState, step: Callable, batch: Callable[[Cursor], tuple], sites: Callable[..., list], last: Optional[Path] = None) -> None:
        """Diagnose and roll back a divergence found at the state's current step; with ``reduce_lr`` (reductions
        left) halve the learning rate and go on, else raise :class:`DivergenceError` (``last``: the run's last
        checkpoint, named in the message)."""
        report = self.diagnose(state, step, batch, sites, state.cursor.step)
        self.restore(state)
        if self.on_divergence == "reduce_lr" and state.lr_reductions < self.max_lr_reductions:
            state.lr_reductions += 1
            for group in state.optim.param_groups:
                group["lr"] *= 0.5
            write(f"pyrovae: {report}; rolled back to step {state.cursor.step} and halved the learning rate (reduction {state.lr_reductions}/{self.max_lr_reductions})")
            return
        raise DivergenceError(
            f"training diverged: {report}. The run was rolled back to step {state.cursor.step}; "
            + (f"{last} holds the last good checkpoint. " if last is not None and last.exists() else "")
            + "Lower --lr, set --clip-norm, or use --on-divergence reduce_lr."
        )
