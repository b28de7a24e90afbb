"""Speed of pyrovae's training step against a hand-written PyTorch VAE and plain Pyro SVI.

The same model is run three ways in one process, with the same networks and the same initial weights:

- ``hand``: :mod:`reference` (next to this file): the forward pass written out with torch ops on the
  model's and guide's own ``nn.Linear`` weights, the same bound, ``torch.optim.Adam``;
- ``pyrovae``: ``pyrovae.train.Trainer(model, guide, objective).step(x)``, the project's training step with its
  default fast path (``capture="replay"``: the step recorded once as an aten graph and replayed);
- ``compile``: the same with ``capture="compile"`` (that graph compiled by ``torch.compile``);
- ``plain``: the same with ``capture="off"`` (Pyro runs the model and guide on every step);
- ``svi``: ``pyro.infer.SVI(model, guide, pyro.optim.Adam, loss=Trace_ELBO())`` (``RenyiELBO(alpha=0)``,
  Pyro's K-particle importance-weighted bound, for the IWAE rows).

Evaluation rows time ``pyrovae.evaluate.log_likelihood`` (k = 5000 importance samples; ``pyrovae``: its default
``capture="off"``, ``compile``: ``capture="compile"``) against the hand-written chunked estimator, in images per second. Implementations are timed interleaved, in rounds (hand, pyrovae, svi,
hand, pyrovae, svi, ...), and the table reports medians over rounds, so that ratios stay fair on a machine
shared with other work. Results go to a markdown file (``--out``), written atomically.

Usage::

    python benchmarks/speed.py                 # full table on CPU (and CUDA when available)
    python benchmarks/speed.py --quick         # smoke run: writes $TMPDIR/pyrovae-speed-quick.md, never results/speed.md
"""
from __future__ import annotations

import argparse
import copy
import functools
import datetime as _dt
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TIME_LABELS, adam_alone, add_common_args, build as build_pair, command_line, count_flops, cpu_model, floor_seconds, matmul_rate, products_alone, start, time_breakdown  # noqa: E402
from draw_reference import HandDRAW  # noqa: E402
from reference import HandTrainer, HandVAE  # noqa: E402

from pyrovae.utils.files import atomic_write  # noqa: E402
from pyrovae.evaluate import default_max_elements, log_likelihood  # noqa: E402
from pyrovae.objectives import ELBO, IWAE  # noqa: E402
from pyrovae.train import Trainer  # noqa: E402

try:
    from pyrovae.guides import FlowEncoder
except ImportError:  # the flow guide is younger than the rest: its rows are skipped, with a message
    FlowEncoder = None

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "speed.md"
#: where a ``--quick`` smoke run writes unless given ``--out``: never over a measurement
QUICK_OUT = Path(tempfile.gettempdir()) / "pyrovae-speed-quick.md"
IMPLS = ("hand", "pyrovae", "compile", "plain", "svi")
QUICK_IMPLS = ("hand", "pyrovae", "plain", "svi")  # compiling takes ~10-30 s a graph: not for a smoke run
CAPTURE = {"pyrovae": "replay", "compile": "compile", "plain": "off"}
X_SHAPE = (1, 28, 28)

#: name -> (the registry's config of the VAE and its encoder: VAE / GaussianEncoder keyword arguments, description)
ARCHS: dict[str, tuple[dict, str]] = {
    "kw": (dict(z_dims=(20,), hidden=[(400,)], activation="relu"), "784-400-20 relu (Kingma & Welling; Pyro's VAE example)"),
    "iwae1": (dict(z_dims=(50,), hidden=[(200, 200)], activation="tanh"), "784-200-200-50 tanh (IWAE paper, 1 layer)"),
    "iwae2": (dict(z_dims=(100, 50), hidden=[(200, 200), (100, 100)], activation="tanh"), "784-200-200-100-100-100-50 tanh (IWAE paper, 2 layers)"),
}

#: DRAW at the paper's MNIST settings (64 steps, 256-unit LSTMs, 100-d z_t, the registry's defaults): name -> (its config, description)
DRAW_ARCHS: dict[str, tuple[dict, str]] = {
    "draw": (dict(attention=False), "DRAW 64 steps, no attention"),
    "draw-attention": (dict(attention=True), "DRAW 64 steps, attention (read 2x2, write 5x5)"),
}

CPU_TRAIN_TARGET = 0.9
CPU_EVAL_TARGET = 1.0


@dataclass
class Config:
    arch: str
    objective: str  # elbo | iwae | eval
    batch: int
    particles: int = 1
    guide: str = "gaussian"  # gaussian | planar

    @property
    def label(self) -> str:
        if self.objective == "eval":
            return f"log p(x), k={self.particles}"
        obj = "ELBO" if self.objective == "elbo" else f"IWAE K={self.particles}"
        return obj + (" + planar flow x10" if self.guide == "planar" else "")

    @property
    def unit(self) -> str:
        return "images/s" if self.objective == "eval" else "steps/s"


@dataclass
class Row:
    device: str
    config: Config
    rates: dict[str, list[float]] = field(default_factory=dict)  # impl -> per-round rate (wall clock)
    cpu_rates: dict[str, list[float]] = field(default_factory=dict)  # impl -> per-round rate per CPU-second of this process
    steps: int = 0
    note: str = ""
    skipped: str = ""
    capture: dict[str, str] = field(default_factory=dict)  # impl -> the trainer's capture report
    flops: Optional[int] = None  # FLOPs of one training step (forward and backward), with --flops
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)  # impl -> CPU ms per step by kind of op, with --flops
    mm_rates: list[float] = field(default_factory=list)  # the CPU's matrix-product rate at the start of each round, with --flops
    floor: dict[str, float] = field(default_factory=dict)  # CPU s of the hand-written step's products alone and of its optimiser alone, with --flops

    def median(self, impl: str, cpu: bool = False) -> Optional[float]:
        r = (self.cpu_rates if cpu else self.rates).get(impl)
        return statistics.median(r) if r else None

    def ratio(self, impl: str, ref: str, cpu: bool = False) -> Optional[float]:
        a, b = self.median(impl, cpu), self.median(ref, cpu)
        return None if a is None or b is None else a / b

    def extra_cpu_ms(self, impl: str = "pyrovae", ref: str = "hand") -> Optional[float]:
        """Extra CPU milliseconds per unit of work (step or image) of ``impl`` over ``ref`` (medians)."""
        a, b = self.median(impl, cpu=True), self.median(ref, cpu=True)
        return None if a is None or b is None else 1e3 / a - 1e3 / b

    def ratio_range(self, impl: str, ref: str) -> Optional[tuple[float, float]]:
        if not self.rates.get(impl) or not self.rates.get(ref):
            return None
        paired = [a / b for a, b in zip(self.rates[impl], self.rates[ref])]
        return min(paired), max(paired)


def configs(quick: bool, eval_k: int) -> list[Config]:
    if quick:
        return [
            Config("kw", "elbo", 128),
            Config("iwae1", "iwae", 128, 5),
            Config("iwae1", "elbo", 128, guide="planar"),
            Config("iwae1", "eval", 100, eval_k),
        ]
    out = [Config(a, "elbo", b) for a in ("kw", "iwae1", "iwae2") for b in (128, 1024)]
    out += [Config("iwae1", "iwae", 128, 5), Config("iwae1", "iwae", 1024, 5), Config("iwae1", "iwae", 128, 50)]
    out += [Config("iwae1", "elbo", 128, guide="planar"), Config("iwae1", "elbo", 1024, guide="planar")]
    out += [Config("iwae1", "eval", 100, eval_k)]
    out += [Config(arch, "elbo", 100) for arch in DRAW_ARCHS]
    return out


# --------------------------------------------------------------------------------------------------
# data


def load_data(data_dir: Optional[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train, test, description): statically binarized MNIST if found (--data-dir, $PYROVAE_DATA, cache),
    else synthetic {0,1} data of MNIST's shape."""
    from pyrovae.data import DataError, load_dataset

    try:
        splits = load_dataset("binarized-mnist", data_dir=data_dir, download=False, device=device)
        return splits.train, splits.test, "binarized MNIST (Larochelle & Murray), real data"
    except (DataError, ValueError) as e:
        reason = str(e).splitlines()[0]
    g = torch.Generator().manual_seed(0)
    train = torch.bernoulli(torch.full((4096, *X_SHAPE), 0.13), generator=g).to(device)
    test = torch.bernoulli(torch.full((1024, *X_SHAPE), 0.13), generator=g).to(device)
    print(f"speed.py: real data not found ({reason}); using SYNTHETIC Bernoulli data of MNIST's shape", flush=True)
    return train, test, "SYNTHETIC Bernoulli(0.13) data of MNIST's shape (real data not found; pass --data-dir or set PYROVAE_DATA)"


# --------------------------------------------------------------------------------------------------
# the three implementations


def build(cfg: Config, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    if cfg.arch in DRAW_ARCHS:
        return build_pair({"model": "draw", **DRAW_ARCHS[cfg.arch][0]}, X_SHAPE, device)
    guide = {"guide": "flow", "flow": "planar", "flow_length": 10} if cfg.guide == "planar" else {"guide": "gaussian"}
    return build_pair({"model": "vae", **guide, **ARCHS[cfg.arch][0]}, X_SHAPE, device)


class Impl:
    """One implementation of a config: its own copy of the networks, optimiser and Pyro param store."""

    def __init__(self, name: str, run: Callable[[torch.Tensor], object], setup: Optional[Callable[[torch.Tensor], None]] = None):
        self.name, self.run, self._setup = name, run, setup
        self.store_state = {"params": {}, "constraints": {}}
        self.trainer: Optional[Trainer] = None
        self.params: list[torch.Tensor] = []  # what its optimiser updates (the hand-written one's: the floor's optimiser)

    def scope(self):
        return pyro.get_param_store().scope(self.store_state)

    def setup(self, x: torch.Tensor) -> None:
        if self._setup is not None:
            with self.scope():
                self._setup(x)


def _evaluate(model, guide, k: int, batch: int, budget: int, capture: str, x: torch.Tensor) -> torch.Tensor:
    return log_likelihood(model, guide, x, num_samples=k, batch_size=batch, max_elements=budget, capture=capture).values


def make_impls(cfg: Config, device: torch.device, names: tuple = IMPLS) -> dict[str, Impl]:
    model, guide = build(cfg, device)
    copies = {name: copy.deepcopy((model, guide)) for name in IMPLS}  # together: a DRAW guide holds its model
    impls: dict[str, Impl] = {}
    K = cfg.particles

    m, g = copies["hand"]
    hand = HandDRAW(m, g) if cfg.arch in DRAW_ARCHS else HandVAE(m, g)
    if cfg.objective == "eval":  # pyrovae's default (capture off) and capture="compile" (the CLI picks it for whole test sets on CPU)
        budget = default_max_elements(device)  # the same chunking for all
        impls["hand"] = Impl("hand", lambda x: hand.log_likelihood(x, num_samples=K, batch_size=cfg.batch, max_elements=budget))
        for name, capture in (("pyrovae", "off"), ("compile", "compile")):
            if name in names:
                impls[name] = Impl(name, functools.partial(_evaluate, *copies[name], K, cfg.batch, budget, capture))
        return impls
    trainer = HandTrainer(hand, cfg.objective, K)
    impls["hand"] = Impl("hand", trainer.step)
    impls["hand"].params = list(hand.parameters())

    for name, capture in CAPTURE.items():
        if name not in names:
            continue
        m, g = copies[name]
        objective = ELBO() if cfg.objective == "elbo" else IWAE(num_particles=K)
        pv = Trainer(m, g, objective, progress=False, capture=capture)
        impls[name] = Impl(name, pv.step, pv.setup)
        impls[name].trainer = pv

    if "svi" in names:
        m, g = copies["svi"]
        loss = Trace_ELBO() if cfg.objective == "elbo" else RenyiELBO(alpha=0.0, num_particles=K, vectorize_particles=True)
        svi = SVI(m, g, pyro.optim.Adam({"lr": 1e-3}), loss=loss)
        impls["svi"] = Impl("svi", svi.step)
    return impls


# --------------------------------------------------------------------------------------------------
# timing


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_block(impl: Impl, inputs: list[torch.Tensor], steps: int, sync: Callable[[], None]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) for ``steps`` calls of ``impl`` on ``inputs`` in turn,
    inside its own param store. CPU time does not count the time other jobs on a shared machine hold the cores."""
    with impl.scope():
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(steps):
            impl.run(inputs[i % len(inputs)])
        sync()
        return time.perf_counter() - t0, time.process_time() - c0


def measure(row: Row, impls: dict[str, Impl], inputs: list[torch.Tensor], work: int, args, sync) -> None:
    """Fill ``row.rates``: ``args.rounds`` interleaved rounds; ``work`` = items (steps or images) per call."""
    if row.config.objective == "eval":
        # one call is a full pass over the evaluation subset; one warm-up pass records and compiles the graphs
        for impl in impls.values():
            time_block(impl, inputs, 1, sync)
        steps = 1
    else:
        for impl in impls.values():
            impl.setup(inputs[0])
            time_block(impl, inputs, args.warmup, sync)
        if args.steps:
            steps = args.steps
        else:  # calibrate: about --block-seconds per block for the slowest implementation
            per_call = max(time_block(impl, inputs, 1, sync)[0] for impl in impls.values())
            steps = int(min(args.max_steps, max(args.min_steps, round(args.block_seconds / max(per_call, 1e-6)))))
    row.steps = steps
    for _ in range(args.rounds):
        if getattr(args, "flops", False) and row.device == "cpu" and row.config.objective != "eval":
            row.mm_rates.append(matmul_rate(repeats=10))  # beside the round's steps: a shared machine's speed drifts
        for name, impl in impls.items():
            wall, cpu = time_block(impl, inputs, steps, sync)
            row.rates.setdefault(name, []).append(steps * work / wall)
            row.cpu_rates.setdefault(name, []).append(steps * work / max(cpu, 1e-9))


def run_device(device: torch.device, args, train: torch.Tensor, test: torch.Tensor) -> list[Row]:
    sync = synchronizer(device)
    rows = []
    eval_images = args.eval_images if args.eval_images else (2 if args.quick else 100) if device.type == "cpu" else 10000
    for cfg in configs(args.quick, args.eval_k):
        if args.only and not any(s in f"{cfg.arch} {cfg.label} {cfg.batch}" for s in args.only):
            continue
        row = Row(device.type, cfg)
        rows.append(row)
        if cfg.guide == "planar" and FlowEncoder is None:
            row.skipped = "pyrovae.guides.FlowEncoder is not available yet"
            print(f"[{device.type}] {cfg.label}: skipped ({row.skipped})", flush=True)
            continue
        t0 = time.perf_counter()
        impls = make_impls(cfg, device, args.impls)
        if cfg.objective == "eval":
            data = test[: min(eval_images, test.shape[0])]
            row.note = f"{data.shape[0]} test images" + (" (a subset: the full 10k take ~10 min per implementation on CPU)" if data.shape[0] < test.shape[0] else "")
            measure(row, impls, [data], data.shape[0], args, sync)
        else:
            g = torch.Generator(device="cpu").manual_seed(1)
            inputs = [train[torch.randint(train.shape[0], (cfg.batch,), generator=g).to(device)] for _ in range(8)]
            measure(row, impls, inputs, 1, args, sync)
            row.capture = {n: i.trainer.capture_report for n, i in impls.items() if i.trainer is not None}
            if args.flops:  # after the timing: one more hand-written step, counted, and two of each profiled
                with impls["hand"].scope():
                    row.flops = count_flops(impls["hand"].run, inputs[0])
                    row.floor = {"products alone": products_alone(impls["hand"].run, inputs[0])[0], "optimiser alone": adam_alone(impls["hand"].params)}
                for name, impl in impls.items():
                    with impl.scope():
                        row.breakdown[name] = time_breakdown(functools.partial(impl.run, inputs[0]), 2)
        print(format_progress(row, time.perf_counter() - t0), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# whole epochs of the main job


def main_job_epochs(device: torch.device, args) -> Optional[str]:
    """Whole-epoch throughput of the README's main job (the IWAE paper's one-layer VAE, ELBO, batch 100, 55,000
    dynamically binarised MNIST images) through ``Trainer.fit`` against a hand-written epoch loop with the same
    model, bound, binarisation and Adam: the per-epoch costs (permutation, binarisation, finiteness checks,
    metric sums) that the step ratio leaves out. Interleaved rounds of one epoch each. None without MNIST."""
    from pyrovae.data import DataError, load_dataset

    try:
        splits = load_dataset("mnist", data_dir=args.data_dir, download=False, device=device)
    except (DataError, ValueError) as e:
        print(f"speed.py: no MNIST for the epoch rows ({str(e).splitlines()[0]})", flush=True)
        return None
    train = splits.train[:2000] if args.quick else splits.train
    batch = 100
    cfg = Config("iwae1", "elbo", batch)
    pyro.clear_param_store()
    model, guide = build(cfg, device)
    hand_model, hand_guide = copy.deepcopy(model), copy.deepcopy(guide)
    trainer = Trainer(model, guide, ELBO(), progress=False)
    hand = HandTrainer(HandVAE(hand_model, hand_guide), "elbo", 1)
    sync = synchronizer(device)

    def hand_epoch() -> float:
        t0 = time.perf_counter()
        perm = torch.randperm(train.shape[0], device=device)
        for start in range(0, train.shape[0], batch):
            hand.step(torch.bernoulli(train[perm[start:start + batch]]))
        sync()
        return train.shape[0] / (time.perf_counter() - t0)

    rates: dict[str, list[float]] = {"hand": [], "pyrovae": []}
    rounds = 2 if args.quick else min(args.rounds, 5)
    for r in range(rounds + 1):  # round 0 warms up (validation, capture) and is not counted
        h = hand_epoch()
        t0 = time.perf_counter()
        trainer.fit(train, r + 1, batch, dynamic_binarize=True)
        sync()
        p = train.shape[0] / (time.perf_counter() - t0)
        if r:
            rates["hand"].append(h)
            rates["pyrovae"].append(p)
    med = {k: statistics.median(v) for k, v in rates.items()}
    paired = [p / h for p, h in zip(rates["pyrovae"], rates["hand"])]
    return "\n".join([
        f"## Whole epochs of the main job ({device.type.upper()})",
        "",
        f"The README's main job (784-200-200-50 tanh, ELBO, batch {batch}, {train.shape[0]:,} dynamically binarised MNIST "
        "images per epoch, Adam lr 1e-3): `Trainer.fit` (captured steps, on-device permutation and binarisation, the "
        "periodic finiteness check, metric sums; no validation) against a hand-written epoch loop (`torch.randperm`, "
        f"`torch.bernoulli`, `HandTrainer.step`). {rounds} interleaved rounds of one epoch each after a warm-up epoch; "
        "the wall time of each `fit` call includes its data checks.",
        "",
        "| | hand-written | pyrovae `Trainer.fit` | **pyrovae / hand** | per-round range |",
        "|---|---:|---:|---:|---:|",
        f"| images/s | {med['hand']:,.0f} | {med['pyrovae']:,.0f} | **{med['pyrovae'] / med['hand']:.2f}** | {min(paired):.2f}–{max(paired):.2f} |",
        "",
        f"Capture: {trainer.capture_report}.",
        "",
    ])


# --------------------------------------------------------------------------------------------------
# report


def fmt(v: Optional[float], digits: int = 2) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def target_of(row: Row) -> Optional[float]:
    if row.device != "cpu":
        return None
    return CPU_EVAL_TARGET if row.config.objective == "eval" else CPU_TRAIN_TARGET


def format_progress(row: Row, seconds: float) -> str:
    c = row.config
    parts = [f"{i}={fmt(row.median(i))}" for i in IMPLS if row.rates.get(i)]
    s = row.ratio("pyrovae", "svi")
    return (f"[{row.device}] {short_arch(c.arch)} | {c.label} | batch {c.batch}: " + " ".join(parts) + f" {c.unit}"
            + f" | pyrovae/hand {fmt(row.ratio('pyrovae', 'hand'))} (CPU time {fmt(row.ratio('pyrovae', 'hand', cpu=True))})"
            + f" compile/hand {fmt(row.ratio('compile', 'hand'))} off/hand {fmt(row.ratio('plain', 'hand'))}"
            + (f" pyrovae/svi {fmt(s)}" if s else "") + f" | {row.steps} x {len(next(iter(row.rates.values())))} rounds, {seconds:.0f} s")


def short_arch(arch: str) -> str:
    return {**ARCHS, **DRAW_ARCHS}[arch][1].split(" (")[0]


def table(rows: list[Row]) -> str:
    head = ("| model | objective | batch | unit | hand-written | pyrovae | pyrovae, compile | pyrovae, capture off | SVI "
            "| **pyrovae / hand** | per-round range | pyrovae / hand, CPU time | pyrovae − hand, CPU ms per step or image "
            "| compile / hand | capture off / hand | pyrovae / SVI | target (pyrovae / hand) | met |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        c = row.config
        batch = f"{c.batch}" if c.objective != "eval" else f"{c.batch} per pass"
        if row.skipped:
            lines.append(f"| {short_arch(c.arch)} | {c.label} | {batch} | {c.unit} | skipped: {row.skipped} |" + " |" * 13)
            continue
        r, rng = row.ratio("pyrovae", "hand"), row.ratio_range("pyrovae", "hand")
        target = target_of(row)
        met = "—" if target is None or r is None else ("yes" if r >= target else "**no**")
        if target is not None and r is not None and r < target and (row.ratio("compile", "hand") or 0) >= target:
            met += " (compile: yes)"
        label = c.label + (f" ({row.note})" if row.note else "")
        on_cpu = row.device == "cpu"  # process CPU time says nothing about GPU work
        cpu_ratio = fmt(row.ratio("pyrovae", "hand", cpu=True)) if on_cpu else "—"
        extra = row.extra_cpu_ms() if on_cpu else None
        extra_text = "—" if extra is None else f"{extra:+.1f}"
        lines.append(
            f"| {short_arch(c.arch)} | {label} | {batch} | {c.unit} | {fmt(row.median('hand'))} | {fmt(row.median('pyrovae'))} "
            f"| {fmt(row.median('compile'))} | {fmt(row.median('plain'))} | {fmt(row.median('svi'))} "
            f"| **{fmt(r)}** | {fmt(rng[0]) + '–' + fmt(rng[1]) if rng else '—'} "
            f"| {cpu_ratio} | {extra_text} | {fmt(row.ratio('compile', 'hand'))} | {fmt(row.ratio('plain', 'hand'))} | {fmt(row.ratio('pyrovae', 'svi'))} "
            f"| {'≥ ' + format(target, '.1f') if target is not None else '—'} | {met} |"
        )
    plain_rows = [(row, impl, text) for row in rows for impl, text in row.capture.items() if impl != "plain" and ("captured" not in text or "plain:" in text)]
    if plain_rows:
        lines += ["", "Steps that did not run captured (the trainer's capture report):", ""]
        lines += [f"- {short_arch(r.config.arch)} {r.config.label} batch {r.config.batch}, {impl}: {text}" for r, impl, text in plain_rows]
    return "\n".join(lines)


def targets_section(rows: list[Row], devices: list[str]) -> str:
    cpu = [r for r in rows if r.device == "cpu" and not r.skipped and r.rates]
    out = ["| target (from the issue) | measured | met |", "|---|---|---|"]

    def summary(sel: list[Row], target: float, impl: str) -> tuple[str, str]:
        ratios = [(r, r.ratio(impl, "hand")) for r in sel if r.ratio(impl, "hand") is not None]
        if not ratios:
            return "not measured in this run", "—"
        worst = min(ratios, key=lambda t: t[1])
        text = "; ".join(f"{fmt(v)} ({short_arch(r.config.arch).split(' ')[0]} {r.config.label})" for r, v in ratios)
        return text, ("yes" if worst[1] >= target else f"**no** (worst {fmt(worst[1])})")

    for batch in (128, 1024):
        sel = [r for r in cpu if r.config.objective != "eval" and r.config.batch == batch]
        for impl, what in (("pyrovae", "pyrovae (default: capture replay)"), ("compile", "pyrovae, capture compile")):
            text, met = summary(sel, CPU_TRAIN_TARGET, impl)
            out.append(f"| CPU, batch {batch}: {what} / hand-written ≥ {CPU_TRAIN_TARGET} | {text} | {met} |")
    for impl, what in (("pyrovae", "log_likelihood's default (capture off)"), ("compile", "capture compile (what the CLI uses for a whole test set on CPU)")):
        text, met = summary([r for r in cpu if r.config.objective == "eval"], CPU_EVAL_TARGET, impl)
        out.append(f"| CPU evaluation (log p(x), k=5000), {what}: no slower than hand-written (ratio ≥ {CPU_EVAL_TARGET}) | {text} | {met} |")
    cuda = [r for r in rows if r.device == "cuda" and not r.skipped and r.rates and r.config.objective != "eval"]
    if "cuda" in devices and cuda:
        r_hand = min(r.ratio("pyrovae", "hand") for r in cuda)
        r_svi = min(r.ratio("pyrovae", "svi") for r in cuda)
        out.append(f"| CUDA: pyrovae / hand-written ≥ 1.0 | worst {fmt(r_hand)} | {'yes' if r_hand >= 1.0 else '**no**'} |")
        out.append(f"| CUDA: pyrovae ≥ 3x SVI | worst {fmt(r_svi)} | {'yes' if r_svi >= 3.0 else '**no**'} |")
    else:
        why = "no CUDA device on this machine (torch.cuda.is_available() is False)" if not torch.cuda.is_available() else "not run (--device cpu)"
        out.append(f"| CUDA: pyrovae / hand-written ≥ 1.0 | not measurable: {why} | — |")
        out.append(f"| CUDA: pyrovae ≥ 3x SVI | not measurable: {why} | — |")
    return "\n".join(out)


def report(rows: list[Row], args, meta: dict) -> str:
    devices = sorted({r.device for r in rows}, key=lambda d: d != "cpu")
    parts = [
        "# Speed: pyrovae vs hand-written PyTorch vs plain Pyro SVI",
        "",
        f"Written by `benchmarks/speed.py`{' (**--quick smoke run**: few steps, not a measurement)' if args.quick else ''}.",
        "",
        "## Run",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- CPU: {meta['cpu']}; {meta['cores']} cores visible to the process; torch threads: {meta['threads']}",
        f"- load average (1 min) at start / end: {meta['load_start']} / {meta['load_end']} (the machine is shared: "
        "timings are noisy, which is why implementations are interleaved and medians reported)",
        f"- CUDA: {meta['cuda']}",
        f"- python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}",
        f"- Pyro / torch.distributions validation: {'on (the default)' if meta['validation'] else 'off (--no-validation)'}",
        f"- data: {meta['data']}",
        f"- method: {args.rounds} rounds; each round times every implementation once, in turn ({', '.join(args.impls)}), "
        f"for the same number of steps (calibrated to ~{args.block_seconds:g} s per block unless --steps), after {args.warmup} warm-up steps; "
        "the table shows the median rate over rounds, the ratio of medians, and the range of the per-round (paired) ratios. "
        "The CPU-time ratio divides work by the CPU seconds the process used in each block (`time.process_time`): "
        "it leaves out the time other jobs held the cores, and is the steadier number on a shared machine when torch uses one thread. "
        "'pyrovae − hand' is the extra CPU time pyrovae spends per step (per image for evaluation): a fixed per-step "
        "overhead shows as the same number at batch 128 and 1024.",
        *[f"- note: {n}" for n in args.note],
        "- implementations (same networks, same initial weights, same bound, Adam lr 1e-3):",
        "  - **hand-written**: `benchmarks/reference.py`, the forward pass written with `F.linear` and torch ops on the "
        "pyrovae modules' own weights; `torch.optim.Adam`;",
        "  - **pyrovae**: `pyrovae.train.Trainer(model, guide, objective).step(x)` with `pyrovae.objectives.ELBO()` / `IWAE(K)` "
        "and the default fast path, `capture='replay'` (one step recorded as an aten graph with `make_fx`, checked against "
        "the plain step, then replayed; compile time and the check are in the warm-up, not in the timed blocks);",
        "  - **pyrovae, compile**: the same with `capture='compile'` (that graph compiled by `torch.compile`, inductor);",
        "  - **pyrovae, capture off**: the same with `capture='off'`: Pyro runs model and guide on every step;",
        "  - **SVI**: `pyro.infer.SVI(model, guide, pyro.optim.Adam, loss=Trace_ELBO())`; for IWAE rows "
        "`RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True)`, Pyro's K-particle importance-weighted bound "
        "(same computation; its log-sum-exp is over the batch's summed log-weights, not per datum);",
        "  - evaluation: `pyrovae.evaluate.log_likelihood(model, guide, x, num_samples=k, batch_size=100)` against "
        "`HandVAE.log_likelihood` (the same chunking, `pyrovae.evaluate.default_max_elements` of the device: 2^22 floats "
        "of decoder output per pass on CPU; one encoder pass per batch); SVI has no counterpart. The pyrovae column "
        "is the function's default (`capture='off'`: Pyro runs every chunk), the compile column `capture='compile'` "
        "(what the CLI's `--eval-capture auto` picks for a whole test set on CPU: each chunk shape's graph recorded and "
        "compiled once, in the warm-up pass; every timed pass "
        "re-checks the first chunk of each shape against Pyro, and that cost is in the timing).",
        "",
    ]
    for device in devices:
        parts += [f"## {device.upper()}", "", table([r for r in rows if r.device == device]), ""]
    if "cuda" not in devices:
        parts += ["## CUDA", "", "Not measured: " + ("no CUDA device on this machine (torch.cuda.is_available() is False)." if not torch.cuda.is_available() else "run with --device auto or cuda."), ""]
    parts += ["## Targets", "", targets_section(rows, devices), ""]
    if meta.get("matmul_rate"):
        parts += ["## FLOP limit", "", flop_section(rows, meta["matmul_rate"]), ""]
    return "\n".join(parts)


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def flop_section(rows: list[Row], rate: float) -> str:
    """Each CPU training row's step time against the time its FLOPs need at the highest matrix-product rate measured
    in the run (the machine at its best: on a shared machine one low sample would flatter the ratio)."""
    rates = [rate] + [m for row in rows for m in row.mm_rates]
    top = max(rates)
    out = [
        f"Matrix-product rate: a 1024 x 1024 float32 `torch.mm` at the run's threads, in CPU time, measured at the start of the "
        f"run (median of 20) and of every round (median of 10): {min(rates) / 1e9:.0f} to {top / 1e9:.0f} GFLOP/s; the FLOP time is "
        "taken at the highest, the machine at its best. FLOPs of one training step, forward and backward, counted by "
        "`torch.utils.flop_counter.FlopCounterMode` on the hand-written step (the same arithmetic as pyrovae's). Median CPU "
        "time per step / FLOP time: 1.0 is the limit; issue 27 asks for 1.5 or less.",
        "",
        "| model | objective | batch | GFLOP per step | FLOP time (ms) | implementation | CPU ms per step | / hand-written | **/ FLOP time** | within 1.5 |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    names = {"hand": "hand-written", "pyrovae": "pyrovae (capture replay, the default)", "compile": "pyrovae, capture compile",
             "plain": "pyrovae, capture off", "svi": "Pyro SVI"}
    for row in rows:
        if row.flops is None or row.device != "cpu" or not row.rates:
            continue
        need = row.flops / top
        hand = 1 / row.median("hand", cpu=True)
        for impl in IMPLS:
            if impl not in row.cpu_rates or not row.median(impl, cpu=True):
                continue
            ms = 1 / row.median(impl, cpu=True)
            ratio = ms / need
            out.append(
                f"| {short_arch(row.config.arch)} | {row.config.label} | {row.config.batch} | {row.flops / 1e9:.2f} | {1e3 * need:.0f} | {names[impl]} | "
                f"{1e3 * ms:.0f} | {ms / hand:.2f} | **{ratio:.2f}** | {'yes' if ratio <= 1.5 else '**no**'} |"
            )
    floors = []
    for row in rows:
        if row.flops is None or row.device != "cpu" or not row.floor:
            continue
        parts = dict(row.floor)
        if row.breakdown:
            parts["products in a step"] = min(p["matrix products"] for p in row.breakdown.values()) / 1e3
        floor = floor_seconds(parts)
        in_step = _ms(1e3 * parts["products in a step"]) if row.breakdown else "—"
        floors.append(
            f"| {short_arch(row.config.arch)} | {row.config.label} | {row.config.batch} | {1e3 * row.flops / top:.0f} | {1e3 * row.floor['products alone']:.0f} | "
            f"{in_step} | {1e3 * row.floor['optimiser alone']:.1f} | {1e3 * floor:.0f} | **{floor * top / row.flops:.2f}** |"
        )
    if floors:
        out += [
            "",
            "The floor: what no schedule of the same work can go below on this CPU: the step's matrix products, at the lower of "
            "their time replayed alone (`common.products_alone`: every product of one hand-written step, forward and backward, at "
            "its own shapes and layouts) and their lowest profiled time in any implementation's step (the table below: a "
            "compiled step's products can be fewer and larger), plus one fused Adam step over tensors shaped like the model's "
            "parameters (`common.adam_alone`); before any elementwise op, copy or Python. A floor near or above 1.5 times the "
            "FLOP time means the 1.5x target cannot be met with these kernels at this batch.",
            "",
            "| model | objective | batch | FLOP time (ms) | products alone (ms) | products in a step, lowest (ms) | optimiser alone (ms) | floor (ms) | **floor / FLOP time** |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            *floors,
        ]
    split = [
        f"| {short_arch(row.config.arch)} | {row.config.label} | {name} | " + " | ".join(_ms(parts[k]) for k in TIME_LABELS) + f" | {_ms(1e3 * row.flops / top)} |"
        for row in rows if row.flops is not None and row.device == "cpu" for name, parts in row.breakdown.items()
    ]
    if split:
        out += [
            "",
            "Where the time goes: CPU ms per step by kind of op (`common.time_breakdown`: `torch.profiler` self times over two "
            "steps; the profiler adds to every op, so the total is above the step times). The FLOP time (last column) is what the "
            "step's FLOPs need at the measured rate, all of them done by the matrix products; every other column is time spent "
            "beyond the FLOPs.",
            "",
            "| model | objective | implementation | " + " | ".join(TIME_LABELS) + " | FLOP time |",
            "|---|---|---|" + "---:|" * (len(TIME_LABELS) + 1),
            *split,
        ]
    return "\n".join(out)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line, with the defaults filled in: a ``--quick`` smoke run writes to :data:`QUICK_OUT` unless
    ``--out`` is given, so that it never replaces the measurement in :data:`DEFAULT_OUT`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: batch 128, a few configs, 3 steps x 2 rounds")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CPU, and CUDA when available")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (default: calibrated to --block-seconds)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per implementation (default 3: the validating step, the capturing step and a replay)")
    p.add_argument("--block-seconds", type=float, default=2.0, help="target seconds per timed block when calibrating (default 2)")
    p.add_argument("--min-steps", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--eval-k", type=int, default=5000, help="importance samples of the log-likelihood rows (default 5000)")
    p.add_argument("--eval-images", type=int, default=None, help="test images per evaluation pass (default: 100 on CPU, 2 with --quick, 10000 on CUDA)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None, help="implementations to time (default: all; with --quick all but compile); hand-written is always timed")
    p.add_argument("--only", nargs="*", default=None, help="run only configs whose 'arch label batch' contains one of these strings")
    p.add_argument("--no-validation", action="store_true", help="pyro.enable_validation(False) for the whole run (default: Pyro's default, on)")
    p.add_argument("--out", type=Path, default=None, help=f"markdown file to write (default: {DEFAULT_OUT.relative_to(DEFAULT_OUT.parents[2])}; with --quick, {QUICK_OUT})")
    add_common_args(p, device=None, seed=None, data="binarized-mnist")
    p.add_argument("--no-epochs", action="store_true", help="leave out the main job's whole-epoch rows")
    p.add_argument("--flops", action="store_true", help="also count each training step's FLOPs and measure the CPU's matrix-product rate: "
                   "the FLOP-limit section (step time / the time its FLOPs need at that rate)")
    p.add_argument("--note", action="append", default=[], help="a line recorded in the results file (e.g. why --threads was set); repeatable")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 7
    if args.warmup is None:
        args.warmup = 3  # the first step validates, the second captures and checks: timing starts after both
    if args.quick and args.steps is None:
        args.steps = 3
    args.impls = tuple(n for n in IMPLS if n == "hand" or n in (args.impls or (QUICK_IMPLS if args.quick else IMPLS)))
    for name in ("rounds", "steps", "threads", "eval_k", "eval_images"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')}={v} must be a positive integer")
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    args.parser = p
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    p = args.parser

    logging.getLogger("pyro").setLevel(logging.WARNING)  # "Guessed max_plate_nesting" on every new objective
    start(args)
    if args.no_validation:
        pyro.enable_validation(False)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]

    meta = {
        "command": command_line() if argv is None else f"speed.main({argv!r})",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_start": f"{os.getloadavg()[0]:.2f}",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available (torch.cuda.is_available() is False)",
        "validation": not args.no_validation,
        "matmul_rate": matmul_rate() if args.flops else None,
    }
    if FlowEncoder is None:
        print("speed.py: pyrovae.guides.FlowEncoder is not available; the planar-flow rows are skipped", flush=True)

    rows: list[Row] = []
    epochs: list[str] = []
    for d in devices:
        device = torch.device(d)
        train, test, meta["data"] = load_data(args.data_dir, device)
        rows += run_device(device, args, train, test)
        if not args.no_epochs:
            section = main_job_epochs(device, args)
            if section:
                print(section, flush=True)
                epochs.append(section)
    meta["load_end"] = f"{os.getloadavg()[0]:.2f}"
    text = report(rows, args, meta) + "".join("\n" + e for e in epochs)
    print("\n" + text)
    atomic_write(args.out, lambda f: f.write(text.encode()))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(args.out, 0o666 & ~umask)  # mkstemp's 0600 is for checkpoints; a results file is for everyone
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
