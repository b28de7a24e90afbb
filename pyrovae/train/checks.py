"""Checks that refuse data and model/guide pairs that cannot work, before any training step runs
(:func:`check_fit_data`, :func:`check_sites`, :func:`check_data_shape`). Layer sizes are checked in
:mod:`pyrovae.nn.checks`."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyrovae.data import check_data
from pyrovae.utils.rng import get_rng_state, set_rng_state

def check_data_shape(x: torch.Tensor, *programs) -> None:
    """Raise ``ValueError`` when a batch ``x`` does not fit the ``x_shape`` a model or guide declares (if it does)."""
    for program in programs:
        want = getattr(program, "x_shape", None)
        if want is None:
            continue
        got = tuple(x.shape[1:])
        if tuple(want) != got:
            raise ValueError(
                f"the data has examples of shape {got} (a batch of shape {tuple(x.shape)}) but {type(program).__name__} was "
                f"built for x_shape={tuple(want)}: build the model and guide with x_shape={got}, or reshape the data to "
                f"[N, {', '.join(map(str, want))}]"
            )


def _first_tensor(data):
    return data[0] if isinstance(data, (tuple, list)) and data else data


def check_valid_data(train: tuple, valid: tuple, *programs) -> None:
    """Raise ``TypeError``/``ValueError`` when validation data is not like the training data (tuples of tensors, as
    ``as_inputs`` makes them): another number of tensors, another dtype or number of dimensions, or examples of
    another shape than the programs' ``x_shape``. Checked before the first step, not after an epoch's training."""
    if len(valid) != len(train):
        raise ValueError(
            f"valid has {len(valid)} tensor(s) but the training data has {len(train)}: pass valid as the same kind of "
            f"tuple as train (e.g. (x, y) for both)"
        )
    for i, (t, v) in enumerate(zip(train, valid)):
        which = "valid" if len(valid) == 1 else f"valid[{i}]"
        if v.dtype != t.dtype:
            raise TypeError(f"{which} has dtype {v.dtype} but the training data has {t.dtype}: convert it, e.g. valid.to({t.dtype})")
        if v.dim() != t.dim():
            raise ValueError(f"{which} has shape {tuple(v.shape)} but the training data {tuple(t.shape)}: pass validation examples of the training examples' shape")
        if v.device != t.device:
            raise ValueError(f"{which} is on {v.device} but the training data on {t.device}: move it, e.g. valid.to({str(t.device)!r})")
    try:
        check_data_shape(valid[0][:1], *programs)
    except ValueError as e:
        raise ValueError(f"valid: {e}") from None


def check_fit_data(model, train, valid=None) -> None:
    """Raise ``TypeError``/``ValueError`` for training (or validation) data a model cannot learn from: not a
    floating-point tensor, NaN/inf values, or values outside [0, 1] when the model's likelihood needs them
    (``model.likelihood.needs_unit_interval``, as the library's models expose). ``train`` and ``valid`` are a
    tensor or a tuple of tensors whose first one is the observed data."""
    likelihood = getattr(model, "likelihood", None)
    unit = bool(getattr(likelihood, "needs_unit_interval", False))
    name = getattr(model, "likelihood_name", "Bernoulli")
    x_shape = getattr(model, "x_shape", None)
    params = [p for p in model.parameters() if p.is_floating_point()] if isinstance(model, torch.nn.Module) else []
    for what, data in (("training", train), ("validation", valid)):
        parts = tuple(data) if isinstance(data, (tuple, list)) else (data,)
        for t in parts:
            if torch.is_tensor(t) and t.layout != torch.strided:
                raise TypeError(f"the {what} data is a sparse tensor ({t.layout}); the trainer slices dense tensors: pass x.to_dense()")
            if torch.is_tensor(t) and t.device.type == "meta":
                raise ValueError(f"the {what} data is on the meta device: it has a shape but no values to learn from; pass the data itself (e.g. on 'cpu')")
        if x_shape is not None and len(parts) > 2 and all(torch.is_tensor(t) and tuple(t.shape) == tuple(x_shape) for t in parts):
            raise TypeError(
                f"the {what} data is a sequence of {len(parts)} tensors of shape {tuple(x_shape)}, one example each; a tuple holds "
                "tensors [N, ...] of different kinds (x, context, ...): stack the examples into one tensor, torch.stack(examples)"
            )
        x = _first_tensor(data)
        if x is None:
            continue
        if not torch.is_tensor(x):
            raise TypeError(f"the {what} data is a {type(x).__name__}, not a tensor: pass a torch.Tensor (torch.as_tensor(...), or pyrovae.data.from_array)")
        if params and torch.is_floating_point(x) and x.dtype != params[0].dtype:
            raise TypeError(
                f"the {what} data has dtype {x.dtype} but the model's parameters are {params[0].dtype}: convert the data, "
                f"e.g. x.to({params[0].dtype}), or the model and guide (.to({x.dtype}))"
            )
        if not torch.is_floating_point(x):
            if likelihood is None:  # a program of the user's, or one over indices (tokens): its own business
                continue
            raise TypeError(
                f"the {what} data has dtype {x.dtype}; the models need floating-point data: convert it, e.g. x.float() / 255 "
                "for uint8 pixels (pyrovae.data.from_array does this)"
            )
        try:
            check_data(x, unit_interval=unit, what=f"the {what} data")
        except ValueError as e:
            if unit and "outside [0, 1]" in str(e):
                raise ValueError(f"{e} (the model's likelihood is {name})") from None
            raise


def _dist_name(fn) -> str:
    while hasattr(fn, "base_dist"):  # Independent, MaskedDistribution, ...: name what they wrap
        fn = fn.base_dist
    return type(fn).__name__


def check_sites(model, guide, x: torch.Tensor, keep_rng: bool = False) -> None:
    """Raise ``ValueError`` when a model/guide pair cannot be trained together: the model observes nothing,
    the guide samples a site the model lacks, or the guide's samples of a site do not fit the model's
    distribution there (another shape, or values outside its support). ``x`` is a batch, or a tuple of the
    programs' arguments. ``keep_rng``: leave the random state as it was (the check's draws are not the run's)."""
    rng = get_rng_state() if keep_rng else None
    try:
        _check_sites(model, guide, x)
    finally:
        if rng is not None:
            set_rng_state(rng)


def _check_sites(model, guide, x) -> None:
    args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            model_trace = prune_subsample_sites(poutine.trace(model).get_trace(*args))
            guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(*args))
    except Exception:  # a program that does not run on this batch: the first evaluation says why, with the batch shape
        return
    model_sites = {n: s for n, s in model_trace.nodes.items() if s["type"] == "sample"}
    if not any(s["is_observed"] for s in model_sites.values()):
        raise ValueError(
            f"the model has no observed site (sample sites: {sorted(model_sites) or 'none'}): an objective needs the data as "
            "an observed site, pyro.sample('x', ..., obs=x)"
        )
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site["infer"].get("is_auxiliary"):
            continue
        if name not in model_sites:
            raise ValueError(
                f"the guide samples a site {name!r} that the model does not have (the model's sample sites: {sorted(model_sites)}): "
                "name the guide's latent sites as the model's"
            )
        theirs, ours = model_sites[name]["fn"], site["fn"]
        if tuple(theirs.event_shape) != tuple(ours.event_shape):
            raise ValueError(
                f"the guide's site {name!r} has event shape {tuple(ours.event_shape)} but the model's has {tuple(theirs.event_shape)}: "
                "build the guide with the model's latent sizes"
            )
        support = getattr(theirs, "support", None)
        if support is not None and not isinstance(support, type(torch.distributions.constraints.dependent)):
            try:
                inside = bool(support.check(site["value"]).all())
            except Exception:
                inside = True  # a support that cannot check this value: let the objective decide
            if not inside:
                raise ValueError(
                    f"the guide's samples of site {name!r} ({_dist_name(ours)}) lie outside the support of the model's "
                    f"distribution there ({_dist_name(theirs)}, support {support}): this guide cannot be paired with this "
                    "model; use a guide whose samples the model can score (e.g. --model discrete with --guide bernoulli)"
                )


def check_epochs(epochs: int, batch_size: int, cursor) -> None:
    """Refuse ``fit(train, epochs, batch_size)`` arguments that cannot continue a run at ``cursor``."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if int(epochs) < 0:
        raise ValueError(f"epochs={epochs!r} must be >= 0")
    if int(epochs) < cursor.epoch or (int(epochs) == cursor.epoch and cursor.pos > 0):
        raise ValueError(
            f"epochs={epochs!r}, but the run is already at epoch {cursor.epoch}"
            + (f" and {cursor.pos} batches into epoch {cursor.epoch + 1}" if cursor.pos else "")
            + f": pass epochs >= {cursor.epoch + (1 if cursor.pos else 0)} to continue it (epochs count those already done)"
        )


def collect_params(model, guide, objective, batch: tuple) -> dict[str, torch.Tensor]:
    """Every parameter the model, guide and objective touch (``pyro.module`` and ``pyro.param`` sites), found by
    tracing one evaluation of ``objective`` on ``batch``, in name order. Refuses a first evaluation that fails (with
    the batch's shapes), no parameters, and modules whose parameters the param store does not return (stale names)."""
    try:
        with poutine.trace(param_only=True) as capture:
            objective.loss(model, guide, *batch)
    except RuntimeError as e:  # torch's shape errors (e.g. "mat1 and mat2 shapes cannot be multiplied") carry no context
        shapes = " and ".join(str(tuple(t.shape)) for t in batch)
        raise ValueError(
            f"the first evaluation of {objective!r} on a batch of shape {shapes} failed: {str(e).splitlines()[0]}. "
            "Check that the data's example shape matches the shape the model and guide were built for."
        ) from e
    params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
    if not params:
        raise ValueError("the model and guide have no parameters to train: register networks with pyro.module or PyroModule, or use pyro.param")
    found = {id(p) for p in params.values()}
    for who, module in (("model", model), ("guide", guide)):
        if isinstance(module, torch.nn.Module):
            stale = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in found]
            if stale:
                raise ValueError(
                    f"the {who}'s parameters {stale[:3]}{'...' if len(stale) > 3 else ''} are not the ones Pyro's param store "
                    "returns under their names: the store still holds parameters of an earlier model with the same "
                    "pyro.module name, so they would not be trained. Call pyro.clear_param_store() before building a new model."
                )
    return dict(sorted(params.items()))


def check_valid_runs(model, guide, train: tuple, valid: tuple, evaluate) -> None:
    """Refuse validation data the epoch's end could not evaluate, now rather than after an epoch of training: unlike
    the training data (:func:`check_valid_data`), or failing ``evaluate(first two examples)`` (the random state is
    kept, so that a resumed run goes on as if never stopped)."""
    check_valid_data(train, valid, model, guide)
    rng = get_rng_state()
    try:
        evaluate(tuple(v[:2] for v in valid))
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"valid does not run through the model and guide ({type(e).__name__}: {e}); pass validation data like the training data") from e
    finally:
        set_rng_state(rng)


def check_trainer_options(lr, clip_norm, check_every, capture: str, objective) -> None:
    """Refuse ``Trainer`` options that cannot train, naming the fix."""
    from pyrovae.capture import MODES

    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr={lr!r} must be a positive number")
    if lr >= 1e30:  # Adam's step size lr / (1 - beta1^t) overflows float32 (at 3.4e38) and torch raises mid-step
        raise ValueError(f"lr={lr!r} is too large: float32 parameters overflow at 3.4e38; use a learning rate below 1e30")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm={clip_norm!r} must be positive, or None for no clipping")
    if int(check_every) < 1:
        raise ValueError(f"check_every={check_every!r} must be a positive number of steps")
    if capture not in MODES:
        raise ValueError(f"capture={capture!r} is not known; choose one of {list(MODES)}")
    if not hasattr(objective, "differentiable_loss"):
        raise TypeError(f"objective {objective!r} has no differentiable_loss; pass a pyrovae objective or a pyro.infer.ELBO")


def adam_defaults(optimizer: type, kwargs: dict, params) -> dict:
    """``kwargs`` for ``optimizer``, with ``fused=True`` added for ``torch.optim.Adam`` when the caller chose neither
    ``fused`` nor ``foreach`` and every parameter is a floating-point CPU or CUDA tensor: torch's fused kernel does the
    update in one pass over each tensor instead of about ten (on CPU, 62 fewer milliseconds per step of the sentence
    VAE at Bowman et al.'s sizes, whose embeddings and softmax hold 9 million parameters; ``docs/text.md``). The same
    update up to float rounding; pass ``optimizer_kwargs={"fused": False}`` for torch's default loop."""
    if optimizer is not torch.optim.Adam or "fused" in kwargs or "foreach" in kwargs:
        return dict(kwargs)
    params = list(params)
    ok = params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) and len({p.device for p in params}) == 1
    return {**kwargs, "fused": True} if ok else dict(kwargs)
