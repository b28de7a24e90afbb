"""Checks that refuse data and model/guide pairs that cannot work, before any training step runs
(:func:`check_fit_data`, :func:`check_sites`, :func:`check_data_shape`). Layer sizes are checked in
:mod:`pyrovae.nn.checks`."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyrovae.data import check_data

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


def check_sites(model, guide, x: torch.Tensor) -> None:
    """Raise ``ValueError`` when a model/guide pair cannot be trained together: the model observes nothing,
    the guide samples a site the model lacks, or the guide's samples of a site do not fit the model's
    distribution there (another shape, or values outside its support). ``x`` is a batch, or a tuple of the
    programs' arguments."""
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
