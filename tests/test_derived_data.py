"""The MNIST-derived data sets of the GECO studies: label relations, the rotation, determinism, the cache."""
import numpy as np
import pytest
import torch

import pyrovae.data.derived as DD
from pyrovae.data import Batches, load_dataset


def fake_mnist(m=300, seed=0):
    """Random 'images' whose first pixel encodes the index: an assembled image names its source."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(m, 1, 28, 28, generator=g)
    labels = torch.randint(10, (m,), generator=g)
    return images, labels


@pytest.mark.parametrize("name,k", [("color-mnist", 3), ("mnist-triplets", 3), ("mnist-sum", 3), ("mnist-sum-hard", 4), ("mnist-rotate", 2), ("micro-mnist", 1)])
def test_relations_and_images(name, k):
    images, labels = fake_mnist()
    idx = DD.build_indices(name, labels.numpy(), 7 if name == "micro-mnist" else 500, seed=3)
    assert idx.shape[1] == k
    x, code = DD.assemble(name, images, labels, idx)
    d = DD.digits_of(code, k)
    assert torch.equal(d, labels[torch.as_tensor(idx)])
    if name in ("mnist-triplets", "mnist-sum"):
        assert torch.equal(d[:, 2], (d[:, 0] + d[:, 1]) % 10)
    if name == "mnist-sum-hard":
        assert torch.equal(d[:, 3], (d[:, 0] * d[:, 1] + d[:, 2]) % 10)
    if name == "mnist-rotate":
        assert torch.equal(d[:, 0], d[:, 1]) and (idx[:, 0] != idx[:, 1]).all()  # same label, another instance
        assert torch.equal(torch.rot90(x.target, -1, dims=(-2, -1)), images[torch.as_tensor(idx[:, 1])])
        assert torch.equal(x.context, images[torch.as_tensor(idx[:, 0])])
    if name == "mnist-sum":
        assert x.target.shape[1:] == (1, 28, 28) and x.context.shape[1:] == DD.context_shape(name)
        assert torch.equal(x.context[:, 1], images[torch.as_tensor(idx[:, 1]), 0])
    if name == "color-mnist":
        assert x.shape[1:] == (3, 28, 28) and torch.equal(x[:, 2], images[torch.as_tensor(idx[:, 2]), 0])
    if name == "mnist-triplets":
        assert x.shape[1:] == (1, 28, 84) and torch.equal(x[:, 0, :, 56:], images[torch.as_tensor(idx[:, 2]), 0])
    if name == "micro-mnist":
        assert len(set(idx[:, 0].tolist())) == 7


def test_deterministic_and_seeded():
    _, labels = fake_mnist()
    a = DD.build_indices("mnist-sum", labels.numpy(), 100, seed=1)
    assert np.array_equal(a, DD.build_indices("mnist-sum", labels.numpy(), 100, seed=1))
    assert not np.array_equal(a, DD.build_indices("mnist-sum", labels.numpy(), 100, seed=2))


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, labels = fake_mnist()
    first = DD._indices("mnist-rotate", "train", labels, 50, 0)
    assert DD._cache_path("mnist-rotate", "train", 0).is_file()
    assert np.array_equal(first, DD._indices("mnist-rotate", "train", labels, 50, 0))
    other = labels.roll(1)  # other source labels: the cache is not trusted, the indices are redrawn for them
    redrawn = DD._indices("mnist-rotate", "train", other, 50, 0)
    assert (other[torch.as_tensor(redrawn[:, 0])] == other[torch.as_tensor(redrawn[:, 1])]).all()


def test_pairs_slice_and_batches():
    p = DD.Pairs(torch.arange(10.0).view(10, 1), torch.arange(10.0, 20.0).view(10, 1))
    assert p.shape[0] == 10 and torch.equal(p[2:4].context, torch.tensor([[12.0], [13.0]]))
    target, context = p
    assert torch.equal(target, p.target)
    for t, c in Batches(p, 4):
        assert torch.equal(c, t + 10)


def test_unknown_name():
    with pytest.raises(ValueError, match="derived"):
        DD.build_indices("mnist-product", np.zeros(10), 3, 0)


def test_load_dataset_real(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    s = load_dataset("mnist-sum", data_dir=data_root)
    assert isinstance(s.train, DD.Pairs) and s.x_shape == (1, 28, 28) and s.train.context.shape[1:] == (2, 28, 28)
    d = DD.digits_of(s.test_labels, 3)
    assert torch.equal(d[:, 2], (d[:, 0] + d[:, 1]) % 10)
    again = load_dataset("mnist-sum", data_dir=data_root)  # from the cache: the same data
    assert torch.equal(again.train.target, s.train.target)
    micro = load_dataset("micro-mnist", data_dir=data_root)
    assert micro.train.shape == (7, 1, 28, 28) and micro.valid is None and torch.equal(micro.test, micro.train)


# ================================================================================================
# issue 26, item 6: the cache is checked, rebuilt when damaged, and written atomically under a lock


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign", "other-columns", "out-of-range"])
def test_a_damaged_cache_file_is_rebuilt_with_a_warning(damage, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, labels = fake_mnist()
    good = DD._indices("mnist-sum", "train", labels, 50, 0)
    path = DD._cache_path("mnist-sum", "train", 0)
    raw = path.read_bytes()
    with np.load(path) as f:
        fingerprint = f["fingerprint"]
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "foreign":
        path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    elif damage == "other-columns":  # 1 column: Color-MNIST would come out 1 x 28 x 28
        np.savez(path.with_suffix(""), idx=good[:, :1], fingerprint=fingerprint)
    else:
        np.savez(path.with_suffix(""), idx=good + 1000, fingerprint=fingerprint)
    with pytest.warns(UserWarning, match="derived-data cache .* rebuilding"):
        again = DD._indices("mnist-sum", "train", labels, 50, 0)
    assert np.array_equal(again, good)
    assert np.array_equal(DD._indices("mnist-sum", "train", labels, 50, 0), good)  # rewritten: read back without a warning


def test_assemble_refuses_indices_of_the_wrong_shape_or_range():
    images, labels = fake_mnist()
    idx = DD.build_indices("color-mnist", labels.numpy(), 20, seed=0)
    with pytest.raises(ValueError, match=r"shape \[20, 1\].*needs integers \[n, 3\]"):
        DD.assemble("color-mnist", images, labels, idx[:, :1])  # was: 1 x 28 x 28 "Color-MNIST", silently
    with pytest.raises(ValueError, match="outside the 300 source images"):
        DD.assemble("color-mnist", images, labels, idx + 300)  # was: IndexError
    with pytest.raises(ValueError, match="needs integers"):
        DD.assemble("color-mnist", images, labels, idx.astype(np.float64))


RACE = r"""
import sys, time
from pathlib import Path
import numpy as np
import torch
import pyrovae.data.derived as DD
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.002)
labels = torch.arange(3000) % 10
for seed in range(4):
    idx = DD._indices("mnist-sum", "train", labels, 200000, seed)
    assert np.array_equal(idx, DD.build_indices("mnist-sum", labels.numpy(), 200000, seed)), seed
"""


def test_three_processes_building_the_cache_at_once_all_succeed(tmp_path):
    import os
    import subprocess
    import sys
    import time

    script = tmp_path / "race.py"
    script.write_text(RACE)
    go = tmp_path / "go"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error"}
    procs = [subprocess.Popen([sys.executable, str(script), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    time.sleep(3)  # all three imported and waiting
    go.touch()
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert not list((tmp_path / "cache").rglob("*.tmp"))
