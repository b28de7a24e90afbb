"""A hand-written PyTorch VAE: the reference that ``benchmarks/speed.py`` times pyrovae against.

It runs the very same networks as a pyrovae model/guide pair (:class:`pyrovae.models.VAE` with a
:class:`pyrovae.guides.GaussianEncoder` or a planar :class:`pyrovae.guides.FlowEncoder`): the weights are read
from their ``nn.Linear`` submodules and the forward pass is written out with ``F.linear`` and torch ops, with
no Pyro, no distribution objects and no traces. Per datum and particle it computes

    log w = log p(x | z_1) + log p(z_L) + sum_l log p(z_l | z_{l+1}) - log q(z_1..L | x),

with ``z = mu + sigma * eps``; the ELBO is the mean of ``log w`` and the IWAE-K bound is
``logsumexp_k log w_k - log K`` per datum (Burda et al. 2016). The noise ``eps`` is drawn in the same order
and shapes as Pyro's vectorised particles, so with the same RNG seed both compute the same number
(``tests/test_speed_reference.py`` checks this).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyrovae.train.checks import adam_defaults

LOG_2PI_HALF = 0.5 * math.log(2 * math.pi)

_ACTIVATIONS: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {
    nn.Tanh: torch.tanh,
    nn.ReLU: torch.relu,
    nn.ELU: F.elu,
    nn.Softplus: F.softplus,
    nn.LeakyReLU: F.leaky_relu,
}

Layer = tuple  # (weight, bias, activation or None)


def linear_stack(module: nn.Module) -> list[Layer]:
    """The ``(weight, bias, activation)`` layers of an MLP built from ``nn.Linear`` and activation modules
    (reshapes such as Flatten/Unflatten are skipped: the reference works on flat vectors)."""
    layers: list[list] = []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            layers.append([m.weight, m.bias, None])
        elif type(m) in _ACTIVATIONS:
            if not layers or layers[-1][2] is not None:
                raise ValueError(f"{type(module).__name__}: an activation that does not follow a linear layer is not supported")
            layers[-1][2] = _ACTIVATIONS[type(m)]
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            raise ValueError("the hand-written reference covers MLP networks only; build the model with arch='mlp'")
    if not layers:
        raise ValueError(f"{type(module).__name__} has no linear layers")
    return [tuple(layer) for layer in layers]


def run_mlp(h: torch.Tensor, layers: list[Layer]) -> torch.Tensor:
    for weight, bias, act in layers:
        h = F.linear(h, weight, bias)
        if act is not None:
            h = act(h)
    return h


def _loc_scale(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loc, raw = out.chunk(2, dim=-1)
    return loc, F.softplus(raw) + 1e-4


def _std_normal(shape, like: torch.Tensor) -> torch.Tensor:
    # the same call torch.distributions.Normal.rsample makes, so the same seed gives the same noise
    return torch.empty(shape, dtype=like.dtype, device=like.device).normal_()


class HandVAE:
    """Hand-written forward pass of a pyrovae ``VAE`` and its guide, sharing their parameters.

    Args:
        model: a :class:`pyrovae.models.VAE` with ``arch='mlp'`` and the Bernoulli likelihood.
        guide: a :class:`pyrovae.guides.GaussianEncoder` (same ``z_dims``) or a planar
            :class:`pyrovae.guides.FlowEncoder` (one-layer model).
    """

    def __init__(self, model: nn.Module, guide: nn.Module):
        if getattr(model, "likelihood_name", None) != "bernoulli":
            raise ValueError(f"the reference implements the Bernoulli likelihood; got {getattr(model, 'likelihood_name', None)!r}")
        self.model, self.guide = model, guide
        self.z_dims = tuple(model.z_dims)
        self.decoder = linear_stack(model.decoder)
        self.prior_layers = [linear_stack(m) for m in model.layers]
        self.flows: Optional[list] = None
        if hasattr(guide, "flows"):  # FlowEncoder
            if guide.flow_name != "planar":
                raise ValueError(f"the reference implements planar flows only; the guide has flow={guide.flow_name!r}")
            if len(self.z_dims) != 1:
                raise ValueError("a flow guide goes with a one-layer model")
            self.trunk = linear_stack(guide.trunk)
            self.heads = [linear_stack(guide.head)]
            self.context = [] if isinstance(guide.context, nn.Identity) else linear_stack(guide.context)
            self.flows = [linear_stack(f.nn.layers) for f in guide.flows]
            for f in guide.flows:  # DenseNN applies its nonlinearity between layers, not after the last one
                if not isinstance(f.nn.f, nn.ReLU):
                    raise ValueError("the reference expects the planar hypernetworks' default ReLU nonlinearity")
            self.flows = [[(w, b, torch.relu if i < len(fl) - 1 else None) for i, (w, b, _) in enumerate(fl)] for fl in self.flows]
        else:
            self.trunk = linear_stack(guide.trunk)
            self.heads = [linear_stack(h) for h in guide.heads]
        if tuple(guide.x_shape) != tuple(model.x_shape):
            raise ValueError(f"guide x_shape={guide.x_shape} differs from model x_shape={model.x_shape}")

    def parameters(self) -> list[torch.Tensor]:
        return [p for m in (self.model, self.guide) for p in m.parameters() if p.requires_grad]

    # --- q(z | x) ----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple:
        """What the sampler needs from ``x`` once per batch: trunk features, the first layer's loc and scale,
        and (flow guides) each planar layer's (bias, u, w)."""
        h = run_mlp(x.reshape(x.shape[0], -1), self.trunk)
        loc, scale = _loc_scale(run_mlp(h, self.heads[0]))
        flow_params = None
        if self.flows is not None:
            c = run_mlp(h, self.context) if self.context else h
            d = self.z_dims[0]
            flow_params = []
            for layers in self.flows:
                out = run_mlp(c, layers)
                bias, u, w = out[..., :1], out[..., 1 : 1 + d], out[..., 1 + d :]
                # u_hat makes w.u_hat > -1 (invertibility), as in Rezende & Mohamed (2015), appendix A.1
                alpha = (u * w).sum(-1, keepdim=True)
                u_hat = u + (F.softplus(alpha) - 1 - alpha) * w / w.pow(2).sum(-1, keepdim=True)
                flow_params.append((bias, u_hat, w))
        return loc, scale, flow_params

    def sample_q(self, x: torch.Tensor, num_particles: int, enc: Optional[tuple] = None) -> tuple[list, torch.Tensor]:
        """``num_particles`` reparameterised draws per datum: (latents nearest x first, each ``[K, B, d]``; log q ``[K, B]``)."""
        loc, scale, flow_params = self.encode(x) if enc is None else enc
        eps = _std_normal((num_particles, *loc.shape), loc)
        z = loc + scale * eps
        log_q = (-0.5 * eps.pow(2) - scale.log()).sum(-1) - LOG_2PI_HALF * loc.shape[-1]
        if flow_params is not None:
            for bias, u_hat, w in flow_params:
                act = torch.tanh((w * z).sum(-1, keepdim=True) + bias)
                z = z + u_hat * act
                log_q = log_q - torch.log(torch.abs(1 + ((1 - act.pow(2)) * w * u_hat).sum(-1)))
            return [z], log_q
        zs = [z]
        for l in range(1, len(self.z_dims)):
            loc_l, scale_l = _loc_scale(run_mlp(z, self.heads[l]))
            eps = _std_normal(loc_l.shape, loc_l)
            z = loc_l + scale_l * eps
            log_q = log_q + (-0.5 * eps.pow(2) - scale_l.log()).sum(-1) - LOG_2PI_HALF * loc_l.shape[-1]
            zs.append(z)
        return zs, log_q

    # --- p(x, z) -----------------------------------------------------------------------------------
    def log_joint(self, x: torch.Tensor, zs: list) -> torch.Tensor:
        """log p(x, z_1..L), ``[K, B]``."""
        top = zs[-1]
        log_p = (-0.5 * top.pow(2)).sum(-1) - LOG_2PI_HALF * top.shape[-1]
        for l in reversed(range(len(self.prior_layers))):
            loc, scale = _loc_scale(run_mlp(zs[l + 1], self.prior_layers[l]))
            log_p = log_p + (-0.5 * ((zs[l] - loc) / scale).pow(2) - scale.log()).sum(-1) - LOG_2PI_HALF * loc.shape[-1]
        logits = run_mlp(zs[0], self.decoder)
        target = x.reshape(x.shape[0], -1).expand_as(logits)
        return log_p - F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)

    def log_weights(self, x: torch.Tensor, num_particles: int = 1, enc: Optional[tuple] = None) -> torch.Tensor:
        """``log p(x, z_k) - log q(z_k | x)``, ``[K, B]``."""
        zs, log_q = self.sample_q(x, num_particles, enc)
        return self.log_joint(x, zs) - log_q

    # --- bounds (per datum, averaged over the batch) -------------------------------------------------
    def elbo_loss(self, x: torch.Tensor, num_particles: int = 1) -> torch.Tensor:
        """-ELBO per datum (Monte-Carlo KL, as pyrovae's default ``ELBO``)."""
        return -self.log_weights(x, num_particles).mean()

    def iwae_loss(self, x: torch.Tensor, num_particles: int) -> torch.Tensor:
        """-IWAE_K per datum: -(logsumexp_k log w_k - log K), averaged over the batch."""
        log_w = self.log_weights(x, num_particles)
        return -(torch.logsumexp(log_w, 0) - math.log(num_particles)).mean()

    @torch.no_grad()
    def log_likelihood(self, data: torch.Tensor, num_samples: int = 5000, batch_size: int = 100, max_elements: int = 2**24) -> torch.Tensor:
        """Importance-sampled log p(x) per datum with ``num_samples`` samples, drawn in chunks of at most
        ``max_elements / (batch * numel)`` particles (the chunking rule of :func:`pyrovae.evaluate.log_likelihood`;
        ``speed.py`` passes both the same budget)."""
        numel = math.prod(data.shape[1:])
        out = []
        for start in range(0, data.shape[0], batch_size):
            x = data[start : start + batch_size]
            chunk = min(num_samples, max(1, max_elements // max(1, x.shape[0] * numel)))
            enc = self.encode(x)
            log_w = torch.cat([self.log_weights(x, min(chunk, num_samples - k), enc) for k in range(0, num_samples, chunk)])
            out.append(torch.logsumexp(log_w, 0) - math.log(num_samples))
        return torch.cat(out)


class HandTrainer:
    """The hand-written training step: zero_grad, loss, backward, ``torch.optim.Adam`` step (with the options the
    library's trainer gives it, :func:`pyrovae.train.checks.adam_defaults`: a user would pick the fused kernel too).

    Args:
        vae: a :class:`HandVAE`.
        objective: ``"elbo"`` or ``"iwae"``; ``num_particles``: particles (K for IWAE).
    """

    def __init__(self, vae: HandVAE, objective: str = "elbo", num_particles: int = 1, lr: float = 1e-3):
        if objective not in ("elbo", "iwae"):
            raise ValueError(f"objective={objective!r}: choose 'elbo' or 'iwae'")
        self.vae, self.num_particles = vae, int(num_particles)
        self.loss_fn = vae.elbo_loss if objective == "elbo" else vae.iwae_loss
        params = list(vae.parameters())
        self.optim = torch.optim.Adam(params, lr=lr, **adam_defaults(torch.optim.Adam, {}, params))  # the trainer's Adam: fused where torch has it

    def step(self, x: torch.Tensor) -> torch.Tensor:
        self.optim.zero_grad(set_to_none=True)
        loss = self.loss_fn(x, self.num_particles)
        loss.backward()
        self.optim.step()
        return loss.detach()
