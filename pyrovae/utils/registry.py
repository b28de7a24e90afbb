"""One registry of models, guides and objectives: a decorator beside each class registers it, and the command line
reads each option from the class's constructor, so a default is written once (in the signature)::

    @register_objective("geco", flags={"alpha": "geco_alpha"}, exclude=("lambda_min", "lambda_max"))
    class GECO(Objective):
        def __init__(self, tolerance: float = 0.1, alpha: float = 0.99, ...): ...

- Each constructor parameter is a ``pyrovae train`` option: its config key is the parameter's name, or the rename
  ``flags`` gives (``alpha`` -> ``geco_alpha``, flag ``--geco-alpha``); its type comes from the annotation (``int``,
  ``float``, ``str``, ``bool``: a switch, ``Literal[...]``: choices) or the default's type; its default from the
  signature; its help from the docstring's ``Args:`` section. ``exclude`` keeps a parameter off the command line.
- ``choices`` (param -> names) where an annotation cannot list them (a live table such as ``LIKELIHOODS``); ``args``
  (:class:`Arg`) where a signature cannot say it: a short alias, a switch whose constructor default is on.
- A constructor's ``**kwargs`` is followed into its parent's constructor while the parent is registered too
  (``TokenGECO(tolerance, **kwargs)`` -> GECO's options, with GECO's renames and exclusions).
- Parameters a registry's ``inputs`` names (``x_shape``, ``z_dim``, ...) are filled by the caller, not by options.
- Plugins: :func:`load_plugin` imports a user's file or module (``pyrovae train --plugin my_objective.py``), and
  :func:`load_entry_points` the ``pyrovae.plugins`` entry-point group of installed packages; their decorated
  classes join the registries.

Imports nothing else of pyrovae (the bottom layer): the CLI turns these entries into argparse flags.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import typing
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

#: ``--help`` sections of the registries' options
MODEL_GROUP = "model and guide"
TEXT_GROUP = "text (--dataset ptb, --model sentence or lm)"
DRAW_GROUP = "DRAW and ConvDRAW (--model draw / convdraw; their guide is chosen with them)"
OBJECTIVE_GROUP = "objective"
BAYES_GROUP = "Bayesian layers and natural gradient (--model bayes_vae --guide bayes_gaussian)"

#: a parameter without a default (``inspect.Parameter.empty``)
REQUIRED = inspect.Parameter.empty


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


@dataclass(frozen=True)
class Arg:
    """One option of ``pyrovae train``: derived from a constructor parameter (:meth:`Registered.options`), or
    declared where a signature cannot say it.

    Args:
        flag: ``--my-size``; the config key is ``my_size``.
        help: what it sets; state the default in words when ``default`` is None ("default 8").
        type, default, choices, nargs, action: as in ``argparse.ArgumentParser.add_argument``.
        short: a one-letter alias (``-k``).
        param: the constructor argument it feeds (default: the config key).
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
class Option(Arg):
    """An :class:`Arg` derived from a constructor parameter: its ``default`` is the signature's."""


def flag_of(key: str) -> str:
    """``--my-size`` for the config key ``my_size``."""
    return "--" + key.replace("_", "-")


# ----------------------------------------------------------------------------------------------- docstrings

_ROLE = re.compile(r":[\w:]+:`~?([^`]+)`")


def _plain(text: str) -> str:
    """Docstring markup as plain text: ``x`` -> x, :class:`a.b.C` -> a.b.C (``~``: C)."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).find("~") >= 0 else m.group(1), text)
    return " ".join(text.replace("``", "").split())


def docstring_args(obj) -> dict[str, str]:
    """``{parameter: description}`` from the ``Args:`` section of ``obj``'s docstring (Google style; an entry
    ``a, b: text`` describes both)."""
    doc = inspect.getdoc(obj) or ""
    lines, found, current, indent = doc.splitlines(), {}, None, None
    for i, line in enumerate(lines):
        if line.strip() == "Args:":
            start = i + 1
            break
    else:
        return found
    for line in lines[start:]:
        if not line.strip():
            current = None
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break
        m = re.match(r"^\s*(\*{0,2}[\w, ]+?):(\s|$)(.*)$", line) if depth == indent else None
        if m:
            current = [n.strip().lstrip("*") for n in m.group(1).split(",")]
            for name in current:
                found[name] = m.group(3).strip()
        elif current:
            for name in current:
                found[name] += " " + line.strip()
    return {k: _plain(v) for k, v in found.items()}


def _help_text(description: str) -> str:
    """A docstring description as ``--help`` text: its sentences that state no default (the CLI states it once)."""
    text = re.sub(r"\s*\([^()]*\bdefault[^()]*\)", "", description)
    sentences = [s for s in re.split(r"(?<=\.)\s+(?=[A-Z])", text) if not re.search(r"\bdefault", s)]
    return sentences[0].rstrip(" .;").replace("%", "%%") if sentences else ""  # %%: argparse formats help with %


# ----------------------------------------------------------------------------------------------- entries


def _unwrap_optional(annotation):
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


@dataclass(frozen=True)
class Param:
    """A constructor parameter as the registry sees it: its name, default (:data:`REQUIRED` when none), annotation
    (resolved where possible), description from the docstring, and the class whose constructor declares it."""

    name: str
    default: Any
    annotation: Any
    doc: str
    owner: type


@dataclass(frozen=True, eq=False)
class Registered:
    """A class registered under a name, with what its signature cannot say (see the module docstring).

    ``build`` is the class; ``extra`` holds what a kind of entry declares besides options (a model's default
    ``guide``, ...)."""

    name: str
    build: type
    registry: "Registry" = field(repr=False)
    flags: Mapping[str, str] = field(default_factory=dict)
    exclude: frozenset = frozenset()
    args: tuple = ()
    choices: Mapping[str, Any] = field(default_factory=dict)
    group: Optional[str] = None
    groups: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, *args, **kwargs):
        return self.build(*args, **kwargs)

    @property
    def conditional(self) -> bool:
        """Whether the class takes a context (a ``context_shape`` parameter): a conditional data set's pairs."""
        return "context_shape" in {p.name for p in self.parameters()} or "with_context" in self.extra

    def _chain(self) -> list["Registered"]:
        """This entry and the registered parents whose constructors its ``**kwargs`` reach."""
        chain = [self]
        for klass in self.build.__mro__[1:]:
            if "__init__" in vars(klass):
                parent = self.registry.entry_of(klass)
                if parent is None:
                    break
                chain.append(parent)
        return chain

    def parameters(self) -> list[Param]:
        """The constructor's parameters, following ``**kwargs`` into registered parents (first declaration wins)."""
        params: dict[str, Param] = {}
        owners = [k for k in self.build.__mro__ if "__init__" in vars(k) and k is not object]
        for i, klass in enumerate(owners):
            if i > 0 and self.registry.entry_of(klass) is None:
                break
            init = vars(klass)["__init__"]
            try:
                hints = typing.get_type_hints(init)
            except Exception:  # an annotation that names something not importable here: use the default's type
                hints = {}
            docs = docstring_args(klass)
            more = False
            for p in list(inspect.signature(init).parameters.values())[1:]:
                if p.kind is p.VAR_KEYWORD:
                    more = True
                elif p.kind is not p.VAR_POSITIONAL and p.name not in params:
                    params[p.name] = Param(p.name, p.default, hints.get(p.name, p.annotation), docs.get(p.name, ""), klass)
            if not more:
                break
        return list(params.values())

    def inputs(self) -> list[Param]:
        """The parameters the caller fills (the registry's ``inputs`` that are neither renamed to options nor excluded)."""
        chain = self._chain()
        skip = set(self.renames()) | set().union(*(e.exclude for e in chain))
        return [p for p in self.parameters() if p.name in self.registry.inputs and p.name not in skip]

    def renames(self) -> dict[str, str]:
        """{constructor argument: config key} of the renamed options (this entry's and its registered parents')."""
        out: dict[str, str] = {}
        for entry in reversed(self._chain()):
            out.update(entry.flags)
        return out

    def options(self) -> list[Arg]:
        """This entry's ``pyrovae train`` options, one per constructor parameter that is neither excluded nor an
        input of the registry, in signature order; ``ValueError`` for a parameter no flag can be derived for."""
        chain = self._chain()
        exclude = frozenset().union(*(e.exclude for e in chain))
        renames, choices, groups = {}, {}, {}
        explicit: dict[str, Arg] = {}
        for entry in reversed(chain):  # the entry's own declarations win over its parents'
            renames.update(entry.flags)
            choices.update(entry.choices)
            groups.update(entry.groups)
            explicit.update({a.param or a.key: a for a in entry.args})
        group = next((e.group for e in chain if e.group), None) or self.registry.group
        docs = {}
        for klass in reversed(self.build.__mro__):
            docs.update({k: v for k, v in docstring_args(klass).items() if not v.lower().startswith("as ")})
        out = []
        for p in self.parameters():
            if p.name in explicit:
                arg = explicit[p.name]
                out.append(arg if arg.param else Arg(**{**arg.__dict__, "param": p.name}))
                continue
            if p.name in exclude or (p.name in self.registry.inputs and p.name not in renames):
                continue
            key = renames.get(p.name, p.name)
            doc = p.doc if p.doc and not p.doc.lower().startswith("as ") else docs.get(p.name, p.doc)
            kwargs = self._flag_kwargs(p, choices.get(p.name))
            out.append(Option(flag_of(key), _help_text(doc) or p.name.replace("_", " "), short=self.registry.shorts.get(p.name), param=p.name,
                           group=groups.get(p.name, group), **kwargs))
        return out

    def _flag_kwargs(self, p: Param, choices) -> dict:
        where = f"parameter {p.name!r} of {self.build.__module__}.{self.build.__qualname__} ({self.registry.kind} {self.name!r})"
        if p.default is REQUIRED:
            raise ValueError(f"{where} has no default, so the command line has none to give: give it one in the signature, or exclude it (exclude=({p.name!r},))")
        annotation = _unwrap_optional(p.annotation)
        if callable(choices):
            choices = choices()
        if typing.get_origin(annotation) is typing.Literal:
            choices = choices or typing.get_args(annotation)
            annotation = type(typing.get_args(annotation)[0])
        if annotation in (REQUIRED, Any) or isinstance(annotation, str) or typing.get_origin(annotation) is not None:
            annotation = type(p.default) if p.default is not None else (type(next(iter(choices))) if choices else None)
        if annotation is bool:
            if p.default not in (False, None):
                raise ValueError(f"{where} is a switch whose default is on, which a --flag cannot turn off: declare it with args=(Arg(..., action='store_true', ...),) or exclude it")
            return {"action": "store_true", "default": False}
        types = {int: self.registry.int_type, float: float, str: None}
        if annotation not in types:
            raise ValueError(f"{where} has type {getattr(annotation, '__name__', annotation)!r}, which no flag parses: annotate it int, float, str, bool or Literal[...], or exclude it")
        return {"type": types[annotation], "default": p.default, "choices": tuple(choices) if choices is not None else None}


class Registry(MutableMapping):
    """name -> :class:`Registered` entry of one kind (``model``, ``guide``, ``objective``), in registration order.

    Args:
        kind: what it registers, for messages.
        group: the ``--help`` section of its options.
        inputs: constructor parameters the caller fills (the data's shape, ...), never options.
        int_type: the argparse type of ``int`` parameters (:func:`positive_int` for sizes).
        shorts: one-letter aliases by parameter (``{"num_particles": "-k"}``).
    """

    def __init__(self, kind: str, group: str, inputs: Sequence[str] = (), int_type: Callable = int, shorts: Optional[Mapping[str, str]] = None):
        self.kind, self.group, self.inputs, self.int_type = kind, group, frozenset(inputs), int_type
        self.shorts = dict(shorts or {})
        self._entries: dict[str, Any] = {}

    def __getitem__(self, name: str):
        return self._entries[name]

    def __setitem__(self, name: str, entry) -> None:  # any callable is accepted (the CLI's older builder entries)
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    def entry_of(self, cls: type) -> Optional[Registered]:
        return next((e for e in self._entries.values() if isinstance(e, Registered) and e.build is cls), None)

    def classes(self) -> "ClassView":
        """A live read-only view name -> class."""
        return ClassView(self)

    def register(self, name: str, *, flags: Optional[Mapping[str, str]] = None, exclude: Sequence[str] = (), args: Sequence[Arg] = (),
                 choices: Optional[Mapping[str, Any]] = None, group: Optional[str] = None, groups: Optional[Mapping[str, str]] = None, **extra):
        """A class decorator: register the class as ``name`` (see the module docstring for the arguments)."""
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
            raise ValueError(f"register_{self.kind}({name!r}): a name is letters, digits, '-', '_' or '.', as typed after --{self.kind}")
        if isinstance(exclude, str):
            raise TypeError(f"register_{self.kind}({name!r}, exclude={exclude!r}): pass a tuple of parameter names, e.g. exclude=({exclude!r},)")

        def decorate(cls: type) -> type:
            if not inspect.isclass(cls):
                raise TypeError(f"register_{self.kind}({name!r}) decorates a class; got {cls!r}")
            old = self._entries.get(name)
            same = getattr(old, "build", None)
            if old is not None and not (inspect.isclass(same) and (same.__module__, same.__qualname__) == (cls.__module__, cls.__qualname__)):
                what = f"{same.__module__}.{same.__qualname__}" if inspect.isclass(same) else repr(old)
                raise ValueError(f"{self.kind} {name!r} is registered already, by {what}; register {cls.__module__}.{cls.__qualname__} under another name")
            known = {p.name for p in Registered(name, cls, self).parameters()}
            unknown = sorted((set(flags or {}) | set(exclude) | set(choices or {}) | set(groups or {})) - known)
            if unknown:
                raise ValueError(f"register_{self.kind}({name!r}) names {unknown}, which {cls.__qualname__}'s constructor does not take; choose among {sorted(known)}")
            self._entries[name] = Registered(name, cls, self, dict(flags or {}), frozenset(exclude), tuple(args), dict(choices or {}), group, dict(groups or {}), extra)
            return cls

        return decorate

    def register_variant(self, name: str, **extra):
        """A class decorator: attach the class to the entry ``name`` under ``extra``'s key (``with_context=True``:
        the class built when the data has a context), without a name of its own."""

        def decorate(cls: type) -> type:
            entry = self._entries.get(name)
            if not isinstance(entry, Registered):
                raise ValueError(f"{self.kind} {name!r} is not registered yet; register it before its variant {cls.__qualname__}")
            self._entries[name] = Registered(**{**entry.__dict__, "extra": {**entry.extra, **{k: cls for k, v in extra.items() if v}}})
            return cls

        return decorate


class ClassView(Mapping):
    """name -> class of a :class:`Registry` (an older entry: its ``build``)."""

    def __init__(self, registry: Registry):
        self._registry = registry

    def __getitem__(self, name: str) -> type:
        entry = self._registry[name]
        return getattr(entry, "build", entry)

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)

    def __repr__(self) -> str:
        return repr(dict(self))


#: constructor parameters of models and guides that the CLI fills from the data and the shared size options
MODEL_INPUTS = ("x_shape", "vocab_size", "context_shape", "z_dims", "z_dim", "hidden", "hidden_dim", "num_data", "model")

MODELS = Registry("model", MODEL_GROUP, inputs=MODEL_INPUTS, int_type=positive_int)
GUIDES = Registry("guide", MODEL_GROUP, inputs=MODEL_INPUTS, int_type=positive_int)
#: guides built from their model, because they run its networks (DRAW's decoder recurrence): ``Guide(model)``
MODEL_GUIDES = Registry("guide", MODEL_GROUP, inputs=MODEL_INPUTS, int_type=positive_int)
OBJECTIVES = Registry("objective", OBJECTIVE_GROUP, shorts={"num_particles": "-k"})


def register_objective(name: str, **options):
    """Register an objective class as ``--objective NAME`` (options: :meth:`Registry.register`)."""
    return OBJECTIVES.register(name, **options)


def register_model(name: str, **options):
    """Register a model class as ``--model NAME``; ``guide=`` names the guide it gets when none is given
    (default ``gaussian``). Options: :meth:`Registry.register`."""
    return MODELS.register(name, **options)


def register_guide(name: str, from_model: bool = False, **options):
    """Register a guide class as ``--guide NAME``; ``from_model=True``: it is built as ``Guide(model)`` from the
    model it runs with. Options: :meth:`Registry.register`."""
    return (MODEL_GUIDES if from_model else GUIDES).register(name, **options)


# ----------------------------------------------------------------------------------------------- plugins

PLUGIN_GROUP = "pyrovae.plugins"
_FIX = ("pass the path of a Python file (--plugin ./my_objective.py) or the name of an importable module "
        "(--plugin mypackage.objectives) whose classes are decorated with pyrovae.utils.registry.register_objective, register_model or register_guide")
_loaded: dict[str, str] = {}  # plugin as given -> module name


def _names() -> set[tuple[str, str]]:
    return {(r.kind, n) for r in (MODELS, GUIDES, MODEL_GUIDES, OBJECTIVES) for n in r}


def plugin_id(spec: str) -> str:
    """How a run records a plugin: a file as its absolute path, a module by its name."""
    spec = str(spec)
    return str(Path(spec).expanduser().resolve()) if _is_file_spec(spec) else spec


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec or Path(spec).expanduser().is_file()


def load_plugin(spec: str) -> str:
    """Import a plugin (a ``.py`` file or a module name) once, so that its decorated classes join the registries;
    returns its module name. ``ValueError`` names the plugin, what went wrong and the fix."""
    spec = str(spec)
    key = plugin_id(spec)
    if key in _loaded:
        return _loaded[key]
    before = _names()
    if _is_file_spec(spec):
        path = Path(key)
        if not path.is_file():
            raise ValueError(f"--plugin {spec}: there is no file {path}; {_FIX}")
        if path.suffix != ".py":
            raise ValueError(f"--plugin {spec}: {path} is not a Python file (.py); {_FIX}")
        module_name = f"pyrovae_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise ValueError(f"--plugin {spec}: importing {path} raised {type(e).__name__}: {e}; fix the file") from e
    else:
        module_name = spec
        fresh = module_name not in sys.modules
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                raise ValueError(f"--plugin {spec}: no module {e.name!r} on the Python path (sys.path); {_FIX}") from e
            raise ValueError(f"--plugin {spec}: importing it raised {type(e).__name__}: {e}; install what it needs") from e
        except Exception as e:
            raise ValueError(f"--plugin {spec}: importing it raised {type(e).__name__}: {e}; fix the module") from e
        if not fresh:
            before = set()  # imported before: what it registered is in the registries already
    if before and _names() == before:
        raise ValueError(f"--plugin {spec}: it registered no objective, model or guide (a name that was not there before); {_FIX}")
    _loaded[key] = module_name
    return module_name


_entry_points_loaded = False


def load_entry_points() -> list[str]:
    """Import, once, every plugin that installed packages declare in the ``pyrovae.plugins`` entry-point group
    (``[project.entry-points."pyrovae.plugins"] mine = "mypackage.objectives"``); returns their names."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return []
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as e:
            dist = getattr(getattr(ep, "dist", None), "name", "an installed package")
            raise ValueError(
                f"the {PLUGIN_GROUP} entry point {ep.name!r} ({ep.value}, from {dist}) failed to import: {type(e).__name__}: {e}; "
                f"fix or uninstall {dist}"
            ) from e
        names.append(ep.name)
    return names
