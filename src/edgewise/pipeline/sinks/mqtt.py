"""The MQTT sink: local actions, one JSON message per record, published to a broker on site.

This is how alarms reach the plant within milliseconds without any network beyond the site.
`write()` runs on the event loop and never waits on the network: it renders each record's topic
and payload, appends them to a bounded queue of the sink's own and, when the broker is
connected, publishes them at once with gmqtt, whose ``publish()`` is synchronous and writes the
packet to the asyncio transport (no thread, no hand-over).

While the broker is unreachable messages wait in that queue, at most ``max_queue`` of them; beyond
that the oldest are dropped and counted (the newest alarms matter most). The connection is kept by
`MqttLink` (`edgewise.pipeline.sources.mqtt_link`): it reconnects in the background, paced by the
shared reconnect policy (`edgewise.common.backoff.Retry`, ceilings ``reconnect_min`` doubling up to
``reconnect_max``, full jitter), and a broker that is down at start is a warning, not an error, so
the pipeline keeps running and the queue drains once the broker is back. QoS 1 messages in flight
(published, no PUBACK yet) when a connection breaks go back to the front of the queue and are sent
again on the next connection (at-least-once). The broker's Receive Maximum bounds how many are in
flight (Mosquitto: 20); the rest wait in the queue and go out as PUBACKs come back.

Counters (``stats()``): ``written`` records given to the sink, ``published`` messages handed to
the client (once per message, resends not counted), ``delivered`` messages confirmed (written to
the socket for QoS 0, PUBACK for QoS 1), ``dropped`` oldest messages discarded because the queue
was full, ``errors`` failed connection attempts, refusals and unpublishable records (e.g. a
missing topic field), ``queued`` messages waiting for the broker. ``latency`` is
accept-to-publish: from the source accepting a reading to the moment its message was written to
the connection's transport.

    sinks:
      - id: local-alarms
        type: mqtt
        inputs: [alarms]
        host: 127.0.0.1
        topic: "edgewise/alarms/{sensor}"
        qos: 1
"""

from __future__ import annotations

import asyncio
import logging
import string
import time
import uuid
from collections import deque
from typing import Any, Literal

import gmqtt
import numpy as np
import orjson
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.mqtt.handler import MQTTConnectError
from gmqtt.storage import PersistentStorage
from pydantic import Field, field_validator, model_validator

from edgewise.common.backoff import Backoff, Retry
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import ComponentConfig, RunContext, Sink
from edgewise.pipeline.latency import LatencyRecorder
from edgewise.pipeline.sources.mqtt_link import (
    RESET_AFTER_S,
    GmqttClient,
    MqttLink,
    gmqtt_handler,
)
from edgewise.pipeline.units import Duration

log = logging.getLogger(__name__)

_OPTS = orjson.OPT_SERIALIZE_NUMPY
_FORMATTER = string.Formatter()


def _topic_fields(template: str) -> tuple[str, ...]:
    """The record fields a topic template uses; raises ValueError with the fix if it is bad."""
    try:
        parts = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise ValueError(
            f"topic template {template!r} is not valid: {exc}; write fields as {{name}} and a "
            "literal brace as {{ or }}"
        ) from None
    fields: list[str] = []
    for literal, name, _spec, _conv in parts:
        if "+" in literal or "#" in literal:
            raise ValueError(
                f"topic template {template!r} contains a wildcard (+ or #); wildcards are for "
                "subscribing, a published topic cannot contain them"
            )
        if "\x00" in literal:
            raise ValueError(f"topic template {template!r} contains a NUL character")
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(
                f"topic template {template!r} has the field {{{name}}}; name a record field, "
                "e.g. {sensor} (no positions, indexes or attributes)"
            )
        if name.startswith("_"):
            raise ValueError(
                f"topic template {template!r} uses the internal field {name!r}; internal "
                "fields never leave the node"
            )
        fields.append(name)
    return tuple(dict.fromkeys(fields))


class MqttConfig(ComponentConfig):
    host: str = Field(default="127.0.0.1", min_length=1)
    """The broker's host name or address."""
    port: int = Field(default=1883, ge=1, le=65535)
    """The broker's TCP port."""
    username: str | None = None
    """User name to log in to the broker with; none: no login."""
    password: str | None = None
    """Password to log in to the broker with (needs username)."""
    client_id: str | None = Field(default=None, max_length=64)
    """Default: ``edgewise-<pipeline>-<sink id>-<random>``."""
    topic: str = Field(min_length=1, max_length=1024)
    """Topic template; ``{field}`` is replaced by the record's value of that field."""
    qos: Literal[0, 1] = 1
    """Publish QoS: 0 at most once, 1 at least once."""
    retain: bool = False
    """true: the broker keeps the last message of each topic for new subscribers."""
    payload: Literal["json"] = "json"
    """Message format: json, one record object per message."""
    max_queue: int = Field(default=10_000, ge=1)
    """Messages kept while the broker is unreachable; beyond this the oldest are dropped."""
    keepalive: int = Field(default=30, ge=5, le=65535)  # seconds
    """Seconds between keep-alive pings to the broker."""
    connect_timeout: Duration = 2.0
    """How long one connection attempt (TCP connect until the broker's answer) may take; start()
    waits at most this long."""
    reconnect_min: Duration = 1.0
    """Longest wait before the first reconnection attempt (the wait is random up to it); doubled
    after each failed one."""
    reconnect_max: Duration = 30.0
    """Longest wait between reconnection attempts."""
    flush_timeout: Duration = 2.0
    """On stop, how long to wait for queued and unacknowledged messages to reach the broker."""

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, v: str) -> str:
        _topic_fields(v)
        return v

    @model_validator(mode="after")
    def _check_password(self) -> MqttConfig:
        if self.password is not None and self.username is None:
            raise ValueError("a password needs a username (set username too)")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be at least reconnect_min")
        return self

    @field_validator("connect_timeout", "reconnect_min", "reconnect_max")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be more than 0 seconds")
        return v


def _bad_topic(topic: str) -> str | None:
    """Why a rendered topic cannot be published (a field value made it invalid), or None."""
    if not topic:
        return "the topic is empty"
    if "+" in topic or "#" in topic:
        return "the topic contains a wildcard (+ or #)"
    if "\x00" in topic:
        return "the topic contains a NUL character"
    if len(topic.encode("utf-8", "surrogatepass")) > 65535:
        return "the topic is longer than 65,535 bytes"
    return None


class _Out:
    """One message to publish: topic, payload, accept time (nan: unknown) and whether it was
    handed over before (a resend after a lost connection: not counted or timed again)."""

    __slots__ = ("accepted", "payload", "sent", "topic")

    def __init__(self, topic: str, payload: bytes, accepted: float) -> None:
        self.topic = topic
        self.payload = payload
        self.accepted = accepted
        self.sent = False


class _InFlight(PersistentStorage):
    """gmqtt's store of one client's unacknowledged QoS 1 messages (its ``persistent_storage``
    parameter), which also tells the sink about every PUBACK and remembers which of its messages
    each packet id carries, so that they can be sent again on the next connection."""

    def __init__(self, on_puback: Any) -> None:
        super().__init__()
        self.messages: dict[int, _Out] = {}  # packet id -> message, in publish order
        self.next: _Out | None = None  # set by the sink just before client.publish()
        self._on_puback = on_puback

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        if self.next is not None:
            self.messages[mid] = self.next
            self.next = None

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        if self.messages.pop(mid, None) is not None:
            self._on_puback()


class MqttSink(Sink):
    """Publishes each record as a JSON message; see the module docstring."""

    Config = MqttConfig

    def __init__(self, id: str, config: MqttConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.fields = _topic_fields(config.topic)
        self.client_id = config.client_id or (
            f"edgewise-{ctx.pipeline}-{id}-{uuid.uuid4().hex[:8]}"[-64:]
        )
        self.latency = LatencyRecorder()  # accepted -> written to the broker's socket
        self.latency_handoff = LatencyRecorder()  # accepted -> handed to the MQTT client
        self.published = 0
        self.delivered = 0
        self.dropped = 0
        self._queue: deque[_Out] = deque()  # waiting for the broker, oldest first
        self._client: gmqtt.Client | None = None  # the current connection's client
        self._inflight: _InFlight | None = None  # its unacknowledged QoS 1 messages
        self._task: asyncio.Task[None] | None = None  # the MqttLink
        self._answered: asyncio.Event | None = None  # first CONNACK or failure seen
        self._outage_since: float | None = None
        self._outage_dropped = 0
        self._warned: set[str] = set()
        self._stopping = False
        # reconnect pacing; a test may replace it (e.g. with a fixed rng) before start()
        self.retry = Retry(Backoff(config.reconnect_min, config.reconnect_max), RESET_AFTER_S)

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        self._answered = answered = asyncio.Event()
        self._stopping = False
        link = MqttLink(
            self._new_client, self,
            host=cfg.host, port=cfg.port, keepalive=cfg.keepalive, protocol=MQTTv50,
            connect_timeout=cfg.connect_timeout, retry=self.retry,
        )
        self._task = task = asyncio.create_task(link.run(), name=f"mqtt sink {self.id}: connection")
        task.add_done_callback(self._link_ended)
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                await answered.wait()
        except TimeoutError:
            log.warning(
                "mqtt sink %s: the broker at %s has not answered within %.1f s; messages are "
                "queued until it does",
                self.id, self.where, cfg.connect_timeout,
            )
        except asyncio.CancelledError:
            # stop() will not be called for a sink whose start() did not finish
            self._task = None
            task.cancel()
            await asyncio.wait([task])
            raise

    async def stop(self) -> None:
        task = self._task
        if task is None:
            return
        self._stopping = True
        try:
            deadline = time.monotonic() + self.config.flush_timeout
            while (self._queue or self._unacked()) and self._connected():
                if time.monotonic() >= deadline:
                    break
                self._drain()
                await asyncio.sleep(0.005)
        finally:
            self._task = None
            task.cancel()
            await asyncio.wait([task])  # it sends DISCONNECT and closes the socket
            unacked = self._unacked()
            if unacked:  # never confirmed: count them as waiting, like the queue
                self._queue.extendleft(reversed(self._take_inflight()))
            self._client = None
            if self._queue:
                log.warning(
                    "mqtt sink %s: stopped with %d message(s) not delivered to %s "
                    "(%d dropped earlier because the queue was full)",
                    self.id, len(self._queue), self.where, self.dropped,
                )

    def _link_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.errors += 1
            log.error("mqtt sink %s: the connection task failed: %r; messages stay queued",
                      self.id, task.exception())

    # -- data path (event loop) ---------------------------------------------------------------
    def write(self, batch: Batch) -> None:
        n = batch.n
        if n == 0:
            return
        self.written += n
        records = batch.to_records()
        acc = batch.columns.get(ACCEPTED)
        accepted = acc.tolist() if acc is not None else [float("nan")] * n
        template = self.config.topic
        queue = self._queue
        if not self.fields:
            for rec, a in zip(records, accepted, strict=True):
                queue.append(_Out(template, orjson.dumps(rec, option=_OPTS), a))
        else:
            for rec, a in zip(records, accepted, strict=True):
                try:
                    topic = template.format_map(rec)
                except (KeyError, ValueError, TypeError) as exc:
                    self.errors += 1
                    self._warn_once(
                        f"topic:{exc!r}",
                        "mqtt sink %s: cannot build the topic %r for a record with fields %s: "
                        "%r; such records are not published",
                        self.id, template, sorted(rec), exc,
                    )
                    continue
                problem = _bad_topic(topic)
                if problem is not None:
                    self.errors += 1
                    self._warn_once(
                        f"publish:{problem}", "mqtt sink %s: cannot publish to %r: %s",
                        self.id, topic, problem,
                    )
                    continue
                queue.append(_Out(topic, orjson.dumps(rec, option=_OPTS), a))
        self._drain()
        self._bound_queue()

    def _bound_queue(self) -> None:
        queue = self._queue
        over = len(queue) - self.config.max_queue
        if over > 0:
            for _ in range(over):
                queue.popleft()
            self.dropped += over
            self._outage_dropped += over

    def _connected(self) -> bool:
        client = self._client
        return client is not None and client.is_connected

    def _unacked(self) -> int:
        return len(self._inflight.messages) if self._inflight is not None else 0

    def _drain(self) -> None:
        """Publish queued messages, oldest first, while connected and the broker's Receive
        Maximum allows (gmqtt raises OverflowError when it has no packet id left)."""
        queue = self._queue
        if not queue or not self._connected():
            return
        client = self._client
        assert client is not None
        cfg = self.config
        qos, retain = cfg.qos, cfg.retain
        inflight = self._inflight
        lat: list[float] = []
        handoff: list[float] = []
        try:
            while queue:
                out = queue[0]
                if qos:
                    inflight.next = out  # type: ignore[union-attr]
                if not out.sent:
                    handoff.append(time.perf_counter() - out.accepted)
                try:
                    client.publish(out.topic, out.payload, qos, retain)
                except OverflowError:
                    break  # in flight up to the broker's Receive Maximum: more after a PUBACK
                queue.popleft()
                if not qos:
                    self.delivered += 1
                if not out.sent:
                    out.sent = True
                    self.published += 1
                    lat.append(time.perf_counter() - out.accepted)
        finally:
            if inflight is not None:
                inflight.next = None
            if lat:
                values = np.asarray(lat, dtype=np.float64)
                self.latency.add(values[~np.isnan(values)])
            if handoff:
                values = np.asarray(handoff[: len(lat)], dtype=np.float64)
                self.latency_handoff.add(values[~np.isnan(values)])

    def _on_puback(self) -> None:
        self.delivered += 1
        if self._queue:
            self._drain()

    def _take_inflight(self) -> list[_Out]:
        inflight = self._inflight
        if inflight is None:
            return []
        out = list(inflight.messages.values())
        inflight.messages.clear()
        return out

    # -- connection events (event loop, from MqttLink) ----------------------------------------
    def _new_client(self) -> gmqtt.Client:
        cfg = self.config
        inflight = _InFlight(self._on_puback)
        client = GmqttClient(self.client_id, clean_session=True, persistent_storage=inflight)
        gmqtt_handler(client, f"mqtt sink {self.id!r}", manual_ack=False)
        if cfg.username is not None:
            client.set_auth_credentials(cfg.username, cfg.password)
        self._client = client
        self._inflight = inflight
        return client

    def link_connected(self, client: gmqtt.Client) -> None:
        if self._answered is not None:
            self._answered.set()
        if self._outage_since is not None:
            log.info(
                "mqtt sink %s: connected to %s after %.1f s; %d message(s) queued, %d dropped "
                "while it was unreachable",
                self.id, self.where, time.monotonic() - self._outage_since, len(self._queue),
                self._outage_dropped,
            )
            self._outage_since = None
        else:
            log.debug("mqtt sink %s: connected to %s", self.id, self.where)
        self._drain()

    def link_failed(self, client: gmqtt.Client, error: Exception) -> None:
        self.errors += 1
        if self._answered is not None:
            self._answered.set()
        if isinstance(error, MQTTConnectError):
            what = (
                f"the MQTT broker at {self.where} refused the connection: {error} "
                "(check username, password and client_id)"
            )
        elif isinstance(error, TimeoutError):
            what = (
                f"the MQTT broker at {self.where} did not answer within "
                f"{self.config.connect_timeout:g} s"
            )
        else:
            what = f"cannot reach the MQTT broker at {self.where}: {error}"
        self._begin_outage(what)

    def link_lost(self, client: gmqtt.Client) -> None:
        # QoS 1 messages without a PUBACK go out again, first, on the next connection
        resend = self._take_inflight()
        if resend:
            self._queue.extendleft(reversed(resend))
            self._bound_queue()
        if not self._stopping:
            self._begin_outage(f"lost the connection to the MQTT broker at {self.where}")

    def _begin_outage(self, what: str) -> None:
        if self._outage_since is not None or self._stopping:
            return
        self._outage_since = time.monotonic()
        self._outage_dropped = 0
        log.warning(
            "mqtt sink %s: %s; the pipeline keeps running, up to %d message(s) are queued "
            "(oldest dropped beyond that) and it reconnects in the background",
            self.id, what, self.config.max_queue,
        )

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key in self._warned or len(self._warned) > 100:
            return
        self._warned.add(key)
        log.warning(msg, *args)

    # -- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "published": self.published,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "queued": len(self._queue) + self._unacked(),
            "connected": self._connected(),
            "latency": self.latency.summary(),
            "latency_handoff": self.latency_handoff.summary(),
        }
