"""Guides for :class:`pyrovae.models.bayesian.BayesVAE`: a mean-field Normal posterior over a model's
Bayesian weights (:class:`NormalWeights`) and an amortised Gaussian encoder with optional variational
dropout on its hidden activations (:class:`BayesEncoder`), as in the AEVB-extensions report."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyrovae.models.bayesian import BayesVAE, global_scale, register_weight_posterior
from pyrovae.nn import BayesianLinear, Flatten, VariationalDropoutLinear, activation, add_dropout_kl, diag_normal, dropout_mlp, mlp
from pyrovae.nn.poutine import local_reparameterization
from pyrovae.utils.registry import BAYES_GROUP, register_guide


class NormalWeights(nn.Module):
    """q(W) = prod N(loc, softplus(rho)^2) over every :class:`~pyrovae.nn.BayesianLinear` site of ``model``.

    Means start as ``nn.Linear``'s initialisation (uniform on +-1/sqrt(fan_in)), scales at ``init_scale``. In
    eval mode it draws nothing: the model then fixes the weights at these means (the posterior-mean network), which
    it reads from this module (registered with ``model``) or, for another copy of the model, from Pyro's parameter
    store under :data:`pyrovae.models.bayesian.POSTERIOR_MEAN_PARAM`.
    The local reparameterisation (:func:`pyrovae.nn.poutine.local_reparameterization`) recognises these Normals.
    """

    def __init__(self, model: nn.Module, init_scale: float = 1e-3):
        super().__init__()
        if not init_scale > 0:
            raise ValueError(f"init_scale={init_scale!r} must be positive")
        self.sites: list[tuple[str, str]] = []  # (site name, parameter key)
        self.locs, self.rhos = nn.ParameterDict(), nn.ParameterDict()
        rho = math.log(math.expm1(init_scale))
        for m in model.modules():
            if not isinstance(m, BayesianLinear):
                continue
            bound = 1 / math.sqrt(m.in_features)
            shapes = [("weight", (m.out_features, m.in_features))] + ([("bias", (m.out_features,))] if m.bias is not None else [])
            for what, shape in shapes:
                name = f"{m._pyro_name}.{what}" if m._pyro_name else what
                key = name.replace(".", "__")
                self.locs[key] = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
                self.rhos[key] = nn.Parameter(torch.full(shape, rho))
                self.sites.append((name, key))
        if not self.sites:
            raise ValueError(f"{type(model).__name__} has no BayesianLinear layers, so there are no weights to infer")
        register_weight_posterior(model, self)

    def means(self) -> dict[str, torch.Tensor]:
        """{weight site: posterior mean}."""
        return {name: self.locs[key] for name, key in self.sites}

    def forward(self, scale: float = 1.0) -> None:
        if not self.training:  # eval mode: the model reads the means itself (models.bayesian.posterior_means)
            return
        with poutine.scale(scale=scale):
            for name, key in self.sites:
                loc = self.locs[key]
                pyro.sample(name, dist.Normal(loc, nn.functional.softplus(self.rhos[key])).to_event(loc.dim()))


@register_guide("bayes_gaussian", group=BAYES_GROUP, flags={"activation_name": "activation"}, choices={"encoder_dropout": ("A", "B")}, exclude=("init_scale",),
                model_copy_if="bayesian_decoder")  # model: a copy of the run's model, for the names and shapes of its weight sites
class BayesEncoder(nn.Module):
    """Amortised diagonal-Gaussian q(z | x) (MLP), optionally with variational Gaussian dropout on all its hidden
    activations (``encoder_dropout``: ``A`` or ``B``, :class:`pyrovae.nn.VariationalDropoutLinear` for every layer
    after the first, the head included), and the
    weight posterior of a Bayesian-decoder model (``model``), drawn first.

    The dropout layers' KL enters the ELBO from the guide, as a guide-only site whose log-density is +KL
    (subtracted with log q), weighted ``batch / num_data`` like the model's global terms.

    ``local_reparam`` (default: ``model.local_reparam``): the weight posterior draws under
    :func:`pyrovae.nn.poutine.local_reparameterization` (shared records), so that a model with ``local_reparam=True``
    draws its pre-activations per example from these Normals.

    Args:
        x_shape, z_dim, hidden: the data's shape, the latent size and the MLP's hidden sizes.
        activation_name: nonlinearity of the MLP.
        encoder_dropout: variational Gaussian dropout on the encoder's hidden activations, ``A`` or ``B`` (KSW15).
        model: the Bayesian-decoder model whose weight posterior this guide holds (its sites' names and shapes).
        num_data: training-set size, which scales the dropout KL by ``batch / num_data``.
        init_scale: initial posterior standard deviation of the weights.
        local_reparam: draw the weights under the local reparameterisation (default: the model's).
    """

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 28, 28),
        z_dim: int = 50,
        hidden: Sequence[int] = (200, 200),
        activation_name: str = "tanh",
        encoder_dropout: Optional[str] = None,
        model: Optional[BayesVAE] = None,
        num_data: Optional[int] = None,
        init_scale: float = 1e-3,
        local_reparam: Optional[bool] = None,
    ):
        super().__init__()
        if encoder_dropout not in (None, "A", "B"):
            raise ValueError(f"encoder_dropout={encoder_dropout!r}: choose None, 'A' (noise on activations) or 'B' (noise per weight)")
        if not hidden:
            raise ValueError("hidden must name at least one hidden layer, e.g. (200, 200)")
        self.x_shape, self.z_dim, self.names = tuple(x_shape), int(z_dim), ["z"]
        self.num_data = None if num_data is None else int(num_data)
        self.encoder_dropout = encoder_dropout
        sizes = [math.prod(self.x_shape), *hidden]
        body = dropout_mlp(sizes, activation_name, variant=encoder_dropout) if encoder_dropout else mlp(sizes, activation_name)
        self.trunk = nn.Sequential(Flatten(self.x_shape), body, activation(activation_name))
        # with dropout, the head too sees noisy activations: every hidden activation of the encoder is dropped
        self.head = VariationalDropoutLinear(sizes[-1], 2 * self.z_dim, variant=encoder_dropout) if encoder_dropout else nn.Linear(sizes[-1], 2 * self.z_dim)
        self.weights = NormalWeights(model, init_scale) if model is not None and getattr(model, "bayesian_decoder", False) else None
        self.local_reparam = bool(getattr(model, "local_reparam", False) if local_reparam is None else local_reparam)
        if self.local_reparam and self.weights is None:
            raise ValueError("local_reparam=True needs the weight posterior of a Bayesian decoder: pass model=BayesVAE(..., bayesian_decoder=True)")

    def forward(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self)
        batch = x.shape[0]
        scale = global_scale(batch, self.num_data)
        if self.weights is not None:
            if self.local_reparam:
                with local_reparameterization(shared=True):
                    self.weights(scale)
            else:
                self.weights(scale)
        if self.encoder_dropout is not None and self.training:
            with poutine.scale(scale=scale):
                add_dropout_kl("encoder.dropout_kl", self, in_guide=True)
        with pyro.plate("data", batch):
            pyro.sample("z", diag_normal(self.head(self.trunk(x))))
