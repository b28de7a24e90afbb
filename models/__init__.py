"""Generative models, each a plain Pyro program ``model(x)`` (installed as ``pyrovae.models``)."""
from pyrovae.models.vae import VAE  # noqa: I001  (first: registration order, the first reader of a shared option gives its help)
from pyrovae.models.bayesian import BayesVAE
from pyrovae.models.conditional import ConditionalConvDRAW, ConditionalVAE
from pyrovae.models.discrete import BinaryCodeCategorical, DiscreteVAE, EnumeratedPosteriorGuide
from pyrovae.models.draw import DRAW, ConvDRAW
from pyrovae.models.linear_gaussian import ExactPosteriorGuide, LinearGaussian, LinearGaussianGuide
from pyrovae.models.sentence import RNNLM, SentenceDecoder, SentenceVAE

__all__ = [
    "VAE", "SentenceVAE", "RNNLM", "SentenceDecoder", "DiscreteVAE", "EnumeratedPosteriorGuide", "BinaryCodeCategorical",
    "LinearGaussian", "ExactPosteriorGuide", "LinearGaussianGuide", "DRAW", "ConvDRAW",
    "ConditionalVAE", "ConditionalConvDRAW", "BayesVAE",
]
