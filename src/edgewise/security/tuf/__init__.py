"""Signed releases with TUF (The Update Framework, python-tuf): keys, the repository side as
pure functions, and the node's verified fetcher. docs/updates.md describes the key ceremony.

* `edgewise.security.tuf.keys`: ed25519 signing keys on disk (`RootKeys` offline,
  `OnlineKeys` on the control plane);
* `edgewise.security.tuf.repository`: root, rotation, publish and re-signing, bytes in and out;
* `edgewise.security.tuf.client`: `TufClient` (``tuf.ngclient`` over mutual TLS); the node's
  `edgewise.edge.release_fetcher.ReleaseFetcher` speaks releases on top of it.
"""

from __future__ import annotations

from edgewise.security.tuf.client import TufClient
from edgewise.security.tuf.keys import OnlineKeys, RootKeys
from edgewise.security.tuf.repository import Expiry, TopMetadata

__all__ = ["Expiry", "OnlineKeys", "RootKeys", "TopMetadata", "TufClient"]
