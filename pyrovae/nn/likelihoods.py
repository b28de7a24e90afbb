"""Observation models p(x | decoder output) used by the library's decoders.

Each entry maps a decoder output (shape ``[*batch, k * C, H, W]`` or ``[*batch, k * D]``, ``k`` from
:func:`likelihood_head`) to a Pyro distribution whose event covers one data point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import pyro.distributions as dist
from pyro.distributions import TorchDistribution, constraints
from torch.nn.functional import binary_cross_entropy_with_logits, softplus


@dataclass(frozen=True)
class Likelihood:
    learns_scale: bool  # with no fixed scale, the decoder also emits a per-pixel scale
    build: Callable[[torch.Tensor, int, Optional[torch.Tensor]], dist.TorchDistribution]
    needs_unit_interval: bool  # data must lie in [0, 1]


class BernoulliLogits(TorchDistribution):
    """Independent Bernoulli(sigmoid(logits)) over the last ``event_dim`` dims of ``logits``.

    log p(x) = -sum BCE(logits, x). Values in [0, 1] are allowed (grey-level data: the usual cross-entropy
    use). The same density as ``Bernoulli(logits).to_event(event_dim)``, computed as a negated *sum* of the
    cross-entropy rather than a sum of negated elements: one full-size tensor less forward and backward,
    which matters for many particles (IWAE, k = 5000 evaluation).
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, logits: torch.Tensor, event_dim: int, validate_args=None):
        self.logits = logits
        cut = logits.dim() - event_dim
        super().__init__(logits.shape[:cut], logits.shape[cut:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BernoulliLogits, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + self.event_shape)
        super(BernoulliLogits, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @property
    def variance(self) -> torch.Tensor:
        p = torch.sigmoid(self.logits)
        return p * (1 - p)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return torch.bernoulli(self.mean.expand(self.shape(sample_shape)))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.logits, value)
        bce = binary_cross_entropy_with_logits(logits, value, reduction="none")
        return -bce.sum(tuple(range(-len(self.event_shape), 0)))


class _PickedLogSoftmax(torch.autograd.Function):
    """``log_softmax(logits)[n, target[n]]`` per row, with the gradient ``onehot(target) - softmax(logits)`` written
    out: ``cross_entropy``'s backward makes a zero-filled ``[N, V]`` one-hot gradient and runs the general
    log-softmax backward over it; this one makes the softmax once and adds the picked entries (576 rows of a
    10,002-word softmax on this project's 2-core VM: backward 6.4 ms against 9-19 ms). Same numbers: ``tests/test_text.py``
    checks value and gradient against ``cross_entropy``."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, -1)
        ctx.save_for_backward(logp, target)
        return logp.gather(-1, target[:, None]).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logp, target = ctx.saved_tensors
        grad = grad[:, None]
        return logp.exp().mul_(-grad).scatter_add_(-1, target[:, None], grad), None


class PackedCategorical(TorchDistribution):
    """Categorical(softmax(logits)) at the positions of a ``[*batch]`` grid where ``where`` is True, with the logits
    given only there: ``logits`` ``[N, V]`` holds one row per True entry of ``where``, in row-major order (as
    ``full_logits[where]``). A position outside ``where`` has log-probability 0 and samples 0.

    The same density as ``Categorical(full_logits)`` on the True positions, for a decoder whose output layer is the
    costly part (a vocabulary-sized softmax over padded sentences): that layer runs on the N positions that are scored,
    not on every padded one. Keep the usual ``.mask(where)`` around it, so that code reading the site's mask (token
    counts, :class:`pyrovae.objectives.sequence.TokenGECO`) sees it. No mean: like a Categorical, it has none to show.
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, logits: torch.Tensor, where: torch.Tensor, validate_args=None):
        if logits.dim() != 2 or where.dtype != torch.bool:
            raise ValueError(f"PackedCategorical takes logits [N, V] and a bool grid; got logits {list(logits.shape)} and a {where.dtype} grid")
        self.logits, self.where = logits, where
        super().__init__(where.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        rows = (self.where.reshape(-1).cumsum(0) - 1).reshape(self.where.shape)
        where = self.where.expand(batch_shape)
        return PackedCategorical(self.logits[rows.expand(batch_shape)[where]], where, validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if value.shape != self.batch_shape:
            if value.dim() > len(self.batch_shape):
                raise ValueError(f"PackedCategorical scores values of its grid's shape {list(self.batch_shape)}, not {list(value.shape)} (no sample dims)")
            value = value.expand(self.batch_shape)
        picked = _PickedLogSoftmax.apply(self.logits, value[self.where])
        return self.logits.new_zeros(self.batch_shape).masked_scatter(self.where, picked)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        if sample_shape:
            raise ValueError("PackedCategorical draws one value per grid position: sample() without a sample_shape")
        with torch.no_grad():
            drawn = torch.multinomial(torch.softmax(self.logits, -1), 1).squeeze(-1)
            return torch.zeros(self.batch_shape, dtype=torch.long, device=self.logits.device).masked_scatter(self.where, drawn)


def _bernoulli(out, event_dim, scale):
    return BernoulliLogits(out, event_dim)


def _continuous_bernoulli(out, event_dim, scale):
    return dist.ContinuousBernoulli(logits=out, validate_args=False).to_event(event_dim)


def _gaussian(out, event_dim, scale):
    if scale is None:  # learned per-pixel scale: the decoder emits mean and raw scale
        loc, raw = out.chunk(2, dim=-event_dim)
        return dist.Normal(loc, softplus(raw) + 1e-3).to_event(event_dim)
    return dist.Normal(out, scale).to_event(event_dim)


LIKELIHOODS: dict[str, Likelihood] = {
    "bernoulli": Likelihood(False, _bernoulli, True),
    "continuous_bernoulli": Likelihood(False, _continuous_bernoulli, True),
    "gaussian": Likelihood(True, _gaussian, False),
}


def get_likelihood(name: str) -> Likelihood:
    if name not in LIKELIHOODS:
        raise ValueError(f"likelihood={name!r} is not known; choose one of {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[name]


def likelihood_head(name: str, scale: Optional[float]) -> tuple[Likelihood, Optional[float], int]:
    """The likelihood ``name``, its checked fixed observation scale (None: learned where the likelihood has one),
    and how many decoder outputs per data dimension it needs."""
    likelihood = get_likelihood(name)
    if scale is not None and not float(scale) > 0:
        raise ValueError(f"scale={scale} must be positive, or None to learn it")
    scale = None if scale is None else float(scale)
    return likelihood, scale, 2 if (likelihood.learns_scale and scale is None) else 1
