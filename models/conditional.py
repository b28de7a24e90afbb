"""Conditional generative models ``model(target, context)`` for the GECO paper's conditional tasks
(Rezende & Viola 2018, Section 5; data: :mod:`pyrovae.derived_data`'s ``mnist-sum``, ``mnist-rotate``, ...)::

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

from pyrovae.likelihoods import likelihood_head
from pyrovae.models.draw import ConvDRAW
from pyrovae.nn import Flatten, activation, diag_normal, mlp, x_decoder


class ConditionalRunHooks:
    """``pyrovae evaluate`` hook of a model ``model(x, context)``: test NLL, ELBO terms and conditional samples."""

    def evaluate_run(self, guide, splits, test, run_dir, num_samples: int, suffix: str = "") -> dict:
        from pyrovae import evaluate as E

        ll = E.log_likelihood(self, guide, test, num_samples=num_samples)
        terms = E.elbo_terms(self, guide, test)
        n = test.shape[0]
        contexts = test.context[:8]
        rows = []
        for i in range(contexts.shape[0]):
            ctx = contexts[i : i + 1].expand(8, *contexts.shape[1:])
            samples = E.sample(self, 8, splits.x_shape, device=ctx.device, inputs=(ctx,))
            shown = torch.cat([contexts[i].unsqueeze(1), test.target[i : i + 1]], 0)  # context channels, the true target
            rows.append(torch.cat([_grey(shown, splits.x_shape), _grey(samples, splits.x_shape)], 0))
        E.save_image_grid(torch.cat(rows), Path(run_dir) / f"samples{suffix}.png", nrow=rows[0].shape[0])
        return {
            "num_test": n, "num_samples": num_samples, "test_nll": float(-ll.values.mean()),
            "test_nll_stderr_over_data": float(ll.values.std() / math.sqrt(n)) if n > 1 else float("nan"),
            "test_nll_importance_stderr": float(ll.stderr.pow(2).mean().sqrt() / math.sqrt(n)),
            "test_elbo": terms["elbo"], "test_recon": terms["recon"], "test_kl": terms["kl"],
            "outputs": [f"samples{suffix}.png (per row: the context's channels, the true target, 8 samples of p(x | context))"],
        }


def _grey(images: torch.Tensor, x_shape) -> torch.Tensor:
    """One-channel images of the target's height and width (the context channels are shown one by one)."""
    images = images.reshape(-1, *images.shape[-3:])
    return images[:, :1].expand(-1, 1, *x_shape[1:]) if images.shape[1] != 1 else images


class ConditionalVAE(ConditionalRunHooks, nn.Module):
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


class ConditionalConvDRAW(ConditionalRunHooks, ConvDRAW):
    """:class:`pyrovae.models.ConvDRAW` with a context (``context_shape`` required) and the conditional run hooks."""
