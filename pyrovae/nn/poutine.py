"""Effect handlers for Bayesian layers: :func:`local_reparameterization`.

The local reparameterisation trick (Kingma, Salimans & Welling 2015, "Variational dropout and the local
reparameterization trick", section 2.3): for a linear layer ``B = A W`` with a factorised Gaussian posterior
``W_ij ~ N(mu_ij, sigma_ij^2)``, each pre-activation is Gaussian,

    B_mj ~ N(sum_i A_mi mu_ij, sum_i A_mi^2 sigma_ij^2),

so it can be drawn per example ``m`` instead of drawing one weight matrix for the whole minibatch. The
marginal of every example's pre-activations is the same, hence so is the expected ELBO and its gradient,
but the examples' noise is now independent and the minibatch gradient's variance falls as 1/batch.
TyXe (Ritter & Karaletsos 2022) implements the same idea as a messenger; this one is written afresh.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from pyro.poutine.messenger import Messenger
from torch.utils.weak import WeakIdKeyDictionary

_ACTIVE: list["LocalReparameterizationMessenger"] = []
_ORIGINAL_LINEAR = torch.nn.functional.linear
#: Normal draws recorded by ``shared`` handlers: drawn tensor -> (loc, scale), for as long as the tensor lives
_SHARED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _active_local_reparameterization() -> Optional["LocalReparameterizationMessenger"]:
    return _ACTIVE[-1] if _ACTIVE else None


def _normal_params(fn, shape: torch.Size):
    """(loc, scale) broadcast to ``shape`` when ``fn`` is a (possibly Independent / expanded) Normal, else None."""
    import pyro.distributions as dist
    import torch.distributions as tdist

    while isinstance(fn, (tdist.Independent, dist.Independent)):
        fn = fn.base_dist
    if type(fn) not in (dist.Normal, tdist.Normal):
        return None
    try:
        return fn.loc.expand(shape), fn.scale.expand(shape)
    except RuntimeError:
        return None


def _is_delta(fn) -> bool:
    import pyro.distributions as dist

    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def _plain_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() == 2:
        return _ORIGINAL_LINEAR(x, weight)
    return (x.unsqueeze(-2) @ weight.transpose(-1, -2)).squeeze(-2)


def _patched_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    handler = _active_local_reparameterization()
    if handler is not None:
        out = handler.linear(input, weight, bias)
        if out is not None:
            return out
    return _ORIGINAL_LINEAR(input, weight, bias)


class LocalReparameterizationMessenger(Messenger):
    """Records every latent sample site whose distribution is a factorised Normal (the first program to draw a
    value wins: under an ELBO that is the guide, whose value the model replays; an autoguide's Delta site at an
    identity image of such a draw, as ``AutoNormal`` makes for real-valued sites, takes its moments), and while active replaces a
    linear map ``x W^T + b`` whose ``W`` is such a value by a draw of ``N(x mu^T + m_b, x^2 (sigma^2)^T + s_b^2)``
    (the bias's Normal moments, or the bias itself when it is not a recorded value).

    With ``shared=True`` the records also go to (and are looked up in) a process-wide store keyed weakly by the
    drawn tensor, so that they outlive the handler: a guide and a model that each run under their own shared
    handler (as :class:`pyrovae.models.bayesian.BayesVAE` and its guide do with ``local_reparam=True``) agree
    on the guide's draws, and no handler around the whole step is needed. A record dies with its tensor.

    It acts on ``torch.nn.functional.linear`` (so on ``nn.Linear`` and ``PyroModule[nn.Linear]`` with
    ``PyroSample`` weights, as in TyXe) and on :func:`pyrovae.nn.linear` (:class:`pyrovae.nn.BayesianLinear`,
    also with the batched weights of vectorised particles). Any other site, and any other use of a recorded
    value, is left untouched; the sites' log-densities are those of the drawn weights, as without the handler.
    """

    def __init__(self, shared: bool = False):
        super().__init__()
        self.shared = bool(shared)
        self._sites: dict[str, tuple] = {}  # name -> (value, loc, scale); loc None: not a Normal draw

    def __enter__(self):
        if not _ACTIVE:
            torch.nn.functional.linear = _patched_linear
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *args):
        try:
            return super().__exit__(*args)
        finally:
            _ACTIVE.remove(self)
            if not _ACTIVE:
                torch.nn.functional.linear = _ORIGINAL_LINEAR
            self._sites.clear()

    def _entry(self, value: torch.Tensor):
        for entry in self._sites.values():
            if entry[0] is value:
                return entry
        if self.shared and value in _SHARED:
            return (value, *_SHARED[value])
        return None

    def _lookup(self, value: torch.Tensor):
        entry = self._entry(value)
        return None if entry is None or entry[1] is None else entry[1:]

    def _pyro_post_sample(self, msg) -> None:
        value = msg.get("value")
        # the first site to draw a value owns it, whatever its distribution: the model replaying a guide's
        # Laplace draw must not make it look Normal through the model's prior
        if msg["is_observed"] or not torch.is_tensor(value) or self._entry(value) is not None:
            return
        params = _normal_params(msg["fn"], value.shape)
        if params is None and _is_delta(msg["fn"]):
            # an autoguide's site: a Delta at the image of an auxiliary Normal draw under an identity transform
            # (AutoNormal), equal in value but not the same tensor; it takes that draw's moments
            params = next(
                ((loc, scale) for v, loc, scale in self._sites.values() if loc is not None and v.shape == value.shape and torch.equal(v, value)),
                None,
            )
        self._sites[msg["name"]] = (value, *(params if params is not None else (None, None)))
        if self.shared:
            _SHARED[value] = params if params is not None else (None, None)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The locally reparameterised ``x W^T + b``, or None when ``weight`` is not a recorded Normal draw."""
        w = self._lookup(weight) if torch.is_tensor(weight) else None
        if w is None:
            return None
        loc, scale = w
        mean = _plain_linear(x, loc)
        var = _plain_linear(x * x, scale * scale)
        if bias is not None:
            b = self._lookup(bias)
            if b is None:
                mean = mean + bias
            else:
                mean = mean + b[0]
                var = var + b[1] * b[1]
        # clamp: an all-zero input row has zero variance, where sqrt's gradient is infinite
        return mean + var.clamp_min(1e-30).sqrt() * torch.randn_like(mean)


def local_reparameterization(fn: Optional[Callable] = None, shared: bool = False) -> Union[LocalReparameterizationMessenger, Callable]:
    """Draw the pre-activations of linear layers with Normal-distributed weights per example.

    Usable like the handlers of ``pyro.poutine``: ``with local_reparameterization(): svi.step(x)``, or
    ``local_reparameterization(model)`` / as a decorator. Wrap the guide *and* the model (e.g. the whole
    ``svi.step`` or ``Trainer.step``), since the guide's Normal draws are what it recognises; or, with
    ``shared=True``, wrap each program on its own (``local_reparameterization(guide, shared=True)`` and the same
    for the model): the guide's records then reach the model's handler.
    Reference: Kingma, Salimans & Welling (2015), section 2.3.
    """
    msngr = LocalReparameterizationMessenger(shared)
    return msngr(fn) if fn is not None else msngr
