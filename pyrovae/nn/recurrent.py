"""Recurrent networks written as loops of cells, so that the trainer's captured step can record them.

``torch.nn.LSTM``'s fused kernel cannot be recorded by the captured step on CPU (its backward takes a
``workspace`` the graph does not hold), so the library's recurrent models run their cells as plain tensor ops:

- :class:`LSTMCell` / :class:`ConvLSTMCell`: one step, inputs and states broadcasting over any leading dims
  (inside Pyro's particle plate a state starts as ``[B, H]`` and becomes ``[P, B, H]`` after the first sampled
  input). Used by DRAW's encoder and decoder (:mod:`pyrovae.models.draw`).
- :class:`RNN`: a stack of LSTM or GRU layers over a batch-first sequence, a drop-in for ``torch.nn.LSTM`` /
  ``torch.nn.GRU`` (same parameters, names, initialisation, gate order and state layout), used by the text
  models (:mod:`pyrovae.models.sentence`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

#: the recurrent layers :class:`RNN` runs, with their number of gates
RNN_KINDS = {"lstm": 4, "gru": 3}


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


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``, else a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return value


#: an RNN state: ``(h, c)`` for an LSTM, ``h`` for a GRU, each ``[layers, N, H]``
RNNState = Union[tuple[torch.Tensor, torch.Tensor], torch.Tensor]


class RNN(nn.Module):
    """``num_layers`` LSTM or GRU layers over ``x`` ``[N, T, I]`` (batch first), a loop of cells in plain tensor ops.

    The maths, parameters (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``), their
    initialisation U(-1/sqrt(H), 1/sqrt(H)) in the same order, and the state layout are those of
    ``torch.nn.LSTM`` / ``torch.nn.GRU(..., batch_first=True)``, so state dicts load either way. LSTM (gates
    i, f, g, o; Hochreiter & Schmidhuber 1997): c' = sigmoid(f) c + sigmoid(i) tanh(g), h' = sigmoid(o) tanh(c').
    GRU (gates r, u, n; Cho et al. 2014): n = tanh(W_in x + b_in + r (W_hn h + b_hn)), h' = (1 - u) n + u h.
    The input projections of all steps are one matrix product per layer; the loop does the state projections.

    Args:
        kind: ``"lstm"`` or ``"gru"``.
        input_size, hidden_size, num_layers: as ``torch.nn.LSTM``.
    """

    def __init__(self, kind: str, input_size: int, hidden_size: int, num_layers: int = 1):
        super().__init__()
        if kind not in RNN_KINDS:
            raise ValueError(f"rnn={kind!r} is not known; choose one of {sorted(RNN_KINDS)}")
        self.kind, self.input_size = kind, check_int("input_size", input_size)
        self.hidden_size, self.num_layers = check_int("hidden_size", hidden_size), check_int("num_layers", num_layers)
        gates = RNN_KINDS[kind] * hidden_size
        for k in range(num_layers):
            inputs = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(gates, inputs)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(gates, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(gates)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(gates)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():  # registration order, as torch.nn.RNNBase
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"

    def initial_state(self, like: torch.Tensor, batch: int) -> RNNState:
        """Zeros ``[layers, batch, H]`` (a pair for an LSTM) with the dtype of the parameters, on ``like``'s device."""
        h = like.new_zeros(self.num_layers, batch, self.hidden_size, dtype=self.weight_hh_l0.dtype)
        return (h, h) if self.kind == "lstm" else h

    def forward(self, x: torch.Tensor, state: Optional[RNNState] = None) -> tuple[torch.Tensor, RNNState]:
        """The top layer's outputs ``[N, T, H]`` and the final state of every layer (``[layers, N, H]`` each)."""
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [N, T, {self.input_size}] (batch first)")
        if state is None:
            state = self.initial_state(x, x.shape[0])
        lstm = self.kind == "lstm"
        hs, cs = (state[0].unbind(0), state[1].unbind(0)) if lstm else (state.unbind(0), None)
        last_h, last_c = [], []
        for k in range(self.num_layers):
            w_hh, b_hh = getattr(self, f"weight_hh_l{k}"), getattr(self, f"bias_hh_l{k}")
            xs = F.linear(x, getattr(self, f"weight_ih_l{k}"), getattr(self, f"bias_ih_l{k}")).unbind(1)
            h, c, out = hs[k], cs[k] if lstm else None, []
            for xt in xs:
                if lstm:
                    h, c = _gates(xt + F.linear(h, w_hh, b_hh), c, -1)
                else:
                    h = _gru(xt, F.linear(h, w_hh, b_hh), h)
                out.append(h)
            x = torch.stack(out, 1)
            last_h.append(h)
            last_c.append(c)
        h = torch.stack(last_h)
        return x, ((h, torch.stack(last_c)) if lstm else h)


def _gru(xt: torch.Tensor, ht: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One GRU update from the input and state projections ``xt``, ``ht`` (gates r, u, n)."""
    xr, xu, xn = xt.chunk(3, -1)
    hr, hu, hn = ht.chunk(3, -1)
    r, u = torch.sigmoid(xr + hr), torch.sigmoid(xu + hu)
    n = torch.tanh(xn + r * hn)
    return n + u * (h - n)
