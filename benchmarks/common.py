"""Helpers shared by the benchmark scripts: what machine ran them, and a fixed test binarisation.

Scripts in ``benchmarks/`` import this as ``common`` (Python puts a script's own folder first on
``sys.path``).
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from typing import Optional

import pyro
import torch


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
