"""Every kind of bad input and what the user gets: one row per case.

The rows of CASES mirror the table in README.md's "Bad input" section one to one
(test_readme_table_mirrors_the_tests checks it): each README row names the id of the
test that backs it, here `test_bad_input[<id>]` or, for the cache, one of the
separate tests at the end. A row either raises (exception type and a regex on the
message, which names the op or function and the argument) or gives a documented
result (a check on it). Op rows run on every available device with the value checks
on. Rows marked GAP describe the behaviour the ops should have and xfail (strict)
until the kernels or wrappers get it.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import scipy.io
import torch
from torch import nn

import mvm_cuda
from mvm_cuda.detector import Detector
from mvm_cuda.eval import data, models
from mvm_cuda.nn import DropoutUnit, insert_units

F64 = dict(dtype=torch.float64)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the row types


@dataclass
class Raises:
    exc: type | tuple
    match: str


@dataclass
class Gives:
    """The call returns; check(result, ctx) must hold."""
    check: Callable


@dataclass
class Warns:
    """The call warns (category, regex) and returns; check(result, ctx) must hold."""
    category: type
    match: str
    check: Callable = lambda result, ctx: True


@dataclass
class Case:
    id: str
    fn: Callable  # fn(ctx) -> result
    expect: Raises | Gives | Warns
    ops: bool = False  # an op row: run on every device, value checks on
    cuda: bool = False  # needs a CUDA device
    gap: str | None = None  # GAP: what should happen; the row xfails until it does


@dataclass
class Ctx:
    """What a row's callable gets: the device (op rows), a fresh folder, a small CNN."""
    dev: str
    tmp: Path
    model: nn.Module = field(default_factory=lambda: models.build_model("digits", seed=0).eval())

    def __post_init__(self):
        self.tmp.mkdir(parents=True, exist_ok=True)

    def images(self, n=2):
        return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(n))

    def detector(self, method="dropout", **kw):
        return Detector(self.model, method, **{"R": 2, "progress": False, **kw})


# ---------------------------------------------------------------- helpers for the op rows


def _p(m, rows=1, dev="cpu"):
    return torch.full((rows, m), 1.0 / m, **F64, device=dev)


def _x(ctx):
    return torch.rand(4, 2, 3, 5, generator=torch.Generator().manual_seed(0)).to(ctx.dev)


def _a(ctx):
    return torch.rand(2, 6, **F64, generator=torch.Generator().manual_seed(1)).to(ctx.dev)


def _gen():
    return torch.Generator().manual_seed(0)


def _same_draws(ctx, x, p, c=3):
    """sample_rows of (x, p) equals that of their contiguous copies under one seed."""
    gen = lambda: torch.Generator(ctx.dev).manual_seed(0)  # noqa: E731
    a = mvm_cuda.sample_rows(x, p, c, generator=gen())
    b = mvm_cuda.sample_rows(x.contiguous(), p.contiguous(), c, generator=gen())
    return torch.equal(a, b)


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _on_simplex(p, z=1.0):
    return bool((p >= 0).all()) and torch.allclose(p.sum(-1).double(), torch.full(p.shape[:-1], z, **F64,
                                                                                      device=p.device))


def _nan_only_in_drawn_rows(ctx):
    x = _with(_x(ctx), (slice(None), 0, 0), float("nan"))  # row 0 is NaN, never drawn
    p = torch.tensor([[0.0, 1, 0, 0, 0, 0]], **F64, device=ctx.dev)  # row 1 always drawn
    clean = mvm_cuda.sample_rows(x, p, 3)
    x = _with(x, (slice(None), 0, 1), float("nan"))  # row 1 NaN too: it is drawn
    dirty = mvm_cuda.sample_rows(x, p, 3)
    return clean, dirty


def _backward(ctx):
    x = _x(ctx).requires_grad_()
    mvm_cuda.sample_rows(x, _p(6, dev=ctx.dev), 3).sum().backward()


# ---------------------------------------------------------------- helpers for the Python rows


class _OutputsTuple(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), x


class _Untraceable(nn.Module):
    def forward(self, x):
        return x.flatten(1) if x.sum() > 0 else x.relu().flatten(1)


def _fitted(ctx):
    return ctx.detector(threshold=0.5)


def _saved(ctx, det=None):
    det = det or ctx.detector()
    det.scores(ctx.images())  # learns the input shape
    path = ctx.tmp / "det.json"
    det.save(path)
    return path


def _other_model():
    return models.build_model("digits", seed=1).eval()


def _write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else pickle.dumps(content))
    return path


def _cifar(ctx, bad=None, missing=(), bad_name="data_batch_4"):
    """Loads a CIFAR-10 folder of tiny batches; bad_name replaced by `bad` (bytes or a
    picklable object), files in `missing` left out."""
    rng = np.random.default_rng(0)
    for name in data.CIFAR10_FILES:
        if name in missing:
            continue
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [0, 9]}
        content = bad if name == bad_name and bad is not None else batch
        _write(ctx.tmp / "cifar" / name, content)
    return data.load_cifar10(ctx.tmp / "cifar")


def _cifar_truncated(ctx):
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    return _cifar(ctx, bad=good[: len(good) // 2])


def _svhn(ctx, train=None, missing=(), truncate=False):
    """An SVHN folder; the train file's variables replaced by `train` (a dict) or its
    bytes (bytes)."""
    folder = ctx.tmp / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    for name in data.SVHN_FILES:
        if name in missing:
            continue
        mat = {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [10]], np.uint8)}
        if name == data.SVHN_FILES[0] and isinstance(train, bytes):
            _write(folder / name, train)
            continue
        if name == data.SVHN_FILES[0] and train is not None:
            mat = train
        scipy.io.savemat(folder / name, mat)
        if name == data.SVHN_FILES[0] and truncate:
            raw = (folder / name).read_bytes()
            (folder / name).write_bytes(raw[: len(raw) // 2])
    return data.load_svhn(folder)


# ---------------------------------------------------------------- the table

SR, PS, MS, SM = mvm_cuda.sample_rows, mvm_cuda.project_simplex, mvm_cuda.mvm_step, mvm_cuda.solve_mvm
E = (RuntimeError, ValueError, TypeError)  # what the dispatcher and the checks raise

CASES = [
    # sample_rows: x
    Case("sample_rows-x-2d", lambda c: SR(_x(c)[0, 0], _p(6, dev=c.dev), 3), Raises(E,
         r"mvm::sample_rows: x must have shape \(N, H, W, C\) or \(N, M, C\), got \(3, 5\)"), ops=True),
    Case("sample_rows-x-5d", lambda c: SR(_x(c)[None], _p(6, dev=c.dev), 3), Raises(E,
         r"x must have shape \(N, H, W, C\) or \(N, M, C\), got \(1, 4, 2, 3, 5\)"), ops=True),
    Case("sample_rows-x-int", lambda c: SR(_x(c).int(), _p(6, dev=c.dev), 3), Raises(E,
         r"sample_rows: x must be float32, float64, float16 or bfloat16, got Int"), ops=True),
    Case("sample_rows-x-no-rows", lambda c: SR(_x(c)[:, :0], _p(1, dev=c.dev)[:, :0], 3), Raises(E,
         r"x must have at least one row \(M = H\*W >= 1\), got \(4, 0, 3, 5\)"), ops=True),
    Case("sample_rows-x-empty-batch", lambda c: SR(_x(c)[:0], _p(6, dev=c.dev), 3),
         Gives(lambda out, c: out.shape == (0, 2, 3, 5)), ops=True),
    Case("sample_rows-x-no-channels", lambda c: SR(_x(c)[..., :0], _p(6, dev=c.dev), 3),
         Gives(lambda out, c: out.shape == (4, 2, 3, 0)), ops=True),
    Case("sample_rows-x-nchw-view", lambda c: (SR(torch.rand(4, 5, 2, 3, device=c.dev).permute(0, 2, 3, 1),
                                                  _p(6, dev=c.dev), 3)),
         Gives(lambda out, c: out.stride() == (30, 3, 1, 6)), ops=True),
    Case("sample_rows-x-strided", lambda c: _same_draws(c, torch.rand(4, 2, 3, 10, device=c.dev)[..., ::2],
                                                        _p(6, dev=c.dev)),
         Gives(lambda same, c: same), ops=True),
    Case("sample_rows-x-nan", _nan_only_in_drawn_rows,
         Gives(lambda r, c: not r[0].isnan().any() and r[1][:, 0, 1].isnan().all()), ops=True),
    Case("sample_rows-x-backward", _backward, Raises(RuntimeError, r"mvm::sample_rows is inference-only"),
         ops=True),
    # sample_rows: p
    Case("sample_rows-p-1d", lambda c: SR(_x(c), _p(6, dev=c.dev)[0], 3), Raises(E,
         r"p must have shape \(P, M\) with M = H\*W = 6, got \(6,\)"), ops=True),
    Case("sample_rows-p-wrong-M", lambda c: SR(_x(c), _p(7, dev=c.dev), 3), Raises(E,
         r"mvm::sample_rows: p must have shape \(P, M\) with M = H\*W = 6, got \(1, 7\)"), ops=True),
    Case("sample_rows-p-no-rows", lambda c: SR(_x(c), _p(6, dev=c.dev)[:0], 3), Raises(E,
         r"p must have shape \(P, M\) with M = H\*W = 6, got \(0, 6\)"), ops=True),
    Case("sample_rows-p-rows-vs-batch", lambda c: SR(_x(c), _p(6, 3, dev=c.dev), 3), Raises(E,
         r"x's batch N = 4 must be a multiple of p's rows P = 3"), ops=True),
    Case("sample_rows-p-half", lambda c: SR(_x(c), _p(6, dev=c.dev).half(), 3), Raises(E,
         r"sample_rows: p must be float32 or float64, got Half"), ops=True),
    Case("sample_rows-p-negative", lambda c: SR(_x(c), _with(_with(_p(6, dev=c.dev), (0, 0), -0.1), (0, 1), 0.1 + 1 / 3),
                                                3), Raises(E, r"sample_rows: p must be non-negative, got -0.1"), ops=True),
    Case("sample_rows-p-not-normalized", lambda c: SR(_x(c), 2 * _p(6, dev=c.dev), 3), Raises(E,
         r"every row of p must sum to 1 \(within 0.0001\), row 0 sums to 2"), ops=True),
    Case("sample_rows-p-all-zero", lambda c: SR(_x(c), 0 * _p(6, dev=c.dev), 3), Raises(E,
         r"every row of p must sum to 1 \(within 0.0001\), row 0 sums to 0"), ops=True),
    Case("sample_rows-p-nan", lambda c: SR(_x(c), _with(_p(6, dev=c.dev), (0, 2), float("nan")), 3), Raises(E,
         r"sample_rows: p must be finite, got a NaN or inf"), ops=True),
    Case("sample_rows-p-inf", lambda c: SR(_x(c), _with(_p(6, dev=c.dev), (0, 2), float("inf")), 3), Raises(E,
         r"sample_rows: p must be finite, got a NaN or inf"), ops=True),
    Case("sample_rows-p-rounding", lambda c: SR(_x(c), _p(6, dev=c.dev) * (1 + 5e-5), 3),
         Gives(lambda out, c: out.isfinite().all()), ops=True),
    Case("sample_rows-p-strided", lambda c: _same_draws(c, _x(c), _p(6, dev=c.dev).expand(2, 6)),
         Gives(lambda same, c: same), ops=True),
    Case("sample_rows-p-meta", lambda c: SR(_x(c), _p(6).to("meta"), 3), Raises(E, r"same device"), ops=True),
    Case("sample_rows-c-zero", lambda c: SR(_x(c), _p(6, dev=c.dev), 0), Raises(E,
         r"sample_rows: c \(the number of draws\) must be >= 1, got 0"), ops=True),
    Case("sample_rows-c-negative", lambda c: SR(_x(c), _p(6, dev=c.dev), -5), Raises(E,
         r"c \(the number of draws\) must be >= 1, got -5"), ops=True),
    Case("sample_rows-c-float", lambda c: SR(_x(c), _p(6, dev=c.dev), 3.0), Raises(E,
         r"sample_rows\(\) Expected a value of type 'int' for argument 'c'"), ops=True),
    Case("sample_rows-devices-mixed", lambda c: SR(_x(c).cuda(), _p(6), 3), Raises(E,
         r"x and p must be on the same device, got cuda:0 and cpu"), cuda=True),
    Case("sample_rows-generator-device", lambda c: SR(_x(c), _p(6), 3, generator=torch.Generator("cuda")),
         Raises(E, r"generator"), cuda=True),
    # project_simplex
    Case("project_simplex-z-zero", lambda c: PS(_a(c), 0.0), Raises(E,
         r"mvm::project_simplex: z must be finite and > 0, got 0"), ops=True),
    Case("project_simplex-z-negative", lambda c: PS(_a(c), -1.0), Raises(E, r"z must be finite and > 0, got -1"),
         ops=True),
    Case("project_simplex-z-inf", lambda c: PS(_a(c), float("inf")), Raises(E, r"z must be finite and > 0, got inf"),
         ops=True),
    Case("project_simplex-z-nan", lambda c: PS(_a(c), float("nan")), Raises(E, r"z must be finite and > 0, got nan"),
         ops=True),
    Case("project_simplex-v-half", lambda c: PS(_a(c).half()), Raises(E,
         r"project_simplex: v must be float32 or float64, got Half"), ops=True),
    Case("project_simplex-v-scalar", lambda c: PS(torch.tensor(1.0, device=c.dev)), Raises(E,
         r"project_simplex: v must have at least 1 dimension"), ops=True),
    Case("project_simplex-v-nan", lambda c: PS(_with(_a(c), (0, 1), float("nan"))), Raises(E,
         r"project_simplex: v must be finite, got a NaN or inf"), ops=True),
    Case("project_simplex-v-inf", lambda c: PS(_with(_a(c), (0, 1), float("-inf"))), Raises(E,
         r"project_simplex: v must be finite, got a NaN or inf"), ops=True),
    Case("project_simplex-v-empty-batch", lambda c: PS(_a(c)[:0]), Gives(lambda out, c: out.shape == (0, 6)),
         ops=True),
    Case("project_simplex-v-zero-length", lambda c: PS(_a(c)[:, :0]), Raises(E,
         r"v's last dimension must be non-empty"), ops=True),
    Case("project_simplex-v-strided", lambda c: (PS(_a(c).t()), PS(_a(c).t().contiguous())),
         Gives(lambda r, c: r[0].is_contiguous() and torch.equal(*r)), ops=True),
    # mvm_step
    Case("mvm_step-alpha-shape", lambda c: MS(_a(c), _a(c)[:, :5], 3, 0.1), Raises(E,
         r"mvm::mvm_step: alpha must have p's shape \(2, 6\), got \(2, 5\)"), ops=True),
    Case("mvm_step-dtypes-differ", lambda c: MS(_a(c), _a(c).float(), 3, 0.1), Raises(E,
         r"mvm_step: p and alpha must have the same dtype, got Double and Float"), ops=True),
    Case("mvm_step-p-half", lambda c: MS(_a(c).half(), _a(c).half(), 3, 0.1), Raises(E,
         r"mvm_step: p must be float32 or float64, got Half"), ops=True),
    Case("mvm_step-p-scalar", lambda c: MS(_a(c)[0, 0], _a(c)[0, 0], 3, 0.1), Raises(E,
         r"mvm_step: p must have at least 1 dimension"), ops=True),
    Case("mvm_step-c-zero", lambda c: MS(_a(c), _a(c), 0, 0.1), Raises(E,
         r"mvm_step: c \(the number of draws\) must be >= 1, got 0"), ops=True),
    Case("mvm_step-lr-negative", lambda c: MS(_a(c), _a(c), 3, -1.0), Raises(E,
         r"mvm_step: lr must be finite and >= 0, got -1"), ops=True),
    Case("mvm_step-lr-nan", lambda c: MS(_a(c), _a(c), 3, float("nan")), Raises(E,
         r"lr must be finite and >= 0, got nan"), ops=True),
    Case("mvm_step-lr-overflow", lambda c: MS(_p(6, 2, dev=c.dev), _a(c), 3, 1e308),
         Gives(lambda out, c: _on_simplex(out)), ops=True),
    Case("mvm_step-p-negative", lambda c: MS(-_a(c), _a(c), 3, 0.1), Raises(E,
         r"mvm_step: p must be non-negative, got -"), ops=True),
    Case("mvm_step-p-nan", lambda c: MS(_with(_a(c), (1, 1), float("nan")), _a(c), 3, 0.1), Raises(E,
         r"mvm_step: p must be finite, got a NaN or inf"), ops=True),
    Case("mvm_step-p-off-simplex", lambda c: MS(3 * _a(c), _a(c), 3, 0.1), Gives(lambda out, c: _on_simplex(out)),
         ops=True),
    Case("mvm_step-alpha-negative", lambda c: MS(_a(c), -_a(c), 3, 0.1), Raises(E,
         r"mvm_step: alpha must be non-negative, got -"), ops=True),
    Case("mvm_step-alpha-nan", lambda c: MS(_a(c), _with(_a(c), (0, 0), float("nan")), 3, 0.1), Raises(E,
         r"mvm_step: alpha must be finite, got a NaN or inf"), ops=True),
    Case("mvm_step-empty-batch", lambda c: MS(_a(c)[:0], _a(c)[:0], 3, 0.1),
         Gives(lambda out, c: out.shape == (0, 6)), ops=True),
    Case("mvm_step-devices-mixed", lambda c: MS(_a(c).cuda(), _a(c), 3, 0.1), Raises(E,
         r"mvm_step: p and alpha must be on the same device, got cuda:0 and cpu"), cuda=True),
    # solve_mvm
    Case("solve_mvm-method", lambda c: SM(_a(c), 3, "newton"), Raises(E,
         r"mvm::solve_mvm: method must be \"kkt\" or \"pgd\", got \"newton\""), ops=True),
    Case("solve_mvm-c-zero", lambda c: SM(_a(c), 0), Raises(E,
         r"solve_mvm: c \(the number of draws\) must be >= 1, got 0"), ops=True),
    Case("solve_mvm-max-iter-zero", lambda c: SM(_a(c), 3, "pgd", 0), Raises(E,
         r"solve_mvm: max_iter must be >= 1, got 0"), ops=True),
    Case("solve_mvm-tol-negative", lambda c: SM(_a(c), 3, "pgd", 10, -1.0), Raises(E,
         r"solve_mvm: tol must be finite and >= 0, got -1"), ops=True),
    Case("solve_mvm-tol-nan", lambda c: SM(_a(c), 3, "pgd", 10, float("nan")), Raises(E,
         r"tol must be finite and >= 0, got nan"), ops=True),
    Case("solve_mvm-alpha-int", lambda c: SM(_a(c).int(), 3), Raises(E,
         r"solve_mvm: alpha must be float32 or float64, got Int"), ops=True),
    Case("solve_mvm-alpha-half", lambda c: SM(_a(c).half(), 3), Raises(E,
         r"solve_mvm: alpha must be float32 or float64, got Half"), ops=True),
    Case("solve_mvm-alpha-scalar", lambda c: SM(_a(c)[0, 0], 3), Raises(E,
         r"solve_mvm: alpha must have at least 1 dimension \(B, M\)"), ops=True),
    Case("solve_mvm-alpha-negative", lambda c: SM(-_a(c), 3), Raises(E,
         r"solve_mvm: alpha must be non-negative, got -"), ops=True),
    Case("solve_mvm-alpha-inf", lambda c: SM(_a(c) * float("inf"), 3), Raises(E,
         r"solve_mvm: alpha must be finite, got a NaN or inf"), ops=True),
    Case("solve_mvm-alpha-nan", lambda c: SM(_with(_a(c), (1, 3), float("nan")), 3), Raises(E,
         r"solve_mvm: alpha must be finite, got a NaN or inf"), ops=True),
    Case("solve_mvm-alpha-empty-batch", lambda c: SM(_a(c)[:0], 3), Gives(lambda out, c: out.shape == (0, 6)),
         ops=True),
    Case("solve_mvm-alpha-zero-length", lambda c: SM(_a(c)[:, :0], 3), Raises(E,
         r"alpha's last dimension \(M\) must be non-empty"), ops=True),
    Case("solve_mvm-alpha-all-zero", lambda c: SM(torch.zeros(2, 4, **F64, device=c.dev), 3),
         Gives(lambda out, c: torch.equal(out, torch.full_like(out, 0.25))), ops=True),
    Case("solve_mvm-alpha-extreme-range", lambda c: (SM(torch.tensor([[1e-300, 1e300, 1.0]], **F64, device=c.dev), 3),
                                                     SM(torch.tensor([[1e-300, 1e300, 1.0]], **F64, device=c.dev), 3,
                                                        "pgd")),
         Gives(lambda r, c: all(_on_simplex(p) and p[0, 1] > 0.99 for p in r)), ops=True),
    Case("solve_mvm-alpha-strided", lambda c: (SM(_a(c).t(), 3), SM(_a(c).t().contiguous(), 3)),
         Gives(lambda r, c: torch.equal(*r)), ops=True),
    # sap_sample
    Case("sap_sample-frac-zero", lambda c: mvm_cuda.sap_sample(_x(c), 0.0), Raises(ValueError,
         r"sap_sample: frac must be finite and > 0, got 0"), ops=True),
    Case("sap_sample-frac-nan", lambda c: mvm_cuda.sap_sample(_x(c), float("nan")), Raises(ValueError,
         r"sap_sample: frac must be finite and > 0, got nan"), ops=True),
    Case("sap_sample-frac-inf", lambda c: mvm_cuda.sap_sample(_x(c), float("inf")), Raises(ValueError,
         r"sap_sample: frac must be finite and > 0, got inf"), ops=True),
    Case("sap_sample-h-int", lambda c: mvm_cuda.sap_sample(_x(c).int(), 0.5), Raises(E,
         r"mvm::sap_sample: h must be float32, float64, float16 or bfloat16, got Int"), ops=True),
    Case("sap_sample-h-empty-batch", lambda c: mvm_cuda.sap_sample(_x(c)[:0], 0.5),
         Gives(lambda out, c: out.shape == (0, 2, 3, 5)), ops=True),
    Case("sap_sample-h-nan", lambda c: mvm_cuda.sap_sample(_with(_x(c), (0, 0, 0, 0), float("nan")), 1.0),
         Raises(E, r"mvm::sap_sample: h must be finite, got a NaN or inf"), ops=True),
    Case("sap_sample-h-inf", lambda c: mvm_cuda.sap_sample(_with(_x(c), (0, 0, 0, 0), float("inf")), 0.5),
         Raises(E, r"mvm::sap_sample: h must be finite, got a NaN or inf"), ops=True),
    # the op itself (mvm_cuda.sap_sample computes r from frac)
    Case("sap_sample-op-r-zero", lambda c: torch.ops.mvm.sap_sample(torch.rand(2, 3), 0), Raises(E,
         r"mvm::sap_sample: r \(the number of draws\) must be >= 1, got 0")),
    Case("sap_sample-op-h-0d", lambda c: torch.ops.mvm.sap_sample(torch.tensor(1.0), 1), Raises(E,
         r"mvm::sap_sample: h must have a batch dimension \(N, ...\), got a 0-d tensor")),
    Case("sap_sample-op-sum-overflow", lambda c: torch.ops.mvm.sap_sample(
         torch.tensor([[1.0, 2.0], [1e308, 1e308]], dtype=torch.float64, device=c.dev), 1), Raises(E,
         r"mvm::sap_sample: sum \|h\| of sample 1 overflows float64"), ops=True),
    Case("sap_sample-h-float32-overflow", lambda c: mvm_cuda.sap_sample(torch.full((2, 3), 3e38, device=c.dev), 0.5),
         Gives(lambda out, c: ((out == 0) | (out == float("inf"))).all() and (out == 0).any()), ops=True),
    # insert_units
    Case("insert_units-no-relu", lambda c: insert_units(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3), nn.ReLU()), DropoutUnit),
        Raises(ValueError, r"insert_units: Sequential has no ReLU before its first flatten")),
    Case("insert_units-other-activation", lambda c: insert_units(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)), DropoutUnit),
        Raises(ValueError, r"no ReLU before its first flatten.*LeakyReLU")),
    Case("insert_units-no-flatten", lambda c: insert_units(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), DropoutUnit),
         Raises(ValueError, r"insert_units: found no flatten in Sequential")),
    Case("insert_units-untraceable", lambda c: insert_units(_Untraceable(), DropoutUnit),
         Raises(TypeError, r"insert_units: torch.fx cannot trace _Untraceable")),
    # Detector: settings
    Case("detector-method", lambda c: c.detector("bayes"), Raises(ValueError,
         r"Detector: method must be one of \('mvm', 'sap', 'dropout'\), got 'bayes'")),
    Case("detector-R-zero", lambda c: c.detector(R=0), Raises(ValueError, r"Detector: R must be an integer >= 1, got 0")),
    Case("detector-max-batch-zero", lambda c: c.detector(max_batch=0), Raises(ValueError,
         r"Detector: max_batch must be an integer >= 1, got 0")),
    Case("detector-c-zero", lambda c: c.detector("mvm", c=0), Raises(ValueError,
         r"MVMUnit: c must be an integer >= 1, got 0")),
    Case("detector-c-and-c_rel", lambda c: c.detector("mvm", c=10, c_rel=1.0), Raises(ValueError,
         r"MVMUnit: give exactly one of c and c_rel")),
    Case("detector-c_rel-negative", lambda c: c.detector("mvm", c_rel=-1.0), Raises(ValueError,
         r"MVMUnit: c_rel must be > 0, got -1")),
    Case("detector-solver", lambda c: c.detector("mvm", solver="newton"), Raises(ValueError,
         r"Detector: solver must be one of \('kkt', 'pgd'\), got 'newton'")),
    Case("detector-frac-zero", lambda c: c.detector("sap", frac=0.0), Raises(ValueError,
         r"SAPUnit: frac must be > 0, got 0")),
    Case("detector-p_drop-one", lambda c: c.detector("dropout", p_drop=1.0), Raises(ValueError,
         r"DropoutUnit: p_drop must be in \[0, 1\), got 1")),
    Case("detector-generator-device", lambda c: c.detector(generator=torch.Generator("cuda")), Raises(ValueError,
         r"Detector: the generator is on cuda.* but the model is on cpu"), cuda=True),
    Case("detector-model-returns-tuple", lambda c: Detector(_OutputsTuple(c.model), "dropout", R=2,
                                                           progress=False).scores(c.images()),
         Raises(ValueError, r"Detector.votes: the model must return logits \(N, K\), got tuple")),
    # Detector: images
    Case("detector-x-not-tensor", lambda c: c.detector().scores(c.images().numpy()), Raises(TypeError,
         r"Detector.votes: x must be a float tensor of images \(N, C, H, W\), got ndarray")),
    Case("detector-x-single-image", lambda c: c.detector().scores(c.images()[0]), Raises(ValueError,
         r"got shape \(1, 8, 8\); for a single image add the batch dimension, x\[None\]")),
    Case("detector-x-flat", lambda c: c.detector().scores(c.images().flatten(1)), Raises(ValueError,
         r"x must be a float tensor of images \(N, C, H, W\), got shape \(2, 64\)$")),
    Case("detector-x-uint8", lambda c: c.detector().scores((c.images() * 255).to(torch.uint8)), Raises(ValueError,
         r"got dtype torch.uint8 \(for 0..255 images pass x.float\(\) / 255\)")),
    Case("detector-x-channels", lambda c: c.detector().scores(torch.rand(2, 3, 8, 8)), Raises(ValueError,
         r"Detector.votes: images of shape \(3, 8, 8\) do not fit the model: .*channels")),
    Case("detector-x-size", lambda c: (lambda d: (d.scores(c.images()), d.scores(torch.rand(2, 1, 9, 9))))(c.detector()),
         Raises(ValueError, r"images of shape \(1, 9, 9\) do not fit the model, which takes \(1, 8, 8\)")),
    Case("detector-x-0-255", lambda c: c.detector().scores(c.images() * 255), Raises(ValueError,
         r"pixel values must lie in \[0, 1\] \(scale 0..255 images by 1/255\), got values in \[\d+\.\d+, \d+\.\d+\]")),
    Case("detector-x-normalized", lambda c: c.detector().scores(c.images() - 0.5), Raises(ValueError,
         r"pixel values must lie in \[0, 1\].*got values in \[-0\.\d+, 0\.\d+\]")),
    Case("detector-x-nan", lambda c: c.detector().scores(_with(c.images(), (1, 0, 2, 2), float("nan"))),
         Raises(ValueError, r"pixel values must lie in \[0, 1\].*got values in \[.*\] and NaN")),
    Case("detector-x-inf", lambda c: c.detector().scores(_with(c.images(), (1, 0, 2, 2), float("inf"))),
         Raises(ValueError, r"pixel values must lie in \[0, 1\].*got values in \[.*, inf\]")),
    Case("detector-x-empty", lambda c: c.detector().scores(c.images()[:0]),
         Gives(lambda s, c: s.shape == (0,) and s.dtype == torch.float64)),
    Case("detector-x-float64-strided", lambda c: (c.detector(seed=0).scores(c.images(6).double()[::2]),
                                                  c.detector(seed=0).scores(c.images(6)[::2].contiguous())),
         Gives(lambda r, c: torch.equal(*r))),
    # Detector: threshold, save and load
    Case("detector-fit-too-few", lambda c: c.detector().fit_threshold(c.images(19), fpr=0.05), Raises(ValueError,
         r"Detector.fit_threshold: 19 clean images cannot resolve fpr=0.05; need at least 20")),
    Case("detector-fit-few", lambda c: c.detector().fit_threshold(c.images(20), fpr=0.05), Warns(UserWarning,
         r"20 clean images put only 1 above the threshold.*use at least 200",
         lambda det, c: det.threshold is not None)),
    Case("detector-fit-fpr", lambda c: c.detector().fit_threshold(c.images(20), fpr=1.0), Raises(ValueError,
         r"Detector.fit_threshold: fpr must be in \(0, 1\), got 1.0")),
    Case("detector-predict-unfitted", lambda c: c.detector().predict(c.images()), Raises(RuntimeError,
         r"Detector.predict: no threshold; call fit_threshold\(clean_images\) first")),
    Case("detector-load-other-model", lambda c: Detector.load(_saved(c), _other_model()), Raises(ValueError,
         r"Detector.load: the model differs from the one .*det.json was saved with")),
    Case("detector-load-other-model-lax", lambda c: Detector.load(_saved(c, _fitted(c)), _other_model(), strict=False,
                                                                  progress=False),
         Warns(UserWarning, r"the model differs", lambda det, c: det.threshold == 0.5)),
    Case("detector-load-not-json", lambda c: Detector.load(_write(c.tmp / "x.json", b"\x89PNG"), c.model),
         Raises(ValueError, r"Detector.load: .*x.json is not a saved mvm_cuda detector")),
    Case("detector-load-missing-settings", lambda c: Detector.load(
        _write(c.tmp / "x.json", b'{"format": "mvm_cuda-detector-v1", "method": "mvm"}'), c.model),
        Raises(ValueError, r"Detector.load: .*x.json lacks the settings c, c_rel")),
    # datasets
    Case("cifar10-missing-file", lambda c: _cifar(c, missing=("data_batch_3",)), Raises(FileNotFoundError,
         r"cifar10: no folder holds all of .*\n.*cifar: missing data_batch_3")),
    Case("cifar10-truncated", _cifar_truncated, Raises(ValueError,
         r"cifar10: .*data_batch_4 is not a CIFAR-10 python batch: pickle data was truncated")),
    Case("cifar10-not-a-pickle", lambda c: _cifar(c, bad=b"\x00garbage"), Raises(ValueError,
         r"cifar10: .*data_batch_4 is not a CIFAR-10 python batch")),
    Case("cifar10-not-a-dict", lambda c: _cifar(c, bad=[1, 2]), Raises(ValueError,
         r"data_batch_4 is not a CIFAR-10 python batch: expected a dict, got list")),
    Case("cifar10-no-labels", lambda c: _cifar(c, bad={b"data": np.zeros((2, 3072), np.uint8)}), Raises(ValueError,
         r"data_batch_4 .*expected keys b'data' and b'labels', got b'data'$")),
    Case("cifar10-wrong-size", lambda c: _cifar(c, bad={b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
         Raises(ValueError, r"data_batch_4 .*b'data' must be uint8 of shape \(n, 3072\), got uint8 \(2, 100\)")),
    Case("cifar10-wrong-dtype", lambda c: _cifar(c, bad={b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}),
         Raises(ValueError, r"data_batch_4 .*b'data' must be uint8 .*got float32")),
    Case("cifar10-label-range", lambda c: _cifar(c, bad={b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 11]}),
         Raises(ValueError, r"data_batch_4 .*b'labels' must be 2 labels in 0..9")),
    Case("cifar10-label-count", lambda c: _cifar(c, bad={b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
         Raises(ValueError, r"data_batch_4 .*b'labels' must be 2 labels in 0..9, got shape \(1,\)")),
    Case("svhn-missing-file", lambda c: _svhn(c, missing=("test_32x32.mat",)), Raises(FileNotFoundError,
         r"svhn: no folder holds all of .*\n.*svhn: missing test_32x32.mat")),
    Case("svhn-not-mat", lambda c: _svhn(c, train=b"MATLAB? no"), Raises(ValueError,
         r"svhn: .*train_32x32.mat is not an SVHN cropped-digits .mat file")),
    Case("svhn-truncated", lambda c: _svhn(c, truncate=True), Raises(ValueError,
         r"svhn: .*train_32x32.mat is not an SVHN cropped-digits .mat file")),
    Case("svhn-no-X", lambda c: _svhn(c, train={"images": np.zeros(3), "y": np.ones((2, 1))}), Raises(ValueError,
         r"train_32x32.mat is not an SVHN .*: no variable X \(found images, y\)")),
    Case("svhn-wrong-size", lambda c: _svhn(c, train={"X": np.zeros((28, 28, 1, 2), np.uint8), "y": np.ones((2, 1))}),
         Raises(ValueError, r"train_32x32.mat .*X must be uint8 of shape \(32, 32, 3, n\), got uint8 \(28, 28, 1, 2\)")),
    Case("svhn-label-range", lambda c: _svhn(c, train={"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                       "y": np.array([[0], [11]], np.uint8)}),
         Raises(ValueError, r"train_32x32.mat .*y must hold 2 labels in 1..10")),
    Case("dataset-unknown", lambda c: data.load_dataset("imagenet"), Raises(ValueError,
         r"load_dataset: unknown dataset 'imagenet'")),
    Case("dataset-no-root", lambda c: data.load_dataset("svhn"), Raises(ValueError,
         r"load_dataset: svhn is read from local files; pass root= or set MVM_CUDA_DATA")),
    # p one rounding above 1 (a one-hot row left at 1 + 1 ulp): pi = 1, the row is kept as it is
    Case("sample_rows-p-above-one-by-rounding",
         lambda c: SR(torch.ones(1, 1, 3, 2, device=c.dev), torch.tensor([[0.0, 0.0, 1.0000001]], device=c.dev), 3),
         Gives(lambda out, c: torch.equal(out.cpu(), torch.tensor([[[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]]]))),
         ops=True),
]

_IDS = [case.id for case in CASES]
assert len(set(_IDS)) == len(_IDS), "duplicate case ids"


def _param(case):
    marks = []
    if case.cuda:
        marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
    if case.gap:
        marks.append(pytest.mark.xfail(strict=True, reason=f"GAP: {case.gap}"))
    return pytest.param(case, id=case.id, marks=marks)


def _run(case, ctx):
    expect = case.expect
    if isinstance(expect, Raises):
        with pytest.raises(expect.exc, match=expect.match):
            case.fn(ctx)
    elif isinstance(expect, Warns):
        with pytest.warns(expect.category, match=expect.match):
            result = case.fn(ctx)
        assert expect.check(result, ctx)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a documented result comes without warnings
            result = case.fn(ctx)
        assert expect.check(result, ctx)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_bad_input(case, tmp_path, monkeypatch, value_checks):
    monkeypatch.delenv("MVM_CUDA_DATA", raising=False)
    if case.cuda:
        _run(case, Ctx("cpu", tmp_path))
        return
    for dev in DEVICES if case.ops else ["cpu"]:
        _run(case, Ctx(dev, tmp_path / dev))


# ---------------------------------------------------------------- the on-disk cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MVM_CUDA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Crafter:
    """fn for cached_tensors that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return {"x": torch.arange(12.0).reshape(3, 4), "y": torch.tensor([1, 2, 3])}


def _cached(fn, key="mnist/fgsm eps=0.3"):
    return models.cached_tensors(key, fn)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _record(path, **change):
    record = torch.load(path, weights_only=True)
    record.update(change)
    torch.save(record, path)


class _Code:
    def __reduce__(self):
        return (os.getpid, ())


CORRUPTIONS = {
    "truncated": (_truncate, r"rebuilding .*\.pt: RuntimeError"),
    "empty": (lambda path: path.write_bytes(b""), r"rebuilding"),
    "garbage": (lambda path: path.write_bytes(os.urandom(512)), r"rebuilding"),
    "bit-flip": (lambda path: _record(path, tensors={"x": torch.arange(12.0).reshape(3, 4) + 1,
                                                     "y": torch.tensor([1, 2, 3])}), r"checksum mismatch"),
    "other-key": (lambda path: _record(path, key="another key"), r"stored key 'another key' differs"),
    "other-format": (lambda path: torch.save({"x": torch.zeros(3)}, path), r"not an mvm_cuda cache file"),
    "code": (lambda path: path.write_bytes(pickle.dumps(_Code(), protocol=2)), r"rebuilding .*UnpicklingError"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_cache_bad_file_is_rebuilt(cache, corruption):
    """A damaged or foreign cache file is never returned: a warning names it, fn runs
    again, and the rebuilt file is valid (the next call loads it)."""
    fn = Crafter()
    first = _cached(fn)
    (path,) = (cache / "tensors").iterdir()
    damage, message = CORRUPTIONS[corruption]
    damage(path)
    with pytest.warns(UserWarning, match=message):
        again = _cached(fn)
    assert fn.calls == 2 and all(torch.equal(first[k], again[k]) for k in first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cached(fn)
    assert fn.calls == 2 and [p.name for p in (cache / "tensors").iterdir()] == [path.name]


def test_cache_crash_mid_write_leaves_no_partial_file(cache, monkeypatch):
    """A writer that dies half-way (here torch.save raises after half the bytes, with
    and without the cleanup running) never leaves a file under the final name: the old
    complete file stays, or none; a leftover temp file is never read."""
    real_save = torch.save

    def half_save(obj, f):
        buf = __import__("io").BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt  # a Ctrl-C half-way through the write

    fn = Crafter()
    monkeypatch.setattr(models.torch, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        _cached(fn)
    assert list((cache / "tensors").iterdir()) == []  # the temp file is removed too
    # A hard kill runs no cleanup: the temp file stays, the final name never appears.
    monkeypatch.setattr(models.os, "unlink", lambda path: None)
    with pytest.raises(KeyboardInterrupt):
        _cached(fn)
    (leftover,) = (cache / "tensors").iterdir()
    assert leftover.suffix == ".tmp"
    monkeypatch.undo()
    monkeypatch.setenv("MVM_CUDA_CACHE", str(cache))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = _cached(fn)  # computed afresh, not read from the leftover
    assert fn.calls == 3
    (final,) = [p for p in (cache / "tensors").iterdir() if p.suffix == ".pt"]
    # Dying while replacing a good file keeps the good file.
    monkeypatch.setattr(models.torch, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        models._save(final, "mnist/fgsm eps=0.3", {"x": torch.zeros(2)})
    monkeypatch.undo()
    monkeypatch.setenv("MVM_CUDA_CACHE", str(cache))
    again = _cached(fn)
    assert fn.calls == 3 and torch.equal(again["x"], first["x"])


def test_cache_unwritable_warns_and_returns(tmp_path, monkeypatch):
    """A cache that cannot be written (here a file where the folder should be) costs
    only the caching: a warning, and the computed result."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MVM_CUDA_CACHE", str(blocker))
    fn = Crafter()
    with pytest.warns(UserWarning, match=r"could not write .*not-a-folder"):
        out = _cached(fn)
    assert fn.calls == 1 and torch.equal(out["y"], torch.tensor([1, 2, 3]))


def test_model_cache_of_another_architecture_retrains(cache):
    """A valid cache file whose weights do not fit the model (an architecture changed
    under the same key) is reported and the model retrained."""
    d = data.load_digits(seed=0)
    small = (d.x_train[:64], d.y_train[:64])
    kwargs = dict(epochs=1, seed=0, batch_size=32, progress=False)
    first = models.load_or_train("digits", small, **kwargs)
    (path,) = (cache / "models").iterdir()
    key = torch.load(path, weights_only=True)["key"]
    models._save(path, key, {"0.weight": torch.zeros(3)})
    with pytest.warns(UserWarning, match=r"does not fit model 'digits', retraining"):
        again = models.load_or_train("digits", small, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


class _Evil:
    def __reduce__(self):
        return (os.mkdir, ("should-not-exist",))


def test_cifar10_pickle_cannot_run_code(tmp_path, monkeypatch):
    """A batch file that would run code when unpickled is refused, and runs nothing."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR-10 python batch: refusing to load global "
                                         r"posix.mkdir"):
        _cifar(Ctx("cpu", tmp_path), bad={b"data": _Evil(), b"labels": []}, bad_name="test_batch")
    assert not (tmp_path / "should-not-exist").exists()


# ---------------------------------------------------------------- the README mirrors the tests


def test_readme_table_mirrors_the_tests():
    text = README.read_text()
    section = re.search(r"^## Bad input\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Bad input' section"
    rows = [line for line in section.group(1).splitlines() if re.match(r"\| (?!---|input)", line)]
    named = [re.findall(r"`([^`]+)`", row.rsplit("|", 2)[-2]) for row in rows]
    assert all(len(n) == 1 for n in named), [r for r, n in zip(rows, named) if len(n) != 1]
    named = [n[0] for n in named]
    expected = [f"test_bad_input[{i}]" for i in _IDS]
    expected += [f"test_cache_bad_file_is_rebuilt[{c}]" for c in CORRUPTIONS]
    expected += ["test_cifar10_pickle_cannot_run_code", "test_cache_crash_mid_write_leaves_no_partial_file", "test_cache_unwritable_warns_and_returns",
                 "test_model_cache_of_another_architecture_retrains"]
    assert sorted(named) == sorted(expected), (set(named) ^ set(expected))
    assert len(named) == len(set(named))
    gaps = {f"test_bad_input[{c.id}]" for c in CASES if c.gap}
    for row, name in zip(rows, named):
        assert ("GAP" in row) == (name in gaps), row
