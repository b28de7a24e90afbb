"""Training any model/guide pair with any objective (Pyro's ELBOs or :mod:`pyrovae.objectives`).

The hot loop keeps everything on the device: batches are drawn by on-device index permutation, losses
and metrics are summed on the device, and the host synchronises only every ``check_every`` steps (to
check that the loss and gradients stayed finite) and at the end of an epoch.

A non-finite loss or gradient rolls the run back to the last good in-memory snapshot; the failing step
is found by replaying from it one step at a time, and the report names the step and the Pyro sites with
non-finite log-densities. Ctrl-C / SIGTERM write a checkpoint at the next step boundary and stop cleanly.
"""
from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from tqdm.auto import tqdm

from pyrovae.capture import MODES as CAPTURE_MODES
from pyrovae.capture import StepCapture, grad_norm
from pyrovae import distributed, runs
from pyrovae.data import Batches, as_inputs, check_data
from pyrovae.checkpoint import CheckpointError, check_state, get_rng_state, load_checkpoint, save_checkpoint, set_rng_state, write_json

SCHEDULES = ("constant", "exponential", "cosine", "iwae")


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient and was stopped (the report says where)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; ``--resume`` continues."""


def lr_factor(schedule: str, epoch: int, epochs: int, gamma: float = 0.99) -> float:
    """Learning-rate multiplier at ``epoch``. ``iwae`` is Burda et al.'s schedule: 3^i epochs at 10^(-i/7)."""
    if schedule == "constant":
        return 1.0
    if schedule == "exponential":
        return gamma**epoch
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / max(1, epochs)))
    if schedule == "iwae":
        i, seen = 0, 0
        while seen + 3**i <= epoch:
            seen += 3**i
            i += 1
        return 10 ** (-i / 7)
    raise ValueError(f"lr schedule {schedule!r} is not known; choose one of {list(SCHEDULES)}")


def _copy_sums(sums: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in sums.items()}


@dataclass
class Cursor:
    """Where training is: epoch, position (batch index) inside the epoch's permutation, global step."""

    epoch: int = 0
    pos: int = 0
    step: int = 0
    perm: Optional[torch.Tensor] = None


@dataclass
class Snapshot:
    cursor: Cursor
    params: dict
    optimizer: dict
    objective: dict
    rng: dict
    sums: dict = field(default_factory=dict)


def nonfinite_sites(model, guide, *args, **kwargs) -> list[str]:
    """Names of the sites whose log-density (or sampled value) is not finite in one run of guide and model.

    Runs with validation off: a distribution built from non-finite parameters must be reported, not raise."""
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    except Exception as e:  # a program that cannot run at all on the diverged state (e.g. validate_args=True on a site)
        return [f"(the guide and model could not run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
    bad = []
    for who, trace in (("guide", guide_trace), ("model", model_trace)):
        trace = prune_subsample_sites(trace)
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            try:
                with pyro.validation_enabled(False):
                    lp = site["fn"].log_prob(site["value"])
            except Exception as e:  # a distribution that cannot even be built/scored counts as broken
                bad.append(f"{who}:{name} ({type(e).__name__})")
                continue
            if not bool(torch.isfinite(lp).all()) or not bool(torch.isfinite(site["value"]).all()):
                bad.append(f"{who}:{name}")
    return bad


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


def check_fit_data(model, train, valid=None) -> None:
    """Raise ``TypeError``/``ValueError`` for training (or validation) data a model cannot learn from: not a
    floating-point tensor, NaN/inf values, or values outside [0, 1] when the model's likelihood needs them
    (``model.likelihood.needs_unit_interval``, as the library's models expose). ``train`` and ``valid`` are a
    tensor or a tuple of tensors whose first one is the observed data."""
    likelihood = getattr(model, "likelihood", None)
    unit = bool(getattr(likelihood, "needs_unit_interval", False))
    name = getattr(model, "likelihood_name", "Bernoulli")
    for what, data in (("training", train), ("validation", valid)):
        x = _first_tensor(data)
        if x is None:
            continue
        if not torch.is_tensor(x):
            raise TypeError(f"the {what} data is a {type(x).__name__}, not a tensor: pass a torch.Tensor (torch.as_tensor(...), or pyrovae.data.from_array)")
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


class Trainer:
    """Fits ``model``/``guide`` with ``objective`` using Adam (or any ``torch.optim`` class).

    Args:
        model, guide: Pyro programs ``model(x)``, ``guide(x)`` (usually ``nn.Module`` instances), or ``model(*batch)``,
            ``guide(*batch)`` for data given as a tuple of tensors (``(x, y)``, ``(tokens, lengths)``).
        objective: a :mod:`pyrovae.objectives` objective or any ``pyro.infer.ELBO`` with ``differentiable_loss``.
        lr: learning rate; ``schedule``: ``constant``, ``exponential`` (``gamma`` per epoch), ``cosine``, ``iwae``.
        clip_norm: clip the global gradient norm to this value (None: no clipping).
        run_dir: folder for ``config.json``, ``metrics.jsonl`` and ``checkpoints/`` (None: keep nothing on disk).
        config: JSON-serialisable description of the run, stored with every checkpoint.
        check_every: steps between host-side finiteness checks (and rollback snapshots).
        on_divergence: ``stop`` (raise :class:`DivergenceError`) or ``reduce_lr`` (halve the learning rate
            and continue from the last good state, at most ``max_lr_reductions`` times).
        valid_particles: particles of the validation ELBO.
        progress: show a tqdm progress bar.
        validate_every_step: keep Pyro's validation (if enabled) on every step, not only the first (such steps
            are never captured).
        capture: the step's fast path (:mod:`pyrovae.capture`): ``replay`` records each step signature once
            and replays the recorded graph without Pyro's Python, ``compile`` also compiles that graph with
            ``torch.compile``, ``off`` runs Pyro on every step. Each graph is checked against the plain step
            when it is made, again after ``check_every`` replays and then at doubling intervals (up to 16 times
            that); where one cannot be used the plain step runs,
            and :attr:`capture_report` says why. A graph repeats the Python decisions of the step it recorded:
            a model whose Python changes from step to step (reads a step counter, say) needs ``capture="off"``.
    """

    def __init__(
        self,
        model,
        guide,
        objective,
        lr: float = 1e-3,
        schedule: str = "constant",
        gamma: float = 0.99,
        clip_norm: Optional[float] = None,
        optimizer: type = torch.optim.Adam,
        optimizer_kwargs: Optional[dict] = None,
        run_dir: Optional[Union[str, Path]] = None,
        config: Optional[dict] = None,
        check_every: int = 100,
        on_divergence: str = "stop",
        max_lr_reductions: int = 5,
        valid_particles: int = 1,
        progress: bool = True,
        validate_every_step: bool = False,
        capture: str = "replay",
    ):
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr={lr!r} must be a positive number")
        if lr >= 1e30:  # Adam's step size lr / (1 - beta1^t) overflows float32 (at 3.4e38) and torch raises mid-step
            raise ValueError(f"lr={lr!r} is too large: float32 parameters overflow at 3.4e38; use a learning rate below 1e30")
        lr_factor(schedule, 0, 1, gamma)  # validates the name
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm={clip_norm!r} must be positive, or None for no clipping")
        if on_divergence not in ("stop", "reduce_lr"):
            raise ValueError(f"on_divergence={on_divergence!r}: choose 'stop' or 'reduce_lr'")
        if int(check_every) < 1:
            raise ValueError(f"check_every={check_every!r} must be a positive number of steps")
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture={capture!r} is not known; choose one of {list(CAPTURE_MODES)}")
        if not hasattr(objective, "differentiable_loss"):
            raise TypeError(f"objective {objective!r} has no differentiable_loss; pass a pyrovae objective or a pyro.infer.ELBO")
        self.model, self.guide, self.objective = model, guide, objective
        self.lr, self.schedule, self.gamma, self.clip_norm = float(lr), schedule, float(gamma), clip_norm
        self.optimizer_cls, self.optimizer_kwargs = optimizer, dict(optimizer_kwargs or {})
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config = dict(config or {})
        self.check_every, self.on_divergence, self.max_lr_reductions = int(check_every), on_divergence, int(max_lr_reductions)
        self.valid_particles, self.progress = int(valid_particles), progress
        self.validate_every_step, self._validate_next = bool(validate_every_step), True
        self.capture_mode, self._capture = capture, None
        self._valid_objective = None
        self.params: dict[str, torch.Tensor] = {}
        self.optim: Optional[torch.optim.Optimizer] = None
        self.cursor = Cursor()
        self.best_valid = -math.inf
        self.lr_reductions = 0
        self.history: list[dict] = []
        self._stop_signal: Optional[int] = None
        self._snapshot: Optional[Snapshot] = None
        self._sums: dict = {}  # the current epoch's running metric sums, checkpointed with a mid-epoch stop
        self._lock: Optional[runs.RunLock] = None  # held on run_dir while fit() runs
        self._owns_run = False  # run_dir holds this trainer's run (resumed, or started by fit)

    # --- parameters and optimiser ------------------------------------------------------------------
    def setup(self, *batch: torch.Tensor) -> None:
        """Collect every parameter the model, guide and objective touch (``pyro.module`` and ``pyro.param``
        sites) by tracing one evaluation on ``batch`` (the model's positional inputs: ``x``, or ``x, y``), and
        build the optimiser over them in a fixed (name) order."""
        if self.optim is not None:
            return
        batch = as_inputs(batch[0] if len(batch) == 1 else batch, "the batch")  # setup(x, y) or setup((x, y))
        check_data_shape(batch[0], self.model, self.guide)
        rng = get_rng_state()
        try:
            check_sites(self.model, self.guide, batch)
        finally:
            set_rng_state(rng)  # the check draws nothing from the run's random stream
        try:
            with poutine.trace(param_only=True) as capture:
                self.objective.loss(self.model, self.guide, *batch)
        except RuntimeError as e:  # torch's shape errors (e.g. "mat1 and mat2 shapes cannot be multiplied") carry no context
            shapes = " and ".join(str(tuple(t.shape)) for t in batch)
            raise ValueError(
                f"the first evaluation of {self.objective!r} on a batch of shape {shapes} failed: {str(e).splitlines()[0]}. "
                "Check that the data's example shape matches the shape the model and guide were built for."
            ) from e
        params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
        if not params:
            raise ValueError("the model and guide have no parameters to train: register networks with pyro.module or PyroModule, or use pyro.param")
        found = {id(p) for p in params.values()}
        for who, module in (("model", self.model), ("guide", self.guide)):
            if isinstance(module, torch.nn.Module):
                stale = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in found]
                if stale:
                    raise ValueError(
                        f"the {who}'s parameters {stale[:3]}{'...' if len(stale) > 3 else ''} are not the ones Pyro's param store "
                        "returns under their names: the store still holds parameters of an earlier model with the same "
                        "pyro.module name, so they would not be trained. Call pyro.clear_param_store() before building a new model."
                    )
        self.params = dict(sorted(params.items()))
        self.optim = self.optimizer_cls(list(self.params.values()), lr=self.lr, **self.optimizer_kwargs)
        for group in self.optim.param_groups:
            group.setdefault("initial_lr", group["lr"])
        if self.capture_mode != "off":
            self._capture = StepCapture(
                self.objective, self.model, self.guide, list(self.params.values()), self._plain_step, self.capture_mode, verify_every=self.check_every
            )

    @property
    def capture_report(self) -> str:
        """Which steps run captured, and why any run plainly."""
        if self._capture is None:
            return "plain steps (capture='off')" if self.optim is not None else "not set up yet"
        return self._capture.summary()

    def _set_lr(self, epoch: int, epochs: int) -> None:
        factor = lr_factor(self.schedule, epoch, epochs, self.gamma) * 0.5**self.lr_reductions
        for group in self.optim.param_groups:
            group["lr"] = group["initial_lr"] * factor

    # --- one step ---------------------------------------------------------------------------------
    def step(self, *batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on ``batch`` (``x``, or ``x, y, ...``: passed as ``model(*batch)``); returns (loss per
        datum, gradient norm), both on the device.

        Pyro's and torch.distributions' argument/support validation runs on the first step only (unless
        ``validate_every_step``): each check is a host read, and non-finite values are caught anyway by the
        periodic finiteness check. Later steps take the captured fast path where it applies."""
        self.optim.zero_grad(set_to_none=True)
        validate = self._validate_next and is_validation_enabled()
        self._validate_next = self.validate_every_step
        if validate or self._capture is None:
            loss, norm = self._plain_step(*batch, validate=validate)
        else:
            loss, norm = self._capture(*batch)
        loss, norm = distributed.average_gradients(self, loss, norm, batch[0].shape[0])  # distributed: global-batch gradient
        if self.clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(list(self.params.values()), self.clip_norm, norm)
        self.optim.step()
        if hasattr(self.objective, "step"):
            self.objective.step()
        return loss, norm

    def _plain_step(self, *batch: torch.Tensor, validate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss per datum and gradient norm of the objective through Pyro, gradients left in ``.grad``."""
        with pyro.validation_enabled(validate):
            loss = self.objective.differentiable_loss(self.model, self.guide, *batch) / batch[0].shape[0]
        loss.backward()
        return loss.detach(), grad_norm([p.grad for p in self.params.values()])

    # --- snapshots, divergence --------------------------------------------------------------------
    def _take_snapshot(self, sums: dict) -> None:
        self._snapshot = Snapshot(
            cursor=Cursor(self.cursor.epoch, self.cursor.pos, self.cursor.step, self.cursor.perm),
            params={k: v.detach().clone() for k, v in self.params.items()},
            optimizer=copy.deepcopy(self.optim.state_dict()),
            objective=copy.deepcopy(self._objective_state()),
            rng=get_rng_state(),
            sums=_copy_sums(sums),
        )

    def _restore_snapshot(self) -> dict:
        snap = self._snapshot
        with torch.no_grad():
            for k, v in snap.params.items():
                self.params[k].copy_(v)
        self.optim.load_state_dict(copy.deepcopy(snap.optimizer))
        self._load_objective_state(copy.deepcopy(snap.objective))
        set_rng_state(snap.rng)
        c = snap.cursor
        self.cursor = Cursor(c.epoch, c.pos, c.step, c.perm)
        return _copy_sums(snap.sums)

    def _diagnose(self, batch: Callable[[Cursor], tuple], upto: int) -> str:
        """Replay from the snapshot one step at a time until the loss or gradient is non-finite, and name the
        sites and parameters that were non-finite just before that step."""
        self._restore_snapshot()
        start = self.cursor.step
        while self.cursor.step < upto:
            x = batch(self.cursor)
            before = {k: v.detach().clone() for k, v in self.params.items()}
            loss, norm = self.step(*x)
            if bool(torch.isfinite(loss)) and bool(torch.isfinite(norm)):
                self._advance()
                continue
            what = "loss" if not bool(torch.isfinite(loss)) else "gradient"
            with torch.no_grad():
                for k, v in before.items():
                    self.params[k].copy_(v)
            sites = nonfinite_sites(self.model, self.guide, *x)
            params = [k for k, v in before.items() if not bool(torch.isfinite(v).all())]
            where = f"sites with non-finite log-densities: {', '.join(sites)}" if sites else "every site's log-density was finite"
            if params:
                where += f"; non-finite parameters: {', '.join(params)}"
            return f"non-finite {what} at step {self.cursor.step + 1} (epoch {self.cursor.epoch + 1}, batch {self.cursor.pos + 1}); {where}"
        return f"non-finite loss or gradient between steps {start + 1} and {upto}, which did not recur when replayed (non-deterministic kernels?)"

    def _advance(self) -> None:
        self.cursor.step += 1
        self.cursor.pos += 1

    # --- objective state ---------------------------------------------------------------------------
    def _objective_state(self) -> dict:
        return self.objective.state_dict() if hasattr(self.objective, "state_dict") else {}

    def _load_objective_state(self, state: dict) -> None:
        if hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state)

    # --- checkpoints -------------------------------------------------------------------------------
    def state_dict(self, finished: bool = False) -> dict:
        modules = {k: m.state_dict() for k, m in (("model", self.model), ("guide", self.guide)) if isinstance(m, torch.nn.Module)}
        return {
            "config": self.config,
            "params": {k: v.detach() for k, v in self.params.items()},
            "signature": {k: list(v.shape) for k, v in self.params.items()},
            "modules": modules,
            "optimizer": self.optim.state_dict(),
            "objective": self._objective_state(),
            "rng": get_rng_state(),
            **distributed.rank_rng_states(),  # distributed: every rank's RNG state (a collective)
            "cursor": {"epoch": self.cursor.epoch, "pos": self.cursor.pos, "step": self.cursor.step, "perm": self.cursor.perm},
            "best_valid": self.best_valid,
            "lr_reductions": self.lr_reductions,
            "sums": _copy_sums(self._sums),
            "finished": finished,
        }

    def load_weights(self, state: dict) -> None:
        """Restore the parameters (and module buffers) of a checkpoint; :meth:`setup` must have run."""
        missing_keys = [k for k in ("signature", "params", "modules") if k not in state]
        if missing_keys:
            raise CheckpointError(f"the checkpoint has no {missing_keys}: it was not written by Trainer.state_dict")
        check_state(state)
        theirs, ours = state["signature"], {k: list(v.shape) for k, v in self.params.items()}
        if theirs != ours:
            missing = sorted(set(ours) - set(theirs))
            extra = sorted(set(theirs) - set(ours))
            shapes = [f"{k}: {theirs[k]} vs {ours[k]}" for k in sorted(set(ours) & set(theirs)) if theirs[k] != ours[k]]
            raise CheckpointError(
                "the checkpoint was written for a different model/guide: "
                + "; ".join(x for x in (f"missing parameters {missing}" if missing else "", f"unexpected parameters {extra}" if extra else "", f"shape mismatches {shapes}" if shapes else "") if x)
                + ". Build the model with the run's config.json (pyrovae evaluate RUN_DIR does this)."
            )
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
        for key, module in (("model", self.model), ("guide", self.guide)):
            if key in state["modules"] and isinstance(module, torch.nn.Module):
                try:
                    module.load_state_dict(state["modules"][key])
                except RuntimeError as e:
                    raise CheckpointError(f"the checkpoint's {key} does not fit this {type(module).__name__}: {e}") from e

    def load_state_dict(self, state: dict) -> None:
        """Restore everything :meth:`state_dict` saved: weights, optimiser, objective, RNG and position."""
        self.load_weights(state)
        try:
            self.optim.load_state_dict(state["optimizer"])
            self._load_objective_state(state["objective"])
            set_rng_state(state["rng"])
            distributed.restore_rank_rng(state)  # distributed: this rank's own RNG state
            c = state["cursor"]
            self.cursor = Cursor(c["epoch"], c["pos"], c["step"], c["perm"])
            self.best_valid, self.lr_reductions = state["best_valid"], state["lr_reductions"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"the checkpoint does not fit this trainer ({type(e).__name__}: {e}): it was written with another objective "
                f"or optimiser than {self.objective!r}; resume with the run's own config.json"
            ) from e
        self._sums = _copy_sums(state.get("sums") or {})

    def _save(self, name: str, finished: bool = False) -> Optional[Path]:
        if self.run_dir is None:
            return None
        state = self.state_dict(finished)  # on every rank: it gathers their RNG states
        return distributed.on_main(lambda: save_checkpoint(state, self.run_dir / "checkpoints" / name))  # distributed: rank 0 writes

    def resume(self, path: Union[str, Path], *batch: torch.Tensor) -> None:
        """Continue from a checkpoint file (``checkpoints/last.pt`` of a run); ``batch``: a batch of the data's
        tensors (``x``, or ``x, y``), to set up the parameters."""
        batch = as_inputs(batch[0] if len(batch) == 1 else batch, "the batch")  # resume(path, x, y) or resume(path, (x, y))
        with runs.RunLock(self.run_dir) if distributed.is_writer(self) else contextlib.nullcontext():  # distributed: rank 0 locks; no other process writes the run
            state = load_checkpoint(path, map_location=batch[0].device)
            self.setup(*batch)
            self.load_state_dict(state)
            self._owns_run = True
            if distributed.is_writer(self):  # distributed: rank 0 keeps the metrics
                # records of epochs after the checkpoint (written just before a crash) are redone, torn lines dropped
                self.history = runs.truncate_metrics(self.run_dir, self.cursor.epoch)

    # --- signals ------------------------------------------------------------------------------------
    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    # --- the loop -----------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, valid: Union[torch.Tensor, tuple], batch_size: int) -> float:
        from pyrovae.evaluate import elbo_terms
        from pyrovae.objectives import ELBO

        if self._valid_objective is None:  # one objective for every epoch: it guesses the plate nesting once
            self._valid_objective = ELBO(num_particles=self.valid_particles)
        # distributed: each rank evaluates its shard, the mean is reduced
        return distributed.sharded_mean(lambda part: elbo_terms(self.model, self.guide, part, batch_size=batch_size, objective=self._valid_objective)["elbo"], valid)

    def fit(
        self,
        train: Union[torch.Tensor, tuple],
        epochs: int,
        batch_size: int = 100,
        valid: Optional[Union[torch.Tensor, tuple]] = None,
        dynamic_binarize: bool = False,
    ) -> list[dict]:
        """Train for ``epochs`` epochs (counting epochs already done when resumed); returns the per-epoch
        history, also written to ``run_dir/metrics.jsonl``.

        ``train`` and ``valid``: a tensor ``[N, ...]`` or a tuple of tensors with the same first dimension
        (``(x, y)``); each batch is sliced from all of them by the same permutation and passed as
        ``model(*batch)``, ``guide(*batch)``. ``dynamic_binarize`` resamples the first tensor only.

        ``train`` may also be a batch source with :class:`~pyrovae.data.Batches`'s ``__len__``, ``permutation()``,
        ``batch(perm, index)`` and ``data`` (e.g. :class:`pyrovae.text.BucketBatches`, batches of sentences of
        similar length): its batches are used as they come (``batch_size`` then only sizes validation)."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if int(epochs) < 0:
            raise ValueError(f"epochs={epochs!r} must be >= 0")
        if int(epochs) < self.cursor.epoch or (int(epochs) == self.cursor.epoch and self.cursor.pos > 0):
            raise ValueError(
                f"epochs={epochs!r}, but the run is already at epoch {self.cursor.epoch}"
                + (f" and {self.cursor.pos} batches into epoch {self.cursor.epoch + 1}" if self.cursor.pos else "")
                + f": pass epochs >= {self.cursor.epoch + (1 if self.cursor.pos else 0)} to continue it (epochs count those already done)"
            )
        source = train if all(hasattr(train, a) for a in ("permutation", "batch", "data", "__len__")) else None
        train = as_inputs(train if source is None else source.data, "train")
        valid = None if valid is None else as_inputs(valid, "valid")
        check_fit_data(self.model, train, valid)
        n = train[0].shape[0]
        if n == 0:
            raise ValueError("the training set is empty")
        batches = source if source is not None else Batches(train, batch_size, dynamic_binarize=dynamic_binarize)
        batches = distributed.shard_batches(batches)  # distributed: each rank's slice of every global batch
        num_batches = len(batches)

        def batch(cursor: Cursor) -> tuple:
            if cursor.perm is None:
                cursor.perm = batches.permutation()
            return batches.batch(cursor.perm, cursor.pos)

        if self.optim is None:  # after resume() the RNG state is the checkpoint's: draw nothing (dynamic binarization would)
            self.setup(*batch(Cursor(perm=torch.arange(min(n, batch_size), device=train[0].device))))
        else:
            check_data_shape(train[0][:1], self.model, self.guide)
        runs.check_cursor(self.cursor.perm, self.cursor.pos, n, num_batches)
        old_handlers = {}
        try:
            if distributed.is_writer(self):  # distributed: rank 0 alone writes under run_dir
                if self._lock is None:
                    self._lock = runs.RunLock(self.run_dir).acquire()
                if not self._owns_run:
                    runs.start_fresh(self.run_dir)
                    self._owns_run = True
                write_json(self.run_dir / "config.json", self.config)
            self._stop_signal = None
            old_handlers = self._install_signals()
            distributed.prepare(self)  # distributed: rank 0's parameters everywhere, per-rank RNG streams
            self._loop(batch, num_batches, int(epochs), batch_size, valid)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if self._lock is not None:
                self._lock.release()
                self._lock = None
        return self.history

    def _loop(self, batch, num_batches: int, epochs: int, batch_size: int, valid) -> None:
        sums: dict[str, torch.Tensor] = self._sums if self.cursor.pos > 0 else {}  # resumed mid-epoch: keep its sums
        self._sums = {}
        self._take_snapshot(sums)
        bar = tqdm(total=num_batches * batch_size, disable=not self.progress, unit="ex", dynamic_ncols=True, leave=False)
        t0, finite = time.perf_counter(), None
        while self.cursor.epoch < epochs:
            if self.cursor.pos == 0 and not sums:
                self._set_lr(self.cursor.epoch, epochs)
                bar.reset()
                bar.set_description(f"epoch {self.cursor.epoch + 1}/{epochs}")
                t0 = time.perf_counter()
            if distributed.stop_requested(self):  # distributed: a stop the ranks agreed on
                self._interrupt(sums, finite)
            x = batch(self.cursor)
            loss, norm = self.step(*x)
            ok = torch.isfinite(loss) & torch.isfinite(norm)
            finite = ok if finite is None else finite & ok
            for k, v in {"loss": loss, **getattr(self.objective, "metrics", {})}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            sums["count"] = sums.get("count", 0) + 1
            self._advance()
            bar.update(x[0].shape[0])
            end_of_epoch = self.cursor.pos >= num_batches
            if self.cursor.step % self.check_every == 0 or end_of_epoch:
                finite = distributed.agree(self, finite)  # distributed: all ranks roll back / stop together
                if not bool(finite):
                    sums = self._diverged(batch, sums)
                    finite = None
                    continue
                finite = None
                bar.set_postfix(loss=f"{float(sums['loss'] / sums['count']):.3f}")
                if not end_of_epoch:
                    self._take_snapshot(sums)
            if end_of_epoch:
                self._end_epoch(sums, valid, batch_size, time.perf_counter() - t0, num_batches * batch_size)
                sums = {}
                self._take_snapshot(sums)
        bar.close()
        self._save("last.pt", finished=True)

    def _end_epoch(self, sums: dict, valid, batch_size: int, seconds: float, examples: int) -> None:
        count = float(sums.pop("count"))
        record = {"epoch": self.cursor.epoch + 1, "step": self.cursor.step, "lr": self.optim.param_groups[0]["lr"], "seconds": round(seconds, 3), "examples_per_s": round(examples / max(seconds, 1e-9), 1)}
        record.update({f"train_{k}": float(v) / count for k, v in sums.items()})
        if valid is not None and valid[0].shape[0] > 0:
            record["valid_elbo"] = self.validate(valid, batch_size=max(batch_size, 500))
        self.cursor = Cursor(self.cursor.epoch + 1, 0, self.cursor.step, None)
        self.history.append(record)
        if distributed.is_writer(self):  # distributed: rank 0 writes the metrics
            runs.append_metrics(self.run_dir, record)
        score = record.get("valid_elbo", -record["train_loss"])
        if score > self.best_valid:
            self.best_valid = score
            self._save("best.pt")
        self._save("last.pt")
        if (self.progress or self.run_dir is not None) and distributed.is_main():  # distributed: rank 0 prints
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def _diverged(self, batch, sums: dict) -> dict:
        upto = self.cursor.step
        report = self._diagnose(batch, upto)
        sums = self._restore_snapshot()
        if self.on_divergence == "reduce_lr" and self.lr_reductions < self.max_lr_reductions:
            self.lr_reductions += 1
            for group in self.optim.param_groups:
                group["lr"] *= 0.5
            tqdm.write(f"pyrovae: {report}; rolled back to step {self.cursor.step} and halved the learning rate (reduction {self.lr_reductions}/{self.max_lr_reductions})")
            return sums
        last = None if self.run_dir is None else self.run_dir / "checkpoints" / "last.pt"
        raise DivergenceError(
            f"training diverged: {report}. The run was rolled back to step {self.cursor.step}; "
            + (f"{last} holds the last good checkpoint. " if last is not None and last.exists() else "")
            + "Lower --lr, set --clip-norm, or use --on-divergence reduce_lr."
        )

    def _interrupt(self, sums: dict, finite) -> None:
        if finite is not None and not bool(finite):
            sums = self._restore_snapshot()  # never checkpoint a state that has not been checked finite
        self._sums = sums
        path = self._save("last.pt")
        name = signal.Signals(self._stop_signal).name
        raise TrainingInterrupted(f"{name} received: saved {path} at step {self.cursor.step}; continue with --resume" if path else f"{name} received at step {self.cursor.step}")
