"""The log-weight engine: the one piece of the library that runs Pyro programs and reads their traces.

For a model/guide pair run with ``P`` particles on a batch of ``B`` data points,
``log w[p, b] = log p(x_b, z_pb) - log q(z_pb | x_b)`` is split into its parts (observed sites, latent prior
sites, guide sites). Terms of sites outside the data plate (global latents, global factors) are kept apart with
shape ``[P]``. Objectives, evaluation, validation and GECO's constraint all take :class:`LogWeights` from a
:class:`LogWeightEngine`; the objectives are then functions of log weights (and a small state).

The data plate is found from the program: the plate that the model's observed sites sit in (``"data"`` when
several could be, else the one whose size is the batch's first dimension). Particles are a vectorised plate
when ``P > 1``; a program that cannot run under one (boolean-mask indexing of a tensor that the particle plate
would widen, as in Pyro's ``examples/cvae``) runs its particles one at a time instead.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import pyro
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape

from pyrovae.nn.likelihoods import PackedCategorical
from pyrovae.utils.rng import get_rng_state, set_rng_state

PARTICLE_PLATE = "num_particles_vectorized"


@dataclass(frozen=True)
class SiteTerm:
    """One sample site's scaled log-density, kept with its plates so that a score-function estimator can sum it
    to the plates of another site (Rao-Blackwellisation over conditionally independent terms, as in Pyro's
    ``Trace_ELBO``).

    Attributes:
        part: the :class:`LogWeights` field it adds to (``log_px``, ``log_pz``, ``log_qz`` or their ``glob_``
            forms).
        frames: ``(name, dim)`` of the vectorised plates it sits in, the particle plate aside.
        value: the log-density (scale and mask applied) reshaped to the full plate rank, particles at dim 0.
    """

    name: str
    part: str
    frames: frozenset
    value: torch.Tensor


@dataclass(frozen=True)
class ScoreSite:
    """A guide site without a reparameterised sampler: its unscaled log q(z) (Pyro's ``score_function``: neither
    scaled nor masked, since a masked or down-weighted z still shapes the terms that use its value), full rank."""

    name: str
    frames: frozenset
    score: torch.Tensor


@dataclass
class TracePair:
    """One (model, guide) trace pair behind some of the particles of a :class:`LogWeights`, and ``reduce``:
    ``(site, log_density=None) -> ([P', B] or None, [P'] or None)``, a site's term per datum or as a global.
    ``terms`` and ``scores`` keep every site's log-density and every non-reparameterised site's score function
    with their plates; ``data_frame`` is the data plate's ``(name, dim)`` (None without one)."""

    model_trace: Trace
    guide_trace: Trace
    reduce: Callable
    num_particles: int
    terms: tuple = ()
    scores: tuple = ()
    data_frame: Optional[tuple] = None
    rank: int = 0


@dataclass
class LogWeights:
    """Parts of the per-datum log weights: local parts ``[P, B]``, global parts ``[P]``.

    ``log_w = log_px + log_pz - log_qz`` per datum; ``glob = glob_px + glob_pz - glob_qz`` is the log weight of
    the sites outside the data plate (global latents and observations), shared by the batch. ``score`` sums the
    unscaled ``log q`` of the guide's non-reparameterisable sites per datum (zero when every site is
    reparameterised), ``glob_score`` that of such sites outside the data plate. ``pairs`` are the traces (one pair when the
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
    #: the one scale (poutine.scale, a subsampled data plate) that every site inside the data plate carries,
    #: None when they carry different ones
    local_scale: Optional[float] = 1.0

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
        return LogWeights(**tensors, global_latents=first.global_latents, nonreparam_sites=first.nonreparam_sites, global_sites=first.global_sites, pairs=[q for p in parts for q in p.pairs], local_scale=first.local_scale)


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


def find_data_plate(model_trace: Trace, data_plate: Union[str, None, bool], batch_hint: Optional[int] = None, any_plate: bool = False) -> Optional[str]:
    """The name of the plate over data points.

    Args:
        model_trace: a trace of the model.
        data_plate: a plate name (used as given), ``None`` (find it), or ``False`` (the call is one data point).
        batch_hint: the leading dimension of the program's first tensor argument, if any.
        any_plate: when several plates could be the data plate, take the first by name instead of refusing (for
            a caller whose value does not depend on the choice, such as the ELBO summed over the batch).
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
    if any_plate:
        return sorted(sized or plates)[0]
    raise ValueError(
        f"cannot tell which plate indexes the data points: the observed sites sit in plates {sorted(plates)}"
        + (f", and {sorted(sized)} all span the batch's {batch_hint} rows" if len(sized) > 1 else "")
        + "; pass data_plate=NAME to the objective (or name that plate 'data')"
    )


def full_rank(lp, rank: int) -> torch.Tensor:
    """A batch-shaped log-density with singleton dims prepended up to ``rank`` (particles at dim 0)."""
    if not torch.is_tensor(lp):
        lp = torch.as_tensor(lp)
    return lp.reshape((1,) * (rank - lp.dim()) + lp.shape)


def _check_plate_dims(name: str, value: torch.Tensor, frames: frozenset, rank: int) -> None:
    """Refuse a log-density with a batch dimension that no plate of its site declares: the per-datum sums (and
    the particles) would be read from the wrong dimension. Typical cause: a program that reduces over a plate's
    dimension (``z.sum(-1)``) under vectorised particles, where the reduced tensor's particle dimension shifts
    right."""
    declared = {rank + dim for _, dim in frames} | {0}
    stray = [d - rank for d in range(1, value.dim()) if value.shape[d] != 1 and d not in declared]
    if stray:
        raise ValueError(
            f"site {name!r}: its log-density has shape {tuple(value.shape)}, with size {value.shape[rank + stray[0]]} at "
            f"dim {stray[0]}, where none of its plates sits (its plates: {sorted(frames) or 'none'}). Put the site in the "
            "plate of that dimension, move event dimensions into the distribution (.to_event), or keep reduced "
            "dimensions (x.sum(-1, keepdim=True)) so that batch dimensions stay where the plates are; with "
            "vectorised particles, vectorize_particles=False runs the program as written."
        )


def score_function(site) -> torch.Tensor:
    """A guide site's score function: its unscaled, unmasked log q(z) (Pyro's ``ScoreParts.score_function``)."""
    parts = site.get("score_parts")
    if parts is None:
        parts = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
    return parts.score_function


def _split(lp: torch.Tensor, rank: int, data_dim: Optional[int], num_particles: int, batch: int):
    """Reduce a site's batch-shaped log-density to ``([P, B], None)`` or ``(None, [P])``."""
    lp = full_rank(lp, rank)
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
    any_plate: bool = False,
) -> LogWeights:
    """Per-datum log-weight parts of a (model, guide) trace pair with ``log_prob`` computed.

    Args:
        model_trace, guide_trace: traces whose particle dimension (when ``num_particles > 1``) is the plate at dim
            ``-max_plate_nesting``.
        num_particles: ``P``.
        max_plate_nesting: the particle dimension included.
        data_plate: see :func:`find_data_plate`; a program without a data plate is one datum.
        batch_hint: the leading dimension of the program's first tensor argument.
        any_plate: see :func:`find_data_plate`.
    """
    name = find_data_plate(model_trace, data_plate, batch_hint, any_plate)
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

    def frames(site) -> frozenset:
        return frozenset((f.name, f.dim) for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE)

    def term(site_name, site, part) -> SiteTerm:
        value = full_rank(site["log_prob"], max_plate_nesting)
        its = frames(site)
        _check_plate_dims(site_name, value, its, max_plate_nesting)
        return SiteTerm(site_name, part, its, value)

    global_latents, nonreparam, global_sites = [], [], []
    terms, scores, local_scales = [], [], set()

    def note_scale(site):
        scale = site["scale"]
        local_scales.add(float(scale) if isinstance(scale, (int, float)) else id(scale))

    for site_name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        local, g = reduce(site)
        observed = site["is_observed"]
        part = ("log_px" if observed else "log_pz") if local is not None else ("glob_px" if observed else "glob_pz")
        add(part, local if local is not None else g)
        terms.append(term(site_name, site, part))
        if local is None:
            global_sites.append(site_name)
        else:
            note_scale(site)
    for site_name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        local, g = reduce(site)  # an observed guide site (a pyro.factor) counts as log q, as in Pyro's ELBOs
        part = "log_qz" if local is not None else "glob_qz"
        add(part, local if local is not None else g)
        terms.append(term(site_name, site, part))
        if local is None:
            global_sites.append(site_name)
            if not site["is_observed"]:
                global_latents.append(site_name)
        else:
            note_scale(site)
        if not site["is_observed"] and not site["fn"].has_rsample:
            nonreparam.append(site_name)
            score = score_function(site)
            scores.append(ScoreSite(site_name, frames(site), full_rank(score, max_plate_nesting)))
            local, g = reduce(site, score)
            add("score" if local is not None else "glob_score", local if local is not None else g)
    for part, value in parts.items():
        if value is None:
            parts[part] = zeros if not part.startswith("glob") else zeros[:, 0]
    data_frame = (name, frame_dim) if name is not None else None
    pair = TracePair(model_trace, guide_trace, reduce, num_particles, tuple(terms), tuple(scores), data_frame, max_plate_nesting)
    return LogWeights(
        **parts, global_latents=tuple(global_latents), nonreparam_sites=tuple(nonreparam), global_sites=tuple(dict.fromkeys(global_sites)), pairs=[pair],
        local_scale=(next(iter(local_scales)) if len(local_scales) == 1 and isinstance(next(iter(local_scales)), float) else 1.0 if not local_scales else None),
    )


def _batch_hint(args: tuple) -> Optional[int]:
    first = args[0] if args else None
    return first.shape[0] if torch.is_tensor(first) and first.dim() > 0 else None




def check_num_particles(num_particles, minimum: int = 1, why: str = "") -> int:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < minimum:
        raise ValueError(f"num_particles={num_particles!r} must be an integer >= {minimum}{why}")
    return num_particles


def guess_plate_nesting(model, guide, args: tuple, kwargs: dict) -> int:
    """The number of vectorised plate dimensions the program uses, from one run of guide and model (under
    ``poutine.block``, with every random generator left as it was)."""
    rng = get_rng_state()
    try:
        with poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    finally:
        set_rng_state(rng)
    traces = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
    sites = [s for t in traces for s in t.nodes.values() if s["type"] == "sample"]
    if is_validation_enabled():  # shapes are checked before the nesting bound makes the checks weaker
        for t in traces:
            t.compute_log_prob()
        for site in sites:
            check_site_shape(site, max_plate_nesting=float("inf"))
    dims = [f.dim for s in sites for f in s["cond_indep_stack"] if f.vectorized]
    return -min(dims) if dims else 0


class LogWeightEngine:
    """Draws ``num_particles`` samples per datum from the guide and scores them under the model.

    Args:
        num_particles: samples of z per data point.
        max_plate_nesting: bound on the program's plate nesting (guessed from one run by default; the guess
            leaves the random number generators as they were). One more dimension, on the left, holds particles.
        data_plate: the plate over data points: ``None`` finds it from the program (see :func:`find_data_plate`),
            a name fixes it, ``False`` makes each call one data point.
        vectorize_particles: ``None`` runs the particles as one vectorised plate, and one at a time if the program
            fails under that plate but runs without it (with a warning); ``True`` / ``False`` choose one way.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: float = float("inf"), data_plate: Union[str, None, bool] = None, vectorize_particles: Optional[bool] = None):
        if vectorize_particles not in (None, True, False):
            raise ValueError(f"vectorize_particles={vectorize_particles!r} must be None (vectorise, with a loop as fallback), True or False")
        if not (data_plate is None or data_plate is False or isinstance(data_plate, str)):
            raise TypeError(f"data_plate={data_plate!r} must be a plate name, None (found from the program) or False (one data point per call)")
        self.num_particles = int(num_particles)
        #: the program's plate nesting plus the particle dimension (inf until guessed)
        self.max_plate_nesting = max_plate_nesting + 1 if math.isfinite(max_plate_nesting) else float("inf")
        self.data_plate = data_plate
        #: take any candidate data plate when the program leaves it ambiguous (set by objectives whose value
        #: does not depend on which plate indexes the data)
        self.any_data_plate = False
        self.warn_enumerated = True  # warn, as Trace_ELBO does, of guide sites marked for enumeration
        self.particle_mode = vectorize_particles

    def ensure_nesting(self, model, guide, args: tuple, kwargs: dict) -> None:
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_plate_nesting(model, guide, args, kwargs) + 1

    def particles(self, fn, num: int):
        """``fn`` under a particle plate of ``num`` (none for one particle: the program sees its own shapes, as
        under ``Trace_ELBO``)."""
        return pyro.plate(PARTICLE_PLATE, num, dim=-self.max_plate_nesting)(fn) if num > 1 else fn

    def _from_traces(self, model_trace, guide_trace, num: int, args) -> LogWeights:
        if self.warn_enumerated and is_validation_enabled():
            check_if_enumerated(guide_trace)  # Trace_ELBO's warning: these objectives sample every site
        return log_weights_from_traces(model_trace, guide_trace, num, self.max_plate_nesting, self.data_plate, _batch_hint(args), self.any_data_plate)

    def _one_at_a_time(self, run: Callable[[int], LogWeights], first: Optional[LogWeights] = None) -> LogWeights:
        parts = [first] if first is not None else []
        parts += [run(1) for _ in range(self.num_particles - len(parts))]
        return LogWeights.cat(parts)

    def _vectorised_or_loop(self, run: Callable[[int], LogWeights], who: str) -> LogWeights:
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
                f"{who}: the program fails under the vectorised particle plate ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]}) but runs without it, so its {self.num_particles} particles now run "
                "one at a time (the same estimate, slower). Pass vectorize_particles=False to choose this up front.",
                stacklevel=5,
            )
            self.particle_mode = False
            return self._one_at_a_time(run, first)

    def log_weights(self, model, guide, *args, who: str = "LogWeightEngine", **kwargs) -> LogWeights:
        """Draw ``num_particles`` samples per datum from the guide (reparameterised where possible) and return
        the per-datum log-weight parts."""
        self.ensure_nesting(model, guide, args, kwargs)

        def run(num: int) -> LogWeights:
            model_trace, guide_trace = get_importance_trace("flat", self.max_plate_nesting, self.particles(model, num), self.particles(guide, num), args, kwargs)
            return self._from_traces(model_trace, guide_trace, num, args)

        return self._vectorised_or_loop(run, who)

    def detached_log_weights(self, model, guide, *args, who: str = "LogWeightEngine", **kwargs) -> LogWeights:
        """Log weights at samples detached from the graph: z ~ q is drawn without gradient, then the guide and the
        model are re-run on those values, so gradients reach both only through their log-densities."""
        self.ensure_nesting(model, guide, args, kwargs)

        def run(num: int) -> LogWeights:
            with torch.no_grad():
                sample_trace = poutine.trace(self.particles(guide, num)).get_trace(*args, **kwargs)
            return self.rescore(model, guide, args, kwargs, sample_trace, num, who=who)

        return self._vectorised_or_loop(run, who)

    def rescore(self, model, guide, args, kwargs, sample_trace: Trace, num_particles: Optional[int] = None, who: str = "LogWeightEngine") -> LogWeights:
        """Re-run guide and model on the detached latent values of ``sample_trace`` (drawn with ``num_particles``
        particles, by default this engine's)."""
        num = self.num_particles if num_particles is None else num_particles
        values = Trace()
        for name, site in sample_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                values.add_node(name, **{**site, "value": site["value"].detach()})
        vguide, vmodel = self.particles(guide, num), self.particles(model, num)
        guide_trace = poutine.trace(poutine.replay(vguide, trace=values)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(vmodel, trace=guide_trace)).get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        try:
            guide_trace.compute_log_prob()
        except (NotImplementedError, KeyError) as e:
            from pyrovae.nn.flows import ANALYTIC_INVERSE, FLOWS  # the one record of which flows invert

            raise ValueError(
                f"{who} scores samples detached from the guide, which needs log q(z|x) at a given z; "
                f"the guide's distribution cannot evaluate that ({type(e).__name__}: {e}). Flows without an analytic "
                f"inverse ({', '.join(sorted(set(FLOWS) - ANALYTIC_INVERSE))}) cannot be used here: use a flow with an "
                f"inverse ({', '.join(sorted(ANALYTIC_INVERSE))}) or a pathwise objective (ELBO, IWAE with estimator='standard')."
            ) from e
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, self.max_plate_nesting)
        return self._from_traces(model_trace, guide_trace, num, args)


# --- the observed site's mean: g(z) of GECO's constraint, reconstructions, pictures -----------------------------


def observed_site(trace: Trace, site: Optional[str] = None, data: Optional[torch.Tensor] = None) -> str:
    """The model's observed site that a reconstruction reads: ``site`` if given; else the one whose value is the
    tensor ``data`` (the program's data argument: other sites may be observed by conditioning, e.g. a latent
    fixed to a grid point, or weights fixed to their posterior means); else the only observed site there is.
    Sites whose names start with ``_`` are bookkeeping (``pyro.factor`` terms) and never count."""
    observed = [n for n, s in trace.nodes.items() if s["type"] == "sample" and s["is_observed"] and not n.startswith("_")]
    if site is not None:
        if site not in observed:
            raise ValueError(f"obs_site={site!r} is not an observed site of the model; observed sites: {observed}")
        return site
    if data is not None:
        holding = [n for n in observed if trace.nodes[n]["value"] is data]
        if len(holding) == 1:
            return holding[0]
    if len(observed) != 1:
        raise ValueError(f"a reconstruction needs the model's one observed site; the model has {observed}: pass obs_site=NAME")
    return observed[0]


def site_mean(trace: Trace, site: str) -> torch.Tensor:
    """The mean of a site's distribution (inside any mask), in the shape of its value plus leading particle dims."""
    s = trace.nodes[site]
    fn = s["fn"]
    while isinstance(fn, MaskedDistribution):
        fn = fn.base_dist
    base = fn
    while isinstance(base, (torch.distributions.Independent, MaskedDistribution)):
        base = base.base_dist
    if isinstance(base, (torch.distributions.Categorical, PackedCategorical)):  # torch gives a Categorical a mean of NaNs: a wrong number, not an error
        raise ValueError(
            f"site {site!r} is {type(base).__name__}, which has no mean: reconstructions, pictures and GECO's constraints on "
            "g(z) (RE, FRE, CLA, pNCC) need an observed site with a mean; for token sequences constrain the "
            "reconstruction NLL per token instead (TokenGECO, --objective token-geco)"
        )
    return fn.mean


def _pair_mean(pair: TracePair, site: str) -> torch.Tensor:
    value = pair.model_trace.nodes[site]["value"]
    mean = site_mean(pair.model_trace, site).reshape(-1, *value.shape)  # [P or 1, B, *event]: drops singleton plate dims
    return mean.expand(pair.num_particles, *value.shape)


def observed_mean(lw: LogWeights, site: Optional[str] = None, data: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """g(z): the mean of the model's observed site (``[P, B, *event]``; chosen as :func:`observed_site` does) and
    the observed value."""
    site = observed_site(lw.pairs[0].model_trace, site, data)
    return lw.per_pair(lambda pair: _pair_mean(pair, site)), lw.pairs[0].model_trace.nodes[site]["value"]
