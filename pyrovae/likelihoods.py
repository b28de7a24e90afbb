"""Observation models p(x | decoder output) used by the library's decoders.

Each entry maps a decoder output (shape ``[*batch, k * C, H, W]`` or ``[*batch, k * D]`` where ``k`` is
``LIKELIHOODS[name].num_params``) to a Pyro distribution whose event covers one data point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import pyro.distributions as dist
from torch.nn.functional import softplus


@dataclass(frozen=True)
class Likelihood:
    num_params: int
    build: Callable[[torch.Tensor, int, Optional[torch.Tensor]], dist.TorchDistribution]
    needs_unit_interval: bool  # data must lie in [0, 1]


def _bernoulli(out, event_dim, scale):
    # validate_args=False: grey-level data in [0, 1] is the usual (cross-entropy) use; the range is checked
    # once on the data by pyrovae.data.check_data rather than on every step.
    return dist.Bernoulli(logits=out, validate_args=False).to_event(event_dim)


def _continuous_bernoulli(out, event_dim, scale):
    return dist.ContinuousBernoulli(logits=out, validate_args=False).to_event(event_dim)


def _gaussian(out, event_dim, scale):
    if scale is None:  # learned per-pixel scale: the decoder emits mean and raw scale
        loc, raw = out.chunk(2, dim=-event_dim)
        return dist.Normal(loc, softplus(raw) + 1e-3).to_event(event_dim)
    return dist.Normal(out, scale).to_event(event_dim)


LIKELIHOODS: dict[str, Likelihood] = {
    "bernoulli": Likelihood(1, _bernoulli, True),
    "continuous_bernoulli": Likelihood(1, _continuous_bernoulli, True),
    "gaussian": Likelihood(1, _gaussian, False),
}


def get_likelihood(name: str) -> Likelihood:
    if name not in LIKELIHOODS:
        raise ValueError(f"likelihood={name!r} is not known; choose one of {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[name]
