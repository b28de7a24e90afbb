"""Text as data: a vocabulary, sentences as padded index tensors with lengths, length buckets, PTB.

A corpus of sentences becomes :class:`Sentences`, a named tuple ``(tokens, lengths)`` of two tensors on
the device, so that a batch is passed to a model as ``model(tokens, lengths)``:

- ``tokens`` ``[N, T + 1]`` (long): ``<sos> w_1 ... w_L <eos> <pad> ...``;
- ``lengths`` ``[N]`` (long): ``L + 1``, the number of tokens a language model predicts (the words and
  ``<eos>``). A decoder reads ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]`` at the positions
  ``t < lengths``; everything beyond is padding that no loss may read.

:class:`BucketBatches` draws batches of sentences of similar length, each cut to its longest sentence
rounded up to a multiple of ``pad_multiple`` (little padding, and few distinct shapes for the trainer's
captured step). Perplexity is ``exp(total NLL / total predicted tokens)``, ``<eos>`` included.

Penn Treebank: Mikolov's split (``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt``, one sentence per
line, 10k words with ``<unk>``), loaded by ``load_dataset("ptb")`` (:func:`load_ptb`).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from pyro.infer.util import is_validation_enabled

from pyrovae.utils.files import atomic_write
from pyrovae.data.core import DataError, PathLike, fields_to, register_loader, resolve, select_rows

PAD, SOS, EOS, UNK = "<pad>", "<sos>", "<eos>", "<unk>"
SPECIALS = (PAD, SOS, EOS, UNK)
#: what to do with a sentence of more than ``max_length`` words
OVERLONG = ("cut", "drop")


class Vocab:
    """Word <-> index maps with the special tokens ``<pad>`` (0), ``<sos>`` (1), ``<eos>`` (2), ``<unk>`` (3).

    Args:
        words: the other words, in index order (specials among them are skipped).
    """

    def __init__(self, words: Iterable[str]):
        self.itos: list[str] = list(SPECIALS) + [w for w in dict.fromkeys(words) if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.pad, self.sos, self.eos, self.unk = (self.stoi[s] for s in SPECIALS)

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], max_size: Optional[int] = None, min_count: int = 1) -> "Vocab":
        """The words of ``sentences`` by decreasing count (ties alphabetical), at most ``max_size`` of them
        (specials included), each seen at least ``min_count`` times; the rest become ``<unk>``."""
        counts = Counter(w for s in sentences for w in s if w not in SPECIALS)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            if max_size <= len(SPECIALS):
                raise ValueError(f"max_size={max_size} leaves no room for words beside the {len(SPECIALS)} specials; pass max_size > {len(SPECIALS)} or None")
            words = words[: max_size - len(SPECIALS)]
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words: Sequence[str]) -> list[int]:
        return [self.stoi.get(w, self.unk) for w in words]

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Words of ``ids`` joined by spaces, without ``<sos>``/``<pad>``, up to the first ``<eos>``."""
        out = []
        for i in (int(i) for i in ids):
            if i == self.eos and stop_at_eos:
                break
            if i in (self.sos, self.pad):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(out)

    def decode_batch(self, tokens: torch.Tensor) -> list[str]:
        return [self.decode(row) for row in tokens.tolist()]

    def state_dict(self) -> dict:
        return {"itos": self.itos}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocab":
        return cls(state["itos"][len(SPECIALS):])


class Sentences(NamedTuple):
    """Padded sentences: ``tokens`` ``[N, T + 1]`` = ``<sos> words <eos> <pad>...`` and ``lengths`` ``[N]`` =
    words + 1 (the predicted tokens). A tuple of tensors: ``model(*sentences)`` runs a model on them."""

    tokens: torch.Tensor
    lengths: torch.Tensor

    def __getitem__(self, index):
        """An int gives a field (``tokens, lengths = sentences``); a slice, an index tensor or a mask gives those
        sentences (:func:`pyrovae.data.core.select_rows`)."""
        return select_rows(self, index)

    @property
    def shape(self) -> torch.Size:
        """The tokens' shape ``[N, T + 1]`` (``shape[0]``: the number of sentences, as for a data tensor)."""
        return self.tokens.shape

    @property
    def num_sentences(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        """Predicted tokens in all (``<eos>`` included), the denominator of perplexity."""
        return int(self.lengths.sum())

    def take(self, index) -> "Sentences":
        return Sentences(self.tokens[index], self.lengths[index])

    def trim(self, multiple: int = 1) -> "Sentences":
        """The same sentences with the padding beyond the longest one (rounded up to ``multiple``) cut off."""
        width = min(self.tokens.shape[1] - 1, _round_up(int(self.lengths.max()), multiple)) if self.num_sentences else 0
        return Sentences(self.tokens[:, : width + 1], self.lengths)

    def to(self, device) -> "Sentences":
        return fields_to(self, device)

    def chunks(self, batch_size: int) -> list["Sentences"]:
        """The sentences sorted by length in parts of ``batch_size``, each cut to its own width (:func:`buckets`): how
        :meth:`pyrovae.train.Trainer.validate` evaluates them, without running the RNNs over other sentences' padding."""
        return buckets(self, batch_size)


def token_mask(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: True at the predicted positions ``t < lengths`` of ``tokens`` ``[B, T + 1]``."""
    return torch.arange(tokens.shape[1] - 1, device=tokens.device) < lengths[:, None]


def check_batch(tokens: torch.Tensor, lengths: torch.Tensor, vocab_size: int) -> None:
    """Shape and dtype checks of a batch of :class:`Sentences`; range checks only while Pyro validation is on
    (each is a host read, which a captured step cannot hold)."""
    if tokens.dim() != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} and lengths {tuple(lengths.shape)}; expected [B, T + 1] and [B] "
            "(pyrovae.data.text.Sentences: <sos> words <eos> padding, lengths = words + 1)"
        )
    if tokens.dtype != torch.long:
        raise TypeError(f"tokens has dtype {tokens.dtype}; pass word indices as torch.long")
    if is_validation_enabled() and tokens.numel():
        if int(lengths.min()) < 1 or int(lengths.max()) > tokens.shape[1] - 1:
            raise ValueError(f"lengths must be in [1, {tokens.shape[1] - 1}] for tokens of width {tokens.shape[1]}; got [{int(lengths.min())}, {int(lengths.max())}]")
        if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
            raise ValueError(f"token indices must be in [0, {vocab_size}) for vocab_size={vocab_size}; got [{int(tokens.min())}, {int(tokens.max())}]")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_sentences(sentences: Sequence[Sequence[int]], vocab: Vocab, device: Union[str, torch.device] = "cpu") -> Sentences:
    """Index lists (without ``<sos>``/``<eos>``) -> :class:`Sentences` padded to the longest one."""
    n, width = len(sentences), max((len(s) for s in sentences), default=0) + 1
    tokens = torch.full((n, width + 1), vocab.pad, dtype=torch.long)
    tokens[:, 0] = vocab.sos
    words = torch.as_tensor([len(s) for s in sentences], dtype=torch.long)
    flat = torch.as_tensor([i for s in sentences for i in s], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(n), words)
    starts = torch.repeat_interleave(torch.cumsum(words, 0) - words, words)
    tokens[rows, torch.arange(len(flat)) - starts + 1] = flat
    tokens[torch.arange(n), words + 1] = vocab.eos
    lengths = words + 1
    return Sentences(tokens.to(device), lengths.to(device))


def encode_corpus(texts: Sequence[Sequence[str]], vocab: Vocab, device: Union[str, torch.device] = "cpu") -> Sentences:
    """Word lists -> :class:`Sentences` (unknown words become ``<unk>``)."""
    return pad_sentences([vocab.encode(s) for s in texts], vocab, device)


def limit_length(texts: list, max_length: Optional[int], overlong: str) -> tuple[list, int]:
    """Apply ``max_length`` (words) to ``texts``: ``cut`` keeps the first words, ``drop`` leaves the sentence
    out. Returns the texts and how many sentences were over the limit."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r} is not known; choose 'cut' (keep the first max_length words) or 'drop' (leave such sentences out)")
    if max_length is None:
        return texts, 0
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length={max_length!r} must be a positive number of words, or None for no limit")
    over = sum(len(s) > max_length for s in texts)
    if overlong == "cut":
        return [s[:max_length] for s in texts], over
    return [s for s in texts if len(s) <= max_length], over


# ----------------------------------------------------------------------------------------------------
# Batching


class BucketBatches:
    """Batches of sentences of similar length, each cut to its longest sentence rounded up to ``pad_multiple``.

    Each epoch sorts the sentences by length with ties in random order, cuts the order into batches of
    ``batch_size`` and shuffles the full batches (a smaller remainder comes last). The interface is
    :class:`pyrovae.data.Batches`'s: ``permutation()`` gives an epoch's order of sentences and
    ``batch(perm, i)`` its ``i``-th batch, so an epoch can be resumed from the same ``perm``.

    Args:
        data: the sentences, on their device.
        batch_size: sentences per batch.
        pad_multiple: batch widths are multiples of this (fewer distinct shapes, a little more padding).
        shuffle: False gives the sentences sorted by length, batches in that order.
        generator: a ``torch.Generator`` on the data's device (None: the global RNG).
    """

    def __init__(self, data: Sentences, batch_size: int, pad_multiple: int = 8, shuffle: bool = True, generator: Optional[torch.Generator] = None):
        if not isinstance(data, Sentences):
            raise TypeError(f"data is a {type(data).__name__}; pass Sentences(tokens, lengths), e.g. load_dataset('ptb').train")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1, e.g. batch_size=32")
        if isinstance(pad_multiple, bool) or not isinstance(pad_multiple, int) or pad_multiple < 1:
            raise ValueError(f"pad_multiple={pad_multiple!r} must be an int >= 1 (1: cut each batch exactly to its longest sentence)")
        if data.num_sentences == 0:
            raise ValueError("data has no sentences; load a non-empty corpus")
        self.data, self.batch_size, self.pad_multiple, self.shuffle, self.generator = data, batch_size, pad_multiple, shuffle, generator
        self._lengths_cpu = data.lengths.cpu()
        self._perm: Optional[torch.Tensor] = None  # the epoch order whose batch widths are in _widths (held: no id reuse)
        self._widths: list[int] = []

    def __len__(self) -> int:
        return -(-self.data.num_sentences // self.batch_size)

    def permutation(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        n, device = self.data.num_sentences, self.data.lengths.device
        g = generator if generator is not None else self.generator
        if not self.shuffle:
            return torch.sort(self.data.lengths, stable=True).indices
        ties = torch.randperm(n, device=device, generator=g)
        order = ties[torch.sort(self.data.lengths[ties], stable=True).indices]
        full = n // self.batch_size
        blocks = order[: full * self.batch_size].view(full, self.batch_size)
        blocks = blocks[torch.randperm(full, device=device, generator=g)].reshape(-1)
        return torch.cat([blocks, order[full * self.batch_size :]])

    def _width(self, perm: torch.Tensor, index: int) -> int:
        if perm is not self._perm:  # one host read per epoch for all the batch widths
            lengths = self._lengths_cpu[perm.cpu()]
            self._widths = [int(lengths[i : i + self.batch_size].max()) for i in range(0, len(lengths), self.batch_size)]
            self._perm = perm
        return min(_round_up(self._widths[index], self.pad_multiple), self.data.tokens.shape[1] - 1)

    def batch(self, perm: torch.Tensor, index: int) -> Sentences:
        idx = perm[index * self.batch_size : (index + 1) * self.batch_size]
        width = self._width(perm, index)
        return Sentences(self.data.tokens[idx, : width + 1], self.data.lengths[idx])

    def epoch(self, perm: Optional[torch.Tensor] = None, start: int = 0) -> Iterator[Sentences]:
        perm = self.permutation() if perm is None else perm
        for i in range(start // self.batch_size, len(self)):
            yield self.batch(perm, i)

    def __iter__(self) -> Iterator[Sentences]:
        return self.epoch()


def buckets(data: Sentences, batch_size: int, pad_multiple: int = 8) -> list[Sentences]:
    """``data`` sorted by length, in batches cut to their width (for evaluation); with :func:`unsort` the
    per-sentence results come back in ``data``'s order."""
    b = BucketBatches(data, batch_size, pad_multiple, shuffle=False)
    perm = b.permutation()
    return [b.batch(perm, i) for i in range(len(b))]


def bucket_order(data: Sentences) -> torch.Tensor:
    """The order of :func:`buckets` (sentences sorted by length, stable)."""
    return torch.sort(data.lengths, stable=True).indices


def unsort(values: torch.Tensor, data: Sentences) -> torch.Tensor:
    """Per-sentence ``values`` computed in :func:`buckets` order, put back in ``data``'s order."""
    out = torch.empty_like(values)
    out[bucket_order(data).to(values.device)] = values
    return out


def perplexity(nll_per_sentence: torch.Tensor, lengths: torch.Tensor) -> float:
    """``exp(sum NLL / sum lengths)``: per-token perplexity over all predicted tokens, ``<eos>`` included."""
    return math.exp(float(nll_per_sentence.sum()) / float(lengths.sum()))


# ----------------------------------------------------------------------------------------------------
# Penn Treebank

PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")


@dataclass
class TextSplits:
    """Train / validation / test :class:`Sentences` on one device, with their :class:`Vocab`.

    ``max_length`` and ``overlong`` say what was done with long sentences; ``over_limit`` counts them per split.
    """

    train: Sentences
    valid: Optional[Sentences]
    test: Optional[Sentences]
    vocab: Vocab
    name: str
    max_length: Optional[int] = None
    overlong: str = "cut"
    over_limit: dict = field(default_factory=dict)
    binarize: str = "none"  # text has no binarization; kept so that code written for DataSplits runs unchanged

    @property
    def x_shape(self) -> tuple:
        """Not a fixed shape: sentences have their own lengths. ``(len(vocab),)`` for code that wants one."""
        return (len(self.vocab),)

    def batches(self, batch_size: int, pad_multiple: int = 8) -> BucketBatches:
        """The training sentences in length buckets, for ``Trainer.fit`` (which takes any such batch source)."""
        return BucketBatches(self.train, batch_size, pad_multiple)

    def describe(self) -> str:
        """One line for logs: sizes, vocabulary and what happened to sentences over the length limit."""
        sizes = ", ".join(f"{k} {getattr(self, k).num_sentences}" for k in ("train", "valid", "test") if getattr(self, k) is not None)
        if self.max_length is None:
            limit = "no length limit"
        else:
            verb = "cut to" if self.overlong == "cut" else "dropped above"
            counts = ", ".join(f"{k} {v}" for k, v in self.over_limit.items())
            limit = f"sentences longer than {self.max_length} words {verb} {self.max_length} words ({counts})" if self.overlong == "cut" else f"sentences longer than {self.max_length} words dropped ({counts})"
        return f"{self.name}: {sizes} sentences; vocabulary {len(self.vocab)} (with <pad> <sos> <eos> <unk>); {limit}"


#: limits of a corpus, checked before its tensors are built: words per sentence (PTB's longest has 82; each step's
#: decoder outputs grow with it), padded tokens of a split, and words in the vocabulary
TEXT_MAX_WORDS = 2000
TEXT_MAX_TOKENS = 2**27
TEXT_MAX_VOCAB = 200_000


def read_lines(path: Path) -> list[list[str]]:
    """One sentence per line, words separated by white space; empty lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text ({type(e).__name__}: {e}); point --data-dir / PYROVAE_DATA at a good copy") from e
    return [line.split() for line in text.splitlines() if line.strip()]


def load_ptb(
    data_dir: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    max_length: Optional[int] = None,
    overlong: str = "cut",
    vocab_size: Optional[int] = None,
    download: bool = True,
    **unused,
) -> TextSplits:
    """Penn Treebank, Mikolov's split, as :class:`TextSplits` (also ``load_dataset("ptb", ...)``).

    Args:
        data_dir: folder searched first (see :func:`pyrovae.data.resolve`; files in ``ptb/`` or the folder itself).
        device: where the tensors live.
        max_length: words per sentence at most (None: no limit; PTB's longest has 82). Applies to every split.
        overlong: ``cut`` (keep the first ``max_length`` words; the sentence still ends with ``<eos>``) or ``drop``.
        vocab_size: keep the most frequent words only (None: every training word, 10k for PTB).
        unused: options of image datasets (``binarize``, ``valid_size``, ``seed``), ignored.
    """
    limit_length([], max_length, overlong)  # validates both before reading anything
    folder = resolve("ptb", data_dir, download=download)
    texts = {split: read_lines(folder / f"ptb.{split}.txt") for split in ("train", "valid", "test")}
    for split, t in texts.items():
        if not t:
            raise DataError(f"{folder / f'ptb.{split}.txt'} holds no sentence (it is empty or blank): one sentence per line is expected; point --data-dir at a complete corpus")
    vocab = Vocab.build(texts["train"], max_size=vocab_size)
    if len(vocab) == len(SPECIALS):
        raise DataError(
            f"{folder / 'ptb.train.txt'} holds no word beside {' '.join(SPECIALS)}: there is nothing to learn a vocabulary from; "
            "point --data-dir at a corpus of words"
        )
    if len(vocab) > TEXT_MAX_VOCAB:
        raise DataError(
            f"{folder / 'ptb.train.txt'} has {len(vocab):,} distinct words; at most {TEXT_MAX_VOCAB:,} are accepted (each step's decoder outputs "
            f"are batch x words x vocabulary floats): keep the most frequent ones with load_dataset('ptb', vocab_size=N) (the rest become <unk>)"
        )
    over, out = {}, {}
    for split, t in texts.items():
        t, over[split] = limit_length(t, max_length, overlong)
        if not t:
            raise DataError(f"{folder / f'ptb.{split}.txt'} has no sentences within max_length={max_length}; pass a larger max_length")
        longest = max(len(s) for s in t)
        if len(t) * (longest + 2) > TEXT_MAX_TOKENS or longest > TEXT_MAX_WORDS:
            raise DataError(
                f"{folder / f'ptb.{split}.txt'} has a sentence of {longest:,} words; sentences of at most {TEXT_MAX_WORDS:,} words and "
                f"corpora of at most {TEXT_MAX_TOKENS:,} padded tokens are built ({len(t):,} sentences padded to it: {len(t) * (longest + 2):,}): "
                f"pass max_length=N (at most {TEXT_MAX_WORDS}) to cut longer sentences, or with overlong='drop' to leave them out"
            )
        out[split] = encode_corpus(t, vocab, device)
    return TextSplits(out["train"], out["valid"], out["test"], vocab, "ptb", max_length, overlong, over)


register_loader("ptb", PTB_FILES, hint="Mikolov's PTB split (simple-examples/data/ptb.{train,valid,test}.txt)")(load_ptb)
