"""Per-datum log importance weights from Pyro traces: the common currency of every objective.

For a model/guide pair run with ``P`` particles on a batch of ``B`` data points,
``log w[p, b] = log p(x_b, z_pb) - log q(z_pb | x_b)`` is split into its parts (observed sites,
latent prior sites, guide sites). Terms of sites outside the data plate (global latents, global factors)
are kept apart with shape ``[P]``. ELBO, IWAE, Renyi, the variance losses and GECO are a few lines on top.

The data plate is found from the program: the plate that the model's observed sites sit in (``"data"``
when several could be, else the one whose size is the batch's first dimension). Particles are a vectorised
plate when ``P > 1``; a program that cannot run under one (boolean-mask indexing of a tensor that the
particle plate would widen, as in Pyro's ``examples/cvae``) runs its particles one at a time instead.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO as PyroELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape

from pyrovae.rng import get_rng_state, set_rng_state

PARTICLE_PLATE = "num_particles_vectorized"


@dataclass
class TracePair:
    """One (model, guide) trace pair behind some of the particles of a :class:`LogWeights`, and ``reduce``:
    ``(site, log_density=None) -> ([P', B] or None, [P'] or None)``, a site's term per datum or as a global."""

    model_trace: Trace
    guide_trace: Trace
    reduce: Callable
    num_particles: int


@dataclass
class LogWeights:
    """Parts of the per-datum log weights: local parts ``[P, B]``, global parts ``[P]``.

    ``log_w = log_px + log_pz - log_qz`` per datum; ``glob = glob_px + glob_pz - glob_qz`` is the log weight of
    the sites outside the data plate (global latents and observations), shared by the batch. ``score`` sums
    ``log q`` of the guide's non-reparameterisable sites per datum (zero when every site is reparameterised),
    ``glob_score`` that of such sites outside the data plate. ``pairs`` are the traces (one pair when the
    particles were vectorised, one per particle otherwise).
    """

    log_px: torch.Tensor
    log_pz: torch.Tensor
    log_qz: torch.Tensor
    score: torch.Tensor
    glob_px: torch.Tensor
    glob_pz: torch.Tensor
    glob_qz: torch.Tensor
    glob_score: torch.Tensor
    global_latents: tuple
    nonreparam_sites: tuple
    global_sites: tuple = ()  # every sample site outside the data plate, of model and guide
    pairs: list = field(default_factory=list)

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_px + self.log_pz - self.log_qz

    @property
    def glob(self) -> torch.Tensor:
        return self.glob_px + self.glob_pz - self.glob_qz

    @property
    def total_log_w(self) -> torch.Tensor:
        """``[P]``: the log weight of the whole batch, log p(x_1..B, z) - log q(z | x_1..B)."""
        return self.log_w.sum(1) + self.glob

    @property
    def kl(self) -> torch.Tensor:
        """Single-sample estimate of KL(q(z|x) || p(z)) per datum, ``[P, B]``."""
        return self.log_qz - self.log_pz

    @property
    def has_global_latents(self) -> bool:
        return bool(self.global_latents)

    @property
    def num_particles(self) -> int:
        return self.log_w.shape[0]

    @property
    def batch_size(self) -> int:
        return self.log_w.shape[1]

    @property
    def model_trace(self) -> Trace:
        return self._only_pair().model_trace

    @property
    def guide_trace(self) -> Trace:
        return self._only_pair().guide_trace

    def _only_pair(self) -> TracePair:
        if len(self.pairs) != 1:
            raise ValueError(f"these log weights come from {len(self.pairs)} trace pairs (particles run one at a time); iterate over .pairs")
        return self.pairs[0]

    def per_pair(self, fn: Callable[[TracePair], torch.Tensor]) -> torch.Tensor:
        """``fn`` applied to each trace pair (each giving ``[P', ...]``), concatenated over particles."""
        outs = [fn(pair) for pair in self.pairs]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    def cat(parts: list["LogWeights"]) -> "LogWeights":
        """Log weights of particles run one at a time, joined along the particle dimension."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        tensors = {name: torch.cat([getattr(p, name) for p in parts]) for name in _TENSOR_FIELDS}
        return LogWeights(**tensors, global_latents=first.global_latents, nonreparam_sites=first.nonreparam_sites, global_sites=first.global_sites, pairs=[q for p in parts for q in p.pairs])


_TENSOR_FIELDS = ("log_px", "log_pz", "log_qz", "score", "glob_px", "glob_pz", "glob_qz", "glob_score")


def _observed_plates(trace: Trace) -> dict[str, list]:
    """Vectorised plates (but the particle plate) holding the model's observed sites: name -> frames."""
    plates: dict[str, list] = {}
    for site in trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"]:
            for f in site["cond_indep_stack"]:
                if f.vectorized and f.name != PARTICLE_PLATE:
                    plates.setdefault(f.name, []).append(f)
    return plates


def _plate_size(trace: Trace, name: str, dim: int) -> int:
    """The number of data points a plate spans in this trace: its size in the sites' log-densities (a plate
    may be unsized, ``pyro.plate("data")``, or subsampled, whose frame size is the full data set's)."""
    size = 1
    for site in trace.nodes.values():
        if site["type"] == "sample" and any(f.name == name for f in site["cond_indep_stack"]):
            lp = site["log_prob"]
            if torch.is_tensor(lp) and lp.dim() >= -dim:
                size = max(size, lp.shape[dim])
    return size


def find_data_plate(model_trace: Trace, data_plate: Union[str, None, bool], batch_hint: Optional[int] = None) -> Optional[str]:
    """The name of the plate over data points.

    Args:
        model_trace: a trace of the model.
        data_plate: a plate name (used as given), ``None`` (find it), or ``False`` (the call is one data point).
        batch_hint: the leading dimension of the program's first tensor argument, if any.
    Raises:
        ValueError: when the plate cannot be found unambiguously, or a named plate does not exist.
    """
    if data_plate is False:
        return None
    plates = _observed_plates(model_trace)
    if isinstance(data_plate, str):
        names = {f.name for s in model_trace.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"]}
        if data_plate not in names:
            raise ValueError(f"data_plate={data_plate!r}: the model has no such plate (its plates: {sorted(names - {PARTICLE_PLATE})}); pass data_plate=None to find it from the program")
        return data_plate
    if data_plate is not None:
        raise TypeError(f"data_plate must be a plate name, None (found from the program) or False (one data point per call); got {data_plate!r}")
    if not plates:
        if batch_hint is not None and batch_hint > 1:
            raise ValueError(
                f"the model's observed sites sit in no plate, but its first argument has {batch_hint} rows: per-datum "
                "bounds would fold the whole batch into one data point. Put the per-example sites inside "
                "pyro.plate('data', x.shape[0]), or pass data_plate=False if one call really scores one data point."
            )
        return None
    if len(plates) == 1:
        return next(iter(plates))
    if "data" in plates:
        return "data"
    sized = [n for n, fs in plates.items() if batch_hint is not None and _plate_size(model_trace, n, fs[0].dim) == batch_hint]
    if len(sized) == 1:
        return sized[0]
    raise ValueError(
        f"cannot tell which plate indexes the data points: the observed sites sit in plates {sorted(plates)}"
        + (f", and {sorted(sized)} all span the batch's {batch_hint} rows" if len(sized) > 1 else "")
        + "; pass data_plate=NAME to the objective (or name that plate 'data')"
    )


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


def log_weights_from_traces(
    model_trace: Trace,
    guide_trace: Trace,
    num_particles: int,
    max_plate_nesting: int,
    data_plate: Union[str, None, bool] = None,
    batch_hint: Optional[int] = None,
) -> LogWeights:
    """Per-datum log-weight parts of a (model, guide) trace pair with ``log_prob`` computed.

    Args:
        model_trace, guide_trace: traces whose particle dimension (when ``num_particles > 1``) is the plate at dim
            ``-max_plate_nesting``.
        num_particles: ``P``.
        max_plate_nesting: the particle dimension included.
        data_plate: see :func:`find_data_plate`; a program without a data plate is one datum.
        batch_hint: the leading dimension of the program's first tensor argument.
    """
    name = find_data_plate(model_trace, data_plate, batch_hint)
    frame_dim = None
    if name is not None:
        frame_dim = next(f.dim for s in model_trace.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"] if f.name == name)
        batch = max(_plate_size(tr, name, frame_dim) for tr in (model_trace, guide_trace))
    else:
        batch = 1
    some = next((s["log_prob"] for s in model_trace.nodes.values() if s["type"] == "sample"), torch.zeros(()))
    zeros = torch.zeros(num_particles, batch, dtype=some.dtype, device=some.device)  # for parts with no site

    def reduce(site, lp=None):
        lp = site["log_prob"] if lp is None else lp
        if name is None:
            _, g = _split(lp, max_plate_nesting, None, num_particles, 1)
            return g[:, None], None
        in_data = any(f.name == name for f in site["cond_indep_stack"])
        return _split(lp, max_plate_nesting, frame_dim if in_data else None, num_particles, batch)

    parts = dict.fromkeys(_TENSOR_FIELDS)

    def add(part, value):  # sums start from the first term: no zeros + term in the graph
        parts[part] = value if parts[part] is None else parts[part] + value

    global_latents, nonreparam, global_sites = [], [], []
    for site_name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        local, g = reduce(site)
        observed = site["is_observed"]
        if local is None:
            add("glob_px" if observed else "glob_pz", g)
            global_sites.append(site_name)
        else:
            add("log_px" if observed else "log_pz", local)
    for site_name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        local, g = reduce(site)  # an observed guide site (a pyro.factor) counts as log q, as in Pyro's ELBOs
        if local is None:
            add("glob_qz", g)
            global_sites.append(site_name)
            if not site["is_observed"]:
                global_latents.append(site_name)
        else:
            add("log_qz", local)
        if not site["is_observed"] and not site["fn"].has_rsample:
            nonreparam.append(site_name)
            add("score" if local is not None else "glob_score", local if local is not None else g)
    for part, value in parts.items():
        if value is None:
            parts[part] = zeros if not part.startswith("glob") else zeros[:, 0]
    pair = TracePair(model_trace, guide_trace, reduce, num_particles)
    return LogWeights(
        **parts, global_latents=tuple(global_latents), nonreparam_sites=tuple(nonreparam), global_sites=tuple(dict.fromkeys(global_sites)), pairs=[pair]
    )


def check_num_particles(num_particles, minimum: int = 1, why: str = "") -> int:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < minimum:
        raise ValueError(f"num_particles={num_particles!r} must be an integer >= {minimum}{why}")
    return num_particles


def _batch_hint(args: tuple) -> Optional[int]:
    first = args[0] if args else None
    return first.shape[0] if torch.is_tensor(first) and first.dim() > 0 else None


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
        num_particles: samples of z per data point.
        max_plate_nesting: bound on the model's plate nesting (guessed from one run by default; the guess
            leaves the random number generators as they were).
        data_plate: the plate over data points: ``None`` finds it from the program (see
            :func:`find_data_plate`), a name fixes it, ``False`` makes each call one data point.
        vectorize_particles: ``None`` (default) runs the particles as one vectorised plate, and one at a time
            if the program fails under that plate but runs without it (with a warning); ``True`` / ``False``
            choose one way.
    """

    min_particles = 1
    capture_state: tuple[str, ...] = ()
    capture_outputs: tuple[str, ...] = ()

    def __init__(self, num_particles: int = 1, max_plate_nesting: float = float("inf"), data_plate: Union[str, None, bool] = None, vectorize_particles: Optional[bool] = None):
        check_num_particles(num_particles, self.min_particles, self._particles_hint())
        if vectorize_particles not in (None, True, False):
            raise ValueError(f"vectorize_particles={vectorize_particles!r} must be None (vectorise, with a loop as fallback), True or False")
        if not (data_plate is None or data_plate is False or isinstance(data_plate, str)):
            raise TypeError(f"data_plate={data_plate!r} must be a plate name, None (found from the program) or False (one data point per call)")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting, vectorize_particles=True)
        if math.isfinite(max_plate_nesting) and num_particles == 1:
            self.max_plate_nesting += 1  # one dimension is kept for particles, also for one particle
        self.data_plate = data_plate
        self.particle_mode = vectorize_particles
        self.metrics: dict[str, torch.Tensor] = {}

    def _particles_hint(self) -> str:
        return ""

    # --- Pyro trace machinery -------------------------------------------------------------------
    def _guess_max_plate_nesting(self, model, guide, args, kwargs):
        rng = get_rng_state()  # the guess runs the program once: it must not shift the random stream
        pyro_log = logging.getLogger("pyro.infer.elbo")
        level = pyro_log.level
        pyro_log.setLevel(max(level, logging.WARNING))  # Pyro's "Guessed max_plate_nesting" line: nothing to act on
        try:
            super()._guess_max_plate_nesting(model, guide, args, kwargs)
        finally:
            set_rng_state(rng)
            pyro_log.setLevel(level)
        if self.num_particles == 1:
            self.max_plate_nesting += 1

    def _particles(self, fn, num: int):
        """``fn`` under a particle plate of ``num`` (none for one particle: the program sees its own shapes,
        as under ``Trace_ELBO``)."""
        return pyro.plate(PARTICLE_PLATE, num, dim=-self.max_plate_nesting)(fn) if num > 1 else fn

    def _vectorized_num_particles(self, fn):
        return self._particles(fn, self.num_particles)

    def _get_trace(self, model, guide, args, kwargs):
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def _ensure_nesting(self, model, guide, args, kwargs):
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)

    def _from_traces(self, model_trace, guide_trace, num: int, args) -> LogWeights:
        return log_weights_from_traces(model_trace, guide_trace, num, self.max_plate_nesting, self.data_plate, _batch_hint(args))

    def _one_at_a_time(self, run: Callable[[int], LogWeights], first: Optional[LogWeights] = None) -> LogWeights:
        parts = [first] if first is not None else []
        parts += [run(1) for _ in range(self.num_particles - len(parts))]
        return LogWeights.cat(parts)

    def _vectorised_or_loop(self, run: Callable[[int], LogWeights]) -> LogWeights:
        """``run(P)`` once, or ``run(1)`` P times when the program cannot run under the particle plate."""
        if self.particle_mode is False or self.num_particles == 1:
            return self._one_at_a_time(run) if self.num_particles > 1 else run(1)
        if self.particle_mode is True:
            return run(self.num_particles)
        try:
            return run(self.num_particles)
        except (IndexError, RuntimeError, ValueError, TypeError) as error:
            try:
                first = run(1)
            except Exception:
                raise error from None  # the program fails without the plate too: its own error
            warnings.warn(
                f"{type(self).__name__}: the program fails under the vectorised particle plate ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]}) but runs without it, so its {self.num_particles} particles now run "
                "one at a time (the same estimate, slower). Pass vectorize_particles=False to choose this up front.",
                stacklevel=4,
            )
            self.particle_mode = False
            return self._one_at_a_time(run, first)

    def log_weights(self, model, guide, *args, **kwargs) -> LogWeights:
        """Draw ``num_particles`` samples per datum from the guide (reparameterised where possible)
        and return the per-datum log-weight parts."""
        self._ensure_nesting(model, guide, args, kwargs)

        def run(num: int) -> LogWeights:
            model_trace, guide_trace = self._get_trace(self._particles(model, num), self._particles(guide, num), args, kwargs)
            return self._from_traces(model_trace, guide_trace, num, args)

        return self._vectorised_or_loop(run)

    def detached_log_weights(self, model, guide, *args, **kwargs) -> LogWeights:
        """Log weights at samples detached from the graph: z ~ q is drawn without gradient, then the guide
        and the model are re-run on those values, so gradients reach both only through their log-densities."""
        self._ensure_nesting(model, guide, args, kwargs)

        def run(num: int) -> LogWeights:
            with torch.no_grad():
                sample_trace = poutine.trace(self._particles(guide, num)).get_trace(*args, **kwargs)
            return self.rescore(model, guide, args, kwargs, sample_trace, num)

        return self._vectorised_or_loop(run)

    def rescore(self, model, guide, args, kwargs, sample_trace: Trace, num_particles: Optional[int] = None) -> LogWeights:
        """Re-run guide and model on the detached latent values of ``sample_trace`` (drawn with
        ``num_particles`` particles, by default this objective's)."""
        num = self.num_particles if num_particles is None else num_particles
        values = Trace()
        for name, site in sample_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                values.add_node(name, **{**site, "value": site["value"].detach()})
        vguide, vmodel = self._particles(guide, num), self._particles(model, num)
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
        return self._from_traces(model_trace, guide_trace, num, args)

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


def reparam_only(lw: LogWeights, objective: str, instead: str = "use ELBO (score-function gradient), VarianceLoss or LogVarianceLoss") -> None:
    if lw.nonreparam_sites:
        raise ValueError(
            f"{objective} uses the pathwise (reparameterised) gradient, but guide sites {list(lw.nonreparam_sites)} "
            f"cannot be reparameterised (e.g. discrete latents): {instead} for such guides."
        )
