"""The per-sample keys of the ops' counter-based draws: a hash of (base, image index,
unit, pass), so that an image's draws never depend on its position in a batch."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["sample_keys"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a bijection that
    spreads every input bit over the output."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_keys(base: int, index, unit: int, passes: range) -> Tensor:
    """The ops' per-sample keys of one forward: (len(passes) * P,) int64 on the CPU, pass-major
    (sample k * P + j is image index[j] in pass passes[k]), each a hash of (base, the image's
    index, the unit, the pass). index: (P,) integers. So an image's draws depend on its
    index and never on its position in a batch or on the other images."""
    with np.errstate(over="ignore"):
        image = _mix64(_mix64(np.asarray([base], dtype=np.uint64) + _GOLDEN)
                       + (np.asarray(index, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
        unit_key = _mix64(image + np.uint64(unit + 1) * _GOLDEN)
        r = np.arange(passes.start, passes.stop, dtype=np.uint64)[:, None]
        keys = _mix64(unit_key[None, :] + (r + np.uint64(1)) * _GOLDEN)
    return torch.from_numpy(keys.reshape(-1).view(np.int64))
