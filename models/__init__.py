"""Generative models, each a plain Pyro program ``model(x)`` (installed as ``pyrovae.models``)."""
from pyrovae.models.vae import VAE

__all__ = ["VAE"]
