"""Training and evaluating on several processes (devices, machines) with ``torch.distributed``.

Launch with ``torchrun --nproc-per-node N -m pyrovae train ...``: every process runs the same program on its
shard of each global batch, and the ranks agree through collectives:

- batches: every rank draws the epoch's on-device permutation and takes rank 0's (a broadcast), then its own
  contiguous slice of each global batch (:class:`ShardedBatches`); ``batch_size`` stays the global batch;
- gradients: after the backward pass the ranks' gradients, the loss and the objective's metrics are averaged,
  weighted by shard size, with one ``all_reduce`` on a flat buffer (:func:`average_gradients`), so every rank
  takes the same optimiser step a single process would take on the global batch;
- decisions: the periodic finiteness check and the SIGINT/SIGTERM stop are agreed by an ``all_reduce``
  (:meth:`DataParallel.agree`), so all ranks roll back, or stop, at the same step;
- files: rank 0 alone writes under the run folder (config, metrics, checkpoints, pictures); every rank reads
  a checkpoint to resume. A checkpoint holds every rank's random-number-generator state;
- evaluation: :func:`log_likelihood` and :func:`sharded_mean` split the data over ranks and gather;
- options: the CLI compares the ranks' options at start-up (:func:`differing_options`), since ranks that run
  different programs would wait for each other for ever, or abort in gloo on collectives of other sizes;
- time: every collective waits at most :func:`timeout_seconds` (``PYROVAE_DIST_TIMEOUT``, default
  :data:`DEFAULT_TIMEOUT`) for the other ranks, then raises :class:`DistributedError` with a message, as it does
  when another rank dies (a manual launch has no torchrun to stop the survivors).

Why not ``DistributedDataParallel``: DDP averages gradients from hooks on one module's ``forward``. A Pyro
program is not one ``forward()`` call (the objective runs the guide, replays the model, perhaps several
times per step, possibly through a captured graph) and its parameters live in Pyro's param store
(``pyro.param`` sites belong to no module), so the collectives are called directly on the parameters the
trainer collected: the same ``all_reduce`` DDP would issue, once per step, on one coalesced buffer.

Backend: ``nccl`` for CUDA devices (each process on ``cuda:LOCAL_RANK``), ``gloo`` on CPU. Single-process
runs never touch ``torch.distributed``: every function here is then the identity or the plain call.

The trainer takes these as one strategy object (``Trainer(strategy=...)``): :class:`DataParallel` by default, whose
hooks check at each call whether ``torch.distributed`` is initialised, or :class:`SingleProcess` (every hook the
identity).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import sys
import zlib
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, Union

import pyro
import torch
import torch.distributed as dist

from pyrovae.capture import grad_norm
from pyrovae.data import Batches, as_inputs
from pyrovae.utils.rng import get_rng_state, set_rng_state

#: torchrun's environment variables that :func:`init` needs
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: seconds a collective waits for the other ranks (joining included) unless ``PYROVAE_DIST_TIMEOUT`` says otherwise:
#: far above a step, a checkpoint write or a graph compilation, far below "for ever"
DEFAULT_TIMEOUT = 600.0
TIMEOUT_ENV = "PYROVAE_DIST_TIMEOUT"


class DistributedError(RuntimeError):
    """A collective that did not complete: another rank died, or did not reach it within :func:`timeout_seconds`."""


def timeout_seconds() -> float:
    """How long a collective waits for the other ranks: ``$PYROVAE_DIST_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT`."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds > 0 (default {DEFAULT_TIMEOUT:g}); fix or unset it")
    return value


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn the backend's error from a collective (a peer that closed its connection, a timeout) into a
    :class:`DistributedError` that names this rank, the collective and the likely causes."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:  # DistBackendError, DistStoreError, gloo's own RuntimeErrors: all RuntimeErrors
        first = (str(e).strip().splitlines() or [""])[0].split(" This is typically caused")[0][:300]  # gloo's advice: replaced by ours
        who = f"rank {rank()} of {os.environ.get('WORLD_SIZE', '?')}"
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            why = (
                f"the other ranks did not reach it within {timeout_seconds():g} s: one of them is stuck or stopped, or runs another "
                f"program (other options or data); raise the limit with {TIMEOUT_ENV}=SECONDS if a rank is only slow"
            )
        else:
            why = "another rank left the process group (it failed, was killed or stopped: its own output says why)"
        raise DistributedError(f"{who}: {what} did not complete: {why} [{type(e).__name__}: {first}]") from None


# --- the process group ----------------------------------------------------------------------------------
def launched() -> bool:
    """True in a process that torchrun (or an equivalent launcher) started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when a process group of more than one process is set up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's global rank (from torchrun's ``RANK`` before :func:`init`; 0 for a single process)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the rank that writes files and prints (rank 0; the only rank of a single process)."""
    return rank() == 0


def init(device: Union[str, torch.device, None] = None, backend: Optional[str] = None, quiet: bool = True) -> torch.device:
    """Join the process group described by torchrun's environment and return this rank's device.

    Does nothing (and returns ``device``) unless launched as one of several processes. ``nccl`` when
    ``device`` is a CUDA device (which becomes ``cuda:LOCAL_RANK``), ``gloo`` otherwise.

    Args:
        device: the device asked for (``cuda`` or ``cpu``; default: CUDA when available).
        backend: override the backend choice.
        quiet: send the standard output of ranks other than 0 to ``os.devnull`` (their errors still show).
    """
    auto = device is None or (isinstance(device, str) and device == "auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if auto else device)
    if not launched():
        return device
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set: launch several processes with "
            "torchrun (python -m torch.distributed.run --nproc-per-node N -m pyrovae train ...), which sets them"
        )
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank()} but this machine has {torch.cuda.device_count()} CUDA device(s): start at most "
                "that many processes per machine (--nproc-per-node), or train on the CPU with --device cpu"
            )
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_seconds())
        with _collective(f"joining the process group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"):
            dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), timeout=timeout)
        atexit.register(shutdown)
    if quiet and not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def shutdown() -> None:
    """Leave the process group (registered to run at exit by :func:`init`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written the checkpoint the others read next)."""
    if active():
        with _collective("a barrier (waiting for rank 0 to write the run folder)"):
            dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)


def on_main(write: Callable[[], Any]) -> Any:
    """``write()`` on rank 0 only (None elsewhere), then a :func:`barrier`: once it returns, every rank can
    read what rank 0 wrote (a checkpoint to resume from, the best weights to evaluate)."""
    result = write() if is_main() else None
    barrier()
    return result


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object: a run folder named by the clock, say)."""
    if not active():
        return value
    box = [value]
    with _collective("taking a value from rank 0 (the run folder)"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def differing_options(options: dict) -> dict[str, list]:
    """The options that differ between the ranks: ``{name: [the value on rank 0, on rank 1, ...]}``, the same
    on every rank (``{}`` when they agree, or in a single process).

    Every rank gathers a hash of its options (JSON, sorted keys); only when the hashes differ are the options
    themselves gathered, to name the differences."""
    if not active():
        return {}
    mine = _canonical(options)
    digests = [None] * world_size()
    with _collective("comparing the ranks' options"):
        dist.all_gather_object(digests, hashlib.sha256(mine.encode()).hexdigest())
    if len(set(digests)) == 1:
        return {}
    every = [None] * world_size()
    with _collective("comparing the ranks' options"):
        dist.all_gather_object(every, mine)
    every = [json.loads(text) for text in every]
    keys = sorted(set().union(*every), key=lambda k: (list(options).index(k) if k in options else len(options), k))
    return {k: [o.get(k) for o in every] for k in keys if len({_canonical(o.get(k)) for o in every}) > 1}


class _NoLock:
    def acquire(self) -> "_NoLock":
        return self

    def release(self) -> None:
        pass


def run_lock(run_dir):
    """The run folder's :class:`pyrovae.train.runs.RunLock` on rank 0, a lock that does nothing on the other ranks
    (they write nothing there)."""
    from pyrovae.train.runs import RunLock

    return RunLock(run_dir) if is_main() else _NoLock()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard_bounds(n: int, parts: Optional[int] = None, index: Optional[int] = None) -> tuple[int, int]:
    """``[lo, hi)`` of shard ``index`` (default: this rank) when ``n`` items are split into ``parts``
    contiguous shards (default: the world size) whose sizes differ by at most one, larger ones first."""
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def _check_same_data(parts: tuple) -> None:
    """Raise ``ValueError`` unless every rank holds data of the same shapes and sums (to float precision: the
    sums of other devices may round differently)."""
    mine = [(list(t.shape), float(t.sum(dtype=torch.float64))) for t in parts]
    gathered = [None] * world_size()
    with _collective("comparing the ranks' training data"):
        dist.all_gather_object(gathered, mine)
    for theirs in gathered:
        if [s for s, _ in theirs] != [s for s, _ in mine] or any(abs(a - b) > 1e-6 * max(1.0, abs(a)) for (_, a), (_, b) in zip(theirs, mine)):
            raise ValueError(
                f"the ranks hold different training data (shape and sum per rank: {gathered}): every process must load the "
                "same data with the same seed and split"
            )


# --- batches -----------------------------------------------------------------------------------------------
class ShardedBatches:
    """A batch source (:class:`~pyrovae.data.Batches`, :class:`pyrovae.data.text.BucketBatches`, ...) of global
    batches, of which each rank gets its contiguous slice (:func:`shard_bounds`).

    ``permutation()`` is rank 0's, broadcast, so every rank slices the same global batch. The last batch of
    an epoch is dropped when it is smaller than the world size (some rank would get no data).

    Args:
        source: the batch source of the global batches.
    """

    def __init__(self, source):
        self.source, self.data = source, source.data
        parts = as_inputs(source.data, "the training data")
        # one look at the data: ranks that loaded different data (another seed or split) would train apart
        _check_same_data(parts)
        n, size = parts[0].shape[0], getattr(source, "batch_size", None)
        last = size if size is None or getattr(source, "drop_last", False) else n - (len(source) - 1) * size
        self._len = len(source) - (1 if last is not None and last < world_size() else 0)
        if self._len < 1:
            raise ValueError(f"batch_size={size} is smaller than the {world_size()} processes: every process needs data; use batch_size >= {world_size()}")

    def __len__(self) -> int:
        return self._len

    def permutation(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        perm = self.source.permutation(generator) if generator is not None else self.source.permutation()
        buf = perm.to(_comm_device())
        with _collective("taking rank 0's order of the epoch's examples"):
            dist.broadcast(buf, src=0)
        return buf.to(perm.device)

    def batch(self, perm: torch.Tensor, index: int):
        if isinstance(self.source, Batches):  # slice the indices, so that only this rank's rows are gathered
            stop = len(self.source) * self.source.batch_size if self.source.drop_last else len(self.data)
            idx = perm[index * self.source.batch_size : min((index + 1) * self.source.batch_size, stop)]
            lo, hi = shard_bounds(idx.shape[0])
            return self.source.batch(idx[lo:hi], 0)
        full = self.source.batch(perm, index)
        parts = (full,) if torch.is_tensor(full) else full
        lo, hi = shard_bounds(parts[0].shape[0])
        if hi <= lo:
            raise ValueError(f"batch {index} has {parts[0].shape[0]} rows, fewer than the {world_size()} processes: use larger batches")
        rows = [t[lo:hi] for t in parts]
        return rows[0] if torch.is_tensor(full) else type(full)(*rows) if hasattr(full, "_fields") else type(full)(rows)


def shard_batches(source):
    """``source`` as this rank's :class:`ShardedBatches` (``source`` itself in a single process)."""
    return ShardedBatches(source) if active() else source


# --- the trainer's hooks ------------------------------------------------------------------------------------
def _checksum(state: torch.Tensor) -> int:
    return zlib.crc32(state.cpu().numpy().tobytes())


def average_gradients(state, loss: torch.Tensor, norm: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the ranks' gradients (left in each parameter's ``.grad``), loss per datum and objective
    metrics, weighted by their shard sizes ``n``: one ``all_reduce`` of a flat buffer. Returns the global
    (loss per datum, gradient norm), the same on every rank.

        g = sum_r n_r g_r / sum_r n_r,   g_r the gradient of rank r's loss per datum.

    A parameter without a gradient on a rank counts as zeros there, and every parameter gets the average
    (a single process would leave ``.grad = None`` where no datum used it, which Adam skips): deciding that
    would cost a host read every step."""
    if not active():
        return loss, norm
    params = list(state.params.values())
    metrics = getattr(state.objective, "metrics", None)
    keys = [k for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1] if isinstance(metrics, dict) else []
    dtypes = {p.dtype for p in params}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
    device = _comm_device()
    w = torch.tensor(float(n), dtype=dtype, device=device)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, dtype) for p in params]
    head = [loss.detach().reshape(()).to(device, dtype), *(metrics[k].detach().reshape(()).to(device, dtype) for k in keys)]
    buf = torch.cat([*grads, torch.stack(head)]) * w
    buf = torch.cat([buf, w.reshape(1)])
    with _collective(f"averaging the gradients of step {state.cursor.step + 1}" if hasattr(state, "cursor") else "averaging the gradients"):
        dist.all_reduce(buf)
    buf = buf[:-1] / buf[-1]
    offset = 0
    for p in params:
        p.grad = buf[offset : offset + p.numel()].view_as(p).to(p.device, p.dtype)
        offset += p.numel()
    head = buf[offset:]
    if keys:
        state.objective.metrics = {**metrics, **{k: head[1 + j].to(metrics[k].device, metrics[k].dtype).reshape(metrics[k].shape) for j, k in enumerate(keys)}}
    return head[0].to(loss.device, loss.dtype), grad_norm([p.grad for p in params]).to(norm.device)


def average_state(state: dict, n: int) -> dict:
    """An objective's next state (:meth:`pyrovae.objectives.base.Objective.estimate`) averaged over the ranks,
    weighted by their shard sizes ``n``: floating-point tensors only (a step counter is the same everywhere).

    For a state that is linear in the batch's mean (GECO's moving average of the constraint, and its log
    multiplier under the paper's rule away from its bounds) this is the single-process state of the global
    batch; a nonlinear update (``multiplier_step="clamped"``, a multiplier at its bound) is approximated by the
    mean of the ranks' updates. Every rank then holds the same state."""
    if not active() or not state:
        return state
    keys = [k for k, v in state.items() if torch.is_floating_point(v)]
    if not keys:
        return state
    device = _comm_device()
    w = torch.tensor(float(n), dtype=torch.float64, device=device)
    buf = torch.cat([torch.cat([state[k].detach().reshape(-1).to(device, torch.float64) for k in keys]) * w, w.reshape(1)])
    with _collective("averaging the objective's state"):
        dist.all_reduce(buf)
    mean = buf[:-1] / buf[-1]
    out, offset = dict(state), 0
    for k in keys:
        v = state[k]
        out[k] = mean[offset:offset + v.numel()].reshape(v.shape).to(v.device, v.dtype)
        offset += v.numel()
    return out


def rank_rng_states() -> dict:
    """``{"rank_rng": [every rank's RNG state]}`` for a checkpoint (``{}`` in a single process). A collective:
    every rank builds the checkpoint, rank 0 writes it."""
    if not active():
        return {}
    states = [None] * world_size()
    with _collective("gathering the ranks' random states for a checkpoint"):
        dist.all_gather_object(states, get_rng_state())
    return {"rank_rng": states}


def restore_rank_rng(state: dict) -> None:
    """Set this rank's own RNG state from a checkpoint written by as many ranks (else :func:`prepare` gives
    ranks that share rank 0's stream their own)."""
    states = state.get("rank_rng")
    if active() and isinstance(states, list) and len(states) == world_size():
        set_rng_state(states[rank()])


class SingleProcess:
    """The trainer's strategy for one process (the default without ``torch.distributed``): every hook is the identity."""

    is_main = True

    def prepare(self, state) -> None:
        """Before training (``state``: the trainer's :class:`~pyrovae.train.state.TrainState`)."""

    def shard(self, batches):
        """This process's batches of a batch source."""
        return batches

    def average(self, state, loss: torch.Tensor, norm: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """After the backward pass on ``n`` data: the (loss per datum, gradient norm) of the global batch."""
        return loss, norm

    def average_state(self, objective_state: dict, n: int) -> dict:
        """The objective's next state on the global batch."""
        return objective_state

    def agree(self, finite, state, stop_signal: Optional[int]) -> tuple[Union[bool, torch.Tensor], Optional[int]]:
        """At a check point: (whether every process stayed finite, the stop signal they agreed on)."""
        return finite, stop_signal

    def stop_requested(self, stop_signal: Optional[int]) -> bool:
        """Whether the trainer stops before its next step."""
        return stop_signal is not None

    def rank_rng_states(self) -> dict:
        """Extra random states for a checkpoint."""
        return {}

    def restore_rank_rng(self, checkpoint: dict) -> None:
        """Set this process's own random state from a checkpoint."""

    def on_main(self, write: Callable[[], Any]) -> Any:
        """Run ``write`` (a file write) on the process that writes."""
        return write()

    def mean(self, fn: Callable[..., float], data) -> float:
        """The mean over ``data`` of a per-datum mean ``fn``."""
        return fn(data)


class DataParallel(SingleProcess):
    """The trainer's strategy for several ``torch.distributed`` processes (:func:`init`): each takes its shard of
    every global batch, the gradients are averaged, checks and stops are agreed, rank 0 writes the files.

    Every hook asks whether ``torch.distributed`` is initialised when it is called, and is the identity when it is
    not: the trainer's default, right in one process and in a trainer built before :func:`init`."""

    def __init__(self):
        self.stop_agreed = False  # every rank has agreed to stop at a check point

    @property
    def is_main(self) -> bool:
        return is_main()

    def prepare(self, state) -> None:
        """Copy rank 0's parameters and module buffers to every rank (as DDP does) and give ranks that share rank 0's
        random stream their own (rank 0's stays, so its draws are a single process's)."""
        self.stop_agreed = False
        if not active():
            return
        from pyrovae.train.optim import NaturalGradient

        if isinstance(state.optim, NaturalGradient):
            raise ValueError(
                "the natural-gradient optimiser estimates its Fisher blocks from each process's own batch, so the processes "
                "would take different steps: train on one process, or with Adam (--optimizer adam) on several"
            )
        with torch.no_grad():
            tensors = list(state.params.values()) + [b for m in state.modules.values() for b in m.buffers()]
            with _collective("copying rank 0's parameters to every rank"):
                for t in tensors:
                    buf = t.detach().to(_comm_device())
                    dist.broadcast(buf, src=0)
                    t.copy_(buf)
        sums = [None] * world_size()
        with _collective("comparing the ranks' random streams"):
            dist.all_gather_object(sums, _checksum(torch.get_rng_state()))
        if rank() > 0 and sums[rank()] == sums[0]:
            pyro.set_rng_seed((sums[0] + 104729 * rank()) % 2**32)

    def shard(self, batches):
        return shard_batches(batches)

    def average(self, state, loss, norm, n):
        return average_gradients(state, loss, norm, n)

    def average_state(self, objective_state, n):
        return average_state(objective_state, n)

    def agree(self, finite, state, stop_signal):
        """One ``all_reduce`` at a check point, so every rank rolls back, or stops, at the same step: whether every
        rank stayed finite, and whether any received SIGINT/SIGTERM."""
        if not active():
            return finite, stop_signal
        device = _comm_device()
        # the parameters' sum, to catch ranks that drifted apart (an optimiser or objective with per-rank state)
        total = torch.stack([p.detach().sum(dtype=torch.float64) for p in state.params.values()]).sum().to(device)
        flags = torch.stack([(~torch.as_tensor(finite, device=device).bool()).to(torch.float64).reshape(()),
                             torch.tensor(float(stop_signal or 0), dtype=torch.float64, device=device), total, -total])
        with _collective(f"the check at step {state.cursor.step}"):
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, signum, high, low = flags.tolist()
        if not bad and high + low > 1e-6 * max(1.0, abs(high)):  # identical operations keep them bit-equal; allow rounding
            raise RuntimeError(
                f"the processes' parameters differ at step {state.cursor.step} (sums from {-low} to {high}): some state that "
                "moves them is not shared (an optimiser or objective that learns from each process's own batch)"
            )
        if signum:
            stop_signal, self.stop_agreed = int(signum), True
        return bad == 0, stop_signal

    def stop_requested(self, stop_signal):
        """Once the ranks have agreed on a signal at a check point (it takes effect within ``check_every`` steps)."""
        return self.stop_agreed if active() else stop_signal is not None

    def rank_rng_states(self):
        return rank_rng_states()

    def restore_rank_rng(self, checkpoint):
        restore_rank_rng(checkpoint)

    def on_main(self, write):
        return on_main(write)

    def mean(self, fn, data):
        return sharded_mean(fn, data)


# --- evaluation ------------------------------------------------------------------------------------------------
def _shard(data) -> tuple[tuple, int, int]:
    parts = as_inputs(data)
    lo, hi = shard_bounds(parts[0].shape[0])
    return tuple(t[lo:hi] for t in parts), lo, hi


def sharded_mean(fn: Callable[..., float], data) -> float:
    """The mean over ``data`` of a per-datum mean ``fn(shard)`` computed by each rank on its shard (``fn(data)``
    in a single process): sum_r n_r fn(shard_r) / N, the same on every rank."""
    if not active():
        return fn(data)
    part, lo, hi = _shard(data)
    local = fn(part if len(part) > 1 else part[0]) * (hi - lo) if hi > lo else 0.0
    t = torch.tensor([local, float(hi - lo)], dtype=torch.float64, device=_comm_device())
    with _collective("averaging over the ranks' shards (validation)"):
        dist.all_reduce(t)
    return float(t[0] / t[1])


def log_likelihood(model, guide, data, num_samples: int = 5000, batch_size: int = 100, max_elements: Optional[int] = None, capture: str = "off", progress: bool = False):
    """:func:`pyrovae.evaluate.log_likelihood` with the data split over the ranks: each evaluates its
    contiguous shard, and the per-datum values and standard errors are gathered (padded to equal shards for
    ``all_gather``), so every rank returns the result for all N data points, in order."""
    from pyrovae.evaluate import LogLikelihood
    from pyrovae.evaluate import log_likelihood as single

    if not active():
        return single(model, guide, data, num_samples, batch_size, max_elements, capture=capture, progress=progress)
    part, lo, hi = _shard(data)
    n = as_inputs(data)[0].shape[0]
    x = part if len(part) > 1 else part[0]
    if hi > lo:
        local = single(model, guide, x, num_samples, batch_size, max_elements, capture=capture, progress=progress and is_main())
        values, stderr, report = local.values, local.stderr, local.capture
    else:
        dtype = part[0].dtype if part[0].is_floating_point() else torch.get_default_dtype()
        values = stderr = torch.empty(0, dtype=dtype, device=part[0].device)
        report = "no data on this rank"
    width = math.ceil(n / world_size())
    buf = torch.zeros(2, width, dtype=torch.float64, device=_comm_device())
    buf[0, : hi - lo], buf[1, : hi - lo] = values.to(buf), stderr.to(buf)
    gathered = [torch.empty_like(buf) for _ in range(world_size())]
    with _collective("gathering the ranks' log-likelihoods"):
        dist.all_gather(gathered, buf)
    sizes = [shard_bounds(n, world_size(), r) for r in range(world_size())]
    out = torch.cat([g[:, : b - a] for g, (a, b) in zip(gathered, sizes)], dim=1).to(values.device, values.dtype)
    return LogLikelihood(out[0], out[1], f"{report} (rank {rank()} of {world_size()}, data points {lo}..{hi - 1} of {n})")
