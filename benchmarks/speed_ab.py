"""Has the library got slower since an earlier commit? Time ``speed.py`` rows with the library of two commits.

One run of ``speed.py`` gives each row's pyrovae / hand-written ratio from interleaved rounds; on a shared machine
that ratio moves by several hundredths between runs, so a single earlier table is not a baseline. This script
checks out ``--base`` into a temporary git worktree and runs ``speed.py`` from that worktree and from this one
alternately, ``--repeats`` times each, on the same rows; the hand-written reference (``benchmarks/reference.py``)
is the yardstick inside every run. It reports every run's ratios and their medians per commit, and whether each
training row's recorded step graph (the generated code that ``capture="replay"`` runs, after the graph passes) is
the same at both commits: where it is, a difference in the ratios is the machine's, or the Python around the graph.

Usage::

    taskset -c 0 python benchmarks/speed_ab.py --base 0103f0d --only "IWAE K=50 128" --repeats 3 \\
        --out benchmarks/results/speed_ab.md

Each worktree's own ``speed.py`` times it, so ``--base`` must have ``speed.py`` with ``--only`` and ``--impls``.
Each run imports its own commit's library: ``PYTHONPATH`` puts its worktree first (an editable install would
otherwise resolve ``pyrovae`` to this checkout from any script; the script checks where ``pyrovae`` comes from
before each run), and the base worktree gets links from ``pyrovae/models`` and ``pyrovae/guides`` to its own
``models/`` and ``guides/`` folders, which an install maps there.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, cpu_model  # noqa: E402

from pyrovae.utils.files import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {"pyrovae": "**pyrovae / hand**", "compile": "compile / hand"}


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def worktree(base: str, where: Path) -> Path:
    """A detached checkout of ``base`` under ``where``, importing its own models and guides."""
    path = where / "base"
    git("worktree", "add", "--detach", str(path), base)
    for name in ("models", "guides"):
        link = path / "pyrovae" / name
        if (path / name).is_dir() and not link.exists():
            link.symlink_to(path / name, target_is_directory=True)
    return path


def ratios(md: Path) -> dict[str, dict[str, float]]:
    """``{'arch objective batch': {impl: ratio}}`` from a ``speed.py`` results file."""
    lines = [ln for ln in md.read_text().splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    out: dict[str, dict[str, float]] = {}
    for line in lines[1:]:
        cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        if "model" not in cells or "objective" not in cells:
            continue
        row = {}
        for impl, col in COLUMNS.items():
            try:
                row[impl] = float(cells.get(col, "").strip("*"))
            except ValueError:
                pass
        if row:
            out[f"{cells['model']} · {cells['objective']} · batch {cells['batch']}"] = row
    return out


#: run inside a worktree, per training row: the replayed step graph (its generated code with node numbers dropped,
#: hashed), and the time per step of the Python around it (``Trainer.step`` with the graph call returning a fixed
#: result and Adam's update skipped; median of 5 x 2,000 steps, in microseconds). It reads capture internals whose
#: names changed between commits (``_build`` -> ``build``, ``_Graph.fn`` -> ``_Graph.run``, ``pyrovae.capture`` ->
#: ``pyrovae.capture.graphs``, ``trainer._capture`` -> ``trainer.gradients.capture``).
GRAPHS = r"""
import hashlib, importlib, json, re, statistics, sys, time, torch
tree, only = sys.argv[1], sys.argv[2:]
sys.path.insert(0, tree + "/benchmarks")  # for speed.py; the library comes first on PYTHONPATH (environment())
try:  # the module whose build() the graph cache calls: pyrovae/capture/graphs.py after the regrouping, capture.py before
    cap = importlib.import_module("pyrovae.capture.graphs")
except ImportError:
    import pyrovae.capture as cap
codes = []
name = "build" if hasattr(cap, "build") else "_build"
real = getattr(cap, name)
setattr(cap, name, lambda gm, mode: (codes.append(gm.code), real(gm, mode))[1])
import speed
torch.manual_seed(0)
train = speed.load_data(None, torch.device("cpu"))[0]
out = {}
for cfg in speed.configs(False, 5000):
    if cfg.objective == "eval" or not any(s in f"{cfg.arch} {cfg.label} {cfg.batch}" for s in only):
        continue
    impl = speed.make_impls(cfg, torch.device("cpu"), ("hand", "pyrovae"))["pyrovae"]
    x = train[: cfg.batch]
    impl.setup(x)
    with impl.scope():
        for _ in range(3):
            impl.run(x)
    code = re.sub(r"_[0-9]+\b", "", codes[-1]) if codes else ""
    # the Python around the graph: replay a fixed result instead of running the graph, and skip Adam's update
    trainer = impl.trainer
    cache = trainer.gradients.capture if hasattr(trainer, "gradients") else trainer._capture  # the trainer before issue 24 kept it private
    graph = next(g for g in cache.graphs.values() if not isinstance(g, str))
    attr = "run" if hasattr(graph, "run") else "fn"
    params = graph.params if hasattr(graph, "params") else cache.params  # held by the graph, or by the capture
    result = getattr(graph, attr)(x, *params)
    setattr(graph, attr, lambda *a: result)
    graph.next_check = float("inf")
    trainer.optim.step = lambda *a, **k: None
    per_step = []
    with impl.scope():
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(2000):
                impl.run(x)
            per_step.append((time.perf_counter() - t0) / 2000 * 1e6)
    out[f"{cfg.arch} {cfg.label} {cfg.batch}"] = [hashlib.sha256(code.encode()).hexdigest()[:12], statistics.median(per_step)]
print(json.dumps(out))
"""


def graphs(tree: Path, args) -> dict[str, list]:
    """``{'arch label batch': [hash of the replayed step graph, µs per step around it]}`` at the commit in ``tree``."""
    done = subprocess.run([sys.executable, "-c", GRAPHS, str(tree), *args.only], cwd=tree, capture_output=True, text=True,
                          env=environment(tree))
    if done.returncode != 0:
        print(f"speed_ab.py: could not record the step graphs in {tree}: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def environment(tree: Path) -> dict[str, str]:
    """The environment that makes ``speed.py`` in ``tree`` import ``tree``'s library: an editable install would
    otherwise resolve ``pyrovae`` to this checkout whichever script runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    where = subprocess.run([sys.executable, "-c", "import pyrovae; print(pyrovae.__file__)"], cwd=tree / "benchmarks", env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"speed_ab.py: a script in {tree} imports pyrovae from {where}, not from {tree}")
    return env


def run(tree: Path, args, out: Path) -> dict[str, dict[str, float]]:
    cmd = [sys.executable, str(tree / "benchmarks" / "speed.py"), "--threads", "1", "--rounds", str(args.rounds),
           "--block-seconds", str(args.block_seconds), "--impls", *args.impls, "--only", *args.only, "--out", str(out)]
    if tree == ROOT:
        cmd.append("--no-epochs")
    done = subprocess.run(cmd, cwd=tree, env=environment(tree), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"speed_ab.py: {' '.join(cmd)} failed in {tree}:\n{done.stderr[-2000:]}")
    return ratios(out)


def report(base: str, head: str, runs: dict[str, list[dict]], args, started: str, same: dict[str, str]) -> str:
    keys = list(dict.fromkeys(k for rs in runs.values() for r in rs for k in r))
    lines = [
        "# Speed A/B: the library at two commits, timed against the same hand-written reference",
        "",
        "Written by `benchmarks/speed_ab.py`.",
        "",
        f"- command: `{command_line()}`",
        f"- date: {started}; CPU: {cpu_model()}; torch threads 1",
        f"- base: `{base}`; current: `{head}`" + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""),
        *([f"- method: `speed.py --rounds {args.rounds} --block-seconds {args.block_seconds} --impls {' '.join(args.impls)} --only ...` run {args.repeats} times "
           "from each commit's worktree, alternating (base, current, base, ...); each entry is one run's ratio of medians "
           "(pyrovae / hand-written, rounds interleaved within the run)."] if args.repeats else []),
        *[f"- note: {n}" for n in args.note],
        "",
        "Replayed step graph the same at both commits (generated code, node numbers aside), and the Python around "
        "it (`Trainer.step` with the graph returning a fixed result and Adam's update skipped):",
        "",
        *([f"- {k}: {v}" for k, v in same.items()] or ["- not recorded"]),
    ]
    if args.repeats:
        lines += [
            "",
            "| row | implementation | base runs | current runs | base median | current median | current − base |",
            "|---|---|---|---|---:|---:|---:|",
        ]
    for key in keys:
        for impl in COLUMNS:
            b = [r[key][impl] for r in runs["base"] if impl in r.get(key, {})]
            c = [r[key][impl] for r in runs["current"] if impl in r.get(key, {})]
            if not b or not c:
                continue
            mb, mc = statistics.median(b), statistics.median(c)
            lines.append(f"| {key} | {impl} | {', '.join(f'{v:.2f}' for v in b)} | {', '.join(f'{v:.2f}' for v in c)} "
                         f"| {mb:.3f} | {mc:.3f} | {mc - mb:+.3f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the earlier commit (any git revision)")
    p.add_argument("--only", nargs="+", required=True, help="speed.py rows ('arch label batch' substrings), e.g. 'IWAE K=50 128'")
    p.add_argument("--impls", nargs="+", default=["hand", "pyrovae"], choices=("hand", "pyrovae", "compile"),
                   help="implementations to time (default: hand pyrovae)")
    p.add_argument("--repeats", type=int, default=3, help="runs per commit (default 3; 0: only compare the step graphs and the Python around them)")
    p.add_argument("--rounds", type=int, default=7, help="speed.py --rounds (default 7)")
    p.add_argument("--block-seconds", type=float, default=2.0, help="speed.py --block-seconds (default 2)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "pyrovae-speed-ab.md", help="markdown file to write")
    p.add_argument("--note", action="append", default=[], help="a line recorded in the results file; repeatable")
    args = p.parse_args(argv)
    if args.repeats < 0 or args.rounds < 1:
        p.error(f"--repeats={args.repeats} must be 0 or more and --rounds={args.rounds} positive")
    if "hand" not in args.impls:
        args.impls = ["hand", *args.impls]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still removes its worktree
    try:
        base, head = git("rev-parse", "--short", "--verify", f"{args.base}^{{commit}}"), git("rev-parse", "--short", "HEAD")
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"speed_ab.py: --base {args.base!r} is not a commit of this repository ({e.stderr.strip()}); give a commit id, tag or branch")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs: dict[str, list[dict]] = {"base": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="pyrovae-ab-") as tmp:
        where = Path(tmp)
        tree = worktree(base, where)
        try:
            recorded = {name: graphs(path, args) for name, path in (("base", tree), ("current", ROOT))}
            same = {}
            for k, (code, us) in recorded["base"].items():
                now = recorded["current"].get(k)
                if now is not None:
                    same[k] = f"{'yes' if now[0] == code else '**no**'} (Python around it: {us:.0f} µs per step at the base, {now[1]:.0f} now)"
            print(f"speed_ab.py: step graph the same at both commits: {same}", flush=True)
            for i in range(args.repeats):
                for name, path in (("base", tree), ("current", ROOT)):
                    runs[name].append(run(path, args, where / f"{name}_{i}.md"))
                    print(f"speed_ab.py: {name} run {i + 1}/{args.repeats}: {runs[name][-1]}", flush=True)
        finally:
            git("worktree", "remove", "--force", str(tree))
    text = report(base, head, runs, args, started, same)
    atomic_write(args.out, lambda f: f.write(text.encode()))
    print(f"speed_ab.py: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
