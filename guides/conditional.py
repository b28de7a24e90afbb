"""q(z | x, c): the amortised guide of :class:`pyrovae.models.ConditionalVAE`, ``guide(target, context)``."""
from __future__ import annotations

import math
from typing import Sequence

import pyro
import torch
from torch import nn

from pyrovae.nn import Flatten, diag_normal, mlp
from pyrovae.utils.registry import register_guide


@register_guide("conditional", exclude=("activation_name",))
class ConditionalEncoder(nn.Module):
    """Diagonal-Gaussian q(z | x, c) from an MLP on the flattened target and context.

    Args:
        x_shape, context_shape: shapes of one target and one context.
        z_dim: latent size (the model's).
        hidden: hidden sizes of the MLP.
        activation_name: its nonlinearity.
    """

    def __init__(self, x_shape: Sequence[int] = (1, 28, 28), context_shape: Sequence[int] = (2, 28, 28), z_dim: int = 32,
                 hidden: Sequence[int] = (400, 400), activation_name: str = "relu"):
        super().__init__()
        self.x_shape, self.context_shape, self.z_dim = tuple(x_shape), tuple(context_shape), int(z_dim)
        self.flat_x, self.flat_c = Flatten(self.x_shape), Flatten(self.context_shape)
        self.net = mlp([math.prod(self.x_shape) + math.prod(self.context_shape), *hidden, 2 * self.z_dim], activation_name)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> None:
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", diag_normal(self.net(torch.cat([self.flat_x(x), self.flat_c(context)], -1))))
