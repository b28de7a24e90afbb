"""The data layer: find dataset files, read them into tensors, split, binarize, and batch on the device.

Every dataset comes back as float32 tensors in [0, 1] of shape ``[N, C, H, W]`` (``[N, 1, 28, 28]`` for
the MNIST-like sets) inside a :class:`DataSplits`. The whole training set lives on the device as one
tensor and :class:`Batches` draws minibatches by indexing it with an on-device permutation; there is no
DataLoader and no worker process.

Where files come from (:func:`resolve`), in order: the ``data_dir`` argument (``--data-dir`` on the
CLI), the environment variable ``PYROVAE_DATA``, then the cache folder ``$XDG_CACHE_HOME/pyrovae``
(``~/.cache/pyrovae``). Each root may hold the files either in ``root/<name>/`` or directly in
``root/``. MNIST and Fashion-MNIST are downloaded into the cache with torchvision when found nowhere.

Datasets are registered in :data:`DATASETS` (name -> reader of a folder); add one with
:func:`register_dataset`. Any tensor or array the user already holds goes through :func:`from_array`.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

PathLike = Union[str, "os.PathLike[str]"]
ArrayLike = Union[torch.Tensor, np.ndarray]

#: Binarization modes: keep grey levels, sample {0,1} once with a fixed seed, or resample every use.
BINARIZE = ("none", "static", "dynamic")
#: Validation examples taken from the end of the training set when a dataset has no split of its own.
DEFAULT_VALID_SIZE = 5000
ENV_VAR = "PYROVAE_DATA"


class DataError(ValueError):
    """Dataset files that are missing, truncated or corrupt, or data that a model cannot use."""


@dataclass
class RawData:
    """What a dataset reader returns: float32 CPU tensors in [0, 1], ``valid`` only if the dataset has its own."""

    train: torch.Tensor
    test: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    train_labels: Optional[torch.Tensor] = None
    test_labels: Optional[torch.Tensor] = None
    valid_labels: Optional[torch.Tensor] = None


@dataclass
class DataSplits:
    """Train / validation / test tensors on one device, ``[N, *x_shape]`` each.

    ``valid`` is None when there is no validation set; labels are long tensors or None. With
    ``binarize == "dynamic"`` the tensors hold grey levels and :class:`Batches` samples {0,1} per use.
    """

    train: torch.Tensor
    valid: Optional[torch.Tensor]
    test: Optional[torch.Tensor]
    train_labels: Optional[torch.Tensor]
    test_labels: Optional[torch.Tensor]
    x_shape: tuple
    name: str
    binarize: str
    valid_labels: Optional[torch.Tensor] = None

    @property
    def dynamic(self) -> bool:
        """Whether batches should be resampled with ``torch.bernoulli`` each time they are used."""
        return self.binarize == "dynamic"


# ----------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class _Spec:
    files: tuple
    subdirs: tuple = ("",)
    torchvision: Optional[str] = None
    hint: str = ""


_SPECS: dict[str, _Spec] = {}
#: name -> reader ``fn(folder: Path) -> RawData``; :func:`resolve` finds the folder.
DATASETS: dict[str, Callable[[Path], RawData]] = {}


def register_dataset(
    name: str,
    files: Sequence[str],
    subdirs: Sequence[str] = ("",),
    torchvision: Optional[str] = None,
    hint: str = "",
) -> Callable:
    """Decorator: register ``fn(folder) -> RawData`` under ``name`` in :data:`DATASETS`.

    Args:
        name: the dataset's name, also the sub-folder searched in each data root.
        files: file names that must all be present in a folder for it to count as found
            (``x.gz`` also matches an unpacked ``x``).
        subdirs: relative folders to try inside ``root/<name>`` and ``root`` (``""`` = the folder itself).
        torchvision: name of a ``torchvision.datasets`` class that can download the files.
        hint: where to get the files, shown when they are not found.
    """

    def decorate(fn: Callable[[Path], RawData]) -> Callable[[Path], RawData]:
        _SPECS[name] = _Spec(tuple(files), tuple(subdirs), torchvision, hint)
        DATASETS[name] = fn
        return fn

    return decorate


#: name -> ``fn(data_dir=, device=, download=, **options)`` for datasets that build their own splits (text:
#: :mod:`pyrovae.data.text`); :func:`load_dataset` hands such names over to their loader.
LOADERS: dict[str, Callable] = {}


def register_loader(name: str, files: Sequence[str], subdirs: Sequence[str] = ("",), hint: str = "") -> Callable:
    """Decorator: register a dataset whose loader returns its own splits object (not float tensors in [0, 1]).

    :func:`resolve` finds its folder as for :func:`register_dataset` (``files`` must all be there); the loader
    calls it itself. ``load_dataset(name, **options)`` returns ``fn(data_dir=, device=, download=, **options)``.
    """

    def decorate(fn: Callable) -> Callable:
        _SPECS[name] = _Spec(tuple(files), tuple(subdirs), None, hint)
        DATASETS[name] = fn
        LOADERS[name] = fn
        return fn

    return decorate


def _check_name(name: str) -> _Spec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset name={name!r}; choose one of {sorted(DATASETS)} or use from_array(...) for your own tensors")
    return _SPECS[name]


# ----------------------------------------------------------------------------------------------------
# Finding files


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pyrovae``, or ``~/.cache/pyrovae`` when XDG_CACHE_HOME is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyrovae"


def _locate(folder: Path, fname: str) -> Optional[Path]:
    """``folder/fname``, or its unpacked twin ``folder/fname[:-3]`` for a ``.gz`` name (torchvision keeps both)."""
    names = [fname, fname[:-3]] if fname.endswith(".gz") else [fname]
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def _candidates(root: Path, name: str, spec: _Spec) -> list:
    return [root / name / s if s else root / name for s in spec.subdirs] + [root / s if s else root for s in spec.subdirs]


def _find(roots: list, name: str, spec: _Spec) -> Optional[Path]:
    for _, root in roots:
        for folder in _candidates(root, name, spec):
            if all(_locate(folder, f) for f in spec.files):
                return folder
    return None


def _torchvision_download(cls_name: str, root: Path) -> None:
    """Download with ``torchvision.datasets.<cls_name>(root, download=True)`` (writes ``root/<cls>/raw``)."""
    import torchvision.datasets

    getattr(torchvision.datasets, cls_name)(str(root), train=True, download=True)


def resolve(name: str, data_dir: Optional[PathLike] = None, download: bool = True) -> Path:
    """The folder holding dataset ``name``'s files.

    Searches ``data_dir``, then ``$PYROVAE_DATA``, then :func:`cache_dir`; in each root both
    ``root/<name>/`` and ``root/`` itself. If nothing is found and torchvision can download the dataset,
    downloads it into the cache.

    Args:
        name: a key of :data:`DATASETS`.
        data_dir: a folder to search first; it must exist.
        download: whether to try a torchvision download when the files are found nowhere.

    Raises:
        DataError: ``data_dir`` does not exist, or the files are nowhere (the message lists every folder).
    """
    spec = _check_name(name)
    roots = []
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise DataError(
                f"data_dir={str(data_dir)!r} does not exist or is not a folder; pass --data-dir (data_dir=) "
                f"pointing at a folder that holds {name}/ or its files, or leave it unset to use ${ENV_VAR} and the cache"
            )
        roots.append(("data_dir", data_dir))
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append((ENV_VAR, Path(env).expanduser()))
    roots.append(("cache", cache_dir()))

    found = _find(roots, name, spec)
    if found is not None:
        return found

    download_note = ""
    if spec.torchvision is None:
        download_note = "No automatic download exists for this dataset."
    elif not download:
        download_note = "Download was disabled (download=False)."
    else:
        try:
            _torchvision_download(spec.torchvision, cache_dir() / name)
        except Exception as e:  # no network, no torchvision, a mirror down: all end in the same advice
            download_note = f"Download with torchvision.datasets.{spec.torchvision} into {cache_dir() / name} failed: {type(e).__name__}: {str(e).strip()}"
        else:
            found = _find([("cache", cache_dir())], name, spec)
            if found is not None:
                return found
            download_note = f"torchvision.datasets.{spec.torchvision} ran but its files were not found under {cache_dir() / name}."

    searched = "\n".join(f"  {folder}  ({label})" for label, root in roots for folder in _candidates(root, name, spec))
    if not env:
        searched += f"\n  (${ENV_VAR} is not set)"
    raise DataError(
        f"dataset {name!r} not found: no folder holds all of {', '.join(spec.files)}.\nSearched, in order:\n{searched}\n"
        f"{download_note}\n"
        + (f"Where to get it: {spec.hint}\n" if spec.hint else "")
        + f"Fix: put the files in DIR/{name}/ (or DIR/) and pass --data-dir DIR (data_dir=DIR in Python) "
        f"or set {ENV_VAR}=DIR."
    )


# ----------------------------------------------------------------------------------------------------
# Readers

_CORRUPT = "the file looks truncated or corrupt: delete it and download it again, or point --data-dir / " + ENV_VAR + " at a good copy"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (so ``x.gz`` and unpacked ``x`` both work)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); {_CORRUPT}") from e


def read_idx(path: PathLike, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (LeCun's MNIST format), gzipped or not.

    Header: big-endian magic ``0x0800 + ndim`` (2051 for images, 2049 for labels) and ``ndim`` sizes.

    Raises:
        DataError: wrong magic number or a payload that does not match the sizes in the header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: only {len(raw)} bytes, shorter than the {header}-byte IDX header; {_CORRUPT}")
    magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if magic != 0x800 + ndim:
        raise DataError(f"{path}: IDX magic number is {magic}, expected {0x800 + ndim} (unsigned bytes, {ndim}-d); {_CORRUPT}")
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise DataError(f"{path}: header says {dims} ({expected} bytes) but the file has {len(raw)} bytes; {_CORRUPT}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()  # writable, for torch.from_numpy


def _to_unit(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)


def _read_idx_split(folder: Path, prefix: str) -> tuple:
    images_path = _locate(folder, f"{prefix}-images-idx3-ubyte.gz")
    labels_path = _locate(folder, f"{prefix}-labels-idx1-ubyte.gz")
    if images_path is None or labels_path is None:
        raise DataError(f"{folder}: {prefix}-images-idx3-ubyte.gz or {prefix}-labels-idx1-ubyte.gz is missing; use resolve() to find a complete folder")
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; {_CORRUPT}")
    return _to_unit(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


_IDX_FILES = tuple(f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1)))


def read_idx_folder(folder: PathLike) -> RawData:
    """MNIST-format folder: ``train-*`` and ``t10k-*`` IDX image and label files -> ``[N, 1, 28, 28]`` in [0, 1]."""
    folder = Path(folder)
    train, train_labels = _read_idx_split(folder, "train")
    test, test_labels = _read_idx_split(folder, "t10k")
    return RawData(train=train, test=test, train_labels=train_labels, test_labels=test_labels)


register_dataset("mnist", _IDX_FILES, subdirs=("", "MNIST/raw"), torchvision="MNIST", hint="http://yann.lecun.com/exdb/mnist/ (4 files)")(
    read_idx_folder
)
register_dataset(
    "fashion-mnist",
    _IDX_FILES,
    subdirs=("", "FashionMNIST/raw"),
    torchvision="FashionMNIST",
    hint="https://github.com/zalandoresearch/fashion-mnist (data/fashion/, 4 files)",
)(read_idx_folder)


@register_dataset(
    "binarized-mnist",
    ("binarized_mnist.npz",),
    hint="Larochelle & Murray's binarized MNIST (binarized_mnist_{train,valid,test}.amat) saved with "
    "np.savez('binarized_mnist.npz', train=..., valid=..., test=...) as uint8 arrays of shape (N, 784)",
)
def read_binarized_mnist(folder: PathLike) -> RawData:
    """Larochelle & Murray (2011) fixed binarization: ``train`` 50000, ``valid`` 10000, ``test`` 10000 x 784; no labels."""
    path = Path(folder) / "binarized_mnist.npz"
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as f:
            for key in ("train", "valid", "test"):
                if key not in f.files:
                    raise DataError(f"{path}: no array {key!r} (found {f.files}); expected train, valid and test of shape (N, 784); {_CORRUPT}")
                arrays[key] = f[key]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read as .npz ({type(e).__name__}: {e}); {_CORRUPT}") from e
    out = {}
    for key, a in arrays.items():
        if a.ndim != 2 or a.shape[1] != 784:
            raise DataError(f"{path}: array {key!r} has shape {a.shape}, expected (N, 784); {_CORRUPT}")
        out[key] = torch.from_numpy(a.astype(np.float32)).reshape(-1, 1, 28, 28)
    return RawData(train=out["train"], valid=out["valid"], test=out["test"])


@register_dataset(
    "omniglot",
    ("chardata.mat",),
    hint="chardata.mat from https://github.com/yburda/iwae (datasets/OMNIGLOT/chardata.mat)",
)
def read_omniglot(folder: PathLike) -> RawData:
    """The 28x28 Omniglot of the IWAE paper (Burda et al. 2016): ``chardata.mat`` keys ``data`` and ``testdata``, (784, N).

    The images are stored column-major; as in Burda's code,
    ``x = data.T.reshape((-1, 28, 28)).reshape((-1, 784), order='F')``, then read row-major as 28x28.
    """
    import scipy.io

    path = Path(folder) / "chardata.mat"
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises many types (MatReadError, ValueError, OSError, TypeError) for bad files
        raise DataError(f"{path}: cannot read as a MATLAB file ({type(e).__name__}: {e}); {_CORRUPT}") from e
    out = {}
    for key in ("data", "testdata"):
        a = mat.get(key)
        if a is None or a.ndim != 2 or a.shape[0] != 784:
            found = None if a is None else a.shape
            raise DataError(f"{path}: array {key!r} is {found}, expected shape (784, N); {_CORRUPT}")
        flat = a.T.astype(np.float32).reshape((-1, 28, 28)).reshape((-1, 784), order="F")
        out[key] = torch.from_numpy(np.ascontiguousarray(flat)).reshape(-1, 1, 28, 28)
    return RawData(train=out["data"], test=out["testdata"])


# ----------------------------------------------------------------------------------------------------
# Checks, splitting, binarization


def check_data(x: torch.Tensor, unit_interval: bool, what: str = "data") -> None:
    """Raise :class:`DataError` for NaN/inf values, or (``unit_interval``) values outside [0, 1].

    Args:
        x: the tensor to check.
        unit_interval: also require ``0 <= x <= 1`` (what a Bernoulli likelihood needs).
        what: how to call the tensor in the message, e.g. ``"mnist train"``.
    """
    if x.numel() == 0:
        return
    # One fused pass: min and max propagate NaN and expose inf, so both finite means all finite.
    # (torch.isfinite(x).all() is ~50x slower on CPU for MNIST-sized tensors.)
    x = x.detach()
    lo, hi = (float(v) for v in torch.aminmax(x.to(torch.uint8) if x.dtype == torch.bool else x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = torch.isfinite(x)
        n_nan = int(torch.isnan(x).sum())
        n_inf = int((~finite).sum()) - n_nan
        first = tuple(int(i) for i in (~finite).nonzero()[0])
        raise DataError(
            f"{what} has {n_nan} NaN and {n_inf} inf values out of {x.numel()} (first at index {first}); "
            "remove or impute them before training"
        )
    if unit_interval and (lo < 0.0 or hi > 1.0):
        raise DataError(
            f"{what} has values in [{lo:g}, {hi:g}], outside [0, 1]; a Bernoulli likelihood needs data in [0, 1]: "
            "rescale it (e.g. divide uint8 pixels by 255, or min-max scale) or use likelihood='gaussian'"
        )


def _check_binarize(binarize: str) -> None:
    if binarize not in BINARIZE:
        raise ValueError(f"binarize={binarize!r} is not one of {BINARIZE}: 'none' keeps grey levels, 'static' samples once with seed, 'dynamic' resamples each batch")


def _check_valid_size(valid_size: Optional[int]) -> None:
    if valid_size is not None and (isinstance(valid_size, bool) or not isinstance(valid_size, int) or valid_size < 0):
        raise ValueError(f"valid_size={valid_size!r} must be None (the dataset's default) or an int >= 0 (0 = no validation set)")


def _finish(
    raw: RawData,
    name: str,
    binarize: str,
    valid_size: Optional[int],
    seed: int,
    device: Union[str, torch.device],
) -> DataSplits:
    """Binarize, split off validation data, move to ``device``. ``valid_size`` None: the dataset's own split or none."""
    n = len(raw.train)
    if raw.valid is not None and valid_size not in (None, 0):
        raise ValueError(
            f"valid_size={valid_size} but dataset {name!r} has its own validation split ({len(raw.valid)} examples); "
            "pass valid_size=None to use it or valid_size=0 for no validation set"
        )
    if valid_size and valid_size >= n:
        raise ValueError(f"valid_size={valid_size} leaves no training data ({name!r} has {n} training examples); pass a smaller valid_size or 0")
    train, test, valid = raw.train, raw.test, raw.valid
    train_labels, valid_labels = raw.train_labels, raw.valid_labels
    if binarize == "static":
        # One CPU generator, train before any split, always in this order: the samples depend neither on
        # the device nor on valid_size.
        g = torch.Generator().manual_seed(int(seed))
        train = torch.bernoulli(train, generator=g)
        test = None if test is None else torch.bernoulli(test, generator=g)
        valid = None if valid is None else torch.bernoulli(valid, generator=g)
    if raw.valid is not None and valid_size == 0:
        valid = valid_labels = None
    elif raw.valid is None and valid_size:
        train, valid = train[:-valid_size], train[-valid_size:]
        if train_labels is not None:
            train_labels, valid_labels = train_labels[:-valid_size], train_labels[-valid_size:]

    def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.contiguous().to(device)

    return DataSplits(
        train=move(train),
        valid=move(valid),
        test=move(test),
        train_labels=move(train_labels),
        test_labels=move(raw.test_labels),
        x_shape=tuple(train.shape[1:]),
        name=name,
        binarize=binarize,
        valid_labels=move(valid_labels),
    )


def load_dataset(
    name: str,
    data_dir: Optional[PathLike] = None,
    binarize: str = "none",
    valid_size: Optional[int] = None,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    download: bool = True,
    **options,
) -> DataSplits:
    """Load a registered dataset as float32 tensors in [0, 1] on ``device``.

    Args:
        name: a key of :data:`DATASETS` (``mnist``, ``fashion-mnist``, ``binarized-mnist``, ``omniglot``).
        data_dir: folder searched first (see :func:`resolve`).
        binarize: ``"none"``, ``"static"`` (Bernoulli samples drawn once from ``torch.Generator`` seeded
            with ``seed``, for train, valid and test) or ``"dynamic"`` (grey levels kept; batches resampled).
        valid_size: validation examples taken from the end of the training set; None means the dataset's
            own split (binarized-mnist) or 5000; 0 means no validation set.
        seed: seed of the static binarization.
        device: where the tensors live.
        download: allow a torchvision download into the cache when the files are not found.
        options: settings of a dataset with its own loader (:data:`LOADERS`), e.g. ``max_length`` for
            ``ptb`` (:func:`pyrovae.data.text.load_ptb`), which returns its own splits object.
    """
    _check_name(name)
    if name in LOADERS:
        return LOADERS[name](data_dir=data_dir, device=device, download=download, binarize=binarize, valid_size=valid_size, seed=seed, **options)
    if options:
        raise TypeError(f"load_dataset({name!r}) got unexpected options {sorted(options)}; they apply to datasets with their own loader ({sorted(LOADERS)})")
    _check_binarize(binarize)
    _check_valid_size(valid_size)
    raw = DATASETS[name](resolve(name, data_dir, download=download))
    for split in ("train", "valid", "test"):
        t = getattr(raw, split)
        if t is not None:
            check_data(t, unit_interval=True, what=f"{name} {split}")
    if valid_size is None and raw.valid is None:
        valid_size = DEFAULT_VALID_SIZE
    return _finish(raw, name, binarize, valid_size, seed, device)


def _as_float(x: ArrayLike, what: str) -> torch.Tensor:
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{what} is a {type(x).__name__}; pass a torch.Tensor or numpy array of shape [N, ...]")
    t = torch.as_tensor(x).detach().cpu()
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    return t.to(torch.float32)


def _as_labels(y: Optional[ArrayLike], n: int, what: str) -> Optional[torch.Tensor]:
    if y is None:
        return None
    t = torch.as_tensor(y).detach().cpu()
    if t.ndim != 1 or len(t) != n:
        raise ValueError(f"{what} has shape {tuple(t.shape)}; expected ({n},), one label per example")
    return t.long()


def from_array(
    train: ArrayLike,
    test: Optional[ArrayLike] = None,
    valid: Optional[ArrayLike] = None,
    *,
    train_labels: Optional[ArrayLike] = None,
    test_labels: Optional[ArrayLike] = None,
    valid_labels: Optional[ArrayLike] = None,
    valid_size: Optional[int] = None,
    binarize: str = "none",
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    unit_interval: bool = True,
    name: str = "array",
) -> DataSplits:
    """Wrap the user's own tensors or numpy arrays ``[N, *x_shape]`` as :class:`DataSplits`.

    uint8 arrays are scaled by 1/255; everything else is cast to float32 as is.

    Args:
        train, test, valid: the splits; ``test`` and ``valid`` are optional.
        train_labels, test_labels, valid_labels: optional per-example labels (cast to long).
        valid_size: examples moved from the end of ``train`` into validation when ``valid`` is not given;
            None or 0 means none.
        binarize, seed, device: as in :func:`load_dataset`.
        unit_interval: require values in [0, 1] (Bernoulli likelihoods); False for e.g. a Gaussian likelihood.
        name: stored in :attr:`DataSplits.name`.
    """
    _check_binarize(binarize)
    _check_valid_size(valid_size)
    if binarize != "none" and not unit_interval:
        raise ValueError(f"binarize={binarize!r} needs data in [0, 1]; pass unit_interval=True or binarize='none'")
    x = _as_float(train, "train")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"train has shape {tuple(x.shape)}; expected [N, ...] with N >= 1 and at least one feature dimension")
    splits = {"train": x}
    for key, arr in (("test", test), ("valid", valid)):
        if arr is not None:
            t = _as_float(arr, key)
            if tuple(t.shape[1:]) != tuple(x.shape[1:]):
                raise ValueError(f"{key} has examples of shape {tuple(t.shape[1:])} but train has {tuple(x.shape[1:])}; give all splits the same shape")
            splits[key] = t
    for key, t in splits.items():
        check_data(t, unit_interval=unit_interval, what=f"{name} {key}")
    raw = RawData(
        train=x,
        test=splits.get("test"),
        valid=splits.get("valid"),
        train_labels=_as_labels(train_labels, len(x), "train_labels"),
        test_labels=None if test is None else _as_labels(test_labels, len(splits["test"]), "test_labels"),
        valid_labels=None if valid is None else _as_labels(valid_labels, len(splits["valid"]), "valid_labels"),
    )
    return _finish(raw, name, binarize, valid_size, seed, device)


# ----------------------------------------------------------------------------------------------------
# Batching


def select_rows(fields: tuple, index):
    """Indexing of a named tuple of per-datum tensors (:class:`pyrovae.data.text.Sentences`,
    :class:`pyrovae.data.derived.Pairs`) as of one data tensor: an int gives a field (tuple semantics:
    ``tokens, lengths = sentences``); a slice, an index tensor or a mask gives those rows of every field, so that
    code written for a data tensor (``data[:n]``) works unchanged."""
    if isinstance(index, int):
        return tuple.__getitem__(fields, index)
    return type(fields)(*(f[index] for f in tuple.__iter__(fields)))


def fields_to(fields: tuple, device) -> tuple:
    """A named tuple of tensors with every field moved to ``device``."""
    return type(fields)(*(f.to(device) for f in tuple.__iter__(fields)))


def as_inputs(data, name: str = "data") -> tuple[torch.Tensor, ...]:
    """``data`` as a tuple of per-datum tensors: a tensor ``x`` becomes ``(x,)``; a tuple or list of tensors
    (``(x, y)``, ``(tokens, lengths)``) is checked to share its first dimension N. A model and guide receive a
    batch of it as ``model(*batch)``, ``guide(*batch)``.

    Raises ``TypeError`` for anything else and ``ValueError`` naming the shapes when first dimensions differ."""
    if isinstance(data, torch.Tensor):
        parts = (data,)
    elif isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        parts = tuple(data)
    else:
        kinds = [type(t).__name__ for t in data] if isinstance(data, (tuple, list)) else type(data).__name__
        raise TypeError(f"{name} must be a tensor [N, ...] or a non-empty tuple of tensors with the same first dimension N, got {kinds}")
    if any(t.ndim < 1 for t in parts):
        raise ValueError(f"{name} has a 0-dimensional tensor (shapes {[tuple(t.shape) for t in parts]}): every tensor needs a first dimension N of data points")
    if len({t.shape[0] for t in parts}) > 1:
        raise ValueError(
            f"the tensors of {name} have different first dimensions (shapes {[tuple(t.shape) for t in parts]}): each "
            "must hold one row per data point, N rows in all; index or reshape them to a common N"
        )
    return parts


class Batches:
    """Minibatches of one on-device tensor (or a tuple of them), drawn by an on-device index permutation per epoch.

    ``for x in Batches(data, 100): ...`` runs one epoch; for a tuple ``data = (x, y)`` every batch is a tuple
    ``(x[idx], y[idx])`` sliced by the same indices. By default the permutation comes from the
    global torch RNG of ``data``'s device, so a checkpoint of the RNG state makes the order reproducible.
    To resume mid-epoch, keep ``perm = batches.permutation()`` and the position reached
    (``start + k * batch_size`` after ``k`` batches), then call ``batches.epoch(perm, start=position)``.

    Args:
        data: ``[N, ...]`` tensor, or a tuple of such tensors (see :func:`as_inputs`), already on their device.
        batch_size: examples per batch (>= 1).
        shuffle: permute each epoch; False gives ``0, 1, ..., N-1``.
        drop_last: drop the final batch when it is smaller than ``batch_size``.
        dynamic_binarize: yield ``torch.bernoulli(batch)`` (a fresh {0,1} sample per use of an example); for a
            tuple, of its first tensor only.
        generator: a ``torch.Generator`` on ``data``'s device for the permutation and the Bernoulli
            samples; None uses the global RNG.
    """

    def __init__(
        self,
        data: Union[torch.Tensor, tuple],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        dynamic_binarize: bool = False,
        generator: Optional[torch.Generator] = None,
    ):
        if isinstance(data, torch.Tensor) and data.ndim < 1:
            raise TypeError(f"data must be a torch.Tensor of shape [N, ...], got a 0-dimensional tensor")
        self._parts = as_inputs(data)
        self._tuple = not isinstance(data, torch.Tensor)
        data = self._parts[0]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1, e.g. batch_size=100")
        n = len(data)
        if n == 0:
            raise ValueError("data has no examples (N=0); load a non-empty dataset")
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size={batch_size} with drop_last=True and only {n} examples gives no batch; use a smaller batch_size or drop_last=False")
        if generator is not None and generator.device.type != data.device.type:
            raise ValueError(f"generator is on {generator.device} but data is on {data.device}; create it with torch.Generator(device=data.device)")
        if dynamic_binarize:
            check_data(data, unit_interval=True, what="data for dynamic binarization")
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last
        self.dynamic_binarize, self.generator = dynamic_binarize, generator

    def __len__(self) -> int:
        """Batches per full epoch."""
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def permutation(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A new epoch's order of indices, on ``data``'s device (``arange`` when ``shuffle=False``)."""
        n, device = len(self.data), self.data.device
        if not self.shuffle:
            return torch.arange(n, device=device)
        g = generator if generator is not None else self.generator
        return torch.randperm(n, device=device, generator=g)

    def epoch(self, perm: Optional[torch.Tensor] = None, start: int = 0) -> Iterator[Union[torch.Tensor, tuple]]:
        """Yield ``data[perm[i : i + batch_size]]`` (a tuple of such slices for tuple data) for ``i = start, start + batch_size, ...``.

        Args:
            perm: the epoch's index order (a new :meth:`permutation` when None).
            start: position in ``perm`` to begin from, to resume an interrupted epoch.
        """
        n = len(self.data)
        perm = self.permutation() if perm is None else perm.to(self.data.device)
        if perm.shape != (n,):
            raise ValueError(f"perm has shape {tuple(perm.shape)}; expected ({n},), a permutation of the {n} examples from Batches.permutation()")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= n:
            raise ValueError(f"start={start!r} must be an int in [0, {n}], the number of examples of perm already used")
        for i in range(start, self._stop(), self.batch_size):
            yield self._take(perm[i : min(i + self.batch_size, self._stop())])

    def batch(self, perm: torch.Tensor, index: int) -> Union[torch.Tensor, tuple]:
        """Batch number ``index`` of the epoch with order ``perm`` (random access, for resuming)."""
        return self._take(perm[index * self.batch_size : min((index + 1) * self.batch_size, self._stop())])

    def _stop(self) -> int:
        return len(self) * self.batch_size if self.drop_last else len(self.data)

    def _take(self, idx: torch.Tensor) -> Union[torch.Tensor, tuple]:
        x = self.data[idx]
        x = torch.bernoulli(x, generator=self.generator) if self.dynamic_binarize else x
        return (x, *(t[idx] for t in self._parts[1:])) if self._tuple else x

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.epoch()
