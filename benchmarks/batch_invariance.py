"""How often a vote changes with the batch an image is scored in.

A seeded detector draws image n's noise from keys of (seed, n, unit, pass), so its masks
do not depend on the batch; the network's own forward may still round differently at
another batch size on the CPU (oneDNN and MKL pick kernels by shape). This scores the
default run's clean and FGSM images (its cached model and attack, else trained and
crafted) at several max_batch values and counts the votes and scores that differ from
max_batch = 1024.

    python benchmarks/batch_invariance.py [--n 148] [--R 20]
"""
from __future__ import annotations

import argparse

import torch

from mvm_cuda import Detector, keep_freed_memory
from mvm_cuda.eval import attacks, data, models

DETECTORS = (("mvm", dict(c_rel=0.5)), ("sap", dict(frac=0.5)), ("dropout", dict(p_drop=0.5)))
MAX_BATCHES = (7, 100, 333)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=148, help="clean images (and as many FGSM ones)")
    parser.add_argument("--R", type=int, default=20)
    args = parser.parse_args()
    keep_freed_memory()
    dataset = data.load_dataset("mnist", seed=0)
    model = models.load_or_train("mnist", dataset, epochs=models.DEFAULT_EPOCHS["mnist"], seed=0, progress=False)
    x, y = dataset.x_test[:args.n], dataset.y_test[:args.n]
    images = torch.cat([x, attacks.craft("fgsm", model, x, y, "mnist", progress=False)])
    print(f"{images.shape[0]} images (clean and FGSM), R = {args.R}; differences from max_batch = 1024")
    print("| detector | max_batch | votes that differ | scores that differ |\n|---|---|---|---|")
    for method, kwargs in DETECTORS:
        def votes(max_batch):
            return Detector(model, method, R=args.R, max_batch=max_batch, seed=0, progress=False,
                            **kwargs).votes(images)

        base = votes(1024)
        for max_batch in MAX_BATCHES:
            other = votes(max_batch)
            scores = (other != base).any(1)
            name = Detector(model, method, R=1, progress=False, **kwargs).name
            print(f"| {name} | {max_batch} | {int((other != base).sum())} of {base.numel()} "
                  f"| {int(scores.sum())} of {base.shape[0]} |", flush=True)


if __name__ == "__main__":
    main()
