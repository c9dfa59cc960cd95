"""The calibrated rows of `mvm-cuda reproduce --calibrate`: each method's setting chosen by
`DetectorSearch` on validation images, next to the paper's fixed settings.

The validation images are the test images after the evaluated ones (the first --n-test),
so the model never trained on them and the evaluation never scores them; the search
crafts the run's attacks on them and picks, per method, the setting of its default grid
(`mvm_cuda.calibration.DEFAULT_GRIDS`; for MVM, c relative to each unit's rows) with the
best mean ROC-AUC. With per_unit, MVM is searched once more with `per_unit=True`:
after the grid, each unit's c_rel in turn.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..calibration import DEFAULT_GRIDS, DetectorSearch
from ..detector import Detector

__all__ = ["N_VAL", "calibrated_detectors"]

N_VAL = 200  # validation images (before keeping the correctly classified ones)


def calibrated_detectors(
    model: nn.Module,
    x_val: Tensor,
    y_val: Tensor,
    craft: Callable[[str, Tensor, Tensor], Tensor],
    attack_names,
    *,
    R: int,
    seed: int,
    max_batch: int,
    fpr: float = 0.05,
    per_unit: bool = False,
    progress: bool | None = None,
) -> list[tuple[str, Detector, dict]]:
    """One calibrated Detector per method (threshold fitted on the clean validation images
    at fpr), as (row name, detector, record): the name is the detector's with
    " (calibrated)", the record a JSON-ready account of the search (the chosen setting, its
    mean validation AUC, every candidate's). craft(name, x, y) -> x_adv crafts (or reads
    from the cache) attack `name` on validation images. per_unit adds an MVM row whose
    c_rel is searched per unit (named " (calibrated per unit)")."""
    attacks = {name: (lambda m, x, y, name=name: craft(name, x, y)) for name in attack_names}
    searches = [(method, grid, False) for method, grid in DEFAULT_GRIDS.items()]
    if per_unit:
        searches.insert(1, ("mvm", DEFAULT_GRIDS["mvm"], True))
    out = []
    for method, grid, unit_by_unit in searches:
        search = DetectorSearch(model, method, grid, per_unit=unit_by_unit, attacks=attacks, fpr=fpr, seed=seed,
                                detector_seed=seed,
                                R=R, max_batch=max_batch, progress=progress).fit(x_val, y_val)
        det = search.best_detector_
        record = {"method": method, "per_unit": unit_by_unit, "best_params": search.best_params_,
                  "best_val_auc": search.best_score_,
                  "n_val": int(x_val.shape[0]), "adversarial_val": search.adversarial_counts_,
                  "candidates": [{k: r[k] for k in ("params", "score", "aucs", "agreement")}
                                 for r in search.results_]}
        out.append((f"{det.name} (calibrated{' per unit' if unit_by_unit else ''})", det, record))
    return out
