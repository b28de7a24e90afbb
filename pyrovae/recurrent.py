"""LSTM cells whose inputs and states broadcast over any leading dims (data batch, vectorised particles).

``torch.nn.LSTMCell`` takes one 2-D batch; inside Pyro's particle plate a recurrent state starts as ``[B, H]``
and becomes ``[P, B, H]`` after the first sampled input, so these cells add the input and state projections
with broadcasting instead. Used by DRAW's encoder and decoder (:mod:`pyrovae.models.draw`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class LSTMState(NamedTuple):
    h: torch.Tensor
    c: torch.Tensor


def _gates(gates: torch.Tensor, c: torch.Tensor, dim: int) -> LSTMState:
    i, f, g, o = gates.chunk(4, dim)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return LSTMState(torch.sigmoid(o) * torch.tanh(c), c)


class LSTMCell(nn.Module):
    """h', c' = LSTM(x, (h, c)) with gates W_x x + W_h h + b (Hochreiter & Schmidhuber 1997)."""

    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = int(hidden_dim)
        self.ih = nn.Linear(input_dim, 4 * hidden_dim)
        self.hh = nn.Linear(hidden_dim, 4 * hidden_dim, bias=False)

    def initial(self, like: torch.Tensor, batch: int) -> LSTMState:
        zeros = like.new_zeros(batch, self.hidden_dim)
        return LSTMState(zeros, zeros)

    def forward(self, x: torch.Tensor, state: LSTMState) -> LSTMState:
        return _gates(self.ih(x) + self.hh(state.h), state.c, -1)


def conv2d(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D (transposed) convolution to ``[*, C, H, W]`` with any number of leading dims."""
    out = conv(x.reshape(-1, *x.shape[-3:]))
    return out.reshape(*x.shape[:-3], *out.shape[-3:])


class ConvLSTMCell(nn.Module):
    """Convolutional LSTM (Shi et al. 2015): the gates are ``k x k`` convolutions of input and state feature maps."""

    def __init__(self, input_channels: int, hidden_channels: int, height: int, width: int, kernel: int = 5):
        super().__init__()
        self.hidden_channels, self.height, self.width = int(hidden_channels), int(height), int(width)
        self.ih = nn.Conv2d(input_channels, 4 * hidden_channels, kernel, padding=kernel // 2)
        self.hh = nn.Conv2d(hidden_channels, 4 * hidden_channels, kernel, padding=kernel // 2, bias=False)

    def initial(self, like: torch.Tensor, batch: int) -> LSTMState:
        zeros = like.new_zeros(batch, self.hidden_channels, self.height, self.width)
        return LSTMState(zeros, zeros)

    def forward(self, x: torch.Tensor, state: LSTMState) -> LSTMState:
        return _gates(conv2d(self.ih, x) + conv2d(self.hh, state.h), state.c, -3)
