"""Publishing and signing releases on the control plane (`ReleaseService`).

The online keys are files in ``<data>/tuf/keys`` (written by ``edgewise cloud keys init`` and
``rotate``), read again for every signature, so a rotation takes effect without a restart.
Signing is the pure code of `edgewise.security.tuf.repository`, run inside the store's
transaction (`Store.update_tuf`, `Store.publish_release`).

* `ReleaseService.publish`: a manifest whose files are all stored (`blobs`) becomes a release:
  the targets metadata gets the manifest (``releases/<v>/manifest.json``) and every file
  (``blobs/<sha256>``) added to what it listed, and snapshot and timestamp follow.
* `ReleaseService.resign`: what `repository.refresh` says is due (the timestamp when half of its
  day is gone, snapshot and targets likewise); `maintain` calls it every `RESIGN_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from edgewise.cloud.releases.blobs import BlobStore
from edgewise.cloud.store import Store
from edgewise.cloud.store.releases import ReleaseInfo
from edgewise.errors import BadRequest, ConfigError, EdgewiseError, PeerError
from edgewise.security.tuf import repository
from edgewise.security.tuf.keys import ONLINE_ROLES, OnlineKeys
from edgewise.security.tuf.repository import Expiry, TopMetadata
from edgewise.sync.release import Manifest, blob_target, manifest_target

log = logging.getLogger(__name__)

RESIGN_INTERVAL = 300.0  # s between checks for metadata to re-sign
TUF_DIR = "tuf"
BLOB_DIR = "releases/blobs"


def online_keys(data_dir: Path) -> OnlineKeys:
    return OnlineKeys(Path(data_dir) / TUF_DIR / "keys")


class BlobsMissing(BadRequest):
    """A release names files the control plane does not hold yet (409 with their hashes)."""

    status = 409

    def __init__(self, version: str, missing: list[str]) -> None:
        self.missing = missing
        self.answer_fields = {"missing": missing}  # beside "error" in the 409 (http_errors)
        super().__init__(f"release {version}: {len(missing)} file(s) not uploaded yet; upload "
                         "them (PUT /v1/releases/blobs/<sha256>) and publish again")


class ReleaseService:
    """Releases of one control plane: its store, its blob folder, its online keys."""

    def __init__(self, store: Store, data_dir: Path, *, expiry: Expiry | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.blobs = BlobStore(Path(data_dir) / BLOB_DIR)
        self.keys = online_keys(data_dir)
        self.expiry = expiry or Expiry()
        self.clock = clock or (lambda: datetime.now(UTC))

    def _signers(self) -> dict[str, object]:
        if not self.keys.exist():
            raise ConfigError(f"no online TUF keys in {self.keys.folder}: run `edgewise cloud "
                              "keys init ROOT_KEY_DIR --data DIR` once before publishing")
        return {role: self.keys.load(role) for role in ONLINE_ROLES}

    async def publish(self, manifest_bytes: bytes, *, actor: str) -> tuple[ReleaseInfo, bool]:
        """Publish a manifest (canonical bytes, as `Manifest.to_bytes`). Raises `BadRequest`
        for a bad manifest, `BlobsMissing`, `ReleaseExists`, `ConfigError` without keys."""
        try:
            manifest = Manifest.from_bytes(manifest_bytes)
        except PeerError as exc:
            raise BadRequest(str(exc)) from None
        signers = self._signers()  # no keys: nothing can be published, say so first
        missing = self.blobs.missing((f.sha256, f.length) for f in manifest.files)
        if missing:
            raise BlobsMissing(manifest.version, missing)
        now = self.clock()
        added = {manifest_target(manifest.version): (len(manifest_bytes), manifest.digest())}
        added.update({blob_target(sha): (length, sha)
                      for sha, length in manifest.blobs().items()})

        def sign(old: TopMetadata | None) -> TopMetadata:
            if old is None:
                raise ConfigError("no TUF root in the store: run `edgewise cloud keys init` "
                                  "before publishing")
            targets = repository.current_targets(old) | added
            return repository.publish(old, targets, signers,  # type: ignore[arg-type]
                                      now=now, expiry=self.expiry)

        return await self.store.publish_release(
            manifest.version, manifest_bytes, manifest.digest(), len(manifest.files),
            manifest.total_bytes(), sign, actor=actor, now=now)

    async def resign(self, *, force: bool = False, actor: str = "system") -> TopMetadata | None:
        """Re-sign what is due (or everything with ``force``); None when there is no root or
        no online keys yet."""
        if not self.keys.exist():
            return None
        signers = self._signers()
        now = self.clock()

        def change(old: TopMetadata | None) -> TopMetadata | None:
            if old is None:
                return None
            return repository.refresh(old, signers, now=now,  # type: ignore[arg-type]
                                      expiry=self.expiry, force=force)

        return await self.store.update_tuf(change, actor=actor, action="tuf.resign", now=now)

    async def maintain(self, interval: float = RESIGN_INTERVAL) -> None:
        """Re-sign before expiry, forever (a task of the app's lifecycle)."""
        while True:
            try:
                await self.resign()
            except EdgewiseError as exc:
                log.warning("re-signing TUF metadata failed: %s", exc)
            await asyncio.sleep(interval)
