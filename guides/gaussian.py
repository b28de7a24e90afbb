"""Amortised diagonal-Gaussian encoders q(z | x) matching :class:`pyrovae.models.VAE`.

For several stochastic layers the guide is bottom-up, as in Burda et al. (2016)::

    q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1}),   each N(mu(.), diag sigma(.)^2)
"""
from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.nn.checks import check_layers
from pyrovae.nn.layers import ARCHS
from pyrovae.utils.registry import register_guide
from pyrovae.nn import diag_normal, latent_names, mlp, x_encoder


@register_guide("gaussian", choices={"arch": ARCHS})
class GaussianEncoder(nn.Module):
    """Diagonal-Gaussian guide with an MLP or convolutional trunk.

    Args:
        x_shape: shape of one data point.
        z_dims: sizes of the stochastic layers, nearest to x first (must match the model).
        hidden: deterministic hidden sizes per stochastic layer (default: the IWAE paper's).
        arch: ``mlp`` or ``conv``.
        activation: nonlinearity of the MLPs.
    """

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 28, 28),
        z_dims: Sequence[int] = (50,),
        hidden: Optional[Sequence[Sequence[int]]] = None,
        arch: str = "mlp",
        activation: str = "tanh",
    ):
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.z_dims, hidden = check_layers(z_dims, hidden)
        self.names = latent_names(len(self.z_dims))
        self.trunk, h_dim = x_encoder(self.x_shape, hidden[0], arch, activation)
        self.heads = nn.ModuleList([nn.Linear(h_dim, 2 * self.z_dims[0])])
        for l in range(1, len(self.z_dims)):
            self.heads.append(mlp([self.z_dims[l - 1], *hidden[l], 2 * self.z_dims[l]], activation))

    def encode(self, h: torch.Tensor, layer: int) -> dist.Distribution:
        return diag_normal(self.heads[layer](h))

    def forward(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            h = self.trunk(x)
            for l, name in enumerate(self.names):
                h = pyro.sample(name, self.encode(h, l))
