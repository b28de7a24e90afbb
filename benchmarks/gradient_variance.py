"""KSW15's Table 1 experiment: the variance of minibatch gradient estimates for a network with a factorised
Gaussian weight posterior, by estimator, after 10 and 100 epochs of training (Kingma, Salimans & Welling 2015,
"Variational dropout and the local reparameterization trick", section 5.1).

Part 1, the paper's setting (smaller): an MNIST classifier 784-H-H-10 (ReLU) whose weights have the
variational-dropout posterior w = theta (1 + sqrt(alpha) eps) (independent weight noise, one alpha per layer),
trained with the local reparameterisation (:class:`pyrovae.nn.VariationalDropoutLinear`, variant B) and
Molchanov et al.'s KL. At each checkpoint the gradient of the minibatch's mean log-likelihood with respect to
the top and bottom layers' theta is drawn ``--reps`` times (a fresh minibatch and fresh noise each time) with:

- local reparameterisation (= variational dropout B's own estimator): pre-activations drawn per example;
- separate weight samples: one weight matrix per example (same variance in theory, B times the cost);
- one weight sample per minibatch (shared by all examples);
- variational dropout A: the same theta and alpha as noise on each layer's input units, per example;
- no noise: theta itself (only the minibatch's sampling variance, the floor).

Reported: the per-coordinate variance across draws, averaged over the layer's weights.

Part 2, a VAE with a Bayesian decoder (:class:`pyrovae.models.bayesian.BayesVAE`, the full-Bayes AEVB) trained
with the ELBO under :func:`pyrovae.nn.poutine.local_reparameterization`; the same variance for the gradient with
respect to the posterior means of the decoder's top and bottom weights, with and without the handler.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/gradient_variance.py            # ~12 min on one (busy) CPU core
    OMP_NUM_THREADS=1 python benchmarks/gradient_variance.py --quick    # a minute; writes nothing unless --out
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable

import pyro
import torch
from torch import nn

from common import add_common_args, command_line, hardware_info, now, start
from pyrovae.utils.files import atomic_write
from pyrovae.data import load_dataset
from pyrovae.guides.bayesian import BayesEncoder
from pyrovae.models.bayesian import BayesVAE
from pyrovae.nn import VariationalDropoutLinear, dropout_kl
from pyrovae.objectives import ELBO
from pyrovae.nn.poutine import local_reparameterization

ESTIMATORS = ("local reparameterization", "separate weight samples", "single weight sample", "variational dropout A", "no noise")
DEFAULT_OUT = Path(__file__).parent / "results" / "gradient_variance.md"

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


def paper_section(ours: dict, epochs: tuple) -> list[str]:
    """The paper's Table 1 beside ours, as variances relative to the local reparameterisation at the same epoch
    and layer (the absolute values depend on the network, the data and the loss's scale). ``ours``: estimator ->
    (top at each epoch..., bottom at each epoch...)."""
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
    lines += [
        "",
        "Variational dropout A (noise on the input units, our extra row) is not in the paper's Table 1.",
    ]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a minute-long smoke run (2 and 5 epochs, small data); writes only with --out")
    p.add_argument("--epochs", default=None, help="checkpoints in epochs, comma-separated (default 10,100)")
    p.add_argument("--train-size", type=int, default=None, help="training images of part 1 (default 5000)")
    p.add_argument("--vae-train-size", type=int, default=None, help="training images of part 2 (default 1000)")
    p.add_argument("--vae-epochs", default=None, help="checkpoints of part 2 in epochs (default 2,10)")
    p.add_argument("--vae-init-scale", type=float, default=0.05, help="initial posterior standard deviation of the decoder weights")
    p.add_argument("--vae-reps", type=int, default=None, help="gradient draws per estimator in part 2 (default 100)")
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--reps", type=int, default=None, help="gradient draws per estimator (default 200)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.5, help="initial dropout rate alpha")
    add_common_args(p, device=None, threads=1)
    p.add_argument("--out", default=None, help=f"results file (default {DEFAULT_OUT}; --quick writes none unless given)")
    args = p.parse_args(argv)
    q = args.quick
    args.epochs = [int(e) for e in (args.epochs or ("2,5" if q else "10,100")).split(",")]
    args.train_size = args.train_size or (2000 if q else 5000)
    args.vae_train_size = args.vae_train_size or 1000
    args.vae_epochs = [int(e) for e in (args.vae_epochs or ("1,2" if q else "2,10")).split(",")]
    args.vae_reps = args.vae_reps or (50 if q else 100)
    args.reps = args.reps or (50 if q else 200)
    return args


# --- part 1: classifier ----------------------------------------------------------------------------------
def make_net(sizes, alpha: float) -> nn.ModuleList:
    return nn.ModuleList(VariationalDropoutLinear(i, o, variant="B", alpha_shape="layer", init_alpha=alpha) for i, o in zip(sizes[:-1], sizes[1:]))


def _layer(layer: VariationalDropoutLinear, h: torch.Tensor, how: str) -> torch.Tensor:
    w, b = layer.linear.weight, layer.linear.bias
    alpha = layer.clipped_log_alpha().exp()
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


def gradient_variance(loss_fn, params: list[torch.Tensor], reps: int) -> list[float]:
    """Mean over each parameter's coordinates of the variance, across ``reps`` draws, of d loss / d param."""
    draws = [[] for _ in params]
    for _ in range(reps):
        grads = torch.autograd.grad(loss_fn(), params)
        for d, g in zip(draws, grads):
            d.append(g.detach().reshape(-1))
    return [float(torch.stack(d).var(0).mean()) for d in draws]


def train_epochs(opt: torch.optim.Optimizer, loss_of: Callable[[torch.Tensor], torch.Tensor], n: int, batch_size: int, epochs: int) -> None:
    """``epochs`` epochs of minibatch steps on ``loss_of(indices)``: a fresh permutation of the ``n`` data points
    each epoch, whole batches only."""
    for _ in range(epochs):
        perm = torch.randperm(n)
        for s in range(0, n - batch_size + 1, batch_size):
            loss = loss_of(perm[s : s + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()


def part1(args, x, y) -> dict:
    torch.manual_seed(args.seed)
    n = x.shape[0]
    net = make_net([784, args.hidden, args.hidden, 10], args.alpha)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    results, times, epoch = {}, {}, 0
    t0 = time.perf_counter()
    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(forward(net, x[idx], "local reparameterization"), y[idx]) + dropout_kl(net) / n

    for target in args.epochs:
        train_epochs(opt, loss_of, n, args.batch_size, target - epoch)
        epoch = max(epoch, target)
        times[target] = time.perf_counter() - t0
        params = [net[-1].linear.weight, net[0].linear.weight]
        with torch.no_grad():
            acc = float((forward(net, x[:2000], "no noise").argmax(-1) == y[:2000]).float().mean())
        row = {}
        for how in ESTIMATORS:
            def loss_fn(how=how):
                idx = torch.randint(0, n, (args.batch_size,))
                return nn.functional.cross_entropy(forward(net, x[idx], how), y[idx])
            row[how] = gradient_variance(loss_fn, params, args.reps)
        alphas = [float(layer.clipped_log_alpha().exp()) for layer in net]
        results[target] = {"variances": row, "train_acc": acc, "alphas": alphas}
        print(f"part 1, epoch {target}: " + "; ".join(f"{k}: top {v[0]:.3g} bottom {v[1]:.3g}" for k, v in row.items()), flush=True)
    return {"results": results, "seconds": times}


# --- part 2: VAE with a Bayesian decoder -------------------------------------------------------------------
def part2(args, x) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    n = x.shape[0]
    model = BayesVAE((1, 28, 28), 20, (args.hidden,), bayesian_decoder=True, num_data=n)
    guide = BayesEncoder((1, 28, 28), 20, (args.hidden,), model=model, num_data=n, init_scale=args.vae_init_scale)
    elbo = ELBO()
    with local_reparameterization():
        elbo.loss(model, guide, x[: args.batch_size])  # registers the parameters
    params = dict(pyro.get_param_store().named_parameters())
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    top = "encoder$$$weights.locs.decoder__2__weight"
    bottom = "encoder$$$weights.locs.decoder__0__weight"
    results, times, epoch = {}, {}, 0
    t0 = time.perf_counter()
    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        xb = torch.bernoulli(x[idx])
        with local_reparameterization():
            return elbo.differentiable_loss(model, guide, xb) / args.batch_size

    for target in args.vae_epochs:
        train_epochs(opt, loss_of, n, args.batch_size, target - epoch)
        epoch = max(epoch, target)
        times[target] = time.perf_counter() - t0
        row = {}
        for how in ("local reparameterization", "single weight sample"):
            def loss_fn(how=how):
                xb = torch.bernoulli(x[torch.randint(0, n, (args.batch_size,))])
                if how == "local reparameterization":
                    with local_reparameterization():
                        return elbo.differentiable_loss(model, guide, xb) / args.batch_size
                return elbo.differentiable_loss(model, guide, xb) / args.batch_size
            row[how] = gradient_variance(loss_fn, [params[top], params[bottom]], args.vae_reps)
        with torch.no_grad():
            valid = -float(elbo.loss(model, guide, torch.bernoulli(x[:1000]))) / 1000
        scales = {k: float(nn.functional.softplus(params[k.replace("locs", "rhos")]).mean()) for k in (top, bottom)}
        results[target] = {"variances": row, "train_elbo": valid, "scale_top": scales[top], "scale_bottom": scales[bottom]}
        print(f"part 2, epoch {target}: " + "; ".join(f"{k}: top {v[0]:.3g} bottom {v[1]:.3g}" for k, v in row.items()), flush=True)
    return {"results": results, "seconds": times}


# --- report -----------------------------------------------------------------------------------------------
def render(args, p1, p2, hw, started, wall) -> str:
    e, e2 = args.epochs, args.vae_epochs
    lines = [
        "# Gradient variance by estimator (KSW15 Table 1)",
        "",
        "Kingma, Salimans & Welling (2015), *Variational dropout and the local reparameterization trick*, Table 1, "
        "and the same comparison for a VAE with a Bayesian decoder. Written by `benchmarks/gradient_variance.py`.",
        "",
        f"> **A CPU budget far below the paper's.** {args.train_size} MNIST training images, a 784-{args.hidden}-{args.hidden}-10 "
        f"ReLU network, {', '.join(map(str, e))} epochs of Adam (lr 1e-3, batch {args.batch_size}); the paper trains a "
        "larger network on all of MNIST. Absolute variances depend on the network, the data and the loss's scale (here "
        "the minibatch's *mean* log-likelihood), so compare the estimators' ordering and ratios, not the values, with the paper.",
        "",
        f"- command: `{command_line()}`",
        f"- date: {started}; wall time {wall / 60:.1f} min",
        f"- hardware: {hw['cpu']}, {hw['cpu_cores']} cores (torch threads {hw['torch_threads']}), no GPU; "
        f"torch {hw['torch']}, pyro {hw['pyro']}, Python {hw['python']}",
        f"- variance: per-coordinate variance over {args.reps} draws (fresh minibatch of {args.batch_size} and fresh noise each), "
        "averaged over the layer's weights; top = last layer, bottom = first layer",
        "",
        "## Part 1: classifier with a variational-dropout (independent weight noise) posterior",
        "",
        "| estimator | " + " | ".join(f"top, {k} ep" for k in e) + " | " + " | ".join(f"bottom, {k} ep" for k in e) + " | top / local rep. (last) | bottom / local rep. (last) |",
        "|---|" + "---:|" * (2 * len(e) + 2),
    ]
    r = p1["results"]
    last = e[-1]
    lr_top, lr_bot = r[last]["variances"][ESTIMATORS[0]]
    for how in ESTIMATORS:
        tops = [f"{r[k]['variances'][how][0]:.3g}" for k in e]
        bots = [f"{r[k]['variances'][how][1]:.3g}" for k in e]
        t, b = r[last]["variances"][how]
        lines.append(f"| {how} | " + " | ".join(tops) + " | " + " | ".join(bots) + f" | {t / lr_top:.2f} | {b / lr_bot:.2f} |")
    lines += [
        "",
        "Training accuracy (noise-free theta, first 2000 training images) and learned alphas (bottom to top): "
        + "; ".join(f"epoch {k}: {r[k]['train_acc']:.3f}, alpha " + ", ".join(f"{a:.3g}" for a in r[k]["alphas"]) for k in e)
        + ". Training time to each checkpoint: " + ", ".join(f"{p1['seconds'][k]:.0f} s" for k in e) + ".",
        "",
        *paper_section({how: tuple(r[k]["variances"][how][0] for k in e) + tuple(r[k]["variances"][how][1] for k in e) for how in ESTIMATORS}, tuple(e)),
        "",
        "## Part 2: VAE with a Bayesian decoder (full-Bayes AEVB)",
        "",
        f"`BayesVAE` (z 20, decoder 20-{args.hidden}-784 with N(0, 1) priors on every weight, `BayesEncoder` with a mean-field "
        f"Normal weight posterior), ELBO with one sample, trained under `local_reparameterization()` on {args.vae_train_size} "
        f"dynamically binarised MNIST images ({', '.join(map(str, e2))} epochs, {args.vae_reps} draws per estimator: the Pyro step costs more); the gradient is that of the minibatch ELBO per datum with respect to the "
        "posterior means of the decoder's top (`decoder.2.weight`) and bottom (`decoder.0.weight`) weights. Separate "
        "weight samples per example are not measured here (the weight sites would have to move into the data plate).",
        "",
        "| estimator | " + " | ".join(f"top, {k} ep" for k in e2) + " | " + " | ".join(f"bottom, {k} ep" for k in e2) + " |",
        "|---|" + "---:|" * (2 * len(e2)),
    ]
    r2 = p2["results"]
    for how in ("local reparameterization", "single weight sample"):
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
    data = load_dataset("mnist", data_dir=args.data_dir, binarize="none", valid_size=0)
    x = data.train.reshape(-1, 784)[: args.train_size]
    y = data.train_labels[: args.train_size]
    p1 = part1(args, x, y)
    p2 = part2(args, data.train[: args.vae_train_size])
    hw = hardware_info(torch.device("cpu"))
    text = render(args, p1, p2, hw, started, time.perf_counter() - t0)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is None:
        print(text)
        print("(--quick: nothing written; pass --out FILE to keep it)")
        return 0
    atomic_write(Path(out), lambda f: f.write(text.encode()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
