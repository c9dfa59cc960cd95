"""The detector's settings, declared once: each one's name, default, the values it takes
and whether a saved detector keeps it. `Detector`'s constructor, `config`, `save` and
`load`, and `DetectorSearch`'s checks all follow from the table `SETTINGS`.

A rule is a kind of value: `take` makes an argument a plain Python value (so that
`config()` is JSON) and `take_saved` does the same for a value read from a saved file,
which holds JSON (a bool there is not a number, and `null` is None). A bad value gives a
ValueError that names the caller, the setting and the value."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._args import INT64_MAX, integer, real, short

__all__ = ["C_REFS", "FPR", "MAX_BATCH", "MAX_R", "METHODS", "SEED", "SETTINGS", "SOLVERS", "Integer", "Number",
           "Setting", "arguments", "check_argument", "fpr_setting"]

METHODS = ("mvm", "sap", "dropout")
SOLVERS = ("kkt", "pgd")
C_REFS = ("input", "unit")
# Bounds on a detector's counts, so that one call's work and memory fit a machine: R
# passes of max_batch samples each; the ops themselves keep their int64 range.
MAX_R = 100_000
MAX_BATCH = 2**24


class Reject(Exception):
    """A value outside a rule's kind (turned into a ValueError by `Rule.check`)."""


class Rule(ABC):
    """A kind of value."""

    @abstractmethod
    def take(self, value):
        """value as the plain Python value it stands for; Reject if it is not of the kind."""

    def take_saved(self, value):
        """A value read from a saved (JSON) file, as `take` gives it."""
        return self.take(value)

    @abstractmethod
    def words(self, saved: bool) -> str:
        """What a valid value is, for a message (saved: in JSON's words)."""

    def to_saved(self, value):
        """value as JSON holds it."""
        return value

    def check(self, where: str, name: str, value, saved: bool = False):
        """take (or take_saved) of value, or ValueError "<where>: <name> must be <words>, got <value>"."""
        try:
            return self.take_saved(value) if saved else self.take(value)
        except Reject:
            raise ValueError(f"{where}: {name} must be {self.words(saved)}, got {short(value)}") from None


@dataclass(frozen=True)
class Choice(Rule):
    options: tuple

    def take(self, value):
        if isinstance(value, str) and value in self.options:
            return str(value)
        raise Reject

    def words(self, saved):
        return f"one of {self.options}"


@dataclass(frozen=True)
class Integer(Rule):
    """An integer in [low, high]; `bounds` shows that range in messages where [low, high]
    would read worse. whole_floats: 4.0 counts (not for seeds, where a float is a slip)."""
    low: int
    high: int = INT64_MAX
    bounds: str = ""
    whole_floats: bool = True

    def take(self, value):
        n = integer(value, self.low, self.high, whole_floats=self.whole_floats)
        if n is None:
            raise Reject
        return n

    def words(self, saved):
        return f"an integer in {self.bounds or f'[{self.low}, {self.high}]'}"


@dataclass(frozen=True)
class Number(Rule):
    """A finite real number in the interval from low to high (either end open or closed)."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def take(self, value):
        f = real(value)
        if f is None or not math.isfinite(f):
            raise Reject
        above = f > self.low if self.low_open else f >= self.low
        below = f < self.high if self.high_open else f <= self.high
        if not (above and below):
            raise Reject
        return f

    def words(self, saved):
        if self.high < math.inf:
            return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low > -math.inf:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        return "a finite number"


@dataclass(frozen=True)
class Flag(Rule):
    """True or False (as an argument also 1, 0 or a numpy bool; a file holds true or false);
    with none, also None."""
    none: bool = False

    def take(self, value):
        if value is None and self.none:
            return None
        if isinstance(value, (bool, np.bool_)) or integer(value, 0, 1, whole_floats=False) is not None:
            return bool(value)
        raise Reject

    def take_saved(self, value):
        if isinstance(value, bool) or value is None and self.none:
            return value
        raise Reject

    def words(self, saved):
        if self.none:
            return "true, false or null" if saved else "True, False or None"
        return "true or false" if saved else "a bool"


@dataclass(frozen=True)
class OrNone(Rule):
    """None, or a value of `rule`."""
    rule: Rule

    def take(self, value):
        return None if value is None else self.rule.take(value)

    def take_saved(self, value):
        return None if value is None else self.rule.take_saved(value)

    def words(self, saved):
        return f"{'null' if saved else 'None'} or {self.rule.words(saved)}"

    def to_saved(self, value):
        return None if value is None else self.rule.to_saved(value)


@dataclass(frozen=True)
class PerUnit(Rule):
    """None, one value of `item` for every unit, or a sequence of them, one per unit (a tuple)."""
    item: Rule

    def take(self, value):
        if value is None:
            return None
        many = isinstance(value, Sequence) and not isinstance(value, str) or \
            isinstance(value, (np.ndarray, torch.Tensor)) and np.ndim(value) == 1
        if not many:
            return self.item.take(value)
        items = tuple(self.item.take(v) for v in value)
        if not items:
            raise Reject
        return items

    def words(self, saved):
        if saved:
            return f"null, {self.item.words(saved)}, or a list of them (one per unit)"
        return f"None, {self.item.words(saved)}, or a sequence of them (one per unit)"

    def to_saved(self, value):
        return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Shape(Rule):
    """An image shape (C, H, W) of integers >= 1, a tuple (a list in a file)."""

    def take(self, value):
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise Reject
        return tuple(Integer(1).take(d) for d in value)

    def words(self, saved):
        return "a list of 3 integers >= 1 (C, H, W)"

    def to_saved(self, value):
        return list(value)


@dataclass(frozen=True)
class Backend(Rule):
    """The op module (None: mvm_cuda.ops); a file holds its name."""

    def take(self, value):
        return value

    def take_saved(self, value):
        if isinstance(value, str):
            return value
        raise Reject

    def words(self, saved):
        return "a module name" if saved else "a module"

    def to_saved(self, value):
        return value.__name__


@dataclass(frozen=True)
class Generator(Rule):
    """None or a torch.Generator."""

    def take(self, value):
        if value is None or isinstance(value, torch.Generator):
            return value
        raise Reject

    def words(self, saved):
        return "None or a torch.Generator"


@dataclass(frozen=True)
class Setting:
    """One setting of a Detector.

    argument: the constructor takes it (else it is fitted state: fpr, input_shape).
    saved: `config()` writes it and `load` reads it back. in_file: the rule for a saved
    value where it is stricter than the argument's (an argument's range is then checked
    by the unit that uses it, in its own words). required: a file without it is
    rejected; else it loads with the default.
    """
    name: str
    default: object
    rule: Rule
    argument: bool = True
    saved: bool = True
    in_file: Rule | None = None
    required: bool = True

    def check(self, where: str, value):
        """The argument value, plain and checked (ValueError naming where and the setting)."""
        return self.rule.check(where, self.name, value)

    def check_saved(self, where: str, value):
        """A value read from a saved file, plain and checked."""
        return (self.in_file or self.rule).check(where, self.name, value, saved=True)


SEED = Integer(0, 2**64 - 1, "[0, 2**64)", whole_floats=False)  # torch.Generator and numpy take [0, 2**64)
FPR = Number(0, 1, low_open=True, high_open=True)

SETTINGS: dict[str, Setting] = {s.name: s for s in (
    # In config()'s order (the order of a saved file's keys).
    Setting("method", "mvm", Choice(METHODS)),
    Setting("c", None, PerUnit(Integer(1, INT64_MAX, "[1, 2**63)"))),
    Setting("c_rel", None, PerUnit(Number(0, low_open=True))),
    Setting("c_ref", "input", Choice(C_REFS), required=False),  # files saved before c_ref existed lack it
    Setting("frac", 0.5, Number(), in_file=Number(0, low_open=True)),  # SAPUnit checks an argument's range
    Setting("p_drop", 0.5, Number(), in_file=Number(0, 1, high_open=True)),  # DropoutUnit likewise
    Setting("R", 100, Integer(1, MAX_R)),
    Setting("max_batch", 1024, Integer(1, MAX_BATCH, f"[1, 2**24 = {MAX_BATCH}]")),
    Setting("seed", None, OrNone(SEED)),
    Setting("generator", None, Generator(), saved=False),
    Setting("solver", "kkt", Choice(SOLVERS)),
    Setting("channels_last", True, Flag()),
    Setting("backend", None, Backend()),
    Setting("threshold", None, OrNone(Number())),
    Setting("progress", None, Flag(none=True), saved=False),
    Setting("fpr", None, OrNone(FPR), argument=False),
    Setting("input_shape", None, OrNone(Shape()), argument=False),
)}


def _constructor_setting(where: str, name: str) -> Setting:
    setting = SETTINGS.get(name)
    if setting is None or not setting.argument:
        known = ", ".join(s.name for s in SETTINGS.values() if s.argument)
        raise TypeError(f"{where}: {name!r} is not a Detector setting; the settings are {known}")
    return setting


def check_argument(where: str, name: str, value):
    """value of the constructor's setting `name`, plain and checked. Raises TypeError for
    a name that is not a setting, ValueError for a bad value."""
    return _constructor_setting(where, name).check(where, value)


def arguments(where: str, given: dict) -> dict:
    """Every constructor setting, by name: its value in `given`, plain and checked, or its
    default. Raises as check_argument."""
    for name in given:
        _constructor_setting(where, name)
    return {s.name: s.check(where, given.get(s.name, s.default)) for s in SETTINGS.values() if s.argument}


def fpr_setting(where: str, fpr) -> tuple[float, int]:
    """fpr as a Python float in (0, 1) and the fewest clean scores that resolve it,
    ceil(1/fpr); else ValueError naming `where`. A numpy or 0-d tensor fpr becomes a
    float here, so that config() stays JSON."""
    f = FPR.check(where, "fpr", fpr)
    inverse = 1 / f
    if not inverse < 2**53:  # beyond that no data set resolves it (and 1/5e-324 is inf)
        raise ValueError(f"{where}: fpr={f!r} is too small to resolve with any number of images "
                         f"(it needs 1/fpr of them); use fpr >= 2**-53")
    return f, math.ceil(inverse - 1e-9)
