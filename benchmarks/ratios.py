"""Turns a pytest-benchmark JSON into a markdown table of ratios: for every
group, each implementation's median time and its speed-up over the reference
(and, where a clone was timed, the fraction of clone bandwidth).

    python benchmarks/ratios.py out/bench.json
"""
import json
import platform
import sys
from collections import defaultdict


def impl_of(bench):
    return bench["params"].get("impl", bench["name"])


def per_unit(bench):
    """Median seconds, per problem where a benchmark timed several."""
    return bench["stats"]["median"] / bench.get("extra_info", {}).get("problems", 1)


def table(data):
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][impl_of(b)] = b
    lines = ["| op and shape | kernel | reference | speed-up | of clone bandwidth |", "|---|---|---|---|---|"]
    for group, impls in groups.items():
        k, r, c = impls.get("kernel"), impls.get("reference"), impls.get("clone")
        if k is None:
            continue
        kt = per_unit(k)
        rt = per_unit(r) if r else None
        speed = f"{rt / kt:.1f}x" if rt else "-"
        frac = f"{per_unit(c) / kt:.2f}" if c else "-"
        lines.append(f"| {group} | {kt * 1e3:.3f} ms | {rt * 1e3:.3f} ms | {speed} | {frac} |" if rt else
                     f"| {group} | {kt * 1e3:.3f} ms | - | - | {frac} |")
    return "\n".join(lines)


def main(path):
    data = json.load(open(path))
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", platform.processor())
    print(f"Machine: {cpu}, {info.get('cpu', {}).get('count', '?')} cores; {data.get('datetime', '')[:10]}\n")
    print(table(data))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/bench.json")
