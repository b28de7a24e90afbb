"""Variance-of-log-weights objectives, on samples detached from the graph.

VarianceLoss(x) = Var_{z ~ q, detached}[log p(x, z) - log q(z | x)], gradients to model and guide through the
log-densities (the variance loss, Algorithm 1). It is zero iff q(z|x) = p(z|x) and needs no
reparameterisation, so it works for discrete latents. LogVarianceLoss trains the guide by the same variance
(VarGrad; Richter et al. 2020) and the model by the ELBO gradient, as in that paper.
"""
from __future__ import annotations

from pyrovae.objectives.base import Objective


class VarianceLoss(Objective):
    """Per-datum variance over ``S`` detached samples of ``log w``, summed over the batch.

    Args:
        num_particles: S >= 2 samples per datum.
    """

    min_particles = 2

    def __init__(self, num_particles: int = 8, **kwargs):
        super().__init__(num_particles=num_particles, **kwargs)

    def _particles_hint(self) -> str:
        return ": a variance needs at least two samples per data point (e.g. num_particles=8)"

    def _loss_and_surrogate(self, model, guide, args, kwargs):
        lw = self.detached_log_weights(model, guide, *args, **kwargs)
        log_w = lw.log_w + lw.glob[:, None] / lw.batch_size
        var = log_w.var(dim=0, unbiased=True)
        self._record(lw, variance=var.mean())
        loss = var.sum()
        return loss, self._surrogate(lw, loss)

    def _surrogate(self, lw, loss):
        return loss

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_particles={self.num_particles})"


class LogVarianceLoss(VarianceLoss):
    """The log-variance (VarGrad) loss for the guide, the ELBO gradient for the model.

    The logged loss is the variance (the guide's objective); ``metrics['elbo']`` tracks the bound.
    """

    def _surrogate(self, lw, loss):
        log_p = lw.log_px + lw.log_pz  # theta only: z is detached
        guide_var = (log_p.detach() - lw.log_qz).var(dim=0, unbiased=True).sum()  # phi only
        return guide_var - log_p.mean(0).sum() - lw.glob.mean()
