"""Measured launch: what the agent extends into a PCR before it runs code, and the event log.

Before the agent starts its engine it measures two things into one PCR (`DEFAULT_PCR` 16,
configurable; 16 is the debug PCR swtpm and most TPMs offer to software, 23 the other
application PCR):

* ``agent``: `agent_code_digest`, the sha256 over the agent's own installed code (every file
  of the ``edgewise`` package, by relative path and content);
* ``release``: the sha256 of the active release's manifest bytes (what the control plane
  records as the release's digest).

An event is extended as ``sha256("edgewise <kind>\\0" + digest)``, so a digest measured as one
kind cannot be replayed as another. Each event is also appended to the event log
(`MeasurementLog`, one JSON line per event), which the verifier replays to explain the PCR's
value (`replay`). The log is not trusted: it only says what the PCR should be; the quote says
what it is.

A PCR is reset only when the TPM restarts (power cycle); an agent restarted in between extends
again and appends to the same log, so the log is kept next to the node's identity and started
afresh when the PCR reads all zeros.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from edgewise.errors import PeerError, StorageError

DEFAULT_PCR = 16
KINDS = ("agent", "release")
MAX_EVENTS = 256  # events in one log (a log that long is refused by the verifier)
MAX_LOG_BYTES = 64 << 10
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Event:
    pcr: int
    kind: str
    digest: str  # hex sha256

    def extend_value(self) -> bytes:
        return hashlib.sha256(
            b"edgewise " + self.kind.encode() + b"\0" + bytes.fromhex(self.digest)).digest()

    def to_json(self) -> dict[str, object]:
        return {"pcr": self.pcr, "kind": self.kind, "digest": self.digest}

    @classmethod
    def from_json(cls, data: object) -> Event:
        if not isinstance(data, dict) or set(data) != {"pcr", "kind", "digest"}:
            raise PeerError("event log: an event is {pcr, kind, digest}")
        pcr, kind, digest = data["pcr"], data["kind"], data["digest"]
        if not isinstance(pcr, int) or isinstance(pcr, bool) or not 0 <= pcr <= 23:
            raise PeerError("event log: pcr must be 0 to 23")
        if kind not in KINDS:
            raise PeerError(f"event log: kind must be one of {', '.join(KINDS)}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise PeerError("event log: digest must be 64 lower-case hex characters")
        return cls(pcr, kind, digest)


def events_from_json(data: object) -> list[Event]:
    """A peer's event log (a JSON list), bounded before anything is built from it."""
    if not isinstance(data, list) or len(data) > MAX_EVENTS:
        raise PeerError(f"event log: expected a list of at most {MAX_EVENTS} events")
    return [Event.from_json(e) for e in data]


def replay(events: Iterable[Event], pcrs: Iterable[int]) -> dict[int, bytes]:
    """The values ``pcrs`` must hold after ``events``, from all zeros."""
    values = {p: bytes(32) for p in pcrs}
    for event in events:
        if event.pcr in values:
            values[event.pcr] = hashlib.sha256(values[event.pcr] + event.extend_value()).digest()
    return values


def agent_code_digest(root: str | os.PathLike[str] | None = None) -> str:
    """sha256 hex over the installed ``edgewise`` package: every file but bytecode caches,
    by relative path (sorted) and content."""
    base = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    outer = hashlib.sha256()
    for path in sorted(p for p in base.rglob("*") if p.is_file()
                       and "__pycache__" not in p.parts and p.suffix != ".pyc"):
        rel = path.relative_to(base).as_posix().encode()
        outer.update(len(rel).to_bytes(4, "big") + rel)
        outer.update(hashlib.sha256(path.read_bytes()).digest())
    return outer.hexdigest()


class MeasurementLog:
    """The node's event log file: one JSON event a line, appended with fsync."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def events(self) -> list[Event]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        if len(data) > MAX_LOG_BYTES:
            raise StorageError(f"{self.path} is over {MAX_LOG_BYTES} bytes")
        try:
            return [Event.from_json(orjson.loads(line)) for line in data.splitlines() if line]
        except (orjson.JSONDecodeError, PeerError) as exc:
            raise StorageError(f"{self.path} is damaged ({exc})") from None

    def append(self, event: Event) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(orjson.dumps(event.to_json()) + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


def measure_launch(tpm: object, log: MeasurementLog, *, agent: str, release: str | None,
                   pcr: int = DEFAULT_PCR) -> list[Event]:
    """Extend ``pcr`` with the agent's and the active release's digests (hex) and log them.

    ``tpm`` is an `edgewise.security.tpm.Tpm` (typed loosely: this module imports no
    tpm2-pytss). A PCR that reads all zeros starts a fresh log. Returns the events added."""
    if tpm.read_pcrs([pcr])[pcr] == bytes(32):  # type: ignore[attr-defined]
        log.reset()
    added = [Event(pcr, "agent", agent)]
    if release is not None:
        added.append(Event(pcr, "release", release))
    for event in added:
        log.append(event)  # logged first: a PCR never holds what the log does not explain
        tpm.extend(pcr, event.extend_value())  # type: ignore[attr-defined]
    return added
