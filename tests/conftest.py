import os
from pathlib import Path

import pyro
import pytest
import torch


if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist: share the cores between the workers, no oversubscription
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_clean():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


def _data_root():
    root = os.environ.get("PYROVAE_DATA")
    return Path(root) if root else None


@pytest.fixture
def data_root():
    """The real-data folder from $PYROVAE_DATA (skips the test when it is not set or absent)."""
    root = _data_root()
    if root is None or not root.is_dir():
        pytest.skip("real data not available: set PYROVAE_DATA to a folder holding mnist/, binarized-mnist/, ...")
    return root
