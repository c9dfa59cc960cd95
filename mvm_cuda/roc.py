"""ROC statistics of detector scores: the threshold for a false-positive rate, and the
ROC-AUC with a bootstrap interval. `roc_report` needs scikit-learn and scipy (the `eval`
extra); `threshold_for_fpr` needs neither."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ._optional import require
from ._settings import SEED, Integer, Number, fpr_setting

__all__ = ["RocReport", "roc_report", "threshold_for_fpr"]


def threshold_for_fpr(clean_scores, fpr: float) -> float:
    """The smallest threshold with at most floor(fpr * n) of n clean scores above it.

    A score above the threshold means "adversarial". Scores tie a lot (an entropy of R
    votes takes few values), so the false-positive rate achieved on these scores may be
    well below fpr.

    Args:
        clean_scores: (n,) scores of clean images, a tensor or array.
        fpr: the false-positive rate allowed, in (0, 1); a numpy scalar or 0-d tensor
            is taken as its number.

    Returns:
        The threshold, a Python float (one of the scores).

    Raises:
        ValueError: if fpr is not in (0, 1) or below 2**-53, or n < ceil(1/fpr) (fewer
            scores cannot resolve that rate).
    """
    fpr, need = fpr_setting("threshold_for_fpr", fpr)
    s = np.sort(np.asarray(torch.as_tensor(clean_scores).double().cpu()).reshape(-1))
    if s.size < need:
        raise ValueError(
            f"threshold_for_fpr: {s.size} clean images cannot resolve fpr={fpr}; need at least {need}"
        )
    allowed = math.floor(fpr * s.size + 1e-9)  # 1e-9: 0.29 * 100 is 28.999999999999996
    return float(s[s.size - 1 - allowed])


@dataclass
class RocReport:
    """ROC analysis of clean (negative) vs adversarial (positive) scores, as `roc_report` makes it.

    Everything is NaN or empty when either side has no scores.

    Attributes:
        auc: sklearn's roc_auc_score.
        ci: the (low, high) percentile bootstrap interval at `level`, from n_boot
            resamples of the clean and the adversarial scores separately.
        n_clean: the number of clean scores.
        n_adv: the number of adversarial scores.
        level: the interval's confidence level.
        n_boot: the bootstrap resamples.
        fpr: sklearn's roc_curve false-positive rates, a list of floats.
        tpr: its true-positive rates.
        thresholds: its decreasing thresholds.
    """

    auc: float
    ci: tuple[float, float]
    n_clean: int
    n_adv: int
    level: float = 0.95
    n_boot: int = 1000
    fpr: list[float] = field(default_factory=list)
    tpr: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The report as JSON can hold it.

        Returns:
            A dict of every field; ci a list, an infinite threshold a string ("inf").
        """
        d = asdict(self)
        d["ci"] = list(self.ci)
        d["thresholds"] = [t if math.isfinite(t) else str(t) for t in self.thresholds]
        return d


def _rank_auc(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUC of every row pair of neg (B, n0) and pos (B, n1), as (B,), by the rank-sum
    (Mann-Whitney) form, which equals roc_auc_score with ties counted as one half;
    vectorized over the rows, so a bootstrap needs no Python loop."""
    rankdata = require("scipy.stats", "roc_report").rankdata
    n0, n1 = neg.shape[1], pos.shape[1]
    ranks = rankdata(np.concatenate([neg, pos], axis=1), axis=1)
    return (ranks[:, n0:].sum(1) - n1 * (n1 + 1) / 2) / (n0 * n1)


def _bootstrap_auc(neg: np.ndarray, pos: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """AUCs of n_boot resamples, each drawing the negatives and positives separately."""
    rng = np.random.default_rng(seed)
    return _rank_auc(rng.choice(neg, (n_boot, neg.size)), rng.choice(pos, (n_boot, pos.size)))


def roc_report(clean_scores, adv_scores, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> RocReport:
    """ROC-AUC of adversarial (positive) vs clean (negative) scores, with a bootstrap interval.

    The interval is the percentile interval of the AUCs of n_boot resamples, drawn with a
    numpy generator seeded with `seed`, so it is repeatable.

    Args:
        clean_scores: (n0,) scores of clean images, a tensor or array.
        adv_scores: (n1,) scores of adversarial images, a tensor or array.
        n_boot: bootstrap resamples, an integer >= 1.
        seed: the bootstrap's seed, an integer in [0, 2**64).
        level: the interval's confidence level, in (0, 1).

    Returns:
        A RocReport; its numbers are NaN and its curve empty if either side is empty.

    Raises:
        ImportError: if scikit-learn or scipy is not installed.
        ValueError: if n_boot, seed or level is out of its range.
    """
    metrics = require("sklearn.metrics", "roc_report")
    require("scipy.stats", "roc_report")  # before any work: the bootstrap needs it
    n_boot = Integer(1).check("roc_report", "n_boot", n_boot)
    seed = SEED.check("roc_report", "seed", seed)
    level = Number().check("roc_report", "level", level)
    if not 0 < level < 1:
        raise ValueError(f"roc_report: level must be in (0, 1), got {level}")
    neg = np.asarray(torch.as_tensor(clean_scores).double().cpu()).reshape(-1)
    pos = np.asarray(torch.as_tensor(adv_scores).double().cpu()).reshape(-1)
    if neg.size == 0 or pos.size == 0:
        return RocReport(math.nan, (math.nan, math.nan), int(neg.size), int(pos.size), level, n_boot)
    y = np.concatenate([np.zeros(neg.size), np.ones(pos.size)])
    s = np.concatenate([neg, pos])
    fpr, tpr, thresholds = metrics.roc_curve(y, s)
    boot = _bootstrap_auc(neg, pos, n_boot, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(boot, [tail, 100 - tail])
    return RocReport(float(metrics.roc_auc_score(y, s)), (float(low), float(high)), int(neg.size), int(pos.size),
                     level, n_boot, fpr.tolist(), tpr.tolist(), thresholds.tolist())
