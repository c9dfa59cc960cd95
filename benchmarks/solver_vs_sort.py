"""solve_mvm "kkt" against a torch.sort of the same alpha, on the CPU, with
its accuracy against the reference's KKT solver. Run from the repo root:

    .venv/bin/python benchmarks/solver_vs_sort.py [--threads 2] [--repeats 7] [--check-rows 40]

Prints a markdown table: shape, c, kkt and sort milliseconds (each the minimum
of interleaved runs, so that load on a shared machine hits both alike), their
ratio, the largest relative gap of V(p) to the reference's optimum over the
first --check-rows problems, and the largest |row sum - 1|.

alpha: squared row norms of the ReLU activations of the benchmark networks
(random weights, random images: mvm_cuda.eval.models), 500 problems per
layer, and tests/test_solve_mvm.py's synthetic alpha over 8 decades with 20%
zeros; c = 0.1, 1 and 4 times M."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mvm_cuda  # noqa: E402
from mvm_cuda import reference as ref  # noqa: E402

from conftest import relu_outputs  # noqa: E402

PROBLEMS = 500


def layer_alphas():
    """(name, alpha (500, M) float64) for the layers of the benchmark networks."""
    out = []
    for model, picks in (("mnist", (0, 1)), ("cifar10", (0, 2, 4))):
        hs = relu_outputs(model, PROBLEMS)
        for i in picks:
            h = hs[i].permute(0, 2, 3, 1).contiguous()
            alpha = mvm_cuda.row_alpha(h).double()
            out.append((f"{model} relu{i} {h.shape[1]}x{h.shape[2]}x{h.shape[3]}", alpha))
    return out


def synthetic_alpha(b, m, seed=0, decades=8, zeros=0.2):
    """tests/test_solve_mvm.py's alpha: log-uniform over `decades`, some zeros."""
    g = torch.Generator().manual_seed(seed)
    a = 10.0 ** (-decades * torch.rand(b, m, generator=g, dtype=torch.float64))
    a[torch.rand(b, m, generator=g) < zeros] = 0.0
    a[:, 0] = 1.0
    return a


def best_ms(fns, repeats):
    """Minimum milliseconds of each fn over `repeats` interleaved rounds."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[j] = min(best[j], 1e3 * (time.perf_counter() - t0))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--check-rows", type=int, default=40, help="problems checked against the reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = layer_alphas() + [("synthetic 8 decades", synthetic_alpha(PROBLEMS, 676))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print("| alpha | shape | c | kkt ms | sort ms | kkt / sort | max rel V gap | max abs(sum - 1) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, alpha in cases:
        m = alpha.shape[-1]
        for c_rel in (0.1, 1, 4):
            c = max(1, round(c_rel * m))
            kkt_ms, sort_ms = best_ms([lambda: mvm_cuda.solve_mvm(alpha, c, "kkt"),
                                       lambda: torch.sort(alpha, dim=-1)], args.repeats)
            p = mvm_cuda.solve_mvm(alpha, c, "kkt")
            a = alpha[: args.check_rows]
            v_ref = ref.variance(ref.solve_mvm(a, c, "kkt"), a, c)
            v = ref.variance(p[: args.check_rows], a, c)
            gap = ((v - v_ref) / v_ref).abs().max().item()
            sums = (p.sum(-1) - 1).abs().max().item()
            print(f"| {name} | {tuple(alpha.shape)} | {c} | {kkt_ms:.2f} | {sort_ms:.2f} | {kkt_ms / sort_ms:.2f} "
                  f"| {gap:.1e} | {sums:.1e} |", flush=True)


if __name__ == "__main__":
    main()
