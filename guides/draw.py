"""The guides of DRAW and ConvDRAW: q(z_1:T | x) = prod_t q(z_t | x, z_<t) (Gregor et al. 2015, 2016).

At step t the guide reads the image and the error image x - mean(c_{t-1}) (through an attention window placed by
h_dec_{t-1}, or whole), updates the encoder LSTM with [read, h_dec_{t-1}], draws z_t from a diagonal Gaussian of
h_enc_t, and advances the *model's* decoder and canvas with z_t (:meth:`RecurrentCanvasModel.step`): h_dec_{t-1} and
c_{t-1} are deterministic functions of z_<t, and the decoder is one set of weights, registered once (by the model).
A guide is therefore built from its model, and the model is not one of the guide's submodules (its parameters are
the model's, trained and checkpointed once).
"""
from __future__ import annotations

from typing import Optional

import pyro
import torch
from torch import nn

from pyrovae.nn.attention import Attention, box, read
from pyrovae.nn import diag_normal
from pyrovae.nn.recurrent import ConvLSTMCell, LSTMCell, conv2d
from pyrovae.utils.registry import register_guide


class _GuideOf(nn.Module):
    """A guide that drives its model's decoder; the model is held outside the module tree."""

    def __init__(self, model: nn.Module, model_type: type):
        super().__init__()
        if not isinstance(model, model_type):
            raise TypeError(f"{type(self).__name__} is built from a {model_type.__name__} model (it runs that model's decoder); got {type(model).__name__}")
        self._model = (model,)  # a tuple: not a submodule, so its parameters are not the guide's too
        self.x_shape = model.x_shape
        self.steps = model.steps

    @property
    def model(self):
        return self._model[0]

    def _register(self, name: str) -> None:
        pyro.module(name, self)
        pyro.module(self.model.pyro_name, self.model)  # the decoder's weights, under the model's own name

    def _extra(self, context: Optional[torch.Tensor]) -> tuple:
        """Inputs of the model's step besides z and the state (ConvDRAW's context features)."""
        return ()

    def _run(self, x: torch.Tensor, record: Optional[dict], context: Optional[torch.Tensor] = None) -> None:
        model = self.model
        model.begin_guide()
        try:
            extra = self._extra(context)
            state = model.initial_state(x)
            enc = self.encoder.initial(x, x.shape[0])
            with pyro.plate("data", x.shape[0]):
                for t in pyro.markov(range(self.steps)):
                    error = x - model.canvas_mean(state.canvas)
                    glimpse, looked = self.read(x, error, state.dec.h)
                    enc = self.encoder(self.encoder_input(glimpse, state.dec.h), enc)
                    z = pyro.sample(f"z_{t + 1}", self.posterior(enc.h))
                    state, wrote = model.step(z, state, *extra)
                    if record is not None:
                        if looked is not None:
                            record.setdefault("read", []).append(box(looked).reshape(-1, 4))
                        model._record(record, state, wrote)
        finally:
            model.end_guide()

    @torch.no_grad()
    def trajectory(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Reconstruct ``x`` with z ~ q, keeping every step: ``canvas`` ``[T, B, C, H, W]`` and, with attention,
        ``read`` and ``write`` boxes ``[T, B, 4]`` (x0, y0, x1, y1 in pixels)."""
        record: dict[str, list] = {}
        self._run(x, record, context)
        return {k: torch.stack(v) for k, v in record.items()}


@register_guide("draw", from_model=True, exclude=("hidden",))
class DRAWGuide(_GuideOf):
    """q(z_t | x, z_<t) = N(mu(h_enc_t), sigma(h_enc_t)) with h_enc_t = LSTM_enc(h_enc_{t-1}, [read_t, h_dec_{t-1}]).

    Args:
        model: the :class:`~pyrovae.models.DRAW` whose decoder the guide runs (attention and read size come from it).
        hidden: encoder LSTM units (the paper: 256).
    """

    def __init__(self, model, hidden: Optional[int] = None):
        from pyrovae.models.draw import DRAW

        super().__init__(model, DRAW)
        hidden = model.hidden if hidden is None else hidden
        channels, height, width = model.x_shape
        n = model.read_size
        self.attention = model.attention
        if self.attention:
            self.read_window = Attention(model.hidden, height, width, n, init=model.attention_init)
            read_dim = 2 * channels * n * n
        else:
            read_dim = 2 * channels * height * width
        self.encoder = LSTMCell(read_dim + model.hidden, hidden)
        self.head = nn.Linear(hidden, 2 * model.z_dim)

    def read(self, x: torch.Tensor, error: torch.Tensor, h_dec: torch.Tensor):
        """[x, x - mean(c)] through the read window placed by ``h_dec`` (or whole), flattened; and the window."""
        if not self.attention:
            x, error = torch.broadcast_tensors(x, error)
            return torch.cat([x.flatten(-3), error.flatten(-3)], -1), None
        w = self.read_window(h_dec)
        return torch.cat([read(x, w).flatten(-3), read(error, w).flatten(-3)], -1), w

    def encoder_input(self, glimpse: torch.Tensor, h_dec: torch.Tensor) -> torch.Tensor:
        glimpse, h_dec = _broadcast_lead(glimpse, h_dec)
        return torch.cat([glimpse, h_dec], -1)

    def posterior(self, h_enc: torch.Tensor):
        return diag_normal(self.head(h_enc))

    def forward(self, x: torch.Tensor, record: Optional[dict] = None) -> None:
        self._register("draw_encoder")
        self._run(x, record)


@register_guide("convdraw", from_model=True, exclude=("hidden",))
class ConvDRAWGuide(_GuideOf):
    """ConvDRAW's q(z_t | x, z_<t): a ConvLSTM encoder on [read(x, x - mean(c)), h_dec_{t-1}], a conv head for the
    mean and scale of the z_t feature map. For a conditional model the program is ``guide(x, context)``.

    Args:
        model: the :class:`~pyrovae.models.ConvDRAW`.
        hidden: encoder ConvLSTM channels (default: the decoder's).
    """

    def __init__(self, model, hidden: Optional[int] = None):
        from pyrovae.models.draw import ConvDRAW, downsampler

        super().__init__(model, ConvDRAW)
        hidden = model.hidden if hidden is None else hidden
        self.attention = False
        self.read_net = downsampler(2 * model.x_shape[0], hidden)
        self.encoder = ConvLSTMCell(2 * hidden, hidden, *model.grid, model.kernel)
        self.head = nn.Conv2d(hidden, 2 * model.z_channels, model.kernel, padding=model.kernel // 2)

    def read(self, x: torch.Tensor, error: torch.Tensor, h_dec: torch.Tensor):
        x, error = torch.broadcast_tensors(x, error)
        return conv2d(self.read_net, torch.cat([x, error], -3)), None

    def encoder_input(self, glimpse: torch.Tensor, h_dec: torch.Tensor) -> torch.Tensor:
        lead = torch.broadcast_shapes(glimpse.shape[:-3], h_dec.shape[:-3])
        return torch.cat([glimpse.expand(*lead, *glimpse.shape[-3:]), h_dec.expand(*lead, *h_dec.shape[-3:])], -3)

    def posterior(self, h_enc: torch.Tensor):
        return diag_normal(conv2d(self.head, h_enc).movedim(-3, -1)).to_event(2)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, record: Optional[dict] = None) -> None:
        self._register("convdraw_encoder")
        self._run(x, record, context)

    def _extra(self, context: Optional[torch.Tensor]) -> tuple:
        ctx = self.model.context(context)
        return () if ctx is None else (ctx,)


def _broadcast_lead(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand the leading dims of two ``[*, D]`` tensors to a common shape (for a concatenation)."""
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return a.expand(*lead, a.shape[-1]), b.expand(*lead, b.shape[-1])
