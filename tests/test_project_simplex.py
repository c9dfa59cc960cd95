import pytest
import torch

import mvm_cuda
from mvm_cuda import reference as ref

from conftest import FLOAT_DTYPES


def _check_exact(out, v, z=1.0):
    """out equals the float64 oracle up to the rounding of out's dtype."""
    oracle = ref.project_simplex(v.double(), z)
    scale = max(1.0, v.double().abs().max().item(), z)
    tol = (torch.finfo(out.dtype).eps if out.dtype == torch.float32 else 1e-13) * scale
    assert (out.double() - oracle).abs().max().item() <= tol
    assert (out >= 0).all()
    sums = out.double().sum(-1)
    assert torch.allclose(sums, torch.full_like(sums, z), rtol=0, atol=out.shape[-1] * tol + 1e-12)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 100_000])
def test_matches_oracle_single_rows(device, dtype, n):
    g = torch.Generator().manual_seed(n)
    v = (torch.randn(3, n, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    _check_exact(mvm_cuda.project_simplex(v).cpu(), v.cpu())


def test_one_million_entries(device):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, 1_000_000, generator=g, dtype=torch.float64)
    _check_exact(mvm_cuda.project_simplex(v.to(device)).cpu(), v)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_batch_of_short_vectors(device, dtype):
    g = torch.Generator().manual_seed(2)
    v = torch.randn(100_000, 8, generator=g, dtype=torch.float64).to(dtype)
    _check_exact(mvm_cuda.project_simplex(v.to(device), 2.5).cpu(), v, 2.5)


def test_any_leading_shape_and_noncontiguous(device):
    v = torch.randn(4, 6, 3, dtype=torch.float64, device=device).transpose(0, 2)  # (3, 6, 4)
    out = mvm_cuda.project_simplex(v)
    assert out.shape == v.shape and out.is_contiguous()
    _check_exact(out.cpu(), v.cpu())


def test_points_on_the_simplex_are_fixed(device):
    p = torch.rand(5, 30, dtype=torch.float64, device=device)
    p = p / p.sum(-1, keepdim=True)
    assert torch.allclose(mvm_cuda.project_simplex(p), p, atol=1e-15)


def test_ties_and_huge_values(device):
    v = torch.tensor([[1e6, 1e6, -1e6], [5.0, 5.0, 5.0]], dtype=torch.float64, device=device)
    out = mvm_cuda.project_simplex(v).cpu()
    assert torch.allclose(out[1], torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(out[0], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))


def test_empty_batch(device):
    out = mvm_cuda.project_simplex(torch.empty(0, 5, device=device))
    assert out.shape == (0, 5)
