"""Release file contents on disk, content-addressed: ``<data>/releases/blobs/<aa>/<sha256>``.

A blob is received as a stream (`BlobStore.receive`): written to a temp file in the same folder
while its sha256 is computed, bounded by the length the uploader declared (and by
`MAX_BLOB_BYTES`), and renamed to its name only when length and hash match; a mismatch or a
broken upload leaves nothing. A blob that exists is never rewritten (same name, same bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from edgewise.common.files import fsync_dir
from edgewise.errors import BadRequest, StorageError
from edgewise.sync.release import MAX_FILE_BYTES, check_sha256

MAX_BLOB_BYTES = MAX_FILE_BYTES  # one uploaded file


class BlobMismatch(BadRequest):
    """An upload's bytes do not have the sha256 or length it was sent under."""


class BlobStore:
    """The blob folder of one control plane."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.folder / sha256[:2] / sha256

    def length(self, sha256: str) -> int | None:
        """The stored blob's length, None when absent."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def missing(self, blobs: Iterable[tuple[str, int]]) -> list[str]:
        """The hashes of ``(sha256, length)`` not stored with that length, sorted."""
        return sorted({sha for sha, length in blobs if self.length(sha) != length})

    async def receive(self, sha256: str, length: int,
                      read: Callable[[int], Awaitable[bytes]], *, piece: int = 1 << 20) -> bool:
        """Store the blob ``read`` yields (``read(n)`` returns up to n bytes, b"" at the end).

        Returns False when it was stored already (the stream is not read). Raises
        `BlobMismatch` when the bytes are not ``length`` bytes with ``sha256``."""
        if not 0 <= length <= MAX_BLOB_BYTES:
            raise BadRequest(f"a release file has at most {MAX_BLOB_BYTES} bytes")
        target = self.path(sha256)
        if self.length(sha256) == length:
            return False
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot store blobs in {target.parent}: {exc.strerror}") from None
        tmp = target.parent / f".{sha256}.{secrets.token_hex(6)}.part"
        digest = hashlib.sha256()
        got = 0
        try:
            with open(tmp, "wb") as f:
                while data := await read(piece):
                    got += len(data)
                    if got > length:
                        raise BlobMismatch(f"blob {sha256}: more than the {length} bytes "
                                           "declared")
                    digest.update(data)
                    await asyncio.to_thread(f.write, data)
                if got != length:
                    raise BlobMismatch(f"blob {sha256}: {got} bytes, {length} declared")
                if digest.hexdigest() != sha256:
                    raise BlobMismatch(f"blob {sha256}: the bytes have sha256 "
                                       f"{digest.hexdigest()}")
                await asyncio.to_thread(os.fsync, f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageError(f"cannot store blob {sha256}: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        fsync_dir(target.parent)
        return True
