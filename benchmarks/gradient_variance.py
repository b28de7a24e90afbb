"""KSW15's Table 1 experiment: the variance of minibatch gradient estimates for a network with a factorised
Gaussian weight posterior, by estimator, after 10 and 100 epochs of training (Kingma, Salimans & Welling 2015,
"Variational dropout and the local reparameterization trick", section 5.1).

Part 1, the paper's setting: an MNIST classifier 784-H-...-H-10 (ReLU) whose weights have the variational-dropout
posterior w = theta (1 + sqrt(alpha) eps) (independent weight noise), trained with the local reparameterisation
(:class:`pyrovae.nn.VariationalDropoutLinear`, variant B) and the dropout KL. At each checkpoint the gradient of
the minibatch's mean log-likelihood with respect to the top and bottom layers' theta is drawn ``--reps`` times (a
fresh minibatch and fresh noise each time) with:

- local reparameterisation (= variational dropout B's own estimator): pre-activations drawn per example;
- separate weight samples: one weight matrix per example (same variance in theory, B times the cost; drawn in
  chunks of examples so that the noise of a 1024-unit network fits in memory);
- one weight sample per minibatch (shared by all examples);
- variational dropout A: the same theta and alpha as noise on each layer's input units, per example (only with
  one alpha per layer or per unit: with one per weight it is not defined, and the row is left out);
- no noise: theta itself (only the minibatch's sampling variance, the floor).

Reported: the per-coordinate variance across draws, averaged over the layer's weights, and the same times N^2
(N training images): the variance of the gradient of the whole-data estimate N/M sum_i log p(y_i | x_i, w),
the paper's units.

Part 2, a VAE with a Bayesian decoder (:class:`pyrovae.models.bayesian.BayesVAE`, the full-Bayes AEVB) trained
with the ELBO under :func:`pyrovae.nn.poutine.local_reparameterization`; the same variance for the gradient with
respect to the posterior means of the decoder's top and bottom weights, with and without the handler. It is not
in the paper and keeps its small setting under every protocol.

Protocols (``--protocol``; an option given on the command line overrides its preset):

- ``reduced`` (the default): 5,000 training images, 784-100-100-10, batch 100, one alpha per layer starting at
  0.5, Molchanov's KL, 200 draws per estimator. About 12 min on one busy core.
- ``quick`` (``--quick``): a smoke run of a minute; writes no results file unless ``--out`` names one, and never
  the committed table.
- ``paper``: section 5.1 as far as it could be established here (below): all 60,000 MNIST training images;
  784-1024-1024-1024-10 ReLU, every layer variational dropout B with one alpha per weight, starting at the dropout
  rates of section 5 (p = 0.2 on the input, 0.5 on the hidden units: alpha = p / (1 - p) = 0.25, and 0.95 for
  1, as the layer keeps alpha below 1 as the paper does), the paper's cubic KL approximation (its eq. 10); Adam
  (lr 1e-3), minibatches of 1000 for training and for the variance; the variance over 60 minibatches (N / M, the
  paper's "full training set" in batches of M = 1000, here drawn at random: a finite-population difference of
  1 - (M - 1) / (N - 1) = 1.7%) at epochs 10 and 100. Part 2 as in ``reduced``.

The paper's network, and how sure this is. The text of section 5.1 could not be read here (the stored copy of the
paper gives only its opening). The replication github.com/gngdb/variational-dropout (fetched; notebook
``notebooks/Comparing Empirical Variance.ipynb``, 2015-10-09, whose table is beside the paper's in its slides)
states "the architecture used in the paper": four dense layers including the output layer, rectified linear
units, 1024 hidden units in each, one alpha per weight for independent weight noise, the MNIST validation set
merged into the training set (60,000 images), Adam lr 1e-3; it trains and measures with batch 200 and measures the
variance of N times the minibatch gradient over one pass through the training set (which is why the paper's
values are of order 1e2 to 1e4). Recalled from the paper, and not verified here: section 5 uses Srivastava et
al.'s (2014) architecture, a fully connected network with 3 hidden layers of ReLUs (their three-layer MNIST
networks have 1024 units), with p = 0.5 / 0.2 dropout; section 5.1 trains it for 10 epochs (test error 3%) or 100 epochs
(1.3%) and compares the full-training-set gradient with estimates "per batch of M = 1000 training examples".
The batch used for training is not given: 1000 is taken for both (it is the one batch size the section names,
and a test error of 3% after only 10 epochs suggests large batches); the replication's 200 is
``--batch-size 200 --var-batch-size 200``. Not reproduced: the paper's temporal averaging of the parameters
and its weight initialisation (PyTorch's default here).

Checkpoints and resuming. With ``--work-dir`` each part's state (weights, optimiser, epoch, RNG state, the
variances measured so far and the running sums of the estimator being measured) is written atomically to
``part1.pt`` / ``part2.pt`` there after every epoch, after every estimator and at most ``--checkpoint-minutes``
apart while one is measured, so a run killed by SIGTERM or SIGKILL loses at most one epoch (or a few minutes of
measuring). ``--resume`` continues from them, bit for bit what an uninterrupted run gives (same seed, one
thread); a checkpoint made with other settings is refused, and so is one met without ``--resume``.
``--stop-after-epochs N`` stops after N epochs of training in this invocation (for the tests, or to split a run).
The ``reduced`` and ``paper`` protocols write ``benchmarks/results/gradient_variance.md`` when they finish (a
finished paper run replaces the reduced table); ``--quick`` never writes it.

Time of the paper protocol, from a timed run at its sizes (``--protocol paper --epochs 1 --reps 2``) on
2026-12-07, on a 2-core Intel Xeon VM busy with four other training runs (load average 5.6 to 5.8), one torch
thread: one epoch of training (60 steps of 1000 images) 49 s; one gradient draw of 1000 images: local
reparameterisation 0.43 s, separate weight samples 62 s (11 examples' weight matrices at a time), single weight
sample 0.14 s, no noise 0.13 s: 63 s per draw of all four, 63 min per checkpoint of 60 draws. Total: 100 x 49 s
of training (82 min) + 2 x 63 min of measuring + part 2 (a few minutes) = about 3.5 hours on one busy core; less
on an idle one. Checkpoints take 70 MB (part1.pt).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/gradient_variance.py            # ~12 min on one (busy) CPU core
    OMP_NUM_THREADS=1 python benchmarks/gradient_variance.py --quick    # a minute; writes nothing unless --out
    # the paper's protocol, about 3.5 hours on one busy core; the same command continues it after an interruption
    mkdir -p runs && OMP_NUM_THREADS=1 nohup python benchmarks/gradient_variance.py --protocol paper --threads 1 \\
        --work-dir runs/gradient_variance_paper --resume > runs/gradient_variance_paper.log 2>&1 &
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pyro
import pyro.util
import torch
from torch import nn

from common import add_common_args, command_line, fill_defaults, hardware_info, load_average, log, now, require_positive, settings, start
from pyrovae.utils.files import atomic_write
from pyrovae.data import load_dataset
from pyrovae.guides.bayesian import BayesEncoder
from pyrovae.models.bayesian import BayesVAE
from pyrovae.nn import VariationalDropoutLinear, dropout_kl
from pyrovae.objectives import ELBO
from pyrovae.nn.poutine import local_reparameterization

ESTIMATORS = ("local reparameterization", "separate weight samples", "single weight sample", "variational dropout A", "no noise")
VAE_ESTIMATORS = ("local reparameterization", "single weight sample")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gradient_variance.md"
#: floats of weight noise drawn at once by "separate weight samples" (sets the chunk of examples; 128 MB)
SEPARATE_NOISE_FLOATS = 2**25

#: option -> value of each protocol; an option given on the command line wins
PROTOCOLS = {
    "reduced": {"train_size": 5000, "hidden": "100,100", "epochs": "10,100", "batch_size": 100, "reps": 200, "alpha": "0.5",
                "alpha_shape": "layer", "kl": "molchanov", "vae_epochs": "2,10", "vae_reps": 100},
    "quick": {"train_size": 2000, "hidden": "100,100", "epochs": "2,5", "batch_size": 100, "reps": 50, "alpha": "0.5",
              "alpha_shape": "layer", "kl": "molchanov", "vae_epochs": "1,2", "vae_reps": 50},
    "paper": {"train_size": 60000, "hidden": "1024,1024,1024", "epochs": "10,100", "batch_size": 1000, "var_batch_size": 1000,
              "reps": 60, "alpha": "0.25,0.95", "alpha_shape": "weight", "kl": "ksw15", "vae_epochs": "2,10", "vae_reps": 100},
}
#: settings that change each part's numbers: a checkpoint is continued only where these agree
PART1_KEYS = ("train_size", "hidden", "epochs", "batch_size", "var_batch_size", "reps", "alpha", "alpha_shape", "kl", "lr", "seed")
PART2_KEYS = ("vae_train_size", "vae_hidden", "vae_epochs", "vae_batch_size", "vae_reps", "vae_init_scale", "lr", "seed")

#: KSW15 Table 1: estimator -> (top 10 epochs, top 100 epochs, bottom 10 epochs, bottom 100 epochs), read from the
#: image of the table in a replication's slides (PAPER_SOURCE); the paper's "no dropout noise (minimal var.)" row is
#: our "no noise". The table has no dropout A row.
PAPER_TABLE1 = {
    "local reparameterization": (7.8e3, 1.2e3, 1.9e2, 1.1e2),
    "separate weight samples": (1.4e4, 2.6e3, 4.3e2, 2.5e2),
    "single weight sample": (4.9e4, 4.3e3, 8.5e2, 3.3e2),
    "no noise": (2.8e3, 5.9e1, 1.3e2, 9.0e0),
}
PAPER_SOURCE = (
    "the image of the table in `presentation/images/table1.png` of github.com/gngdb/variational-dropout (commit "
    "82d56ff, 2015-10-11: the slides of a replication, which show the paper's table beside their own, so the arXiv "
    "preprint of that date; the values were read off that image, as the paper's text was not available offline)"
)
PAPER_NETWORK = (
    "784-1024-1024-1024-10 ReLU with one alpha per weight, all 60,000 training images: stated as the paper's by the "
    "replication github.com/gngdb/variational-dropout (`notebooks/Comparing Empirical Variance.ipynb`) and consistent "
    "with the paper's \"same architecture as Srivastava et al. (2014)\" (3 hidden layers of ReLUs), which could not be "
    "checked against the paper's text here; batch M = 1000 as recalled from section 5.1 (\"per batch of M = 1000 "
    "training examples\"), unverified; the replication used 200"
)


class StopRun(Exception):
    """``--stop-after-epochs`` reached: the checkpoint in ``--work-dir`` holds the run."""


def paper_section(ours: dict, epochs: tuple, n: Optional[int] = None) -> list[str]:
    """The paper's Table 1 beside ours, as variances relative to the local reparameterisation at the same epoch
    and layer (the absolute values depend on the network, the data and the loss's scale), and, given the number of
    training images ``n``, ours in the paper's units (times n^2). ``ours``: estimator -> (top at each epoch...,
    bottom at each epoch...)."""
    if tuple(epochs) != (10, 100):
        return [f"**Paper (KSW15 Table 1)**: measured at 10 and 100 epochs; this run used {list(epochs)}, so it is not set beside them. Source: {PAPER_SOURCE}."]
    ref_p, ref_o = PAPER_TABLE1["local reparameterization"], ours["local reparameterization"]
    cols = ("top 10", "top 100", "bottom 10", "bottom 100")
    lines = [
        f"**Paper (KSW15 Table 1)**, from {PAPER_SOURCE}. The paper's variances (its network, all of MNIST, its loss "
        "scale) and, for both, each estimator's variance divided by the local reparameterisation's at the same layer "
        "and epoch:",
        "",
        "| estimator | " + " | ".join(f"paper, {c} ep" for c in cols) + " | " + " | ".join(f"paper / LR, {c}" for c in cols)
        + " | " + " | ".join(f"ours / LR, {c}" for c in cols) + " |",
        "|---|" + "---:|" * 12,
    ]
    for how, paper in PAPER_TABLE1.items():
        mine = ours.get(how)
        ratios = " | ".join(f"{v / r:.2f}" for v, r in zip(mine, ref_o)) if mine else " | ".join("—" for _ in cols)
        lines.append(
            f"| {how} | " + " | ".join(f"{v:.2g}" for v in paper) + " | " + " | ".join(f"{v / r:.2f}" for v, r in zip(paper, ref_p))
            + f" | {ratios} |"
        )
    if n is not None:
        lines += [
            "",
            f"Ours in the paper's units, the variance of the gradient of the whole-data estimate (N/M) sum_i log p (N = {n}): "
            "ours times N^2, beside the paper's (comparable as values only at the paper's protocol):",
            "",
            "| estimator | " + " | ".join(f"ours x N², {c} ep | paper, {c} ep" for c in cols) + " |",
            "|---|" + "---:|" * 8,
        ]
        for how, paper in PAPER_TABLE1.items():
            mine = ours.get(how)
            cells = [f"{v * n * n:.2g}" if mine else "—" for v in (mine or paper)]
            lines.append(f"| {how} | " + " | ".join(f"{c} | {p:.2g}" for c, p in zip(cells, paper)) + " |")
    lines += [
        "",
        "Variational dropout A (noise on the input units, our extra row) is not in the paper's Table 1.",
    ]
    return lines


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=list(PROTOCOLS), default=None, help="preset of the options below (default reduced; see the module docstring)")
    p.add_argument("--quick", action="store_true", help="--protocol quick: a minute-long smoke run (2 and 5 epochs, small data); writes only with --out")
    p.add_argument("--epochs", default=None, help="checkpoints in epochs, comma-separated (reduced and paper: 10,100)")
    p.add_argument("--train-size", type=int, default=None, help="training images of part 1 (reduced 5000, paper 60000)")
    p.add_argument("--hidden", default=None, help="hidden layer widths of part 1, comma-separated (reduced 100,100; paper 1024,1024,1024)")
    p.add_argument("--batch-size", type=int, default=None, help="training minibatch of part 1 (reduced 100, paper 1000)")
    p.add_argument("--var-batch-size", type=int, default=None, help="minibatch of each gradient draw (default: --batch-size)")
    p.add_argument("--reps", type=int, default=None, help="gradient draws per estimator (reduced 200, paper 60)")
    p.add_argument("--alpha", default=None, help="initial dropout rate alpha: one value, or one per weight layer from the bottom (a short list repeats its last); reduced 0.5, paper 0.25,0.95")
    p.add_argument("--alpha-shape", choices=("layer", "unit", "weight"), default=None, help="one alpha per layer, per input unit or per weight (reduced layer, paper weight)")
    p.add_argument("--kl", choices=("molchanov", "ksw15"), default=None, help="approximation of the dropout KL (reduced molchanov, paper ksw15)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (both parts)")
    p.add_argument("--vae-train-size", type=int, default=1000, help="training images of part 2")
    p.add_argument("--vae-hidden", type=int, default=100, help="decoder hidden units of part 2")
    p.add_argument("--vae-batch-size", type=int, default=100, help="minibatch of part 2")
    p.add_argument("--vae-epochs", default=None, help="checkpoints of part 2 in epochs (default 2,10)")
    p.add_argument("--vae-init-scale", type=float, default=0.05, help="initial posterior standard deviation of the decoder weights")
    p.add_argument("--vae-reps", type=int, default=None, help="gradient draws per estimator in part 2 (default 100)")
    add_common_args(p, device=None, threads=1)
    p.add_argument("--out", default=None, help=f"results file (default {DEFAULT_OUT.name} in benchmarks/results; --quick writes none unless given)")
    p.add_argument("--work-dir", default=None, help="folder of the checkpoints part1.pt and part2.pt, written after every epoch (default: none kept)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work-dir (made with the same settings); without them, start")
    p.add_argument("--stop-after-epochs", type=int, default=None, help="stop after this many epochs of training in this invocation (needs --work-dir; continue with --resume)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="while measuring, save the running sums at least this often (with --work-dir)")
    args = p.parse_args(argv)
    if args.quick and args.protocol not in (None, "quick"):
        p.error(f"--quick is --protocol quick; it cannot be combined with --protocol {args.protocol}")
    args.protocol = "quick" if args.quick else (args.protocol or "reduced")
    args.quick = args.protocol == "quick"
    fill_defaults(args, PROTOCOLS[args.protocol])
    if args.var_batch_size is None:
        args.var_batch_size = args.batch_size
    try:
        args.epochs, args.vae_epochs, args.hidden = _ints(args.epochs), _ints(args.vae_epochs), _ints(args.hidden)
        args.alpha = [float(a) for a in str(args.alpha).split(",")]
    except ValueError as e:
        p.error(f"--epochs, --vae-epochs and --hidden take comma-separated integers, --alpha comma-separated numbers: {e}")
    for key in ("epochs", "vae_epochs"):
        e = getattr(args, key)
        if e != sorted(set(e)) or e[0] < 1:
            p.error(f"--{key.replace('_', '-')} must be increasing positive epochs, got {','.join(map(str, e))}")
    if min(args.hidden) < 1 or not all(0 < a < 1 for a in args.alpha):
        p.error(f"--hidden must be positive widths and --alpha in (0, 1), got {args.hidden} and {args.alpha}")
    require_positive(p, args, ("train_size", "batch_size", "var_batch_size", "reps", "vae_train_size", "vae_hidden", "vae_batch_size",
                               "vae_reps", "stop_after_epochs"))
    if args.reps < 2 or args.vae_reps < 2:
        p.error(f"--reps and --vae-reps must be at least 2 (a variance), got {args.reps} and {args.vae_reps}")
    if args.batch_size > args.train_size or args.vae_batch_size > args.vae_train_size:
        p.error(f"a minibatch cannot exceed its training set: --batch-size {args.batch_size} of --train-size {args.train_size}, "
                f"--vae-batch-size {args.vae_batch_size} of --vae-train-size {args.vae_train_size}")
    if args.stop_after_epochs is not None and args.work_dir is None:
        p.error("--stop-after-epochs needs --work-dir (the run is continued from its checkpoint there)")
    if args.quick and args.out is not None and Path(args.out).resolve() == DEFAULT_OUT:
        p.error(f"--out {args.out} is the committed table, which a --quick run may not overwrite: name another file")
    return args


def alphas_per_layer(alpha: list[float], layers: int) -> list[float]:
    """``alpha`` (bottom first) stretched to ``layers`` values by repeating its last."""
    return [alpha[min(i, len(alpha) - 1)] for i in range(layers)]


# --- checkpoints ------------------------------------------------------------------------------------------
class Checkpoint:
    """One part's resumable state in ``path`` (None: kept in memory only), written atomically."""

    def __init__(self, path: Optional[Path], wanted: dict, resume: bool):
        self.path, self.wanted, self.state, self.last_save = path, wanted, None, time.monotonic()
        if path is None or not path.is_file():
            return
        if not resume:
            raise SystemExit(f"{path} holds a checkpoint: pass --resume to continue it, or choose another --work-dir (or remove it)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("settings") != wanted:
            saved = state.get("settings") or {}
            diff = ", ".join(f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in wanted.items() if saved.get(k) != v)
            raise SystemExit(f"{path} was made with other settings ({diff}): run with the same settings, or choose another --work-dir")
        self.state = state

    def save(self, state: dict) -> None:
        state["rng"] = pyro.util.get_rng_state()
        self.last_save = time.monotonic()
        if self.path is not None:
            atomic_write(self.path, lambda f: torch.save(state, f))


def run_part(label: str, ckpt: Checkpoint, args, *, weights: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
             train_epoch: Callable[[], float], draws: dict[str, Callable[[], list[torch.Tensor]]], reps: int, targets: list[int],
             extras: Callable[[], dict], budget: list) -> dict:
    """Train to each epoch of ``targets`` with ``train_epoch`` and measure each of ``draws`` there ``reps`` times,
    saving ``ckpt`` after every epoch and estimator (and every ``--checkpoint-minutes`` while measuring);
    continue from the state ``ckpt`` was loaded with. ``weights``: the tensors the optimiser trains (restored in
    place). ``extras()``: what else is recorded at a checkpoint, once its estimators are measured. ``budget``: a
    one-element list, epochs still allowed in this invocation (None: no limit)."""
    if ckpt.state is None:
        state = {"settings": ckpt.wanted, "epoch": 0, "results": {}, "partial": None, "train_seconds": 0.0, "measure_seconds": 0.0,
                 "seconds": {}, "train_loss": [], "invocations": 1}
    else:
        state = ckpt.state
        with torch.no_grad():
            for k, v in weights.items():
                v.copy_(state["weights"][k])
        opt.load_state_dict(state["opt"])
        pyro.util.set_rng_state(state["rng"])
        state["invocations"] += 1
        log(f"{label}: continuing from {ckpt.path} at epoch {state['epoch']}" + (f", {state['partial']['how']} at draw {state['partial']['done']}" if state["partial"] else ""))

    def save() -> None:
        state["weights"] = {k: v.detach().clone() for k, v in weights.items()}
        state["opt"] = opt.state_dict()
        ckpt.save(state)

    def save_if_due() -> None:
        if time.monotonic() - ckpt.last_save > 60 * args.checkpoint_minutes:
            save()

    while True:
        epoch = state["epoch"]
        if epoch in targets and not state["results"].get(epoch, {}).get("complete"):
            res = state["results"].setdefault(epoch, {"variances": {}, "measure_seconds": {}})
            for how, draw in draws.items():
                if how in res["variances"]:
                    continue
                t0 = time.perf_counter()
                res["variances"][how] = measure(draw, reps, state, how, save_if_due)
                res["measure_seconds"][how] = res["measure_seconds"].get(how, 0.0) + time.perf_counter() - t0
                state["measure_seconds"] += time.perf_counter() - t0
                log(f"{label}, epoch {epoch}, {how}: top {res['variances'][how][0]:.3g} bottom {res['variances'][how][1]:.3g} "
                    f"({res['measure_seconds'][how]:.0f} s, {res['measure_seconds'][how] / reps:.2f} s per draw)")
                save()
            res.update(extras())
            res["complete"] = True
            save()
        if epoch >= targets[-1]:
            return state
        t0 = time.perf_counter()
        loss = train_epoch()
        seconds = time.perf_counter() - t0
        state["epoch"] += 1
        state["train_seconds"] += seconds
        state["train_loss"].append(loss)
        if state["epoch"] in targets:
            state["seconds"][state["epoch"]] = state["train_seconds"]
        log(f"{label} epoch {state['epoch']}/{targets[-1]}: train loss {loss:.4f}, {seconds:.1f} s (load {load_average()})")
        save()
        if budget[0] is not None:
            budget[0] -= 1
            if budget[0] <= 0:
                raise StopRun(f"stopped after epoch {state['epoch']} of {label} (--stop-after-epochs); continue with the same command and --resume")


def measure(draw: Callable[[], list[torch.Tensor]], reps: int, state: dict, how: str, save_if_due: Callable[[], None]) -> list[float]:
    """Mean over each tensor's coordinates of the variance across ``reps`` calls of ``draw()``: Welford's running
    sums in float64, kept in ``state['partial']`` (``save_if_due()`` after each draw) so that a checkpoint can hold
    a half-done measurement."""
    part = state["partial"] if state["partial"] and state["partial"]["how"] == how else {"how": how, "done": 0, "mean": None, "m2": None}
    state["partial"] = part
    while part["done"] < reps:
        grads = [g.detach().reshape(-1).double() for g in draw()]
        part["done"] += 1
        if part["mean"] is None:
            part["mean"], part["m2"] = [torch.zeros_like(g) for g in grads], [torch.zeros_like(g) for g in grads]
        for g, mean, m2 in zip(grads, part["mean"], part["m2"]):
            delta = g - mean
            mean += delta / part["done"]
            m2 += delta * (g - mean)
        if part["done"] < reps:
            save_if_due()
    state["partial"] = None
    return [float((m2 / (reps - 1)).mean()) for m2 in part["m2"]]


# --- part 1: classifier ----------------------------------------------------------------------------------
def make_net(sizes, alphas: list[float], alpha_shape: str = "layer", kl: str = "molchanov") -> nn.ModuleList:
    return nn.ModuleList(
        VariationalDropoutLinear(i, o, variant="B", alpha_shape=alpha_shape, init_alpha=a, approx=kl)
        for (i, o), a in zip(zip(sizes[:-1], sizes[1:]), alphas_per_layer(alphas, len(sizes) - 1))
    )


def _layer(layer: VariationalDropoutLinear, h: torch.Tensor, how: str) -> torch.Tensor:
    w, b = layer.linear.weight, layer.linear.bias
    alpha = layer.clipped_log_alpha().exp().detach()  # only theta's gradient is measured: keeps no noise for alpha's
    if how == "local reparameterization":
        return layer(h)  # variant B: the local reparameterisation
    if how == "separate weight samples":
        ws = w * (1 + alpha.sqrt() * torch.randn(h.shape[0], *w.shape))
        return (h.unsqueeze(-2) @ ws.transpose(-1, -2)).squeeze(-2) + b
    if how == "single weight sample":
        return nn.functional.linear(h, w * (1 + alpha.sqrt() * torch.randn_like(w)), b)
    if how == "variational dropout A":
        return nn.functional.linear(h * (1 + alpha.sqrt() * torch.randn_like(h)), w, b)
    if how == "no noise":
        return nn.functional.linear(h, w, b)
    raise ValueError(how)


def forward(net: nn.ModuleList, x: torch.Tensor, how: str) -> torch.Tensor:
    h = x
    for i, layer in enumerate(net):
        h = _layer(layer, h, how)
        if i < len(net) - 1:
            h = torch.relu(h)
    return h


def estimators(alpha_shape: str) -> tuple[str, ...]:
    """The estimators defined for the posterior: dropout A needs one alpha per layer or per input unit."""
    return tuple(h for h in ESTIMATORS if not (h == "variational dropout A" and alpha_shape == "weight"))


def separate_chunk(sizes, batch_size: int) -> int:
    """Examples whose weight samples are drawn at once by "separate weight samples"."""
    per_example = sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))
    return max(1, min(batch_size, SEPARATE_NOISE_FLOATS // per_example))


def minibatch_gradient(net: nn.ModuleList, x, y, idx: torch.Tensor, how: str, params: list[torch.Tensor], chunk: int) -> list[torch.Tensor]:
    """d/d params of the mean cross-entropy of the minibatch ``idx`` under estimator ``how``, summed over chunks
    of ``chunk`` examples (one chunk but for separate weight samples)."""
    if how != "separate weight samples" or chunk >= len(idx):
        return list(torch.autograd.grad(nn.functional.cross_entropy(forward(net, x[idx], how), y[idx]), params))
    total = None
    for s in range(0, len(idx), chunk):
        part = idx[s : s + chunk]
        loss = nn.functional.cross_entropy(forward(net, x[part], how), y[part]) * (len(part) / len(idx))
        grads = torch.autograd.grad(loss, params)
        total = list(grads) if total is None else [t + g for t, g in zip(total, grads)]
    return total


def train_epochs(opt: torch.optim.Optimizer, loss_of: Callable[[torch.Tensor], torch.Tensor], n: int, batch_size: int, epochs: int) -> float:
    """``epochs`` epochs of minibatch steps on ``loss_of(indices)``: a fresh permutation of the ``n`` data points
    each epoch, whole batches only. Returns the mean loss of the steps."""
    total, steps = 0.0, 0
    for _ in range(epochs):
        perm = torch.randperm(n)
        for s in range(0, n - batch_size + 1, batch_size):
            loss = loss_of(perm[s : s + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
    return total / max(1, steps)


def part1(args, x, y, x_test=None, y_test=None, work: Optional[Path] = None, budget: Optional[list] = None) -> dict:
    ckpt = Checkpoint(work / "part1.pt" if work else None, settings(args, PART1_KEYS), args.resume)
    torch.manual_seed(args.seed)
    n = x.shape[0]
    sizes = [784, *args.hidden, 10]
    net = make_net(sizes, args.alpha, args.alpha_shape, args.kl)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    params = [net[-1].linear.weight, net[0].linear.weight]
    chunk = separate_chunk(sizes, args.var_batch_size)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(forward(net, x[idx], "local reparameterization"), y[idx]) + dropout_kl(net) / n

    def draw(how: str) -> Callable[[], list[torch.Tensor]]:
        return lambda: minibatch_gradient(net, x, y, torch.randint(0, n, (args.var_batch_size,)), how, params, chunk)

    def extras() -> dict:
        with torch.no_grad():
            out = {"train_acc": float((forward(net, x[:2000], "no noise").argmax(-1) == y[:2000]).float().mean()),
                   "alphas": [float(layer.clipped_log_alpha().exp().mean()) for layer in net]}
            if x_test is not None:
                out["test_error"] = float((forward(net, x_test, "no noise").argmax(-1) != y_test).float().mean())
        return out

    state = run_part("part 1", ckpt, args, weights=dict(net.state_dict(keep_vars=True)), opt=opt,
                     train_epoch=lambda: train_epochs(opt, loss_of, n, args.batch_size, 1),
                     draws={how: draw(how) for how in estimators(args.alpha_shape)}, reps=args.reps, targets=args.epochs,
                     extras=extras, budget=budget if budget is not None else [None])
    state["separate_chunk"] = chunk
    return state


# --- part 2: VAE with a Bayesian decoder -------------------------------------------------------------------
def part2(args, x, work: Optional[Path] = None, budget: Optional[list] = None) -> dict:
    ckpt = Checkpoint(work / "part2.pt" if work else None, settings(args, PART2_KEYS), args.resume)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    n, bs = x.shape[0], args.vae_batch_size
    model = BayesVAE((1, 28, 28), 20, (args.vae_hidden,), bayesian_decoder=True, num_data=n)
    guide = BayesEncoder((1, 28, 28), 20, (args.vae_hidden,), model=model, num_data=n, init_scale=args.vae_init_scale)
    elbo = ELBO()
    with local_reparameterization():
        elbo.loss(model, guide, x[:bs])  # registers the parameters
    params = dict(pyro.get_param_store().named_parameters())
    opt = torch.optim.Adam(params.values(), lr=args.lr)
    top = "encoder$$$weights.locs.decoder__2__weight"
    bottom = "encoder$$$weights.locs.decoder__0__weight"

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        xb = torch.bernoulli(x[idx])
        with local_reparameterization():
            return elbo.differentiable_loss(model, guide, xb) / bs

    def draw(how: str) -> Callable[[], list[torch.Tensor]]:
        def grads() -> list[torch.Tensor]:
            xb = torch.bernoulli(x[torch.randint(0, n, (bs,))])
            if how == "local reparameterization":
                with local_reparameterization():
                    loss = elbo.differentiable_loss(model, guide, xb) / bs
            else:
                loss = elbo.differentiable_loss(model, guide, xb) / bs
            return list(torch.autograd.grad(loss, [params[top], params[bottom]]))
        return grads

    def extras() -> dict:
        with torch.no_grad():
            valid = -float(elbo.loss(model, guide, torch.bernoulli(x[:1000]))) / min(n, 1000)
            scales = {k: float(nn.functional.softplus(params[k.replace("locs", "rhos")]).mean()) for k in (top, bottom)}
        return {"train_elbo": valid, "scale_top": scales[top], "scale_bottom": scales[bottom]}

    return run_part("part 2", ckpt, args, weights=params, opt=opt, train_epoch=lambda: train_epochs(opt, loss_of, n, bs, 1),
                    draws={how: draw(how) for how in VAE_ESTIMATORS}, reps=args.vae_reps, targets=args.vae_epochs,
                    extras=extras, budget=budget if budget is not None else [None])


# --- report -----------------------------------------------------------------------------------------------
def render(args, p1, p2, hw, started, wall) -> str:
    e, e2 = args.epochs, args.vae_epochs
    sizes = "-".join(map(str, [784, *args.hidden, 10]))
    alphas = ", ".join(f"{a:g}" for a in alphas_per_layer(args.alpha, len(args.hidden) + 1))
    setting = (
        f"{args.train_size} MNIST training images, a {sizes} ReLU network (one alpha per {args.alpha_shape}, initial alphas "
        f"{alphas} from the bottom, {args.kl} KL), {', '.join(map(str, e))} epochs of Adam (lr {args.lr:g}, batch "
        f"{args.batch_size})"
    )
    if args.protocol == "paper":
        head = (
            f"> **The paper's protocol, as far as it could be established** ({PAPER_NETWORK}): {setting}; each variance "
            f"over {args.reps} minibatches of {args.var_batch_size}. Not reproduced: the paper's temporal averaging of the "
            "parameters and its initialisation. Absolute variances here are of the minibatch's *mean* log-likelihood; "
            "the paper's units (times N^2) are set beside the paper's values below."
        )
    else:
        head = (
            f"> **A CPU budget far below the paper's.** {setting}; the paper trains a larger network on all of MNIST "
            f"({PAPER_NETWORK}; `--protocol paper`). Absolute variances depend on the network, the data and the loss's "
            "scale (here the minibatch's *mean* log-likelihood), so compare the estimators' ordering and ratios, not the "
            "values, with the paper."
        )
    lines = [
        "# Gradient variance by estimator (KSW15 Table 1)",
        "",
        "Kingma, Salimans & Welling (2015), *Variational dropout and the local reparameterization trick*, Table 1, "
        "and the same comparison for a VAE with a Bayesian decoder. Written by `benchmarks/gradient_variance.py`.",
        "",
        head,
        "",
        f"- command: `{command_line()}`",
        f"- date: {started}; wall time of this invocation {wall / 60:.1f} min; part 1 trained {p1['train_seconds'] / 60:.1f} min and "
        f"measured {p1['measure_seconds'] / 60:.1f} min over {p1['invocations']} invocation(s) (continued from checkpoints "
        f"{p1['invocations'] - 1} time(s)); load average {load_average()} at the end",
        f"- hardware: {hw['cpu']}, {hw['cpu_cores']} cores (torch threads {hw['torch_threads']}), no GPU; "
        f"torch {hw['torch']}, pyro {hw['pyro']}, Python {hw['python']}",
        f"- variance: per-coordinate variance over {args.reps} draws (fresh minibatch of {args.var_batch_size} and fresh noise each), "
        "averaged over the layer's weights; top = last layer, bottom = first layer"
        + (f"; separate weight samples drawn {p1['separate_chunk']} examples at a time" if p1["separate_chunk"] < args.var_batch_size else ""),
        "",
        "## Part 1: classifier with a variational-dropout (independent weight noise) posterior",
        "",
        "| estimator | " + " | ".join(f"top, {k} ep" for k in e) + " | " + " | ".join(f"bottom, {k} ep" for k in e) + " | top / local rep. (last) | bottom / local rep. (last) |",
        "|---|" + "---:|" * (2 * len(e) + 2),
    ]
    r = p1["results"]
    last = e[-1]
    lr_top, lr_bot = r[last]["variances"][ESTIMATORS[0]]
    hows = estimators(args.alpha_shape)
    for how in hows:
        tops = [f"{r[k]['variances'][how][0]:.3g}" for k in e]
        bots = [f"{r[k]['variances'][how][1]:.3g}" for k in e]
        t, b = r[last]["variances"][how]
        lines.append(f"| {how} | " + " | ".join(tops) + " | " + " | ".join(bots) + f" | {t / lr_top:.2f} | {b / lr_bot:.2f} |")
    if "variational dropout A" not in hows:
        lines.append("| variational dropout A | " + " | ".join("—" for _ in range(2 * len(e) + 2)) + " |")
    test = ("; test error (noise-free theta, 10,000 test images): " + ", ".join(f"epoch {k}: {100 * r[k]['test_error']:.2f}%" for k in e)
            + (" (the paper, recalled and unverified: 3% at 10 epochs, 1.3% at 100)" if args.protocol == "paper" else "")) if "test_error" in r[last] else ""
    lines += [
        "",
        "Training accuracy (noise-free theta, first 2000 training images) and mean learned alphas (bottom to top): "
        + "; ".join(f"epoch {k}: {r[k]['train_acc']:.3f}, alpha " + ", ".join(f"{a:.3g}" for a in r[k]["alphas"]) for k in e)
        + test + ". Training time to each checkpoint: " + ", ".join(f"{p1['seconds'][k]:.0f} s" for k in e) + ".",
        "",
        *paper_section({how: tuple(r[k]["variances"][how][0] for k in e) + tuple(r[k]["variances"][how][1] for k in e) for how in hows}, tuple(e), args.train_size),
        "",
        "## Part 2: VAE with a Bayesian decoder (full-Bayes AEVB)",
        "",
        f"`BayesVAE` (z 20, decoder 20-{args.vae_hidden}-784 with N(0, 1) priors on every weight, `BayesEncoder` with a mean-field "
        f"Normal weight posterior), ELBO with one sample, trained under `local_reparameterization()` on {args.vae_train_size} "
        f"dynamically binarised MNIST images ({', '.join(map(str, e2))} epochs, batch {args.vae_batch_size}, {args.vae_reps} draws per estimator: the Pyro step costs more); the gradient is that of the minibatch ELBO per datum with respect to the "
        "posterior means of the decoder's top (`decoder.2.weight`) and bottom (`decoder.0.weight`) weights. Separate "
        "weight samples per example are not measured here (the weight sites would have to move into the data plate).",
        "",
        "| estimator | " + " | ".join(f"top, {k} ep" for k in e2) + " | " + " | ".join(f"bottom, {k} ep" for k in e2) + " |",
        "|---|" + "---:|" * (2 * len(e2)),
    ]
    r2 = p2["results"]
    for how in VAE_ESTIMATORS:
        lines.append(f"| {how} | " + " | ".join(f"{r2[k]['variances'][how][0]:.3g}" for k in e2) + " | "
                     + " | ".join(f"{r2[k]['variances'][how][1]:.3g}" for k in e2) + " |")
    lines += [
        "",
        "ELBO per datum (weights' KL term weighted batch/N, as in training) on 1000 training images: "
        + ", ".join(f"epoch {k}: {r2[k]['train_elbo']:.1f}" for k in e2)
        + f". Mean posterior standard deviation of the top / bottom weights (initial {args.vae_init_scale}): "
        + ", ".join(f"epoch {k}: {r2[k]['scale_top']:.3g} / {r2[k]['scale_bottom']:.3g}" for k in e2)
        + ". Training time to each checkpoint: " + ", ".join(f"{p2['seconds'][k]:.0f} s" for k in e2) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    start(args)
    started, t0 = now(), time.perf_counter()
    work = Path(args.work_dir) if args.work_dir else None
    if work is None and args.protocol == "paper":
        log("no --work-dir: nothing is checkpointed, and an interrupted run starts again from the beginning")
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        for stale in work.glob(".part*.pt.*.tmp"):  # left by a process killed while writing
            stale.unlink()
    log(f"protocol {args.protocol}: part 1 {settings(args, PART1_KEYS)}; part 2 {settings(args, PART2_KEYS)}; "
        f"checkpoints {work or 'not kept'}; threads {torch.get_num_threads()}")
    data = load_dataset("mnist", data_dir=args.data_dir, binarize="none", valid_size=0)
    x = data.train.reshape(-1, 784)[: args.train_size]
    y = data.train_labels[: args.train_size]
    if x.shape[0] < args.train_size:
        raise SystemExit(f"--train-size {args.train_size}: MNIST has {x.shape[0]} training images")
    budget = [args.stop_after_epochs]
    try:
        p1 = part1(args, x, y, data.test.reshape(-1, 784), data.test_labels, work, budget)
        p2 = part2(args, data.train[: args.vae_train_size], work, budget)
    except StopRun as e:
        log(str(e))
        return 0
    hw = hardware_info(torch.device("cpu"))
    text = render(args, p1, p2, hw, started, time.perf_counter() - t0)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is None:
        print(text)
        print("(--quick: nothing written; pass --out FILE to keep it)")
        return 0
    atomic_write(Path(out), lambda f: f.write(text.encode()))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
