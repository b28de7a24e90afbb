"""Reproduce the MNIST part of Table 1 of Burda, Grosse & Salakhutdinov (2016), "Importance Weighted
Autoencoders": VAE (ELBO with k samples) vs IWAE (k-sample bound) for k = 1, 5, 50, with one stochastic
layer (x-200-200-z50) and two (x-200-200-z100-100-100-z50), tanh MLPs, Bernoulli likelihood.

Reported per configuration: test NLL = -log p(x) estimated by importance sampling with k = 5000 samples
from q (``pyrovae.evaluate.log_likelihood``) and the number of active units (``active_units``), next to the
paper's values.

Protocol (paper): the 60,000 MNIST training images, binarised dynamically (a fresh Bernoulli sample per
use); the test set binarised once with a fixed seed; Adam (beta1 0.9, beta2 0.999, eps 1e-4), batch 20,
3^i epochs at learning rate 1e-3 * 10^(-i/7) for i = 0..7 (3280 epochs).

Usage::

    # minutes on a CPU: a training subset, a few epochs, NLL on the first test images (table under --work-dir)
    OMP_NUM_THREADS=1 python benchmarks/iwae_table.py --quick --threads 1
    # the paper's protocol with its schedule truncated to stages i = 0..4 (121 epochs; hours per configuration
    # on one CPU core)
    OMP_NUM_THREADS=1 python benchmarks/iwae_table.py --stages 5 --threads 1 --configs 1L-VAE-k1 1L-VAE-k5 1L-IWAE-k5
    # the paper's protocol, for a GPU (each configuration takes days)
    python benchmarks/iwae_table.py --device cuda

Runs are kept under ``--work-dir``, in a folder named after the settings that change the numbers (so runs
with other settings never mix): each configuration trains in its own run folder, checkpointed after every
epoch (``pyrovae.train.Trainer`` with ``run_dir``; SIGINT/SIGTERM checkpoint at the next step), and a
finished configuration is saved there before the table ``--out`` is rewritten atomically. ``--resume``
keeps the finished configurations and continues an interrupted one from its last checkpoint; without it, a
folder that already holds runs is refused rather than overwritten.

Only a run at the table's protocol (all 60,000 training images, batch 20, k = 5000 on all 10,000 test
images, a whole number of the schedule's stages, no time cap) may write ``benchmarks/results/iwae_table.md``;
any other run (``--quick``, a smoke test) writes its table into its work folder.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import pyro
import torch

from common import (
    add_common_args, build, build_objective, command_line, fill_defaults, fixed_binarization, hardware_info, load_average, log, nll_summary, now,
    paired_difference, require_positive, settings, start,
)
from pyrovae.train.callbacks import EachEpoch
from pyrovae.utils.files import atomic_write
from pyrovae.data import load_dataset
from pyrovae.evaluate import active_units, elbo_terms, kl_by_site, log_likelihood
from pyrovae.train.checkpoint import load_checkpoint
from pyrovae.train import Trainer, TrainingInterrupted

#: a layer whose KL term is under this many nats per image is reported as collapsed
COLLAPSED_NATS = 0.1

#: name -> (stochastic layer sizes, objective, k)
CONFIGS: dict[str, tuple[tuple[int, ...], str, int]] = {
    f"{layers}L-{obj.upper()}-k{k}": (z_dims, obj, k)
    for layers, z_dims in ((1, (50,)), (2, (100, 50)))
    for obj, ks in (("vae", (1, 5, 50)), ("iwae", (5, 50)))
    for k in ks
}

#: Burda et al. (2016), Table 1, MNIST: test NLL (k=5000) and active units. For k = 1 the VAE and the IWAE
#: objectives coincide (one row in the paper). Active units of the two-layer models are left out: they could
#: not be checked against the paper when this script was written.
PAPER: dict[str, tuple[float, Optional[str]]] = {
    "1L-VAE-k1": (86.76, "19"),
    "1L-VAE-k5": (86.47, "20"),
    "1L-VAE-k50": (86.35, "20"),
    "1L-IWAE-k5": (85.54, "22"),
    "1L-IWAE-k50": (84.78, "25"),
    "2L-VAE-k1": (85.33, None),
    "2L-VAE-k5": (85.01, None),
    "2L-VAE-k50": (84.78, None),
    "2L-IWAE-k5": (83.89, None),
    "2L-IWAE-k50": (82.90, None),
}

#: the paper's schedule has stages i = 0..7 of 3^i epochs each
PAPER_STAGES = 8
PAPER_SETTINGS = {"epochs": 3280, "train_size": 60000, "test_size": 10000, "eval_samples": 5000, "batch_size": 20}
QUICK_SETTINGS = {"epochs": 1, "train_size": 10000, "test_size": 500, "eval_samples": 5000, "batch_size": 100}
#: samples of z1 averaged to estimate E_q[z2 | x] for the active units of two-layer models
AU_SAMPLES = 100
#: settings that change the numbers: results are only combined (and resumed) when these agree
PROTOCOL_KEYS = ("epochs", "train_size", "test_size", "eval_samples", "batch_size", "lr", "adam_eps", "seed", "max_train_minutes")
#: the committed table; only a run at the table's protocol (:func:`table_protocol`) may write it
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "iwae_table.md"
#: test images per log_likelihood call (a progress line each); memory is bounded inside by max_elements
EVAL_CHUNK = 1000


def stage_epochs(stages: int) -> int:
    """Epochs of the schedule's first ``stages`` stages: sum of 3^i for i < stages (5 -> 121, 8 -> 3280)."""
    return (3**stages - 1) // 2


def schedule_stages(epochs: int, lr: float) -> list[tuple[int, int, float]]:
    """(i, epochs, learning rate) of each stage of Burda et al.'s schedule (3^i epochs at lr * 10^(-i/7), as
    ``pyrovae.train.lr_factor('iwae', ...)``) that ``epochs`` epochs reach; the last one may be partial."""
    out, i, seen = [], 0, 0
    while seen < epochs:
        n = min(3**i, epochs - seen)
        out.append((i, n, lr * 10 ** (-i / 7)))
        seen, i = seen + n, i + 1
    return out


def whole_stages(epochs: int) -> Optional[int]:
    """The number of stages when ``epochs`` ends a stage of the schedule, else None."""
    for stages in range(1, 32):
        if stage_epochs(stages) == epochs:
            return stages
    return None


def table_protocol(proto: dict) -> bool:
    """The paper's protocol, with the schedule possibly truncated to its first stages: the runs that may write
    the committed table."""
    same = all(proto[k] == v for k, v in PAPER_SETTINGS.items() if k != "epochs")
    return same and proto["lr"] == 1e-3 and proto["adam_eps"] == 1e-4 and proto["max_train_minutes"] is None and whole_stages(proto["epochs"]) is not None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"CPU-sized run: defaults {QUICK_SETTINGS} instead of the paper's {PAPER_SETTINGS}")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (paper: 3280)")
    p.add_argument("--stages", type=int, default=None, help=f"train the first N stages of the paper's schedule, i = 0..N-1 (sum of 3^i epochs: 5 -> 121); paper: {PAPER_STAGES}")
    p.add_argument("--train-size", type=int, default=None, help="first N training images (paper: all 60000)")
    p.add_argument("--test-size", type=int, default=None, help="first N test images for NLL and active units (paper: all 10000)")
    p.add_argument("--eval-samples", type=int, default=None, help="importance samples of the test log-likelihood (paper: 5000)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (paper: 20)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME", help=f"subset of {list(CONFIGS)}")
    p.add_argument("--lr", type=float, default=1e-3, help="initial Adam learning rate (paper schedule: 'iwae')")
    p.add_argument("--adam-eps", type=float, default=1e-4)
    p.add_argument("--max-train-minutes", type=float, default=None, help="stop a configuration's training after the epoch that passes this (recorded in the table)")
    p.add_argument("--eval-batch-size", type=int, default=100, help="test images per log-likelihood pass")
    add_common_args(p, seed="seed of initialisation and training; the test binarisation uses seed + 1")
    p.add_argument("--out", default=None, help=f"the table (default: {DEFAULT_OUT.relative_to(Path.cwd()) if DEFAULT_OUT.is_relative_to(Path.cwd()) else DEFAULT_OUT} for a run at the table's protocol, else iwae_table.md in the run's work folder)")
    p.add_argument("--work-dir", default="runs/iwae_table", help="runs, checkpoints and finished configurations, in a sub-folder per protocol (for --resume)")
    p.add_argument("--resume", action="store_true", help="keep configurations already finished in --work-dir with the same settings, and continue an interrupted one from its last checkpoint")
    p.add_argument("--note", default=None, help="free text added to the table (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    if args.stages is not None:
        if not 1 <= args.stages <= PAPER_STAGES:
            p.error(f"--stages must be between 1 and {PAPER_STAGES} (the paper's schedule has {PAPER_STAGES} stages), got {args.stages}")
        if args.epochs is not None and args.epochs != stage_epochs(args.stages):
            p.error(f"--stages {args.stages} means {stage_epochs(args.stages)} epochs, but --epochs {args.epochs} was given: pass one of them")
        args.epochs = stage_epochs(args.stages)
    fill_defaults(args, QUICK_SETTINGS if args.quick else PAPER_SETTINGS)
    require_positive(p, args, ("epochs", "train_size", "test_size", "eval_samples", "batch_size", "eval_batch_size", "threads"))
    if args.out is None:
        args.out = str(DEFAULT_OUT if table_protocol(protocol(args)) else protocol_dir(args) / "iwae_table.md")
    elif Path(args.out).resolve() == DEFAULT_OUT and not table_protocol(protocol(args)):
        p.error(
            f"--out {args.out} is the committed table, which only a run at the table's protocol may write "
            f"({PAPER_SETTINGS} but any whole number of stages, lr 1e-3, eps 1e-4, no --max-train-minutes); these settings "
            f"are {protocol(args)}: leave --out out (the table then goes to {protocol_dir(args) / 'iwae_table.md'}) or name another file"
        )
    return args


def protocol(args: argparse.Namespace) -> dict:
    return settings(args, PROTOCOL_KEYS)


def protocol_dir(args: argparse.Namespace) -> Path:
    """The work folder of these settings: runs with other settings never share (or resume) one."""
    pr = protocol(args)
    tag = f"e{pr['epochs']}-n{pr['train_size']}-t{pr['test_size']}-k{pr['eval_samples']}-b{pr['batch_size']}-lr{pr['lr']:g}-eps{pr['adam_eps']:g}-s{pr['seed']}"
    if pr["max_train_minutes"] is not None:
        tag += f"-cap{pr['max_train_minutes']:g}min"
    return Path(args.work_dir) / tag


# ---------------------------------------------------------------------------------------------------------
# One configuration


def make_trainer(name: str, args: argparse.Namespace, x_shape: tuple, device: torch.device, run_dir: Optional[Path]) -> tuple:
    """The configuration's model, guide and trainer (seeded, a fresh parameter store)."""
    z_dims, obj, k = CONFIGS[name]
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    cfg = {"model": "vae", "guide": "gaussian", "z_dims": list(z_dims), "objective": "elbo" if obj == "vae" else "iwae", "num_particles": k}
    model, guide = build(cfg, x_shape, device)
    trainer = Trainer(
        model, guide, build_objective(cfg), lr=args.lr, schedule="iwae", optimizer_kwargs={"eps": args.adam_eps}, progress=False,
        run_dir=run_dir, config={"benchmark": "iwae_table", "name": name, "protocol": protocol(args)},
    )
    return model, guide, trainer


def layer_kl(model, guide, test: torch.Tensor, seed: int) -> dict:
    """Each stochastic layer's KL term on the test images (one draw each, seeded): a collapsed layer shows about 0."""
    pyro.set_rng_seed(seed)
    return kl_by_site(model, guide, test)


def fill_layer_kl(name: str, args: argparse.Namespace, test: torch.Tensor, folder: Path, entry: dict) -> bool:
    """Add ``kl_by_layer`` to a configuration finished before the table reported it, from its final checkpoint (the
    weights its NLL was measured with); False when that checkpoint is gone or is not the final one."""
    last = folder / name / "checkpoints" / "last.pt"
    if not last.is_file():
        return False
    state = load_checkpoint(last)
    if state.get("cursor", {}).get("step") != entry["result"]["steps"]:
        return False
    model, guide, trainer = make_trainer(name, args, test.shape[1:], test.device, None)
    trainer.setup(test[: args.batch_size])
    trainer.state.load_weights(state)
    entry["result"]["kl_by_layer"] = layer_kl(model, guide, test, args.seed)
    return True


def run_config(name: str, args: argparse.Namespace, train: torch.Tensor, test: torch.Tensor, folder: Path) -> dict:
    """Train one configuration in its run folder ``folder/name`` (checkpointed after every epoch; continued from
    its last checkpoint when one is there), then evaluate it on ``test``."""
    z_dims, obj, k = CONFIGS[name]
    run_dir, proto = folder / name, protocol(args)
    model, guide, trainer = make_trainer(name, args, train.shape[1:], train.device, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    resumed_from = None
    if last.is_file():
        config_path = run_dir / "config.json"
        saved = json.loads(config_path.read_text()).get("protocol") if config_path.is_file() else None
        if saved != proto:
            raise SystemExit(f"{run_dir} holds a run with settings {saved}, not {proto}: move it away or choose another --work-dir")
        trainer.resume(last, train[: args.batch_size])
        resumed_from = round(trainer.cursor.epoch + trainer.cursor.pos / max(1, math.ceil(train.shape[0] / args.batch_size)), 2)
        log(f"{name}: continuing from {last} (epoch {trainer.cursor.epoch}, {trainer.cursor.pos} batches into the next, step {trainer.cursor.step})")

    def trained_seconds() -> float:
        return sum(r["seconds"] for r in trainer.history)

    def each_epoch(trainer: Trainer, rec: dict) -> None:  # log, and stop at the time budget
        log(f"{name} epoch {rec['epoch']}/{args.epochs}: train loss {rec['train_loss']:.2f} ({'-ELBO' if obj == 'vae' else '-IWAE bound'}), "
            f"lr {rec['lr']:.2e}, {rec['seconds']:.1f} s; {trained_seconds() / 60:.1f} min trained")
        if args.max_train_minutes is not None and trained_seconds() > 60 * args.max_train_minutes:
            log(f"{name}: stopping after epoch {rec['epoch']}: --max-train-minutes {args.max_train_minutes} reached")
            trainer.stop_training = True

    t0 = time.perf_counter()
    if trainer.cursor.epoch < args.epochs:
        trainer.fit(train, args.epochs, args.batch_size, dynamic_binarize=True, callbacks=[EachEpoch(each_epoch)])
    train_wall = time.perf_counter() - t0
    train_seconds = trained_seconds()

    t1 = time.perf_counter()
    values, errors = [], []
    for start in range(0, test.shape[0], EVAL_CHUNK):
        ll = log_likelihood(model, guide, test[start : start + EVAL_CHUNK], num_samples=args.eval_samples, batch_size=args.eval_batch_size)
        values.append(ll.values.detach().cpu())
        errors.append(ll.stderr.detach().cpu())
        done = min(test.shape[0], start + EVAL_CHUNK)
        log(f"{name}: log p(x) with k = {args.eval_samples} on {done}/{test.shape[0]} test images, running NLL "
            f"{float(-torch.cat(values).mean()):.2f}, {time.perf_counter() - t1:.0f} s")
    values, errors = torch.cat(values), torch.cat(errors)
    eval_seconds = time.perf_counter() - t1
    terms = elbo_terms(model, guide, test)
    units_marginal = active_units(guide, test, num_samples=AU_SAMPLES)
    nll = nll_summary(-values, errors)
    stage_ends = [sum(e for _, e, _ in schedule_stages(args.epochs, args.lr)[: i + 1]) for i in range(len(schedule_stages(args.epochs, args.lr)))]
    by_epoch = {r["epoch"]: r["train_loss"] for r in trainer.history}
    result = {
        "name": name,
        "layers": len(z_dims),
        "objective": obj,
        "k": k,
        "epochs_done": len(trainer.history),
        "steps": trainer.cursor.step,
        "train_seconds": round(train_seconds, 1),
        "train_wall_seconds_last_invocation": round(train_wall, 1),
        "resumed_from_epoch": resumed_from,
        "seconds_per_epoch": round(train_seconds / max(1, len(trainer.history)), 2),
        "eval_seconds": round(eval_seconds, 1),
        "final_train_loss": trainer.history[-1]["train_loss"],
        "stage_train_loss": {e: by_epoch[e] for e in stage_ends if e in by_epoch},
        "test_nll": nll["test_nll"],
        "test_nll_stderr_data": nll["test_nll_stderr_over_data"],
        "test_nll_stderr_importance": nll["test_nll_importance_stderr"],
        "test_elbo": terms["elbo"],
        "test_kl": terms["kl"],
        "kl_by_layer": layer_kl(model, guide, test, args.seed),
        "active_units": units_marginal,
        "protocol": proto,
        "load_average": load_average(),
        "finished_at": now(),
    }
    log(f"{name}: test NLL {result['test_nll']:.2f} +- {result['test_nll_stderr_data']:.2f} (paper {PAPER[name][0]}), "
        f"test ELBO {terms['elbo']:.2f}, active units {units_marginal}, train {train_seconds:.0f} s, eval {eval_seconds:.0f} s")
    return {"result": result, "ll": values}


# ---------------------------------------------------------------------------------------------------------
# Saving and the table


def save_result(work_dir: Path, entry: dict) -> None:
    name = entry["result"]["name"]
    atomic_write(work_dir / f"{name}.pt", lambda f: torch.save(entry, f))


def load_results(work_dir: Path, proto: dict) -> dict[str, dict]:
    """Finished configurations in ``work_dir`` that were run with the same protocol settings."""
    out = {}
    for name in CONFIGS:
        path = work_dir / f"{name}.pt"
        if path.is_file():
            entry = torch.load(path, map_location="cpu", weights_only=False)
            if entry["result"]["protocol"] == proto:
                out[name] = entry
    return out


def _units(units: dict) -> str:
    if list(units) == ["z"]:
        return str(units["z"])
    return "+".join(str(units[k]) for k in sorted(units))


def _layer_kl(r: dict) -> str:
    kl = r.get("kl_by_layer")
    return "—" if not kl else " + ".join(f"{kl[k]:.2f}" for k in sorted(kl))


def _comparisons(entries: dict) -> list[str]:
    """Paired differences of test NLL on the same test images (stderr of the per-image difference)."""
    lines = []
    for layers in (1, 2):
        pairs = [
            (f"{layers}L-VAE-k1", f"{layers}L-VAE-k5"),
            (f"{layers}L-VAE-k5", f"{layers}L-VAE-k50"),
            (f"{layers}L-VAE-k1", f"{layers}L-IWAE-k5"),
            (f"{layers}L-IWAE-k5", f"{layers}L-IWAE-k50"),
            (f"{layers}L-VAE-k5", f"{layers}L-IWAE-k5"),
            (f"{layers}L-VAE-k50", f"{layers}L-IWAE-k50"),
        ]
        for a, b in pairs:
            if a not in entries or b not in entries:
                continue
            d, se = paired_difference(-entries[a]["ll"], -entries[b]["ll"])  # NLL(a) - NLL(b) per image: > 0 means b is better
            paper = PAPER[a][0] - PAPER[b][0]
            if abs(d) < 2 * se:
                verdict = "no significant difference (|diff| < 2 stderr)"
            elif d > 0:
                verdict = f"**{b} better**"
            else:
                verdict = f"**{a} better** (paper: the reverse)" if paper > 0 else f"**{a} better**"
            lines.append(f"| {a} vs {b} | {d:+.2f} | {se:.2f} | {paper:+.2f} | {verdict} |")
    if not lines:
        return []
    return [
        "NLL(A) - NLL(B) on the same test images (positive: B is better); stderr of the mean per-image difference.",
        "",
        "| A vs B | obtained | stderr | paper | verdict |",
        "|---|---:|---:|---:|---|",
        *lines,
    ]


def _distances(entries: dict, proto: dict, stages: list, truncated: bool, paper_like: bool) -> list[str]:
    """A sentence per finished configuration: how far its NLL is from the paper's, and why."""
    lines = []
    for name in CONFIGS:
        if name not in entries:
            continue
        r = entries[name]["result"]
        paper_nll, paper_au = PAPER[name]
        gap = r["test_nll"] - paper_nll
        where = f"{abs(gap):.2f} nats {'above (worse than)' if gap > 0 else 'below (better than)'} the paper's {paper_nll:.2f}"
        au = f"; {_units(r['active_units'])} active units" + (f" against the paper's {paper_au}" if paper_au else "")
        losses = {int(e): v for e, v in r.get("stage_train_loss", {}).items()}
        trend = ""
        if len(losses) >= 2:
            (e0, l0), (e1, l1) = sorted(losses.items())[-2:]
            trend = (f" Its training loss still fell by {l0 - l1:.2f} nats over the last stage (epoch {e0}: {l0:.2f}, epoch {e1}: {l1:.2f}), "
                     "so training had not converged." if l1 < l0 else
                     f" Its training loss did not fall over the last stage (epoch {e0}: {l0:.2f}, epoch {e1}: {l1:.2f}).")
        if paper_like:
            why = "Same protocol as the paper; the difference is between implementations, initialisations and seeds (the paper reports one run)."
        elif truncated:
            rest = PAPER_SETTINGS["epochs"] - r["epochs_done"]
            why = (f"Why: the truncated schedule, {r['epochs_done']} of the paper's {PAPER_SETTINGS['epochs']} epochs: the paper's further "
                   f"{rest} epochs (stages i = {len(stages)}..{PAPER_STAGES - 1}, at lr down to {proto['lr'] * 10 ** (-(PAPER_STAGES - 1) / 7):.1e}) "
                   "were not run; the rest of the protocol is the paper's, so the remainder of the gap is the implementation, "
                   "initialisation and seed (the paper reports one run)." + trend)
        else:
            why = ("Why: not the paper's protocol (see the note at the top): fewer epochs, and possibly fewer images, a larger batch "
                   "or fewer test images, so the numbers are not comparable with the paper's." + trend)
        kl = r.get("kl_by_layer") or {}
        top = kl.get("z2")
        collapse = "" if top is None or top >= COLLAPSED_NATS else (
            f" Its top layer collapsed: KL(q(z2 | z1) || p(z2)) is {top:.2f} nats per image (z1's: {kl['z1']:.2f}), so q(z2 | z1) is "
            "the prior, z2 carries nothing, and the model is a one-layer VAE with 100 units and a learned prior p(z1 | z2) that ignores z2.")
        lines.append(f"- **{name}**: test NLL {r['test_nll']:.2f} ± {r['test_nll_stderr_data']:.2f}, {where}{au}. {why}{collapse}")
    return lines


def render(args: argparse.Namespace, entries: dict, hw: dict, started: str, wall_seconds: float, splits_info: dict) -> str:
    proto = protocol(args)
    done = [n for n in CONFIGS if n in entries]
    planned = [n for n in args.configs]
    paper_like = all(proto[k] == v for k, v in PAPER_SETTINGS.items())
    truncated = table_protocol(proto) and not paper_like
    stages = schedule_stages(proto["epochs"], proto["lr"])
    schedule = "; ".join(f"i = {i}: {e} epoch{'s' if e > 1 else ''} at lr {lr:.2e}" for i, e, lr in stages)
    lines = [
        "# IWAE Table 1 (MNIST): VAE vs IWAE, obtained vs paper",
        "",
        "Burda, Grosse & Salakhutdinov (2016), *Importance Weighted Autoencoders*, Table 1, MNIST rows. Written by "
        "`benchmarks/iwae_table.py`; regenerate with the command below.",
        "",
    ]
    if truncated:
        n_st = len(stages)
        lines += [
            f"> **The paper's protocol with its schedule truncated** to stages i = 0..{n_st - 1} of the paper's i = 0..{PAPER_STAGES - 1}: "
            f"{proto['epochs']} of the paper's {PAPER_SETTINGS['epochs']} epochs ({100 * proto['epochs'] / PAPER_SETTINGS['epochs']:.1f}%), "
            f"ending at lr {stages[-1][2]:.2e} where the paper goes on to {proto['lr'] * 10 ** (-(PAPER_STAGES - 1) / 7):.2e}. "
            "Everything else is the paper's: all 60,000 training images dynamically binarised, batch 20, Adam (eps 1e-4), "
            "test NLL with k = 5000 on all 10,000 test images. The models are trained for less than the paper's, so each "
            "NLL is expected above the paper's; see 'Distance from the paper' below.",
            "",
        ]
    elif not paper_like:
        lines += [
            "> **Not the paper's protocol.** This is a short run: "
            f"{proto['epochs']} epoch(s) on {splits_info['train_used']} training images (paper: 3280 epochs on 60000; schedule: {schedule}), "
            f"batch {proto['batch_size']} (paper: 20), NLL on the first {splits_info['test_used']} test images (paper: 10000). "
            "The models are far from converged, so the obtained NLLs are much higher than the paper's and the gaps between "
            "configurations are not the paper's gaps. Compare configurations with each other (same data, same budget "
            "in epochs), not with the paper's numbers.",
            "",
        ]
    if args.note:
        lines += [f"Note: {args.note}", ""]
    lines += [
        f"Finished configurations: {len(done)} of the {len(planned)} planned ({', '.join(planned)}). "
        f"Wall time of this invocation so far: {wall_seconds / 60:.1f} min.",
        "",
        "| layers | objective | k | test NLL | ± (data) | paper NLL | active units | paper AU | KL by layer | test ELBO | epochs | train time | s/epoch | NLL eval time |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in CONFIGS:
        if name not in planned and name not in entries:
            continue
        z_dims, obj, k = CONFIGS[name]
        paper_nll, paper_au = PAPER[name]
        if name in entries:
            r = entries[name]["result"]
            lines.append(
                f"| {r['layers']} | {obj.upper()} | {k} | {r['test_nll']:.2f} | {r['test_nll_stderr_data']:.2f} | {paper_nll:.2f} | "
                f"{_units(r['active_units'])} | {paper_au or '—'} | {_layer_kl(r)} | {r['test_elbo']:.2f} | {r['epochs_done']} | "
                f"{r['train_seconds'] / 60:.1f} min | {r['seconds_per_epoch']:.1f} | {r['eval_seconds']:.0f} s |"
            )
        else:
            lines.append(f"| {len(z_dims)} | {obj.upper()} | {k} | not run yet | | {paper_nll:.2f} | | {paper_au or '—'} | | | | | |")
    lines += [
        "",
        "- test NLL: -mean log p(x) over the test images, log p(x) estimated with "
        f"{proto['eval_samples']} importance samples from q (`pyrovae.evaluate.log_likelihood`); "
        "± (data): standard error over the test images (the spread of log p(x) between images, i.e. how much the "
        "mean would move on another test subset); the importance-sampling error of each mean is far smaller "
        "(listed per configuration below).",
        "- active units: latent units u with Cov_x(E_q[u | x]) > 0.01 on the same test images (Burda et al.'s statistic). "
        f"Two layers: z1 (100 units) + z2 (50 units), with E_q[z2 | x] the mean of q(z2 | z1) averaged over {AU_SAMPLES} "
        "samples z1 ~ q(z1 | x), whose sampling variance is subtracted from the variance over x "
        "(`pyrovae.evaluate.active_units`, `unit_activity`).",
        f"- KL by layer: each stochastic layer's KL term, E_q[log q(z_l | ...) - log p(z_l | ...)] per image on the same test images, "
        f"one draw (`pyrovae.evaluate.kl_by_site`); two layers: z1 + z2. A layer under {COLLAPSED_NATS} nats is called collapsed below.",
        "- test ELBO: single-sample ELBO on the same test images (`elbo_terms`).",
        "- paper AU: the paper's active units; left out (—) for two layers, where they could not be checked.",
        "- For k = 1 the VAE and IWAE objectives are identical; the paper lists one row for both.",
        "",
        "## Distance from the paper",
        "",
    ]
    lines += _distances(entries, proto, stages, truncated, paper_like) or ["(no configuration finished yet)"]
    lines += [
        "",
        "## Ordering",
        "",
    ]
    comparisons = _comparisons(entries)
    lines += comparisons or ["(needs at least two finished configurations of the same depth)"]
    lines += [
        "",
        "## Settings",
        "",
        f"- training data: MNIST training set, first {splits_info['train_used']} of {splits_info['train_total']} images, "
        "dynamically binarised (`load_dataset('mnist', binarize='dynamic', valid_size=0)`; a fresh Bernoulli sample of every batch)",
        f"- test data: MNIST test set binarised once (torch.Generator seed {args.seed + 1}, whole set, then the first "
        f"{splits_info['test_used']} images)",
        "- models: `VAE(z_dims=(50,))` (x-200-200-z50) and `VAE(z_dims=(100, 50))` (x-200-200-z100-100-100-z50), tanh MLPs, "
        "Bernoulli likelihood; guides `GaussianEncoder` with the same sizes",
        "- objectives: VAE k = `ELBO(num_particles=k)`; IWAE k = `IWAE(num_particles=k)` (standard pathwise gradient)",
        f"- optimiser: Adam, lr {proto['lr']:g}, betas (0.9, 0.999), eps {proto['adam_eps']:g}, schedule `iwae` "
        f"(3^i epochs at lr * 10^(-i/7)): {schedule}; "
        f"batch size {proto['batch_size']}, {proto['epochs']} epoch(s) planned (paper: i = 0..{PAPER_STAGES - 1}, {PAPER_SETTINGS['epochs']} epochs)"
        + (f", training capped at {proto['max_train_minutes']} min per configuration" if proto["max_train_minutes"] else ""),
        f"- seed {args.seed} for initialisation and training (the same initial weights for VAE and IWAE of one depth)",
        f"- importance samples for the test NLL: {proto['eval_samples']}",
        "",
        "## Run",
        "",
        f"- command: `{command_line()}`",
        f"- started: {started}; table written: {now()}",
        f"- hardware: {hw['cpu']} ({hw['cpu_cores']} cores, torch threads {hw['torch_threads']}), device {hw['device']}"
        + (f" ({hw['gpu']})" if "gpu" in hw else ""),
        f"- software: torch {hw['torch']}, pyro {hw['pyro']}, Python {hw['python']}, {hw['platform']}",
        "",
        "Train time: the sum of the epochs' times (over every invocation, for a resumed configuration); the machine's other "
        "work stretches it (load average: when the configuration finished).",
        "",
        "| configuration | epochs done | steps | train time | NLL eval time | final train loss | test NLL importance stderr | test KL | load average | resumed | finished |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name in CONFIGS:
        if name in entries:
            r = entries[name]["result"]
            resumed = r.get("resumed_from_epoch")
            lines.append(
                f"| {name} | {r['epochs_done']} | {r['steps']} | {r['train_seconds']:.0f} s | {r['eval_seconds']:.0f} s | "
                f"{r['final_train_loss']:.2f} | {r['test_nll_stderr_importance']:.3f} | {r['test_kl']:.2f} | "
                f"{r.get('load_average', '?')} | {'from epoch %.2f' % resumed if resumed is not None else 'no'} | {r['finished_at']} |"
            )
    return "\n".join(lines) + "\n"


def write_table(path: Path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = start(args)
    started, t_start = now(), time.perf_counter()
    hw = hardware_info(device)
    splits = load_dataset("mnist", data_dir=args.data_dir, binarize="dynamic", valid_size=0, device=device)
    train = splits.train[: args.train_size]
    test = fixed_binarization(splits.test, args.seed + 1, args.test_size)
    splits_info = {"train_used": train.shape[0], "train_total": splits.train.shape[0], "test_used": test.shape[0]}
    folder, out = protocol_dir(args), Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    proto = protocol(args)
    entries = load_results(folder, proto)
    if not args.resume:
        held = sorted(set(entries) | {n for n in CONFIGS if (folder / n / "checkpoints" / "last.pt").exists()})
        if held:
            raise SystemExit(
                f"{folder} already holds finished or checkpointed configurations with these settings ({', '.join(held)}): "
                "pass --resume to keep them and continue (nothing finished is retrained), or choose another --work-dir"
            )
    log(f"settings {json.dumps(proto)}; {hw}; configs {args.configs}; train {tuple(train.shape)}, test {tuple(test.shape)}; "
        f"runs in {folder}; table {out}")
    for name, entry in entries.items():  # finished before the table reported each layer's KL
        if "kl_by_layer" not in entry["result"] and fill_layer_kl(name, args, test, folder, entry):
            save_result(folder, entry)
            log(f"{name}: KL by layer {entry['result']['kl_by_layer']} (from its final checkpoint)")
    if entries:
        write_table(out, render(args, entries, hw, started, time.perf_counter() - t_start, splits_info))
    for name in args.configs:
        if name in entries:
            log(f"{name}: already finished in {folder} with these settings (--resume); skipped")
            continue
        try:
            entry = run_config(name, args, train, test, folder)
        except TrainingInterrupted as e:
            log(f"{name}: {e}. Finished configurations are in {folder} and {out}; continue with the same command and --resume")
            return 130
        save_result(folder, entry)
        entries[name] = entry
        write_table(out, render(args, entries, hw, started, time.perf_counter() - t_start, splits_info))
        log(f"wrote {out} ({len(entries)} configuration(s))")
    log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
