"""What counts as a number or an integer among a caller's arguments, for the op wrappers
and the detector's settings alike: a Python or numpy scalar or a one-element tensor,
never a bool. And how a bad value is shown in a message."""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["INT64_MAX", "integer", "real", "short"]

INT64_MAX = 2**63 - 1


def real(value, otherwise=None):
    """value as a Python float if it is a real number (a Python or numpy real, or a
    one-element tensor of a real dtype; not a bool), else `otherwise`. An integer too
    large for a float becomes +-inf, which a finiteness check then names."""
    if type(value) is float:  # the common case, first: a long list is checked item by item
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
            return float(value)
        return otherwise
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    return otherwise


def integer(value, low: int, high: int = INT64_MAX, *, whole_floats: bool = True) -> int | None:
    """value as a Python int if it is an integer in [low, high], else None. An integer is
    a Python or numpy integer or a one-element integer tensor (not a bool); with
    whole_floats also a finite float without a fraction, such as 4.0."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool \
            and not value.is_floating_point() and not value.is_complex():
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        n = int(value)
    else:
        f = real(value) if whole_floats else None
        if f is None or not math.isfinite(f) or f != int(f):
            return None
        n = int(f)
    return n if low <= n <= high else None


def short(value, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters, so that a message stays short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
