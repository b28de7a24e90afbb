"""Inference objectives: each subclasses ``pyro.infer.ELBO`` and works with ``pyro.infer.SVI``, the
trainer and the CLI (``--objective NAME``)."""
from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping

from pyrovae.objectives.base import Estimate, LogWeights, Objective, log_weights_from_traces
from pyrovae.objectives.elbo import ELBO, BetaELBO
from pyrovae.objectives.geco import CLA, CONSTRAINTS, FRE, GECO, PNCC, RE, Constraint
from pyrovae.objectives.iwae import IWAE, Renyi
from pyrovae.objectives.variance import LogVarianceLoss, VarianceLoss

class ObjectiveRegistry(MutableMapping):
    """Objective name -> class: the one list of objectives, which the CLI (:mod:`pyrovae.registry`) reads. A class
    given as ``"module:Class"`` is imported on first use (:mod:`pyrovae.sequence_objectives` imports this package)."""

    def __init__(self, entries: dict):
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> type:
        cls = self._entries[name]
        if isinstance(cls, str):
            module, attr = cls.split(":")
            cls = self._entries[name] = getattr(importlib.import_module(module), attr)
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __setitem__(self, name: str, cls) -> None:
        self._entries[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __repr__(self) -> str:
        return f"ObjectiveRegistry({list(self._entries)})"


#: objective name (``--objective NAME``, :func:`make_objective`) -> class
OBJECTIVES = ObjectiveRegistry({
    "elbo": ELBO,
    "iwae": IWAE,
    "renyi": Renyi,
    "variance": VarianceLoss,
    "logvariance": LogVarianceLoss,
    "beta": BetaELBO,
    "geco": GECO,
    "annealed": "pyrovae.sequence_objectives:AnnealedELBO",
    "token-geco": "pyrovae.sequence_objectives:TokenGECO",
})


def make_objective(name: str, **kwargs) -> Objective:
    """An objective by its CLI name, e.g. ``make_objective("iwae", num_particles=50)``."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} is not known; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


__all__ = [
    "Objective", "Estimate", "LogWeights", "log_weights_from_traces", "ELBO", "BetaELBO", "IWAE", "Renyi", "VarianceLoss",
    "LogVarianceLoss", "GECO", "Constraint", "RE", "FRE", "CLA", "PNCC", "CONSTRAINTS", "OBJECTIVES", "ObjectiveRegistry", "make_objective",
]
