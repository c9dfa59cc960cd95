"""The paper's Alg. 3: detect adversarial images by the entropy of R randomized predictions.

`Detector` wraps a trained CNN (left untouched) with sampling units after the ReLUs of
its conv part (MVM, SAP or test-time dropout, see `mvm_cuda.nn`) and scores images:
(s1) one clean pass records alpha and solves p once per image and unit (MVM only);
(s2) R stochastic passes, run as forwards over stacked copies of the batch; (s3) the
entropy of the histogram of the R predicted classes; (s4) "adversarial" when the score
exceeds a threshold fitted on clean images. `roc_report` computes the ROC-AUC with a
bootstrap interval; it needs scikit-learn and scipy (the `eval` extra).
"""
from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import re
import secrets
import threading
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import ops
from ._digest import tensor_digest
from ._files import write_atomically
from ._keys import sample_keys
from ._optional import require
from ._progress import hide_bar
from .nn import DropoutUnit, MVMUnit, SAPUnit, first_unit_dominates, insert_units, sampling_units, set_mode

__all__ = ["METHODS", "SOLVERS", "Detector", "RocReport", "histogram_entropy", "threshold_for_fpr", "roc_report"]

METHODS = ("mvm", "sap", "dropout")
SOLVERS = ("kkt", "pgd")
C_REFS = ("input", "unit")
_FORMAT = "mvm_cuda-detector-v1"
_KNOWN_BACKENDS = ("mvm_cuda.ops", "mvm_cuda.reference")
_SAVED_KEYS = ("method", "c", "c_rel", "frac", "p_drop", "R", "max_batch", "seed", "solver", "channels_last",
               "backend", "threshold", "fpr", "input_shape")
_INT64_MAX = 2**63 - 1
# Bounds on a detector's counts, so that one call's work and memory fit a machine: R
# passes of max_batch samples each; the ops themselves keep their int64 range.
_IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_R = 100_000
MAX_BATCH = 2**24
_SEED_END = 2**64  # torch.Generator.manual_seed and numpy take seeds in [0, 2**64)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value):
    """value as a Python float if it is a real number (a 0-d tensor or numpy scalar
    included; not a bool), else None."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _is_count(value, high: int = _INT64_MAX) -> bool:
    """value is an integer (or an integral float) in [1, high]."""
    f = _real(value)
    return f is not None and math.isfinite(f) and f == int(f) and 1 <= int(f) <= high


def check_counts(where: str, R, max_batch) -> tuple[int, int]:
    """R and max_batch as ints, or ValueError naming `where`: 1 <= R <= MAX_R,
    1 <= max_batch <= MAX_BATCH."""
    if not _is_count(R, MAX_R):
        raise ValueError(f"{where}: R must be an integer in [1, {MAX_R}], got {_short(R)}")
    if not _is_count(max_batch, MAX_BATCH):
        raise ValueError(f"{where}: max_batch must be an integer in [1, 2**24 = {MAX_BATCH}], got {_short(max_batch)}")
    return int(_real(R)), int(_real(max_batch))


def _short(value, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters, so that a message stays short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def fpr_setting(where: str, fpr) -> tuple[float, int]:
    """fpr as a Python float in (0, 1) and the fewest clean scores that resolve it,
    ceil(1/fpr); else ValueError naming `where`. A numpy or 0-d tensor fpr becomes a
    float here, so that config() stays JSON."""
    f = _real(fpr)
    if f is None or not 0 < f < 1:
        raise ValueError(f"{where}: fpr must be a number in (0, 1), got {_short(fpr)}")
    inverse = 1 / f
    if not inverse < 2**53:  # beyond that no data set resolves it (and 1/5e-324 is inf)
        raise ValueError(f"{where}: fpr={f!r} is too small to resolve with any number of images "
                         f"(it needs 1/fpr of them); use fpr >= 2**-53")
    return f, math.ceil(inverse - 1e-9)


def _int_setting(where: str, name: str, value, low: int, high: int = _INT64_MAX) -> int:
    """value as an int if it is an integer (or an integral float) in [low, high], else ValueError."""
    f = _real(value)
    if (_is_int(value) or (f is not None and math.isfinite(f) and f == int(f))) and low <= int(value) <= high:
        return int(value)
    raise ValueError(f"{where}: {name} must be an integer in [{low}, {high}], got {value!r}")


def _seed_setting(where: str, seed, optional: bool = True):
    if seed is None and optional:
        return None
    if not _is_int(seed) or not 0 <= seed < _SEED_END:
        none = "None or " if optional else ""
        raise ValueError(f"{where}: seed must be {none}an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _finite_setting(where: str, name: str, value, optional: bool = False) -> float | None:
    """value as a finite Python float (None passes if optional), else ValueError."""
    if value is None and optional:
        return None
    f = _real(value)
    if f is None or not math.isfinite(f):
        none = "None or " if optional else ""
        raise ValueError(f"{where}: {name} must be {none}a finite number, got {value!r}")
    return f


def histogram_entropy(votes: Tensor) -> Tensor:
    """Entropy (natural log) of the histogram of each row of votes, (N, R) int64 classes,
    as (N,) float64 on votes' device: -sum_k (n_k/R) log(n_k/R). Zero exactly when all R
    votes of a row agree."""
    n, r = votes.shape
    if n == 0 or r == 0:
        return torch.zeros(n, dtype=torch.float64, device=votes.device)
    counts = torch.zeros(n, int(votes.max()) + 1, dtype=torch.float64, device=votes.device)
    counts.scatter_add_(1, votes, torch.ones_like(votes, dtype=torch.float64))
    return torch.special.entr(counts / r).sum(1)


def threshold_for_fpr(clean_scores, fpr: float) -> float:
    """The smallest threshold tau with at most floor(fpr * n) of the n clean scores above
    it (score > tau means "adversarial"). clean_scores: (n,) tensor or array. Scores tie
    a lot (an entropy of R votes takes few values), so the false-positive rate achieved
    on these scores may be well below fpr. Raises ValueError unless 0 < fpr < 1 and
    n >= ceil(1/fpr) (fewer scores cannot resolve that rate)."""
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
    """ROC analysis of clean (negative) vs adversarial (positive) scores.

    auc: sklearn's roc_auc_score; ci: the (low, high) percentile bootstrap interval at
    `level`, from n_boot resamples of the clean and the adversarial scores separately;
    fpr, tpr, thresholds: sklearn's roc_curve, lists of floats. Everything is NaN or
    empty when either side has no scores.
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
        """A JSON-ready dict of every field (infinite thresholds become strings)."""
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

    clean_scores: (n0,), adv_scores: (n1,), tensors or arrays. The interval is the
    percentile interval of the AUCs of n_boot resamples drawn with a numpy generator
    seeded with `seed` (so it is repeatable). Returns a RocReport. Raises ValueError
    unless n_boot is an integer >= 1, seed an integer in [0, 2**64) and 0 < level < 1.
    """
    metrics = require("sklearn.metrics", "roc_report")
    require("scipy.stats", "roc_report")  # before any work: the bootstrap needs it
    n_boot = _int_setting("roc_report", "n_boot", n_boot, 1)
    seed = _seed_setting("roc_report", seed, optional=False)
    level = _finite_setting("roc_report", "level", level)
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


def _first_param(model: nn.Module) -> Tensor | None:
    return next(iter(model.parameters()), None)


def model_fingerprint(model: nn.Module) -> str:
    """A SHA-256 (hex, 16 digits) of a model's state_dict: every entry's name, dtype,
    shape and values (read on the CPU). A saved detector keeps it, so that `load` can
    tell a different network (other weights, layers or dtype) from the one its threshold
    was fitted on. Independent of the model's device."""
    return tensor_digest(model.state_dict().items())[:16]


def _check_saved(path, cfg: dict) -> None:
    """Raise ValueError, naming the file and the key, for a saved setting of the wrong
    type or value (JSON numbers only: a bool is not a number here)."""

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v, low, high=_INT64_MAX):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    def shape(v):
        return isinstance(v, list) and len(v) == 3 and all(integer(d, 1) for d in v)

    valid = {
        "method": (lambda v: v in METHODS, f"one of {METHODS}"),
        "c": (lambda v: v is None or integer(v, 1) or isinstance(v, list) and v and all(integer(e, 1) for e in v),
              "null, an integer >= 1 or a list of them"),
        "c_rel": (lambda v: v is None or number(v) and v > 0
                  or isinstance(v, list) and v and all(number(e) and e > 0 for e in v),
                  "null, a finite number > 0 or a list of them"),
        "c_ref": (lambda v: v in C_REFS, f"one of {C_REFS}"),
        "frac": (lambda v: number(v) and v > 0, "a finite number > 0"),
        "p_drop": (lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "R": (lambda v: integer(v, 1, MAX_R), f"an integer in [1, {MAX_R}]"),
        "max_batch": (lambda v: integer(v, 1, MAX_BATCH), f"an integer in [1, 2**24 = {MAX_BATCH}]"),
        "seed": (lambda v: v is None or integer(v, 0, _SEED_END - 1), "null or an integer in [0, 2**64)"),
        "solver": (lambda v: v in SOLVERS, f"one of {SOLVERS}"),
        "channels_last": (lambda v: isinstance(v, bool), "true or false"),
        "backend": (lambda v: isinstance(v, str), "a module name"),
        "threshold": (lambda v: v is None or number(v), "null or a finite number"),
        "fpr": (lambda v: v is None or number(v) and 0 < v < 1, "null or a number in (0, 1)"),
        "input_shape": (lambda v: v is None or shape(v), "null or a list of 3 integers >= 1 (C, H, W)"),
    }
    cfg.setdefault("c_ref", "input")  # files saved before c_ref existed
    for key, (ok, what) in valid.items():
        if not ok(cfg[key]):
            raise ValueError(f"Detector.load: {path}: {key} must be {what}, got {_short(cfg[key])}")
    if cfg["method"] == "mvm" and (cfg["c"] is None) == (cfg["c_rel"] is None):
        raise ValueError(f"Detector.load: {path}: an mvm detector needs exactly one of c and c_rel, "
                         f"got c={_short(cfg['c'])}, c_rel={_short(cfg['c_rel'])}")


def from_numpy(x: np.ndarray) -> Tensor:
    """x as a tensor, sharing its memory where torch can read it (native byte order,
    non-negative strides, writable), else from a contiguous copy."""
    if not x.dtype.isnative or any(st < 0 for st in x.strides) or not x.flags.writeable:
        # A copy, always: ascontiguousarray returns a one-image array with a negative stride as it is.
        x = np.array(x, dtype=x.dtype.newbyteorder("="), order="C", copy=True)
    return torch.from_numpy(x)


def _draw_count(value) -> int | None:
    f = _real(value)
    if f is None or not math.isfinite(f) or f != int(f) or not 1 <= f <= _INT64_MAX:
        return None
    return int(value)


def _positive(value) -> float | None:
    f = _real(value)
    return f if f is not None and math.isfinite(f) and f > 0 else None


def _per_unit(name: str, value, convert):
    """None, one setting, or a tuple of one per unit; each converted (None: invalid)."""
    if value is None:
        return None
    many = isinstance(value, Sequence) and not isinstance(value, str) or \
        isinstance(value, (np.ndarray, Tensor)) and np.ndim(value) == 1
    items = [convert(v) for v in value] if many else [convert(value)]
    what = "an integer in [1, 2**63)" if convert is _draw_count else "a finite number > 0"
    if not items or any(v is None for v in items):
        raise ValueError(f"Detector: {name} must be None, {what}, or a sequence of them (one per unit), "
                         f"got {_short(value)}")
    return tuple(items) if many else items[0]


def _label(value) -> str:
    return f"{value:g}" if not isinstance(value, tuple) else "(" + ",".join(f"{v:g}" for v in value) + ")"


class Detector:
    """Adversarial-image detector of the paper's Alg. 3, with MVM, SAP or dropout units.

    model: a trained CNN mapping float images (N, C, H, W) with values in [0, 1] to
    logits (N, K); it is copied (see `insert_units`), never modified, and the copy runs
    in eval mode on the model's device and dtype, so only the inserted units are random.
    method "mvm": c draws per unit, absolute, or c = c_rel * a reference count of rows:
    with c_ref="input" (the paper's rule, c = c_rel N_pixel) the input's H*W, the same c
    for every unit; with c_ref="unit" each unit's own H*W, so a small late map gets a
    small c. c and c_rel may also be sequences, one value per unit in execution order
    (as `DetectorSearch` picks them). Default c_rel = 1, c_ref = "input". Probabilities
    by `solver`. "sap": a fraction `frac` of each activation's entries drawn; "dropout":
    drop probability p_drop. R: stochastic passes per image, at most MAX_R = 100,000.
    max_batch: the most images (copies included) in one forward, which bounds memory, at
    most MAX_BATCH = 2**24; P = max(1, max_batch // R) images are scored per forward.
    (The bounds keep one call's work and memory within a machine's; `load` applies them
    to a saved file too.)

    Randomness is per image: the draws for image x[n] come from keys hashed from
    (base, index[n], unit, pass), where index defaults to n (pass `index=` to `scores`
    where images are not numbered from 0). With `seed`, base = seed, so an image's
    score is a function of (seed, settings, its index) alone: the same in any batch,
    for any max_batch, in split calls or spread over processes. With `generator`, every
    call draws its base from it. With neither (seed=None, the default), every call draws
    a fresh base from the operating system, so that an attacker cannot replay the noise
    of a deployed detector; evaluations pass a seed. backend: the op module
    (`mvm_cuda.ops` or `mvm_cuda.reference`). channels_last runs the copy in that memory
    format: the units' NHWC rows are then dense and convs are faster on CPU and GPU.
    threshold: as fitted by `fit_threshold` (or given). progress: True shows progress
    bars, False hides them, None (default) shows them where stderr is a terminal.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "mvm",
        *,
        c: int | Sequence[int] | None = None,
        c_rel: float | Sequence[float] | None = None,
        c_ref: str = "input",
        frac: float = 0.5,
        p_drop: float = 0.5,
        R: int = 100,
        max_batch: int = 1024,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        backend: ModuleType | None = None,
        solver: str = "kkt",
        channels_last: bool = True,
        threshold: float | None = None,
        progress: bool | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"Detector: method must be one of {METHODS}, got {method!r}")
        R, max_batch = check_counts("Detector", R, max_batch)
        if method == "mvm" and solver not in SOLVERS:
            raise ValueError(f"Detector: solver must be one of {SOLVERS}, got {solver!r}")
        if c_ref not in C_REFS:
            raise ValueError(f"Detector: c_ref must be one of {C_REFS}, got {c_ref!r}")
        if method == "mvm" and c is None and c_rel is None:
            c_rel = 1.0
        # Plain Python values (a numpy int, a 0-d tensor threshold become int, float),
        # checked here so that config() is valid JSON and every call can run.
        c = _per_unit("c", c, _draw_count)
        c_rel = _per_unit("c_rel", c_rel, _positive)
        frac = _finite_setting("Detector", "frac", frac)
        p_drop = _finite_setting("Detector", "p_drop", p_drop)
        seed = _seed_setting("Detector", seed)
        threshold = _finite_setting("Detector", "threshold", threshold, optional=True)
        if channels_last not in (True, False) or isinstance(channels_last, float):
            raise ValueError(f"Detector: channels_last must be a bool, got {channels_last!r}")
        if progress not in (True, False, None) or isinstance(progress, float):
            raise ValueError(f"Detector: progress must be True, False or None, got {progress!r}")
        channels_last = bool(channels_last)
        backend = ops if backend is None else backend
        self.method, self.c, self.c_rel, self.c_ref = method, c, c_rel, c_ref
        self.frac, self.p_drop = frac, p_drop
        self.R, self.max_batch, self.seed, self.generator = R, max_batch, seed, generator
        self.backend, self.solver, self.channels_last = backend, solver, channels_last
        self.threshold, self.fpr, self.progress = threshold, None, progress
        self.input_shape: tuple[int, ...] | None = None
        # The units' mode, keys and recorded p live on the shared network, so one call
        # at a time: a lock, not per-thread state, keeps the units simple.
        self.lock = threading.RLock()
        made = []

        def make_unit():
            k = len(made)
            made.append(k)
            if method == "mvm":
                pick = lambda v: v[min(k, len(v) - 1)] if isinstance(v, tuple) else v  # noqa: E731
                return MVMUnit(pick(c), c_rel=pick(c_rel), solver=solver, backend=backend)
            if method == "sap":
                return SAPUnit(frac, backend=backend)
            return DropoutUnit(p_drop, backend=backend)

        self.net = insert_units(model, make_unit).eval()
        for name, value in (("c", c), ("c_rel", c_rel)):
            if method == "mvm" and isinstance(value, tuple) and len(value) != len(made):
                raise ValueError(f"Detector: {name} gives {len(value)} values, but the model has {len(made)} "
                                 f"units (one after each ReLU of its conv part)")
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.units = sampling_units(self.net)
        # Where the first unit sees the input alone, the layers before it run once per
        # image and the unit stacks the R copies itself.
        self.stack_at_first_unit = first_unit_dominates(self.net)
        param = _first_param(self.net)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        if generator is not None and torch.device(generator.device).type != self.device.type:
            raise ValueError(
                f"Detector: the generator is on {generator.device} but the model is on {self.device}; "
                "pass a torch.Generator on the model's device"
            )

    @property
    def name(self) -> str:
        """A short label, e.g. "MVM c=0.5N", "SAP 50%", "dropout 0.5"."""
        if self.method == "mvm":
            if self.c is not None:
                return f"MVM c={_label(self.c)}"
            return f"MVM c={_label(self.c_rel)}" + ("N" if self.c_ref == "input" else "M")
        if self.method == "sap":
            return f"SAP {100 * self.frac:g}%"
        return f"dropout {self.p_drop:g}"

    def _images(self, x, fn: str) -> Tensor:
        """x as a tensor of images, checked: a numpy array becomes a tensor once (sharing
        its memory where torch can). Rejects what would crash deep inside the model or give
        meaningless scores: not an array, not 4-d, not floating point, pixels outside
        [0, 1] or NaN, or images the model does not take (found by one clean forward of
        the first image). fn names the public method in messages."""
        where = f"Detector.{fn}: x must be a float tensor or numpy array of images (N, C, H, W)"
        if isinstance(x, np.ndarray):
            if x.dtype.kind != "f" or x.dtype.itemsize > 8:  # float128: no torch dtype holds it
                hint = " (for 0..255 images pass x.astype(np.float32) / 255)" if x.dtype == np.uint8 else \
                    " (pass x.astype(np.float64))" if x.dtype.kind == "f" else ""
                raise ValueError(f"{where}, got a numpy array of dtype {x.dtype}{hint}")
            x = from_numpy(x)
        if not isinstance(x, Tensor):
            raise TypeError(f"{where}, got {type(x).__name__}")
        if x.dim() != 4:
            hint = "; for a single image add the batch dimension, x[None]" if x.dim() == 3 else ""
            raise ValueError(f"{where}, got shape {tuple(x.shape)}{hint}")
        if x.dtype not in _IMAGE_DTYPES:  # float8 types have no comparisons, no convolutions
            hint = " (for 0..255 images pass x.float() / 255)" if x.dtype == torch.uint8 else \
                " (pass x.float())" if x.is_floating_point() else ""
            raise ValueError(f"{where} of dtype float16, bfloat16, float32 or float64, got dtype {x.dtype}{hint}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"Detector.{fn}: images of shape {tuple(x.shape[1:])} do not fit the model, "
                f"which takes {self.input_shape}"
            )
        if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
            finite = x[~x.isnan()]
            seen = f"[{float(finite.min())}, {float(finite.max())}]" if finite.numel() else "none"
            raise ValueError(
                f"Detector.{fn}: pixel values must lie in [0, 1] (scale 0..255 images by 1/255), "
                f"got values in {seen}" + (" and NaN" if finite.numel() < x.numel() else "")
            )
        if self.input_shape is None and x.shape[0]:
            set_mode(self.net, "off")
            try:
                out = self.net(x[:1].to(self.device, self.dtype))
            except (RuntimeError, ValueError, IndexError) as e:
                raise ValueError(
                    f"Detector.{fn}: images of shape {tuple(x.shape[1:])} do not fit the model: {e}"
                ) from e
            if not isinstance(out, Tensor) or out.dim() != 2:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"Detector.{fn}: the model must return logits (N, K), got {got}")
            self.input_shape = tuple(x.shape[1:])
        return x

    @staticmethod
    def _index(index, n: int, fn: str) -> np.ndarray:
        """index as (n,) uint64: None gives 0..n-1; else n integers in [0, 2**63)."""
        if index is None:
            return np.arange(n, dtype=np.uint64)
        if isinstance(index, Tensor):
            index = index.detach().cpu().numpy()
        values = np.asarray(index)
        if values.shape != (n,) or (values.size and values.dtype.kind not in "iu"):
            raise ValueError(f"Detector.{fn}: index must hold one integer per image, shape ({n},), "
                             f"got shape {values.shape} of dtype {values.dtype}")
        if values.size and (values.min() < 0 or values.max() > _INT64_MAX):
            raise ValueError(f"Detector.{fn}: index must lie in [0, 2**63), got values in "
                             f"[{values.min()}, {values.max()}]")
        return values.astype(np.uint64)

    def _base(self) -> int:
        """The key base of one call: the seed, one draw from the generator, or fresh
        randomness from the operating system."""
        if self.seed is not None:
            return self.seed
        if self.generator is not None:
            draw = torch.empty((), dtype=torch.int64, device=self.generator.device)
            return int(draw.random_(generator=self.generator))
        return secrets.randbits(64)

    def set_ref_pixels(self, pixels: int) -> None:
        """Give the MVM units the reference count of c_ref="input" (the input's H*W);
        with c_ref="unit" each unit keeps its own rows."""
        for unit in self.units:
            if isinstance(unit, MVMUnit):
                unit.ref_pixels = pixels if self.c_ref == "input" else None

    def _votes_of_batch(self, xb: Tensor, index: np.ndarray, base: int) -> Tensor:
        """(R, P) predicted classes of the R stochastic passes over the P images xb, whose
        indices are index (P,)."""
        p = xb.shape[0]
        if self.method == "mvm":
            set_mode(self.net, "record")
            self.net(xb)
        set_mode(self.net, "sample")
        copies = max(1, self.max_batch // p)
        votes = []
        for start in range(0, self.R, copies):
            r = min(copies, self.R - start)
            for u, unit in enumerate(self.units):
                unit.keys = sample_keys(base, index, u, range(start, start + r)).to(self.device)
            # Copy-major stacking: sample n is image n % P, which is the row of p
            # that sample_rows uses for it, so the recorded p is never repeated.
            if self.stack_at_first_unit:
                self.units[0].copies = r
                logits = self.net(xb)
            else:
                logits = self.net(xb.repeat(r, 1, 1, 1))
            votes.append(logits.argmax(1).view(r, p))
        return torch.cat(votes)

    def _votes(self, x, index, fn: str) -> Tensor:
        with self.lock, torch.inference_mode():
            x = self._images(x, fn)
            n = x.shape[0]
            index = self._index(index, n, fn)
            if n == 0:
                return torch.zeros(0, self.R, dtype=torch.int64)
            base = self._base()
            self.set_ref_pixels(x.shape[2] * x.shape[3])
            batch = max(1, self.max_batch // self.R)
            memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
            out = []
            try:
                with tqdm(total=n, desc=f"{self.name} R={self.R}", unit="img", disable=hide_bar(self.progress),
                          leave=False) as bar:
                    for start in range(0, n, batch):
                        xb = x[start:start + batch].to(self.device, self.dtype)
                        xb = xb.contiguous(memory_format=memory_format)
                        out.append(self._votes_of_batch(xb, index[start:start + batch], base).T.cpu())
                        bar.update(xb.shape[0])
            finally:
                set_mode(self.net, "off")
                for unit in self.units:  # drop the keys and the recorded alpha and p of the last batch
                    unit.keys = None
                    unit.copies = 1
                    if isinstance(unit, MVMUnit):
                        unit.alpha = unit.p = None
            return torch.cat(out)

    def votes(self, x, index=None) -> Tensor:
        """The predicted classes of the R stochastic passes over images x (N, C, H, W) in
        [0, 1] (a tensor or a numpy array), as (N, R) int64 on the CPU. index: (N,)
        integers, the images' numbers in the user's data (default 0..N-1), which key their
        randomness (see the class docstring). Runs in batches of P = max(1, max_batch // R)
        images (a tqdm bar over images), under torch.inference_mode. x is moved to the
        model's device and cast to its dtype. Raises TypeError if x is not an array,
        ValueError for images that are not (N, C, H, W) floats in [0, 1] (NaN included)
        or do not fit the model, and for an index of another length or with negative
        values. Thread-safe: calls from several threads run one at a time (`lock`)."""
        return self._votes(x, index, "votes")

    def scores(self, x, index=None) -> Tensor:
        """Alg. 3's score of every image x (N, C, H, W) in [0, 1]: the entropy (natural log)
        of the histogram of its R predicted classes, as (N,) float64 on the CPU; 0 when
        all R passes agree, at most log(min(R, K)). See `votes` for index, batching and
        errors."""
        return self._score(x, index, "scores")

    def fit_threshold(self, clean_x, fpr: float = 0.05, index=None) -> "Detector":
        """Set `threshold` so that at most a fraction fpr of the clean images clean_x
        (N, C, H, W) score above it (see `threshold_for_fpr`); returns self.

        Raises ValueError if fpr is not in (0, 1) or N < ceil(1/fpr) (then not even one
        clean image may lie above the threshold, so the rate cannot be resolved). Warns
        (UserWarning) if N < ceil(10/fpr), e.g. 200 images at fpr = 0.05: with k =
        floor(fpr N) clean images above the threshold, the false-positive rate it gives
        on new clean images varies by about 1/sqrt(k+1) of fpr (more than 30% below
        k = 10)."""
        fpr, need = fpr_setting("Detector.fit_threshold", fpr)
        advised = math.ceil(10 / fpr - 1e-9)
        if isinstance(clean_x, (Tensor, np.ndarray)) and clean_x.ndim >= 1:
            n = clean_x.shape[0]
            if n < need:
                raise ValueError(
                    f"Detector.fit_threshold: {n} clean images cannot resolve fpr={fpr}; need at least {need}"
                )
            if n < advised:
                warnings.warn(
                    f"Detector.fit_threshold: {n} clean images put only {math.floor(fpr * n + 1e-9)} above "
                    f"the threshold; its false-positive rate on new images may be far from fpr={fpr} "
                    f"(use at least {advised})",
                    stacklevel=2,
                )
        self.threshold = threshold_for_fpr(self._score(clean_x, index, "fit_threshold"), fpr)
        self.fpr = fpr
        return self

    def _score(self, x, index, fn: str) -> Tensor:
        return histogram_entropy(self._votes(x, index, fn))

    def predict(self, x, index=None) -> Tensor:
        """(N,) bool on the CPU: True where an image of x (N, C, H, W) scores above the
        fitted threshold, i.e. is declared adversarial. Raises RuntimeError before
        `fit_threshold` (or a threshold given at construction)."""
        if self.threshold is None:
            raise RuntimeError("Detector.predict: no threshold; call fit_threshold(clean_images) first")
        return self._score(x, index, "predict") > self.threshold

    def evaluate(self, clean, adversarial, n_boot: int = 1000, seed: int = 0) -> RocReport:
        """ROC analysis of clean images (negatives, (N0, C, H, W)) against adversarial
        ones (positives, (N1, C, H, W)): the ROC-AUC, its bootstrap 95% interval from
        n_boot resamples with `seed`, and the ROC curve, as a RocReport. Both sets are
        numbered from 0, so an adversarial image made from clean[n] (at position n) gets
        clean[n]'s random keys."""
        return roc_report(self._score(clean, None, "evaluate"), self._score(adversarial, None, "evaluate"),
                          n_boot=n_boot, seed=seed)

    def config(self) -> dict:
        """The settings that define this detector and its fitted threshold, JSON-ready."""
        return {
            "format": _FORMAT,
            "method": self.method,
            "c": list(self.c) if isinstance(self.c, tuple) else self.c,
            "c_rel": list(self.c_rel) if isinstance(self.c_rel, tuple) else self.c_rel,
            "c_ref": self.c_ref,
            "frac": self.frac,
            "p_drop": self.p_drop,
            "R": self.R,
            "max_batch": self.max_batch,
            "seed": self.seed if self.generator is None else None,
            "solver": self.solver,
            "channels_last": self.channels_last,
            "backend": self.backend.__name__,
            "threshold": self.threshold,
            "fpr": self.fpr,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            # Of the net with units: units have no state, so it is the model's state_dict.
            "model_fingerprint": model_fingerprint(self.net),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the settings and threshold (`config()`) to a JSON file. The model's weights
        are not saved: they stay the user's, and `load` takes the model again. A user's
        generator is not saved either: such a detector saves seed None, and its loaded
        copy draws from the default generator unless `load` is given one. The file is
        written to a temporary file beside it and renamed, so an existing file is replaced
        only by a complete new one."""
        # Serialised first, then written whole: a failure leaves the previous file as it was.
        text = json.dumps(self.config(), indent=2, allow_nan=False).encode()
        write_atomically(path, lambda f: f.write(text))

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, *, backend: ModuleType | None = None,
             generator: torch.Generator | None = None, progress: bool | None = None,
             strict: bool = True) -> "Detector":
        """The detector saved at `path`, rebuilt around `model` (the same trained network).
        backend: the op module (default: the saved one, if it is mvm_cuda.ops or
        mvm_cuda.reference). Raises ValueError, naming the file, for a file that is not a
        saved detector (not JSON, another format, missing settings, a setting of the wrong
        type or value: the message names the key), and for a model whose
        `model_fingerprint` (weights, layers, dtype) differs from the saved one, or a file
        without one: a threshold fitted on one network means nothing on another.
        strict=False turns those two into a UserWarning (e.g. after a deliberate dtype
        change; refit the threshold)."""
        try:
            with open(path) as f:
                cfg = json.load(f)
        # RecursionError: deeply nested arrays; ValueError: a number of over 4,300 digits.
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"Detector.load: {path} is not a saved mvm_cuda detector ({_FORMAT}): "
                             f"{type(e).__name__}: {str(e)[:200]}") from e
        if not isinstance(cfg, dict) or cfg.get("format") != _FORMAT:
            raise ValueError(f"Detector.load: {path} is not a saved mvm_cuda detector ({_FORMAT})")
        missing = [k for k in _SAVED_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"Detector.load: {path} lacks the settings {', '.join(missing)}")
        _check_saved(path, cfg)
        if backend is None:
            if cfg["backend"] not in _KNOWN_BACKENDS:
                raise ValueError(f"Detector.load: {path}: unknown backend {_short(cfg['backend'])}; pass backend=")
            backend = importlib.import_module(cfg["backend"])
        saved, now = cfg.get("model_fingerprint"), model_fingerprint(model)
        if saved is not None and not (isinstance(saved, str) and re.fullmatch(r"[0-9a-f]{16}", saved)):
            raise ValueError(f"Detector.load: {path}: model_fingerprint must be 16 hex digits, got {_short(saved)}")
        message = None
        if saved is None:
            message = (f"Detector.load: {path} holds no model_fingerprint, so the model cannot be checked "
                       "against the one its threshold was fitted on")
        elif saved != now:
            message = (f"Detector.load: the model differs from the one {path} was saved with "
                       f"(fingerprint {now}, saved {saved}); its threshold does not apply to this model")
        if message is not None:
            if strict:
                raise ValueError(message + "; pass that model, or strict=False and refit the threshold")
            warnings.warn(message, stacklevel=2)
        det = cls(model, cfg["method"], c=cfg["c"], c_rel=cfg["c_rel"], c_ref=cfg["c_ref"], frac=cfg["frac"],
                  p_drop=cfg["p_drop"],
                  R=cfg["R"], max_batch=cfg["max_batch"], seed=cfg["seed"], generator=generator,
                  backend=backend, solver=cfg["solver"], channels_last=cfg["channels_last"],
                  threshold=cfg["threshold"], progress=progress)
        det.fpr = cfg["fpr"]
        det.input_shape = tuple(cfg["input_shape"]) if cfg["input_shape"] is not None else None
        return det

    def __repr__(self) -> str:
        return f"Detector({self.name}, R={self.R}, threshold={self.threshold}, device={self.device})"
