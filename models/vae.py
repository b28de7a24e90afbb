"""The amortised VAE of Kingma & Welling (2014) and the multi-layer VAE of Burda et al. (2016).

Generative model, top layer first (one layer: just ``z``)::

    z_L ~ N(0, I)
    z_l | z_{l+1} ~ N(mu_l(z_{l+1}), sigma_l(z_{l+1}))      l = L-1 .. 1
    x | z_1 ~ Bernoulli / Gaussian / ContinuousBernoulli (decoder(z_1))
"""
from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.likelihoods import get_likelihood
from pyrovae.nn import diag_normal, latent_names, mlp, x_decoder

#: Deterministic hidden sizes of the IWAE paper: 200-200 next to x, 100-100 between stochastic layers.
IWAE_HIDDEN = ((200, 200), (100, 100))


def default_hidden(num_layers: int) -> tuple[tuple[int, ...], ...]:
    return tuple(IWAE_HIDDEN[min(i, 1)] for i in range(num_layers))


def check_layers(z_dims: Sequence[int], hidden: Optional[Sequence[Sequence[int]]]) -> tuple:
    z_dims = tuple(int(d) for d in z_dims)
    if not z_dims or any(d < 1 for d in z_dims):
        raise ValueError(f"z_dims={z_dims} must be a non-empty sequence of positive sizes, e.g. (50,) or (100, 50)")
    hidden = default_hidden(len(z_dims)) if hidden is None else tuple(tuple(h) for h in hidden)
    if len(hidden) != len(z_dims):
        raise ValueError(f"hidden has {len(hidden)} entries but z_dims has {len(z_dims)}: give one hidden-size tuple per stochastic layer")
    return z_dims, hidden


class VAE(nn.Module):
    """Deep latent Gaussian model with an MLP or deconvolutional decoder.

    Args:
        x_shape: shape of one data point, e.g. ``(1, 28, 28)`` or ``(784,)``.
        z_dims: sizes of the stochastic layers, nearest to x first: ``(50,)`` or ``(100, 50)``.
        hidden: deterministic hidden sizes per stochastic layer (default: the IWAE paper's).
        likelihood: ``bernoulli``, ``gaussian`` or ``continuous_bernoulli``.
        scale: fixed observation scale for ``gaussian``; ``None`` learns a per-pixel scale.
        arch: ``mlp`` or ``conv`` (deconvolutional decoder for 28x28 / 32x32 / 64x64 images).
        activation: nonlinearity of the MLPs (the IWAE paper uses ``tanh``).
    """

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 28, 28),
        z_dims: Sequence[int] = (50,),
        hidden: Optional[Sequence[Sequence[int]]] = None,
        likelihood: str = "bernoulli",
        scale: Optional[float] = None,
        arch: str = "mlp",
        activation: str = "tanh",
    ):
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.z_dims, hidden = check_layers(z_dims, hidden)
        self.names = latent_names(len(self.z_dims))
        self.likelihood_name = likelihood
        self.likelihood = get_likelihood(likelihood)
        if scale is not None and float(scale) <= 0:
            raise ValueError(f"scale={scale} must be positive, or None to learn it")
        self.scale = None if scale is None else float(scale)
        factor = 2 if (likelihood == "gaussian" and scale is None) else 1
        self.decoder = x_decoder(self.z_dims[0], self.x_shape, hidden[0], arch, activation, factor)
        # p(z_l | z_{l+1}) for l < L: an MLP emitting loc and raw scale
        self.layers = nn.ModuleList(
            mlp([self.z_dims[l + 1], *hidden[l + 1], 2 * self.z_dims[l]], activation)
            for l in range(len(self.z_dims) - 1)
        )

    def decode(self, z1: torch.Tensor) -> dist.Distribution:
        """p(x | z_1) as a distribution over one data point per batch element."""
        return self.likelihood.build(self.decoder(z1), len(self.x_shape), self.scale)

    def forward(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self)
        batch = x.shape[0]
        top = self.z_dims[-1]
        with pyro.plate("data", batch):
            z = pyro.sample(self.names[-1], dist.Normal(x.new_zeros(batch, top), 1.0).to_event(1))
            for l in reversed(range(len(self.layers))):
                z = pyro.sample(self.names[l], diag_normal(self.layers[l](z)))
            pyro.sample("x", self.decode(z), obs=x)
