"""Analyses of a trained VAE from the GECO paper (Rezende & Viola 2018, "Taming VAEs"): the marginal KL of the
aggregate posterior (Table 2), the information plane with the Appendix D decoder re-fit (Figures 3 and 5) and
GECO's training trajectory. Re-exported by :mod:`pyrovae.evaluate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyrovae.data import as_inputs
from pyrovae.objectives.engine import observed_site, site_mean


@dataclass
class MarginalKL:
    """KL(q(z) || p(z)) of the aggregate posterior q(z) = (1/N) sum_n q(z | x_n), in nats; with a conditional
    prior p(z | c), E_c KL(q(z | c) || p(z | c)) with q(z | c) aggregated over the data points of context c.

    ``value`` is the Monte Carlo mean of log q(z) - log p(z) over ``num_samples`` draws z ~ q(z) (stratified:
    ``rounds`` draws from each q(z | x_n)); ``stderr`` its standard error. ``mean_kl`` = (1/N) sum_n
    KL(q(z | x_n) || p(z)) estimated from the same draws, and ``mutual_information`` = ``mean_kl - value``, the
    information between the data index and z (given the context), which lies in [0, log N] ([0, log of the largest
    context's count]). ``num_contexts``: the distinct contexts (1 for an unconditional prior).

    Bias: log q(z) is the exact log-mean-exp over the components, so ``value`` is unbiased for the KL of the
    aggregate posterior *of the data passed*. As an estimate of the population's q(z) = E_x q(z | x) it is a
    plug-in with O(1/N) bias (O(1/count) per context); it can never exceed ``mean_kl`` (convexity of KL) nor fall
    below ``mean_kl - log N``, so with posteriors far narrower than the spread of their means the estimate
    saturates at ``mean_kl - log N``.
    """

    value: float
    stderr: float
    mean_kl: float
    mutual_information: float
    num_samples: int
    num_components: int
    num_contexts: int = 1


def _site(trace, site: Optional[str]) -> str:
    latents = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s) and not s["infer"].get("is_auxiliary")]
    if site is None:
        if len(latents) != 1:
            raise ValueError(f"the guide has latent sites {latents}; pass site= naming the one whose aggregate posterior to use")
        return latents[0]
    if site not in latents:
        raise ValueError(f"site={site!r} is not a latent site of the guide; choose one of {latents}")
    return site


def _context_groups(parts: tuple, probes: torch.Tensor, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(group index [N], group sizes [G]) of the data points by their context ``parts[1:]`` (exact equality), for a
    prior that differs between data points; refused where p(z | c) is not a function of the context alone."""
    n = probes.shape[0]
    if len(parts) < 2:
        raise ValueError(f"the model's prior at site {site!r} differs between data points, but the data is one tensor with no context: "
                         "a prior that depends on x or on another latent has no marginal KL here; pass prior= (a fixed p(z)) or data = (x, context)")
    ctx = torch.cat([t.reshape(n, -1).to(torch.float64) for t in parts[1:]], 1)
    _, group, counts = torch.unique(ctx, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((counts.shape[0],), n, dtype=torch.long, device=group.device).scatter_reduce(0, group, torch.arange(n, device=group.device), "amin")
    if not torch.allclose(probes, probes[first[group]], rtol=1e-5, atol=1e-6):
        raise ValueError(f"the model's prior at site {site!r} differs between data points with the same context: it depends on x or on another "
                         "latent, so p(z | c) is not a function of the context and the marginal KL is not defined; pass prior= (a fixed p(z))")
    if int(counts.max()) < 2:
        raise ValueError(f"the model's prior at site {site!r} depends on the context, and every context in data is distinct: q(z | c) aggregated "
                         "over the data points of one context is a single posterior, so E_c KL(q(z | c) || p(z | c)) would be the mean KL, not a "
                         "marginal one; pass data with several targets per context (each context repeated), or prior= (a fixed p(z))")
    return group, counts


@torch.no_grad()
def marginal_kl(
    guide,
    data,
    model=None,
    prior: Optional[dist.Distribution] = None,
    site: Optional[str] = None,
    rounds: int = 1,
    batch_size: int = 500,
) -> MarginalKL:
    """Monte Carlo KL(q(z) || p(z)) of the aggregate posterior q(z) = (1/N) sum_n q(z | x_n) (Table 2 of
    Rezende & Viola 2018; Hoffman & Johnson 2016, "ELBO surgery").

        KL = E_{z ~ q(z)} [log q(z) - log p(z)],   log q(z) = logsumexp_n log q(z | x_n) - log N

    With a conditional prior p(z | c) (a model ``model(x, context)`` whose prior differs between data points), the
    KL against the prior the model uses, averaged over the data's contexts:

        E_c KL(q(z | c) || p(z | c)),   q(z | c) = mean of q(z | x_n, c) over the data points n with context c

    (contexts compared for exact equality; refused where no context repeats, where the data holds no context, or
    where p(z | c) also depends on x or on another latent).

    Args:
        guide: the guide program ``guide(*batch)``; its site's distribution must have a ``log_prob`` that
            broadcasts over a leading sample dimension (diagonal Gaussians, full-covariance Gaussians, flows).
        data: ``[N, ...]`` or a tuple of tensors ``(x, context...)`` (all N components of the mixture).
        model: the model, to score log p(z) at its site of the same name (the guide's draws replayed in it).
        prior: a distribution over one z (event shape of the site) used instead of the model; with neither,
            N(0, I).
        site: the latent site (default: the guide's only one).
        rounds: draws from each q(z | x_n); the estimate uses ``rounds * N`` draws.
        batch_size: data points per guide call.

    Returns:
        :class:`MarginalKL`, with its standard error and the bias statement in its docstring.

    Cost: ``rounds * N * N`` evaluations of log q(z | x_n).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be an int >= 1 (draws from each q(z | x_n))")
    parts = as_inputs(data, "data")
    n = parts[0].shape[0]
    fns, draws, comps, own_q, log_p, probes, probe = [], [], [], [], [], [], None
    for start in range(0, n, batch_size):
        chunk = tuple(t[start : start + batch_size] for t in parts)
        for r in range(rounds):
            tr = poutine.trace(guide).get_trace(*chunk)
            site = _site(tr, site)
            node = tr.nodes[site]
            z = node["value"]
            if r == 0:
                fns.append(node["fn"])
            draws.append(z)
            comps.append(torch.arange(start, start + z.shape[0], device=z.device))
            own_q.append(node["fn"].log_prob(z))
            if model is not None:
                mtr = poutine.trace(poutine.replay(model, trace=tr)).get_trace(*chunk)
                mfn = mtr.nodes[site]["fn"]
                log_p.append(mfn.log_prob(z))
                if r == 0:  # each datum's prior at two fixed points: equal for all data iff the prior is unconditional
                    probe = torch.stack([z[0], z[-1]]) if probe is None else probe
                    probes.append(torch.stack([mfn.log_prob(p.expand_as(z)) for p in probe], -1))
            else:
                p = prior if prior is not None else dist.Normal(torch.zeros_like(z[0]), 1.0).to_event(z.dim() - 1)
                log_p.append(p.log_prob(z))
    z_all, comp, own_q, log_p = torch.cat(draws), torch.cat(comps), torch.cat(own_q), torch.cat(log_p)
    event_dims = z_all.dim() - 1
    if event_dims < 1:
        raise ValueError(f"site {site!r} has no event dimension; the guide must sample z of shape [batch, *event]")
    group, counts = torch.zeros(n, dtype=torch.long, device=z_all.device), torch.full((1,), n, device=z_all.device)
    if probes:
        probes = torch.cat(probes)
        if not torch.allclose(probes, probes[:1].expand_as(probes), rtol=1e-5, atol=1e-6):
            group, counts = _context_groups(parts, probes, site)
    log_q = []
    for start in range(0, z_all.shape[0], batch_size):
        z = z_all[start : start + batch_size]
        z = z.unsqueeze(1)  # [m, B, *event] against each chunk's batch [B] (expanded: Pyro's flow nets do not broadcast)
        lq = torch.cat([fn.log_prob(z.expand(-1, fn.batch_shape[-1], *z.shape[2:])) for fn in fns], -1)  # [m, N]
        own = group[comp[start : start + batch_size]]
        if counts.shape[0] > 1:  # q(z | c): the components of the draw's own context only
            lq = lq.masked_fill(group[None, :] != own[:, None], -math.inf)
        log_q.append(torch.logsumexp(lq, -1) - counts[own].to(lq.dtype).log())
    f = torch.cat(log_q) - log_p
    m = f.shape[0]
    value = float(f.mean())
    mean_kl = float((own_q - log_p).mean())
    return MarginalKL(value, float(f.std() / math.sqrt(m)) if m > 1 else float("nan"), mean_kl, mean_kl - value, m, n, int(counts.shape[0]))


@dataclass
class RefitGaussian:
    """Appendix D of Rezende & Viola (2018): the decoder p(x | z) = N(mu(z), sigma^2 I) with one global sigma
    re-fitted to its maximum-likelihood value on the data, so that models trained with different (or learned)
    scales are compared on the same footing.

    ``sigma`` = sqrt(mean over data, draws z ~ q(z | x) and the D dimensions of (x - mu(z))^2);
    ``recon_nll`` = D/2 log(2 pi sigma^2) + D/2, the per-datum negative reconstruction log-likelihood at it;
    ``mse`` = sigma^2 * D, the mean squared error per datum."""

    sigma: float
    recon_nll: float
    mse: float
    dim: int


def _mean_of_x(model, guide, chunk: tuple) -> torch.Tensor:
    """g(z) at z ~ q(z | x): the mean of the model's observed site holding the data (the engine's rule)."""
    tr = poutine.trace(guide).get_trace(*chunk)
    mtr = poutine.trace(poutine.replay(model, trace=tr)).get_trace(*chunk)
    site = observed_site(mtr, data=chunk[0])
    try:
        return site_mean(mtr, site)
    except NotImplementedError as e:
        raise ValueError(f"the model's observation {type(mtr.nodes[site]['fn']).__name__} has no mean to re-fit a Gaussian decoder around") from e


@torch.no_grad()
def refit_gaussian_scale(model, guide, data, num_samples: int = 1, batch_size: int = 500) -> RefitGaussian:
    """Re-fit one global standard deviation of a Gaussian decoder around the model's decoder mean (Appendix D).

        sigma*^2 = (1 / (N S D)) sum_n sum_s |x_n - mu(z_ns)|^2,   z_ns ~ q(z | x_n)

    Args:
        model, guide: the trained pair; the model's observed site must have a ``mean``.
        data: ``[N, ...]`` (or a tuple whose first tensor is x).
        num_samples: draws z per data point.
        batch_size: data points per call.
    """
    parts = as_inputs(data, "data")
    x_all = parts[0]
    total, count = 0.0, 0
    dim = math.prod(x_all.shape[1:])
    for start in range(0, x_all.shape[0], batch_size):
        chunk = tuple(t[start : start + batch_size] for t in parts)
        for _ in range(num_samples):
            mu = _mean_of_x(model, guide, chunk)
            total += float((chunk[0] - mu.reshape(chunk[0].shape)).pow(2).sum())
            count += chunk[0].shape[0]
    var = total / (count * dim)
    return RefitGaussian(math.sqrt(var), 0.5 * dim * math.log(2 * math.pi * var) + 0.5 * dim, var * dim, dim)


def information_plane(model, guide, data, num_samples: int = 1, batch_size: int = 500) -> dict:
    """One point of the information plane: ``kl`` = mean KL(q(z | x) || p(z)) (from the ELBO's terms) and
    ``recon_nll`` = the re-fitted Gaussian reconstruction NLL (:func:`refit_gaussian_scale`), with ``sigma`` and
    the model's own ``recon`` term (its likelihood as trained)."""
    from pyrovae.evaluate.likelihood import elbo_terms

    terms = elbo_terms(model, guide, data, batch_size=batch_size)
    refit = refit_gaussian_scale(model, guide, data, num_samples, batch_size)
    return {"kl": terms["kl"], "recon_nll": refit.recon_nll, "sigma": refit.sigma, "mse": refit.mse, "model_recon": -terms["recon"]}


def geco_trajectory(history: Sequence[dict], prefix: str = "train_") -> dict:
    """GECO's path through training from a :class:`pyrovae.train.Trainer` history (one record per epoch):
    lists ``epoch``, ``constraint``, ``lambda``, ``kl``, ``recon`` (missing values as NaN)."""
    keys = {"constraint": "constraint", "lambda": "lambda", "kl": "kl", "recon": "recon"}
    out = {"epoch": [r.get("epoch", i + 1) for i, r in enumerate(history)]}
    for name, key in keys.items():
        out[name] = [float(r.get(prefix + key, float("nan"))) for r in history]
    return out
