"""The evidence lower bound and its beta-weighted / annealed variants.

ELBO(x) = E_q[log p(x, z) - log q(z | x)]   (Kingma & Welling 2014)
beta-ELBO(x) = E_q[log p(x | z)] - beta_t KL(q(z | x) || p(z))   (Higgins et al. 2017; Bowman et al. 2016;
cyclical: Fu et al. 2019; logistic: Bowman et al. 2016)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask

from pyrovae.objectives.base import ELBO_COEFFICIENTS, Estimate, LogWeights, Objective, TracePair, score_function_term
from pyrovae.utils.registry import register_objective


def analytic_kl_sites(model_trace, guide_trace) -> tuple[str, ...]:
    """The latent sites whose KL(q || p) may be taken in closed form without bias: those whose prior's
    parameters can depend only on latents that the guide drew before them. Then, given everything the guide
    drew earlier, E_q[log q(z_s | .) - log p(z_s | .)] is exactly KL(q(z_s | .) || p(z_s | .)). The test is on
    order: every latent the model draws before z_s (its only possible parents) must come before z_s in the
    guide. A bottom-up guide of a top-down model (z1 then z2 in the guide, z2 then z1 in the model) fails it
    for z1, whose prior p(z1 | z2) depends on a z2 drawn from q(z2 | z1)."""
    guide_order = {n: i for i, (n, s) in enumerate(guide_trace.nodes.items()) if s["type"] == "sample" and not s["is_observed"]}
    latents = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"] and n in guide_order]
    return tuple(n for i, n in enumerate(latents) if all(guide_order[b] < guide_order[n] for b in latents[:i]))


def _analytic_kl_correction(pair: TracePair, sites: tuple) -> tuple[Optional[torch.Tensor], tuple]:
    """``[P', B]``: closed-form KL minus the Monte-Carlo term log q - log p, summed over the ``sites`` (inside
    the data plate) that torch has a closed form for (None where none has), and those sites."""
    total, used = None, []
    for name in sites:
        gsite, msite = pair.guide_trace.nodes[name], pair.model_trace.nodes[name]
        try:
            exact = kl_divergence(gsite["fn"], msite["fn"])
        except NotImplementedError:
            continue
        # the site's log-densities carry its scale and mask (poutine.scale, subsampling): the exact term must too
        exact = scale_and_mask(exact, gsite["scale"], gsite["mask"])
        local, _ = pair.reduce(gsite, exact - (gsite["log_prob"] - msite["log_prob"]))
        if local is not None:
            total = local if total is None else total + local
            used.append(name)
    return total, tuple(used)


def _analytic_kl(lw: LogWeights) -> tuple[torch.Tensor, tuple]:
    """Per-datum KL(q || p) summed over latent sites, closed form where it is exact (:func:`analytic_kl_sites`)
    and torch registers one, the Monte-Carlo term elsewhere; and the sites taken in closed form."""
    sites = analytic_kl_sites(lw.pairs[0].model_trace, lw.pairs[0].guide_trace)
    corrections = [_analytic_kl_correction(pair, sites) for pair in lw.pairs]
    if corrections[0][0] is None:
        return lw.kl, ()
    terms = [c for c, _ in corrections]
    return lw.kl + (terms[0] if len(terms) == 1 else torch.cat(terms)), corrections[0][1]


@register_objective("elbo")
class ELBO(Objective):
    """The standard bound, per datum averaged over particles.

    Reparameterised sites get pathwise gradients; non-reparameterisable guide sites (discrete latents) get a
    per-datum score-function term with a leave-one-out baseline over particles when ``num_particles > 1``.

    Args:
        num_particles: samples per datum.
        analytic_kl: take KL(q || p) in closed form for the sites where that is exact and torch has one
            (:func:`analytic_kl_sites`: not for a site whose prior depends on a latent the guide draws after
            it); the other sites keep the Monte-Carlo term. :attr:`analytic_sites` names the closed-form sites
            of the last evaluation.
        **kwargs: :class:`~pyrovae.objectives.base.Objective`'s ``max_plate_nesting``, ``data_plate``,
            ``vectorize_particles``.
    """

    needs_data_plate = False  # the bound summed over the batch is the same whichever plate is the data

    def __init__(self, num_particles: int = 1, analytic_kl: bool = False, **kwargs):
        super().__init__(num_particles=num_particles, **kwargs)
        self.analytic_kl = bool(analytic_kl)
        self.analytic_sites: tuple = ()

    def kl(self, lw: LogWeights) -> torch.Tensor:
        if not self.analytic_kl:
            return lw.kl
        kl, self.analytic_sites = _analytic_kl(lw)
        return kl

    def _bound_parts(self, model, guide, args, kwargs):
        lw = self.log_weights(model, guide, *args, **kwargs)
        return lw, lw.log_px, self.kl(lw)

    def _finish(self, lw, recon, kl, state: dict, beta=1.0, **extra) -> Estimate:
        log_w = recon - kl
        elbo = log_w.mean(0).sum() + lw.glob.mean()
        if isinstance(beta, float) and beta == 1.0:
            weighted, objective = log_w, elbo
        else:
            weighted = recon - beta * kl
            objective = weighted.mean(0).sum() + lw.glob.mean()
        metrics = self._record(lw, elbo=elbo / lw.batch_size, kl=kl.mean(), **extra)
        loss = -objective
        if not lw.nonreparam_sites:
            return Estimate(loss, loss, metrics, state)
        # the score-function signal of each site: recon - beta KL split over sites (global sites unweighted, as in
        # the objective), plus whatever closed-form KL replaced of the sampled one (per datum)
        coefficients = {**ELBO_COEFFICIENTS, "log_pz": beta, "log_qz": -beta}
        extra = None if kl is lw.kl else -beta * (kl - lw.kl)
        surrogate = -(objective + score_function_term(lw, coefficients, extra).mean(0))
        return Estimate(loss, surrogate, metrics, state)

    def estimate(self, model, guide, args, kwargs, state):
        return self._finish(*self._bound_parts(model, guide, args, kwargs), state)

    def __repr__(self) -> str:
        return f"ELBO(num_particles={self.num_particles}, analytic_kl={self.analytic_kl})"


SCHEDULES = ("constant", "linear", "cyclical", "logistic")


@register_objective("beta", flags={"schedule": "beta_schedule"}, choices={"schedule": SCHEDULES}, exclude=("ratio",))
class BetaELBO(ELBO):
    """E_q[log p(x|z)] - beta_t KL(q || p), with beta_t from a schedule advanced once per training step.

    Args:
        beta: the target weight of the KL term (beta-VAE: beta > 1; beta = 1 is the ELBO).
        schedule: ``constant`` (beta_t = beta), ``linear`` (warm-up from 0 to beta over ``warmup_steps``),
            ``logistic`` (Bowman et al. 2016: beta / (1 + exp(-10 (t - warmup_steps / 2) / warmup_steps)), from 0.7% to
            99.3% of beta over ``warmup_steps``),
            ``cyclical`` (Fu et al. 2019: cycles of ``cycle_steps``, rising linearly over the first
            ``ratio`` of each cycle, then held at beta).
        warmup_steps: steps of the ``linear`` and ``logistic`` warm-up.
        cycle_steps: steps per cycle of the ``cyclical`` schedule.
        ratio: the part of each ``cyclical`` cycle over which beta_t rises.
    The logged loss is -(recon - beta_t KL) (what is optimised); ``metrics['elbo']`` is the true ELBO.
    """

    def __init__(self, beta: float = 1.0, schedule: str = "constant", warmup_steps: int = 10000, cycle_steps: int = 10000, ratio: float = 0.5, num_particles: int = 1, analytic_kl: bool = False, **kwargs):
        super().__init__(num_particles=num_particles, analytic_kl=analytic_kl, **kwargs)
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta={beta!r} must be a finite number >= 0")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not known; choose one of {list(SCHEDULES)}")
        for name, value in (("warmup_steps", warmup_steps), ("cycle_steps", cycle_steps)):
            if int(value) < 1:
                raise ValueError(f"{name}={value!r} must be a positive number of steps")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio={ratio!r} must be in (0, 1]")
        self.beta, self.schedule = float(beta), schedule
        self.warmup_steps, self.cycle_steps, self.ratio = int(warmup_steps), int(cycle_steps), float(ratio)

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"num_steps": torch.zeros((), dtype=torch.int64)}

    def beta_at(self, num_steps: torch.Tensor) -> torch.Tensor:
        """beta_t at step ``num_steps`` (a tensor, so that a captured step computes it from its state input), in
        float64."""
        t = num_steps.to(torch.float64)
        if self.schedule == "linear":
            return self.beta * (t / self.warmup_steps).clamp(max=1.0)
        if self.schedule == "cyclical":
            phase = torch.remainder(t, self.cycle_steps) / self.cycle_steps
            return self.beta * (phase / self.ratio).clamp(max=1.0)
        if self.schedule == "logistic":
            return self.beta * torch.sigmoid(10.0 * (t - self.warmup_steps / 2) / self.warmup_steps)
        return torch.full_like(t, self.beta)

    @property
    def num_steps(self) -> int:
        return int(self.state["num_steps"])

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        self.state = {"num_steps": torch.tensor(int(value), dtype=torch.int64)}

    @property
    def beta_t(self) -> torch.Tensor:
        """The KL weight of the current step."""
        return self.beta_at(self.state["num_steps"]).float()

    @property
    def current_beta(self) -> float:
        return float(self.beta_at(self.state["num_steps"]))

    def estimate(self, model, guide, args, kwargs, state):
        lw, recon, kl = self._bound_parts(model, guide, args, kwargs)
        beta = self.beta_at(state["num_steps"]).to(recon)
        return self._finish(lw, recon, kl, {"num_steps": state["num_steps"] + 1}, beta=beta, beta_t=beta)

    def step(self, state=None) -> None:
        """Advance the schedule by one step (also without an evaluation since the last step)."""
        if state is None and self._next_state is None:
            self.num_steps += 1
        else:
            super().step(state)

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"num_steps"}:
            raise ValueError(f"{type(self).__name__} keeps state ['num_steps'], but the checkpoint holds {sorted(state)}")
        self.num_steps = int(state["num_steps"])

    def __repr__(self) -> str:
        return f"BetaELBO(beta={self.beta}, schedule={self.schedule!r}, num_particles={self.num_particles})"
