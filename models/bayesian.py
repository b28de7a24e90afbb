"""A VAE with a Bayesian and/or variational-dropout decoder: the full-Bayes AEVB of Kingma & Welling (2014,
appendix F) and the variational Gaussian dropout of Kingma, Salimans & Welling (2015).

Generative model (one stochastic layer, MLP decoder ``f_W``)::

    W ~ N(0, prior_scale^2)                  (Bayesian decoder: global latents, one per weight and bias)
    z ~ N(0, I),   x | z, W ~ likelihood(f_W(z))

With ``decoder_dropout`` the decoder's hidden layers are :class:`pyrovae.nn.VariationalDropoutLinear` and the
model adds ``-KL`` of their weights to its log-density (a ``pyro.factor`` outside the data plate).
With ``local_reparam`` the decoder runs under :func:`pyrovae.nn.poutine.local_reparameterization` (shared records):
each example draws its own pre-activations N(A mu, A^2 sigma^2) from the guide's weight posterior instead of
sharing one weight sample, the same ELBO with a lower-variance gradient (Kingma, Salimans & Welling 2015).
In eval mode (``model.eval()``) the dropout layers are deterministic and their KL is left out, and the
Bayesian weights are fixed at the guide's posterior means (log-densities masked): a plain VAE, which is what
``pyrovae evaluate`` measures and ``pyrovae sample`` draws from. The means come from
:meth:`BayesVAE.set_posterior_means`, else the :class:`pyrovae.guides.bayesian.NormalWeights` built for this model,
else Pyro's parameter store; a weight with none of them is an error, never a draw from the prior.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Mapping, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyrovae.nn.likelihoods import LIKELIHOODS, likelihood_head
from pyrovae.utils.registry import BAYES_GROUP, Arg, register_model
from pyrovae.nn import BayesianLinear, Unflatten, add_dropout_kl, bayesian_mlp, dropout_mlp, mlp
from pyrovae.nn.poutine import local_reparameterization


def global_scale(batch: int, num_data: Optional[int]) -> float:
    """Weight of the global sites' log-densities in a minibatch ELBO: ``batch / num_data`` (1 without
    ``num_data``), so that a pass over the data counts log p(W) - log q(W) once (Kingma & Welling 2014, eq. 8)."""
    return 1.0 if num_data is None else batch / num_data


#: where :class:`pyrovae.guides.bayesian.NormalWeights` keeps the posterior mean of a weight site in Pyro's
#: parameter store (the guide registers itself as ``pyro.module("encoder", ...)``)
POSTERIOR_MEAN_PARAM = "encoder$$$weights.locs.{}"


#: model -> the weight posterior built for it (:class:`pyrovae.guides.bayesian.NormalWeights` registers itself), whose
#: ``means()`` the model reads in eval mode; weak on both sides, so neither keeps the other alive nor is pickled with it
_WEIGHT_POSTERIORS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def register_weight_posterior(model: nn.Module, posterior) -> None:
    """Let ``model`` read its Bayesian weights' posterior means from ``posterior.means()`` ({site: mean}) in eval mode."""
    _WEIGHT_POSTERIORS[model] = weakref.ref(posterior)


def posterior_means(model: nn.Module) -> dict[str, torch.Tensor]:
    """{weight site: posterior mean} of ``model``'s Bayesian layers: from the weight posterior registered for this model
    (:func:`register_weight_posterior`), else from Pyro's parameter store, as far as either has them."""
    ref = _WEIGHT_POSTERIORS.get(model)
    posterior = ref() if ref is not None else None
    out = {k: v.detach() for k, v in posterior.means().items()} if posterior is not None else {}
    store = pyro.get_param_store()
    for m in model.modules():
        if isinstance(m, BayesianLinear):
            for what in ("weight", "bias") if m.bias is not None else ("weight",):
                site = f"{m._pyro_name}.{what}"
                key = POSTERIOR_MEAN_PARAM.format(site.replace(".", "__"))
                if site not in out and key in store:
                    out[site] = store.get_param(key).detach()
    return out


@register_model(
    "bayes_vae", group=BAYES_GROUP, choices={"likelihood": LIKELIHOODS, "decoder_dropout": ("A", "B")},
    # the constructor's default is on (the Python API's Bayesian decoder); on the command line it is a switch, off unless given
    args=(Arg("--bayesian-decoder", action="store_true", group=BAYES_GROUP, param="bayesian_decoder", help="decoder weights are Normal latents (full-Bayes AEVB; default off)"),),
)
class BayesVAE(nn.Module):
    """VAE whose MLP decoder has Bayesian weights (``bayesian_decoder``), variational-dropout layers
    (``decoder_dropout``), or neither (a plain VAE with this module's MLP decoder).

    Args:
        x_shape: shape of one data point.
        z_dim: latent size.
        hidden: decoder hidden sizes, nearest z first.
        likelihood, scale: as in :class:`pyrovae.models.VAE`.
        activation: nonlinearity.
        bayesian_decoder: decoder weights are :class:`pyrovae.nn.BayesianLinear` latents ``decoder.{i}.weight``.
        prior_scale: standard deviation of their Normal prior.
        decoder_dropout: ``None``, ``A`` (Gaussian dropout on the hidden activations) or ``B`` (independent
            weight noise); not together with ``bayesian_decoder``.
        num_data: training-set size, which scales the global terms by ``batch / num_data`` (None: 1).
        local_reparam: draw the Bayesian decoder's pre-activations per example (the local reparameterisation
            trick); needs ``bayesian_decoder`` and a guide whose weight draws are recorded for it
            (:class:`pyrovae.guides.bayesian.BayesEncoder` with ``local_reparam=True``, or any guide run under
            ``local_reparameterization(shared=True)``).
    """

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 28, 28),
        z_dim: int = 50,
        hidden: Sequence[int] = (200, 200),
        likelihood: str = "bernoulli",
        scale: Optional[float] = None,
        activation: str = "tanh",
        bayesian_decoder: bool = True,
        prior_scale: float = 1.0,
        decoder_dropout: Optional[str] = None,
        num_data: Optional[int] = None,
        local_reparam: bool = False,
    ):
        super().__init__()
        if local_reparam and not bayesian_decoder:
            raise ValueError("local_reparam=True reparameterises Bayesian weights: pass bayesian_decoder=True as well")
        if bayesian_decoder and decoder_dropout is not None:
            raise ValueError("bayesian_decoder=True and decoder_dropout are two posteriors over the same weights: choose one")
        if decoder_dropout not in (None, "A", "B"):
            raise ValueError(f"decoder_dropout={decoder_dropout!r}: choose None, 'A' (noise on activations) or 'B' (noise per weight)")
        if num_data is not None and int(num_data) < 1:
            raise ValueError(f"num_data={num_data!r} must be the (positive) number of training examples, or None")
        self.x_shape, self.z_dim = tuple(x_shape), int(z_dim)
        self.names = ["z"]
        self.num_data = None if num_data is None else int(num_data)
        self.likelihood_name = likelihood
        self.likelihood, self.scale, factor = likelihood_head(likelihood, scale)
        sizes = [self.z_dim, *hidden, math.prod(self.x_shape) * factor]
        self.bayesian_decoder, self.decoder_dropout = bool(bayesian_decoder), decoder_dropout
        self.local_reparam = bool(local_reparam)
        if bayesian_decoder:
            net = bayesian_mlp(sizes, activation, prior_scale, name="decoder")
        elif decoder_dropout is not None:
            net = dropout_mlp(sizes, activation, variant=decoder_dropout)
        else:
            net = mlp(sizes, activation)
        self.decoder = net
        self._posterior_means: Optional[dict[str, torch.Tensor]] = None  # set_posterior_means
        self.unflatten = Unflatten((self.x_shape[0] * factor, *self.x_shape[1:]))

    def bayesian_layers(self) -> list[tuple[str, BayesianLinear]]:
        """(site-name prefix, layer) of the decoder's Bayesian layers."""
        return [(m._pyro_name, m) for m in self.decoder.modules() if isinstance(m, BayesianLinear)]

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """{site: shape} of the decoder's Bayesian weights and biases."""
        out = {}
        for name, m in self.bayesian_layers():
            out[f"{name}.weight"] = (m.out_features, m.in_features)
            if m.bias is not None:
                out[f"{name}.bias"] = (m.out_features,)
        return out

    def set_posterior_means(self, means: Optional[Mapping[str, torch.Tensor]]) -> None:
        """Fix the eval-mode weights at ``means`` ({site: mean}, other keys ignored), e.g. ``guide.median(x)`` of an
        ``AutoNormal``; ``None`` forgets them (the guide's :class:`NormalWeights` or the parameter store then)."""
        if means is None:
            self._posterior_means = None
            return
        if not isinstance(means, Mapping):
            raise TypeError(f"means must be a dict {{site: tensor}}, got {type(means).__name__}; e.g. model.set_posterior_means(guide.median(x))")
        shapes = self.weight_shapes()
        missing = sorted(set(shapes) - set(means))
        if missing:
            raise ValueError(f"means has no entry for the weight sites {missing}; pass every one of {sorted(shapes)}")
        bad = {k: tuple(means[k].shape) for k in shapes if tuple(means[k].shape) != shapes[k]}
        if bad:
            raise ValueError(f"means has shapes {bad} where the weight sites have {({k: shapes[k] for k in bad})}: pass this model's posterior means")
        self._posterior_means = {k: means[k].detach() for k in shapes}

    def eval_weights(self) -> dict[str, torch.Tensor]:
        """The posterior means the eval-mode decoder uses; a ``ValueError`` naming the sites it has none for."""
        means = dict(getattr(self, "_posterior_means", None) or posterior_means(self))
        missing = sorted(set(self.weight_shapes()) - set(means))
        if missing:
            raise ValueError(
                f"{type(self).__name__} in eval mode fixes its Bayesian weights at their posterior means, but has none for {missing}: "
                "build the guide with this model (BayesEncoder(model=model) or NormalWeights(model)), run it once so that Pyro's "
                "parameter store holds its means, or pass them with model.set_posterior_means({site: mean}) "
                "(for an AutoNormal guide: model.set_posterior_means(guide.median(x)))"
            )
        return means

    def decode(self, z: torch.Tensor, batch: int) -> dist.Distribution:
        if self.bayesian_decoder and self.training:
            # the weights are global: drawn outside the data plate, their log-densities weighted batch/num_data
            local = local_reparameterization(shared=True) if self.local_reparam else contextlib.nullcontext()
            with poutine.scale(scale=global_scale(batch, self.num_data)), local:
                out = self.decoder(z)
        elif self.bayesian_decoder:
            # eval mode: the posterior-mean network (an error, not the prior's draws, where a mean is unknown); log-densities masked
            with poutine.condition(data=self.eval_weights()), poutine.mask(mask=False):
                out = self.decoder(z)
        else:
            out = self.decoder(z)
        return self.likelihood.build(self.unflatten(out), len(self.x_shape), self.scale)

    def forward(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self)
        batch = x.shape[0]
        if self.decoder_dropout is not None and self.training:
            with poutine.scale(scale=global_scale(batch, self.num_data)):
                add_dropout_kl("decoder.dropout_kl", self.decoder)
        data = pyro.plate("data", batch)  # entered twice: the decoder's weights are drawn outside it
        with data:
            z = pyro.sample("z", dist.Normal(x.new_zeros(batch, self.z_dim), 1.0).to_event(1))
        px = self.decode(z, batch)
        with data:
            pyro.sample("x", px, obs=x)
