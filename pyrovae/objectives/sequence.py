"""Objectives against posterior collapse for sequence models: logistic KL annealing, free bits, and GECO with
a per-token reconstruction constraint. Each works on any model/guide pair (sites read from the traces).

- :class:`AnnealedELBO`: E_q[log p(x|z)] - beta_t KL with beta_t = beta / (1 + exp(-k (t - t_0))) (Bowman et
  al. 2016's logistic schedule) or BetaELBO's constant / linear / cyclical ones, and optional free bits
  (Kingma et al. 2016, eq. 15): the KL of each latent dimension, averaged over the batch, counts as at least
  ``free_bits`` nats, so the optimiser gains nothing by pushing it lower.
- :class:`TokenGECO`: GECO (Rezende & Viola 2018) with the constraint "reconstruction NLL per observed element
  (token) <= tolerance", C = -log p(x|z) / #tokens - kappa, counting only unmasked tokens.
"""
from __future__ import annotations

import math

import torch
from pyro.distributions import MaskedDistribution
from pyro.distributions.kl import kl_divergence

from pyrovae.objectives.base import ELBO_COEFFICIENTS, Estimate, LogWeights, TracePair, score_function_term
from pyrovae.objectives.elbo import BetaELBO
from pyrovae.objectives.geco import GECO
from pyrovae.utils.registry import TEXT_GROUP, register_objective

def per_dimension_kl(lw: LogWeights) -> torch.Tensor:
    """Closed-form KL(q || p) of every latent dimension, ``[P, B, D]`` (all sites' last dims concatenated).

    Needs each latent site to be a distribution with one event dimension whose base has a registered KL
    (diagonal Gaussians, say)."""
    return lw.per_pair(lambda pair: _pair_per_dimension_kl(pair, lw))


def _pair_per_dimension_kl(pair: TracePair, lw: LogWeights) -> torch.Tensor:
    parts = []
    for name, gsite in pair.guide_trace.nodes.items():
        if gsite["type"] != "sample" or gsite["is_observed"]:
            continue
        q, p = gsite["fn"], pair.model_trace.nodes[name]["fn"]
        q, p = getattr(q, "base_dist", q), getattr(p, "base_dist", p)
        try:
            kl = kl_divergence(q, p)
        except NotImplementedError as e:
            raise ValueError(
                f"free bits need the KL of latent site {name!r} per dimension in closed form, which torch does not have for "
                f"{type(q).__name__} against {type(p).__name__}; use diagonal-Gaussian latents or free_bits=0"
            ) from e
        if kl.dim() < 1:
            raise ValueError(f"latent site {name!r} has no dimension to apply free bits to; use free_bits=0")
        parts.append(kl.reshape(pair.num_particles, lw.batch_size, -1))
    if not parts:
        return lw.log_qz.new_zeros(pair.num_particles, lw.batch_size, 0)
    return torch.cat(parts, -1)


@register_objective("annealed", groups={"free_bits": TEXT_GROUP})
class AnnealedELBO(BetaELBO):
    """BetaELBO (logistic schedule by default) with free bits.

    Args:
        beta: the final weight of the KL term.
        schedule: any of :class:`~pyrovae.objectives.BetaELBO`'s; ``logistic`` (Bowman et al. 2016) by default.
        free_bits: lambda >= 0, nats per latent dimension: the KL term is sum_j max(lambda, mean_batch KL_j)
            (0: none). Dimensions under the floor get no gradient from the KL.
        warmup_steps, cycle_steps, ratio, num_particles, analytic_kl: as :class:`BetaELBO`.
    The logged loss is the annealed, floored objective; ``metrics`` hold the true ``elbo``, ``kl``, ``beta_t``
    and ``free_bits_kl`` (the floored KL).
    """

    def __init__(self, beta: float = 1.0, schedule: str = "logistic", free_bits: float = 0.0, warmup_steps: int = 10000, cycle_steps: int = 10000, ratio: float = 0.5, num_particles: int = 1, analytic_kl: bool = False, **kwargs):
        if not (isinstance(free_bits, (int, float)) and math.isfinite(free_bits) and free_bits >= 0):
            raise ValueError(f"free_bits={free_bits!r} must be a finite number of nats >= 0 per latent dimension (0: no free bits)")
        super().__init__(beta, schedule, warmup_steps, cycle_steps, ratio, num_particles, analytic_kl, **kwargs)
        self.free_bits = float(free_bits)
        self.engine.any_data_plate = self.free_bits == 0.0  # free bits average the KL over data points

    def estimate(self, model, guide, args, kwargs, state):
        lw, recon, kl = self._bound_parts(model, guide, args, kwargs)
        beta = self.beta_at(state["num_steps"]).to(recon)
        next_state = {"num_steps": state["num_steps"] + 1}
        if self.free_bits == 0.0:
            return self._finish(lw, recon, kl, next_state, beta=beta, beta_t=beta)
        per_dim = per_dimension_kl(lw)  # [P, B, D]
        floor = torch.full_like(per_dim, self.free_bits)
        above = per_dim.mean((0, 1), keepdim=True) > self.free_bits
        # per datum, so that its batch mean is sum_j max(lambda, mean KL_j); no gradient for dims under the floor
        kl_fb = torch.where(above, per_dim, floor).sum(-1)
        objective = (recon - beta * kl_fb).mean(0).sum() + lw.glob.mean()
        elbo = lw.log_w.mean(0).sum() + lw.glob.mean()
        metrics = self._record(lw, elbo=elbo / lw.batch_size, beta_t=beta, free_bits_kl=kl_fb.mean())
        if not lw.nonreparam_sites:
            return Estimate(-objective, -objective, metrics, next_state)
        coefficients = {**ELBO_COEFFICIENTS, "log_pz": 0.0, "log_qz": 0.0}  # the local KL is the floored one
        return Estimate(-objective, -(objective + score_function_term(lw, coefficients, -beta * kl_fb).mean(0)), metrics, next_state)

    def __repr__(self) -> str:
        return f"AnnealedELBO(beta={self.beta}, schedule={self.schedule!r}, free_bits={self.free_bits}, warmup_steps={self.warmup_steps}, num_particles={self.num_particles})"


def observed_counts(pair: TracePair) -> torch.Tensor:
    """Unmasked observed elements per datum, ``[1, B]`` (tokens of a masked sequence; all elements otherwise)."""
    total = None
    for site in pair.model_trace.nodes.values():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        fn, mask = site["fn"], None
        while True:
            if isinstance(fn, MaskedDistribution):
                mask = fn._mask
            if not hasattr(fn, "base_dist"):
                break
            fn = fn.base_dist
        d = site["fn"]
        shape = d.batch_shape + d.event_shape
        ones = torch.ones(shape, device=site["value"].device)
        counted = ones if mask is None or isinstance(mask, bool) and mask else ones * mask
        n, _ = pair.reduce(site, counted.reshape(*d.batch_shape, -1).sum(-1))  # summed within each datum, as a log-density
        n = n[:1]
        total = n if total is None else total + n
    if total is None:
        raise ValueError("the model has no observed site, so there is no reconstruction to constrain")
    return total


@register_objective("token-geco", exclude=("constraint",))
class TokenGECO(GECO):
    """GECO whose constraint is the reconstruction NLL per observed token: C = -log p(x|z) / #tokens - tolerance.

    Args:
        tolerance: kappa, nats per token allowed (e.g. 4.5 for PTB: perplexity exp(4.5) = 90 given z).
        alpha, lambda_init, nu, lambda_min, lambda_max, num_particles: as :class:`GECO`.
    """

    def __init__(self, tolerance: float = 4.5, **kwargs):
        super().__init__(constraint=lambda x, x_hat: x_hat, tolerance=tolerance, **kwargs)  # placeholder: C comes from log p(x|z)
        self.constraint.name = "token-NLL"

    def constraint_values(self, lw: LogWeights, args: tuple) -> torch.Tensor:
        return -lw.log_px / lw.per_pair(observed_counts).clamp_min(1) - self.constraint.tolerance

    def __repr__(self) -> str:
        return f"TokenGECO(tolerance={self.constraint.tolerance}, alpha={self.alpha}, nu={self.nu})"
