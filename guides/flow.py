"""Amortised normalizing-flow encoder q(z | x) matching a one-layer :class:`pyrovae.models.VAE`.

    z_0 ~ N(mu(h), diag sigma(h)^2),  z = f_K(... f_1(z_0; c) ...; c),  h = trunk(x),  c = context(h)

Sampled and scored as one site ``z`` (a ``TransformedDistribution``), so every objective sees an ordinary
latent site. References: Rezende & Mohamed (2015) for amortised flows; the families are listed in
:data:`pyrovae.nn.flows.FLOWS`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.nn.flows import FLOWS, build_flow, conditioned_distribution
from pyrovae.nn.layers import ARCHS
from pyrovae.utils.registry import register_guide
from pyrovae.nn import activation as make_activation
from pyrovae.nn import diag_normal, x_encoder


@register_guide("flow", flags={"num_flows": "flow_length"}, choices={"flow": lambda: sorted(FLOWS), "arch": ARCHS}, exclude=("context_dim", "flow_hidden"))
class FlowEncoder(nn.Module):
    """Diagonal Gaussian pushed through ``num_flows`` amortised flow layers.

    Args:
        x_shape: shape of one data point.
        z_dim: size of z (the model's ``z_dims=(z_dim,)``).
        hidden: hidden sizes of the x-trunk.
        flow: a family of :data:`pyrovae.nn.flows.FLOWS` (``planar``, ``radial``, ``iaf``, ``realnvp``,
            ``householder``, ``sylvester``).
        num_flows: number of flow layers.
        arch: ``mlp`` or ``conv`` trunk.
        activation: nonlinearity of the trunk.
        context_dim: size of the flows' context; ``None`` uses the trunk features h directly, otherwise
            a linear layer (plus ``activation``) maps h to a context of this size.
        flow_hidden: hidden sizes of each flow layer's hypernetwork (default: see :func:`pyrovae.nn.flows.build_flow`).
    """

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 28, 28),
        z_dim: int = 50,
        hidden: Sequence[int] = (200, 200),
        flow: str = "planar",
        num_flows: int = 10,
        arch: str = "mlp",
        activation: str = "tanh",
        context_dim: Optional[int] = None,
        flow_hidden: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if not isinstance(z_dim, int) or z_dim < 1:
            raise ValueError(f"z_dim={z_dim!r} must be a positive integer, e.g. 50")
        if context_dim is not None and (not isinstance(context_dim, int) or context_dim < 1):
            raise ValueError(f"context_dim={context_dim!r} must be a positive integer, or None to use the trunk features")
        self.x_shape = tuple(x_shape)
        self.z_dim = z_dim
        self.flow_name = flow
        self.trunk, h_dim = x_encoder(self.x_shape, tuple(hidden), arch, activation)
        self.head = nn.Linear(h_dim, 2 * z_dim)
        if context_dim is None:
            self.context, context_dim = nn.Identity(), h_dim
        else:
            self.context = nn.Sequential(nn.Linear(h_dim, context_dim), make_activation(activation))
        self.flows = build_flow(flow, z_dim, context_dim, num_flows, flow_hidden)

    def distribution(self, x: torch.Tensor) -> dist.TransformedDistribution:
        """q(z | x) for a batch ``x`` of shape ``[batch, *x_shape]``; batch shape ``[batch]``."""
        h = self.trunk(x)
        base = diag_normal(self.head(h))
        return conditioned_distribution(base, self.flows, self.context(h))

    def forward(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.distribution(x))
