"""What ``pyrovae evaluate`` and ``pyrovae sample`` report for each kind of model, beyond the image default
(test NLL, ELBO terms, active units, sample and reconstruction grids).

The kind is read from the model's class here, in the command-line layer, so that models stay plain Pyro
programs that import nothing of evaluation: sentence models report perplexity and write sentences,
conditional models draw samples per context, and canvas models (DRAW, ConvDRAW) add their pictures over
steps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

import pyrovae.evaluate as E
from pyrovae.evaluate.pictures import write_draw_pictures
from pyrovae.evaluate.text import evaluate_text, write_text_outputs
from pyrovae.models.conditional import ConditionalConvDRAW, ConditionalVAE
from pyrovae.models.draw import RecurrentCanvasModel
from pyrovae.models.sentence import RNNLM, SentenceVAE

TEXT_MODELS = (SentenceVAE, RNNLM)
CONDITIONAL_MODELS = (ConditionalVAE, ConditionalConvDRAW)
CANVAS_MODELS = (RecurrentCanvasModel,)


def evaluation_for(model) -> Optional[Callable]:
    """The evaluation of a model whose metrics and outputs are not the image default's, or None."""
    if isinstance(model, TEXT_MODELS):
        return text_evaluation
    if isinstance(model, CONDITIONAL_MODELS):
        return conditional_evaluation
    return None


def sampler_for(model) -> Optional[Callable]:
    """The sampler of a model that samples something other than images (sentences), or None."""
    return text_samples if isinstance(model, TEXT_MODELS) else None


def pictures_for(model) -> Optional[Callable]:
    """``write(model, guide, data, run_dir, num, suffix) -> [paths]`` for models that draw over steps, or None."""
    return write_draw_pictures if isinstance(model, CANVAS_MODELS) else None


def text_evaluation(model, guide, splits, test, run_dir, num_samples: int, suffix: str = "") -> dict:
    """Test metrics by length bucket (:func:`pyrovae.evaluate.text.evaluate_text`: NLL with ``num_samples``
    importance samples, perplexity, KL, active units) and the text outputs in ``run_dir``
    (:func:`pyrovae.evaluate.text.write_text_outputs`, named with ``suffix``: ``samples-limit10.txt``)."""
    r = evaluate_text(model, guide, test, num_samples=num_samples)
    write_text_outputs(model, guide, test, splits.vocab, run_dir, suffix=suffix)
    return {
        "num_test": r["num_sentences"], "num_tokens": r["num_tokens"], "num_samples": num_samples, "test_nll": r["nll"],
        "test_nll_stderr_over_data": r["nll_stderr_over_data"], "test_nll_importance_stderr": r["nll_importance_stderr"],
        "test_perplexity": r["perplexity"], "perplexity_note": "exp(total NLL / predicted tokens), <eos> included",
        "test_elbo": r["elbo"], "test_recon": r["recon"], "test_kl": r["kl"], "active_units": r["active_units"],
        "data": splits.describe() if hasattr(splits, "describe") else None,  # states the length limit and what it did
        "outputs": [f"{name}{suffix}.txt" for name in ["samples"] + (["reconstructions", "homotopies"] if getattr(model, "z_dim", None) else [])],
    }


def text_samples(model, splits, num: int, max_length: int = 40) -> list[str]:
    """``num`` sentences from the model: greedy and sampled decodings of z ~ p(z) (sampled only without z)."""
    z_dim = getattr(model, "z_dim", None)
    z = None if z_dim is None else torch.randn(num, z_dim, device=model.decoder.out.weight.device)
    lines = splits.vocab.decode_batch(model.generate(z, num, max_length, greedy=False))
    if z is None:
        return lines
    greedy = splits.vocab.decode_batch(model.generate(z, num, max_length, greedy=True))
    return [f"greedy:  {g}\nsampled: {s}" for g, s in zip(greedy, lines)]


def conditional_evaluation(model, guide, splits, test, run_dir, num_samples: int, suffix: str = "") -> dict:
    """Test NLL and ELBO terms of a model ``model(x, context)``, and 8 samples of p(x | context) for each of the
    first 8 test contexts."""
    ll = E.log_likelihood(model, guide, test, num_samples=num_samples)
    terms = E.elbo_terms(model, guide, test)
    n = test.shape[0]
    contexts = test.context[:8]
    rows = []
    for i in range(contexts.shape[0]):
        ctx = contexts[i : i + 1].expand(8, *contexts.shape[1:])
        samples = E.sample(model, 8, splits.x_shape, device=ctx.device, inputs=(ctx,))
        shown = torch.cat([contexts[i].unsqueeze(1), test.target[i : i + 1]], 0)  # context channels, the true target
        rows.append(torch.cat([_grey(shown, splits.x_shape), _grey(samples, splits.x_shape)], 0))
    E.save_image_grid(torch.cat(rows), Path(run_dir) / f"samples{suffix}.png", nrow=rows[0].shape[0])
    return {
        "num_test": n, "num_samples": num_samples, **ll.summary(),
        "test_elbo": terms["elbo"], "test_recon": terms["recon"], "test_kl": terms["kl"],
        "outputs": [f"samples{suffix}.png (per row: the context's channels, the true target, 8 samples of p(x | context))"],
    }


def _grey(images: torch.Tensor, x_shape) -> torch.Tensor:
    """One-channel images of the target's height and width (the context channels are shown one by one)."""
    images = images.reshape(-1, *images.shape[-3:])
    return images[:, :1].expand(-1, 1, *x_shape[1:]) if images.shape[1] != 1 else images
