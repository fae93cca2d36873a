"""Wire byte counting for the uplink: TCP payload bytes of the session socket.

Reads ``tcpi_bytes_acked`` / ``tcpi_bytes_received`` from the kernel's ``TCP_INFO`` (Linux);
elsewhere the counts are unavailable. `WireMeter` sums them over every session of the process.
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any

_TCPI_BYTES_ACKED = 120  # offsets in struct tcp_info (Linux >= 4.1)
_TCPI_BYTES_RECEIVED = 128
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None


def tcp_bytes(sock: Any) -> tuple[int, int] | None:
    """(payload bytes sent and acknowledged, payload bytes received) of a TCP socket."""
    if _TCP_INFO is None or sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 256)
    except (OSError, ValueError):
        return None
    if len(info) < _TCPI_BYTES_RECEIVED + 8:
        return None
    acked, received = struct.unpack_from("=QQ", info, _TCPI_BYTES_ACKED)
    return max(acked - 1, 0), received  # bytes_acked counts the SYN


class WireMeter:
    """Bytes on the wire over every session of this process (see the module docstring)."""

    def __init__(self) -> None:
        self.available = _TCP_INFO is not None
        self._closed = (0, 0)
        self._current = (0, 0)
        self._sock: Any = None

    def attach(self, sock: Any) -> None:
        self._sock = sock
        self._current = (0, 0)
        self.sample()

    def sample(self) -> None:
        got = tcp_bytes(self._sock)
        if got is not None:
            self._current = got

    def detach(self) -> None:
        self.sample()
        self._closed = (self._closed[0] + self._current[0], self._closed[1] + self._current[1])
        self._current = (0, 0)
        self._sock = None

    @property
    def sent(self) -> int:
        return self._closed[0] + self._current[0]

    @property
    def received(self) -> int:
        return self._closed[1] + self._current[1]
