"""The sentence VAE (Bowman et al. 2016): an LSTM decoder started from z, with KL annealing and word dropout.

Text comes as `Sentences(tokens, lengths)`, a tuple of tensors, so the model is `model(tokens, lengths)` and the
trainer takes length-bucketed batches (`splits.batches(...)`). `AnnealedELBO` raises the KL weight from 0 to 1 along
a logistic schedule and adds free bits; word dropout replaces decoder inputs by `<unk>`. Both fight posterior
collapse (a decoder that ignores z). `evaluate_text` gives the NLL, perplexity, KL and active units.

    PYROVAE_DATA=../shared/data python examples/sentence_vae.py   # Penn Treebank, 1 epoch (CPU: an hour or more)
    python examples/sentence_vae.py --smoke                       # 300 sentences of a toy grammar, seconds
"""

import argparse
import random

import pyro
import torch

from pyrovae.data import load_dataset
from pyrovae.data.text import TextSplits, Vocab, encode_corpus
from pyrovae.evaluate.text import evaluate_text
from pyrovae.guides import SentenceEncoder
from pyrovae.models import SentenceVAE
from pyrovae.objectives.sequence import AnnealedELBO
from pyrovae.train import Trainer


def toy_corpus(n: int, seed: int = 0) -> list[list[str]]:
    """Sentences of a small grammar, e.g. 'the red cat sees a small dog'."""
    rng = random.Random(seed)
    det, adj, noun, verb = ["the", "a"], ["red", "small", "old", "happy"], ["cat", "dog", "bird", "man"], ["sees", "likes", "follows"]
    phrase = lambda: [rng.choice(det)] + [rng.choice(adj) for _ in range(rng.randint(0, 2))] + [rng.choice(noun)]  # noqa: E731
    return [phrase() + [rng.choice(verb)] + phrase() for _ in range(n)]


def toy_splits(n: int) -> TextSplits:
    texts = toy_corpus(n)
    vocab = Vocab.build(texts)
    cut = [int(0.8 * n), int(0.9 * n)]
    train, valid, test = (encode_corpus(part, vocab) for part in (texts[: cut[0]], texts[cut[0] : cut[1]], texts[cut[1] :]))
    return TextSplits(train=train, valid=valid, test=test, vocab=vocab, name="toy")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on synthetic sentences")
    args = parser.parse_args(argv)
    if args.smoke:
        splits, sizes, epochs, warmup, k, capture = toy_splits(300), dict(embed_dim=16, hidden_dim=32), 2, 10, 5, "off"
    else:  # Bowman et al.'s sizes (353 / 191); replay records one graph per batch width
        splits, sizes, epochs, warmup, k, capture = load_dataset("ptb"), dict(embed_dim=353, hidden_dim=191), 1, 2000, 20, "replay"
    vocab_size = len(splits.vocab)

    pyro.clear_param_store()
    model = SentenceVAE(vocab_size, z_dim=16, word_dropout=0.5, **sizes)
    guide = SentenceEncoder(vocab_size, z_dim=16, **sizes)
    objective = AnnealedELBO(schedule="logistic", warmup_steps=warmup, free_bits=0.1)
    trainer = Trainer(model, guide, objective, progress=False, capture=capture)
    trainer.fit(splits.batches(batch_size=32), epochs=epochs, valid=tuple(splits.valid))

    model.eval()
    result = evaluate_text(model, guide, splits.test, num_samples=k)
    print(f"test NLL {result['nll']:.2f}, perplexity {result['perplexity']:.1f}, KL {result['kl']:.2f}, active units {result['active_units']}")
    with torch.no_grad():
        z = torch.randn(3, 16)
        for line in splits.vocab.decode_batch(model.generate(z, 3, max_length=20, greedy=True)):
            print("greedy from z ~ p(z):", line)


if __name__ == "__main__":
    main()
