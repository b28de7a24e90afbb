"""Guides for the text models of :mod:`pyrovae.models.sentence`: an RNN encoder q(z | x) and the empty guide."""
from __future__ import annotations

import pyro
import torch
from torch import nn

from pyrovae.nn import diag_normal
from pyrovae.nn.recurrent import RNN, RNN_KINDS, check_int
from pyrovae.utils.registry import TEXT_GROUP, register_guide
from pyrovae.data.text import check_batch


@register_guide("none")
class NoLatentGuide(nn.Module):
    """The guide of a model without latent variables: a Pyro program with no sites."""

    def forward(self, *args, **kwargs) -> None:
        return None


@register_guide("rnn", group=TEXT_GROUP, flags={"num_layers": "rnn_layers"}, choices={"rnn": RNN_KINDS})
class SentenceEncoder(nn.Module):
    """q(z | x) = N(mu(h), diag sigma(h)^2), h the final state of an RNN over the sentence's words and ``<eos>``
    (the backward direction too when ``bidirectional``). Padding is never read: the forward state is taken at
    each sentence's last token and the backward RNN runs over the sentence reversed within its length.

    Args:
        vocab_size, z_dim: as :class:`SentenceVAE`.
        embed_dim: word embedding size.
        hidden_dim: RNN units.
        num_layers: stacked RNN layers.
        rnn: recurrent cell, ``lstm`` or ``gru``.
        bidirectional: also read the sentence right to left, concatenating the two final states.
    """

    def __init__(self, vocab_size: int, z_dim: int = 16, embed_dim: int = 353, hidden_dim: int = 191, num_layers: int = 1, rnn: str = "lstm", bidirectional: bool = False):
        super().__init__()
        self.vocab_size, self.z_dim = check_int("vocab_size", vocab_size, 5), check_int("z_dim", z_dim)
        self.embed = nn.Embedding(vocab_size, check_int("embed_dim", embed_dim))
        self.forward_rnn = RNN(rnn, embed_dim, check_int("hidden_dim", hidden_dim), check_int("num_layers", num_layers))
        self.backward_rnn = RNN(rnn, embed_dim, hidden_dim, num_layers) if bidirectional else None
        self.head = nn.Linear(hidden_dim * (2 if bidirectional else 1), 2 * z_dim)

    def features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` (``[B, 2H]`` bidirectional): the top layer's output at each sentence's last token."""
        words = tokens[:, 1:]  # w_1 .. w_L <eos> <pad> ..
        width = words.shape[1]
        last = (lengths - 1).clamp_min(0)[:, None, None]
        h, _ = self.forward_rnn(self.embed(words))
        feats = [h.gather(1, last.expand(-1, 1, h.shape[-1]))[:, 0]]
        if self.backward_rnn is not None:
            t = torch.arange(width, device=tokens.device)
            rev = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # reverse within the length
            hb, _ = self.backward_rnn(self.embed(words.gather(1, rev)))
            feats.append(hb.gather(1, last.expand(-1, 1, hb.shape[-1]))[:, 0])
        return torch.cat(feats, -1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        check_batch(tokens, lengths, self.vocab_size)
        pyro.module("sentence_encoder", self)
        with pyro.plate("data", tokens.shape[0]):
            pyro.sample("z", diag_normal(self.head(self.features(tokens, lengths))))

    @torch.no_grad()
    def mean(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The posterior mean E_q[z | x], ``[B, D]``."""
        return self.head(self.features(tokens, lengths))[..., : self.z_dim]
