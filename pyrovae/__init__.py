"""pyrovae: variational autoencoders as Pyro programs, with swappable inference objectives."""
__version__ = "0.1.0"
