"""The package's shape: imports run one way, down the layers, with no circle (module-level and function-level
imports alike, ``TYPE_CHECKING`` included)."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the layers, bottom first: a module may import its own layer and those below it, never one above
LAYERS = {
    "utils": 0,
    "nn": 1,
    "data": 2,
    "objectives": 3,
    "capture": 3,
    "models": 4,
    "guides": 4,
    "evaluate": 5,
    "train": 6,
    "cli": 7,
}
#: top-level modules outside the layers: the package face (``load_run`` on first use) and ``python -m pyrovae``
FACES = {"pyrovae", "pyrovae.__main__"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, prefix in (("pyrovae", "pyrovae"), ("models", "pyrovae.models"), ("guides", "pyrovae.guides")):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([prefix, *parts])] = path
    return mods


def _imports(path: Path, module: str, mods: dict) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n for n in names if n in mods and n != module}
    return found


def _layer(module: str):
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _graph():
    mods = _modules()
    return mods, {m: _imports(p, m, mods) for m, p in mods.items()}


def test_every_module_sits_in_a_layer():
    mods, _ = _graph()
    outside = sorted(m for m in mods if m not in FACES and _layer(m) is None)
    assert not outside, f"modules outside the layers {sorted(LAYERS)}: {outside} (move each into the package it belongs to)"


def test_no_module_imports_a_higher_layer():
    _, graph = _graph()
    upward = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in graph.items() if m not in FACES
        for t in targets if t not in FACES and _layer(t) > _layer(m)
    ]
    assert not upward, "imports that run upward:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    _, graph = _graph()
    graph = {m: {t for t in ts if t not in FACES} for m, ts in graph.items() if m not in FACES}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_walker_sees_function_level_and_type_checking_imports(tmp_path):
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pyrovae.cli.commands import main\ndef f():\n    import pyrovae.train.trainer\n"
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert _imports(probe, "pyrovae.nn.layers", _modules()) == {"pyrovae.cli.commands", "pyrovae.train.trainer"}
