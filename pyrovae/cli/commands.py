"""``pyrovae`` command line: ``train``, ``evaluate`` and ``sample``."""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pyro
import torch

import pyrovae.train.distributed as distributed
import pyrovae.train.runs as runs
from pyrovae.train.callbacks import TensorBoard
from pyrovae.capture import MODES as CAPTURE_MODES
from pyrovae.train.checkpoint import CheckpointError, atomic_write, check_state, load_checkpoint, write_json
from pyrovae.data import as_inputs
from pyrovae.objectives import ELBO, Objective
import pyrovae.cli.reports as reports
from pyrovae.cli.registry import BAYES_GROUP, DRAW_GROUP, GUIDES, MODEL_GROUP, MODEL_GUIDES, MODELS, OBJECTIVE_GROUP, OBJECTIVES, TEXT_GROUP, all_args, build_guide, build_model, build_objective, check_data_fits, default_guide, entry_args, objective_kwargs, option_names, positive_int, unread_options
from pyrovae.utils.registry import load_entry_points, load_plugin, plugin_id
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
    elif cfg.get("data_found_in") and Path(cfg["data_found_in"]).is_dir():  # the folder the run was trained on, unless found elsewhere now
        try:
            resolve(cfg["dataset"], None, download=False)
        except DataError:
            data_dir = cfg["data_found_in"]
    options = {k: cfg[k] for k in TEXT_DATA_OPTIONS if cfg.get(k) is not None}  # datasets with their own loader (ptb)
    return load_dataset(cfg["dataset"], data_dir=data_dir, binarize=cfg.get("binarize", "none"), valid_size=cfg.get("valid_size"), seed=cfg.get("seed", 0), device=device, **options)


def _record_data(cfg: dict, splits) -> None:
    """What ``sample`` and ``load_run`` need to rebuild the run without its data, into the config: ``x_shape``,
    ``x_dtype`` (tensor data only) and ``data_found_in``, the folder the data came from (``data_dir`` stays as given,
    None for $PYROVAE_DATA or the cache)."""
    from pyrovae.data import DataError, resolve

    cfg["x_shape"] = list(splits.x_shape)
    if isinstance(splits.test, torch.Tensor):
        cfg["x_dtype"] = str(splits.test.dtype).replace("torch.", "")
    try:
        cfg["data_found_in"] = str(resolve(cfg["dataset"], cfg.get("data_dir"), download=False).resolve())
    except (DataError, OSError, KeyError):
        cfg["data_found_in"] = None


def _check_likelihood(cfg: dict, splits) -> None:
    from pyrovae.data import check_data
    from pyrovae.nn.likelihoods import get_likelihood

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
RESUME_OVERRIDES = {"epochs": 10, "device": "auto", "data_dir": None, "eval_samples": 5000, "eval_limit": None, "progress": True, "capture": "replay", "eval_capture": "auto", "threads": None, "tensorboard": None}


def _config(args: argparse.Namespace) -> dict:
    skip = {"command", "func", "resume", "overwrite"}
    cfg = {k: v for k, v in vars(args).items() if k not in skip}
    for k, default in RESUME_OVERRIDES.items():
        if cfg.get(k) is None:
            cfg[k] = default
    cfg["guide"] = cfg.get("guide") or default_guide(cfg["model"])
    if cfg.get("plugins"):  # recorded so that evaluate, sample and --resume import them again
        cfg["plugins"] = [plugin_id(p) for p in cfg["plugins"]]
    else:
        cfg.pop("plugins", None)  # runs without plugins keep the config.json keys they always had
    if cfg.get("hidden"):
        cfg["hidden"] = [cfg["hidden"]] * len(cfg["z_dims"] or [None])
    return cfg


#: a run's config.json is a few kB; larger ones are refused unread (a run folder may come from a stranger)
MAX_CONFIG_BYTES = 2**20
#: the vocabulary of a text run (PTB's: 90 kB); larger files are refused unread
MAX_VOCAB_BYTES = 64 * 2**20
VOCAB_FILE = "vocab.json"


def _read_json(path: Path, what: str, limit: int) -> Any:
    """The JSON value in ``path``, read only when it is at most ``limit`` bytes; a :class:`UsageError` naming the file
    otherwise (unreadable, too large, not JSON, nested too deeply)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise UsageError(f"{path} is larger than {limit:,} bytes, far more than {what} holds; it is not one (restore it, or start a new run)")
        return json.loads(data)
    except RecursionError as e:
        raise UsageError(f"{path} cannot be read as {what}: its JSON is nested too deeply; restore it, or start a new run") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"{path} cannot be read as {what} ({type(e).__name__}: {e}); restore it, or start a new run") from e


def read_config(path: Path) -> dict:
    """A run's ``config.json`` as a dict, or a :class:`UsageError` naming the file."""
    cfg = _read_json(path, "a run configuration", MAX_CONFIG_BYTES)
    if not isinstance(cfg, dict):
        raise UsageError(f"{path} holds a JSON {type(cfg).__name__}, not a run configuration (a JSON object of options); restore it, or start a new run")
    _check_config_types(cfg, path)
    return cfg


def _check_config_types(cfg: dict, path: Path) -> None:
    """Refuse a config.json whose options have the wrong JSON type for their ``train`` flag (``"seed": "0"``,
    ``"z_dims": "2"``): the parser's own actions are the schema. Types only: ranges may have changed since the run."""
    sub = next(a for a in parser()._actions if a.dest == "command")
    for action in sub.choices["train"]._actions:
        value = cfg.get(action.dest)
        if value is None or not action.option_strings or action.dest == "help":
            continue
        try:
            sample = "" if action.nargs == 0 else action.type("1") if action.type is not None else "1"
        except (ValueError, TypeError, argparse.ArgumentTypeError):  # a type that takes no "1": not checked here
            continue
        if action.nargs == 0:
            kind, ok = "true or false", lambda v: isinstance(v, bool)
        elif isinstance(sample, str):
            kind, ok = "a string", lambda v: isinstance(v, str)
        elif isinstance(sample, int):
            kind, ok = "an integer", lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())  # 2e9: JSON's float
        elif isinstance(sample, float):
            kind, ok = "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        else:
            continue
        if action.nargs == "+" or isinstance(action, argparse._AppendAction):  # a list (--hidden: one list per stochastic layer; --plugin)
            items = value if isinstance(value, list) else None
            items = [x for v in items for x in (v if isinstance(v, list) else [v])] if items is not None else None
            good, kind = items is not None and all(ok(v) for v in items), f"a list of {kind.split(' ', 1)[1]}s"
        else:
            good = ok(value)
        if not good:
            raise UsageError(f"{path}: {action.dest} is {value!r}, not {kind} (as --{action.dest.replace('_', '-')} gives); restore config.json, or start a new run")
        if "integer" in kind:  # 2e9 or 2.0 written by another JSON writer: the integer it is
            whole = lambda v: [whole(x) for x in v] if isinstance(v, list) else int(v)
            cfg[action.dest] = whole(value)


def _save_vocab(run_dir: Path, splits) -> None:
    """Keep the vocabulary of a text run (``splits.vocab``) in ``RUN/vocab.json``: the data folder is read again by
    ``evaluate``, ``sample`` and ``--resume``, and a corpus with other words must not pass for the run's."""
    vocab = getattr(splits, "vocab", None)
    if vocab is not None and distributed.is_main():  # distributed: rank 0 writes the run folder
        write_json(run_dir / VOCAB_FILE, vocab.state_dict())


def _check_vocab(run_dir: Path, splits) -> None:
    """Refuse text data whose vocabulary is not the one in ``RUN/vocab.json`` (runs written before it: not checked)."""
    vocab, path = getattr(splits, "vocab", None), Path(run_dir) / VOCAB_FILE
    if vocab is None or not os.path.lexists(path):
        return
    stored = _read_json(path, "a vocabulary", MAX_VOCAB_BYTES)
    itos = stored.get("itos") if isinstance(stored, dict) else None
    if not (isinstance(itos, list) and all(isinstance(w, str) for w in itos)):
        raise UsageError(f"{path} is not a vocabulary (a JSON object with a list of words 'itos'); restore it from the run's data, or start a new run")
    if itos != vocab.itos:
        i = next((i for i, (a, b) in enumerate(zip(itos, vocab.itos)) if a != b), min(len(itos), len(vocab.itos)))
        first = f"word {i} is {itos[i]!r} in the run but {vocab.itos[i]!r} in the data" if i < min(len(itos), len(vocab.itos)) else "one list is a prefix of the other"
        raise UsageError(
            f"the {splits.name} data read now has another vocabulary than the run's {path} ({len(vocab.itos)} words vs the run's {len(itos)}; "
            f"{first}): the model's word indices would print other words. Pass --data-dir with the data the run was trained on"
        )


def _changed_by_resume(args: argparse.Namespace, saved: dict) -> list[str]:
    """The options given to ``train --resume`` (told apart from the parser's defaults) that differ from the run's config."""
    defaults = vars(parser().parse_args(["train"]))
    changed = []
    for key, given in vars(args).items():
        if key in RESUME_OVERRIDES or key in ("run_dir", "plugins") or key not in saved or key not in defaults or given == defaults[key]:
            continue
        if key == "hidden" and given:
            given = [given] * len(saved.get("z_dims") or [50])
        if given != saved[key]:
            shown = " ".join(map(str, given)) if isinstance(given, list) and key != "hidden" else given
            changed.append(f"--{key.replace('_', '-')} {shown} (the run has {saved[key]})")
    return changed


#: config keys that may differ between a run's config.json and its checkpoint: options --resume takes anew, and the
#: folder its data was last found in
_RESUME_MAY_CHANGE = {*RESUME_OVERRIDES, "data_found_in"}


def _check_same_run(saved: dict, stored: Any, config_path: Path, checkpoint: Path, command: str = "--resume") -> None:
    """Refuse ``--resume`` (or an evaluation, ``command``) when ``config.json`` no longer describes the run in the
    checkpoint (edited by hand: another dataset, model, ...): the checkpoint's own copy of the configuration is
    compared with it, field by field."""
    if not isinstance(stored, dict):  # checkpoints written without a configuration (the Python API): nothing to compare
        return
    plain = lambda v: json.loads(json.dumps(v, default=str))  # tuples as lists, as in config.json
    if command == "--resume":
        keys, may_change = set(saved) | set(stored), _RESUME_MAY_CHANGE
    else:  # an evaluation: fields an older config.json lacks, and where the data lies, are no other run
        keys, may_change = set(saved) & set(stored), _RESUME_MAY_CHANGE | {"data_dir", "x_shape", "x_dtype"}
    differ = [k for k in sorted(keys) if k not in may_change and plain(saved.get(k)) != plain(stored.get(k))]
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} in config.json, {stored.get(k)!r} in the checkpoint" for k in differ[:8])
        fix = "start a new run with them (another --run-dir, or --overwrite)" if command == "--resume" else "train a new run with them"
        raise UsageError(
            f"{command}: {config_path} does not describe the run in {checkpoint} ({shown}{'; ...' if len(differ) > 8 else ''}): it was edited "
            f"after the run started. Restore those fields, or {fix}"
        )


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
        load_run_plugins(saved, run_dir)
        state = load_checkpoint(last)
        check_state(state, last)
        _check_same_run(saved, state.get("config"), run_dir / "config.json", last)
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
    return _flagged(lambda: build_objective(cfg), objective_kwargs(cfg))


def _check_bayes(cfg: dict) -> None:
    if (cfg.get("bayesian_decoder") or cfg.get("decoder_dropout")) and cfg.get("model") != "bayes_vae":
        raise UsageError("--bayesian-decoder and --decoder-dropout belong to --model bayes_vae (with --guide bayes_gaussian)")
    if cfg.get("local_reparam") and not cfg.get("bayesian_decoder"):
        raise UsageError("--local-reparam draws the pre-activations of Bayesian weights: add --bayesian-decoder")
    if (cfg.get("bayesian_decoder") or cfg.get("encoder_dropout")) and cfg.get("guide") != "bayes_gaussian":
        raise UsageError("--bayesian-decoder and --encoder-dropout need --guide bayes_gaussian (it holds the weight posterior and the encoder's dropout)")
    if cfg.get("optimizer", "adam") == "natural" and cfg.get("capture") not in (None, "off", "replay"):
        raise UsageError(f"--optimizer natural reads each step's layer inputs and gradients through hooks, which a {cfg['capture']} graph does not run: use --capture off")


#: options of ``train`` that only ``--optimizer natural`` reads
NATURAL_OPTIONS = ("damping", "kl_clip", "fisher")


def _check_options_apply(args: argparse.Namespace, cfg: dict) -> None:
    """Refuse options given to a new run that nothing in it would read (``--model convdraw --attention``: the config
    would record an attention that the model never had), naming what reads them."""
    _check_bayes(cfg)  # the Bayesian options' own, more specific messages first
    defaults = vars(parser().parse_args(["train"]))
    given = {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    unread = [f"{flag} (read by {', '.join(users)})" for flag, users in unread_options(cfg, given).items()]
    unread += [f"--{k.replace('_', '-')} (read by --optimizer natural)" for k in NATURAL_OPTIONS if k in given and cfg.get("optimizer", "adam") != "natural"]
    from pyrovae.data.core import LOADERS  # read at call time: the registry module holds the live tables

    loader = LOADERS.get(cfg.get("dataset"))
    if loader is None or "max_length" not in inspect.signature(loader).parameters:
        unread += [f"--{k.replace('_', '-')} (read by text data sets: --dataset ptb)" for k in TEXT_DATA_OPTIONS if k in given]
    if unread:
        raise UsageError(
            f"--model {cfg.get('model')} --guide {cfg.get('guide')} --objective {cfg.get('objective')} --dataset {cfg.get('dataset')} would not read "
            + "; ".join(unread) + ": drop those options, or choose what reads them"
        )


def _load_train_data(cfg: dict, device: torch.device):
    """``_load_data`` for ``train``, with the text loader's argument names (``max_length=1``) written as its flags."""
    try:
        return _load_data(cfg, device)
    except ValueError as e:
        text = _in_flags(str(e), {k: k for k in TEXT_DATA_OPTIONS})
        if text == str(e):
            raise
        raise UsageError(re.sub(r"(?<![\w-])(max_length|overlong)\b", lambda m: "--" + m.group(1).replace("_", "-"), text)) from e


def _optimizer(cfg: dict, model, guide) -> dict:
    """Trainer arguments for ``--optimizer``: Adam with the captured step, or NaturalGradient with plain steps."""
    if cfg.get("optimizer", "adam") == "adam":
        return {"capture": cfg.get("capture", "replay")}
    from pyrovae.train.optim import NaturalGradient

    kwargs = {"modules": [model, guide], "damping": cfg.get("damping", 1.0), "kl_clip": cfg.get("kl_clip", 10.0), "fisher": cfg.get("fisher", "kfac")}
    return {"optimizer": NaturalGradient, "optimizer_kwargs": kwargs, "capture": "off"}


def default_run_name(cfg: dict, when: Optional[str] = None) -> str:
    """``DATASET-MODEL_LIKELIHOOD-GUIDE_guide-OBJECTIVE-TIME``, e.g. ``mnist-vae_bernoulli-gaussian_guide-elbo-20261202-174500``:
    the likelihood is the p(x|z) of models that declare --likelihood (not the text models)."""
    model = cfg.get("model", "vae")
    has_likelihood = any(a.key == "likelihood" for a in entry_args(MODELS.get(model)))  # text models: none
    likelihood = f"_{cfg.get('likelihood') or 'bernoulli'}" if has_likelihood else ""
    guide = cfg.get("guide") or default_guide(model)
    return f"{cfg.get('dataset', 'mnist')}-{model}{likelihood}-{guide}_guide-{cfg.get('objective', 'elbo')}-{when or time.strftime('%Y%m%d-%H%M%S')}"


#: options that may differ between the ranks of one distributed run: where each machine finds its data (the data
#: itself is compared), its CPU threads, and what only rank 0 shows or writes
_PER_RANK_OPTIONS = {"func", "data_dir", "threads", "progress", "tensorboard"}


def _check_same_options(options: dict, what: str = "options") -> None:
    """Refuse to run unless every rank of a distributed run has the same ``options`` (the same error on every rank):
    ranks that run different programs wait for each other for ever, or abort in the backend."""
    differ = distributed.differing_options({k: v for k, v in options.items() if k not in _PER_RANK_OPTIONS})
    if differ:
        flag = lambda v: " ".join(map(str, v)) if isinstance(v, list) else "(not given)" if v is None else str(v)
        shown = "; ".join(
            f"--{k.replace('_', '-')}: " + ", ".join(f"{flag(v)} on rank {r}" for r, v in enumerate(values)) for k, values in differ.items()
        )
        raise UsageError(
            f"the {distributed.world_size()} processes of this distributed run were started with different {what} ({shown}): every rank "
            "must run the same command (torchrun --nproc-per-node N -m pyrovae ... starts them so); relaunch them all with the same options"
        )


def cmd_train(args: argparse.Namespace) -> int:
    distributed.init(resolve_device(args.device or "auto"))  # distributed: join torchrun's process group (nothing for one process)
    _check_same_options(vars(args))  # distributed: before the first collective that depends on them
    run_dir = Path(distributed.from_main(str(args.run_dir or Path("runs") / default_run_name(vars(args)))))
    lock = distributed.run_lock(run_dir)  # distributed: rank 0 alone locks and writes the run folder
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
        _check_same_options(cfg, "configurations (each rank's config.json in --run-dir)")  # distributed: the run each rank resumes
    device = distributed.init(resolve_device(cfg["device"]))  # distributed: cuda -> cuda:LOCAL_RANK
    objective = _build_objective(cfg)  # bad objective settings fail here, before the data is loaded
    if saved is None:
        _check_options_apply(args, cfg)
    _flagged(lambda: check_data_fits(cfg), {"dataset": "dataset", "model": "model"})  # before the data is loaded
    try:
        callbacks = [TensorBoard(cfg["tensorboard"])] if cfg.get("tensorboard") and distributed.is_main() else None  # distributed: rank 0 writes
    except ImportError as e:
        raise UsageError(f"--tensorboard: {e}") from e
    pyro.set_rng_seed(cfg["seed"])
    pyro.clear_param_store()
    splits = _load_train_data(cfg, device)
    if cfg.get("train_limit"):
        splits.train = splits.train[: cfg["train_limit"]]
    _check_likelihood(cfg, splits)
    _check_bayes(cfg)
    _record_data(cfg, splits)
    if saved is not None:
        _check_vocab(run_dir, splits)
    if cfg.get("num_data") is None:
        cfg["num_data"] = int(as_inputs(splits.train, "train")[0].shape[0])  # weighs global latents' terms batch/N (models that have them)
    names = {**{k: k for k in cfg}, **_ARG_FLAGS, **option_names(cfg)}
    model, guide = _flagged(lambda: _build(cfg, splits.x_shape, device), names)
    trainer = _flagged(lambda: Trainer(
        model, guide, objective, lr=cfg["lr"], schedule=cfg["lr_schedule"], clip_norm=cfg["clip_norm"], run_dir=run_dir,
        config=cfg, check_every=cfg["check_every"], on_divergence=cfg["on_divergence"], progress=cfg["progress"],
        **_optimizer(cfg, model, guide),
    ), names)
    print(f"pyrovae: training {cfg['model']}/{cfg['guide']} with {trainer.objective!r} on {cfg['dataset']} ({splits.train.shape[0]} examples) on {device}; run folder {run_dir}")
    lock.acquire()
    replacing = runs.ReplaceLock(run_dir) if args.overwrite and distributed.is_main() else None  # no evaluate or sample of the old run meanwhile
    if replacing is not None:  # everything above is valid: move the old run aside; it comes back unless the new one writes a checkpoint
        replacing.acquire()
        runs.set_aside(run_dir)
    if saved is None:
        _save_vocab(run_dir, splits)
    try:
        if args.resume:
            trainer.resume(run_dir / "checkpoints" / "last.pt", *as_inputs(splits.train[: cfg["batch_size"]]))
            print(f"pyrovae: resumed at epoch {trainer.cursor.epoch}, step {trainer.cursor.step}")
        train = splits.batches(cfg["batch_size"]) if hasattr(splits, "batches") else splits.train  # text: length buckets
        trainer.fit(train, epochs=cfg["epochs"], batch_size=cfg["batch_size"], valid=splits.valid, dynamic_binarize=splits.binarize == "dynamic", callbacks=callbacks)
    except TrainingInterrupted as e:
        print(f"pyrovae: {e}", file=sys.stderr)
        return 130
    except DivergenceError as e:
        print(f"pyrovae: {e}", file=sys.stderr)
        return 3
    finally:
        if replacing is not None:
            if runs.settle(run_dir) == "restored":
                print(f"pyrovae: the new run failed before its first checkpoint; the old run in {run_dir} is back as it was", file=sys.stderr)
            replacing.release()
    print(f"pyrovae: training steps: {trainer.capture_report}")
    if cfg["eval_samples"] > 0:
        return _evaluate(  # the run's own evaluation (its limit in config.json and in the file): evaluation.json
            run_dir, device, "best", cfg["eval_samples"], cfg["eval_limit"], splits, capture=cfg.get("eval_capture", "auto"), progress=cfg["progress"], suffix="",
        )
    return 0


@dataclass
class LoadedRun:
    """A trained run rebuilt from its folder (:func:`load_run`)."""

    model: torch.nn.Module
    guide: torch.nn.Module
    objective: Objective  #: the run's objective, with its state at the checkpoint (GECO's multiplier, ...)
    config: dict  #: the run's config.json
    checkpoint: Path  #: the checkpoint the weights came from
    x_shape: tuple  #: the shape of one data point
    splits: Any = None  #: the run's data, when it was loaded (``with_data=True``, or a config without ``x_shape``)


def _run_marginal_kl(run_dir, device, checkpoint: str = "best", limit: Optional[int] = None, data_dir=None) -> dict:
    """``pyrovae evaluate RUN --marginal-kl``: :func:`marginal_kl` of a run's guide over its first ``limit`` (default
    1000) test examples, with the model's prior, added under ``marginal_kl`` to the ``RUN/evaluation*.json`` of the same checkpoint and limit."""
    import dataclasses

    from pyrovae.evaluate.analysis import marginal_kl

    run = load_run(Path(run_dir), device, checkpoint, data_dir=data_dir, with_data=True)
    cfg, model, guide, splits = run.config, run.model, run.guide, run.splits
    test = splits.test[: limit or 1000]
    if splits.binarize == "dynamic":  # the fixed binarisation `pyrovae evaluate` uses for the log-likelihood
        target = getattr(test, "target", test)  # (target, context) pairs: dynamic binarisation resamples the targets only
        gen = torch.Generator(device=target.device).manual_seed(cfg.get("seed", 0) + 1)
        target = torch.bernoulli(target, generator=gen)
        test = test._replace(target=target) if hasattr(test, "target") else target
    try:
        result = dataclasses.asdict(marginal_kl(guide, test, model=model))
    except ValueError as e:  # a conditional prior whose contexts never repeat in these test examples, ...
        hint = "; on the command line: a larger --limit (default 1000) gives contexts more chances to repeat" if "distinct" in str(e) else ""
        raise UsageError(f"--marginal-kl on {run_dir} over its first {test.shape[0]} test examples: {e}{hint}") from e
    path = Path(run_dir) / f"evaluation{_output_suffix(checkpoint, limit, splits.test.shape[0])}.json"  # beside the evaluation it adds to
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved["marginal_kl"] = result
    write_json(path, saved)
    return {"marginal_kl": result}


def load_run(run_dir, device="cpu", checkpoint: str = "best", data_dir: Optional[str] = None, with_data: bool = False) -> LoadedRun:
    """A trained run's model, guide and objective, rebuilt from ``RUN_DIR/config.json`` with a checkpoint's weights.

    Args:
        run_dir: the run folder (``pyrovae train --run-dir``).
        device: where the modules go ("cpu", "cuda", a ``torch.device``; "auto": CUDA when available).
        checkpoint: "best" (by validation ELBO; the last one when there is no best) or "last".
        data_dir: the dataset folder, if not the run's; the data is read only when needed (``with_data``, or a
            run whose config.json predates ``x_shape``).
        with_data: also load the run's data splits (``.splits``).

    The model and guide are in ``eval()`` mode, and their parameters are registered in Pyro's param store
    (which is cleared first), so ``pyrovae.evaluate``'s functions and ``pyro.infer`` run on them directly.
    """
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    cfg, model, guide, splits, path, objective = _load_run(Path(run_dir), device, checkpoint, data_dir=data_dir, need_data=with_data)
    return LoadedRun(model, guide, objective, cfg, path, tuple(cfg.get("x_shape") or splits.x_shape), splits)


#: parameters a configuration may describe beyond its checkpoint's before it is refused unbuilt (40 MB of float32)
_SIZE_SLACK = 10**7


def _check_sizes(cfg: dict, x_shape: tuple, state: dict, checkpoint: Path, config_path: Path) -> None:
    """Refuse a configuration whose model and guide hold far more numbers than the checkpoint's parameters, before
    they are built: a run folder is input from anyone, and ``z_dims: [2e9]`` would allocate terabytes. The modules
    are built on the meta device (shapes, no memory) and their parameters counted."""
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in x_shape):
        raise UsageError(f"{config_path}: x_shape {list(x_shape)} is not a list of positive integers; restore config.json, or start a new run")
    stored = sum(math.prod(shape) for shape in state["signature"].values())
    try:
        with torch.device("meta"):
            model = build_model(cfg, x_shape)
            modules = [model, build_guide(cfg, x_shape, model)]
    except (TypeError, ValueError, OverflowError) as e:  # sizes of the wrong type or value: the real build would say the same
        raise UsageError(f"{config_path} does not build a model: {_in_flags(str(e), {k: k for k in cfg})}; restore config.json, or start a new run") from e
    except Exception:  # a module that cannot be built on the meta device: the checkpoint's shapes are compared after building
        return
    wanted = sum(p.numel() for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters())
    if wanted > stored + max(stored, _SIZE_SLACK):  # a smaller difference is built, and named shape by shape when the weights are loaded
        raise CheckpointError(
            f"{config_path} describes a model and guide of {wanted:,} parameters, but {checkpoint} holds {stored:,}: config.json does not "
            "belong to this checkpoint (edited, or from another run); nothing was built. Restore config.json, or start a new run"
        )


def _load_run(run_dir: Path, device: torch.device, checkpoint: str = "best", splits=None, data_dir: Optional[str] = None, need_data: bool = True):
    """(cfg, model, guide, splits, checkpoint path, objective) of a run; the data is loaded when ``need_data`` (unless
    ``splits`` are given) or when the config lacks ``x_shape``/``x_dtype`` (runs before they were saved, text and
    tuple data); ``data_dir`` overrides the folder the run used."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"{run_dir} is not a pyrovae run folder (no config.json); pass the --run-dir of a training run")
    cfg = read_config(run_dir / "config.json")
    load_run_plugins(cfg, run_dir)
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.exists() and checkpoint == "best":
        path = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(path, map_location=device)
    check_state(state, path)
    _check_same_run(cfg, state.get("config"), run_dir / "config.json", path, command=f"the run in {run_dir}")
    nonfinite = sorted(k for k, v in state["params"].items() if not bool(torch.isfinite(v).all()))
    if nonfinite:
        shown = ", ".join(nonfinite[:6]) + (f" and {len(nonfinite) - 6} more" if len(nonfinite) > 6 else "")
        other = "best" if checkpoint == "last" else "last"
        raise CheckpointError(
            f"{path} holds non-finite weights (NaN or inf) in {len(nonfinite)} of its {len(state['params'])} tensors: {shown}. The run diverged "
            f"before this checkpoint was written, or the file was altered: try --checkpoint {other}, or train the run again"
        )
    dtype = getattr(torch, str(cfg.get("x_dtype", "")).replace("torch.", ""), None) if cfg.get("x_shape") else None
    if splits is None and (need_data or not (isinstance(dtype, torch.dtype) and dtype.is_floating_point)):
        splits = _load_data({**cfg, "data_dir": data_dir} if data_dir else cfg, device)
    if splits is not None:
        _check_vocab(run_dir, splits)
    x_shape = tuple(splits.x_shape) if splits is not None else tuple(cfg["x_shape"])
    _check_sizes(cfg, x_shape, state, path, run_dir / "config.json")  # before anything the size of the config is allocated
    example = as_inputs(splits.test[: min(10, splits.test.shape[0])]) if splits is not None else (torch.zeros(2, *x_shape, dtype=dtype, device=device),)
    pyro.clear_param_store()
    model, guide = _build(cfg, x_shape, device)
    model.eval(), guide.eval()  # dropout layers deterministic, Bayesian weights at their posterior means
    loader = Trainer(model, guide, ELBO(), progress=False)  # the plain ELBO finds the parameters: one cheap trace
    loader.setup(*example)
    loader.load_weights(state)
    objective = _build_objective(cfg)
    if state.get("objective") and hasattr(objective, "load_state_dict"):
        objective.load_state_dict(state["objective"])
    return cfg, model, guide, splits, path, objective


#: evaluations at least this large (test images x importance samples) are compiled by ``--eval-capture auto`` on CPU
AUTO_COMPILE_WORK = 1000 * 5000


def eval_capture_mode(choice: str, num_test: int, num_samples: int, device: torch.device) -> str:
    """``log_likelihood``'s capture mode for ``--eval-capture``: ``auto`` compiles on CPU when the evaluation is at
    least :data:`AUTO_COMPILE_WORK` image-samples, where the compile time per chunk shape pays for itself (measured
    in the README, "Captured evaluation"), else runs Pyro. Not on CUDA: whether compiling pays for itself there has
    not been measured."""
    if choice != "auto":
        return choice
    return "compile" if device.type == "cpu" and num_test * num_samples >= AUTO_COMPILE_WORK else "off"


def _output_suffix(checkpoint: str, limit: Optional[int], num_test: int) -> str:
    """What an evaluation's outputs add to their names, from what produced them alone (never from what the folder
    holds, which another process may change meanwhile): ``-last`` for ``--checkpoint last``, ``-limitN`` for the
    first N < all test examples; ``""`` for the full evaluation of the best checkpoint."""
    return ("-last" if checkpoint == "last" else "") + (f"-limit{limit}" if limit and limit < num_test else "")


def _provenance(cfg: dict, data_dir: Optional[str]) -> dict:
    """What an evaluation was computed on: the data set, its split and where its files were found."""
    return {"dataset": cfg.get("dataset"), "split": "test", "data_dir": data_dir or cfg.get("data_found_in") or cfg.get("data_dir")}


def _evaluate(
    run_dir: Path, device, checkpoint: str, num_samples: int, limit: Optional[int], splits=None, data_dir: Optional[str] = None,
    capture: str = "auto", progress: bool = True, suffix: Optional[str] = None,
) -> int:
    """Evaluate a run; its outputs are named with ``suffix`` (default :func:`_output_suffix`: by checkpoint and limit)."""
    import pyrovae.evaluate as E
    from pyrovae.evaluate.pictures import labelled_grids

    runs.check_writable(run_dir)  # before the log-likelihood, not after: evaluation.json and the pictures go there
    cfg, model, guide, splits, path, _ = _load_run(run_dir, device, checkpoint, splits, data_dir)
    suffix = _output_suffix(checkpoint, limit, splits.test.shape[0]) if suffix is None else suffix
    test = splits.test if not limit else splits.test[:limit]
    report = reports.evaluation_for(model)  # a kind of model with its own metrics and outputs (text: perplexity, sentences)
    if report is not None and not distributed.is_main():  # distributed: rank 0 evaluates these models alone
        return 0
    if report is not None:
        result = {"checkpoint": str(path), **_provenance(cfg, data_dir), "limit": limit, **report(model, guide, splits, test, run_dir, num_samples, suffix=suffix)}
        write_json(run_dir / f"evaluation{suffix}.json", result)
        print(json.dumps(result, indent=2))
        print(f"pyrovae: wrote evaluation{suffix}.json and {', '.join(result.get('outputs', []))} to {run_dir}")
        return 0
    if splits.binarize == "dynamic":  # evaluate on one fixed binarisation of the test set, as in the IWAE paper
        gen = torch.Generator(device=test.device).manual_seed(cfg.get("seed", 0) + 1)
        test = torch.bernoulli(test, generator=gen)
    capture = eval_capture_mode(capture, test.shape[0], num_samples, test.device)
    if distributed.is_main():  # a long evaluation (hours for DRAW on CPU) says what it is doing before it starts
        print(f"pyrovae: evaluating {path.name}: log p(x) with k = {num_samples} importance samples on {test.shape[0]} test "
              f"examples (chunks: capture {capture}); a shorter one: --eval-limit N / --eval-samples K (train), --limit / -k (evaluate)", flush=True)
    t0 = time.perf_counter()
    ll = distributed.log_likelihood(model, guide, test, num_samples=num_samples, capture=capture, progress=progress)  # distributed: sharded over ranks
    seconds = time.perf_counter() - t0
    if not distributed.is_main():  # distributed: rank 0 alone writes evaluation.json and the pictures
        return 0
    print(f"pyrovae: log-likelihood chunks: {ll.capture}")
    terms = E.elbo_terms(model, guide, test)
    n = test.shape[0]
    result = {
        "checkpoint": str(path),
        **_provenance(cfg, data_dir),
        "num_test": n,
        "limit": limit if limit and limit < splits.test.shape[0] else None,
        "num_samples": num_samples,
        **ll.summary(),
        "test_elbo": terms["elbo"],
        "test_recon": terms["recon"],
        "test_kl": terms["kl"],
        "active_units": E.active_units(guide, test),
        "nll_seconds": round(seconds, 2),
        "nll_capture": ll.capture,
    }
    write_json(run_dir / f"evaluation{suffix}.json", result)
    x_shape = splits.x_shape
    written = [f"evaluation{suffix}.json", f"samples{suffix}.png", f"reconstructions{suffix}.png", f"latent{suffix}.png"]
    pyro.set_rng_seed(cfg.get("seed", 0))  # the same pictures from the same checkpoint
    E.save_image_grid(E.sample(model, 64, x_shape, device=device), run_dir / written[1])
    shown = test[:32]
    labelled_grids([
        (f"data: test images 1-{shown.shape[0]}", shown),
        ("reconstructions: mean of p(x|z), z ~ q(z|x), in the same places", E.reconstruct(model, guide, shown)),
    ], run_dir / written[2])
    E.latent_scatter(guide, test[:2000], None if splits.test_labels is None else splits.test_labels[: min(2000, n)], run_dir / written[3])
    if list(cfg.get("z_dims") or [50]) == [2]:
        try:
            E.save_image_grid(E.decode_grid(model, x_shape, device=device), run_dir / f"manifold{suffix}.png", nrow=20)
            written.append(f"manifold{suffix}.png")
        except ValueError as e:  # a discrete 2-D code has no manifold to draw
            print(f"pyrovae: no manifold.png: {e}")
    pictures = reports.pictures_for(model)  # models that draw over steps (DRAW): canvases, attention, GIF
    if pictures is not None:
        written += [p.name for p in pictures(model, guide, test, run_dir, suffix=suffix)]
    print(json.dumps(result, indent=2))
    print(f"pyrovae: wrote {', '.join(written)} to {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    with runs.ReadLock(args.run_dir, "pyrovae evaluate") if Path(args.run_dir).is_dir() else contextlib.nullcontext():  # not while train --overwrite replaces the run
        return _cmd_evaluate(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    device = distributed.init(resolve_device(args.device))
    _check_same_options(vars(args))  # distributed: ranks with another --limit would gather shards of other sizes
    code = _evaluate(
        Path(args.run_dir), device, args.checkpoint, args.num_samples, args.limit, data_dir=args.data_dir,
        capture=args.capture, progress=args.progress,
    )
    if code == 0 and args.marginal_kl and distributed.is_main():
        print(json.dumps(_run_marginal_kl(Path(args.run_dir), resolve_device(args.device), args.checkpoint, args.limit, args.data_dir), indent=2))
    return code


def cmd_sample(args: argparse.Namespace) -> int:
    with runs.ReadLock(args.run_dir, "pyrovae sample") if Path(args.run_dir).is_dir() else contextlib.nullcontext():  # not while train --overwrite replaces the run
        return _cmd_sample(args)


#: ``pyrovae sample --num`` at most (a grid of 10,000 MNIST images is 8 MB; 10 million would be 31 GB at once)
MAX_SAMPLES = 10_000


def _cmd_sample(args: argparse.Namespace) -> int:
    import pyrovae.evaluate as E

    device = resolve_device(args.device)
    if args.num < 1:
        raise UsageError(f"--num {args.num} must be at least 1")
    if args.num > MAX_SAMPLES:
        raise UsageError(f"--num {args.num}: at most {MAX_SAMPLES:,} samples in one picture or listing; draw more with several runs of 'pyrovae sample' and different --seed")
    if args.out and not Path(args.out).parent.is_dir():
        raise UsageError(f"--out {args.out}: the folder {Path(args.out).parent} does not exist; create it or write elsewhere")
    cfg, model, guide, splits, _, _ = _load_run(Path(args.run_dir), device, args.checkpoint, data_dir=args.data_dir, need_data=False)
    pyro.set_rng_seed(args.seed)
    sampler = reports.sampler_for(model)
    if sampler is not None:  # a model that samples something other than images (text: sentences, printed)
        if splits is None:
            splits = _load_data({**cfg, "data_dir": args.data_dir} if args.data_dir else cfg, device)
            _check_vocab(Path(args.run_dir), splits)
        text = "\n".join(sampler(model, splits, args.num))
        if not args.out:
            print(text)
            return 0
        runs.check_writable(Path(args.out).parent, "the --out folder")
        atomic_write(args.out, lambda f: f.write((text + "\n").encode("utf-8")))
        print(f"pyrovae: wrote {args.num} samples to {args.out}")
        return 0
    default = f"samples-seed{args.seed}-n{args.num}{'-last' if args.checkpoint == 'last' else ''}.png"  # never evaluate's samples.png
    out = Path(args.out or Path(args.run_dir) / default)
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist; create it or write elsewhere")
    runs.check_writable(out.parent, "the --out folder")
    x_shape = tuple(cfg.get("x_shape") or splits.x_shape)
    E.save_image_grid(E.sample(model, args.num, x_shape, device=device), out)
    also = []
    pictures = reports.pictures_for(model)  # models that draw over steps (DRAW): canvases per step and a GIF, named after out
    if pictures is not None:
        also = [p.name for p in pictures(model, None, None, out.parent, num=min(args.num, 16), suffix=f"-{out.stem}")]
    print(f"pyrovae: wrote {args.num} samples to {out}" + (f" (and {', '.join(also)} beside it)" if also else ""))
    return 0


EVAL_CAPTURE_CHOICES = ["auto", *CAPTURE_MODES]
EVAL_CAPTURE_HELP = (
    "fast path of the log-likelihood chunks: compile each chunk shape's graph with torch.compile, replay it, or off (Pyro "
    f"every chunk); auto compiles on CPU for evaluations of at least {AUTO_COMPILE_WORK:,} image-samples"
)


#: importance samples per test image at most (``evaluate -k``, ``train --eval-samples``): the IWAE paper's 5000 x 200;
#: 10^6 samples for each of 10,000 test images are already 10^10 decoder passes, days on a CPU
MAX_NUM_SAMPLES = 1_000_000


def _integer(low: int, note: str = "", high: Optional[int] = None, high_note: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]``; argparse names the flag in front of the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} must be an integer >= {low}{note}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} is more than the limit of {high:,}{high_note}")
        return value

    return parse


def _positive(note: str = "") -> Callable[[str], float]:
    """An argparse ``type``: a finite number > 0 (not 0, a negative number, nan or inf)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0{note}")
        return value

    return parse


_SAMPLES_LIMIT = "; the IWAE paper's k is 5000, and the time grows with k x the test images"
_count = _integer(0, " (0: none)", MAX_NUM_SAMPLES, _SAMPLES_LIMIT)
_num_samples = _integer(1, "", MAX_NUM_SAMPLES, _SAMPLES_LIMIT)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` states each option's default once: ``(default: X)`` is added unless the help says it already
    (options whose parser default is None, meaning "not given", say what that means in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.nargs == 0 and not action.default:  # store_true flags
            return text + " (default: off)"
        return text + " (default: %(default)s)"


#: ``--help`` sections of ``pyrovae train``, in order (registry options join theirs by ``Arg.group``)
TRAIN_GROUPS = ("data", MODEL_GROUP, TEXT_GROUP, DRAW_GROUP, OBJECTIVE_GROUP, "optimisation", BAYES_GROUP, "run")

THREADS_HELP = "torch intra-op CPU threads (torch.set_num_threads); 1 on a machine shared with other jobs (default: torch's choice, one per core)"


def _version() -> str:
    """The installed distribution's version (pyproject.toml), else the package's own ``__version__``."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("pyrovae")
    except PackageNotFoundError:
        from pyrovae import __version__

        return __version__


def parser() -> argparse.ArgumentParser:
    from pyrovae.data.core import DATASETS  # read at call time: the registry module holds the live tables

    load_entry_points()  # installed packages' plugins (once)
    p = argparse.ArgumentParser(prog="pyrovae", description="Variational autoencoders as Pyro programs.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a VAE, then evaluate it on the test set", formatter_class=HelpFormatter)
    groups = {title: t.add_argument_group(title) for title in TRAIN_GROUPS}
    g = groups["data"]
    g.add_argument("--dataset", default="mnist", choices=sorted(DATASETS), help="data set (see README, 'Data')")
    g.add_argument("--data-dir", default=None, help="folder with the dataset files (default: $PYROVAE_DATA, else the cache)")
    g.add_argument("--binarize", default="dynamic", choices=["none", "static", "dynamic"], help="binarisation of [0, 1] images")
    g.add_argument("--valid-size", type=_integer(0, " (0: no validation set)"), default=None, help="validation examples held out of training (default 5000; 0: none)")
    g.add_argument("--train-limit", type=positive_int, default=None, help="train on the first N training examples only, for quick runs (default: all)")
    g = groups[MODEL_GROUP]
    g.add_argument("--model", default="vae", choices=sorted(MODELS), help="generative model p(x, z)")
    g.add_argument("--guide", default=None, choices=sorted({*GUIDES, *MODEL_GUIDES}), help="guide q(z|x) (default: gaussian; rnn for --model sentence, none for --model lm, the model's own for draw and convdraw)")
    g = groups[TEXT_GROUP]
    g.add_argument("--max-length", type=positive_int, default=None, help="words per sentence at most (default: no limit)")
    g.add_argument("--overlong", default=None, choices=["cut", "drop"], help="sentences over --max-length: cut them (default) or drop them")
    g = groups[OBJECTIVE_GROUP]
    g.add_argument("--objective", default="elbo", choices=sorted(OBJECTIVES), help="inference objective")
    g.add_argument(
        "--plugin", dest="plugins", action="append", metavar="FILE_OR_MODULE", default=None,
        help="import a Python file or module first, whose classes decorated with register_objective, register_model or register_guide "
        "(pyrovae.utils.registry) add --objective, --model or --guide names and their flags; repeatable; recorded in config.json, "
        "so evaluate, sample and --resume import it again (default: none; installed packages' pyrovae.plugins entry points always)",
    )
    for arg in all_args():  # the registries' options (pyrovae.cli.registry), each in its section
        title = arg.group or (OBJECTIVE_GROUP if arg.flag in _objective_flags() else MODEL_GROUP)
        if title not in groups:
            groups[title] = t.add_argument_group(title)
        arg.add_to(groups[title])
    g = groups["optimisation"]
    g.add_argument("--epochs", type=positive_int, default=None, help="epochs in all, counting those done before a --resume (default 10; with --resume, the run's)")
    g.add_argument("--batch-size", type=positive_int, default=100, help="examples per step")
    g.add_argument("--lr", type=_positive(), default=1e-3, help="learning rate")
    g.add_argument("--lr-schedule", default="constant", choices=list(SCHEDULES), help="learning-rate schedule (iwae: Burda et al.'s 3^i-epoch schedule)")
    g.add_argument("--clip-norm", type=_positive(), default=None, help="clip the gradient norm to this (default: no clipping)")
    g.add_argument("--check-every", type=positive_int, default=100, help="steps between finiteness checks")
    g.add_argument("--on-divergence", default="stop", choices=["stop", "reduce_lr"], help="what a non-finite loss or parameter does")
    g.add_argument(
        "--capture", default=None, choices=list(CAPTURE_MODES),
        help="training-step fast path: replay a recorded graph (default), also compile it with torch.compile, or off",
    )
    g = groups[BAYES_GROUP]
    g.add_argument("--optimizer", default="adam", choices=["adam", "natural"],
                   help="natural: pyrovae.train.optim.NaturalGradient (runs with --capture off); give it --lr 1, its plain natural-gradient step")
    g.add_argument("--fisher", default="kfac", choices=["kfac", "diagonal"], help="Fisher blocks of --optimizer natural")
    g.add_argument("--damping", type=_positive(" (the Fisher blocks are inverted, and without damping a unit that never fires makes one singular; 1e-3 is a common start)"), default=1.0, help="damping of --optimizer natural (see README, 'Bayesian layers')")
    g.add_argument("--kl-clip", type=_positive(), default=10.0, help="trust-region bound of --optimizer natural")
    g = groups["run"]
    g.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto; with --resume, the run's)")
    g.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    g.add_argument("--seed", type=int, default=0, help="random seed of the run")
    g.add_argument("--run-dir", default=None, help="run folder (default runs/DATASET-MODEL_LIKELIHOOD-GUIDE_guide-OBJECTIVE-TIME)")
    g.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    g.add_argument("--eval-samples", type=_count, default=None, help="importance samples for the final test log-likelihood (0: skip evaluation; default 5000)")
    g.add_argument("--eval-limit", type=positive_int, default=None, help="evaluate on the first N test examples only (default: all)")
    g.add_argument("--eval-capture", default=None, choices=EVAL_CAPTURE_CHOICES, help=EVAL_CAPTURE_HELP + " (default auto)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars (default: bars on a terminal)")
    g.add_argument("--tensorboard", metavar="DIR", default=None, help="also write each epoch's numbers to TensorBoard event files in DIR (pip install tensorboard; default: none)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="test log-likelihood (k samples), ELBO, KL, active units and plots of a run", formatter_class=HelpFormatter)
    e.add_argument("run_dir")
    e.add_argument("--num-samples", "-k", type=_num_samples, default=5000, help="importance samples per test image")
    e.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (best: by validation ELBO); last writes evaluation-last.json and *-last.png")
    e.add_argument("--limit", type=positive_int, default=None, help="first N test examples only; written to evaluation-limitN.json and *-limitN.png / *-limitN.txt, never over the full evaluation (default: all)")
    e.add_argument("--data-dir", default=None, help="folder with the dataset files (default: the run's, then $PYROVAE_DATA, then the cache)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    e.add_argument("--capture", default="auto", choices=EVAL_CAPTURE_CHOICES, help=EVAL_CAPTURE_HELP)
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (default: a bar on a terminal)")
    e.add_argument("--marginal-kl", action="store_true", help="add KL(q(z) || p(z)) of the aggregate posterior over the test set (of the first --limit test examples, 1000 if not given) to evaluation.json (default off)")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("sample", help="draw images from a trained model", formatter_class=HelpFormatter)
    s.add_argument("run_dir")
    s.add_argument("--num", "-n", type=int, default=64, help="images (text runs: sentences) to draw, at most 10,000")
    s.add_argument("--seed", type=int, default=0, help="random seed of the draw")
    s.add_argument("--out", default=None, help="PNG file (default: RUN_DIR/samples-seedS-nN.png, -last added for --checkpoint last); for a text run, a text file (printed when not given)")
    s.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (best: by validation ELBO)")
    s.add_argument("--data-dir", default=None, help="folder with the dataset files, needed only by runs whose config.json lacks x_shape (default: the run's, then $PYROVAE_DATA)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    s.set_defaults(func=cmd_sample)
    return p


def _objective_flags() -> set[str]:
    return {a.flag for e in OBJECTIVES.values() for a in entry_args(e)}


class _DropCudaHomeNotice(logging.Filter):
    """torch.utils.cpp_extension (imported by torch.compile) logs "No CUDA runtime is found, using CUDA_HOME=..."
    on a CPU machine with a CUDA toolkit folder: nothing a user of the CLI can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_torch_notices() -> None:
    """Silence torch's log lines that a CLI user cannot act on (once per process)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropCudaHomeNotice) for f in log.filters):
        log.addFilter(_DropCudaHomeNotice())


def plugin_arguments(argv: Sequence[str]) -> list[str]:
    """The values of ``--plugin`` in a command line (read before the parser is built: plugins add its choices)."""
    found = []
    for i, word in enumerate(argv):
        if word == "--":
            break
        if word == "--plugin" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif word.startswith("--plugin="):
            found.append(word.split("=", 1)[1])
    return found


def load_run_plugins(cfg: dict, run_dir: Path) -> None:
    """Import the plugins a run was trained with (``plugins`` in its config.json), so its classes can be rebuilt."""
    plugins = cfg.get("plugins") or []
    if not (isinstance(plugins, list) and all(isinstance(p, str) for p in plugins)):
        raise UsageError(f"{run_dir / 'config.json'}: plugins is {plugins!r}, not a list of plugin files or modules; restore config.json, or start a new run")
    for spec in plugins:
        try:
            load_plugin(spec)
        except ValueError as e:
            raise UsageError(f"the run in {run_dir} was trained with a plugin that cannot be imported now: {e} (restore it where the run recorded it, {spec})") from e


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # before the parser: plugins add names and flags to it
        load_entry_points()
        for spec in plugin_arguments(argv):
            load_plugin(spec)
    except ValueError as e:
        print(f"pyrovae: error: {e}", file=sys.stderr)
        return 2
    args = parser().parse_args(argv)
    quiet_torch_notices()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except ValueError as e:  # UsageError, CheckpointError, DataError and bad arguments: a message, no traceback
        print(f"pyrovae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or vanished folder: the system's message names the file
        print(f"pyrovae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except distributed.DistributedError as e:  # another rank died, or never reached a collective: its own output says why
        print(f"pyrovae {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one outside it (loading, evaluating)
        print(f"pyrovae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
