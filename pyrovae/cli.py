"""``pyrovae`` command line: ``train``, ``evaluate`` and ``sample``."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import pyro
import torch

from pyrovae import runs
from pyrovae.capture import MODES as CAPTURE_MODES
from pyrovae.checkpoint import CheckpointError, check_state, load_checkpoint, write_json
from pyrovae.data import as_inputs
from pyrovae.flows import FLOWS
from pyrovae.models.vae import PRIOR_FLOWS
from pyrovae.objectives import ELBO
from pyrovae.registry import ALL_OBJECTIVES, GUIDES, MODEL_GUIDES, MODELS, OBJECTIVE_ARGS, build_guide, build_model, build_objective, default_guide
from pyrovae.train import SCHEDULES, DivergenceError, Trainer, TrainingInterrupted


class UsageError(ValueError):
    """A command-line mistake; printed without a traceback."""


#: options of ``train`` passed to the loader of a dataset that has its own (text)
TEXT_DATA_OPTIONS = ("max_length", "overlong")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no usable CUDA device (torch {torch.__version__}, cuda build {torch.version.cuda}); use --device cpu or --device auto")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0; use --device cuda:0")
    return device


def _load_data(cfg: dict, device: torch.device):
    from pyrovae.data import DataError, load_dataset, resolve

    data_dir = cfg.get("data_dir")
    if data_dir:  # an explicit --data-dir that lacks the dataset is a mistake, not a reason to take it from elsewhere
        try:
            found = resolve(cfg["dataset"], data_dir, download=False)
        except DataError:
            found = None  # found nowhere: load_dataset's message lists every folder it searched
        root = Path(data_dir).expanduser().resolve()
        if found is not None and root != found.resolve() and root not in found.resolve().parents:
            raise UsageError(
                f"--data-dir {data_dir} holds no {cfg['dataset']} files (in {data_dir}/{cfg['dataset']}/ or {data_dir}/); they are in "
                f"{found}, but an explicit --data-dir is not silently replaced: pass --data-dir {found.parent if found.name == cfg['dataset'] else found}, "
                "or drop --data-dir to use $PYROVAE_DATA"
            )
    options = {k: cfg[k] for k in TEXT_DATA_OPTIONS if cfg.get(k) is not None}  # datasets with their own loader (ptb)
    return load_dataset(cfg["dataset"], data_dir=cfg.get("data_dir"), binarize=cfg.get("binarize", "none"), valid_size=cfg.get("valid_size"), seed=cfg.get("seed", 0), device=device, **options)


def _check_likelihood(cfg: dict, splits) -> None:
    from pyrovae.data import check_data
    from pyrovae.likelihoods import get_likelihood

    unit = get_likelihood(cfg.get("likelihood", "bernoulli")).needs_unit_interval
    for name in ("train", "valid", "test"):
        x = getattr(splits, name)
        if isinstance(x, torch.Tensor):  # text (word indices) has no likelihood range to check
            check_data(x, unit_interval=unit, what=f"{cfg['dataset']} {name} data")


def _build(cfg: dict, x_shape, device):
    model = build_model(cfg, x_shape).to(device)
    guide = build_guide(cfg, x_shape, model).to(device)
    return model, guide


#: options of ``train`` that ``--resume`` takes from the command line (when given) rather than from the run's config.json,
#: with their defaults for a new run (None on the parser, so that "not given" can be told apart from "given the default")
RESUME_OVERRIDES = {"epochs": 10, "device": "auto", "data_dir": None, "eval_samples": 5000, "eval_limit": None, "progress": True, "capture": "replay", "eval_capture": "auto"}


def _config(args: argparse.Namespace) -> dict:
    skip = {"command", "func", "resume", "overwrite"}
    cfg = {k: v for k, v in vars(args).items() if k not in skip}
    for k, default in RESUME_OVERRIDES.items():
        if cfg.get(k) is None:
            cfg[k] = default
    cfg["guide"] = cfg.get("guide") or default_guide(cfg["model"])
    if cfg.get("hidden"):
        cfg["hidden"] = [cfg["hidden"]] * len(cfg["z_dims"] or [None])
    return cfg


def read_config(path: Path) -> dict:
    """A run's ``config.json`` as a dict, or a :class:`UsageError` naming the file."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{path} cannot be read as a run configuration ({type(e).__name__}: {e}); restore it, or start a new run") from e
    if not isinstance(cfg, dict):
        raise UsageError(f"{path} holds a JSON {type(cfg).__name__}, not a run configuration (a JSON object of options); restore it, or start a new run")
    return cfg


def _changed_by_resume(args: argparse.Namespace, saved: dict) -> list[str]:
    """The options given to ``train --resume`` (told apart from the parser's defaults) that differ from the run's config."""
    defaults = vars(parser().parse_args(["train"]))
    changed = []
    for key, given in vars(args).items():
        if key in RESUME_OVERRIDES or key == "run_dir" or key not in saved or key not in defaults or given == defaults[key]:
            continue
        if key == "hidden" and given:
            given = [given] * len(saved.get("z_dims") or [50])
        if given != saved[key]:
            shown = " ".join(map(str, given)) if isinstance(given, list) and key != "hidden" else given
            changed.append(f"--{key.replace('_', '-')} {shown} (the run has {saved[key]})")
    return changed


def _prepare_run_dir(run_dir: Path, args: argparse.Namespace) -> Optional[dict]:
    """Check ``--resume`` / ``--overwrite`` against what ``run_dir`` holds; returns the saved config when resuming.
    Nothing is deleted here: ``--overwrite`` moves the old run aside only once the new one is known to be valid."""
    last = run_dir / "checkpoints" / "last.pt"
    if args.resume:
        if args.overwrite:
            raise UsageError("--resume continues the run in --run-dir and --overwrite replaces it: pass one of them")
        if not last.exists():
            raise UsageError(f"--resume: {last} does not exist, so there is nothing to resume; drop --resume to start a new run")
        if not (run_dir / "config.json").is_file():
            raise UsageError(f"--resume: {run_dir / 'config.json'} is missing, so the run cannot be rebuilt; start a new run with --overwrite")
        saved = read_config(run_dir / "config.json")
        state = load_checkpoint(last)
        check_state(state, last)
        done, pos = state["cursor"]["epoch"], state["cursor"]["pos"]
        epochs = args.epochs if args.epochs is not None else saved.get("epochs", done)
        if state.get("finished") and epochs <= done:
            raise UsageError(
                f"--resume: the run in {run_dir} is finished ({done} of {saved.get('epochs', done)} epochs); "
                f"pass --epochs N with N > {done} to train it further, or evaluate it with 'pyrovae evaluate {run_dir}'"
            )
        if epochs < done or (epochs == done and pos > 0):
            raise UsageError(
                f"--resume --epochs {epochs}: the run in {run_dir} is already at epoch {done}"
                + (f" and {pos} batches into epoch {done + 1}" if pos else "")
                + f"; pass --epochs N with N >= {done + (1 if pos else 0)} (epochs count those already done), or drop --epochs"
            )
        changed = _changed_by_resume(args, saved)
        if changed:
            raise UsageError(
                f"--resume continues the run with its own settings (in {run_dir / 'config.json'}), but these options would change it: "
                + "; ".join(changed) + ". Drop them, or start a new run (another --run-dir, or --overwrite)"
            )
        return saved
    if last.exists() and not args.overwrite:
        try:
            what = "a finished run" if load_checkpoint(last).get("finished") else "an unfinished run"
        except CheckpointError:
            what = "a run whose last checkpoint cannot be read"
        raise UsageError(f"{run_dir} already holds {what}; pass --resume to continue it, --overwrite to replace it, or choose another --run-dir")
    return None


#: Python argument names of the trainer, model and guide that are CLI options of another name
_ARG_FLAGS = {"schedule": "lr_schedule", "num_flows": "flow_length", "flow": "flow"}


def _in_flags(message: str, names: dict) -> str:
    """``message`` with ``arg=value`` of each Python argument in ``names`` (argument -> config key) written as ``--flag value``."""
    for arg, key in names.items():
        message = re.sub(rf"(?<![\w.-]){arg}=", f"--{key.replace('_', '-')} ", message)
    return message


def _flagged(build, names: dict):
    """``build()``, with the Python argument names in a ``ValueError``'s message replaced by the CLI's flags."""
    try:
        return build()
    except ValueError as e:
        raise UsageError(_in_flags(str(e), names)) from e


def _build_objective(cfg: dict):
    """``build_objective`` with the objective's argument names in its messages replaced by the CLI flags."""
    return _flagged(lambda: build_objective(cfg), OBJECTIVE_ARGS.get(cfg.get("objective", "elbo"), {}))


def _check_bayes(cfg: dict) -> None:
    if (cfg.get("bayesian_decoder") or cfg.get("decoder_dropout")) and cfg.get("model") != "bayes_vae":
        raise UsageError("--bayesian-decoder and --decoder-dropout belong to --model bayes_vae (with --guide bayes_gaussian)")
    if (cfg.get("bayesian_decoder") or cfg.get("encoder_dropout")) and cfg.get("guide") != "bayes_gaussian":
        raise UsageError("--bayesian-decoder and --encoder-dropout need --guide bayes_gaussian (it holds the weight posterior and the encoder's dropout)")
    if cfg.get("optimizer", "adam") == "natural" and cfg.get("capture") not in (None, "off", "replay"):
        raise UsageError(f"--optimizer natural reads each step's layer inputs and gradients through hooks, which a {cfg['capture']} graph does not run: use --capture off")


def _optimizer(cfg: dict, model, guide) -> dict:
    """Trainer arguments for ``--optimizer``: Adam with the captured step, or NaturalGradient with plain steps."""
    if cfg.get("optimizer", "adam") == "adam":
        return {"capture": cfg.get("capture", "replay")}
    from pyrovae.optim import NaturalGradient

    kwargs = {"modules": [model, guide], "damping": cfg.get("damping", 1.0), "kl_clip": cfg.get("kl_clip", 10.0), "fisher": cfg.get("fisher", "kfac")}
    return {"optimizer": NaturalGradient, "optimizer_kwargs": kwargs, "capture": "off"}


def cmd_train(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir or f"runs/{args.dataset}-{args.model}-{args.guide or default_guide(args.model)}-{args.objective}-{time.strftime('%Y%m%d-%H%M%S')}")
    lock = runs.RunLock(run_dir)
    if os.path.lexists(run_dir):  # one writer at a time, from the first look at the folder (a new one is made later)
        if not run_dir.is_dir():
            raise UsageError(f"--run-dir {run_dir} is an existing file, not a folder; pass another --run-dir")
        lock.acquire()
    try:
        return _train(run_dir, args, lock)
    finally:
        lock.release()


def _train(run_dir: Path, args: argparse.Namespace, lock: runs.RunLock) -> int:
    saved = _prepare_run_dir(run_dir, args)
    cfg = _config(args)
    if saved is not None:
        saved.update({k: getattr(args, k) for k in RESUME_OVERRIDES if getattr(args, k) is not None})
        cfg = saved
    device = resolve_device(cfg["device"])
    objective = _build_objective(cfg)  # bad objective settings fail here, before the data is loaded
    pyro.set_rng_seed(cfg["seed"])
    pyro.clear_param_store()
    splits = _load_data(cfg, device)
    if cfg.get("train_limit"):
        splits.train = splits.train[: cfg["train_limit"]]
    _check_likelihood(cfg, splits)
    _check_bayes(cfg)
    if cfg.get("num_data") is None:
        cfg["num_data"] = int(as_inputs(splits.train, "train")[0].shape[0])  # weighs global latents' terms batch/N (models that have them)
    names = {**{k: k for k in cfg}, **_ARG_FLAGS}
    model, guide = _flagged(lambda: _build(cfg, splits.x_shape, device), names)
    trainer = _flagged(lambda: Trainer(
        model, guide, objective, lr=cfg["lr"], schedule=cfg["lr_schedule"], clip_norm=cfg["clip_norm"], run_dir=run_dir,
        config=cfg, check_every=cfg["check_every"], on_divergence=cfg["on_divergence"], progress=cfg["progress"],
        **_optimizer(cfg, model, guide),
    ), names)
    print(f"pyrovae: training {cfg['model']}/{cfg['guide']} with {trainer.objective!r} on {cfg['dataset']} ({splits.train.shape[0]} examples) on {device}; run folder {run_dir}")
    lock.acquire()
    if args.overwrite:  # everything above is valid: move the old run aside; it comes back unless the new one writes a checkpoint
        runs.set_aside(run_dir)
    try:
        if args.resume:
            trainer.resume(run_dir / "checkpoints" / "last.pt", *as_inputs(splits.train[: cfg["batch_size"]]))
            print(f"pyrovae: resumed at epoch {trainer.cursor.epoch}, step {trainer.cursor.step}")
        train = splits.batches(cfg["batch_size"]) if hasattr(splits, "batches") else splits.train  # text: length buckets
        trainer.fit(train, cfg["epochs"], cfg["batch_size"], valid=splits.valid, dynamic_binarize=splits.binarize == "dynamic")
    except TrainingInterrupted as e:
        print(f"pyrovae: {e}", file=sys.stderr)
        return 130
    except DivergenceError as e:
        print(f"pyrovae: {e}", file=sys.stderr)
        return 3
    finally:
        if args.overwrite and runs.settle(run_dir) == "restored":
            print(f"pyrovae: the new run failed before its first checkpoint; the old run in {run_dir} is back as it was", file=sys.stderr)
    print(f"pyrovae: training steps: {trainer.capture_report}")
    if cfg["eval_samples"] > 0:
        return _evaluate(run_dir, device, "best", cfg["eval_samples"], cfg["eval_limit"], splits, capture=cfg.get("eval_capture", "auto"))
    return 0


def load_run(run_dir: Path, device: torch.device, checkpoint: str = "best", splits=None, data_dir: Optional[str] = None):
    """Rebuild a run's model and guide from ``config.json`` and load a checkpoint's weights (the run's data
    is loaded unless ``splits`` are given; ``data_dir`` overrides the folder the run used)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"{run_dir} is not a pyrovae run folder (no config.json); pass the --run-dir of a training run")
    cfg = read_config(run_dir / "config.json")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.exists() and checkpoint == "best":
        path = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(path, map_location=device)
    if splits is None:
        splits = _load_data({**cfg, "data_dir": data_dir} if data_dir else cfg, device)
    pyro.clear_param_store()
    model, guide = _build(cfg, splits.x_shape, device)
    model.eval(), guide.eval()  # dropout layers deterministic, Bayesian weights at their posterior means
    loader = Trainer(model, guide, ELBO(), progress=False)
    loader.setup(*as_inputs(splits.test[: min(10, splits.test.shape[0])]))
    loader.load_weights(state)
    return cfg, model, guide, splits, path


#: evaluations at least this large (test images x importance samples) are compiled by ``--eval-capture auto`` on CPU
AUTO_COMPILE_WORK = 1000 * 5000


def eval_capture_mode(choice: str, num_test: int, num_samples: int, device: torch.device) -> str:
    """``log_likelihood``'s capture mode for ``--eval-capture``: ``auto`` compiles on CPU when the evaluation is at
    least :data:`AUTO_COMPILE_WORK` image-samples (the compile, about 10-20 s per chunk shape, then pays for itself:
    on the 2-core development machine compiled chunks ran 1.2-1.5x as fast as Pyro's on one thread, 2.5x on two),
    else runs Pyro. Not on CUDA: whether compiling pays for itself there has not been measured."""
    if choice != "auto":
        return choice
    return "compile" if device.type == "cpu" and num_test * num_samples >= AUTO_COMPILE_WORK else "off"


def _evaluate(run_dir: Path, device, checkpoint: str, num_samples: int, limit: Optional[int], splits=None, data_dir: Optional[str] = None, capture: str = "auto") -> int:
    from pyrovae import evaluate as E

    runs.check_writable(run_dir)  # before the log-likelihood, not after: evaluation.json and the pictures go there
    cfg, model, guide, splits, path = load_run(run_dir, device, checkpoint, splits, data_dir)
    test = splits.test if not limit else splits.test[:limit]
    if hasattr(model, "evaluate_run"):  # a model with its own metrics and outputs (text: perplexity, sentences)
        result = {"checkpoint": str(path), **model.evaluate_run(guide, splits, test, run_dir, num_samples)}
        write_json(run_dir / "evaluation.json", result)
        print(json.dumps(result, indent=2))
        print(f"pyrovae: wrote evaluation.json and {', '.join(result.get('outputs', []))} to {run_dir}")
        return 0
    if splits.binarize == "dynamic":  # evaluate on one fixed binarisation of the test set, as in the IWAE paper
        gen = torch.Generator(device=test.device).manual_seed(cfg.get("seed", 0) + 1)
        test = torch.bernoulli(test, generator=gen)
    capture = eval_capture_mode(capture, test.shape[0], num_samples, test.device)
    t0 = time.perf_counter()
    ll = E.log_likelihood(model, guide, test, num_samples=num_samples, capture=capture)
    seconds = time.perf_counter() - t0
    print(f"pyrovae: log-likelihood chunks: {ll.capture}")
    terms = E.elbo_terms(model, guide, test)
    n = test.shape[0]
    result = {
        "checkpoint": str(path),
        "num_test": n,
        "num_samples": num_samples,
        "test_nll": float(-ll.values.mean()),
        "test_nll_stderr_over_data": float(ll.values.std() / math.sqrt(n)) if n > 1 else float("nan"),
        "test_nll_importance_stderr": float(ll.stderr.pow(2).mean().sqrt() / math.sqrt(n)),
        "test_elbo": terms["elbo"],
        "test_recon": terms["recon"],
        "test_kl": terms["kl"],
        "active_units": E.active_units(guide, test),
        "nll_seconds": round(seconds, 2),
        "nll_capture": ll.capture,
    }
    write_json(run_dir / "evaluation.json", result)
    x_shape = splits.x_shape
    E.save_image_grid(E.sample(model, 64, x_shape, device=device), run_dir / "samples.png")
    E.save_image_grid(torch.cat([test[:32], E.reconstruct(model, guide, test[:32])]), run_dir / "reconstructions.png")
    E.latent_scatter(guide, test[:2000], None if splits.test_labels is None else splits.test_labels[: min(2000, n)], run_dir / "latent.png")
    if list(cfg.get("z_dims") or [50]) == [2]:
        try:
            E.save_image_grid(E.decode_grid(model, x_shape, device=device), run_dir / "manifold.png", nrow=20)
        except ValueError as e:  # a discrete 2-D code has no manifold to draw
            print(f"pyrovae: no manifold.png: {e}")
    if hasattr(model, "write_pictures"):  # models that draw over steps (DRAW): canvases, attention, GIF
        model.write_pictures(run_dir, guide=guide, data=test)
    print(json.dumps(result, indent=2))
    print(f"pyrovae: wrote evaluation.json, samples.png, reconstructions.png, latent.png to {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    code = _evaluate(Path(args.run_dir), resolve_device(args.device), args.checkpoint, args.num_samples, args.limit, data_dir=args.data_dir, capture=args.capture)
    if code == 0 and args.marginal_kl:
        from pyrovae.analysis import run_marginal_kl

        print(json.dumps(run_marginal_kl(Path(args.run_dir), resolve_device(args.device), args.checkpoint, args.limit, args.data_dir), indent=2))
    return code


def cmd_sample(args: argparse.Namespace) -> int:
    from pyrovae import evaluate as E

    device = resolve_device(args.device)
    if args.num < 1:
        raise UsageError(f"--num {args.num} must be at least 1")
    cfg, model, guide, splits, _ = load_run(Path(args.run_dir), device, args.checkpoint)
    if hasattr(model, "sample_run"):  # a model that samples something other than images (text: sentences, printed)
        print("\n".join(model.sample_run(splits, args.num)))
        return 0
    out = Path(args.out or Path(args.run_dir) / "samples.png")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist; create it or write elsewhere")
    runs.check_writable(out.parent, "the --out folder")
    E.save_image_grid(E.sample(model, args.num, splits.x_shape, device=device), out)
    if hasattr(model, "write_pictures"):  # models that draw over steps (DRAW): canvases per step and a GIF
        model.write_pictures(out.parent, num=min(args.num, 16))
    print(f"pyrovae: wrote {args.num} samples to {out}")
    return 0


EVAL_CAPTURE_CHOICES = ["auto", *CAPTURE_MODES]
EVAL_CAPTURE_HELP = (
    "fast path of the log-likelihood chunks: compile each chunk shape's graph with torch.compile, replay it, or off (Pyro "
    f"every chunk); auto compiles on CPU for evaluations of at least {AUTO_COMPILE_WORK:,} image-samples"
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be an integer >= 0 (0: none)")
    return value


def parser() -> argparse.ArgumentParser:
    from pyrovae.data import DATASETS

    p = argparse.ArgumentParser(prog="pyrovae", description="Variational autoencoders as Pyro programs.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a VAE, then evaluate it on the test set", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = t.add_argument_group("data")
    g.add_argument("--dataset", default="mnist", choices=sorted(DATASETS))
    g.add_argument("--data-dir", default=None, help="folder with the dataset files (else $PYROVAE_DATA, else the cache)")
    g.add_argument("--binarize", default="dynamic", choices=["none", "static", "dynamic"])
    g.add_argument("--valid-size", type=int, default=None, help="validation examples held out of training (default 5000; 0: none)")
    g.add_argument("--train-limit", type=_positive_int, default=None, help="train on the first N training examples only (quick runs)")
    g = t.add_argument_group("model and guide")
    g.add_argument("--model", default="vae", choices=sorted(MODELS))
    g.add_argument("--guide", default=None, choices=sorted({*GUIDES, *MODEL_GUIDES}), help="default: gaussian; rnn for --model sentence, none for --model lm, the model's own for draw and convdraw")
    g.add_argument("--arch", default="mlp", choices=["mlp", "conv"])
    g.add_argument("--z-dims", type=_positive_int, nargs="+", default=None, help="stochastic layer sizes, nearest x first: 50, or 100 50 (default 50; 16 for text models)")
    g.add_argument("--hidden", type=_positive_int, nargs="+", default=None, help="hidden sizes (default: the IWAE paper's)")
    g.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "gaussian", "continuous_bernoulli"])
    g.add_argument("--scale", type=float, default=None, help="fixed Gaussian observation scale (default: learned)")
    g.add_argument("--activation", default="tanh")
    g.add_argument("--flow", default="planar", choices=sorted(FLOWS), help="flow family of --guide flow")
    g.add_argument("--flow-length", type=_positive_int, default=10, help="number of flow transforms")
    g.add_argument("--prior-flow", default=None, choices=list(PRIOR_FLOWS), help="learned flow prior p(z) of --model vae")
    g.add_argument("--prior-flow-length", type=_positive_int, default=2, help="number of prior flow layers")
    g = t.add_argument_group("text (--dataset ptb, --model sentence or lm)")
    g.add_argument("--max-length", type=_positive_int, default=None, help="words per sentence at most (default: no limit)")
    g.add_argument("--overlong", default=None, choices=["cut", "drop"], help="sentences over --max-length: cut them (default) or drop them")
    g.add_argument("--embed-dim", type=_positive_int, default=None, help="word embedding size (default 353; --hidden sets the RNN size, default 191)")
    g.add_argument("--rnn", default=None, choices=["lstm", "gru"], help="recurrent cell of encoder and decoder (default lstm)")
    g.add_argument("--rnn-layers", type=_positive_int, default=None, help="stacked RNN layers (default 1)")
    g.add_argument("--bidirectional", action="store_true", help="bidirectional encoder (--guide rnn)")
    g.add_argument("--word-dropout", type=float, default=None, help="probability of replacing a decoder input word by <unk> while training")
    g.add_argument("--free-bits", type=float, default=None, help="free bits per latent dimension, nats (--objective annealed)")
    g = t.add_argument_group("DRAW and ConvDRAW (--model draw / convdraw; their guide is chosen with them)")
    g.add_argument("--draw-steps", type=_positive_int, default=None, help="steps T (default 64 for draw, 8 for convdraw)")
    g.add_argument("--attention", action="store_true", help="DRAW reads and writes through selective attention windows")
    g.add_argument("--read-size", type=_positive_int, default=None, help="N of DRAW's N x N read grid (default 2)")
    g.add_argument("--write-size", type=_positive_int, default=None, help="N of DRAW's N x N write grid (default 5)")
    g.add_argument("--draw-z", type=_positive_int, default=None, help="size of each z_t (default 100); ConvDRAW: its channels (default 4)")
    g.add_argument("--lstm-size", type=_positive_int, default=None, help="LSTM units (default 256); ConvDRAW: ConvLSTM channels (default 32)")
    g = t.add_argument_group("objective")
    g.add_argument("--objective", default="elbo", choices=sorted(ALL_OBJECTIVES))
    g.add_argument("--num-particles", "-k", type=int, default=None, help="samples per data point (objective's default if omitted)")
    g.add_argument("--estimator", default=None, choices=["standard", "dreg", "vimco", "score"], help="IWAE/Renyi gradient estimator (vimco: discrete latents; default standard)")
    g.add_argument("--analytic-kl", action="store_true", help="closed-form KL in the ELBO (mean-field guides)")
    g.add_argument("--alpha", type=float, default=None, help="Renyi alpha")
    g.add_argument("--beta", type=float, default=None, help="beta-ELBO weight")
    g.add_argument("--beta-schedule", default=None, choices=["constant", "linear", "cyclical", "logistic"], help="beta-ELBO / annealed schedule (default constant for beta, logistic for annealed)")
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--cycle-steps", type=int, default=None)
    g.add_argument("--constraint", default=None, choices=["RE", "pNCC"], help="GECO constraint (FRE/CLA need Python callables)")
    g.add_argument("--tolerance", type=float, default=None, help="GECO tolerance kappa")
    g.add_argument("--geco-alpha", type=float, default=None, help="GECO moving-average rate")
    g.add_argument("--geco-nu", type=float, default=None, help="GECO multiplier rate")
    g.add_argument("--geco-multiplier-step", default=None, choices=["paper", "clamped"], help="GECO multiplier update: the paper's lambda*exp(nu*C_ma), or its step clamped to +-(1-alpha) (default paper)")
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs in all, counting those done before a --resume (default 10; with --resume, the run's)")
    g.add_argument("--batch-size", type=_positive_int, default=100)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--lr-schedule", default="constant", choices=list(SCHEDULES))
    g.add_argument("--clip-norm", type=float, default=None)
    g.add_argument("--check-every", type=_positive_int, default=100, help="steps between finiteness checks")
    g.add_argument("--on-divergence", default="stop", choices=["stop", "reduce_lr"])
    g.add_argument(
        "--capture", default=None, choices=list(CAPTURE_MODES),
        help="training-step fast path: replay a recorded graph (default), also compile it with torch.compile, or off",
    )
    g = t.add_argument_group("Bayesian layers and natural gradient (--model bayes_vae --guide bayes_gaussian)")
    g.add_argument("--optimizer", default="adam", choices=["adam", "natural"],
                   help="natural: pyrovae.optim.NaturalGradient (runs with --capture off); give it --lr 1, its plain natural-gradient step")
    g.add_argument("--fisher", default="kfac", choices=["kfac", "diagonal"], help="Fisher blocks of --optimizer natural")
    g.add_argument("--damping", type=float, default=1.0, help="damping of --optimizer natural (1 was best for an MNIST VAE, benchmarks/aevb_extensions.py)")
    g.add_argument("--kl-clip", type=float, default=10.0, help="trust-region bound of --optimizer natural")
    g.add_argument("--bayesian-decoder", action="store_true", help="decoder weights are Normal latents (full-Bayes AEVB)")
    g.add_argument("--prior-scale", type=float, default=None, help="prior standard deviation of --bayesian-decoder weights (default 1)")
    g.add_argument("--decoder-dropout", default=None, choices=["A", "B"], help="variational Gaussian dropout in the decoder (KSW15 variant A or B)")
    g.add_argument("--encoder-dropout", default=None, choices=["A", "B"], help="variational Gaussian dropout on the encoder's hidden activations")
    g = t.add_argument_group("run")
    g.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto; with --resume, the run's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--run-dir", default=None, help="run folder (default runs/DATASET-MODEL-GUIDE-OBJECTIVE-TIME)")
    g.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    g.add_argument("--eval-samples", type=_count, default=None, help="importance samples for the final test log-likelihood (0: skip evaluation; default 5000)")
    g.add_argument("--eval-limit", type=_positive_int, default=None, help="evaluate on the first N test examples only")
    g.add_argument("--eval-capture", default=None, choices=EVAL_CAPTURE_CHOICES, help=EVAL_CAPTURE_HELP + " (default auto)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="test log-likelihood (k samples), ELBO, KL, active units and plots of a run", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("run_dir")
    e.add_argument("--num-samples", "-k", type=_positive_int, default=5000)
    e.add_argument("--checkpoint", default="best", choices=["best", "last"])
    e.add_argument("--limit", type=_positive_int, default=None, help="first N test examples only")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--capture", default="auto", choices=EVAL_CAPTURE_CHOICES, help=EVAL_CAPTURE_HELP)
    e.add_argument("--marginal-kl", action="store_true", help="add KL(q(z) || p(z)) of the aggregate posterior over the test set (--limit, default 1000) to evaluation.json")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("sample", help="draw images from a trained model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("run_dir")
    s.add_argument("--num", "-n", type=int, default=64)
    s.add_argument("--out", default=None, help="PNG file (default RUN_DIR/samples.png)")
    s.add_argument("--checkpoint", default="best", choices=["best", "last"])
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_sample)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # UsageError, CheckpointError, DataError and bad arguments: a message, no traceback
        print(f"pyrovae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or vanished folder: the system's message names the file
        print(f"pyrovae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one outside it (loading, evaluating)
        print(f"pyrovae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
