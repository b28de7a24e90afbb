"""Data sets derived from MNIST for the GECO paper's studies (Rezende & Viola 2018, "Taming VAEs").

Each set is a fixed, seeded choice of MNIST indices: the index arrays are cached in
``cache_dir()/derived/`` and the images are rebuilt from MNIST on load (so the cache is a few hundred kB and
always matches the MNIST files it was drawn from). Train examples are drawn from MNIST's training set, test
examples from its test set. Labels (``train_labels`` ``[N]``) are the MNIST labels of the digits used,
in the order listed below, as one decimal code (``digits_of(labels, k)`` splits it). The label relations (the seed text of the paper's tasks lost them) are:

=================  ==================  ================  =====================================================
name               x (target)          context           relation
=================  ==================  ================  =====================================================
``color-mnist``    ``[3, 28, 28]``     --                three independent digits a, b, c as R, G, B (1000 modes)
``mnist-triplets`` ``[1, 28, 84]``     --                digits a, b, c side by side with c = (a + b) mod 10
``mnist-sum``      ``[1, 28, 28]``     ``[2, 28, 28]``   context digits a, b as channels; target t = (a + b) mod 10
``mnist-sum-hard`` ``[1, 28, 28]``     ``[3, 28, 28]``   context digits a, b, c; target t = (a * b + c) mod 10
``mnist-rotate``   ``[1, 28, 28]``     ``[1, 28, 28]``   target: another instance of the context's label,
                                                         rotated by 90 degrees counter-clockwise (``rot90``)
``micro-mnist``    ``[1, 28, 28]``     --                7 random MNIST training images (Appendix E.1); test = train
=================  ==================  ================  =====================================================

Conditional sets hold :class:`Pairs` ``(target, context)``: a tuple of tensors, so that the trainer runs
``model(target, context)`` and ``guide(target, context)``; slicing it (``pairs[:n]``) slices both.
Sizes: :data:`SIZES` (train, test) examples; the validation set is taken from the end of train
(:data:`DEFAULT_VALID_SIZE`, 0 for micro-mnist).
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
import torch

import pyrovae.data.core as D
from pyrovae.utils.files import atomic_write, file_lock

#: (train, test) examples of each derived set
SIZES = {"color-mnist": (20000, 5000), "mnist-triplets": (20000, 5000), "mnist-sum": (20000, 5000), "mnist-sum-hard": (20000, 5000),
         "mnist-rotate": (20000, 5000), "micro-mnist": (7, 7)}
#: context shape of each conditional set (:func:`context_shape`)
CONTEXT_SHAPES = {"mnist-sum": (2, 28, 28), "mnist-sum-hard": (3, 28, 28), "mnist-rotate": (1, 28, 28)}
#: source digits per example of each set: the columns of its index array (:func:`build_indices`)
COLUMNS = {"color-mnist": 3, "mnist-triplets": 3, "mnist-sum": 3, "mnist-sum-hard": 4, "mnist-rotate": 2, "micro-mnist": 1}
DEFAULT_VALID_SIZE = 2000
#: seed of the index draws (``load_dataset(name, derived_seed=...)`` changes it); independent of the training seed
DERIVED_SEED = 0
CACHE_VERSION = 1


class Pairs(NamedTuple):
    """``(target [N, *x_shape], context [N, *context_shape])``; ``pairs[i:j]`` or ``pairs[idx]`` slices both."""

    target: torch.Tensor
    context: torch.Tensor

    def __getitem__(self, index):
        return D.select_rows(self, index)

    @property
    def shape(self) -> torch.Size:
        """The targets' shape (``shape[0]`` is the number of pairs, as for a data tensor)."""
        return self.target.shape

    def to(self, device) -> "Pairs":
        return D.fields_to(self, device)


def context_shape(name: str) -> Optional[tuple]:
    """The context shape of a conditional data set, None for any other name."""
    return CONTEXT_SHAPES.get(name)


def _by_label(labels: np.ndarray) -> list:
    return [np.flatnonzero(labels == k) for k in range(10)]


def _pick(rng: np.random.Generator, pools: list, wanted: np.ndarray, avoid: Optional[np.ndarray] = None) -> np.ndarray:
    """One random index of label ``wanted[i]`` per i (different from ``avoid[i]`` when given)."""
    out = np.empty(len(wanted), np.int64)
    for k in range(10):
        sel = np.flatnonzero(wanted == k)
        if len(sel) == 0:
            continue
        pool = pools[k]
        if len(pool) == 0 or (avoid is not None and len(pool) < 2):
            raise D.DataError(f"the source split has too few images of label {k} to build the derived set")
        draw = rng.integers(len(pool), size=len(sel))
        if avoid is not None:  # redraw collisions with the context instance: another instance of the same label
            clash = pool[draw] == avoid[sel]
            draw[clash] = (draw[clash] + 1 + rng.integers(len(pool) - 1, size=int(clash.sum()))) % len(pool)
        out[sel] = pool[draw]
    return out


def build_indices(name: str, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The source indices ``[n, k]`` of derived set ``name`` drawn from a split with ``labels``: one column per
    digit, in the order of the module table (conditional sets: context digits first, the target last)."""
    if name not in SIZES:
        raise ValueError(f"name={name!r} is not a derived data set; choose one of {sorted(SIZES)}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    pools = _by_label(labels)
    m = len(labels)
    if name == "micro-mnist":
        return rng.choice(m, size=(n, 1), replace=False)
    if name == "color-mnist":
        return rng.integers(m, size=(n, 3))
    if name in ("mnist-triplets", "mnist-sum"):
        a, b = rng.integers(m, size=n), rng.integers(m, size=n)
        return np.stack([a, b, _pick(rng, pools, (labels[a] + labels[b]) % 10)], 1)
    if name == "mnist-sum-hard":
        a, b, c = (rng.integers(m, size=n) for _ in range(3))
        return np.stack([a, b, c, _pick(rng, pools, (labels[a] * labels[b] + labels[c]) % 10)], 1)
    a = rng.integers(m, size=n)  # mnist-rotate
    return np.stack([a, _pick(rng, pools, labels[a], avoid=a)], 1)


def assemble(name: str, images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray) -> tuple:
    """(x, labels) of a derived set from MNIST ``images`` ``[M, 1, 28, 28]`` and its indices; x is a
    :class:`Pairs` for a conditional set. A label ``[n]`` is the decimal code of the digits' labels in the index
    order (:func:`digits_of`): mnist-sum's 3 + 4 -> 7 is 347."""
    check_indices(name, idx, len(images))
    idx_t = torch.as_tensor(idx)
    digits = images[:, 0][idx_t]  # [n, k, 28, 28]
    k = idx_t.shape[1]
    lab = (labels[idx_t] * 10 ** torch.arange(k - 1, -1, -1)).sum(1)  # the digits' labels as one decimal code
    if name in ("micro-mnist", "color-mnist"):
        return digits, lab
    if name == "mnist-triplets":
        return torch.cat(digits.unbind(1), -1).unsqueeze(1), lab
    target = digits[:, -1:]
    if name == "mnist-rotate":
        target = torch.rot90(target, 1, dims=(-2, -1))
    return Pairs(target.contiguous(), digits[:, :-1].contiguous()), lab


def check_indices(name: str, idx, m: int) -> None:
    """Raise ``ValueError`` unless ``idx`` is an integer array ``[n, COLUMNS[name]]`` of indices into ``m`` source images
    (one column per digit, :func:`build_indices`): with other columns the images would be assembled into the wrong shape."""
    if name not in COLUMNS:
        raise ValueError(f"name={name!r} is not a derived data set; choose one of {sorted(COLUMNS)}")
    arr = np.asarray(idx)
    if arr.ndim != 2 or arr.shape[1] != COLUMNS[name] or arr.dtype.kind not in "iu":
        raise ValueError(
            f"the index array of {name!r} has shape {list(arr.shape)} ({arr.dtype}), but {name!r} needs integers [n, {COLUMNS[name]}], one "
            f"column per source digit: it was written for another data set or damaged; rebuild it with build_indices({name!r}, ...)"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= m):
        raise ValueError(
            f"the index array of {name!r} holds indices from {arr.min()} to {arr.max()}, outside the {m} source images [0, {m}): it was "
            f"drawn from another split or damaged; rebuild it with build_indices({name!r}, ...)"
        )


def digits_of(code: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` digit labels ``[n, k]`` of a derived set's label codes ``[n]`` (inverse of :func:`assemble`'s code)."""
    return torch.stack([code // 10 ** (k - 1 - i) % 10 for i in range(k)], -1)


def _cache_path(name: str, split: str, seed: int):
    return D.cache_dir() / "derived" / f"{name}-{split}-seed{seed}-v{CACHE_VERSION}.npz"


def _read_cache(path: Path, fingerprint: np.ndarray, name: str, n: int, m: int) -> tuple:
    """(indices, None) from a valid cache file; (None, why) for a damaged one; (None, None) for none, or one drawn
    from other MNIST files (its fingerprint differs: redrawn for these, nothing is wrong)."""
    if not path.exists():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as f:
            stored, idx = f["fingerprint"], f["idx"]
    except Exception as e:  # empty, truncated or foreign bytes: EOFError, BadZipFile, OSError, ValueError, KeyError, zlib.error
        return None, f"cannot be read ({type(e).__name__}: {e})"
    if not np.array_equal(stored, fingerprint):
        return None, None
    if idx.shape != (n, COLUMNS[name]) or idx.dtype.kind not in "iu":
        return None, f"holds indices of shape {list(idx.shape)} ({idx.dtype}), not [{n}, {COLUMNS[name]}] integers"
    if idx.size and (idx.min() < 0 or idx.max() >= m):
        return None, f"holds indices outside the {m} source images"
    return idx, None


def _indices(name: str, split: str, labels: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """Cached :func:`build_indices`, checked against the source labels' fingerprint and the set's shape; rebuilt
    (with a warning when the file was damaged) and written atomically under a lock, so that processes building it
    at once wait for one another and a reader never sees half a file."""
    path = _cache_path(name, split, seed)
    fingerprint = np.array([len(labels), int(labels.sum()), int((labels * torch.arange(len(labels)) % 1000003).sum())])
    idx, damage = _read_cache(path, fingerprint, name, n, len(labels))
    if idx is not None:
        return idx
    with file_lock(path.with_name(f".{path.name}.lock")):
        idx, again = _read_cache(path, fingerprint, name, n, len(labels))  # built by another process while this one waited
        if idx is not None:
            return idx
        damage = again or damage
        if damage:
            warnings.warn(f"the derived-data cache {path} {damage}; rebuilding it (the same indices, drawn again from the seed)", stacklevel=3)
        idx = build_indices(name, labels.numpy(), n, seed + (0 if split == "train" else 1))
        try:
            atomic_write(path, lambda f: np.savez(f, idx=idx, fingerprint=fingerprint))
        except OSError:  # a read-only cache only costs the (cheap) redraw
            pass
    return idx


def _binarize(x, binarize: str, g: torch.Generator):
    if binarize != "static":
        return x
    if isinstance(x, Pairs):  # both images: the context is an image of the same kind as the target
        return Pairs(torch.bernoulli(x.target, generator=g), torch.bernoulli(x.context, generator=g))
    return torch.bernoulli(x, generator=g)


def load_derived(
    name: str,
    data_dir=None,
    device: Union[str, torch.device] = "cpu",
    download: bool = True,
    binarize: str = "none",
    valid_size: Optional[int] = None,
    seed: int = 0,
    derived_seed: int = DERIVED_SEED,
) -> D.DataSplits:
    """Derived set ``name`` as :class:`pyrovae.data.DataSplits` (what ``load_dataset(name)`` returns).

    Args:
        name: a key of :data:`SIZES`.
        data_dir, download: where MNIST is found (:func:`pyrovae.data.resolve`).
        binarize, seed: as in :func:`pyrovae.data.load_dataset` (``dynamic`` resamples the targets only).
        valid_size: taken from the end of train; None means :data:`DEFAULT_VALID_SIZE` (0 for micro-mnist).
        derived_seed: seed of the index draws (train uses it, test ``derived_seed + 1``).
    """
    D._check_binarize(binarize)
    D._check_valid_size(valid_size)
    mnist = _mnist(None if data_dir is None else str(data_dir), download)
    n_train, n_test = SIZES[name]
    train_i = _indices(name, "train", mnist.train_labels, n_train, derived_seed)
    x, y = assemble(name, mnist.train, mnist.train_labels, train_i)
    if name == "micro-mnist":
        tx, ty = x, y
        valid_size = 0 if valid_size is None else valid_size
    else:
        tx, ty = assemble(name, mnist.test, mnist.test_labels, _indices(name, "test", mnist.test_labels, n_test, derived_seed))
    valid_size = DEFAULT_VALID_SIZE if valid_size is None else valid_size
    if valid_size >= len(y):
        raise ValueError(f"valid_size={valid_size} leaves no training data ({name!r} has {len(y)} training examples); pass a smaller valid_size or 0")
    g = torch.Generator().manual_seed(int(seed))
    x, tx = _binarize(x, binarize, g), _binarize(tx, binarize, g)
    vx = vy = None
    if valid_size:
        x, vx, y, vy = x[:-valid_size], x[-valid_size:], y[:-valid_size], y[-valid_size:]

    def move(t):
        return None if t is None else t.to(device) if isinstance(t, Pairs) else t.contiguous().to(device)

    return D.DataSplits(
        train=move(x), valid=move(vx), test=move(tx), train_labels=move(y), test_labels=move(ty), x_shape=tuple(x.shape[1:]),
        name=name, binarize=binarize, valid_labels=move(vy),
    )


@functools.lru_cache(maxsize=1)
def _mnist(data_dir: Optional[str], download: bool) -> D.RawData:
    return D.DATASETS["mnist"](D.resolve("mnist", data_dir, download=download))


def _register(name: str) -> None:
    D.register_loader(name, D._IDX_FILES, subdirs=("", "MNIST/raw"), hint="built from MNIST: put MNIST's 4 files in DIR/mnist/")(
        functools.partial(load_derived, name)
    )


for _name in SIZES:
    _register(_name)
