"""Network building blocks shared by models and guides.

Models and guides are Pyro programs; the networks inside them are plain ``torch.nn`` modules built
here so that every encoder/decoder pair shares one definition of an MLP or a conv stack.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

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
