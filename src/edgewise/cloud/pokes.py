"""Desired-state pokes to live sessions, sent from one fan-out task (issue 11, pushes).

A selector ``config set`` stores the next desired version of every node it targets in one
bulk store operation (`Store.update_desired_states`); the pokes ("desired version v is
stored: fetch it") then go out from here, not inside the HTTP call:

* **coalesced.** Pending pokes are one map node -> newest version: a node poked twice before
  the task reaches it hears only the newer version (it fetches the newest anyway).
* **fan-out.** `PokeFanout.run` sends at most ``per_turn`` pokes, then yields to the event loop,
  so a push to 10,000 nodes never holds the loop for long.
* **jitter.** A push to many nodes would have them all fetch at once. Each poke carries a
  ``jitter_s`` hint (`sync.protocol`, ``desired``): the node waits a uniformly random part of
  it before it fetches (`edge.twin.Twin.run`). `fetch_jitter` makes it ``nodes / fetch_rate``
  seconds (the fetches the server budgets per second for one push), at most ``max_jitter``,
  and none below 50 ms.
* **inline.** When the caller gives the stored states (`assign` does), a poke carries its node's
  state itself if it is small (`inline_state`: at most `protocol.MAX_INLINE_STATE_BYTES`
  packed), so the node applies it without a fetch: a fetch is a new TLS connection and a
  request, and those, not the pokes, bounded a push to a whole fleet (issue 11: 35.9 s p99 for
  2,000 nodes). The state is packed on this task, not in the HTTP call. Counted: `inlined`.
* **bounded.** At most ``max_pending`` nodes wait for a poke; beyond that a poke is dropped and
  counted (`dropped`): the node still learns the version from its next ``welcome``.
* **other processes.** With ``forward`` set (PostgreSQL: `replicas.ReplicaBus.poke`), the
  versions of nodes not connected here go to the other control-plane processes sharing the
  database, one of which may hold the node's session (counted: `forwarded`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgpack

from edgewise.sync import protocol
from edgewise.sync.twin_state import DesiredState

log = logging.getLogger(__name__)

MIN_JITTER = 0.05  # s; below this a poke carries no jitter hint


class Pokeable(Protocol):
    def poke_desired(self, version: int, jitter: float = 0.0,
                     state: dict[str, Any] | None = None) -> None: ...


def inline_state(state: DesiredState | None) -> dict[str, Any] | None:
    """``state``'s wire map if it is small enough to go in its poke, else None."""
    if state is None:
        return None
    wire = state.to_wire()
    size = len(msgpack.packb(wire, use_bin_type=True))
    return wire if size <= protocol.MAX_INLINE_STATE_BYTES else None


def fetch_jitter(nodes: int, fetch_rate: float, max_jitter: float) -> float:
    """Seconds over which ``nodes`` poked at once should spread their fetches (0: none)."""
    jitter = min(max_jitter, nodes / fetch_rate) if fetch_rate > 0 else 0.0
    return jitter if jitter >= MIN_JITTER else 0.0


class PokeFanout:
    """One task sending coalesced pokes; see the module docstring. ``lookup`` finds the
    node's live session in this process (`SessionRegistry.get`)."""

    def __init__(self, lookup: Callable[[str], Pokeable | None], *, per_turn: int = 500,
                 max_pending: int = 1_000_000,
                 forward: Callable[[dict[str, int], float], None] | None = None) -> None:
        self.lookup = lookup
        self.forward = forward
        self.per_turn = per_turn
        self.max_pending = max_pending
        self.sent = 0  # pokes handed to sessions
        self.coalesced = 0  # pokes replaced by a newer one before they went out
        self.dropped = 0  # pokes not queued: max_pending nodes were waiting already
        self.inlined = 0  # pokes sent with their state inline
        self.forwarded = 0  # pokes handed to the other processes (nodes not connected here)
        # node -> (version, jitter, the stored state of that version if the caller gave it)
        self._pending: dict[str, tuple[int, float, DesiredState | None]] = {}
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._pending)

    def poke(self, versions: Mapping[str, int], jitter: float = 0.0,
             states: Mapping[str, DesiredState] | None = None, *,
             forward: bool = True) -> set[str]:
        """Queue pokes (node -> stored version; ``states``: node -> that stored version, to
        send inline when small); returns the nodes connected here now. The others learn the
        version from their next ``welcome``, or, with ``forward`` and a `forward` hook, from
        the process holding their session."""
        live: set[str] = set()
        away: dict[str, int] = {}
        for node_id, version in versions.items():
            if self.lookup(node_id) is None:
                away[node_id] = version
                continue
            live.add(node_id)
            old = self._pending.get(node_id)
            if old is not None:
                self.coalesced += 1
                if old[0] >= version:
                    continue
            elif len(self._pending) >= self.max_pending:
                self.dropped += 1
                continue
            state = states.get(node_id) if states is not None else None
            if state is not None and state.version != version:
                state = None
            self._pending[node_id] = (version, jitter, state)
        if self._pending:
            self._ready.set()
        if forward and away and self.forward is not None:
            self.forward(away, jitter)
            self.forwarded += len(away)
        return live

    def flush(self, limit: int | None = None) -> int:
        """Send up to ``limit`` pending pokes now (oldest first); how many were sent."""
        n = 0
        while self._pending and (limit is None or n < limit):
            node_id = next(iter(self._pending))
            version, jitter, state = self._pending.pop(node_id)
            session = self.lookup(node_id)
            if session is not None:
                wire = inline_state(state)
                session.poke_desired(version, jitter, wire)
                self.sent += 1
                self.inlined += wire is not None
            n += 1
        return n

    async def run(self) -> None:
        """The fan-out task (the app runs one)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._pending:
                self.flush(self.per_turn)
                await asyncio.sleep(0)
