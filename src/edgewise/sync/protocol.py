"""The edge↔cloud session protocol: message types and their validation (docs/decisions/0004).

Every message is one msgpack map in one binary WebSocket frame, with its type under ``"t"``.
`encode` packs a message; `decode` unpacks and validates one, raising `PeerError` with a reason
for anything malformed, so both sides reject garbage the same way.
"""

from __future__ import annotations

from typing import Any

import msgpack

from edgewise.errors import PeerError

MAX_FRAME_BYTES = 4 * 1024 * 1024
SESSION_PATH = "/v1/device/session"

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


def encode(msg: dict[str, Any]) -> bytes:
    """Pack one message; the caller builds it with the fields `_SCHEMA` names."""
    if msg.get("t") not in _SCHEMA:
        raise ValueError(f"unknown message type {msg.get('t')!r}")
    return msgpack.packb(msg, use_bin_type=True)


def decode(frame: bytes) -> dict[str, Any]:
    """Unpack and validate one frame. Raises `PeerError` saying what is wrong."""
    if len(frame) > MAX_FRAME_BYTES:
        raise PeerError(f"frame of {len(frame)} bytes is over the {MAX_FRAME_BYTES} byte limit")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME_BYTES)
    except Exception as exc:
        raise PeerError(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(msg, dict):
        raise PeerError(f"a message must be a map, got {type(msg).__name__}")
    kind = msg.get("t")
    schema = _SCHEMA.get(kind)  # type: ignore[arg-type]
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
    if kind in (BATCH, GAP) and (msg["seq"] < 0 or msg["count"] <= 0):
        raise PeerError(f"{kind} with seq={msg['seq']} count={msg['count']}: both must be "
                        "non-negative and count positive")
    if kind == BATCH and (
        msg["records"] < 0 or (not msg["compacted"] and msg["records"] != msg["count"])
    ):
        raise PeerError(f"batch {msg['id']} has {msg['records']} records for "
                        f"{msg['count']} sequence numbers")
    return msg


def is_control(msg: dict[str, Any]) -> bool:
    return msg.get("t") in CONTROL
