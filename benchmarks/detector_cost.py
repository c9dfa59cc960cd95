"""What a detector costs against the network itself: `Detector(model, method,
R=R, seed=0).scores(x)` over R plain passes of the same network on the same
images, `model(x.repeat(R, 1, 1, 1))` in chunks of 1,024 rows under
`torch.inference_mode()`, in the faster of contiguous and channels_last (model
and input). Each figure is the minimum of `--runs` interleaved runs (plain and
every method in turn), so that a slow minute on a shared machine hits all of
them alike. The ratio counts everything the detector does: the clean pass that
records p (MVM), the units, the bookkeeping.

Three networks, random weights (the cost does not depend on training), random
images in [0, 1]:
- "feinman": Feinman et al.'s MNIST CNN (`build_model("mnist")`);
- "pool": a CNN with max-pooling between its convolutions (`build_model("mnist-pool")`);
- "resnet": a small residual net on CIFAR-size input (`residual_net()` below).

    python benchmarks/detector_cost.py [--images 100] [--R 20 100] [--runs 3] [--device cpu]

`benchmarks/test_bench_detector_cost.py` runs the same cases under pytest-benchmark.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

import mvm_cuda
from mvm_cuda import Detector, keep_freed_memory
from mvm_cuda.eval.models import build_model

METHODS = {
    "MVM": dict(method="mvm", c_rel=0.5),
    "dropout": dict(method="dropout", p_drop=0.5),
    "SAP": dict(method="sap", frac=0.5),
}
CHUNK = 1024


class _Block(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity shortcut: an nn.ReLU(inplace=True)
    module between them, a functional F.relu after the add."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


def residual_net(seed: int = 0) -> nn.Module:
    """conv 3->32 + BN + ReLU, a residual block at 32, a stride-2 conv 32->64 + ReLU, a
    residual block at 64, average pool, linear: input (N, 3, 32, 32), logits (N, 10)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        _Block(32),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        _Block(64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    return net.eval()


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A benchmark network in eval mode and its input shape (C, H, W)."""
    if name == "feinman":
        return build_model("mnist", seed=0).eval(), (1, 28, 28)
    if name == "pool":
        return build_model("mnist-pool", seed=0).eval(), (1, 28, 28)
    if name == "resnet":
        return residual_net(0), (3, 32, 32)
    raise ValueError(f"unknown network {name!r}")


NETWORKS = ("feinman", "pool", "resnet")


def plain_passes(model: nn.Module, fmt: torch.memory_format, x: torch.Tensor, R: int) -> torch.Tensor:
    """R plain passes of model (in memory format fmt) over x, in chunks of CHUNK rows.
    Returns the predicted classes (R * N,)."""
    out = []
    with torch.inference_mode():
        stacked = x.repeat(R, 1, 1, 1)
        for start in range(0, stacked.shape[0], CHUNK):
            out.append(model(stacked[start:start + CHUNK].contiguous(memory_format=fmt)).argmax(1))
    return torch.cat(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def plain_runner(name: str, x: torch.Tensor, R: int):
    """A callable that runs R plain passes of network `name` over x in the faster of the
    two memory formats (each tried twice after a warm-up)."""
    candidates = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        # A copy per format: .to(memory_format) converts the module in place.
        model = build(name)[0].to(x.device).to(memory_format=fmt)
        fn = functools.partial(plain_passes, model, fmt, x, R)
        plain_passes(model, fmt, x[:1], 1)
        candidates.append((min(timed(fn, x.device) for _ in range(2)), fn))
    return min(candidates, key=lambda c: c[0])[1]


def measure(name: str, R: int, images: int, runs: int, device: str = "cpu",
            methods=tuple(METHODS)) -> dict:
    """Minimum seconds over `runs` interleaved runs of the plain passes and of each
    method's `scores`: {"plain": s, method: s, ...}."""
    device = torch.device(device)
    model, shape = build(name)
    x = torch.rand(images, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    plain = plain_runner(name, x, R)
    dets = {m: Detector(model.to(device), **METHODS[m], R=R, seed=0, progress=False) for m in methods}
    for det in dets.values():  # warm-up: one-time costs (tracing, first allocations)
        det.scores(x[:1])
    best = {k: float("inf") for k in ("plain", *methods)}
    for _ in range(runs):
        best["plain"] = min(best["plain"], timed(plain, device))
        for m, det in dets.items():
            best[m] = min(best[m], timed(lambda: det.scores(x), device))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--R", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", help="also write the table as markdown to this file")
    args = parser.parse_args()
    keep_freed_memory()
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    lines = [f"Detector cost over R plain passes: {args.images} images, min of {args.runs} interleaved runs; "
             f"{where}; torch {torch.__version__}; mvm_cuda {mvm_cuda.__version__}; {datetime.date.today()}", "",
             "| network | R | R plain passes | " + " | ".join(args.methods) + " |",
             "|---|---|---|" + "---|" * len(args.methods)]
    print("\n".join(lines), flush=True)
    for name in args.networks:
        for R in args.R:
            t = measure(name, R, args.images, args.runs, args.device, tuple(args.methods))
            ratios = " | ".join(f"{t[m] / t['plain']:.2f}x" for m in args.methods)
            lines.append(f"| {name} | {R} | {t['plain'] * 1e3:.1f} ms | {ratios} |")
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
