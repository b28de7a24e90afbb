"""A hand-written PyTorch DRAW: the reference ``benchmarks/speed.py`` times pyrovae's DRAW against.

It runs the very same modules as a :class:`pyrovae.models.DRAW` / :class:`pyrovae.guides.DRAWGuide` pair, one
recurrence with no Pyro, no distribution objects and no traces: per step it reads, updates the encoder LSTM,
draws z_t = mu + sigma * eps, updates the decoder LSTM and writes, accumulating

    log w = log p(x | c_T) + sum_t [log N(z_t; 0, I) - log N(z_t; mu_t, sigma_t)]

(the ELBO is the mean of ``log w``). The noise is drawn in the same order and shapes as the Pyro program's, so with
the same seed both give the same number (``tests/test_draw.py`` checks this). The interface is
:class:`reference.HandVAE`'s (``elbo_loss``, ``parameters``), so :class:`reference.HandTrainer` trains it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyrovae.nn.attention import read, write
from pyrovae.nn.recurrent import LSTMState

LOG_2PI_HALF = 0.5 * math.log(2 * math.pi)


class HandDRAW:
    def __init__(self, model, guide):
        self.model, self.guide = model, guide

    def parameters(self) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self.guide.parameters()]

    def log_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x, z) - log q(z | x)`` per datum, ``[B]``, one sample of z."""
        m, g = self.model, self.guide
        batch = x.shape[0]
        dec = enc = None
        h_dec = x.new_zeros(batch, m.hidden)
        dec = LSTMState(h_dec, h_dec)
        enc = LSTMState(x.new_zeros(batch, g.encoder.hidden_dim), x.new_zeros(batch, g.encoder.hidden_dim))
        canvas = torch.zeros_like(x)
        log_w = 0.0
        for _ in range(m.steps):
            error = x - torch.sigmoid(canvas)
            if m.attention:
                w = g.read_window(dec.h)
                glimpse = torch.cat([read(x, w).flatten(1), read(error, w).flatten(1)], -1)
            else:
                glimpse = torch.cat([x.flatten(1), error.flatten(1)], -1)
            enc = g.encoder(torch.cat([glimpse, dec.h], -1), enc)
            loc, raw = g.head(enc.h).chunk(2, -1)
            scale = F.softplus(raw) + 1e-4
            eps = torch.randn_like(loc)
            z = loc + scale * eps
            # log N(z; 0, 1) - log N(z; loc, scale): the 2 pi terms cancel
            log_w = log_w + (0.5 * eps.pow(2) - 0.5 * z.pow(2) + scale.log()).sum(-1)
            dec = m.decoder(z, dec)
            patch = m.write_patch(dec.h)
            if m.attention:
                n = m.write_size
                canvas = canvas + write(patch.reshape(batch, -1, n, n), m.write_window(dec.h))
            else:
                canvas = canvas + patch.reshape(x.shape)
        return log_w - F.binary_cross_entropy_with_logits(canvas, x, reduction="none").sum((1, 2, 3))

    def elbo_loss(self, x: torch.Tensor, num_particles: int = 1) -> torch.Tensor:
        """-ELBO per datum (one sample), as pyrovae's ``ELBO()`` trains it."""
        if num_particles != 1:
            raise ValueError("HandDRAW times the one-sample ELBO only")
        return -self.log_weights(x).mean()

    def iwae_loss(self, x: torch.Tensor, num_particles: int) -> torch.Tensor:
        raise ValueError("HandDRAW times the one-sample ELBO only")
