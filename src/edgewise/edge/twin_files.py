"""The twin's files in ``DATA/twin/``, read and written here: ``desired.msgpack`` (the applied
desired state: pipelines and config, which may hold credentials) and ``reported.msgpack``
(setpoints, the clock, the audit trail); `damaged_files` for ``agent status``.

**Encrypted at rest** when the twin has a cipher (the agent's with ``--tpm``: the outbox's
AES-256-GCM key, sealed by the TPM, `edgewise.edge.tpm_node.start`): a file is then `MAGIC`
followed by the sealed msgpack (`edgewise.security.payload`), with the file's name as associated
data, so the two files cannot be swapped, and a copy is unreadable without that TPM. A plain
file (written before ``--tpm`` was turned on) is still read, and written encrypted from then on.
Without a cipher the files are plain msgpack, as before. ``agent status`` (no TPM at hand)
cannot check an encrypted file and does not call it damaged.
"""

from __future__ import annotations

from pathlib import Path

import msgpack

from edgewise.common.files import write_atomic
from edgewise.edge.damaged import DamagedFile, reason
from edgewise.errors import PeerError, StorageError
from edgewise.security.payload import PayloadCipher, PayloadUnreadable
from edgewise.sync import twin_state
from edgewise.sync.hlc import HLC
from edgewise.sync.merge import AuditRecord, LwwMap
from edgewise.sync.twin_state import DesiredState

DESIRED_FILE = "desired.msgpack"
REPORTED_FILE = "reported.msgpack"
REPORTED_FORMAT = 1
MAGIC = b"EWTWINE1"  # an encrypted twin file (msgpack never starts with these bytes)


def seal(data: bytes, cipher: PayloadCipher | None, path: Path) -> bytes:
    """``data`` as written to ``path``: encrypted when there is a cipher."""
    return data if cipher is None else MAGIC + cipher.seal(data, path.name.encode())


def read(path: Path, cipher: PayloadCipher | None) -> bytes | None:
    """The plain bytes of ``path`` (None if it does not exist). `PayloadUnreadable` (a
    `StorageError`) for an encrypted file without the key or with another one."""
    raw = twin_state.load(path)
    if raw is None or not raw.startswith(MAGIC):
        return raw
    if cipher is None:
        raise PayloadUnreadable(f"{path} is encrypted: the agent reads it with the key its "
                                "TPM seals (start it with --tpm)")
    try:
        return cipher.open(raw[len(MAGIC):], path.name.encode())
    except PayloadUnreadable as exc:
        raise PayloadUnreadable(f"{path}: {exc}") from None


def load_desired(path: Path, cipher: PayloadCipher | None) -> DesiredState | None:
    raw = read(path, cipher)
    return None if raw is None else twin_state.parse_desired(raw, path)


def save_desired(path: Path, state: DesiredState, cipher: PayloadCipher | None) -> None:
    write_atomic(path, seal(twin_state.desired_bytes(state), cipher, path), mode=0o600)


def read_reported(path: Path, raw: bytes) -> tuple[LwwMap, HLC, list[AuditRecord]]:
    """Setpoints, clock and audit trail of a ``reported.msgpack``; `DamagedFile` if it does not
    hold them: the setpoints written on site are the operator's, so the operator decides."""
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        if not isinstance(data, dict) or data.get("format") != REPORTED_FORMAT:
            raise PeerError("not a reported-state file")
        return (LwwMap.from_wire(data["setpoints"]), HLC.from_tuple(data["clock"]),
                [AuditRecord.from_wire(a) for a in data.get("audit", [])])
    except (PeerError, KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise DamagedFile(path, reason(exc, raw), "restore it from a backup, or remove it to "
                          "start with the control plane's setpoints (setpoints written on "
                          "site that it has not heard of are lost)") from None


def damaged_files(state_dir: Path) -> list[DamagedFile]:
    """The twin's files that are present but damaged; reads only (for `agent status`). An
    encrypted file is not checked (the key is in the TPM)."""
    out = []
    desired, reported = state_dir / DESIRED_FILE, state_dir / REPORTED_FILE
    try:
        raw = twin_state.load(desired)
        if raw is not None and not raw.startswith(MAGIC):
            twin_state.parse_desired(raw, desired)
    except StorageError as exc:
        if not isinstance(exc.__cause__, OSError):
            out.append(DamagedFile(desired, reason(exc.__cause__, peek(desired)),
                                   "the agent moves it aside when it starts and pulls the "
                                   "desired state from the control plane again"))
    try:
        raw = twin_state.load(reported)
        if raw is not None and not raw.startswith(MAGIC):
            read_reported(reported, raw)
    except DamagedFile as exc:
        out.append(exc)
    except StorageError:
        pass  # not readable by this user: not known to be damaged
    return out


def peek(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
