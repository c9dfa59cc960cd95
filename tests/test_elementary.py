"""csrc/elementary.h: the solver's own exp, expm1, log, log1p and the samplers'
inverse_inclusion, against torch's float64 functions (glibc's, within 1 ulp of
the exact value), through the internal test-only op mvm::_elementary."""
import math
import os
import subprocess
import sys

import pytest
import torch

import mvm_cuda  # noqa: F401  (loads the ops)

ELEM = torch.ops.mvm._elementary


def _ulps(a, b):
    """Distance in units in the last place between float64 tensors (equal NaN/inf: 0)."""
    def key(t):
        i = t.view(torch.int64)
        return torch.where(i < 0, torch.iinfo(torch.int64).min - i, i)
    d = (key(a) - key(b)).abs()
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, torch.zeros_like(d), d)


def _inputs(name):
    g = torch.Generator().manual_seed(0)
    u = lambda lo, hi, n=200_000: lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 5e-324, -5e-324,
                            2.2250738585072014e-308, 1.7976931348623157e308, 1e-300, -1e-300], dtype=torch.float64)
    if name == "exp":
        parts = [u(-746, 710), u(-1, 1), u(-1e-6, 1e-6), torch.tensor([709.78, 709.79, -745.13, -745.14, -708.5])]
    elif name == "expm1":
        parts = [u(-50, 710), u(-1, 1), torch.sign(u(-1, 1)) * 10.0 ** u(-320, 1), torch.tensor([-37.0, -38.0, -800.0])]
    elif name == "log":
        parts = [10.0 ** u(-307, 308), u(0.5, 2), u(1 - 1e-6, 1 + 1e-6), 5e-324 * torch.randint(1, 2**52, (200_000,), generator=g).double()]
    else:  # log1p
        parts = [10.0 ** u(-320, 308), -(10.0 ** u(-320, 0)), u(-1, 1), u(-1e-6, 1e-6), torch.tensor([-2.0])]
    return torch.cat(parts + [special])


# Largest distance to torch's result: glibc's functions are within 1 ulp of the
# exact value, so a function within 1 ulp itself may be 2 away from them.
@pytest.mark.parametrize("name,bound", [("exp", 1), ("expm1", 2), ("log", 1), ("log1p", 1)])
def test_matches_torch_within_ulps(name, bound):
    x = _inputs(name)
    got = ELEM(x, name)
    want = getattr(torch, name)(x)
    assert torch.equal(got.isnan(), want.isnan())
    assert int(_ulps(got, want).max()) <= bound
    # Special values exactly, signed zeros included.
    for v in [0.0, -0.0, math.inf, -math.inf]:
        t = torch.tensor([v], dtype=torch.float64)
        a, b = ELEM(t, name), getattr(torch, name)(t)
        assert torch.equal(a.isnan(), b.isnan()) and (a.isnan().all() or a.view(torch.int64) == b.view(torch.int64))


@pytest.mark.parametrize("c", [1.0, 2.0, 392.0, 1e6])
def test_inverse_inclusion(c):
    g = torch.Generator().manual_seed(int(c))
    p = torch.cat([10.0 ** (-18 * torch.rand(100_000, generator=g, dtype=torch.float64)),
                   torch.rand(100_000, generator=g, dtype=torch.float64)])
    got = ELEM(p, "inverse_inclusion", c)
    want = 1.0 / -torch.expm1(c * torch.log1p(-p))
    # Both roundings of c log1p(-p) are amplified by up to |c log1p(-p)| in expm1: relative, not ulps.
    assert ((got - want) / want).abs().max() <= 2e-15
    # Tiny c p: 1 / (c p) to rounding, where the naive 1 - (1 - p)^c has no digits left.
    tiny = torch.tensor([1e-300, 1e-20], dtype=torch.float64)
    assert torch.allclose(ELEM(tiny, "inverse_inclusion", c), 1.0 / (c * tiny), rtol=1e-13)  # + (c - 1) p / 2
    edge = ELEM(torch.tensor([1.0, 2.0, 0.0, -1.0, math.nan], dtype=torch.float64), "inverse_inclusion", c)
    assert edge[:2].tolist() == [1.0, 1.0] and edge[2:4].tolist() == [math.inf, math.inf] and edge[4].isnan()


@pytest.mark.parametrize("name,lo,hi,want", [
    ("exp_neg_f", -87.0, 0.0, torch.exp), ("expm1_neg_f", -30.0, 0.0, torch.expm1),
    ("log1p_unit_f", 0.0, 1.0, torch.log1p)])
def test_float_warm_start_pieces(name, lo, hi, want):
    # The solver's float warm start: within a few float ulps (its f32 steps
    # then land near float's resolution), over the range the solver uses.
    g = torch.Generator().manual_seed(1)
    x = torch.cat([lo + (hi - lo) * torch.rand(100_000, generator=g, dtype=torch.float64),
                   torch.tensor([lo, hi], dtype=torch.float64)]).float().double()
    exact = want(x)
    rel = ((ELEM(x, name) - exact) / exact.abs().clamp_min(torch.finfo(torch.float32).tiny)).abs()
    assert rel.max() <= 2 * torch.finfo(torch.float32).eps


def test_bad_name():
    with pytest.raises(RuntimeError, match="name must be"):
        ELEM(torch.zeros(2, dtype=torch.float64), "sin")


_BITS_SCRIPT = """
import sys, torch, mvm_cuda
x = torch.load(sys.argv[1])
names = ("exp", "expm1", "log", "log1p", "inverse_inclusion", "exp_neg_f", "expm1_neg_f", "log1p_unit_f")
out = {n: torch.ops.mvm._elementary(x, n, 392.0) for n in names}
torch.save(out, sys.argv[2])
"""


def test_same_bits_in_plain_and_default_isa(tmp_path):
    # The AVX2 loops and MVM_CPU_ISA=default's plain ones give the same bits.
    x = torch.cat([_inputs(n)[::7] for n in ("exp", "expm1", "log", "log1p")])
    x = torch.cat([x, torch.rand(1000, dtype=torch.float64)])
    torch.save(x, tmp_path / "x.pt")
    outs = []
    for isa in ("default", ""):
        env = dict(os.environ, MVM_CPU_ISA=isa)
        out = tmp_path / f"out{isa}.pt"
        # cwd: not the source folder, which has no _C.
        subprocess.run([sys.executable, "-c", _BITS_SCRIPT, str(tmp_path / "x.pt"), str(out)], env=env, check=True,
                       cwd=tmp_path)
        outs.append(torch.load(out))
    for name in outs[0]:
        assert torch.equal(outs[0][name].view(torch.int64), outs[1][name].view(torch.int64)), name
