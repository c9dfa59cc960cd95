"""No op leaks: after a warm-up, CALLS calls of each op (small shapes, so the
file is fast) grow the process's resident memory (VmRSS from
/proc/self/status) by at most RSS_SLACK_MIB; on CUDA (skipped without a GPU)
torch.cuda.memory_allocated returns exactly to where it started.

RSS_SLACK_MIB = 8: the allocator's and glibc's arenas settle during the
warm-up; a leak of even 1 KiB per call would be ~10 MiB over 10,000 calls and
fail. solve_mvm runs on tiny problems (M = 16, two rows) so 10,000 calls of
pgd take a few seconds."""
from __future__ import annotations

import gc
import pathlib

import pytest
import torch

import mvm_cuda

CALLS = 10_000
WARMUP = 1_000
RSS_SLACK_MIB = 8
F64 = torch.float64


def _rss_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no VmRSS in /proc/self/status")


def _ops(device):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 4, 4, 8, generator=g) + 0.5).to(device)
    p = torch.rand(2, 16, generator=g, dtype=F64) + 0.01
    p = (p / p.sum(-1, keepdim=True)).to(device)
    alpha = (10.0 ** (-4 * torch.rand(2, 16, generator=g, dtype=F64))).to(device)
    v = torch.randn(2, 16, generator=g, dtype=F64).to(device)
    x_view = x.half().permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # NHWC view of NCHW
    gen = torch.Generator(device=device).manual_seed(1)
    nan_alpha = alpha.clone()
    nan_alpha[0, 0] = float("nan")

    def error_path():  # the checks' error path must not leak either (CPU checks always run)
        try:
            mvm_cuda.solve_mvm(nan_alpha, 8, "kkt")
        except RuntimeError:
            pass

    ops = {
        "sample_rows": lambda: mvm_cuda.sample_rows(x, p, 8),
        "sample_rows_generator": lambda: mvm_cuda.sample_rows(x, p, 8, generator=gen),
        "sample_rows_half_nchw_view": lambda: mvm_cuda.sample_rows(x_view, p, 8),
        "project_simplex": lambda: mvm_cuda.project_simplex(v),
        "mvm_step": lambda: mvm_cuda.mvm_step(p, alpha, 8, 1e-3),
        "solve_mvm_kkt": lambda: mvm_cuda.solve_mvm(alpha, 8, "kkt"),
        "solve_mvm_pgd": lambda: mvm_cuda.solve_mvm(alpha, 8, "pgd", 50),
        "sap_sample": lambda: mvm_cuda.sap_sample(x, 0.5),
        "sample_rows_exact_set": lambda: mvm_cuda.sample_rows(x, p, 2**62),  # c > 64 M: the exact set path
        "sap_sample_exact_set": lambda: mvm_cuda.sap_sample(x, 2.0**40),
    }
    if device == "cpu":
        ops["error_path"] = error_path
    return ops


OP_NAMES = list(_ops("cpu"))


@pytest.mark.parametrize("name", OP_NAMES)
def test_rss_does_not_grow(name):
    fn = _ops("cpu")[name]
    for _ in range(WARMUP):
        fn()
    gc.collect()
    start = _rss_mib()
    for _ in range(CALLS):
        fn()
    gc.collect()
    grown = _rss_mib() - start
    assert grown <= RSS_SLACK_MIB, f"{name}: RSS grew by {grown:.1f} MiB over {CALLS} calls"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", [n for n in OP_NAMES if n != "error_path"])
def test_cuda_memory_allocated_returns_to_start(name):
    fn = _ops("cuda")[name]
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for _ in range(CALLS):
        fn()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start
