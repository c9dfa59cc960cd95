"""Tests for mvm_cuda.eval.exact: the softmax and cross-entropy gradient whose bits do not
depend on the CPU agree with PyTorch's to float64 rounding."""
import pytest
import torch
import torch.nn.functional as F

from mvm_cuda.eval import exact


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g, dtype=torch.float64) * 20
    x[0] = 0.0  # a uniform row
    x[1, 3] = 800.0  # the others underflow
    x[2] = torch.arange(10, dtype=torch.float64) * -100  # exp(z) down to exp(-900), clamped
    return x


def test_softmax_matches_torch(logits):
    got = exact.softmax(logits)
    assert got.dtype == torch.float64 and got.shape == logits.shape
    torch.testing.assert_close(got, torch.softmax(logits, dim=1), rtol=1e-14, atol=1e-300)
    single = logits.float()  # computed in float64 all the same
    torch.testing.assert_close(exact.softmax(single), torch.softmax(single.double(), dim=1), rtol=1e-14, atol=1e-300)


def test_exp_is_accurate_over_its_range():
    z = -torch.linspace(0, 700, 100001, dtype=torch.float64)
    torch.testing.assert_close(exact._exp_nonpositive(z), torch.exp(z), rtol=4e-16, atol=0)


def test_cross_entropy_grad_is_the_autograd_gradient(logits):
    y = torch.randint(0, 10, (logits.shape[0],), generator=torch.Generator().manual_seed(1))
    x = logits.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.cross_entropy(x, y, reduction="sum"), x)
    torch.testing.assert_close(exact.cross_entropy_grad(logits, y), want, rtol=0, atol=1e-15)


def test_softmax_gradient_matches_torch(logits):
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = []
    for fn in (exact.softmax, lambda t: torch.softmax(t, dim=1)):
        x = logits.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(fn(x), x, w)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)
