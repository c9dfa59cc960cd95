"""Quick GPU benchmark table of the mvm ops against mvm_cuda.reference (run by
benchmarks/gpu_check.sh; about a minute on an H100).

For every op and shape: the median time of the kernel (CUDA events); the bytes
it actually moves per second (for sample_rows the drawn rows of x read plus the
whole output written, as docs/performance.md defines the figure); next to it
the bandwidth of a device-to-device copy of the output's size (a clone: read +
write) and the op's fraction of it; and the speedup over the pure-PyTorch
reference on the same GPU. Where the reference is too slow for the full shape,
it runs on fewer rows and its time is scaled linearly (marked "scaled"; for
launch-bound references that overstates their time at the full shape).

    python benchmarks/gpu_table.py [--out FILE.md]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import mvm_cuda
from mvm_cuda import reference as ref

DEV = torch.device("cuda")


def cuda_time(fn, min_runs: int = 3, max_runs: int = 50, budget_s: float = 1.5,
              warmup: bool = True) -> float:
    """Median seconds per call of fn(), timed with CUDA events (after a
    warm-up call unless warmup=False, for the slow Python-loop references)."""
    if warmup:
        fn()
    torch.cuda.synchronize()
    times = []
    start_wall = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start_wall < budget_s):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth(like: torch.Tensor) -> float:
    """Bytes per second of a device-to-device clone of a tensor of like's size
    (read + write)."""
    x = torch.empty(like.numel() * like.element_size(), dtype=torch.uint8, device=DEV).fill_(1)
    t = cuda_time(lambda: x.clone(), min_runs=5, budget_s=0.5)
    del x
    return 2 * like.numel() * like.element_size() / t


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def drawn_row_bytes(x: torch.Tensor, p: torch.Tensor, c: int) -> int:
    """The expected bytes of x's drawn rows (sample n draws from p[n % P]):
    sum over samples of sum_i pi_i, times a row's bytes (C elements)."""
    per_p_row = ref.inclusion_prob(p.double(), c).sum(-1)  # expected distinct rows drawn
    rows = per_p_row.sum().item() * (x.shape[0] // p.shape[0])
    return round(rows * x.shape[-1] * x.element_size())


class Table:
    def __init__(self):
        self.rows = []

    def add(self, op: str, shape: str, t: float, moved: int, out: torch.Tensor, t_ref: float | None,
            ref_note: str = ""):
        gbs = moved / t / 1e9
        copy_gbs = copy_bandwidth(out) / 1e9
        speed = f"{t_ref / t:.1f}x{ref_note}" if t_ref else "n/a"
        self.rows.append((op, shape, f"{t * 1e3:.3f}", f"{gbs:.0f}", f"{copy_gbs:.0f}", f"{gbs / copy_gbs:.2f}",
                          speed))
        print(" | ".join(self.rows[-1]), flush=True)

    def markdown(self, device: str) -> str:
        head = ("op", "shape", "ms", "GB/s moved", "copy GB/s", "of copy", "speedup vs reference")
        lines = [f"# mvm_cuda GPU check: {device}, torch {torch.__version__}",
                 "", "GB/s moved: the bytes the op actually moves per second: sample_rows reads the drawn rows of x",
                 "(expected count, from pi) and writes the whole output; sap_sample reads h twice and writes the",
                 "output; the row ops read their inputs and write their output once. Copy GB/s: a device-to-device",
                 "clone of a tensor of the output's size (read + write), measured beside it. The solvers are",
                 "compute-bound.", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"


def mnist_p(x: torch.Tensor, images: int, c: int) -> torch.Tensor:
    """MVM probabilities of the first `images` samples of x (as the detector
    computes them on a clean pass)."""
    return mvm_cuda.solve_mvm(mvm_cuda.row_alpha(x[:images]).float(), c)


def bench_sample_rows(tab: Table) -> None:
    c, images, copies = 784, 32, 100
    n = images * copies
    cases = [
        ("float32 NHWC", lambda: torch.rand(n, 26, 26, 64, device=DEV)),
        ("float32 NCHW view", lambda: torch.rand(n, 64, 26, 26, device=DEV).permute(0, 2, 3, 1)),
        ("float16 NHWC", lambda: torch.rand(n, 26, 26, 64, device=DEV, dtype=torch.float16)),
        ("bfloat16 NHWC", lambda: torch.rand(n, 26, 26, 64, device=DEV, dtype=torch.bfloat16)),
        ("float32 NHWC, >= 1 GB", lambda: torch.rand(2 * n, 26, 26, 64, device=DEV)),
    ]
    for name, make in cases:
        x = make()
        imgs = x.shape[0] // copies  # R = 100 stochastic copies of each image, as in the detector
        p = mnist_p(x, imgs, c)
        t = cuda_time(lambda: mvm_cuda.sample_rows(x, p, c))
        t_ref = cuda_time(lambda: ref.sample_rows(x, p, c), max_runs=5)
        shape = f"{tuple(x.shape)} P={imgs} c={c} {name} ({nbytes(x) / 1e9:.2f} GB)"
        tab.add("sample_rows", shape, t, drawn_row_bytes(x, p, c) + nbytes(x), x, t_ref)
        del x, p
        torch.cuda.empty_cache()


def bench_fused(tab: Table) -> None:
    """The units' fused passes as the detector runs them: the pre-activation of P images
    read once, R copies written (relu=True, copies=R), against the same copy of the
    output's size; the reference applies the ReLU and stacks first."""
    images, copies, c = 32, 100, 784
    pre = torch.randn(images, 64, 26, 26, device=DEV).contiguous(memory_format=torch.channels_last)
    keys = torch.arange(images * copies, device=DEV)
    p = mnist_p(pre.relu().permute(0, 2, 3, 1), images, c)
    out_like = torch.empty(images * copies, 64, 26, 26, device=DEV)
    x = pre.permute(0, 2, 3, 1)
    t = cuda_time(lambda: mvm_cuda.sample_rows(x, p, c, keys=keys, relu=True, copies=copies))
    t_ref = cuda_time(lambda: ref.sample_rows(x, p, c, relu=True, copies=copies), max_runs=5)
    moved = nbytes(pre) + nbytes(out_like)  # the P images read (at most), the R * P samples written
    tab.add("sample_rows", f"relu, copies={copies}: {tuple(x.shape)} -> {images * copies} samples, c={c}", t, moved,
            out_like, t_ref)
    t = cuda_time(lambda: mvm_cuda.keyed_dropout(pre, keys, 0.5, relu=True, copies=copies))
    t_ref = cuda_time(lambda: ref.keyed_dropout(pre, keys, 0.5, relu=True, copies=copies), max_runs=5)
    tab.add("keyed_dropout", f"relu, copies={copies}: {tuple(pre.shape)} channels_last -> {images * copies} "
            "samples, p=0.5", t, nbytes(pre) + nbytes(out_like), out_like, t_ref)
    del pre, out_like, x
    torch.cuda.empty_cache()


def bench_sap(tab: Table) -> None:
    h = torch.randn(3200, 26, 26, 64, device=DEV).relu_()
    t = cuda_time(lambda: mvm_cuda.sap_sample(h, 0.5))
    small = h[:320]
    t_ref = cuda_time(lambda: ref.sap_sample(small, 0.5), max_runs=3) * h.shape[0] / small.shape[0]
    k = h[0].numel()
    tab.add("sap_sample", f"{tuple(h.shape)} float32 frac=0.5 (K={k})", t, 3 * nbytes(h), h, t_ref,
            f" (ref on {small.shape[0]} rows, scaled)")
    del h
    torch.cuda.empty_cache()


def bench_project(tab: Table) -> None:
    v = torch.randn(100_000, 1024, device=DEV)
    t = cuda_time(lambda: mvm_cuda.project_simplex(v))
    t_ref = cuda_time(lambda: ref.project_simplex(v), max_runs=5)
    tab.add("project_simplex", f"{tuple(v.shape)} float32", t, 2 * nbytes(v), v, t_ref)
    p = torch.softmax(torch.randn(100_000, 1024, device=DEV), -1)
    alpha = torch.rand_like(p)
    t = cuda_time(lambda: mvm_cuda.mvm_step(p, alpha, 784, 1e-6))
    t_ref = cuda_time(lambda: ref.mvm_step(p, alpha, 784, 1e-6), max_runs=5)
    tab.add("mvm_step", f"{tuple(p.shape)} float32 c=784", t, 3 * nbytes(p), p, t_ref)
    del v, p, alpha
    torch.cuda.empty_cache()


def bench_solve(tab: Table) -> None:
    alpha = torch.rand(12800, 1024, device=DEV) ** 4
    t = cuda_time(lambda: mvm_cuda.solve_mvm(alpha, 2048, "kkt"))
    t_ref = cuda_time(lambda: ref.solve_mvm(alpha[: alpha.shape[0] // 10], 2048, "kkt"), min_runs=1, max_runs=1) * 10
    tab.add("solve_mvm kkt", f"{tuple(alpha.shape)} float32 c=2048", t, 2 * nbytes(alpha), alpha, t_ref, " (ref on 1/10 of the rows, scaled)")
    alpha = torch.rand(1024, 676, device=DEV) ** 4
    t = cuda_time(lambda: mvm_cuda.solve_mvm(alpha, 784, "pgd", 1000, 1e-6), max_runs=5)
    t_ref = cuda_time(lambda: ref.solve_mvm(alpha[:2], 784, "pgd", 1000, 1e-6), min_runs=1, max_runs=1,
                      warmup=False) * alpha.shape[0] / 2
    tab.add("solve_mvm pgd", f"{tuple(alpha.shape)} float32 c=784 max_iter=1000", t, 2 * nbytes(alpha), alpha, t_ref,
            " (ref on 2 rows, scaled)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table as markdown to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    tab = Table()
    for bench in (bench_sample_rows, bench_fused, bench_sap, bench_project, bench_solve):
        bench(tab)
    md = tab.markdown(device)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
