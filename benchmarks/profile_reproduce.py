"""Where the default run's scoring time goes (docs/performance.md, "Scaling").

Every detector of `mvm-cuda reproduce` (reproduce.DETECTORS, R = 20, max_batch 1024) scores
the default run's attacked MNIST images (the correctly classified ones of the first 150
test images, clean) in the run's chunks, while hooks on its units time the sampling (units
in "sample" mode: sample_rows, sap_sample or dropout's mask) and the recording of p (units
in "record" mode, MVM only: alpha and the solve on the clean pass). The rest of a call is
the network's own layers (and the detector's bookkeeping). The model comes from the cache
(trained first if missing, minutes). Prints one row per detector and the totals.

    python benchmarks/profile_reproduce.py [--threads N]
"""
import argparse
import time

import torch

from mvm_cuda import Detector, sampling_units
from mvm_cuda.eval import data, models, reproduce
from mvm_cuda.malloc import keep_freed_memory


def unit_seconds(det, x, chunk):
    """Seconds inside the units per mode, and in all, over det.scores of x chunk by chunk."""
    spent = {"record": 0.0, "sample": 0.0, "off": 0.0}

    def before(unit, args):
        unit._t0 = time.perf_counter()

    def after(unit, args, out):
        spent[unit.mode] += time.perf_counter() - unit._t0

    hooks = [h for u in sampling_units(det.net)
             for h in (u.register_forward_pre_hook(before), u.register_forward_hook(after))]
    try:
        t0 = time.perf_counter()
        for lo in range(0, x.shape[0], chunk):
            hi = min(lo + chunk, x.shape[0])
            det.scores(x[lo:hi], index=torch.arange(lo, hi))
        total = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    return spent, total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    dataset = data.load_dataset("mnist", seed=0)
    model = models.load_or_train("mnist", dataset, seed=0, progress=False)
    n = reproduce.DEFAULTS["n_test"]
    x, y = dataset.x_test[:n], dataset.y_test[:n]
    x = x[models.predict(model, x) == y]
    R = reproduce.DEFAULTS["R"]
    print(f"{x.shape[0]} MNIST images, R = {R}, chunks of {reproduce.CHUNK}, {args.threads} thread(s)")
    print(f"{'detector':<12} {'seconds':>8} {'network':>8} {'sampling':>9} {'alpha+solve':>12}")
    sums = {"record": 0.0, "sample": 0.0, "total": 0.0}
    for method, kwargs in reproduce.DETECTORS:
        det = Detector(model, method, R=R, max_batch=1024, seed=0, progress=False, **kwargs)
        spent, total = unit_seconds(det, x, reproduce.CHUNK)
        rest = total - spent["record"] - spent["sample"]
        print(f"{det.name:<12} {total:8.2f} {rest / total:8.0%} {spent['sample'] / total:9.0%} "
              f"{spent['record'] / total:12.0%}")
        for k in ("record", "sample"):
            sums[k] += spent[k]
        sums["total"] += total
    rest = sums["total"] - sums["record"] - sums["sample"]
    print(f"{'all seven':<12} {sums['total']:8.2f} {rest / sums['total']:8.0%} "
          f"{sums['sample'] / sums['total']:9.0%} {sums['record'] / sums['total']:12.0%}")


if __name__ == "__main__":
    main()
