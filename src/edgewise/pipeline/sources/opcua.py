"""OPC UA client source (asyncua): data-change subscriptions, or polling.

``mode: subscribe`` (default) creates one subscription with ``publishing_interval`` and monitors
the Value of every configured node (``nodes: [{node_id: "ns=2;i=2", sensor: name}]``) with a
queue of ``queue_size`` per item, so changes faster than the publishing interval are all
delivered, not just the last one. The first notification of each node is its current value.
``mode: poll`` reads every node in one Read request each ``interval``.

Each reading's ``ts`` is the value's source timestamp (``timestamp: source``, the default), the
server's timestamp (``server``), or the time the notification arrived (``receive``); a missing
timestamp falls back to the next one in that order. Values must be numbers or booleans; a value
with a status other than Good, a value of another type, or a node the server does not know
becomes a dead letter naming the node.

Connection: connect failures are retried, paced by the shared reconnect policy
(`edgewise.common.backoff.Retry`: full jitter under a ceiling that starts at ``reconnect_min`` and
doubles up to ``reconnect_max``; failures are forgotten once a session has stayed up for
``RESET_AFTER_S``), and logged once per outage; a lost connection (a failed keep-alive probe every
``watchdog_interval`` with no data, or a subscription status change) tears the session down and
builds a new one, subscriptions included. Credentials the server rejects before the first successful
connection are a configuration error. Waits use ``asyncio.timeout``, not ``asyncio.wait_for``,
which on Python 3.11 can swallow a stop that arrives as an attempt fails (see `sources.cancel`).

asyncua is imported only when the source runs (or when a spec with this source is validated):
importing it takes about half a second, which pipelines without OPC UA should not pay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from edgewise.common.backoff import Backoff, Retry
from edgewise.errors import ConfigError
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import ComponentConfig, RunContext, Source, SourceOutput
from edgewise.pipeline.sources.cancel import stop_if_cancelled
from edgewise.pipeline.units import Duration

log = logging.getLogger(__name__)

RESET_AFTER_S = 30.0  # connected this long: earlier connection failures are forgotten


class NodeConfig(ComponentConfig):
    node_id: str = Field(min_length=1)
    sensor: str = Field(min_length=1)

    @field_validator("node_id")
    @classmethod
    def _parse(cls, v: str) -> str:
        from asyncua import ua  # lazy: only specs using OPC UA pay for the import

        try:
            ua.NodeId.from_string(v)
        except Exception as exc:
            raise ValueError(
                f"{v!r} is not an OPC UA node id (e.g. 'ns=2;i=2' or 'ns=3;s=Line1.Temp'): {exc}"
            ) from None
        return v


class OpcUaConfig(ComponentConfig):
    endpoint: str = Field(pattern=r"^opc\.tcp://")
    """The server's URL, opc.tcp://host:port/path."""
    nodes: list[NodeConfig] = Field(min_length=1)
    """The variables to read: node_id (e.g. ns=2;i=2) and the sensor name of its readings."""
    mode: Literal["subscribe", "poll"] = "subscribe"
    """subscribe: data-change notifications; poll: one Read request each interval."""
    publishing_interval: Duration = 0.1
    """mode: subscribe: how often the server sends notifications."""
    sampling_interval: Duration = 0.0  # 0: as fast as the server samples
    """mode: subscribe: how often the server samples each value; 0: as fast as it samples."""
    queue_size: int = Field(default=100, ge=1, le=100_000)
    """mode: subscribe: changes kept per node between notifications."""
    interval: Duration = 1.0  # mode: poll
    """mode: poll: time between Read requests."""
    timestamp: Literal["source", "server", "receive"] = "source"
    """Which time becomes ts: the value's source timestamp, the server's, or the time it was
    received."""
    username: str | None = None
    """User name to log in with; none: anonymous."""
    password: str | None = None
    """Password to log in with (needs username)."""
    timeout: Duration = 4.0
    """How long one request to the server may take."""
    watchdog_interval: Duration = 1.0
    """Time between keep-alive probes when no data arrives; a failed probe rebuilds the session."""
    reconnect_min: Duration = 0.5
    """Longest wait before the first reconnection attempt (random up to it); doubled after each
    failed one."""
    reconnect_max: Duration = 30.0
    """Longest wait between reconnection attempts."""

    @model_validator(mode="after")
    def _checks(self) -> OpcUaConfig:
        if self.publishing_interval <= 0 or self.interval <= 0 or self.timeout <= 0:
            raise ValueError("publishing_interval, interval and timeout must be more than 0")
        if self.reconnect_min <= 0:
            raise ValueError("reconnect_min must be more than 0")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be at least reconnect_min")
        if self.password is not None and self.username is None:
            raise ValueError("password given without username")
        sensors = [n.sensor for n in self.nodes]
        dup = sorted({s for s in sensors if sensors.count(s) > 1})
        if dup:
            raise ValueError(f"sensor names must be unique; repeated: {', '.join(dup)}")
        return self


class _Lost(Exception):
    """The session is gone; reconnect."""


class _Handler:
    """asyncua subscription callbacks; they run on the event loop."""

    def __init__(self, source: OpcUaSource) -> None:
        self.source = source

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        src = self.source
        src._pending.append((node.nodeid, data.monitored_item.Value, time.perf_counter()))
        if src._wake is not None:
            src._wake.set()

    def status_change_notification(self, status: Any) -> None:
        src = self.source
        log.warning("source %s: subscription status changed: %s", src.id, status)
        src._lost = True
        if src._wake is not None:
            src._wake.set()


class OpcUaSource(Source):
    Config = OpcUaConfig

    def __init__(self, id: str, config: OpcUaConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self._pending: list[tuple[Any, Any, float]] = []
        self._wake: asyncio.Event | None = None
        self._lost = False
        self._sensor_of: dict[Any, tuple[str, str]] = {}  # NodeId -> (sensor, node_id text)
        self.notifications = 0
        self.readings = 0
        self.dead_lettered = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.connected = False
        # reconnect pacing; a test may replace it (e.g. with a fixed rng) before run()
        self.retry = Retry(Backoff(config.reconnect_min, config.reconnect_max), RESET_AFTER_S)

    def stats(self) -> dict[str, Any]:
        return {
            "notifications": self.notifications,
            "readings": self.readings,
            "dead_lettered": self.dead_lettered,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "connected": self.connected,
        }

    async def run(self, out: SourceOutput) -> None:
        from asyncua import Client, ua

        cfg = self.config
        self._wake = asyncio.Event()
        self._sensor_of = {ua.NodeId.from_string(n.node_id): (n.sensor, n.node_id)
                           for n in cfg.nodes}
        retry = self.retry
        ever_connected = False
        outage_logged = False  # connect failures since the last session have been logged
        while True:
            client = Client(url=cfg.endpoint, timeout=cfg.timeout)
            if cfg.username is not None:
                client.set_user(cfg.username)
                if cfg.password is not None:
                    client.set_password(cfg.password)
            try:
                try:
                    async with asyncio.timeout(cfg.timeout + 1.0):
                        await client.connect()
                except (ua.uaerrors.BadUserAccessDenied,
                        ua.uaerrors.BadIdentityTokenRejected,
                        ua.uaerrors.BadIdentityTokenInvalid) as exc:
                    if not ever_connected:
                        raise ConfigError(
                            f"source {self.id!r}: OPC UA server {cfg.endpoint} rejected the "
                            f"credentials: {exc}; check username and password"
                        ) from None
                    raise
                except (OSError, TimeoutError, ua.UaError) as exc:
                    stop_if_cancelled()  # a stop that came as the attempt failed wins
                    self.connect_failures += 1
                    if not outage_logged:  # once per outage
                        outage_logged = True
                        log.warning("source %s: cannot connect to OPC UA server %s (%s); "
                                    "retrying with backoff (up to every %gs)",
                                    self.id, cfg.endpoint, _describe(exc), cfg.reconnect_max)
                    await asyncio.sleep(retry.failed())
                    continue
                self.connected = True
                retry.connected()
                self._lost = False
                if ever_connected:
                    self.reconnects += 1
                    log.warning("source %s: reconnected to OPC UA server %s", self.id, cfg.endpoint)
                else:
                    log.info("source %s: connected to OPC UA server %s", self.id, cfg.endpoint)
                ever_connected = True
                outage_logged = False
                try:
                    if cfg.mode == "subscribe":
                        await self._subscribed(client, out)
                    else:
                        await self._polled(client, out)
                except (_Lost, ConnectionError, OSError, TimeoutError, ua.UaError) as exc:
                    stop_if_cancelled()
                    log.warning("source %s: lost the OPC UA server %s (%s); reconnecting",
                                self.id, cfg.endpoint, _describe(exc))
                    self.connected = False
                    await asyncio.sleep(retry.failed())
            finally:
                self.connected = False
                await _close(client)

    # -- subscription -------------------------------------------------------------------------
    async def _subscribed(self, client: Any, out: SourceOutput) -> None:
        from asyncua import ua

        cfg = self.config
        wake = self._wake
        assert wake is not None
        self._pending.clear()
        sub = await client.create_subscription(cfg.publishing_interval * 1000.0, _Handler(self))
        nodes = [client.get_node(nid) for nid in self._sensor_of]
        results = await sub.subscribe_data_change(
            nodes, queuesize=cfg.queue_size, sampling_interval=cfg.sampling_interval * 1000.0
        )
        for nid, res in zip(self._sensor_of, results, strict=True):
            if isinstance(res, ua.StatusCode):
                sensor, text = self._sensor_of[nid]
                self._dead(out, text, sensor, f"cannot monitor: {res.name}", "")
        while True:
            try:
                async with asyncio.timeout(cfg.watchdog_interval):
                    await wake.wait()
            except TimeoutError:  # quiet: make sure the server is still there
                await self._probe(client)
                continue
            wake.clear()
            if self._lost:
                raise _Lost("subscription status changed")
            items, self._pending = self._pending, []
            if items:
                self.notifications += len(items)
                batch = self._build(items, out)
                if batch.n:
                    await out.emit(batch, None)

    async def _probe(self, client: Any) -> None:
        try:
            async with asyncio.timeout(self.config.timeout):
                await client.nodes.server_state.read_value()
        except (OSError, TimeoutError, ConnectionError) as exc:
            raise _Lost(f"keep-alive probe failed: {_describe(exc)}") from None

    # -- polling ------------------------------------------------------------------------------
    async def _polled(self, client: Any, out: SourceOutput) -> None:
        from asyncua import ua

        cfg = self.config
        params = ua.ReadParameters()
        params.TimestampsToReturn = ua.TimestampsToReturn.Both
        for nid in self._sensor_of:
            rv = ua.ReadValueId()
            rv.NodeId = nid
            rv.AttributeId = ua.AttributeIds.Value
            params.NodesToRead.append(rv)
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        while True:
            async with asyncio.timeout(cfg.timeout):
                values = await client.uaclient.read(params)
            now = time.perf_counter()
            self.notifications += len(values)
            batch = self._build(
                [(nid, dv, now) for nid, dv in zip(self._sensor_of, values, strict=True)], out
            )
            if batch.n:
                await out.emit(batch, None)
            next_poll += cfg.interval
            t = loop.time()
            if next_poll < t:
                next_poll = t + cfg.interval
            await asyncio.sleep(next_poll - t)

    # -- records ------------------------------------------------------------------------------
    def _build(self, items: list[tuple[Any, Any, float]], out: SourceOutput) -> Batch:
        sensors: list[str] = []
        ts: list[float] = []
        vals: list[float] = []
        acc: list[float] = []
        mode = self.config.timestamp
        for nid, dv, accepted in items:
            sensor, text = self._sensor_of.get(nid, (str(nid), str(nid)))
            status = dv.StatusCode
            if status is not None and not status.is_good():
                self._dead(out, text, sensor, f"status {status.name}", dv)
                continue
            variant = dv.Value
            value = variant.Value if variant is not None else None
            if isinstance(value, bool):
                value = 1.0 if value else 0.0
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                self._dead(out, text, sensor,
                           f"value {value!r} ({type(value).__name__}) is not a finite number", dv)
                continue
            stamp = None
            if mode == "source":
                stamp = dv.SourceTimestamp or dv.ServerTimestamp
            elif mode == "server":
                stamp = dv.ServerTimestamp or dv.SourceTimestamp
            sensors.append(sensor)
            ts.append(_epoch(stamp) if stamp is not None else time.time())
            vals.append(float(value))
            acc.append(accepted)
        n = len(vals)
        self.readings += n
        if not n:
            return Batch.empty()
        scol = np.empty(n, dtype=object)
        scol[:] = sensors
        return Batch(
            {"sensor": scol, "ts": np.array(ts), "value": np.array(vals),
             ACCEPTED: np.array(acc)},
            n,
        )

    def _dead(self, out: SourceOutput, node_id: str, sensor: str, reason: str, dv: Any) -> None:
        self.dead_lettered += 1
        out.dead_letter(f"OPC UA node {node_id} ({sensor}): {reason}", repr(dv))


def _epoch(dt: datetime) -> float:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _close(client: Any) -> None:
    """Disconnect without letting a dead connection hold up the shutdown."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await client.disconnect()
