"""No op can hang: every iterative loop (the projection's threshold search,
both solvers with max_iter = 10**9 and tol = 0, the sampler's search) ends on
adversarial input, NaN included, with a result or a clear error.

Each group of cases runs in a child process (sys.executable) under a timeout
of TIMEOUT_S seconds; the child prints "START <case>" before and "END <case>
..." after every case, so a hang names the case that hung. On the CPU the
value checks always run, so NaN / inf input must be an error naming the
argument; on CUDA (skipped without a GPU) the same cases run with the value
checks off, where NaN reaches the loops, and must simply end."""
from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

TIMEOUT_S = 60
HERE = pathlib.Path(__file__).resolve().parent
NAN, INF = math.nan, math.inf
BIG_ITER = 10**9
F64 = torch.float64


def _t(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


def _one_hot_p(m, i, dtype=F64):
    p = torch.zeros(1, m, dtype=dtype)
    p[0, i] = 1.0
    return p


def _alpha_decades(b, m, decades, seed):
    g = torch.Generator().manual_seed(seed)
    return 10.0 ** (-decades * torch.rand(b, m, generator=g, dtype=F64))


def _cases():
    """name -> (fn(device), expected): expected is "result" or a regex the
    CPU error must match. Built lazily (in the child)."""
    import mvm_cuda as mc

    def solve(alpha, c, method):
        return lambda d: mc.solve_mvm(alpha.to(d), c, method, BIG_ITER, 0.0)

    cases = {}
    adversarial_alpha = {
        "nan": (_t([[1.0, NAN, 2.0]]), "alpha must be finite"),
        "all_nan": (_t([[NAN, NAN, NAN, NAN]]), "alpha must be finite"),
        "inf": (_t([[1.0, INF, 0.0]]), "alpha must be finite"),
        "huge": (_t([[1e308, 1e308, 1e300, 1.0]]), "result"),
        "tiny": (_t([[5e-324, 1e-320, 1e-300, 0.0]]), "result"),
        "huge_and_tiny": (_t([[1e300, 1e-300, 5e-324, 1.0]]), "result"),
        "float32_extremes": (_t([[3.4e38, 1e-45, 1.0, 0.0]], torch.float32), "result"),
        "equal": (torch.full((1, 100), 7.0, dtype=F64), "result"),
        "moderate_m64": (_alpha_decades(2, 64, 3, 0), "result"),
    }
    for name, (alpha, expected) in adversarial_alpha.items():
        for c in (1, 3, 10**9):
            for method in ("kkt", "pgd"):
                cases[f"solve_mvm[{method},alpha={name},c={c}]"] = (solve(alpha, c, method), expected)
    cases["solve_mvm[kkt,alpha=16_decades_m4096,c=100000]"] = (solve(_alpha_decades(2, 4096, 16, 1), 10**5, "kkt"), "result")
    cases["solve_mvm[kkt,alpha=16_decades_m4096,c=1]"] = (solve(_alpha_decades(2, 4096, 16, 2), 1, "kkt"), "result")

    vectors = {
        "nan": ([[1.0, NAN, 0.0]], "v must be finite"),
        "all_nan": ([[NAN] * 5], "v must be finite"),
        "inf": ([[INF, 1.0]], "v must be finite"),
        "-inf": ([[-INF, 1.0]], "v must be finite"),
        "max_double": ([[1e308, 1e308, 1e308]], "result"),
        "min_double": ([[-1e308, -1e308]], "result"),
        "mixed_extremes": ([[1e308, -1e308, 5e-324, -5e-324, 0.0]], "result"),
        "denormals": ([[5e-324, 1e-310, -1e-310, 0.0]], "result"),
        "ties": ([[1e30] * 64], "result"),
    }
    for name, (rows, expected) in vectors.items():
        cases[f"project_simplex[v={name}]"] = ((lambda v: lambda d: mc.project_simplex(v.to(d)))(_t(rows)), expected)
    g = torch.Generator().manual_seed(3)
    spread = (torch.randn(4, 100_000, generator=g, dtype=F64) * 10.0 ** torch.randint(-300, 300, (4, 100_000), generator=g)).clamp(-1e307, 1e307)
    cases["project_simplex[v=300_decades_n100000]"] = (lambda d: mc.project_simplex(spread.to(d)), "result")

    p4 = torch.full((1, 3), 1 / 3, dtype=F64)
    a4 = _t([[1.0, 2.0, 3.0]])
    cases["mvm_step[p=nan]"] = (lambda d: mc.mvm_step(_t([[NAN, 0.5, 0.5]]).to(d), a4.to(d), 3, 0.1), "p must be finite")
    cases["mvm_step[alpha=nan]"] = (lambda d: mc.mvm_step(p4.to(d), _t([[NAN, 1.0, 1.0]]).to(d), 3, 0.1), "alpha must be finite")
    cases["mvm_step[step_overflows]"] = (lambda d: mc.mvm_step(p4.to(d), _t([[1e308, 1e308, 1.0]]).to(d), 1, 1e300), "result")

    x = torch.rand(4, 3, 3, 2, generator=g) + 0.5
    m = 9

    def sample(p, c, xx=x):
        return lambda d: mc.sample_rows(xx.to(d), p.to(d), c, generator=torch.Generator(device=d).manual_seed(0))

    cases["sample_rows[p=one_hot_first,c=10**7]"] = (sample(_one_hot_p(m, 0), 10**7), "result")
    cases["sample_rows[p=one_hot_middle,c=1000]"] = (sample(_one_hot_p(m, 4), 1000), "result")
    cases["sample_rows[p=all_mass_on_last_row,c=10**7]"] = (sample(_one_hot_p(m, m - 1), 10**7), "result")
    cases["sample_rows[p=uniform,c=10**7]"] = (sample(torch.full((1, m), 1 / m, dtype=F64), 10**7), "result")
    short = torch.full((1, m), 1 / m, dtype=torch.float32) * (1 - 5e-5)  # sums to 1 - 5e-5: draws past the total
    cases["sample_rows[p=float32_short_of_1,c=10**6]"] = (sample(short, 10**6), "result")
    tiny = torch.full((1, m), 1e-300, dtype=F64)
    tiny[0, -1] = 1.0
    cases["sample_rows[p=1e-300_and_one,c=10**6]"] = (sample(tiny, 10**6), "result")
    big_m = 100_000
    cases["sample_rows[p=last_of_100000,c=10**6]"] = (
        sample(_one_hot_p(big_m, big_m - 1), 10**6, torch.rand(2, big_m, 1, generator=g)), "result")
    cases["sample_rows[p=nan]"] = (sample(_t([[NAN] * m]), 10), "p must be finite")
    cases["sample_rows[p=inf]"] = (sample(_t([[INF] + [0.0] * (m - 1)]), 10), "p must be finite")
    cases["sample_rows[x=nan]"] = (sample(torch.full((1, m), 1 / m, dtype=F64), 10, torch.full((4, 3, 3, 2), NAN)), "result")
    return cases


GROUPS = ["solve_mvm", "project_simplex", "mvm_step", "sample_rows"]


def _child(group: str, device: str) -> None:
    """Run the group's cases in order, printing START / END lines."""
    import time

    import mvm_cuda

    if device == "cuda":
        mvm_cuda.set_value_checks(False)  # NaN reaches the loops
    for name, (fn, _) in _cases().items():
        if not name.startswith(group + "["):
            continue
        print(f"START {name}", flush=True)
        t0 = time.perf_counter()
        try:
            out = fn(device)
            if device == "cuda":
                torch.cuda.synchronize()
            outcome = f"RESULT finite={bool(torch.isfinite(out).all())}"
        except (RuntimeError, ValueError) as e:
            outcome = "ERROR " + str(e).splitlines()[0]
        print(f"END {name} {time.perf_counter() - t0:.3f}s {outcome}", flush=True)
    print("ALL DONE", flush=True)


def _run_group(group: str, device: str) -> dict[str, str]:
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_hangs; test_hangs._child({group!r}, {device!r})"
    env = dict(os.environ)
    env.pop("MVM_CHECK_VALUES", None)
    try:
        # cwd = tests/: `python -c` puts the working folder first on sys.path,
        # and the repository root would shadow the installed package with
        # the source folder, which has no compiled _C.
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=TIMEOUT_S, env=env, cwd=HERE)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        started = [line[6:] for line in out.splitlines() if line.startswith("START ")]
        hung = started[-1] if started else "(before the first case: import)"
        pytest.fail(f"{device}: case {hung} did not finish within {TIMEOUT_S} s\n{out}")
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "ALL DONE" in proc.stdout, proc.stdout
    print(proc.stdout)
    ends = {}
    for line in proc.stdout.splitlines():
        if line.startswith("END "):
            name, rest = line[4:].split(" ", 1)
            ends[name] = rest
    return ends


@pytest.mark.parametrize("group", GROUPS)
def test_every_case_ends_cpu(group):
    ends = _run_group(group, "cpu")
    expected = {n: e for n, (_, e) in _cases().items() if n.startswith(group + "[")}
    assert set(ends) == set(expected)
    for name, want in expected.items():
        outcome = ends[name].split(" ", 1)[1]
        if want == "result":
            assert outcome.startswith("RESULT"), f"{name}: {outcome}"
        else:  # NaN / inf: a clear error naming the op and the argument
            assert re.match(rf"ERROR mvm::{group}: {want}", outcome), f"{name}: {outcome}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("group", GROUPS)
def test_every_case_ends_cuda_without_value_checks(group):
    ends = _run_group(group, "cuda")
    expected = {n for n in _cases() if n.startswith(group + "[")}
    assert set(ends) == expected  # every case ended (a result or an error), none hung
