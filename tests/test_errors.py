"""Bad input gets a clear error naming the op, the argument and the bad value."""
import pytest
import torch

import mvm_cuda

F64 = dict(dtype=torch.float64)


def _p(m, rows=1):
    return torch.full((rows, m), 1.0 / m, **F64)


def _cases(dev):
    x = torch.rand(4, 2, 3, 5, device=dev)
    p = _p(6).to(dev)
    a = torch.rand(2, 6, **F64, device=dev)
    bad_p = p.clone()
    bad_p[0, 0] = -0.1
    bad_p[0, 1] += 0.1
    return [
        # sample_rows
        (lambda: mvm_cuda.sample_rows(x[0, 0], p, 3), "mvm::sample_rows: x must have shape \\(N, H, W, C\\) or \\(N, M, C\\), got \\(3, 5\\)"),
        (lambda: mvm_cuda.sample_rows(x, _p(7).to(dev), 3), "p must have shape \\(P, M\\) with M = H\\*W = 6, got \\(1, 7\\)"),
        (lambda: mvm_cuda.sample_rows(x, _p(6, 3).to(dev), 3), "batch N = 4 must be a multiple of p's rows P = 3"),
        (lambda: mvm_cuda.sample_rows(x.int(), p, 3), "x must be float32, float64, float16 or bfloat16, got Int"),
        (lambda: mvm_cuda.sample_rows(x, p.half(), 3), "p must be float32 or float64, got Half"),
        (lambda: mvm_cuda.sample_rows(x, p, 0), "c \\(the number of draws\\) must be >= 1, got 0"),
        (lambda: mvm_cuda.sample_rows(x, p, -5), "must be >= 1, got -5"),
        (lambda: mvm_cuda.sample_rows(x, bad_p, 3), "p must be non-negative, got -0.1"),
        (lambda: mvm_cuda.sample_rows(x, p * 2, 3), "every row of p must sum to 1 \\(within 0.0001\\), row 0 sums to 2"),
        (lambda: mvm_cuda.sample_rows(x, torch.full_like(p, float("nan")), 3), "p must be finite, got a NaN or inf"),
        (lambda: mvm_cuda.sample_rows(x, torch.zeros_like(p), 3), "row 0 sums to 0"),
        # project_simplex
        (lambda: mvm_cuda.project_simplex(a, 0.0), "mvm::project_simplex: z must be finite and > 0, got 0"),
        (lambda: mvm_cuda.project_simplex(a, float("inf")), "z must be finite and > 0, got inf"),
        (lambda: mvm_cuda.project_simplex(a.half(), 1.0), "v must be float32 or float64, got Half"),
        (lambda: mvm_cuda.project_simplex(torch.tensor(1.0, device=dev), 1.0), "v must have at least 1 dimension"),
        (lambda: mvm_cuda.project_simplex(torch.tensor([[1.0, float("nan")]], device=dev)), "v must be finite, got a NaN or inf"),
        # mvm_step
        (lambda: mvm_cuda.mvm_step(a, a[:, :5], 3, 0.1), "mvm::mvm_step: alpha must have p's shape \\(2, 6\\), got \\(2, 5\\)"),
        (lambda: mvm_cuda.mvm_step(a, a, 0, 0.1), "c \\(the number of draws\\) must be >= 1, got 0"),
        (lambda: mvm_cuda.mvm_step(a, a.float(), 3, 0.1), "p and alpha must have the same dtype"),
        (lambda: mvm_cuda.mvm_step(a, -a, 3, 0.1), "alpha must be non-negative, got -"),
        (lambda: mvm_cuda.mvm_step(a, a, 3, -1.0), "lr must be finite and >= 0, got -1"),
        # solve_mvm
        (lambda: mvm_cuda.solve_mvm(a, 3, "newton"), "mvm::solve_mvm: method must be \"kkt\" or \"pgd\", got \"newton\""),
        (lambda: mvm_cuda.solve_mvm(a, 0), "c \\(the number of draws\\) must be >= 1, got 0"),
        (lambda: mvm_cuda.solve_mvm(-a, 3), "alpha must be non-negative, got -"),
        (lambda: mvm_cuda.solve_mvm(a * float("inf"), 3), "alpha must be finite, got a NaN or inf"),
        (lambda: mvm_cuda.solve_mvm(a, 3, "pgd", 0), "max_iter must be >= 1, got 0"),
        (lambda: mvm_cuda.solve_mvm(a, 3, "pgd", 10, -1.0), "tol must be finite and >= 0, got -1"),
        (lambda: mvm_cuda.solve_mvm(a.int(), 3), "alpha must be float32 or float64, got Int"),
        # sap
        (lambda: mvm_cuda.sap_sample(x, 0.0), "frac must be > 0, got 0"),
    ]


CASES = _cases("cpu")


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bad_input_raises_clear_error(device, value_checks, case):
    fn, message = _cases(device)[case]
    with pytest.raises((RuntimeError, ValueError), match=message):
        fn()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices():
    x = torch.rand(2, 3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="x and p must be on the same device, got cuda:0 and cpu"):
        mvm_cuda.sample_rows(x, _p(3), 2)
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="same device, got cuda:0 and cuda:1"):
            mvm_cuda.sample_rows(x, _p(3).cuda(1), 2)

