"""Variance-of-log-weights objectives, on samples detached from the graph.

VarianceLoss(x) = Var_{z ~ q, detached}[log p(x, z) - log q(z | x)], gradients to model and guide through the
log-densities (the variance loss, Algorithm 1). It is zero iff q(z|x) = p(z|x) and needs no
reparameterisation, so it works for discrete latents. LogVarianceLoss is VarGrad's log-variance loss
(Richter et al. 2020, eq. 16: half the variance) for the guide, whose gradient at r = q is exactly
grad_phi KL(q || p(z|x)) = -grad_phi ELBO in expectation, and the ELBO gradient for the model, as in that paper.

Which variance: with every site inside the data plate, the log weight of each datum is a function of that
datum's latents only, so the loss is the sum over the batch of each datum's variance over the S samples (the
lower-variance choice, zero iff every q(z_b | x_b) is exact). When the program has sites outside the data
plate (global latents or global observations), the data's log weights share the global latents, and only
the log weight of the whole batch, log p(x_1..B, z) - log q(z | x_1..B), is constant at the exact posterior:
the loss is then its variance over the S samples.
"""
from __future__ import annotations

import torch

from pyrovae.objectives.base import Estimate, LogWeights, Objective
from pyrovae.utils.registry import register_objective


def batch_variance(lw: LogWeights, local: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of the unbiased variance over particles of ``local [S, B]`` per datum, or, with
    sites outside the data plate, the variance of the whole batch's ``local.sum(1) + glob``."""
    if lw.global_sites:
        return (local.sum(1) + glob).var(dim=0, unbiased=True)
    return local.var(dim=0, unbiased=True).sum()


@register_objective("variance")
class VarianceLoss(Objective):
    """The variance over ``S`` detached samples of ``log w`` (see the module docstring for the batch).

    Args:
        num_particles: S >= 2 samples per datum.
        **kwargs: :class:`~pyrovae.objectives.base.Objective`'s ``max_plate_nesting``, ``data_plate``,
            ``vectorize_particles``.
    """

    min_particles = 2
    factor = 1.0  # the loss is factor * variance

    def __init__(self, num_particles: int = 8, **kwargs):
        super().__init__(num_particles=num_particles, **kwargs)

    def _particles_hint(self) -> str:
        return ": a variance needs at least two samples per data point (e.g. num_particles=8)"

    def estimate(self, model, guide, args, kwargs, state):
        lw = self.detached_log_weights(model, guide, *args, **kwargs)
        factors = [
            n for n, s in lw.pairs[0].guide_trace.nodes.items()
            if s["type"] == "sample" and (s["is_observed"] or s["infer"].get("is_auxiliary"))
        ]
        if factors:  # constant over the samples: the variance cannot see them, and they are no density of z
            raise ValueError(
                f"{type(self).__name__} takes gradients through the variance of log w over samples of z, but the guide has "
                f"observed or auxiliary sites (pyro.factor, a fixed log-density such as a dropout KL) {factors}, terms that "
                "do not vary with z and would get no gradient; move them into the model, or use an ELBO-type objective"
            )
        loss = self.factor * batch_variance(lw, lw.log_w, lw.glob)
        metrics = self._record(lw, variance=loss / (self.factor * lw.batch_size))
        return Estimate(loss, self._surrogate(lw, loss), metrics, state)

    def _surrogate(self, lw: LogWeights, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_particles={self.num_particles})"


@register_objective("logvariance")
class LogVarianceLoss(VarianceLoss):
    """VarGrad's log-variance loss, (1/2) Var[log w], for the guide; the ELBO gradient for the model.

    With the unbiased sample variance over S samples, the guide's gradient equals -grad_phi ELBO in
    expectation (Richter et al. 2020, eq. 16 and Prop. 1); the 1/2 is theirs. The logged loss is half the
    variance; ``metrics['variance']`` is the variance per datum and ``metrics['elbo']`` tracks the bound.
    """

    factor = 0.5

    def _surrogate(self, lw, loss):
        log_p, glob_p = lw.log_px + lw.log_pz, lw.glob_px + lw.glob_pz  # theta only: z is detached
        guide_part = self.factor * batch_variance(lw, log_p.detach() - lw.log_qz, glob_p.detach() - lw.glob_qz)  # phi only
        return guide_part - log_p.mean(0).sum() - glob_p.mean()
