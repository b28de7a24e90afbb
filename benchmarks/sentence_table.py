"""Sentence VAE on Penn Treebank against Bowman et al. (2016), "Generating Sentences from a Continuous Space",
Table 2 (PTB language modelling): an LSTM language model and the sentence VAE (KL annealing and word dropout, the
paper's recipe; VAE without tricks, with one of them, for the collapse study).

Protocol: each configuration is one ``pyrovae train`` run (the library's CLI: the same trainer, objectives,
checkpoints and evaluation as any run) on all 42,068 PTB training sentences for ``--epochs`` epochs, batches of 32
sentences bucketed by length, Adam at lr 1e-3, the paper's LSTM sizes (embedding 353, hidden 191, one layer; z 16
where the paper has 13). After each epoch the validation ELBO on all 3,370 validation sentences picks the best
checkpoint (early stopping's model selection); that checkpoint is evaluated on all 3,761 test sentences: NLL per
sentence by importance sampling with k samples of q (exact for the LM), perplexity, ELBO, KL, active units, samples,
reconstructions and homotopies.

Runs take hours: the script resumes. Run it again with the same arguments and a configuration whose run folder
holds a checkpoint continues from it (``pyrovae train --resume``); one with ``evaluation.json`` is read, not
retrained. The table is rendered from every finished run folder after each configuration (atomically).

Usage::

    # the committed table: two processes of one thread (one configuration each)
    OMP_NUM_THREADS=1 nohup python benchmarks/sentence_table.py --configs LM --work-dir runs/sentence_table &
    OMP_NUM_THREADS=1 nohup python benchmarks/sentence_table.py --configs VAE+anneal+wdrop --work-dir runs/sentence_table &
    # a smoke test in a few minutes (writes results/sentence_table.quick.md unless --out is given)
    python benchmarks/sentence_table.py --quick
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from common import add_common_args, command_line, fill_defaults, fmt, hardware_info, now, settings

from pyrovae.utils.files import atomic_write

#: name -> (latent model?, KL annealing?, word dropout?)
CONFIGS: dict[str, tuple[bool, bool, bool]] = {
    "LM": (False, False, False),
    "VAE": (True, False, False),
    "VAE+anneal": (True, True, False),
    "VAE+wdrop": (True, False, True),
    "VAE+anneal+wdrop": (True, True, True),
}

#: Bowman et al. (2016), Table 2, PTB test: NLL (nats per sentence), perplexity, KL. Their VAE used annealing and
#: word dropout; the LM is their LSTM baseline. Their VAE's NLL is its variational bound's value (the ELBO's negative).
PAPER = {"LM": {"nll": 100.0, "ppl": 116.0, "kl": None}, "VAE": {"nll": 101.0, "ppl": 119.0, "kl": 2.0}}
PAPER_ROW = {"LM": "LM", "VAE+anneal+wdrop": "VAE"}
PTB_TRAIN = 42068

FULL = {"epochs": 10, "eval_samples": 50, "train_limit": None, "eval_limit": None}
QUICK = {"epochs": 1, "eval_samples": 2, "train_limit": 320, "eval_limit": 40}
PROTOCOL_KEYS = ("epochs", "eval_samples", "train_limit", "eval_limit", "batch_size", "lr", "seed", "embed_dim", "hidden_dim", "z_dim", "word_dropout", "warmup_steps")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK} instead of {FULL}")
    p.add_argument("--configs", nargs="+", default=["LM", "VAE+anneal+wdrop"], choices=list(CONFIGS))
    p.add_argument("--epochs", type=int, default=None, help="training epochs per configuration (all of PTB's training set each)")
    p.add_argument("--eval-samples", "-k", type=int, default=None, help="importance samples per test sentence (VAEs)")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N sentences only (smoke tests)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N test sentences only (smoke tests)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--embed-dim", type=int, default=353)
    p.add_argument("--hidden-dim", type=int, default=191)
    p.add_argument("--z-dim", type=int, default=16)
    p.add_argument("--word-dropout", type=float, default=0.25, help="p of the +wdrop configurations")
    p.add_argument("--warmup-steps", type=int, default=5000, help="logistic KL annealing from beta 0.007 to 0.993 over this many steps (+anneal)")
    add_common_args(p, device=None, threads=1, seed="seed of initialisation and training", data="ptb")
    p.add_argument("--work-dir", default=None, help="one run folder per configuration (default runs/sentence_table[_quick])")
    p.add_argument("--out", default=None, help="the table (default results/sentence_table.md; --quick: results/sentence_table.quick.md)")
    args = p.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL)
    results = Path(__file__).parent / "results"
    args.out = Path(args.out or results / ("sentence_table.quick.md" if args.quick else "sentence_table.md"))
    args.work_dir = Path(args.work_dir or ("runs/sentence_table_quick" if args.quick else "runs/sentence_table"))
    return args


def protocol(args) -> dict:
    return settings(args, PROTOCOL_KEYS)


def folder(name: str) -> str:
    return name.lower().replace("+", "-")


def train_flags(name: str, args) -> list[str]:
    """The ``pyrovae train`` options of ``name``: the LSTM language model (no latent, no guide) or the sentence VAE
    with its RNN encoder; the ELBO, or KL annealing (``--objective annealed``, logistic over ``--warmup-steps``)."""
    latent, anneal, wdrop = CONFIGS[name]
    flags = ["--dataset", "ptb", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
             "--embed-dim", str(args.embed_dim), "--hidden", str(args.hidden_dim), "--threads", str(args.threads or 1), "--no-progress"]
    flags += ["--eval-samples", str(args.eval_samples if latent else 1)]
    flags += ["--train-limit", str(args.train_limit)] if args.train_limit else []
    flags += ["--eval-limit", str(args.eval_limit)] if args.eval_limit else []
    flags += ["--data-dir", args.data_dir] if args.data_dir else []
    if not latent:
        return flags + ["--model", "lm"]
    flags += ["--model", "sentence", "--z-dims", str(args.z_dim), "--word-dropout", str(args.word_dropout if wdrop else 0.0)]
    if anneal:
        return flags + ["--objective", "annealed", "--beta-schedule", "logistic", "--warmup-steps", str(args.warmup_steps)]
    return flags + ["--objective", "elbo"]


#: config.json keys that must match the protocol for a run folder to be resumed or read
def expected_config(name: str, args) -> dict:
    latent, anneal, wdrop = CONFIGS[name]
    cfg = {"dataset": "ptb", "model": "sentence" if latent else "lm", "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
           "seed": args.seed, "embed_dim": args.embed_dim, "train_limit": args.train_limit, "eval_limit": args.eval_limit,
           "eval_samples": args.eval_samples if latent else 1}
    if latent:
        cfg.update(word_dropout=args.word_dropout if wdrop else 0.0, objective="annealed" if anneal else "elbo", z_dims=[args.z_dim])
        if anneal:
            cfg.update(beta_schedule="logistic", warmup_steps=args.warmup_steps)
    return cfg


def check_run(run_dir: Path, name: str, args) -> None:
    """Refuse a run folder made with other settings (it would be resumed or read as this protocol's)."""
    cfg = json.loads((run_dir / "config.json").read_text())
    wrong = {k: (cfg.get(k), v) for k, v in expected_config(name, args).items() if cfg.get(k) != v}
    hidden = cfg.get("hidden")
    if not (hidden in ([[args.hidden_dim]], [args.hidden_dim]) or hidden is None and args.hidden_dim == 191):  # None: the text default, 191
        wrong["hidden"] = (hidden, args.hidden_dim)
    if wrong:
        raise SystemExit(f"{run_dir} holds a run with other settings ({', '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in wrong.items())}); "
                         "give another --work-dir, or the arguments it was made with")


def run_config(name: str, args) -> Path:
    """Train (or resume) and evaluate ``name`` in its run folder, through ``pyrovae train``; returns the folder."""
    run_dir = args.work_dir / folder(name)
    if (run_dir / "evaluation.json").exists():
        check_run(run_dir, name, args)
        print(f"[{name}] finished before: reading {run_dir}", flush=True)
        return run_dir
    if (run_dir / "checkpoints" / "last.pt").exists():
        check_run(run_dir, name, args)
        cmd = ["--run-dir", str(run_dir), "--resume"]
    else:
        cmd = [*train_flags(name, args), "--run-dir", str(run_dir)] + (["--overwrite"] if run_dir.exists() else [])
    cmd = [sys.executable, "-c", "import sys; from pyrovae.cli import main; sys.exit(main())", "train", *cmd]
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    code = subprocess.run(cmd).returncode
    if code != 0 or not (run_dir / "evaluation.json").exists():
        raise SystemExit(f"[{name}] pyrovae train stopped with exit code {code}; run this script again with the same arguments to continue")
    return run_dir


def read_run(name: str, run_dir: Path) -> dict:
    """What the table shows of a finished run: its evaluation, per-epoch curve, text outputs and timing."""
    ev = json.loads((run_dir / "evaluation.json").read_text())
    curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    outputs = {}
    for kind in ("samples", "reconstructions", "homotopies"):
        path = run_dir / f"{kind}.txt"
        if path.exists():
            outputs[kind] = [line for line in path.read_text().splitlines() if line.strip()]
    return {"name": name, "evaluation": ev, "curve": curve, "outputs": outputs, "train_seconds": sum(c.get("seconds", 0.0) for c in curve),
            "config": json.loads((run_dir / "config.json").read_text()), "folder": run_dir.name}


def ppl_note(entries: dict) -> str:
    """What the PPL column counts. PPL = exp(sum NLL / sum tokens), so mean NLL / log PPL is the tokens per sentence."""
    r = next(e["result"] for e in entries.values() if e)
    tokens = r["nll"] / math.log(r["perplexity"])
    lm = PAPER["LM"]
    return (
        f"- PPL: exp(total NLL / number of predicted tokens), counting each sentence's words and its `<eos>` ({tokens:.1f} tokens per "
        f"sentence on these test sentences). The paper does not say what its PPL counts: its LM's NLL {lm['nll']:.0f} and PPL {lm['ppl']:.0f} "
        f"imply {lm['nll'] / math.log(lm['ppl']):.1f} tokens per sentence, while at this count NLL {lm['nll']:.0f} is PPL "
        f"{math.exp(lm['nll'] / tokens):.1f}. Compare the NLL with the paper's, not the PPL; the PPL column compares the rows here."
    )


def result_of(e: dict) -> dict:
    ev = e["evaluation"]
    return {"nll": ev["test_nll"], "perplexity": ev["test_perplexity"], "elbo": ev["test_elbo"], "kl": ev["test_kl"], "stderr": ev["test_nll_stderr_over_data"],
            "importance_stderr": ev.get("test_nll_importance_stderr"), "active_units": ev.get("active_units") or {}, "num_test": ev["num_test"], "num_samples": ev["num_samples"]}


def render(args, entries: dict) -> str:
    pr = protocol(args)
    for e in entries.values():
        e["result"] = result_of(e)
    epochs_done = {n: len(e["curve"]) for n, e in entries.items()}
    train = "all 42,068" if not pr["train_limit"] else f"the first {pr['train_limit']:,} of the 42,068"
    lines = [
        "# Sentence VAE on Penn Treebank: obtained vs Bowman et al. (2016)",
        "",
        "Bowman, Vilnis, Vinyals, Dai, Jozefowicz & Bengio (2016), *Generating Sentences from a Continuous Space*, Table 2 (PTB test). "
        "Written by `benchmarks/sentence_table.py`; regenerate with the commands below.",
        "",
        f"> **Protocol.** Each configuration is one `pyrovae train` run on {train} PTB training sentences for {pr['epochs']} epochs "
        f"(batches of {pr['batch_size']} sentences bucketed by length, Adam lr {pr['lr']:g}), the paper's LSTM sizes (embedding {pr['embed_dim']}, "
        f"hidden {pr['hidden_dim']}, one layer; z {pr['z_dim']}, the paper's 13). The checkpoint with the best validation ELBO (all 3,370 validation "
        "sentences, after each epoch) is evaluated on " + ("all 3,761" if not pr["eval_limit"] else f"the first {pr['eval_limit']} of the 3,761") +
        " test sentences. The paper trains to early stopping on validation; its epochs are not reported.",
        "",
        "| configuration | test NLL | ± (data) | PPL | test -ELBO | KL | active units | paper NLL | paper PPL | paper KL | Δ NLL to paper | best epoch | epochs | train time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in CONFIGS:
        e = entries.get(name)
        if e is None:
            continue
        r = e["result"]
        paper = PAPER.get(PAPER_ROW.get(name, ""), {})
        au = "—" if not CONFIGS[name][0] else "+".join(str(v) for v in r["active_units"].values()) + f" of {pr['z_dim']}"
        delta = None if not paper else r["nll"] - paper["nll"]
        best = max(e["curve"], key=lambda c: c.get("valid_elbo", -math.inf)) if e["curve"] else {}
        lines.append(
            f"| {name} | {fmt(r['nll'])} | {fmt(r['stderr'])} | {fmt(r['perplexity'], 1)} | {fmt(-r['elbo'])} | {fmt(r['kl']) if CONFIGS[name][0] else '—'} | {au} | "
            f"{fmt(paper.get('nll'), 0)} | {fmt(paper.get('ppl'), 0)} | {fmt(paper.get('kl'), 0)} | {'—' if delta is None else f'{delta:+.1f}'} | "
            f"{best.get('epoch', '—')} | {epochs_done[name]} | {e['train_seconds'] / 60:.0f} min |"
        )
    k = pr["eval_samples"]
    lines += [
        "",
        f"- test NLL: -log p(x) per sentence, mean over the test sentences; for the VAEs importance sampled with k = {k} samples of q "
        "(`pyrovae.evaluate.text.evaluate_text`, which calls `pyrovae.evaluate.log_likelihood` per length bucket), exact for the LM (no latent variable). "
        "± (data): standard error over sentences. The same sentences for every row: differences between rows are paired. "
        "test -ELBO: the single-sample bound's negative on the same sentences (for the LM, the same as its NLL).",
        ppl_note(entries),
        "- KL: single-sample estimate of KL(q(z|x) || p(z)) per sentence on the same test sentences; active units: Cov_x(E_q[z_u|x]) > 0.01.",
        "- paper rows: the LM row against the paper's LSTM LM, VAE+anneal+wdrop against the paper's VAE (annealing and word dropout). The paper's VAE NLL "
        "is reported as its bound; compare it with both our NLL and our -ELBO (they differ by the importance-sampling gain, small when KL is small).",
        f"- KL annealing: logistic, beta from 0.007 to 0.993 over the first {pr['warmup_steps']} steps (`--objective annealed --beta-schedule logistic`; "
        f"{pr['warmup_steps'] / max(1, (pr['train_limit'] or PTB_TRAIN) / pr['batch_size']):.1f} epochs); word dropout p = {pr['word_dropout']} "
        "(decoder inputs replaced by `<unk>` while training).",
    ]
    for name in CONFIGS:
        e = entries.get(name)
        if e and PAPER_ROW.get(name) == "VAE":
            lm = entries.get("LM")
            r = e["result"]
            gap = "" if lm is None else f"; NLL {r['nll'] - lm['result']['nll']:+.2f} nats against our LM (the issue asks within 3)"
            lines.append(f"- **{name}**: KL {r['kl']:.2f} nats (the paper's VAE: 2){gap}; {'not collapsed' if r['kl'] > 1 else 'collapsed (KL under 1 nat)'}.")
    lines += ["", "## Distance from the paper", "", *distances(entries), ""]
    lines += [
        "## Training curves",
        "",
        "Per epoch: the mean training ELBO and KL over the epoch's steps (under the annealed objective the logged ELBO is still the true bound; "
        "the loss is the annealed one), and the validation ELBO on all 3,370 validation sentences after it. Epoch time: wall time of the "
        "epoch's steps on the 2-core machine shared with other runs (up to four jobs at once early on), not a speed measurement "
        "(`benchmarks/results/text_speed.md` is: about 3 to 4 minutes per epoch on a free core).",
        "",
        "| configuration | epoch | step | train ELBO | train KL | valid ELBO | epoch time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in CONFIGS:
        e = entries.get(name)
        for c in e["curve"] if e else []:
            lines.append(f"| {name} | {c['epoch']} | {c['step']} | {fmt(c.get('train_elbo'))} | {fmt(c.get('train_kl'))} | {fmt(c.get('valid_elbo'))} | {c.get('seconds', 0) / 60:.1f} min |")
    lines += ["", "## Samples and homotopies", ""]
    for name in CONFIGS:
        e = entries.get(name)
        if not e:
            continue
        out = e["outputs"]
        what = "greedy decoding of z ~ N(0, I), then a sampled decoding of the same z" if CONFIGS[name][0] else "greedy decoding, then a sampled one"
        lines += [f"### {name}", "", f"Samples ({what}):", "", "```", *out.get("samples", [])[:8], "```", ""]
        if "reconstructions" in out:
            lines += ["Reconstructions (greedy from the posterior mean):", "", "```", *out["reconstructions"][:6], "```", ""]
        if "homotopies" in out:
            lines += ["Homotopies (5-step linear interpolation between the codes of two test sentences, greedy):", "", "```", *out["homotopies"][:14], "```", ""]
    cfgs = {n: e["config"] for n, e in entries.items()}
    lines += [
        "## Run",
        "",
        f"- data: {next(iter(entries.values()))['evaluation'].get('data')}",
        f"- hardware (this machine, where the runs were trained and the table rendered): {hw_line()}",
        f"- run folders: {', '.join(e['folder'] for e in entries.values())} under `--work-dir` (config.json, metrics.jsonl, checkpoints, evaluation.json)",
        f"- rendered: {now()}; torch threads per run: " + ", ".join(f"{n} {c.get('threads')}" for n, c in cfgs.items()),
        "- commands (one process of one thread per configuration, run in parallel):",
        "",
        "```",
        *sorted({e.get("command", "") for e in entries.values() if e.get("command")}),
        "```",
        "",
        "- each configuration's training run (`pyrovae train` with these options; its `config.json` holds every setting):",
        "",
        "```",
        *[f"{n}: pyrovae train {' '.join(train_flags(n, args))}" for n in CONFIGS if n in entries],
        "```",
        "",
    ]
    return "\n".join(lines)


def distances(entries: dict) -> list[str]:
    """Per row with a paper number: the gap, and what the training curve says about it (where validation peaked, how
    far training and validation bounds had drawn apart, whether validation was still improving)."""
    out = []
    for name in CONFIGS:
        e = entries.get(name)
        paper = PAPER.get(PAPER_ROW.get(name, ""))
        if not e or not paper or not e["curve"]:
            continue
        r, curve = e["result"], e["curve"]
        best = max(curve, key=lambda c: c.get("valid_elbo", -math.inf))
        last = curve[-1]
        step = last["valid_elbo"] - curve[-2]["valid_elbo"] if len(curve) > 1 else None
        if best is last and step is not None and step >= 0.1:
            state = (f"validation was still improving at the last epoch ({last['epoch']}: {last['valid_elbo']:.2f}, {step:+.2f} over the epoch "
                     "before), so more epochs would lower its NLL")
        elif best is last:
            state = (f"validation was best at the last epoch but had levelled off ({last['epoch']}: {last['valid_elbo']:.2f}, {step:+.2f} over the "
                     f"epoch before; train {last['train_elbo']:.2f}): more epochs at this learning rate would change it little" if step is not None else "one epoch only")
        else:
            state = (f"validation peaked at epoch {best['epoch']} ({best['valid_elbo']:.2f}) and then worsened while training kept improving "
                     f"(epoch {last['epoch']}: train {last['train_elbo']:.2f}, valid {last['valid_elbo']:.2f}): the model overfits, and the "
                     "run uses no regularisation beyond the paper's recipe (no dropout on the LSTM), whose settings for this the paper does not give")
        out.append(f"- **{name}**: test NLL {r['nll']:.2f}, {r['nll'] - paper['nll']:+.2f} nats from the paper's {paper['nll']:.0f}; {state}.")
    return out


def hw_line() -> str:
    info = hardware_info(torch.device("cpu"))
    return f"{info['cpu']} ({info['cpu_cores']} cores), device cpu; torch {info['torch']}, pyro {info['pyro']}, Python {info['python']}"


def collect(args) -> dict:
    """Every finished configuration of this protocol in ``--work-dir``."""
    entries = {}
    for name in CONFIGS:
        run_dir = args.work_dir / folder(name)
        if not (run_dir / "evaluation.json").exists():
            continue
        try:
            check_run(run_dir, name, args)
        except SystemExit:
            continue
        entries[name] = read_run(name, run_dir)
        stamp = run_dir / "table-command.txt"
        entries[name]["command"] = stamp.read_text().strip() if stamp.exists() else None
    return entries


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for name in args.configs:
        run_dir = run_config(name, args)
        stamp = run_dir / "table-command.txt"
        if not stamp.exists():
            atomic_write(stamp, lambda f: f.write(command_line().encode()))
        entries = collect(args)
        table = render(args, entries)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, lambda f: f.write(table.encode()))
        r = entries[name]["result"]
        print(f"[{name}] NLL {r['nll']:.2f} PPL {r['perplexity']:.1f} KL {r['kl']:.2f} AU {r['active_units']}; paper: {PAPER.get(PAPER_ROW.get(name, ''), '—')}; "
              f"wrote {args.out} ({(time.perf_counter() - started) / 60:.1f} min so far)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
