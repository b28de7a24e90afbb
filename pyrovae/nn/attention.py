"""DRAW's selective attention: an N x N grid of Gaussian filters laid over an image (Gregor et al. 2015, sec. 3.2).

A window has a centre (g_X, g_Y), a stride delta between filter centres, an isotropic variance sigma^2 and an
intensity gamma. Filter i of the X-filterbank is centred at mu_X^i = g_X + (i - (N - 1) / 2) delta and

    F_X[i, a] = exp(-(a - mu_X^i)^2 / (2 sigma^2)) / Z_X^i,     sum_a F_X[i, a] = 1,

in 0-based pixel coordinates a = 0 .. W - 1 (likewise F_Y over rows). Reading is gamma F_Y x F_X^T (an N x N
glimpse per channel), writing a patch w is (1 / gamma) F_Y^T w F_X (an image-sized canvas update).

Used by the DRAW model (write) and its guide (read); both own an :class:`Attention` head.

Where a window starts matters more than the paper says (it gives no initialisation). A linear head whose outputs
start near 0 gives delta~ = 1 and sigma = 1 pixel: for the 2 x 2 read of MNIST, four one-pixel filters on the
image's corners, where every digit is blank. The glimpse of x is then 0 for every image, q carries nothing about
x, and the window's gradient holds no information about x either: training sits at the mean image (posterior
collapse) until the window drifts onto the digits by chance. :class:`Attention` therefore starts every window
*tiling* the image (``init="tile"``): centred, stride max(H, W) / N, sigma half the stride, gamma 1, so each of
the N x N filters averages its own cell. ``init="unit"`` keeps the near-zero start (runs made before the change).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class Window(NamedTuple):
    """Filterbanks and parameters of one attention window per batch element: ``fy`` ``[*, N, H]``, ``fx``
    ``[*, N, W]``, and ``[*]``-shaped centre, stride, variance and intensity."""

    fy: torch.Tensor
    fx: torch.Tensor
    gx: torch.Tensor
    gy: torch.Tensor
    delta: torch.Tensor
    sigma2: torch.Tensor
    gamma: torch.Tensor


def filterbank(centre: torch.Tensor, delta: torch.Tensor, sigma2: torch.Tensor, size: int, length: int, eps: float = 1e-8) -> torch.Tensor:
    """Row-normalised Gaussian filters ``[*, size, length]`` along one image axis of ``length`` pixels.

    Args:
        centre, delta, sigma2: ``[*]`` grid centre g, stride delta and variance sigma^2, in pixels.
        size: N, the number of filters.
        length: pixels along the axis (W for F_X, H for F_Y).
        eps: keeps the normaliser Z positive for a filter far outside the image (its row is then ~0).
    """
    i = torch.arange(size, dtype=centre.dtype, device=centre.device)
    mu = centre[..., None] + (i - (size - 1) / 2) * delta[..., None]  # [*, N]
    a = torch.arange(length, dtype=centre.dtype, device=centre.device)
    f = torch.exp(-(a - mu[..., None]).pow(2) / (2 * sigma2[..., None, None]))
    return f / (f.sum(-1, keepdim=True) + eps)


def window(raw: torch.Tensor, height: int, width: int, size: int) -> Window:
    """The window of a linear layer's 5 outputs ``[*, 5]`` = (g~X, g~Y, log sigma^2, log delta~, log gamma).

    Centres g = (L - 1) / 2 (g~ + 1) (L = W for g_X, H for g_Y), in 0-based pixel coordinates: g~ = 0 is the
    image's centre and g~ = +-1 its first and last pixel centres. The paper (eq. 22-23) has g = (L + 1) / 2 (g~ + 1)
    in 1-based coordinates: the same centre at g~ = 0, but g~ = +-1 lands one pixel outside the image (0 and L + 1),
    a (L + 1) / (L - 1) larger scale of g~. As g~ is an unconstrained linear output, the two are the same family
    of windows (the layer's g~ weights rescaled); this one is kept so that trained runs keep their meaning. The
    stride is the paper's (eq. 24): delta = (max(H, W) - 1) / (N - 1) delta~, so delta~ = 1 spans the image."""
    gx_, gy_, log_sigma2, log_delta, log_gamma = raw.unbind(-1)
    gx = (width - 1) / 2 * (gx_ + 1)
    gy = (height - 1) / 2 * (gy_ + 1)
    delta = (max(height, width) - 1) / max(size - 1, 1) * torch.exp(log_delta)
    sigma2 = torch.exp(log_sigma2)
    gamma = torch.exp(log_gamma)
    return Window(filterbank(gy, delta, sigma2, size, height), filterbank(gx, delta, sigma2, size, width), gx, gy, delta, sigma2, gamma)


def read(images: torch.Tensor, w: Window) -> torch.Tensor:
    """gamma F_Y x F_X^T: ``images`` ``[*, C, H, W]`` -> glimpses ``[*, C, N, N]`` (batch dims broadcast)."""
    glimpse = w.fy[..., None, :, :] @ images @ w.fx[..., None, :, :].transpose(-1, -2)
    return w.gamma[..., None, None, None] * glimpse


def write(patch: torch.Tensor, w: Window) -> torch.Tensor:
    """(1 / gamma) F_Y^T w F_X: ``patch`` ``[*, C, N, N]`` -> canvas update ``[*, C, H, W]``."""
    canvas = w.fy[..., None, :, :].transpose(-1, -2) @ patch @ w.fx[..., None, :, :]
    return canvas / w.gamma[..., None, None, None]


INITS = ("tile", "unit")


def tiling_raw(height: int, width: int, size: int) -> torch.Tensor:
    """The raw outputs ``[5]`` of the window that tiles the image (see the module docstring): g~ = 0, stride
    delta = L / N with L = max(H, W), sigma = delta / 2, gamma = 1."""
    length = max(height, width)
    delta = length / size
    delta_tilde = delta / ((length - 1) / max(size - 1, 1))
    return torch.tensor([0.0, 0.0, 2 * math.log(delta / 2), math.log(delta_tilde), 0.0])


class Attention(nn.Module):
    """A linear map from a recurrent state to an N x N attention window over ``height x width`` images.

    Args:
        state_dim: size of the state that places the window.
        height, width: the image's size in pixels.
        size: N, filters per axis.
        init: where windows start: ``"tile"`` (the linear layer's bias is :func:`tiling_raw`: the N x N filters
            tile the image) or ``"unit"`` (PyTorch's default bias, near 0: stride delta~ = 1, one-pixel filters).
    """

    def __init__(self, state_dim: int, height: int, width: int, size: int, init: str = "tile"):
        super().__init__()
        if size < 1:
            raise ValueError(f"attention grid size={size} must be a positive number of filters per axis, e.g. 2 (read) or 5 (write)")
        if init not in INITS:
            raise ValueError(f"attention init={init!r} is not one of {INITS}: 'tile' starts the windows tiling the image, 'unit' near delta~ = 1, sigma = 1 pixel")
        self.height, self.width, self.size = int(height), int(width), int(size)
        self.params = nn.Linear(state_dim, 5)
        if init == "tile":
            with torch.no_grad():
                self.params.bias.copy_(tiling_raw(self.height, self.width, self.size))

    def forward(self, h: torch.Tensor) -> Window:
        return window(self.params(h), self.height, self.width, self.size)


def box(w: Window) -> torch.Tensor:
    """The window's extent for drawing, ``[*, 4]`` = (x0, y0, x1, y1): the outermost filter centres."""
    half = (w.fx.shape[-2] - 1) / 2 * w.delta
    return torch.stack([w.gx - half, w.gy - half, w.gx + half, w.gy + half], -1)
