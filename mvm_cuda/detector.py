"""The paper's Alg. 3: detect adversarial images by the entropy of R randomized predictions.

`Detector` wraps a trained CNN (left untouched) with sampling units after the ReLUs of
its conv part (MVM, SAP or test-time dropout, see `mvm_cuda.nn`) and scores images:
(s1) one clean pass records alpha and solves p once per image and unit (MVM only);
(s2) R stochastic passes, run as forwards over stacked copies of the batch; (s3) the
entropy of the histogram of the R predicted classes; (s4) "adversarial" when the score
exceeds a threshold fitted on clean images. Its settings are declared once, in
`mvm_cuda._settings`; the ROC statistics (`roc_report`, `threshold_for_fpr`) live in
`mvm_cuda.roc` and are importable from here too.
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
import secrets
import threading
import warnings
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import ops
from ._args import INT64_MAX, short
from ._digest import tensor_digest
from ._files import write_atomically
from ._keys import sample_keys
from ._progress import hide_bar
from ._settings import C_REFS, MAX_BATCH, MAX_R  # noqa: F401  (importable from here, as before)
from ._settings import METHODS, SETTINGS, SOLVERS, arguments, fpr_setting
from .nn import DropoutUnit, MVMUnit, SAPUnit, first_unit_dominates, insert_units, sampling_units, set_mode
from .roc import RocReport, roc_report, threshold_for_fpr

__all__ = ["METHODS", "SOLVERS", "Detector", "RocReport", "histogram_entropy", "threshold_for_fpr", "roc_report"]

_FORMAT = "mvm_cuda-detector-v1"
_KNOWN_BACKENDS = ("mvm_cuda.ops", "mvm_cuda.reference")
_IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SAVED = tuple(s for s in SETTINGS.values() if s.saved)


def histogram_entropy(votes: Tensor) -> Tensor:
    """Entropy (natural log) of the histogram of each row of votes: Alg. 3's score.

    -sum_k (n_k/R) log(n_k/R), zero exactly when all R votes of a row agree.

    Args:
        votes: (N, R) int64 predicted classes.

    Returns:
        (N,) float64 on votes' device.
    """
    n, r = votes.shape
    if n == 0 or r == 0:
        return torch.zeros(n, dtype=torch.float64, device=votes.device)
    counts = torch.zeros(n, int(votes.max()) + 1, dtype=torch.float64, device=votes.device)
    counts.scatter_add_(1, votes, torch.ones_like(votes, dtype=torch.float64))
    return torch.special.entr(counts / r).sum(1)


def _first_param(model: nn.Module) -> Tensor | None:
    return next(iter(model.parameters()), None)


def model_fingerprint(model: nn.Module) -> str:
    """A SHA-256 of a model's state_dict, which a saved detector keeps.

    It covers every entry's name, dtype, shape and values (read on the CPU), so `load`
    can tell a different network (other weights, layers or dtype) from the one a
    threshold was fitted on; it does not depend on the model's device.

    Args:
        model: the network.

    Returns:
        The first 16 hex digits of the SHA-256.
    """
    return tensor_digest(model.state_dict().items())[:16]


def from_numpy(x: np.ndarray) -> Tensor:
    """A numpy array as a tensor, sharing its memory where torch can read it.

    Torch reads arrays of native byte order, non-negative strides and writable memory;
    any other array is copied (contiguous, native byte order) first.

    Args:
        x: the array.

    Returns:
        A tensor of x's shape and dtype.
    """
    if not x.dtype.isnative or any(st < 0 for st in x.strides) or not x.flags.writeable:
        # A copy, always: ascontiguousarray returns a one-image array with a negative stride as it is.
        x = np.array(x, dtype=x.dtype.newbyteorder("="), order="C", copy=True)
    return torch.from_numpy(x)


def _label(value) -> str:
    return f"{value:g}" if not isinstance(value, tuple) else "(" + ",".join(f"{v:g}" for v in value) + ")"


def _read_saved(path) -> dict:
    """The settings saved at path, each checked by its rule and made plain (lists of the
    per-unit settings and of input_shape become tuples), and the model_fingerprint as
    the file holds it. Raises ValueError naming the file and, for a bad setting, the key."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    # RecursionError: deeply nested arrays; ValueError: a number of over 4,300 digits.
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"Detector.load: {path} is not a saved mvm_cuda detector ({_FORMAT}): "
                         f"{type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(cfg, dict) or cfg.get("format") != _FORMAT:
        raise ValueError(f"Detector.load: {path} is not a saved mvm_cuda detector ({_FORMAT})")
    missing = [s.name for s in _SAVED if s.required and s.name not in cfg]
    if missing:
        raise ValueError(f"Detector.load: {path} lacks the settings {', '.join(missing)}")
    values = {s.name: s.check_saved(f"Detector.load: {path}", cfg.get(s.name, s.default)) for s in _SAVED}
    if values["method"] == "mvm" and (values["c"] is None) == (values["c_rel"] is None):
        raise ValueError(f"Detector.load: {path}: an mvm detector needs exactly one of c and c_rel, "
                         f"got c={short(cfg['c'])}, c_rel={short(cfg['c_rel'])}")
    return {**values, "model_fingerprint": cfg.get("model_fingerprint")}


def _saved_backend(path, name: str) -> ModuleType:
    if name not in _KNOWN_BACKENDS:
        raise ValueError(f"Detector.load: {path}: unknown backend {short(name)}; pass backend=")
    return importlib.import_module(name)


def _check_fingerprint(path, saved, model: nn.Module, strict: bool) -> None:
    """ValueError (strict) or UserWarning where the saved fingerprint is missing or not
    model's; ValueError for one that is not 16 hex digits."""
    if saved is not None and not (isinstance(saved, str) and re.fullmatch(r"[0-9a-f]{16}", saved)):
        raise ValueError(f"Detector.load: {path}: model_fingerprint must be 16 hex digits, got {short(saved)}")
    now = model_fingerprint(model)
    if saved is None:
        message = (f"Detector.load: {path} holds no model_fingerprint, so the model cannot be checked "
                   "against the one its threshold was fitted on")
    elif saved != now:
        message = (f"Detector.load: the model differs from the one {path} was saved with "
                   f"(fingerprint {now}, saved {saved}); its threshold does not apply to this model")
    else:
        return
    if strict:
        raise ValueError(message + "; pass that model, or strict=False and refit the threshold")
    warnings.warn(message, stacklevel=3)


class Detector:
    """Adversarial-image detector of the paper's Alg. 3, with MVM, SAP or dropout units.

    The model is copied (see `insert_units`), never modified: the copy runs in eval mode
    on the model's device and dtype, so only the inserted units are random. Every
    setting below is also an attribute of the same name (`det.R`, `det.threshold`, ...);
    `fit_threshold` sets `threshold` and `fpr`, and the first call `input_shape`.

    Randomness is per image: the draws for image x[n] come from keys hashed from
    (base, index[n], unit, pass), where index defaults to n (pass `index=` to `scores`
    where images are not numbered from 0). With `seed`, base = seed, so an image's score
    is a function of (seed, settings, its index) alone: the same in any batch, for any
    max_batch, in split calls or spread over processes. With `generator`, every call
    draws its base from it. With neither (the default), every call draws a fresh base
    from the operating system, so that an attacker cannot replay the noise of a
    deployed detector; evaluations pass a seed.

    Args:
        model: a trained CNN mapping float images (N, C, H, W) with values in [0, 1] to
            logits (N, K).
        method: the units: "mvm", "sap" or "dropout".
        c: MVM: draws per unit, an integer >= 1, or a sequence of them, one per unit in
            execution order (as `DetectorSearch` picks them). Give c or c_rel.
        c_rel: MVM: c = c_rel times a reference count of rows, a number > 0 or a
            sequence of them, one per unit. Default 1 when c is not given either.
        c_ref: the reference count of c_rel: "input" (the paper's c = c_rel N_pixel,
            the input's H*W, the same c for every unit) or "unit" (each unit's own H*W,
            so a small late map gets a small c).
        frac: SAP: the fraction of each activation's entries drawn, > 0.
        p_drop: dropout: the drop probability, in [0, 1).
        R: stochastic passes per image, in [1, MAX_R = 100,000].
        max_batch: the most images (copies included) in one forward, which bounds
            memory, in [1, MAX_BATCH = 2**24]; P = max(1, max_batch // R) images are
            scored per forward. The bounds keep one call's work and memory within a
            machine's; `load` applies them to a saved file too.
        seed: None or an integer in [0, 2**64), the key base of every call.
        generator: None or a torch.Generator on the model's device, which draws each
            call's key base.
        solver: MVM: how p is solved, "kkt" or "pgd".
        channels_last: run the copy in that memory format: the units' NHWC rows are
            then dense and convs are faster on CPU and GPU.
        backend: the op module, `mvm_cuda.ops` (None, the default) or
            `mvm_cuda.reference`.
        threshold: the score above which an image is declared adversarial, as
            `fit_threshold` sets it; None until then.
        progress: True shows progress bars, False hides them, None shows them where
            stderr is a terminal.

    Raises:
        TypeError: for a keyword that is not a setting.
        ValueError: for a setting of the wrong type or value (naming it), a per-unit c
            or c_rel of another length than the model's units, or a generator on
            another device than the model. The units and `insert_units` raise their own
            ValueError for a value only they check (e.g. `SAPUnit: frac must be > 0`)
            or a model they cannot take.
    """

    def __init__(self, model: nn.Module, method: str = SETTINGS["method"].default, **settings):
        values = arguments("Detector", {"method": method, **settings})
        if values["method"] == "mvm" and values["c"] is None and values["c_rel"] is None:
            values["c_rel"] = 1.0
        vars(self).update({s.name: s.default for s in SETTINGS.values() if not s.argument}, **values)
        if self.backend is None:
            self.backend = ops
        # The units' mode, keys and recorded p live on the shared network, so one call
        # at a time: a lock, not per-thread state, keeps the units simple.
        self.lock = threading.RLock()
        self.net = self._sampling_net(model)
        self.units = sampling_units(self.net)
        # Where the first unit sees the input alone, the layers before it run once per
        # image and the unit stacks the R copies itself.
        self.stack_at_first_unit = first_unit_dominates(self.net)
        param = _first_param(self.net)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        if self.generator is not None and torch.device(self.generator.device).type != self.device.type:
            raise ValueError(
                f"Detector: the generator is on {self.generator.device} but the model is on {self.device}; "
                "pass a torch.Generator on the model's device"
            )

    def _sampling_net(self, model: nn.Module) -> nn.Module:
        """A copy of model in eval mode with this detector's unit after each ReLU of its conv part."""
        made = []

        def make_unit():
            k = len(made)
            made.append(k)
            if self.method == "mvm":
                pick = lambda v: v[min(k, len(v) - 1)] if isinstance(v, tuple) else v  # noqa: E731
                return MVMUnit(pick(self.c), c_rel=pick(self.c_rel), solver=self.solver, backend=self.backend)
            if self.method == "sap":
                return SAPUnit(self.frac, backend=self.backend)
            return DropoutUnit(self.p_drop, backend=self.backend)

        net = insert_units(model, make_unit).eval()
        for name, value in (("c", self.c), ("c_rel", self.c_rel)):
            if self.method == "mvm" and isinstance(value, tuple) and len(value) != len(made):
                raise ValueError(f"Detector: {name} gives {len(value)} values, but the model has {len(made)} "
                                 f"units (one after each ReLU of its conv part)")
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

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
        if values.size and (values.min() < 0 or values.max() > INT64_MAX):
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
        """Give the MVM units the reference count of c_ref="input"; with c_ref="unit"
        each unit keeps its own rows. The scoring methods call it with their images' H*W.

        Args:
            pixels: the input's H*W.
        """
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
        """The predicted classes of the R stochastic passes over images x.

        Runs in batches of P = max(1, max_batch // R) images (a tqdm bar over images),
        under torch.inference_mode; x is moved to the model's device and cast to its
        dtype. Thread-safe: calls from several threads run one at a time (`lock`).

        Args:
            x: images (N, C, H, W) in [0, 1], a tensor or a numpy array.
            index: (N,) integers, the images' numbers in the user's data (default
                0..N-1), which key their randomness (see the class docstring).

        Returns:
            (N, R) int64 on the CPU.

        Raises:
            TypeError: if x is not a tensor or numpy array.
            ValueError: for images that are not (N, C, H, W) floats in [0, 1] (NaN
                included) or do not fit the model, and for an index of another length
                or with negative values.
        """
        return self._votes(x, index, "votes")

    def scores(self, x, index=None) -> Tensor:
        """Alg. 3's score of every image: the entropy of the histogram of its R votes.

        Args:
            x: images (N, C, H, W) in [0, 1], a tensor or a numpy array.
            index: as for `votes`.

        Returns:
            (N,) float64 on the CPU, natural log: 0 when all R passes agree, at most
            log(min(R, K)).

        Raises:
            TypeError: as `votes`.
            ValueError: as `votes`.
        """
        return self._score(x, index, "scores")

    def fit_threshold(self, clean_x, fpr: float = 0.05, index=None) -> "Detector":
        """Set `threshold` so that at most a fraction fpr of clean images score above it.

        The threshold is `threshold_for_fpr` of the clean images' scores; `fpr` is kept.
        With k = floor(fpr N) clean images above the threshold, the false-positive rate
        it gives on new clean images varies by about 1/sqrt(k+1) of fpr (more than 30%
        below k = 10), hence the warning below.

        Args:
            clean_x: clean images (N, C, H, W) in [0, 1], a tensor or a numpy array.
            fpr: the false-positive rate, in (0, 1).
            index: as for `votes`.

        Returns:
            self.

        Raises:
            ValueError: if fpr is not in (0, 1) or N < ceil(1/fpr) (then not even one
                clean image may lie above the threshold), and as `votes`.
            TypeError: as `votes`.

        Warns:
            UserWarning: if N < ceil(10/fpr), e.g. 199 images at fpr = 0.05.
        """
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
        """Which images score above the fitted threshold, i.e. are declared adversarial.

        Args:
            x: images (N, C, H, W) in [0, 1], a tensor or a numpy array.
            index: as for `votes`.

        Returns:
            (N,) bool on the CPU.

        Raises:
            RuntimeError: before `fit_threshold` (or a threshold given at construction).
            TypeError: as `votes`.
            ValueError: as `votes`.
        """
        if self.threshold is None:
            raise RuntimeError("Detector.predict: no threshold; call fit_threshold(clean_images) first")
        return self._score(x, index, "predict") > self.threshold

    def evaluate(self, clean, adversarial, n_boot: int = 1000, seed: int = 0) -> RocReport:
        """ROC analysis of clean images (negatives) against adversarial ones (positives).

        Both sets are numbered from 0, so an adversarial image made from clean[n] (at
        position n) gets clean[n]'s random keys.

        Args:
            clean: clean images (N0, C, H, W) in [0, 1].
            adversarial: adversarial images (N1, C, H, W) in [0, 1].
            n_boot: bootstrap resamples of the 95% interval.
            seed: the bootstrap's seed.

        Returns:
            A RocReport: the ROC-AUC, its bootstrap interval and the ROC curve.

        Raises:
            ImportError: if scikit-learn or scipy is not installed.
            TypeError: as `votes`.
            ValueError: as `votes` and `roc_report`.
        """
        return roc_report(self._score(clean, None, "evaluate"), self._score(adversarial, None, "evaluate"),
                          n_boot=n_boot, seed=seed)

    def config(self) -> dict:
        """The settings that define this detector and its fitted state, JSON-ready.

        Returns:
            A dict: "format", every saved setting in declaration order (a module by its
            name, tuples as lists; seed None where a generator draws the keys), and
            "model_fingerprint" of the network.
        """
        cfg = {"format": _FORMAT, **{s.name: s.rule.to_saved(getattr(self, s.name)) for s in _SAVED}}
        if self.generator is not None:  # a user's generator is not saved: its copy draws fresh noise
            cfg["seed"] = None
        # Of the net with units: units have no state, so it is the model's state_dict.
        cfg["model_fingerprint"] = model_fingerprint(self.net)
        return cfg

    def save(self, path: str | os.PathLike) -> None:
        """Write `config()` to a JSON file, atomically.

        The model's weights are not saved: they stay the user's, and `load` takes the
        model again. A user's generator is not saved either: such a detector saves seed
        None, and its loaded copy draws from the default generator unless `load` is
        given one. The file is written to a temporary file beside it and renamed, so an
        existing file is replaced only by a complete new one.

        Args:
            path: the file to write.

        Raises:
            TypeError: for a setting JSON cannot hold (put in after construction).
            OSError: if the file cannot be written.
        """
        # Serialised first, then written whole: a failure leaves the previous file as it was.
        text = json.dumps(self.config(), indent=2, allow_nan=False).encode()
        write_atomically(path, lambda f: f.write(text))

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, *, backend: ModuleType | None = None,
             generator: torch.Generator | None = None, progress: bool | None = None,
             strict: bool = True) -> "Detector":
        """The detector saved at `path`, rebuilt around `model` (the same trained network).

        Args:
            path: a file written by `save`.
            model: the network the detector was saved with.
            backend: the op module (default: the saved one, if it is mvm_cuda.ops or
                mvm_cuda.reference).
            generator: as for `Detector` (a saved detector holds none).
            progress: as for `Detector`.
            strict: False turns a missing or different `model_fingerprint` into a
                UserWarning (e.g. after a deliberate dtype change; refit the threshold).

        Returns:
            The Detector, with the saved threshold, fpr and input shape.

        Raises:
            ValueError: naming the file, for a file that is not a saved detector (not
                JSON, another format, missing settings, a setting of the wrong type or
                value: the message names the key), for a model whose `model_fingerprint`
                differs from the saved one, or a file without one (a threshold fitted on
                one network means nothing on another).
            OSError: if the file cannot be read.
        """
        cfg = _read_saved(path)
        if backend is None:
            backend = _saved_backend(path, cfg["backend"])
        _check_fingerprint(path, cfg["model_fingerprint"], model, strict)
        saved = {s.name: cfg[s.name] for s in _SAVED if s.argument}
        det = cls(model, **{**saved, "generator": generator, "backend": backend, "progress": progress})
        vars(det).update({s.name: cfg[s.name] for s in _SAVED if not s.argument})
        return det

    def __repr__(self) -> str:
        return f"Detector({self.name}, R={self.R}, threshold={self.threshold}, device={self.device})"


def _signature() -> inspect.Signature:
    """Detector's constructor as help() and API references show it: each setting a keyword."""
    Parameter = inspect.Parameter
    head = [Parameter("self", Parameter.POSITIONAL_OR_KEYWORD),
            Parameter("model", Parameter.POSITIONAL_OR_KEYWORD, annotation="nn.Module"),
            Parameter("method", Parameter.POSITIONAL_OR_KEYWORD, default=SETTINGS["method"].default, annotation="str")]
    return inspect.Signature(head + [Parameter(s.name, Parameter.KEYWORD_ONLY, default=s.default)
                                     for s in SETTINGS.values() if s.argument and s.name != "method"])


Detector.__init__.__signature__ = _signature()
