"""The repository side of TUF as pure functions: signed bytes in, signed bytes out.

Nothing here touches disk, network or clock: the caller (the control plane's release store,
the ``edgewise cloud keys`` commands) reads the newest metadata and the keys, passes ``now``,
and stores what comes back. Metadata is python-tuf's Metadata API, serialised compactly; the
repository uses consistent snapshots (``<n>.root.json``, ``<n>.snapshot.json``,
``<n>.targets.json``; only ``timestamp.json`` has no version in its name).

* `new_root` makes root version 1: the root keys (offline) and one online key each for
  targets, snapshot and timestamp.
* `rotate_root` makes the next root version, signed by the current root keys (a threshold of
  them) and by the new ones: new online keys (a compromised one replaced), new root keys, or the
  same keys with a later expiry.
* `publish` signs the next targets (every target given), snapshot and timestamp.
* `refresh` re-signs before expiry: the timestamp when half its lifetime is gone, targets and
  snapshot the same way (`Expiry`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from edgewise.errors import ConfigError, PeerError

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
SPEC_VERSION = "1.0.31"


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata is valid once signed; re-signed when half is gone."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def of(self, role: str) -> timedelta:
        return getattr(self, role)  # type: ignore[no-any-return]

    def due(self, role: str, expires: datetime, now: datetime) -> bool:
        """True when less than half of ``role``'s lifetime is left."""
        return expires - now < self.of(role) / 2


@dataclass(frozen=True)
class TopMetadata:
    """The newest signed bytes of each top-level role (None: not signed yet)."""

    root: bytes
    targets: bytes | None = None
    snapshot: bytes | None = None
    timestamp: bytes | None = None

    def version(self, role: str) -> int:
        data = getattr(self, role)
        return 0 if data is None else Metadata.from_bytes(data).signed.version


def _expires(now: datetime, lifetime: timedelta) -> datetime:
    return (now + lifetime).replace(microsecond=0)


def _sign(md: Metadata, signers: Iterable[Signer]) -> bytes:
    for signer in signers:
        try:
            md.sign(signer, append=True)
        except UnsignedMetadataError as exc:
            raise ConfigError(f"cannot sign {md.signed.type} metadata: {exc}") from None
    return md.to_bytes()


def _parse(data: bytes, role: str) -> Metadata:
    try:
        md = Metadata.from_bytes(data)
    except Exception as exc:  # python-tuf raises DeserializationError or ValueError
        raise PeerError(f"stored {role} metadata is unreadable: {exc}") from None
    if md.signed.type != role:
        raise PeerError(f"stored {role} metadata is {md.signed.type} metadata")
    return md


def new_root(root_signers: Sequence[Signer], online: Mapping[str, Key], *, now: datetime,
             expiry: Expiry | None = None, threshold: int | None = None) -> bytes:
    """Root version 1: ``root_signers`` as the root keys (threshold: all of them unless given),
    ``online`` the targets, snapshot and timestamp keys; signed by every root key."""
    expiry = expiry or Expiry()
    if not root_signers:
        raise ConfigError("a root needs at least one root key")
    threshold = len(root_signers) if threshold is None else threshold
    if not 1 <= threshold <= len(root_signers):
        raise ConfigError(f"root threshold {threshold}: use 1..{len(root_signers)}")
    root = Root(version=1, spec_version=SPEC_VERSION, expires=_expires(now, expiry.root),
                consistent_snapshot=True)
    for signer in root_signers:
        root.add_key(signer.public_key, "root")
    root.roles["root"].threshold = threshold
    _set_online(root, online)
    return _sign(Metadata(root), root_signers)


def _set_online(root: Root, online: Mapping[str, Key]) -> None:
    if set(online) != set(ONLINE_ROLES):
        raise ConfigError(f"online keys needed for {', '.join(ONLINE_ROLES)}")
    for role in ONLINE_ROLES:
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.roles[role] = Role([], 1)
        root.add_key(online[role], role)


def rotate_root(current: bytes, old_signers: Sequence[Signer], *, now: datetime,
                new_root_signers: Sequence[Signer] | None = None,
                online: Mapping[str, Key] | None = None, expiry: Expiry | None = None
                ) -> bytes:
    """The next root version after ``current``.

    ``old_signers`` must meet the current root's threshold (ConfigError otherwise: they are
    not the root keys of this repository). ``new_root_signers`` replace the root keys (None:
    keep them), ``online`` replaces the online keys (None: keep them); the expiry starts again.
    The new root is signed by the old root keys and the new ones, as clients require.
    """
    expiry = expiry or Expiry()
    md = _parse(current, "root")
    root: Root = md.signed
    known = set(root.roles["root"].keyids)
    old_ids = {s.public_key.keyid for s in old_signers}
    if len(known & old_ids) < root.roles["root"].threshold:
        raise ConfigError(
            f"the root keys given sign {len(known & old_ids)} of the "
            f"{root.roles['root'].threshold} signatures root version {root.version} needs: "
            "give the folder with this repository's root keys"
        )
    signers: list[Signer] = [s for s in old_signers if s.public_key.keyid in known]
    new = Root(version=root.version + 1, spec_version=SPEC_VERSION,
               expires=_expires(now, expiry.root), keys=dict(root.keys),
               roles={name: Role(list(r.keyids), r.threshold) for name, r in root.roles.items()},
               consistent_snapshot=root.consistent_snapshot)
    if new_root_signers is not None:
        if not new_root_signers:
            raise ConfigError("a root needs at least one root key")
        for keyid in list(new.roles["root"].keyids):
            new.revoke_key(keyid, "root")
        for signer in new_root_signers:
            new.add_key(signer.public_key, "root")
        new.roles["root"].threshold = min(root.roles["root"].threshold, len(new_root_signers))
        signers += [s for s in new_root_signers if s.public_key.keyid not in old_ids]
    if online is not None:
        _set_online(new, online)
    return _sign(Metadata(new), signers)


def check_online_signers(root_data: bytes, signers: Mapping[str, Signer]) -> None:
    """ConfigError unless every online signer holds the key the root names for its role."""
    root: Root = _parse(root_data, "root").signed
    for role in ONLINE_ROLES:
        signer = signers.get(role)
        if signer is None or signer.public_key.keyid not in root.roles[role].keyids:
            raise ConfigError(
                f"the online {role} key is not the one root version {root.version} names: "
                "rotate the keys (`edgewise cloud keys rotate`) or restore the key files"
            )


def publish(top: TopMetadata, targets: Mapping[str, tuple[int, str]],
            signers: Mapping[str, Signer], *, now: datetime, expiry: Expiry | None = None
            ) -> TopMetadata:
    """The next targets (exactly ``targets``: name → (length, sha256)), snapshot and timestamp,
    each one version above the newest, signed by the online keys."""
    expiry = expiry or Expiry()
    check_online_signers(top.root, signers)
    files = {name: TargetFile(length, {"sha256": sha}, name)
             for name, (length, sha) in sorted(targets.items())}
    tmd = Metadata(Targets(version=top.version("targets") + 1, spec_version=SPEC_VERSION,
                           expires=_expires(now, expiry.targets), targets=files))
    targets_bytes = _sign(tmd, [signers["targets"]])
    return _snapshot_and_timestamp(replace(top, targets=targets_bytes), signers, now, expiry)


def _snapshot_and_timestamp(top: TopMetadata, signers: Mapping[str, Signer], now: datetime,
                            expiry: Expiry) -> TopMetadata:
    assert top.targets is not None  # type narrowing: only called with targets signed
    targets_meta = MetaFile.from_data(top.version("targets"), top.targets, ["sha256"])
    smd = Metadata(Snapshot(version=top.version("snapshot") + 1, spec_version=SPEC_VERSION,
                            expires=_expires(now, expiry.snapshot),
                            meta={"targets.json": targets_meta}))
    snapshot_bytes = _sign(smd, [signers["snapshot"]])
    top = replace(top, snapshot=snapshot_bytes)
    return _timestamp(top, signers, now, expiry)


def _timestamp(top: TopMetadata, signers: Mapping[str, Signer], now: datetime,
               expiry: Expiry) -> TopMetadata:
    assert top.snapshot is not None  # type narrowing: only called with a snapshot signed
    snapshot_meta = MetaFile.from_data(top.version("snapshot"), top.snapshot, ["sha256"])
    tsmd = Metadata(Timestamp(version=top.version("timestamp") + 1, spec_version=SPEC_VERSION,
                              expires=_expires(now, expiry.timestamp),
                              snapshot_meta=snapshot_meta))
    return replace(top, timestamp=_sign(tsmd, [signers["timestamp"]]))


def current_targets(top: TopMetadata) -> dict[str, tuple[int, str]]:
    """The targets the newest targets metadata lists: name → (length, sha256)."""
    if top.targets is None:
        return {}
    signed: Targets = _parse(top.targets, "targets").signed
    return {name: (t.length, t.hashes["sha256"]) for name, t in signed.targets.items()}


def refresh(top: TopMetadata, signers: Mapping[str, Signer], *, now: datetime,
            expiry: Expiry | None = None, force: bool = False) -> TopMetadata | None:
    """Re-signed metadata when something is due (None: nothing is).

    Targets or snapshot due, any role missing, or ``force`` (after a key rotation): targets,
    snapshot and timestamp again, with the same targets. Only the timestamp due: a new
    timestamp.
    """
    expiry = expiry or Expiry()
    missing = top.targets is None or top.snapshot is None or top.timestamp is None
    if force or missing or any(
        expiry.due(role, _parse(getattr(top, role), role).signed.expires, now)
        for role in ("targets", "snapshot")
    ):
        return publish(top, current_targets(top), signers, now=now, expiry=expiry)
    assert top.timestamp is not None  # type narrowing: checked by `missing`
    if expiry.due("timestamp", _parse(top.timestamp, "timestamp").signed.expires, now):
        check_online_signers(top.root, signers)
        return _timestamp(top, signers, now, expiry)
    return None


def root_version(data: bytes) -> int:
    return int(_parse(data, "root").signed.version)


def root_expires(data: bytes) -> datetime:
    return _parse(data, "root").signed.expires  # type: ignore[no-any-return]
