"""A release source backed by a folder: releases carried on a USB stick, and the tests' fake.

`edgewise.sync.release.ReleaseSource` is the interface the updater fetches through; the real
one verifies with TUF over the node's mutual-TLS identity. `DirectorySource` reads the same
target names from a folder::

    ROOT/releases/<version>/manifest.json
    ROOT/blobs/<sha256>

and checks every blob's length and sha256 before ``dest`` exists (a wrong one is
`UpdateRefused`), so a damaged stick never puts a byte in a slot. It has no signatures: use it
only for content whose origin is checked some other way. `publish` lays a release folder
out like this. ``fetches`` and ``bytes_fetched`` count what was read (the bytes test).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from edgewise.common.files import fsync_dir
from edgewise.errors import PeerError, StorageError, TransportError, UpdateRefused
from edgewise.sync.release import (
    MAX_MANIFEST_BYTES,
    Manifest,
    blob_target,
    build_manifest,
    check_sha256,
    check_version,
    manifest_target,
)

_PIECE = 1 << 20


class DirectorySource:
    """`ReleaseSource` over a folder laid out by `publish`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.fetches = 0
        self.bytes_fetched = 0
        self._lengths: dict[str, int] = {}  # sha256 -> length, from manifests read

    def refresh(self) -> None:
        if not self.root.is_dir():
            raise TransportError(f"release folder {self.root} is not there")

    def manifest(self, version: str) -> Manifest:
        check_version(version)
        path = self.root / manifest_target(version)
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            raise UpdateRefused(f"release {version} is not in {self.root}") from None
        except OSError as exc:
            raise TransportError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            manifest = Manifest.from_bytes(raw)
        except PeerError as exc:
            raise UpdateRefused(str(exc)) from None
        if manifest.version != version:
            raise UpdateRefused(f"{path} holds release {manifest.version}, not {version}")
        for f in manifest.files:
            self._lengths[f.sha256] = f.length
        return manifest

    def fetch_blob(self, sha256: str, dest: Path) -> None:
        check_sha256(sha256)
        length = self._lengths.get(sha256)
        if length is None:
            raise UpdateRefused(f"blob {sha256[:12]}... is in no manifest read from here")
        self.fetches += 1
        src = self.root / blob_target(sha256)
        tmp = dest.with_name(f".{dest.name}.part")
        digest, got = hashlib.sha256(), 0
        try:
            with src.open("rb") as fin, tmp.open("wb") as fout:
                while piece := fin.read(min(_PIECE, length + 1 - got)):
                    got += len(piece)
                    if got > length:
                        break  # endless data: never more than the manifest says
                    digest.update(piece)
                    fout.write(piece)
                fout.flush()
                os.fsync(fout.fileno())
            self.bytes_fetched += got
            if got != length or digest.hexdigest() != sha256:
                raise UpdateRefused(f"blob {sha256[:12]}...: {got} bytes with another hash, "
                                    f"not the {length} bytes the manifest names")
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def publish(release_dir: Path, version: str, root: Path) -> Manifest:
    """Lay the release in ``release_dir`` out under ``root`` as `DirectorySource` reads it."""
    manifest = build_manifest(release_dir, version)
    blobs = root / "blobs"
    target = root / manifest_target(version)
    try:
        blobs.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        for f in manifest.files:
            dest = blobs / f.sha256
            if not dest.exists():
                shutil.copyfile(release_dir / f.path, dest)
        target.write_bytes(manifest.to_bytes())
        fsync_dir(blobs)
    except OSError as exc:
        raise StorageError(f"cannot publish into {root}: {exc.strerror or exc}") from exc
    return manifest
