"""sap_sample and sap_scale (stochastic activation pruning): the fused op on CPU and
CUDA, the library's composition through sample_rows for other devices, and their
agreement with mvm_cuda.reference."""
import io
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

import mvm_cuda
from mvm_cuda import ops
from mvm_cuda import reference as ref

from conftest import HAS_CUDA, installed_package_env


def test_independent_of_thread_count():
    x = torch.rand(64, 26, 26, 8)
    threads = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            results.append(mvm_cuda.sap_sample(x, 0.3, generator=torch.Generator().manual_seed(0)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("shape,frac,r", [((2, 60), 0.5, 30), ((3, 4, 5), 0.01, 1), ((1, 7), 0.5, 4),
                                          ((0, 3, 3), 2.0, 18)])
def test_sap_draws_matches_reference(shape, frac, r):
    h = torch.zeros(shape)
    assert ops.sap_draws(h, frac) == ref.sap_draws(h, frac) == r


def test_row_alpha_matches_reference():
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    for t in (x, x.half(), x.double(), x.permute(0, 2, 1, 3)):
        torch.testing.assert_close(ops.row_alpha(t), ref.row_alpha(t), rtol=0, atol=0)


def test_by_rows_composition_is_sap():
    # The path for devices without the fused op, run here on the CPU's sample_rows:
    # the sample is h times the scale under one seed, and each entry is kept with
    # probability pi_j (an exact binomial test per entry, Bonferroni over entries).
    n, k, r = 4000, 60, 12
    h = _sap_h(n, k, seed=3, dtype=torch.float32)
    out = ops._sap_by_rows(h, r, torch.Generator().manual_seed(1), scale_only=False)
    scale = ops._sap_by_rows(h, r, torch.Generator().manual_seed(1), scale_only=True)
    assert torch.equal(out, h * scale)
    p = h[0].double().abs() / h[0].double().abs().sum()
    pi = ref.inclusion_prob(p, r).numpy()
    counts = (scale != 0).double().sum(0).numpy()
    assert (counts[p.numpy() == 0] == 0).all()
    tail = 2 * np.minimum(stats.binom.cdf(counts, n, pi), stats.binom.sf(counts - 1, n, pi))
    assert tail.min() > 0.001 / k
    # The power to see pi = r p (the first-order formula) on the heaviest entry.
    top = int(p.argmax())
    assert stats.binom.sf(n * min(1.0, r * p[top].item()) * 0.98 - 1, n, pi[top]) < 1e-6
    assert ops._sap_by_rows(h[:0], r, None, scale_only=False).shape == (0, k)


@pytest.mark.parametrize("frac", [0.5, 1.0])
def test_sap_sample(device, frac):
    h = torch.relu(torch.randn(4000, 3, 4, 5, device=device))
    h[0] = 0  # an all-zero activation passes through as zeros
    out = mvm_cuda.sap_sample(h, frac)
    assert out.shape == h.shape and out.dtype == h.dtype
    assert (out[0] == 0).all()
    assert ((out == 0) | (h != 0)).all()  # zeros stay zero
    kept = (out != 0).reshape(4000, -1).sum(1)
    assert (kept <= max(1, round(frac * 60))).all()
    # Unbiased: each sample's total is preserved in expectation (a z-test over
    # samples; the terms h_j / pi_j are bounded by about sum|h| / r).
    total = h.reshape(4000, -1)[1:].sum(1).double().cpu()
    rel = (out.reshape(4000, -1)[1:].sum(1).double().cpu() - total) / total
    assert abs(rel.mean() / (rel.std() / math.sqrt(rel.numel()))) < stats.norm.isf(0.0005)


def test_sap_matches_reference_kept_counts(device):
    h = torch.relu(torch.randn(3000, 2, 3, 3))
    out = mvm_cuda.sap_sample(h.to(device), 0.5).cpu()
    ref_out = ref.sap_sample(h, 0.5)
    a = (out != 0).reshape(3000, -1).sum(1).double()
    b = (ref_out != 0).reshape(3000, -1).sum(1).double()
    assert stats.ttest_ind(a, b).pvalue > 0.001


def _sap_h(n, k, seed, dtype=torch.float64):
    """n copies of one activation of k entries: half zeros, a heavy tail, one
    entry with a tenth of the mass."""
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(k, generator=g, dtype=torch.float64) ** 4
    h[torch.rand(k, generator=g) < 0.5] = 0
    h[k // 3] = h.sum() / 9
    h[1] = -h[1] - 0.1  # a negative entry: p uses |h|, the output keeps the sign
    return h.to(dtype).expand(n, k).contiguous()


def _assert_binomial_keep_counts(kept, h, r):
    """Entry j of the n samples of h (all equal) is kept Binomial(n, pi_j) times; returns
    (p, pi), each (k,)."""
    n, k = kept.shape
    counts = kept.sum(0)
    p = h[0].abs() / h[0].abs().sum()
    assert (counts[p == 0] == 0).all()
    pi = ref.inclusion_prob(p, r).numpy()
    c = counts.numpy()
    tail = 2 * np.minimum(stats.binom.cdf(c, n, pi), stats.binom.sf(c - 1, n, pi))
    assert tail.min() > 0.001 / k  # Bonferroni over entries, 0.1% overall
    return p, pi


@pytest.mark.parametrize("k", [3000, 9000])
def test_sap_inclusion_frequency(device, k):
    # SAP's tables span several of the CPU kernel's bins (1,500 or 4,500 nonzero
    # entries), and at k = 9000 three of the CUDA kernel's slices of 4,096:
    # each entry's keep count is Binomial(n, pi_j), pi_j = 1 - (1 - |h_j| / sum|h|)^r.
    n = 2000
    h = _sap_h(n, k, seed=11)
    r = round(0.2 * k)
    torch.manual_seed(2)
    kept = (mvm_cuda.sap_sample(h.to(device), 0.2).cpu() != 0).double()
    p, pi = _assert_binomial_keep_counts(kept, h, r)
    # The power to see 2% too much mass in one bin's third of the entries.
    se = kept[:, : k // 3].sum(1).std().item() / math.sqrt(n)
    assert abs(ref.inclusion_prob(p[: k // 3] * 1.02, r).sum() - pi[: k // 3].sum()) / se > 2 * stats.norm.isf(0.001)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_sap_cuda_non_finite_without_value_checks():
    # Without value checks the CUDA kernel does not sync to raise: a sample with
    # NaN or inf, or whose sum |h| overflows float64, comes out all NaN; the
    # other samples are untouched by it (same draws as without that sample's fault).
    h = torch.rand(4, 3000, dtype=torch.float64, device="cuda")
    bad = h.clone()
    bad[0, 5], bad[1, 1000], bad[2] = float("nan"), float("inf"), 1e308
    previous = mvm_cuda.set_value_checks(False)
    try:
        out = mvm_cuda.sap_sample(bad, 0.5, torch.Generator("cuda").manual_seed(0))
    finally:
        mvm_cuda.set_value_checks(previous)
    good = mvm_cuda.sap_sample(h, 0.5, torch.Generator("cuda").manual_seed(0))
    assert out[:3].isnan().all()
    assert torch.equal(out[3], good[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_sap_kept_entries_scaled_exactly(device, dtype):
    n, k = 50, 400
    h = _sap_h(n, k, seed=12, dtype=dtype)
    out = mvm_cuda.sap_sample(h.to(device), 0.5).cpu()
    kept = out != 0
    assert kept.any() and (kept.sum(1) <= 200).all()
    p = h[0].double().abs() / h[0].double().abs().sum()
    want = h.double() / ref.inclusion_prob(p, 200)
    # float64 throughout, or p rounded to float32 and 1/pi in float32 (a few ulps).
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out[kept].double(), want[kept], rtol=rtol, atol=0)
    assert (out[1] == 0).all() or (out[:, 1][kept[:, 1]] < 0).all()  # the sign is kept


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_sap_scale_is_the_scale_of_sap_sample(device, layout):
    h = torch.relu(torch.randn(6, 4, 5, 6, generator=torch.Generator().manual_seed(4))).to(device)
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        h = torch.relu(torch.randn(6, 4, 5, 12, generator=torch.Generator().manual_seed(4))).to(device)[..., ::2]
    out = mvm_cuda.sap_sample(h, 0.5, torch.Generator(device=device).manual_seed(9))
    scale = mvm_cuda.sap_scale(h, 0.5, torch.Generator(device=device).manual_seed(9))
    assert torch.equal(out, h * scale)
    assert ((scale == 0) | (h != 0)).all() and (scale[scale != 0] > 1).all()
    if layout != "strided":  # read in place: the output keeps h's strides
        assert out.stride() == h.stride() and scale.stride() == h.stride()


# ---------------------------------------------------------------- per-sample keys

# r = 0.3 K (one-by-one draws; at K = 9000 over three CUDA slices) or 65 K (the
# exact set path, r > 64 K).
KEYED_FRAC = {"draws": 0.3, "exact": 65.0}


@pytest.mark.parametrize("k", [60, 9000])
@pytest.mark.parametrize("frac", KEYED_FRAC.values(), ids=KEYED_FRAC.keys())
def test_keys_make_a_sample_independent_of_its_batch(device, frac, k):
    # Sample n's kept entries are a function of (keys[n], h[n], r) alone: the same
    # permuted, as a subset, alone and at the head of a larger batch; and
    # sap_scale with the same keys is the scale sap_sample used.
    n = 12
    g = torch.Generator().manual_seed(5)
    h = torch.relu(torch.randn(n, k, generator=g, dtype=torch.float64)).float().to(device)
    h[:, :40] = 1e-3 * h[:, :40]  # entries with r p near 1 on the exact path: its sets vary
    keys = torch.randint(-2**63, 2**63 - 1, (n,), generator=g, dtype=torch.int64).to(device)
    full = mvm_cuda.sap_sample(h, frac, keys=keys)
    assert torch.equal(full, h * mvm_cuda.sap_scale(h, frac, keys=keys))
    perm = torch.randperm(n, generator=g).to(device)
    assert torch.equal(mvm_cuda.sap_sample(h[perm], frac, keys=keys[perm]), full[perm])
    assert torch.equal(mvm_cuda.sap_sample(h[3:4], frac, keys=keys[3:4]), full[3:4])
    more = mvm_cuda.sap_sample(torch.cat([h, h]), frac, keys=torch.cat([keys, keys + 1]))
    assert torch.equal(more[:n], full)
    assert not torch.equal(more[n:] != 0, full != 0)  # other keys, other draws


def test_keys_independent_of_thread_count():
    x = torch.rand(64, 26, 26, 8)
    keys = torch.arange(64) * 1_000_003
    threads = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            results.append(mvm_cuda.sap_sample(x, 0.3, keys=keys))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_keys_leave_the_generator_alone(device):
    h = torch.rand(4, 50, device=device)
    keys = torch.arange(4, device=device)
    g = torch.Generator(device=device).manual_seed(1)
    before = g.get_state()
    default_before = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
    a = mvm_cuda.sap_sample(h, 0.5, keys=keys)
    mvm_cuda.sap_scale(h, 80.0, keys=keys)  # the exact path too
    assert torch.equal(torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state(), default_before)
    assert torch.equal(mvm_cuda.sap_sample(h, 0.5, keys=keys), a)  # keyed draws repeat
    with pytest.raises(RuntimeError, match=r"mvm::sap_sample: pass keys or generator, not both"):
        mvm_cuda.sap_sample(h, 0.5, g, keys=keys)
    assert torch.equal(g.get_state(), before)


def test_by_rows_composition_passes_keys():
    # The fallback for other devices (here on the CPU's sample_rows) draws from the keys too.
    h = _sap_h(6, 60, seed=8, dtype=torch.float32)
    keys = torch.arange(6)
    a = ops._sap_by_rows(h, 12, None, scale_only=False, keys=keys)
    assert torch.equal(ops._sap_by_rows(h[2:4], 12, None, scale_only=False, keys=keys[2:4]), a[2:4])
    assert torch.equal(a, h * ops._sap_by_rows(h, 12, None, scale_only=True, keys=keys))


def test_keyed_sap_inclusion_frequency(device):
    # test_sap_inclusion_frequency with keys 0..n-1: entry j's keep count is Binomial(n, pi_j).
    n, k = 2000, 3000
    h = _sap_h(n, k, seed=11)
    r = round(0.2 * k)
    kept = (mvm_cuda.sap_sample(h.to(device), 0.2, keys=torch.arange(n, device=device)).cpu() != 0).double()
    _assert_binomial_keep_counts(kept, h, r)
    ref_kept = (ref.sap_sample(h[:200], 0.2, keys=torch.arange(200)) != 0).sum(1).double()
    assert stats.ttest_ind(kept[:200].sum(1).numpy(), ref_kept.numpy()).pvalue > 0.001


@pytest.mark.parametrize("frac", [0.5, 100.0], ids=["guided", "exact"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_relu_and_copies_are_the_relu_and_the_stack(device, frac, layout):
    # As for sample_rows: relu=True prunes max(h, 0), copies=k prunes h stacked k times.
    g = torch.Generator().manual_seed(50)
    h = torch.randn(3, 4, 5, 6, generator=g).to(device)
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    keys = torch.randint(-2**63, 2**63 - 1, (6,), generator=g).to(device)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    stacked = h.relu().repeat(2, 1, 1, 1).contiguous(memory_format=fmt)  # entries in h's memory order
    out = mvm_cuda.sap_sample(h, frac, keys=keys, relu=True, copies=2)
    assert torch.equal(out, mvm_cuda.sap_sample(stacked, frac, keys=keys))
    assert out.is_contiguous(memory_format=fmt)  # h's layout
    assert torch.equal(mvm_cuda.sap_sample(h, frac, keys=keys[:3], relu=True),
                       mvm_cuda.sap_sample(h.relu(), frac, keys=keys[:3]))
    assert (out >= 0).all() and (out[stacked == 0] == 0).all() and (out > 0).any()
    # The reference takes the same arguments (its draws come from other streams).
    want = ref.sap_sample(h.cpu(), frac, keys=keys.cpu(), relu=True, copies=2)
    assert want.shape == out.shape and (want[stacked.cpu() == 0] == 0).all()


# ---------------------------------------------------------------- channels_last

# r = 0.3 K (one-by-one draws) or 65 K (the exact set path, r > 64 K, whose
# weights must list the entries in the order the kernel reads them).
LAYOUT_FRAC = {"draws": 0.3, "exact": 65.0}


def check_channels_last_is_its_nhwc_equivalent(device, shape, frac, random):
    """sap_sample and sap_scale on a channels_last h (N, C, H, W) read it in
    place, in memory order: their result is, entry for entry, what the same op
    gives on the NHWC-contiguous copy with the same generator seed or keys;
    and it is SAP's (zeros never kept, kept entries scaled by 1/pi as
    mvm_cuda.reference computes it)."""
    g = torch.Generator().manual_seed(7)
    nchw = torch.relu(torch.randn(shape, generator=g, dtype=torch.float64))
    nchw[:, : shape[1] // 2] *= 1e-3  # small entries: on the exact path r p is near 1 and their sets vary
    h = nchw.to(device).contiguous(memory_format=torch.channels_last)
    nhwc = h.permute(0, 2, 3, 1).contiguous()
    keys = torch.randint(-2**63, 2**63 - 1, (shape[0],), generator=g, dtype=torch.int64).to(device)

    def rand():
        return {"keys": keys} if random == "keys" else {"generator": torch.Generator(device).manual_seed(11)}

    r = ref.sap_draws(h, frac)
    for op in (mvm_cuda.sap_sample, mvm_cuda.sap_scale):
        got, want = op(h, frac, **rand()), op(nhwc, frac, **rand())
        assert got.stride() == h.stride()
        assert torch.equal(got.permute(0, 2, 3, 1), want), op.__name__
    scale = mvm_cuda.sap_scale(h, frac, **rand()).cpu()
    assert torch.equal(mvm_cuda.sap_sample(h, frac, **rand()).cpu(), h.cpu() * scale)
    kept = scale != 0
    flat = nchw.reshape(shape[0], -1)
    p = flat.abs() / flat.abs().sum(1, keepdim=True)
    assert kept.any() and not kept[nchw == 0].any()
    want = (1 / ref.inclusion_prob(p, r)).reshape(shape)
    torch.testing.assert_close(scale[kept], want[kept], rtol=1e-12, atol=0)


@pytest.mark.parametrize("random", ["generator", "keys"])
@pytest.mark.parametrize("frac", LAYOUT_FRAC.values(), ids=LAYOUT_FRAC.keys())
def test_channels_last_is_its_nhwc_equivalent(device, frac, random):
    check_channels_last_is_its_nhwc_equivalent(device, (5, 6, 4, 7), frac, random)


# Every path of the CPU kernel: float32 (its AVX2 block sums), the other dtypes,
# relu and |h|, a K that is not a multiple of the 32-entry block, the exact set path.
_ISA_CASES = """
import io, sys, torch, mvm_cuda
g = torch.Generator().manual_seed(3)
outs = []
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    h = torch.randn(6, 8, 9, 7, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    h[0, :, :3] = 0
    keys = torch.arange(12) * 7919
    for relu in (False, True):
        for frac in (0.01, 0.5, 2.0, 70.0):
            outs.append(mvm_cuda.sap_sample(h, frac, keys=keys, relu=relu, copies=2))
            outs.append(mvm_cuda.sap_scale(h, frac, keys=keys[:6]))
buf = io.BytesIO()
torch.save(outs, buf)
sys.stdout.buffer.write(buf.getvalue())
"""


def test_cpu_isa_gives_the_same_bits(tmp_path):
    # The AVX2 paths (block sums, 1/pi) and the plain ones (MVM_CPU_ISA=default)
    # give the same bits: both run in child processes, compared bit for bit.
    runs = []
    for isa in (None, "default"):
        env = installed_package_env()
        env.pop("MVM_CPU_ISA", None)
        if isa is not None:
            env["MVM_CPU_ISA"] = isa
        done = subprocess.run([sys.executable, "-c", _ISA_CASES], capture_output=True, check=True, timeout=300,
                              cwd=tmp_path, env=env)
        runs.append(torch.load(io.BytesIO(done.stdout)))
    assert len(runs[0]) == len(runs[1]) == 64
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    for a, b in zip(*runs):
        assert (a != 0).any()
        assert torch.equal(a.reshape(-1).view(bits[a.element_size()]), b.reshape(-1).view(bits[b.element_size()]))
