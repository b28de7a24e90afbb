"""Generative models, each a plain Pyro program ``model(x)`` (installed as ``pyrovae.models``)."""
from pyrovae.models.vae import VAE
from pyrovae.models.linear_gaussian import ExactPosteriorGuide, LinearGaussian, LinearGaussianGuide

from pyrovae.models.discrete import BinaryCodeCategorical, DiscreteVAE, EnumeratedPosteriorGuide

__all__ = ["VAE"]
__all__ += ["DiscreteVAE", "EnumeratedPosteriorGuide", "BinaryCodeCategorical"]
