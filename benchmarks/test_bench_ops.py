"""Each op (kernel) against its reference at shapes from the real networks.

The MNIST model's first conv activation is 26 x 26 x 64 per image; a detector
pass samples it for a batch of images times R copies. Groups pair the kernel
with its reference so `benchmarks/ratios.py` can report the ratio."""
import pytest
import torch

import mvm_cuda
from mvm_cuda import reference as ref

from conftest import DEVICES, run


def _activation(n, device, nchw=False):
    g = torch.Generator().manual_seed(0)
    if nchw:  # what a conv layer returns, seen as NHWC without a copy
        return torch.relu(torch.randn(n, 64, 26, 26, generator=g)).to(device).permute(0, 2, 3, 1)
    return torch.relu(torch.randn(n, 26, 26, 64, generator=g)).to(device)


def _p(x, c):
    return mvm_cuda.solve_mvm(mvm_cuda.row_alpha(x[:8]).double(), c)


IMPLS = {"kernel": mvm_cuda, "reference": ref}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference", "clone"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw_view"])
def test_sample_rows(benchmark, quick, device, impl, layout):
    n = 40 if quick else 160  # 8 images x R = 5 / 20 copies
    x = _activation(n, device, layout == "nchw_view")
    p = _p(x, 784).to(device)
    benchmark.group = f"sample_rows {device} {layout} ({n}x26x26x64 f32, c=784)"
    benchmark.extra_info["bytes"] = 2 * x.numel() * x.element_size()
    if impl == "clone":  # the bandwidth yardstick: same bytes read and written
        run(benchmark, torch.clone, x)
    else:
        run(benchmark, IMPLS[impl].sample_rows, x, p, 784)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_sap_sample(benchmark, quick, device, impl):
    n = 8 if quick else 32
    h = _activation(n, device, nchw=True).permute(0, 3, 1, 2)
    benchmark.group = f"sap_sample {device} ({n}x64x26x26 f32, frac=0.5)"
    run(benchmark, IMPLS[impl].sap_sample, h, 0.5, rounds=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_project_simplex(benchmark, quick, device, impl):
    rows = 2000 if quick else 20000
    v = torch.randn(rows, 676, generator=torch.Generator().manual_seed(0)).to(device)
    benchmark.group = f"project_simplex {device} ({rows}x676 f32)"
    run(benchmark, IMPLS[impl].project_simplex, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_mvm_step(benchmark, quick, device, impl):
    alpha = mvm_cuda.row_alpha(_activation(256, "cpu")).to(device)
    p = torch.full_like(alpha, 1 / 676)
    benchmark.group = f"mvm_step {device} (256x676 f32, c=784)"
    run(benchmark, IMPLS[impl].mvm_step, p, alpha, 784, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["kkt", "pgd"])
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_solve_mvm(benchmark, quick, device, method, impl):
    b = 4 if quick or impl == "reference" else 64
    alpha = mvm_cuda.row_alpha(_activation(b, "cpu")).double().to(device)
    benchmark.group = f"solve_mvm {method} {device} (per problem; M=676 f64, c=784)"
    benchmark.extra_info["problems"] = b
    run(benchmark, IMPLS[impl].solve_mvm, alpha, 784, method, rounds=3)
