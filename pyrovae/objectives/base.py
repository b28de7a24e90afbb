"""Per-datum log importance weights from Pyro traces: the common currency of every objective.

For a model/guide pair run with ``P`` vectorised particles on a batch of ``B`` data points,
``log w[p, b] = log p(x_b, z_pb) - log q(z_pb | x_b)`` is split into its parts (observed sites,
latent prior sites, guide sites). Terms of sites outside the data plate (global latents) are kept
apart with shape ``[P]``. ELBO, IWAE, Renyi, the variance losses and GECO are a few lines on top.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO as PyroELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape

from pyrovae.checkpoint import get_rng_state, set_rng_state

PARTICLE_PLATE = "num_particles_vectorized"


@dataclass
class LogWeights:
    """Parts of the per-datum log weights, each ``[P, B]`` (``glob`` is ``[P]``).

    ``log_w = log_px + log_pz - log_qz`` per datum; ``score`` sums ``log q`` of the guide's
    non-reparameterisable sites (zero when every site is reparameterised), ``glob_score`` (``[P]``) that of
    such sites outside the data plate.
    """

    log_px: torch.Tensor
    log_pz: torch.Tensor
    log_qz: torch.Tensor
    score: torch.Tensor
    glob: torch.Tensor
    has_global_latents: bool
    nonreparam_sites: tuple
    model_trace: Trace
    guide_trace: Trace
    reduce: Callable  # (site log-density, site) -> ([P, B] or None, [P] or None)
    glob_score: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.glob_score is None:
            self.glob_score = torch.zeros_like(self.glob)

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_px + self.log_pz - self.log_qz

    @property
    def kl(self) -> torch.Tensor:
        """Single-sample estimate of KL(q(z|x) || p(z)) per datum, ``[P, B]``."""
        return self.log_qz - self.log_pz

    @property
    def num_particles(self) -> int:
        return self.log_w.shape[0]

    @property
    def batch_size(self) -> int:
        return self.log_w.shape[1]


def _data_frame(trace: Trace, data_plate: str):
    for site in trace.nodes.values():
        if site["type"] == "sample":
            for frame in site["cond_indep_stack"]:
                if frame.name == data_plate:
                    return frame
    return None


def _split(lp: torch.Tensor, rank: int, data_dim: Optional[int], num_particles: int, batch: int):
    """Reduce a site's batch-shaped log-density to ``([P, B], None)`` or ``(None, [P])``."""
    if not torch.is_tensor(lp):
        lp = torch.as_tensor(lp)
    lp = lp.reshape((1,) * (rank - lp.dim()) + lp.shape)
    if data_dim is None:
        out = lp.reshape(lp.shape[0], -1).sum(-1)
        return None, out.expand(num_particles)
    keep = {0, rank + data_dim}
    others = [d for d in range(rank) if d not in keep]
    out = lp.sum(others, keepdim=True) if others else lp
    out = out.reshape(out.shape[0], out.shape[rank + data_dim])
    return out.expand(num_particles, batch), None


def log_weights_from_traces(model_trace: Trace, guide_trace: Trace, num_particles: int, max_plate_nesting: int, data_plate: str = "data") -> LogWeights:
    """Per-datum log-weight parts of a vectorised (model, guide) trace pair with ``log_prob`` computed.

    Args:
        model_trace, guide_trace: traces run under a particle plate at dim ``-max_plate_nesting``.
        num_particles: ``P``.
        max_plate_nesting: the particle plate included.
        data_plate: name of the plate that indexes data points; a model without one is one datum.
    """
    frame = _data_frame(model_trace, data_plate) or _data_frame(guide_trace, data_plate)
    batch = frame.size if frame is not None else 1
    some = next(s["log_prob"] for s in model_trace.nodes.values() if s["type"] == "sample")
    zeros = torch.zeros(num_particles, batch, dtype=some.dtype, device=some.device)  # for parts with no site

    def reduce(site, lp=None):
        lp = site["log_prob"] if lp is None else lp
        if frame is None:
            _, g = _split(lp, max_plate_nesting, None, num_particles, 1)
            return g[:, None], None
        in_data = any(f.name == data_plate for f in site["cond_indep_stack"])
        return _split(lp, max_plate_nesting, frame.dim if in_data else None, num_particles, batch)

    parts = dict.fromkeys(("log_px", "log_pz", "log_qz", "score", "glob", "glob_score"))

    def add(name, value, sign=1):  # sums start from the first term: no zeros + term in the graph
        if sign < 0:
            value = -value
        parts[name] = value if parts[name] is None else parts[name] + value

    has_global_latents = False
    nonreparam = []
    for site in model_trace.nodes.values():
        if site["type"] != "sample":
            continue
        local, g = reduce(site)
        if local is None:
            add("glob", g)
            has_global_latents |= not site["is_observed"]
        else:
            add("log_px" if site["is_observed"] else "log_pz", local)
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        local, g = reduce(site)
        if local is None:
            add("glob", g, -1)
            has_global_latents = True
        else:
            add("log_qz", local)
        if not site["fn"].has_rsample:
            nonreparam.append(name)
            if local is not None:
                add("score", local)
            else:
                add("glob_score", g)
    for name, value in parts.items():
        if value is None:
            parts[name] = zeros if name not in ("glob", "glob_score") else zeros[:, 0]
    log_px, log_pz, log_qz, score, glob, glob_score = parts.values()
    return LogWeights(log_px, log_pz, log_qz, score, glob, has_global_latents, tuple(nonreparam), model_trace, guide_trace, reduce, glob_score)


def check_num_particles(num_particles, minimum: int = 1, why: str = "") -> int:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < minimum:
        raise ValueError(f"num_particles={num_particles!r} must be an integer >= {minimum}{why}")
    return num_particles


class Objective(PyroELBO):
    """Base class: an inference objective built on per-datum log weights.

    Subclasses implement :meth:`_loss_and_surrogate`, returning the true loss (a scalar tensor summed over
    the batch, Pyro's convention) and a surrogate whose gradient is the estimator's gradient. The public
    methods follow :class:`pyro.infer.ELBO`, so an objective works as ``SVI(model, guide, optim, loss=obj)``:

    - :meth:`differentiable_loss` returns one tensor carrying the true value and the surrogate's gradient;
    - :meth:`loss` returns the true value as a float; :meth:`loss_and_grads` also back-propagates and
      advances the objective's own state (schedules, Lagrange multipliers) by one :meth:`step`.

    After each evaluation :attr:`metrics` holds detached per-datum means (``elbo``, ``kl``, ``recon``, ...).

    The trainer's fast path (:mod:`pyrovae.capture`) records one step as a graph and replays it. An objective
    whose loss reads state that changes between steps names those tensor attributes in ``capture_state``
    (fed to the graph as inputs), and the attributes its loss sets besides ``metrics`` in ``capture_outputs``;
    one that keeps state (a non-empty :meth:`state_dict`) but names none runs the plain path.

    Args:
        num_particles: samples of z per data point, vectorised in one pass.
        max_plate_nesting: bound on the model's plate nesting (guessed from one run by default; the guess
            leaves the random number generators as they were).
        data_plate: name of the plate over data points.
    """

    min_particles = 1
    capture_state: tuple[str, ...] = ()
    capture_outputs: tuple[str, ...] = ()

    def __init__(self, num_particles: int = 1, max_plate_nesting: float = float("inf"), data_plate: str = "data"):
        check_num_particles(num_particles, self.min_particles, self._particles_hint())
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting, vectorize_particles=True)
        if math.isfinite(max_plate_nesting) and num_particles == 1:
            self.max_plate_nesting += 1  # the particle plate is always present, also for one particle
        self.data_plate = data_plate
        self.metrics: dict[str, torch.Tensor] = {}

    def _particles_hint(self) -> str:
        return ""

    # --- Pyro trace machinery -------------------------------------------------------------------
    def _guess_max_plate_nesting(self, model, guide, args, kwargs):
        rng = get_rng_state()  # the guess runs the program once: it must not shift the random stream
        try:
            super()._guess_max_plate_nesting(model, guide, args, kwargs)
        finally:
            set_rng_state(rng)
        if self.num_particles == 1:
            self.max_plate_nesting += 1

    def _vectorized_num_particles(self, fn):
        return pyro.plate(PARTICLE_PLATE, self.num_particles, dim=-self.max_plate_nesting)(fn)

    def _get_trace(self, model, guide, args, kwargs):
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def _ensure_nesting(self, model, guide, args, kwargs):
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)

    def log_weights(self, model, guide, *args, **kwargs) -> LogWeights:
        """Draw ``num_particles`` samples per datum from the guide (reparameterised where possible)
        and return the per-datum log-weight parts."""
        model_trace, guide_trace = next(self._get_traces(model, guide, args, kwargs))
        return log_weights_from_traces(model_trace, guide_trace, self.num_particles, self.max_plate_nesting, self.data_plate)

    def detached_log_weights(self, model, guide, *args, **kwargs) -> LogWeights:
        """Log weights at samples detached from the graph: z ~ q is drawn without gradient, then the guide
        and the model are re-run on those values, so gradients reach both only through their log-densities."""
        self._ensure_nesting(model, guide, args, kwargs)
        with torch.no_grad():
            sample_trace = poutine.trace(self._vectorized_num_particles(guide)).get_trace(*args, **kwargs)
        return self.rescore(model, guide, args, kwargs, sample_trace)

    def rescore(self, model, guide, args, kwargs, sample_trace: Trace) -> LogWeights:
        """Re-run guide and model (vectorised) on the detached latent values of ``sample_trace``."""
        values = Trace()
        for name, site in sample_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                values.add_node(name, **{**site, "value": site["value"].detach()})
        vguide, vmodel = self._vectorized_num_particles(guide), self._vectorized_num_particles(model)
        guide_trace = poutine.trace(poutine.replay(vguide, trace=values)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(vmodel, trace=guide_trace)).get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        try:
            guide_trace.compute_log_prob()
        except (NotImplementedError, KeyError) as e:
            raise ValueError(
                f"{type(self).__name__} scores samples detached from the guide, which needs log q(z|x) at a given z; "
                f"the guide's distribution cannot evaluate that ({type(e).__name__}: {e}). Flows without an analytic "
                "inverse (planar, radial, sylvester) cannot be used here: use a flow with an inverse (iaf, realnvp, "
                "householder) or a pathwise objective (ELBO, IWAE with estimator='standard')."
            ) from e
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, self.max_plate_nesting)
        return log_weights_from_traces(model_trace, guide_trace, self.num_particles, self.max_plate_nesting, self.data_plate)

    # --- the objective ----------------------------------------------------------------------------
    def _loss_and_surrogate(self, model, guide, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The true loss (summed over the batch) as a tensor whose gradient is the estimator's gradient."""
        loss, surrogate = self._loss_and_surrogate(model, guide, args, kwargs)
        if surrogate is loss:  # the loss is its own estimator
            return loss
        return loss.detach() + (surrogate - surrogate.detach())

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            loss, _ = self._loss_and_surrogate(model, guide, args, kwargs)
        return loss.item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        self.step()
        return loss.item()

    def step(self) -> None:
        """Advance the objective's own state after an optimiser step (no-op unless it has any)."""

    def state_dict(self) -> dict:
        """State to checkpoint (tensors and numbers only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, but the checkpoint holds {sorted(state)}")

    def _record(self, lw: LogWeights, **values: torch.Tensor) -> None:
        """Store detached per-datum means in :attr:`metrics`: ``elbo``, ``recon`` and ``kl`` (computed from
        ``lw`` unless given), then any extra values."""
        if "elbo" not in values:
            values["elbo"] = (lw.log_w.mean(0) + lw.glob.mean() / lw.batch_size).mean()
        if "recon" not in values:
            values["recon"] = lw.log_px.mean()
        if "kl" not in values:
            values["kl"] = lw.kl.mean()
        order = ("elbo", "recon", "kl")
        self.metrics = {k: values[k].detach() for k in (*order, *(k for k in values if k not in order))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_particles={self.num_particles})"


def no_global_latents(lw: LogWeights, objective: str) -> None:
    if lw.has_global_latents:
        raise ValueError(
            f"{objective} is a per-datum bound, but the model has latent sites outside the data plate "
            "(global latents); use ELBO or VarianceLoss for such models, or put every latent inside "
            "pyro.plate('data', batch)."
        )


def reparam_only(lw: LogWeights, objective: str) -> None:
    if lw.nonreparam_sites:
        raise ValueError(
            f"{objective} uses the pathwise (reparameterised) gradient, but guide sites {list(lw.nonreparam_sites)} "
            "cannot be reparameterised (e.g. discrete latents). Use ELBO (score-function gradient), "
            "VarianceLoss or LogVarianceLoss for such guides."
        )
