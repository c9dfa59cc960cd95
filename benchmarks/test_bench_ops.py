"""Each op (kernel) against its pure-PyTorch reference, in the same run, at the
activation shapes of the real networks (mvm_cuda.eval.models): MNIST 26x26x64
and 24x24x64; CIFAR-10 32x32x32, 16x16x64 and 8x8x128 (the second conv of each
CIFAR-10 pair repeats the first one's shape), with c = 0.5, 1 and 2 times the
input's pixel count (784 for MNIST, 1024 for CIFAR-10).

A detector pass samples `images x R` copies of a batch (stacked copy-major).
CUDA: 32 images x R = 100, as in the paper. CPU: 8 x 20 (--quick: 8 x 5), so
that `make bench` takes minutes on 2 cores; SAP draws 20-50 times more than MVM
and runs on 8 x 2 copies there (--quick: 8 x 1). The solvers take one problem per image.

Groups pair the kernel with its reference (and, for sampling, a clone of the
same tensor: the bandwidth yardstick), so `benchmarks/ratios.py` can report
the ratios; its group names are its table rows."""
import functools

import pytest
import torch

import mvm_cuda
from mvm_cuda import reference as ref

from conftest import C_REL, DEVICES, PIXELS, relu_outputs, run

IMPLS = {"kernel": mvm_cuda, "reference": ref}

# id -> (model, index of the ReLU in its conv part)
LAYERS = {
    "mnist 26x26x64": ("mnist", 0),
    "mnist 24x24x64": ("mnist", 1),
    "cifar10 32x32x32": ("cifar10", 0),
    "cifar10 16x16x64": ("cifar10", 2),
    "cifar10 8x8x128": ("cifar10", 4),
}

# solve_mvm "pgd" at equal iterations: both run at most this many steps (tol 0;
# both stop earlier only where the line search can no longer decrease V).
PGD_ITERS = 32
# "To the accuracy of kkt": V(p_pgd) <= (1 + KKT_GAP) V(p_kkt) for every problem
# (V, not f: f is nearly flat when c >> M, see docs/method.md); the steps this
# takes depend on the data (docs/performance.md gives them).
KKT_GAP = 1e-6


def copies(device, quick):
    """(images, R) of a batch of stochastic passes on this device."""
    if device == "cuda":
        return 32, 100
    return (8, 5) if quick else (8, 20)


def problems(device, quick):
    """Solver problems per call: one per image of a batch (the detector's
    clean pass solves a batch of images at once)."""
    if device == "cuda":
        return 32
    return 2 if quick else 8


def images_nhwc(layer, images, device):
    """The layer's activations of `images` images as a dense NHWC tensor
    (what a channels_last network hands the units, seen as NHWC)."""
    model, index = LAYERS[layer]
    return relu_outputs(model, images)[index].to(device).permute(0, 2, 3, 1).contiguous()


def draws(layer, c_rel):
    return round(c_rel * PIXELS[LAYERS[layer][0]])


def _sample_rows(benchmark, device, layer, c_rel, impl, images, R, dtype=torch.float32, layout="nhwc"):
    h = images_nhwc(layer, images, device)
    c = draws(layer, c_rel)
    p = mvm_cuda.solve_mvm(mvm_cuda.row_alpha(h), c)  # float32 (P, M), as MVMUnit records it
    if layout == "nchw_view":  # a contiguous_format network: its NCHW activation, seen as NHWC
        x = h.to(dtype).permute(0, 3, 1, 2).contiguous().repeat(R, 1, 1, 1).permute(0, 2, 3, 1)
    else:
        x = h.to(dtype).repeat(R, 1, 1, 1)
    n = x.shape[0]
    name = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    benchmark.group = (f"sample_rows {device} {layer} {name} {layout} "
                       f"({n}={images}x{R} copies, {x.numel() * x.element_size() / 1e6:.0f} MB, c={c}={c_rel}N)")
    benchmark.extra_info["bytes"] = 2 * x.numel() * x.element_size()
    if impl == "clone":  # the same bytes read and written
        run(benchmark, torch.clone, x)
    else:
        run(benchmark, IMPLS[impl].sample_rows, x, p, c, rounds=3 if impl == "reference" else 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c_rel", C_REL)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("impl", ["kernel", "reference", "clone"])
def test_sample_rows(benchmark, quick, device, layer, c_rel, impl):
    _sample_rows(benchmark, device, layer, c_rel, impl, *copies(device, quick))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["f32 nchw_view", "f16 nhwc", "bf16 nhwc"])
@pytest.mark.parametrize("impl", ["kernel", "reference", "clone"])
def test_sample_rows_variants(benchmark, quick, device, variant, impl):
    dtype, layout = variant.split()
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    _sample_rows(benchmark, device, "mnist 26x26x64", 1, impl, *copies(device, quick), dtype, layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference", "clone"])
def test_sample_rows_bandwidth(benchmark, device, impl):
    if device != "cuda":
        pytest.skip("the >= 1 GB bandwidth shape runs on CUDA only")
    # 64 x 100 copies of 26x26x64 float32: 1.1 GB, far past every cache.
    _sample_rows(benchmark, device, "mnist 26x26x64", 1, impl, 64, 100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_sap_sample(benchmark, quick, device, layer, impl):
    # The paper's SAP 50% (benchmarks/draws.py compares 50% and 100% with MVM).
    images, R = (8, 1 if quick else 2) if device == "cpu" else copies(device, quick)
    h = images_nhwc(layer, images, device).repeat(R, 1, 1, 1)
    r = round(0.5 * h[0].numel())
    benchmark.group = f"sap_sample {device} {layer} f32 ({h.shape[0]}={images}x{R} copies, frac=0.5: r={r} draws)"
    run(benchmark, IMPLS[impl].sap_sample, h, 0.5, rounds=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_project_simplex(benchmark, quick, device, layer, impl):
    rows = 100_000 if device == "cuda" else 250 if quick else 1000
    m = images_nhwc(layer, 1, "cpu")[0, ..., 0].numel()
    v = torch.randn(rows, m, generator=torch.Generator().manual_seed(0)).to(device)
    benchmark.group = f"project_simplex {device} {rows}x{m} f32 (M of {layer})"
    run(benchmark, IMPLS[impl].project_simplex, v, rounds=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c_rel", C_REL)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_mvm_step(benchmark, quick, device, layer, c_rel, impl):
    rows = 32768 if device == "cuda" else 64 if quick else 256
    alpha = mvm_cuda.row_alpha(images_nhwc(layer, 8, device))
    alpha = alpha.repeat(rows // alpha.shape[0], 1)
    p = torch.full_like(alpha, 1 / alpha.shape[1])
    c = draws(layer, c_rel)
    benchmark.group = f"mvm_step {device} {layer} f32 ({rows} problems, c={c}={c_rel}N)"
    run(benchmark, IMPLS[impl].mvm_step, p, alpha, c, 1e-6)


def _alpha(layer, device, quick):
    """float64 alpha (B, M) of the layer's activations, one problem per image."""
    return mvm_cuda.row_alpha(images_nhwc(layer, problems(device, quick), "cpu")).double().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["kkt", "pgd"])
@pytest.mark.parametrize("c_rel", C_REL)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_solve_mvm(benchmark, quick, device, layer, c_rel, method, impl):
    alpha = _alpha(layer, device, quick)
    c = draws(layer, c_rel)
    how = "" if method == "kkt" else f", {PGD_ITERS} iterations"
    benchmark.group = f"solve_mvm {method} {device} {layer} f64 (per problem of {alpha.shape[0]}, c={c}={c_rel}N{how})"
    benchmark.extra_info["problems"] = alpha.shape[0]
    if method == "kkt":
        slow = impl == "reference"  # about a second a call: one timed call is enough
        run(benchmark, IMPLS[impl].solve_mvm, alpha, c, "kkt", rounds=1 if slow else 3, warmup=not slow)
    else:
        slow = impl == "reference"  # a Python loop per problem
        run(benchmark, IMPLS[impl].solve_mvm, alpha, c, "pgd", PGD_ITERS, 0.0, rounds=1 if slow else 3, warmup=not slow)


@functools.lru_cache(maxsize=None)
def pgd_iterations_to_kkt(layer, c, device, quick):
    """The fewest PGD steps after which V(p_pgd) is within KKT_GAP of V(p_kkt)
    on every problem, or None if 4096 steps do not get there. Searched with the
    kernel (the reference runs the same iteration, see mvm_cuda/reference.py):
    doubling, then bisection."""
    alpha = _alpha(layer, device, quick)
    v_kkt = ref.variance(mvm_cuda.solve_mvm(alpha, c, "kkt"), alpha, c)

    def close(iters):
        v = ref.variance(mvm_cuda.solve_mvm(alpha, c, "pgd", iters, 0.0), alpha, c)
        return bool(((v - v_kkt) / v_kkt <= KKT_GAP).all())

    hi = 1
    while not close(hi):
        if hi >= 4096:
            return None
        hi *= 2
    lo = hi // 2  # not close (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if close(mid) else (mid, hi)
    return hi


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c_rel", C_REL)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_solve_mvm_to_kkt_accuracy(benchmark, quick, device, layer, c_rel, impl):
    """What a user without the kernels would run for kkt's answer: the
    reference PGD with as many iterations as it needs to reach kkt's variance
    within KKT_GAP, against the kkt kernel."""
    alpha = _alpha(layer, device, quick)
    c = draws(layer, c_rel)
    iters = pgd_iterations_to_kkt(layer, c, device, quick)
    if iters is None:
        pytest.skip(f"PGD does not reach kkt's V within {KKT_GAP} in 4096 steps")
    benchmark.group = (f"solve_mvm kkt kernel vs pgd reference to V within {KKT_GAP:g} of kkt {device} {layer} f64 "
                       f"(per problem of {alpha.shape[0]}, c={c}={c_rel}N, pgd: {iters} iterations)")
    benchmark.extra_info["problems"] = alpha.shape[0]
    benchmark.extra_info["pgd_iterations"] = iters
    if impl == "kernel":
        run(benchmark, mvm_cuda.solve_mvm, alpha, c, "kkt", rounds=3)
    else:
        p = run(benchmark, ref.solve_mvm, alpha, c, "pgd", iters, 0.0, rounds=3)
        v_kkt = ref.variance(mvm_cuda.solve_mvm(alpha, c, "kkt"), alpha, c)
        benchmark.extra_info["rel_gap"] = ((ref.variance(p, alpha, c) - v_kkt) / v_kkt).max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c_rel", (0.1, 1, 4))
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_solve_mvm_vs_sort(benchmark, quick, device, layer, c_rel, impl):
    """solve_mvm "kkt" against a torch.sort of the same alpha (the "reference"
    here, so that ratios.py's speed-up is sort / kkt: the target is >= 0.5), at
    c = 0.1, 1 and 4 times M. benchmarks/solver_vs_sort.py prints the table
    with 500 problems per layer and the accuracy against reference.py."""
    alpha = _alpha(layer, device, quick)
    c = max(1, round(c_rel * alpha.shape[-1]))
    benchmark.group = (f"solve_mvm kkt vs torch.sort as reference {device} {layer} f64 "
                       f"(per problem of {alpha.shape[0]}, c={c}={c_rel}M)")
    benchmark.extra_info["problems"] = alpha.shape[0]
    if impl == "kernel":
        run(benchmark, mvm_cuda.solve_mvm, alpha, c, "kkt")
    else:
        run(benchmark, torch.sort, alpha, dim=-1)
