"""Property tests (hypothesis): every op against its oracle and its invariants
on drawn shapes, strides, dtypes, c, p and alpha, including zeros, huge and
tiny magnitudes, one-hot p, p with many exact zeros, and NaN / inf where an op
documents them as an error.

Profiles (chosen with the environment variable MVM_HYPOTHESIS_PROFILE):
  ci    (default) few examples per property, derandomized (the same examples on
        every run, no example database), so CI is deterministic and the file
        runs in well under a minute on two cores.
  long  25x more examples, randomized, for a local bug hunt:
            MVM_HYPOTHESIS_PROFILE=long pytest tests/test_properties.py -q
        (a failure prints the @reproduce_failure blob to replay it).

The oracles: an exact projection in rational arithmetic (fractions.Fraction,
so it neither overflows nor rounds), reference.mvm_step's arithmetic followed
by that exact projection, reference.solve_mvm / reference.variance, and
reference.inclusion_prob for the sampler's scale. All CPU: the value checks
(NaN / inf) always run there."""
from __future__ import annotations

import math
import os
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import mvm_cuda
from mvm_cuda import reference as ref

_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# No shrinking in CI: a failure reports the first failing example at once
# (shrinking these many-float examples can take minutes).
settings.register_profile("mvm-ci", max_examples=60, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON)
settings.register_profile("mvm-long", max_examples=1500, derandomize=False, **_COMMON)
PROFILE = os.environ.get("MVM_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"MVM_HYPOTHESIS_PROFILE must be 'ci' or 'long', got {PROFILE!r}")
_BASE = settings.get_profile(f"mvm-{PROFILE}")


def _settings(scale: float = 1.0) -> settings:
    """The profile's settings, with `scale` times its number of examples (the
    expensive properties run fewer)."""
    return settings(_BASE, max_examples=max(5, int(_BASE.max_examples * scale)))


F64 = torch.float64
FLOAT_DTYPES = [torch.float32, torch.float64]
X_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EPS64 = torch.finfo(F64).eps


def _tiny(dtype):
    """The smallest positive subnormal of dtype."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


# ----------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------

def _decades(max_exp: int):
    """Positive floats spread over decades 10^-max_exp .. 10^max_exp."""
    return st.builds(lambda m, e: m * 10.0 ** e, st.floats(1.0, 9.99), st.integers(-max_exp, max_exp))


def _magnitudes(dtype, huge: bool):
    """Non-negative values: exact zeros, ones, tiny and huge magnitudes."""
    special = [0.0, 1.0, 0.5, 1e-30, 1e30, 1e-12]
    if dtype == F64 and huge:
        special += [5e-324, 1e-300, 1e300, 1e308]
    return st.one_of(st.sampled_from(special), _decades(30), st.floats(0.0, 10.0))


def _signed(dtype, huge: bool):
    return st.builds(lambda m, s: s * m, _magnitudes(dtype, huge), st.sampled_from([1.0, -1.0]))


@st.composite
def _rows(draw, n_rows: int, n: int, elem, structured: bool = True):
    """n_rows lists of n floats: independent entries, or a structured row
    (ties, a single nonzero, all mass on the last entry, mostly zeros)."""
    out = []
    for _ in range(n_rows):
        kind = draw(st.sampled_from(["free", "free", "ties", "one_hot", "last", "sparse"]) if structured
                    else st.just("free"))
        if kind == "free":
            row = draw(st.lists(elem, min_size=n, max_size=n))
        elif kind == "ties":
            row = [draw(elem)] * n
        elif kind == "one_hot":
            row = [0.0] * n
            row[draw(st.integers(0, n - 1))] = draw(elem)
        elif kind == "last":
            row = [0.0] * n
            row[-1] = draw(elem)
        else:  # many exact zeros
            row = [draw(elem) if draw(st.integers(0, 4)) == 0 else 0.0 for _ in range(n)]
        out.append(row)
    return out


def _with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values with other strides: contiguous, last dim not innermost, or a
    non-dense view (every other element of a larger buffer)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "lastdim_outer":
        return t.movedim(-1, 0).contiguous().movedim(0, -1)
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


LAYOUTS = ["contiguous", "lastdim_outer", "strided"]
DRAWS = st.one_of(st.integers(1, 12), st.sampled_from([1, 2, 3, 100, 1000, 10**4, 10**5, 10**6]))


# ----------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------

def _exact_projection(rows, z: float) -> torch.Tensor:
    """Euclidean projection of each row onto {p >= 0, sum p = z} in exact
    rational arithmetic, rounded once to float64 at the end."""
    zf = Fraction(z)
    out = []
    for row in rows:
        fv = [Fraction(v) for v in row]
        total, best = Fraction(0), None
        for k, u in enumerate(sorted(fv, reverse=True), 1):
            total += u
            if u - (total - zf) / k > 0:
                best = (total - zf) / k
        out.append([float(max(v - best, Fraction(0))) for v in fv])
    return torch.tensor(out, dtype=F64)


def _check_on_simplex(out: torch.Tensor, z: float, name: str):
    """Finite, >= 0, and every row sums to z to within the rounding of out's dtype."""
    assert torch.isfinite(out).all(), f"{name}: non-finite output {out}"
    assert (out >= 0).all(), f"{name}: negative output {out}"
    n = out.shape[-1]
    sums = out.double().sum(-1)
    tol = 4 * n * torch.finfo(out.dtype).eps * z + n * _tiny(out.dtype)
    assert ((sums - z).abs() <= tol).all(), f"{name}: rows sum to {sums} instead of {z} (tol {tol})"


# ----------------------------------------------------------------------------
# project_simplex
# ----------------------------------------------------------------------------

def _check_projection(v: torch.Tensor, z: float):
    out = mvm_cuda.project_simplex(v, z)
    assert out.shape == v.shape and out.dtype == v.dtype and out.is_contiguous()
    n = v.shape[-1]
    rows = v.double().reshape(-1, n)
    flat = out.reshape(-1, n)
    _check_on_simplex(flat, z, "project_simplex")
    # Exact to float rounding: the support lies within z of the largest entry,
    # so an error of a few ulps of z per entry is reachable whatever |v|.
    exact = _exact_projection(rows.tolist(), z)
    tol = 4 * n * EPS64 * z + torch.finfo(v.dtype).eps * z + _tiny(v.dtype)
    err = (flat.double() - exact).abs().max().item()
    assert err <= tol, f"project_simplex off the exact projection by {err} (tol {tol}):\n{flat}\n{exact}"
    # Equal entries get equal shares, and the order of v is kept.
    bigger = rows[:, :, None] > rows[:, None, :]
    assert (flat[:, :, None] >= flat[:, None, :])[bigger].all()
    # The reference (sort + cumsum) where its cumulative sums cannot overflow,
    # with its own tolerance (a few ulps of the largest input).
    if rows.abs().max().item() * n < 1e300:
        oracle = ref.project_simplex(rows, z)
        scale = max(1.0, rows.abs().max().item(), z)
        tol_ref = 4 * n * (torch.finfo(v.dtype).eps if v.dtype == torch.float32 else EPS64) * scale
        assert (flat.double() - oracle).abs().max().item() <= tol_ref


@_settings()
@given(data=st.data())
def test_project_simplex_property(data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    lead = data.draw(st.lists(st.integers(1, 3), max_size=2), label="lead")
    n = data.draw(st.integers(1, 24), label="n")
    rows = data.draw(_rows(math.prod(lead), n, _signed(dtype, huge=True)), label="rows")
    z = data.draw(st.one_of(st.sampled_from([1.0, 2.5, 1e-30, 1e30]), st.floats(1e-6, 1e6)), label="z")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    v = _with_layout(torch.tensor(rows, dtype=F64).reshape(*lead, n).to(dtype), layout)
    assume(torch.isfinite(v).all())  # float32 overflow of huge draws
    _check_projection(v, z)


EDGE_PROJECTIONS = [
    ([[1e308, 1e308, 1e308]], 1.0),  # the sum of the entries overflows
    ([[-1e308, -1e308]], 1.0),
    ([[-1e308, -1e308, -1e308 + 1e292]], 1.0),
    ([[1e30, 1e30, 1e30]], 1.0),  # ties far above z: z / 3 each
    ([[1e30] * 7], 1.0),
    ([[1e308, -1e308, 5e-324, 0.0]], 1.0),
    ([[5e-324, 5e-324, 0.0]], 1.0),
    ([[1e6, 1e6, -1e6], [5.0, 5.0, 5.0]], 1.0),
    ([[0.0, 0.0, 0.0, 0.0]], 1e-30),
    ([[1.0, 2.0, 3.0]], 1e30),
]


@pytest.mark.parametrize("case", range(len(EDGE_PROJECTIONS)))
def test_project_simplex_edge_cases(case):
    rows, z = EDGE_PROJECTIONS[case]
    _check_projection(torch.tensor(rows, dtype=F64), z)


def test_project_simplex_empty_batch():
    assert mvm_cuda.project_simplex(torch.empty(0, 5, dtype=F64)).shape == (0, 5)


# ----------------------------------------------------------------------------
# mvm_step
# ----------------------------------------------------------------------------

def _prob_rows(draw, n_rows, n, dtype, huge=False):
    """Probability vectors (float64 lists): drawn weights, normalised."""
    rows = draw(_rows(n_rows, n, _magnitudes(dtype, huge)))
    out = []
    for row in rows:
        if not any(w > 0 for w in row):
            row = list(row)
            row[draw(st.integers(0, n - 1))] = 1.0
        t = torch.tensor(row, dtype=F64)
        t = t / t.max()  # first: a sum of weights near 1e308 overflows
        out.append((t / t.sum()).tolist())
    return out


def _check_mvm_step(p, alpha, c, lr):
    out = mvm_cuda.mvm_step(p, alpha, c, lr)
    assert out.shape == p.shape and out.dtype == p.dtype and out.is_contiguous()
    n = p.shape[-1]
    flat = out.reshape(-1, n)
    # Valid (finite, non-negative) input gives a point on the simplex, always.
    _check_on_simplex(flat, 1.0, "mvm_step")
    pd, ad = p.double().reshape(-1, n), alpha.double().reshape(-1, n)
    step = torch.where(ad > 0, lr * ad * ref.grad_factor(pd, c), torch.zeros_like(pd))
    r = pd + step
    if torch.isfinite(r).all():
        # reference.mvm_step's arithmetic, then the exact projection. The step
        # is computed with libm here and torch there: allow a few ulps of it.
        exact = _exact_projection(r.tolist(), 1.0)
        tol = 4 * n * EPS64 + 16 * EPS64 * step.abs().max().item() + torch.finfo(p.dtype).eps + _tiny(p.dtype)
        err = (flat.double() - exact).abs().max().item()
        assert err <= tol, f"mvm_step off by {err} (tol {tol})"
        if r.abs().max().item() * n < 1e300:
            expected = ref.mvm_step(pd, ad, c, lr)
            tol_ref = tol + 4 * n * EPS64 * r.abs().max().item()
            assert (flat.double() - expected).abs().max().item() <= tol_ref


@_settings()
@given(data=st.data())
def test_mvm_step_property(data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    lead = data.draw(st.lists(st.integers(1, 3), max_size=2), label="lead")
    n = data.draw(st.integers(1, 16), label="n")
    rows = math.prod(lead)
    p = torch.tensor(_prob_rows(data.draw, rows, n, dtype), dtype=F64)
    alpha = torch.tensor(data.draw(_rows(rows, n, _magnitudes(dtype, huge=False)), label="alpha"), dtype=F64)
    c = data.draw(DRAWS, label="c")
    lr = data.draw(st.one_of(st.sampled_from([0.0, 1e-12, 1e-6, 1e-3, 1.0]), st.floats(0.0, 10.0)), label="lr")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    p = _with_layout(p.reshape(*lead, n).to(dtype), layout)
    alpha = _with_layout(alpha.reshape(*lead, n).to(dtype), layout)
    _check_mvm_step(p, alpha, c, lr)


EDGE_STEPS = [
    # (p, alpha, c, lr)
    ([[0.5, 0.5]], [[1e300, 1.0]], 1, 1e10),  # the step overflows to inf
    ([[0.0, 0.5, 0.5]], [[1.0, 1.0, 0.0]], 3, 1e-6),  # p = 0 where alpha > 0
    ([[1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]], 5, 1.0),  # nothing moves
    ([[0.25] * 4], [[1e30, 1e-30, 0.0, 1.0]], 10**6, 1.0),
]


@pytest.mark.parametrize("case", range(len(EDGE_STEPS)))
def test_mvm_step_edge_cases(case):
    p, alpha, c, lr = EDGE_STEPS[case]
    _check_mvm_step(torch.tensor(p, dtype=F64), torch.tensor(alpha, dtype=F64), c, lr)


# ----------------------------------------------------------------------------
# solve_mvm
# ----------------------------------------------------------------------------

def _check_solution(p, alpha, name):
    """Shape, dtype, on the simplex, zero exactly where alpha is 0 (uniform for
    an all-zero row, one-hot for a single nonzero), positive where alpha > 0."""
    assert p.shape == alpha.shape and p.dtype == alpha.dtype and p.is_contiguous(), name
    m = alpha.shape[-1]
    a, q = alpha.reshape(-1, m), p.reshape(-1, m)
    _check_on_simplex(q, 1.0, name)
    nnz = (a > 0).sum(-1)
    dead = nnz == 0
    assert (q[dead] == torch.tensor(1.0 / m, dtype=p.dtype)).all(), f"{name}: dead row not uniform"
    live = ~dead
    assert (q[live][a[live] == 0] == 0).all(), f"{name}: p > 0 where alpha = 0"
    assert (q[live][a[live] > 0] > 0).all(), f"{name}: p = 0 where alpha > 0"
    one = nnz == 1
    assert torch.equal(q[one], (a[one] > 0).to(p.dtype)), f"{name}: single nonzero not one-hot"


def _check_solve(alpha, c):
    m = alpha.shape[-1]
    a = alpha.double().reshape(-1, m)
    p_kkt = mvm_cuda.solve_mvm(alpha, c, "kkt")
    p_pgd = mvm_cuda.solve_mvm(alpha, c, "pgd")
    _check_solution(p_kkt, alpha, "kkt")
    _check_solution(p_pgd, alpha, "pgd")
    v_kkt = ref.variance(p_kkt.double().reshape(-1, m), a, c)
    v_pgd = ref.variance(p_pgd.double().reshape(-1, m), a, c)
    v_uni = ref.variance(torch.full_like(a, 1.0 / m), a, c)
    # float32 output moves V by up to ~ (c p) eps32 relative; float64 by rounding.
    rtol = 1e-3 if alpha.dtype == torch.float32 else 1e-9
    # The reference's optimum stored in alpha's dtype, as the kernels' is: a float32 p
    # near 1 cannot hold 1 - p, which V may hang on (one row holding almost all the mass).
    v_ref = ref.variance(ref.solve_mvm(a, c, "kkt").to(alpha.dtype).double(), a, c)
    values = f"c {c}, V: kkt {v_kkt.tolist()} pgd {v_pgd.tolist()} uniform {v_uni.tolist()} reference {v_ref.tolist()}"
    assert (v_kkt <= v_uni * (1 + rtol)).all(), "kkt worse than uniform p: " + values
    assert (v_pgd <= v_uni * (1 + rtol)).all(), "pgd worse than uniform p: " + values
    assert (v_kkt <= v_pgd * (1 + rtol)).all(), "kkt (exact) worse than pgd: " + values
    # The reference's bisection KKT solver reaches the same optimum.
    assert (v_kkt <= v_ref * (1 + max(rtol, 1e-6))).all(), "kkt worse than reference.solve_mvm: " + values


@_settings(0.5)
@given(data=st.data())
def test_solve_mvm_property(data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    lead = data.draw(st.lists(st.integers(1, 3), max_size=2), label="lead")
    m = data.draw(st.integers(1, 24), label="m")
    rows = data.draw(_rows(math.prod(lead), m, _magnitudes(dtype, huge=False)), label="alpha")
    c = data.draw(DRAWS, label="c")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    alpha = _with_layout(torch.tensor(rows, dtype=F64).reshape(*lead, m).to(dtype), layout)
    _check_solve(alpha, c)


EDGE_SOLVES = [
    ([[1e30, 1e-30, 1.0, 0.0]], 1),
    ([[1e30, 1e-30, 1.0, 0.0]], 7),
    ([[1e300, 1e-300, 1.0]], 1000),
    ([[5e-324, 5e-324, 1.0]], 3),
    ([[0.0, 0.0, 0.0]], 5),
    ([[0.0, 2.0, 0.0]], 5),
    ([[1.0] * 16], 10**6),
    # One row holds almost all the mass: sum p barely moves with the others.
    ([[2e28, 0.0, 1.0, 1.0, 0.6414, 0.6414]], 3),
]


@pytest.mark.parametrize("case", range(len(EDGE_SOLVES)))
def test_solve_mvm_edge_cases(case):
    alpha, c = EDGE_SOLVES[case]
    _check_solve(torch.tensor(alpha, dtype=F64), c)


def test_solve_mvm_float32_row_near_one():
    # Hypothesis's find: in float32, p of the heavy row rounds to within 6e-8 of 1.
    _check_solve(torch.tensor([[2.00001e28, 0.0, 1.0, 1.0, 0.6414299, 0.6414299]], dtype=torch.float32), 3)


# ----------------------------------------------------------------------------
# sample_rows
# ----------------------------------------------------------------------------

def _x_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """x (N, H, W, C) with the given memory layout; 3-d layouts are (N, H*W, C)."""
    n, h, w, ch = values.shape
    if layout == "nhwc":
        return values.contiguous()
    if layout == "nchw_view":  # the NHWC view of an NCHW tensor
        return values.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    if layout == "strided":  # not dense: every other channel of a larger buffer
        return _with_layout(values, "strided")
    if layout == "3d":
        return values.reshape(n, h * w, ch).contiguous()
    return values.reshape(n, h * w, ch).transpose(1, 2).contiguous().transpose(1, 2)  # "3d_channels_outer"


X_LAYOUTS = ["nhwc", "nchw_view", "strided", "3d", "3d_channels_outer"]


def _check_sample_rows(x, p, c, seed):
    n = x.shape[0]
    m = p.shape[1]
    ch = x.shape[-1]
    out = mvm_cuda.sample_rows(x, p, c, generator=torch.Generator().manual_seed(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or x.dim() == 3 and x.transpose(1, 2).is_contiguous():
        assert out.stride() == x.stride()
    again = mvm_cuda.sample_rows(x, p, c, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(again, out, rtol=0, atol=0, equal_nan=True)  # same seed, same draws

    xr = x.reshape(n, m, ch).double()
    o = out.reshape(n, m, ch).double()
    probs = p.double().repeat(n // p.shape[0], 1)  # sample k uses p[k % P]
    scale = 1.0 / ref.inclusion_prob(probs, c)
    exact = xr * scale[..., None]
    info = torch.finfo(x.dtype)
    tol = 2 * info.eps * exact.abs() + _tiny(x.dtype)
    close = (o - exact).abs() <= tol
    close |= torch.isnan(o) & torch.isnan(exact)
    close |= torch.isinf(o) & (o == exact)
    overflow = exact.abs() >= info.max * (1 - 2 * info.eps)  # rounds to +-inf or the largest float
    close |= overflow & ((o.abs() == math.inf) | ((o - exact).abs() <= tol)) & ((o > 0) == (exact > 0))
    zero_row = (o == 0).all(-1)
    scaled_row = close.all(-1)
    bad = ~(zero_row | scaled_row)
    assert not bad.any(), f"rows neither 0 nor x/pi: {bad.nonzero().tolist()}\nout {o[bad]}\nx/pi {exact[bad]}"
    assert zero_row[probs == 0].all(), "a row with p = 0 was drawn"
    kept = (o != 0).any(-1)  # NaN != 0: a kept NaN row counts
    support = (probs > 0).sum(-1)
    assert (kept.sum(-1) <= torch.clamp(support, max=c)).all(), "more distinct rows than draws"
    visible = (xr != 0).any(-1).all(-1)  # every row of x nonzero: a kept row shows
    assert (kept.sum(-1)[visible] >= 1).all(), "no row kept"


@_settings()
@given(data=st.data())
def test_sample_rows_property(data):
    dtype = data.draw(st.sampled_from(X_DTYPES), label="x dtype")
    p_dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="p dtype")
    P = data.draw(st.integers(1, 3), label="P")
    reps = data.draw(st.integers(1, 3), label="N / P")
    h, w, ch = (data.draw(st.integers(1, 4), label=k) for k in ("H", "W", "C"))
    m = h * w
    p = torch.tensor(_prob_rows(data.draw, P, m, p_dtype, huge=p_dtype == F64), dtype=F64).to(p_dtype)
    values = data.draw(st.lists(_signed(F64, huge=False), min_size=P * reps * m * ch, max_size=P * reps * m * ch),
                       label="x")
    x = torch.tensor(values, dtype=F64).reshape(P * reps, h, w, ch)
    special = data.draw(st.sampled_from(["none", "none", "nan", "inf"]), label="x special")
    if special != "none":  # documented: undrawn rows are 0 even where x is NaN or inf
        k = data.draw(st.integers(0, x.numel() - 1))
        x.view(-1)[k] = math.nan if special == "nan" else -math.inf
    x = _x_layout(x.to(dtype), data.draw(st.sampled_from(X_LAYOUTS), label="layout"))
    c = data.draw(DRAWS, label="c")
    _check_sample_rows(x, p, c, data.draw(st.integers(0, 2**32), label="seed"))


EDGE_SAMPLES = [
    # (p row, c): all mass on the last row, a single nonzero, mass spread over
    # 1e-30 entries, and many draws over few rows.
    ([0.0, 0.0, 0.0, 1.0], 5),
    ([0.0, 1.0, 0.0, 0.0], 10**6),
    ([1e-30, 1e-30, 1.0 - 2e-30, 0.0], 10**5),
    ([0.25, 0.25, 0.25, 0.25], 10**6),
    ([1e-9, 0.5 - 1e-9, 0.5, 0.0], 1),
]


@pytest.mark.parametrize("dtype", X_DTYPES)
@pytest.mark.parametrize("case", range(len(EDGE_SAMPLES)))
def test_sample_rows_edge_cases(case, dtype):
    prow, c = EDGE_SAMPLES[case]
    g = torch.Generator().manual_seed(case)
    x = (torch.rand(6, 2, 2, 3, generator=g, dtype=F64) + 0.5).to(dtype)
    _check_sample_rows(x, torch.tensor([prow], dtype=F64), c, seed=case)


# ----------------------------------------------------------------------------
# NaN / inf: a clear error naming the argument (the value checks always run on CPU)
# ----------------------------------------------------------------------------

BAD = st.sampled_from([math.nan, math.inf, -math.inf])


@_settings()
@given(data=st.data())
def test_nan_and_inf_are_rejected_naming_the_argument(data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    op = data.draw(st.sampled_from(["project_simplex:v", "mvm_step:p", "mvm_step:alpha", "solve_mvm:alpha",
                                    "sample_rows:p"]), label="op")
    bad = data.draw(BAD, label="bad value")
    rows = data.draw(st.integers(1, 3), label="rows")
    m = data.draw(st.integers(1, 12), label="m")
    k = data.draw(st.integers(0, rows * m - 1), label="position")
    prob = torch.full((rows, m), 1.0 / m, dtype=dtype)
    alpha = torch.ones(rows, m, dtype=dtype)

    def poison(t):
        t = t.clone()
        t.view(-1)[k] = bad
        return t

    name, arg = op.split(":")
    if op == "project_simplex:v":
        call = lambda: mvm_cuda.project_simplex(poison(alpha))  # noqa: E731
    elif op == "mvm_step:p":
        call = lambda: mvm_cuda.mvm_step(poison(prob), alpha, 3, 0.1)  # noqa: E731
    elif op == "mvm_step:alpha":
        call = lambda: mvm_cuda.mvm_step(prob, poison(alpha), 3, 0.1)  # noqa: E731
    elif op == "solve_mvm:alpha":
        method = data.draw(st.sampled_from(["kkt", "pgd"]), label="method")
        call = lambda: mvm_cuda.solve_mvm(poison(alpha), 3, method, 10**9, 0.0)  # noqa: E731
    else:
        x = torch.ones(rows * data.draw(st.integers(1, 2)), m, 2)
        call = lambda: mvm_cuda.sample_rows(x, poison(prob), 3)  # noqa: E731
    # -inf in p or alpha may be reported as negative: either way the message names the argument.
    with pytest.raises((RuntimeError, ValueError), match=rf"mvm::{name}: {arg} must be (finite|non-negative)"):
        call()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("lr", ["lr", "z"])
def test_nan_and_inf_scalars_are_rejected(bad, lr):
    prob = torch.full((1, 4), 0.25, dtype=F64)
    if lr == "lr":
        with pytest.raises(RuntimeError, match="mvm::mvm_step: lr must be finite"):
            mvm_cuda.mvm_step(prob, prob, 3, bad)
    else:
        with pytest.raises(RuntimeError, match="mvm::project_simplex: z must be finite"):
            mvm_cuda.project_simplex(prob, bad)
    with pytest.raises(RuntimeError, match="mvm::solve_mvm: tol must be finite"):
        mvm_cuda.solve_mvm(prob, 3, "pgd", 10, bad)


def test_sample_rows_checks_p_even_for_an_empty_batch():
    # "Value checks always run on the CPU": a NaN p is an error whatever x is.
    p = torch.full((1, 4), math.nan, dtype=F64)
    for x in (torch.empty(0, 4, 3), torch.empty(2, 4, 0)):
        with pytest.raises(RuntimeError, match="mvm::sample_rows: p must be finite"):
            mvm_cuda.sample_rows(x, p, 3)
