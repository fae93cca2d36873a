"""A virtual node's link: the end of a session (`LinkDown`), reading one message, and a failure
as one stable line for the counts (`edgewise.testbed.fleet.node`)."""

from __future__ import annotations

from typing import Any

import aiohttp

from edgewise.edge.device_http import describe_network_error
from edgewise.errors import ConfigError, PeerError, TransportError
from edgewise.sync import protocol

__all__ = ["LinkDown", "receive", "short"]


class LinkDown(Exception):
    """The session ended (closed, refused, timed out); the node reconnects."""

    retry_after: float | None = None  # a 429's Retry-After: the node waits at least that


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float
                  ) -> dict[str, Any] | None:
    """The next message; None when ``timeout`` passed first. Raises `LinkDown` when the
    session is over, `PeerError` for a malformed frame."""
    try:
        msg = await ws.receive(timeout=timeout)
    except TimeoutError:
        return None
    if msg.type == aiohttp.WSMsgType.BINARY:
        return protocol.decode(msg.data)
    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING):
        raise LinkDown(f"closed by the control plane ({ws.close_code})")
    if msg.type == aiohttp.WSMsgType.ERROR:
        raise LinkDown(f"transport: {type(ws.exception()).__name__}")
    raise LinkDown(f"unexpected {msg.type.name} frame")


def short(exc: BaseException) -> str:
    """One stable line (no object addresses, so equal failures count together)."""
    if isinstance(exc, TransportError | PeerError | ConfigError):
        text = str(exc) or type(exc).__name__
    else:
        text = describe_network_error(exc)
    return text[:100]
