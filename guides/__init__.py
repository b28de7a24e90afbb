"""Variational families q(z | x), each a plain Pyro program ``guide(x)`` (installed as ``pyrovae.guides``)."""
from pyrovae.guides.gaussian import GaussianEncoder
from pyrovae.guides.flow import FlowEncoder

from pyrovae.guides.discrete import BernoulliEncoder

__all__ = ["GaussianEncoder", "FlowEncoder"]
__all__ += ["BernoulliEncoder"]
