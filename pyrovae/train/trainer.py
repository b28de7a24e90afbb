"""Training any model/guide pair with any objective (Pyro's ELBOs or :mod:`pyrovae.objectives`).

The hot loop keeps everything on the device: batches are drawn by on-device index permutation, losses
and metrics are summed on the device, and the host synchronises only every ``check_every`` steps (to
check that the loss and gradients stayed finite) and at the end of an epoch.

The run's state is one value, :class:`~pyrovae.train.state.TrainState` (``trainer.state``: parameters, optimiser,
objective state, position, sums, history), read and written through its own methods. The loop's other work lives
elsewhere: :mod:`pyrovae.train.callbacks` (progress output, ``metrics.jsonl``, checkpoints, TensorBoard, and the
user's own per-epoch work), :mod:`pyrovae.train.divergence` (rollback to the last good state and the report naming
the failing step and sites), :mod:`pyrovae.train.resume` (resuming, the run folder, SIGINT/SIGTERM),
:mod:`pyrovae.train.checks` (data and model/guide checks before the first step) and
:mod:`pyrovae.train.distributed` (the strategy for one process or several).
"""
from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from pyrovae.train.callbacks import Callback, CallbackList, Checkpoints, MetricsFile, Progress, check_callbacks
from pyrovae.objectives.engine import LogWeightEngine
from pyrovae.objectives.base import Objective
import pyrovae.train.distributed as distributed
import pyrovae.train.runs as runs
from pyrovae.train.checkpoint import save_checkpoint  # looked up here by Trainer.save (tests replace pyrovae.train.trainer.save_checkpoint)
from pyrovae.train.checks import adam_defaults, check_data_shape, check_epochs, check_fit_data, check_sites, check_trainer_options, check_valid_data, check_valid_runs, collect_params  # noqa: F401  (re-exported)
from pyrovae.data import Batches, as_inputs
from pyrovae.train.divergence import POLICIES, DivergenceError, Rollback, Snapshot, nonfinite_sites  # noqa: F401  (re-exported)
from pyrovae.train.resume import TrainingInterrupted, interrupt, run_folder, stop_signals  # noqa: F401  (re-exported)
from pyrovae.train.resume import resume as _resume
from pyrovae.train.state import Cursor, TrainState
from pyrovae.train.step import Gradients, capture_refusal  # noqa: F401  (re-exported)

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
        validate_every_step: keep Pyro's validation (if enabled) on every step, not only the first (such steps
            are never captured).
        capture: the step's fast path (:class:`~pyrovae.train.step.Gradients`, :mod:`pyrovae.capture`): ``replay``
            records each step signature once and replays the graph without Pyro's Python, ``compile`` also compiles
            it, ``off`` runs Pyro every step; :attr:`capture_report` says which steps ran captured. A model whose
            Python changes from step to step (reads a step counter, say) needs ``capture="off"``.
        callbacks: :class:`~pyrovae.train.callbacks.Callback` instances called by every ``fit`` (``fit`` takes more); with a
            ``run_dir`` the trainer adds :class:`~pyrovae.train.callbacks.MetricsFile` and :class:`~pyrovae.train.callbacks.Checkpoints`.
        strategy: one process or several (:mod:`pyrovae.train.distributed`; default:
            :class:`~pyrovae.train.distributed.DataParallel`, the identity until ``torch.distributed`` is initialised).

    The run's state is :attr:`state` (:class:`~pyrovae.train.state.TrainState`); ``params``, ``optim``, ``cursor`` and
    ``history`` are read-only shortcuts to it.
    """

    params = property(lambda self: self.state.params, doc="name -> trained tensor (``state.params``)")
    optim = property(lambda self: self.state.optim, doc="the optimiser (``state.optim``; None before :meth:`setup`)")
    cursor = property(lambda self: self.state.cursor, doc="epoch, position and step (``state.cursor``)")
    history = property(lambda self: self.state.history, doc="per-epoch records (``state.history``)")

    def __init__(
        self, model, guide, objective, lr: float = 1e-3, schedule: str = "constant", gamma: float = 0.99,
        clip_norm: Optional[float] = None, optimizer: type = torch.optim.Adam, optimizer_kwargs: Optional[dict] = None,
        run_dir: Optional[Union[str, Path]] = None, config: Optional[dict] = None, check_every: int = 100,
        on_divergence: str = "stop", max_lr_reductions: int = 5, valid_particles: int = 1, progress: bool = True,
        validate_every_step: bool = False, capture: str = "replay", callbacks: Optional[Sequence[Callback]] = None,
        strategy: Optional[distributed.SingleProcess] = None,
    ):
        check_trainer_options(lr, clip_norm, check_every, capture, objective)
        lr_factor(schedule, 0, 1, gamma)  # validates the name
        self.model, self.guide, self.objective = model, guide, objective
        self.lr, self.schedule, self.gamma, self.clip_norm = float(lr), schedule, float(gamma), clip_norm
        self.optimizer_cls, self.optimizer_kwargs = optimizer, dict(optimizer_kwargs or {})
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config = dict(config or {})
        self.check_every, self.rollback = int(check_every), Rollback(on_divergence, max_lr_reductions)
        self.valid_particles, self.progress = int(valid_particles), progress
        self.callbacks = check_callbacks(callbacks)
        self.validate_every_step, self.capture_mode = bool(validate_every_step), capture
        self.gradients: Optional[Gradients] = None  # the step's gradients (and its fast path), made by setup()
        self.strategy = strategy if strategy is not None else distributed.DataParallel()
        self._valid_engine: Optional[LogWeightEngine] = None
        modules = {k: m for k, m in (("model", model), ("guide", guide)) if isinstance(m, torch.nn.Module)}
        self.state = TrainState(objective, modules)
        self.stop_training = False  # a callback sets it to end fit() at the next step boundary
        self.epochs = self.num_batches = self.batch_size = 0  # of the current fit(), for callbacks
        self.stop_signal: Optional[int] = None  # SIGINT/SIGTERM received while training (pyrovae.train.resume.stop_signals)
        self.run_lock: Optional[runs.RunLock] = None  # held on run_dir while fit() runs
        self.owns_run = False  # run_dir holds this trainer's run (resumed, or started by fit)

    def setup(self, *batch: torch.Tensor) -> None:
        """Collect every parameter the model, guide and objective touch (``pyro.module`` and ``pyro.param`` sites) by
        tracing one evaluation on ``batch`` (the model's positional inputs: ``x``, or ``x, y``), and build the
        optimiser over them in a fixed (name) order."""
        if self.state.optim is not None:
            return
        batch = as_inputs(batch[0] if len(batch) == 1 else batch, "the batch")  # setup(x, y) or setup((x, y))
        check_data_shape(batch[0], self.model, self.guide)
        check_sites(self.model, self.guide, batch, keep_rng=True)  # the check draws nothing from the run's random stream
        self.state.params = params = collect_params(self.model, self.guide, self.objective, batch)
        self.state.optim = self.optimizer_cls(list(params.values()), lr=self.lr, **adam_defaults(self.optimizer_cls, self.optimizer_kwargs, params.values()))
        for group in self.state.optim.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.gradients = Gradients(
            self.model, self.guide, self.objective, lambda: list(params.values()), list(self.state.modules.values()),
            self.capture_mode, verify_every=self.check_every, validate_every_step=self.validate_every_step,
        )

    @property
    def capture_report(self) -> str:
        """Which steps run captured, and why any run plainly."""
        return self.gradients.report if self.gradients is not None else "not set up yet"

    # --- one step ---------------------------------------------------------------------------------
    def step(self, *batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on ``batch`` (``x``, or ``x, y, ...``: passed as ``model(*batch)``); returns (loss per
        datum, gradient norm), both on the device (:class:`~pyrovae.train.step.Gradients` computes the gradients)."""
        params, optim = self.state.params, self.state.optim
        optim.zero_grad(set_to_none=True)
        loss, norm, grads, metrics, state = self.gradients(batch)
        for p, g in zip(params.values(), grads):
            p.grad = g
        if isinstance(self.objective, Objective):
            self.objective.metrics = dict(metrics)
        loss, norm = self.strategy.average(self.state, loss, norm, batch[0].shape[0])  # several processes: the global batch's
        state = self.strategy.average_state(state, batch[0].shape[0])
        if self.clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(list(params.values()), self.clip_norm, norm)
        optim.step()
        if isinstance(self.objective, Objective):
            self.objective.step(state)
        return loss, norm

    # --- checkpoints --------------------------------------------------------------------------------
    def state_dict(self, finished: bool = False) -> dict:
        """Everything a resumed run needs (:meth:`TrainState.state_dict` and every process's random state)."""
        return {**self.state.state_dict(self.config, finished), **self.strategy.rank_rng_states()}

    def load_weights(self, state: dict) -> None:
        """Restore the parameters (and module buffers) of a checkpoint; :meth:`setup` must have run."""
        self.state.load_weights(state)

    def load_state_dict(self, state: dict) -> None:
        """Restore everything :meth:`state_dict` saved: weights, optimiser, objective, RNG and position."""
        self.state.load_state_dict(state)
        self.strategy.restore_rank_rng(state)

    def resume(self, path: Union[str, Path], *batch: torch.Tensor) -> None:
        """Continue from a checkpoint file (``checkpoints/last.pt`` of a run); ``batch``: a batch of the data's
        tensors (``x``, or ``x, y``), to set up the parameters."""
        _resume(self, path, *batch)

    def save(self, name: str, finished: bool = False) -> Optional[Path]:
        """Write the checkpoint ``run_dir/checkpoints/NAME`` (atomically); nothing without a ``run_dir``."""
        if self.run_dir is None:
            return None
        state = self.state_dict(finished)  # in every process: it gathers their random states
        return self.strategy.on_main(lambda: save_checkpoint(state, self.run_dir / "checkpoints" / name))

    # --- the loop -----------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, valid: Union[torch.Tensor, tuple], batch_size: int) -> float:
        """The validation ELBO per datum (each process evaluates its shard). A ``valid`` with a ``chunks(batch_size)``
        method is evaluated part by part (:meth:`pyrovae.data.text.Sentences.chunks`: sentences sorted by length, each
        part cut to its own width, so that padding costs nothing)."""
        from pyrovae.evaluate import elbo_terms

        if self._valid_engine is None:  # one engine for every epoch: it guesses the plate nesting once
            self._valid_engine = LogWeightEngine(num_particles=self.valid_particles)
        parts = valid.chunks(batch_size) if hasattr(valid, "chunks") else [valid]  # e.g. sentences by length, each part cut to its width
        total = count = 0.0
        for part in parts:
            n = as_inputs(part, "valid")[0].shape[0]
            total += n * self.strategy.mean(lambda p: elbo_terms(self.model, self.guide, p, batch_size=batch_size, engine=self._valid_engine)["elbo"], part)
            count += n
        return total / count

    def fit(self, train: Union[torch.Tensor, tuple], epochs: int, batch_size: int = 100, valid: Optional[Union[torch.Tensor, tuple]] = None,
            dynamic_binarize: bool = False, callbacks: Optional[Sequence[Callback]] = None) -> list[dict]:
        """Train for ``epochs`` epochs (counting epochs already done when resumed); returns the per-epoch
        history, also written to ``run_dir/metrics.jsonl``.

        ``train`` and ``valid``: a tensor ``[N, ...]`` or a tuple of tensors with the same first dimension
        (``(x, y)``); each batch is sliced from all of them by the same permutation and passed as
        ``model(*batch)``, ``guide(*batch)``. ``dynamic_binarize`` resamples the first tensor only.

        ``train`` may also be a batch source with :class:`~pyrovae.data.Batches`'s ``__len__``, ``permutation()``,
        ``batch(perm, index)`` and ``data`` (e.g. :class:`pyrovae.data.text.BucketBatches`, batches of sentences of
        similar length): its batches are used as they come (``batch_size`` then only sizes validation). A ``valid``
        with a ``chunks(batch_size)`` method is validated part by part (see :meth:`validate`).

        ``callbacks`` are called after the trainer's own (:mod:`pyrovae.train.callbacks`); one that sets
        ``trainer.stop_training = True`` ends ``fit`` cleanly at the next step boundary."""
        check_epochs(epochs, batch_size, self.state.cursor)
        hooks = CallbackList([*self.callbacks, *check_callbacks(callbacks), *self._builtin_callbacks()])
        source = train if all(hasattr(train, a) for a in ("permutation", "batch", "data", "__len__")) else None
        train = as_inputs(train if source is None else source.data, "train")
        checked = None if valid is None else as_inputs(valid, "valid")
        check_fit_data(self.model, train, checked)
        valid = valid if hasattr(valid, "chunks") else checked  # a source that chunks itself (Sentences) is kept for validate()
        n = train[0].shape[0]
        if n == 0:
            raise ValueError("the training set is empty")
        batches = self.strategy.shard(source if source is not None else Batches(train, batch_size, dynamic_binarize=dynamic_binarize))

        def batch(cursor: Cursor) -> tuple:
            if cursor.perm is None:
                cursor.perm = batches.permutation()
            return batches.batch(cursor.perm, cursor.pos)

        if self.state.optim is None:  # after resume() the RNG state is the checkpoint's: draw nothing (dynamic binarization would)
            self.setup(*batch(Cursor(perm=torch.arange(min(n, batch_size), device=train[0].device))))
        else:
            check_data_shape(train[0][:1], self.model, self.guide)
        if valid is not None and valid[0].shape[0] > 0:
            from pyrovae.evaluate import elbo_terms

            check_valid_runs(self.model, self.guide, train, checked, lambda part: elbo_terms(self.model, self.guide, part, batch_size=2))
        runs.check_cursor(self.state.cursor.perm, self.state.cursor.pos, n, len(batches))
        self.epochs, self.num_batches, self.batch_size = int(epochs), len(batches), int(batch_size)
        self.stop_training = False
        with run_folder(self), stop_signals(self):
            self.strategy.prepare(self.state)  # several processes: rank 0's parameters everywhere, own random streams
            self._loop(batch, valid, hooks)
        return self.state.history

    def _builtin_callbacks(self) -> list[Callback]:
        main = self.strategy.is_main  # the main process alone writes metrics and prints; every one takes part in checkpoints
        builtin = ([MetricsFile()] if main else []) + [Checkpoints()] if self.run_dir is not None else []
        return builtin + ([Progress(bar=self.progress)] if main and (self.progress or self.run_dir is not None) else [])

    def _loop(self, batch, valid, hooks: Callback) -> None:
        state, last = self.state, None if self.run_dir is None else self.run_dir / "checkpoints" / "last.pt"
        if state.cursor.pos == 0:  # resumed mid-epoch: keep the epoch's sums
            state.sums = {}
        self.rollback.take(state)
        hooks.on_train_begin(self)
        t0, finite = time.perf_counter(), None
        while state.cursor.epoch < self.epochs and not self.stop_training:
            if state.cursor.pos == 0 and not state.sums:
                state.set_lr(lr_factor(self.schedule, state.cursor.epoch, self.epochs, self.gamma))
                hooks.on_epoch_begin(self)
                t0 = time.perf_counter()
            if self.strategy.stop_requested(self.stop_signal):
                self._checked(finite)
                interrupt(self)
            x = batch(state.cursor)
            loss, norm = self.step(*x)
            ok = torch.isfinite(loss) & torch.isfinite(norm)
            finite = ok if finite is None else finite & ok
            state.add({"loss": loss, **getattr(self.objective, "metrics", {})})
            hooks.on_step_end(self, x, loss, norm)
            now = time.perf_counter()  # the epoch's time so far is one of its sums: a stop and resume mid-epoch keeps it
            state.sums["seconds"], t0 = state.sums.get("seconds", 0.0) + (now - t0), now
            end_of_epoch = state.cursor.pos >= self.num_batches
            if state.cursor.step % self.check_every == 0 or end_of_epoch:
                finite, self.stop_signal = self.strategy.agree(finite, state, self.stop_signal)  # all processes roll back / stop together
                if not bool(finite):
                    sites = partial(nonfinite_sites, self.model, self.guide)
                    self.rollback.diverged(state, self.step, batch, sites, last)
                    finite = None
                    continue
                finite = None
                if not end_of_epoch:
                    self.rollback.take(state)
            if end_of_epoch:
                self._end_epoch(valid, hooks)
                self.rollback.take(state)
        self._checked(finite)  # stopped mid-epoch: the checkpoint carries the epoch so far
        hooks.on_train_end(self)

    def _checked(self, finite) -> None:
        """Roll back to the last snapshot when steps since the last check were not finite (a checkpoint is never
        written of a state not checked finite)."""
        if finite is not None and not bool(finite):
            self.rollback.restore(self.state)

    def _end_epoch(self, valid, hooks: Callback) -> None:
        record = self.state.epoch_record(self.num_batches * self.batch_size)
        if valid is not None and valid[0].shape[0] > 0:
            record["valid_elbo"] = self.validate(valid, batch_size=max(self.batch_size, 500))
        self.state.end_epoch(record)
        hooks.on_epoch_end(self, record)
