"""Capture-and-replay fast path for the training step (:class:`StepCapture`) and for evaluation
(:class:`FunctionCapture`: a no-grad function such as one chunk of importance weights).

Pyro runs the model and guide under its effect handlers on every step. For a small VAE that Python work
costs as much as the arithmetic. :class:`StepCapture` runs one step under ``torch.fx``'s ``make_fx``, which
records every aten operation the model, guide, objective and backward pass perform (random draws included,
Pyro's Python not), and replays the recorded graph on later steps: the same kernels in the same order on the
same RNG stream, without the Python. With ``mode="compile"`` the graph is also compiled by ``torch.compile``
(inductor: fused C++ kernels on CPU, Triton on CUDA), with torch's own random ops so the draws stay the same.

What keeps it honest:

- one graph per input signature: the shape, dtype and device of each batch tensor (a batch may be several
  tensors, ``model(x, y)``), the modules' train/eval flags, and which
  of the objective's per-step state tensors are set;
- an objective's per-step state (BetaELBO's beta_t, GECO's multiplier) is fed to the graph as inputs; the
  objective names it in ``capture_state``. An objective with state it does not name is not captured;
- each new graph is checked on its first step against the plain step from the same RNG state: loss,
  gradients, gradient norm, metrics, the objective's outputs and the number of random draws must agree,
  else that signature keeps the plain step, and :attr:`StepCapture.events` says why. The check is repeated
  after ``verify_every`` replays, then at doubling intervals (up to 16 times that);
- tracing errors (data-dependent Python control flow, ``.item()`` inside the model) and graphs that write
  into tensors they did not create (running statistics, say) also leave the plain step in place.
"""
from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import pyro
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten

from pyrovae.rng import get_rng_state, set_rng_state

log = logging.getLogger(__name__)

MODES = ("off", "replay", "compile")

#: *batch -> (loss per datum, gradient norm), both detached; leaves the gradients in each parameter's ``.grad``.
GradStep = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _signature(tensors) -> tuple:
    """Shape, dtype and device of each tensor: what a recorded graph is specialised to."""
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def _shapes(signature: tuple) -> str:
    """``[8, 12]`` for one tensor, ``[8, 12] + [8, 3]`` for several (reports)."""
    return " + ".join(str(list(shape)) for shape, _, _ in signature)


def grad_norm(grads) -> torch.Tensor:
    """The global 2-norm of the gradients that are not None (0 when all are)."""
    present = [g for g in grads if g is not None]
    return torch.nn.utils.get_total_norm(present) if present else torch.zeros(())


def capture_spec(objective) -> Union[tuple[tuple[str, ...], tuple[str, ...]], str]:
    """``(state attributes, output attributes)`` of an objective the fast path can capture, or why it cannot."""
    if hasattr(objective, "capture_state"):
        state, outputs = tuple(objective.capture_state), tuple(objective.capture_outputs)
        held = objective.state_dict() if hasattr(objective, "state_dict") else {}
        if held and not state:
            return (
                f"{type(objective).__name__} keeps state between steps ({sorted(held)}) but names none in capture_state, "
                "so a captured graph would freeze it"
            )
        return state, outputs
    if isinstance(objective, pyro.infer.ELBO):  # Pyro's own ELBOs keep no state between steps
        return (), ()
    return f"{type(objective).__name__} is neither a pyrovae objective nor a pyro.infer.ELBO"


@dataclass
class _Graph:
    fn: Callable
    ops: int
    replays: int = 0
    interval: int = 0  # replays between re-checks: verify_every, doubling after each one up to 16 x verify_every
    next_check: int = 0
    clone_grads: bool = False  # gradients share storage with each other or other tensors: copy before in-place clipping


def _shares_storage(grads, others) -> bool:
    seen = {t.untyped_storage().data_ptr() for t in others if torch.is_tensor(t)}
    for g in grads:
        if g is None:
            continue
        ptr = g.untyped_storage().data_ptr()
        if ptr in seen:
            return True
        seen.add(ptr)
    return False


def _root(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor a node's value is a view of, following view ops back to where the storage was made."""
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.args:
        schema = node.target._schema
        if not (schema.returns and schema.returns[0].alias_info is not None and not schema.returns[0].alias_info.is_write):
            break
        if not isinstance(node.args[0], torch.fx.Node):
            break
        node = node.args[0]
    return node


def _external_writes(graph: torch.fx.Graph) -> list[str]:
    """Ops that write into a tensor the graph did not create (an input or a constant)."""
    bad = []
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for i, arg in enumerate(node.target._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write or i >= len(node.args):
                continue
            target = node.args[i]
            if isinstance(target, torch.fx.Node) and _root(target).op in ("placeholder", "get_attr"):
                bad.append(str(node.target))
    return bad


def _same_view(node: torch.fx.Node) -> bool:
    """An alias, detach, or view/expand that leaves shape and strides as they were: a no-op at replay."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    name = getattr(node.target, "__name__", "")
    if name.startswith(("alias.", "detach.")):
        return True
    if not name.startswith(("view.", "expand.", "_unsafe_view.")):
        return False
    a, b = node.args[0].meta.get("val"), node.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.stride() == b.stride()


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


class StepCapture:
    """Replays captured training steps; falls back to ``plain`` wherever a graph cannot be used.

    Args:
        objective, model, guide: as given to the trainer.
        params: the trainable tensors, in the optimiser's order; their gradients are the graph's outputs.
        plain: the ordinary step (``*batch -> (loss per datum, grad norm)``, gradients left in ``.grad``).
        mode: ``replay`` (the recorded aten graph) or ``compile`` (that graph through ``torch.compile``).
        max_graphs: signatures to capture before running any further ones plainly.
        verify_every: after this many replays of a graph the step runs both ways, and the graph is dropped if they
            differ (a program whose Python changed between steps); the interval doubles after each check that
            passes, up to ``16 * verify_every``, so that checking costs little in long runs.
    """

    def __init__(self, objective, model, guide, params: list[torch.Tensor], plain: GradStep, mode: str = "replay", max_graphs: int = 8, verify_every: int = 100):
        if mode not in MODES[1:]:
            raise ValueError(f"capture mode {mode!r} is not known; choose one of {list(MODES)}")
        self.objective, self.model, self.guide = objective, model, guide
        if int(verify_every) < 1:
            raise ValueError(f"verify_every={verify_every!r} must be a positive number of steps")
        self.params, self.plain, self.mode = list(params), plain, mode
        self.max_graphs, self.verify_every = int(max_graphs), int(verify_every)
        self.graphs: dict[tuple, Union[_Graph, str]] = {}
        self.events: list[str] = []
        spec = capture_spec(objective)
        self.refused: Optional[str] = spec if isinstance(spec, str) else None
        self.state_names, self.output_names = ((), ()) if isinstance(spec, str) else spec
        if self.refused:
            self._event(f"plain steps: {self.refused}")
        self._submodules = [m for mod in self._modules() for m in mod.modules()]  # their train/eval flags key the graphs

    # --- bookkeeping --------------------------------------------------------------------------------
    def _event(self, message: str) -> None:
        self.events.append(message)
        log.info("pyrovae capture: %s", message)

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.model, self.guide) if isinstance(m, torch.nn.Module)]

    def _state(self) -> list[Optional[torch.Tensor]]:
        return [getattr(self.objective, n) for n in self.state_names]

    def _key(self, batch: tuple, state) -> tuple:
        flags = tuple(m.training for m in self._submodules)
        sig = tuple(None if s is None else (tuple(s.shape), s.dtype, s.device) for s in state)
        return (_signature(batch), flags, sig)

    @property
    def captured(self) -> int:
        return sum(isinstance(g, _Graph) for g in self.graphs.values())

    def summary(self) -> str:
        """One line: how many signatures run captured, which run plainly and why."""
        if self.refused:
            return f"plain steps: {self.refused}"
        parts = [f"{self.captured} captured step graph(s) ({self.mode})"]
        parts += [f"batch {_shapes(k[0])} plain: {g}" for k, g in self.graphs.items() if isinstance(g, str)]
        return "; ".join(parts)

    # --- the step -----------------------------------------------------------------------------------
    def __call__(self, *x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on the batch ``x`` (one tensor, or several: ``model(*x)``)."""
        if self.refused:
            return self.plain(*x)
        state = self._state()
        key = self._key(x, state)
        graph = self.graphs.get(key)
        if isinstance(graph, _Graph):
            graph.replays += 1
            if graph.replays < graph.next_check:
                return self._apply(self._run(graph, x, state), graph.clone_grads)
            graph.interval = min(2 * graph.interval, 16 * self.verify_every)
            graph.next_check += graph.interval
            return self._checked(key, graph, x, state, None)
        if graph is not None:  # refused earlier, for the reason stored
            return self.plain(*x)
        if self.captured >= self.max_graphs:
            self._refuse(key, f"more than {self.max_graphs} input signatures")
            return self.plain(*x)
        return self._capture(key, x, state)

    def _run(self, graph: _Graph, x: tuple, state) -> tuple:
        with torch.no_grad():
            return graph.fn(*x, *[s for s in state if s is not None], *self.params)

    def _apply(self, out: tuple, clone_grads: bool) -> tuple[torch.Tensor, torch.Tensor]:
        loss, norm, grads, metrics, outputs = out
        for p, g in zip(self.params, grads):
            p.grad = g.clone() if clone_grads and g is not None else g
        if hasattr(self.objective, "metrics"):
            self.objective.metrics = dict(metrics)
        for name, value in outputs.items():
            setattr(self.objective, name, value)
        return loss, norm

    def _refuse(self, key: tuple, reason: str) -> None:
        self.graphs[key] = reason
        self._event(f"batch {_shapes(key[0])}: plain steps: {reason}")

    # --- capture --------------------------------------------------------------------------------------
    def _trace(self, x: tuple, state) -> torch.fx.GraphModule:
        obj, params = self.objective, self.params
        names = [n for n, s in zip(self.state_names, state) if s is not None]

        def step(*inputs):
            batch, live = inputs[: len(x)], inputs[len(x):]
            for n, v in zip(names, live):
                setattr(obj, n, v)
            loss = obj.differentiable_loss(self.model, self.guide, *batch) / batch[0].shape[0]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            metrics = {k: v for k, v in getattr(obj, "metrics", {}).items() if torch.is_tensor(v)}
            outputs = {n: getattr(obj, n) for n in self.output_names}
            return loss.detach(), grad_norm(grads), grads, metrics, outputs

        saved = {n: getattr(obj, n) for n in (*self.state_names, *self.output_names, "metrics") if hasattr(obj, n)}
        rng = get_rng_state()
        try:
            with pyro.validation_enabled(False):
                gm = make_fx(step)(*x, *[s for s in state if s is not None])
        finally:
            for n, v in saved.items():
                setattr(obj, n, v)
        if not _same_draws(rng, get_rng_state(), ("python", "numpy")):
            set_rng_state(rng)
            raise _Refuse("the step draws from Python's or NumPy's random generator, which a graph cannot replay")
        return lift_params(gm, self.params)[0]

    def _capture(self, key: tuple, x: tuple, state) -> tuple[torch.Tensor, torch.Tensor]:
        """Trace (and compile), then check against the plain step; this step's results are the plain step's."""
        rng, buffers = get_rng_state(), self._buffers()
        t0 = time.perf_counter()
        try:
            gm = self._trace(x, state)
            fn = _build(gm, self.mode)
            graph = _Graph(fn, sum(n.op == "call_function" for n in gm.graph.nodes), interval=self.verify_every, next_check=self.verify_every)
        except Exception as e:  # tracing failed or was refused: keep the plain step, and say why
            reason = str(e) if isinstance(e, _Refuse) else f"capture failed ({_why_not_traced(e)})"
            if not isinstance(e, _Refuse) and not hasattr(self.objective, "capture_state"):
                reason += f"; {type(self.objective).__name__} is Pyro's own ELBO, which tests the loss for NaN on the host every step: pyrovae.objectives.ELBO can be captured"
            _restore(rng, buffers)
            self._refuse(key, reason)
            return self.plain(*x)
        _restore(rng, buffers)
        return self._checked(key, graph, x, state, t0)

    def _checked(self, key: tuple, graph: _Graph, x: tuple, state, t0: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``graph`` and the plain step from the same RNG state and keep the graph only if they agree. The
        step's results are the plain step's. ``t0``: capture start (None for a periodic re-check)."""
        rng, buffers = get_rng_state(), self._buffers()
        reason = None
        try:
            got = self._run(graph, x, state)  # compiles, in mode "compile"
            got_rng = get_rng_state()
            others = [got[0], got[1], *tree_flatten((got[3], got[4]))[0], *self.params]
            graph.clone_grads = _shares_storage(got[2], others)
        except Exception as e:
            reason = f"the captured step failed ({_first_line(e)})"
        _restore(rng, buffers)
        for p in self.params:
            p.grad = None
        loss, norm = self.plain(*x)
        if reason is None:
            want = (
                loss, norm, tuple(p.grad for p in self.params),
                {k: v for k, v in getattr(self.objective, "metrics", {}).items() if torch.is_tensor(v)},
                {n: getattr(self.objective, n) for n in self.output_names},
            )
            reason = _mismatch("outputs", got, want, 1e-4 if self.mode == "compile" else 1e-6)
            if reason is None and not _same_draws(got_rng, get_rng_state(), ("torch", "cuda")):
                reason = "the captured step drew a different number of random values"
        if reason is not None:
            when = "when captured" if t0 is not None else f"at re-check after {graph.replays} steps"
            self._refuse(key, f"the captured step disagreed with the plain step {when} ({reason}); the program's "
                         "Python may change between steps")
        elif t0 is not None:
            self.graphs[key] = graph
            self._event(f"batch {_shapes(key[0])}: captured {graph.ops} ops ({self.mode}) in {time.perf_counter() - t0:.2f} s, checked against the plain step")
        return loss, norm

    def _buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return _snapshot_buffers(self._modules())


class FunctionCapture:
    """Replays a captured no-grad function ``fn(x, *static)`` (evaluation: one chunk of importance weights),
    one graph per signature: the shape, dtype and device of ``x`` (a tensor, or a tuple of tensors such as
    ``(x, y)``) and the hashable ``static`` arguments.

    The first call of a signature runs ``fn`` itself and returns its result; the graph is recorded from the same
    RNG state and kept only if it gives the same values (to 1e-6 of the largest magnitude with ``replay``, 1e-4
    with ``compile``) and draws as many random numbers. After :meth:`recheck`, the next call of each signature
    is checked the same way again (the graph is dropped if it now disagrees). Tensors that require grad
    (parameters) become graph inputs, so a graph follows in-place updates of them. Where ``compile`` fails (no
    C++ compiler, say) the recorded graph is replayed instead; where tracing fails or a graph disagrees, ``fn``
    runs, and :meth:`summary` says why.

    Args:
        fn: ``(x, *static) -> tensor or pytree of tensors``, run under ``torch.no_grad()``; ``x`` is passed as given
            (a tensor or a tuple of tensors), and each of its tensors is a graph input.
        mode: ``replay`` or ``compile``.
        max_graphs: signatures to capture before running any further ones plainly.
        modules: ``() -> modules`` whose buffers ``fn`` may write; they are restored after the trial runs, so that
            capturing changes nothing that the plain call would not.
    """

    def __init__(self, fn: Callable, mode: str = "replay", max_graphs: int = 8, modules: Callable[[], list] = list):
        if mode not in MODES[1:]:
            raise ValueError(f"capture mode {mode!r} is not known; choose one of {list(MODES)}")
        self.fn, self.mode, self.max_graphs, self.modules = fn, mode, int(max_graphs), modules
        self.graphs: dict[tuple, Union[tuple[Callable, list[torch.Tensor], str], str]] = {}  # (run, params, mode) or why not
        self.events: list[str] = []
        self._unchecked: set = set()

    def summary(self) -> str:
        """One line: how many signatures run captured (and how), which run plainly and why."""
        done = sorted({g[2] for g in self.graphs.values() if isinstance(g, tuple)})
        parts = [f"{sum(isinstance(g, tuple) for g in self.graphs.values())} captured graph(s) ({', '.join(done) or self.mode})"]
        parts += [f"{_describe(k)} plain: {g}" for k, g in self.graphs.items() if isinstance(g, str)]
        return "; ".join(parts)

    def recheck(self) -> None:
        """Check each graph against ``fn`` again on its next call (a new evaluation: the program may have changed)."""
        self._unchecked = {k for k, g in self.graphs.items() if isinstance(g, tuple)}

    def __call__(self, x: Union[torch.Tensor, tuple], *static):
        inputs = (x,) if torch.is_tensor(x) else tuple(x)
        key = (_signature(inputs), static)
        graph = self.graphs.get(key)
        if isinstance(graph, tuple):
            if key not in self._unchecked:
                return graph[0](*inputs, *graph[1])
            self._unchecked.discard(key)
            return self._against_plain(key, x, static, lambda: (graph, graph[0](*inputs, *graph[1])))
        if graph is None and sum(isinstance(g, tuple) for g in self.graphs.values()) >= self.max_graphs:
            graph = self.graphs[key] = f"more than {self.max_graphs} input signatures"
            self._note(key, f"plain: {graph}")
        if graph is not None:  # refused, for the reason stored
            return self.fn(x, *static)
        return self._against_plain(key, x, static, lambda: self._record(x, static))

    def _note(self, key: tuple, message: str) -> None:
        self.events.append(f"{_describe(key)}: {message}")
        log.info("pyrovae capture: %s", self.events[-1])

    def _record(self, x, static: tuple) -> tuple[tuple, object]:
        """Trace ``fn`` (from the current RNG state), build its graph and run it: ``((run, params, mode), result)``."""
        rng = get_rng_state()
        single = torch.is_tensor(x)
        inputs = (x,) if single else tuple(x)
        with pyro.validation_enabled(False):
            gm = make_fx(lambda *xs: self.fn(xs[0] if single else xs, *static))(*inputs)
        if not _same_draws(rng, get_rng_state(), ("python", "numpy")):
            raise _Refuse("the function draws from Python's or NumPy's random generator, which a graph cannot replay")
        gm, params = lift_params(gm)
        for mode in (self.mode, "replay") if self.mode == "compile" else ("replay",):
            run = _build(gm, mode)
            set_rng_state(rng)
            try:
                return (run, params, mode), run(*inputs, *params)  # compiles here, in mode "compile"
            except Exception as e:
                if mode == "replay":
                    raise
                self._note((_signature(inputs), static), f"torch.compile failed ({_first_line(e)}); replaying the recorded graph")
        raise AssertionError("unreachable")

    def _against_plain(self, key: tuple, x, static: tuple, attempt: Callable[[], tuple]):
        """Run ``fn`` and ``attempt`` (-> (graph, result)) from the same RNG state; keep the graph if they agree.
        Returns ``fn``'s result, with the RNG where ``fn`` left it."""
        rng = get_rng_state()
        want = self.fn(x, *static)  # first: one-time work (validation, a plate-nesting guess) runs plainly
        after = get_rng_state()
        buffers = _snapshot_buffers(self.modules())
        t0, checked = time.perf_counter(), key in self.graphs
        try:
            set_rng_state(rng)
            graph, got = attempt()
            reason = _mismatch("outputs", got, want, 1e-4 if graph[2] == "compile" else 1e-6)
            if reason is None and not _same_draws(after, get_rng_state(), ("torch", "cuda")):
                reason = "the captured function drew a different number of random values"
        except Exception as e:
            reason = str(e) if isinstance(e, _Refuse) else f"capture failed ({_why_not_traced(e)})"
        _restore(after, buffers)
        if reason is not None:
            self.graphs[key] = reason if not checked else f"disagreed with the plain call at a re-check ({reason})"
            self._note(key, f"plain: {self.graphs[key]}")
        elif not checked:
            self.graphs[key] = graph
            self._note(key, f"captured ({graph[2]}) in {time.perf_counter() - t0:.2f} s, checked against the plain call")
        return want


def lift_params(gm: torch.fx.GraphModule, params: Optional[list[torch.Tensor]] = None) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """Make the trained tensors graph inputs after the traced ones (the trace holds them as constants), and drop
    no-op views and dead nodes. ``params``: the tensors to lift, in order; None lifts every constant that
    requires grad, in order of first use. Returns the graph and the lifted tensors.

    Raises ``_Refuse`` when the graph reads a tensor that requires grad but is not in ``params``, or writes into a
    tensor it did not create."""
    graph = gm.graph
    if params is None:
        params, seen = [], set()
        for node in graph.nodes:
            value = getattr(gm, node.target) if node.op == "get_attr" else None
            if torch.is_tensor(value) and value.requires_grad and id(value) not in seen:
                seen.add(id(value))
                params.append(value)
    index = {id(p): i for i, p in enumerate(params)}
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    inputs = []
    for i in range(len(params)):
        with graph.inserting_after(last):
            last = graph.placeholder(f"param_{i}")
        inputs.append(last)
    lifted = set()
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        value = getattr(gm, node.target)
        if id(value) in index:
            node.replace_all_uses_with(inputs[index[id(value)]])
            graph.erase_node(node)
            lifted.add(node.target)
        elif torch.is_tensor(value) and value.requires_grad:
            raise _Refuse(f"the graph reads a tensor that requires grad but is not a trained parameter (shape {tuple(value.shape)})")
    for name in lifted:
        delattr(gm, name)
    writes = _external_writes(graph)
    if writes:
        raise _Refuse(f"the graph writes into tensors it did not create ({', '.join(sorted(set(writes)))}), e.g. running statistics")
    for node in list(graph.nodes):
        if _same_view(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.eliminate_dead_code()
    _reuse_dead_buffers(graph)
    gm.recompile()
    return gm, list(params)


_COMMUTATIVE = {"mul.Tensor", "add.Tensor"}


def _op_returns(node) -> Optional[list]:
    """The schema returns of an op call node (None for anything else)."""
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.returns
    return None


def _fresh(node) -> bool:
    """Whether ``node`` is an aten op whose result is a new tensor (not a view or an in-place result)."""
    returns = _op_returns(node)
    return returns is not None and len(returns) == 1 and returns[0].alias_info is None


def _owned(node) -> bool:
    """Whether ``node``'s storage is reachable only through ``node``: a new tensor, or an in-place op on such a
    tensor that nothing else uses."""
    while not _fresh(node):
        returns = _op_returns(node)
        if not (returns and len(returns) == 1 and returns[0].alias_info is not None and returns[0].alias_info.is_write and node.args):
            return False
        base = node.args[0]
        if not isinstance(base, torch.fx.Node) or len(base.users) != 1:
            return False
        node = base
    return True


def _reuse_dead_buffers(graph: torch.fx.Graph) -> None:
    """Write a pointwise op's result into its input where that input is a tensor the graph made, used by this op
    only, and of the result's shape, strides and dtype: ``sub(sigmoid(a), b)`` becomes ``sigmoid(a).sub_(b)``.

    Autograd's backward formulas do this in C++ (``sigmoid(x).sub_(t).mul_(g)``); make_fx records the out-of-place
    decompositions, whose fresh full-size allocations cost page faults on every replay. Same kernels, same
    values, bit for bit."""
    for node in list(graph.nodes):
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten":
            continue
        if torch.Tag.pointwise not in op.tags or not _fresh(node) or node.kwargs.get("alpha", 1) != 1:
            continue
        name, overload = op._schema.name.split("::")[1], op._overloadname
        inplace = getattr(getattr(torch.ops.aten, name + "_", None), overload, None)
        if inplace is None:
            continue
        out = node.meta.get("val")
        candidates = [0, 1] if f"{name}.{overload}" in _COMMUTATIVE and len(node.args) == 2 else [0]
        for i in candidates:
            a = node.args[i] if i < len(node.args) else None
            if not _owned(a) or len(a.users) != 1 or sum(x is a for x in node.args) != 1:
                continue
            val = a.meta.get("val")
            if not (torch.is_tensor(val) and torch.is_tensor(out) and val.shape == out.shape and val.dtype == out.dtype
                    and val.stride() == out.stride() and val.device == out.device):
                continue
            args = list(node.args)
            args[0], args[i] = args[i], args[0]
            node.args, node.target = tuple(args), inplace
            break


def _build(gm: torch.fx.GraphModule, mode: str) -> Callable:
    """The runnable form of a lifted graph: direct aten calls (``replay``) or inductor's kernels (``compile``, with
    torch's own random ops so that the draws match the recorded ones)."""
    if mode == "compile":
        return torch.compile(gm, fullgraph=True, dynamic=False, options={"fallback_random": True})
    return _direct_calls(gm)


_OP_CALL = re.compile(r"torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\(")


def _direct_calls(gm: torch.fx.GraphModule) -> Callable:
    """``gm``'s forward with each ``torch.ops.NS.OP.OVERLOAD(...)`` call bound to the overload's C++ entry point:
    the same calls without ``OpOverload.__call__``'s Python frame (about 7% of a small graph's replay time)."""
    entry = {}

    def bind(match: re.Match) -> str:
        ns, op, overload = match.groups()
        name = f"_op_{ns}_{op}_{overload}"
        entry[name] = getattr(getattr(getattr(torch.ops, ns), op), overload)._op
        return name + "("

    code = _OP_CALL.sub(bind, gm.code)
    scope = {**gm.forward.__globals__, **entry}
    exec(compile(code, "<pyrovae captured step>", "exec"), scope)
    return functools.partial(scope["forward"], gm)


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _describe(key: tuple) -> str:
    """A :class:`FunctionCapture` signature for reports: the input shapes and the scalar static arguments."""
    scalars = [repr(s) for s in key[1] if isinstance(s, (int, float, str))]
    return _shapes(key[0]) + (f" ({', '.join(scalars)})" if scalars else "")


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


class _Refuse(Exception):
    """A graph that traced but must not be used."""


def _same_draws(a: dict, b: dict, generators: tuple[str, ...]) -> bool:
    """Whether two :func:`~pyrovae.checkpoint.get_rng_state` snapshots agree on ``generators``."""
    flat_a, _ = tree_flatten([a[g] for g in generators])
    flat_b, _ = tree_flatten([b[g] for g in generators])
    return len(flat_a) == len(flat_b) and all(
        torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(flat_a, flat_b)
    )


def _snapshot_buffers(modules) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each module buffer with a copy of its value, for :func:`_restore`."""
    return [(b, b.detach().clone()) for m in modules for b in m.buffers()]


def _restore(rng: dict, buffers) -> None:
    set_rng_state(rng)
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
