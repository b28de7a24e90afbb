"""A tiny registered data set for the command-line tests: uniform [0, 1) vectors in ``ROOT/NAME/tiny.npz``."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

import pyrovae.data.core as D


def _read(folder: Path) -> D.RawData:
    z = np.load(folder / "tiny.npz")
    return D.RawData(train=torch.from_numpy(z["train"]), test=torch.from_numpy(z["test"]))


@contextlib.contextmanager
def tiny_dataset(root: Path, name: str, train: int, test: int, dim: int) -> Iterator[Path]:
    """Write the data under ``root`` and register ``name`` for the duration (on copies of the registry, so that it
    is back as it was afterwards); yields ``root``, the ``--data-dir``."""
    rng = np.random.default_rng(0)
    (root / name).mkdir()
    np.savez(root / name / "tiny.npz", train=rng.random((train, dim)).astype(np.float32), test=rng.random((test, dim)).astype(np.float32))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D, "DATASETS", dict(D.DATASETS))
        mp.setattr(D, "_SPECS", dict(D._SPECS))
        D.register_dataset(name, ["tiny.npz"])(_read)
        yield root
