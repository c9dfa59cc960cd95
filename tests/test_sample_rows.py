"""sample_rows against mvm_cuda.reference: its law, its scales, layouts and bad input.

The statistical tests draw from fixed seeds, so each gives the same verdict on every run of
the same device. On a new random stream (another device, or a change to how the draws consume
Philox), each such test is a fresh trial at its own significance level: with about 25 of them,
one failure in a few percent of new streams is expected by chance. A failure there means a
wrong law only if it repeats under other seeds: rerun that test with its seed changed (e.g.
manual_seed(0) -> manual_seed(1), 2, 3); a right law passes nearly all of them, a wrong one
fails nearly all.
"""
import math
import re

import numpy as np
import pytest
import torch
from scipy import stats

import mvm_cuda
from mvm_cuda import reference as ref

from conftest import ALL_DTYPES


def _probs(m, seed=0, zeros=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(m, generator=g, dtype=torch.float64) + 0.05
    p[:zeros] = 0
    return (p / p.sum())[None]


def _scale_ulps(dtype, device):
    """How many eps * |exact| a kept row x_i / pi_i may be off: one rounding of
    the product for the float32-or-better scale; in float64 the scale's own
    expm1/log1p chain adds more (the CPU's libm and torch's differ in the last
    bit: 2 in all; CUDA's device functions reach about 3.5 ulp: 4)."""
    if dtype != torch.float64:
        return 1
    return 4 if device == "cuda" else 2


def _kept(out):
    """(N, M) mask of rows that were kept (nonzero anywhere in the row)."""
    return (out.reshape(out.shape[0], -1, out.shape[-1]) != 0).any(-1)


def test_inclusion_frequency_matches_pi(device):
    # Each sample is an independent trial, so row i's keep count is Binomial(N, pi_i).
    # The z-scores would be off by several units for a wrong formula (pi = c p).
    m, c, n = 40, 20, 20_000
    p = _probs(m, seed=1)
    p[0, :5] = torch.tensor([1e-6, 1e-4, 1e-3, 1e-2, 0.2])
    p[0, 5:] *= (1 - p[0, :5].sum()) / p[0, 5:].sum()
    x = torch.ones(n, m, 2, device=device)
    torch.manual_seed(0)
    counts = _kept(mvm_cuda.sample_rows(x, p.to(device), c).cpu()).sum(0).double()
    pi = ref.inclusion_prob(p[0], c)
    z = (counts - n * pi) / torch.sqrt(n * pi * (1 - pi))
    bound = stats.norm.isf(0.001 / (2 * m))  # two-sided, Bonferroni over rows, 0.1% overall
    assert z.abs().max().item() < bound
    wrong = torch.clamp(c * p[0], max=1)
    z_wrong = (counts - n * wrong) / torch.sqrt(n * wrong * (1 - wrong) + 1e-12)
    assert z_wrong.abs().max().item() > bound  # the test has the power to see a wrong pi


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared_p", "p_per_sample"])
def test_inclusion_frequency_long_rows(device, per_sample):
    # Rows longer than the CPU kernel's bins of 128 buckets (SAP's regime: a row of
    # p per sample): a weight spanning bins, runs of zeros across bin edges,
    # a wide dynamic range. Row i's keep count is Binomial(n, pi_i).
    m, c, n = 3000, 400, 4000
    g = torch.Generator().manual_seed(7)
    p = torch.rand(m, generator=g, dtype=torch.float64) ** 4
    p[1000:1100] = 0
    p[2040:2050] = 0
    p[1500] = p.sum()  # half the mass in one row
    p[3], p[2999] = 1e-7 * p.sum(), 1e-4 * p.sum()
    p = (p / p.sum())[None]
    x = torch.ones(n, m, 1, device=device)
    pp = p.expand(n, m) if per_sample else p
    torch.manual_seed(3)
    kept = _kept(mvm_cuda.sample_rows(x, pp.to(device), c).cpu()).double()
    counts = kept.sum(0)
    assert (counts[p[0] == 0] == 0).all()
    assert counts[1500] == n
    pi = ref.inclusion_prob(p[0], c).numpy()
    k = counts.numpy()
    # Exact two-sided binomial tails (many rows expect far less than one keep).
    tail = 2 * np.minimum(stats.binom.cdf(k, n, pi), stats.binom.sf(k - 1, n, pi))
    assert tail.min() > 0.001 / m  # Bonferroni over rows, 0.1% overall
    # Rows kept per sample in each bin, against the sum of pi there (z over
    # samples): sees a bin whose draws get 2% too much or too little mass.
    for lo, hi in ((0, 1024), (1024, 2048), (2048, m)):
        per_sample = kept[:, lo:hi].sum(1)
        se = per_sample.std().item() / math.sqrt(n)
        expected = pi[lo:hi].sum()
        assert abs(per_sample.mean().item() - expected) / se < stats.norm.isf(0.001 / 6)
        off = ref.inclusion_prob(p[0, lo:hi] * 1.02, c).sum().item()
        assert abs(off - expected) / se > 2 * stats.norm.isf(0.001 / 6)  # the power to see it


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared_p", "p_per_sample"])
def test_inclusion_frequency_when_c_far_exceeds_m(device, per_sample):
    # c = 25 M: the big rows are all drawn within the first draws, and the CPU
    # kernel stops drawing once every row with p > 0 is; the small row (pi
    # near 1/2) and the zero rows must keep their rates all the same.
    m, c, n = 8, 200, 20_000
    p = torch.tensor([[0, 0.35, 0.3, 0.2, 0.0035, 0.07, 0, 0.0765]], dtype=torch.float64)
    x = torch.ones(n, m, 3, device=device)
    pp = p.expand(n, m) if per_sample else p
    torch.manual_seed(5)
    counts = _kept(mvm_cuda.sample_rows(x, pp.to(device), c).cpu()).sum(0).double()
    assert counts[0] == 0 and counts[6] == 0
    pi = ref.inclusion_prob(p[0], c).numpy()
    k = counts.numpy()
    tail = 2 * np.minimum(stats.binom.cdf(k, n, pi), stats.binom.sf(k - 1, n, pi))
    assert tail[[1, 2, 3, 4, 5, 7]].min() > 0.001 / 6  # exact binomial tails, Bonferroni
    half = ref.inclusion_prob(p[0], c // 2)[4]  # what stopping at c / 2 draws would give
    assert abs((counts[4] - n * half) / torch.sqrt(n * half * (1 - half))) > 10


def test_unbiased_where_p_has_full_support(device):
    m, ch, c, n = 30, 3, 10, 50_000
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, m, ch, generator=g, dtype=torch.float64)
    p = _probs(m, seed=4)
    torch.manual_seed(1)
    out = mvm_cuda.sample_rows(x.expand(n, m, ch).contiguous().to(device), p.to(device), c).cpu()
    pi = ref.inclusion_prob(p[0], c)[:, None]
    se = torch.sqrt(x[0] ** 2 * (1 / pi - 1) / n)
    z = (out.mean(0) - x[0]) / se
    assert z.abs().max().item() < stats.norm.isf(0.001 / (2 * m * ch))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_kept_rows_are_scaled_exactly_and_others_zero(device, dtype):
    m, ch, c, n = 50, 8, 12, 64
    p = _probs(m, seed=5, zeros=7)
    x = (torch.rand(n, m, ch, dtype=torch.float64) + 0.5).to(dtype)
    out = mvm_cuda.sample_rows(x.to(device), p.to(device), c).cpu()
    kept = _kept(out)
    assert (kept.sum(1) <= c).all() and (kept.sum(1) >= 1).all()  # at most c distinct rows
    assert not kept[:, :7].any()  # rows with p = 0 are never drawn
    assert (out[~kept] == 0).all()
    # Kept rows: x_i * (1 / pi_i), scale in float32 or better, one rounding.
    scale = 1.0 / ref.inclusion_prob(p[0], c)
    exact = (x.double() * scale[None, :, None])[kept]
    ulp = torch.finfo(dtype).eps * exact.abs() * _scale_ulps(dtype, device)
    assert ((out[kept].double() - exact).abs() <= ulp).all()


def test_tiny_p_scale_factor(device):
    # p = 1e-9 with c = 1e5: pi = 1e-4 (minus 5e-9), where 1 - (1 - p)^c in
    # float32 gives 0 and an infinite scale. 10^5 such rows are drawn ~10 times a sample.
    m = 100_001
    p = torch.full((1, m), 1e-9, dtype=torch.float64)
    p[0, 0] = 1 - 1e-9 * (m - 1)
    x = torch.ones(4, m, 1, device=device)
    out = mvm_cuda.sample_rows(x, p.to(device), 100_000).cpu()
    tiny = out[:, 1:, 0]
    drawn = tiny[tiny != 0]
    assert drawn.numel() > 0
    expected = torch.tensor(1 / -math.expm1(1e5 * math.log1p(-1e-9)), dtype=torch.float32)
    assert torch.equal(drawn, expected.expand_as(drawn))
    assert out[:, 0, 0].eq(1 / -math.expm1(1e5 * math.log1p(-(1 - 1e-9 * (m - 1))))).all()


def test_nchw_view_is_read_in_place_and_keeps_strides(device):
    g = torch.Generator().manual_seed(6)
    t = torch.randn(8, 16, 5, 7, generator=g).to(device)  # NCHW
    view = t.permute(0, 2, 3, 1)  # NHWC view
    p = _probs(35, seed=7).to(device)
    torch.manual_seed(3)
    out = mvm_cuda.sample_rows(view, p, 9)
    assert out.stride() == view.stride()
    torch.manual_seed(3)
    out_contig = mvm_cuda.sample_rows(view.contiguous(), p, 9)
    assert out_contig.stride() == view.contiguous().stride()
    assert torch.equal(out, out_contig)  # same draws, same values, different layouts


def test_three_dim_input_and_p_broadcast_copy_major(device):
    n_img, r, m, ch = 3, 5, 12, 4
    x = torch.rand(n_img, m, ch, device=device) + 0.1
    p = torch.zeros(n_img, m, dtype=torch.float64)
    for i in range(n_img):  # image i can only keep row i
        p[i, i] = 1.0
    out = mvm_cuda.sample_rows(x.repeat(r, 1, 1), p.to(device), 3).cpu()
    kept = _kept(out)
    for n in range(n_img * r):
        assert kept[n].nonzero().flatten().tolist() == [n % n_img]
    assert torch.equal(out[:n_img], torch.where(kept[:n_img, :, None], x.cpu(), 0.0))


def test_determinism_and_fresh_draws(device):
    x = torch.rand(16, 6, 6, 4, device=device)
    p = _probs(36, seed=8).to(device)
    torch.manual_seed(11)
    a = mvm_cuda.sample_rows(x, p, 10)
    b = mvm_cuda.sample_rows(x, p, 10)
    torch.manual_seed(11)
    assert torch.equal(mvm_cuda.sample_rows(x, p, 10), a)
    assert not torch.equal(a, b)  # successive calls draw afresh
    g1 = torch.Generator(device=device).manual_seed(5)
    g2 = torch.Generator(device=device).manual_seed(5)
    assert torch.equal(mvm_cuda.sample_rows(x, p, 10, generator=g1), mvm_cuda.sample_rows(x, p, 10, generator=g2))


def test_independent_of_thread_count():
    x = torch.rand(64, 26, 26, 8)
    p = _probs(676, seed=9)
    threads = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            results.append(mvm_cuda.sample_rows(x, p, 300, generator=torch.Generator().manual_seed(0)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_nan_and_inf_only_in_drawn_rows(device):
    m = 20
    x = torch.full((200, m, 3), float("nan"), device=device)
    x[:, ::2] = float("inf")
    out = mvm_cuda.sample_rows(x, _probs(m, seed=10).to(device), 4).cpu()
    # A multiply by a 0/1 mask would make every row NaN; a select keeps at most c.
    kept = _kept(out)
    assert (kept.sum(1) <= 4).all() and (kept.sum(1) >= 1).all()


def test_empty_batch_batch_one_and_large_c(device):
    p = _probs(10).to(device)
    assert mvm_cuda.sample_rows(torch.empty(0, 2, 5, 3, device=device), p, 4).shape == (0, 2, 5, 3)
    x = torch.rand(1, 10, 3, device=device) + 0.1
    out = mvm_cuda.sample_rows(x, p, 100_000)
    assert _kept(out).all()  # 1e5 draws over 10 rows keep every row (pi = 1 in float64)
    assert torch.allclose(out, x)


def test_matches_reference_statistically(device):
    # The kernels draw with their own streams (alias tables or a guided CDF on the CPU, a CDF
    # search on CUDA), the reference with torch.multinomial: compare
    # the distributions of the number of distinct kept rows (chi-square on counts).
    m, c, n = 30, 15, 20_000
    p = _probs(m, seed=12)
    x = torch.ones(n, m, 1)
    k_kernel = _kept(mvm_cuda.sample_rows(x.to(device), p.to(device), c, generator=torch.Generator(device=device).manual_seed(0)).cpu()).sum(1)
    k_ref = _kept(ref.sample_rows(x, p, c, generator=torch.Generator().manual_seed(0))).sum(1)
    table = torch.stack([torch.bincount(k_kernel, minlength=c + 1), torch.bincount(k_ref, minlength=c + 1)])
    table = table[:, table.sum(0) >= 10].numpy()
    assert stats.chi2_contingency(table).pvalue > 0.001


def test_backward_raises_clear_error():
    x = torch.rand(2, 3, 4, requires_grad=True)
    out = mvm_cuda.sample_rows(x, _probs(3).float(), 2)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.float64], ids=["p32", "p64"])
def test_p_one_rounding_above_one_gives_pi_one(device, p_dtype):
    # A one-hot row left at 1 + 1 ulp by rounding passes the sum check; pi must be
    # 1 there (log1p(-p) of p > 1 is NaN), on every path, the reference's too.
    above = torch.nextafter(torch.ones((), dtype=p_dtype), torch.tensor(2.0, dtype=p_dtype))
    p = torch.zeros(1, 3, dtype=p_dtype)
    p[0, 2] = above
    x = torch.rand(5, 1, 3, 2) + 0.5
    want = torch.zeros_like(x)
    want[:, :, 2] = x[:, :, 2]
    assert torch.equal(mvm_cuda.sample_rows(x.to(device), p.to(device), 3).cpu(), want)
    assert torch.equal(ref.sample_rows(x, p, 3), want)
    assert ref.inclusion_prob(above.reshape(1), 7).item() == 1.0
    # Shared rows of p (alias tables on the CPU) and a row per sample (guided tables).
    x = torch.rand(8, 3, 4) + 0.5
    for pp in (p, p.expand(8, 3)):
        out = mvm_cuda.sample_rows(x.to(device), pp.to(device), 2).cpu()
        assert torch.equal(out[:, 2], x[:, 2]) and (out[:, :2] == 0).all()


CROPS = {
    # Pixels that do not collapse to one stride: the only way into the CUDA
    # kernel's line walks with div != 1 (channels inner, then pixels inner).
    "crop_nhwc": lambda dt, dev: (torch.rand(6, 5, 9, 8, dtype=dt) + 0.5).to(dev)[:, :, 1:8],
    "crop_nchw_view": lambda dt, dev: (torch.rand(6, 8, 5, 9, dtype=dt) + 0.5).to(dev).permute(0, 2, 3, 1)[:, :, :8],
    "crop_width_one": lambda dt, dev: (torch.rand(6, 5, 9, 1, dtype=dt) + 0.5).to(dev)[:, :, 1:8],
}


@pytest.mark.parametrize("layout", CROPS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_non_collapsing_pixels(device, layout, dtype):
    x = CROPS[layout](dtype, device)
    m = x.shape[1] * x.shape[2]
    p = _probs(m, seed=13, zeros=3).expand(x.shape[0], m)  # a row per sample, 3 rows never drawn
    gen = lambda: torch.Generator(device=device).manual_seed(4)  # noqa: E731
    out = mvm_cuda.sample_rows(x, p.to(device), 9, generator=gen())
    same = mvm_cuda.sample_rows(x.contiguous(), p.to(device), 9, generator=gen())
    assert torch.equal(out, same)  # same draws whatever the layout
    kept = _kept(out.cpu()).reshape(x.shape[:3])
    assert kept.flatten(1).any(1).all() and not kept.flatten(1)[:, :3].any()
    scale = (1.0 / ref.inclusion_prob(p[0], 9)).reshape(x.shape[1], x.shape[2], 1)
    exact = x.cpu().double() * scale
    ulp = torch.finfo(dtype).eps * exact.abs() * _scale_ulps(dtype, device)
    assert ((out.cpu().double() - exact).abs() <= ulp)[kept].all()
    assert (out.cpu()[~kept] == 0).all()


def test_width_one_rows_same_draws_whatever_alignment(device):
    # Rows of one channel (SAP's and sample_scale's shape): a 16-byte aligned x
    # and one offset by an element (which no vector load can read) give the same.
    n, m = 12, 96
    p = _probs(m, seed=14).float()
    gen = lambda: torch.Generator(device=device).manual_seed(8)  # noqa: E731
    aligned = (torch.rand(n, m, 1) + 0.5).to(device)
    shifted = torch.empty(n * m + 1, device=device)[1:].view(n, m, 1)
    shifted.copy_(aligned)
    a = mvm_cuda.sample_rows(aligned, p.to(device), 20, generator=gen())
    b = mvm_cuda.sample_rows(shifted, p.to(device), 20, generator=gen())
    assert torch.equal(a, b)
    assert ((a != 0).sum((1, 2)) >= 1).all() and ((a != 0).sum((1, 2)) <= 20).all()


def test_sample_alone_or_in_a_batch_draws_the_same(device):
    # A sample's draws are keyed by its index: sample 0 alone (its output
    # split over many blocks on CUDA) and in a batch of 600 agree exactly.
    m, ch, c = 64, 256, 8
    x = torch.rand(600, m, ch, device=device) + 0.5
    p = _probs(m, seed=15).expand(600, m).to(device)  # a row per sample: the same table kind alone or not
    one = mvm_cuda.sample_rows(x[:1], p[:1], c, generator=torch.Generator(device=device).manual_seed(1))
    many = mvm_cuda.sample_rows(x, p, c, generator=torch.Generator(device=device).manual_seed(1))
    assert torch.equal(one[0], many[0])


FAULTS = {
    "negative": (lambda p: p.index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(-0.25, dtype=p.dtype)),
                 r"mvm::sample_rows: p must be non-negative, got -0\.25 in row 1$"),
    "nan": (lambda p: p.index_put_((torch.tensor([0]), torch.tensor([3])), torch.tensor(float("nan"), dtype=p.dtype)),
            r"mvm::sample_rows: p must be finite, got a NaN or inf \(nan\) in row 0$"),
    "inf": (lambda p: p.index_put_((torch.tensor([1]), torch.tensor([0])), torch.tensor(float("inf"), dtype=p.dtype)),
            r"mvm::sample_rows: p must be finite, got a NaN or inf \(inf\) in row 1$"),
    "sum": (lambda p: p.mul_(torch.tensor([[1.0], [0.5]], dtype=p.dtype)),
            r"mvm::sample_rows: every row of p must sum to 1 \(within 0\.0001\), row 1 sums to 0\.5$"),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.float64], ids=["p32", "p64"])
def test_one_message_per_fault(device, value_checks, fault, p_dtype):
    # The CPU kernel checks rows as it scans them, the other paths check the
    # whole of p first (CUDA, and any device for an empty x): one message each.
    make, message = FAULTS[fault]
    p = make(torch.full((2, 6), 1 / 6, dtype=p_dtype)).to(device)
    x = torch.rand(2, 2, 3, 5, device=device)
    shared, own = torch.rand(8, 2, 3, 5, device=device), x[:2]  # p shared by samples, or a row per sample
    for args in ((shared, p), (own, p), (x[:0], p)):
        with pytest.raises(RuntimeError) as info:
            torch.ops.mvm.sample_rows(*args, 3)
        assert re.match(message, str(info.value).splitlines()[0]), str(info.value)


# ---------------------------------------------------------------- per-sample keys

# c = 40 (one-by-one draws) or 64 M + 1 (the exact set path), over M = 300 rows
# (several of the CPU kernel's bins of 128 guide buckets).
KEYED_C = {"draws": 40, "exact": 64 * 300 + 1}


def _keyed_inputs(device, n=32, m=300, seed=20):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, m, 3, generator=g) + 0.5).to(device)
    p = torch.cat([_probs(m, seed=seed + 1, zeros=30), _probs(m, seed=seed + 2)])  # P = 2
    # 50 rows of each with c p near 1 on the exact path (pi about 0.6 there):
    # its drawn sets then depend on the draws.
    p[:, 30:80] = 5e-5
    p[:, 80:] *= (1 - p[:, :80].sum(1, keepdim=True)) / p[:, 80:].sum(1, keepdim=True)
    p = p.to(device)
    keys = (torch.randint(-2**63, 2**63 - 1, (n,), generator=g, dtype=torch.int64)).to(device)
    return x, p, keys


@pytest.mark.parametrize("c", KEYED_C.values(), ids=KEYED_C.keys())
def test_keys_make_a_sample_independent_of_its_batch(device, c):
    # Sample n's rows are a function of (keys[n], p[n % P], c, M) alone: the
    # same in a batch of 32 with P = 2 (rows of p shared: N >= 4P), permuted with
    # a row of p per sample (N < 4P), as the even samples with P = 1, alone, and
    # at the head of a batch of 64; bit-equal outputs.
    x, p, keys = _keyed_inputs(device)
    n = x.shape[0]
    full = mvm_cuda.sample_rows(x, p, c, keys=keys)
    kept = _kept(full.cpu())
    assert (kept.sum(1) >= 1).all() and not kept[::2, :30].any()  # p[0]'s zero rows are never drawn
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(device)
    assert torch.equal(mvm_cuda.sample_rows(x[perm], p[perm % 2], c, keys=keys[perm]), full[perm])
    even = torch.arange(0, n, 2, device=device)
    assert torch.equal(mvm_cuda.sample_rows(x[even], p[:1], c, keys=keys[even]), full[even])
    assert torch.equal(mvm_cuda.sample_rows(x[5:6], p[1:], c, keys=keys[5:6]), full[5:6])
    x2, _, keys2 = _keyed_inputs(device, seed=30)
    more = mvm_cuda.sample_rows(torch.cat([x, x2]), p, c, keys=torch.cat([keys, keys2]))
    assert torch.equal(more[:n], full)
    strided = torch.stack([keys, keys.flip(0)], 1)[:, 0]  # keys with stride 2, read in place
    assert torch.equal(mvm_cuda.sample_rows(x, p, c, keys=strided), full)
    # Other keys draw afresh.
    assert not torch.equal(_kept(mvm_cuda.sample_rows(x, p, c, keys=keys + 1).cpu()), kept)


@pytest.mark.parametrize("c", KEYED_C.values(), ids=KEYED_C.keys())
def test_keys_independent_of_thread_count(c):
    x, p, keys = _keyed_inputs("cpu", n=64)
    threads = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            results.append(mvm_cuda.sample_rows(x, p, c, keys=keys))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def _rng_state(device):
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def test_keys_leave_the_generator_alone(device):
    x, p, keys = _keyed_inputs(device, n=8)
    g = torch.Generator(device=device).manual_seed(3)
    before, default_before = g.get_state(), _rng_state(device)
    for c in KEYED_C.values():
        mvm_cuda.sample_rows(x, p, c, keys=keys)
    assert torch.equal(_rng_state(device), default_before)
    with pytest.raises(RuntimeError, match=r"mvm::sample_rows: pass keys or generator, not both"):
        mvm_cuda.sample_rows(x, p, 3, keys=keys, generator=g)
    assert torch.equal(g.get_state(), before)
    # Keyed draws repeat (no hidden state), and the empty batch takes keys of shape (0,).
    assert torch.equal(mvm_cuda.sample_rows(x, p, 40, keys=keys), mvm_cuda.sample_rows(x, p, 40, keys=keys))
    assert mvm_cuda.sample_rows(x[:0], p, 3, keys=keys[:0]).shape == (0, 300, 3)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared_p", "p_per_sample"])
def test_keyed_inclusion_frequency_matches_pi(device, per_sample):
    # test_inclusion_frequency_matches_pi with keys 0..N-1 (neighbouring keys):
    # row i's keep count is Binomial(N, pi_i) if the samples' streams are
    # independent; and neighbours keep row pairs at the rate of independent
    # samples (sum_i pi_i^2 rows in common, a z-test over the N - 1 pairs).
    m, c, n = 40, 20, 20_000
    p = _probs(m, seed=1)
    p[0, :5] = torch.tensor([1e-6, 1e-4, 1e-3, 1e-2, 0.2])
    p[0, 5:] *= (1 - p[0, :5].sum()) / p[0, 5:].sum()
    x = torch.ones(n, m, 2, device=device)
    pp = p.expand(n, m) if per_sample else p
    kept = _kept(mvm_cuda.sample_rows(x, pp.to(device), c, keys=torch.arange(n, device=device)).cpu()).double()
    counts = kept.sum(0)
    pi = ref.inclusion_prob(p[0], c)
    z = (counts - n * pi) / torch.sqrt(n * pi * (1 - pi))
    bound = stats.norm.isf(0.001 / (2 * m))
    assert z.abs().max().item() < bound
    wrong = torch.clamp(c * p[0], max=1)
    z_wrong = (counts - n * wrong) / torch.sqrt(n * wrong * (1 - wrong) + 1e-12)
    assert z_wrong.abs().max().item() > bound  # the power to see a wrong pi
    common = (kept[:-1] * kept[1:]).sum(1)
    z_pairs = (common.mean() - (pi**2).sum()) / (common.std() / math.sqrt(n - 1))
    assert abs(z_pairs.item()) < stats.norm.isf(0.0005)


def test_keyed_exact_path_inclusion_frequency(device):
    # The exact set path (c > 64 M) with keys 0..N-1: keep counts Binomial(N, pi_i).
    m, c, n = 8, 600, 20_000
    p = torch.tensor([[0, 0.35, 0.3, 0.2, 0.002, 0.07, 0, 0.078]], dtype=torch.float64)
    x = torch.ones(n, m, 1, device=device)
    counts = _kept(mvm_cuda.sample_rows(x, p.to(device), c, keys=torch.arange(n, device=device)).cpu()).sum(0)
    assert counts[0] == 0 and counts[6] == 0
    pi = ref.inclusion_prob(p[0], c).numpy()
    k = counts.double().numpy()
    tail = 2 * np.minimum(stats.binom.cdf(k, n, pi), stats.binom.sf(k - 1, n, pi))
    assert tail[[1, 2, 3, 4, 5, 7]].min() > 0.001 / 6
    assert 0.6 < k[4] / n < 0.8  # pi = 0.70 for p = 0.002: a row the law decides


def test_keyed_matches_reference_statistically(device):
    # As test_matches_reference_statistically, both keyed by 0..N-1 (the reference
    # with a torch generator per sample): the numbers of distinct kept rows agree.
    m, c, n = 30, 15, 5000
    p = _probs(m, seed=12)
    x = torch.ones(n, m, 1)
    keys = torch.arange(n)
    k_kernel = _kept(mvm_cuda.sample_rows(x.to(device), p.to(device), c, keys=keys.to(device)).cpu()).sum(1)
    k_ref = _kept(ref.sample_rows(x, p, c, keys=keys)).sum(1)
    assert torch.equal(_kept(ref.sample_rows(x[:7], p, c, keys=keys[:7])).sum(1), k_ref[:7])  # keyed oracle too
    table = torch.stack([torch.bincount(k_kernel, minlength=c + 1), torch.bincount(k_ref, minlength=c + 1)])
    table = table[:, table.sum(0) >= 10].numpy()
    assert stats.chi2_contingency(table).pvalue > 0.001


@pytest.mark.parametrize("c", KEYED_C.values(), ids=KEYED_C.keys())
@pytest.mark.parametrize("layout", ["nhwc", "nchw_view"])
def test_relu_and_copies_are_the_relu_and_the_stack(device, c, layout):
    # relu=True samples max(x, 0) (the unit in place of its ReLU); copies=k samples x
    # stacked k times, sample n from x[n % N]: bit-equal to doing either first, with
    # keys (one per output sample) and with a generator in the same state.
    g = torch.Generator().manual_seed(40)
    x = torch.randn(4, 6, 5, 3, generator=g)
    x = (x if layout == "nhwc" else x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)).to(device)
    p = _probs(30, seed=41).repeat(2, 1).to(device)
    keys = torch.randint(-2**63, 2**63 - 1, (12,), generator=g).to(device)
    stacked = x.relu().repeat(3, 1, 1, 1)
    out = mvm_cuda.sample_rows(x, p, c, keys=keys, relu=True, copies=3)
    assert out.shape == (12, 6, 5, 3)
    assert out.is_contiguous() if layout == "nhwc" else out.permute(0, 3, 1, 2).is_contiguous()  # x's layout
    assert torch.equal(out, mvm_cuda.sample_rows(stacked, p, c, keys=keys))
    assert torch.equal(mvm_cuda.sample_rows(x, p, c, keys=keys[:4], relu=True),
                       mvm_cuda.sample_rows(x.relu(), p, c, keys=keys[:4]))
    gen = lambda: torch.Generator(device=device).manual_seed(7)  # noqa: E731
    assert torch.equal(mvm_cuda.sample_rows(x, p, c, relu=True, copies=3, generator=gen()),
                       mvm_cuda.sample_rows(stacked, p, c, generator=gen()))
    # Negative entries of drawn rows are 0, never scaled.
    assert not (out < 0).any()
    with pytest.raises(RuntimeError, match="mvm::sample_rows: copies must be >= 1, got 0"):
        mvm_cuda.sample_rows(x, p, c, copies=0)
    with pytest.raises(RuntimeError, match=r"keys must have shape \(N,\) = \(12,\), one key per sample of the output"):
        mvm_cuda.sample_rows(x, p, c, keys=keys[:4], copies=3)
