"""SAP against MVM: cost per pass and per draw, measured with the kernels on the
MNIST model's first layer (26x26x64 per image: M = 676 rows of 64 channels,
K = 43,264 entries).

The paper's Table 1 says a draw costs O(mnp) for SAP and O(mn) for MVM, so MVM
would be cheaper per draw. With a CDF and a search (the kernels build a table
from p per sample, then each draw is a lookup), a draw costs about the same in
both; MVM's real saving is far fewer draws (c = 784 rows against r = 21,632 or
43,264 entries per pass). This script measures which holds:

- per pass: the median time of one kernel call on a batch of copies (as the
  detector runs it), divided by the copies. SAP's time includes computing
  p = |h| / sum |h| on every pass, as SAPUnit does; MVM's p is solved once per
  image on the clean pass, shown apart, amortised over R = 100 passes;
- per draw: the time per pass over the draws per pass;
- the cost model: time per pass = fixed + draws x marginal, a least-squares
  fit over draw counts from 1/4 to 4 times the scheme's own. "fixed" is what
  does not grow with the draws (reading and writing the activation, the
  table); "marginal" is the cost of one more draw;
- MVM at SAP 50%'s draw count, for a per-draw comparison at equal draws;
- a clone of the same activations: the memory floor of any pass.

    python benchmarks/draws.py [--device cpu|cuda] [--copies N] [--out FILE.md]

Random weights (build_model("mnist", seed=0)) on random images: the shape and
the draw counts are what matter here, not the values.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

import mvm_cuda
from mvm_cuda import keep_freed_memory
from mvm_cuda.eval.models import build_model

R = 100  # stochastic passes per image, as in the paper
IMAGES = 8


def median_seconds(fn, device, rounds):
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def fit(draws, seconds):
    """Least-squares line seconds = fixed + marginal * draws."""
    n = len(draws)
    mx, my = sum(draws) / n, sum(seconds) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(draws, seconds)) / sum((x - mx) ** 2 for x in draws)
    return my - slope * mx, slope


def main():
    keep_freed_memory()  # as in the benchmark suite (conftest.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--copies", type=int, help="samples per call (default: cpu 32, cuda 3200)")
    parser.add_argument("--out", help="also write the tables as markdown to this file")
    args = parser.parse_args()
    device = args.device
    copies = args.copies or (3200 if device == "cuda" else 32)
    rounds = 20 if device == "cuda" else 11

    model = build_model("mnist", seed=0).eval()
    images = torch.rand(IMAGES, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = torch.relu(model[0](images)).permute(0, 2, 3, 1).contiguous().to(device)  # NHWC, as the units see it
    x = h.repeat(max(1, copies // IMAGES), 1, 1, 1)  # copy-major: whole copies of the images
    n = x.shape[0]
    m, k = h.shape[1] * h.shape[2], h[0].numel()
    alpha = mvm_cuda.row_alpha(h)

    def per_pass(fn):
        return median_seconds(fn, device, rounds) / n

    def mvm(c, p=None):
        p = mvm_cuda.solve_mvm(alpha, c) if p is None else p
        return per_pass(lambda: mvm_cuda.sample_rows(x, p, c))

    def sap(frac):
        return per_pass(lambda: mvm_cuda.sap_sample(x, frac))

    def solve_per_image(c):
        return median_seconds(lambda: mvm_cuda.solve_mvm(alpha, c), device, rounds) / IMAGES

    clone = per_pass(lambda: x.clone())
    rows = []  # (scheme, draws, seconds per pass, solve seconds per pass)
    for c in (392, 784, 1568):
        rows.append((f"MVM c = {c} ({c / 784:g}N)", c, mvm(c), solve_per_image(c) / R))
    for frac in (0.5, 1.0):
        r = round(frac * k)
        rows.append((f"SAP {frac:.0%} (r = {r:,})", r, sap(frac), 0.0))
    r50 = round(0.5 * k)
    rows.append((f"MVM c = {r50:,} (SAP 50%'s draws)", r50, mvm(r50), solve_per_image(r50) / R))

    p784 = mvm_cuda.solve_mvm(alpha, 784)  # the draw count, not p, is what the fit varies
    mvm_draws = [196, 392, 784, 1568, 3136]
    mvm_fit = fit(mvm_draws, [mvm(c, p784) for c in mvm_draws])
    sap_fracs = [0.125, 0.25, 0.5, 1.0, 2.0]
    sap_fit = fit([round(f * k) for f in sap_fracs], [sap(f) for f in sap_fracs])

    name = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    lines = [
        f"SAP vs MVM per pass and per draw, MNIST first layer 26x26x64 (M = {m} rows, K = {k:,} entries), "
        f"kernels on {device} ({name}), {n} copies per call; {datetime.date.today()}",
        "",
        "| scheme | draws per pass | time per pass | per draw | MVM solve per pass (1/R of a per-image solve) |",
        "|---|---|---|---|---|",
    ]
    for scheme, d, t, solve in rows:
        solve_s = f"{solve * 1e6:.1f} us" if solve else "- (p from h on every pass, included)"
        lines.append(f"| {scheme} | {d:,} | {t * 1e6:.1f} us | {t / d * 1e9:.2f} ns | {solve_s} |")
    lines.append(f"| clone of the activation (memory floor) | - | {clone * 1e6:.1f} us | - | - |")
    lines += [
        "",
        "Cost model per pass = fixed + draws x marginal (least squares over 1/4 to 4 times each scheme's draws):",
        "",
        "| scheme | draw counts fitted | fixed per pass | marginal per draw |",
        "|---|---|---|---|",
    ]
    for scheme, counts, (fixed, marginal) in (("MVM (p for c = 784)", mvm_draws, mvm_fit),
                                              ("SAP", [round(f * k) for f in sap_fracs], sap_fit)):
        counts = ", ".join(f"{d:,}" for d in counts)
        lines.append(f"| {scheme} | {counts} | {fixed * 1e6:.1f} us | {marginal * 1e9:.2f} ns |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
