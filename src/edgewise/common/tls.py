"""One process-wide setting of asyncio's TLS: the read buffer of each connection.

asyncio's TLS protocol (``asyncio.sslproto.SSLProtocol``, Python 3.11) reads with a buffer of
``max_size`` bytes per connection, 256 KiB by default, allocated zero-filled and so resident
for as long as the connection lives: most of the memory of an idle device session on the
control plane (measured: 296 KB traced per session, 56 KB with 16 KiB; benchmarks/
session_memory.py). A TLS record holds at most 16 KiB of data, so reading 16 KiB at a time
loses nothing but a few more read calls on bulk transfers. `lean_read_buffer` sets it for
every TLS connection of the process (the control plane, the fleet simulator); without the
attribute (another Python) it does nothing.
"""

from __future__ import annotations

import asyncio.sslproto

READ_BUFFER = 16 * 1024  # bytes: one TLS record at most


def lean_read_buffer(size: int | None = None) -> bool:
    """Set the read buffer of every TLS connection this process makes or accepts from now on
    (default `READ_BUFFER`, read at the call); False when this Python's asyncio has no such
    setting."""
    proto = asyncio.sslproto.SSLProtocol
    if not hasattr(proto, "max_size"):
        return False
    proto.max_size = size or READ_BUFFER
    return True
