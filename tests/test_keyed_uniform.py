"""keyed_uniform: per-key uniforms (the dropout baseline's masks), equal to the
reference's Philox bit for bit, prefix-stable, a function of each key alone, and
uniform and independent across neighbouring keys (statistical tests at fixed keys)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import mvm_cuda
from mvm_cuda import reference as ref

DTYPES = [torch.float32, torch.float64]
EDGE_KEYS = [0, 1, 2, -1, 2**31, 2**32 - 1, 2**32, -2**63, 2**63 - 1, 0x0123456789ABCDEF]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 37])
def test_matches_reference_exactly(device, dtype, K):
    keys = torch.tensor(EDGE_KEYS, device=device)
    out = mvm_cuda.keyed_uniform(keys, K, dtype)
    assert out.shape == (len(EDGE_KEYS), K) and out.dtype == dtype and out.device == keys.device
    assert torch.equal(out.cpu(), ref.keyed_uniform(keys.cpu(), K, dtype))


def test_reference_philox_known_answer():
    # Random123's known-answer vectors for Philox4x32-10 (kat_vectors): the
    # reference's Philox is that generator, not merely self-consistent.
    cases = [((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for (k0, k1), counter, want in cases:
        bits = k0 | (k1 << 32)
        key = torch.tensor(bits - 2**64 if bits >= 2**63 else bits)  # the same 64 bits as an int64
        got = ref.philox4x32(key, torch.tensor(counter))
        assert got.tolist() == list(want)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_prefix_stable_and_a_function_of_each_key(device, dtype):
    keys = torch.arange(100, 140, device=device) * 7919
    full = mvm_cuda.keyed_uniform(keys, 29, dtype)
    for k in (0, 1, 3, 4, 5, 28):
        assert torch.equal(mvm_cuda.keyed_uniform(keys, k, dtype), full[:, :k])
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:17].to(device)
    assert torch.equal(mvm_cuda.keyed_uniform(keys[idx], 29, dtype), full[idx])
    strided = torch.stack([keys, -keys], 1)[:, 0]  # stride 2: read in place
    assert strided.stride() == (2,)
    assert torch.equal(mvm_cuda.keyed_uniform(strided, 29, dtype), full)
    assert torch.equal(mvm_cuda.keyed_uniform(keys, 29, dtype), full)  # deterministic


def test_empty_shapes(device):
    assert mvm_cuda.keyed_uniform(torch.zeros(0, dtype=torch.int64, device=device), 5).shape == (0, 5)
    assert mvm_cuda.keyed_uniform(torch.arange(3, device=device), 0).shape == (3, 0)


def test_default_dtype_and_generator_untouched(device):
    before = torch.get_rng_state()
    out = mvm_cuda.keyed_uniform(torch.arange(4, device=device), 6)
    assert out.dtype == torch.float32
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_uniform_with_all_its_bits(device, dtype):
    # Keys 0..1999 (neighbours, the hardest case for a keyed generator), 64 each:
    # Kolmogorov-Smirnov against U[0, 1); the test has the power to see u^1.02.
    u = mvm_cuda.keyed_uniform(torch.arange(2000, device=device), 64, dtype).cpu().double()
    assert (u >= 0).all() and (u < 1).all()
    flat = u.flatten().numpy()
    assert stats.kstest(flat, "uniform").pvalue > 0.001
    assert stats.kstest(flat ** 1.02, "uniform").pvalue < 1e-6
    # The bits: 24 for float32, 53 for float64, and the lowest of them random too.
    bits = 24 if dtype == torch.float32 else 53
    scaled = u * 2.0**bits
    assert torch.equal(scaled, scaled.floor())
    low = (scaled.remainder(256)).long().flatten()
    counts = torch.bincount(low, minlength=256).numpy()
    assert stats.chisquare(counts).pvalue > 0.001


def test_neighbouring_keys_and_entries_independent(device):
    # Pairs (u[n, j], u[n + 1, j]) of neighbouring keys and (u[n, j], u[n, j + 1])
    # of neighbouring entries: a 16 x 16 contingency table each (chi-square for
    # independence) and their correlation (z = r sqrt(n)).
    u = mvm_cuda.keyed_uniform(torch.arange(20_000, device=device), 8).cpu().double()
    bound = stats.norm.isf(0.001 / 4)
    for a, b in ((u[:-1], u[1:]), (u[:, :-1], u[:, 1:])):
        a, b = a.flatten(), b.flatten()
        table = torch.zeros(16, 16, dtype=torch.float64)
        table.index_put_(((a * 16).long(), (b * 16).long()), torch.ones_like(a), accumulate=True)
        assert stats.chi2_contingency(table.numpy()).pvalue > 0.001
        r = np.corrcoef(a.numpy(), b.numpy())[0, 1]
        assert abs(r) * math.sqrt(a.numel()) < bound


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def masks(keys):
        return mvm_cuda.keyed_uniform(keys, 10) < 0.5

    keys = torch.arange(5, device=device)
    assert torch.equal(torch.compile(masks, fullgraph=True)(keys), masks(keys))
