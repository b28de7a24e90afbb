"""The base of every objective: an estimate computed from per-datum log weights and a small state.

An objective is a function of :class:`~pyrovae.engine.LogWeights` (drawn by its
:class:`~pyrovae.engine.LogWeightEngine`) and a dict of state tensors (BetaELBO's step, GECO's multiplier and
moving average): :meth:`Objective.estimate` returns an :class:`Estimate` with the true loss, the surrogate whose
gradient is the estimator's, the metrics and the next state. :class:`Objective` is also a thin
``pyro.infer.ELBO`` adapter, so ``SVI(model, guide, optim, loss=objective)`` works: it keeps the state, and its
:meth:`~Objective.step` commits the next state after an optimiser step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from pyro.infer import ELBO as PyroELBO

from pyrovae.engine import (  # noqa: F401  (re-exported: the objectives' common currency)
    PARTICLE_PLATE,
    LogWeightEngine,
    LogWeights,
    TracePair,
    check_num_particles,
    find_data_plate,
    log_weights_from_traces,
)
def leave_one_out(signal: torch.Tensor) -> torch.Tensor:
    """Detached ``signal`` minus the mean of the other particles (dim 0): a baseline that keeps the
    score-function estimate unbiased (each particle's baseline is independent of its own sample)."""
    num = signal.shape[0]
    if num == 1:
        return signal.detach()
    return (signal - (signal.sum(0, keepdim=True) - signal) / (num - 1)).detach()


def score_function_term(lw: LogWeights, per_datum: torch.Tensor, glob: Union[torch.Tensor, float] = 0.0) -> torch.Tensor:
    """``[P]``: the surrogate whose gradient is the score-function part of the gradient of
    ``E_q[sum_b f_b + g]``, where ``per_datum`` is ``f [P, B]`` and ``glob`` is ``g [P]``: each datum's
    non-reparameterised sites are weighted by that datum's ``f`` (the other data do not depend on them), the
    global ones by the whole ``sum_b f_b + g``, each with a leave-one-out baseline over particles. Zero when the
    guide is fully reparameterised."""
    local = (leave_one_out(per_datum) * lw.score).sum(1)
    return local + leave_one_out(per_datum.sum(1) + glob) * lw.glob_score


@dataclass
class Estimate:
    """What an objective computes on one batch.

    Attributes:
        loss: the true loss (a scalar summed over the batch, Pyro's convention): what is logged.
        surrogate: a scalar whose gradient is the estimator's gradient (``loss`` itself for a pathwise loss).
        metrics: detached per-datum means (``elbo``, ``recon``, ``kl``, ...).
        state: the objective's state after this step (the same keys as its :meth:`Objective.initial_state`).
    """

    loss: torch.Tensor
    surrogate: torch.Tensor
    metrics: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)

    def differentiable(self) -> torch.Tensor:
        """One tensor carrying the true value and the surrogate's gradient."""
        if self.surrogate is self.loss:
            return self.loss
        return self.loss.detach() + (self.surrogate - self.surrogate.detach())


class Objective(PyroELBO):
    """Base class: an inference objective built on per-datum log weights.

    Subclasses implement :meth:`estimate` (and :meth:`initial_state` if they keep state between steps). The public
    methods follow :class:`pyro.infer.ELBO`, so an objective works as ``SVI(model, guide, optim, loss=obj)``:

    - :meth:`differentiable_loss` returns one tensor carrying the true value and the surrogate's gradient;
    - :meth:`loss` returns the true value as a float; :meth:`loss_and_grads` also back-propagates and
      commits the next state (schedules, Lagrange multipliers) by one :meth:`step`.

    After each evaluation :attr:`metrics` holds detached per-datum means (``elbo``, ``kl``, ``recon``, ...).
    Everything an objective carries from one step to the next lives in :attr:`state` (tensors only), so the
    trainer's captured step takes it as an input and returns the next one like any other tensor.

    Args:
        num_particles: samples of z per data point.
        max_plate_nesting, data_plate, vectorize_particles: the :class:`~pyrovae.engine.LogWeightEngine`'s.
    """

    min_particles = 1

    def __init__(self, num_particles: int = 1, max_plate_nesting: float = float("inf"), data_plate: Union[str, None, bool] = None, vectorize_particles: Optional[bool] = None):
        check_num_particles(num_particles, self.min_particles, self._particles_hint())
        self.engine = LogWeightEngine(num_particles, max_plate_nesting, data_plate, vectorize_particles)
        super().__init__(num_particles=num_particles, vectorize_particles=True)
        self.metrics: dict[str, torch.Tensor] = {}
        self._state: Optional[dict] = None  # made by initial_state() on first use (subclasses set it up after this)
        self._next_state: Optional[dict] = None

    def _particles_hint(self) -> str:
        return ""

    # the engine's settings, under the names pyro.infer.ELBO uses
    @property
    def num_particles(self) -> int:
        return self.engine.num_particles

    @num_particles.setter
    def num_particles(self, value: int) -> None:
        self.engine.num_particles = int(value)

    @property
    def max_plate_nesting(self) -> float:
        """The program's plate nesting plus the particle dimension."""
        return self.engine.max_plate_nesting

    @max_plate_nesting.setter
    def max_plate_nesting(self, value: float) -> None:  # pyro.infer.ELBO.__init__ sets it; the engine holds ours
        pass

    @property
    def data_plate(self):
        return self.engine.data_plate

    @property
    def particle_mode(self) -> Optional[bool]:
        return self.engine.particle_mode

    def _get_trace(self, model, guide, args, kwargs):  # pyro.infer.ELBO's abstract hook
        raise NotImplementedError("pyrovae objectives draw their traces through their LogWeightEngine (self.engine)")

    # --- log weights (the engine's) -------------------------------------------------------------
    def log_weights(self, model, guide, *args, **kwargs) -> LogWeights:
        """Draw ``num_particles`` samples per datum from the guide (reparameterised where possible) and return the
        per-datum log-weight parts."""
        return self.engine.log_weights(model, guide, *args, who=type(self).__name__, **kwargs)

    def detached_log_weights(self, model, guide, *args, **kwargs) -> LogWeights:
        """Log weights at samples detached from the graph (gradients only through the log-densities)."""
        return self.engine.detached_log_weights(model, guide, *args, who=type(self).__name__, **kwargs)

    def rescore(self, model, guide, args, kwargs, sample_trace, num_particles: Optional[int] = None) -> LogWeights:
        """Re-run guide and model on the detached latent values of ``sample_trace``."""
        return self.engine.rescore(model, guide, args, kwargs, sample_trace, num_particles, who=type(self).__name__)

    # --- the objective ----------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The state tensors carried from one step to the next."""
        if self._state is None:
            self._state = self.initial_state()
        return self._state

    @state.setter
    def state(self, value: dict) -> None:
        self._state = dict(value)

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The state before the first step (tensors only; empty for objectives without state)."""
        return {}

    def estimate(self, model, guide, args: tuple, kwargs: dict, state: dict) -> Estimate:
        """The loss, surrogate, metrics and next state on one batch (``model(*args, **kwargs)``) from ``state``."""
        raise NotImplementedError

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The true loss (summed over the batch) as a tensor whose gradient is the estimator's gradient. The next
        state is held until :meth:`step`."""
        est = self.estimate(model, guide, args, kwargs, self.state)
        self.metrics, self._next_state = est.metrics, est.state
        return est.differentiable()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            est = self.estimate(model, guide, args, kwargs, self.state)
        self.metrics = est.metrics
        return est.loss.item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        self.step()
        return loss.item()

    def step(self, state: Optional[dict] = None) -> None:
        """Commit the state after an optimiser step: ``state`` (a captured step's output), else the one the last
        :meth:`differentiable_loss` computed."""
        state = self._next_state if state is None else state
        if state is not None:
            self.state = state
        self._next_state = None

    def state_dict(self) -> dict:
        """State to checkpoint (tensors only)."""
        return {k: v.detach().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        want = set(self.initial_state())
        if state and not want:
            raise ValueError(f"{type(self).__name__} has no state, but the checkpoint holds {sorted(state)}")
        if set(state) != want:
            raise ValueError(f"{type(self).__name__} keeps state {sorted(want)}, but the checkpoint holds {sorted(state)}")
        self.state = {k: torch.as_tensor(v).clone() for k, v in state.items()}
        self._next_state = None

    def _record(self, lw: LogWeights, **values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detached per-datum means: ``elbo``, ``recon`` and ``kl`` (computed from ``lw`` unless given), then any
        extra values."""
        if "elbo" not in values:
            values["elbo"] = (lw.log_w.mean(0) + lw.glob.mean() / lw.batch_size).mean()
        if "recon" not in values:
            values["recon"] = lw.log_px.mean()
        if "kl" not in values:
            values["kl"] = lw.kl.mean()
        order = ("elbo", "recon", "kl")
        return {k: values[k].detach() for k in (*order, *(k for k in values if k not in order))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_particles={self.num_particles})"


def no_global_latents(lw: LogWeights, objective: str) -> None:
    if lw.has_global_latents:
        raise ValueError(
            f"{objective} is a per-datum bound, but the model has latent sites outside the data plate "
            "(global latents); use ELBO or VarianceLoss for such models, or put every latent inside "
            "pyro.plate('data', batch)."
        )


def reparam_only(lw: LogWeights, objective: str, instead: str = "use ELBO (score-function gradient), VarianceLoss or LogVarianceLoss") -> None:
    if lw.nonreparam_sites:
        raise ValueError(
            f"{objective} uses the pathwise (reparameterised) gradient, but guide sites {list(lw.nonreparam_sites)} "
            f"cannot be reparameterised (e.g. discrete latents): {instead} for such guides."
        )
