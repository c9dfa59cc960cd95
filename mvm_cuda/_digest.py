"""One SHA-256 of tensors for every fingerprint, checksum and cache key the package makes."""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch
from torch import Tensor

__all__ = ["tensor_digest"]


def tensor_digest(named: Iterable[tuple[str, Tensor]]) -> str:
    """The SHA-256 (64 hex digits) of (name, tensor) pairs in the order given: each
    entry's name, dtype, shape and values, read on the CPU, so independent of device and
    memory layout."""
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
