"""Generative models, each a plain Pyro program ``model(x)`` (installed as ``pyrovae.models``)."""
from pyrovae.models.conditional import ConditionalConvDRAW, ConditionalVAE
from pyrovae.models.discrete import BinaryCodeCategorical, DiscreteVAE, EnumeratedPosteriorGuide
from pyrovae.models.draw import DRAW, ConvDRAW
from pyrovae.models.linear_gaussian import ExactPosteriorGuide, LinearGaussian, LinearGaussianGuide
from pyrovae.models.sentence import RNNLM, SentenceDecoder, SentenceVAE
from pyrovae.models.vae import VAE

__all__ = [
    "VAE", "SentenceVAE", "RNNLM", "SentenceDecoder", "DiscreteVAE", "EnumeratedPosteriorGuide", "BinaryCodeCategorical",
    "LinearGaussian", "ExactPosteriorGuide", "LinearGaussianGuide", "DRAW", "ConvDRAW",
    "ConditionalVAE", "ConditionalConvDRAW",
]
