"""The detector end to end (the paper's Alg. 3): `Detector.scores` on a batch of
images with R = 100 stochastic passes, (a) with the kernels (backend=mvm_cuda.ops)
and (b) with the pure-PyTorch reference ops swapped in (backend=mvm_cuda.reference),
on the MNIST and CIFAR-10 models with random weights (build_model(seed=0): the
time does not depend on training), for MVM (c = 1N, kkt solver), and SAP 50% and
test-time dropout 0.5 for context (dropout uses torch's bernoulli, no mvm op, so
it runs once, as impl "torch").

Batch: CUDA 32 images; CPU 2 images (--quick: 1), so that `make bench` takes
minutes on 2 cores. max_batch = images x R, so a batch is one clean pass (MVM)
and one forward of the 100 stacked copies, as the detector runs it.

extra_info, read by benchmarks/ratios.py: images, R, images_per_s (from the
median), and where the time goes, measured in one more scoring call after the
timed ones, with a forward pre-hook and hook on every unit that time the unit
(synchronising CUDA around it): sampling_share = time inside the units in
"sample" mode (the sampling op) over the call's time; solve_share = time inside
the units in "record" mode (alpha and solve_mvm on the clean pass, MVM only)
over the call's time. The rest is the network's own layers (convolutions
first) and the detector's bookkeeping."""
import time

import pytest
import torch

import mvm_cuda
from mvm_cuda import Detector, sampling_units
from mvm_cuda.eval.models import INPUT_SHAPES, build_model

from conftest import DEVICES, run, sync

METHODS = {
    "mvm c=1N": dict(method="mvm", c_rel=1.0),
    "sap 50%": dict(method="sap", frac=0.5),
    "dropout 0.5": dict(method="dropout", p_drop=0.5),
}
# Dropout calls no mvm op: it keeps the Detector's default backend.
BACKENDS = {"kernel": mvm_cuda.ops, "reference": mvm_cuda.reference, "torch": None}
CASES = [("mvm c=1N", "kernel"), ("mvm c=1N", "reference"), ("sap 50%", "kernel"), ("sap 50%", "reference"),
         ("dropout 0.5", "torch")]
R = 100


def unit_times(det, x):
    """Seconds spent inside the detector's units per mode ("record", "sample")
    and in total, over one det.scores(x) call."""
    spent = {"record": 0.0, "sample": 0.0}
    device = x.device

    def before(unit, args):
        sync(device)
        unit._t0 = time.perf_counter()

    def after(unit, args, out):
        sync(device)
        spent[unit.mode] = spent.get(unit.mode, 0.0) + time.perf_counter() - unit._t0

    hooks = [h for u in sampling_units(det.net)
             for h in (u.register_forward_pre_hook(before), u.register_forward_hook(after))]
    try:
        sync(device)
        t0 = time.perf_counter()
        det.scores(x)
        total = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    return spent, total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", ["mnist", "cifar10"])
@pytest.mark.parametrize("method,impl", CASES)
def test_detector(benchmark, quick, device, model_name, method, impl):
    images = 32 if device == "cuda" else 1 if quick else 2
    model = build_model(model_name, seed=0).eval().to(device)
    x = torch.rand(images, *INPUT_SHAPES[model_name], generator=torch.Generator().manual_seed(0)).to(device)
    backend = BACKENDS[impl]
    det = Detector(model, **METHODS[method], R=R, max_batch=images * R, seed=0, backend=backend, progress=False)
    benchmark.group = f"detector {device} {model_name} {method} ({images} images x R={R})"
    # On the CPU the timed calls take seconds, and a warm-up call would double
    # the suite's time for one-time costs of milliseconds.
    cuda = device == "cuda"
    run(benchmark, det.scores, x, rounds=(2 if quick else 3) if cuda else 2, warmup=cuda)
    spent, total = unit_times(det, x)
    info = benchmark.extra_info
    info.update(model=model_name, method=method, backend=backend.__name__ if backend else "torch",
                images=images, R=R, images_per_s=images / benchmark.stats.stats.median,
                sampling_share=spent["sample"] / total, solve_share=spent["record"] / total)
