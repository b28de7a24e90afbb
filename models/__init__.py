"""Generative models, each a plain Pyro program ``model(x)`` (installed as ``pyrovae.models``)."""
from pyrovae.models.vae import VAE
from pyrovae.models.linear_gaussian import ExactPosteriorGuide, LinearGaussian, LinearGaussianGuide

__all__ = ["VAE"]
