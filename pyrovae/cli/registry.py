"""Names the CLI understands: models, guides and objectives, each built from a run's JSON config.

A config is a flat dict (the CLI's arguments, saved as a run's ``config.json``). Each registry maps a name to an
:class:`Entry`: its builder and the command-line options it reads, declared next to it. ``pyrovae train`` builds its
argparse flags from these declarations, so adding a model, guide or objective is one entry::

    MY_SIZE = Arg("--my-size", type=int, default=None, help="size of my thing (default 8)")
    MODELS["mine"] = Entry(lambda cfg, x_shape: Mine(x_shape, cfg.get("my_size") or 8), args=(*IMAGE_ARGS, MY_SIZE))
    OBJECTIVES["mine"] = Entry(MyObjective, args=(NUM_PARTICLES, Arg("--my-weight", type=float, param="weight", help=...)))

- An :class:`Arg` is one flag: its config key is the flag without dashes (``--my-size`` -> ``my_size``).
  The help text states the default when the parser's default is ``None`` ("default 8"); otherwise ``--help``
  adds ``(default: X)`` itself; either way one default statement per option (``tests/test_cli.py`` checks).
  ``group`` is the ``--help`` section (default: the registry's).
- Entries may share an ``Arg`` (``Z_DIMS``, ``NUM_PARTICLES``, ...): a flag is added once; two *different*
  declarations of one flag are an error when the parser is built.
- Model and guide builders take ``(cfg, x_shape)`` and read their keys from ``cfg``; a plain function is still
  accepted as an entry (it declares no flags). Objective entries wrap the class: ``build_objective`` passes each
  declared ``Arg`` that is set in the config as the constructor argument ``arg.param`` (default: its key).
- ``ALL_OBJECTIVES`` (name -> class) and ``OBJECTIVE_ARGS`` (name -> {constructor argument: config key}) are
  derived from ``OBJECTIVES`` for older code; register in ``OBJECTIVES``.
- Never an ``if name == ...`` in the trainer or the objectives.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from torch import nn

from pyrovae.nn.flows import FLOWS
from pyrovae.nn.likelihoods import LIKELIHOODS
from pyrovae.objectives import Objective

#: ``--help`` sections of the registries' options (``pyrovae train --help`` shows them in this order, among the CLI's own)
MODEL_GROUP = "model and guide"
TEXT_GROUP = "text (--dataset ptb, --model sentence or lm)"
DRAW_GROUP = "DRAW and ConvDRAW (--model draw / convdraw; their guide is chosen with them)"
OBJECTIVE_GROUP = "objective"
BAYES_GROUP = "Bayesian layers and natural gradient (--model bayes_vae --guide bayes_gaussian)"


@dataclass(frozen=True)
class Arg:
    """One option of ``pyrovae train``, declared by the registry entries that read it.

    Args:
        flag: ``--my-size``; the config key is ``my_size``.
        help: what it sets; state the default in words when ``default`` is None ("default 8").
        type, default, choices, nargs, action: as in ``argparse.ArgumentParser.add_argument``.
        short: a one-letter alias (``-k``).
        param: the objective constructor's argument it feeds (default: the config key).
        group: the ``--help`` section (default: the registry's).
    """

    flag: str
    help: str
    type: Optional[Callable[[str], Any]] = None
    default: Any = None
    choices: Optional[Sequence] = None
    nargs: Optional[str] = None
    action: Optional[str] = None
    short: Optional[str] = None
    param: Optional[str] = None
    group: Optional[str] = None

    @property
    def key(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser) -> None:
        """Add the flag to an argparse parser or argument group."""
        names = [self.flag] + ([self.short] if self.short else [])
        kwargs = {"help": self.help, "default": self.default}
        if self.action:
            kwargs["action"] = self.action
            if self.action == "store_true" and self.default is None:
                kwargs["default"] = False
        else:
            kwargs.update({k: v for k, v in (("type", self.type), ("choices", self.choices), ("nargs", self.nargs)) if v is not None})
        if kwargs.get("choices") is not None:
            kwargs["choices"] = list(kwargs["choices"])
        parser.add_argument(*names, **kwargs)


@dataclass(frozen=True)
class Entry:
    """A registry entry: ``build`` (a model/guide builder ``(cfg, x_shape)``, or an objective class) and its options.
    ``conditional``: a model that takes the (target, context) pairs of a conditional data set (``mnist-sum``, ...)."""

    build: Callable
    args: tuple[Arg, ...] = ()
    conditional: bool = False

    def __call__(self, *args, **kwargs):
        return self.build(*args, **kwargs)


def entry_args(entry) -> tuple[Arg, ...]:
    """The options an entry declares (none for a plain function)."""
    return tuple(getattr(entry, "args", ()))


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


# ----------------------------------------------------------------------------------------------- shared options

Z_DIMS = Arg("--z-dims", type=positive_int, nargs="+", help="stochastic layer sizes, nearest x first: 50, or 100 50 (default 50; 16 for text models)")
HIDDEN = Arg("--hidden", type=positive_int, nargs="+", help="hidden sizes; for text models the RNN size (default: the IWAE paper's; 191 for text models)")
ARCH = Arg("--arch", default="mlp", choices=("mlp", "conv"), help="encoder/decoder networks")
LIKELIHOOD = Arg("--likelihood", default="bernoulli", choices=tuple(LIKELIHOODS), help="p(x|z) of image models")
SCALE = Arg("--scale", type=float, help="fixed Gaussian observation scale (default: learned)")
ACTIVATION = Arg("--activation", default="tanh", help="hidden-layer nonlinearity")
#: what every image model and encoder reads
IMAGE_ARGS = (Z_DIMS, HIDDEN, ARCH, LIKELIHOOD, SCALE, ACTIVATION)
ENCODER_ARGS = (Z_DIMS, HIDDEN, ARCH, ACTIVATION)

TEXT_ARGS = (
    Z_DIMS, HIDDEN,
    Arg("--embed-dim", type=positive_int, group=TEXT_GROUP, help="word embedding size; --hidden sets the RNN size (default 353)"),
    Arg("--rnn", choices=("lstm", "gru"), group=TEXT_GROUP, help="recurrent cell of encoder and decoder (default lstm)"),
    Arg("--rnn-layers", type=positive_int, group=TEXT_GROUP, help="stacked RNN layers (default 1)"),
)
WORD_DROPOUT = Arg("--word-dropout", type=float, group=TEXT_GROUP, help="probability of replacing a decoder input word by <unk> while training (default 0)")

_DRAW_LIKELIHOOD = (LIKELIHOOD, SCALE)
DRAW_STEPS = Arg("--draw-steps", type=positive_int, group=DRAW_GROUP, help="steps T (default 64 for draw, 8 for convdraw)")
DRAW_Z = Arg("--draw-z", type=positive_int, group=DRAW_GROUP, help="size of each z_t; ConvDRAW: its channels (default 100; 4 for convdraw)")
LSTM_SIZE = Arg("--lstm-size", type=positive_int, group=DRAW_GROUP, help="LSTM units; ConvDRAW: ConvLSTM channels (default 256; 32 for convdraw)")

BAYES_MODEL_ARGS = (
    Arg("--bayesian-decoder", action="store_true", group=BAYES_GROUP, help="decoder weights are Normal latents (full-Bayes AEVB; default off)"),
    Arg("--local-reparam", action="store_true", group=BAYES_GROUP, help="local reparameterisation of the --bayesian-decoder weights (KSW15): per-example pre-activations (default off)"),
    Arg("--prior-scale", type=float, group=BAYES_GROUP, help="prior standard deviation of --bayesian-decoder weights (default 1)"),
    Arg("--decoder-dropout", choices=("A", "B"), group=BAYES_GROUP, help="variational Gaussian dropout in the decoder, KSW15 variant A or B (default: none)"),
)
ENCODER_DROPOUT = Arg("--encoder-dropout", choices=("A", "B"), group=BAYES_GROUP, help="variational Gaussian dropout on the encoder's hidden activations (default: none)")

NUM_PARTICLES = Arg("--num-particles", short="-k", type=int, group=OBJECTIVE_GROUP, help="samples per data point (default: the objective's: 1 for elbo/beta/geco/annealed, 5 for iwae/renyi, 8 for variance/logvariance)")
ESTIMATOR = Arg("--estimator", choices=("standard", "dreg", "vimco", "score"), group=OBJECTIVE_GROUP, help="IWAE/Renyi gradient estimator (vimco: discrete latents; default standard)")
BETA = Arg("--beta", type=float, group=OBJECTIVE_GROUP, help="beta-ELBO weight (default 1)")
BETA_SCHEDULE = Arg("--beta-schedule", choices=("constant", "linear", "cyclical", "logistic"), param="schedule", group=OBJECTIVE_GROUP, help="beta-ELBO / annealed schedule (default constant for beta, logistic for annealed)")
WARMUP_STEPS = Arg("--warmup-steps", type=int, group=OBJECTIVE_GROUP, help="steps of the --beta-schedule warm-up (default 10000)")
CYCLE_STEPS = Arg("--cycle-steps", type=int, group=OBJECTIVE_GROUP, help="steps per cycle of --beta-schedule cyclical (default 10000)")
TOLERANCE = Arg("--tolerance", type=float, group=OBJECTIVE_GROUP, help="GECO tolerance kappa (default 0.1; token-geco 4.5)")
GECO_ALPHA = Arg("--geco-alpha", type=float, param="alpha", group=OBJECTIVE_GROUP, help="GECO moving-average rate (default 0.99)")
GECO_NU = Arg("--geco-nu", type=float, param="nu", group=OBJECTIVE_GROUP, help="GECO multiplier rate (default 1)")


def _z_dims(cfg: dict) -> tuple[int, ...]:
    return tuple(cfg.get("z_dims") or (50,))


def _given(cfg: dict, key: str, default):
    """``cfg[key]``, or ``default`` when the option was not given (None): a given 0 stays 0, for the model to accept
    or refuse (``cfg.get(key) or default`` would silently replace it while config.json records 0)."""
    value = cfg.get(key)
    return default if value is None else value


def _hidden(cfg: dict):
    return cfg.get("hidden")  # None: the IWAE paper's sizes


def _vae(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.models import VAE

    return VAE(
        x_shape, _z_dims(cfg), _hidden(cfg), cfg.get("likelihood", "bernoulli"), cfg.get("scale"), cfg.get("arch", "mlp"),
        cfg.get("activation", "tanh"), cfg.get("prior_flow"), _given(cfg, "prior_flow_length", 2),
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
    """Sizes of the text models: ``x_shape`` is ``(vocab size,)`` (:class:`pyrovae.data.text.TextSplits`)."""
    hidden = _hidden(cfg)
    return {
        "vocab_size": x_shape[0], "embed_dim": _given(cfg, "embed_dim", 353), "hidden_dim": hidden[0][0] if hidden else 191,
        "num_layers": _given(cfg, "rnn_layers", 1), "rnn": cfg.get("rnn") or "lstm",
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
        bool(cfg.get("bayesian_decoder")), _given(cfg, "prior_scale", 1.0), cfg.get("decoder_dropout"), cfg.get("num_data"),
        bool(cfg.get("local_reparam")),
    )


def _bayes_gaussian(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.guides.bayesian import BayesEncoder

    z_dim, hidden = _one_layer(cfg, "guide='bayes_gaussian'")
    model = _bayes_vae(cfg, x_shape) if cfg.get("bayesian_decoder") else None  # names and shapes of the weight sites
    return BayesEncoder(
        x_shape, z_dim, hidden, cfg.get("activation", "tanh"), cfg.get("encoder_dropout"), model, cfg.get("num_data"),
        local_reparam=bool(cfg.get("local_reparam")),
    )


def _draw(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.models import DRAW

    return DRAW(
        x_shape, _given(cfg, "draw_steps", 64), _given(cfg, "draw_z", 100), _given(cfg, "lstm_size", 256), bool(cfg.get("attention")),
        _given(cfg, "read_size", 2), _given(cfg, "write_size", 5), cfg.get("likelihood", "bernoulli"), cfg.get("scale"),
    )


def _convdraw(cfg: dict, x_shape) -> nn.Module:
    from pyrovae.models import ConvDRAW
    from pyrovae.models.conditional import ConditionalConvDRAW

    ctx = _context_shape(cfg)  # a conditional data set (mnist-sum, ...) gets the conditional ConvDRAW
    cls, extra = (ConvDRAW, {}) if ctx is None else (ConditionalConvDRAW, {"context_shape": ctx})
    return cls(x_shape, _given(cfg, "draw_steps", 8), _given(cfg, "draw_z", 4), _given(cfg, "lstm_size", 32), likelihood=cfg.get("likelihood", "bernoulli"), scale=cfg.get("scale"), **extra)


def _context_shape(cfg: dict):
    from pyrovae.data.derived import context_shape

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


MODELS: dict[str, Callable[[dict, tuple], nn.Module]] = {
    "vae": Entry(_vae, (*IMAGE_ARGS,
        Arg("--prior-flow", choices=("realnvp", "iaf"), help="learned flow prior p(z) of --model vae (default: none, N(0, I))"),
        Arg("--prior-flow-length", type=positive_int, default=2, help="number of prior flow layers"))),
    "discrete": Entry(_discrete, (*IMAGE_ARGS,)),
    "sentence": Entry(_sentence, (*TEXT_ARGS, WORD_DROPOUT)),
    "lm": Entry(_lm, (*TEXT_ARGS, WORD_DROPOUT)),
    "bayes_vae": Entry(_bayes_vae, (*IMAGE_ARGS, *BAYES_MODEL_ARGS)),
    "draw": Entry(_draw, (*_DRAW_LIKELIHOOD, DRAW_STEPS, DRAW_Z, LSTM_SIZE,
        Arg("--attention", action="store_true", group=DRAW_GROUP, help="DRAW reads and writes through selective attention windows (default off)"),
        Arg("--read-size", type=positive_int, group=DRAW_GROUP, help="N of DRAW's N x N read grid (default 2)"),
        Arg("--write-size", type=positive_int, group=DRAW_GROUP, help="N of DRAW's N x N write grid (default 5)"))),
    "convdraw": Entry(_convdraw, (*_DRAW_LIKELIHOOD, DRAW_STEPS, DRAW_Z, LSTM_SIZE), conditional=True),
    "cvae": Entry(_cvae, IMAGE_ARGS, conditional=True),
}
GUIDES: dict[str, Callable[[dict, tuple], nn.Module]] = {
    "gaussian": Entry(_gaussian, ENCODER_ARGS),
    "flow": Entry(_flow, (*ENCODER_ARGS,
        Arg("--flow", default="planar", choices=tuple(sorted(FLOWS)), help="flow family of --guide flow"),
        Arg("--flow-length", type=positive_int, default=10, help="number of flow transforms of --guide flow"))),
    "bernoulli": Entry(_bernoulli, ENCODER_ARGS),
    "rnn": Entry(_rnn_encoder, (*TEXT_ARGS, Arg("--bidirectional", action="store_true", group=TEXT_GROUP, help="bidirectional encoder (--guide rnn; default off)"))),
    "none": Entry(_no_latents),
    "bayes_gaussian": Entry(_bayes_gaussian, (*ENCODER_ARGS, ENCODER_DROPOUT, *BAYES_MODEL_ARGS)),
    "conditional": Entry(_conditional_guide, ENCODER_ARGS),
}
#: guides built from their model, because they run its networks (DRAW's decoder recurrence): (cfg, x_shape, model) -> guide.
#: A model with a ``guide_name`` is paired with that guide.
MODEL_GUIDES: dict[str, Callable[[dict, tuple, nn.Module], nn.Module]] = {"draw": Entry(_draw_guide), "convdraw": Entry(_convdraw_guide)}
#: the guide a model gets when none is named (``gaussian`` otherwise)
DEFAULT_GUIDES: dict[str, str] = {"discrete": "bernoulli", "sentence": "rnn", "lm": "none", "draw": "draw", "convdraw": "convdraw", "cvae": "conditional"}


def default_guide(model: str) -> str:
    return DEFAULT_GUIDES.get(model, "gaussian")


def check_data_fits(cfg: dict) -> None:
    """Refuse a model that cannot take ``cfg``'s data set: a conditional data set (pairs of a target image and its
    context) needs a model that declares ``conditional``; ``ValueError`` names the models that fit."""
    ctx = _context_shape(cfg)
    model = cfg.get("model", "vae")
    if ctx is not None and not getattr(MODELS.get(model), "conditional", True):
        fits = sorted(name for name, entry in MODELS.items() if getattr(entry, "conditional", False))
        raise ValueError(
            f"dataset={cfg.get('dataset')!r} pairs each target image with a context of shape {tuple(ctx)} and trains p(target | context); "
            f"model={model!r} models images alone: choose a conditional model, {' or '.join(fits)}"
        )


def unread_options(cfg: dict, given) -> dict[str, list[str]]:
    """The registry options among ``given`` (config keys set by the user) that neither ``cfg``'s model, nor its guide,
    nor its objective declares, so nothing would read them: ``{flag: ["--model draw", ...], the entries that do}``."""
    model = cfg.get("model", "vae")
    guide = cfg.get("guide") or default_guide(model)
    chosen = (MODELS.get(model), GUIDES.get(guide) or MODEL_GUIDES.get(guide), OBJECTIVES.get(cfg.get("objective", "elbo")))
    read = {a.key for entry in chosen for a in entry_args(entry)}
    unread = {}
    for arg in all_args():
        if arg.key in given and arg.key not in read:
            unread[arg.flag] = [
                f"--{kind} {name}" for kind, registry in (("model", MODELS), ("guide", GUIDES), ("objective", OBJECTIVES))
                for name, entry in registry.items() if any(a.key == arg.key for a in entry_args(entry))
            ]
    return unread


def _objective_entries() -> dict[str, Entry]:
    """An :class:`Entry` for every objective of :data:`pyrovae.objectives.OBJECTIVES` (the one list of names), with
    the options declared here (``--num-particles`` alone where none are)."""
    from pyrovae.objectives import OBJECTIVES as CLASSES

    schedule = (BETA, BETA_SCHEDULE, WARMUP_STEPS, CYCLE_STEPS)
    options = {
        "elbo": (NUM_PARTICLES, Arg("--analytic-kl", action="store_true", group=OBJECTIVE_GROUP, help="closed-form KL in the ELBO (mean-field guides; default off)")),
        "iwae": (NUM_PARTICLES, ESTIMATOR),
        "renyi": (NUM_PARTICLES, Arg("--alpha", type=float, group=OBJECTIVE_GROUP, help="Renyi alpha (default 0.5)"), ESTIMATOR),
        "beta": (NUM_PARTICLES, *schedule),
        "geco": (
            NUM_PARTICLES,
            Arg("--constraint", choices=("RE", "pNCC"), group=OBJECTIVE_GROUP, help="GECO constraint (default RE; FRE/CLA need Python callables)"),
            TOLERANCE, GECO_ALPHA, GECO_NU,
            Arg("--geco-multiplier-step", choices=("paper", "clamped"), param="multiplier_step", group=OBJECTIVE_GROUP,
                help="GECO multiplier update: the paper's lambda*exp(nu*C_ma), or its step clamped to +-(1-alpha) (default paper)"),
        ),
        "annealed": (NUM_PARTICLES, *schedule, Arg("--free-bits", type=float, group=TEXT_GROUP, help="free bits per latent dimension, nats (--objective annealed; default 0)")),
        "token-geco": (NUM_PARTICLES, TOLERANCE, GECO_ALPHA, GECO_NU),
    }
    unknown = sorted(set(options) - set(CLASSES))
    if unknown:
        raise ValueError(f"options declared for objectives {unknown} that pyrovae.objectives.OBJECTIVES does not list; register them there")
    return {name: Entry(CLASSES[name], options.get(name, (NUM_PARTICLES,))) for name in CLASSES}


#: objective name -> :class:`Entry` of its class and options, one for each name of :data:`pyrovae.objectives.OBJECTIVES`
OBJECTIVES: dict[str, Entry] = _objective_entries()
#: objective name -> class (read-only view kept for older code; register in :data:`OBJECTIVES`)
ALL_OBJECTIVES: dict[str, type] = {name: e.build for name, e in OBJECTIVES.items()}
#: objective name -> {constructor argument: config key} (derived from :data:`OBJECTIVES`)
OBJECTIVE_ARGS: dict[str, dict[str, str]] = {name: {a.param or a.key: a.key for a in e.args} for name, e in OBJECTIVES.items()}


def all_args() -> list[Arg]:
    """Every option the registries declare, each once, in registry order; two different declarations of one flag
    are refused (``ValueError`` naming both)."""
    seen: dict[str, Arg] = {}
    for kind, registry in (("model", MODELS), ("guide", GUIDES), ("guide", MODEL_GUIDES), ("objective", OBJECTIVES)):
        for name, entry in registry.items():
            for arg in entry_args(entry):
                old = seen.setdefault(arg.flag, arg)
                if old != arg:
                    raise ValueError(f"{kind} {name!r} declares {arg.flag} differently from an earlier entry ({arg} vs {old}); share one Arg")
    return list(seen.values())


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


def objective_kwargs(cfg: dict) -> dict[str, str]:
    """{constructor argument: config key} of ``cfg["objective"]``."""
    name = cfg.get("objective", "elbo")
    entry = _pick(OBJECTIVES, "objective", name)
    return {a.param or a.key: a.key for a in entry_args(entry)} or OBJECTIVE_ARGS.get(name, {})


def build_objective(cfg: dict) -> Objective:
    name = cfg.get("objective", "elbo")
    entry = _pick(OBJECTIVES, "objective", name)
    kwargs = {arg: cfg[key] for arg, key in objective_kwargs(cfg).items() if cfg.get(key) is not None}
    return entry(**kwargs)
