"""Training any model/guide pair with any objective (Pyro's ELBOs or :mod:`pyrovae.objectives`).

The hot loop keeps everything on the device: batches are drawn by on-device index permutation, losses
and metrics are summed on the device, and the host synchronises only every ``check_every`` steps (to
check that the loss and gradients stayed finite) and at the end of an epoch.

The loop's other work lives elsewhere: :mod:`pyrovae.train.callbacks` (progress output, ``metrics.jsonl``,
checkpoints, TensorBoard, and the user's own per-epoch work), :mod:`pyrovae.train.divergence` (rollback to the
last good state and the report naming the failing step and sites), :mod:`pyrovae.train.resume` (checkpoints,
resuming, SIGINT/SIGTERM) and :mod:`pyrovae.train.checks` (data and model/guide checks before the first step).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled

import pyrovae.train.resume as _resume
from pyrovae.train.callbacks import Callback, CallbackList, Checkpoints, MetricsFile, Progress, check_callbacks
from pyrovae.capture import MODES as CAPTURE_MODES
from pyrovae.capture import GraphCache, grad_norm
from pyrovae.objectives.engine import LogWeightEngine
from pyrovae.objectives.base import Objective
import pyrovae.train.distributed as distributed
import pyrovae.train.runs as runs
from pyrovae.train.checkpoint import save_checkpoint  # looked up here by Trainer.save (tests replace pyrovae.train.trainer.save_checkpoint)
from pyrovae.train.checks import check_data_shape, check_fit_data, check_sites, check_valid_data  # noqa: F401  (re-exported)
from pyrovae.data import Batches, as_inputs
from pyrovae.train.divergence import POLICIES, DivergenceError, Rollback, Snapshot, nonfinite_sites  # noqa: F401  (re-exported)
from pyrovae.train.resume import Cursor, TrainingInterrupted, interrupt, run_folder, stop_signals  # noqa: F401  (re-exported)
from pyrovae.utils.rng import get_rng_state, set_rng_state

SCHEDULES = ("constant", "exponential", "cosine", "iwae")


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


def _capture_refusal(objective) -> Optional[str]:
    """Why the fast path cannot take an objective's steps (None if it can): state kept outside ``Objective.state``
    would be frozen into a recorded graph."""
    if isinstance(objective, Objective):
        held, declared = set(objective.state_dict()), set(objective.initial_state())
        if held != declared:
            return (
                f"{type(objective).__name__} keeps state between steps outside its state dict ({sorted(held - declared)}), "
                "which a captured graph would freeze: keep it in Objective.state (initial_state, and estimate's returned state)"
            )
    return None


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
        progress: show a tqdm progress bar (when stderr is a terminal) and a line per epoch (:class:`~pyrovae.train.callbacks.Progress`).
        callbacks: :class:`~pyrovae.train.callbacks.Callback` instances called by every ``fit`` (``fit`` takes more); with a
            ``run_dir`` the trainer adds :class:`~pyrovae.train.callbacks.MetricsFile` and :class:`~pyrovae.train.callbacks.Checkpoints`.
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
        callbacks: Optional[Sequence[Callback]] = None,
    ):
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr={lr!r} must be a positive number")
        if lr >= 1e30:  # Adam's step size lr / (1 - beta1^t) overflows float32 (at 3.4e38) and torch raises mid-step
            raise ValueError(f"lr={lr!r} is too large: float32 parameters overflow at 3.4e38; use a learning rate below 1e30")
        lr_factor(schedule, 0, 1, gamma)  # validates the name
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm={clip_norm!r} must be positive, or None for no clipping")
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
        self.check_every, self.rollback = int(check_every), Rollback(self, on_divergence, max_lr_reductions)
        self.valid_particles, self.progress = int(valid_particles), progress
        self.callbacks = check_callbacks(callbacks)
        self.validate_every_step, self._validate_next = bool(validate_every_step), True
        self.capture_mode, self._capture = capture, None
        self._valid_engine: Optional[LogWeightEngine] = None
        self.params: dict[str, torch.Tensor] = {}
        self.optim: Optional[torch.optim.Optimizer] = None
        self.cursor = Cursor()
        self.best_valid = -math.inf
        self.lr_reductions = 0
        self.history: list[dict] = []
        self.stop_training = False  # a callback sets it to end fit() at the next step boundary
        self.epochs = self.num_batches = self.batch_size = 0  # of the current fit(), for callbacks
        self.stop_signal: Optional[int] = None  # SIGINT/SIGTERM received while training (pyrovae.train.resume.stop_signals)
        self.stop_agreed = False  # several processes: every rank has agreed to stop (pyrovae.train.distributed)
        self.epoch_sums: dict = {}  # the current epoch's running metric sums, checkpointed with a mid-epoch stop
        self.run_lock: Optional[runs.RunLock] = None  # held on run_dir while fit() runs
        self.owns_run = False  # run_dir holds this trainer's run (resumed, or started by fit)

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
            modules = [m for m in (self.model, self.guide) if isinstance(m, torch.nn.Module)]
            self._capture = GraphCache(
                self._gradients, self.capture_mode, params=lambda: list(self.params.values()), modules=lambda: modules,
                verify_every=self.check_every, what="step", no_grad=False,
            )
            self._capture.refused = _capture_refusal(self.objective)

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
        inputs, static = self._step_inputs(batch)
        if validate or self._capture is None:
            out = self._gradients(inputs, *static, validate=validate)
        else:
            out = self._capture(inputs, *static)
        loss, norm, grads, metrics, state = out
        for p, g in zip(self.params.values(), grads):
            p.grad = g
        if isinstance(self.objective, Objective):
            self.objective.metrics = dict(metrics)
        loss, norm = distributed.average_gradients(self, loss, norm, batch[0].shape[0])  # distributed: global-batch gradient
        state = distributed.average_state(state, batch[0].shape[0])  # distributed: the global batch's next state
        if self.clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(list(self.params.values()), self.clip_norm, norm)
        self.optim.step()
        if isinstance(self.objective, Objective):
            self.objective.step(state)
        return loss, norm

    def _step_inputs(self, batch: tuple) -> tuple[tuple, tuple]:
        """The step's tensor inputs (the batch, then the objective's state) and its static arguments."""
        state = self.objective.state if isinstance(self.objective, Objective) else {}
        return (*batch, *state.values()), (len(batch), tuple(state))

    def _gradients(self, inputs: tuple, num_batch: int, state_keys: tuple, validate: bool = False):
        """``(loss per datum, gradient norm, gradients, metrics, next objective state)`` of the objective on a batch
        from a state: the step as a function of its inputs, which the fast path records and replays."""
        batch, state = inputs[:num_batch], dict(zip(state_keys, inputs[num_batch:]))
        with pyro.validation_enabled(validate):
            if isinstance(self.objective, Objective):
                est = self.objective.estimate(self.model, self.guide, batch, {}, state)
                loss, metrics, state = est.differentiable(), est.metrics, est.state
            else:  # Pyro's own ELBOs keep no state
                loss, metrics, state = self.objective.differentiable_loss(self.model, self.guide, *batch), {}, {}
            loss = loss / batch[0].shape[0]
        grads = torch.autograd.grad(loss, list(self.params.values()), allow_unused=True)
        metrics = {k: v.detach() for k, v in metrics.items() if torch.is_tensor(v)}
        return loss.detach(), grad_norm(grads), grads, metrics, {k: v.detach() for k, v in state.items()}

    def _plain_step(self, *batch: torch.Tensor, validate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss per datum and gradient norm of the objective through Pyro, gradients left in ``.grad`` (the
        objective's state is not advanced)."""
        inputs, static = self._step_inputs(batch)
        loss, norm, grads, _, _ = self._gradients(inputs, *static, validate=validate)
        for p, g in zip(self.params.values(), grads):
            p.grad = g
        return loss, norm

    # --- checkpoints (pyrovae.train.resume) -----------------------------------------------------------------
    def state_dict(self, finished: bool = False) -> dict:
        """Everything a resumed run needs (:func:`pyrovae.train.resume.state_dict`)."""
        return _resume.state_dict(self, finished)

    def load_weights(self, state: dict) -> None:
        """Restore the parameters (and module buffers) of a checkpoint; :meth:`setup` must have run."""
        _resume.load_weights(self, state)

    def load_state_dict(self, state: dict) -> None:
        """Restore everything :meth:`state_dict` saved: weights, optimiser, objective, RNG and position."""
        _resume.load_state_dict(self, state)

    def resume(self, path: Union[str, Path], *batch: torch.Tensor) -> None:
        """Continue from a checkpoint file (``checkpoints/last.pt`` of a run); ``batch``: a batch of the data's
        tensors (``x``, or ``x, y``), to set up the parameters."""
        _resume.resume(self, path, *batch)

    def save(self, name: str, finished: bool = False) -> Optional[Path]:
        """Write the checkpoint ``run_dir/checkpoints/NAME`` (atomically); nothing without a ``run_dir``."""
        if self.run_dir is None:
            return None
        state = self.state_dict(finished)  # on every rank: it gathers their RNG states
        return distributed.on_main(lambda: save_checkpoint(state, self.run_dir / "checkpoints" / name))  # distributed: rank 0 writes

    # --- the loop -----------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, valid: Union[torch.Tensor, tuple], batch_size: int) -> float:
        from pyrovae.evaluate import elbo_terms

        if self._valid_engine is None:  # one engine for every epoch: it guesses the plate nesting once
            self._valid_engine = LogWeightEngine(num_particles=self.valid_particles)
        # distributed: each rank evaluates its shard, the mean is reduced
        return distributed.sharded_mean(lambda part: elbo_terms(self.model, self.guide, part, batch_size=batch_size, engine=self._valid_engine)["elbo"], valid)

    @torch.no_grad()
    def _check_valid(self, train: tuple, valid: tuple) -> None:
        """Refuse validation data the epoch's end could not evaluate, now rather than after an epoch of training:
        unlike the training data (:func:`check_valid_data`), or failing on two examples (the random state is kept,
        so that a resumed run goes on as if never stopped)."""
        from pyrovae.evaluate import elbo_terms

        check_valid_data(train, valid, self.model, self.guide)
        rng = get_rng_state()
        try:
            elbo_terms(self.model, self.guide, tuple(v[:2] for v in valid), batch_size=2)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"valid does not run through the model and guide ({type(e).__name__}: {e}); pass validation data like the training data") from e
        finally:
            set_rng_state(rng)

    def fit(
        self,
        train: Union[torch.Tensor, tuple],
        epochs: int,
        batch_size: int = 100,
        valid: Optional[Union[torch.Tensor, tuple]] = None,
        dynamic_binarize: bool = False,
        callbacks: Optional[Sequence[Callback]] = None,
    ) -> list[dict]:
        """Train for ``epochs`` epochs (counting epochs already done when resumed); returns the per-epoch
        history, also written to ``run_dir/metrics.jsonl``.

        ``train`` and ``valid``: a tensor ``[N, ...]`` or a tuple of tensors with the same first dimension
        (``(x, y)``); each batch is sliced from all of them by the same permutation and passed as
        ``model(*batch)``, ``guide(*batch)``. ``dynamic_binarize`` resamples the first tensor only.

        ``train`` may also be a batch source with :class:`~pyrovae.data.Batches`'s ``__len__``, ``permutation()``,
        ``batch(perm, index)`` and ``data`` (e.g. :class:`pyrovae.data.text.BucketBatches`, batches of sentences of
        similar length): its batches are used as they come (``batch_size`` then only sizes validation).

        ``callbacks`` are called after the trainer's own (:mod:`pyrovae.train.callbacks`); one that sets
        ``trainer.stop_training = True`` ends ``fit`` cleanly at the next step boundary."""
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
        hooks = CallbackList([*self.callbacks, *check_callbacks(callbacks), *self._builtin_callbacks()])
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
        if valid is not None and valid[0].shape[0] > 0:
            self._check_valid(train, valid)
        runs.check_cursor(self.cursor.perm, self.cursor.pos, n, num_batches)
        self.epochs, self.num_batches, self.batch_size = int(epochs), num_batches, int(batch_size)
        self.stop_training = False
        with run_folder(self), stop_signals(self):
            distributed.prepare(self)  # distributed: rank 0's parameters everywhere, per-rank RNG streams
            self._loop(batch, valid, hooks)
        return self.history

    def _builtin_callbacks(self) -> list[Callback]:
        main = distributed.is_main()  # distributed: rank 0 alone writes metrics and prints; every rank takes part in checkpoints
        builtin = ([MetricsFile()] if main else []) + [Checkpoints()] if self.run_dir is not None else []
        return builtin + ([Progress(bar=self.progress)] if main and (self.progress or self.run_dir is not None) else [])

    def _loop(self, batch, valid, hooks: Callback) -> None:
        sums: dict[str, torch.Tensor] = self.epoch_sums if self.cursor.pos > 0 else {}  # resumed mid-epoch: keep its sums
        self.epoch_sums = {}
        self.rollback.take(sums)
        hooks.on_train_begin(self)
        t0, finite = time.perf_counter(), None
        while self.cursor.epoch < self.epochs and not self.stop_training:
            if self.cursor.pos == 0 and not sums:
                self._set_lr(self.cursor.epoch, self.epochs)
                hooks.on_epoch_begin(self)
                t0 = time.perf_counter()
            if distributed.stop_requested(self):  # distributed: a stop the ranks agreed on
                interrupt(self, self._checked(sums, finite))
            x = batch(self.cursor)
            loss, norm = self.step(*x)
            ok = torch.isfinite(loss) & torch.isfinite(norm)
            finite = ok if finite is None else finite & ok
            for k, v in {"loss": loss, **getattr(self.objective, "metrics", {})}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            sums["count"] = sums.get("count", 0) + 1
            self._advance()
            hooks.on_step_end(self, x, loss, norm)
            end_of_epoch = self.cursor.pos >= self.num_batches
            if self.cursor.step % self.check_every == 0 or end_of_epoch:
                finite = distributed.agree(self, finite)  # distributed: all ranks roll back / stop together
                if not bool(finite):
                    sums, finite = self.rollback.diverged(batch), None
                    continue
                finite = None
                if not end_of_epoch:
                    self.rollback.take(sums)
            if end_of_epoch:
                self._end_epoch(sums, valid, time.perf_counter() - t0, hooks)
                sums = {}
                self.rollback.take(sums)
        self.epoch_sums = self._checked(sums, finite)  # stopped mid-epoch: the checkpoint carries the epoch so far
        hooks.on_train_end(self)

    def _checked(self, sums: dict, finite) -> dict:
        """``sums``, or the last snapshot's state and sums when steps since the last check were not finite (a
        checkpoint is never written of a state not checked finite)."""
        return self.rollback.restore() if finite is not None and not bool(finite) else sums

    def _end_epoch(self, sums: dict, valid, seconds: float, hooks: Callback) -> None:
        count, examples = float(sums.pop("count")), self.num_batches * self.batch_size
        record = {"epoch": self.cursor.epoch + 1, "step": self.cursor.step, "lr": self.optim.param_groups[0]["lr"], "seconds": round(seconds, 3), "examples_per_s": round(examples / max(seconds, 1e-9), 1)}
        record.update({f"train_{k}": float(v) / count for k, v in sums.items()})
        if valid is not None and valid[0].shape[0] > 0:
            record["valid_elbo"] = self.validate(valid, batch_size=max(self.batch_size, 500))
        self.cursor = Cursor(self.cursor.epoch + 1, 0, self.cursor.step, None)
        self.history.append(record)
        hooks.on_epoch_end(self, record)

    def _advance(self) -> None:
        self.cursor.step += 1
        self.cursor.pos += 1

