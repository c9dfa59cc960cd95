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

import hashlib
import importlib
import json
import math
import numbers
import os
import re
import threading
import warnings
from dataclasses import asdict, dataclass, field
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import ops
from ._files import write_atomically
from .nn import DropoutUnit, MVMUnit, SAPUnit, insert_units, sampling_units, set_mode

__all__ = ["METHODS", "SOLVERS", "Detector", "RocReport", "histogram_entropy", "threshold_for_fpr", "roc_report"]

METHODS = ("mvm", "sap", "dropout")
SOLVERS = ("kkt", "pgd")
_FORMAT = "mvm_cuda-detector-v1"
_KNOWN_BACKENDS = ("mvm_cuda.ops", "mvm_cuda.reference")
_SAVED_KEYS = ("method", "c", "c_rel", "frac", "p_drop", "R", "max_batch", "seed", "solver", "channels_last",
               "backend", "threshold", "fpr", "input_shape")
_INT64_MAX = 2**63 - 1
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


def _is_count(value) -> bool:
    """value is an integer (or an integral float) in [1, 2**63)."""
    f = _real(value)
    return f is not None and math.isfinite(f) and f == int(f) and 1 <= int(value) <= _INT64_MAX


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
    s = np.sort(np.asarray(torch.as_tensor(clean_scores).double().cpu()).reshape(-1))
    if not 0 < fpr < 1:
        raise ValueError(f"threshold_for_fpr: fpr must be in (0, 1), got {fpr}")
    need = math.ceil(1 / fpr - 1e-9)
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
    from scipy.stats import rankdata

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
    from sklearn.metrics import roc_auc_score, roc_curve

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
    fpr, tpr, thresholds = roc_curve(y, s)
    boot = _bootstrap_auc(neg, pos, n_boot, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(boot, [tail, 100 - tail])
    return RocReport(float(roc_auc_score(y, s)), (float(low), float(high)), int(neg.size), int(pos.size),
                     level, n_boot, fpr.tolist(), tpr.tolist(), thresholds.tolist())


def _first_param(model: nn.Module) -> Tensor | None:
    return next(iter(model.parameters()), None)


def model_fingerprint(model: nn.Module) -> str:
    """A SHA-256 (hex, 16 digits) of a model's state_dict: every entry's name, dtype,
    shape and values (read on the CPU). A saved detector keeps it, so that `load` can
    tell a different network (other weights, layers or dtype) from the one its threshold
    was fitted on. Independent of the model's device."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


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
        "c": (lambda v: v is None or integer(v, 1), "null or an integer >= 1"),
        "c_rel": (lambda v: v is None or number(v) and v > 0, "null or a finite number > 0"),
        "frac": (lambda v: number(v) and v > 0, "a finite number > 0"),
        "p_drop": (lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "R": (lambda v: integer(v, 1), "an integer >= 1"),
        "max_batch": (lambda v: integer(v, 1), "an integer >= 1"),
        "seed": (lambda v: v is None or integer(v, 0, _SEED_END - 1), "null or an integer in [0, 2**64)"),
        "solver": (lambda v: v in SOLVERS, f"one of {SOLVERS}"),
        "channels_last": (lambda v: isinstance(v, bool), "true or false"),
        "backend": (lambda v: isinstance(v, str), "a module name"),
        "threshold": (lambda v: v is None or number(v), "null or a finite number"),
        "fpr": (lambda v: v is None or number(v) and 0 < v < 1, "null or a number in (0, 1)"),
        "input_shape": (lambda v: v is None or shape(v), "null or a list of 3 integers >= 1 (C, H, W)"),
    }
    for key, (ok, what) in valid.items():
        if not ok(cfg[key]):
            raise ValueError(f"Detector.load: {path}: {key} must be {what}, got {cfg[key]!r}")
    if cfg["method"] == "mvm" and (cfg["c"] is None) == (cfg["c_rel"] is None):
        raise ValueError(f"Detector.load: {path}: an mvm detector needs exactly one of c and c_rel, "
                         f"got c={cfg['c']!r}, c_rel={cfg['c_rel']!r}")


class Detector:
    """Adversarial-image detector of the paper's Alg. 3, with MVM, SAP or dropout units.

    model: a trained CNN mapping float images (N, C, H, W) with values in [0, 1] to
    logits (N, K); it is copied (see `insert_units`), never modified, and the copy runs
    in eval mode on the model's device and dtype, so only the inserted units are random.
    method "mvm": c draws per unit, absolute, or c = c_rel * H*W of the input (the
    paper's c = c_rel N_pixel; default c_rel = 1), probabilities by `solver`; "sap": a
    fraction `frac` of each activation's entries drawn; "dropout": drop probability
    p_drop. R: stochastic passes per image. max_batch: the most images (copies
    included) in one forward, which bounds memory; P = max(1, max_batch // R) images
    are scored per forward. Randomness: with `generator` (on the model's device) every
    call draws from it; else with `seed` every call restarts from a generator seeded
    with it, so equal inputs get equal scores; with neither, the default generator.
    backend: the op module (`mvm_cuda.ops` or `mvm_cuda.reference`). channels_last runs
    the copy in that memory format: the units' NHWC rows are then dense and convs are
    faster on CPU and GPU. threshold: as fitted by `fit_threshold` (or given).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "mvm",
        *,
        c: int | None = None,
        c_rel: float | None = None,
        frac: float = 0.5,
        p_drop: float = 0.5,
        R: int = 100,
        max_batch: int = 1024,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        backend: ModuleType | None = None,
        solver: str = "kkt",
        channels_last: bool = True,
        threshold: float | None = None,
        progress: bool = True,
    ):
        if method not in METHODS:
            raise ValueError(f"Detector: method must be one of {METHODS}, got {method!r}")
        if not _is_count(R):
            raise ValueError(f"Detector: R must be an integer >= 1, got {R}")
        if not _is_count(max_batch):
            raise ValueError(f"Detector: max_batch must be an integer >= 1, got {max_batch}")
        if method == "mvm" and solver not in SOLVERS:
            raise ValueError(f"Detector: solver must be one of {SOLVERS}, got {solver!r}")
        if method == "mvm" and c is None and c_rel is None:
            c_rel = 1.0
        # Plain Python values (a numpy int, a 0-d tensor threshold become int, float),
        # checked here so that config() is valid JSON and every call can run.
        if c is not None and (_real(c) is None or not math.isfinite(_real(c)) or c > _INT64_MAX):
            raise ValueError(f"Detector: c must be None or an integer in [1, {_INT64_MAX}], got {c!r}")
        if c is not None and int(c) == c:
            c = int(c)
        c_rel = _finite_setting("Detector", "c_rel", c_rel, optional=True)
        frac = _finite_setting("Detector", "frac", frac)
        p_drop = _finite_setting("Detector", "p_drop", p_drop)
        seed = _seed_setting("Detector", seed)
        threshold = _finite_setting("Detector", "threshold", threshold, optional=True)
        if channels_last not in (True, False) or isinstance(channels_last, float):
            raise ValueError(f"Detector: channels_last must be a bool, got {channels_last!r}")
        channels_last = bool(channels_last)
        backend = ops if backend is None else backend
        self.method, self.c, self.c_rel, self.frac, self.p_drop = method, c, c_rel, frac, p_drop
        self.R, self.max_batch, self.seed, self.generator = int(R), int(max_batch), seed, generator
        self.backend, self.solver, self.channels_last = backend, solver, channels_last
        self.threshold, self.fpr, self.progress = threshold, None, progress
        self.input_shape: tuple[int, ...] | None = None
        # The units' mode, generator and recorded p live on the shared network, so one
        # call at a time: a lock, not per-thread state, keeps the units simple and
        # makes a seeded call from any thread return exactly what it returns alone.
        self.lock = threading.RLock()

        def make_unit():
            if method == "mvm":
                return MVMUnit(c, c_rel=c_rel, solver=solver, backend=backend)
            if method == "sap":
                return SAPUnit(frac, backend=backend)
            return DropoutUnit(p_drop, backend=backend)

        self.net = insert_units(model, make_unit).eval()
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.units = sampling_units(self.net)
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
            return f"MVM c={self.c}" if self.c is not None else f"MVM c={self.c_rel:g}N"
        if self.method == "sap":
            return f"SAP {100 * self.frac:g}%"
        return f"dropout {self.p_drop:g}"

    def _check_input(self, x: Tensor, fn: str) -> None:
        """Reject what would crash deep inside the model or give meaningless scores: not
        a tensor, not 4-d, not floating point, pixels outside [0, 1] or NaN, or images
        the model does not take (found by one clean forward of the first image)."""
        where = f"Detector.{fn}: x must be a float tensor of images (N, C, H, W)"
        if not isinstance(x, Tensor):
            raise TypeError(f"{where}, got {type(x).__name__}")
        if x.dim() != 4:
            hint = "; for a single image add the batch dimension, x[None]" if x.dim() == 3 else ""
            raise ValueError(f"{where}, got shape {tuple(x.shape)}{hint}")
        if not x.is_floating_point():
            hint = " (for 0..255 images pass x.float() / 255)" if x.dtype == torch.uint8 else ""
            raise ValueError(f"{where}, got dtype {x.dtype}{hint}")
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

    def _fresh_generator(self) -> torch.Generator | None:
        if self.generator is not None:
            return self.generator
        if self.seed is None:
            return None
        return torch.Generator(self.device).manual_seed(self.seed)

    def _votes_of_batch(self, xb: Tensor) -> Tensor:
        """(R, P) predicted classes of the R stochastic passes over the P images xb."""
        p = xb.shape[0]
        if self.method == "mvm":
            set_mode(self.net, "record")
            self.net(xb)
        set_mode(self.net, "sample")
        copies = max(1, self.max_batch // p)
        votes = []
        for start in range(0, self.R, copies):
            r = min(copies, self.R - start)
            # Copy-major stacking: sample n is image n % P, which is the row of p
            # that sample_rows uses for it, so the recorded p is never repeated.
            votes.append(self.net(xb.repeat(r, 1, 1, 1)).argmax(1).view(r, p))
        return torch.cat(votes)

    def votes(self, x: Tensor) -> Tensor:
        """The predicted classes of the R stochastic passes over images x (N, C, H, W) in
        [0, 1], as (N, R) int64 on the CPU. Runs in batches of P = max(1, max_batch // R)
        images (a tqdm bar over images), under torch.inference_mode. x is moved to the model's
        device and cast to its dtype. Raises TypeError if x is not a tensor, ValueError for
        images that are not (N, C, H, W) floats in [0, 1] (NaN included) or do not fit the
        model. Thread-safe: calls from several threads run one at a time (`lock`), so a
        seeded detector gives every call the scores it gives that call alone."""
        with self.lock, torch.inference_mode():
            self._check_input(x, "votes")
            n = x.shape[0]
            if n == 0:
                return torch.zeros(0, self.R, dtype=torch.int64)
            gen = self._fresh_generator()
            for unit in self.units:
                unit.generator = gen
                if isinstance(unit, MVMUnit):
                    unit.ref_pixels = x.shape[2] * x.shape[3]
            batch = max(1, self.max_batch // self.R)
            memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
            out = []
            try:
                with tqdm(total=n, desc=f"{self.name} R={self.R}", unit="img", disable=not self.progress,
                          leave=False) as bar:
                    for start in range(0, n, batch):
                        xb = x[start:start + batch].to(self.device, self.dtype)
                        xb = xb.contiguous(memory_format=memory_format)
                        out.append(self._votes_of_batch(xb).T.cpu())
                        bar.update(xb.shape[0])
            finally:
                set_mode(self.net, "off")
                for unit in self.units:  # drop the recorded alpha and p of the last batch
                    unit.generator = None
                    if isinstance(unit, MVMUnit):
                        unit.alpha = unit.p = None
            return torch.cat(out)

    def scores(self, x: Tensor) -> Tensor:
        """Alg. 3's score of every image x (N, C, H, W) in [0, 1]: the entropy (natural log)
        of the histogram of its R predicted classes, as (N,) float64 on the CPU; 0 when
        all R passes agree, at most log(min(R, K)). See `votes` for batching and errors."""
        return histogram_entropy(self.votes(x))

    def fit_threshold(self, clean_x: Tensor, fpr: float = 0.05) -> "Detector":
        """Set `threshold` so that at most a fraction fpr of the clean images clean_x
        (N, C, H, W) score above it (see `threshold_for_fpr`); returns self.

        Raises ValueError if fpr is not in (0, 1) or N < ceil(1/fpr) (then not even one
        clean image may lie above the threshold, so the rate cannot be resolved). Warns
        (UserWarning) if N < ceil(10/fpr), e.g. 200 images at fpr = 0.05: with k =
        floor(fpr N) clean images above the threshold, the false-positive rate it gives
        on new clean images varies by about 1/sqrt(k+1) of fpr (more than 30% below
        k = 10)."""
        if not 0 < fpr < 1:
            raise ValueError(f"Detector.fit_threshold: fpr must be in (0, 1), got {fpr}")
        need, advised = math.ceil(1 / fpr - 1e-9), math.ceil(10 / fpr - 1e-9)
        if isinstance(clean_x, Tensor) and clean_x.dim() >= 1:
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
        self.threshold = threshold_for_fpr(self.scores(clean_x), fpr)
        self.fpr = fpr
        return self

    def predict(self, x: Tensor) -> Tensor:
        """(N,) bool on the CPU: True where an image of x (N, C, H, W) scores above the
        fitted threshold, i.e. is declared adversarial. Raises RuntimeError before
        `fit_threshold` (or a threshold given at construction)."""
        if self.threshold is None:
            raise RuntimeError("Detector.predict: no threshold; call fit_threshold(clean_images) first")
        return self.scores(x) > self.threshold

    def evaluate(self, clean: Tensor, adversarial: Tensor, n_boot: int = 1000, seed: int = 0) -> RocReport:
        """ROC analysis of clean images (negatives, (N0, C, H, W)) against adversarial
        ones (positives, (N1, C, H, W)): the ROC-AUC, its bootstrap 95% interval from
        n_boot resamples with `seed`, and the ROC curve, as a RocReport."""
        return roc_report(self.scores(clean), self.scores(adversarial), n_boot=n_boot, seed=seed)

    def config(self) -> dict:
        """The settings that define this detector and its fitted threshold, JSON-ready."""
        return {
            "format": _FORMAT,
            "method": self.method,
            "c": self.c,
            "c_rel": self.c_rel,
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
             generator: torch.Generator | None = None, progress: bool = True,
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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"Detector.load: {path} is not a saved mvm_cuda detector ({_FORMAT}): {e}") from e
        if not isinstance(cfg, dict) or cfg.get("format") != _FORMAT:
            raise ValueError(f"Detector.load: {path} is not a saved mvm_cuda detector ({_FORMAT})")
        missing = [k for k in _SAVED_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"Detector.load: {path} lacks the settings {', '.join(missing)}")
        _check_saved(path, cfg)
        if backend is None:
            if cfg["backend"] not in _KNOWN_BACKENDS:
                raise ValueError(f"Detector.load: unknown backend {cfg['backend']!r}; pass backend=")
            backend = importlib.import_module(cfg["backend"])
        saved, now = cfg.get("model_fingerprint"), model_fingerprint(model)
        if saved is not None and not (isinstance(saved, str) and re.fullmatch(r"[0-9a-f]{16}", saved)):
            raise ValueError(f"Detector.load: {path}: model_fingerprint must be 16 hex digits, got {saved!r}")
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
        det = cls(model, cfg["method"], c=cfg["c"], c_rel=cfg["c_rel"], frac=cfg["frac"], p_drop=cfg["p_drop"],
                  R=cfg["R"], max_batch=cfg["max_batch"], seed=cfg["seed"], generator=generator,
                  backend=backend, solver=cfg["solver"], channels_last=cfg["channels_last"],
                  threshold=cfg["threshold"], progress=progress)
        det.fpr = cfg["fpr"]
        det.input_shape = tuple(cfg["input_shape"]) if cfg["input_shape"] is not None else None
        return det

    def __repr__(self) -> str:
        return f"Detector({self.name}, R={self.R}, threshold={self.threshold}, device={self.device})"
