"""PostgreSQL LISTEN/NOTIFY: the channel the control-plane processes sharing one database talk
over (`edgewise.cloud.replicas` says what they say).

`Channel(url, on_message)` holds one connection of its own (asyncpg, outside the store's pool:
a listening connection stays checked out for the life of the process). `connect` opens it and
LISTENs on `CHANNEL`; every notification another process sends arrives at ``on_message`` as
its text payload (this process's own are not delivered back). `send` notifies; a payload is at
most `MAX_PAYLOAD` bytes (PostgreSQL refuses more than 8,000). `lost` is set when the
connection ends; the caller reconnects (`replicas.ReplicaBus.run`). Failures raise
`StorageError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import make_url

from edgewise.errors import StorageError

log = logging.getLogger(__name__)

CHANNEL = "edgewise_replicas"
MAX_PAYLOAD = 7_900  # bytes; PostgreSQL's limit is 8,000
CONNECT_TIMEOUT = 10.0  # s


def listen_dsn(url: str) -> str:
    """The plain ``postgresql://`` DSN asyncpg connects to for a store URL."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise StorageError(f"notifications need PostgreSQL, not {parsed.get_backend_name()}")
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


class Channel:
    """One listening connection; see the module docstring."""

    def __init__(self, url: str, on_message: Callable[[str], None]) -> None:
        self._dsn = listen_dsn(url)
        self._on_message = on_message
        self._conn: Any = None
        self._pid = 0
        self.lost = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self.lost.is_set()

    async def connect(self) -> None:
        import asyncpg

        self.lost.clear()
        try:
            conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageError(f"cannot open the notification connection: {exc}") from None
        try:
            self._pid = conn.get_server_pid()
            conn.add_termination_listener(lambda _c: self.lost.set())
            await conn.add_listener(CHANNEL, self._received)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            conn.terminate()
            raise StorageError(f"cannot LISTEN on {CHANNEL}: {exc}") from None
        self._conn = conn

    def _received(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        if pid == self._pid:  # our own notification
            return
        self._on_message(payload)

    async def send(self, payload: str) -> None:
        """Notify the other processes. Raises `StorageError` (and sets `lost`) if the
        connection failed; `ValueError` for a payload over `MAX_PAYLOAD` bytes."""
        import asyncpg

        if len(payload.encode()) > MAX_PAYLOAD:
            raise ValueError(f"notification payload over {MAX_PAYLOAD} bytes")
        if self._conn is None:
            raise StorageError("the notification connection is not open")
        try:
            await self._conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.lost.set()
            raise StorageError(f"notification not sent: {exc}") from None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=2)
            except Exception:  # closing a broken connection: nothing more to do
                conn.terminate()
