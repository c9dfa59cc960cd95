"""Small CUDA drivers of every mvm op, for compute-sanitizer (memcheck,
racecheck, initcheck, synccheck) on a GPU machine:

    compute-sanitizer --tool memcheck python benchmarks/gpu_drivers.py [op ...]

Each driver calls its op on small inputs that reach every code path of its
kernel (the shared-memory and the global-workspace path, vectorised and
strided layouts, every dtype), synchronises, and checks a few invariants, so
a sanitizer run stays short. Inputs are built on the CPU and copied to the
GPU, so that initcheck sees them initialised by a host-to-device copy even
when only the mvm kernels are instrumented. Drivers: sample_rows (with
sap_sample), keys (per-sample keys on every sampler path, keyed_uniform, and a
channels_last SAP on every path, the exact set path included), project_simplex,
mvm_step, solve_mvm (default: all).
"""
from __future__ import annotations

import sys

import torch

import mvm_cuda

DEV = torch.device("cuda")


def _cuda(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEV)


def _probs(rows: int, m: int, zeros: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * 1000 + m)
    p = torch.rand(rows, m, generator=g, dtype=torch.float64) + 0.05
    if zeros:
        p[:, :zeros] = 0.0  # rows that must never be drawn
    return _cuda((p / p.sum(-1, keepdim=True)).to(dtype))


def _check_sample(out: torch.Tensor, x: torch.Tensor, zeros: int = 0) -> None:
    rows_out = out.reshape(out.shape[0], -1, out.shape[-1])
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(rows_out.float()).all(), "non-finite output"
    if zeros:
        assert (rows_out[:, :zeros] == 0).all(), "a row with p = 0 was drawn"


def drive_sample_rows() -> None:
    g = torch.Generator(device=DEV).manual_seed(0)
    # Shared-memory path: NHWC (vectorised), the NCHW view (vectorised along
    # the pixels), odd C, strided C, non-collapsible pixels, every dtype.
    layouts = {
        "nhwc": lambda dt: torch.rand(6, 5, 7, 8, dtype=dt),
        "nchw_view": lambda dt: torch.rand(6, 8, 5, 8, dtype=dt).permute(0, 2, 3, 1),
        "odd_c": lambda dt: torch.rand(6, 5, 7, 3, dtype=dt),
        "strided_c": lambda dt: torch.rand(6, 5, 7, 16, dtype=dt)[..., ::2],
        "strided_w_view": lambda dt: torch.rand(6, 8, 5, 16, dtype=dt).permute(0, 2, 3, 1)[:, :, ::2],
        # Crops: pixels that do not collapse to one stride (line walks with div != 1).
        "crop_nhwc": lambda dt: torch.rand(6, 5, 9, 8, dtype=dt)[:, :, 1:8],
        "crop_nchw_view": lambda dt: torch.rand(6, 8, 5, 9, dtype=dt).permute(0, 2, 3, 1)[:, :, :8],
        # One channel, aligned: vectorised along the pixels.
        "width_one": lambda dt: torch.rand(6, 4, 16, 1, dtype=dt),
    }
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for name, make in layouts.items():
            x = _cuda_view(make(dt))
            m = x.shape[1] * x.shape[2]
            p = _probs(3, m, zeros=2, dtype=torch.float64 if dt == torch.float64 else torch.float32)
            out = mvm_cuda.sample_rows(x, p, 20, generator=g)
            _check_sample(out, x, zeros=2)
    # One sample split over many blocks (each repeats the draws, writes its share).
    x = _cuda(torch.rand(1, 32, 32, 256))
    _check_sample(mvm_cuda.sample_rows(x, _probs(1, 1024, zeros=4), 40, generator=g), x, zeros=4)
    # Many draws over few rows (c < 64 M: one by one); rows of width 1 (as SAP uses it); the default generator.
    x = _cuda(torch.rand(4, 10, 4))
    _check_sample(mvm_cuda.sample_rows(x, _probs(2, 10), 600), x)
    # c large against M: the exact set path (exact_draws.cu), on the shared-memory and big-M kernels, and SAP's.
    _check_sample(mvm_cuda.sample_rows(x, _probs(2, 10, zeros=3), 2**62, generator=g), x, zeros=3)
    x = _cuda(torch.rand(2, 40_000, 1))
    _check_sample(mvm_cuda.sample_rows(x, _probs(1, 40_000, zeros=5), 2**40, generator=g), x, zeros=5)
    h = _cuda(torch.randn(3, 2, 50, 100).relu_())
    h[1] = 0
    out = torch.ops.mvm.sap_sample(h, 2**62, scale_only=False, generator=g)
    assert ((out == 0) | (h != 0)).all() and (out[1] == 0).all() and torch.equal(out[0] != 0, h[0] != 0)
    h = _cuda(torch.randn(4, 3, 5, 7))
    out = mvm_cuda.sap_sample(h, 0.5)
    assert out.shape == h.shape
    # The fused SAP kernel over several slices of 4,096 entries (the last one
    # partial), an all-zero sample, every dtype, and the scale alone.
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        h = _cuda(torch.randn(3, 2, 50, 100).relu_().to(dt))
        h[1] = 0
        out = mvm_cuda.sap_sample(h, 0.5, generator=g)
        scale = torch.ops.mvm.sap_sample(h, 5_000, scale_only=True, generator=g)
        assert ((out == 0) | (h != 0)).all() and (out[1] == 0).all() and (scale[1] == 0).all()
        assert (out[0] != 0).any() and ((scale == 0) | (scale >= 1)).all()
    # Big-M path (the CDF does not fit in shared memory): M = 40,000 rows.
    x = _cuda(torch.rand(3, 40_000, 1))
    _check_sample(mvm_cuda.sample_rows(x, _probs(3, 40_000, zeros=5), 30_000, generator=g), x, zeros=5)
    x = _cuda(torch.rand(2, 200, 200, 2))
    _check_sample(mvm_cuda.sample_rows(x, _probs(1, 40_000, dtype=torch.float64), 5_000, generator=g), x)
    torch.cuda.synchronize()


def _cuda_view(x: torch.Tensor) -> torch.Tensor:
    """x's layout on the GPU: copy its base storage over, then take the same view."""
    base = x.as_strided((x.untyped_storage().nbytes() // x.element_size(),), (1,), 0)
    return _cuda(base.clone()).as_strided(x.shape, x.stride(), x.storage_offset())


def drive_keys() -> None:
    # Per-sample keys instead of the generator: sample_rows on the shared-memory,
    # exact set and big-M paths, SAP on one slice, several slices and the exact
    # set path, and keyed_uniform (float32, float64, K past one Philox block).
    keys = _cuda(torch.arange(6, dtype=torch.int64) * 1_000_003 - 2**40)
    x = _cuda(torch.rand(6, 5, 7, 8))
    _check_sample(mvm_cuda.sample_rows(x, _probs(3, 35, zeros=2), 20, keys=keys), x, zeros=2)
    _check_sample(mvm_cuda.sample_rows(x, _probs(3, 35, zeros=2), 2**62, keys=keys), x, zeros=2)
    rows = _cuda(torch.rand(2, 40_000, 1))
    _check_sample(mvm_cuda.sample_rows(rows, _probs(1, 40_000, zeros=5), 30_000, keys=keys[:2]), rows, zeros=5)
    for dt in (torch.float32, torch.float64):
        u = mvm_cuda.keyed_uniform(keys, 4096 + 3, dt)
        assert u.shape == (6, 4099) and ((u >= 0) & (u < 1)).all()
        assert torch.equal(u.cpu(), mvm_cuda.keyed_uniform(keys.cpu(), 4096 + 3, dt))
    assert mvm_cuda.keyed_uniform(keys, 0).shape == (6, 0)
    # channels_last h, read in place in memory order: one slice (K = 1,008),
    # several slices (K = 9,216) and the exact set path (r > 64 K), with the
    # generator and with keys, sap_sample and the scale alone.
    g = torch.Generator(device=DEV).manual_seed(1)
    for shape in ((6, 16, 7, 9), (3, 64, 12, 12)):
        h = torch.randn(*shape).relu_()
        h[:, : shape[1] // 2] *= 1e-3  # small entries: on the exact path their sets vary
        h[1] = 0
        h = _cuda(h).contiguous(memory_format=torch.channels_last)
        for frac in (0.3, 65.0):
            for rand in ({"generator": g}, {"keys": keys[: shape[0]]}):
                out = mvm_cuda.sap_sample(h, frac, **rand)
                scale = mvm_cuda.sap_scale(h, frac, **rand)
                assert out.stride() == h.stride() and scale.stride() == h.stride()
                assert ((out == 0) | (h != 0)).all() and (out[1] == 0).all() and (out[0] != 0).any()
                assert ((scale == 0) | (h != 0)).all() and ((scale == 0) | (scale >= 1)).all()
    # The units' fused paths: relu of a pre-activation and copies of the batch, for the
    # three samplers (keyed_dropout equal to the CPU's bit for bit).
    pre = _cuda(torch.randn(3, 16, 7, 9)).contiguous(memory_format=torch.channels_last)
    stacked = keys[:6]
    x = pre.permute(0, 2, 3, 1)
    out = mvm_cuda.sample_rows(x, _probs(3, 63, zeros=2), 20, keys=stacked, relu=True, copies=2)
    assert out.shape == (6, 7, 9, 16) and (out >= 0).all()
    out = mvm_cuda.sap_sample(pre, 0.3, keys=stacked, relu=True, copies=2)
    assert out.shape == (6, 16, 7, 9) and (out >= 0).all()
    for h in (pre, pre.contiguous(), pre.double()):
        out = mvm_cuda.keyed_dropout(h, stacked, 0.5, relu=True, copies=2)
        assert torch.equal(out.cpu(), mvm_cuda.keyed_dropout(h.cpu(), stacked.cpu(), 0.5, relu=True, copies=2))
    torch.cuda.synchronize()


def drive_project_simplex() -> None:
    for shape, dt in (((7, 33), torch.float32), ((3, 1000), torch.float64), ((1, 40_000), torch.float32),
                      ((2, 1), torch.float32)):
        v = _cuda(torch.randn(*shape, dtype=dt))
        p = mvm_cuda.project_simplex(v, 1.0)
        assert (p >= 0).all() and torch.allclose(p.double().sum(-1), torch.ones(shape[0], dtype=torch.float64, device=DEV), atol=1e-4)
    torch.cuda.synchronize()


def drive_mvm_step() -> None:
    for shape in ((5, 100), (1, 40_000)):
        alpha = _cuda(torch.rand(*shape, dtype=torch.float64))
        p = _cuda(torch.full(shape, 1.0 / shape[1], dtype=torch.float64))
        out = mvm_cuda.mvm_step(p, alpha, 50, 1e-3)
        assert (out >= 0).all() and torch.allclose(out.sum(-1), torch.ones(shape[0], dtype=torch.float64, device=DEV))
    torch.cuda.synchronize()


def drive_solve_mvm() -> None:
    alpha = torch.rand(6, 50, dtype=torch.float64)
    alpha[0] = 0.0          # dead row: uniform
    alpha[1, 1:] = 0.0      # one nonzero: one-hot
    alpha[2, :25] = 0.0     # partial support
    alpha = _cuda(alpha)
    for method in ("kkt", "pgd"):
        for dt in (torch.float32, torch.float64):
            p = mvm_cuda.solve_mvm(alpha.to(dt), 64, method, 50, 1e-6)
            assert torch.allclose(p.double().sum(-1), torch.ones(6, dtype=torch.float64, device=DEV), atol=1e-5)
    # Global-workspace paths: pgd keeps 4 rows of m doubles, kkt one.
    mvm_cuda.solve_mvm(_cuda(torch.rand(1, 8_000, dtype=torch.float64)), 2_000, "pgd", 3, 1e-6)
    mvm_cuda.solve_mvm(_cuda(torch.rand(1, 40_000, dtype=torch.float64)), 2_000, "kkt", 50, 1e-6)
    torch.cuda.synchronize()


DRIVERS = {
    "sample_rows": drive_sample_rows,
    "keys": drive_keys,
    "project_simplex": drive_project_simplex,
    "mvm_step": drive_mvm_step,
    "solve_mvm": drive_solve_mvm,
}


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("gpu_drivers: no CUDA device")
        return 2
    for name in argv or list(DRIVERS):
        DRIVERS[name]()
        print(f"gpu_drivers: {name} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
