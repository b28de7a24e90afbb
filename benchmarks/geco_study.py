"""The GECO paper's studies (Rezende & Viola 2018, "Taming VAEs") at a small CPU budget.

Writes ``benchmarks/results/geco_study.md``, ``geco_study.json`` and ``geco_*.png``:

- Figure 2 / Appendix A: beta-VAE reconstruction fixed points on 2-D mixture data, E(beta), d^2E, critical betas;
- Figure 3: information plane (Appendix D re-fitted Gaussian decoder) for ELBO, GECO-RE at two tolerances and a
  fixed beta, and GECO's trajectory (constraint, lambda, KL per epoch), on MNIST and Fashion-MNIST;
- Figure 5: KL during training with ELBO and with GECO-RE set to ELBO's final reconstruction error;
- Table 2: marginal KL of the aggregate posterior on Color-MNIST, VAE + RealNVP posterior, ELBO vs GECO;
- a conditional task (mnist-sum) with the conditional VAE, ELBO vs GECO;
- Figure 8: posterior tiling on Micro-MNIST (2-D latent, RealNVP posterior), ELBO and GECO-RE at two tolerances.

    PYROVAE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/geco_study.py            # the committed run
    python benchmarks/geco_study.py --quick --out /tmp/geco-smoke                               # a smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import pyrovae.evaluate as E  # noqa: E402
import pyrovae.evaluate.fixed_points as FP  # noqa: E402
from pyrovae.data import load_dataset  # noqa: E402
from pyrovae.data.derived import context_shape  # noqa: E402
from pyrovae.objectives import ELBO, GECO, BetaELBO  # noqa: E402
from pyrovae.train import Trainer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: data sets of the information-plane part (each is also a --parts name)
INFO_PLANE_SETS = ("mnist", "fashion-mnist", "color-mnist", "mnist-triplets", "mnist-sum")


def seeded(build, seed: int = 0):
    """``build()`` under a fixed seed: the models' initial weights, not only their training, are reproducible."""
    pyro.set_rng_seed(seed)
    return build()


def train(model, guide, objective, data, epochs, batch_size=100, lr=1e-3, seed=0):
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    t0 = time.perf_counter()
    history = Trainer(model, guide, objective, lr=lr, progress=False).fit(data, epochs, batch_size)
    return history, time.perf_counter() - t0


#: training images (None: the whole training set) and epochs of the information-plane runs: 20 epochs of MNIST at
#: batch 100 are 12,000 steps, enough for lambda to overshoot, meet the constraint and come back down (at 1,500 steps
#: GECO-RE at ELBO's error ended with lambda at its cap, the tolerance not met)
N_TRAIN, EPOCHS = None, 20
#: the derived data sets hold 20,000 examples: they train for as many epochs as give at least this many steps
MIN_STEPS = 12000


def epochs_for(n: int, epochs: int = EPOCHS, batch_size: int = 100) -> int:
    """At least ``epochs``, and enough epochs of ``n`` examples for MIN_STEPS steps."""
    return max(epochs, math.ceil(MIN_STEPS / math.ceil(n / batch_size)))
#: epochs of the conditional ConvDRAW runs (a ConvDRAW step costs about 20 MLP-VAE steps on CPU)
CONVDRAW_EPOCHS = 5
#: epochs of the longer Figure 5 run
LONG_EPOCHS = 60


def geco(tol):
    return GECO(constraint="RE", tolerance=float(tol))  # the paper's multiplier rule: lambda <- lambda exp(C_ma)


def rms_error(model, guide, data) -> float:
    """sqrt(mean (x - g(z))^2), z ~ q(z | x): GECO-RE's constraint quantity (its tolerance is an RMS error)."""
    r = E.refit_gaussian_scale(model, guide, data)
    return r.sigma


# --------------------------------------------------------------------------------------------- Figure 2


def fixed_points_study(out: Path, quick: bool) -> dict:
    data = FP.mixture_data(60 if quick else 150, std=0.5)
    betas = [math.exp(v) for v in torch.linspace(math.log(0.05), math.log(20.0), 12 if quick else 30).tolist()]
    t0 = time.perf_counter()
    s = FP.sweep(data, betas, sigma=1.0, grid=16 if quick else 32)
    seconds = time.perf_counter() - t0
    lam = torch.linalg.eigvalsh(torch.cov(data.T)).tolist()
    fig, ax = plt.subplots(1, 4, figsize=(17, 4))
    for a, i in zip(ax[:2], (0, len(betas) // 2)):
        p = s.points[i]
        used = p.q.sum(0) > 1e-3
        a.scatter(data[:, 0], data[:, 1], s=4, c="grey", label="data")
        a.scatter(p.g[used, 0], p.g[used, 1], s=6, c="C3", label="g(z) of used tiles")
        a.set_title(f"fixed points, beta={p.beta:.2f}")
        a.legend(fontsize=7)
    ax[2].semilogx(s.betas, s.errors, ".-")
    ax[2].set_xlabel("beta"), ax[2].set_ylabel("E |x - g(z)|^2")
    ax[3].semilogx(s.betas, s.curvature, ".-")
    ax[3].set_xlabel("beta"), ax[3].set_ylabel("d^2 E / d(log beta)^2")
    for a in ax[2:]:
        for c in s.critical:
            a.axvline(c, color="C3", ls="--", lw=0.8)
        a.axvline(max(lam), color="k", ls=":", lw=0.8)
    ax[2].set_title("dashed: detected critical betas; dotted: lambda_max / sigma^2")
    fig.tight_layout()
    fig.savefig(out / "geco_fixed_points.png", dpi=100)
    plt.close(fig)
    return {"n": data.shape[0], "grid": 16 if quick else 32, "betas": [betas[0], betas[-1], len(betas)], "critical": s.critical,
            "lambda_max_over_sigma2": max(lam), "iterations": [p.iterations for p in s.points], "seconds": seconds}


# --------------------------------------------------------------------------------- Figures 3 and 5


def vae_config(name: str, z_dim: int = 16, hidden: int = 200) -> dict:
    """The registry's config of an MLP VAE (Bernoulli decoder) and its Gaussian encoder for the data set ``name``; on a
    conditional data set the conditional VAE (learned prior p(z | context)) and its encoder q(z | target, context)."""
    cfg = {"dataset": name, "z_dims": [z_dim], "hidden": [[hidden]]}
    return {**cfg, "model": "cvae", "guide": "conditional"} if context_shape(name) else {**cfg, "model": "vae", "guide": "gaussian"}


def flow_config(z_dim: int, hidden: int) -> dict:
    """The registry's config of an MLP VAE with a RealNVP posterior (4 coupling layers)."""
    return {"model": "vae", "guide": "flow", "flow": "realnvp", "flow_length": 4, "z_dims": [z_dim], "hidden": [[hidden]]}


def point(m, g, hist, sec, x, xt) -> dict:
    """A trained run's row: its information-plane point on ``xt``, RMS errors on ``xt`` and ``x``, training time,
    KL per epoch and the final lambda (None without a multiplier)."""
    p = E.information_plane(m, g, xt)
    lam = E.geco_trajectory(hist)["lambda"][-1]
    p.update({"rms": rms_error(m, g, xt), "train_rms": rms_error(m, g, x), "seconds": round(sec, 1), "kl_per_epoch": [h.get("train_kl") for h in hist],
              "lambda": None if math.isnan(lam) else lam})
    return p


def kl_plot(rows: dict, labels, epochs: int, title: str, path: Path, log: bool = False) -> None:
    """Training KL per epoch of the runs ``labels`` (Figure 5)."""
    fig, a = plt.subplots(figsize=(5.5 if log else 5, 4))
    for k in labels:
        a.plot(range(1, epochs + 1), rows[k]["kl_per_epoch"], ".-", label=k)
    if log:
        a.set_yscale("log")
    a.set_xlabel("epoch"), a.set_ylabel("train KL [nats]"), a.legend(fontsize=7)
    a.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def info_plane_study(name: str, out: Path, quick: bool, data_dir) -> dict:
    s = load_dataset(name, data_dir=data_dir, valid_size=0)
    n_train, n_test, epochs = (1000, 300, 2) if quick else (N_TRAIN, 1000, None)
    x, xt = s.train[:n_train], s.test[:n_test]
    epochs = epochs or epochs_for(x.shape[0])

    def pair():
        return common.build(vae_config(name), s.x_shape)

    runs = {}
    m, g = seeded(pair)
    hist, sec = train(m, g, ELBO(), x, epochs)
    elbo_rms = rms_error(m, g, x)
    runs["ELBO"] = (m, g, hist, sec)
    steps = epochs * math.ceil(x.shape[0] / 100)
    for label, obj in ((f"GECO-RE tol={elbo_rms:.3f} (ELBO's RMS)", geco(elbo_rms)), (f"GECO-RE tol={1.25 * elbo_rms:.3f} (1.25 x ELBO's RMS)", geco(1.25 * elbo_rms)),
                       ("beta=4 (fixed)", BetaELBO(beta=4.0)), ("KL annealing (beta 0 -> 1 over half the steps)", BetaELBO(beta=1.0, schedule="linear", warmup_steps=steps // 2))):
        m, g = seeded(pair)
        hist, sec = train(m, g, obj, x, epochs)
        runs[label] = (m, g, hist, sec)
    rows = {label: point(m, g, hist, sec, x, xt) for label, (m, g, hist, sec) in runs.items()}
    for label, (_, _, hist, _) in runs.items():
        if label.startswith("GECO"):
            rows[label]["trajectory"] = E.geco_trajectory(hist)
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for label, p in rows.items():
        ax[0].scatter(p["kl"], p["recon_nll"], label=label)
    ax[0].set_xlabel("KL(q(z|x) || p(z)) [nats]"), ax[0].set_ylabel("-log N(x; g(z), sigma*^2 I), sigma* re-fitted [nats]")
    ax[0].set_title(f"{name}: information plane (test, Appendix D)")
    ax[0].legend(fontsize=7)
    label = next(k for k in rows if k.startswith("GECO-RE tol=") and "ELBO" in k)
    t = rows[label]["trajectory"]
    sc = ax[1].scatter(t["kl"], [math.sqrt(max(c + elbo_rms**2, 0)) for c in t["constraint"]], c=t["epoch"], cmap="viridis")
    fig.colorbar(sc, ax=ax[1], label="epoch")
    ax[1].set_xlabel("train KL"), ax[1].set_ylabel("train RMS error (moving average)")
    ax[1].set_title(f"GECO trajectory ({label})")
    a2 = ax[2]
    a2.plot(t["epoch"], t["constraint"], label="constraint C_ma")
    a2.set_xlabel("epoch"), a2.set_ylabel("constraint")
    a3 = a2.twinx()
    a3.semilogy(t["epoch"], t["lambda"], "C1", label="lambda")
    a3.set_ylabel("lambda")
    a2.set_title("constraint and lambda per epoch")
    fig.tight_layout()
    fig.savefig(out / f"geco_info_plane_{name}.png", dpi=100)
    plt.close(fig)
    kl_plot(rows, ("ELBO", label), epochs, f"{name}: KL at ELBO's reconstruction error", out / f"geco_kl_at_fixed_error_{name}.png")
    model = type(m).__name__
    return {"n_train": x.shape[0], "n_test": n_test, "epochs": epochs, "model": model, "elbo_train_rms": elbo_rms, "runs": rows}


def fixed_error_long_study(out: Path, quick: bool, data_dir, name: str = "mnist") -> dict:
    """Figure 5 with a longer budget: ELBO for LONG_EPOCHS epochs, then GECO-RE set to its final training error for as
    many; KL per epoch of both (at 20 epochs GECO's KL was still falling when training stopped)."""
    s = load_dataset(name, data_dir=data_dir, valid_size=0)
    n_train, n_test, epochs = (1000, 300, 3) if quick else (N_TRAIN, 1000, LONG_EPOCHS)
    x, xt = s.train[:n_train], s.test[:n_test]
    m, g = seeded(lambda: common.build(vae_config(name), s.x_shape))
    hist, sec = train(m, g, ELBO(), x, epochs)
    tol = rms_error(m, g, x)
    runs = {"ELBO": (m, g, hist, sec)}
    m2, g2 = seeded(lambda: common.build(vae_config(name), s.x_shape))
    label = f"GECO-RE tol={tol:.3f} (ELBO's RMS)"
    runs[label] = (m2, g2, *train(m2, g2, geco(tol), x, epochs))
    rows = {k: point(m, g, hist, sec, x, xt) for k, (m, g, hist, sec) in runs.items()}
    kl_plot(rows, runs, epochs, f"{name}: KL at ELBO's reconstruction error, {epochs} epochs", out / f"geco_kl_at_fixed_error_{name}_long.png", log=True)
    return {"dataset": name, "n_train": x.shape[0], "n_test": n_test, "epochs": epochs, "runs": rows}


# ------------------------------------------------------------------------------------------- Table 2


def marginal_kl_study(out: Path, quick: bool, data_dir) -> dict:
    s = load_dataset("color-mnist", data_dir=data_dir, valid_size=0)
    n_train, n_test, epochs = (1000, 200, 2) if quick else (N_TRAIN, 1000, None)
    x, xt = s.train[:n_train], s.test[:n_test]
    epochs = epochs or epochs_for(x.shape[0])

    def pair():
        return common.build(flow_config(16, 400), s.x_shape)

    m, g = seeded(pair)
    hist, sec = train(m, g, ELBO(), x, epochs)
    tol = rms_error(m, g, x)
    rows = {"ELBO": (m, g, sec)}
    for factor, note in ((1.0, "ELBO's RMS"), (1.25, "1.25 x ELBO's RMS")):
        m2, g2 = seeded(pair)
        _, sec2 = train(m2, g2, geco(factor * tol), x, epochs)
        rows[f"GECO-RE tol={factor * tol:.3f} ({note})"] = (m2, g2, sec2)
    res = {}
    for label, (m, g, sec) in rows.items():
        r = E.marginal_kl(g, xt, model=m)
        p = E.information_plane(m, g, xt)
        res[label] = {"marginal_kl": r.value, "stderr": r.stderr, "mean_kl": r.mean_kl, "mutual_information": r.mutual_information,
                      "log_n": math.log(r.num_components), "rms": rms_error(m, g, xt), "train_rms": rms_error(m, g, x), "recon_nll_refit": p["recon_nll"], "seconds": round(sec, 1)}
    return {"n_train": x.shape[0], "n_test": n_test, "epochs": epochs, "runs": res}


# -------------------------------------------------------------------------------------- conditional


def conditional_study(out: Path, quick: bool, data_dir, name: str = "mnist-sum", model: str = "cvae") -> dict:
    """ELBO against GECO-RE (at ELBO's training error and 1.25 times it) on a conditional task: test NLL, KL, errors and
    a grid of samples p(x | c) per run (``geco_{name}_{model}_{run}.png``). ``model``: ``cvae`` (the conditional VAE) or
    ``convdraw`` (the conditional ConvDRAW, 8 steps, 4 z channels, 32 ConvLSTM channels: the paper's model, small)."""
    s = load_dataset(name, data_dir=data_dir, valid_size=0)
    n_train, n_test, epochs = (1000, 200, 2) if quick else (N_TRAIN, 500, None)
    x, xt = s.train[:n_train], s.test[:n_test]
    epochs = epochs or (epochs_for(x.shape[0]) if model == "cvae" else CONVDRAW_EPOCHS)
    ctx = tuple(s.train.context.shape[1:])
    # the conditional ConvDRAW: 8 steps, 4 z channels, 32 ConvLSTM channels
    cfg = vae_config(name, hidden=400) if model == "cvae" else {"dataset": name, "model": "convdraw", "draw_steps": 8, "draw_z": 4, "lstm_size": 32}

    def pair():
        return common.build(cfg, s.x_shape)

    m, g = seeded(pair)
    hist, sec = train(m, g, ELBO(), x, epochs)
    tol = rms_error(m, g, x)
    runs = {"ELBO": (m, g, hist, sec)}
    for factor, note in ((1.0, "ELBO's RMS"), (1.25, "1.25 x ELBO's RMS")):
        m2, g2 = seeded(pair)
        hist2, sec2 = train(m2, g2, geco(factor * tol), x, epochs)
        runs[f"GECO-RE tol={factor * tol:.3f} ({note})"] = (m2, g2, hist2, sec2)
    res = {}
    for i, (label, (m, g, hist, sec)) in enumerate(runs.items()):
        ll = E.log_likelihood(m, g, xt, num_samples=100)
        terms = E.elbo_terms(m, g, xt)
        lam = E.geco_trajectory(hist)["lambda"][-1]
        res[label] = {"test_nll": ll.summary(prefix="")["nll"], "kl": terms["kl"], "rms": rms_error(m, g, xt), "train_rms": rms_error(m, g, x),
                      "lambda": None if math.isnan(lam) else lam, "seconds": round(sec, 1), "picture": f"geco_{name}_{model}_{i}.png"}
        c = xt.context[:6]
        samples = E.sample(m, 6 * 6, s.x_shape, inputs=(c.repeat_interleave(6, 0),)).reshape(6, 6, *s.x_shape)
        grid = torch.cat([c.unsqueeze(2), samples], 1).reshape(-1, *s.x_shape)  # per row: each context channel, then 6 samples
        E.save_image_grid(grid, out / res[label]["picture"], nrow=ctx[0] + 6)
    return {"dataset": name, "model": model, "n_train": x.shape[0], "n_test": n_test, "epochs": epochs, "context_channels": ctx[0], "runs": res}


# ------------------------------------------------------------------------------------------ Figure 8


def mnist_classifier(data_dir, quick: bool) -> tuple[torch.nn.Module, float]:
    """A 784-256-256-10 ReLU MLP trained on the MNIST training set (GECO-CLA's classifier), frozen; its test accuracy."""
    s = load_dataset("mnist", data_dir=data_dir, valid_size=0)
    x, y = s.train[: 5000 if quick else None].flatten(1), s.train_labels[: 5000 if quick else None]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(1 if quick else 5):
        for idx in torch.randperm(x.shape[0]).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval().requires_grad_(False)  # gradients reach the reconstruction, never the classifier
    with torch.no_grad():
        accuracy = float((net(s.test).argmax(-1) == s.test_labels).float().mean())
    return net, accuracy


def tiling_study(out: Path, quick: bool, data_dir) -> dict:
    s = load_dataset("micro-mnist", data_dir=data_dir)
    x = s.train
    epochs = 300 if quick else 2000
    classifier, accuracy = mnist_classifier(data_dir, quick)
    cla_tol = -math.log(0.9)  # cross-entropy of the true class: probability >= 0.9 on average
    objectives = {"ELBO": ELBO(), "GECO-RE tol=0.10": geco(0.10), "GECO-RE tol=0.25": geco(0.25),
                  f"GECO-CLA tol={cla_tol:.3f}": GECO(constraint="CLA", tolerance=cla_tol, classifier=classifier, target="predicted")}
    fig, ax = plt.subplots(1, len(objectives), figsize=(5 * len(objectives), 4.5))
    res = {}
    for a, (label, obj) in zip(ax, objectives.items()):
        m, g = seeded(lambda: common.build(flow_config(2, 200), s.x_shape))
        _, sec = train(m, g, obj, x, epochs, batch_size=7, lr=1e-3)
        with torch.no_grad():
            z = torch.stack([pyro.poutine.trace(g).get_trace(x).nodes["z"]["value"] for _ in range(100)])  # [100, 7, 2]
        for i in range(7):
            a.scatter(z[:, i, 0], z[:, i, 1], s=3, label=f"x{i + 1} ({int(s.train_labels[i])})")
        a.add_patch(plt.Circle((0, 0), 2.0, fill=False, ls=":", color="k"))
        a.set_aspect("equal")
        mk = E.marginal_kl(g, x, model=m, rounds=100)
        acc, ce = class_agreement(classifier, m, g, x)
        a.set_title(f"{label}: rms={rms_error(m, g, x):.3f}, marginal KL={mk.value:.2f}", fontsize=9)
        res[label] = {"rms": rms_error(m, g, x), "marginal_kl": mk.value, "mean_kl": mk.mean_kl, "recon_accuracy": acc, "recon_cross_entropy": ce, "seconds": round(sec, 1)}
    ax[0].legend(fontsize=7)
    fig.suptitle("Micro-MNIST: 100 posterior samples per data point (dotted: 2 sd of the prior)")
    fig.tight_layout()
    fig.savefig(out / "geco_tiling.png", dpi=100)
    plt.close(fig)
    return {"steps": epochs, "runs": res, "classifier_test_accuracy": accuracy, "cla_tolerance": cla_tol}


@torch.no_grad()
def class_agreement(classifier, model, guide, x, draws: int = 20) -> tuple[float, float]:
    """How often the classifier gives a reconstruction g(z), z ~ q(z | x), the class it gives x itself, and its mean
    cross-entropy for that class (GECO-CLA's constrained quantity)."""
    target = classifier(x).argmax(-1)
    logits = torch.stack([classifier(E.reconstruct(model, guide, x)) for _ in range(draws)])  # [draws, N, 10]
    hits = (logits.argmax(-1) == target).float().mean()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.repeat(draws))
    return float(hits), float(ce)


# ------------------------------------------------------------------------------------------------ report


def _met(label: str, p: dict, elbo_rms: Optional[float] = None) -> str:
    """Whether a GECO run met its tolerance on its training data, the data its constraint is defined on (label
    "GECO-RE tol=0.123 ..." or "GECO-CLA tol=..."); RE's value is the RMS error, CLA's the mean cross-entropy.
    A tolerance set from ELBO's error is taken unrounded from ``elbo_rms``. Within 0.5% above it reads "at
    tolerance": the error is a one-draw Monte Carlo estimate, and C_ma hovers around 0 once lambda has settled."""
    if not label.startswith("GECO-"):
        return "-"
    tol = float(label.split("=")[1].split()[0])
    if elbo_rms is not None and "ELBO's RMS" in label:
        tol = elbo_rms * (1.25 if "1.25 x" in label else 1.0)
    value = p.get("recon_cross_entropy") if label.startswith("GECO-CLA") else p.get("train_rms", p["rms"])
    ratio = value / tol
    return "yes" if ratio <= 1 else f"at tolerance ({ratio:.3f} x)" if ratio <= 1.005 else f"no ({ratio:.2f} x tol)"


#: what the committed run (2026-12-03) shows against the paper; written by hand from its numbers above (a re-run with
#: other budgets must revise it)
DISCUSSION = [
    "- **Budgets.** Tens of minutes per data set on a 2-core CPU with MLP VAEs, against the paper's long GPU runs of "
    "ConvDRAW; one small conditional ConvDRAW (5 epochs) stands in for the paper's models.",
    "- **Figure 3 (trajectory).** Reproduced in shape: with the tolerance at ELBO's error, lambda climbs to its cap in "
    "the first epochs, the KL rises to about 90 nats while the error falls below the tolerance, then lambda decays "
    "and the KL comes back down at fixed error (`geco_info_plane_mnist.png`, middle and right).",
    "- **Figure 5 (KL at ELBO's error).** Not reproduced: the paper has GECO ending below ELBO's KL. Here GECO ends at "
    "ELBO's point: after 60 epochs of MNIST its test KL is 23.6 against ELBO's 23.3 at the same training error, "
    "with lambda at about 2,400 at the end and the KL gap closing (24.3 against 23.7 on the training set in the last epoch). "
    "After 20 epochs (12,000 steps) it was still above (26.4 against 22.6 on MNIST, 17.8 against 15.8 on "
    "Fashion-MNIST, 68.5 against 34.0 on Color-MNIST), and at 4,000 steps (MNIST-triplets) lambda had not left its "
    "cap. In the first version of this study (5,000 images, 1,500 steps) the tolerance was never met and lambda "
    "stayed at its cap: the dynamics need many steps, so GECO at a tight tolerance costs training time.",
    "- **Looser tolerances (information plane).** GECO-RE at 1.25 x ELBO's error meets it and lands at a third to a "
    "half of ELBO's KL on every data set (MNIST 12.4 vs 22.6, Fashion-MNIST 6.3 vs 15.8, Color-MNIST 8.9 vs 34.0); "
    "a fixed beta = 4 lands on a similar curve (sometimes a better point: Fashion-MNIST), with no control over "
    "where. That the user states the error and gets the least KL that meets it is the paper's point, and it holds.",
    "- **Table 2 (marginal KL).** The paper's direction holds at a tolerance GECO meets: 5.0 nats for GECO-RE at 1.25 x "
    "ELBO's error against 28.9 for ELBO (paper: 10.3 against 182.5, fully trained ConvDRAW models). With the "
    "tolerance at ELBO's own error GECO's KL was still falling after 12,000 steps (64.1). Our values are over 1000 "
    "test images, so they cannot fall below mean KL - log 1000 (ELBO's I(n; z) sits at log N: its value is that floor).",
    "- **Conditional VAE (mnist-sum).** GECO at ELBO's training error gave a better test NLL than ELBO (111.6 against "
    "116.3 nats) at a slightly higher KL: ELBO overfits the 20,000 pairs over 60 epochs (train RMS 0.109, test "
    "0.147), GECO's constraint stops at the tolerance.",
    "- **Conditional ConvDRAW (mnist-rotate, 5 epochs = 1,000 steps).** ELBO: test NLL 102.9, KL 32.1. Both GECO "
    "runs were still in the overshoot phase when training stopped: lambda near its cap (7.8e5 and 1.5e5), the error "
    "well below the tolerance (RMS 0.073 against 0.112) and the KL far above ELBO's (752 and 162 nats), so their test "
    "NLL is poor. At 1 s per step on one CPU core, the budget for lambda to come back down (about 10,000 steps in "
    "the MLP runs) was not spent; this row shows the model training through the same trainer, not the paper's result.",
    "- **Micro-MNIST tiling (Figure 8).** Reproduced: ELBO's posteriors are tight islands, partly outside the "
    "prior's bulk; GECO-RE at 0.10 spreads them to tile the prior; GECO-CLA keeps every reconstruction's class "
    "while posteriors of the same class merge (the two 4s and the two 7s overlap), as in the paper. At tolerance "
    "0.25 the constraint is met by the mean image and the posterior collapses onto the prior.",
    "- **Fixed points.** 'Exponential smoothing' is read as damping of the decoder update; the paper's exact mixture "
    "is not given. The first split is detected one grid step from the predicted beta.",
]


def report(results: dict, out: Path, info: dict) -> None:
    L = ["# GECO studies (Rezende & Viola 2018, \"Taming VAEs\") at a small CPU budget", ""]
    L += [f"Run {info['date']} on {info['hardware']['cpu']} ({info['hardware']['cpu_cores']} cores, torch threads {info['hardware']['torch_threads']}), "
          f"torch {info['hardware']['torch']}, pyro {info['hardware']['pyro']}; total {info['seconds'] / 60:.1f} min. Command: `{info['command']}`.", ""]
    L += ["Budgets: the whole training sets (60,000 MNIST / Fashion-MNIST images; 20,000 examples of the derived sets), "
          "batch 100, at least 12,000 steps for the information-plane, marginal-KL and conditional-VAE runs (20 epochs of "
          "MNIST, 60 of a derived set; sections give their own), MLP VAEs with one hidden layer, and one small conditional "
          "ConvDRAW; the paper trains ConvDRAW models far longer on GPUs, so the numbers show the protocols working and the "
          "direction of the effects, not the paper's values. GECO uses the paper's multiplier rule (lambda <- lambda "
          "exp(C_ma), alpha = 0.99, lambda starts at 1, kept in [1e-6, 1e6]); RE tolerances are RMS errors per pixel, "
          "judged on the training set (the data the constraint is defined on).", ""]
    fp = results.get("fixed_points")
    if fp:
        L += ["## Figure 2 / Appendix A: reconstruction fixed points", "",
              f"{fp['n']} points of a 3-component 2-D Gaussian mixture, {fp['grid']}x{fp['grid']} tiles, sigma = 1, "
              f"{fp['betas'][2]} betas in [{fp['betas'][0]:.3g}, {fp['betas'][1]:.3g}] (log-spaced), damping 0.5, <= 400 iterations or a 1e-3 step "
              f"({fp['seconds']:.0f} s). Detected critical betas: {', '.join(f'{c:.2f}' for c in fp['critical'])}; the first "
              f"split is predicted at lambda_max / sigma^2 = {fp['lambda_max_over_sigma2']:.2f} (the test suite checks the two-point case exactly).", "",
              "![fixed points](geco_fixed_points.png)", ""]
    for name in INFO_PLANE_SETS:
        r = results.get(f"info_plane_{name}")
        if not r:
            continue
        L += [f"## Figure 3 and 5: information plane on {name}", "",
              f"{'Conditional VAE (learned prior p(z | context))' if r.get('model') == 'ConditionalVAE' else 'VAE'} (16-d z, one hidden "
              f"layer of 200, Bernoulli decoder) on {r['n_train']} training images, {r['epochs']} epochs at batch 100; points on "
              f"{r['n_test']} test images. recon NLL: Gaussian decoder with one global sigma re-fitted (Appendix D). Tolerances "
              "are met or not on the training set, the data the constraint is defined on.", "",
              "| objective | KL [nats] | recon NLL, re-fitted [nats] | sigma* | RMS error (train) | RMS error (test) | tolerance met | final lambda | train s |", "|---|---|---|---|---|---|---|---|---|"]
        for label, p in r["runs"].items():
            lam = p.get("trajectory", {}).get("lambda", [None])[-1]
            L.append(f"| {label} | {p['kl']:.2f} | {p['recon_nll']:.1f} | {p['sigma']:.4f} | {p.get('train_rms', float('nan')):.4f} | {p['rms']:.4f} | {_met(label, p, r.get('elbo_train_rms'))} | {'-' if lam is None else f'{lam:.3g}'} | {p['seconds']} |")
        L += ["", f"![information plane](geco_info_plane_{name}.png)", "", f"![KL at fixed error](geco_kl_at_fixed_error_{name}.png)", ""]
    r = results.get("fixed_error_long")
    if r:
        L += [f"## Figure 5, longer: KL at ELBO's reconstruction error on {r['dataset']}, {r['epochs']} epochs", "",
              f"The same VAE, {r['n_train']} training images, {r['epochs']} epochs at batch 100 for each run; GECO-RE's tolerance is "
              f"ELBO's final training RMS error. Test points on {r['n_test']} images.", "",
              "| objective | KL (test) [nats] | recon NLL, re-fitted | RMS error (train) | RMS error (test) | tolerance met | final lambda | train s |",
              "|---|---|---|---|---|---|---|---|"]
        for label, p in r["runs"].items():
            lam = p.get("lambda")
            L.append(f"| {label} | {p['kl']:.2f} | {p['recon_nll']:.1f} | {p['train_rms']:.4f} | {p['rms']:.4f} | {_met(label, p, r['runs']['ELBO'].get('train_rms'))} | {'-' if lam is None else f'{lam:.3g}'} | {p['seconds']} |")
        L += ["", f"![KL at fixed error, long](geco_kl_at_fixed_error_{r['dataset']}_long.png)", ""]
    r = results.get("marginal_kl")
    if r:
        L += ["## Table 2: marginal KL on Color-MNIST (VAE + RealNVP posterior)", "",
              f"{r['n_train']} training images, {r['epochs']} epochs; KL(q(z) || p(z)) of the aggregate posterior over {r['n_test']} test "
              "images (log q(z) as a log-mean-exp over all of them; stderr over the draws; the value cannot fall below mean KL - log N).", "",
              "| objective | marginal KL (ours) | stderr | mean KL | I(n; z) (<= log N) | RMS error (train) | RMS error (test) | tolerance met | paper's marginal KL |", "|---|---|---|---|---|---|---|---|---|"]
        for label, p in r["runs"].items():
            paper = "182.5 (ELBO)" if label == "ELBO" else "10.3 (GECO)"
            L.append(f"| {label} | {p['marginal_kl']:.2f} | {p['stderr']:.2f} | {p['mean_kl']:.2f} | {p['mutual_information']:.2f} ({p['log_n']:.2f}) | {p.get('train_rms', float('nan')):.4f} | {p['rms']:.4f} | {_met(label, p, r['runs']['ELBO'].get('train_rms'))} | {paper} |")
        L += [""]
    for key in ("conditional", "convdraw"):
        r = results.get(key)
        if not r:
            continue
        name, model = r.get("dataset", "mnist-sum"), r.get("model", "cvae")
        what = {"mnist-sum": "target = (a + b) mod 10", "mnist-rotate": "target: another instance of the context's digit, rotated 90 degrees"}[name]
        net = ("Conditional VAE (learned prior p(z | c), one hidden layer of 400)" if model == "cvae" else
               "Conditional ConvDRAW (8 steps, 4 z channels on a 7 x 7 grid, 32 ConvLSTM channels, context features into prior and decoder)")
        L += [f"## Conditional task: {name} ({what}), {model}", "",
              f"{net}, {r['n_train']} training pairs, {r['epochs']} epochs at batch 100; {r['n_test']} test pairs, NLL with 100 importance samples.", "",
              "| objective | test NLL [nats] | KL | RMS error (train) | RMS error (test) | tolerance met | final lambda | train s |", "|---|---|---|---|---|---|---|---|"]
        for label, p in r["runs"].items():
            lam = p.get("lambda")
            L.append(f"| {label} | {p['test_nll']:.1f} | {p['kl']:.2f} | {p.get('train_rms', float('nan')):.4f} | {p['rms']:.4f} | {_met(label, p, r['runs']['ELBO'].get('train_rms'))} | "
                     f"{'-' if lam is None else f'{lam:.3g}'} | {p['seconds']} |")
        L += ["", f"Per row: the context's {r.get('context_channels', 2)} channel(s), then 6 samples of p(x | c).", ""]
        L += [f"{label}: ![]({p['picture']})" for label, p in r["runs"].items() if "picture" in p] + [""]
    r = results.get("tiling")
    if r:
        L += ["## Figure 8: posterior tiling on Micro-MNIST", "", f"2-d latent VAE, RealNVP posterior (4 layers), the 7 images, {r['steps']} full-batch steps. GECO-CLA's classifier: "
              f"a 784-256-256-10 MLP trained on the MNIST training set ({100 * r.get('classifier_test_accuracy', float('nan')):.1f}% test "
              "accuracy), frozen; its constraint is the cross-entropy of the class the classifier gives the data image, minus "
              f"{r.get('cla_tolerance', float('nan')):.3f} nats (-log 0.9). 'class kept': how often a reconstruction gets the data "
              "image's class (20 draws each).", "",
              "| objective | RMS error | class kept | cross-entropy [nats] | tolerance met | marginal KL | mean KL | train s |", "|---|---|---|---|---|---|---|---|"]
        for label, p in r["runs"].items():
            L.append(f"| {label} | {p['rms']:.4f} | {p.get('recon_accuracy', float('nan')):.2f} | {p.get('recon_cross_entropy', float('nan')):.3f} | {_met(label, p)} | {p['marginal_kl']:.2f} | {p['mean_kl']:.2f} | {p['seconds']} |")
        L += ["", "![tiling](geco_tiling.png)", ""]
    L += ["## Distance from the paper", "", *DISCUSSION, ""]
    (out / "geco_study.md").write_text("\n".join(L))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    common.add_common_args(ap, device=None, seed=None, data="mnist")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (use another --out)")
    ap.add_argument("--report-only", action="store_true", help="rewrite geco_study.md from geco_study.json")
    ap.add_argument("--parts", nargs="+", default=["fixed_points", *INFO_PLANE_SETS, "fixed_error_long", "marginal_kl", "conditional", "convdraw", "tiling"])
    args = ap.parse_args(argv)
    common.start(args)
    if args.quick and args.out.resolve() == RESULTS.resolve():
        print("--quick would overwrite the committed results: pass --out elsewhere", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = args.out / "geco_study.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.report_only:
        report(results, args.out, results["info"])
        return 0
    for part in args.parts:
        print(f"geco_study: {part} ...", flush=True)
        t = time.perf_counter()
        if part == "fixed_points":
            results[part] = fixed_points_study(args.out, args.quick)
        elif part in INFO_PLANE_SETS:
            results[f"info_plane_{part}"] = info_plane_study(part, args.out, args.quick, args.data_dir)
        elif part == "marginal_kl":
            results[part] = marginal_kl_study(args.out, args.quick, args.data_dir)
        elif part == "conditional":
            results[part] = conditional_study(args.out, args.quick, args.data_dir)
        elif part == "fixed_error_long":
            results[part] = fixed_error_long_study(args.out, args.quick, args.data_dir)
        elif part == "convdraw":
            results[part] = conditional_study(args.out, args.quick, args.data_dir, "mnist-rotate", "convdraw")
        elif part == "tiling":
            results[part] = tiling_study(args.out, args.quick, args.data_dir)
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(f"geco_study: {part} done in {time.perf_counter() - t:.0f} s", flush=True)
        path.write_text(json.dumps(results, indent=1, default=float))
    prev = results.get("info", {})  # parts re-run later add their time and command to the earlier run's
    commands = [c for c in prev.get("command", "").split(" ; ") if c] + [common.command_line()]
    info = {"date": common.now(), "hardware": common.hardware_info(torch.device("cpu")), "command": " ; ".join(commands),
            "seconds": prev.get("seconds", 0.0) + time.perf_counter() - t0}
    results["info"] = info
    path.write_text(json.dumps(results, indent=1, default=float))
    report(results, args.out, info)
    print(f"geco_study: wrote {args.out / 'geco_study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
