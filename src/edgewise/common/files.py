"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a part.

The one implementation for everything Edgewise persists as a whole file: certificates and keys,
desired and reported state, the status file, the planner's calibration cache.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from edgewise.errors import StorageError


def write_atomic(
    path: str | os.PathLike[str], data: bytes, mode: int = 0o644, *, durable: bool = True
) -> None:
    """Replace ``path`` with ``data``.

    A temp file in the same directory (created with ``mode`` before any byte is written), then
    ``os.replace``. With ``durable`` (the default) the file is fsynced before the replace and the
    directory after it, so a power loss also leaves the old or the new file whole; without it a
    process crash does (enough for views that are rewritten every second).

    Raises `StorageError` when the disk refuses.
    """
    target = Path(path)
    directory = target.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:  # owns fd from here on, closes it on every path
            os.fchmod(f.fileno(), mode)
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise
    if durable:
        fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable (best effort: not every filesystem allows it)."""
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
