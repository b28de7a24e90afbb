"""Evaluation of a trained model/guide pair: importance-sampled log-likelihood, ELBO, KL, active units,
samples, reconstructions and latent-space plots. Everything is generic over Pyro programs that keep the
library's contract (``model(x)``, ``guide(x)``, per-example sites in ``pyro.plate("data", batch)``).

``data`` is a tensor ``[N, ...]`` or a tuple of tensors with the same first dimension (``(x, y)``,
``(tokens, lengths)``), passed to the programs as positional arguments: ``model(*data)``. Extra arguments
(``*args``, ``**kwargs``) that are tensors with first dimension N are per-datum too: every function here
slices them in chunks together with the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import pyro
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites

from pyrovae.capture import MODES as CAPTURE_MODES
from pyrovae.capture import GraphCache, owner, shared_cache
from pyrovae.data import as_inputs
from pyrovae.objectives.engine import LogWeightEngine, observed_site, site_mean
from pyrovae.evaluate.pictures import save_atomic

#: a tensor ``[N, ...]`` or a tuple of tensors with first dimension N
Data = Union[torch.Tensor, tuple]


class _Inputs:
    """A program's inputs over N data points, split into per-datum tensors (sliced in chunks) and constants.

    The data's tensors come first, then ``args``, then ``kwargs``. A tensor argument with a first dimension is
    per-datum and must have N rows; non-tensors and 0-d tensors are passed whole to every chunk. ``layout`` is a
    hashable description of where each tensor and constant goes (slot ``i >= 0``: the chunk's ``i``-th tensor;
    ``i < 0``: constant ``-i - 1``)."""

    def __init__(self, data: Data, args: tuple = (), kwargs: Optional[dict] = None):
        parts = as_inputs(data)
        self.n = parts[0].shape[0]
        self.tensors: list[torch.Tensor] = []
        self.constants: list = []
        positional = tuple(self._slot(v, f"positional argument {i}", parts) for i, v in enumerate((*parts, *args)))
        keywords = tuple((k, self._slot(v, f"keyword argument {k!r}", parts)) for k, v in (kwargs or {}).items())
        self.layout = (positional, keywords)

    def _slot(self, value, what: str, parts: tuple) -> int:
        if torch.is_tensor(value) and value.ndim >= 1:
            if value.shape[0] != self.n:
                raise ValueError(
                    f"the extra {what} has shape {tuple(value.shape)} but the data has N={self.n} rows (shapes "
                    f"{[tuple(t.shape) for t in parts]}): tensor arguments are per-datum inputs, sliced in chunks with the "
                    "data, so their first dimension must be N. Pass other tensors through functools.partial(model, ...)"
                )
            self.tensors.append(value)
            return len(self.tensors) - 1
        self.constants.append(value)
        return -len(self.constants)

    @property
    def first(self) -> torch.Tensor:
        """The data's first tensor (``x``)."""
        return self.tensors[0]

    def chunk(self, start: int, stop: int) -> tuple:
        return tuple(t[start:stop] for t in self.tensors)

    def call(self, chunk: tuple) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the programs for a chunk of the per-datum tensors."""
        return _call_args(self.layout, chunk, self.constants)

    def chunks(self, batch_size: int) -> Iterator[tuple[tuple, dict]]:
        for start in range(0, self.n, batch_size):
            yield self.call(self.chunk(start, start + batch_size))


def _call_args(layout: tuple, tensors: tuple, constants) -> tuple[tuple, dict]:
    positional, keywords = layout
    get = lambda i: tensors[i] if i >= 0 else constants[-i - 1]  # noqa: E731
    return tuple(get(i) for i in positional), {k: get(i) for k, i in keywords}


@dataclass
class LogLikelihood:
    """Per-datum estimates of log p(x) and their (delta-method) standard errors."""

    values: torch.Tensor
    stderr: torch.Tensor
    capture: str = ""  # how the chunks ran: captured graphs or plain Pyro, and why (see pyrovae.capture)

    def summary(self, prefix: str = "test_") -> dict[str, float]:
        """The mean NLL over the data and its two standard errors: over the data (the spread of -log p(x) across
        data points, what a second test set would move) and of the importance sampling (the per-datum delta-method
        errors combined, what more samples would shrink)."""
        return nll_summary(-self.values, self.stderr, prefix)


def nll_summary(nll: torch.Tensor, importance_stderr: torch.Tensor, prefix: str = "test_") -> dict[str, float]:
    """``{prefix}nll``, ``{prefix}nll_stderr_over_data`` and ``{prefix}nll_importance_stderr`` of per-datum NLLs."""
    n = nll.numel()
    return {
        f"{prefix}nll": float(nll.mean()),
        f"{prefix}nll_stderr_over_data": float(nll.std() / math.sqrt(n)) if n > 1 else float("nan"),
        f"{prefix}nll_importance_stderr": float(importance_stderr.pow(2).mean().sqrt() / math.sqrt(n)),
    }


def default_max_elements(device: torch.device) -> int:
    """The default memory budget of one :func:`log_likelihood` pass, in floats of decoder output: 2^22 (16 MB
    tensors, closer to the CPU's caches, so faster on CPU than 2^24: README, "Evaluation") on CPU; 2^24
    elsewhere (a GPU wants large kernels)."""
    return 2**22 if torch.device(device).type == "cpu" else 2**24


def _particle_chunk(batch: int, numel: int, budget: int) -> int:
    return max(1, budget // max(1, batch * numel))


@torch.no_grad()
def log_likelihood(
    model,
    guide,
    data: Data,
    num_samples: int = 5000,
    batch_size: int = 100,
    max_elements: Optional[int] = None,
    *args,
    capture: str = "off",
    progress: bool = False,
    **kwargs,
) -> LogLikelihood:
    """Importance-sampled log p(x) per data point, the IWAE k=5000 protocol (Burda et al. 2016):

        log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k | x),   z_k ~ q(z | x).

    Vectorised over samples and data points; samples are drawn in chunks so that about ``max_elements``
    values of the size of the data fit in memory at once, and combined with a streaming log-sum-exp.

    Args:
        model, guide: Pyro programs taking ``x`` (and ``*args``/``**kwargs``), or ``*data`` for tuple data.
        data: ``[N, *x_shape]`` on the model's device, or a tuple of tensors with first dimension N (``(x, y)``),
            sliced together; tensor ``args``/``kwargs`` with first dimension N are sliced with it.
        num_samples: K.
        batch_size: data points per pass.
        max_elements: memory budget, in floats of decoder output, for one pass (default:
            :func:`default_max_elements` for the data's device).
        capture: how each chunk runs (:class:`pyrovae.capture.GraphCache`). ``off`` (default): Pyro runs
            the model and guide for every chunk. ``compile``: each chunk shape's aten graph is recorded once and
            compiled with ``torch.compile`` (fused kernels, after a compile per shape that pays off on a whole
            test set; README, "Captured evaluation"). ``replay``: the recorded graph without compiling (no gain
            here: a chunk is a few large kernels, and each call's re-check runs one chunk twice). Graphs are
            kept for the same (model, guide) pair between calls; each is checked against Pyro on its first
            chunk in every call, and the plain chunk runs wherever a graph does not apply (the result's
            ``capture`` says why).
        progress: show a bar (images done, images/s, time left) on a terminal (:func:`pyrovae.utils.progress.bar`).
    Returns:
        :class:`LogLikelihood` with ``values`` and ``stderr``, each ``[N]``, and the ``capture`` report.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive integer (5000 is the IWAE protocol)")
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture={capture!r} is not known; choose one of {list(CAPTURE_MODES)}")
    inputs = _Inputs(data, args, kwargs)
    numel = math.prod(inputs.first.shape[1:])
    if max_elements is None:
        max_elements = default_max_elements(inputs.first.device)
    values, errors = [], []
    run = _chunk_log_weights(model, guide, capture, inputs)
    validate = is_validation_enabled()
    from pyrovae.utils.progress import bar as progress_bar

    bar = progress_bar(inputs.n, enabled=progress, desc=f"log p(x), k={num_samples}", unit="img", leave=False)
    for start in range(0, inputs.n, batch_size):
        x = inputs.chunk(start, start + batch_size)
        chunk = min(num_samples, _particle_chunk(x[0].shape[0], numel, max_elements))
        m = s1 = s2 = None  # running max, sum of w/e^m and of (w/e^m)^2
        done = 0
        while done < num_samples:
            k = min(chunk, num_samples - done)
            with pyro.validation_enabled(validate):  # checks once, not per chunk (each check is a host read)
                log_w = run(x, k, inputs.layout)
            validate = False
            new_m = log_w.max(0).values if m is None else torch.maximum(m, log_w.max(0).values)
            scale = torch.zeros_like(new_m) if m is None else torch.exp(m - new_m)
            w = torch.exp(log_w - new_m)
            s1 = w.sum(0) + (0 if s1 is None else s1 * scale)
            s2 = w.pow(2).sum(0) + (0 if s2 is None else s2 * scale.pow(2))
            m = new_m
            done += k
        mean_w = s1 / num_samples
        values.append(m + torch.log(mean_w))
        var_mean = (s2 / num_samples - mean_w.pow(2)).clamp_min(0) / num_samples
        errors.append(torch.sqrt(var_mean) / mean_w)
        bar.update(x[0].shape[0])
    bar.close()
    report = run.summary() if isinstance(run, GraphCache) else "plain Pyro chunks (capture='off')"
    return LogLikelihood(torch.cat(values), torch.cat(errors), report)


def _chunk_log_weights(model, guide, capture: str, inputs: _Inputs) -> Callable:
    """``(tensors, k, layout) -> log w [k, B]`` for ``k`` samples per datum of a chunk of the per-datum tensors. With
    a capture mode this is a :class:`~pyrovae.capture.GraphCache`, kept between calls for the same (model, guide)
    pair (so graphs are recorded and compiled once) when no constant argument is involved, and re-checked against
    Pyro on the first chunk of each shape of every call."""
    constants = inputs.constants
    engines: dict[int, LogWeightEngine] = {}

    def make(programs: Callable[[], tuple]) -> Callable:
        def chunk_log_w(x: tuple, k: int, layout: tuple) -> torch.Tensor:
            if k not in engines:
                engines[k] = LogWeightEngine(num_particles=k)
            args, kwargs = _call_args(layout, x, constants)
            lw = engines[k].log_weights(*programs(), *args, who="log_likelihood", **kwargs)
            return lw.log_w + lw.glob[:, None]  # the traces (the chunk's decoder outputs) are freed on return

        return chunk_log_w

    if capture == "off":
        return make(lambda: (model, guide))

    def cache(programs: Callable[[], tuple]) -> GraphCache:
        modules = lambda: [owner(p) for p in programs() if isinstance(owner(p), torch.nn.Module)]  # noqa: E731
        return GraphCache(make(programs), capture, modules=modules)

    run = shared_cache((model, guide), ("log_likelihood", capture), cache) if not constants else None
    if run is None:  # constants (or programs without weak references) are not kept between calls
        return cache(lambda: (model, guide))
    run.recheck()
    return run


@torch.no_grad()
def elbo_terms(model, guide, data: Data, num_particles: int = 1, batch_size: int = 500, *args, engine: Optional[LogWeightEngine] = None, **kwargs) -> dict[str, float]:
    """Mean per-datum ELBO, reconstruction term E_q[log p(x|z)] and KL estimate over ``data`` (a tensor or a
    tuple of tensors, sliced in chunks together with the per-datum tensors of ``args``/``kwargs``).

    ``engine``: a :class:`~pyrovae.objectives.engine.LogWeightEngine` to reuse across calls (it keeps the plate nesting it
    guessed on its first call); by default a new one with ``num_particles``."""
    engine = LogWeightEngine(num_particles) if engine is None else engine
    inputs = _Inputs(data, args, kwargs)
    sums = {"elbo": 0.0, "recon": 0.0, "kl": 0.0}
    for call_args, call_kwargs in inputs.chunks(batch_size):
        lw = engine.log_weights(model, guide, *call_args, who="elbo_terms", **call_kwargs)
        sums["elbo"] = sums["elbo"] + lw.log_w.mean(0).sum() + lw.glob.mean()
        sums["recon"] = sums["recon"] + lw.log_px.mean(0).sum()
        sums["kl"] = sums["kl"] + lw.kl.mean(0).sum()
    return {k: float(v) / inputs.n for k, v in sums.items()}  # one host read per term


@torch.no_grad()
def kl_by_site(model, guide, data: Data, batch_size: int = 500, *args, engine: Optional[LogWeightEngine] = None, **kwargs) -> dict[str, float]:
    """Each latent site's part of the KL term, mean per datum over ``data``: E_q[log q(z_s | ...) - log p(z_s | ...)],
    one sample per datum (the same draw for every site), site by site in the guide's order. For a hierarchical VAE
    these are the layers' KL terms (``{"z1": ..., "z2": ...}``; a collapsed layer shows about 0); summed over the
    sites they are :func:`elbo_terms`' ``kl`` for the same draw. Sites outside the data plate (global latents) are
    left out: their KL is not per datum."""
    engine = LogWeightEngine(1) if engine is None else engine
    inputs = _Inputs(data, args, kwargs)
    sums: dict[str, torch.Tensor] = {}
    for call_args, call_kwargs in inputs.chunks(batch_size):
        lw = engine.log_weights(model, guide, *call_args, who="kl_by_site", **call_kwargs)
        for pair in lw.pairs:
            for name, site in pair.guide_trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"] or name not in pair.model_trace.nodes:
                    continue
                q, _ = pair.reduce(site)
                p, _ = pair.reduce(pair.model_trace.nodes[name])
                if q is None or p is None:  # outside the data plate
                    continue
                part = (q - p).mean(0).sum()
                sums[name] = part if name not in sums else sums[name] + part
    return {k: float(v) / inputs.n for k, v in sums.items()}


def _latent_sites(trace) -> list[str]:
    trace = prune_subsample_sites(trace)
    return [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]


@dataclass
class UnitActivity:
    """Activity of the units of one latent site over a data set (Burda et al. 2016): A_u = Var_x(E_q[u | x]).

    ``variance`` and ``stderr`` are ``[dim]``: the estimate of A_u for each unit and its Monte Carlo standard
    error (0 where ``exact``: the site's distribution has a closed-form mean that no other random draw moves).
    ``means``: the estimates of E_q[u | x], ``[N, dim]``."""

    variance: torch.Tensor
    stderr: torch.Tensor
    exact: bool
    means: torch.Tensor


def _mean_estimates(guide, data: Data, args: tuple, kwargs: dict, batch_size: int, num_samples: int) -> dict[str, tuple]:
    """Per latent site: ``(mean [N, dim], sampling variance of that mean [N, dim], exact)`` from ``num_samples``
    vectorised runs of the guide (see :func:`posterior_means`)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive integer")
    inputs = _Inputs(data, args, kwargs)
    out: dict[str, list] = {}
    nesting = None
    for call_args, call_kwargs in inputs.chunks(batch_size):
        b = call_args[0].shape[0]
        if nesting is None:
            first = poutine.trace(guide).get_trace(*call_args, **call_kwargs)
            dims = [-f.dim for s in first.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"] if f.vectorized]
            nesting = max(dims, default=0)
        with pyro.plate("_posterior_mean_runs", num_samples, dim=-nesting - 1):
            trace = poutine.trace(guide).get_trace(*call_args, **call_kwargs)
        for name in _latent_sites(trace):
            site = trace.nodes[name]
            try:
                runs = site["fn"].mean.expand_as(site["value"])
            except NotImplementedError:  # e.g. a flow: no closed-form mean, average the samples
                runs = site["value"]
            runs = runs.reshape(num_samples, b, -1).to(torch.get_default_dtype() if not runs.is_floating_point() else runs.dtype)
            # a closed-form mean that no other draw moves is the same in every run (one run cannot tell)
            exact = num_samples > 1 and bool(torch.equal(runs, runs[:1].expand_as(runs)))
            if exact:
                mean, var = runs[0], torch.zeros_like(runs[0])
            elif num_samples == 1:
                mean, var = runs[0], torch.full_like(runs[0], math.nan)
            else:
                mean, var = runs.mean(0), runs.var(0) / num_samples  # s^2 / S: the sampling variance of the mean
            out.setdefault(name, []).append((mean, var, exact))
    return {k: (torch.cat([m for m, _, _ in v]), torch.cat([w for _, w, _ in v]), all(e for _, _, e in v)) for k, v in out.items()}


@torch.no_grad()
def posterior_means(guide, data: Data, *args, batch_size: int = 500, num_samples: int = 100, **kwargs) -> dict[str, torch.Tensor]:
    """E_q[z | x] per latent site, ``[N, dim]``, averaged over ``num_samples`` vectorised runs of the guide.

    A site's own randomness is integrated out by its distribution's mean (or its samples, for a flow), and the
    average over runs integrates out the layers below it: for a two-layer guide E_q[z2 | x] =
    E_{q(z1|x)}[E_q[z2 | z1]], not the mean at one sample of z1, whose noise would count as activity.
    ``data`` and the per-datum tensors of ``args``/``kwargs`` are passed to the guide as for :func:`log_likelihood`."""
    return {k: m for k, (m, _, _) in _mean_estimates(guide, data, args, kwargs, batch_size, num_samples).items()}


@torch.no_grad()
def unit_activity(guide, data: Data, *args, batch_size: int = 500, num_samples: int = 100, **kwargs) -> dict[str, UnitActivity]:
    """Unbiased estimates of each latent unit's activity A_u = Var_x(E_q[u | x]) over ``data``, with standard errors.

    Where a site has a closed-form mean that no other random draw moves (a diagonal Gaussian or Bernoulli
    encoder's first layer) E_q[u | x] is exact and so is A_u. Otherwise (a flow's samples; an upper layer,
    whose mean given the layer below is averaged over runs) each m_x is a mean of S = ``num_samples`` runs, with
    sampling variance s_x^2 / S (s_x^2: the variance over runs), which would add mean_x(sigma_x^2) / S to the
    variance over x (Var 0.01 for q = N(0, I) and S = 100, the threshold itself). It is subtracted:

        A_u ~= var_x(m_x) - mean_x(s_x^2 / S),   unbiased for Var_x(E_q[u | x]) over the N data points.

    Its Monte Carlo standard error (given the data; a Gaussian approximation for the run averages) is
    sqrt([4 max(sum_x ((m_x - m)^2 - v_x) v_x, 0) + 2 sum_x v_x^2] / (N - 1)^2 + 2 sum_x v_x^2 / ((S - 1) N^2)),
    v_x = s_x^2 / S, where (m_x - m)^2 - v_x estimates (E_q[u | x] - its mean)^2 without the sampling noise of m_x:
    about v sqrt(2 / N) for a unit whose mean does not vary (0.01 sqrt(2 / N) for q = N(0, I) and S = 100:
    0.00045 for N = 1000, against the threshold 0.01), so the count of units above a threshold far from 0 is right unless a unit sits within a few standard
    errors of it. More samples shrink v_x in proportion.

    Args:
        guide: a Pyro program ``guide(*data, *args, **kwargs)``.
        data: a tensor ``[N, ...]`` or a tuple of tensors with first dimension N.
        batch_size: data points per vectorised pass.
        num_samples: S >= 2, runs of the guide per data point (two runs tell an exact mean from a sampled one).
    """
    _check_runs(num_samples)
    return _activity(_mean_estimates(guide, data, args, kwargs, batch_size, num_samples), num_samples)


@torch.no_grad()
def batched_unit_activity(guide, batches: Iterable[Data], num_samples: int = 100) -> dict[str, UnitActivity]:
    """:func:`unit_activity` over data that comes in batches of its own, each one vectorised pass of the guide
    (sentences in length buckets, :func:`pyrovae.evaluate.text.evaluate_text`): the estimates are those of
    :func:`unit_activity` on the batches' union, in the batches' order.

    Args:
        guide: a Pyro program ``guide(*batch)``.
        batches: tensors ``[n, ...]`` or tuples of tensors with the same first dimension n (per batch).
        num_samples: S >= 2, runs of the guide per data point.
    """
    _check_runs(num_samples)
    parts: dict[str, list] = {}
    for batch in batches:
        n = as_inputs(batch)[0].shape[0]
        for name, estimate in _mean_estimates(guide, batch, (), {}, n, num_samples).items():
            parts.setdefault(name, []).append(estimate)
    merged = {k: (torch.cat([m for m, _, _ in v]), torch.cat([w for _, w, _ in v]), all(e for _, _, e in v)) for k, v in parts.items()}
    return _activity(merged, num_samples)


def _check_runs(num_samples) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples={num_samples!r} must be an integer >= 2: the runs' spread is what tells an exact mean from a sampled one, and gives the sampling variance (100 is the default)")


def _activity(estimates: dict[str, tuple], num_samples: int) -> dict[str, UnitActivity]:
    """:class:`UnitActivity` per site from :func:`_mean_estimates`' ``(mean, sampling variance, exact)``."""
    out = {}
    for name, (mean, var, exact) in estimates.items():
        n = mean.shape[0]
        if n < 2:
            raise ValueError(f"unit activity is a variance over data points: data has N={n}; pass at least 2 data points")
        centred = mean - mean.mean(0)
        activity = mean.var(0) - var.mean(0)
        se2 = (4 * ((centred.pow(2) - var) * var).sum(0).clamp_min(0) + 2 * var.pow(2).sum(0)) / (n - 1) ** 2
        if not exact:
            se2 = se2 + 2 * var.pow(2).sum(0) / ((num_samples - 1) * n**2)
        out[name] = UnitActivity(activity, se2.sqrt(), exact, mean)
    return out


def active_units(guide, data: Data, threshold: float = 1e-2, *args, batch_size: int = 500, num_samples: int = 100, **kwargs) -> dict[str, int]:
    """Number of active latent units per site (Burda et al. 2016): units u with Cov_x(E_q[u | x]) > threshold,
    from :func:`unit_activity`'s unbiased estimates (exact for closed-form means). ``data``, ``args`` and
    ``kwargs`` go to the guide as in :func:`log_likelihood`; ``num_samples`` runs of the guide per data point."""
    return count_active(unit_activity(guide, data, *args, batch_size=batch_size, num_samples=num_samples, **kwargs), threshold)


def count_active(activity: dict[str, UnitActivity], threshold: float = 1e-2) -> dict[str, int]:
    """Per site, the units whose activity (:func:`unit_activity`) is above ``threshold``."""
    return {name: int((a.variance > threshold).sum()) for name, a in activity.items()}


def _observed_mean(trace, data: torch.Tensor) -> torch.Tensor:
    """The mean of the model's observed site holding ``data``. A distribution without a mean is refused: its
    observed value is the data (or the sampler's placeholder), which must not be passed off as a model output."""
    site = observed_site(trace, data=data)
    try:
        return site_mean(trace, site)
    except NotImplementedError:
        fn = trace.nodes[site]["fn"]
        while isinstance(fn, (torch.distributions.Independent, MaskedDistribution)):
            fn = fn.base_dist
        raise ValueError(
            f"the model's observed site {site!r} has a {type(fn).__name__}, which defines no mean, so there is no "
            "p(x | z) mean to show: give the likelihood a distribution with a .mean (or draw from the model with "
            "pyro.infer.Predictive to get samples instead of means)"
        ) from None


def _extra_inputs(inputs: tuple, num: int, what: str) -> tuple:
    inputs = tuple(inputs)
    if inputs:
        as_inputs(inputs, "inputs")
        if inputs[0].shape[0] != num:
            raise ValueError(f"{what} needs inputs with one row per image, {num} in all; got shapes {[tuple(t.shape) for t in inputs]}")
    return inputs


@torch.no_grad()
def sample(model, num: int, x_shape, device=None, inputs: tuple = (), dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Mean of p(x | z) for ``num`` draws z ~ p(z): the model run without a guide (its latents come from the
    prior; the placeholder observation, of ``dtype``, only sets the batch size and is never used as data).
    ``inputs``: the model's further inputs (``model(x, y)``: ``inputs=(y,)``), ``num`` rows each."""
    dummy = torch.zeros(num, *x_shape, device=device, dtype=dtype)
    trace = poutine.trace(model).get_trace(dummy, *_extra_inputs(inputs, num, "sample"))
    return _observed_mean(trace, dummy).reshape(num, *x_shape)


@torch.no_grad()
def reconstruct(model, guide, x: Data) -> torch.Tensor:
    """Mean of p(x | z) at z ~ q(z | x); ``x`` may be a tuple ``(x, y)`` (reconstructs its first tensor)."""
    x = as_inputs(x, "x")
    guide_trace = poutine.trace(guide).get_trace(*x)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*x)
    return _observed_mean(trace, x[0]).reshape(x[0].shape)


@torch.no_grad()
def decode_grid(model, x_shape, site: str = "z", steps: int = 20, span: float = 2.5, device=None, inputs: tuple = ()) -> torch.Tensor:
    """Decoder means over a ``steps x steps`` grid of a 2-D latent site (a latent-manifold plot); ``inputs``: the
    model's further inputs, ``steps**2`` rows each (as for :func:`sample`)."""
    axis = torch.linspace(-span, span, steps, device=device)
    grid = torch.stack(torch.meshgrid(axis, -axis, indexing="xy"), -1).reshape(-1, 2)
    dummy = torch.zeros(grid.shape[0], *x_shape, device=device)
    inputs = _extra_inputs(inputs, grid.shape[0], "decode_grid")
    prior = poutine.trace(model).get_trace(dummy[:1], *(t[:1] for t in inputs)).nodes.get(site)
    if prior is None or prior["fn"].event_shape != (2,) or prior["fn"].support.is_discrete:
        raise ValueError(f"decode_grid needs a continuous 2-D latent site {site!r}; the model's is {None if prior is None else prior['fn']}")
    conditioned = poutine.condition(model, data={site: grid})
    return _observed_mean(poutine.trace(conditioned).get_trace(dummy, *inputs), dummy).reshape(-1, *x_shape)


def save_image_grid(images: torch.Tensor, path, nrow: int = 8) -> Path:
    """Save ``[N, C, H, W]`` (or flat data, shown as one row each) as a PNG grid."""
    from torchvision.utils import save_image

    path = Path(path)
    images = images.detach().float().cpu()
    if images.dim() == 2:
        images = images[:, None, None, :]
    elif images.dim() == 3:
        images = images[:, None]
    save_atomic(path, lambda f, fmt: save_image(images.clamp(0, 1), f, format=fmt, nrow=nrow))
    return path


def latent_scatter(guide, data: Data, labels: Optional[torch.Tensor], path, site: Optional[str] = None) -> Path:
    """Scatter plot of the posterior means of a latent site (first two principal directions if dim > 2);
    ``data``: a tensor or a tuple of tensors, as for :func:`posterior_means`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = posterior_means(guide, data)
    name = site or next(iter(means))
    z = means[name].float().cpu()
    if z.shape[1] > 2:
        z = z - z.mean(0)
        _, _, v = torch.linalg.svd(z, full_matrices=False)
        z = z @ v[:2].T
    fig, ax = plt.subplots(figsize=(5, 5))
    colors = None if labels is None else labels.cpu().numpy()
    points = ax.scatter(z[:, 0].numpy(), z[:, 1].numpy(), s=3, **({} if colors is None else {"c": colors, "cmap": "tab10"}))
    if labels is not None:
        fig.colorbar(points, ax=ax)
    ax.set_title(f"E_q[{name} | x]" + (" (first two principal directions)" if means[name].shape[1] > 2 else ""))
    fig.tight_layout()
    save_atomic(path, lambda f, fmt: fig.savefig(f, format=fmt, dpi=120))
    plt.close(fig)
    return Path(path)
