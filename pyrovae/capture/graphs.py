"""One graph cache for the training step and for evaluation: record a function once per input signature, replay
the recorded graph without the Python that made it, and check it against the plain call.

Pyro runs the model and guide under its effect handlers on every call. For a small VAE that Python work costs as
much as the arithmetic. :class:`GraphCache` runs a function under ``torch.fx``'s ``make_fx``, which records every
aten operation it performs (random draws and, for a training step, the backward pass included; Pyro's Python
not), and replays the recorded graph on later calls: the same kernels in the same order on the same RNG stream.
With ``mode="compile"`` the graph is also compiled by ``torch.compile`` (inductor: fused C++ kernels on CPU,
Triton on CUDA), with torch's own random ops so the draws stay the same; where compiling fails the recorded graph
is replayed.

What keeps it honest:

- one graph per input signature: the shape, dtype and device of each input tensor, the hashable static
  arguments, and the train/eval flags of the modules involved;
- state that changes between calls (an objective's step counter or Lagrange multiplier) is an input and an
  output of the function like any other tensor: nothing is read from attributes a graph cannot see;
- each new graph is checked on its first call against the plain call from the same RNG state: every output
  (to 1e-6 of the plain value's magnitude with ``replay``, 1e-4 with ``compile``) and the number of random
  draws must agree, else that signature keeps the plain call and :meth:`GraphCache.summary` says why. Checks are
  repeated after ``verify_every`` replays and then at doubling intervals (training), or on the next call after
  :meth:`GraphCache.recheck` (each evaluation);
- tracing errors (data-dependent Python control flow, ``.item()`` in the program), draws from Python's or
  NumPy's generators, and graphs that write into tensors they did not create (running statistics) keep the
  plain call; module buffers are restored after the trial runs.

The torch-internal graph passes live in :mod:`pyrovae.capture.fx_passes`.
"""
from __future__ import annotations

import inspect
import logging
import re
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Union

import pyro
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_map

from pyrovae.capture.fx_passes import CaptureRefused, ProgramRefused, build
from pyrovae.capture.fx_passes import lift_params as lift_params  # noqa: F401  (public)
from pyrovae.utils.rng import get_rng_state, set_rng_state

log = logging.getLogger(__name__)

MODES = ("off", "replay", "compile")


def grad_norm(grads) -> torch.Tensor:
    """The global 2-norm of the gradients that are not None (0 when all are)."""
    present = [g for g in grads if g is not None]
    return torch.nn.utils.get_total_norm(present) if present else torch.zeros(())


def _signature(tensors) -> tuple:
    """Shape, dtype and device of each tensor: what a recorded graph is specialised to."""
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def _describe(key: tuple) -> str:
    """A signature for reports: the input shapes (``[8, 12] + [8, 3]``) and any scalar static arguments."""
    shapes = " + ".join(str(list(shape)) for shape, _, _ in key[0])
    scalars = [repr(s) for s in key[1] if isinstance(s, (int, float, str))]
    return shapes + (f" ({', '.join(scalars)})" if scalars else "")


@dataclass
class _Graph:
    run: Callable
    params: list
    mode: str
    ops: int = 0
    replays: int = 0
    interval: int = 0  # replays between re-checks: verify_every, doubling after each one up to 16 x verify_every
    next_check: int = 0
    clone: bool = False  # outputs share storage (with each other or the inputs): copied before they are returned


class GraphCache:
    """Calls ``fn(inputs, *static)`` through recorded graphs, one per input signature, falling back to ``fn``.

    Args:
        fn: ``(inputs, *static) -> pytree of tensors`` (None leaves allowed); ``inputs`` is a tuple of tensors, each
            a graph input. It may compute gradients (``torch.autograd.grad``): the backward pass is recorded too.
        mode: ``replay`` or ``compile``.
        params: ``() -> tensors`` that the graph takes as further inputs (the trained parameters, in a fixed
            order), so that it follows their in-place updates; None lifts every tensor that requires grad.
        modules: ``() -> modules`` whose buffers ``fn`` may write (restored after trial runs) and whose train/eval
            flags are part of each signature.
        max_graphs: signatures to capture before running any further ones plainly.
        max_compiled: with ``mode="compile"``, signatures to compile; later ones replay their recorded graph (None:
            compile each). A training step compiles its first batch shape only: a ragged last batch, one step an
            epoch, would not pay back a compile that takes minutes for a large recurrent graph.
        verify_every: replays of a graph between checks against ``fn`` (doubling after each, up to 16 times);
            None: only after :meth:`recheck`.
        what: what a call is, for reports (``step``, ``call``).
        no_grad: record and replay under ``torch.no_grad()`` (a function that computes no gradient).
    """

    def __init__(
        self,
        fn: Callable,
        mode: str = "replay",
        params: Optional[Callable[[], list]] = None,
        modules: Callable[[], list] = list,
        max_graphs: int = 8,
        max_compiled: Optional[int] = None,
        verify_every: Optional[int] = None,
        what: str = "call",
        no_grad: bool = True,
    ):
        if mode not in MODES[1:]:
            raise ValueError(f"capture mode {mode!r} is not known; choose one of {list(MODES)}")
        if verify_every is not None and int(verify_every) < 1:
            raise ValueError(f"verify_every={verify_every!r} must be a positive number of calls")
        self.fn, self.mode, self.params, self.modules = fn, mode, params, modules
        self.max_graphs, self.verify_every, self.what, self.no_grad = int(max_graphs), verify_every, what, no_grad
        if max_compiled is not None and int(max_compiled) < 0:
            raise ValueError(f"max_compiled={max_compiled!r} must be a number of signatures (0 or more), or None to compile each")
        self.max_compiled = max_compiled
        self.graphs: dict[tuple, Union[_Graph, str]] = {}  # a graph, or why that signature runs plainly
        self.refused: Optional[str] = None  # set: every call runs fn, for this reason
        self.events: list[str] = []
        self._unchecked: set = set()
        self._submodules: Optional[list] = None

    # --- reports ------------------------------------------------------------------------------------
    @property
    def captured(self) -> int:
        return sum(isinstance(g, _Graph) for g in self.graphs.values())

    def summary(self) -> str:
        """One line: how many signatures run captured (and how), which run plainly and why."""
        if self.refused:
            return f"0 captured graph(s): plain {self.what}s: {self.refused}"
        done = sorted({g.mode for g in self.graphs.values() if isinstance(g, _Graph)})
        parts = [f"{self.captured} captured graph(s) ({', '.join(done) or self.mode})"]
        parts += [f"{_describe(k)} plain: {g}" for k, g in self.graphs.items() if isinstance(g, str)]
        return "; ".join(parts)

    def _note(self, key: tuple, message: str) -> None:
        self.events.append(f"{_describe(key)}: {message}")
        log.info("pyrovae capture: %s", self.events[-1])

    def refuse(self, key: tuple, reason: str) -> None:
        """Run signature ``key`` plainly from now on, for ``reason``."""
        self.graphs[key] = reason
        self._note(key, f"plain: {reason}")

    def recheck(self) -> None:
        """Check each graph against ``fn`` again on its next call (the program may have changed)."""
        self._unchecked = {k for k, g in self.graphs.items() if isinstance(g, _Graph)}

    # --- calls --------------------------------------------------------------------------------------
    def _flags(self) -> tuple:
        """The modules' train/eval flags (part of each signature). The module tree is walked once and held by weak
        references: a cache kept between calls must not keep its programs alive."""
        if self._submodules is None:
            self._submodules = [weakref.ref(m) for owner in self.modules() for m in owner.modules()]
        return tuple(r().training for r in self._submodules if r() is not None)

    def __call__(self, inputs: tuple, *static):
        inputs = tuple(inputs)
        if self.refused:
            return self.fn(inputs, *static)
        key = (_signature(inputs), static, self._flags())
        graph = self.graphs.get(key)
        if isinstance(graph, _Graph):
            if key in self._unchecked:
                self._unchecked.discard(key)
                return self._checked(key, graph, inputs, static)
            if self.verify_every is not None:
                graph.replays += 1
                if graph.replays >= graph.next_check:
                    graph.interval = min(2 * graph.interval, 16 * self.verify_every)
                    graph.next_check += graph.interval
                    return self._checked(key, graph, inputs, static)
            return self._replay(graph, inputs)
        if graph is None and self.captured >= self.max_graphs:
            self.refuse(key, f"more than {self.max_graphs} input signatures")
            graph = self.graphs[key]
        if graph is not None:  # refused, for the reason stored
            return self.fn(inputs, *static)
        return self._checked(key, None, inputs, static)

    def _replay(self, graph: _Graph, inputs: tuple):
        with torch.no_grad():
            out = graph.run(*inputs, *graph.params)
        return tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, out) if graph.clone else out

    def _record(self, key: tuple, inputs: tuple, static: tuple, rng: dict) -> tuple[_Graph, object]:
        """Trace ``fn`` from ``rng``, build its graph and run it from ``rng``: ``(graph, result)``."""
        set_rng_state(rng)
        with pyro.validation_enabled(False), (torch.no_grad() if self.no_grad else torch.enable_grad()):
            gm = make_fx(lambda *xs: self.fn(xs, *static))(*inputs)
        if not _same_draws(rng, get_rng_state(), ("python", "numpy")):
            raise CaptureRefused(f"the {self.what} draws from Python's or NumPy's random generator, which a graph cannot replay")
        gm, params = lift_params(gm, None if self.params is None else list(self.params()))
        ops = sum(n.op == "call_function" for n in gm.graph.nodes)
        modes = ("compile", "replay") if self.mode == "compile" else ("replay",)
        compiled = sum(isinstance(g, _Graph) and g.mode == "compile" for g in self.graphs.values())
        if len(modes) == 2 and self.max_compiled is not None and compiled >= self.max_compiled:
            modes = ("replay",)
            self._note(key, f"replayed, not compiled: this cache compiles its first {self.max_compiled} signature(s) only")
        for mode in modes:
            graph = _Graph(build(gm, mode), params, mode, interval=self.verify_every or 0, next_check=self.verify_every or 0)
            set_rng_state(rng)
            try:
                out = self._replay(graph, inputs)  # compiles here, in mode "compile"
            except Exception as e:
                if mode == "replay":
                    raise
                self._note(key, f"torch.compile failed ({_first_line(e)}); replaying the recorded graph")
                continue
            graph.ops = ops
            return graph, out
        raise AssertionError("unreachable")

    def _checked(self, key: tuple, graph: Optional[_Graph], inputs: tuple, static: tuple):
        """Run ``fn`` and the graph (recorded now when ``graph`` is None) from the same RNG state; keep the graph if
        they agree. Returns ``fn``'s result, with the RNG and the module buffers where ``fn`` left them."""
        rng = get_rng_state()
        want = self.fn(inputs, *static)  # first: one-time work (validation, a plate-nesting guess) runs plainly
        after = get_rng_state()
        buffers = [(b, b.detach().clone()) for m in self.modules() for b in m.buffers()]
        t0, reason = time.perf_counter(), None
        try:
            if graph is None:
                graph, got = self._record(key, inputs, static, rng)
            else:
                set_rng_state(rng)
                got = self._replay(graph, inputs)
            reason = _mismatch("outputs", got, want, 1e-4 if graph.mode == "compile" else 1e-6)
            if reason is None and not _same_draws(after, get_rng_state(), ("torch", "cuda")):
                reason = f"the captured {self.what} drew a different number of random values"
            graph.clone = graph.clone or _shares_storage(got, inputs, graph.params)
        except Exception as e:
            reason = str(e) if isinstance(e, CaptureRefused) else f"capture failed ({_why_not_traced(e)})"
            if isinstance(e, ProgramRefused):  # no other signature can be recorded either: stop tracing new ones
                self.refused = reason
        set_rng_state(after)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        recorded = key not in self.graphs
        if reason is not None:
            if not recorded:
                reason = f"disagreed with the plain {self.what} at a re-check after {graph.replays} replays ({reason}); the program's Python may change between {self.what}s"
            self.refuse(key, reason)
        elif recorded:
            self.graphs[key] = graph
            self._note(key, f"captured {graph.ops} ops ({graph.mode}) in {time.perf_counter() - t0:.2f} s, checked against the plain {self.what}")
        return want


def _shares_storage(out, inputs: tuple, params: list) -> bool:
    """Whether two output tensors share storage, or one shares it with an input or a parameter."""
    seen = {t.untyped_storage().data_ptr() for t in (*inputs, *params) if torch.is_tensor(t)}
    for t in tree_flatten(out)[0]:
        if not torch.is_tensor(t):
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            return True
        seen.add(ptr)
    return False


# --- caches kept between calls for the same programs, held by weak references ----------------------------------


def _weak(obj) -> Optional[Callable]:
    """A weak reference to ``obj`` (a bound method through ``WeakMethod``), or None where it cannot have one."""
    try:
        return weakref.WeakMethod(obj) if inspect.ismethod(obj) else weakref.ref(obj)
    except TypeError:
        return None


def identity(obj) -> tuple:
    """What identifies a program: its id, or a bound method's instance and function."""
    return (id(obj.__self__), id(obj.__func__)) if inspect.ismethod(obj) else (id(obj),)


def owner(program):
    """The object behind a program: a bound method's instance (a module's ``model`` method, say), else itself."""
    return getattr(program, "__self__", program)


#: caches kept between calls: (program identities..., key) -> (weak references to the programs, GraphCache)
_SHARED: dict[tuple, tuple] = {}


def weak_programs(*programs) -> Optional[Callable[[], tuple]]:
    """``() -> programs`` through weak references (None where a program cannot be weakly referenced)."""
    refs = [_weak(p) for p in programs]
    if None in refs:
        return None
    return lambda: tuple(r() for r in refs)


def shared_cache(programs: tuple, key: tuple, make: Callable[[Callable[[], tuple]], GraphCache]) -> Optional[GraphCache]:
    """The :class:`GraphCache` kept for these ``programs`` (a model and a guide) under ``key``, made by
    ``make(get_programs)`` on first use. It holds the programs only weakly (``make`` must reach them through
    ``get_programs``), and it goes, with its graphs and the parameters they hold, when a program dies. None when
    a program cannot be weakly referenced."""
    get = weak_programs(*programs)
    if get is None:
        return None
    full = (*(identity(p) for p in programs), *key)
    entry = _SHARED.get(full)
    if entry is None or entry[0]() != programs:
        entry = _SHARED[full] = (get, make(get))
        for o in {id(owner(p)): owner(p) for p in programs}.values():
            weakref.finalize(o, _SHARED.pop, full, None)
    return entry[1]


def _mismatch(name: str, got, want, rtol: float) -> Optional[str]:
    """Why ``got`` (captured) differs from ``want`` (plain), or None: the worst element error against the
    largest magnitude of the plain value, so a well-conditioned sum may be reassociated."""
    gs, gspec = tree_flatten(got)
    ws, wspec = tree_flatten(want)
    if gspec != wspec:
        return f"{name}: the captured step returned a different structure"
    for i, (g, w) in enumerate(zip(gs, ws)):
        if not (torch.is_tensor(g) and torch.is_tensor(w)):
            if g != w:
                return f"{name}[{i}]: {g!r} != {w!r}"
            continue
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"{name}[{i}]: shape/dtype {tuple(g.shape)}/{g.dtype} != {tuple(w.shape)}/{w.dtype}"
        g, w = g.detach().double(), w.detach().double()
        same_nan = torch.equal(torch.isnan(g), torch.isnan(w))
        g, w = torch.nan_to_num(g), torch.nan_to_num(w)
        err = float((g - w).abs().max()) if g.numel() else 0.0
        scale = float(w.abs().max()) if w.numel() else 0.0
        if not same_nan or err > rtol * scale + 1e-30:
            return f"{name}[{i}]: max |captured - plain| = {err:.3g} against max |plain| = {scale:.3g}"
    return None



def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


#: what tracing errors mean, in the words of a program's author: (pattern in torch's message, explanation)
_TRACE_ERRORS = (
    (
        re.compile(r"_local_scalar_dense|data-dependent|GuardOnDataDependent|value out of a tracing tensor", re.I),
        "the program reads a tensor's value in Python (float(), int(), bool(), .item(), or an `if` on a tensor), "
        "and a recorded graph cannot repeat a decision that depends on the data",
    ),
    (
        re.compile(r"nonzero|masked_select|dynamic shape|unbacked", re.I),
        "the program makes a tensor whose shape depends on the data (nonzero, boolean-mask indexing), which a "
        "graph of fixed shapes cannot record",
    ),
)


def _why_not_traced(e: Exception, limit: int = 200) -> str:
    """One readable line on why ``make_fx`` could not record a program: a known cause in plain words, else the
    exception's first line, cut at ``limit`` characters."""
    text = str(e)
    for pattern, meaning in _TRACE_ERRORS:
        if pattern.search(text):
            return meaning
    line = _first_line(e)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _same_draws(a: dict, b: dict, generators: tuple[str, ...]) -> bool:
    """Whether two :func:`~pyrovae.train.checkpoint.get_rng_state` snapshots agree on ``generators``."""
    flat_a, _ = tree_flatten([a[g] for g in generators])
    flat_b, _ = tree_flatten([b[g] for g in generators])
    return len(flat_a) == len(flat_b) and all(
        torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(flat_a, flat_b)
    )
