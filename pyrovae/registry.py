"""Names the CLI understands: models, guides and objectives, each built from a run's JSON config.

A config is a flat dict (the CLI's arguments). Each registry maps a name to a builder; adding a model
means adding one entry, never an ``if name == ...`` in the trainer or the objectives.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from pyrovae.objectives import OBJECTIVES, Objective


def _z_dims(cfg: dict) -> tuple[int, ...]:
    return tuple(cfg.get("z_dims") or (50,))


def _hidden(cfg: dict):
    return cfg.get("hidden")  # None: the IWAE paper's sizes


def _vae(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.models import VAE

    return VAE(
        x_shape, _z_dims(cfg), _hidden(cfg), cfg.get("likelihood", "bernoulli"), cfg.get("scale"), cfg.get("arch", "mlp"),
        cfg.get("activation", "tanh"), cfg.get("prior_flow"), cfg.get("prior_flow_length") or 2,
    )


def _gaussian(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.guides import GaussianEncoder

    return GaussianEncoder(x_shape, _z_dims(cfg), _hidden(cfg), cfg.get("arch", "mlp"), cfg.get("activation", "tanh"))


def _one_layer(cfg: dict, what: str) -> tuple[int, tuple[int, ...]]:
    """(z size, hidden sizes) of a one-stochastic-layer model or guide; hidden defaults to (200, 200)."""
    z_dims = _z_dims(cfg)
    if len(z_dims) != 1:
        raise ValueError(f"{what} has one stochastic layer; got z_dims={list(z_dims)}. Pass one --z-dims value")
    hidden = _hidden(cfg)
    return z_dims[0], tuple(hidden[0]) if hidden else (200, 200)


def _flow(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.guides import FlowEncoder

    z_dim, hidden = _one_layer(cfg, "guide='flow'")
    return FlowEncoder(x_shape, z_dim, hidden, cfg.get("flow", "planar"), cfg.get("flow_length", 10), cfg.get("arch", "mlp"), cfg.get("activation", "tanh"))


def _discrete(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.models import DiscreteVAE

    z_dim, hidden = _one_layer(cfg, "model='discrete'")
    return DiscreteVAE(
        x_shape, z_dim, hidden, cfg.get("prior", "uniform"), cfg.get("likelihood", "bernoulli"), cfg.get("scale"),
        cfg.get("arch", "mlp"), cfg.get("activation", "tanh"),
    )


def _bernoulli(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.guides import BernoulliEncoder

    z_dim, hidden = _one_layer(cfg, "guide='bernoulli'")
    return BernoulliEncoder(x_shape, z_dim, hidden, cfg.get("arch", "mlp"), cfg.get("activation", "tanh"))


def _text_sizes(cfg: dict, x_shape) -> dict:
    """Sizes of the text models: ``x_shape`` is ``(vocab size,)`` (:class:`pyrovae.text.TextSplits`)."""
    hidden = _hidden(cfg)
    return {
        "vocab_size": x_shape[0], "embed_dim": cfg.get("embed_dim") or 353, "hidden_dim": hidden[0][0] if hidden else 191,
        "num_layers": cfg.get("rnn_layers") or 1, "rnn": cfg.get("rnn") or "lstm",
    }


def _text_z_dim(cfg: dict, what: str) -> int:
    z_dims = cfg.get("z_dims") or [16]
    if len(z_dims) != 1:
        raise ValueError(f"{what} has one latent variable; got z_dims={list(z_dims)}. Pass one --z-dims value (default 16)")
    return z_dims[0]


def _sentence(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.models import SentenceVAE

    return SentenceVAE(z_dim=_text_z_dim(cfg, "model='sentence'"), word_dropout=cfg.get("word_dropout") or 0.0, **_text_sizes(cfg, x_shape))


def _lm(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.models import RNNLM

    return RNNLM(word_dropout=cfg.get("word_dropout") or 0.0, **_text_sizes(cfg, x_shape))


def _rnn_encoder(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.guides import SentenceEncoder

    return SentenceEncoder(z_dim=_text_z_dim(cfg, "guide='rnn'"), bidirectional=bool(cfg.get("bidirectional")), **_text_sizes(cfg, x_shape))


def _no_latents(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.guides import NoLatentGuide

    return NoLatentGuide()


def _bayes_vae(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.models.bayesian import BayesVAE

    z_dim, hidden = _one_layer(cfg, "model='bayes_vae'")
    return BayesVAE(
        x_shape, z_dim, hidden, cfg.get("likelihood", "bernoulli"), cfg.get("scale"), cfg.get("activation", "tanh"),
        bool(cfg.get("bayesian_decoder")), cfg.get("prior_scale") or 1.0, cfg.get("decoder_dropout"), cfg.get("num_data"),
    )


def _bayes_gaussian(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.guides.bayesian import BayesEncoder

    z_dim, hidden = _one_layer(cfg, "guide='bayes_gaussian'")
    model = _bayes_vae(cfg, x_shape) if cfg.get("bayesian_decoder") else None  # names and shapes of the weight sites
    return BayesEncoder(x_shape, z_dim, hidden, cfg.get("activation", "tanh"), cfg.get("encoder_dropout"), model, cfg.get("num_data"))


def _draw(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.models import DRAW

    return DRAW(
        x_shape, cfg.get("draw_steps") or 64, cfg.get("draw_z") or 100, cfg.get("lstm_size") or 256, bool(cfg.get("attention")),
        cfg.get("read_size") or 2, cfg.get("write_size") or 5, cfg.get("likelihood", "bernoulli"), cfg.get("scale"),
    )


def _convdraw(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.models import ConvDRAW
    from pyrovae.models.conditional import ConditionalConvDRAW

    ctx = _context_shape(cfg)  # a conditional data set (mnist-sum, ...) gets the conditional ConvDRAW
    cls, extra = (ConvDRAW, {}) if ctx is None else (ConditionalConvDRAW, {"context_shape": ctx})
    return cls(x_shape, cfg.get("draw_steps") or 8, cfg.get("draw_z") or 4, cfg.get("lstm_size") or 32, likelihood=cfg.get("likelihood", "bernoulli"), scale=cfg.get("scale"), **extra)


def _context_shape(cfg: dict):
    from pyrovae.derived_data import context_shape

    return context_shape(cfg.get("dataset", ""))


def _conditional_sizes(cfg: dict, x_shape, what: str) -> dict:
    ctx = _context_shape(cfg)
    if ctx is None:
        raise ValueError(f"{what} is conditional, model(target, context); got dataset={cfg.get('dataset')!r}: pass --dataset mnist-sum, mnist-sum-hard or mnist-rotate")
    z_dim, hidden = _one_layer(cfg, what)
    return {"x_shape": x_shape, "context_shape": ctx, "z_dim": z_dim, "hidden": hidden if _hidden(cfg) else (400, 400)}


def _cvae(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.models.conditional import ConditionalVAE

    return ConditionalVAE(**_conditional_sizes(cfg, x_shape, "model='cvae'"), likelihood=cfg.get("likelihood", "bernoulli"), scale=cfg.get("scale"))


def _conditional_guide(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.guides.conditional import ConditionalEncoder

    return ConditionalEncoder(**_conditional_sizes(cfg, x_shape, "guide='conditional'"))


def _draw_guide(cfg: dict, x_shape, model: nn.Module) -> nn.Module:
    from pyrovae.guides import DRAWGuide

    return DRAWGuide(model)


def _convdraw_guide(cfg: dict, x_shape, model: nn.Module) -> nn.Module:
    from pyrovae.guides import ConvDRAWGuide

    return ConvDRAWGuide(model)


MODELS: dict[str, Callable[[dict, tuple], nn.Module]] = {"vae": _vae, "discrete": _discrete, "sentence": _sentence, "lm": _lm, "bayes_vae": _bayes_vae, "draw": _draw, "convdraw": _convdraw, "cvae": _cvae}
GUIDES: dict[str, Callable[[dict, tuple], nn.Module]] = {"gaussian": _gaussian, "flow": _flow, "bernoulli": _bernoulli, "rnn": _rnn_encoder, "none": _no_latents, "bayes_gaussian": _bayes_gaussian, "conditional": _conditional_guide}
#: guides built from their model, because they run its networks (DRAW's decoder recurrence): (cfg, x_shape, model) -> guide.
#: A model with a ``guide_name`` is paired with that guide.
MODEL_GUIDES: dict[str, Callable[[dict, tuple, nn.Module], nn.Module]] = {"draw": _draw_guide, "convdraw": _convdraw_guide}
#: the guide a model gets when none is named (``gaussian`` otherwise)
DEFAULT_GUIDES: dict[str, str] = {"sentence": "rnn", "lm": "none", "draw": "draw", "convdraw": "convdraw", "cvae": "conditional"}


def default_guide(model: str) -> str:
    return DEFAULT_GUIDES.get(model, "gaussian")


def _objectives() -> dict[str, type]:
    from pyrovae.sequence_objectives import AnnealedELBO, TokenGECO

    return {**OBJECTIVES, "annealed": AnnealedELBO, "token-geco": TokenGECO}


#: objective name -> class: :data:`pyrovae.objectives.OBJECTIVES` and the sequence objectives (:mod:`pyrovae.sequence_objectives`)
ALL_OBJECTIVES: dict[str, type] = _objectives()

#: objective name -> {constructor argument: config key}
OBJECTIVE_ARGS: dict[str, dict[str, str]] = {
    "elbo": {"num_particles": "num_particles", "analytic_kl": "analytic_kl"},
    "iwae": {"num_particles": "num_particles", "estimator": "estimator"},
    "renyi": {"num_particles": "num_particles", "alpha": "alpha", "estimator": "estimator"},
    "variance": {"num_particles": "num_particles"},
    "logvariance": {"num_particles": "num_particles"},
    "beta": {"num_particles": "num_particles", "beta": "beta", "schedule": "beta_schedule", "warmup_steps": "warmup_steps", "cycle_steps": "cycle_steps"},
    "geco": {"num_particles": "num_particles", "constraint": "constraint", "tolerance": "tolerance", "alpha": "geco_alpha", "nu": "geco_nu", "multiplier_step": "geco_multiplier_step"},
    "annealed": {
        "num_particles": "num_particles", "beta": "beta", "schedule": "beta_schedule", "warmup_steps": "warmup_steps", "cycle_steps": "cycle_steps",
        "free_bits": "free_bits",
    },
    "token-geco": {"num_particles": "num_particles", "tolerance": "tolerance", "alpha": "geco_alpha", "nu": "geco_nu"},
}


def _pick(registry: dict, kind: str, name: str):
    if name not in registry:
        raise ValueError(f"{kind}={name!r} is not known; choose one of {sorted(registry)}")
    return registry[name]


def build_model(cfg: dict, x_shape) -> nn.Module:
    return _pick(MODELS, "model", cfg.get("model", "vae"))(cfg, tuple(x_shape))


def build_guide(cfg: dict, x_shape, model: Optional[nn.Module] = None) -> nn.Module:
    """The guide ``cfg["guide"]``; for a model that names its own guide (``model.guide_name``, e.g. DRAW's, which runs
    the model's decoder) that guide, built from ``model``: the default ``gaussian`` is replaced by it (and
    ``cfg["guide"]`` updated), any other choice is refused."""
    name = cfg.get("guide") or default_guide(cfg.get("model", "vae"))
    paired = getattr(model, "guide_name", None)
    if paired:
        if name not in (paired, "gaussian"):
            raise ValueError(f"model={cfg.get('model')!r} runs with its own guide {paired!r}, which shares the model's decoder; got guide={name!r}: pass --guide {paired} (or leave --guide out)")
        cfg["guide"] = paired
        return MODEL_GUIDES[paired](cfg, tuple(x_shape), model)
    if name in MODEL_GUIDES:
        raise ValueError(f"guide={name!r} is built from its own model ({name!r}); got model={cfg.get('model', 'vae')!r}: pass --model {name}")
    return _pick(GUIDES, "guide", name)(cfg, tuple(x_shape))


def build_objective(cfg: dict) -> Objective:
    name = cfg.get("objective", "elbo")
    cls = _pick(ALL_OBJECTIVES, "objective", name)
    kwargs = {arg: cfg[key] for arg, key in OBJECTIVE_ARGS[name].items() if cfg.get(key) is not None}
    return cls(**kwargs)
