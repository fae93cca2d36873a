"""The MQTT sink: local actions, one JSON message per record, published to a broker on site.

This is how alarms reach the plant within milliseconds without any network beyond the site.
`write()` runs on the event loop and never waits on the network: it renders each record's topic
and payload, appends them to a bounded queue of the sink's own and, when the broker is
connected, hands them straight to paho-mqtt, whose network thread (``loop_start``) does the I/O.

While the broker is unreachable messages wait in that queue, at most ``max_queue`` of them;
beyond that the oldest are dropped and counted (the newest alarms matter most). paho reconnects
in the background with exponential backoff; a broker that is down at start is a warning, not an
error, so the pipeline keeps running and the queue drains once the broker is back. QoS 1
messages that were already handed over when a connection broke are re-sent by paho itself.

Counters (``stats()``): ``written`` records given to the sink, ``published`` messages handed to
paho, ``delivered`` messages paho confirmed (written to the socket for QoS 0, PUBACK for QoS 1),
``dropped`` oldest messages discarded because the queue was full, ``errors`` failed connection
attempts, refusals and unpublishable records (e.g. a missing topic field), ``queued`` messages
waiting for the broker. ``latency`` is accept-to-publish: from the source accepting a reading
to the moment its message was handed to paho.

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

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from pydantic import Field, field_validator, model_validator

from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import ComponentConfig, RunContext, Sink
from edgewise.pipeline.latency import LatencyRecorder
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
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    client_id: str | None = Field(default=None, max_length=64)
    """Default: ``edgewise-<pipeline>-<sink id>-<random>``."""
    topic: str = Field(min_length=1, max_length=1024)
    """Topic template; ``{field}`` is replaced by the record's value of that field."""
    qos: Literal[0, 1] = 1
    retain: bool = False
    payload: Literal["json"] = "json"
    max_queue: int = Field(default=10_000, ge=1)
    """Messages kept while the broker is unreachable; beyond this the oldest are dropped."""
    keepalive: int = Field(default=30, ge=5, le=65535)  # seconds
    connect_timeout: Duration = 2.0
    """How long one TCP connection attempt may take; start() waits at most this long."""
    reconnect_min: Duration = 1.0
    """Wait before the first reconnection attempt; doubled after each failed one."""
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


class MqttSink(Sink):
    """Publishes each record as a JSON message; see the module docstring."""

    Config = MqttConfig

    def __init__(self, id: str, config: MqttConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.fields = _topic_fields(config.topic)
        self.latency = LatencyRecorder()
        self.published = 0
        self.delivered = 0  # incremented by paho's thread only
        self.dropped = 0
        # (topic, payload, accept time or nan); only touched on the event loop thread
        self._queue: deque[tuple[str, bytes, float]] = deque()
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._answered: asyncio.Event | None = None  # first CONNACK or failure seen
        self._outage_since: float | None = None
        self._outage_dropped = 0
        self._warned: set[str] = set()
        self._stopping = False

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._answered = asyncio.Event()
        client_id = cfg.client_id or (
            f"edgewise-{self.ctx.pipeline}-{self.id}-{uuid.uuid4().hex[:8]}"[-64:]
        )
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        client.connect_timeout = cfg.connect_timeout
        # paho annotates the delays as int but computes with them as numbers: floats work
        client.reconnect_delay_set(cfg.reconnect_min, cfg.reconnect_max)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        self._stopping = False
        try:
            # the TCP connect (and DNS) happens in a worker thread, never on the loop
            await asyncio.to_thread(client.connect, cfg.host, cfg.port, cfg.keepalive)
        except OSError as exc:
            self.errors += 1
            self._begin_outage(f"cannot reach the MQTT broker at {self.where}: {exc}")
            client.connect_async(cfg.host, cfg.port, cfg.keepalive)
            client.loop_start()
            return
        except asyncio.CancelledError:
            self._client = None  # the worker thread's socket closes with the client
            raise
        client.loop_start()
        try:
            await asyncio.wait_for(self._answered.wait(), cfg.connect_timeout)
        except TimeoutError:
            log.warning(
                "mqtt sink %s: the broker at %s accepted the connection but has not answered "
                "within %.1f s; messages are queued until it does",
                self.id, self.where, cfg.connect_timeout,
            )
        except asyncio.CancelledError:
            # stop() will not be called for a sink whose start() did not finish
            self._client = None
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)
            raise

    async def stop(self) -> None:
        client = self._client
        if client is None:
            return
        self._stopping = True
        try:
            deadline = time.monotonic() + self.config.flush_timeout
            while (
                (self._queue or self.published > self.delivered)
                and client.is_connected()
                and time.monotonic() < deadline
            ):
                self._drain()
                await asyncio.sleep(0.005)
        finally:
            client.disconnect()
            # joins paho's network thread (at most about a second while it waits to reconnect)
            await asyncio.to_thread(client.loop_stop)
            self._client = None
            undelivered = len(self._queue) + max(0, self.published - self.delivered)
            if undelivered:
                log.warning(
                    "mqtt sink %s: stopped with %d message(s) not delivered to %s "
                    "(%d dropped earlier because the queue was full)",
                    self.id, undelivered, self.where, self.dropped,
                )

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
                queue.append((template, orjson.dumps(rec, option=_OPTS), a))
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
                queue.append((topic, orjson.dumps(rec, option=_OPTS), a))
        client = self._client
        if client is not None and client.is_connected():
            self._drain()
        over = len(queue) - self.config.max_queue
        if over > 0:
            for _ in range(over):
                queue.popleft()
            self.dropped += over
            self._outage_dropped += over

    def _drain(self) -> None:
        """Hand queued messages to paho, oldest first, while it is connected."""
        client = self._client
        if client is None:
            return
        cfg = self.config
        queue = self._queue
        lat: list[float] = []
        while queue:
            topic, payload, acc = queue[0]
            try:
                info = client.publish(topic, payload, cfg.qos, cfg.retain)
            except ValueError as exc:  # e.g. a field value with + or # made the topic invalid
                queue.popleft()
                self.errors += 1
                self._warn_once(
                    f"publish:{exc}", "mqtt sink %s: cannot publish to %r: %s", self.id, topic, exc
                )
                continue
            rc = info.rc
            if rc == mqtt.MQTT_ERR_SUCCESS or (rc == mqtt.MQTT_ERR_NO_CONN and cfg.qos > 0):
                # with QoS 1 paho keeps a message it could not send yet and sends it on reconnect
                queue.popleft()
                self.published += 1
                lat.append(time.perf_counter() - acc)
                if rc == mqtt.MQTT_ERR_NO_CONN:
                    break
            elif rc == mqtt.MQTT_ERR_NO_CONN:
                break  # QoS 0 would be lost: keep it queued until the broker is back
            else:
                queue.popleft()
                self.errors += 1
                self._warn_once(
                    f"rc:{rc}", "mqtt sink %s: publishing failed: %s", self.id,
                    mqtt.error_string(rc),
                )
        if lat:
            values = np.asarray(lat, dtype=np.float64)
            self.latency.add(values[~np.isnan(values)])

    # -- paho callbacks (paho's thread): hop to the event loop --------------------------------
    def _call(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the run is over
            pass

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            self._call(self._refused, str(reason))
        else:
            self._call(self._connected)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._call(self._connect_failed)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._call(self._disconnected, str(reason), bool(reason.is_failure))

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        self.delivered += 1

    # -- connection events (event loop) -------------------------------------------------------
    def _connected(self) -> None:
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

    def _refused(self, reason: str) -> None:
        self.errors += 1
        if self._answered is not None:
            self._answered.set()
        self._begin_outage(
            f"the MQTT broker at {self.where} refused the connection: {reason} "
            "(check username, password and client_id)"
        )

    def _connect_failed(self) -> None:
        self.errors += 1
        if self._answered is not None:
            self._answered.set()
        self._begin_outage(f"cannot reach the MQTT broker at {self.where}")

    def _disconnected(self, reason: str, unexpected: bool) -> None:
        if unexpected and not self._stopping:
            self._begin_outage(f"lost the connection to the MQTT broker at {self.where}: {reason}")

    def _begin_outage(self, what: str) -> None:
        if self._outage_since is not None or self._stopping:
            return
        self._outage_since = time.monotonic()
        self._outage_dropped = 0
        log.warning(
            "mqtt sink %s: %s; the pipeline keeps running, up to %d message(s) are queued "
            "(oldest dropped beyond that) and paho reconnects in the background",
            self.id, what, self.config.max_queue,
        )

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key in self._warned or len(self._warned) > 100:
            return
        self._warned.add(key)
        log.warning(msg, *args)

    # -- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        client = self._client
        return {
            **super().stats(),
            "published": self.published,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "queued": len(self._queue),
            "connected": bool(client is not None and client.is_connected()),
            "latency": self.latency.summary(),
        }
