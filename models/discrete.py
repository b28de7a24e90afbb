"""A VAE with binary latent codes (in the spirit of the discrete VAEs of Mnih & Gregor 2014, NVIL).

Generative model::

    z_k ~ Bernoulli(sigmoid(a_k)),  k = 1..K      (a = 0: the uniform prior; or learned logits a)
    x | z ~ Bernoulli(decoder(z))                  (or another likelihood of :mod:`pyrovae.nn.likelihoods`)

z cannot be reparameterised, so train it with objectives that need no pathwise gradient: ``ELBO``
(score-function gradient with a leave-one-out baseline) or ``LogVarianceLoss`` (the variance loss for the
guide, the ELBO gradient for the model); ``IWAE`` raises ``ValueError``. ``VarianceLoss`` fits the guide to
the model's posterior, but on its own it does not fit the model: Var_q[log p(x, z) - log q(z | x)] =
Var_q[log p(z | x) - log q(z | x)] does not depend on log p(x), and a decoder that ignores z (q = prior = posterior)
makes it zero. For small K, log p(x) and the exact posterior p(z | x) follow by enumerating the
2^K codes (:meth:`DiscreteVAE.log_joint_table`), which makes the model a reference case for estimators.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn
from torch.distributions import constraints

from pyrovae.nn.checks import check_z_dim
from pyrovae.nn.layers import ARCHS
from pyrovae.nn.likelihoods import LIKELIHOODS, likelihood_head
from pyrovae.utils.registry import register_model
from pyrovae.nn import x_decoder

PRIORS = ("uniform", "learned")
#: largest K for which :meth:`DiscreteVAE.log_joint_table` enumerates the 2^K codes
MAX_ENUMERATE = 20


def binary_codes(z_dim: int, dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
    """All 2^K codes as a ``[2^K, K]`` float tensor; row c holds the bits of c, least significant first."""
    z_dim = check_z_dim(z_dim)
    if z_dim > MAX_ENUMERATE:
        raise ValueError(f"z_dim={z_dim} has 2^{z_dim} codes, too many to enumerate (at most 2^{MAX_ENUMERATE}); use a Monte-Carlo estimate (pyrovae.evaluate.log_likelihood)")
    index = torch.arange(2**z_dim, device=device)
    bits = torch.arange(z_dim, device=device)
    return ((index[:, None] >> bits) & 1).to(dtype or torch.get_default_dtype())


@register_model("discrete", guide="bernoulli", choices={"likelihood": LIKELIHOODS, "arch": ARCHS}, exclude=("prior",))
class DiscreteVAE(nn.Module):
    """VAE with K independent Bernoulli latent units and an MLP (or deconvolutional) decoder.

    Args:
        x_shape: shape of one data point, e.g. ``(1, 28, 28)``.
        z_dim: K, the number of binary latent units.
        hidden: hidden sizes of the decoder MLP (nearest z first).
        prior: ``uniform`` (Bernoulli(0.5) per unit) or ``learned`` (one learned logit per unit).
        likelihood: ``bernoulli``, ``continuous_bernoulli`` or ``gaussian``.
        scale: fixed observation scale for ``gaussian``; ``None`` learns a per-pixel scale.
        arch: ``mlp`` or ``conv``.
        activation: nonlinearity of the decoder.
    """

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 28, 28),
        z_dim: int = 32,
        hidden: Sequence[int] = (200, 200),
        prior: str = "uniform",
        likelihood: str = "bernoulli",
        scale: Optional[float] = None,
        arch: str = "mlp",
        activation: str = "tanh",
    ):
        super().__init__()
        self.x_shape, self.z_dim = tuple(x_shape), check_z_dim(z_dim)
        if prior not in PRIORS:
            raise ValueError(f"prior={prior!r} is not known; choose 'uniform' (Bernoulli(0.5)) or 'learned' (learned logits)")
        self.prior_name = prior
        logits = torch.zeros(self.z_dim)
        if prior == "learned":
            self.prior_logits = nn.Parameter(logits)
        else:
            self.register_buffer("prior_logits", logits)
        self.likelihood_name = likelihood
        self.likelihood, self.scale, factor = likelihood_head(likelihood, scale)
        self.decoder = x_decoder(self.z_dim, self.x_shape, tuple(hidden), arch, activation, factor)

    def prior(self, batch_shape: Sequence[int] = ()) -> dist.Distribution:
        """p(z) with the given batch shape (event: the K units)."""
        return dist.Bernoulli(logits=self.prior_logits.expand(*batch_shape, self.z_dim)).to_event(1)

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z) as a distribution over one data point per batch element of ``z``."""
        return self.likelihood.build(self.decoder(z), len(self.x_shape), self.scale)

    def forward(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self)
        batch = x.shape[0]
        with pyro.plate("data", batch):
            z = pyro.sample("z", self.prior((batch,)))
            pyro.sample("x", self.decode(z), obs=x)

    def log_joint_table(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x, z) for every code z: returns the codes ``[2^K, K]`` (see :func:`binary_codes`) and ``[B, 2^K]``.

        Exact, so only for small K (at most ``MAX_ENUMERATE``); differentiable in the model's parameters."""
        codes = binary_codes(self.z_dim, self.prior_logits.dtype, self.prior_logits.device)
        log_pz = self.prior().log_prob(codes)  # [C]
        log_px = self.decode(codes[:, None, :]).log_prob(x)  # [C, B]
        return codes, (log_pz[:, None] + log_px).T

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) = log sum_z p(x, z) per data point, ``[B]``."""
        return torch.logsumexp(self.log_joint_table(x)[1], dim=-1)

    def posterior_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(z | x) for every code, ``[B, 2^K]`` (the rows are normalised)."""
        table = self.log_joint_table(x)[1]
        return table - torch.logsumexp(table, dim=-1, keepdim=True)


class BinaryCodeCategorical(TorchDistribution):
    """Any distribution over {0,1}^K, given by logits over the 2^K codes (ordered as :func:`binary_codes`).

    Args:
        logits: ``[*batch, 2^K]`` unnormalised log-probabilities of the codes.
    """

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.independent(constraints.boolean, 1)
    has_rsample = False

    def __init__(self, logits: torch.Tensor, validate_args: Optional[bool] = None):
        num = logits.shape[-1]
        z_dim = num.bit_length() - 1
        if num < 2 or 2**z_dim != num:
            raise ValueError(f"logits must have 2^K entries in the last dim (one per code); got {num}")
        self.logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        self.z_dim = z_dim
        super().__init__(logits.shape[:-1], torch.Size([z_dim]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BinaryCodeCategorical, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + self.logits.shape[-1:])
        new.z_dim = self.z_dim
        super(BinaryCodeCategorical, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _codes(self) -> torch.Tensor:
        return binary_codes(self.z_dim, self.logits.dtype, self.logits.device)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            index = dist.Categorical(logits=self.logits).sample(sample_shape)
        return self._codes()[index]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        weights = 2 ** torch.arange(self.z_dim, device=value.device)
        index = (value.round().long() * weights).sum(-1)
        shape = torch.broadcast_shapes(index.shape, self.batch_shape)
        logits = self.logits.expand(shape + self.logits.shape[-1:])
        return logits.gather(-1, index.expand(shape)[..., None])[..., 0]

    @property
    def mean(self) -> torch.Tensor:
        return self.logits.exp() @ self._codes()


class EnumeratedPosteriorGuide(nn.Module):
    """q(z | x) = p(z | x) of a :class:`DiscreteVAE`, computed by enumerating the 2^K codes (small K only).

    Args:
        model: the :class:`DiscreteVAE` whose posterior to use.
        detach: hold q fixed at the current posterior (no gradient from the guide into the model).
    """

    def __init__(self, model: DiscreteVAE, detach: bool = True):
        super().__init__()
        self.model, self.detach = model, bool(detach)

    def forward(self, x: torch.Tensor) -> None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach):
            logits = self.model.posterior_logits(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", BinaryCodeCategorical(logits))
