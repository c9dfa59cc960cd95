"""Choosing a detector's setting and threshold from a user's own validation images.

`DetectorSearch` is a grid search in the style of scikit-learn's GridSearchCV: it
builds one `Detector` per candidate setting (for MVM the number of draws c, for SAP the
fraction drawn, for dropout the drop probability), scores validation images with each,
keeps the best by a documented criterion, and fits the winner's threshold on the clean
validation images. The images it is given are the only ones it sees: keep them apart
from the images the detector is later evaluated on.

The criterion:
- with `attacks` (a mapping of names to functions `attack(model, x, y) -> x_adv`, such
  as the package's own FGSM, BIM-A and JSMA in `mvm_cuda.eval.attacks`): the attacks
  are crafted once on the correctly classified validation images, and a setting scores
  the mean ROC-AUC, over the attacks, of the clean validation images (negatives)
  against the successful adversarial ones (positives, as in Feinman et al.);
- without: nothing tells detection apart, so the search picks the most randomness that
  clean images tolerate, the setting whose R votes agree with the clean prediction least
  often while still at least `agreement` of the time on average.
Ties go to the earlier candidate in the grid's order.
"""
from __future__ import annotations

import itertools
import numbers
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._args import short
from ._progress import hide_bar
from ._settings import SEED, SETTINGS, Number, check_argument, fpr_setting
from .detector import Detector, from_numpy, histogram_entropy
from .roc import roc_report, threshold_for_fpr

__all__ = ["DEFAULT_GRIDS", "DetectorSearch"]

# Settings from little to much randomness are not ordered the same way for every
# method; each grid is a product of these lists.
DEFAULT_GRIDS = {
    "mvm": {"c_ref": ["unit"], "c_rel": [0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0]},
    "sap": {"frac": [0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.0]},
    "dropout": {"p_drop": [0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 0.9, 0.95]},
}


def _as_tensor(value, name: str, dtype_kind: str) -> Tensor:
    if isinstance(value, np.ndarray):
        value = from_numpy(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"DetectorSearch.fit: {name} must be a tensor or numpy array, got {type(value).__name__}")
    if dtype_kind == "f" and not value.is_floating_point() or dtype_kind == "i" and (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        what = "floating point images" if dtype_kind == "f" else "integer class labels"
        raise ValueError(f"DetectorSearch.fit: {name} must hold {what}, got dtype {value.dtype}")
    return value


def _checked_attack(name: str, adv, x: Tensor) -> Tensor:
    """An attack's output, checked: a floating tensor of x's shape with pixels in [0, 1]."""
    if not isinstance(adv, Tensor):
        raise TypeError(f"DetectorSearch.fit: attack {name!r} must return a tensor of x's shape {tuple(x.shape)}, "
                        f"got {type(adv).__name__}")
    if adv.shape != x.shape or not adv.is_floating_point():
        raise ValueError(f"DetectorSearch.fit: attack {name!r} must return images of x's shape {tuple(x.shape)} "
                         f"and a floating dtype, got shape {tuple(adv.shape)} and dtype {adv.dtype}")
    adv = adv.detach()
    if not bool(((adv >= 0) & (adv <= 1)).all()):
        finite = adv[~adv.isnan()]
        seen = f"[{float(finite.min())}, {float(finite.max())}]" if finite.numel() else "none"
        raise ValueError(f"DetectorSearch.fit: attack {name!r} must return pixels in [0, 1] (clamp its output), "
                         f"got values in {seen}" + (" and NaN" if finite.numel() < adv.numel() else ""))
    return adv


class DetectorSearch:
    """Grid search for a detector's setting and threshold on validation images.

    One `Detector` per candidate setting scores the validation images; the best by the
    module docstring's criterion wins, and its threshold is fitted on the clean
    validation images. For a grid of at least three ordered numbers, a best value at
    either end of its grid warns (UserWarning), naming the setting and the way to
    extend the grid: the best setting may lie beyond it.

    Args:
        model: the trained CNN (as for `Detector`).
        method: "mvm", "sap" or "dropout".
        grid: Detector arguments mapped to lists of values, searched over their product
            (default `DEFAULT_GRIDS[method]`: for MVM, c relative to each unit's own
            rows). It may not hold seed, generator or progress.
        per_unit: MVM with c_rel in the grid only: after the grid, each unit's c_rel is
            searched in turn over the grid's values with the others held, so every unit
            may end with its own.
        attacks: None, or {name: attack(model, x, y) -> x_adv}; the criterion is the
            mean ROC-AUC over them, else the clean votes' agreement.
        fpr: the false-positive rate of the fitted threshold, in (0, 1).
        agreement: the criterion without attacks: the least mean agreement of a
            setting's votes with the clean prediction, in (0, 1].
        seed: every candidate's detector seed, an integer in [0, 2**64), so that the
            search is deterministic.
        detector_seed: the seed of best_detector_; None (the default) gives it fresh
            noise on every call, as any Detector's default (a deployed defense must not
            let an attacker replay its noise); pass an integer for reproducible scores
            (`mvm-cuda reproduce` passes its --seed).
        progress: a bar over candidates (None: where stderr is a terminal).
        **detector_kwargs: other Detector settings (R, max_batch, solver,
            channels_last, backend, ...), given to every candidate.

    Attributes:
        best_params_: the best setting (dict), after `fit`.
        best_score_: its criterion (float).
        best_detector_: a Detector with those settings and its threshold fitted on the
            clean validation images.
        results_: one dict per candidate tried: params, score, aucs, agreement, seconds.
        criterion_: "auc" or "agreement".

    Raises:
        TypeError: for a grid key or keyword that is not a Detector setting.
        ValueError: for a bad setting (naming it), before any scoring: an unknown
            method, an empty grid or one over seed, generator or progress, per_unit
            without MVM's c_rel, attacks that are not functions, fpr outside (0, 1) or
            too small to resolve, seed None or outside [0, 2**64), or a value a Detector
            would reject (R, max_batch, ... beyond their bounds).
    """

    def __init__(self, model: nn.Module, method: str = "mvm", grid: Mapping[str, list] | None = None, *,
                 per_unit: bool = False, attacks: Mapping[str, Callable] | None = None, fpr: float = 0.05,
                 agreement: float = 0.9, seed: int = 0, detector_seed: int | None = None,
                 progress: bool | None = None, **detector_kwargs):
        method = check_argument("DetectorSearch", "method", method)
        grid = dict(DEFAULT_GRIDS[method] if grid is None else grid)
        if not grid or any(not isinstance(v, (list, tuple)) or not v for v in grid.values()):
            raise ValueError(f"DetectorSearch: grid must map Detector arguments to non-empty lists, got {short(grid)}")
        fixed = sorted(set(grid) & {"seed", "generator", "progress"})
        if fixed:  # the search sets these itself: a grid over them would be reported but not run
            raise ValueError(f"DetectorSearch: the grid may not vary {', '.join(fixed)} (got {fixed[0]}="
                             f"{short(grid[fixed[0]])}); pass seed= (the search's noise) or detector_seed= "
                             "(the winner's)")
        # Every Detector argument checked as Detector checks it, before any scoring.
        for name, value in detector_kwargs.items():
            check_argument("DetectorSearch", name, value)
        for name, values in grid.items():
            for value in values:
                check_argument("DetectorSearch", name, value)
        if per_unit and (method != "mvm" or "c_rel" not in grid):
            raise ValueError("DetectorSearch: per_unit needs method='mvm' and c_rel in the grid")
        if attacks is not None and (not isinstance(attacks, Mapping) or not attacks
                                    or not all(callable(a) for a in attacks.values())):
            raise ValueError("DetectorSearch: attacks must be None or a non-empty mapping of names to "
                             "functions attack(model, x, y) -> x_adv")
        fpr, self._need = fpr_setting("DetectorSearch", fpr)
        agreement = Number().check("DetectorSearch", "agreement", agreement)
        if not 0 < agreement <= 1:
            raise ValueError(f"DetectorSearch: agreement must be in (0, 1], got {agreement}")
        if seed is None:
            raise ValueError("DetectorSearch: seed must be an integer: a search compares settings on the same noise")
        seed = SEED.check("DetectorSearch", "seed", seed)
        self.detector_seed = SETTINGS["seed"].check("DetectorSearch", detector_seed)
        self.model, self.method, self.grid, self.per_unit = model, method, grid, per_unit
        self.attacks, self.fpr, self.agreement, self.seed = attacks, fpr, agreement, seed
        self.progress, self.detector_kwargs = progress, detector_kwargs

    def _detector(self, params: dict) -> Detector:
        return self._detector_with(params, self.seed)

    def _detector_with(self, params: dict, seed: int | None) -> Detector:
        kwargs = {**self.detector_kwargs, **params, "seed": seed, "progress": False}
        return Detector(self.model, self.method, **kwargs)

    def _evaluate(self, params: dict, x: Tensor, clean_pred: Tensor, adversarial: dict) -> dict:
        t = time.perf_counter()
        det = self._detector(params)
        votes = det.votes(x)
        clean = histogram_entropy(votes)
        agreement = float((votes == clean_pred[:, None]).double().mean())
        aucs = {name: roc_report(clean, det.scores(adv), n_boot=1).auc for name, adv in adversarial.items()}
        score = float(np.mean(list(aucs.values()))) if aucs else agreement
        return {"params": params, "score": score, "aucs": aucs, "agreement": agreement,
                "clean_scores": clean, "seconds": time.perf_counter() - t}

    def _best(self, results: list[dict]) -> dict:
        if self.criterion_ == "auc":
            return max(results, key=lambda r: r["score"])  # max keeps the first of equals
        stable = [r for r in results if r["agreement"] >= self.agreement]
        if stable:
            return min(stable, key=lambda r: r["agreement"])
        return max(results, key=lambda r: r["agreement"])

    def fit(self, x_val, y_val=None) -> "DetectorSearch":
        """Search the grid on validation images and fit the winner's threshold.

        Args:
            x_val: validation images (N, C, H, W) in [0, 1], a tensor or numpy array.
            y_val: their labels (N,), needed with attacks.

        Returns:
            self, with the attributes of the class docstring set.

        Raises:
            TypeError: if x_val or y_val is not a tensor or numpy array, or an attack
                does not return a tensor.
            ValueError: if N cannot resolve fpr (N < ceil(1/fpr)), if attacks are given
                without y_val, if an attack returns images of another shape or outside
                [0, 1], or if the model classifies none of the images correctly or no
                attack succeeds on any (nothing to calibrate against).

        Warns:
            UserWarning: where the best value is an end of its ordered grid.
        """
        x = _as_tensor(x_val, "x_val", "f")
        need = self._need
        if x.dim() != 4 or x.shape[0] < need:
            raise ValueError(f"DetectorSearch.fit: x_val must be images (N, C, H, W) with N >= {need} to resolve "
                             f"fpr={self.fpr}, got shape {tuple(x.shape)}")
        self.criterion_ = "auc" if self.attacks else "agreement"
        probe = self._detector(dict(next(iter(self._candidates()))))

        @torch.inference_mode()
        def predict(images: Tensor) -> Tensor:  # the plain network's classes (units off), on the CPU
            return torch.cat([probe.net(images[s:s + 256].to(probe.device, probe.dtype)).argmax(1).cpu()
                              for s in range(0, images.shape[0], 256)])

        clean_pred = predict(x)
        adversarial = self._adversarial(x, y_val, clean_pred, predict) if self.attacks else {}
        self.adversarial_counts_ = {name: int(a.shape[0]) for name, a in adversarial.items()}
        candidates = [dict(c) for c in self._candidates()]
        units = len(probe.units)
        extra = len(self.grid["c_rel"]) * units if self.per_unit else 0
        with tqdm(total=len(candidates) + extra, desc=f"calibrate {self.method}", unit="setting",
                  disable=hide_bar(self.progress)) as bar:
            results = []
            for params in candidates:
                results.append(self._evaluate(params, x, clean_pred, adversarial))
                bar.update(1)
            best = self._best(results)
            if self.per_unit:  # one unit at a time, the others held at the best so far
                for u in range(units):
                    best = self._best_for_unit(u, units, best, results, bar, (x, clean_pred, adversarial))
        self.best_params_ = best["params"]
        self.best_score_ = best["score"]
        self._warn_on_edge(best["params"])
        det = self._detector_with(best["params"], self.detector_seed)
        det.progress = self.progress
        det.threshold = threshold_for_fpr(best["clean_scores"], self.fpr)
        det.fpr = self.fpr
        self.best_detector_ = det
        self.results_ = [{k: v for k, v in r.items() if k != "clean_scores"} for r in results]
        return self

    def _adversarial(self, x: Tensor, y_val, clean_pred: Tensor, predict) -> dict:
        """{attack name: its successful adversarial images}, crafted on the correctly
        classified images of x."""
        if y_val is None:
            raise ValueError("DetectorSearch.fit: attacks need the labels y_val")
        y = _as_tensor(y_val, "y_val", "i").to(torch.int64).cpu()
        if y.shape != (x.shape[0],):
            raise ValueError(f"DetectorSearch.fit: y_val must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        right = clean_pred == y
        if not bool(right.any()):
            raise ValueError("DetectorSearch.fit: the model classifies none of x_val correctly; nothing to attack")
        xr, yr = x[right.to(x.device)], y[right]
        adversarial = {}
        for name, attack in self.attacks.items():
            adv = _checked_attack(name, attack(self.model, xr, yr), xr)
            pred = predict(adv)
            if bool((pred != yr).any()):
                adversarial[name] = adv[(pred != yr).to(adv.device)]
        if not adversarial:
            raise ValueError("DetectorSearch.fit: no attack succeeded on any validation image")
        return adversarial

    def _best_for_unit(self, u: int, units: int, best: dict, results: list, bar, data: tuple) -> dict:
        """The best result after trying every grid value of c_rel for unit u, the other
        units held at best's; the new results are appended to results."""
        current = best["params"]["c_rel"]
        current = list(current) if isinstance(current, tuple) else [current] * units
        for value in self.grid["c_rel"]:
            bar.update(1)
            if value == current[u]:  # that setting was scored already
                continue
            trial = current.copy()
            trial[u] = value
            results.append(self._evaluate({**best["params"], "c_rel": tuple(trial)}, *data))
        return self._best(results)

    def _warn_on_edge(self, params: dict) -> None:
        """Warn for each ordered numeric grid (3 values or more) whose best value is an end."""
        for name, values in self.grid.items():
            if len(values) < 3 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
                continue
            ordered = list(values) in (sorted(values), sorted(values, reverse=True))
            if not ordered or len(set(values)) < len(values):
                continue
            best = params[name]
            chosen = set(best) if isinstance(best, tuple) else {best}  # per unit: every unit's value
            for end, which, way in ((max(values), "largest", "above"), (min(values), "smallest", "below")):
                if end in chosen:
                    warnings.warn(f"DetectorSearch: the best {name}={end:g} is the {which} value of its grid "
                                  f"{list(values)}; the best setting may lie beyond it: extend the grid {way} "
                                  f"{end:g}", UserWarning, stacklevel=3)

    def _candidates(self):
        names = list(self.grid)
        for values in itertools.product(*(self.grid[n] for n in names)):
            yield dict(zip(names, values))
