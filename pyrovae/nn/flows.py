"""Amortised normalizing flows for variational families q(z | x).

A flow guide is a recipe: a base distribution ``N(mu(x), sigma(x))`` and a stack of conditional transforms
whose parameters are produced from a context ``c = h(x)`` by hypernetworks::

    z_0 ~ N(mu(x), diag sigma(x)^2),   z_K = f_K( ... f_1(z_0; c) ...; c),
    log q(z_K | x) = log N(z_0) - sum_k log |det df_k/dz_{k-1}|.

Every family is built from :mod:`pyro.distributions.transforms` (``conditional_*`` helpers); Pyro has no
conditional Sylvester flow, so :class:`ConditionalSylvester` supplies one. Families are looked up in the
registry :data:`FLOWS`; add a family by registering a builder there.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.distributions.transforms import (
    ConditionalAffineAutoregressive,
    ConditionalPlanar,
    Permute,
    conditional_affine_coupling,
    conditional_householder,
    conditional_radial,
)
from pyro.nn import ConditionalAutoRegressiveNN, DenseNN
from torch import nn
from torch.distributions import Transform

#: A builder makes a whole stack: ``builder(z_dim, context_dim, num_flows, hidden_dims) -> [transforms]``.
FlowBuilder = Callable[[int, int, int, Optional[Sequence[int]]], list]

#: Families whose transforms have an analytic inverse, so that any z (not only one the flow sampled) can be
#: scored. Planar, radial and Sylvester flows can only score their own samples (Pyro caches x for each y).
ANALYTIC_INVERSE = frozenset({"iaf", "realnvp", "householder"})


class ConditionedSylvester(Transform):
    """The Sylvester map for one fixed context; see :class:`ConditionalSylvester`."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, params: Callable[[], tuple[torch.Tensor, ...]]):
        super().__init__(cache_size=1)
        self._params = params
        self._cached_log_det = None

    @staticmethod
    def _reflect(v: torch.Tensor, u: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        # H_k v = v - 2 u_k (u_k . v), u_k of unit length; u: [..., K, D], v: [..., D] (broadcasts)
        for k in order:
            uk = u[..., k, :]
            v = v - 2.0 * (uk * v).sum(-1, keepdim=True) * uk
        return v

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        r, r_tilde, b, u = self._params()
        K = u.size(-2)
        # Q = H_1 ... H_K, so Q^T x applies H_1 first and Q w applies H_K first
        qtx = self._reflect(x, u, range(K))
        pre = (r_tilde @ qtx.unsqueeze(-1)).squeeze(-1) + b
        h = torch.tanh(pre)
        y = x + self._reflect((r @ h.unsqueeze(-1)).squeeze(-1), u, reversed(range(K)))
        # det(I + Q R diag(h') R~ Q^T) = det(I + diag(h') R~ R) = prod_i (1 + h'_i r_ii r~_ii)
        diag = r.diagonal(dim1=-2, dim2=-1) * r_tilde.diagonal(dim1=-2, dim2=-1)
        self._cached_log_det = torch.log1p((1.0 - h.pow(2)) * diag).sum(-1)
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise KeyError(
            "ConditionedSylvester has no analytic inverse: it can only score values it produced itself "
            "(the inverse is cached on the forward call)"
        )

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_old, y_old = self._cached_x_y
        if x is not x_old or y is not y_old or self._cached_log_det is None:
            self(x)
        return self._cached_log_det


class ConditionalSylvester(ConditionalTransformModule):
    r"""Orthogonal (Householder) Sylvester flow with all parameters amortised from a context.

        z' = z + Q R tanh(R~ Q^T z + b),   log|det J| = sum_i log|1 + r_ii r~_ii tanh'(.)_i|

    ``Q = H_1 ... H_K`` is a product of Householder reflections, ``R`` and ``R~`` are upper triangular with
    diagonals ``tanh(.)`` so that ``r_ii r~_ii in (-1, 1)``; since ``0 < tanh' <= 1`` this gives
    ``r_ii r~_ii > -1/||h'||_inf``, the invertibility condition. ``R``, ``R~``, their diagonals, ``b`` and
    the reflection vectors are all outputs of one hypernetwork of the context.

    Args:
        input_dim: D, the size of z.
        hypernet: context -> (strict upper R, strict upper R~, raw diag R, raw diag R~, b, K*D vectors),
            of sizes ``(D(D-1)/2, D(D-1)/2, D, D, D, K*D)``.
        count_transforms: K, the number of Householder reflections in Q.

    Reference: van den Berg, Hasenclever, Tomczak & Welling, Sylvester Normalizing Flows for Variational
    Inference, UAI 2018.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, input_dim: int, hypernet: nn.Module, count_transforms: int = 1):
        super().__init__()
        if count_transforms < 1:
            raise ValueError(f"count_transforms={count_transforms} must be at least 1 (the number of reflections in Q)")
        self.input_dim = input_dim
        self.count_transforms = count_transforms
        self.nn = hypernet
        rows, cols = torch.triu_indices(input_dim, input_dim, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def _upper(self, strict: torch.Tensor, raw_diag: torch.Tensor) -> torch.Tensor:
        m = torch.diag_embed(torch.tanh(raw_diag))
        m[..., self.rows, self.cols] = strict
        return m

    def _params(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r_up, s_up, r_diag, s_diag, b, u = self.nn(context)
        u = u.reshape(*u.shape[:-1], self.count_transforms, self.input_dim)
        u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)
        return self._upper(r_up, r_diag), self._upper(s_up, s_diag), b, u

    def condition(self, context: torch.Tensor) -> ConditionedSylvester:
        return ConditionedSylvester(partial(self._params, context))


def conditional_sylvester(
    input_dim: int, context_dim: int, hidden_dims: Optional[Sequence[int]] = None, count_transforms: Optional[int] = None
) -> ConditionalSylvester:
    """A :class:`ConditionalSylvester` with a dense hypernetwork (default hidden ``[10D, 10D]``, ``K = D//2 + 1``
    reflections, the defaults of Pyro's non-conditional ``sylvester``)."""
    if hidden_dims is None:
        hidden_dims = [10 * input_dim, 10 * input_dim]
    if count_transforms is None:
        count_transforms = input_dim // 2 + 1
    n_up = input_dim * (input_dim - 1) // 2
    dims = [n_up, n_up, input_dim, input_dim, input_dim, count_transforms * input_dim]
    return ConditionalSylvester(input_dim, DenseNN(context_dim, list(hidden_dims), param_dims=dims), count_transforms)


class ConditionalPermute(ConditionalTransformModule):
    """A fixed permutation of the last dim, ignoring the context (so it can sit in a conditional stack).

    The permutation is a buffer, so it follows the module's device."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, permutation: torch.Tensor):
        super().__init__()
        self.register_buffer("permutation", torch.as_tensor(permutation, dtype=torch.long))

    def condition(self, context: torch.Tensor) -> Permute:
        return Permute(self.permutation)


def _reversed_order(z_dim: int, layer: int) -> torch.Tensor:
    order = torch.arange(z_dim)
    return order.flip(0) if layer % 2 else order


class DotPlanar(ConditionedPlanar):
    """Pyro's conditioned planar layer with its three ``[.., 1, D] x [.., D, 1]`` matmuls written as
    multiply-and-sum: the same map and log-det, without a batched matmul of 1x1 results (mostly overhead on CPU)."""

    def u_hat(self, u, w):
        alpha = (u * w).sum(-1, keepdim=True)
        return u + (torch.nn.functional.softplus(alpha) - 1 - alpha) * w / w.pow(2).sum(-1, keepdim=True)

    def _call(self, x):
        bias, u, w = self._params() if callable(self._params) else self._params
        act = torch.tanh((w * x).sum(-1, keepdim=True) + bias)
        u_hat = self.u_hat(u, w)
        self._cached_logDetJ = torch.log(torch.abs(1 + ((1 - act.pow(2)) * w * u_hat).sum(-1)))
        return x + u_hat * act


class ConditionalDotPlanar(ConditionalPlanar):
    """:class:`~pyro.distributions.transforms.ConditionalPlanar` conditioned into :class:`DotPlanar` layers."""

    def condition(self, context):
        return DotPlanar(partial(self._params, context))


def _planar(z_dim: int, context_dim: int, num_flows: int, hidden_dims: Optional[Sequence[int]]) -> list:
    """Planar flows, z' = z + u tanh(w^T z + b) (Rezende & Mohamed 2015)."""
    return [ConditionalDotPlanar(DenseNN(context_dim, list(hidden_dims), param_dims=[1, z_dim, z_dim])) for _ in range(num_flows)]


def _radial(z_dim: int, context_dim: int, num_flows: int, hidden_dims: Optional[Sequence[int]]) -> list:
    """Radial flows, z' = z + beta (z - z0) / (alpha + |z - z0|) (Rezende & Mohamed 2015)."""
    return [conditional_radial(z_dim, context_dim, hidden_dims) for _ in range(num_flows)]


def _iaf(z_dim: int, context_dim: int, num_flows: int, hidden_dims: Optional[Sequence[int]]) -> list:
    """Inverse autoregressive flows, z'_i = mu_i(z_<i, c) + sigma_i(z_<i, c) z_i (Kingma et al. 2016); the
    variable order is reversed between layers, as in the paper."""
    hidden = list(hidden_dims)
    if any(h < z_dim for h in hidden):
        raise ValueError(f"hidden_dims={hidden} for 'iaf' must all be >= z_dim={z_dim} (MADE needs it); use larger layers")
    return [
        ConditionalAffineAutoregressive(
            ConditionalAutoRegressiveNN(z_dim, context_dim, hidden, permutation=_reversed_order(z_dim, k))
        )
        for k in range(num_flows)
    ]


def _realnvp(z_dim: int, context_dim: int, num_flows: int, hidden_dims: Optional[Sequence[int]]) -> list:
    """Affine coupling layers, z'_{d+1:D} = mu(z_1:d, c) + sigma(z_1:d, c) * z_{d+1:D} (Dinh et al. 2017), with a
    reversing permutation between layers so that each half is transformed in turn."""
    if z_dim < 2:
        raise ValueError(f"z_dim={z_dim}: 'realnvp' splits z in two halves and needs z_dim >= 2; use 'planar' or 'iaf'")
    flip = torch.arange(z_dim).flip(0)
    stack: list = []
    for k in range(num_flows):
        if k > 0:
            stack.append(ConditionalPermute(flip))
        stack.append(conditional_affine_coupling(z_dim, context_dim, hidden_dims))
    return stack


def _householder(z_dim: int, context_dim: int, num_flows: int, hidden_dims: Optional[Sequence[int]]) -> list:
    """Householder reflections, z' = (I - 2 v v^T / |v|^2) z with v = v(c) (Tomczak & Welling 2016); volume
    preserving, so with the diagonal base it gives a full-covariance Gaussian."""
    return [conditional_householder(z_dim, context_dim, hidden_dims) for _ in range(num_flows)]


def _sylvester(z_dim: int, context_dim: int, num_flows: int, hidden_dims: Optional[Sequence[int]]) -> list:
    """Householder Sylvester flows, z' = z + Q R tanh(R~ Q^T z + b) (van den Berg et al. 2018)."""
    return [conditional_sylvester(z_dim, context_dim, hidden_dims) for _ in range(num_flows)]


#: name -> builder of a stack of conditional transforms.
FLOWS: dict[str, FlowBuilder] = {
    "planar": _planar,
    "radial": _radial,
    "iaf": _iaf,
    "realnvp": _realnvp,
    "householder": _householder,
    "sylvester": _sylvester,
}


def build_flow(
    name: str, z_dim: int, context_dim: int, num_flows: int, hidden_dims: Optional[Sequence[int]] = None
) -> nn.ModuleList:
    """A stack of ``num_flows`` amortised flow layers of family ``name`` (``realnvp`` also gets permutations
    between its coupling layers).

    Args:
        name: a key of :data:`FLOWS`.
        z_dim: size of z.
        context_dim: size of the context c = h(x) the hypernetworks read.
        num_flows: number of layers K >= 1.
        hidden_dims: hidden sizes of each hypernetwork (default: one layer of ``max(context_dim, 2 * z_dim)``
            units, close to the papers' nearly linear amortisation and light enough for K = 80 layers).
    Returns:
        ``nn.ModuleList`` of :class:`~pyro.distributions.conditional.ConditionalTransformModule`.
    """
    if name not in FLOWS:
        raise ValueError(f"flow={name!r} is not known; choose one of {sorted(FLOWS)}")
    for arg, value in (("num_flows", num_flows), ("z_dim", z_dim), ("context_dim", context_dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}={value!r} must be a positive integer")
    if hidden_dims is None:
        hidden_dims = [max(context_dim, 2 * z_dim)]
    hidden_dims = [int(h) for h in hidden_dims]
    if not hidden_dims or any(h < 1 for h in hidden_dims):
        raise ValueError(f"hidden_dims={hidden_dims} must be a non-empty list of positive sizes, or None for the default")
    return nn.ModuleList(FLOWS[name](z_dim, context_dim, num_flows, hidden_dims))


def conditioned_distribution(
    base: dist.Distribution, flows: Sequence[ConditionalTransformModule], context: torch.Tensor
) -> dist.TransformedDistribution:
    """``base`` pushed through ``flows`` conditioned on ``context``: z = f_K(...f_1(z_0; c)...; c), z_0 ~ base.

    ``context`` has shape ``[*batch, context_dim]``; the base may carry extra dims on the left (e.g. particles),
    which the transforms broadcast over."""
    return dist.TransformedDistribution(base, [f.condition(context) for f in flows])
