import pytest
import torch

import mvm_cuda
from mvm_cuda import reference as ref

from conftest import FLOAT_DTYPES


def _problem(b, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    alpha = torch.rand(b, m, generator=g, dtype=torch.float64) ** 2
    alpha[:, : m // 4] = 0  # terms with alpha = 0 must contribute 0, not NaN
    p = torch.rand(b, m, generator=g, dtype=torch.float64) + 0.1
    return (p / p.sum(-1, keepdim=True)).to(dtype), alpha.to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("c", [1, 7, 500])
def test_matches_reference(device, dtype, c):
    p, alpha = _problem(6, 40, dtype)
    lr = 1e-4
    out = mvm_cuda.mvm_step(p.to(device), alpha.to(device), c, lr).cpu()
    expected = ref.mvm_step(p.double(), alpha.double(), c, lr)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(out.double(), expected, rtol=0, atol=tol)
    assert torch.isfinite(out).all()


def test_zero_step_is_projection(device):
    p, alpha = _problem(3, 10, torch.float64)
    out = mvm_cuda.mvm_step(p.to(device), alpha.to(device), 5, 0.0).cpu()
    assert torch.allclose(out, p, atol=1e-15)


def test_zero_p_with_positive_alpha_stays_finite(device):
    # The exact gradient at p = 0 is infinite; the step takes it at p = 1e-12.
    p = torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64, device=device)
    alpha = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64, device=device)
    out = mvm_cuda.mvm_step(p, alpha, 3, 1e-6).cpu()
    assert torch.isfinite(out).all() and abs(out.sum().item() - 1) < 1e-12
    assert torch.allclose(out, ref.mvm_step(p.cpu(), alpha.cpu(), 3, 1e-6), atol=1e-12)


def test_all_zero_alpha_does_not_move(device):
    p, _ = _problem(2, 9, torch.float64)
    out = mvm_cuda.mvm_step(p.to(device), torch.zeros_like(p, device=device), 4, 1.0).cpu()
    assert torch.allclose(out, p, atol=1e-15)
