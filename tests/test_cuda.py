"""GPU-only behaviour: streams, CUDA graphs, no hidden host syncs. Skipped
without a CUDA device (the device-parametrized tests cover the rest)."""
import pytest
import torch

import mvm_cuda

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _inputs(n=32, m=49, ch=16):
    x = torch.rand(n, 7, 7, ch, device="cuda") + 0.1
    p = torch.rand(1, m, dtype=torch.float64, device="cuda")
    return x, p / p.sum()


# The two samplers, each as f(x, p): draws from the torch CUDA generator.
SAMPLERS = {
    "sample_rows": lambda x, p: mvm_cuda.sample_rows(x, p, 20),
    "sap_sample": lambda x, p: mvm_cuda.sap_sample(x, 0.02),  # r = 16 of 784 entries
}


def test_default_path_has_no_host_sync():
    x, p = _inputs()
    alpha = mvm_cuda.row_alpha(x).double()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for sample in SAMPLERS.values():
            sample(x, p)
        mvm_cuda.solve_mvm(alpha, 20, "kkt")
        mvm_cuda.solve_mvm(alpha, 20, "pgd")
        mvm_cuda.project_simplex(alpha)
        mvm_cuda.mvm_step(mvm_cuda.project_simplex(alpha), alpha, 20, 1e-3)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_non_default_stream_gives_the_same_draws(sampler):
    x, p = _inputs()
    sample = SAMPLERS[sampler]
    torch.manual_seed(0)
    expected = sample(x, p)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    torch.manual_seed(0)
    with torch.cuda.stream(stream):
        out = sample(x, p)
    stream.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_graph_replay_draws_afresh(sampler):
    x, p = _inputs()
    sample = SAMPLERS[sampler]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        sample(x, p)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample(x, p)
    graph.replay()
    first = out.clone()
    graph.replay()
    second = out.clone()
    assert not torch.equal(first, second)
    for result in (first, second):
        # rows (sample_rows) or entries (SAP) kept: 1 to the number of draws
        kept = (result != 0).any(-1) if sampler == "sample_rows" else result != 0
        kept = kept.reshape(x.shape[0], -1).sum(1)
        assert (kept <= 20).all() and (kept >= 1).all()


def test_sap_sample_too_large_a_sample_raises():
    # The CUDA kernel keeps a sample's slice sums in shared memory: 2^27 entries
    # (32,768 slices) exceed any GPU's per-block limit, and the error says so
    # before anything is launched.
    h = torch.empty(1, 2**27, dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match=r"mvm::sap_sample: h has too many entries per sample for the CUDA "
                                           r"kernel \(K = 134217728, at most about \d+\)"):
        torch.ops.mvm.sap_sample(h, 10)


@pytest.mark.parametrize("sampler", ["own", "shared", "sap"])
def test_exact_set_path_law(sampler):
    # c large against M: the CUDA exact set path (csrc/cuda/exact_draws.cu)
    # follows the closed forms and agrees with the one-by-one path, as on the CPU.
    import test_exact_draws as t
    t.test_inclusion_and_pairs_match_closed_forms("cuda", sampler, 2**62)
    t.test_inclusion_and_pairs_match_closed_forms("cuda", sampler, 1000)
    t.test_exact_path_agrees_in_law_with_one_by_one_path("cuda", sampler)


def test_exact_set_path_has_no_host_sync_and_ends():
    x = torch.rand(8, 16, 16, 4, device="cuda")
    p = torch.full((2, 256), 1 / 256, dtype=torch.float64, device="cuda")
    h = torch.rand(3, 256, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mvm_cuda.sample_rows(x, p, 2**62)
        scaled = mvm_cuda.sap_sample(h, 2.0**54)  # r = 2^62
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, x) and torch.equal(scaled, h)
