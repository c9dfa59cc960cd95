"""Shared test fixtures: the device parametrization (CUDA cases skip cleanly
without a GPU) and a guard that the tests run against a built package."""
import os
import pathlib

import pytest
import torch

import mvm_cuda

# The tests must exercise the installed build (with its compiled _C), not a
# source folder that lacks it; mvm_cuda's import raises otherwise. Say which
# one was imported, for the log.
print(f"mvm_cuda from {pathlib.Path(mvm_cuda.__file__).parent}, torch {torch.__version__}")

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "mvm_cuda" / "inductor"))

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
]
FLOAT_DTYPES = [torch.float32, torch.float64]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def value_checks():
    """Turn on the value checks that CUDA kernels skip by default (they cost a
    device-to-host sync); CPU kernels always run them."""
    previous = mvm_cuda.set_value_checks(True)
    yield
    mvm_cuda.set_value_checks(previous)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: as fast, and immune to
    OpenMP's collapse when the two cores are shared with other work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def installed_package_env():
    """The environment for a subprocess that must import the mvm_cuda under
    test (run it outside the repository root, whose source folder has no _C)."""
    parent = str(pathlib.Path(mvm_cuda.__file__).parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([parent, os.environ.get("PYTHONPATH", "")])}
