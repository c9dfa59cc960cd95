"""Benchmarks: each op against its pure-PyTorch reference in the same run, and
the detector end to end with either. Run from the repo root:
    make bench   (or: .venv/bin/pytest benchmarks --benchmark-json=out/bench.json)
then `python benchmarks/ratios.py out/bench.json` for the markdown tables.
Devices: the CPU always, CUDA when present. --quick shrinks the batches."""
import functools

import pytest
import torch
from torch import nn

from mvm_cuda import keep_freed_memory
from mvm_cuda.eval.models import INPUT_SHAPES, build_model


# Freed memory stays in the process: otherwise a timed op whose output was just
# freed by the last round may get fresh pages from the OS and pay a page fault
# per 4 KiB, which swamps the op's own time. The same for every implementation,
# so the ratios stay fair.
keep_freed_memory()


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small batches, few rounds")


def pytest_benchmark_update_machine_info(config, machine_info):
    # pytest-benchmark records the CPU only; ratios.py prints the GPU too.
    machine_info["torch"] = torch.__version__
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The paper's c is absolute and the same for every unit: 0.5, 1 and 2 times the
# input's pixel count.
PIXELS = {name: shape[1] * shape[2] for name, shape in INPUT_SHAPES.items()}
C_REL = (0.5, 1, 2)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(benchmark, fn, *args, rounds=5, warmup=True, **kwargs):
    """Time fn(*args, **kwargs), synchronising CUDA around every call. warmup
    (one untimed call first) matters for CUDA and first allocations; the slow
    Python-loop references skip it, since their time is not warm-up bound."""
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)

    def call():
        out = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        return out

    if warmup:
        call()
    return benchmark.pedantic(call, rounds=rounds, iterations=1)


@functools.lru_cache(maxsize=None)
def relu_outputs(name, images):
    """The NCHW activations after every ReLU of the conv part of
    build_model(name, seed=0) (random weights) on `images` random images, on
    the CPU. Real shapes with a network's spatial structure, which is what the
    solvers' iteration counts depend on."""
    model = build_model(name, seed=0).eval()
    h = torch.rand(images, *INPUT_SHAPES[name], generator=torch.Generator().manual_seed(0))
    outs = []
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Flatten):
                break
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                outs.append(h)
    return outs
