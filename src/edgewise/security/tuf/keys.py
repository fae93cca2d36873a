"""TUF signing keys on disk: ed25519, unencrypted PKCS#8 PEM, mode 0600, written atomically.

Two folders, kept apart (docs/updates.md, "Key ceremony"):

* the **root key folder** (`RootKeys`), made by ``edgewise cloud keys init`` on a machine the
  operator keeps offline: ``root-<keyid12>.key`` for each root key and a copy of every root
  version it signed (``<n>.root.json``). It is needed again only to rotate keys.
* the **online key folder** (`OnlineKeys`), under the control plane's data directory
  (``tuf/keys/``): ``targets.key``, ``snapshot.key``, ``timestamp.key``. The control plane signs
  with them on every publish and when the timestamp nears its expiry.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from edgewise.common.files import write_atomic
from edgewise.errors import ConfigError, StorageError

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
MAX_KEY_FILE = 16 << 10  # bytes of a key file


def generate() -> CryptoSigner:
    """A new ed25519 signer."""
    return CryptoSigner.generate_ed25519()


def save_signer(path: Path, signer: CryptoSigner, *, overwrite: bool = False) -> None:
    """Write ``signer``'s private key to ``path`` (0600, atomic); refuses to replace a file
    unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists already: move it away first (it is a signing key)")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, signer.private_bytes, mode=0o600)


def load_signer(path: Path) -> CryptoSigner:
    """The ed25519 signer whose private key is at ``path``. ConfigError when missing or not an
    ed25519 key."""
    try:
        if path.stat().st_size > MAX_KEY_FILE:
            raise ConfigError(f"{path}: larger than a key file ({MAX_KEY_FILE} bytes)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no signing key at {path}") from None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an ed25519 key")
    return CryptoSigner(key)


@dataclass(frozen=True)
class OnlineKeys:
    """The control plane's online keys, in ``folder`` (``<data>/tuf/keys``)."""

    folder: Path

    def path(self, role: str) -> Path:
        if role not in ONLINE_ROLES:
            raise ValueError(f"not an online role: {role}")
        return self.folder / f"{role}.key"

    def exist(self) -> bool:
        return all(self.path(role).exists() for role in ONLINE_ROLES)

    def load(self, role: str) -> CryptoSigner:
        return load_signer(self.path(role))

    def public(self) -> dict[str, SSlibKey]:
        return {role: self.load(role).public_key for role in ONLINE_ROLES}

    def create(self, roles: Iterable[str] = ONLINE_ROLES, *, overwrite: bool = False
               ) -> dict[str, CryptoSigner]:
        """New keys for ``roles`` (saved); returns them."""
        made = {}
        for role in roles:
            signer = generate()
            save_signer(self.path(role), signer, overwrite=overwrite)
            made[role] = signer
        return made


@dataclass(frozen=True)
class RootKeys:
    """The offline root key folder."""

    folder: Path

    def key_files(self) -> list[Path]:
        return sorted(self.folder.glob("root-*.key"))

    def load_all(self) -> list[CryptoSigner]:
        files = self.key_files()
        if not files:
            raise ConfigError(f"no root key (root-*.key) in {self.folder}: give the folder "
                              "`edgewise cloud keys init` wrote the root keys to")
        return [load_signer(p) for p in files]

    def add(self, signer: CryptoSigner) -> Path:
        path = self.folder / f"root-{signer.public_key.keyid[:12]}.key"
        save_signer(path, signer)
        return path

    def retire(self, keyid: str) -> Path:
        """Rename a root key no longer in the root to ``retired-root-...`` (kept, not used)."""
        path = self.folder / f"root-{keyid[:12]}.key"
        target = self.folder / f"retired-{path.name}"
        os.replace(path, target)
        return target

    def save_root(self, version: int, data: bytes) -> Path:
        path = self.folder / f"{version}.root.json"
        write_atomic(path, data, mode=0o644)
        return path
