"""Network building blocks shared by models and guides.

Models and guides are Pyro programs; the networks inside them are plain ``torch.nn`` modules built
here so that every encoder/decoder pair shares one definition of an MLP or a conv stack.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    """An activation module by name (``tanh``, ``relu``, ``elu``, ``softplus``, ``leaky_relu``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not known; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp(sizes: Sequence[int], act: str = "tanh") -> nn.Sequential:
    """Fully connected layers ``sizes[0] -> ... -> sizes[-1]`` with ``act`` between them
    (no activation after the last layer)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation(act))
    return nn.Sequential(*layers)


def latent_names(num_layers: int) -> list[str]:
    """Site names of a stack of stochastic layers, nearest to x first: ``z`` or ``z1, z2, ...``."""
    if num_layers == 1:
        return ["z"]
    return [f"z{i + 1}" for i in range(num_layers)]


def _num_downsamplings(x_shape: Sequence[int]) -> int:
    if len(x_shape) != 3:
        raise ValueError(
            f"arch='conv' needs image data of shape (channels, height, width); got x_shape={tuple(x_shape)}. "
            "Use arch='mlp' for flat data."
        )
    _, h, w = x_shape
    if h != w or h not in (28, 32, 64):
        raise ValueError(
            f"arch='conv' supports square 28x28, 32x32 and 64x64 images; got {h}x{w}. Use arch='mlp'."
        )
    return {28: 2, 32: 3, 64: 4}[h]


class ConvTrunk(nn.Module):
    """Image -> feature vector: stride-2 4x4 convolutions (32, 64, 64, ... channels), then a linear layer."""

    def __init__(self, x_shape: Sequence[int], out_dim: int, act: str = "relu", channels: int = 32):
        super().__init__()
        n = _num_downsamplings(x_shape)
        chans = [x_shape[0]] + [channels * min(2**i, 2) for i in range(n)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), activation(act)]
        self.conv = nn.Sequential(*layers)
        side = x_shape[1] // 2**n
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * side * side, out_dim), activation(act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-3]
        h = self.fc(self.conv(x.reshape(-1, *x.shape[-3:])))
        return h.reshape(*batch, h.shape[-1])


class DeconvHead(nn.Module):
    """Feature vector -> image-shaped output: a linear layer, then stride-2 transposed convolutions."""

    def __init__(self, in_dim: int, x_shape: Sequence[int], act: str = "relu", channels: int = 32):
        super().__init__()
        n = _num_downsamplings(x_shape)
        chans = [channels * min(2**i, 2) for i in range(n)][::-1] + [x_shape[0]]
        self.side = x_shape[1] // 2**n
        self.fc = nn.Sequential(nn.Linear(in_dim, chans[0] * self.side**2), activation(act))
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:])):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < n - 1:
                layers.append(activation(act))
        self.deconv = nn.Sequential(*layers)
        self.c0 = chans[0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch = h.shape[:-1]
        out = self.fc(h.reshape(-1, h.shape[-1])).reshape(-1, self.c0, self.side, self.side)
        out = self.deconv(out)
        return out.reshape(*batch, *out.shape[1:])


class Flatten(nn.Module):
    """Flattens the trailing ``len(x_shape)`` dims of an input of shape ``[*batch, *x_shape]``."""

    def __init__(self, x_shape: Sequence[int]):
        super().__init__()
        self.ndim = len(x_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[: x.dim() - self.ndim], -1)


class Unflatten(nn.Module):
    """Reshapes the last dim of ``[*batch, prod(x_shape)]`` to ``x_shape``."""

    def __init__(self, x_shape: Sequence[int]):
        super().__init__()
        self.x_shape = tuple(x_shape)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(*h.shape[:-1], *self.x_shape)


#: encoder/decoder networks of image models: ``arch=``
ARCHS = ("mlp", "conv")


def x_encoder(x_shape: Sequence[int], hidden: Sequence[int], arch: str = "mlp", act: str = "tanh") -> tuple[nn.Module, int]:
    """The data-side trunk of an encoder: ``x -> h``. Returns the module and ``h``'s size."""
    if arch == "mlp":
        sizes = [math.prod(x_shape), *hidden]
        net = nn.Sequential(Flatten(x_shape), mlp(sizes, act), activation(act)) if hidden else Flatten(x_shape)
        return net, sizes[-1]
    if arch == "conv":
        out = hidden[-1] if hidden else 256
        return ConvTrunk(x_shape, out, act="relu"), out
    raise ValueError(f"arch={arch!r} is not known; choose 'mlp' or 'conv'")


def x_decoder(in_dim: int, x_shape: Sequence[int], hidden: Sequence[int], arch: str = "mlp", act: str = "tanh", out_channels_factor: int = 1) -> nn.Module:
    """The data-side head of a decoder: ``h -> output of shape [*batch, *x_shape]`` (``out_channels_factor``
    multiplies the channel/feature count, for likelihoods with several parameters per pixel)."""
    x_shape = tuple(x_shape)
    out_shape = (x_shape[0] * out_channels_factor, *x_shape[1:])
    if arch == "mlp":
        return nn.Sequential(mlp([in_dim, *hidden, math.prod(out_shape)], act), Unflatten(out_shape))
    if arch == "conv":
        mid = hidden[0] if hidden else 256
        return nn.Sequential(nn.Linear(in_dim, mid), activation("relu"), DeconvHead(mid, out_shape, act="relu"))
    raise ValueError(f"arch={arch!r} is not known; choose 'mlp' or 'conv'")


def diag_normal(params: torch.Tensor, min_scale: float = 1e-4):
    """N(loc, diag(scale^2)) over the last dim from a network output ``[..., 2 * d]``: the first half is the
    mean, the second half a raw scale mapped through softplus (bounded below by ``min_scale``)."""
    import pyro.distributions as dist

    loc, raw = params.chunk(2, dim=-1)
    return dist.Normal(loc, nn.functional.softplus(raw) + min_scale).to_event(1)


# --- Bayesian layers and variational dropout ------------------------------------------------------------
# Kingma, Salimans & Welling (2015), "Variational dropout and the local reparameterization trick" (KSW15);
# Molchanov, Ashukha & Vetrov (2017), "Variational dropout sparsifies deep neural networks".

from pyro.nn import PyroModule, PyroSample  # noqa: E402


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + b`` for a weight of shape ``[out, in]`` or a batch of weights ``[*batch, out, in]`` (one per
    particle, as Pyro's vectorised ELBOs draw them), broadcasting the weight's batch dims against ``x[..., :-1]``.

    Inside :func:`pyrovae.nn.poutine.local_reparameterization` a weight drawn from a Normal in the guide gives
    pre-activations drawn per example instead (the handler patches ``torch.nn.functional.linear``, which this
    calls for unbatched weights, and is asked directly for batched ones)."""
    import pyrovae.nn.poutine as _poutine

    handler = _poutine._active_local_reparameterization()
    if handler is not None:
        out = handler.linear(x, weight, bias)
        if out is not None:
            return out
    if weight.dim() == 2:
        return nn.functional.linear(x, weight, bias)
    return _batched_linear(x, weight, bias)


def _batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    out = (x.unsqueeze(-2) @ weight.transpose(-1, -2)).squeeze(-2)
    if bias is not None:
        out = out + bias
    return out


class BayesianLinear(PyroModule):
    """A linear layer whose weight and bias are Pyro latent variables, ``W ~ N(0, prior_scale^2)`` elementwise.

    Each is a :class:`pyro.nn.PyroSample` site named after the layer's place in its enclosing ``PyroModule``
    (``name.weight``, ``name.bias``), so a guide (hand-written, ``AutoNormal``) supplies q(W) and the ELBO
    gets the ``log p(W) - log q(W)`` terms: with such layers in the decoder a VAE is the full-Bayes AEVB of
    Kingma & Welling (2014, appendix F). Weights of shape ``[*particles, out, in]`` are supported.

    Args:
        in_features, out_features: sizes.
        bias: whether there is a (Bayesian) bias.
        prior_scale: standard deviation of the Normal prior of every weight and bias.
        name: Pyro name prefix when the layer is not inside a ``PyroModule`` (which names it itself).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, prior_scale: float = 1.0, name: str = ""):
        super().__init__(name)
        if not (isinstance(prior_scale, (int, float)) and prior_scale > 0 and math.isfinite(prior_scale)):
            raise ValueError(f"prior_scale={prior_scale!r} must be a positive number (the prior's standard deviation)")
        if int(in_features) < 1 or int(out_features) < 1:
            raise ValueError(f"in_features={in_features!r} and out_features={out_features!r} must be positive integers")
        self.in_features, self.out_features, self.prior_scale = int(in_features), int(out_features), float(prior_scale)
        self.register_buffer("prior_loc", torch.zeros(()), persistent=False)
        self.weight = PyroSample(lambda self: self._prior(self.out_features, self.in_features))
        if bias:
            self.bias = PyroSample(lambda self: self._prior(self.out_features))
        else:
            self.bias = None

    def _prior(self, *shape: int):
        import pyro.distributions as dist

        return dist.Normal(self.prior_loc.expand(shape), self.prior_scale).to_event(len(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prior_scale={self.prior_scale}"


def bayesian_mlp(sizes: Sequence[int], act: str = "tanh", prior_scale: float = 1.0, name: str = "net") -> PyroModule:
    """:func:`mlp` with :class:`BayesianLinear` layers; the sites are ``{name}.{i}.weight`` / ``.bias``."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(BayesianLinear(n_in, n_out, prior_scale=prior_scale))
        if i < len(sizes) - 2:
            layers.append(activation(act))
    net = PyroModule[nn.Sequential](*layers)
    net._pyro_name = name
    for i, layer in enumerate(layers):
        if isinstance(layer, PyroModule):
            layer._pyro_name = f"{name}.{i}"
    return net


#: Molchanov et al. (2017), eq. 14: -KL ~= k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha) - k1
MOLCHANOV_K = (0.63576, 1.87320, 1.48695)
#: KSW15, eq. 10 (for alpha <= 1): -KL ~= const + 0.5 log alpha + c1 alpha + c2 alpha^2 + c3 alpha^3
KSW15_C = (1.16145124, -1.50204118, 0.58629921)
#: lim_{alpha -> inf} (0.5 log alpha - E log|1 + sqrt(alpha) eps|) = -E log|eps| = (gamma + log 2) / 2: the
#: constant that makes the exact -KL tend to 0 as alpha -> inf (the convention of Molchanov et al.)
_KL_LIMIT = (0.5772156649015329 + math.log(2.0)) / 2
#: KSW15 leave the constant of eq. 10 open; this one makes it equal the exact value (convention above) at alpha = 1,
#: -0.426686 (numerical integral), minus c1 + c2 + c3
KSW15_CONST = -0.672394874


def dropout_neg_kl(log_alpha: torch.Tensor, approx: str = "molchanov") -> torch.Tensor:
    """Approximate ``-KL(N(theta, alpha theta^2) || p(w))`` per weight for the log-uniform prior p(|w|) ~ 1/|w|,
    whose exact value (up to an additive constant) is ``0.5 log alpha - E_{eps~N(1, alpha)} log|eps|``.

    Args:
        log_alpha: the log dropout rate(s).
        approx: ``molchanov`` (Molchanov et al. 2017, eq. 14, any alpha, within 0.01 nats of the exact value
            that tends to 0 as alpha -> inf; ``tests/test_bayes.py`` measures it) or ``ksw15`` (KSW15 eq. 10, a
            cubic in alpha fitted on alpha <= 1: alpha is clipped to 1, as in the paper; within 0.04 nats of the
            exact value for log alpha in [-8, 0] with the constant :data:`KSW15_CONST`).
    """
    if approx == "molchanov":
        k1, k2, k3 = MOLCHANOV_K
        return k1 * torch.sigmoid(k2 + k3 * log_alpha) - 0.5 * nn.functional.softplus(-log_alpha) - k1
    if approx == "ksw15":
        c1, c2, c3 = KSW15_C
        log_alpha = log_alpha.clamp(max=0.0)
        a = log_alpha.exp()
        return KSW15_CONST + 0.5 * log_alpha + c1 * a + c2 * a**2 + c3 * a**3
    raise ValueError(f"approx={approx!r} is not known; choose 'molchanov' or 'ksw15'")


ALPHA_SHAPES = ("layer", "unit", "weight")
#: width of the bend below ``max_log_alpha`` where :func:`soft_clip` leaves the identity (in log alpha)
CLIP_KNEE = 0.5


def soft_clip(log_alpha: torch.Tensor, max_log_alpha: float, knee: float = CLIP_KNEE) -> torch.Tensor:
    """``log_alpha`` bent to stay below ``max_log_alpha`` = m with a gradient everywhere (a hard clamp's is 0 above
    m, so alpha = e^m was absorbing): the identity up to k = m - knee, then ``m - knee exp(-(x - k) / knee)``,
    continuous with its slope at k and increasing."""
    k = max_log_alpha - knee
    return torch.where(log_alpha > k, max_log_alpha - knee * torch.exp(-(log_alpha.clamp(min=k) - k) / knee), log_alpha)


def _soft_clip_inverse(value: float, max_log_alpha: float, knee: float = CLIP_KNEE) -> float:
    k = max_log_alpha - knee
    return value if value <= k else k - knee * math.log((max_log_alpha - value) / knee)


class VariationalDropoutLinear(nn.Module):
    """A linear layer with variational Gaussian dropout (KSW15): multiplicative noise ``N(1, alpha)`` with a
    learned rate, and the KL to the log-uniform prior that makes the noise a posterior over the weights.

    Variant ``A`` (KSW15's correlated weight noise) multiplies the layer's *inputs*, one noise per input unit
    and example, ``B = (A o xi) theta^T + b``: Gaussian dropout on the previous layer's activations. Variant
    ``B`` (independent weight noise) gives every weight its own noise ``w_ij = theta_ij (1 + sqrt(alpha_ij) eps)``,
    drawn through the local reparameterisation ``B ~ N(A theta^T + b, A^2 (alpha theta^2)^T)``. In eval mode,
    or as alpha -> 0, the layer is the deterministic ``nn.Linear``.

    ``alpha_shape``: ``layer`` (one alpha), ``unit`` (one per input unit) or ``weight`` (one per weight,
    variant B only). :meth:`kl` is the sum over weights of ``KL(alpha)`` (:func:`dropout_neg_kl`); with variant
    A an input unit's noise scales ``out_features`` weights, which count once each, as in KSW15 section 3.3.
    Add ``-kl()`` to the model's log-density (``pyro.factor``), see :func:`add_dropout_kl`.

    log alpha is kept below ``max_log_alpha`` (KSW15 clip alpha at 1) by :func:`soft_clip` of the parameter
    ``log_alpha``: the identity below ``max_log_alpha - 0.5`` and a smooth bend above it, so that the gradient
    can bring alpha back down (``init_alpha`` is the alpha it starts at).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, variant: str = "A", alpha_shape: str = "unit",
                 init_alpha: float = 0.1, approx: str = "molchanov", max_log_alpha: float = 0.0):
        super().__init__()
        if variant not in ("A", "B"):
            raise ValueError(f"variant={variant!r}: choose 'A' (noise on the inputs) or 'B' (independent noise per weight)")
        if alpha_shape not in ALPHA_SHAPES:
            raise ValueError(f"alpha_shape={alpha_shape!r}: choose one of {list(ALPHA_SHAPES)}")
        if alpha_shape == "weight" and variant == "A":
            raise ValueError("alpha_shape='weight' needs variant='B' (variant A has one noise per input unit); use alpha_shape='unit'")
        if not init_alpha > 0:
            raise ValueError(f"init_alpha={init_alpha!r} must be positive (the initial noise variance)")
        if not math.log(init_alpha) < max_log_alpha:
            raise ValueError(f"init_alpha={init_alpha!r} must be below exp(max_log_alpha) = {math.exp(max_log_alpha):.4g}; lower it or raise max_log_alpha")
        dropout_neg_kl(torch.zeros(1), approx)  # validates the name
        self.in_features, self.out_features, self.variant, self.alpha_shape, self.approx = in_features, out_features, variant, alpha_shape, approx
        self.max_log_alpha = float(max_log_alpha)
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        shape = {"layer": (), "unit": (in_features,), "weight": (out_features, in_features)}[alpha_shape]
        self.log_alpha = nn.Parameter(torch.full(shape, _soft_clip_inverse(math.log(init_alpha), self.max_log_alpha)))

    def clipped_log_alpha(self) -> torch.Tensor:
        """The log alpha the layer uses: :func:`soft_clip` of the parameter ``log_alpha``."""
        return soft_clip(self.log_alpha, self.max_log_alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.linear(x)
        log_alpha = self.clipped_log_alpha()
        if self.variant == "A":
            noise = 1 + (0.5 * log_alpha).exp() * torch.randn_like(x)
            return self.linear(x * noise)
        w = self.linear.weight
        mean = self.linear(x)
        var = nn.functional.linear(x * x, log_alpha.exp().expand_as(w) * w * w)
        return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)

    def kl(self) -> torch.Tensor:
        """KL(q(W) || p(W)) summed over the weights (the convention that it tends to 0 as alpha -> inf)."""
        per = -dropout_neg_kl(self.clipped_log_alpha(), self.approx)
        weights = self.in_features * self.out_features
        return per.sum() * (weights / per.numel())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, variant={self.variant}, alpha_shape={self.alpha_shape}"


def dropout_mlp(sizes: Sequence[int], act: str = "tanh", variant: str = "A", alpha_shape: str = "unit", init_alpha: float = 0.1,
                first: bool = False) -> nn.Sequential:
    """:func:`mlp` whose layers after the first (``first=True``: all) are :class:`VariationalDropoutLinear`,
    i.e. Gaussian dropout on every hidden activation."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0 or first:
            layers.append(VariationalDropoutLinear(n_in, n_out, variant=variant, alpha_shape=alpha_shape, init_alpha=init_alpha))
        else:
            layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation(act))
    return nn.Sequential(*layers)


def dropout_kl(module: nn.Module) -> Optional[torch.Tensor]:
    """Sum of :meth:`VariationalDropoutLinear.kl` over the module's dropout layers (None when it has none)."""
    kls = [m.kl() for m in module.modules() if isinstance(m, VariationalDropoutLinear)]
    return torch.stack(kls).sum() if kls else None


def add_dropout_kl(name: str, module: nn.Module, in_guide: bool = False) -> None:
    """Put ``-KL`` of ``module``'s variational-dropout weights into the ELBO, from a model (a ``pyro.factor``)
    or from a guide (a guide-only site whose log-density is ``+KL``, which the ELBO subtracts as ``log q``).
    The term sits outside the data plate, like a global latent: use ELBO-type objectives."""
    import pyro
    import pyro.distributions as dist

    kl = dropout_kl(module)
    if kl is None:
        return
    if in_guide:
        pyro.sample(name, dist.Delta(kl.new_zeros(()), log_density=kl), infer={"is_auxiliary": True})
    else:
        pyro.factor(name, -kl)
