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


@pytest.mark.parametrize("random", ["generator", "keys"])
@pytest.mark.parametrize("frac", [0.3, 65.0, 80.0], ids=["draws", "exact", "exact80"])
@pytest.mark.parametrize("shape", [(5, 6, 4, 7), (3, 64, 12, 12)], ids=["one_slice", "slices"])
def test_sap_channels_last_is_its_nhwc_equivalent(shape, frac, random):
    # A channels_last h is read in place, in memory order, by every path: one
    # slice, several slices (K = 9216 > 4096), and the exact set path (r > 64 K,
    # whose weights must be built in memory order too), for sap_sample and
    # sap_scale alike.
    import test_sap_sample as t
    t.check_channels_last_is_its_nhwc_equivalent("cuda", shape, frac, random)


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


def test_sap_sample_raising_call_leaves_the_generator_alone():
    # The size check comes before the Philox offsets are reserved.
    h = torch.empty(1, 2**27, dtype=torch.float16, device="cuda")
    g = torch.Generator("cuda").manual_seed(3)
    before = g.get_state()
    with pytest.raises(RuntimeError, match=r"too many entries per sample"):
        torch.ops.mvm.sap_sample(h, 10, generator=g)
    assert torch.equal(g.get_state(), before)


def test_shared_memory_sizes_from_concurrent_threads():
    # Calls needing different dynamic shared memory (M = 12,000 and 7,000 rows:
    # about 99 and 58 KB) from several threads at once: the kernel's limit is
    # set once, to the maximum, so no launch finds it lowered by another.
    import threading

    errors = []

    def work(m, seed):
        try:
            x = torch.ones(2, m, 1, device="cuda")
            p = torch.full((1, m), 1.0 / m, dtype=torch.float64, device="cuda")
            g = torch.Generator("cuda").manual_seed(seed)
            for _ in range(20):
                kept = (mvm_cuda.sample_rows(x, p, 50, generator=g) != 0).sum((1, 2))
                assert ((kept >= 1) & (kept <= 50)).all()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(m, i)) for i, m in enumerate([12_000, 7_000] * 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_rows_per_sample_bound():
    # Keep bitmasks index 32-bit words, one of which is a sentinel: M past
    # 2^37 - 32 raises before anything is allocated or drawn.
    m = 2**37 - 31
    x = torch.ones(1, 1, 1, device="cuda").expand(1, m, 1)
    p = torch.zeros(1, 1, device="cuda").expand(1, m)
    previous = mvm_cuda.set_value_checks(False)
    try:
        g = torch.Generator("cuda").manual_seed(0)
        before = g.get_state()
        with pytest.raises(RuntimeError, match=r"mvm::sample_rows: at most 2\^37 - 32 = 137438953440 rows per "
                                               r"sample on CUDA, got M = 137438953441"):
            torch.ops.mvm.sample_rows(x, p, 3, generator=g)
        assert torch.equal(g.get_state(), before)
    finally:
        mvm_cuda.set_value_checks(previous)


def test_cuda_kernels_reject_cpu_tensors():
    # A CUDA generator joins the dispatch key: with CPU tensors the CUDA
    # kernel runs, and must say so rather than read host memory.
    g = torch.Generator("cuda").manual_seed(0)
    with pytest.raises(RuntimeError, match=r"mvm::sample_rows: x must be a CUDA tensor for the CUDA kernel"):
        torch.ops.mvm.sample_rows(torch.ones(2, 3, 1), torch.full((1, 3), 1 / 3), 2, generator=g)
    with pytest.raises(RuntimeError, match=r"mvm::sap_sample: h must be a CUDA tensor for the CUDA kernel"):
        torch.ops.mvm.sap_sample(torch.ones(2, 3), 2, generator=g)
    # The row ops take no generator: reach their CUDA kernels directly.
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    v = torch.rand(2, 5, dtype=torch.float64)
    calls = {
        "project_simplex: v": lambda: torch.ops.mvm.project_simplex.default.redispatch(cuda, v, 1.0),
        "mvm_step: p": lambda: torch.ops.mvm.mvm_step.default.redispatch(cuda, v, v, 3, 0.1),
        "solve_mvm: alpha": lambda: torch.ops.mvm.solve_mvm.default.redispatch(cuda, v, 3, "kkt", 10, 1e-6),
    }
    for what, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"mvm::{what} must be a CUDA tensor for the CUDA kernel"):
            call()


@pytest.mark.parametrize("fault", ["nan", "overflow"])
def test_sap_value_messages_match_the_cpu(fault):
    h = torch.rand(3, 40, dtype=torch.float64)
    if fault == "nan":
        h[1, 7] = float("nan")
    else:
        h[2] = 1e308
    messages = []
    previous = mvm_cuda.set_value_checks(True)
    try:
        for dev in ("cpu", "cuda"):
            with pytest.raises(RuntimeError) as info:
                torch.ops.mvm.sap_sample(h.to(dev), 10)
            messages.append(str(info.value).splitlines()[0])
    finally:
        mvm_cuda.set_value_checks(previous)
    assert messages[0] == messages[1]
    assert messages[0] == ("mvm::sap_sample: h must be finite, got a NaN or inf in sample 1" if fault == "nan"
                           else "mvm::sap_sample: sum |h| of sample 2 overflows float64")


def test_vectorised_and_split_paths_agree():
    # Rows of one channel are vectorised when aligned (C = 1 no longer blocks
    # it); a sample alone is split over many blocks. Both must give what the
    # scalar, unsplit walk gives, draw for draw.
    n, m = 4, 4096
    x = torch.rand(n, m, 1, device="cuda") + 0.5
    p = torch.rand(1, m, dtype=torch.float64, device="cuda")
    p /= p.sum()
    gen = lambda: torch.Generator("cuda").manual_seed(2)  # noqa: E731
    storage = torch.empty(n * m + 1, device="cuda")
    shifted = storage[1:].view(n, m, 1)
    shifted.copy_(x)
    assert torch.equal(mvm_cuda.sample_rows(x, p, 300, generator=gen()),
                       mvm_cuda.sample_rows(shifted, p, 300, generator=gen()))
    wide = torch.rand(1, 32, 32, 256, device="cuda") + 0.5
    pw = torch.rand(1, 1024, dtype=torch.float64, device="cuda")
    pw /= pw.sum()
    alone = mvm_cuda.sample_rows(wide, pw, 40, generator=gen())
    batch = mvm_cuda.sample_rows(wide.expand(600, 32, 32, 256), pw, 40, generator=gen())
    assert torch.equal(alone[0], batch[0])


# Per-sample keys on the GPU: each sampler as f(x, p, keys).
def _tiny_rows(p, c):
    """p with 10 rows at c p = 0.3: on the exact path the drawn sets then vary."""
    q = p.clone()
    q[:, :10] = 0.3 / c
    q[:, 10:] *= (1 - q[:, :10].sum()) / q[:, 10:].sum()
    return q


def _big_m(x, c, keys):
    # M = 784 * 51 rows: past shared memory, the CDF in global memory.
    rows = x.reshape(x.shape[0], -1, 1).repeat(1, 51, 1)
    p = torch.full((1, rows.shape[1]), 1 / rows.shape[1], dtype=torch.float64, device="cuda")
    return mvm_cuda.sample_rows(rows, p, c, keys=keys)


KEYED = {
    "sample_rows": lambda x, p, keys: mvm_cuda.sample_rows(x, p, 20, keys=keys),
    "sample_rows_exact": lambda x, p, keys: mvm_cuda.sample_rows(x, _tiny_rows(p, 3137), 3137, keys=keys),
    "sample_rows_big_m": lambda x, p, keys: _big_m(x, 40, keys),
    "sap_sample": lambda x, p, keys: mvm_cuda.sap_sample(x, 0.02, keys=keys),
    "sap_sample_slices": lambda x, p, keys: mvm_cuda.sap_sample(x.repeat(1, 1, 1, 8), 0.05, keys=keys),
    "sap_sample_exact": lambda x, p, keys: mvm_cuda.sap_sample(x, 65.0, keys=keys),
    "keyed_uniform": lambda x, p, keys: mvm_cuda.keyed_uniform(keys, 1000),
}


@pytest.mark.parametrize("sampler", KEYED)
def test_keys_permutation_determinism_and_generator(sampler):
    # With keys: sample n's output follows it through a permutation and into a
    # batch of one (split over many blocks), repeats exactly, and neither the
    # default generator nor the graph-safe offset moves.
    x, p = _inputs()
    x = x * torch.linspace(1e-3, 1, x.shape[-1], device="cuda")  # small entries: SAP's exact sets vary
    sample = KEYED[sampler]
    keys = torch.arange(x.shape[0], device="cuda") * 1_000_003 - 2**40
    before = torch.cuda.get_rng_state()
    full = sample(x, p, keys)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0)).cuda()  # not from the CUDA generator
    assert torch.equal(sample(x[perm], p, keys[perm]), full[perm])
    assert torch.equal(sample(x[5:6], p, keys[5:6]), full[5:6])
    assert torch.equal(sample(x, p, keys), full)
    assert not torch.equal(sample(x, p, keys + 1), full)
    torch.cuda.synchronize()
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_keys_no_host_sync_and_graph_replays_the_same():
    x, p = _inputs()
    keys = torch.arange(x.shape[0], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for sample in KEYED.values():
            sample(x, p, keys)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        expected = KEYED["sample_rows"](x, p, keys)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = KEYED["sample_rows"](x, p, keys)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)  # keyed: every replay draws what eager mode draws


def test_keyed_uniform_is_the_cpu_s():
    keys = torch.tensor([0, 1, -1, 2**63 - 1, -2**63, 12345678901234])
    for dtype in (torch.float32, torch.float64):
        for k in (1, 7, 4096 + 3):
            assert torch.equal(mvm_cuda.keyed_uniform(keys.cuda(), k, dtype).cpu(),
                               mvm_cuda.keyed_uniform(keys, k, dtype))


def test_keys_on_another_device_raise():
    x, p = _inputs()
    with pytest.raises(RuntimeError, match=r"mvm::sample_rows: x and keys must be on the same device, got cuda:0 "
                                           r"and cpu"):
        torch.ops.mvm.sample_rows(x, p, 3, keys=torch.arange(x.shape[0]))
    with pytest.raises(RuntimeError, match=r"mvm::sap_sample: h and keys must be on the same device, got cpu and "
                                           r"cuda:0"):
        torch.ops.mvm.sap_sample(torch.rand(2, 5), 3, keys=torch.arange(2, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_keyed_dropout_is_the_cpu_s(dtype, layout):
    # The same Philox blocks and integer keep rule on both devices: equal bit for bit,
    # with the fused ReLU and stacked copies, in both layouts and every dtype.
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(3, 5, 6, 7, generator=torch.Generator().manual_seed(2)).to(dtype).contiguous(memory_format=fmt)
    keys = torch.tensor([0, 1, -1, 2**63 - 1, -2**63, 12345678901234])
    for p_drop in (0.0, 0.3, 0.5):
        got = mvm_cuda.keyed_dropout(x.cuda(), keys.cuda(), p_drop, relu=True, copies=2)
        assert got.is_contiguous(memory_format=fmt)
        assert torch.equal(got.cpu(), mvm_cuda.keyed_dropout(x, keys, p_drop, relu=True, copies=2))


def test_fused_samplers_have_no_host_sync():
    pre = torch.randn(4, 16, 7, 7, device="cuda").contiguous(memory_format=torch.channels_last)
    keys = torch.arange(12, device="cuda")
    p = torch.full((4, 49), 1 / 49, dtype=torch.float64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mvm_cuda.sample_rows(pre.permute(0, 2, 3, 1), p, 20, keys=keys, relu=True, copies=3)
        mvm_cuda.sap_sample(pre, 0.3, keys=keys, relu=True, copies=3)
        mvm_cuda.keyed_dropout(pre, keys, 0.5, relu=True, copies=3)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sap_value_checks_take_the_relu(value_checks):
    # With relu the weights are max(h, 0): a -inf entry is a 0 weight, as on the CPU;
    # without relu it is a non-finite h and raises.
    h = torch.rand(2, 3, 4, 5, device="cuda")
    h[0, 0, 0, 0] = -float("inf")
    out = mvm_cuda.sap_sample(h, 0.5, relu=True)
    assert out[0, 0, 0, 0] == 0 and torch.isfinite(out).all()
    assert torch.equal(mvm_cuda.sap_sample(h.cpu(), 0.5, relu=True)[0, 0, 0, 0], torch.tensor(0.0))
    with pytest.raises(RuntimeError, match="mvm::sap_sample: h must be finite, got a NaN or inf in sample 0"):
        mvm_cuda.sap_sample(h, 0.5)
