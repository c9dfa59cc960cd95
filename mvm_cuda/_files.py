"""Writing files whole or not at all: every file the package writes goes through here."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Callable

__all__ = ["write_atomically", "first_os_error"]


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call write(f) on a temporary file in path's folder, flush it to disk and rename it
    to path (os.replace). Readers see the previous file or the complete new one, never
    a truncated one; if write (or the disk) fails, the previous file is left as it was,
    the temporary file is removed, and the error propagates."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def first_os_error(error: BaseException) -> OSError | None:
    """The OSError that error is or was raised from or during (torch.save reports a full
    disk as a RuntimeError whose context is the OSError), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
