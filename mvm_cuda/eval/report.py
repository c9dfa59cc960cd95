"""Markdown tables from `mvm-cuda reproduce` results files, for the README and docs/results.md.

    python -m mvm_cuda.eval.report out/results_mnist.json [more results files]

prints, per file, the summary table (each method's paper setting beside its calibrated one,
when the run had --calibrate) and the full table (every detector, with intervals, the
paper's number in parentheses where it has one), then each calibrated search's
candidates.
"""
from __future__ import annotations

import json
import sys

__all__ = ["summary_table", "full_table", "search_tables", "main"]

_NAMES = {"fgsm": "FGSM", "bim-a": "BIM-A", "bim-b": "BIM-B", "jsma": "JSMA"}
_FIXED = {"mvm": "MVM c=0.5N", "sap": "SAP 50%", "dropout": "dropout 0.5"}  # the paper's first rows


def _attacks(record: dict) -> list[str]:
    return record["config"]["attacks"]


def _auc(value) -> str:
    """An AUC cell: "n/a" where there is none (null in the file: an attack with no
    successful image, or no clean one)."""
    return "n/a" if value is None or value != value else f"{value:.3f}"


def _with_ci(rep: dict) -> str:
    ci = rep.get("ci") or [None, None]
    if _auc(rep["auc"]) == "n/a":
        return "n/a"
    return f"{_auc(rep['auc'])} [{_auc(ci[0])}, {_auc(ci[1])}]"


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(first: str, attacks) -> list[str]:
    return [_row([first] + [_NAMES.get(a, a) for a in attacks]), _row(["---"] * (len(attacks) + 1))]


def summary_table(record: dict) -> str:
    """Per method, the paper's setting and the calibrated one: ROC-AUC with successful
    attacks as positives."""
    attacks, rows = _attacks(record), record["table3"]
    lines = _header("detector", attacks)
    for method, fixed in _FIXED.items():
        calibrated = [name for name, row in rows.items() if row.get("calibration", {}).get("method") == method]
        for name in ([fixed] if fixed in rows else []) + calibrated:
            lines.append(_row([name] + [_auc(rows[name][a]["successful"]["auc"]) for a in attacks]))
    return "\n".join(lines)


def full_table(record: dict) -> str:
    """Every detector: ROC-AUC [95% CI] with successful attacks as positives, and the
    paper's number in parentheses."""
    attacks, paper = _attacks(record), record.get("paper", {}).get("auc", {})
    lines = _header("detector", attacks)
    for name, row in record["table3"].items():
        cells = [name]
        for a in attacks:
            rep = row[a]["successful"]
            ref = paper.get(name, {}).get(a)
            cells.append(_with_ci(rep) + (f" ({ref:.3f})" if ref is not None else ""))
        lines.append(_row(cells))
    return "\n".join(lines)


def search_tables(record: dict) -> str:
    """Each calibrated search: every candidate's mean validation AUC and per-attack AUCs."""
    out = []
    for name, row in record["table3"].items():
        search = row.get("calibration")
        if search is None:
            continue
        attacks = list(search["candidates"][0]["aucs"])
        lo, hi = search["val_test_images"]
        out.append(f"{name}: searched on test images {lo}..{hi - 1} ({search['n_val']} classified correctly; "
                   f"successful attacks {', '.join(f'{_NAMES.get(a, a)} {n}' for a, n in search['adversarial_val'].items())})")
        out += ["", _row(["setting", "mean AUC"] + [_NAMES.get(a, a) for a in attacks]),
                _row(["---"] * (len(attacks) + 2))]
        for c in search["candidates"]:
            setting = ", ".join(f"{k}={v}" for k, v in c["params"].items())
            out.append(_row([setting, _auc(c["score"])] + [_auc(c["aucs"][a]) for a in attacks]))
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the tables of every results file named in argv."""
    for path in sys.argv[1:] if argv is None else argv:
        with open(path) as f:
            record = json.load(f)
        cfg = record["config"]
        print(f"## {cfg.get('model', cfg['dataset'])}: {cfg['n_attacked']} attacked images, R = {cfg['R']}\n")
        print(summary_table(record), "\n")
        print(full_table(record), "\n")
        print(search_tables(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
