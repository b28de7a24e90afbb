"""DRAW (Gregor et al. 2015) and convolutional DRAW (Gregor et al. 2016) as Pyro programs.

Generative model, for t = 1 .. T, then the data::

    z_t ~ p(z_t | h_dec_{t-1})           N(0, I) for DRAW; a learned conv prior (and context) for ConvDRAW
    h_dec_t = LSTM_dec(h_dec_{t-1}, z_t)
    c_t = c_{t-1} + write(h_dec_t)       a full-image linear map, or an N x N attention patch
    x ~ p(x | c_T)                       Bernoulli(sigmoid(c_T)), or a Gaussian / continuous Bernoulli

Each step's ``z_t`` is its own site ``z_1 .. z_T`` inside ``pyro.plate("data")`` (``pyro.markov`` over steps),
so every objective sees T latent sites per data point. The guides (:mod:`pyrovae.guides.draw`) run the same
decoder recurrence, because q(z_t | x, z_<t) reads h_dec_{t-1} and the canvas c_{t-1}: a guide is built from
its model and calls the model's :meth:`step`.

Sharing a step between guide and model: when the model replays the guide's sample ``z_t`` (the same tensor) on
the same previous state, the step is the same function of the same inputs, so the model reuses the guide's
result instead of recomputing it (with gradients on; ``share_steps=False`` turns this off). The log weights are
exactly log p(x, z_1:T) - log q(z_1:T | x) either way (``tests/test_draw.py`` checks both).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.nn.attention import INITS as ATTENTION_INITS, Attention, Window, box, write
from pyrovae.nn.likelihoods import LIKELIHOODS, likelihood_head
from pyrovae.utils.registry import DRAW_GROUP, register_model
from pyrovae.nn import diag_normal
from pyrovae.nn.recurrent import ConvLSTMCell, LSTMCell, LSTMState, conv2d


class DrawState(NamedTuple):
    dec: LSTMState
    canvas: torch.Tensor


def check_image_shape(x_shape: Sequence[int], what: str, multiple: int = 1) -> tuple[int, int, int]:
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) != 3 or min(x_shape) < 1:
        raise ValueError(f"{what} needs images of shape (channels, height, width); got x_shape={x_shape}. Reshape flat data, e.g. to (1, 28, 28)")
    if x_shape[1] % multiple or x_shape[2] % multiple:
        raise ValueError(f"{what} needs height and width divisible by {multiple} (28 x 28 or 32 x 32 images); got x_shape={x_shape}")
    return x_shape


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


class RecurrentCanvasModel(nn.Module):
    """What DRAW and ConvDRAW share: the canvas, the likelihood on it, the step memo and the pictures."""

    guide_name = ""  # the registry pairs the model with this guide (it runs the model's decoder)
    pyro_name = ""  # its pyro.module name

    def __init__(self, x_shape: Sequence[int], steps: int, likelihood: str, scale: Optional[float], share_steps: bool):
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.steps = steps
        self.likelihood_name = likelihood
        self.likelihood, self.scale, factor = likelihood_head(likelihood, scale)
        self.canvas_channels = self.x_shape[0] * factor
        self.share_steps = share_steps
        self._memo: dict[tuple, tuple] = {}

    # --- the recurrence --------------------------------------------------------------------------
    def initial_state(self, x: torch.Tensor) -> DrawState:
        return self._memoised(self._initial_state, x)

    def _initial_state(self, x: torch.Tensor) -> tuple[DrawState, None]:
        batch = x.shape[0]
        return DrawState(self.decoder.initial(x, batch), x.new_zeros(batch, self.canvas_channels, *self.x_shape[1:])), None

    def step(self, z: torch.Tensor, state: DrawState, *extra) -> tuple[DrawState, Any]:
        """One decoder step: h_dec_t = LSTM(h_dec_{t-1}, z_t), c_t = c_{t-1} + write(h_dec_t). Returns the new
        state and what the step's write looked at (an attention :class:`~pyrovae.nn.attention.Window` or None)."""
        return self._memoised(self._step, z, state.dec.h, state.dec.c, state.canvas, *extra, full=True)

    def _memoised(self, fn, *inputs, full: bool = False):
        """``fn(*inputs)``, reusing the result the guide computed on these very tensors (identity, not value).

        The guide stores (:meth:`begin_guide`), the model takes; only with gradients on, where autograd keeps the
        states alive anyway (without them, storing T steps would cost memory that recomputing does not)."""
        key = (fn.__name__, *map(id, inputs))
        entry = self._memo.pop(key, None) if self._memo else None
        if entry is not None and all(a is b for a, b in zip(entry[0], inputs)):
            out = entry[1]
        else:
            out = fn(*inputs)
        if self._storing and torch.is_grad_enabled():
            self._memo[key] = (inputs, out)
        return out if full else out[0]

    _storing = False

    def begin_guide(self) -> None:
        """Called by the guide before its recurrence: forget earlier steps and store this run's."""
        self._memo.clear()
        self._storing = self.share_steps

    def end_guide(self) -> None:
        self._storing = False

    def canvas_mean(self, canvas: torch.Tensor) -> torch.Tensor:
        """The image the canvas stands for (the likelihood's mean): sigmoid(c) for Bernoulli, the location for a Gaussian."""
        if self.likelihood_name == "gaussian":
            return canvas[..., : self.x_shape[0], :, :]
        return torch.sigmoid(canvas)

    def observation(self, canvas: torch.Tensor) -> dist.Distribution:
        return self.likelihood.build(canvas, 3, self.scale)

    # --- pictures ----------------------------------------------------------------------------------
    @torch.no_grad()
    def trajectory(self, num: int, device=None, **kwargs) -> dict[str, torch.Tensor]:
        """Generate ``num`` images from the prior, keeping every step: ``canvas`` ``[T, num, C, H, W]`` (the
        likelihood mean of c_t) and, with write attention, ``write`` boxes ``[T, num, 4]`` (x0, y0, x1, y1)."""
        record: dict[str, list] = {}
        dummy = torch.zeros(num, *self.x_shape, device=device)
        self(dummy, **kwargs, record=record)
        return {k: torch.stack(v) for k, v in record.items()}

    def _record(self, record: Optional[dict], state: DrawState, looked: Any) -> None:
        if record is None:
            return
        record.setdefault("canvas", []).append(self.canvas_mean(state.canvas).reshape(-1, *self.x_shape))
        if isinstance(looked, Window):
            record.setdefault("write", []).append(box(looked).reshape(-1, 4))


@register_model(
    "draw", guide="draw", group=DRAW_GROUP, flags={"steps": "draw_steps", "z_dim": "draw_z", "hidden": "lstm_size"},
    choices={"likelihood": LIKELIHOODS, "attention_init": ATTENTION_INITS}, exclude=("share_steps",),
)
class DRAW(RecurrentCanvasModel):
    """DRAW: a recurrent VAE that draws on a canvas, with or without selective attention.

    The defaults are the paper's MNIST settings: 64 steps, 256-unit LSTMs, 100-d z, read 2 x 2, write 5 x 5.

    Args:
        x_shape: ``(channels, height, width)``.
        steps: T.
        z_dim: size of each z_t.
        hidden: decoder LSTM units.
        attention: write through an N x N attention window (``write_size``); without it, write is a linear map
            to the whole image. The guide reads with the same choice (``read_size``).
        read_size: N of the guide's N x N read grid (with ``attention``).
        write_size: N of the N x N write grid (with ``attention``).
        attention_init: where the read and write windows start (:class:`~pyrovae.nn.attention.Attention`):
            ``tile`` (the filters tile the image; the default) or ``unit`` (one-pixel filters a whole image apart,
            the start of runs made before 2026-12-07: the 2 x 2 read then sees only the blank corners of MNIST).
        likelihood: ``bernoulli`` (binary images), ``gaussian`` or ``continuous_bernoulli``.
        scale: fixed Gaussian scale (None: learned per pixel, written on extra canvas channels).
        share_steps: let the model reuse the guide's decoder steps (see the module docstring).
    """

    guide_name = "draw"
    pyro_name = "draw"

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 28, 28),
        steps: int = 64,
        z_dim: int = 100,
        hidden: int = 256,
        attention: bool = False,
        read_size: int = 2,
        write_size: int = 5,
        attention_init: str = "tile",
        likelihood: str = "bernoulli",
        scale: Optional[float] = None,
        share_steps: bool = True,
    ):
        x_shape = check_image_shape(x_shape, "DRAW")
        check_positive(steps=steps, z_dim=z_dim, hidden=hidden, read_size=read_size, write_size=write_size)
        super().__init__(x_shape, steps, likelihood, scale, share_steps)
        self.z_dim, self.hidden, self.attention = z_dim, hidden, bool(attention)
        self.read_size, self.write_size, self.attention_init = read_size, write_size, attention_init
        _, height, width = x_shape
        self.decoder = LSTMCell(z_dim, hidden)
        if self.attention:
            self.write_window = Attention(hidden, height, width, write_size, init=attention_init)
            self.write_patch = nn.Linear(hidden, self.canvas_channels * write_size**2)
        else:
            self.write_patch = nn.Linear(hidden, self.canvas_channels * height * width)

    def write(self, h: torch.Tensor) -> tuple[torch.Tensor, Optional[Window]]:
        """The canvas update of decoder state ``h`` ``[*, hidden]``, and its attention window (None without)."""
        patch = self.write_patch(h)
        if not self.attention:
            return patch.reshape(*h.shape[:-1], self.canvas_channels, *self.x_shape[1:]), None
        w = self.write_window(h)
        patch = patch.reshape(*h.shape[:-1], self.canvas_channels, self.write_size, self.write_size)
        return write(patch, w), w

    def _step(self, z, h, c, canvas) -> tuple[DrawState, Optional[Window]]:
        dec = self.decoder(z, LSTMState(h, c))
        update, w = self.write(dec.h)
        return DrawState(dec, canvas + update), w

    def forward(self, x: torch.Tensor, record: Optional[dict] = None) -> None:
        pyro.module(self.pyro_name, self)
        batch = x.shape[0]
        state = self.initial_state(x)
        prior = dist.Normal(x.new_zeros(batch, self.z_dim), 1.0).to_event(1)
        with pyro.plate("data", batch):
            for t in pyro.markov(range(self.steps)):
                z = pyro.sample(f"z_{t + 1}", prior)
                state, looked = self.step(z, state)
                self._record(record, state, looked)
            pyro.sample("x", self.observation(state.canvas), obs=x)


@register_model(
    "convdraw", guide="convdraw", group=DRAW_GROUP, flags={"steps": "draw_steps", "z_channels": "draw_z", "hidden": "lstm_size"},
    choices={"likelihood": LIKELIHOODS}, exclude=("kernel", "context_channels", "share_steps"),
)
class ConvDRAW(RecurrentCanvasModel):
    """Convolutional DRAW (Gregor et al. 2016, "Towards conceptual compression"), unconditional or conditional.

    Encoder and decoder are convolutional LSTMs on an (H/4 x W/4) grid; z_t is a ``z_channels`` feature map on that
    grid with a learned prior p(z_t | h_dec_{t-1}) (and the context); reading is a stride-4 conv stack on [x, x - mean(c)],
    writing a stride-4 transposed conv stack added to the canvas. With ``context_shape`` the program is
    ``model(x, context)``: the prior and the decoder see features of a context image (the GECO paper's setting).

    Args:
        x_shape: ``(channels, height, width)`` with height and width divisible by 4 (28 x 28, 32 x 32 x 3).
        steps: T.
        z_channels: channels of each z_t.
        hidden: ConvLSTM channels of the decoder (the guide's encoder has its own).
        kernel: ConvLSTM kernel size.
        likelihood, scale: as for :class:`DRAW`.
        context_shape: shape of the context image, or None for the unconditional model.
        context_channels: channels of the context features.
    """

    guide_name = "convdraw"
    pyro_name = "convdraw"

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 28, 28),
        steps: int = 8,
        z_channels: int = 4,
        hidden: int = 32,
        kernel: int = 5,
        likelihood: str = "bernoulli",
        scale: Optional[float] = None,
        context_shape: Optional[Sequence[int]] = None,
        context_channels: int = 16,
        share_steps: bool = True,
    ):
        x_shape = check_image_shape(x_shape, "ConvDRAW", multiple=4)
        check_positive(steps=steps, z_channels=z_channels, hidden=hidden, kernel=kernel, context_channels=context_channels)
        super().__init__(x_shape, steps, likelihood, scale, share_steps)
        self.z_channels, self.hidden, self.kernel = z_channels, hidden, kernel
        self.grid = (x_shape[1] // 4, x_shape[2] // 4)
        self.context_shape = None if context_shape is None else check_image_shape(context_shape, "ConvDRAW's context", multiple=4)
        ctx = 0
        if self.context_shape is not None:
            if self.context_shape[1:] != x_shape[1:]:
                raise ValueError(f"context_shape={self.context_shape} must have the images' height and width {x_shape[1:]}")
            ctx = context_channels
            self.context_net = downsampler(self.context_shape[0], context_channels)
        self.context_features = ctx
        self.decoder = ConvLSTMCell(z_channels + ctx, hidden, *self.grid, kernel)
        self.prior_head = nn.Conv2d(hidden + ctx, 2 * z_channels, kernel, padding=kernel // 2)
        self.write_net = upsampler(hidden, self.canvas_channels)

    def context(self, context: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Context features ``[B, context_channels, H/4, W/4]`` (None for the unconditional model)."""
        if self.context_shape is None:
            if context is not None:
                raise ValueError("this ConvDRAW is unconditional (context_shape=None) but was given a context; build it with context_shape")
            return None
        if context is None:
            raise ValueError(f"this ConvDRAW is conditional (context_shape={self.context_shape}): call it as model(x, context)")
        if tuple(context.shape[-3:]) != self.context_shape:
            raise ValueError(f"context of shape {tuple(context.shape)} does not fit context_shape={self.context_shape}")
        return self._memoised(self._context, context)  # the guide's features are the model's: steps can be shared

    def _context(self, context: torch.Tensor) -> tuple[torch.Tensor, None]:
        return conv2d(self.context_net, context), None

    def prior(self, h: torch.Tensor, ctx: Optional[torch.Tensor]) -> dist.Distribution:
        """p(z_t | h_dec_{t-1}, context): a diagonal Gaussian over the z feature map."""
        if ctx is not None:
            h, ctx = _broadcast_maps(h, ctx)
            h = torch.cat([h, ctx], -3)
        return diag_normal(conv2d(self.prior_head, h).movedim(-3, -1)).to_event(2)

    def _step(self, z, h, c, canvas, ctx=None) -> tuple[DrawState, None]:
        z = z.movedim(-1, -3)  # sites are [*, H/4, W/4, z_channels]: the event's last dim is the Normal's
        if ctx is not None:
            z, ctx = _broadcast_maps(z, ctx)
            z = torch.cat([z, ctx], -3)
        dec = self.decoder(z, LSTMState(h, c))
        return DrawState(dec, canvas + conv2d(self.write_net, dec.h)), None

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, record: Optional[dict] = None) -> None:
        pyro.module(self.pyro_name, self)
        ctx = self.context(context)
        state = self.initial_state(x)
        with pyro.plate("data", x.shape[0]):
            for t in pyro.markov(range(self.steps)):
                z = pyro.sample(f"z_{t + 1}", self.prior(state.dec.h, ctx))
                extra = () if ctx is None else (ctx,)
                state, looked = self.step(z, state, *extra)
                self._record(record, state, looked)
            pyro.sample("x", self.observation(state.canvas), obs=x)


def _broadcast_maps(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand the leading (batch, particle) dims of two feature maps ``[*, C, H, W]`` to a common shape."""
    lead = torch.broadcast_shapes(a.shape[:-3], b.shape[:-3])
    return a.expand(*lead, *a.shape[-3:]), b.expand(*lead, *b.shape[-3:])


def downsampler(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two stride-2 4 x 4 convolutions: an image to an (H/4 x W/4) feature map (ConvDRAW's read and context)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.ELU(), nn.Conv2d(out_channels, out_channels, 4, stride=2, padding=1)
    )


def upsampler(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two stride-2 4 x 4 transposed convolutions: an (H/4 x W/4) feature map to image size (ConvDRAW's write)."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, in_channels, 4, stride=2, padding=1), nn.ELU(), nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1)
    )
