"""Variational families q(z | x), each a plain Pyro program ``guide(x)`` (installed as ``pyrovae.guides``)."""
from pyrovae.guides.bayesian import BayesEncoder
from pyrovae.guides.conditional import ConditionalEncoder
from pyrovae.guides.discrete import BernoulliEncoder
from pyrovae.guides.draw import ConvDRAWGuide, DRAWGuide
from pyrovae.guides.flow import FlowEncoder
from pyrovae.guides.gaussian import GaussianEncoder
from pyrovae.guides.sentence import NoLatentGuide, SentenceEncoder

__all__ = ["GaussianEncoder", "FlowEncoder", "BernoulliEncoder", "SentenceEncoder", "NoLatentGuide", "DRAWGuide", "ConvDRAWGuide", "ConditionalEncoder", "BayesEncoder"]
