"""Random-number-generator state of every generator a Pyro program may draw from (Python, NumPy, torch CPU
and CUDA): saved with checkpoints, and restored around trial runs (plate-nesting guesses, capture checks)."""
from __future__ import annotations

import random

import numpy as np
import torch


def get_rng_state() -> dict:
    """All RNG states (Python, numpy, torch CPU and CUDA) as checkpoint-safe values."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned; its tensors may have been loaded onto any device
    (``load_checkpoint(map_location="cuda")`` moves them all), the RNGs take them back on the CPU."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
