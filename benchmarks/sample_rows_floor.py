"""Where sample_rows' time goes on the CPU, against what a copy costs: for
each benchmark layer (8 images x 20 copies, NHWC float32, as in
test_bench_ops.py), the minimum over alternating calls in one process of

- torch.clone (the bandwidth yardstick of the benchmark issue),
- x * s with s of shape (N, H, W, 1) (ATen's row-scale multiply: one pass that
  reads x and writes the output, as the kernel's writer does),
- the kernel at c = 1 (almost no draws),
- the kernel's fixed cost: 32 samples of one channel with the same 8 rows of p
  (the tables, 1/pi and the call, with next to nothing to write),
- the kernel at c = 0.5, 1 and 2 times the pixel count,

each with its ratio to clone. Alternating calls, not medians of separate runs,
because this VM's memory-bound timings drift by up to 2x within minutes.

    python benchmarks/sample_rows_floor.py [--rounds 40]
"""
import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import mvm_cuda  # noqa: E402
from mvm_cuda import keep_freed_memory  # noqa: E402
from test_bench_ops import LAYERS, draws, images_nhwc  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as in the benchmark suite (conftest.py)
    print(f"sample_rows against clone, {torch.get_num_threads()} threads, minimum of {args.rounds} alternating calls\n")
    print("| layer | clone | x * s | kernel c = 1 | fixed (32 x one channel) | kernel c = 0.5 / 1 / 2 N |")
    print("|---|---|---|---|---|---|")
    for layer in LAYERS:
        h = images_nhwc(layer, 8, "cpu")
        x = h.repeat(20, 1, 1, 1)
        s = torch.rand(x.shape[0], x.shape[1], x.shape[2], 1)
        one_channel = torch.rand(32, x.shape[1], x.shape[2], 1)
        p1 = mvm_cuda.solve_mvm(mvm_cuda.row_alpha(h), 1)
        calls = {
            "clone": lambda: x.clone(),
            "x * s": lambda: x * s,
            "c = 1": lambda: torch.ops.mvm.sample_rows(x, p1, 1),
            "fixed": lambda: torch.ops.mvm.sample_rows(one_channel, p1, 1),
        }
        for c_rel in (0.5, 1, 2):
            c = draws(layer, c_rel)
            p = mvm_cuda.solve_mvm(mvm_cuda.row_alpha(h), c)
            calls[c_rel] = lambda p=p, c=c: torch.ops.mvm.sample_rows(x, p, c)
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(args.rounds):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - t0)
        clone = best["clone"]
        ratio = lambda name: f"{clone / best[name]:.2f}"  # noqa: E731
        print(f"| {layer} | {clone * 1e3:.2f} ms | {ratio('x * s')} | {ratio('c = 1')} | {best['fixed'] * 1e3:.2f} ms | "
              f"{' / '.join(ratio(c) for c in (0.5, 1, 2))} |", flush=True)


if __name__ == "__main__":
    main()
