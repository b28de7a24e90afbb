"""Sentence VAE (Bowman et al. 2016) and its RNN language-model baseline, as Pyro programs on padded text.

Both take a batch of :class:`pyrovae.data.text.Sentences`, ``model(tokens, lengths)``: ``tokens`` ``[B, T + 1]`` =
``<sos> w_1 .. w_L <eos> <pad>..``, ``lengths`` ``[B]`` = ``L + 1``. The decoder is teacher-forced on
``tokens[:, :-1]`` and scores ``tokens[:, 1:]`` with a Categorical per position, masked at ``t >= lengths``::

    z ~ N(0, I)                                      (SentenceVAE only; none in RNNLM)
    h_0 = tanh(W z + b)                              (RNNLM: h_0 = 0)
    h_t = RNN(embed(x_{t-1}), h_{t-1}),  x_t ~ Categorical(softmax(V h_t)),  t < L + 1

Word dropout (Bowman et al. 2016, section 3.2) replaces decoder inputs (never ``<sos>``, never the targets)
by ``<unk>`` with probability ``word_dropout`` while training: in train mode with gradients on, so that an
evaluation under ``torch.no_grad`` (log-likelihood, validation ELBO) scores the model without it.
"""
from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.nn.likelihoods import PackedCategorical
from pyrovae.nn.recurrent import RNN, RNN_KINDS, check_int
from pyrovae.utils.registry import TEXT_GROUP, register_model
from pyrovae.data.text import check_batch, token_mask


#: indices fixed by :class:`pyrovae.data.text.Vocab`
PAD, SOS, EOS, UNK = 0, 1, 2, 3


class SentenceDecoder(nn.Module):
    """Embedding, RNN (:class:`pyrovae.nn.recurrent.RNN`, ``lstm`` or ``gru``: cells the captured step can record) and a
    softmax layer; the initial state is a function of ``z`` or zero.

    Args:
        vocab_size: V, including ``<pad> <sos> <eos> <unk>``.
        z_dim: size of the code that initialises the state (None: zero initial state, a language model).
        embed_dim, hidden_dim, num_layers, rnn: the network.
        word_dropout: probability of replacing a decoder input (after ``<sos>``) by ``<unk>`` while training.
    """

    def __init__(self, vocab_size: int, z_dim: Optional[int] = None, embed_dim: int = 353, hidden_dim: int = 191, num_layers: int = 1, rnn: str = "lstm", word_dropout: float = 0.0):
        super().__init__()
        self.vocab_size, self.z_dim = check_int("vocab_size", vocab_size, 5), z_dim
        self.hidden_dim, self.num_layers, self.rnn_type = check_int("hidden_dim", hidden_dim), check_int("num_layers", num_layers), rnn
        if not (isinstance(word_dropout, (int, float)) and 0.0 <= word_dropout <= 1.0):
            raise ValueError(f"word_dropout={word_dropout!r} must be a probability in [0, 1] (Bowman et al. use 0.25 to 0.5; 1.0 hides every input word)")
        self.word_dropout = float(word_dropout)
        self.embed = nn.Embedding(vocab_size, check_int("embed_dim", embed_dim))
        self.rnn = RNN(rnn, embed_dim, hidden_dim, num_layers)
        self.out = nn.Linear(hidden_dim, vocab_size)
        states = 2 if rnn == "lstm" else 1
        self.init = None if z_dim is None else nn.Linear(check_int("z_dim", z_dim), states * num_layers * hidden_dim)

    def initial_state(self, z: Optional[torch.Tensor], batch: int, like: torch.Tensor):
        """RNN state ``[layers, N, H]`` (a pair for an LSTM) from ``z`` ``[N, D]``, or zeros when ``z`` is None."""
        if z is None or self.init is None:
            return self.rnn.initial_state(like, batch)
        s = torch.tanh(self.init(z)).reshape(batch, -1, self.num_layers, self.hidden_dim).permute(1, 2, 0, 3).contiguous()
        return (s[0], s[1]) if self.rnn_type == "lstm" else s[0]

    def drop_words(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` with each position after the first replaced by ``<unk>`` with probability ``word_dropout``
        (only in train mode with gradients on)."""
        if self.word_dropout == 0.0 or not (self.training and torch.is_grad_enabled()):
            return inputs
        drop = torch.rand(inputs.shape, device=inputs.device) < self.word_dropout
        drop[..., 0] = False  # <sos> stays
        return inputs.masked_fill(drop, UNK)

    def hidden(self, inputs: torch.Tensor, z: Optional[torch.Tensor] = None, state=None):
        """RNN outputs ``[*batch, T, H]`` for ``inputs`` ``[B, T]`` and ``z`` ``[*batch, D]`` (particles may lead: the
        inputs are repeated for each), and the final state."""
        lead = inputs.shape[:-1] if z is None else z.shape[:-1]
        n = lead.numel()
        x = self.drop_words(inputs.expand(*lead, inputs.shape[-1]).reshape(n, -1))
        if state is None:
            state = self.initial_state(None if z is None else z.reshape(n, -1), n, inputs)
        h, state = self.rnn(self.embed(x), state)
        return h.reshape(*lead, inputs.shape[-1], self.hidden_dim), state

    def forward(self, inputs: torch.Tensor, z: Optional[torch.Tensor] = None, state=None):
        """Logits ``[*batch, T, V]`` at every position (see :meth:`hidden`), and the final state."""
        h, state = self.hidden(inputs, z, state)
        return self.out(h), state

    @torch.no_grad()
    def generate(self, z: Optional[torch.Tensor], num: int, max_length: int = 50, greedy: bool = True, temperature: float = 1.0) -> torch.Tensor:
        """Decode ``num`` sentences (``z`` ``[num, D]`` or None): argmax (``greedy``) or sampled words, fed back
        one at a time, up to ``<eos>`` or ``max_length`` words. Returns ``[num, max_length + 1]`` word indices
        (``<eos>`` then ``<pad>`` after each sentence's end)."""
        device = self.out.weight.device
        word = torch.full((num, 1), SOS, dtype=torch.long, device=device)
        state = self.initial_state(z, num, word)
        out, done = [], torch.zeros(num, dtype=torch.bool, device=device)
        for _ in range(max_length + 1):
            h, state = self.rnn(self.embed(word), state)
            logits = self.out(h[:, -1])
            logits[:, [PAD, SOS]] = -float("inf")  # never targets
            word = logits.argmax(-1) if greedy else torch.distributions.Categorical(logits=logits / temperature).sample()
            word = word.masked_fill(done, PAD)
            out.append(word)
            done |= word == EOS
            word = word[:, None]
            if bool(done.all()):
                break
        return torch.stack(out, 1)


class _TextModel(nn.Module):
    """The observation site shared by the VAE and the language model."""

    decoder: SentenceDecoder

    def observe(self, tokens: torch.Tensor, lengths: torch.Tensor, z: Optional[torch.Tensor]) -> None:
        h, _ = self.decoder.hidden(tokens[:, :-1], z)
        mask = token_mask(tokens, lengths)
        where = mask.expand(h.shape[:-1])
        # the vocabulary-sized softmax on the predicted positions only (not on the padding): PackedCategorical
        logits = self.decoder.out(h[where])
        pyro.sample("x", PackedCategorical(logits, where).mask(mask).to_event(1), obs=tokens[:, 1:])

    def generate(self, z: Optional[torch.Tensor], num: int, max_length: int = 50, greedy: bool = True, temperature: float = 1.0) -> torch.Tensor:
        return self.decoder.generate(z, num, max_length, greedy, temperature)


@register_model("sentence", guide="rnn", group=TEXT_GROUP, flags={"num_layers": "rnn_layers"}, choices={"rnn": RNN_KINDS})
class SentenceVAE(_TextModel):
    """Bowman et al. (2016)'s generative model: z ~ N(0, I), an RNN decoder initialised from z.

    Args:
        vocab_size: V (``len(vocab)``).
        z_dim: size of z (16 by default; Bowman et al. report 13).
        embed_dim: word embedding size.
        hidden_dim: RNN units (Bowman et al.'s LSTM: 191, with 353-d embeddings and 1 layer).
        num_layers: stacked RNN layers.
        rnn: recurrent cell, ``lstm`` or ``gru``.
        word_dropout: decoder input dropout to ``<unk>`` while training, the probability p.
    """

    def __init__(self, vocab_size: int, z_dim: int = 16, embed_dim: int = 353, hidden_dim: int = 191, num_layers: int = 1, rnn: str = "lstm", word_dropout: float = 0.0):
        super().__init__()
        self.z_dim = check_int("z_dim", z_dim)
        self.decoder = SentenceDecoder(vocab_size, z_dim, embed_dim, hidden_dim, num_layers, rnn, word_dropout)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        check_batch(tokens, lengths, self.decoder.vocab_size)
        pyro.module("sentence_decoder", self)
        batch = tokens.shape[0]
        with pyro.plate("data", batch):
            z = pyro.sample("z", dist.Normal(tokens.new_zeros(batch, self.z_dim, dtype=self.decoder.out.weight.dtype), 1.0).to_event(1))
            self.observe(tokens, lengths, z)

    @torch.no_grad()
    def sample_prior(self, num: int, max_length: int = 50, greedy: bool = True) -> torch.Tensor:
        z = torch.randn(num, self.z_dim, device=self.decoder.out.weight.device)
        return self.generate(z, num, max_length, greedy)


@register_model("lm", guide="none", group=TEXT_GROUP, flags={"num_layers": "rnn_layers"}, choices={"rnn": RNN_KINDS})
class RNNLM(_TextModel):
    """The baseline: the same decoder with a zero initial state and no latent variable. Every objective's
    loss is then -log p(x) (the guide has no sites); pair it with :class:`NoLatentGuide`.

    Args:
        vocab_size, embed_dim, hidden_dim, num_layers, rnn, word_dropout: as :class:`SentenceVAE`.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 353, hidden_dim: int = 191, num_layers: int = 1, rnn: str = "lstm", word_dropout: float = 0.0):
        super().__init__()
        self.decoder = SentenceDecoder(vocab_size, None, embed_dim, hidden_dim, num_layers, rnn, word_dropout)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        check_batch(tokens, lengths, self.decoder.vocab_size)
        pyro.module("lm_decoder", self)
        with pyro.plate("data", tokens.shape[0]):
            self.observe(tokens, lengths, None)

    @torch.no_grad()
    def sample_prior(self, num: int, max_length: int = 50, greedy: bool = True) -> torch.Tensor:
        return self.generate(None, num, max_length, greedy)
