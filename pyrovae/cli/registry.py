"""Names the CLI understands: models, guides and objectives, each built from a run's JSON config.

A config is a flat dict (the CLI's arguments, saved as a run's ``config.json``). The registries are those of
:mod:`pyrovae.utils.registry`: a decorator beside each class (``@register_objective("geco", flags=...)``) registers
it, and each ``pyrovae train`` option comes from the constructor's signature (name, type, default, help), so a
default is written once, in the constructor. ``pyrovae train --plugin my_file.py`` imports a user's file first, so
its decorated classes add ``--objective NAME`` (or ``--model``, ``--guide``) and their flags.

- An option read by several entries is one flag; its parser default is the entries' common default, or None when
  they differ, with the defaults stated per entry in ``--help`` ("default 64 for draw, 8 for convdraw").
- Constructor parameters that come from the data or the shared size options (``x_shape``, ``vocab_size``,
  ``context_shape``, ``z_dims``/``z_dim``, ``hidden``/``hidden_dim``, ``num_data``, ``model``) are filled here
  (:func:`construct`); :data:`DEFAULT_Z_DIMS` is ``--z-dims``'s default for image models and guides, the one
  default of the CLI's own.
- Older entries still work: :class:`Entry` (a builder ``(cfg, x_shape)``, or an objective class, with declared
  :class:`Arg` options) and plain functions ``(cfg, x_shape)``, set into the registries by hand.
- ``ALL_OBJECTIVES`` (name -> class) and ``OBJECTIVE_ARGS`` (name -> {constructor argument: config key}) are live
  views of ``OBJECTIVES`` for older code.
- Never an ``if name == ...`` in the trainer or the objectives.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from torch import nn

import pyrovae.guides  # noqa: F401  (their classes register themselves)
import pyrovae.models  # noqa: F401
from pyrovae.objectives import Objective
from pyrovae.utils.registry import (  # noqa: F401  (Arg, positive_int and the sections: their older home is here)
    BAYES_GROUP, DRAW_GROUP, MODEL_GROUP, OBJECTIVE_GROUP, REQUIRED, TEXT_GROUP, Arg, Option, Registered, flag_of, positive_int,
)
from pyrovae.utils.registry import GUIDES, MODEL_GUIDES, MODELS, OBJECTIVES


@dataclass(frozen=True)
class Entry:
    """An older registry entry: ``build`` (a model/guide builder ``(cfg, x_shape)``, or an objective class) and its
    declared options. ``conditional``: a model that takes the (target, context) pairs of a conditional data set."""

    build: Callable
    args: tuple[Arg, ...] = ()
    conditional: bool = False

    def __call__(self, *args, **kwargs):
        return self.build(*args, **kwargs)


# ----------------------------------------------------------------------------------------------- shared options

#: ``--z-dims`` when not given, for image models and guides (the IWAE paper's); text models take their constructor's
DEFAULT_Z_DIMS = (50,)
Z_DIMS = Arg("--z-dims", type=positive_int, nargs="+", help="stochastic layer sizes, nearest x first: 50, or 100 50 (default 50; 16 for text models)")
HIDDEN = Arg("--hidden", type=positive_int, nargs="+", help="hidden sizes; for text models the RNN size (default: the IWAE paper's; 191 for text models)")
#: older entries' shared option (an :class:`Entry` may list it); derived objectives declare the same flag
NUM_PARTICLES = Arg("--num-particles", short="-k", type=int, group=OBJECTIVE_GROUP, help="samples per data point (default: the objective's)")

_REGISTRIES = (("model", MODELS), ("guide", GUIDES), ("guide", MODEL_GUIDES), ("objective", OBJECTIVES))


def _input_args(entry: Registered) -> tuple[Arg, ...]:
    names = {p.name for p in entry.inputs()}
    return tuple(arg for arg, reads in ((Z_DIMS, {"z_dims", "z_dim"}), (HIDDEN, {"hidden", "hidden_dim"})) if names & reads)


def entry_args(entry) -> tuple[Arg, ...]:
    """The options an entry reads: a registered class's from its signature (and the shared size options its inputs
    read); an older :class:`Entry`'s as declared; none for a plain function."""
    if isinstance(entry, Registered):
        return (*_input_args(entry), *entry.options())
    return tuple(getattr(entry, "args", ()))


def _same_flag(a: Arg, b: Arg) -> bool:
    """Whether two declarations parse one flag alike (their defaults and help may differ: they are merged)."""
    norm = lambda c: None if c is None else tuple(c)
    return (a.type, norm(a.choices), a.nargs, a.action) == (b.type, norm(b.choices), b.nargs, b.action) and (not a.short or not b.short or a.short == b.short)


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _merge(flag: str, readers: list) -> Arg:
    """One flag from the declarations of the entries that read it: the common default, or None and a help text
    that states each entry's; the help of the first entry that describes it; the shared ``--help`` section."""
    derived = [(name, arg) for _, name, arg, _ in readers if isinstance(arg, Option)]
    first = readers[0][2]
    if not derived:
        return first
    helps = [arg.help for _, arg in derived if not arg.help.lower().startswith("as ")] or [derived[0][1].help]
    help_text = helps[0]
    defaults: dict = {}
    for name, arg in derived:
        defaults.setdefault(repr(arg.default), (arg.default, []))[1].append(name)
    if len(defaults) == 1:
        default = derived[0][1].default
        if default is None:
            help_text += " (default: none)"
    else:
        default = None
        help_text += " (default " + "; ".join(f"{_shown(v)} for {', '.join(names)}" for v, names in defaults.values()) + ")"
    groups = {arg.group for _, _, arg, _ in readers}
    group = groups.pop() if len(groups) == 1 else readers[0][3]
    short = next((arg.short for _, _, arg, _ in readers if arg.short), None)
    return Arg(flag, help_text, type=first.type, default=default, choices=first.choices, nargs=first.nargs, action=first.action, short=short, group=group)


def all_args() -> list[Arg]:
    """Every option the registries read, each once, in registry order (declarations merged: :func:`_merge`); two
    declarations of one flag that parse it differently are refused (``ValueError`` naming both)."""
    readers: dict[str, list] = {}
    for kind, registry in _REGISTRIES:
        for name, entry in registry.items():
            for arg in entry_args(entry):
                seen = readers.setdefault(arg.flag, [])
                if seen and not _same_flag(seen[0][2], arg):
                    raise ValueError(f"{kind} {name!r} declares {arg.flag} differently from an earlier entry ({arg} vs {seen[0][2]}); share one Arg, or rename the parameter's flag (flags={{...}})")
                seen.append((kind, name, arg, registry.group))
    return [_merge(flag, found) for flag, found in readers.items()]


def default_guide(model: str) -> str:
    """The guide a model gets when none is named: its registration's ``guide=``, else ``gaussian``."""
    entry = MODELS.get(model)
    return getattr(entry, "extra", {}).get("guide") or "gaussian"


def _context_shape(cfg: dict):
    from pyrovae.data.derived import context_shape

    return context_shape(cfg.get("dataset", ""))


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


def _chosen(cfg: dict) -> tuple:
    """The registry entries of ``cfg``'s model and guide (None for an unknown name)."""
    model = cfg.get("model", "vae")
    guide = cfg.get("guide") or default_guide(model)
    return MODELS.get(model), GUIDES.get(guide) or MODEL_GUIDES.get(guide)


def unread_options(cfg: dict, given) -> dict[str, list[str]]:
    """The registry options among ``given`` (config keys set by the user) that neither ``cfg``'s model, nor its guide,
    nor its objective reads, so nothing would: ``{flag: ["--model draw", ...], the entries that do}``."""
    chosen = (*_chosen(cfg), OBJECTIVES.get(cfg.get("objective", "elbo")))
    read = {a.key for entry in chosen for a in entry_args(entry)}
    unread = {}
    for arg in all_args():
        if arg.key in given and arg.key not in read:
            unread[arg.flag] = [
                f"--{kind} {name}" for kind, registry in _REGISTRIES
                for name, entry in registry.items() if any(a.key == arg.key for a in entry_args(entry))
            ]
    return unread


#: config keys the builders read besides the registries' options
STRUCTURE_KEYS = ("model", "guide", "objective", "dataset", "z_dims", "hidden", "num_data")


def check_config(cfg: dict) -> None:
    """Refuse a config, written by hand for :func:`build_model` and friends, that would build something other than
    what it says: a key no builder reads (a misspelt ``draw_step`` would leave the default in silence; the message
    suggests the nearest key), or an option that the chosen model, guide and objective do not read (naming those
    that do). The CLI checks its own configs (argparse and ``unread_options``), which hold its trainer's keys too."""
    known = {a.key for a in all_args()} | set(STRUCTURE_KEYS)
    unknown = sorted(set(cfg) - known)
    if unknown:
        hints = []
        for key in unknown:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise ValueError(f"config keys {', '.join(hints)} are read by no model, guide or objective; the keys are {sorted(known)}")
    given = {k for k, v in cfg.items() if v is not None and v is not False}
    unread = unread_options(cfg, given)
    if unread:
        parts = [f"{flag.lstrip('-').replace('-', '_')!r} (read by {', '.join(users)})" for flag, users in unread.items()]
        raise ValueError(
            f"model={cfg.get('model', 'vae')!r}, guide={cfg.get('guide') or default_guide(cfg.get('model', 'vae'))!r}, "
            f"objective={cfg.get('objective', 'elbo')!r} would not read {'; '.join(parts)}: drop those keys, or choose what reads them"
        )


class _ObjectiveArgs(Mapping):
    """objective name -> {constructor argument: config key} (a live view of :data:`OBJECTIVES`)."""

    def __getitem__(self, name: str) -> dict[str, str]:
        return {a.param or a.key: a.key for a in entry_args(OBJECTIVES[name])}

    def __iter__(self) -> Iterator[str]:
        return iter(OBJECTIVES)

    def __len__(self) -> int:
        return len(OBJECTIVES)


#: objective name -> class (the same live view as :data:`pyrovae.objectives.OBJECTIVES`)
ALL_OBJECTIVES = OBJECTIVES.classes()
#: objective name -> {constructor argument: config key}
OBJECTIVE_ARGS: Mapping[str, dict[str, str]] = _ObjectiveArgs()


def _pick(registry, kind: str, name: str):
    if name not in registry:
        raise ValueError(f"{kind}={name!r} is not known; choose one of {sorted(registry)}")
    return registry[name]


_OMIT = object()


def _one_value(cfg: dict, what: str, text: bool):
    z_dims = cfg.get("z_dims")
    if z_dims is None:
        return _OMIT if text else DEFAULT_Z_DIMS[0]
    if len(z_dims) != 1:
        if text:
            raise ValueError(f"{what} has one latent variable; got z_dims={list(z_dims)}. Pass one --z-dims value")
        raise ValueError(f"{what} has one stochastic layer; got z_dims={list(z_dims)}. Pass one --z-dims value")
    return z_dims[0]


def _input(param, entry: Registered, kind: str, cfg: dict, x_shape: tuple, model, ctx):
    """The value of a constructor parameter that the data or the shared size options give (:data:`_OMIT`: none,
    the constructor's default)."""
    names = {p.name for p in entry.parameters()}
    what = f"{kind}={entry.name!r}"
    name = param.name
    hidden = cfg.get("hidden")
    if name == "x_shape":
        return tuple(x_shape)
    if name == "vocab_size":
        return x_shape[0]
    if name == "context_shape":
        if ctx is None and param.default is not None:  # a class with no unconditional form (its default is not None)
            raise ValueError(f"{what} is conditional, model(target, context); got dataset={cfg.get('dataset')!r}: pass --dataset mnist-sum, mnist-sum-hard or mnist-rotate")
        return _OMIT if ctx is None else ctx
    if name == "z_dims":
        return tuple(cfg["z_dims"]) if cfg.get("z_dims") else _OMIT
    if name == "z_dim":
        return _one_value(cfg, what, text="vocab_size" in names)
    if name == "hidden":
        if not hidden:
            return _OMIT
        return hidden if "z_dims" in names else tuple(hidden[0])
    if name == "hidden_dim":
        return hidden[0][0] if hidden else _OMIT
    if name == "num_data":
        return _OMIT if cfg.get("num_data") is None else cfg["num_data"]
    if name == "model":
        if entry.registry is MODEL_GUIDES:
            return model
        when = entry.extra.get("model_copy_if")
        if when is None or cfg.get(when):  # a copy of the run's model: the names and shapes of its sites
            return build_model(cfg, x_shape)
        return _OMIT
    raise ValueError(f"{what}: no value for the constructor's input {name!r}")


def construct(entry: Registered, kind: str, cfg: dict, x_shape, model: Optional[nn.Module] = None):
    """A registered model or guide built from ``cfg``: its inputs from the data and the shared size options, each
    option set in ``cfg`` (not None) as its constructor argument, the rest left to the signature's defaults."""
    x_shape = tuple(x_shape)
    cls = entry.build
    ctx = None
    if entry.conditional:
        ctx = _context_shape(cfg)
        if ctx is not None:
            cls = entry.extra.get("with_context", cls)
    kwargs = {}
    for param in entry.inputs():
        value = _input(param, entry, kind, cfg, x_shape, model, ctx)
        if value is not _OMIT:
            kwargs[param.name] = value
    kwargs.update(_option_values(entry.options(), cfg))
    return cls(**kwargs)


def _option_values(args, cfg: dict) -> dict:
    """{constructor argument: value} of the options set in ``cfg`` (not None); a switch (``store_true``) is always
    passed, off unless given, whatever its constructor's default."""
    out = {}
    for arg in args:
        if arg.action == "store_true":
            out[arg.param or arg.key] = bool(cfg.get(arg.key))
        elif cfg.get(arg.key) is not None:
            out[arg.param or arg.key] = cfg[arg.key]
    return out


def option_names(cfg: dict) -> dict[str, str]:
    """{constructor argument: config key} of the renamed options of ``cfg``'s model and guide (``steps`` ->
    ``draw_steps``), for messages that name the flag."""
    out = {}
    for entry in _chosen(cfg):
        if isinstance(entry, Registered):
            out.update(entry.renames())
    return out


def build_model(cfg: dict, x_shape) -> nn.Module:
    entry = _pick(MODELS, "model", cfg.get("model", "vae"))
    if isinstance(entry, Registered):
        return construct(entry, "model", cfg, x_shape)
    return entry(cfg, tuple(x_shape))


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
        entry = MODEL_GUIDES[paired]
        return construct(entry, "guide", cfg, x_shape, model) if isinstance(entry, Registered) else entry(cfg, tuple(x_shape), model)
    if name in MODEL_GUIDES:
        raise ValueError(f"guide={name!r} is built from its own model ({name!r}); got model={cfg.get('model', 'vae')!r}: pass --model {name}")
    entry = _pick(GUIDES, "guide", name)
    if isinstance(entry, Registered):
        return construct(entry, "guide", cfg, x_shape, model)
    return entry(cfg, tuple(x_shape))


def objective_kwargs(cfg: dict) -> dict[str, str]:
    """{constructor argument: config key} of ``cfg["objective"]``."""
    name = cfg.get("objective", "elbo")
    _pick(OBJECTIVES, "objective", name)
    return OBJECTIVE_ARGS[name]


def build_objective(cfg: dict) -> Objective:
    name = cfg.get("objective", "elbo")
    entry = _pick(OBJECTIVES, "objective", name)
    return entry(**_option_values(entry_args(entry), cfg))
