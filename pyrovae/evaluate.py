"""Evaluation of a trained model/guide pair: importance-sampled log-likelihood, ELBO, KL, active units,
samples, reconstructions and latent-space plots. Everything is generic over Pyro programs that keep the
library's contract (``model(x)``, ``guide(x)``, per-example sites in ``pyro.plate("data", batch)``).
"""
from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites

from pyrovae.capture import MODES as CAPTURE_MODES
from pyrovae.capture import FunctionCapture
from pyrovae.objectives import ELBO, Objective


@dataclass
class LogLikelihood:
    """Per-datum estimates of log p(x) and their (delta-method) standard errors."""

    values: torch.Tensor
    stderr: torch.Tensor
    capture: str = ""  # how the chunks ran: captured graphs or plain Pyro, and why (see pyrovae.capture)


def default_max_elements(device: torch.device) -> int:
    """The default memory budget of one :func:`log_likelihood` pass, in floats of decoder output: 2^22 (16 MB
    tensors, closer to the CPU's caches) on CPU, where the 2-core development machine ran k = 5000 1.2 to 1.8
    times as fast with it as with 2^24; 2^24 elsewhere (a GPU wants large kernels)."""
    return 2**22 if torch.device(device).type == "cpu" else 2**24


def _particle_chunk(batch: int, numel: int, budget: int) -> int:
    return max(1, budget // max(1, batch * numel))


@torch.no_grad()
def log_likelihood(
    model,
    guide,
    data: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int = 100,
    max_elements: Optional[int] = None,
    *args,
    capture: str = "off",
    **kwargs,
) -> LogLikelihood:
    """Importance-sampled log p(x) per data point, the IWAE k=5000 protocol (Burda et al. 2016):

        log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k | x),   z_k ~ q(z | x).

    Vectorised over samples and data points; samples are drawn in chunks so that about ``max_elements``
    values of the size of the data fit in memory at once, and combined with a streaming log-sum-exp.

    Args:
        model, guide: Pyro programs taking ``x`` (and ``*args``/``**kwargs``).
        data: ``[N, *x_shape]`` on the model's device.
        num_samples: K.
        batch_size: data points per pass.
        max_elements: memory budget, in floats of decoder output, for one pass (default:
            :func:`default_max_elements` for the data's device).
        capture: how each chunk runs (:class:`pyrovae.capture.FunctionCapture`). ``off`` (default): Pyro runs
            the model and guide for every chunk. ``compile``: each chunk shape's aten graph is recorded once and
            compiled with ``torch.compile`` (fused kernels; after some 10 to 20 s of compiling per shape on CPU),
            which pays off on a whole test set. ``replay``: the recorded graph without compiling (no gain
            here: a chunk is a few large kernels, and each call's re-check runs one chunk twice). Graphs are
            kept for the same (model, guide) pair between calls; each is checked against Pyro on its first
            chunk in every call, and the plain chunk runs wherever a graph does not apply (the result's
            ``capture`` says why).
    Returns:
        :class:`LogLikelihood` with ``values`` and ``stderr``, each ``[N]``, and the ``capture`` report.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive integer (5000 is the IWAE protocol)")
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture={capture!r} is not known; choose one of {list(CAPTURE_MODES)}")
    numel = math.prod(data.shape[1:])
    if max_elements is None:
        max_elements = default_max_elements(data.device)
    values, errors = [], []
    run = _chunk_log_weights(model, guide, capture, args, kwargs)
    flags = _train_flags(model, guide)  # part of each graph's signature
    validate = is_validation_enabled()
    for start in range(0, data.shape[0], batch_size):
        x = data[start : start + batch_size]
        chunk = min(num_samples, _particle_chunk(x.shape[0], numel, max_elements))
        m = s1 = s2 = None  # running max, sum of w/e^m and of (w/e^m)^2
        done = 0
        while done < num_samples:
            k = min(chunk, num_samples - done)
            with pyro.validation_enabled(validate):  # checks once, not per chunk (each check is a host read)
                log_w = run(x, k, flags)
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
    report = run.summary() if isinstance(run, FunctionCapture) else "plain Pyro chunks (capture='off')"
    return LogLikelihood(torch.cat(values), torch.cat(errors), report)


def _weak(obj) -> Optional[Callable]:
    """A weak reference to ``obj`` (a bound method through ``WeakMethod``), or None where it cannot have one."""
    try:
        return weakref.WeakMethod(obj) if inspect.ismethod(obj) else weakref.ref(obj)
    except TypeError:
        return None


def _identity(obj) -> tuple:
    return (id(obj.__self__), id(obj.__func__)) if inspect.ismethod(obj) else (id(obj),)


def _owner(program):
    """The object behind a program: a bound method's instance (a module's ``model`` method, say), else itself."""
    return getattr(program, "__self__", program)


def _train_flags(*programs) -> tuple:
    return tuple(m.training for p in programs if isinstance(_owner(p), torch.nn.Module) for m in _owner(p).modules())


#: captured evaluation chunks kept between calls: (model, guide, mode) -> (weak model, weak guide, FunctionCapture)
_CHUNK_CAPTURES: dict[tuple, tuple] = {}


def _chunk_log_weights(model, guide, capture: str, args: tuple, kwargs: dict) -> Callable:
    """``(x, k, flags) -> log w [k, B]`` for ``k`` samples per datum. With a capture mode this is a
    :class:`FunctionCapture`, kept between calls for the same (model, guide) pair (so graphs are recorded and
    compiled once) and re-checked against Pyro on the first chunk of each shape of every call."""
    refs = (_weak(model), _weak(guide))
    cacheable = capture != "off" and None not in refs and not args and not kwargs
    programs = (lambda: (refs[0](), refs[1]())) if cacheable else (lambda: (model, guide))  # no strong references in the cache
    objectives: dict[int, Objective] = {}

    def chunk_log_w(x: torch.Tensor, k: int, flags: tuple) -> torch.Tensor:
        if k not in objectives:
            objectives[k] = Objective(num_particles=k)
        lw = objectives[k].log_weights(*programs(), x, *args, **kwargs)
        return lw.log_w + lw.glob[:, None]  # the traces (the chunk's decoder outputs) are freed on return

    if capture == "off":
        return chunk_log_w

    def modules() -> list[torch.nn.Module]:
        return [_owner(p) for p in programs() if isinstance(_owner(p), torch.nn.Module)]

    if not cacheable:
        return FunctionCapture(chunk_log_w, capture, modules=modules)
    key = (_identity(model), _identity(guide), capture)
    entry = _CHUNK_CAPTURES.get(key)
    if entry is None or entry[0]() != model or entry[1]() != guide:
        entry = _CHUNK_CAPTURES[key] = (refs[0], refs[1], FunctionCapture(chunk_log_w, capture, modules=modules))
        for owner in {id(_owner(p)): _owner(p) for p in (model, guide)}.values():
            weakref.finalize(owner, _CHUNK_CAPTURES.pop, key, None)  # the graphs (and the parameters they hold) go with the model
    entry[2].recheck()
    return entry[2]


@torch.no_grad()
def elbo_terms(model, guide, data: torch.Tensor, num_particles: int = 1, batch_size: int = 500, *args, objective: Optional[ELBO] = None, **kwargs) -> dict[str, float]:
    """Mean per-datum ELBO, reconstruction term E_q[log p(x|z)] and KL estimate over ``data``.

    ``objective``: an :class:`~pyrovae.objectives.ELBO` to reuse across calls (it keeps the plate nesting it
    guessed on its first call); by default a new ``ELBO(num_particles)``."""
    objective = ELBO(num_particles=num_particles) if objective is None else objective
    sums = {"elbo": 0.0, "recon": 0.0, "kl": 0.0}
    for start in range(0, data.shape[0], batch_size):
        x = data[start : start + batch_size]
        lw = objective.log_weights(model, guide, x, *args, **kwargs)
        sums["elbo"] = sums["elbo"] + lw.log_w.mean(0).sum() + lw.glob.mean()
        sums["recon"] = sums["recon"] + lw.log_px.mean(0).sum()
        sums["kl"] = sums["kl"] + lw.kl.mean(0).sum()
    return {k: float(v) / data.shape[0] for k, v in sums.items()}  # one host read per term


def _latent_sites(trace) -> list[str]:
    trace = prune_subsample_sites(trace)
    return [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]


@torch.no_grad()
def posterior_means(guide, data: torch.Tensor, batch_size: int = 500, num_samples: int = 100) -> dict[str, torch.Tensor]:
    """E_q[z | x] per latent site, ``[N, dim]``, averaged over ``num_samples`` vectorised runs of the guide.

    A site's own randomness is integrated out by its distribution's mean (or its samples, for a flow), and the
    average over runs integrates out the layers below it: for a two-layer guide E_q[z2 | x] =
    E_{q(z1|x)}[E_q[z2 | z1]], not the mean at one sample of z1, whose noise would count as activity."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive integer")
    out: dict[str, list] = {}
    nesting = None
    for start in range(0, data.shape[0], batch_size):
        x = data[start : start + batch_size]
        if nesting is None:
            first = poutine.trace(guide).get_trace(x)
            dims = [-f.dim for s in first.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"] if f.vectorized]
            nesting = max(dims, default=0)
        with pyro.plate("_posterior_mean_runs", num_samples, dim=-nesting - 1):
            trace = poutine.trace(guide).get_trace(x)
        for name in _latent_sites(trace):
            site = trace.nodes[name]
            try:
                mean = site["fn"].mean.expand_as(site["value"])
            except NotImplementedError:  # e.g. a flow: no closed-form mean, average the samples
                mean = site["value"]
            out.setdefault(name, []).append(mean.reshape(num_samples, x.shape[0], -1).mean(0))
    return {k: torch.cat(v) for k, v in out.items()}


def active_units(guide, data: torch.Tensor, threshold: float = 1e-2, **kwargs) -> dict[str, int]:
    """Number of active latent units per site (Burda et al. 2016): units u with Cov_x(E_q[u | x]) > threshold."""
    return {name: int((m.var(0) > threshold).sum()) for name, m in posterior_means(guide, data, **kwargs).items()}


def _observed_mean(trace) -> torch.Tensor:
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample" and s["is_observed"]]
    if not names:
        raise ValueError("the model has no observed site to draw images from")
    site = trace.nodes[names[-1]]
    try:
        return site["fn"].mean
    except NotImplementedError:
        return site["value"]


@torch.no_grad()
def sample(model, num: int, x_shape, device=None) -> torch.Tensor:
    """Mean of p(x | z) for ``num`` draws z ~ p(z): the model run without a guide (its latents come from the
    prior; the placeholder observation only sets the batch size and is never used as data)."""
    dummy = torch.zeros(num, *x_shape, device=device)
    trace = poutine.trace(model).get_trace(dummy)
    return _observed_mean(trace).reshape(num, *x_shape)


@torch.no_grad()
def reconstruct(model, guide, x: torch.Tensor) -> torch.Tensor:
    """Mean of p(x | z) at z ~ q(z | x)."""
    guide_trace = poutine.trace(guide).get_trace(x)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return _observed_mean(trace).reshape(x.shape)


@torch.no_grad()
def decode_grid(model, x_shape, site: str = "z", steps: int = 20, span: float = 2.5, device=None) -> torch.Tensor:
    """Decoder means over a ``steps x steps`` grid of a 2-D latent site (a latent-manifold plot)."""
    axis = torch.linspace(-span, span, steps, device=device)
    grid = torch.stack(torch.meshgrid(axis, -axis, indexing="xy"), -1).reshape(-1, 2)
    dummy = torch.zeros(grid.shape[0], *x_shape, device=device)
    prior = poutine.trace(model).get_trace(dummy[:1]).nodes.get(site)
    if prior is None or prior["fn"].event_shape != (2,) or prior["fn"].support.is_discrete:
        raise ValueError(f"decode_grid needs a continuous 2-D latent site {site!r}; the model's is {None if prior is None else prior['fn']}")
    conditioned = poutine.condition(model, data={site: grid})
    return _observed_mean(poutine.trace(conditioned).get_trace(dummy)).reshape(-1, *x_shape)


def save_image_grid(images: torch.Tensor, path, nrow: int = 8) -> Path:
    """Save ``[N, C, H, W]`` (or flat data, shown as one row each) as a PNG grid."""
    from torchvision.utils import save_image

    path = Path(path)
    images = images.detach().float().cpu()
    if images.dim() == 2:
        images = images[:, None, None, :]
    elif images.dim() == 3:
        images = images[:, None]
    save_image(images.clamp(0, 1), path, nrow=nrow)
    return path


def latent_scatter(guide, data: torch.Tensor, labels: Optional[torch.Tensor], path, site: Optional[str] = None) -> Path:
    """Scatter plot of the posterior means of a latent site (first two principal directions if dim > 2)."""
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
