"""Checkpoints that survive crashes and load without executing code.

Files are written to a temporary file in the same folder, flushed and fsync'ed, then renamed over the
target (``os.replace`` is atomic on POSIX), so a process killed mid-write leaves the previous checkpoint
intact. Loading uses ``torch.load(..., weights_only=True)``: tensors, numbers, strings, lists and dicts
only; a pickle that would run code is refused.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Union

import torch

from pyrovae.utils.files import atomic_write, file_lock, write_json  # noqa: F401  (re-exported: checkpoints are written with them)
from pyrovae.utils.rng import get_rng_state, set_rng_state  # noqa: F401  (checkpoints store them)

FORMAT = "pyrovae-checkpoint-v1"


class CheckpointError(ValueError):
    """A file that is not a pyrovae checkpoint, or one that does not fit the model it is loaded into."""


def save_checkpoint(state: dict, path: Union[str, Path]) -> Path:
    """Atomically save ``state`` (tensors, numbers, strings, lists, dicts) with a format tag.

    torch's writer reports a failed write (a full disk) as ``RuntimeError: ... unexpected pos``; that becomes
    an ``OSError`` naming the file, and the previous checkpoint stays as it was."""
    try:
        return atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"could not write the checkpoint {path} ({first}): is the disk full or the folder not writable? The previous checkpoint is unchanged") from e


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` without executing any code."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}; pass a run folder or a .pt file written by pyrovae")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it names the Python object {found.group(1)}, which loading would have to import and run" if found else "it is not a plain torch file of tensors and values (a pickle of Python objects, or not a checkpoint at all)"
        raise CheckpointError(
            f"{path} is refused: {what}. pyrovae checkpoints contain only tensors and plain values, and nothing in "
            "them is executed; do not load files from untrusted sources."
        ) from e
    except Exception as e:  # random or truncated bytes fail in many ways (IndexError, KeyError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"{path} is not a readable checkpoint ({e.__class__.__name__}: {e}); it may be truncated or not a torch file") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a pyrovae checkpoint (no '{FORMAT}' tag)")
    return state


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_state(state: dict, path: Union[str, Path, None] = None) -> None:
    """Raise :class:`CheckpointError` when a checkpoint with the format tag does not hold what
    ``Trainer.state_dict`` writes (a damaged or hand-made file): parameters that are not tensors of their
    recorded shapes, a cursor that is not counters and a permutation, and so on."""
    where = path if path is not None else "the checkpoint"

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where} has the pyrovae format tag but {what}: it is damaged or was not written by pyrovae's Trainer")

    signature, params = state.get("signature"), state.get("params")
    if not isinstance(signature, dict) or not all(isinstance(v, (list, tuple)) and all(_is_int(d) for d in v) for v in signature.values()):
        raise bad("its 'signature' is not a table of parameter shapes")
    if not isinstance(params, dict) or set(params) != set(signature):
        raise bad("its 'params' do not match its 'signature'")
    for k, v in params.items():
        if not torch.is_tensor(v) or list(v.shape) != list(signature[k]) or not torch.is_floating_point(v):
            raise bad(f"its parameter {k!r} is not a floating-point tensor of shape {list(signature[k])}")
    if not isinstance(state.get("modules", {}), dict):
        raise bad("its 'modules' is not a table of module states")
    cursor = state.get("cursor")
    if cursor is not None:
        if not isinstance(cursor, dict) or not all(_is_int(cursor.get(k)) and cursor[k] >= 0 for k in ("epoch", "pos", "step")):
            raise bad("its 'cursor' is not a table of non-negative epoch, pos and step counters")
        perm = cursor.get("perm")
        if perm is not None and not (torch.is_tensor(perm) and perm.dim() == 1 and not torch.is_floating_point(perm)):
            raise bad("its epoch permutation is not a 1-D integer tensor")
    if "optimizer" in state:
        _check_optimizer(state["optimizer"], bad)
    if "best_valid" in state and not isinstance(state["best_valid"], (int, float)):
        raise bad("its 'best_valid' is not a number")
    if "lr_reductions" in state and not (_is_int(state["lr_reductions"]) and state["lr_reductions"] >= 0):
        raise bad("its 'lr_reductions' is not a count")
    sums = state.get("sums")
    if sums is not None and not (isinstance(sums, dict) and all(torch.is_tensor(v) or isinstance(v, (int, float)) for v in sums.values())):
        raise bad("its 'sums' are not running sums")
    if "rng" in state:
        _check_rng(state["rng"], bad)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_optimizer(opt: Any, bad) -> None:
    """An optimiser state: param groups of numbers (lr, betas, eps, ...) and per-parameter tensors or numbers."""
    if not (isinstance(opt, dict) and isinstance(opt.get("param_groups"), list) and isinstance(opt.get("state", {}), dict)):
        raise bad("its 'optimizer' is not an optimiser state")
    for i, group in enumerate(opt["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) or not all(_is_int(p) for p in group["params"]):
            raise bad(f"its optimiser's param group {i} is not a table with a list of parameter indices")
        for key in ("lr", "eps", "betas", "weight_decay", "momentum", "damping"):
            value = group.get(key)
            numbers = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(_is_number(v) or torch.is_tensor(v) and v.numel() == 1 for v in numbers):
                raise bad(f"its optimiser's {key!r} in param group {i} is {value!r}, not a number")
    for index, entry in opt.get("state", {}).items():
        if not isinstance(entry, dict) or not all(torch.is_tensor(v) or _is_number(v) for v in entry.values()):
            raise bad(f"its optimiser's state of parameter {index} is not a table of tensors and numbers")


def _check_rng(rng: Any, bad) -> None:
    """What :func:`pyrovae.utils.rng.get_rng_state` writes: Python's state, NumPy's (as a tensor), torch's bytes."""
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
        raise bad("its 'rng' is not a table of random-number-generator states (python, numpy, torch, cuda)")
    py = rng["python"]
    if not (isinstance(py, (list, tuple)) and len(py) == 3 and isinstance(py[1], (list, tuple)) and all(_is_int(v) for v in py[1])):
        raise bad("its Python random-number state is not (version, integers, gauss)")
    np_state = rng["numpy"]
    if not (isinstance(np_state, (list, tuple)) and len(np_state) == 5 and isinstance(np_state[0], str) and torch.is_tensor(np_state[1]) and np_state[1].dim() == 1):
        raise bad("its NumPy random-number state is not (kind, key tensor, position, has_gauss, gauss)")
    for name, value in (("torch", rng["torch"]), *((f"cuda {i}", v) for i, v in enumerate(rng.get("cuda") or []))):
        if not (torch.is_tensor(value) and value.dtype == torch.uint8 and value.dim() == 1):
            raise bad(f"its {name} random-number state is not a 1-D byte tensor")
