"""Payloads encrypted at rest: AES-256-GCM under a key sealed to the TPM (or a file key).

`PayloadCipher(key).seal(data, aad)` gives ``version (1 byte) || nonce (12) || ciphertext+tag``;
`open` checks the tag (a modified payload, another key or another ``aad`` raise
`PayloadUnreadable`). A fresh random 96-bit nonce per payload: well inside GCM's limits for the
payloads one key encrypts here (NIST SP 800-38D: 2^32 random nonces per key).

Where the key lives:

* `tpm_key(tpm, path)`: 32 random bytes sealed by the node's TPM (`Tpm.seal`); ``path`` holds
  only the sealed blob, which no other TPM opens: a copied outbox with its key file is
  unreadable elsewhere;
* `file_key(path)`: without a TPM, 32 random bytes in a 0600 file. That protects a stolen
  outbox file alone, not a stolen disk (the key lies next to it), and says so in the docs.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgewise.common.files import write_atomic
from edgewise.errors import StorageError

VERSION = b"\x01"
NONCE_BYTES = 12
KEY_BYTES = 32
OVERHEAD = 1 + NONCE_BYTES + 16  # bytes a sealed payload adds


class PayloadUnreadable(StorageError):
    """A payload does not decrypt: another key, modified, or not encrypted by us."""


class PayloadCipher:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"an outbox key is {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    def seal(self, data: bytes, aad: bytes = b"") -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return VERSION + nonce + self._aead.encrypt(nonce, data, aad)

    def open(self, blob: bytes, aad: bytes = b"") -> bytes:
        if len(blob) < OVERHEAD or blob[:1] != VERSION:
            raise PayloadUnreadable("payload is not encrypted with a known format")
        try:
            return self._aead.decrypt(blob[1:1 + NONCE_BYTES], blob[1 + NONCE_BYTES:], aad)
        except InvalidTag:
            raise PayloadUnreadable("payload does not decrypt with this node's key "
                                    "(another node's, or modified)") from None


def file_key(path: str | os.PathLike[str]) -> bytes:
    """The key in ``path`` (0600), made on first use."""
    target = Path(path)
    try:
        key = target.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(KEY_BYTES)
        write_atomic(target, key, mode=0o600)
        return key
    except OSError as exc:
        raise StorageError(f"cannot read {target}: {exc.strerror or exc}") from None
    if len(key) != KEY_BYTES:
        raise StorageError(f"{target} does not hold a {KEY_BYTES}-byte key")
    return key


def tpm_key(tpm: object, path: str | os.PathLike[str]) -> bytes:
    """The key sealed by ``tpm`` (an `edgewise.security.tpm.Tpm`) in ``path``, made and sealed
    on first use. `TpmError` when this TPM cannot unseal it (another TPM's blob)."""
    from edgewise.security.tpm.device import KeyBlob

    target = Path(path)
    if not target.exists():
        key = secrets.token_bytes(KEY_BYTES)
        tpm.seal(key).save(target)  # type: ignore[attr-defined]
        return key
    key = tpm.unseal(KeyBlob.read(target))  # type: ignore[attr-defined]
    if len(key) != KEY_BYTES:
        raise StorageError(f"{target} does not seal a {KEY_BYTES}-byte key")
    return bytes(key)
