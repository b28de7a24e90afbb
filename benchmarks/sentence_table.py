"""Sentence VAE on Penn Treebank against Bowman et al. (2016), "Generating Sentences from a Continuous Space",
Table 2 (PTB language modelling): an RNN language model, a VAE without tricks (posterior collapse: KL near 0),
with KL annealing (logistic), with word dropout, and with both.

Reported per configuration, on a fixed random subset of PTB test sentences: NLL per sentence (importance
sampled, k samples of q; exact for the LM), perplexity exp(total NLL / predicted tokens, <eos> included), KL,
active units, the training curve (train ELBO and KL, validation ELBO after each segment) and a few samples
and homotopies.

Protocol (paper): the whole training set for many epochs, early stopping; LSTM 353/191 (embedding/hidden),
z 13 (we use the library default, 16), annealing and word dropout tuned per run. Ours: a CPU budget of a
fraction of an epoch, the same sizes, Adam at lr 1e-3, batch 32 sentences bucketed by length.

Usage::

    # the committed table (two processes of one thread, configurations split: 43 min wall on 2 CPU cores shared
    # with other jobs, load average ~11; about 20 min on 2 free cores)
    python benchmarks/sentence_table.py --configs LM VAE VAE+anneal & python benchmarks/sentence_table.py --configs VAE+wdrop VAE+anneal+wdrop
    # a smoke test in a minute or two (writes results/sentence_table.quick.md unless --out is given)
    python benchmarks/sentence_table.py --quick

Each finished configuration is saved as JSON under ``--work-dir``; the table is rendered from every saved
configuration with the same protocol, after each one finishes (atomically).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import pyro
import torch

from common import add_common_args, build, build_objective, command_line, fill_defaults, fmt, hardware_info, now, settings, start
from pyrovae.train.callbacks import EachEpoch
from pyrovae.utils.files import atomic_write
from pyrovae.data import load_dataset
from pyrovae.evaluate.text import evaluate_text, write_text_outputs
from pyrovae.data.text import BucketBatches, Sentences
from pyrovae.train import Trainer

#: name -> (latent model?, KL annealing?, word dropout p)
CONFIGS: dict[str, tuple[bool, bool, float]] = {
    "LM": (False, False, 0.0),
    "VAE": (True, False, 0.0),
    "VAE+anneal": (True, True, 0.0),
    "VAE+wdrop": (True, False, 0.5),
    "VAE+anneal+wdrop": (True, True, 0.5),
}

#: Bowman et al. (2016), Table 2, PTB test: NLL (nats per sentence), perplexity, KL. Their VAE used annealing and
#: word dropout; the LM is their LSTM baseline.
PAPER = {"LM": {"nll": 100.0, "ppl": 116.0, "kl": None}, "VAE": {"nll": 101.0, "ppl": 119.0, "kl": 2.0}}
PAPER_ROW = {"LM": "LM", "VAE+anneal+wdrop": "VAE"}

FULL = {"steps": 300, "segments": 3, "test_size": 400, "eval_samples": 10, "valid_size": 200}
QUICK = {"steps": 8, "segments": 2, "test_size": 40, "eval_samples": 2, "valid_size": 40}
PROTOCOL_KEYS = ("steps", "segments", "test_size", "eval_samples", "valid_size", "batch_size", "lr", "seed", "embed_dim", "hidden_dim", "z_dim", "word_dropout", "warmup_fraction")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK} instead of {FULL}")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=None, help="training steps (batches) per configuration")
    p.add_argument("--segments", type=int, default=None, help="points on the training curve")
    p.add_argument("--test-size", type=int, default=None, help="test sentences (a fixed random subset)")
    p.add_argument("--valid-size", type=int, default=None, help="validation sentences for the curve")
    p.add_argument("--eval-samples", "-k", type=int, default=None, help="importance samples per test sentence")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--embed-dim", type=int, default=353)
    p.add_argument("--hidden-dim", type=int, default=191)
    p.add_argument("--z-dim", type=int, default=16)
    p.add_argument("--word-dropout", type=float, default=0.5, help="p of the +wdrop configurations")
    p.add_argument("--warmup-fraction", type=float, default=0.6, help="logistic annealing reaches beta = 0.993 after this fraction of the steps")
    add_common_args(p, device=None, threads=1, seed="seed of initialisation and training", data="ptb")
    p.add_argument("--work-dir", default=None, help="per-configuration JSON and text outputs (default runs/sentence_table[_quick])")
    p.add_argument("--out", default=None, help="the table (default results/sentence_table.md; --quick: results/sentence_table.quick.md)")
    args = p.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL)
    results = Path(__file__).parent / "results"
    args.out = Path(args.out or results / ("sentence_table.quick.md" if args.quick else "sentence_table.md"))
    args.work_dir = Path(args.work_dir or ("runs/sentence_table_quick" if args.quick else "runs/sentence_table"))
    return args


def protocol(args) -> dict:
    return settings(args, PROTOCOL_KEYS)


def config(name: str, args) -> dict:
    """The registry's config of ``name``: the LSTM language model (no latent, no guide) or the sentence VAE and its RNN
    encoder; the ELBO, or KL annealing (``AnnealedELBO``, logistic over ``--warmup-fraction`` of the steps)."""
    latent, anneal, p = CONFIGS[name]
    sizes = {"embed_dim": args.embed_dim, "hidden": [[args.hidden_dim]]}
    if not latent:
        return {"model": "lm", "guide": "none", **sizes, "objective": "elbo"}
    cfg = {"model": "sentence", "guide": "rnn", "z_dims": [args.z_dim], **sizes, "word_dropout": args.word_dropout if p else 0.0}
    if anneal:
        return {**cfg, "objective": "annealed", "beta": 1.0, "beta_schedule": "logistic", "warmup_steps": max(1, int(args.warmup_fraction * args.steps))}
    return {**cfg, "objective": "elbo"}


class Segments:
    """The training curve's segments as the epochs of one ``Trainer.fit``: epoch ``s`` trains on the ``s``-th block of
    ``per_segment`` sentences of ``order``, bucketed by length (``fit``'s batch-source interface: ``__len__``,
    ``permutation()``, ``batch(perm, i)``, ``data``). ``epoch()`` is the trainer's current epoch."""

    def __init__(self, train: Sentences, order: torch.Tensor, per_segment: int, segments: int, batch_size: int, epoch: Callable[[], int]):
        self.parts = [BucketBatches(train.take(order[s * per_segment : (s + 1) * per_segment]), batch_size) for s in range(segments)]
        self.data, self.epoch = train.take(order[: segments * per_segment]), epoch

    def __len__(self) -> int:
        return len(self.parts[0])  # every segment holds the same number of sentences

    def permutation(self) -> torch.Tensor:
        return self.parts[self.epoch()].permutation()

    def batch(self, perm: torch.Tensor, index: int) -> Sentences:
        return self.parts[self.epoch()].batch(perm, index)


def run_config(name: str, args, splits, test, valid) -> dict:
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    cfg = config(name, args)
    model, guide = build(cfg, (len(splits.vocab),))
    objective = build_objective(cfg)
    trainer = Trainer(model, guide, objective, lr=args.lr, progress=False, capture="off")  # the step capture cannot record the LSTM backward
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(splits.train.num_sentences, generator=g)
    per_segment = args.steps // args.segments * args.batch_size
    segments = Segments(splits.train, order, per_segment, args.segments, args.batch_size, epoch=lambda: trainer.cursor.epoch)

    def each_segment(trainer: Trainer, h: dict) -> None:  # a point of the training curve
        curve.append({"step": h["step"], "sentences": h["epoch"] * per_segment, "train_elbo": h.get("train_elbo"), "train_kl": h.get("train_kl"), "valid_elbo": h.get("valid_elbo"), "beta": float(getattr(objective, "beta_t", 1.0)), "seconds": round(time.perf_counter() - t0, 1)})
        print(f"[{name}] step {h['step']}: train ELBO {h.get('train_elbo', float('nan')):.2f}, KL {h.get('train_kl', float('nan')):.2f}, valid ELBO {h.get('valid_elbo', float('nan')):.2f} ({curve[-1]['seconds']} s)", flush=True)

    curve, t0 = [], time.perf_counter()
    trainer.fit(segments, epochs=args.segments, batch_size=args.batch_size, valid=valid, callbacks=[EachEpoch(each_segment)])
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    k = args.eval_samples if CONFIGS[name][0] else 1
    result = evaluate_text(model, guide, test, num_samples=k)
    eval_seconds = time.perf_counter() - t1
    outputs = write_text_outputs(model, guide, test, splits.vocab, args.work_dir / name, num=6, max_length=30, seed=args.seed)
    result.pop("nll_values")
    return {
        "name": name, "protocol": protocol(args), "result": result, "curve": curve, "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1), "eval_samples": k, "capture": trainer.capture_report, "outputs": outputs,
        "finished": now(),
    }


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


def render(args, entries: dict, hw: dict, splits_info: str) -> str:
    pr = protocol(args)
    lines = [
        "# Sentence VAE on Penn Treebank: obtained vs Bowman et al. (2016)",
        "",
        "Bowman, Vilnis, Vinyals, Dai, Jozefowicz & Bengio (2016), *Generating Sentences from a Continuous Space*, Table 2 (PTB test). "
        "Written by `benchmarks/sentence_table.py`; regenerate with the commands below.",
        "",
        f"> **A small CPU budget, not the paper's protocol.** Each configuration trains for {pr['steps']} steps of {pr['batch_size']} sentences "
        f"({pr['steps'] * pr['batch_size']:,} sentences, {pr['steps'] * pr['batch_size'] / 42068:.2f} of an epoch; the paper trains for many epochs "
        f"with early stopping) with the paper's LSTM sizes (embedding {pr['embed_dim']}, hidden {pr['hidden_dim']}; z {pr['z_dim']}). "
        f"NLL on a fixed random subset of {pr['test_size']} of the 3761 test sentences. The models are far from converged: "
        "compare the configurations with each other (same data, same steps), and read the distance to the paper as the cost of the budget.",
        "",
        "| configuration | test NLL | ± (data) | PPL | KL | active units | test ELBO | paper NLL | paper PPL | paper KL | Δ NLL to paper | train time | eval time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in CONFIGS:
        e = entries.get(name)
        if e is None:
            continue
        r = e["result"]
        paper = PAPER.get(PAPER_ROW.get(name, ""), {})
        au = "—" if not r["active_units"] else "+".join(str(v) for v in r["active_units"].values()) + f" of {pr['z_dim']}"
        delta = None if not paper else r["nll"] - paper["nll"]
        lines.append(
            f"| {name} | {fmt(r['nll'])} | {fmt(r['nll_stderr_over_data'])} | {fmt(r['perplexity'], 1)} | {fmt(r['kl'])} | {au} | {fmt(r['elbo'])} | "
            f"{fmt(paper.get('nll'), 0)} | {fmt(paper.get('ppl'), 0)} | {fmt(paper.get('kl'), 0)} | {'—' if delta is None else f'{delta:+.1f}'} | "
            f"{e['train_seconds'] / 60:.1f} min | {e['eval_seconds']:.0f} s |"
        )
    k = pr["eval_samples"]
    lines += [
        "",
        f"- test NLL: -log p(x) per sentence, mean over the {pr['test_size']} test sentences; for the VAEs importance sampled with k = {k} samples of q "
        "(`pyrovae.evaluate.text.evaluate_text`, which calls `pyrovae.evaluate.log_likelihood` per length bucket), exact for the LM (no latent variable). "
        "± (data): standard error over sentences. The same sentences for every row: differences between rows are paired.",
        ppl_note(entries),
        "- KL: single-sample estimate of KL(q(z|x) || p(z)) per sentence on the same test sentences; active units: Cov_x(E_q[z_u|x]) > 0.01.",
        f"- paper rows: the LM row against the paper's LSTM LM, VAE+anneal+wdrop against the paper's VAE (annealing and word dropout). KL annealing here: "
        f"logistic, beta from 0.007 to 0.993 over the first {pr['warmup_fraction']:.0%} of the steps (`AnnealedELBO`); word dropout p = {pr['word_dropout']}.",
        "",
        "## Training curves",
        "",
        "Per segment of training: the mean training ELBO and KL over that segment's steps (under the annealed objective, the ELBO is still the true bound), "
        f"and the validation ELBO on {pr['valid_size']} validation sentences after it.",
        "",
        "| configuration | step | train ELBO | train KL | valid ELBO | beta | elapsed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in CONFIGS:
        e = entries.get(name)
        for c in e["curve"] if e else []:
            lines.append(f"| {name} | {c['step']} | {fmt(c['train_elbo'])} | {fmt(c['train_kl'])} | {fmt(c['valid_elbo'])} | {c['beta']:.3f} | {c['seconds']:.0f} s |")
    lines += ["", "## Samples and homotopies", ""]
    for name in CONFIGS:
        e = entries.get(name)
        if not e:
            continue
        out = e["outputs"]
        what = "greedy decoding of z ~ N(0, I), then a sampled decoding of the same z" if CONFIGS[name][0] else "greedy decoding, then a sampled one"
        lines += [f"### {name}", "", f"Samples ({what}):", "", "```"]
        lines += [s for s in out.get("samples", [])[:4]]
        lines += ["```", ""]
        if "reconstructions" in out:
            lines += ["Reconstructions (greedy from the posterior mean):", "", "```", *out["reconstructions"][:3], "```", ""]
        if "homotopies" in out:
            lines += ["Homotopies (5-step linear interpolation between the codes of two test sentences, greedy):", "", "```", *out["homotopies"][:2], "```", ""]
    lines += [
        "## Run",
        "",
        f"- data: {splits_info}",
        f"- hardware: {hw['cpu']} ({hw['cpu_cores']} cores, shared with other jobs), {hw['torch_threads']} torch thread(s) per process, device {hw['device']}; "
        f"torch {hw['torch']}, pyro {hw['pyro']}, Python {hw['python']}",
        f"- finished: " + ", ".join(f"{n} {entries[n]['finished']}" for n in CONFIGS if n in entries),
        "- training steps: " + "; ".join(f"{n}: {entries[n]['capture']}" for n in CONFIGS if n in entries),
        "- commands (two processes, one thread each):",
        "",
        "```",
        *sorted({e.get("command", "") for e in entries.values()}),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    start(args)
    started = time.perf_counter()
    splits = load_dataset("ptb", data_dir=args.data_dir)
    g = torch.Generator().manual_seed(1234)
    test = splits.test.take(torch.randperm(splits.test.num_sentences, generator=g)[: args.test_size])
    valid = splits.valid.take(torch.randperm(splits.valid.num_sentences, generator=g)[: args.valid_size]).trim()
    hw = hardware_info(torch.device("cpu"))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for name in args.configs:
        entry = run_config(name, args, splits, test, valid)
        entry["command"] = command_line()
        atomic_write(args.work_dir / f"{name}.json", lambda f: f.write(json.dumps(entry, indent=1).encode()))
        entries = {}
        for f in args.work_dir.glob("*.json"):
            e = json.loads(f.read_text())
            if e.get("protocol") == protocol(args) and e.get("name") in CONFIGS:
                entries[e["name"]] = e
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table = render(args, entries, hw, splits.describe())
        atomic_write(args.out, lambda f: f.write(table.encode()))
        r = entry["result"]
        print(f"[{name}] NLL {r['nll']:.2f} PPL {r['perplexity']:.1f} KL {r['kl']:.2f} AU {r['active_units']}; paper: {PAPER.get(PAPER_ROW.get(name, ''), '—')}; "
              f"wrote {args.out} ({(time.perf_counter() - started) / 60:.1f} min so far)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
