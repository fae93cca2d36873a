"""What the virtual nodes of one simulator process share: the run's settings, the one aiohttp
client session for the WebSockets, the recorder, the stop signal and the events file (JSON lines,
one ``os.write`` each with ``O_APPEND``, so the lines of several processes never mix)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from edgewise.edge.uplink import UplinkConfig
from edgewise.security.tls import client_context
from edgewise.sync import protocol
from edgewise.testbed.fleet.release import Behaviour
from edgewise.testbed.fleet.stats import Recorder


@dataclass(frozen=True)
class NodeSettings:
    """What every virtual node of a run shares."""

    cloud: str  # https://HOST:PORT the nodes connect to (a link proxy, or the control plane)
    ca: Path
    token: str  # a multi-use enrolment token
    telemetry_every: float = 10.0  # s between telemetry batches
    records: int = 5  # readings per batch
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    loss: float = 0.0  # probability that a frame waits one RTO (a lost TCP segment)
    drain_s: float = 30.0  # at the end: time to wait for the last acknowledgements
    fetch_only: bool = False  # ignore a poke's inline state and fetch (as the agent does today)
    tokens: tuple[str, ...] = ()  # more tokens: node i enrols with (token, *tokens)[i % k]
    release: Behaviour = field(default_factory=Behaviour)  # what a node does with a release

    def token_for(self, index: int) -> str:
        """The enrolment token of node ``index`` (several tokens: e.g. one per site)."""
        every = (self.token, *self.tokens)
        return every[index % len(every)]


class Shared:
    """Per process: the settings, the one WebSocket client session (its connections from
    ``source``, a local address, when given), the recorder, the stop signal and the events
    file."""

    def __init__(self, settings: NodeSettings, state_dir: Path, recorder: Recorder,
                 events: Path | None = None, source: str | None = None) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.recorder = recorder
        self.stop = asyncio.Event()
        self.drain_deadline = float("inf")  # loop time after which nodes stop draining
        self.enrol_ctx = client_context(settings.ca)
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True,
                                           local_addr=(source, 0) if source else None),
            timeout=aiohttp.ClientTimeout(total=None,
                                          connect=settings.uplink.connect_timeout_s,
                                          sock_connect=settings.uplink.connect_timeout_s))
        self._events = (os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                        if events is not None else None)
        self.recent_acks: list[float] = []  # ack latencies (ms) since the last acks event
        self.wss = "wss://" + settings.cloud.removeprefix("https://") + protocol.SESSION_PATH

    def event(self, kind: str, index: int, node_id: str | None, **extra: Any) -> None:
        """One line of the events file (one write, O_APPEND: lines of processes never mix)."""
        if self._events is not None:
            line = json.dumps({"t": time.time(), "e": kind, "i": index, "node": node_id,
                               **extra}) + "\n"
            os.write(self._events, line.encode())

    async def ack_events(self, every: float = 5.0) -> None:
        """Every ``every`` s one ``acks`` event with this process's ack latencies since the
        last one (ms, 0.1 ms steps), so a reader can take percentiles over any window."""
        while True:
            await asyncio.sleep(every)
            acks, self.recent_acks = self.recent_acks, []
            if acks:
                self.event("acks", -1, None, ms=[round(a, 1) for a in acks])

    async def close(self) -> None:
        await self.http.close()
        if self._events is not None:
            os.close(self._events)
            self._events = None
