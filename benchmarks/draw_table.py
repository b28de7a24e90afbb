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
not counted in it. The three models run as three processes at once (``--jobs``).

Usage::

    # the committed CPU run: 16 steps, the paper's layer sizes, 2 CPU-minutes per model
    python benchmarks/draw_table.py
    # a smoke run (seconds; writes results/draw_table_quick.md, never the committed table)
    python benchmarks/draw_table.py --quick
    # the paper's settings, for a GPU
    python benchmarks/draw_table.py --full --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch

from common import add_common_args, build, build_objective, command_line, fmt, hardware_info, now, paired_difference, resolve_device, start
from pyrovae.utils.files import atomic_write
from pyrovae.data import load_dataset
from pyrovae.evaluate import elbo_terms, log_likelihood
from pyrovae.train import Trainer

PAPER = {"draw": 87.40, "draw-attention": 80.97, "vae": None}
MODELS = ("draw", "draw-attention", "vae")

#: protocol -> settings; "cpu" is the committed run
PROTOCOLS = {
    "cpu": {"steps": 16, "hidden": 256, "z_dim": 100, "budget_s": 120.0, "curve_every_s": 20.0, "batch_size": 100, "lr": 1e-3,
            "bound_test": 1000, "nll_test": 200, "eval_samples": 50},
    "quick": {"steps": 3, "hidden": 32, "z_dim": 10, "budget_s": 10.0, "curve_every_s": 5.0, "batch_size": 100, "lr": 1e-3,
              "bound_test": 100, "nll_test": 50, "eval_samples": 10},
    "full": {"steps": 64, "hidden": 256, "z_dim": 100, "budget_s": 6 * 3600.0, "curve_every_s": 600.0, "batch_size": 100, "lr": 1e-3,
             "bound_test": 10000, "nll_test": 10000, "eval_samples": 5000},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smoke run; writes results/draw_table_quick.md")
    g.add_argument("--full", action="store_true", help="the paper's 64 steps, whole test set, k = 5000 (a GPU)")
    add_common_args(p, threads=1, data="binarized-mnist")
    p.add_argument("--jobs", type=int, default=3, help="models trained at once, one process each")
    p.add_argument("--work-dir", default="runs/draw_table", help="per-model JSON results")
    p.add_argument("--out", default=None)
    p.add_argument("--only", default=None, choices=MODELS, help="(internal) train and evaluate one model, write its JSON")
    return p.parse_args(argv)


def protocol_name(args) -> str:
    return "quick" if args.quick else "full" if args.full else "cpu"


def config(name: str, s: dict) -> dict:
    """The registry's config of ``name``: the IWAE paper's one-layer VAE, or DRAW (its guide runs the model's decoder);
    the ELBO with the closed-form KL per step, the paper's L^z."""
    if name == "vae":
        cfg = {"model": "vae", "z_dims": [50]}
    else:
        cfg = {"model": "draw", "draw_steps": s["steps"], "draw_z": s["z_dim"], "lstm_size": s["hidden"], "attention": name == "draw-attention"}
    return {**cfg, "objective": "elbo", "analytic_kl": True}


def run_one(name: str, args) -> dict:
    """Train ``name`` for the CPU budget, evaluating the test bound along the way; then the test bound and NLL."""
    s = PROTOCOLS[protocol_name(args)]
    device = start(args)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = load_dataset("binarized-mnist", data_dir=args.data_dir, device=device)
    train, test = data.train, data.test
    cfg = config(name, s)
    model, guide = build(cfg, data.x_shape, device)
    trainer = Trainer(model, guide, build_objective(cfg), lr=s["lr"], progress=False)  # ELBO(analytic_kl=True), the paper's L^z
    trainer.setup(train[: s["batch_size"]])
    curve_test = test[: min(500, s["bound_test"])]
    clock = time.process_time if device.type == "cpu" else time.perf_counter

    def bound(x):
        model.eval(), guide.eval()
        out = elbo_terms(model, guide, x, batch_size=100)["elbo"]
        model.train(), guide.train()
        return out

    used, steps, images, next_point = 0.0, 0, 0, 0.0
    curve = []
    wall0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    perm, pos = torch.randperm(train.shape[0], generator=gen), 0
    while used < s["budget_s"]:
        if used >= next_point:
            curve.append({"train_cpu_s": round(used, 1), "steps": steps, "epochs": round(images / train.shape[0], 3), "test_bound": bound(curve_test)})
            print(f"[{name}] {curve[-1]}", flush=True)
            next_point += s["curve_every_s"]
        if pos + s["batch_size"] > train.shape[0]:
            perm, pos = torch.randperm(train.shape[0], generator=gen), 0
        x = train[perm[pos : pos + s["batch_size"]].to(device)]
        pos += s["batch_size"]
        t0 = clock()
        loss, _ = trainer.step(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        used += clock() - t0
        steps += 1
        images += x.shape[0]
    train_wall = time.perf_counter() - wall0
    curve.append({"train_cpu_s": round(used, 1), "steps": steps, "epochs": round(images / train.shape[0], 3), "test_bound": bound(curve_test)})
    print(f"[{name}] {curve[-1]}", flush=True)
    model.eval(), guide.eval()
    t0 = time.perf_counter()
    pyro.set_rng_seed(args.seed + 1)
    terms = elbo_terms(model, guide, test[: s["bound_test"]], batch_size=100)
    ll = log_likelihood(model, guide, test[: s["nll_test"]], num_samples=s["eval_samples"])
    nll = ll.summary(prefix="")
    return {
        "model": name,
        "settings": s,
        "train_cpu_s": round(used, 1),
        "train_wall_s": round(train_wall, 1),
        "steps": steps,
        "epochs": images / train.shape[0],
        "test_bound": terms["elbo"],
        "test_kl": terms["kl"],
        "nll": nll["nll"],
        "nll_stderr": nll["nll_stderr_over_data"],
        "nll_per_image": (-ll.values).tolist(),
        "eval_wall_s": round(time.perf_counter() - t0, 1),
        "curve": curve,
        "capture": trainer.capture_report,
    }


def report(results: dict, args, wall: float) -> str:
    s = PROTOCOLS[protocol_name(args)]
    hw = hardware_info(resolve_device(args.device))
    lines = [
        "# DRAW on binarized MNIST (Gregor et al. 2015, Table 2)",
        "",
        f"- Command: `{command_line()}`",
        f"- Date: {now()}; wall time {wall / 60:.1f} min in all ({args.jobs} models at once)",
        f"- Hardware: {hw['cpu']} ({hw['cpu_cores']} cores, shared with other jobs), device {hw['device']}; torch {hw['torch']}, pyro {hw['pyro']}",
        f"- Data: the fixed Larochelle binarisation, 50,000 training images; test bound on the first {s['bound_test']} test images "
        f"(one sample each), NLL on the first {s['nll_test']} with k = {s['eval_samples']} importance samples.",
        f"- Models: DRAW with T = {s['steps']} steps (paper: 64), {s['hidden']}-unit LSTMs, {s['z_dim']}-d z_t, read 2 x 2 / write 5 x 5 "
        "with attention; the VAE is the IWAE paper's one-layer x-200-200-z50. ELBO with the closed-form KL (`ELBO(analytic_kl=True)`, the paper's L^z), Adam lr "
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
    lines += ["", "Test ELBO (first %d test images) against training CPU time:" % min(500, s["bound_test"]), ""]
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
    if "draw" in results and "draw-attention" in results:
        a = torch.tensor(results["draw-attention"]["nll_per_image"])
        b = torch.tensor(results["draw"]["nll_per_image"])
        d, se = paired_difference(b, a)
        lines += [
            "",
            f"Attention against no attention at equal budget, paired over the same {a.numel()} test images: NLL(no attention) - "
            f"NLL(attention) = {d:.2f} ± {se:.2f} nats ({d / se:.1f} standard errors).",
        ]
    for name in names:
        r = results[name]
        gap = "" if PAPER[name] is None else f"; bound {-r['test_bound'] - PAPER[name]:.1f} nats above the paper's bound {PAPER[name]}"
        lines.append(f"- {name}: {r['train_cpu_s']} CPU-s ({r['train_wall_s']} s wall) of training{gap}; evaluation {r['eval_wall_s']} s wall; {r['capture']}")
    return "\n".join(lines) + "\n"


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


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir) / protocol_name(args)
    work.mkdir(parents=True, exist_ok=True)
    if args.only:
        result = run_one(args.only, args)
        atomic_write(work / f"{args.only}.json", lambda f: f.write(json.dumps(result).encode()))
        return 0
    t0 = time.perf_counter()
    pending = list(MODELS)
    running: list[tuple[str, subprocess.Popen]] = []
    passthrough = without_option(sys.argv[1:], "--jobs")
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
        print(f"draw_table: {failed} failed; no table written", file=sys.stderr)
        return 1
    results = {n: json.loads((work / f"{n}.json").read_text()) for n in MODELS}
    text = report(results, args, time.perf_counter() - t0)
    out = Path(args.out or f"benchmarks/results/draw_table{'_quick' if args.quick else '_full' if args.full else ''}.md")
    if args.quick and out.name == "draw_table.md":
        raise SystemExit("--quick never overwrites the committed draw_table.md; pass another --out")
    atomic_write(out, lambda f: f.write(text.encode()))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
