"""Importance-weighted bounds, per data point.

IWAE_K(x) = E[log (1/K) sum_k w_k],  w_k = p(x, z_k) / q(z_k | x)          (Burda et al. 2016)
Renyi_alpha(x) = 1/(1-alpha) E[log (1/K) sum_k w_k^(1-alpha)]              (Li & Turner 2016)

Unlike ``pyro.infer.RenyiELBO``, the log-sum-exp is taken per data point, not after summing the batch.
"""
from __future__ import annotations

import math

import torch
from pyrovae.objectives.base import LogWeights, Objective, no_global_latents, reparam_only

ESTIMATORS = ("standard", "dreg")


def _log_mean_exp(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


class IWAE(Objective):
    """The K-sample importance-weighted bound, ``log (1/K) sum_k w_k`` per data point.

    Args:
        num_particles: K.
        estimator: ``standard`` (pathwise gradient of the bound) or ``dreg`` (doubly-reparameterised
            gradient for the guide, Tucker et al. 2019; the model's gradient is unchanged).
    """

    def __init__(self, num_particles: int = 5, estimator: str = "standard", **kwargs):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r} is not known; choose one of {list(ESTIMATORS)}")
        super().__init__(num_particles=num_particles, **kwargs)
        self.estimator = estimator

    def _bound(self, log_w: torch.Tensor) -> torch.Tensor:
        return _log_mean_exp(log_w)

    def _loss_and_surrogate(self, model, guide, args, kwargs):
        lw = self.log_weights(model, guide, *args, **kwargs)
        name = type(self).__name__
        no_global_latents(lw, name)
        reparam_only(lw, name)
        bound = self._bound(lw.log_w)
        self._record(lw, bound=bound.mean())
        # glob holds only observed sites outside the data plate here (e.g. a pyro.factor): not per datum, so
        # not inside the log-mean-exp, but part of log p(x) all the same
        loss = -(bound.sum() + lw.glob.mean())
        if self.estimator == "dreg" and torch.is_grad_enabled():
            return loss, -(self._dreg_surrogate(model, guide, args, kwargs, lw) + lw.glob.mean())
        return loss, loss

    def _dreg_surrogate(self, model, guide, args, kwargs, lw: LogWeights) -> torch.Tensor:
        """sum_k wt_k^2 d log w_k / dz dz/dphi for the guide and sum_k wt_k d log p / dtheta for the model.

        The guide's direct score term d log q_phi(z)/dphi is cancelled by adding log q_phi(z.detach()); the
        model's gradient weights are restored with log p_theta(x, z.detach()) (one extra model pass)."""
        w = torch.softmax(lw.log_w.detach(), dim=0)
        lw_det = self.rescore(model, guide, args, kwargs, lw.guide_trace)
        # adding log q_phi(z.detach()) cancels the direct score term d log q_phi(z) / dphi at fixed z
        path_log_w = lw.log_w + lw_det.log_qz
        log_p_det = lw_det.log_px + lw_det.log_pz
        return (w.pow(2) * path_log_w + (w - w.pow(2)) * log_p_det).sum()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_particles={self.num_particles}, estimator={self.estimator!r})"


class Renyi(IWAE):
    """The Renyi-alpha bound per data point: alpha = 0 is IWAE, alpha -> 1 the ELBO; alpha < 0 gives an upper
    bound on log p(x) in the large-K limit.

    Args:
        alpha: the Renyi order (any real; alpha = 1 is taken as the ELBO limit).
        num_particles: K.
    """

    def __init__(self, alpha: float = 0.5, num_particles: int = 5, **kwargs):
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha={alpha!r} must be a finite number")
        super().__init__(num_particles=num_particles, estimator="standard", **kwargs)
        self.alpha = float(alpha)

    def _bound(self, log_w: torch.Tensor) -> torch.Tensor:
        if self.alpha == 1.0:
            return log_w.mean(0)
        return _log_mean_exp((1.0 - self.alpha) * log_w) / (1.0 - self.alpha)

    def __repr__(self) -> str:
        return f"Renyi(alpha={self.alpha}, num_particles={self.num_particles})"
