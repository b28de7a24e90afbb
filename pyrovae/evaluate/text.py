"""Evaluation of sentence models: test NLL, perplexity, KL and active units by length bucket, and the text
outputs (reconstructions, samples, homotopies) of a run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pyrovae.data.core import PathLike
from pyrovae.data.text import Sentences, Vocab, buckets, perplexity, unsort
from pyrovae.evaluate.likelihood import batched_unit_activity, count_active, elbo_terms, log_likelihood, nll_summary, posterior_means
from pyrovae.utils.files import atomic_write

#: decoder outputs (floats) of one importance-sampling pass: the chunk budget of log_likelihood, in tokens x words
TEXT_MAX_ELEMENTS = 2**24


@torch.no_grad()
def evaluate_text(
    model, guide, data: Sentences, num_samples: int = 100, batch_size: int = 100, max_elements: int = TEXT_MAX_ELEMENTS, vocab_size: Optional[int] = None,
    activity_samples: int = 100,
) -> dict:
    """Test metrics of a model of :class:`Sentences`, by length bucket (little padding):

    - ``nll``: -log p(x) per sentence, importance sampled with ``num_samples`` samples of the guide
      (:func:`pyrovae.evaluate.log_likelihood`; exact for a model without latent variables), mean over sentences;
    - ``perplexity``: exp(sum of NLL / number of predicted tokens), ``<eos>`` included;
    - ``elbo``, ``recon``, ``kl`` (one sample per sentence) and ``active_units`` (Burda et al. 2016; the estimator
      of :func:`pyrovae.evaluate.active_units`, from ``activity_samples`` runs of the guide per sentence).

    The programs run in eval mode (no word dropout), then go back to the mode they were in.
    """
    programs = [p for p in (model, guide) if isinstance(p, torch.nn.Module)]
    modes = [p.training for p in programs]
    for p in programs:
        p.eval()
    vocab_size = vocab_size or getattr(getattr(model, "decoder", None), "vocab_size", 1)
    try:
        nll, err, terms = [], [], {"elbo": 0.0, "recon": 0.0, "kl": 0.0}
        for b in buckets(data, batch_size):
            ll = log_likelihood(model, guide, tuple(b), num_samples, b.num_sentences, max(1, max_elements // vocab_size))
            nll.append(-ll.values)
            err.append(ll.stderr)
            t = elbo_terms(model, guide, tuple(b), 1, b.num_sentences)
            for k in terms:
                terms[k] += t[k] * b.num_sentences
        activity = batched_unit_activity(guide, (tuple(b) for b in buckets(data, batch_size)), activity_samples)
    finally:
        for p, mode in zip(programs, modes):
            p.train(mode)
    nll = unsort(torch.cat(nll), data)
    n = data.num_sentences
    return {
        "num_sentences": n,
        "num_tokens": data.num_tokens,
        "num_samples": num_samples,
        **nll_summary(nll, torch.cat(err), prefix=""),
        "perplexity": perplexity(nll, data.lengths),
        "nll_per_token": float(nll.sum()) / data.num_tokens,
        **{k: v / n for k, v in terms.items()},
        "active_units": count_active(activity),
        "nll_values": nll,
    }


@torch.no_grad()
def posterior_mean_codes(guide, data: Sentences, site: str = "z", batch_size: int = 500) -> torch.Tensor:
    """The guide's mean of latent ``site`` for every sentence, ``[N, D]`` in ``data``'s order (one run of the guide:
    :func:`pyrovae.evaluate.posterior_means`, exact for one stochastic layer)."""
    codes = [posterior_means(guide, tuple(b), batch_size=b.num_sentences, num_samples=1)[site] for b in buckets(data, batch_size)]
    return unsort(torch.cat(codes), data) if codes else torch.empty(0)


def homotopy(z0: torch.Tensor, z1: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """``steps`` codes on the segment from ``z0`` to ``z1``, ends included (Bowman et al. 2016, section 4.2)."""
    t = torch.linspace(0, 1, steps, device=z0.device, dtype=z0.dtype)[:, None]
    return (1 - t) * z0 + t * z1


@torch.no_grad()
def write_text_outputs(model, guide, data: Sentences, vocab: Vocab, run_dir: PathLike, num: int = 10, max_length: int = 40, seed: int = 0, suffix: str = "") -> dict:
    """Write the text outputs of a sentence model into ``run_dir`` (each atomically, named ``NAME{suffix}.txt``) and return them:

    - ``reconstructions.txt``: ``num`` test sentences and their greedy decoding from the posterior mean;
    - ``samples.txt``: decodings of ``num`` codes z ~ p(z), greedy and sampled (one per code);
    - ``homotopies.txt``: 5-step linear interpolations between the codes of pairs of test sentences, greedy.

    ``model.generate(z, num, max_length, greedy)`` decodes (``z`` None for a model without latents, which gets
    samples only). Uses its own seeded generator state, restoring the global one afterwards.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = data.tokens.device
    programs = [p for p in (model, guide) if isinstance(p, torch.nn.Module)]
    modes = [p.training for p in programs]
    for p in programs:
        p.eval()
    rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    out: dict[str, list] = {}
    try:
        z_dim = getattr(model, "z_dim", None)
        z = None if z_dim is None else torch.randn(num, z_dim, device=device)
        greedy = vocab.decode_batch(model.generate(z, num, max_length, greedy=True))
        sampled = vocab.decode_batch(model.generate(z, num, max_length, greedy=False))
        out["samples"] = [f"greedy:  {g}\nsampled: {s}" for g, s in zip(greedy, sampled)]
        if z_dim is not None:
            chosen = torch.randperm(data.num_sentences)[: 2 * num].tolist()
            test = data.take(torch.as_tensor(chosen[:num], device=device)).trim()
            codes = posterior_mean_codes(guide, test)
            recon = vocab.decode_batch(model.generate(codes, len(codes), max_length, greedy=True))
            out["reconstructions"] = [f"input:  {vocab.decode(x)}\noutput: {r}" for x, r in zip(test.tokens.tolist(), recon)]
            pairs = data.take(torch.as_tensor(chosen[num : 2 * num], device=device)).trim()
            ends = posterior_mean_codes(guide, pairs)
            out["homotopies"] = []
            for i in range(0, len(ends) - 1, 2):
                path = vocab.decode_batch(model.generate(homotopy(ends[i], ends[i + 1]), 5, max_length, greedy=True))
                out["homotopies"].append("\n".join(f"  {s}" for s in path))
    finally:
        torch.random.set_rng_state(rng)
        for p, mode in zip(programs, modes):
            p.train(mode)
    for name, items in out.items():
        text = ("\n\n".join(items) + "\n").encode("utf-8")
        atomic_write(run_dir / f"{name}{suffix}.txt", lambda f: f.write(text))
    return out
