"""The data layer on small synthetic files written in tmp_path, plus one check against the real data."""
import gzip
import struct

import numpy as np
import pytest
import scipy.io
import torch

import pyrovae.data.core as data
from pyrovae.data import DATASETS, Batches, DataError, check_data, from_array, load_dataset, resolve


@pytest.fixture(autouse=True)
def _no_network_and_private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder, and a torchvision download fails at once (as offline)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def offline(cls_name, root):
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(data, "_torchvision_download", offline)


# ----------------------------------------------------------------------------------------------------
# Writers of the on-disk formats


def write_idx(path, array, gz=True):
    array = np.asarray(array, dtype=np.uint8)
    payload = struct.pack(f">{1 + array.ndim}I", 0x800 + array.ndim, *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_mnist(folder, n_train=7, n_test=4, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, a in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), a, gz=gz)
    return arrays


def write_binarized(folder, n_train=6, n_valid=3, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {k: rng.integers(0, 2, (n, 784), dtype=np.uint8) for k, n in (("train", n_train), ("valid", n_valid), ("test", n_test))}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "binarized_mnist.npz", **arrays)
    return arrays


def to_iwae_mat(images):
    """Store [N, 28, 28] images as Burda's chardata.mat does: column-major, (784, N)."""
    return np.ascontiguousarray(images.transpose(0, 2, 1).reshape(len(images), 784).T)


# ----------------------------------------------------------------------------------------------------
# Readers


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_dataset_values_labels_and_valid_split(tmp_path, name):
    arrays = write_mnist(tmp_path / name, n_train=7, n_test=4)
    d = load_dataset(name, data_dir=tmp_path, valid_size=2)
    train_images = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float().div(255).unsqueeze(1)
    train_labels = torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long()
    assert d.train.shape == (5, 1, 28, 28) and d.valid.shape == (2, 1, 28, 28) and d.test.shape == (4, 1, 28, 28)
    assert d.train.dtype == torch.float32 and d.x_shape == (1, 28, 28) and d.name == name and d.binarize == "none"
    torch.testing.assert_close(d.train, train_images[:5], rtol=0, atol=0)
    torch.testing.assert_close(d.valid, train_images[5:], rtol=0, atol=0)
    torch.testing.assert_close(d.test, torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float().div(255).unsqueeze(1), rtol=0, atol=0)
    assert torch.equal(d.train_labels, train_labels[:5]) and torch.equal(d.valid_labels, train_labels[5:])
    assert torch.equal(d.test_labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    assert d.train_labels.dtype == torch.long


def test_idx_unpacked_files_in_torchvision_layout(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    d = load_dataset("mnist", data_dir=tmp_path, valid_size=0)
    assert d.valid is None and d.train.shape == (7, 1, 28, 28)
    assert torch.equal(d.train_labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())


def test_default_valid_size_is_5000(tmp_path):
    write_mnist(tmp_path, n_train=5003, n_test=1)
    d = load_dataset("mnist", data_dir=tmp_path)
    assert len(d.train) == 3 and len(d.valid) == 5000


def test_truncated_idx_payload(tmp_path):
    write_mnist(tmp_path)
    images = np.zeros((7, 28, 28), np.uint8)
    payload = struct.pack(">4I", 2051, 7, 28, 28) + images.tobytes()[:-100]
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(payload)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*header says \[7, 28, 28\].*download it again"):
        load_dataset("mnist", data_dir=tmp_path)


def test_truncated_gzip_stream(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: cannot read.*download it again.*PYROVAE_DATA"):
        load_dataset("mnist", data_dir=tmp_path)


def test_wrong_idx_magic(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((7, 28, 28)))  # images where labels belong
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: IDX magic number is 2051, expected 2049"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_image_label_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(6))
    with pytest.raises(DataError, match="7 images but .* 6 labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_binarized_mnist_uses_its_own_valid_split(tmp_path):
    arrays = write_binarized(tmp_path / "binarized-mnist")
    d = load_dataset("binarized-mnist", data_dir=tmp_path)
    for split in ("train", "valid", "test"):
        expected = torch.from_numpy(arrays[split]).float().reshape(-1, 1, 28, 28)
        assert torch.equal(getattr(d, split), expected), split
    assert d.train_labels is None and d.test_labels is None
    assert load_dataset("binarized-mnist", data_dir=tmp_path, valid_size=0).valid is None
    with pytest.raises(ValueError, match="valid_size=2 .* own validation split"):
        load_dataset("binarized-mnist", data_dir=tmp_path, valid_size=2)


def test_corrupt_npz(tmp_path):
    (tmp_path / "binarized_mnist.npz").write_bytes(b"PK\x03\x04 not really a zip file" * 10)
    with pytest.raises(DataError, match=r"binarized_mnist\.npz: cannot read as \.npz.*download it again"):
        load_dataset("binarized-mnist", data_dir=tmp_path)


def test_npz_missing_array_or_wrong_shape(tmp_path):
    np.savez(tmp_path / "binarized_mnist.npz", train=np.zeros((2, 784)), test=np.zeros((2, 784)))
    with pytest.raises(DataError, match="no array 'valid'"):
        load_dataset("binarized-mnist", data_dir=tmp_path)
    np.savez(tmp_path / "binarized_mnist.npz", train=np.zeros((2, 28, 28)), valid=np.zeros((2, 784)), test=np.zeros((2, 784)))
    with pytest.raises(DataError, match=r"'train' has shape \(2, 28, 28\), expected \(N, 784\)"):
        load_dataset("binarized-mnist", data_dir=tmp_path)


def test_omniglot_column_major_images_load_upright(tmp_path):
    # Images with no symmetry: pixel (r, c) = (28 r + c) / 783, and an "L" stroke; a transpose would show.
    grid = (np.arange(784, dtype=np.float32) / 783).reshape(28, 28)
    stroke = np.zeros((28, 28), np.float32)
    stroke[2:20, 3] = 1.0
    stroke[19, 3:15] = 1.0
    train, test = np.stack([grid, stroke, 1 - grid]), np.stack([stroke.T, grid])
    (tmp_path / "omniglot").mkdir()
    scipy.io.savemat(tmp_path / "omniglot" / "chardata.mat", {"data": to_iwae_mat(train), "testdata": to_iwae_mat(test)})

    # The stored layout really is Burda's: his reshape recovers the row-major images, the naive one does not.
    stored = scipy.io.loadmat(tmp_path / "omniglot" / "chardata.mat")["data"]
    burda = stored.T.reshape((-1, 28, 28)).reshape((-1, 784), order="F")
    np.testing.assert_array_equal(burda.reshape(-1, 28, 28), train)
    assert not np.array_equal(stored.T.reshape(-1, 28, 28), train)

    d = load_dataset("omniglot", data_dir=tmp_path, valid_size=1)
    assert d.x_shape == (1, 28, 28) and d.train_labels is None
    torch.testing.assert_close(d.train, torch.from_numpy(train[:2]).unsqueeze(1), rtol=0, atol=0)
    torch.testing.assert_close(d.valid, torch.from_numpy(train[2:]).unsqueeze(1), rtol=0, atol=0)
    torch.testing.assert_close(d.test, torch.from_numpy(test).unsqueeze(1), rtol=0, atol=0)


def test_corrupt_mat(tmp_path):
    (tmp_path / "chardata.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 40)
    with pytest.raises(DataError, match=r"chardata\.mat: cannot read as a MATLAB file"):
        load_dataset("omniglot", data_dir=tmp_path)
    scipy.io.savemat(tmp_path / "chardata.mat", {"data": np.zeros((100, 3))})
    with pytest.raises(DataError, match=r"'data' is \(100, 3\), expected shape \(784, N\)"):
        load_dataset("omniglot", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------
# Where files come from


def test_search_order_argument_then_env_then_cache(tmp_path, monkeypatch):
    arg, env, cache = tmp_path / "arg", tmp_path / "env", tmp_path / "xdg" / "pyrovae"
    write_binarized(arg / "binarized-mnist", n_train=1)
    write_binarized(env, n_train=2)  # files directly in the root
    write_binarized(cache / "binarized-mnist", n_train=3)
    monkeypatch.setenv("PYROVAE_DATA", str(env))
    assert resolve("binarized-mnist", arg) == arg / "binarized-mnist"
    assert resolve("binarized-mnist") == env
    assert len(load_dataset("binarized-mnist", data_dir=arg).train) == 1
    assert len(load_dataset("binarized-mnist").train) == 2
    monkeypatch.delenv("PYROVAE_DATA")
    assert len(load_dataset("binarized-mnist").train) == 3
    # An argument folder without the files falls through to the next root.
    (tmp_path / "empty").mkdir()
    assert resolve("binarized-mnist", tmp_path / "empty") == cache / "binarized-mnist"


def test_cache_defaults_to_home_dot_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "pyrovae"


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data_dir='.*nowhere' does not exist.*--data-dir"):
        load_dataset("mnist", data_dir=tmp_path / "nowhere")


def test_not_found_lists_every_folder_and_the_fix(tmp_path, monkeypatch):
    (tmp_path / "arg").mkdir()
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path / "arg")
    msg = str(info.value)
    cache = tmp_path / "xdg" / "pyrovae"
    for folder in [tmp_path / "arg" / "mnist", tmp_path / "arg", tmp_path / "env" / "mnist", tmp_path / "env", cache / "mnist", cache]:
        assert f"  {folder}  (" in msg, folder
    assert "train-images-idx3-ubyte.gz" in msg and "--data-dir" in msg and "PYROVAE_DATA=DIR" in msg
    assert "torchvision.datasets.MNIST" in msg and "no network in tests" in msg


def test_download_is_found_in_torchvision_raw_folder(monkeypatch, tmp_path):
    calls = []

    def fake_download(cls_name, root):
        calls.append((cls_name, root))
        write_mnist(root / cls_name / "raw", n_train=3, n_test=2)

    monkeypatch.setattr(data, "_torchvision_download", fake_download)
    monkeypatch.delenv("PYROVAE_DATA", raising=False)
    d = load_dataset("fashion-mnist", valid_size=0)
    assert calls == [("FashionMNIST", tmp_path / "xdg" / "pyrovae" / "fashion-mnist")]
    assert d.train.shape == (3, 1, 28, 28) and d.test.shape == (2, 1, 28, 28)
    load_dataset("fashion-mnist", valid_size=0)
    assert len(calls) == 1, "the second load should find the cached files"
    with pytest.raises(DataError, match="Download was disabled"):
        load_dataset("mnist", download=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown dataset name='cifar'.*'binarized-mnist'.*'mnist'.*'omniglot'"):
        load_dataset("cifar")
    assert {"mnist", "fashion-mnist", "binarized-mnist", "omniglot"} <= set(DATASETS)
    with pytest.raises(ValueError, match=r"binarize='stochastic' is not one of \('none', 'static', 'dynamic'\)"):
        load_dataset("mnist", binarize="stochastic")
    with pytest.raises(ValueError, match=r"valid_size=-1 must be None .* or an int >= 0"):
        load_dataset("mnist", valid_size=-1)
    with pytest.raises(ValueError, match="valid_size=10 leaves no training data"):
        from_array(torch.rand(10, 3), valid_size=10)
    with pytest.raises(ValueError, match=r"test has examples of shape \(4,\) but train has \(3,\)"):
        from_array(torch.rand(10, 3), test=torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"train_labels has shape \(9,\); expected \(10,\)"):
        from_array(torch.rand(10, 3), train_labels=torch.zeros(9))
    with pytest.raises(TypeError, match="pass a torch.Tensor or numpy array"):
        from_array([[0.1, 0.2]])


# ----------------------------------------------------------------------------------------------------
# Checks


def test_check_data_nan_and_inf():
    x = torch.rand(4, 3)
    x[1, 2] = float("nan")
    x[3, 0] = float("nan")
    x[2, 1] = float("inf")
    with pytest.raises(DataError, match=r"mydata has 2 NaN and 1 inf values out of 12 \(first at index \(1, 2\)\)"):
        check_data(x, unit_interval=False, what="mydata")
    with pytest.raises(DataError, match="array train has 2 NaN"):
        from_array(x.numpy(), unit_interval=False)
    check_data(torch.rand(4, 3), unit_interval=True)  # clean data passes


def test_check_data_range():
    x = torch.tensor([[0.5, -0.5], [2.0, 1.0]])
    with pytest.raises(DataError, match=r"values in \[-0.5, 2\], outside \[0, 1\]; a Bernoulli likelihood.*rescale.*likelihood='gaussian'"):
        check_data(x, unit_interval=True)
    check_data(x, unit_interval=False)
    with pytest.raises(DataError, match=r"array test has values in \[-0.5, 2\]"):
        from_array(torch.rand(5, 2), test=x)
    d = from_array(x, unit_interval=False)
    assert torch.equal(d.train, x)


def test_from_array_numpy_uint8_labels_and_split():
    x = np.arange(10 * 4, dtype=np.uint8).reshape(10, 4) * 6
    d = from_array(x, test=x[:3], train_labels=np.arange(10), test_labels=[7, 8, 9], valid_size=4)
    assert d.x_shape == (4,) and d.train.shape == (6, 4) and d.valid.shape == (4, 4) and d.test.shape == (3, 4)
    torch.testing.assert_close(d.valid, torch.from_numpy(x[6:]).float() / 255, rtol=0, atol=0)
    assert torch.equal(d.train_labels, torch.arange(6)) and torch.equal(d.valid_labels, torch.arange(6, 10))
    assert d.test_labels.tolist() == [7, 8, 9] and d.test_labels.dtype == torch.long
    assert from_array(x).valid is None


# ----------------------------------------------------------------------------------------------------
# Binarization


GREY = torch.linspace(0.05, 0.95, 200).reshape(200, 1)


def test_static_binarization_is_deterministic_binary_and_unbiased():
    x = GREY.expand(200, 500)
    a = from_array(x, test=x[:50], binarize="static", seed=3, valid_size=100)
    b = from_array(x, test=x[:50], binarize="static", seed=3, valid_size=100)
    c = from_array(x, test=x[:50], binarize="static", seed=4, valid_size=100)
    for split in ("train", "valid", "test"):
        assert set(getattr(a, split).unique().tolist()) == {0.0, 1.0}, split
        assert torch.equal(getattr(a, split), getattr(b, split)), split
    assert not torch.equal(a.train, c.train)
    # Train samples do not depend on how much is held out for validation.
    assert torch.equal(from_array(x, binarize="static", seed=3, valid_size=10).train, torch.cat([a.train, a.valid])[:190])
    # Mean of each row is its grey level: 500 Bernoulli draws, standard error <= 0.5 / sqrt(500) = 0.022.
    rows = torch.cat([a.train, a.valid])
    assert (rows.mean(1) - GREY[:, 0]).abs().max() < 4 * 0.5 / 500**0.5


def test_dynamic_binarization_resamples_every_epoch():
    x = GREY.expand(200, 500)
    d = from_array(x, binarize="dynamic")
    assert d.dynamic and torch.equal(d.train, x), "dynamic keeps the grey levels"
    batches = Batches(d.train, batch_size=200, shuffle=False, dynamic_binarize=d.dynamic)
    (e1,), (e2,) = list(batches), list(batches)
    assert set(e1.unique().tolist()) == {0.0, 1.0}
    assert (e1 != e2).float().mean() > 0.3  # independent draws disagree on 2 p (1 - p) ~ 0.33 of the pixels
    # Over 20 epochs each row's mean is its grey level: SE <= 0.5 / sqrt(500 * 20) = 0.005.
    mean = torch.stack([next(iter(batches)) for _ in range(20)]).mean((0, 2))
    assert (mean - GREY[:, 0]).abs().max() < 4 * 0.5 / (500 * 20) ** 0.5


def test_load_dataset_static_binarization(tmp_path):
    write_mnist(tmp_path, n_train=20)
    a = load_dataset("mnist", data_dir=tmp_path, binarize="static", valid_size=5, seed=1)
    b = load_dataset("mnist", data_dir=tmp_path, binarize="static", valid_size=5, seed=1)
    assert a.binarize == "static" and set(a.test.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a.train, b.train) and torch.equal(a.valid, b.valid) and torch.equal(a.test, b.test)


# ----------------------------------------------------------------------------------------------------
# Batches


def test_batches_cover_every_index_once():
    data = torch.arange(103)
    batches = Batches(data, batch_size=10)
    assert len(batches) == 11
    out = list(batches)
    assert [len(b) for b in out] == [10] * 10 + [3]
    assert sorted(torch.cat(out).tolist()) == list(range(103))
    assert not torch.equal(torch.cat(out), data), "shuffled"
    assert torch.equal(torch.cat(list(Batches(data, 10, shuffle=False))), data)
    dropped = Batches(data, batch_size=10, drop_last=True)
    assert len(dropped) == 10 and [len(b) for b in dropped] == [10] * 10
    assert len(set(torch.cat(list(dropped)).tolist())) == 100


def test_batches_resume_mid_epoch_and_global_rng():
    data = torch.randn(57, 3)
    batches = Batches(data, batch_size=8)
    torch.manual_seed(11)
    perm = batches.permutation()
    full = list(batches.epoch(perm))
    resumed = list(batches.epoch(perm.clone(), start=3 * 8))
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a, b)
    # Same global seed, same order: checkpointing torch's RNG state reproduces the epoch.
    torch.manual_seed(11)
    assert torch.equal(torch.cat(list(batches)), torch.cat(full))


def test_batches_generator_and_dynamic_resume():
    data = torch.rand(30, 4)
    g = torch.Generator().manual_seed(5)
    a = list(Batches(data, 7, dynamic_binarize=True, generator=g))
    g.manual_seed(5)
    b = list(Batches(data, 7, dynamic_binarize=True, generator=g))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_batches_bad_arguments():
    data = torch.rand(5, 2)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"batch_size={bad!r} must be an int >= 1"):
            Batches(data, bad)
    with pytest.raises(ValueError, match="drop_last=True and only 5 examples gives no batch"):
        Batches(data, 6, drop_last=True)
    with pytest.raises(ValueError, match=r"perm has shape \(4,\); expected \(5,\)"):
        next(Batches(data, 2).epoch(torch.arange(4)))
    with pytest.raises(ValueError, match=r"start=6 must be an int in \[0, 5\]"):
        next(Batches(data, 2).epoch(start=6))
    with pytest.raises(DataError, match="outside \\[0, 1\\]"):
        Batches(data * 3, 2, dynamic_binarize=True)


# ----------------------------------------------------------------------------------------------------
# Real data


def test_real_mnist_and_binarized_mnist(data_root):
    d = load_dataset("mnist", data_dir=data_root)
    assert (len(d.train), len(d.valid), len(d.test)) == (55000, 5000, 10000)
    assert d.x_shape == (1, 28, 28) and float(d.train.min()) == 0.0 and float(d.train.max()) == 1.0
    assert len(d.train_labels) == 55000 and sorted(d.test_labels.unique().tolist()) == list(range(10))
    # The digits' empirical mean intensity is ~0.13; reading the header as pixels would change it.
    assert abs(float(d.test.mean()) - 0.1325) < 0.005
    b = load_dataset("binarized-mnist", data_dir=data_root)
    assert (len(b.train), len(b.valid), len(b.test)) == (50000, 10000, 10000)
    assert set(b.test.unique().tolist()) == {0.0, 1.0} and b.train_labels is None


@pytest.mark.cuda
def test_cuda_tensors_batches_and_device_independent_static_samples():
    x = torch.rand(50, 4)
    d = from_array(x, test=x[:5], train_labels=torch.arange(50), binarize="static", valid_size=10, device="cuda")
    cpu = from_array(x, test=x[:5], train_labels=torch.arange(50), binarize="static", valid_size=10)
    assert d.train.device.type == "cuda" and d.train_labels.device.type == "cuda" and d.test.device.type == "cuda"
    assert torch.equal(d.train.cpu(), cpu.train) and torch.equal(d.test.cpu(), cpu.test)
    batches = Batches(d.train, 8, dynamic_binarize=True)
    out = torch.cat(list(batches))
    assert out.device.type == "cuda" and out.shape == (40, 4)
    g = torch.Generator(device="cuda").manual_seed(1)
    assert sorted(torch.cat(list(Batches(torch.arange(40, device="cuda"), 8, generator=g))).tolist()) == list(range(40))
    with pytest.raises(ValueError, match="generator is on cpu but data is on cuda"):
        Batches(d.train, 8, generator=torch.Generator())
