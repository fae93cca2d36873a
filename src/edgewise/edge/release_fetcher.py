"""`ReleaseFetcher`: releases from the control plane, verified with TUF, over the node's
mutual-TLS identity. The updater (`edgewise.edge.updater`) fetches through it (it satisfies
`edgewise.sync.release.ReleaseSource`).

It is `edgewise.security.tuf.client.TufClient` (the TUF workflow, refusals as `UpdateRefused`)
with the release vocabulary of `edgewise.sync.release` on top: a version's manifest is the target
``releases/<version>/manifest.json``, a file's content the target ``blobs/<sha256>``. It lives
here, not in ``security``, because ``security`` and ``sync`` sit side by side in the layers
(docs/architecture.md) and this needs both.

The node's trust anchor is the TUF root of its enrolment answer, kept as
``<data>/identity/tuf-root.json`` (`edgewise.edge.identity_files.TUF_ROOT_FILE`); rotations
are followed into ``metadata_dir``. Blocking: call it from a thread.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from edgewise.errors import PeerError, UpdateRefused
from edgewise.security.tuf.client import TufClient
from edgewise.sync.release import (
    MAX_MANIFEST_BYTES,
    Manifest,
    blob_target,
    check_sha256,
    check_version,
    manifest_target,
)


class ReleaseFetcher:
    """Verified release manifests and files (see the module docstring)."""

    def __init__(self, metadata_dir: Path, base_url: str, ssl_context: ssl.SSLContext,
                 trusted_root: bytes | None = None) -> None:
        self.tuf = TufClient(metadata_dir, base_url, ssl_context, trusted_root)

    def refresh(self) -> None:
        """TUF refresh (root rotations, timestamp, snapshot, targets). Raises `UpdateRefused`
        on any attack (rollback, freeze, mix-and-match, bad signatures, endless data),
        `PeerError` for an HTTP error answer, `TransportError` without a network."""
        self.tuf.refresh()

    def manifest(self, version: str) -> Manifest:
        """The verified manifest of release ``version``."""
        try:
            check_version(version)
        except ValueError as exc:
            raise PeerError(str(exc)) from None
        data = self.tuf.fetch_bytes(manifest_target(version), MAX_MANIFEST_BYTES)
        manifest = Manifest.from_bytes(data)
        if manifest.version != version:
            raise UpdateRefused(f"{manifest_target(version)} is the manifest of version "
                                f"{manifest.version}")
        return manifest

    def fetch_blob(self, sha256: str, dest: Path) -> None:
        """Download the file whose content has ``sha256`` to ``dest``: verified (length and
        sha256 from the signed targets) before ``dest`` is written (temp file + rename), never
        a partial file."""
        try:
            check_sha256(sha256)
        except ValueError as exc:
            raise PeerError(str(exc)) from None
        self.tuf.fetch_to(blob_target(sha256), Path(dest), sha256=sha256)
