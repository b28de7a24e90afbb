"""The skeleton the benchmark scripts share: their common options (device, threads, seed, data folder), the
machine and command they record, a timestamped log, models, guides and objectives built through the CLI's
registry from a config dict, the NLL summary and paired differences, and a fixed test binarisation.

Scripts in ``benchmarks/`` import this as ``common`` (Python puts a script's own folder first on
``sys.path``).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from typing import Optional, Sequence

import pyro
import torch
from torch import nn

from pyrovae.cli import UsageError
from pyrovae.cli import resolve_device as _resolve_device
from pyrovae.cli.registry import build_guide, build_model, build_objective, check_config
from pyrovae.evaluate import nll_summary

__all__ = [
    "add_common_args", "build", "build_objective", "command_line", "cpu_model", "fill_defaults", "fixed_binarization", "fmt",
    "count_flops", "cpu_seconds", "adam_alone", "floor_seconds", "products_alone", "hardware_info", "load_average", "matmul_rate", "log", "nll_summary", "now", "paired_difference", "portable_path", "require_positive", "resolve_device",
    "settings", "start", "TIME_CATEGORIES", "TIME_LABELS", "time_breakdown",
]

# ------------------------------------------------------------------------------------------ the command line


def add_common_args(
    p: argparse.ArgumentParser,
    *,
    device: Optional[str] = "cpu",
    threads: Optional[int] = None,
    seed: Optional[str] = "seed of initialisation and training",
    data: Optional[str] = "mnist",
) -> None:
    """The options every benchmark takes alike. ``None`` leaves one out.

    Args:
        device: the ``--device`` default (``cpu``, ``cuda``, ``cuda:N`` or ``auto``).
        threads: the ``--threads`` default (``None``: torch's choice).
        seed: the ``--seed`` help (its default is 0).
        data: the data set the ``--data-dir`` folder holds.
    """
    if device is not None:
        p.add_argument("--device", default=device, help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=threads, help="torch.set_num_threads" + (" (default: torch's choice)" if threads is None else ""))
    if seed is not None:
        p.add_argument("--seed", type=int, default=0, help=seed)
    if data is not None:
        p.add_argument("--data-dir", default=None, help=f"folder holding {data}/ (default: $PYROVAE_DATA, then the cache)")


def fill_defaults(args: argparse.Namespace, preset: dict) -> None:
    """Set each option of ``preset`` that the command line left at ``None`` (a --quick or paper preset)."""
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def require_positive(p: argparse.ArgumentParser, args: argparse.Namespace, keys: Sequence[str]) -> None:
    """``p.error`` naming the first option of ``keys`` below 1 (options left at ``None`` pass)."""
    for key in keys:
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')} must be a positive integer, got {value}")


def settings(args: argparse.Namespace, keys: Sequence[str]) -> dict:
    """The options that change the numbers: results are combined (and resumed) only where these agree."""
    return {k: getattr(args, k) for k in keys}


def resolve_device(name: str) -> torch.device:
    """``--device`` as a device (``auto``: CUDA when available), or exit with the CLI's message."""
    try:
        return _resolve_device(name)
    except UsageError as e:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {e}") from None


def start(args: argparse.Namespace) -> torch.device:
    """Set the torch threads (``--threads``, when given) and return the ``--device`` (CPU without the option)."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return resolve_device(getattr(args, "device", None) or "cpu")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ models and numbers


def build(cfg: dict, x_shape: Sequence[int], device: Optional[torch.device] = None) -> tuple[nn.Module, nn.Module]:
    """The model and guide that ``pyrovae train`` builds from the config ``cfg`` (the registry's keys: ``model``,
    ``guide``, ``z_dims``, ``hidden``, ...), model first, moved to ``device``. Seed before: the initial weights are
    drawn here. A key no builder reads, or one the chosen model, guide and objective do not, is refused
    (``check_config``): a misspelt option would otherwise leave its default in silence."""
    cfg = dict(cfg)
    check_config(cfg)
    model = build_model(cfg, x_shape)
    guide = build_guide(cfg, x_shape, model)
    return model.to(device), guide.to(device)


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``a - b`` over paired data points and its standard error (NaN for one point)."""
    d = torch.as_tensor(a) - torch.as_tensor(b)
    n = d.numel()
    return float(d.mean()), float(d.std() / math.sqrt(n)) if n > 1 else float("nan")


def fmt(value: Optional[float], digits: int = 2, missing: str = "—") -> str:
    """A table cell: ``missing`` for ``None`` or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------ the machine


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hardware_info(device: torch.device) -> dict:
    """CPU model and core count, the device used (GPU name for CUDA), torch/pyro/Python versions."""
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def portable_path(arg: str) -> str:
    """An argument as a results file may record it: an absolute path inside the repository made relative to it, one
    outside shown by its last component (``.../runs``): no machine's folders in committed files."""
    flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if not os.path.isabs(value):
        return arg
    inside = os.path.commonpath([REPO, os.path.abspath(value)]) == REPO
    shown = os.path.relpath(value, REPO) if inside else ".../" + os.path.basename(value.rstrip("/"))
    return flag + eq + shown


def command_line() -> str:
    """The command that started this process, shell-quoted (with ``OMP_NUM_THREADS`` if set), paths made portable."""
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return env + " ".join(shlex.quote(portable_path(a)) for a in [os.path.basename(sys.executable), *sys.argv])


def matmul_rate(n: int = 1024, repeats: int = 20) -> float:
    """FLOP per CPU-second of an ``n x n`` float32 matrix product at the current thread count (median of ``repeats``):
    the rate a step's FLOPs are held against (issue 27's FLOP limit). CPU time (``time.process_time``), like the step
    times it is set beside: on a shared machine wall time counts the other jobs' turns as well."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / cpu_seconds(lambda: torch.mm(a, b), repeats, warmup=3)


def cpu_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median CPU seconds (``time.process_time``) of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return sorted(times)[len(times) // 2]


def count_flops(fn, *args) -> int:
    """Floating-point operations of ``fn(*args)``, forward and backward, as ``torch.utils.flop_counter.FlopCounterMode``
    counts them (matrix products and convolutions: nearly all of a step's arithmetic)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


#: the matrix-product ops :func:`products_alone` records and replays
PRODUCT_OPS = ("mm", "addmm", "bmm", "baddbmm")


def products_alone(fn, *args, repeats: int = 5) -> tuple[float, int, int]:
    """The matrix products of one call of ``fn(*args)`` (forward and backward), replayed alone: every ``mm``,
    ``addmm``, ``bmm`` and ``baddbmm`` the call ran is recorded with its operands' sizes, strides (transposed views
    stay transposed) and dtypes, then run again in the same order on random tensors of those layouts, nothing else in
    between. Returns (CPU seconds per replay, median of ``repeats``; the number of products; their FLOPs).

    A floor for the step: the time this machine's kernels need for the step's products at their own shapes, before any
    elementwise op, copy, optimiser or Python. The operands of one signature are allocated once and reused, so small
    ones stay in cache: if anything the floor is low."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    ops = {getattr(torch.ops.aten, name).default for name in PRODUCT_OPS}
    calls: list[tuple] = []

    def layout(a):
        return ("t", tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else ("v", a)

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                calls.append((func, tuple(layout(a) for a in args), tuple(sorted((kwargs or {}).items()))))
            return func(*args, **(kwargs or {}))

    with Record():
        fn(*args)
    operands = {}
    for _, sig, _ in calls:
        if sig not in operands:
            operands[sig] = [_random_strided(*a[1:]) if a[0] == "t" else a[1] for a in sig]
    program = [(func, operands[sig], dict(kw)) for func, sig, kw in calls]

    def replay() -> None:
        for func, operand, kw in program:
            func(*operand, **kw)

    with FlopCounterMode(display=False) as counter:
        replay()
    return cpu_seconds(replay, repeats), len(program), counter.get_total_flops()


def floor_seconds(parts: dict[str, float]) -> float:
    """A step's floor from its parts (CPU seconds): the lowest of the entries named ``products ...`` (the same
    products timed different ways: alone, or in a step), plus every other entry (the optimiser alone, ...)."""
    products = [v for k, v in parts.items() if k.startswith("products")]
    return min(products) + sum(v for k, v in parts.items() if not k.startswith("products"))


def _random_strided(shape: tuple, stride: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A random tensor of this layout: a view of the memory it spans (broadcast operands have stride 0)."""
    span = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
    return torch.randn(span, dtype=dtype).as_strided(shape, stride)


def adam_alone(params, repeats: int = 5) -> float:
    """CPU seconds of one step of ``torch.optim.Adam(fused=True)`` (the trainer's optimiser) over fresh tensors shaped
    like ``params``, with random gradients (median of ``repeats`` after two warm-up steps): what the optimiser costs
    per step whatever else the step does. Fused Adam reads and writes every parameter and both its moments each step."""
    copies = [torch.randn(p.shape, dtype=p.dtype, requires_grad=True) for p in params]
    for c in copies:
        c.grad = torch.randn_like(c)
    optim = torch.optim.Adam(copies, lr=1e-3, fused=True)
    return cpu_seconds(optim.step, repeats, warmup=2)


#: where a step's CPU time goes: (category, aten op names or name prefixes ending in "*"), in order; the rest is
#: "everything else" (elementwise and indexing ops, the autograd engine, Python and op dispatch)
TIME_CATEGORIES = (
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_convolution*", "aten::mkldnn_convolution*", "aten::convolution_backward")),
    ("fused LSTM kernel", ("aten::mkldnn_rnn*", "aten::_thnn_fused_lstm_cell*")),
    ("softmax", ("aten::_log_softmax*", "aten::_softmax*")),
    ("optimiser", ("aten::_fused_adam*", "aten::_foreach_*")),
    ("zero-fills and copies", ("aten::fill_", "aten::zero_", "aten::copy_")),
)
#: the keys of :func:`time_breakdown`'s result, in table order
TIME_LABELS = [label for label, _ in TIME_CATEGORIES] + ["everything else", "total (profiled)"]


def _category(name: str) -> str:
    for label, names in TIME_CATEGORIES:
        if any(name.startswith(n[:-1]) if n.endswith("*") else name == n for n in names):
            return label
    return "everything else"


def time_breakdown(step, steps: int = 5) -> dict[str, float]:
    """CPU milliseconds per call of ``step()`` in each of :data:`TIME_CATEGORIES` (and "everything else"), from the
    self times of ``torch.profiler`` over ``steps`` calls, plus "total (profiled)". The profiler adds a little to every
    op, so the total is somewhat above the unprofiled step; the split is what it is for."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    out = dict.fromkeys(TIME_LABELS[:-1], 0.0)
    for event in prof.key_averages():
        out[_category(event.key)] += event.self_cpu_time_total / 1e3 / steps
    out[TIME_LABELS[-1]] = sum(out.values())
    return out


def load_average() -> Optional[float]:
    """1-minute load average (other jobs on a shared machine stretch the wall times); None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def fixed_binarization(x: torch.Tensor, seed: int, limit: Optional[int] = None) -> torch.Tensor:
    """One Bernoulli sample of grey-level data with a seeded CPU generator, then the first ``limit`` rows.

    The whole tensor is binarised before slicing, so the first N images are the same for every ``limit``
    and every device (the IWAE protocol: dynamic binarisation for training, one fixed one for testing).
    """
    g = torch.Generator().manual_seed(int(seed))
    out = torch.bernoulli(x.detach().cpu(), generator=g)
    if limit is not None:
        out = out[:limit]
    return out.to(x.device)
