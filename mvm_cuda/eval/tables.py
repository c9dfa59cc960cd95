"""The text tables `mvm-cuda reproduce` prints from its results record: Table 2 (accuracy
and attack statistics) and Table 3 (ROC-AUC) beside the paper's numbers, and the adaptive
attack's table. (`eval.report` makes the markdown tables of the README from the file.)
"""
from __future__ import annotations

import math

__all__ = ["print_tables", "print_table"]


def _pct(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.{digits}f}%"


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _fmt_auc(auc: float, ci) -> str:
    if math.isnan(auc):
        return "n/a"
    return f"{auc:.3f} [{ci[0]:.3f},{ci[1]:.3f}]"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print `title`, then the header and rows (lists of strings) in left-aligned columns."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(f"\n{title}\n{line}\n{'-' * len(line)}")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _table2(record: dict, tag: str) -> None:
    attack_names, table2 = record["config"]["attacks"], record["table2"]
    acc_paper = record["paper"].get("accuracy", {})
    rows = [["clean (all test images)", _pct(table2["clean_accuracy"]), "", "", "", "",
             _pct(acc_paper["clean"]) if "clean" in acc_paper else "-"]]
    for name in attack_names:
        s = table2[name]
        rows.append([name, _pct(1 - s["success_rate"]), _pct(s["success_rate"], 1), _num(s["l2"]),
                     _num(s["linf"]), _pct(s["l0_frac"], 1), _pct(acc_paper[name]) if name in acc_paper else "-"])
    print_table(f"Table 2 ({tag}): accuracy on clean and adversarial images; attack success and "
                f"mean distortion of the successful ones ({record['config']['n_attacked']} attacked images)",
                ["images", "accuracy", "success", "L2", "Linf", "L0", "paper accuracy"], rows)


def _table3(record: dict, tag: str) -> None:
    attack_names, auc_paper = record["config"]["attacks"], record["paper"].get("auc", {})
    for which, title in (("successful", "successful attacks as positives (headline)"),
                         ("all", "all attacked images as positives")):
        rows = []
        for det_name, per_attack in record["table3"].items():
            row = [det_name]
            for name in attack_names:
                rep = per_attack[name][which]
                ref = auc_paper.get(det_name, {}).get(name)
                row.append(_fmt_auc(rep["auc"], rep["ci"]) + (f" ({ref:.3f})" if ref is not None else ""))
            rows.append(row)
        print_table(f"Table 3 ({tag}): ROC-AUC [bootstrap 95% CI] (paper), {title}, R = {record['config']['R']}",
                    ["detector"] + list(attack_names), rows)


def _adaptive_table(record: dict, tag: str) -> None:
    st = record["adaptive"]["settings"]
    rows = []
    for det_name, entry in record["adaptive"]["detectors"].items():
        for which, label in (("bim-a", "BIM-A"), ("adaptive", "EOT-BIM (adaptive)")):
            rec = entry[which]
            rows.append([det_name, label, _pct(rec["misclassified"], 0), _pct(rec["flagged"], 0),
                         _pct(rec["success_at_fpr"], 0), _fmt_auc(rec["auc_successful"]["auc"],
                                                                  rec["auc_successful"]["ci"]),
                         _fmt_auc(rec["auc_all"]["auc"], rec["auc_all"]["ci"])])
    print_table(f"Adaptive attack ({tag}): {st['n_images']} images, eps {st['eps']}, step "
                f"{st['eps_iter']}, {st['n_iter']} steps, K = {st['K']} EOT passes; R = {record['config']['R']}; "
                f"threshold at FPR {st['fpr']:.0%} on {st['n_clean']} clean images",
                ["detector", "attack", "misclassified", "flagged", "success at FPR",
                 "AUC (successful)", "AUC (all)"], rows)


def print_tables(record: dict, tag: str) -> None:
    """Print Table 2, Table 3 (successful attacks as positives, then all attacked images)
    and, when the record has one, the adaptive attack's table, titled with `tag` (the
    dataset, or the model where it is another). record: the results dict of
    `reproduce.run` before it is made JSON-ready (NaN where a number is missing)."""
    _table2(record, tag)
    _table3(record, tag)
    if "adaptive" in record:
        _adaptive_table(record, tag)
