"""Graph passes behind :mod:`pyrovae.capture`: lifting trained tensors to graph inputs, refusing graphs that
write into tensors they did not create, and making replay cheap.

Everything here reads torch internals (aten op schemas and their alias annotations, the FX graph's generated
code), which may change between torch releases. The passes that only make replay faster are optional and marked
so: if they fail, :func:`build` falls back to the plain ``GraphModule`` call, which is always correct.
"""
from __future__ import annotations

import copy
import functools
import logging
import re
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)


class CaptureRefused(Exception):
    """A graph that traced but must not be used (the message says why)."""


class ProgramRefused(CaptureRefused):
    """A refusal that holds for every input signature of the program (ops whose shapes depend on values), so the
    cache stops tracing it for each new shape."""


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


def lift_params(gm: torch.fx.GraphModule, params: Optional[list[torch.Tensor]] = None) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """Make the trained tensors graph inputs after the traced ones (the trace holds them as constants), and drop
    no-op views and dead nodes. ``params``: the tensors to lift, in order; None lifts every constant that
    requires grad, in order of first use. Returns the graph and the lifted tensors.

    Raises ``CaptureRefused`` when the graph reads a tensor that requires grad but is not in ``params``, or writes into a
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
            raise CaptureRefused(f"the graph reads a tensor that requires grad but is not a trained parameter (shape {tuple(value.shape)})")
    for name in lifted:
        delattr(gm, name)
    shaped = _data_dependent_shapes(graph)
    if shaped:
        raise ProgramRefused(
            f"the graph holds ops whose output shape depends on tensor values ({', '.join(sorted(set(shaped)))}, e.g. boolean "
            "indexing), which a recorded graph would replay with the recording's sizes"
        )
    writes = _external_writes(graph)
    if writes:
        raise CaptureRefused(f"the graph writes into tensors it did not create ({', '.join(sorted(set(writes)))}), e.g. running statistics")
    for node in list(graph.nodes):
        if _same_view(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.eliminate_dead_code()
    try:
        _reuse_dead_buffers(graph)
    except Exception as e:  # optional speed pass: a graph without it is the same computation
        log.debug("pyrovae capture: buffer reuse skipped (%s)", e)
    gm.recompile()
    return gm, list(params)


#: aten ops whose output's shape is read from their input's values
_VALUE_SHAPED = {"nonzero", "masked_select", "argwhere", "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"}


def _data_dependent_shapes(graph: torch.fx.Graph) -> list[str]:
    """Names of the graph's ops whose output shape depends on tensor values: nonzero and friends, and indexing
    with a boolean mask."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target.overloadpacket.__name__
        if name in _VALUE_SHAPED:
            found.append(name)
        elif name in ("index", "_unsafe_index") and any(
            isinstance(i, torch.fx.Node) and getattr(i.meta.get("val"), "dtype", None) == torch.bool for i in (node.args[1] if len(node.args) > 1 else ())
        ):
            found.append(f"{name} with a boolean mask")
    return found


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
    """OPTIONAL SPEED PASS (torch internals: aten schemas' alias annotations and pointwise tags).

    Write a pointwise op's result into its input where that input is a tensor the graph made, used by this op
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


_ADD = (torch.ops.aten.add_.Tensor, torch.ops.aten.add.Tensor)


def _written_roots(graph: torch.fx.Graph) -> set:
    """The nodes whose storage some op of the graph writes into (in-place ops and ``out=`` arguments)."""
    roots = set()
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for i, arg in enumerate(node.target._schema.arguments):
            target = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(target, torch.fx.Node):
                roots.add(_root(target))
    return roots


def _product_term(node) -> Optional[tuple]:
    """``(x, y, nodes)`` when ``node``'s value is ``x.T @ y`` computed as ``t^k(mm(t(a), b))`` (a weight's gradient at
    one use: ``mm(grad_out.T, input)``, perhaps transposed), each link used once; ``nodes``: the links, outermost
    first. None for anything else."""
    links = []
    while isinstance(node, torch.fx.Node) and node.target is torch.ops.aten.t.default and len(node.users) == 1:
        links.append(node)
        node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and node.target is torch.ops.aten.mm.default and len(node.users) == 1):
        return None
    a, b = node.args
    if not (isinstance(a, torch.fx.Node) and a.target is torch.ops.aten.t.default and len(a.users) == 1 and isinstance(b, torch.fx.Node)):
        return None
    x, y = a.args[0], b
    if not isinstance(x, torch.fx.Node):
        return None
    if len(links) % 2:  # (x.T y).T = y.T x
        x, y = y, x
    return x, y, links + [node, a]


def _summed_products(node) -> Optional[tuple[list, list, list]]:
    """The terms of a sum ``x_1.T @ y_1 + ... + x_k.T @ y_k`` that ends at ``node`` (a chain of adds, each partial sum
    used only by the next add): ``(xs, ys, nodes)`` in the chain's order, ``nodes`` all the sum's nodes but
    ``node``'s own value, or None."""
    xs, ys, nodes, cur = [], [], [], node
    while isinstance(cur, torch.fx.Node) and cur.target in _ADD and len(cur.args) == 2 and cur.kwargs.get("alpha", 1) == 1:
        if cur is not node and len(cur.users) != 1:
            return None
        term = _product_term(cur.args[1])
        if term is None:
            return None
        xs.append(term[0])
        ys.append(term[1])
        nodes += ([cur] if cur is not node else []) + term[2]
        cur = cur.args[0]
    first = _product_term(cur) if cur is not node else None
    if first is None:
        return None
    xs.append(first[0])
    ys.append(first[1])
    nodes += first[2]
    return xs[::-1], ys[::-1], nodes


def _batch_summed_products(graph: torch.fx.Graph, min_terms: int = 4) -> int:
    """OPTIONAL SPEED PASS (torch internals: how autograd's accumulation of a reused weight's gradient is recorded).

    A weight used at every step of a recurrence gets its gradient as a sum of products, one per step,
    ``sum_t g_t.T @ h_t`` (``g_t``: ``[batch, out]``, ``h_t``: ``[batch, in]``), each ``[out, in]`` product over only
    ``batch`` rows and added into the running sum. One product over all the steps' rows,
    ``cat(g).T @ cat(h)``, is the same sum (reassociated) and runs near the machine's matrix-product rate instead of
    reading and writing the ``[out, in]`` sum at every step. Rewritten where that saves memory traffic: at least
    ``min_terms`` terms, and ``batch * (out + in) <= out * in / 2`` (the copies into the concatenation cost less than
    half of one step's accumulation). Returns the number of sums rewritten."""
    written = _written_roots(graph)  # a product's operands must not change between their step and the sum's end
    plans = []
    for node in graph.nodes:
        if node.target not in _ADD or any(u.target in _ADD and u.args[0] is node for u in node.users):
            continue  # not the end of a sum
        found = _summed_products(node)
        if found is None or len(found[0]) < min_terms:
            continue
        xs, ys, nodes = found
        if any(_root(v) in written for v in xs + ys):
            continue
        out = node.meta.get("val")
        vals = [(x.meta.get("val"), y.meta.get("val")) for x, y in zip(xs, ys)]
        if not (torch.is_tensor(out) and out.dim() == 2 and out.is_contiguous()):
            continue
        if not all(torch.is_tensor(x) and torch.is_tensor(y) and x.dim() == y.dim() == 2 and x.shape[0] == y.shape[0]
                   and (x.shape[1], y.shape[1]) == tuple(out.shape) and x.dtype == y.dtype == out.dtype for x, y in vals):
            continue
        rows = max(x.shape[0] for x, _ in vals)
        if rows * (out.shape[0] + out.shape[1]) * 2 > out.numel():
            continue
        plans.append((node, xs, ys, nodes))
    for node, xs, ys, nodes in plans:
        with graph.inserting_before(node):
            xt = graph.call_function(torch.ops.aten.t.default, (graph.call_function(torch.ops.aten.cat.default, (xs,)),))
            total = graph.call_function(torch.ops.aten.mm.default, (xt, graph.call_function(torch.ops.aten.cat.default, (ys,))))
        total.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(total)
        for n in [node] + nodes:  # each node's users come before it in this order
            graph.erase_node(n)
    return len(plans)


def build(gm: torch.fx.GraphModule, mode: str) -> Callable:
    """The runnable form of a lifted graph: inductor's kernels (``compile``, with torch's own random ops so that the
    draws match the recorded ones), else the graph's aten calls (``replay``), bound directly where that works."""
    if mode == "compile":
        try:  # reassociates sums: for compile only (its kernels are not the recorded ones bit for bit anyway), on a copy
            batched = copy.deepcopy(gm)  # that the replay fallback does not see
            if _batch_summed_products(batched.graph):
                batched.recompile()
                gm = batched
        except Exception as e:  # optional speed pass
            log.debug("pyrovae capture: batching summed products skipped (%s)", e)
        return torch.compile(gm, fullgraph=True, dynamic=False, options={"fallback_random": True})
    try:
        return _direct_calls(gm)
    except Exception as e:  # optional: the generated code's form is a torch internal
        log.debug("pyrovae capture: direct op binding unavailable (%s); replaying through GraphModule", e)
        return gm


_OP_CALL = re.compile(r"torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\(")


def _direct_calls(gm: torch.fx.GraphModule) -> Callable:
    """OPTIONAL SPEED PASS (torch internals: the text of FX's generated code and ``OpOverload._op``).

    ``gm``'s forward with each ``torch.ops.NS.OP.OVERLOAD(...)`` call bound to the overload's C++ entry point:
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
