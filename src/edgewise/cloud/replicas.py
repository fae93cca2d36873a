"""What the control-plane processes sharing one PostgreSQL database tell each other (issue 11,
scale-out): `ReplicaBus`, over the database's LISTEN/NOTIFY (`store.notify.Channel`).

A node's session lives in one process (`cloud serve --processes N` shares one port with
SO_REUSEPORT, so a node reaches any of them; so do replicas on several machines behind one
name). What one process does for a node whose session another process holds goes over the
bus, as small JSON notifications:

* **pokes** (``poke``): desired versions stored here for nodes not connected here
  (`pokes.PokeFanout` hands them over). The process holding a node's session reads the stored
  states of its own nodes in one query and pokes them, inline when small, as if the write had
  been its own. Coalesced per turn, one notification per about 100 nodes.
* **one session per node** (``open``): each process says which nodes opened a session with it,
  and when (the wall clock: processes on several machines need synchronised clocks). A
  process holding an older session of such a node closes it as ``replaced``. Ingest stays
  exactly-once whatever the timing: chunks are keyed by node, stream and sequence.
* **revocations and decommissions** (``revoke``) and **quarantines** (``quarantine``) reach
  the other processes at once (their maintenance round would see them within 30 s anyway).

A process that was disconnected from the database missed what was said meanwhile: the bus
reconnects with backoff, and its maintenance round still reloads revocations and quarantines
every 30 s; a missed poke leaves the node to learn its version at its next session (counted:
``lost``). Outgoing messages wait in a bounded queue (`MAX_QUEUED` messages and session
opens, `MAX_POKE_NODES` nodes with a poke; beyond, dropped and counted).
Re-authentication nonces are shared through the store itself (`Store.issue_nonce`).
Incoming payloads are checked (types, sizes) before use; a malformed one is counted and
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from edgewise.cloud.store.notify import MAX_PAYLOAD, Channel
from edgewise.common.backoff import Backoff, Retry
from edgewise.errors import StorageError

log = logging.getLogger(__name__)

MAX_QUEUED = 10_000  # notifications and session opens waiting to be sent
# nodes with a poke waiting to be sent (coalesced: one entry per node and jitter). A push to
# the whole fleet hands over every node held elsewhere at once: under the 10,000 above, a
# push to 30,000 nodes over two processes lost all 15,016 pokes for the other process
MAX_POKE_NODES = 500_000
GATHER = 0.02  # s the sender waits for more of the same kind before it packs a turn
MAX_NODE_ID = 128  # characters; node ids are far shorter


class Handlers:
    """What a process does with what the others say; the app plugs its parts in."""

    poke: Callable[[dict[str, int], float], Awaitable[None]] | None = None
    opened: Callable[[dict[str, float]], None] | None = None
    revoke: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    quarantine: Callable[[str, bool], None] | None = None


def _pack(kind: str, key: str, items: Iterable[tuple[str, Any]],
          extra: Mapping[str, Any] | None = None) -> list[str]:
    """``items`` as few payloads of ``{"k": kind, key: {...}, **extra}`` as fit."""
    out: list[str] = []
    head = json.dumps({"k": kind, **(extra or {}), key: {}}, separators=(",", ":"))
    part: list[str] = []
    size = len(head)
    for name, value in items:
        entry = json.dumps(name) + ":" + json.dumps(value)
        if part and size + len(entry) + 1 > MAX_PAYLOAD:
            out.append(head[:-3] + "{" + ",".join(part) + "}}")
            part, size = [], len(head)
        part.append(entry)
        size += len(entry) + 1
    if part:
        out.append(head[:-3] + "{" + ",".join(part) + "}}")
    return out


class ReplicaBus:
    """The bus of this process; see the module docstring. ``run`` is its task."""

    def __init__(self, url: str, handlers: Handlers, *,
                 backoff: Backoff | None = None) -> None:
        self.handlers = handlers
        self.channel = Channel(url, self._received)
        self.retry = Retry(backoff or Backoff(0.5, 10.0))
        self.sent = 0  # notifications sent
        self.received = 0  # notifications from other processes, handled
        self.malformed = 0  # notifications dropped: not what a replica sends
        self.dropped = 0  # messages not queued: the queue was full
        self.lost = 0  # messages not sent: the connection failed under them
        self._pokes: dict[float, dict[str, int]] = {}  # jitter -> node -> version
        self._opened: dict[str, float] = {}
        self._queue: deque[str] = deque()
        self._ready = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- outgoing ---------------------------------------------------------------------------
    def _room(self, n: int = 1) -> bool:
        if len(self._queue) + len(self._opened) + n > MAX_QUEUED:
            self.dropped += n
            return False
        return True

    def poke(self, versions: Mapping[str, int], jitter: float) -> None:
        """Desired versions stored here for nodes not connected here."""
        if not versions:
            return
        if sum(map(len, self._pokes.values())) + len(versions) > MAX_POKE_NODES:
            self.dropped += len(versions)
            return
        pending = self._pokes.setdefault(round(jitter, 3), {})
        for node, version in versions.items():
            if pending.get(node, -1) < version:
                pending[node] = version
        self._ready.set()

    def opened(self, node_id: str, at: float | None = None) -> None:
        """A session of ``node_id`` opened here (wall clock ``at``)."""
        if node_id not in self._opened and not self._room():
            return
        self._opened[node_id] = time.time() if at is None else at
        self._ready.set()

    def revoked(self, node_id: str, reason: str, *, serial: int, fingerprint: str,
                decommissioned: bool = False, wipe: bool = False) -> None:
        self._put({"k": "revoke", "n": node_id, "reason": reason, "serial": f"{serial:x}",
                   "fp": fingerprint, "d": decommissioned, "w": wipe})

    def quarantined(self, node_id: str, quarantined: bool) -> None:
        self._put({"k": "quarantine", "n": node_id, "q": quarantined})

    def _put(self, message: dict[str, Any]) -> None:
        if self._room():
            self._queue.append(json.dumps(message, separators=(",", ":")))
            self._ready.set()

    def _turn(self) -> list[str]:
        """Everything pending, packed into payloads."""
        out = list(self._queue)
        self._queue.clear()
        if self._opened:
            opened, self._opened = self._opened, {}
            out += _pack("open", "s", ((n, round(t, 6)) for n, t in opened.items()))
        pokes, self._pokes = self._pokes, {}
        for jitter, versions in pokes.items():
            out += _pack("poke", "v", versions.items(), {"j": jitter})
        return out

    # -- incoming ---------------------------------------------------------------------------
    def _received(self, payload: str) -> None:
        try:
            msg = json.loads(payload)
            kind = msg["k"]
            if kind == "poke":
                versions = _node_map(msg["v"], int)
                jitter = float(msg["j"])
                if self.handlers.poke is not None and 0 <= jitter <= 3600:
                    self._spawn(self.handlers.poke(versions, jitter))
            elif kind == "open":
                opened = _node_map(msg["s"], float)
                if self.handlers.opened is not None:
                    self.handlers.opened(opened)
            elif kind == "revoke":
                for key, typ in (("n", str), ("reason", str), ("serial", str), ("fp", str),
                                 ("d", bool), ("w", bool)):
                    if not isinstance(msg[key], typ):
                        raise TypeError(key)
                msg["serial"] = int(msg["serial"], 16)
                if self.handlers.revoke is not None:
                    self._spawn(self.handlers.revoke(msg))
            elif kind == "quarantine":
                if not isinstance(msg["n"], str) or not isinstance(msg["q"], bool):
                    raise TypeError("quarantine")
                if self.handlers.quarantine is not None:
                    self.handlers.quarantine(msg["n"], msg["q"])
            else:
                raise KeyError(kind)
        except (ValueError, KeyError, TypeError) as exc:
            self.malformed += 1
            log.debug("replica notification dropped (%r): %.200s", exc, payload)
            return
        self.received += 1

    def _spawn(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except StorageError as exc:
                log.warning("replica notification not handled: %s", exc)

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the task -------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, listen and send until cancelled; reconnect with backoff."""
        try:
            while True:
                try:
                    await self.channel.connect()
                except StorageError as exc:
                    delay = self.retry.failed()
                    log.warning("replica bus: %s; again in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                self.retry.connected()
                log.info("replica bus: listening")
                try:
                    await self._send_until_lost()
                except StorageError as exc:
                    log.warning("replica bus: %s", exc)
                await self.channel.close()
                await asyncio.sleep(self.retry.failed())
        finally:
            await self.channel.close()
            for task in list(self._tasks):
                task.cancel()

    async def _send_until_lost(self) -> None:
        lost = asyncio.ensure_future(self.channel.lost.wait())
        try:
            while True:
                ready = asyncio.ensure_future(self._ready.wait())
                done, _ = await asyncio.wait({ready, lost},
                                             return_when=asyncio.FIRST_COMPLETED)
                if lost in done:
                    ready.cancel()
                    raise StorageError("the notification connection was lost")
                await asyncio.sleep(GATHER)
                self._ready.clear()
                payloads = self._turn()
                for i, payload in enumerate(payloads):
                    try:
                        await self.channel.send(payload)
                    except StorageError:
                        self.lost += len(payloads) - i
                        raise
                    self.sent += 1
        finally:
            lost.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lost


def _node_map(value: Any, typ: type) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError("not a map")
    out: dict[str, Any] = {}
    for node, v in value.items():
        if len(node) > MAX_NODE_ID or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("bad entry")
        out[node] = typ(v)
    return out
