"""Does the default pipeline give the same bits under other CPU settings?

Runs a reduced `mvm-cuda reproduce` (--n-test 40 --R 10 --epochs 2 by default), each time with a
fresh cache (so the model is trained again) and a fresh output folder, under settings of
    ATEN_CPU_CAPABILITY  default | avx2      (ATen's kernels)
    MVM_CPU_ISA          default | native    (the package's own AVX2/F16C paths; native: unset)
    threads              1 | 2               (OMP_NUM_THREADS and MKL_NUM_THREADS)
By default the four settings of a pairwise covering set (every pair of values of any two
knobs occurs once); --all runs all eight. Compares each run's results JSON, less what is
meant to differ (timings, the output paths, the caller's thread count), and the SHA-256
of the trained weights in its cache, with the first run's; prints a table and the first
differing fields. Exit status 0 when every run gives the same bits, 1 otherwise.

Run from the repository root with the python whose mvm_cuda is under test:
    python benchmarks/repro_check.py [--all] [--n-test 40] [--R 10] [--epochs 2] [--dataset mnist] [--model M]
(--epochs 0: the dataset's default epochs, as in the full default run).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAIRWISE = [("default", "default", 1), ("default", "native", 2), ("avx2", "default", 2), ("avx2", "native", 1)]
ALL = list(itertools.product(("default", "avx2"), ("default", "native"), (1, 2)))


def comparable(record: dict) -> dict:
    """The results record less what may differ between equal runs."""
    record = json.loads(json.dumps(record))
    record.pop("seconds", None)
    record.pop("figures", None)
    record.get("args", {}).pop("out", None)
    record.get("config", {}).pop("threads", None)
    for per_attack in record.get("table3", {}).values():
        per_attack.pop("seconds", None)
    return record


def differences(a, b, path="") -> list[str]:
    """The paths at which two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{path}.{k}") if k in a and k in b else [f"{path}.{k}"]
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "."]


def model_checksums(cache: Path) -> str:
    """The checksums (SHA-256 of the tensors) that eval.cache stored with the cached weights."""
    import torch

    sums = []
    for f in sorted((cache / "models").glob("*.pt")):
        sums.append(torch.load(f, map_location="cpu", weights_only=True)["checksum"][:16])
    return ",".join(sums) or "none"


def run_one(setting, args, work: Path) -> tuple[dict, str, float]:
    cap, isa, threads = setting
    name = f"{cap}-{isa}-{threads}"
    cache, out = work / name / "cache", work / name / "out"
    env = {**os.environ, "MVM_CUDA_CACHE": str(cache), "ATEN_CPU_CAPABILITY": cap,
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("MVM_CPU_ISA", None)
    if isa == "default":
        env["MVM_CPU_ISA"] = "default"
    cmd = [sys.executable, "-m", "mvm_cuda", "reproduce", "--dataset", args.dataset, "--n-test", str(args.n_test),
           "--R", str(args.R), "--no-progress", "--device", "cpu", "--out", str(out)]
    if args.model:
        cmd += ["--model", args.model]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    t = time.perf_counter()
    # Outside the repository root, whose source folder has no compiled _C.
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"repro_check: {name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    (path,) = out.glob("results_*.json")
    record = json.loads(path.read_text())
    print(f"--- {name}: {seconds:.0f} s\n" + "\n".join(proc.stdout.splitlines()[:9]), flush=True)
    return record, model_checksums(cache), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="all eight settings (default: four, pairwise)")
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--R", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2, help="training epochs; 0: the dataset's default")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    settings = ALL if args.all else PAIRWISE
    rows, first = [], None
    with tempfile.TemporaryDirectory(prefix="mvm-repro-") as tmp:
        for setting in settings:
            record, weights, seconds = run_one(setting, args, Path(tmp))
            record = comparable(record)
            digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
            if first is None:
                first = (record, weights)
            diff = differences(first[0], record)
            rows.append((setting, weights, digest, seconds, diff, weights == first[1]))
    print("\nATEN_CPU_CAPABILITY  MVM_CPU_ISA  threads  weights (SHA-256)  results JSON  same bits  seconds")
    for (cap, isa, threads), weights, digest, seconds, diff, same_weights in rows:
        same = "yes" if not diff and same_weights else "NO"
        print(f"{cap:<20} {isa:<12} {threads:<8} {weights:<18} {digest:<13} {same:<10} {seconds:.0f}")
    bad = [(s, d, w) for s, _, _, _, d, w in rows if d or not w]
    for setting, diff, w in bad:
        print(f"{setting}: weights {'differ' if not w else 'equal'}; {len(diff)} field(s) differ, first: {diff[:8]}")
    print("all runs give the same bits" if not bad else f"{len(bad)} of {len(rows)} runs differ from the first")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
