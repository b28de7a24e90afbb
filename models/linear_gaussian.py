"""The linear-Gaussian latent variable model: every quantity a VAE objective estimates is known exactly.

    z ~ N(0, I_d),    x | z ~ N(W z + b, s^2 I_D)

    p(x)     = N(x; b, W W^T + s^2 I_D)
    p(z | x) = N(z; S W^T (x - b) / s^2, S),   S = (I_d + W^T W / s^2)^{-1}

(probabilistic PCA, Tipping & Bishop 1999). It is the reference case for testing estimators: with q equal
to the posterior every bound equals log p(x), and with a diagonal-Gaussian q the ELBO has a closed form.
"""
from __future__ import annotations

import math
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class LinearGaussian(nn.Module):
    """``z ~ N(0, I_d)``, ``x | z ~ N(W z + b, s^2 I_D)`` as a Pyro program ``model(x)``.

    Args:
        x_dim: D.
        z_dim: d.
        scale: the fixed observation noise s > 0.
        weight, bias: initial ``W`` ``[D, d]`` and ``b`` ``[D]`` (default: ``W`` with N(0, 1/d) entries, ``b = 0``).
        learnable: ``W`` and ``b`` are ``nn.Parameter`` s (registered with ``pyro.module``) if True, fixed
            buffers if False.
        dtype: dtype of the default ``W`` and ``b`` (given tensors keep theirs).
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        scale: float = 1.0,
        weight: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        learnable: bool = True,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if int(x_dim) < 1 or int(z_dim) < 1:
            raise ValueError(f"x_dim={x_dim!r} and z_dim={z_dim!r} must be positive sizes")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale={scale!r} must be a positive number (the observation noise s)")
        self.x_dim, self.z_dim, self.scale = int(x_dim), int(z_dim), float(scale)
        if weight is None:
            weight = torch.randn(self.x_dim, self.z_dim, dtype=dtype) / math.sqrt(self.z_dim)
        if bias is None:
            bias = torch.zeros(self.x_dim, dtype=weight.dtype)
        weight, bias = torch.as_tensor(weight).clone(), torch.as_tensor(bias).clone()
        if weight.shape != (self.x_dim, self.z_dim) or bias.shape != (self.x_dim,):
            raise ValueError(f"weight must be [{self.x_dim}, {self.z_dim}] and bias [{self.x_dim}]; got {tuple(weight.shape)} and {tuple(bias.shape)}")
        if learnable:
            self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> None:
        pyro.module("linear_gaussian", self)
        batch = x.shape[0]
        with pyro.plate("data", batch):
            z = pyro.sample("z", dist.Normal(x.new_zeros(batch, self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.weight.T + self.bias, self.scale).to_event(1), obs=x)

    def marginal(self) -> dist.MultivariateNormal:
        """p(x) = N(b, W W^T + s^2 I)."""
        cov = self.weight @ self.weight.T + self.scale**2 * torch.eye(self.x_dim, dtype=self.weight.dtype, device=self.weight.device)
        return dist.MultivariateNormal(self.bias, covariance_matrix=cov)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per data point, ``[B]``."""
        return self.marginal().log_prob(x)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact p(z | x) = N(mean, cov): ``mean`` ``[B, d]`` = S W^T (x - b) / s^2, ``cov`` ``[d, d]`` = S
        = (I + W^T W / s^2)^{-1} (the same for every x)."""
        s2 = self.scale**2
        eye = torch.eye(self.z_dim, dtype=self.weight.dtype, device=self.weight.device)
        cov = torch.cholesky_inverse(torch.linalg.cholesky(eye + self.weight.T @ self.weight / s2))
        mean = (x - self.bias) @ self.weight @ cov / s2  # S is symmetric
        return mean, cov

    def elbo(self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Exact ELBO per data point for q(z | x) = N(loc, diag(scale^2)), ``[B]``:

            E_q[log p(x | z)] - KL(q || N(0, I)),
            E_q[log p(x | z)] = -D/2 log(2 pi s^2) - (|x - W loc - b|^2 + sum_j scale_j^2 |W_:j|^2) / (2 s^2).
        """
        s2 = self.scale**2
        resid = x - loc @ self.weight.T - self.bias
        spread = (scale.pow(2) * self.weight.pow(2).sum(0)).sum(-1)
        expected_loglik = -0.5 * self.x_dim * math.log(2 * math.pi * s2) - (resid.pow(2).sum(-1) + spread) / (2 * s2)
        kl = 0.5 * (scale.pow(2) + loc.pow(2) - 1 - 2 * scale.log()).sum(-1)
        return expected_loglik - kl

    def sample(self, num: int) -> torch.Tensor:
        """``num`` draws of x from the model, ``[num, D]``."""
        with torch.no_grad():
            return self.marginal().sample((num,))


class ExactPosteriorGuide(nn.Module):
    """q(z | x) = p(z | x) of a :class:`LinearGaussian`: a full-covariance Gaussian at site ``z``.

    Args:
        model: the :class:`LinearGaussian` whose posterior to use.
        detach: hold q fixed at the current posterior (no gradient from the guide into the model's ``W``, ``b``),
            so that gradients of an objective w.r.t. the model are those at a fixed q.
    """

    def __init__(self, model: LinearGaussian, detach: bool = True):
        super().__init__()
        self.model, self.detach = model, bool(detach)

    def forward(self, x: torch.Tensor) -> None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach):
            mean, cov = self.model.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(cov)))


class LinearGaussianGuide(nn.Module):
    """Amortised diagonal Gaussian with a linear encoder: q(z | x) = N(A x + c, diag(exp(2 log_scale))).

    The log-scale is one learnable vector shared by all data points (the posterior covariance of a
    :class:`LinearGaussian` does not depend on x), so q can match the posterior's mean exactly but only the
    diagonal of a full covariance.

    Args:
        x_dim: D.
        z_dim: d.
        dtype: dtype of the parameters.
    """

    def __init__(self, x_dim: int, z_dim: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if int(x_dim) < 1 or int(z_dim) < 1:
            raise ValueError(f"x_dim={x_dim!r} and z_dim={z_dim!r} must be positive sizes")
        self.encoder = nn.Linear(int(x_dim), int(z_dim), dtype=dtype)
        self.log_scale = nn.Parameter(torch.zeros(int(z_dim), dtype=dtype))

    def loc_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q's mean ``[B, d]`` and standard deviation ``[d]``."""
        return self.encoder(x), self.log_scale.exp()

    def forward(self, x: torch.Tensor) -> None:
        pyro.module("linear_gaussian_guide", self)
        loc, scale = self.loc_scale(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale.expand_as(loc)).to_event(1))
