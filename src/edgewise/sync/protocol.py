"""The edge↔cloud session protocol: message types and their validation (docs/decisions/0004).

Every message is one msgpack map in one binary WebSocket frame, with its type under ``"t"``.
`encode` packs a message; `decode` unpacks and validates one, raising `PeerError` with a reason
for anything malformed, so both sides reject garbage the same way.

Decoding a frame is cheap by construction, whatever it holds (about 10 ms at worst), so both
sides do it on their event loop: a frame is at most `MAX_FRAME_BYTES`; everything but a
batch's ``payload`` binary is at most `MAX_FIELDS_BYTES` (measured with msgpack's ``skip``,
which builds nothing); unpacking it may build at most `MAX_FRAME_OBJECTS` lists, maps and
items (`edgewise.sync.bounded.Budget`), with the garbage collector paused meanwhile.
Sequence numbers must fit the store's signed 64-bit integers: ``0 <= seq`` and
``seq + count <= MAX_SEQ``; a batch has at most ``count`` records.

**Push jitter.** ``desired`` may carry ``jitter_s`` (a number, 0 to `MAX_JITTER_S`): the node
waits a uniformly random part of it before it fetches the new version, so a push to many nodes
does not make them all fetch at once.

**Inline desired state.** ``desired`` may carry the stored state itself under ``state`` (the
`twin_state.DesiredState` wire map of that ``version``) when it is small (at most
`MAX_INLINE_STATE_BYTES` packed): a node that takes it applies it as if it had fetched it,
with no fetch (a new TLS connection and a request each, which bound a push to a whole fleet).
A node that does not take it (or finds it malformed) fetches as before.

**Decommission.** ``revoked`` may carry ``decommissioned`` and ``wipe`` (booleans; absent means
false): the node was decommissioned, and with ``wipe`` it must delete its keys and data. A
revoked node that connects later hears the same on its refused request: the 403 answer carries
the header `DECOMMISSIONED_HEADER` (``wipe`` or ``keep``), read with `decommission_order`.
Both come only over TLS that the node verified against its pinned CA (docs/security.md,
"Decommissioning").
"""

from __future__ import annotations

from typing import Any

import msgpack

from edgewise.errors import PeerError
from edgewise.sync.bounded import Budget, BudgetExceeded, no_gc

MAX_FRAME_BYTES = 4 * 1024 * 1024
MAX_FIELDS_BYTES = 1024 * 1024  # a frame without its batch payload
MAX_FRAME_OBJECTS = 65_536  # lists, maps and their items in one frame
MAX_FIELDS = 32  # entries of a message's map
MAX_SEQ = 2**63 - 1  # the store keeps sequence numbers as signed 64-bit integers
SESSION_PATH = "/v1/device/session"
DECOMMISSIONED_HEADER = "Edgewise-Decommissioned"  # on a 403 to a decommissioned node

# node -> cloud
HELLO, BATCH, GAP, REPORT, HEARTBEAT = "hello", "batch", "gap", "report", "heartbeat"
# cloud -> node
WELCOME, ACK, REFUSE, DESIRED, REVOKED, ERROR = (
    "welcome", "ack", "refuse", "desired", "revoked", "error",
)
CONTROL = frozenset({HELLO, REPORT, HEARTBEAT, WELCOME, ACK, REFUSE, DESIRED, REVOKED, ERROR})
DATA = frozenset({BATCH, GAP})

# required fields and their types per message type
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    HELLO: {"agent": str, "streams": dict, "applied_version": int},
    BATCH: {"id": int, "stream": str, "seq": int, "count": int, "records": int,
            "compacted": bool, "payload": bytes},
    GAP: {"stream": str, "seq": int, "count": int, "reason": str},
    REPORT: {"report": dict},
    HEARTBEAT: {"ts": (int, float)},
    WELCOME: {"node_id": str, "streams": dict, "desired_version": int},
    ACK: {"ids": list},
    REFUSE: {"id": int, "reason": str},
    DESIRED: {"version": int},
    REVOKED: {"reason": str},
    ERROR: {"reason": str},
}
# fields a message may carry besides the required ones, and their types
_OPTIONAL: dict[str, dict[str, type | tuple[type, ...]]] = {
    REVOKED: {"decommissioned": bool, "wipe": bool},
    DESIRED: {"jitter_s": (int, float), "state": dict},
    HEARTBEAT: {"health": dict},  # sync.health.NodeHealth, checked by the control plane
}
MAX_JITTER_S = 60.0  # a desired poke's fetch jitter hint, at most
MAX_INLINE_STATE_BYTES = 16 * 1024  # a desired state sent inline in its poke, packed, at most


def decommission_order(header: str | None) -> tuple[bool, bool]:
    """(decommissioned, wipe) from the `DECOMMISSIONED_HEADER` of a 403 answer (None: absent).
    Anything but ``wipe`` or ``keep`` is not an order: (False, False)."""
    if header is None:
        return False, False
    value = header.strip().lower()
    return value in ("wipe", "keep"), value == "wipe"


def encode(msg: dict[str, Any]) -> bytes:
    """Pack one message; the caller builds it with the fields `_SCHEMA` names."""
    if msg.get("t") not in _SCHEMA:
        raise ValueError(f"unknown message type {msg.get('t')!r}")
    return msgpack.packb(msg, use_bin_type=True)


def _payload_bytes(frame: bytes) -> int:
    """The size of the top-level ``payload`` binary of a map frame (0 if there is none),
    measured without building anything but the keys."""
    u = msgpack.Unpacker(raw=False, max_buffer_size=len(frame), max_str_len=64, max_bin_len=0,
                         max_array_len=0, max_map_len=0, max_ext_len=0)
    u.feed(frame)
    size = 0
    entries = u.read_map_header()
    if entries > MAX_FIELDS:
        raise ValueError(f"{entries} fields")
    for _ in range(entries):
        key = u.unpack()
        start = u.tell()
        u.skip()
        if key == "payload" and frame[start] in (0xC4, 0xC5, 0xC6):
            size = u.tell() - start
    return size


def decode(frame: bytes) -> dict[str, Any]:
    """Unpack and validate one frame. Raises `PeerError` saying what is wrong."""
    if len(frame) > MAX_FRAME_BYTES:
        raise PeerError(f"frame of {len(frame)} bytes is over the {MAX_FRAME_BYTES} byte limit")
    if len(frame) > MAX_FIELDS_BYTES:  # else its fields cannot be over: no need to measure
        try:
            fields = len(frame) - _payload_bytes(frame)
        except Exception:  # not a map, or broken: the unpacking below says which
            fields = len(frame)
        if fields > MAX_FIELDS_BYTES:
            raise PeerError(f"frame holds {fields} bytes besides a batch payload; at most "
                            f"{MAX_FIELDS_BYTES} are allowed")
    budget = Budget(MAX_FRAME_OBJECTS, "lists, maps and items in one frame")
    try:
        with no_gc():
            msg = msgpack.unpackb(
                frame, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME_BYTES,
                max_str_len=MAX_FIELDS_BYTES, max_array_len=MAX_FRAME_OBJECTS,
                max_map_len=MAX_FRAME_OBJECTS, max_ext_len=0,
                list_hook=budget.list_hook, object_hook=budget.map_hook)
    except BudgetExceeded as exc:
        raise PeerError(f"frame holds {exc}") from None
    except Exception as exc:
        raise PeerError(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(msg, dict):
        raise PeerError(f"a message must be a map, got {type(msg).__name__}")
    kind = msg.get("t")
    schema = _SCHEMA.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise PeerError(f"unknown message type {kind!r}")
    for name, typ in schema.items():
        if name not in msg:
            raise PeerError(f"{kind} message without {name!r}")
        value = msg[name]
        if isinstance(value, bool) and typ is int:
            raise PeerError(f"{kind}.{name} must be an integer, got a bool")
        if not isinstance(value, typ):
            want = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise PeerError(f"{kind}.{name} must be {want}, got {type(value).__name__}")
    for name, typ in _OPTIONAL.get(kind, {}).items():
        if name in msg and (not isinstance(msg[name], typ) or (isinstance(msg[name], bool)
                            and typ is not bool)):
            want = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise PeerError(f"{kind}.{name} must be {want}, "
                            f"got {type(msg[name]).__name__}")
    if kind == DESIRED and "jitter_s" in msg and not 0 <= msg["jitter_s"] <= MAX_JITTER_S:
        raise PeerError(f"desired.jitter_s must be 0-{MAX_JITTER_S:g} s, got {msg['jitter_s']}")
    if kind in (BATCH, GAP) and not (
            msg["seq"] >= 0 and msg["count"] > 0 and msg["seq"] + msg["count"] <= MAX_SEQ):
        raise PeerError(f"{kind} with seq={msg['seq']} count={msg['count']}: seq must be "
                        f"non-negative, count positive and seq + count at most {MAX_SEQ}")
    if kind == BATCH and (
        not 0 <= msg["records"] <= msg["count"]
        or (not msg["compacted"] and msg["records"] != msg["count"])
    ):
        raise PeerError(f"batch {msg['id']} has {msg['records']} records for "
                        f"{msg['count']} sequence numbers")
    return msg


def is_control(msg: dict[str, Any]) -> bool:
    return msg.get("t") in CONTROL
