"""Importance-weighted bounds, per data point, with a choice of gradient estimator.

IWAE_K(x) = E[log (1/K) sum_k w_k],  w_k = p(x, z_k) / q(z_k | x)          (Burda et al. 2016)
Renyi_alpha(x) = 1/(1-alpha) E[log (1/K) sum_k w_k^(1-alpha)]              (Li & Turner 2016)

Unlike ``pyro.infer.RenyiELBO``, the log-sum-exp is taken per data point, not after summing the batch.

Estimators (``estimator=``):

- ``standard``: the pathwise gradient of the bound (every guide site reparameterised);
- ``dreg``: doubly reparameterised for the guide (Tucker et al. 2019; its Renyi form below);
- ``vimco``: the score function with VIMCO's per-sample leave-one-out baselines for non-reparameterisable
  sites (Mnih & Rezende 2016), pathwise for the rest: trains discrete latents;
- ``score``: the plain score function (learning signal = the bound itself, no baseline), for comparison.
"""
from __future__ import annotations

import math

import torch

from pyrovae.objectives.base import Estimate, LogWeights, Objective, global_observations_are_constant, no_global_latents, reparam_only
from pyrovae.utils.registry import register_objective

ESTIMATORS = ("standard", "dreg", "vimco", "score")


def _log_mean_exp(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


@register_objective("iwae", choices={"estimator": ESTIMATORS})
class IWAE(Objective):
    """The K-sample importance-weighted bound, ``log (1/K) sum_k w_k`` per data point.

    Args:
        num_particles: K.
        estimator: ``standard``, ``dreg``, ``vimco`` or ``score`` (see the module docstring). ``standard``
            and ``dreg`` need a reparameterisable guide; ``vimco`` needs K >= 2.
        **kwargs: :class:`~pyrovae.objectives.base.Objective`'s ``max_plate_nesting``, ``data_plate``,
            ``vectorize_particles``.
    """

    alpha = 0.0  # the Renyi order: IWAE is alpha = 0

    def __init__(self, num_particles: int = 5, estimator: str = "standard", **kwargs):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r} is not known; choose one of {list(ESTIMATORS)}")
        super().__init__(num_particles=num_particles, **kwargs)
        if estimator == "vimco" and num_particles < 2:
            raise ValueError(f"estimator='vimco' needs num_particles >= 2 (its baselines leave one sample out); got {num_particles}")
        self.estimator = estimator
        self._constant_globals = None  # the global sites already found not to depend on the latents

    def _bound(self, log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return _log_mean_exp(log_w, dim)

    def estimate(self, model, guide, args, kwargs, state):
        lw = self.log_weights(model, guide, *args, **kwargs)
        name = f"{type(self).__name__}(estimator={self.estimator!r})"
        no_global_latents(lw, name)
        if lw.global_sites and lw.global_sites != self._constant_globals:  # a host sync: once per program, not per step
            global_observations_are_constant(lw, name)
            self._constant_globals = lw.global_sites if lw.num_particles > 1 else None
        if self.estimator in ("standard", "dreg"):
            reparam_only(lw, name, "use estimator='vimco' (or 'score')")
        scale = self._data_scale(lw, name)
        # a subsampled (or scaled) datum counts `scale` times: scale * IWAE of its unscaled weights, not the IWAE
        # of scaled weights (a different, wrong quantity for K > 1)
        log_w = lw.log_w if scale == 1.0 else lw.log_w / scale
        bound = scale * self._bound(log_w) if scale != 1.0 else self._bound(log_w)
        metrics = self._record(lw, bound=bound.mean())
        # glob holds only observed sites outside the data plate here (e.g. a pyro.factor): not per datum, so
        # not inside the log-mean-exp, but part of log p(x) all the same
        loss = -(bound.sum() + lw.glob.mean())
        if not torch.is_grad_enabled() or self.estimator == "standard":
            return Estimate(loss, loss, metrics, state)
        if self.estimator == "dreg":
            return Estimate(loss, -(self._dreg_surrogate(model, guide, args, kwargs, lw) + lw.glob.mean()), metrics, state)
        signal = scale * self._vimco_signal(log_w, bound / scale) if self.estimator == "vimco" else bound.detach().expand_as(lw.score)
        return Estimate(loss, -(bound.sum() + (signal * lw.score).sum() + lw.glob.mean()), metrics, state)

    def _data_scale(self, lw: LogWeights, name: str) -> float:
        """The scale every site inside the data plate carries (1 unless subsampled or under poutine.scale)."""
        scale = lw.local_scale
        if scale is None:
            raise ValueError(
                f"{name}: the sites inside the data plate carry different scales (poutine.scale on some of them, or a "
                "tensor scale), so the importance weights are those of a re-weighted density and the bound bounds "
                "nothing; scale the whole program (e.g. a subsampled pyro.plate) or use ELBO / BetaELBO for a weighted KL"
            )
        if scale <= 0:
            raise ValueError(f"{name}: the sites inside the data plate carry scale {scale}; a per-datum bound needs a positive one")
        if scale != 1.0 and self.estimator == "dreg":
            raise ValueError(f"{name}: estimator='dreg' does not take a scaled (subsampled) program; use estimator='standard'")
        return scale

    def _vimco_signal(self, log_w: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        """``[K, B]``: L - L_{-k}, with L_{-k} the bound with log w_k replaced by the mean of the other K-1 log
        weights (VIMCO's leave-one-out baseline, Mnih & Rezende 2016, eq. 10: the geometric mean of the others'
        weights). It does not depend on z_k, so the estimate stays unbiased."""
        x = log_w.detach()
        k = x.shape[0]
        others = (x.sum(0, keepdim=True) - x) / (k - 1)
        eye = torch.eye(k, dtype=torch.bool, device=x.device)[:, :, None]
        replaced = torch.where(eye, others[:, None, :], x[None, :, :])  # [k, j, B]: row k with log w_k replaced
        return (bound.detach()[None] - self._bound(replaced, dim=1)).detach()

    def _dreg_surrogate(self, model, guide, args, kwargs, lw: LogWeights) -> torch.Tensor:
        """The doubly reparameterised surrogate. With v = softmax((1 - alpha) log w) over particles:
        sum_k (alpha v_k + (1 - alpha) v_k^2) d log w_k / dz dz/dphi for the guide (Tucker et al. 2019 for IWAE,
        alpha = 0: v_k^2), and sum_k v_k d log p / dtheta for the model.

        The guide's direct score term d log q_phi(z)/dphi is cancelled by adding log q_phi(z.detach()); the
        model's gradient weights are restored with log p_theta(x, z.detach()) (one extra model pass)."""
        a = 1.0 - self.alpha
        v = torch.softmax(a * lw.log_w.detach(), dim=0)
        c = (1.0 - a) * v + a * v.pow(2)
        lw_det = LogWeights.cat([self.rescore(model, guide, args, kwargs, pair.guide_trace, pair.num_particles) for pair in lw.pairs])
        path_log_w = lw.log_w + lw_det.log_qz
        log_p_det = lw_det.log_px + lw_det.log_pz
        return (c * path_log_w + (v - c) * log_p_det).sum()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_particles={self.num_particles}, estimator={self.estimator!r})"


@register_objective("renyi")
class Renyi(IWAE):
    """The Renyi-alpha bound per data point: alpha = 0 is IWAE, alpha -> 1 the ELBO; alpha < 0 gives an upper
    bound on log p(x) in the large-K limit.

    Args:
        alpha: the Renyi order (any real; alpha = 1 is taken as the ELBO limit).
        num_particles: K.
        estimator: as for :class:`IWAE`.
    """

    def __init__(self, alpha: float = 0.5, num_particles: int = 5, estimator: str = "standard", **kwargs):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha={alpha!r} must be a finite number")
        super().__init__(num_particles=num_particles, estimator=estimator, **kwargs)
        self.alpha = float(alpha)

    def _bound(self, log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if self.alpha == 1.0:
            return log_w.mean(dim)
        return _log_mean_exp((1.0 - self.alpha) * log_w, dim) / (1.0 - self.alpha)

    def __repr__(self) -> str:
        return f"Renyi(alpha={self.alpha}, num_particles={self.num_particles}, estimator={self.estimator!r})"
