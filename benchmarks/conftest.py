"""Benchmarks: each op against its pure-PyTorch reference in the same run.
Run from the repo root:  make bench  (or: .venv/bin/pytest benchmarks).
Devices: the CPU always, CUDA when present. --quick shrinks the shapes."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small shapes, few rounds")


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(benchmark, fn, *args, rounds=5, **kwargs):
    """Time fn(*args, **kwargs), synchronising CUDA around every call."""
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)

    def call():
        out = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        return out

    call()  # warm-up (and first-call allocations)
    return benchmark.pedantic(call, rounds=rounds, iterations=1)
