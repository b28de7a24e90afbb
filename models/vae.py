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

from pyrovae.nn.checks import IWAE_HIDDEN, check_layers, default_hidden  # noqa: F401  (IWAE_HIDDEN, default_hidden: their old home)
from pyrovae.nn.flows import build_flow, conditioned_distribution
from pyrovae.nn.layers import ARCHS
from pyrovae.nn.likelihoods import LIKELIHOODS, likelihood_head
from pyrovae.utils.registry import register_model
from pyrovae.nn import diag_normal, latent_names, mlp, x_decoder

#: flow families usable as a learned prior: invertible in closed form, and not volume-preserving rotations
PRIOR_FLOWS = ("realnvp", "iaf")


@register_model("vae", choices={"likelihood": LIKELIHOODS, "arch": ARCHS, "prior_flow": PRIOR_FLOWS})
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
        prior_flow: a learned flow prior on the top layer, p(z_L) = N(0, I) pushed through
            ``prior_flow_length`` layers of this family. The prior scores the guide's samples, which needs an
            analytic inverse: ``realnvp`` (fast both ways) or ``iaf`` (inverse sequential in z).
        prior_flow_length: number of prior flow layers (with ``prior_flow``).
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
        prior_flow: Optional[str] = None,
        prior_flow_length: int = 2,
    ):
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.z_dims, hidden = check_layers(z_dims, hidden)
        self.names = latent_names(len(self.z_dims))
        self.likelihood_name = likelihood
        self.likelihood, self.scale, factor = likelihood_head(likelihood, scale)
        self.decoder = x_decoder(self.z_dims[0], self.x_shape, hidden[0], arch, activation, factor)
        # p(z_l | z_{l+1}) for l < L: an MLP emitting loc and raw scale
        self.layers = nn.ModuleList(
            mlp([self.z_dims[l + 1], *hidden[l + 1], 2 * self.z_dims[l]], activation)
            for l in range(len(self.z_dims) - 1)
        )
        self.prior_flow = prior_flow
        if prior_flow is not None:
            if prior_flow not in PRIOR_FLOWS:
                raise ValueError(
                    f"prior_flow={prior_flow!r}: a flow prior must score the guide's samples (an analytic inverse) and "
                    f"change N(0, I) (Householder reflections are rotations, which leave it unchanged); choose one of {list(PRIOR_FLOWS)}"
                )
            # conditional flows read a constant context: with their hypernetworks' learned weights they are
            # an unconditional learned flow, built from the same registry as the guides' flows
            self.prior_flows = build_flow(prior_flow, self.z_dims[-1], 1, prior_flow_length)
            self.register_buffer("prior_context", torch.ones(1))

    def prior(self, zeros: torch.Tensor) -> dist.Distribution:
        """p(z_L): N(0, I), or N(0, I) pushed through the learned prior flow; ``zeros`` ``[batch, z_L dim]``
        sets the batch shape, device and dtype."""
        base = dist.Normal(zeros, 1.0).to_event(1)
        if self.prior_flow is None:
            return base
        return conditioned_distribution(base, self.prior_flows, self.prior_context.to(zeros))

    def decode(self, z1: torch.Tensor) -> dist.Distribution:
        """p(x | z_1) as a distribution over one data point per batch element."""
        return self.likelihood.build(self.decoder(z1), len(self.x_shape), self.scale)

    def forward(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self)
        batch, top = x.shape[0], self.z_dims[-1]
        with pyro.plate("data", batch):
            z = pyro.sample(self.names[-1], self.prior(x.new_zeros(batch, top)))
            for l in reversed(range(len(self.layers))):
                z = pyro.sample(self.names[l], diag_normal(self.layers[l](z)))
            pyro.sample("x", self.decode(z), obs=x)
