"""Turns a pytest-benchmark JSON into markdown tables:

- per op (one table per op): for every group, the kernel's and the reference's
  median time (per problem where a benchmark timed several), the speed-up, and
  where a clone was timed, the fraction of clone bandwidth (clone time over
  kernel time: the same bytes read and written);
- end to end (benchmarks/test_bench_detector.py): images per second of the
  detector with the kernels and with the reference ops, the speed-up, and the
  shares of the time spent sampling and solving (see that file for how they
  are measured);
- the detector's cost (benchmarks/test_bench_detector_cost.py): each method's
  time over R plain passes of the same network.

    python benchmarks/ratios.py out/bench.json
"""
import json
import sys
from collections import defaultdict


def impl_of(bench):
    return bench["params"].get("impl", bench["name"])


def per_unit(bench):
    """Median seconds, per problem where a benchmark timed several."""
    return bench["stats"]["median"] / bench.get("extra_info", {}).get("problems", 1)


def is_detector(bench):
    return "images_per_s" in bench.get("extra_info", {})


def is_cost(bench):
    return bench["group"].startswith("detector-cost")


def ms(seconds):
    return f"{seconds * 1e3:.3f} ms"


def op_tables(benchmarks):
    """One markdown table per op (the group's first word), rows in run order."""
    groups = defaultdict(dict)
    for b in benchmarks:
        if not is_detector(b) and not is_cost(b):
            groups[b["group"]][impl_of(b)] = b
    sections = defaultdict(list)
    for group, impls in groups.items():
        k, r, c = impls.get("kernel"), impls.get("reference"), impls.get("clone")
        if k is None:
            continue
        kt = per_unit(k)
        speed = f"{per_unit(r) / kt:.1f}x" if r else "-"
        frac = f"{per_unit(c) / kt:.2f}" if c else "-"
        op, _, shape = group.partition(" ")
        sections[op].append(f"| {shape} | {ms(kt)} | {ms(per_unit(r)) if r else '-'} | {speed} | {frac} |")
    out = []
    for op, rows in sections.items():
        out += [f"### {op}", "", "| case | kernel | reference | speed-up | of clone bandwidth |",
                "|---|---|---|---|---|", *rows, ""]
    return "\n".join(out)


def detector_table(benchmarks):
    """Images per second with the kernels and with the reference ops, per
    device, model and method."""
    rows = defaultdict(dict)
    for b in benchmarks:
        if is_detector(b):
            info = b["extra_info"]
            rows[(b["params"]["device"], info["model"], info["method"], info["images"], info["R"])][impl_of(b)] = info
    if not rows:
        return ""

    def share(info, key):
        return f"{info[key]:.0%}" if info and info.get(key) else "-"

    out = ["| device | model | method | images x R | images/s, kernels | images/s, reference | speed-up "
           "| sampling share, kernels / reference | solve share, kernels / reference |",
           "|---|---|---|---|---|---|---|---|---|"]
    for (device, model, method, images, R), impls in rows.items():
        k = impls.get("kernel") or impls.get("torch")  # dropout: torch's bernoulli, no mvm op
        r = impls.get("reference")
        if k is None:
            continue
        ref_rate = f"{r['images_per_s']:.2f}" if r else "- (no mvm op)"
        speed = f"{k['images_per_s'] / r['images_per_s']:.1f}x" if r else "-"
        out.append(f"| {device} | {model} | {method} | {images} x {R} | {k['images_per_s']:.2f} | {ref_rate} | {speed} "
                   f"| {share(k, 'sampling_share')} / {share(r, 'sampling_share')} "
                   f"| {share(k, 'solve_share')} / {share(r, 'solve_share')} |")
    return "\n".join(out) + "\n"


def cost_table(benchmarks):
    """benchmarks/test_bench_detector_cost.py: each method's median over R plain passes'
    median, per device, network and R."""
    rows = defaultdict(dict)
    for b in benchmarks:
        if is_cost(b):
            p = b["params"]
            rows[(p["device"], p["name"], p["R"])][p["method"]] = b
    if not rows:
        return ""
    methods = sorted({m for impls in rows.values() for m in impls if m != "plain"})
    out = ["| device | network | R | R plain passes | " + " | ".join(methods) + " |",
           "|---|---|---|---|" + "---|" * len(methods)]
    for (device, name, R), impls in rows.items():
        plain = impls.get("plain")
        cells = [f"{impls[m]['extra_info']['over_plain']:.2f}x" if m in impls and "over_plain" in impls[m].get(
            "extra_info", {}) else "-" for m in methods]
        out.append(f"| {device} | {name} | {R} | {ms(plain['stats']['median']) if plain else '-'} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def machine_line(data):
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {})
    parts = [f"{cpu.get('brand_raw') or info.get('processor') or '?'}, {cpu.get('count', '?')} cores"]
    if info.get("gpu"):
        parts.append(info["gpu"])
    if info.get("torch"):
        parts.append(f"torch {info['torch']}")
    return f"Machine: {'; '.join(parts)}; {data.get('datetime', '')[:10]}"


def main(path):
    with open(path) as f:
        data = json.load(f)
    benchmarks = data["benchmarks"]
    print(machine_line(data) + "\n")
    ops = op_tables(benchmarks)
    if ops:
        print("## Ops: kernel against reference (medians)\n")
        print(ops)
    e2e = detector_table(benchmarks)
    if e2e:
        print("## Detector end to end (medians)\n")
        print(e2e)
    cost = cost_table(benchmarks)
    if cost:
        print("## Detector against R plain passes (medians)\n")
        print(cost)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/bench.json")
