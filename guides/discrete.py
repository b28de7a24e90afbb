"""Amortised mean-field Bernoulli encoder q(z | x) = prod_k Bernoulli(z_k; sigmoid(f_k(x))) matching
:class:`pyrovae.models.DiscreteVAE`.

The site ``z`` is not reparameterisable: objectives get its gradient from the score function (``ELBO``) or
from log-densities at detached samples (``VarianceLoss``, ``LogVarianceLoss``).
"""
from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.nn.checks import check_z_dim
from pyrovae.nn.layers import ARCHS
from pyrovae.utils.registry import register_guide
from pyrovae.nn import x_encoder


@register_guide("bernoulli", choices={"arch": ARCHS})
class BernoulliEncoder(nn.Module):
    """Independent Bernoulli logits from an MLP (or convolutional) trunk.

    Args:
        x_shape: shape of one data point.
        z_dim: K, the number of binary latent units (must match the model).
        hidden: hidden sizes of the trunk (nearest x first).
        arch: ``mlp`` or ``conv``.
        activation: nonlinearity of the MLP.
    """

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 28, 28),
        z_dim: int = 32,
        hidden: Sequence[int] = (200, 200),
        arch: str = "mlp",
        activation: str = "tanh",
    ):
        super().__init__()
        self.x_shape, self.z_dim = tuple(x_shape), check_z_dim(z_dim)
        self.trunk, h_dim = x_encoder(self.x_shape, tuple(hidden), arch, activation)
        self.head = nn.Linear(h_dim, self.z_dim)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(z_k = 1 | x), ``[B, K]``."""
        return self.head(self.trunk(x))

    def forward(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=self.logits(x)).to_event(1))
