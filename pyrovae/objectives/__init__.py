"""Inference objectives: each subclasses ``pyro.infer.ELBO`` and works with ``pyro.infer.SVI``, the
trainer and the CLI (``--objective NAME``).

The log-weight engine that runs Pyro programs and reads their traces (:mod:`engine`), the objectives' base
(:mod:`base`), the ELBO family (:mod:`elbo`), importance-weighted bounds (:mod:`iwae`), variance losses
(:mod:`variance`), GECO (:mod:`geco`) and the objectives against posterior collapse for sequence models
(:mod:`sequence`)."""
from __future__ import annotations

from pyrovae.objectives.base import Estimate, LogWeights, Objective, log_weights_from_traces
from pyrovae.objectives.elbo import ELBO, BetaELBO
from pyrovae.objectives.geco import CLA, CONSTRAINTS, FRE, GECO, PNCC, RE, Constraint
from pyrovae.objectives.iwae import IWAE, Renyi
from pyrovae.objectives.sequence import AnnealedELBO, TokenGECO
from pyrovae.objectives.variance import LogVarianceLoss, VarianceLoss

from pyrovae.utils.registry import OBJECTIVES as _REGISTRY

#: objective name (``--objective NAME``, :func:`make_objective`) -> class: a live view of the objectives registered
#: with :func:`pyrovae.utils.registry.register_objective` (these modules' and any plugin's)
OBJECTIVES = _REGISTRY.classes()


def make_objective(name: str, **kwargs) -> Objective:
    """An objective by its CLI name, e.g. ``make_objective("iwae", num_particles=50)``."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} is not known; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


__all__ = [
    "Objective", "Estimate", "LogWeights", "log_weights_from_traces", "ELBO", "BetaELBO", "IWAE", "Renyi", "VarianceLoss",
    "LogVarianceLoss", "GECO", "Constraint", "RE", "FRE", "CLA", "PNCC", "CONSTRAINTS", "OBJECTIVES", "make_objective",
    "AnnealedELBO", "TokenGECO",
]
