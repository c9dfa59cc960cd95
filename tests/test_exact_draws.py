"""The samplers' exact set path, taken when the number of draws c is large
against the rows (csrc/multinomial.h): its law, checked at fixed seeds against
the closed forms (row i is drawn with probability 1 - (1 - p_i)^c, rows i and
j together with 1 - (1 - p_i)^c - (1 - p_j)^c + (1 - p_i - p_j)^c, and a set S
of rows is exactly the drawn set with the inclusion-exclusion sum
sum_{T in S} (-1)^{|S| - |T|} p(T)^c), against the one-by-one path at the same
c, and its work, which must not grow with c (c up to 2^62 and 2^63 - 1 on a
(1, 1, 256, 1) input, through sample_rows, sap_sample and the Detector).

Every statistical check is a test at level ALPHA (Bonferroni over the checks of
a test) on draws from a fixed seed, so each test is deterministic and fails on a
sampler off by a few percent."""
from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from scipy import stats

import mvm_cuda
from conftest import installed_package_env
from mvm_cuda import reference

ALPHA = 1e-6
EXACT = reference.EXACT_DRAWS_PER_ROW


def _inclusion(p: float, c: int) -> float:
    return 1.0 if p >= 1.0 else -math.expm1(c * math.log1p(-p))


def _target_probs(pis, c, zeros=0):
    """(1, len(pis) + 1 + zeros) float64: rows drawn with probabilities pis in c
    draws, then a row with the rest of the mass, then `zeros` rows of p = 0."""
    p = [-math.expm1(math.log1p(-pi) / c) for pi in pis]
    p.append(1.0 - math.fsum(p))
    return torch.tensor([p + [0.0] * zeros], dtype=torch.float64)


def _drawn(sampler: str, p: torch.Tensor, c: int, n: int, device: str, seed: int) -> torch.Tensor:
    """(n, M) bool: the rows that `sampler` drew for n samples of the row p (1, M)."""
    m = p.shape[1]
    gen = torch.Generator(device).manual_seed(seed)
    p = p.to(device)
    if sampler == "own":  # a row of p per sample: the per-sample table
        out = mvm_cuda.sample_rows(torch.ones(n, m, 1, device=device), p.expand(n, m), c, generator=gen)
    elif sampler == "shared":  # one row of p for all samples: the shared table
        out = mvm_cuda.sample_rows(torch.ones(n, m, 1, device=device), p, c, generator=gen)
    elif sampler == "sap":  # entries weighted by |h|, r = round(frac * K) = c draws
        frac = c / m
        assert round(frac * m) == c
        out = mvm_cuda.sap_sample(p.expand(n, m).contiguous(), frac, generator=gen)
    elif sampler == "reference":
        out = reference.sample_rows(torch.ones(n, m, 1, device=device), p, c, generator=gen)
    else:
        raise AssertionError(sampler)
    return (out.reshape(n, m) != 0).cpu()


def _binomial_ok(count: int, n: int, prob: float, level: float) -> bool:
    return stats.binomtest(count, n, prob).pvalue > level


SAMPLERS = ["own", "shared", "sap", "reference"]
PIS = (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("c", [1000, 2**40, 2**62])
def test_inclusion_and_pairs_match_closed_forms(device, sampler, c):
    p = _target_probs(PIS, c)  # M = 8: c > 64 M for every c here (and a multiple of 8, as SAP's r needs)
    n = 20_000
    drawn = _drawn(sampler, p, c, n, device, seed=11)
    q = p[0].tolist()
    rows = range(len(PIS))
    pairs = list(itertools.combinations(rows, 2))
    level = ALPHA / (len(PIS) + 1 + len(pairs))
    counts = drawn.sum(0).tolist()
    for i in rows:
        assert _binomial_ok(counts[i], n, _inclusion(q[i], c), level), (i, counts[i] / n, _inclusion(q[i], c))
    assert counts[-1] == n  # the row of mass ~1
    for i, j in pairs:
        joint = _inclusion(q[i], c) + _inclusion(q[j], c) - _inclusion(q[i] + q[j], c)
        both = int((drawn[:, i] & drawn[:, j]).sum())
        assert _binomial_ok(both, n, joint, level), (i, j, both / n, joint)


def _set_probs(q, c):
    """P(drawn set == S) for every subset S of the rows with q > 0, by
    inclusion-exclusion, as {frozenset: probability}."""
    support = [i for i, v in enumerate(q) if v > 0]
    out = {}
    for size in range(1, len(support) + 1):
        for s in itertools.combinations(support, size):
            terms = [(-1) ** (size - k) * math.fsum(q[i] for i in t) ** c
                     for k in range(1, size + 1) for t in itertools.combinations(s, k)]
            out[frozenset(s)] = math.fsum(terms)
    return out


def _set_counts(drawn: torch.Tensor):
    counts = {}
    for row in drawn.tolist():
        s = frozenset(i for i, d in enumerate(row) if d)
        counts[s] = counts.get(s, 0) + 1
    return counts


def _fits(drawn: torch.Tensor, probs: dict) -> float:
    """The p-value of a chi-square goodness-of-fit test of the drawn sets
    against probs (sets of probability below 1e-4 pooled into one cell)."""
    counts = _set_counts(drawn)
    assert set(counts) <= set(probs), f"impossible sets drawn: {set(counts) - set(probs)}"
    n = drawn.shape[0]
    big = [s for s, v in probs.items() if v * n >= 5]
    observed = [counts.get(s, 0) for s in big]
    expected = [probs[s] * n for s in big]
    rest_e = n - sum(expected)
    if rest_e > 1e-9 * n:
        observed.append(n - sum(observed))
        expected.append(rest_e)
    return stats.chisquare(observed, expected).pvalue


@pytest.mark.parametrize("sampler", ["own", "shared", "sap"])
def test_exact_path_agrees_in_law_with_one_by_one_path(device, sampler):
    """At one c, three rows with p > 0 take the exact path (M = 3: c > 64 M)
    and, padded with rows of p = 0 (M = 8: c < 64 M), the one-by-one path;
    both must follow the exact law of the drawn set, and each other."""
    c = 200
    assert 3 * EXACT < c < 8 * EXACT
    q = [0.985, 0.01, 0.005]
    probs = _set_probs(q, c)
    exact_p = torch.tensor([q], dtype=torch.float64)
    padded_p = torch.tensor([q + [0.0] * 5], dtype=torch.float64)
    n = 40_000
    if sampler == "sap":  # SAP on the CPU counts only the nonzero entries: pad with tiny ones
        padded_p = torch.tensor([q + [1e-300] * 5], dtype=torch.float64)
    exact = _drawn(sampler, exact_p, c, n, device, seed=5)[:, :3]
    one_by_one = _drawn(sampler, padded_p, c, n, device, seed=6)[:, :3]
    assert _fits(exact, probs) > ALPHA / 3
    assert _fits(one_by_one, probs) > ALPHA / 3
    sets = sorted(set(_set_counts(exact)) | set(_set_counts(one_by_one)), key=sorted)
    table = [[_set_counts(d).get(s, 0) for s in sets] for d in (exact, one_by_one)]
    assert stats.chi2_contingency(table).pvalue > ALPHA / 3


@pytest.mark.parametrize("c", [1, 2, 3, 7])
def test_exact_scheme_law_at_small_c(c):
    """The scheme itself (the reference's drawn_rows_exact, which the kernels
    mirror), at small c where the rows' inclusions depend on each other most:
    the drawn set follows the inclusion-exclusion law exactly (a scheme that
    drew rows independently fails: at c = 1 exactly one row is drawn)."""
    q = [0.5, 0.3, 0.15, 0.05]
    gen = torch.Generator().manual_seed(c)
    drawn = reference.drawn_rows_exact(torch.tensor([q] * 50_000, dtype=torch.float64), c, gen)
    assert _fits(drawn, _set_probs(q, c)) > ALPHA
    assert int(drawn.sum(1).max()) <= c


def test_exact_path_never_draws_rows_of_zero_weight(device):
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]], dtype=torch.float64)
    for sampler in ("own", "shared", "reference"):
        drawn = _drawn(sampler, p, 10**6, 100, device, seed=1)
        assert not drawn[:, [0, 2, 4]].any() and drawn[:, [1, 3]].all()


def test_exact_path_honours_the_generator(device):
    p = _target_probs(PIS, 2**40)
    a = _drawn("own", p, 2**40, 64, device, seed=3)
    b = _drawn("own", p, 2**40, 64, device, seed=3)
    c = _drawn("own", p, 2**40, 64, device, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


# A child process runs every call with c up to 2^63 - 1 (or r = 2^62 draws)
# on a (1, 1, 256, 1) input and prints DONE; before the exact path, c = 2^40
# took about an hour and 2^62 never ended. The timeout is generous (a loaded
# machine, the import): the test asserts that the calls end, not a time.
TIMEOUT_S = 120
HUGE_C_SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import mvm_cuda
    from mvm_cuda.detector import Detector
    dev = sys.argv[1]
    torch.manual_seed(0)
    x = torch.ones(1, 1, 256, 1, device=dev)
    uniform = torch.full((1, 256), 1 / 256, dtype=torch.float64, device=dev)
    skewed = torch.full((1, 256), 1e-300, dtype=torch.float64, device=dev)
    skewed[0, 0] = 1.0  # rows that c = 2^62 draws still miss: one by one, the draws never stop early
    for c in (2**40, 2**62, 2**63 - 1):
        for p in (uniform, skewed):
            for n in (1, 4):  # a table per sample, a shared table
                out = mvm_cuda.sample_rows(x.repeat(n, 1, 1, 1), p, c)
                assert out.isfinite().all() and (out[:, 0, 0] == 1).all(), c
    h = torch.rand(1, 1, 256, 1, device=dev) + 0.1
    for r in (2**40, 2**62):
        out = mvm_cuda.sap_sample(h, r / 256)
        assert torch.equal(out, h), r
        mvm_cuda.reference.sap_sample(h, r / 256)
    mvm_cuda.reference.sample_rows(x, skewed, 2**62)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 3)).to(dev)
    images = torch.rand(2, 1, 16, 16, device=dev)
    for R in (1, 3, 8):  # R < 4: a row of p per sample
        scores = Detector(model, "mvm", c=2**62, R=R, progress=False).scores(images)
        assert scores.isfinite().all(), R
        scores = Detector(model, "sap", frac=2.0**53, R=R, progress=False).scores(images)  # r = 2^62
        assert scores.isfinite().all(), R
    print("DONE")
""")


def test_huge_c_returns(device, tmp_path):
    # Out of the repository root, so that the imported mvm_cuda is the one under test, not the source folder.
    proc = subprocess.run([sys.executable, "-c", HUGE_C_SCRIPT, device], capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=tmp_path, env=installed_package_env())
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr[-3000:]
