"""Conditional generative models ``model(target, context)`` for the GECO paper's conditional tasks
(Rezende & Viola 2018, Section 5; data: :mod:`pyrovae.data.derived`'s ``mnist-sum``, ``mnist-rotate``, ...)::

    z | c ~ p(z | c) = N(mu(h(c)), diag sigma(h(c))^2)        a learned conditional prior
    x | z, c ~ Bernoulli / Gaussian (decoder([z, h(c)]))       h: an MLP on the flattened context image

The guide (:class:`pyrovae.guides.ConditionalEncoder`) is q(z | x, c). Objectives see the sites ``z`` and ``x``
as for any VAE, so ELBO, IWAE and GECO train it unchanged; GECO's KL is KL(q(z | x, c) || p(z | c)).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import pyro
import torch
from torch import nn

from pyrovae.nn.likelihoods import LIKELIHOODS, likelihood_head
from pyrovae.utils.registry import MODELS, register_model
from pyrovae.models.draw import ConvDRAW
from pyrovae.nn import Flatten, activation, diag_normal, mlp, x_decoder


@register_model("cvae", guide="conditional", choices={"likelihood": LIKELIHOODS}, exclude=("activation_name",))
class ConditionalVAE(nn.Module):
    """A conditional VAE with a learned prior p(z | c) and decoder p(x | z, c).

    Args:
        x_shape: shape of one target, e.g. ``(1, 28, 28)``.
        context_shape: shape of one context, e.g. ``(2, 28, 28)`` for ``mnist-sum``.
        z_dim: latent size.
        hidden: hidden sizes of the decoder, the prior and the context network.
        likelihood: ``bernoulli``, ``gaussian`` or ``continuous_bernoulli``.
        scale: fixed Gaussian scale (None: learned per pixel).
        activation: nonlinearity of the MLPs.
    """

    guide_name = None

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 28, 28),
        context_shape: Sequence[int] = (2, 28, 28),
        z_dim: int = 32,
        hidden: Sequence[int] = (400, 400),
        likelihood: str = "bernoulli",
        scale: Optional[float] = None,
        activation_name: str = "relu",
    ):
        super().__init__()
        if int(z_dim) < 1 or not hidden:
            raise ValueError(f"z_dim={z_dim!r} must be >= 1 and hidden={hidden!r} non-empty, e.g. z_dim=32, hidden=(400, 400)")
        self.x_shape, self.context_shape, self.z_dim = tuple(x_shape), tuple(context_shape), int(z_dim)
        hidden = tuple(int(h) for h in hidden)
        self.likelihood_name = likelihood
        self.likelihood, self.scale, factor = likelihood_head(likelihood, scale)
        self.context_net = nn.Sequential(Flatten(self.context_shape), mlp([math.prod(self.context_shape), *hidden], activation_name), activation(activation_name))
        self.prior_net = mlp([hidden[-1], hidden[-1], 2 * self.z_dim], activation_name)
        self.decoder = x_decoder(self.z_dim + hidden[-1], self.x_shape, hidden, "mlp", activation_name, factor)

    def prior(self, h: torch.Tensor):
        """p(z | c) from context features ``h``."""
        return diag_normal(self.prior_net(h))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> None:
        pyro.module("decoder", self)
        if tuple(context.shape[1:]) != self.context_shape:
            raise ValueError(f"context of shape {tuple(context.shape)} does not fit context_shape={self.context_shape}; build the model for this data set's context")
        h = self.context_net(context)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(h))
            hz = torch.cat([z, h.expand(*z.shape[:-1], h.shape[-1])], -1)
            pyro.sample("x", self.likelihood.build(self.decoder(hz), len(self.x_shape), self.scale), obs=x)


@MODELS.register_variant("convdraw", with_context=True)  # --model convdraw on a conditional data set
class ConditionalConvDRAW(ConvDRAW):
    """:class:`pyrovae.models.ConvDRAW` with a context (``context_shape`` required)."""
