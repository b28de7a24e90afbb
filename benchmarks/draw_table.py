"""DRAW on binarized MNIST (Gregor et al. 2015, Table 2): without and with attention, against a one-layer VAE
trained for the same compute budget.

Reported per model: the test variational bound on the NLL (-ELBO, one sample per image) beside the paper's bound,
the importance-sampled NLL with k samples (the IWAE estimator, no counterpart in the paper), the curve of the test
ELBO against training time, and the paired difference between DRAW with and without attention in standard errors.
Paper (64 steps, 256-unit LSTMs, 100-d z_t, read 2 x 2 and write 5 x 5 with attention): the bound NLL <= 87.40
without attention, <= 80.97 with. Training uses the closed-form KL per step (``ELBO(analytic_kl=True)``), as the
paper's L^z does.

The budget is CPU time of the training process (``time.process_time``, one torch thread), not wall time: the
development machine is shared, and CPU time is what each model actually got. Evaluations along the curve are
not counted in it. Each model trains in its own process (``--jobs`` at once, or one ``--only`` per command).

Protocols (``--protocol``; ``--quick`` and ``--full`` are short for two of them):

- ``cpu`` (the committed ``results/draw_table.md``): T = 16 steps, the paper's layer sizes, 2 CPU-minutes per model.
- ``quick``: a smoke run (seconds; writes ``results/draw_table_quick.md``, never the committed table).
- ``full``: the paper's T = 64 for 6 hours, whole test set, k = 5000 (a GPU).
- ``t64-2h`` (issue 27, item 5; writes ``results/draw_t64.md``): the paper's sizes (T = 64, 256-unit LSTMs, 100-d
  z_t, read 2 x 2 / write 5 x 5 with attention), batch 100, Adam lr 1e-3, ``ELBO(analytic_kl=True)``, the 50,000
  images of the fixed binarisation, **2 CPU-hours of training per model** (process CPU time on one thread; the
  evaluations are not counted), DRAW without and with attention. Learning curve: the test bound on the first 1000
  test images (the same images and the same noise at every point) after every 5 CPU-minutes of training. At the end:
  the bound on all 10,000 test images (one sample each) and the importance-sampled NLL with k = 100 on the first
  1000. The table puts the curves beside the paper's final bounds and says how far they are from convergence (the
  slope of the bound over the last 30 CPU-minutes, in nats per CPU-hour, and the gap left to the paper's bound).
  A third model, ``draw-attention-clip``, is the attention model with the recipe of the public reimplementation
  jbornschein/draw (Adam lr 3e-4, the global gradient norm clipped to 10): the attention run at lr 1e-3 without
  clipping met gradient norms 100 times their median (33,387 against 350) that threw its bound from 135 back to 250.
  ``draw-attention-clip-lr1e-3``: that clipping at lr 1e-3. ``draw-attention-tile``: the same with the attention
  windows starting as the library now starts them, tiling the image (``attention_init="tile"``). Every other
  ``t64`` attention model starts them at ``"unit"``, as the library did when they ran: one-pixel filters a whole
  image apart, where the 2 x 2 read sees only the blank corners of every digit. The ``cpu``, ``quick`` and ``full``
  protocols start them at ``"tile"``.
- ``t64-quick``: the ``t64-2h`` code at tiny sizes (T = 2, 300 training images; seconds); its table goes into the
  work folder.

The ``t64`` protocols are checkpointed and resumable. Each model trains in its own run folder,
``WORK/PROTOCOL/MODEL`` (``pyrovae.train.Trainer`` with ``run_dir``), in segments of 5 CPU-minutes: each segment is
one ``fit`` that a callback stops when the budget reaches the next curve point, and the checkpoint
``checkpoints/last.pt`` is written at its end and again after its curve point (the Trainer also writes one at every
epoch end, and SIGTERM/SIGINT write one at the next step). An epoch takes 10 (attention) to 12 (no attention)
CPU-minutes at T = 64, so a kill loses at most one segment. The budget used and the curve points so far are part of
every checkpoint (its ``config["progress"]``, updated after each step), so they always agree with the weights;
``MODEL/progress.json`` is a readable copy. Running the same command again with ``--resume`` continues each model
from its last checkpoint with the budget and curve it had (a point lost to a kill during its evaluation is
recomputed: the evaluation draws its noise from its own seed, so it is the same number). A finished model is kept as
``WORK/PROTOCOL/MODEL.json`` and skipped; the table is written when every model has finished. Without ``--resume``
a work folder that holds runs is refused.

Measured (``--protocol t64-2h --time-steps 10``, 2026-12-07, one torch thread on the shared 2-core Intel Xeon
development VM while other jobs ran, load average 5-6): DRAW without attention 1.45 CPU-s per step (median of
10; 1.17-1.62; 2.2 s wall), with attention 1.22 CPU-s (1.10-1.41; 1.85 s wall). The warm-up (Pyro's validated
first step, then recording and checking the captured step) costs 34 and 72 CPU-s, paid out of the budget at every
process start (so again at each resume). Two CPU-hours are thus about 4,960 steps = 9.9 epochs without attention
and 5,860 steps = 11.7 epochs with attention (500 steps of 100 images per epoch). Under that load one CPU-hour took
about 1.5 hours of wall time: expect 3 to 5 hours of wall time per model (the two in parallel), plus the
evaluations (25 curve points of 1000 images, then 10,000 images, and k = 100 on 1000 images: minutes).

Usage::

    # the committed CPU run: 16 steps, the paper's layer sizes, 2 CPU-minutes per model
    python benchmarks/draw_table.py
    # a smoke run (seconds; writes results/draw_table_quick.md, never the committed table)
    python benchmarks/draw_table.py --quick
    # the paper's settings, for a GPU
    python benchmarks/draw_table.py --full --device cuda
    # T = 64 for 2 CPU-hours per model: two processes, one thread each, in the background (data from
    # $PYROVAE_DATA or --data-dir); run the same two commands again to continue after a kill or a reboot; the
    # last to finish writes results/draw_t64.md
    mkdir -p runs/draw_table
    nohup env OMP_NUM_THREADS=1 python benchmarks/draw_table.py --protocol t64-2h --only draw --resume > runs/draw_table/t64-draw.log 2>&1 &
    nohup env OMP_NUM_THREADS=1 python benchmarks/draw_table.py --protocol t64-2h --only draw-attention --resume > runs/draw_table/t64-draw-attention.log 2>&1 &
    nohup env OMP_NUM_THREADS=1 python benchmarks/draw_table.py --protocol t64-2h --only draw-attention-clip --resume > runs/draw_table/t64-draw-attention-clip.log 2>&1 &
    nohup env OMP_NUM_THREADS=1 python benchmarks/draw_table.py --protocol t64-2h --only draw-attention-clip-lr1e-3 --resume > runs/draw_table/t64-draw-attention-clip-lr1e-3.log 2>&1 &
    nohup env OMP_NUM_THREADS=1 python benchmarks/draw_table.py --protocol t64-2h --only draw-attention-tile --resume > runs/draw_table/t64-draw-attention-tile.log 2>&1 &
    # time a few T = 64 steps of each model (no training run)
    OMP_NUM_THREADS=1 python benchmarks/draw_table.py --protocol t64-2h --time-steps 10
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pyro
import torch

from common import add_common_args, build, build_objective, command_line, fmt, hardware_info, load_average, log, now, paired_difference, resolve_device, start
from pyrovae.utils.files import atomic_write, file_lock
from pyrovae.utils.rng import get_rng_state, set_rng_state
from pyrovae.data import load_dataset
from pyrovae.evaluate import elbo_terms, log_likelihood
from pyrovae.train import Trainer, TrainingInterrupted
from pyrovae.train.callbacks import Callback
from pyrovae.train.checkpoint import load_checkpoint

PAPER = {"draw": 87.40, "draw-attention": 80.97, "draw-attention-clip": 80.97, "draw-attention-clip-lr1e-3": 80.97, "draw-attention-tile": 80.97, "vae": None}
MODELS = ("draw", "draw-attention", "vae")
#: models with a training recipe of their own (overriding the protocol's settings). ``draw-attention-clip``: the
#: recipe of a public reimplementation that trains T = 64 attention DRAW on binarized MNIST (jbornschein/draw, its
#: README's command and train-draw.py: Adam lr 3e-4 after clipping the global gradient norm to 10), after the t64-2h
#: attention run at lr 1e-3 without clipping met gradient norms 100x their median that threw its bound back.
#: ``draw-attention-clip-lr1e-3``: the same clipping at the protocol's lr 1e-3, after the lr 3e-4 run stayed at the
#: mean-image plateau (posterior collapse) that lr 1e-3 left after about 40 CPU-minutes. ``draw-attention-tile``:
#: that recipe with the windows starting as the library now starts them (tiling the image, ``attention_init="tile"``);
#: every other attention model here starts them at ``"unit"``, where the 2 x 2 read sees only MNIST's blank corners
RECIPES = {"draw-attention-clip": {"lr": 3e-4, "clip_norm": 10.0}, "draw-attention-clip-lr1e-3": {"clip_norm": 10.0},
           "draw-attention-tile": {"clip_norm": 10.0, "attention_init": "tile"}}
#: where each recipe comes from (the table states it)
RECIPE_SOURCES = {"draw-attention-clip": "the recipe of the public reimplementation jbornschein/draw: its README trains T = 64, read 2 x 2, "
                  "write 5 x 5 with lr 3e-4, and its train-draw.py clips the gradient norm to 10 before Adam",
                  "draw-attention-clip-lr1e-3": "that reimplementation's clipping at this protocol's lr 1e-3: the lr 3e-4 run never left "
                  "the mean-image plateau, which lr 1e-3 without clipping left after about 40 CPU-minutes",
                  "draw-attention-tile": "the library's start of the attention windows since 2026-12-07: the other attention models start "
                  "with one-pixel filters a whole image apart, so the 2 x 2 read sees only the blank corners of every MNIST digit and q starts "
                  "with nothing about x (pyrovae.nn.attention)"}
T64_MODELS = ("draw", "draw-attention", "draw-attention-clip", "draw-attention-clip-lr1e-3", "draw-attention-tile")
#: where the attention windows start when neither the protocol nor the recipe says: the library's start when the
#: t64 runs were made (their saved settings have no ``attention_init``), kept so that they stay reproducible
OLD_ATTENTION_INIT = "unit"

#: protocol -> settings; "cpu" is the committed run. ``curve_test``: test images of the curve's bound;
#: ``train_size``: first N training images (None: all); ``checkpointed``: trains in run folders and resumes.
PROTOCOLS = {
    "cpu": {"attention_init": "tile", "steps": 16, "hidden": 256, "z_dim": 100, "budget_s": 120.0, "curve_every_s": 20.0, "batch_size": 100, "lr": 1e-3,
            "curve_test": 500, "bound_test": 1000, "nll_test": 200, "eval_samples": 50, "train_size": None, "models": MODELS, "checkpointed": False},
    "quick": {"attention_init": "tile", "steps": 3, "hidden": 32, "z_dim": 10, "budget_s": 10.0, "curve_every_s": 5.0, "batch_size": 100, "lr": 1e-3,
              "curve_test": 100, "bound_test": 100, "nll_test": 50, "eval_samples": 10, "train_size": None, "models": MODELS, "checkpointed": False},
    "full": {"attention_init": "tile", "steps": 64, "hidden": 256, "z_dim": 100, "budget_s": 6 * 3600.0, "curve_every_s": 600.0, "batch_size": 100, "lr": 1e-3,
             "curve_test": 500, "bound_test": 10000, "nll_test": 10000, "eval_samples": 5000, "train_size": None, "models": MODELS, "checkpointed": False},
    "t64-2h": {"steps": 64, "hidden": 256, "z_dim": 100, "budget_s": 2 * 3600.0, "curve_every_s": 300.0, "batch_size": 100, "lr": 1e-3,
               "curve_test": 1000, "bound_test": 10000, "nll_test": 1000, "eval_samples": 100, "train_size": None,
               "models": T64_MODELS, "checkpointed": True},
    "t64-quick": {"steps": 2, "hidden": 16, "z_dim": 4, "budget_s": 3.0, "curve_every_s": 1.0, "batch_size": 50, "lr": 1e-3,
                  "curve_test": 50, "bound_test": 100, "nll_test": 20, "eval_samples": 5, "train_size": 300,
                  "models": T64_MODELS, "checkpointed": True},
}
RESULTS = Path(__file__).resolve().parent / "results"
#: the committed tables, each with the one protocol that may write it
COMMITTED = {"draw_table.md": "cpu", "draw_t64.md": "t64-2h"}
#: ``fit``'s epochs: the CPU budget ends training long before
MAX_EPOCHS = 100_000
#: how far back the convergence slope looks, in CPU seconds of training
SLOPE_WINDOW_S = 1800.0
#: the budget's clock: CPU time of this process (one torch thread), not wall time
CLOCK = time.process_time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--protocol", choices=list(PROTOCOLS), default=None, help="settings (see the module docstring); default cpu")
    g.add_argument("--quick", action="store_true", help="--protocol quick: a smoke run; writes results/draw_table_quick.md")
    g.add_argument("--full", action="store_true", help="--protocol full: the paper's 64 steps, whole test set, k = 5000 (a GPU)")
    add_common_args(p, threads=1, data="binarized-mnist")
    p.add_argument("--jobs", type=int, default=None, help="models trained at once, one process each (default: all of the protocol's)")
    p.add_argument("--work-dir", default="runs/draw_table", help="per-model results (and, for the t64 protocols, run folders), under PROTOCOL/")
    p.add_argument("--out", default=None, help="the table (default: results/draw_table*.md; t64-2h: results/draw_t64.md; t64-quick: in the work folder)")
    p.add_argument("--only", default=None, choices=list(dict.fromkeys(MODELS + T64_MODELS)), help="train and evaluate one model in this process and write its JSON; for a t64 "
                   "protocol, the table is written once every model of the protocol has finished")
    p.add_argument("--resume", action="store_true", help="(t64 protocols) keep finished models and continue interrupted ones from their last checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="N", help="(t64 protocols) stop each model after N curve segments "
                   "of this invocation, leaving its checkpoint; continue with --resume")
    p.add_argument("--time-steps", type=int, default=None, metavar="N", help="time N training steps of each model of the protocol "
                   "(after the warm-up that records the captured step), print CPU seconds per step and the epochs the budget gives; train nothing else")
    args = p.parse_args(argv)
    name = protocol_name(args)
    if (args.resume or args.stop_after is not None) and not PROTOCOLS[name]["checkpointed"]:
        p.error(f"--resume and --stop-after need a checkpointed protocol ({[n for n, s in PROTOCOLS.items() if s['checkpointed']]}); --protocol is {name}")
    if args.only is not None and args.only not in PROTOCOLS[name]["models"]:
        p.error(f"--only {args.only}: protocol {name} trains {list(PROTOCOLS[name]['models'])}")
    for key in ("jobs", "stop_after", "time_steps"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    if args.out is not None:
        out = Path(args.out).resolve()
        owner = COMMITTED.get(out.name) if out.parent == RESULTS else None
        if owner is not None and owner != name:
            p.error(f"--out {args.out} is the committed table of protocol {owner}; a {name} run never overwrites it: name another file")
    return args


def protocol_name(args) -> str:
    if getattr(args, "protocol", None):
        return args.protocol
    return "quick" if args.quick else "full" if args.full else "cpu"


def default_out(name: str, work: Path) -> Path:
    if name == "t64-2h":
        return RESULTS / "draw_t64.md"
    if name == "t64-quick":
        return work / "draw_t64.md"
    return RESULTS / f"draw_table{'' if name == 'cpu' else '_' + name}.md"


def config(name: str, s: dict) -> dict:
    """The registry's config of ``name``: the IWAE paper's one-layer VAE, or DRAW (its guide runs the model's decoder);
    the ELBO with the closed-form KL per step, the paper's L^z."""
    if name == "vae":
        cfg = {"model": "vae", "z_dims": [50]}
    else:
        cfg = {"model": "draw", "draw_steps": s["steps"], "draw_z": s["z_dim"], "lstm_size": s["hidden"], "attention": base_model(name) == "draw-attention"}
        if cfg["attention"]:
            cfg["attention_init"] = attention_init(s)
    return {**cfg, "objective": "elbo", "analytic_kl": True}


def attention_init(s: dict) -> str:
    """Where the settings ``s`` start the attention windows (:data:`OLD_ATTENTION_INIT` unless they say)."""
    return s.get("attention_init", OLD_ATTENTION_INIT)


def base_model(name: str) -> str:
    """The model that ``name`` trains (``draw``, ``draw-attention`` or ``vae``): a recipe's name extends its model's."""
    return "draw-attention" if name.startswith("draw-attention") else name


def model_settings(name: str, s: dict) -> dict:
    """The settings ``name`` trains with: the protocol's (without its list of models: a model's run does not depend on
    which others the protocol trains) and the model's own recipe (:data:`RECIPES`)."""
    return {**{k: v for k, v in s.items() if k != "models"}, **RECIPES.get(name, {})}


def plain(value):
    """``value`` as JSON gives it back (tuples as lists): what a checkpoint's config is compared in."""
    return json.loads(json.dumps(value))


# --------------------------------------------------------------------------------------- training in CPU segments


class Budget(Callback):
    """Counts the training time of ``fit`` (``clock``: process CPU time by default) into ``progress["train_cpu_s"]``
    after every step, and stops ``fit`` once it reaches ``until`` seconds. ``progress`` is the run's
    ``trainer.config["progress"]``, so that every checkpoint, whenever it is written, holds the budget its
    weights cost. Epoch-end checkpoints (written between an epoch's end and the next one's start) are not counted."""

    def __init__(self, progress: dict, until: float, clock: Callable[[], float] = CLOCK):
        self.progress, self.until, self.clock = progress, float(until), clock

    def _restart(self) -> None:
        self.t, self.wall = self.clock(), time.perf_counter()

    def on_train_begin(self, trainer):
        self._restart()

    def on_epoch_begin(self, trainer):
        self._restart()

    def on_step_end(self, trainer, batch, loss, norm):
        t, wall = self.clock(), time.perf_counter()
        self.progress["train_cpu_s"] += t - self.t
        self.progress["train_wall_s"] += wall - self.wall
        self.t, self.wall = t, wall
        self.progress["steps"] = trainer.cursor.step
        if self.progress["train_cpu_s"] >= self.until:
            trainer.stop_training = True


@contextlib.contextmanager
def own_noise(seed: int):
    """Draw from ``seed`` inside the block and put every random state back after it: evaluations see the same noise
    each time and leave the training stream (and so a resumed run) as it was."""
    saved = get_rng_state()
    pyro.set_rng_seed(seed)
    try:
        yield
    finally:
        set_rng_state(saved)


@contextlib.contextmanager
def evaluating(model, guide, seed: int):
    model.eval(), guide.eval()
    try:
        with own_noise(seed), torch.no_grad():
            yield
    finally:
        model.train(), guide.train()


def curve_targets(s: dict) -> list[float]:
    """The budgets (CPU seconds) of the curve's points: 0, every ``curve_every_s``, and the whole budget last."""
    n = math.ceil(s["budget_s"] / s["curve_every_s"] - 1e-9)
    return [min(s["budget_s"], k * s["curve_every_s"]) for k in range(n + 1)]


def run_model(
    name: str, s: dict, train: torch.Tensor, test: torch.Tensor, *, seed: int = 0, run_dir: Optional[Path] = None,
    resume: bool = False, stop_after: Optional[int] = None, clock: Optional[Callable[[], float]] = None, protocol: str = "",
) -> Optional[dict]:
    """Train ``name`` for ``s["budget_s"]`` seconds of ``clock``, the test bound on ``test[:curve_test]`` after every
    ``curve_every_s``; then the bound on ``test[:bound_test]`` and the importance-sampled NLL. Returns the result, or
    None when ``stop_after`` segments ended this call first.

    With ``run_dir`` the run is checkpointed there after each segment (and continued from its last checkpoint with
    ``resume``); ``TrainingInterrupted`` (SIGINT/SIGTERM) propagates after the Trainer's checkpoint. ``clock``: the
    budget's clock (default :data:`CLOCK`, process CPU time)."""
    clock = CLOCK if clock is None else clock
    device = train.device
    s = model_settings(name, s)  # the protocol's settings with the model's recipe
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    cfg = config(name, s)
    model, guide = build(cfg, train.shape[1:], device)
    base = {"benchmark": "draw_table", "protocol": protocol, "model": name, "settings": plain(s), "seed": seed}
    progress = {"train_cpu_s": 0.0, "train_wall_s": 0.0, "eval_wall_s": 0.0, "steps": 0, "invocations": 0, "curve": []}
    last = None if run_dir is None else run_dir / "checkpoints" / "last.pt"
    saved = load_checkpoint(last)["config"] if last is not None and last.is_file() else None
    if saved is not None:
        if not resume:
            raise SystemExit(f"{run_dir} holds a run of {name} ({saved['progress']['train_cpu_s']:.0f} CPU-s trained): pass --resume to continue it, "
                             "or choose another --work-dir")
        differ = {k: (saved.get(k), v) for k, v in plain(base).items() if saved.get(k) != v}
        if differ:
            raise SystemExit(f"{run_dir} holds a run with other settings ({differ}, as (saved, now)): move it away or choose another --work-dir")
        progress = saved["progress"]
    objective = build_objective(cfg)  # ELBO(analytic_kl=True), the paper's L^z
    trainer = Trainer(model, guide, objective, lr=s["lr"], clip_norm=s.get("clip_norm"), progress=False, run_dir=run_dir, config={**base, "progress": progress})
    if saved is not None:
        trainer.resume(last, train[: s["batch_size"]])
        log(f"[{name}] continuing from {last}: step {trainer.cursor.step}, {progress['train_cpu_s']:.0f} CPU-s of {s['budget_s']:.0f}, "
            f"{len(progress['curve'])} curve points")
    progress["invocations"] += 1
    curve, targets = progress["curve"], curve_targets(s)
    curve_x, batches = test[: s["curve_test"]], math.ceil(train.shape[0] / s["batch_size"])

    def epochs() -> float:
        return trainer.cursor.epoch + trainer.cursor.pos / batches

    def add_point() -> None:
        t0 = time.perf_counter()
        with evaluating(model, guide, seed + 1):
            bound = elbo_terms(model, guide, curve_x, batch_size=100)["elbo"]
        progress["eval_wall_s"] += time.perf_counter() - t0
        curve.append({"target_cpu_s": targets[len(curve)], "train_cpu_s": round(progress["train_cpu_s"], 1), "train_wall_s": round(progress["train_wall_s"], 1),
                      "steps": trainer.cursor.step, "epochs": round(epochs(), 3), "test_bound": bound})
        if run_dir is not None:
            if trainer.owns_run:  # the checkpoint of this step again, now with its curve point (none before the first step)
                trainer.save("last.pt")
            atomic_write(run_dir / "progress.json", lambda f: f.write(json.dumps(progress, indent=1).encode()))
        log(f"[{name}] {curve[-1]}")

    segments = 0
    while len(curve) < len(targets):
        target = targets[len(curve)]
        if progress["train_cpu_s"] >= target:  # the first point, each segment's end, or a point lost to a kill before its checkpoint
            add_point()
            continue
        if stop_after is not None and segments >= stop_after:
            log(f"[{name}] stopped after {segments} segment(s) (--stop-after): {progress['train_cpu_s']:.0f} CPU-s trained; continue with --resume")
            return None
        trainer.fit(train, MAX_EPOCHS, s["batch_size"], callbacks=[Budget(progress, target, clock)])
        if progress["train_cpu_s"] < target:
            raise RuntimeError(f"[{name}] fit ended at {progress['train_cpu_s']:.1f} CPU-s, before the budget's {target:.1f}")
        segments += 1

    t0 = time.perf_counter()
    with evaluating(model, guide, seed + 2):
        terms = elbo_terms(model, guide, test[: s["bound_test"]], batch_size=100)
        ll = log_likelihood(model, guide, test[: s["nll_test"]], num_samples=s["eval_samples"])
    nll = ll.summary(prefix="")
    return {
        "model": name,
        "protocol": protocol,
        "settings": s,
        "seed": seed,
        "train_cpu_s": round(progress["train_cpu_s"], 1),
        "train_wall_s": round(progress["train_wall_s"], 1),
        "curve_eval_wall_s": round(progress["eval_wall_s"], 1),
        "invocations": progress["invocations"],
        "steps": trainer.cursor.step,
        "epochs": epochs(),
        "history": [{k: r[k] for k in ("epoch", "step", "train_loss", "seconds") if k in r} for r in trainer.history],
        "test_bound": terms["elbo"],
        "test_recon": terms["recon"],
        "test_kl": terms["kl"],
        "nll": nll["nll"],
        "nll_stderr": nll["nll_stderr_over_data"],
        "nll_importance_stderr": nll["nll_importance_stderr"],
        "nll_per_image": (-ll.values).tolist(),
        "eval_wall_s": round(time.perf_counter() - t0, 1),
        "curve": curve,
        "capture": trainer.capture_report,
        "load_average": load_average(),
        "finished_at": now(),
    }


def time_steps(name: str, s: dict, train: torch.Tensor, n: int, seed: int = 0) -> dict:
    """CPU seconds per training step of ``name`` (median of ``n`` steps on different batches), after three warm-up steps
    (Pyro with validation, then the recording and the first check of the captured step), and the epochs the budget gives."""
    s = model_settings(name, s)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    cfg = config(name, s)
    model, guide = build(cfg, train.shape[1:], train.device)
    trainer = Trainer(model, guide, build_objective(cfg), lr=s["lr"], clip_norm=s.get("clip_norm"), progress=False)
    b = s["batch_size"]
    batch = lambda i: train[(i * b) % (train.shape[0] - b + 1):][:b]
    trainer.setup(batch(0))
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(3):
        trainer.step(batch(i))
    warm_cpu, warm_wall = time.process_time() - c0, time.perf_counter() - w0
    cpu, wall = [], []
    for i in range(n):
        c, w = time.process_time(), time.perf_counter()
        trainer.step(batch(3 + i))
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    per_step = statistics.median(cpu)
    steps = (s["budget_s"] - warm_cpu) / per_step + 3
    return {"model": name, "warmup_cpu_s": round(warm_cpu, 1), "warmup_wall_s": round(warm_wall, 1), "cpu_s_per_step": round(per_step, 3),
            "cpu_s_range": [round(min(cpu), 3), round(max(cpu), 3)], "wall_s_per_step": round(statistics.median(wall), 3),
            "steps_in_budget": int(steps), "epochs_in_budget": round(steps / math.ceil(train.shape[0] / b), 1), "load_average": load_average(),
            "capture": trainer.capture_report}


# --------------------------------------------------------------------------------------- the tables


def report(results: dict, args, wall: float) -> str:
    s = PROTOCOLS[protocol_name(args)]
    hw = hardware_info(resolve_device(args.device))
    lines = [
        "# DRAW on binarized MNIST (Gregor et al. 2015, Table 2)",
        "",
        f"- Command: `{command_line()}`",
        f"- Date: {now()}; wall time {wall / 60:.1f} min in all ({args.jobs} {'model' if args.jobs == 1 else 'models'} at once)",
        f"- Hardware: {hw['cpu']} ({hw['cpu_cores']} cores, shared with other jobs), device {hw['device']}; torch {hw['torch']}, pyro {hw['pyro']}",
        f"- Data: the fixed Larochelle binarisation, 50,000 training images; test bound on the first {s['bound_test']} test images "
        f"(one sample each), NLL on the first {s['nll_test']} with k = {s['eval_samples']} importance samples.",
        f"- Models: DRAW with T = {s['steps']} steps (paper: 64), {s['hidden']}-unit LSTMs, {s['z_dim']}-d z_t, read 2 x 2 / write 5 x 5 "
        f"with attention (the windows starting as `attention_init={attention_init(s)!r}`); the VAE is the IWAE paper's one-layer x-200-200-z50. ELBO with the closed-form KL (`ELBO(analytic_kl=True)`, the paper's L^z), Adam lr "
        f"{s['lr']}, batch {s['batch_size']}, captured training step (replay).",
        f"- Budget: {s['budget_s'] / 60:.1f} CPU-minutes of training per model on one torch thread (process CPU time; the "
        "test-bound evaluations along the curve are not counted).",
        "",
        "| model | steps (epochs) | test NLL bound (-ELBO) | paper NLL bound (64 steps) | NLL, importance sampled (k = %d) ± s.e. |" % s["eval_samples"],
        "|---|---:|---:|---:|---:|",
    ]
    for name in MODELS:
        r = results.get(name)
        if r is None:
            continue
        paper = "<= " + fmt(PAPER[name]) if PAPER[name] else "—"
        lines.append(f"| {name} | {r['steps']} ({r['epochs']:.2f}) | <= {-r['test_bound']:.2f} | {paper} | {r['nll']:.2f} ± {r['nll_stderr']:.2f} |")
    lines += ["", "Test ELBO (first %d test images) against training CPU time:" % s["curve_test"], ""]
    names = [n for n in MODELS if n in results]
    points = max(len(results[n]["curve"]) for n in names)
    lines.append("| CPU s | " + " | ".join(names) + " |")
    lines.append("|---:|" + "---:|" * len(names))
    for i in range(points):
        row = []
        t = None
        for n in names:
            c = results[n]["curve"]
            if i < len(c):
                row.append(f"{c[i]['test_bound']:.1f}")
                t = c[i]["train_cpu_s"] if t is None else t
            else:
                row.append("")
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    lines += paired_lines(results)
    for name in names:
        r = results[name]
        gap = "" if PAPER[name] is None else f"; bound {-r['test_bound'] - PAPER[name]:.1f} nats above the paper's bound {PAPER[name]}"
        lines.append(f"- {name}: {r['train_cpu_s']} CPU-s ({r['train_wall_s']} s wall) of training{gap}; evaluation {r['eval_wall_s']} s wall; {r['capture']}")
    return "\n".join(lines) + "\n"


def paired_lines(results: dict) -> list[str]:
    """Each attention model against DRAW without attention, paired over the same test images."""
    if "draw" not in results:
        return []
    lines = []
    for name in (n for n in results if base_model(n) == "draw-attention"):
        a, b = torch.tensor(results[name]["nll_per_image"]), torch.tensor(results["draw"]["nll_per_image"])
        d, se = paired_difference(b, a)
        lines += ["", f"Attention ({name}) against no attention at equal budget, paired over the same {a.numel()} test images: "
                  f"NLL(no attention) - NLL(attention) = {d:.2f} ± {se:.2f} nats ({d / se:.1f} standard errors)."]
    return lines


def recipe_lines(names) -> list[str]:
    """A bullet per model of ``names`` that trains with a recipe of its own (:data:`RECIPES`)."""
    phrase = {"lr": "Adam lr {:g}", "clip_norm": "the global gradient norm clipped to {:g} before each step",
              "attention_init": "its read and write windows starting as `attention_init={!r}`"}
    return [f"- Model `{n}`: the same model as `{base_model(n)}`, trained with "
            + ", ".join(phrase[k].format(v) for k, v in RECIPES[n].items()) + f" ({RECIPE_SOURCES[n]})." for n in names if n in RECIPES]


def slope(curve: list[dict], start_s: float, end_s: float) -> Optional[tuple[float, float, int]]:
    """Least-squares slope of the bound (-ELBO) against training CPU hours over the points with ``start_s <=
    train_cpu_s <= end_s``: (nats per CPU-hour, its standard error from the residuals, points); None with fewer than 3."""
    pts = [(p["train_cpu_s"] / 3600, -p["test_bound"]) for p in curve if start_s - 1e-6 <= p["target_cpu_s"] <= end_s + 1e-6]
    if len(pts) < 3:
        return None
    x, y = torch.tensor([p[0] for p in pts], dtype=torch.float64), torch.tensor([p[1] for p in pts], dtype=torch.float64)
    xc = x - x.mean()
    b = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    resid = y - y.mean() - b * xc
    se = math.sqrt(float((resid * resid).sum()) / (len(pts) - 2) / float((xc * xc).sum()))
    return b, se, len(pts)


def convergence(name: str, r: dict) -> str:
    """How far ``name``'s curve is from convergence: the bound's slope over the last ``SLOPE_WINDOW_S`` and the one
    before, the train loss of the last epochs, and the gap left to the paper's bound."""
    s, curve = r["settings"], r["curve"]
    end = curve[-1]["target_cpu_s"]
    window = min(SLOPE_WINDOW_S, end / 2)
    last, before = slope(curve, end - window, end), slope(curve, end - 2 * window, end - window)
    bound, paper = -r["test_bound"], PAPER[name]
    text = f"**{name}**: after {r['train_cpu_s'] / 60:.0f} CPU-minutes ({r['epochs']:.1f} epochs) the bound on all {s['bound_test']} test images is {bound:.2f}"
    if paper is not None:
        text += f", {bound - paper:.2f} nats above the paper's {paper:.2f}"
    text += ". "
    if last is None:
        return text + "Too few curve points for a slope."
    rate, se, n = last
    falling = -rate  # nats per hour by which the bound improves
    text += (f"Over the last {window / 60:.0f} CPU-minutes ({n} curve points) the bound fell by {falling:.1f} ± {se:.1f} nats per CPU-hour" if falling > 0 else
             f"Over the last {window / 60:.0f} CPU-minutes ({n} curve points) the bound did not fall ({-falling:+.1f} ± {se:.1f} nats per CPU-hour)")
    if before is not None:
        text += f" (the {window / 60:.0f} minutes before: {-before[0]:.1f} ± {before[1]:.1f})"
    text += ". "
    if paper is not None and falling > 2 * se and bound > paper:
        text += (f"At that rate the paper's bound is {(bound - paper) / falling:.1f} more CPU-hours away; the rate itself is falling, so this is a "
                 "lower bound on the time, and nothing says the curve reaches the paper's value at all. ")
    elif paper is not None and bound > paper:
        text += "The curve has flattened within its noise while still above the paper's bound. "
    losses = [h["train_loss"] for h in r.get("history", [])]
    if len(losses) >= 2:
        text += f"Training loss (-ELBO, mean over each epoch) of the last epochs: {', '.join(f'{v:.2f}' for v in losses[-4:])}."
    return text.strip()


def report_t64(results: dict, name: str, args, commands: list[str]) -> str:
    """The table of a t64 protocol: protocol, budget used, epochs, the curves beside the paper's final bounds, and
    how far from convergence."""
    s = PROTOCOLS[name]
    names = [n for n in s["models"] if n in results]
    hw = hardware_info(resolve_device(args.device))
    invocations = ", ".join(f"{n} {results[n]['invocations']}" for n in names)
    lines = [
        f"# DRAW, T = {s['steps']}, {s['budget_s'] / 3600:.3g} CPU-hours per model (Gregor et al. 2015, Table 2, binarized MNIST)",
        "",
        "Written by `benchmarks/draw_table.py --protocol %s` (issue 27, item 5)." % name,
        "",
        f"- Protocol `{name}`: DRAW with T = {s['steps']} steps, {s['hidden']}-unit LSTMs, {s['z_dim']}-d z_t, without attention and with "
        f"attention (read 2 x 2, write 5 x 5; the windows start at `attention_init={attention_init(s)!r}`, one-pixel filters a whole image apart, "
        f"unless a model's recipe says otherwise); ELBO with the closed-form KL per step (`ELBO(analytic_kl=True)`, the paper's L^z); Adam lr {s['lr']:g}, "
        f"batch {s['batch_size']}; the fixed Larochelle binarisation, {'all 50,000' if s['train_size'] is None else 'the first %d' % s['train_size']} training images, "
        "a new permutation every epoch.",
        *recipe_lines(names),
        f"- Budget: {s['budget_s'] / 60:.4g} CPU-minutes of training per model: process CPU time (`time.process_time`) of a process with one "
        "torch thread, counted over the training steps only (curve evaluations and checkpoints are not counted). The machine is shared "
        "with other jobs, so wall time is longer than CPU time.",
        f"- Curve: the test bound (-ELBO, one sample per image) on the first {s['curve_test']} test images after every "
        f"{s['curve_every_s'] / 60:.4g} CPU-minutes of training, the same images and the same noise at every point. Final: the bound on "
        + ("all 10,000 test images" if s["bound_test"] >= 10000 else f"the first {s['bound_test']} test images (the paper's numbers are on all 10,000)")
        + f", one sample each, and the importance-sampled NLL with k = {s['eval_samples']} on the first {s['nll_test']}.",
        "- Runs: checkpointed every curve segment and resumed with `--resume`; invocations per model: " + invocations + ".",
        "- Commands: " + "; ".join(f"`{c}`" for c in commands),
        f"- Table written {now()}; hardware: {hw['cpu']} ({hw['cpu_cores']} cores, shared), device {hw['device']}; torch {hw['torch']}, pyro {hw['pyro']}.",
        "",
        f"| model | budget used | wall time of training | steps | epochs | test NLL bound (-ELBO) | paper NLL bound (T = 64) | gap to the paper | "
        f"NLL, importance sampled (k = {s['eval_samples']}, {s['nll_test']} images) ± s.e. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        r = results[n]
        paper = PAPER[n]
        lines.append(f"| {n} | {r['train_cpu_s'] / 60:.1f} CPU-min | {r['train_wall_s'] / 60:.1f} min | {r['steps']} | {r['epochs']:.2f} | "
                     f"<= {-r['test_bound']:.2f} | <= {fmt(paper)} | {-r['test_bound'] - paper:+.2f} | {r['nll']:.2f} ± {r['nll_stderr']:.2f} |")
    lines += [
        "",
        f"Learning curves: the test bound (-ELBO, nats) on the first {s['curve_test']} test images against training CPU-minutes, epochs in "
        "parentheses; the last row is the paper's final bound.",
        "",
        "| CPU-min | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for i in range(max(len(results[n]["curve"]) for n in names)):
        cells, target = [], None
        for n in names:
            c = results[n]["curve"]
            if i < len(c):
                cells.append(f"{-c[i]['test_bound']:.2f} ({c[i]['epochs']:.2f})")
                target = c[i]["target_cpu_s"]
            else:
                cells.append("")
        lines.append(f"| {target / 60:.4g} | " + " | ".join(cells) + " |")
    lines.append("| paper, final | " + " | ".join(fmt(PAPER[n]) for n in names) + " |")
    lines += ["", "## How far from convergence", ""]
    lines += [f"- {convergence(n, results[n])}" for n in names]
    lines += [
        "",
        "The slope is a least-squares line through the curve points of the window (± its standard error from the residuals); "
        "the curve's points share their images and noise, so their differences are much more precise than the bound's standard error.",
    ]
    lines += paired_lines(results)
    lines += ["", "## Runs", ""]
    for n in names:
        r = results[n]
        lines.append(f"- {n}: curve evaluations {r['curve_eval_wall_s']:.0f} s wall, final evaluation {r['eval_wall_s']:.0f} s wall; load average at the end "
                     f"{r['load_average']}; finished {r['finished_at']}; {r['capture']}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- processes


def without_option(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value (``--jobs 3`` or ``--jobs=3``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def load_data(args, s: dict, device: torch.device):
    data = load_dataset("binarized-mnist", data_dir=args.data_dir, device=device)
    train = data.train if s["train_size"] is None else data.train[: s["train_size"]]
    return train, data.test


def finished(work: Path, name: str, s: dict) -> Optional[dict]:
    """The result of ``name`` in ``work`` when it finished with settings ``s``."""
    path = work / f"{name}.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    return r if plain(model_settings(name, r.get("settings") or {})) == plain(model_settings(name, s)) else None


def train_one(name: str, pname: str, args, work: Path) -> int:
    """One model in this process: its JSON, or an exit code (130: interrupted with a checkpoint, 0: --stop-after)."""
    s = PROTOCOLS[pname]
    path = work / f"{name}.json"
    if s["checkpointed"] and path.is_file():
        if not args.resume:
            raise SystemExit(f"{path} holds a finished run of {name}: pass --resume to keep it, or choose another --work-dir")
        if finished(work, name, s) is None:
            raise SystemExit(f"{path} was run with other settings than protocol {pname}: move it away or choose another --work-dir")
        log(f"[{name}] already finished in {work} (--resume); skipped")
        return 0
    if s["checkpointed"]:
        note_command(work)
        log(f"[{name}] process {os.getpid()}: `kill -TERM {os.getpid()}` checkpoints at the next step and stops; the same command continues")
    device = start(args)
    train, test = load_data(args, s, device)
    try:
        result = run_model(name, s, train, test, seed=args.seed, run_dir=work / name if s["checkpointed"] else None,
                           resume=args.resume, stop_after=args.stop_after, protocol=pname)
    except TrainingInterrupted as e:
        log(f"[{name}] {e}")
        return 130
    if result is None:
        return 0
    atomic_write(path, lambda f: f.write(json.dumps(result).encode()))
    log(f"[{name}] finished: bound {-result['test_bound']:.2f} after {result['train_cpu_s'] / 60:.1f} CPU-min ({result['epochs']:.2f} epochs); wrote {path}")
    return 0


def write_t64_table(pname: str, args, work: Path) -> Optional[Path]:
    """The t64 table, once every model of the protocol has a result in ``work`` (under a lock: two ``--only``
    processes may finish together)."""
    s = PROTOCOLS[pname]
    with file_lock(work / ".table.lock"):
        results = {n: r for n in s["models"] if (r := finished(work, n, s)) is not None}
        missing = [n for n in s["models"] if n not in results]
        if missing:
            log(f"table not written yet: {missing} not finished in {work}")
            return None
        commands_path = work / "commands.json"
        commands = json.loads(commands_path.read_text()) if commands_path.is_file() else [command_line()]
        out = Path(args.out) if args.out else default_out(pname, work)
        text = report_t64(results, pname, args, commands)
        atomic_write(out, lambda f: f.write(text.encode()))
    log(f"wrote {out}")
    return out


def note_command(work: Path) -> None:
    """Keep the command lines that trained a t64 run (the table lists them; they differ by --only)."""
    with file_lock(work / ".table.lock"):
        path = work / "commands.json"
        commands = json.loads(path.read_text()) if path.is_file() else []
        line = command_line()
        if line not in commands:
            commands.append(line)
            atomic_write(path, lambda f: f.write(json.dumps(commands, indent=1).encode()))


def main(argv=None) -> int:
    args = parse_args(argv)
    pname = protocol_name(args)
    s = PROTOCOLS[pname]
    args.jobs = args.jobs or len(s["models"])
    work = Path(args.work_dir) / pname
    work.mkdir(parents=True, exist_ok=True)
    if args.time_steps:
        device = start(args)
        train, _ = load_data(args, s, device)
        for name in [args.only] if args.only else s["models"]:
            print(json.dumps({"protocol": pname, **time_steps(name, s, train, args.time_steps, args.seed)}), flush=True)
        return 0
    if args.only:
        code = train_one(args.only, pname, args, work)
        if code == 0 and s["checkpointed"]:
            write_t64_table(pname, args, work)
        return code
    if s["checkpointed"] and not args.resume:
        held = [n for n in s["models"] if (work / f"{n}.json").is_file() or (work / n / "checkpoints" / "last.pt").is_file()]
        if held:
            raise SystemExit(f"{work} already holds runs of {held}: pass --resume to continue them, or choose another --work-dir")
    t0 = time.perf_counter()
    pending = list(s["models"])
    running: list[tuple[str, subprocess.Popen]] = []
    passthrough = without_option(list(sys.argv[1:] if argv is None else argv), "--jobs")
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            cmd = [sys.executable, __file__, *passthrough, "--only", name]
            running.append((name, subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})))
        time.sleep(1.0)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                if item[1].returncode != 0:
                    failed.append(item[0])
    if failed:
        print(f"draw_table: {failed} failed or were interrupted; no table written" + (" (continue with --resume)" if s["checkpointed"] else ""), file=sys.stderr)
        return 1
    if s["checkpointed"]:
        write_t64_table(pname, args, work)
        return 0
    results = {n: json.loads((work / f"{n}.json").read_text()) for n in s["models"]}
    text = report(results, args, time.perf_counter() - t0)
    out = Path(args.out) if args.out else default_out(pname, work)
    atomic_write(out, lambda f: f.write(text.encode()))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
