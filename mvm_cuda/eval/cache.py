"""The on-disk cache of the evaluation: trained weights, crafted attacks and scores.

Every entry is a dict of tensors stored under a key (a string that names everything the
tensors depend on) in a file of cache_dir()/<folder>, written atomically and checked on
load (format, key, layout and a SHA-256 of the tensors), so an interrupted run never
leaves a file that is later loaded as garbage; a bad file is reported and rebuilt, and a
cache that cannot be written only warns.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .._digest import tensor_digest
from .._files import first_os_error, write_atomically

__all__ = ["cache_dir", "file_for", "load_file", "save_file", "cached_tensors", "load_cached", "save_cached"]

_FORMAT = "mvm_cuda-cache-v1"


def cache_dir() -> Path:
    """The cache folder: $MVM_CUDA_CACHE, else $XDG_CACHE_HOME/mvm_cuda, else ~/.cache/mvm_cuda
    (a leading ~ is the home folder, as in a shell).

    Only named here; it is created on the first write.
    """
    if os.environ.get("MVM_CUDA_CACHE"):
        return Path(os.environ["MVM_CUDA_CACHE"]).expanduser()
    # A relative XDG_CACHE_HOME is invalid by the XDG spec: ignore it, as the spec says.
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
    return base / "mvm_cuda"


def _checksum(tensors: dict[str, Tensor]) -> str:
    return tensor_digest(sorted(tensors.items()))


def file_for(folder: str, key: str) -> Path:
    """The file of `key` under cache_dir()/folder."""
    # Keys may hold any characters; a readable prefix plus a hash names the file safely.
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80]
    return cache_dir() / folder / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def _dense(t: Tensor) -> Tensor:
    """t on the CPU, copied if it is a view: torch.save writes a view's whole storage, and
    `load_file` accepts only tensors that fill their own."""
    t = t.detach().cpu()
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _save(path: Path, key: str, tensors: dict[str, Tensor]) -> None:
    tensors = {k: _dense(v) for k, v in tensors.items()}
    record = {"format": _FORMAT, "key": key, "tensors": tensors, "checksum": _checksum(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Readers see the old file or the complete new one, never a half-written one.
    write_atomically(path, lambda f: torch.save(record, f))


def save_file(path: Path, key: str, tensors: dict[str, Tensor]) -> None:
    """`_save`, but a cache that cannot be written (read-only or full disk, a folder in
    the way) costs only the caching: a warning, and the caller keeps its result."""
    try:
        _save(path, key, tensors)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write (ENOSPC included) as a RuntimeError whose
        # context is the OSError; other RuntimeErrors are not the disk's and propagate.
        cause = first_os_error(e)
        if cause is None:
            raise
        what = f"{type(e).__name__}: {e}" if cause is e else f"{type(cause).__name__}: {cause} ({type(e).__name__}: {e})"
        warnings.warn(f"mvm_cuda cache: could not write {path}: {what}", stacklevel=3)


def _check_layout(tensors) -> None:
    """Raise ValueError unless tensors is a dict of names to dense tensors, each within
    its own stored bytes: checked before the checksum reads any data, since a crafted
    view (a stride-0 expand of one element) would make it materialise gigabytes."""
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                 for k, v in tensors.items()):
        raise ValueError("the file's tensors are not a dict of names to tensors")
    for name, t in tensors.items():
        stored = t.untyped_storage().nbytes()
        if not t.is_contiguous() or (t.storage_offset() + t.numel()) * t.element_size() > stored:
            raise ValueError(f"tensor {name!r} of shape {tuple(t.shape)} and strides {t.stride()} does not lie "
                             f"densely within its {stored} stored bytes")


def _stored_uncompressed(path: Path) -> None:
    """Raise ValueError unless every entry of the zip file at path is stored uncompressed
    (as torch.save writes them), so that loading it takes no more memory than its size.
    Other files are left to torch.load, which refuses them."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise ValueError(f"compressed entries ({', '.join(packed[:3])}), which torch.save never writes")


def load_file(path: Path, key: str) -> dict[str, Tensor] | None:
    """The tensors stored under `key` at `path`, or None (with a warning if the file is bad)."""
    if not path.is_file():
        return None
    try:
        _stored_uncompressed(path)
        record = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(record, dict) or record.get("format") != _FORMAT:
            raise ValueError("not an mvm_cuda cache file")
        if record.get("key") != key:
            raise ValueError(f"stored key {record.get('key')!r} differs from {key!r}")
        tensors = record["tensors"]
        _check_layout(tensors)
        if _checksum(tensors) != record["checksum"]:
            raise ValueError("checksum mismatch")
    except Exception as e:
        warnings.warn(
            f"mvm_cuda cache: ignoring and rebuilding {path}: {type(e).__name__}: {e}", stacklevel=3
        )
        return None
    return tensors


def cached_tensors(key: str, fn: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """A dict of tensors computed once by fn() and cached on disk under `key`.

    For crafted adversarial sets and the like: the key should name everything the result
    depends on (dataset, model key, attack, parameters, seed). The file lives in
    cache_dir()/tensors, is written atomically, loaded with weights_only=True, and
    checked (format, key and a SHA-256 of the tensors); a corrupt or truncated file is
    reported with a warning and rebuilt by calling fn() again, and a file that cannot be
    written is reported with a warning (the result is still returned). Returns the dict, its
    tensors on the CPU, whether loaded or freshly computed.
    """
    path = file_for("tensors", key)
    tensors = load_file(path, key)
    if tensors is None:
        tensors = fn()
        if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise TypeError(f"cached_tensors: fn must return a dict of tensors, got {type(tensors).__name__}")
        save_file(path, key, tensors)
        tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    return tensors


def load_cached(key: str) -> dict[str, Tensor] | None:
    """The tensors `cached_tensors` stored under `key`, on the CPU, or None (a bad file
    warns); for a computation split over processes, which looks before it computes."""
    return load_file(file_for("tensors", key), key)


def save_cached(key: str, tensors: dict[str, Tensor]) -> None:
    """Store tensors under `key` as `cached_tensors` does (atomically; a cache that cannot
    be written only warns)."""
    save_file(file_for("tensors", key), key, tensors)
