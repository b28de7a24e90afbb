"""Training-step time of the sentence VAE on a PTB batch: the library against the same model hand-written in PyTorch,
and against the time the step's FLOPs need (the FLOP limit).

Bowman et al. (2016)'s sizes (vocabulary 10,002, LSTM 353/191, z 16, unidirectional encoder) and a small model
(32/64, the slow tests' sizes), a batch of
``--batch`` PTB training sentences drawn by :class:`pyrovae.data.text.BucketBatches` (the most common batch width),
``pyrovae.objectives.ELBO``, Adam (the trainer's: fused). Four implementations, timed interleaved in rounds (medians
and per-round paired ratios, as ``speed.py``):

- ``hand-written``: the same model in plain PyTorch, no Pyro (:class:`HandWritten`: ``torch.nn.LSTM``, the softmax on
  the predicted positions, fused Adam): what a user would write by hand;
- ``torch-lstm``: the library's model with ``torch.nn.LSTM`` layers (the fused kernel), ``capture="off"``;
- ``plain``: the library's text models (:class:`pyrovae.nn.recurrent.RNN`, a loop of cells), ``capture="off"``;
- ``replay``: the same with the trainer's default ``capture="replay"``. The text models' softmax on the predicted
  positions (``PackedCategorical``) has shapes that depend on the data, which the capture refuses to record: this
  row runs the plain step too (the report says why), and shows what the trainer's default costs.

Beside the times: the step's floating-point operations (``torch.utils.flop_counter.FlopCounterMode`` over one plain
step, forward and backward: matrix products, which are nearly all of it) and the machine's measured matrix-product
rate (a 1024 x 1024 float32 ``torch.mm`` at the run's thread count), so each step time is also given as a multiple of
the time its FLOPs need at that rate (issue 27: the FLOP limit).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/text_speed.py --out benchmarks/results/text_speed.md
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TIME_LABELS, adam_alone, add_common_args, build, command_line, count_flops, cpu_model, cpu_seconds, floor_seconds, matmul_rate, now, products_alone, start, time_breakdown  # noqa: E402

from pyrovae.utils.files import atomic_write  # noqa: E402
from pyrovae.data import load_dataset  # noqa: E402
from pyrovae.objectives import ELBO  # noqa: E402
from pyrovae.data.text import BucketBatches, Sentences  # noqa: E402
from pyrovae.nn.likelihoods import PackedCategorical  # noqa: E402
from pyrovae.train import Trainer  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "text_speed.md"
IMPLS = ("hand-written", "torch-lstm", "plain", "replay")
#: the parts of the floor, in table order: the lower of the two product times, plus the optimiser and the softmax
FLOOR_PARTS = ("products alone", "products in the step", "optimiser alone", "softmax alone")


#: Bowman et al.'s sizes, and the small model of the slow tests (where Pyro's Python is a larger share of a step)
SIZES = {"paper": dict(embed_dim=353, hidden_dim=191), "small": dict(embed_dim=32, hidden_dim=64)}


def floor_ms(floor: dict) -> float:
    """The floor in ms: the step's products (the lower of their time alone and in the step), its optimiser, its softmax."""
    return 1e3 * floor_seconds(floor)


def ptb_batch(data_dir: Optional[str], batch: int) -> tuple[Sentences, int]:
    """A batch (and the vocabulary size): the most common width among the bucketed batches of PTB's training set (seeded)."""
    splits = load_dataset("ptb", data_dir=data_dir)
    batches = BucketBatches(splits.train, batch, generator=torch.Generator().manual_seed(0))
    perm = batches.permutation()
    widths = Counter(batches.batch(perm, i).tokens.shape[1] for i in range(len(batches)))
    width = widths.most_common(1)[0][0]
    return next(b for b in batches.epoch(perm) if b.tokens.shape[1] == width and b.num_sentences == batch), len(splits.vocab)


def with_torch_lstm(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose :class:`pyrovae.nn.recurrent.RNN` layers are ``torch.nn.LSTM`` with the same weights."""
    from pyrovae.nn.recurrent import RNN

    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RNN):
                lstm = torch.nn.LSTM(child.input_size, child.hidden_size, child.num_layers, batch_first=True)
                lstm.load_state_dict(child.state_dict())
                setattr(parent, name, lstm)
    return module


def step_flops(trainer: Trainer, store: dict, batch: Sentences) -> int:
    """FLOPs of one training step's forward and backward pass (the plain step: the same arithmetic as the others)."""
    with pyro.get_param_store().scope(store):
        return count_flops(trainer.gradients.plain, tuple(batch))


def softmax_alone(batch: Sentences, vocab_size: int, repeats: int = 5) -> float:
    """CPU seconds of the vocabulary softmax alone, forward and backward, on random logits for the batch's predicted
    tokens: the library's :class:`PackedCategorical` log-probability (the cheapest of the implementations timed here;
    ``cross_entropy`` takes longer), median of ``repeats``."""
    where = torch.arange(batch.tokens.shape[1] - 1) < batch.lengths[:, None]
    logits = torch.randn(int(where.sum()), vocab_size, requires_grad=True)
    words = batch.tokens[:, 1:]

    def once() -> None:
        logits.grad = None
        PackedCategorical(logits, where).log_prob(words).sum().backward()

    return cpu_seconds(once, repeats)


class HandWritten(torch.nn.Module):
    """The sentence VAE written directly in PyTorch, no Pyro: ``torch.nn.LSTM`` encoder and decoder at the same sizes
    as the library's model, the encoder's state at each sentence's last token -> N(mu, softplus(s)^2), one sample of
    z, the decoder initialised from tanh(W z + b), the softmax on the predicted positions only, the single-sample
    ELBO (Monte-Carlo KL, as ``ELBO()``), fused Adam. The reference a user would write by hand."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, z_dim: int = 16, latent: bool = True):
        super().__init__()
        self.latent = latent  # False: the LSTM language model (the decoder from a zero state, no encoder)
        self.dec_embed = torch.nn.Embedding(vocab_size, embed_dim)
        self.dec = torch.nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.out = torch.nn.Linear(hidden_dim, vocab_size)
        if latent:
            self.enc_embed = torch.nn.Embedding(vocab_size, embed_dim)
            self.enc = torch.nn.LSTM(embed_dim, hidden_dim, batch_first=True)
            self.head, self.init = torch.nn.Linear(hidden_dim, 2 * z_dim), torch.nn.Linear(z_dim, 2 * hidden_dim)
        self.optim = torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)

    def loss(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        words = tokens[:, 1:]
        where = torch.arange(words.shape[1]) < lengths[:, None]
        if not self.latent:
            h, _ = self.dec(self.dec_embed(tokens[:, :-1]))
            return torch.nn.functional.cross_entropy(self.out(h[where]), words[where], reduction="sum") / tokens.shape[0]
        h, _ = self.enc(self.enc_embed(words))
        last = h.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
        mu, s = self.head(last).chunk(2, -1)
        q = torch.distributions.Normal(mu, torch.nn.functional.softplus(s))
        z = q.rsample()
        kl = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(-1)
        h0, c0 = torch.tanh(self.init(z)).chunk(2, -1)
        h, _ = self.dec(self.dec_embed(tokens[:, :-1]), (h0[None].contiguous(), c0[None].contiguous()))
        nll = torch.nn.functional.cross_entropy(self.out(h[where]), words[where], reduction="sum")
        return (nll + kl.sum()) / tokens.shape[0]

    def step(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        self.optim.zero_grad(set_to_none=True)
        self.loss(tokens, lengths).backward()
        self.optim.step()


def make(impl: str, model, guide) -> Trainer:
    if impl == "torch-lstm":
        model, guide = with_torch_lstm(model), with_torch_lstm(guide)
        # the decoder's zero/initial state comes from its RNN; z always gives it here
    else:
        model, guide = copy.deepcopy(model), copy.deepcopy(guide)
    return Trainer(model, guide, ELBO(), lr=1e-3, progress=False, capture="replay" if impl == "replay" else "off")


def block(trainer, store: dict, batch: Sentences, steps: int) -> tuple[float, float]:
    with pyro.get_param_store().scope(store):  # each trainer keeps its own parameter store
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            trainer.step(*batch)
        return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Ratio of medians, and the range of the per-round (paired) ratios."""
    per = [x / y for x, y in zip(a, b)]
    return statistics.median(a) / statistics.median(b), min(per), max(per)


def measure(args, batch: Sentences, vocab_size: int, sizes: dict, label: str) -> tuple[dict, dict, int, dict, list, dict]:
    """Per-step wall-clock and CPU seconds of each implementation, one entry per round, the step's FLOPs, where
    each implementation's step time goes (:func:`common.time_breakdown`), the matrix-product rate at the start of
    each round (the caller holds the steps against the highest rate of the run), and the floor: CPU seconds of the
    step's matrix products, its optimiser and its softmax, each timed alone (:func:`common.products_alone`,
    :func:`common.adam_alone`, :func:`softmax_alone`)."""
    pyro.set_rng_seed(0)
    cfg = {"model": "sentence", "guide": "rnn", "z_dims": [16], "embed_dim": sizes["embed_dim"], "hidden": [[sizes["hidden_dim"]]]}
    model, guide = build(cfg, (vocab_size,))
    trainers, stores = {}, {}
    for impl in IMPLS:
        stores[impl] = {"params": {}, "constraints": {}}
        t0 = time.perf_counter()
        if impl == "hand-written":
            trainers[impl] = HandWritten(vocab_size, sizes["embed_dim"], sizes["hidden_dim"])
        else:
            trainers[impl] = make(impl, model, guide)
            with pyro.get_param_store().scope(stores[impl]):
                trainers[impl].setup(*batch)
        block(trainers[impl], stores[impl], batch, 3)  # warm-up: validation step, recording and check
        print(f"{label} {impl}: warm-up {time.perf_counter() - t0:.1f} s; {getattr(trainers[impl], 'capture_report', '')}", flush=True)
    flops = step_flops(trainers["plain"], stores["plain"], batch)
    wall = {i: [] for i in IMPLS}
    cpu = {i: [] for i in IMPLS}
    rates = []
    for r in range(args.rounds):
        rates.append(matmul_rate(repeats=10))
        for impl in IMPLS:
            w, c = block(trainers[impl], stores[impl], batch, args.steps)
            wall[impl].append(w)
            cpu[impl].append(c)
        print(f"{label} round {r + 1}: " + ", ".join(f"{i} {1e3 * wall[i][-1]:.0f} ms" for i in IMPLS), flush=True)
    split = {i: time_breakdown(functools.partial(block, trainers[i], stores[i], batch, 1), args.steps) for i in IMPLS}
    with pyro.get_param_store().scope(stores["plain"]):  # the floor: what the step cannot avoid, each part timed alone
        floor = {"products alone": products_alone(trainers["plain"].gradients.plain, tuple(batch))[0],
                 "products in the step": min(split[i]["matrix products"] for i in ("plain", "replay")) / 1e3,
                 "optimiser alone": adam_alone(list(pyro.get_param_store().values())), "softmax alone": softmax_alone(batch, vocab_size)}
    return wall, cpu, flops, split, rates, floor


#: the two models of the epoch measurement: the registry's config, and whether the hand-written one has a latent
EPOCH_MODELS = {
    "sentence VAE": ({"model": "sentence", "guide": "rnn", "z_dims": [16]}, True),
    "LSTM LM": ({"model": "lm", "guide": "none"}, False),
}


def epoch_sample(args, data_dir, vocab_size: int, top: float) -> list[str]:
    """Table rows for a sample of a PTB training epoch: the first ``--epoch-batches`` batches of a seeded epoch
    order (every bucket width, in the epoch's proportions), per model, the library's step (the trainer's default)
    against the hand-written one, each against the time the batches' FLOPs need; and the validation pass over all of
    PTB's validation set (``Trainer.validate``: sentences by length)."""
    splits = load_dataset("ptb", data_dir=data_dir)
    source = BucketBatches(splits.train, args.batch, generator=torch.Generator().manual_seed(1))
    perm = source.permutation()
    batches = [source.batch(perm, i) for i in range(min(args.epoch_batches, len(source)))]
    per_epoch = len(source)
    rows = []
    for label, (cfg, latent) in EPOCH_MODELS.items():
        pyro.set_rng_seed(0)
        paper = SIZES["paper"]
        model, guide = build({**cfg, "embed_dim": paper["embed_dim"], "hidden": [[paper["hidden_dim"]]]}, (vocab_size,))
        store = {"params": {}, "constraints": {}}
        lib = Trainer(model, guide, ELBO(), lr=1e-3, progress=False)
        hand = HandWritten(vocab_size, paper["embed_dim"], paper["hidden_dim"], latent=latent)
        with pyro.get_param_store().scope(store):
            lib.setup(*batches[0])
            flops = sum(count_flops(lib.gradients.plain, tuple(b)) for b in batches)
            times, rates = {}, {}
            for name, impl in (("pyrovae", lib), ("hand-written", hand)):
                block(impl, store, batches[0], 2)  # warm-up
                rates[name] = matmul_rate(repeats=10)
                t0 = time.process_time()
                for b in batches:
                    impl.step(*b)
                times[name] = (time.process_time() - t0) / len(batches)
            t0 = time.process_time()
            lib.validate(splits.valid, batch_size=500)
            valid_s = time.process_time() - t0
        need = flops / len(batches) / max([*rates.values(), top])
        epoch_min = (times["pyrovae"] * per_epoch + valid_s) / 60
        rows.append(
            f"| {label} | {len(batches)} of {per_epoch} | {flops / len(batches) / 1e9:.2f} | {min(rates.values()) / 1e9:.0f}–{max(rates.values()) / 1e9:.0f} | "
            f"{1e3 * need:.0f} | {1e3 * times['hand-written']:.0f} | {1e3 * times['pyrovae']:.0f} | "
            f"{times['hand-written'] / need:.2f} | **{times['pyrovae'] / need:.2f}** | {valid_s:.1f} s | {epoch_min:.1f} min |"
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    add_common_args(parser, device=None, threads=1, seed=None, data="ptb")
    parser.add_argument("--sizes", nargs="*", choices=sorted(SIZES), help="model sizes to time (default: all)")
    parser.add_argument("--epoch-batches", type=int, default=100, help="batches of the epoch sample (0: leave it out)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    start(args)
    batch, vocab_size = ptb_batch(args.data_dir, args.batch)
    load0 = os.getloadavg()[0]
    rate = matmul_rate()
    print(f"matrix-product rate: {rate / 1e9:.1f} GFLOP/s", flush=True)
    tables, ratios, limits, breakdown, all_rates, floors = [], [], [], [], [], []
    for label, sizes in SIZES.items():
        if args.sizes and label not in args.sizes:
            continue
        wall, cpu, flops, split, rates, floor = measure(args, batch, vocab_size, sizes, label)
        all_rates += rates
        need = flops / max(rates + [rate])
        floors.append(f"| {label} | {1e3 * need:.0f} | " + " | ".join(f"{1e3 * floor[k]:.1f}" for k in FLOOR_PARTS)
                      + f" | {floor_ms(floor):.0f} | **{floor_ms(floor) / 1e3 / need:.2f}** |")
        breakdown += [f"| {label} | {i} | " + " | ".join(f"{split[i][k]:.1f}" for k in TIME_LABELS) + f" | {1e3 * need:.1f} |" for i in IMPLS]
        limits.append(f"| {label} | {flops / 1e9:.2f} | {min(rates) / 1e9:.0f}–{max(rates) / 1e9:.0f} | {1e3 * need:.0f} | " + " | ".join(f"{statistics.median(cpu[i]) / need:.2f}" for i in IMPLS) + " |")
        tables += [f"| {label} | {i} | {1e3 * statistics.median(wall[i]):.0f} | {1e3 * statistics.median(cpu[i]):.0f} |" for i in IMPLS]
        for a, b in (("replay", "hand-written"), ("plain", "hand-written"), ("plain", "replay"), ("torch-lstm", "replay")):
            r, lo, hi = ratio(wall[a], wall[b])
            ratios.append(f"| {label} | {a} / {b} | **{r:.2f}** | {lo:.2f}–{hi:.2f} | {ratio(cpu[a], cpu[b])[0]:.2f} |")
    epoch_rows = epoch_sample(args, args.data_dir, vocab_size, max([rate, *all_rates])) if args.epoch_batches else []
    load1 = os.getloadavg()[0]
    text = "\n".join([
        "# Sentence VAE training step: pyrovae vs hand-written PyTorch, and the FLOP limit",
        "",
        "Written by `benchmarks/text_speed.py`.",
        "",
        f"- command: `{command_line()}`",
        f"- date: {now()}",
        f"- CPU: {cpu_model()}; {os.cpu_count()} cores visible; torch threads: {torch.get_num_threads()}; "
        f"load average (1 min) at start / end: {load0:.2f} / {load1:.2f} (shared machine: the CPU-time ratio is the steadier number)",
        f"- python {sys.version.split()[0]}, torch {torch.__version__}, pyro {pyro.__version__}",
        f"- batch: {batch.num_sentences} PTB training sentences, tokens {list(batch.tokens.shape)} (the most common "
        f"bucketed width), {batch.num_tokens} predicted tokens; vocabulary {vocab_size}",
        "- model: SentenceVAE + SentenceEncoder, one LSTM layer, unidirectional encoder, z 16; ELBO; Adam lr 1e-3; sizes "
        + "; ".join(f"{k}: embedding {v['embed_dim']}, hidden {v['hidden_dim']}" for k, v in SIZES.items()),
        f"- method: {args.rounds} rounds of {args.steps} steps per implementation, interleaved, after 3 warm-up "
        "steps (the recording and its check are in the warm-up); medians of the per-step time",
        "",
        "| sizes | implementation | ms per step (median) | CPU ms per step (median) |",
        "|---|---|---|---|",
        *tables,
        "",
        "`hand-written`: the same model in plain PyTorch, no Pyro (`HandWritten`: `torch.nn.LSTM`, fused Adam); "
        "`torch-lstm`: the library's model with `torch.nn.LSTM` layers (fused kernel), plain steps only; `plain`: `pyrovae.nn.recurrent.RNN` "
        "(loop of cells), `capture='off'`; `replay`: the same, `capture='replay'` (the trainer's default).",
        "",
        "| sizes | ratio of step times | median ratio | per-round range | CPU-time ratio |",
        "|---|---|---|---|---|",
        *ratios,
        "",
        f"**FLOP limit.** Matrix-product rate: a 1024 x 1024 float32 `torch.mm` at {torch.get_num_threads()} thread(s), in CPU "
        f"time, measured at the start of the run ({rate / 1e9:.1f} GFLOP/s, median of 20), at the start of every round and "
        "before each implementation's part of the epoch sample (median of 10 each; the range is in the tables). The FLOP "
        "time is taken at the highest of these rates, the machine at its best: on this shared machine a single sample can "
        "come out low and would flatter the ratio. FLOPs of one step, forward and backward, counted by "
        "`torch.utils.flop_counter.FlopCounterMode` on the plain step; each implementation's median CPU time per step "
        "divided by that FLOP time (1.0: at the limit; issue 27 asks for 1.5 or less):",
        "",
        "| sizes | GFLOP per step | rate (GFLOP/s) | FLOP time (ms) | " + " | ".join(f"{i} / FLOP time" for i in IMPLS) + " |",
        "|---|---:|---|---:|" + "---:|" * len(IMPLS),
        *limits,
        "",
        "**The floor.** What no schedule of the same work can go below on this CPU: the step's matrix products, at the "
        "lower of two times: every product of one plain step, forward and backward, replayed alone at its own shapes and "
        "layouts (`common.products_alone`), and the products' profiled time in the library's own steps (the lower of plain "
        "and replay in the table below; alone they came out 5 to 10% slower in one test); plus one fused Adam step over "
        "tensors shaped like the model's parameters (`common.adam_alone`), and the vocabulary softmax's forward and "
        "backward on the batch's predicted tokens (`softmax_alone`, the library's `PackedCategorical`). Not counted: the "
        "LSTM's gate arithmetic, the embeddings' gradients, fills, copies, the autograd engine, Python. A floor near or "
        "above 1.5 times the FLOP time means the 1.5x target cannot be met with these kernels at this batch.",
        "",
        "| sizes | FLOP time (ms) | " + " | ".join(f"{k} (ms)" for k in FLOOR_PARTS) + " | floor (ms) | **floor / FLOP time** |",
        "|---|---:|" + "---:|" * (len(FLOOR_PARTS) + 2),
        *floors,
        "",
        "**Where the time goes.** CPU ms per step by kind of op (`common.time_breakdown`: `torch.profiler` self times over "
        f"{args.steps} steps of the same batch; the profiler adds to every op, so the total is above the step times above). "
        "FLOP time (last column): what the step's FLOPs need at the measured rate, all of them done by the matrix products and "
        "the fused LSTM kernel; the softmax, the optimiser, fills, copies and the rest are time spent beyond the FLOPs.",
        "",
        "| sizes | implementation | " + " | ".join(TIME_LABELS) + " | FLOP time |",
        "|---|---|" + "---:|" * (len(TIME_LABELS) + 1),
        *breakdown,
        "",
        *([
            "**An epoch, sampled.** The first batches of a seeded training epoch (every bucketed width in the epoch's proportions), "
            "at Bowman et al.'s sizes, for the sentence VAE and the LSTM language model: CPU ms per batch of the library's step "
            "(the trainer's default) and of the hand-written one, each against the time the same batches' FLOPs need at the "
            "measured rate; the validation pass (`Trainer.validate` over all 3,370 validation sentences, by length); and the "
            "epoch that gives (all training batches at the sampled rate, plus validation).",
            "",
            "| model | batches timed | GFLOP per batch | rate (GFLOP/s) | FLOP time (ms) | hand-written (ms) | pyrovae (ms) | hand / FLOP time | **pyrovae / FLOP time** | validation | epoch |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
            *epoch_rows,
            "",
        ] if epoch_rows else []),
    ])
    atomic_write(args.out, lambda f: f.write(text.encode()))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
