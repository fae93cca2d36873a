"""MQTT subscriber source: JSON readings from a broker, acknowledged only once durable.

Everything runs on the event loop (gmqtt, no threads). gmqtt parses each packet as it arrives and
calls `_take`, a plain function that appends the message to a list and sets an `asyncio.Event`
only when that list goes from empty to non-empty (one wake per batch, not per message). `run()`
takes everything accumulated, parses it in one go (one orjson call on the fast path) into a
`Batch`, stamps each record with the time its message arrived (``_accepted``) and hands it to the
engine.

Delivery (``qos: 1``): gmqtt's automatic acknowledgement is off. The position emitted with each
batch is a counter; the engine calls `ack()` with it after the batch's records (and dead letters)
are durably committed, and only then are the PUBACKs of every message up to it sent. With
``clean_session: false`` and a fixed ``client_id`` the broker keeps the session, so messages that
were received but not committed when the process died are delivered again after a restart
(at-least-once; the outbox's sequence numbers make the cloud side exactly-once). Acknowledgements
are sent only on the connection that received the message (every connection has a generation
number); after a reconnect the broker redelivers what was not acknowledged.

MQTT 5 is the default protocol: it lets the source announce a Receive Maximum, so the broker may
keep thousands of QoS 1 messages in flight while a commit is running (Mosquitto allows only 20 to a
3.1.1 client, which would cap the rate at 20 messages per commit).

Bad input never stops the source: malformed JSON, a reading with a missing field, a wrong type, a
NaN, or a message over ``max_message_bytes`` becomes a dead letter whose reason names the topic.
QoS 0 messages arriving faster than the engine takes them are held up to ``max_buffered`` and then
dropped and counted (``dropped_overflow``); QoS 1 messages are never dropped, the broker's flow
control (Receive Maximum) bounds them.

Connection: `MqttLink` (`edgewise.pipeline.sources.mqtt_link`, shared with the MQTT sink)
reconnects with the shared reconnect policy, ceilings ``reconnect_min`` doubling up to
``reconnect_max``, full jitter; this source logs each outage once. An unreachable broker, at
start or later, is retried in the background; a broker that refuses the credentials before the
first successful connection is a configuration error that ends the run. Parsing the messages
into readings and dead letters is `edgewise.pipeline.sources.mqtt_messages`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import gmqtt
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.mqtt.handler import MQTTConnectError
from pydantic import Field, field_validator, model_validator

from edgewise.common.backoff import Backoff, Retry
from edgewise.errors import ConfigError
from edgewise.pipeline.component import ComponentConfig, RunContext, Source, SourceOutput
from edgewise.pipeline.sources.mqtt_link import (
    RESET_AFTER_S,
    GmqttClient,
    MqttLink,
    gmqtt_handler,
    refused_for_good,
)
from edgewise.pipeline.sources.mqtt_messages import Received, parse_messages
from edgewise.pipeline.units import ByteSize, Duration

log = logging.getLogger(__name__)

KEEP_BYTES = 4096  # of an oversize message, only this much is kept (for its dead letter)
CONNECT_TIMEOUT_S = 10.0  # one connection attempt of the source: TCP connect until CONNACK


class MqttConfig(ComponentConfig):
    topics: list[str] = Field(min_length=1)
    """Topic filters to subscribe to ('+' and '#' wildcards as whole levels)."""
    host: str = "127.0.0.1"
    """The broker's host name or address."""
    port: int = Field(default=1883, ge=1, le=65535)
    """The broker's TCP port."""
    username: str | None = None
    """User name to log in to the broker with; none: no login."""
    password: str | None = None
    """Password to log in to the broker with (needs username)."""
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    """MQTT client id; none: a random one (clean_session: false needs a fixed one)."""
    qos: Literal[0, 1] = 0
    """Subscription QoS: 0 at most once; 1 at least once, acknowledged after the outbox commit."""
    clean_session: bool = True
    """false keeps the broker session (subscriptions and unacknowledged QoS 1 messages) across
    restarts; needs a fixed client_id."""
    session_expiry: Duration = 7 * 86400.0
    """MQTT 5: how long the broker keeps a session (clean_session: false) while disconnected."""
    protocol: Literal["5", "3.1.1"] = "5"
    """MQTT protocol version: 5 or 3.1.1."""
    receive_maximum: int = Field(default=10_000, ge=1, le=65535)
    """MQTT 5: QoS 1 messages the broker may have in flight to us (received, not yet acked)."""
    keepalive: int = Field(default=30, ge=5, le=65535)  # seconds
    """Seconds between keep-alive pings to the broker."""
    reconnect_min: Duration = 0.5
    """Longest wait before the first reconnection attempt (random up to it); doubled after each
    failed one."""
    reconnect_max: Duration = 30.0
    """Longest wait between reconnection attempts."""
    payload: Literal["json"] = "json"
    """Message format: json, one reading object or an array of them per message."""
    max_message_bytes: ByteSize = 1 << 20
    """A larger message becomes a dead letter naming its topic."""
    sensor_from_topic: bool = False
    """Readings without a 'sensor' field are named after their topic."""
    topic_strip_levels: int = Field(default=0, ge=0)
    """With sensor_from_topic: leading topic levels to drop (1: factory/line1/t/1 -> line1/t/1)."""
    batch: int = Field(default=8192, ge=1, le=1_000_000)  # messages per emitted batch, at most
    """Messages per emitted batch, at most."""
    linger: Duration = 0.0
    """Wait this long after a batch's first message for more to arrive; 0 hands over what each
    wake-up finds. At 10,000 msg/s (benchmarks/mqtt_clients.py --rate 10000, 2 cores) messages
    arrive in bursts that make batches anyway: 2 or 5 ms saved at most a tenth of the CPU per
    message, within run-to-run noise, and add up to that much alarm latency."""
    max_buffered: int = Field(default=100_000, ge=1)
    """QoS 0 messages held while the engine is busy; beyond this they are dropped and counted."""

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("topics")
    @classmethod
    def _topics_valid(cls, topics: list[str]) -> list[str]:
        for t in topics:
            if not t:
                raise ValueError("a topic filter cannot be empty")
            levels = t.split("/")
            for i, level in enumerate(levels):
                if "#" in level and (level != "#" or i != len(levels) - 1):
                    raise ValueError(f"{t!r}: '#' must be a whole level and the last one")
                if "+" in level and level != "+":
                    raise ValueError(f"{t!r}: '+' must be a whole level")
        return topics

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if not self.clean_session and not self.client_id:
            raise ValueError(
                "clean_session: false needs a fixed client_id (the broker keeps the session "
                "under that name)"
            )
        if self.password is not None and self.username is None:
            raise ValueError("password given without username")
        if self.reconnect_min <= 0:
            raise ValueError("reconnect_min must be more than 0")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be at least reconnect_min")
        if self.topic_strip_levels and not self.sensor_from_topic:
            raise ValueError("topic_strip_levels only applies with sensor_from_topic: true")
        return self


class MqttSource(Source):
    Config = MqttConfig

    def __init__(self, id: str, config: MqttConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.client_id = config.client_id or f"edgewise-{ctx.pipeline}-{id}-{uuid.uuid4().hex[:8]}"
        self._protocol = MQTTv50 if config.protocol == "5" else MQTTv311
        self._buf: list[Received] = []
        self._wake: asyncio.Event | None = None
        self._client: gmqtt.Client | None = None  # the latest connection's client
        self._gen = 0  # connection generation: one per client, i.e. per connection attempt
        self._puback: Callable[[int], None] | None = None  # sends a PUBACK on that connection
        self._seq = 0  # position counter
        self._unacked: collections.deque[tuple[int, int, list[int]]] = collections.deque()
        self._ever_connected = False
        self._fail_streak = 0
        self._overflow_warned = -1e9
        # counters (read anywhere, written on the loop)
        self.received = 0
        self.dead_lettered = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.dropped_overflow = 0
        self.acked = 0
        self.connected = False
        self.subscribed = False
        # reconnect pacing; a test may replace it (e.g. with a fixed rng) before run()
        self.retry = Retry(Backoff(config.reconnect_min, config.reconnect_max), RESET_AFTER_S)

    # -- engine interface ---------------------------------------------------------------------
    def restore(self, position: Any) -> None:
        # positions only order this process's acknowledgements; continue above the saved one so
        # the engine's first ack (of the restored position) acknowledges nothing new
        if isinstance(position, int):
            self._seq = position

    def ack(self, position: Any) -> None:
        unacked = self._unacked
        client, gen, puback = self._client, self._gen, self._puback
        live = client is not None and puback is not None and client.is_connected
        while unacked and unacked[0][0] <= position:
            _, msg_gen, mids = unacked.popleft()
            if not live or msg_gen != gen:
                continue  # that connection is gone; the broker redelivers these
            for mid in mids:
                puback(mid)  # type: ignore[misc]
            self.acked += len(mids)

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "dead_lettered": self.dead_lettered,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "dropped_overflow": self.dropped_overflow,
            "acked": self.acked,
            "connected": self.connected,
            "subscribed": self.subscribed,
        }

    async def run(self, out: SourceOutput) -> None:
        cfg = self.config
        self._wake = wake = asyncio.Event()
        link = MqttLink(
            self._new_client, self,
            host=cfg.host, port=cfg.port, keepalive=cfg.keepalive, protocol=self._protocol,
            connect_timeout=CONNECT_TIMEOUT_S, retry=self.retry,
        )
        keeper = asyncio.create_task(link.run(), name=f"mqtt source {self.id}: connection")
        keeper.add_done_callback(lambda _task: wake.set())
        try:
            while True:
                await wake.wait()
                if keeper.done():
                    keeper.result()  # raises what ended it (a refused login: ConfigError)
                    raise RuntimeError("the MQTT connection task ended")  # pragma: no cover
                if cfg.linger and len(self._buf) < cfg.batch:
                    await asyncio.sleep(cfg.linger)  # gather more messages into this batch
                wake.clear()
                items, self._buf = self._buf, []
                for i in range(0, len(items), cfg.batch):
                    await self._emit(items[i : i + cfg.batch], out)
        finally:
            keeper.cancel()
            await asyncio.wait([keeper])  # it disconnects (DISCONNECT after the last PUBACKs)
            self._client = self._puback = None
            self.connected = self.subscribed = False

    # -- connection (event loop) --------------------------------------------------------------
    def _new_client(self) -> gmqtt.Client:
        cfg = self.config
        kwargs: dict[str, Any] = {}
        if self._protocol == MQTTv50:
            kwargs["receive_maximum"] = cfg.receive_maximum
            if not cfg.clean_session:
                kwargs["session_expiry_interval"] = min(int(cfg.session_expiry), 0xFFFFFFFF)
        manual = cfg.qos == 1
        client = GmqttClient(
            self.client_id,
            clean_session=cfg.clean_session,
            optimistic_acknowledgement=not manual,
            **kwargs,
        )
        handler = gmqtt_handler(client, f"source {self.id!r}", manual_ack=manual)
        if cfg.username is not None:
            client.set_auth_credentials(cfg.username, cfg.password)
        self._gen += 1
        gen = self._gen
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        if manual:
            # the packet id of a QoS 1 message is only known here (see the module docstring)
            def on_qos1(mid: int, payload: bytes, topic: Any, properties: Any) -> None:
                self._take(topic, payload, 1, mid, gen)

            handler._handle_qos_1_publish_packet = on_qos1
            self._puback = handler._send_puback
        self._client = client
        return client

    def _where(self) -> str:
        return f"MQTT broker {self.config.host}:{self.config.port}"

    def link_connected(self, client: gmqtt.Client) -> None:
        self.connected = True
        if self._ever_connected:
            self.reconnects += 1
            log.warning("source %s: reconnected to %s (reconnect %d)",
                        self.id, self._where(), self.reconnects)
        elif self._fail_streak:
            log.warning("source %s: connected to %s after %d failed attempts",
                        self.id, self._where(), self._fail_streak)
        else:
            log.info("source %s: connected to %s", self.id, self._where())
        self._ever_connected = True
        self._fail_streak = 0
        client.subscribe([gmqtt.Subscription(t, qos=self.config.qos) for t in self.config.topics])

    def link_failed(self, client: gmqtt.Client, error: Exception) -> None:
        self.connect_failures += 1
        self._fail_streak += 1
        if isinstance(error, MQTTConnectError):
            permanent = refused_for_good(error, self._protocol)
            if permanent and not self._ever_connected:
                raise ConfigError(
                    f"source {self.id!r}: {self._where()} refused the connection: {permanent}; "
                    "check username, password and client_id"
                ) from None
            log.warning("source %s: %s refused the connection: %s; retrying",
                        self.id, self._where(), error)
            return
        if self._fail_streak == 1:
            reason = "no answer" if isinstance(error, TimeoutError) else str(error)
            log.warning(
                "source %s: cannot connect to %s (%s); retrying with backoff (up to every %gs)",
                self.id, self._where(), reason, self.config.reconnect_max,
            )

    def link_lost(self, client: gmqtt.Client) -> None:
        self.connected = self.subscribed = False
        log.warning("source %s: lost the connection to %s; reconnecting", self.id, self._where())

    def _on_subscribe(self, client: gmqtt.Client, mid: int, codes: Any, props: Any) -> None:
        if client is not self._client:
            return
        bad = [hex(c) for c in codes if c >= 0x80]
        if bad:
            log.warning("source %s: the broker refused subscriptions to %s: %s",
                        self.id, self.config.topics, ", ".join(bad))
        else:
            self.subscribed = True
            log.info("source %s: subscribed to %s", self.id, ", ".join(self.config.topics))

    # -- receiving (event loop, called by gmqtt for each message) -------------------------------
    def _on_message(
        self, client: gmqtt.Client, topic: Any, payload: bytes, qos: int, properties: Any
    ) -> None:
        self._take(topic, payload, qos, 0, 0)

    def _take(self, topic: Any, payload: bytes, qos: int, mid: int, gen: int) -> None:
        try:
            size = len(payload)
            if size > self.config.max_message_bytes:
                payload = payload[:KEEP_BYTES]
            if type(topic) is not str:  # gmqtt hands over a topic that is not UTF-8 as bytes
                topic = repr(topic)
            buf = self._buf
            if qos == 0 and len(buf) >= self.config.max_buffered:
                self._overflow(len(buf))
                return
            buf.append(Received(topic, payload, size, qos, mid, gen, time.perf_counter()))
            self.received += 1
            if len(buf) == 1 and self._wake is not None:
                self._wake.set()
        except Exception:  # never let an exception into gmqtt's packet handling
            log.exception("source %s: error taking a message", self.id)

    def _overflow(self, waiting: int) -> None:
        self.dropped_overflow += 1
        now = time.monotonic()
        if now - self._overflow_warned >= 10.0:
            self._overflow_warned = now
            log.warning(
                "source %s: the engine is behind; %d messages waiting, dropping QoS 0 messages "
                "(%d so far, see dropped_overflow)",
                self.id, waiting, self.dropped_overflow,
            )

    # -- handing over (event loop) ------------------------------------------------------------
    async def _emit(self, items: list[Received], out: SourceOutput) -> None:
        cfg = self.config
        batch, dead = parse_messages(
            items, out, max_message_bytes=cfg.max_message_bytes,
            sensor_from_topic=cfg.sensor_from_topic, topic_strip_levels=cfg.topic_strip_levels,
        )
        self.dead_lettered += dead
        if cfg.qos == 0:
            if batch.n:
                await out.emit(batch, None)
            return
        mids = [it.mid for it in items if it.qos == 1]
        self._seq += 1
        if mids:
            # one connection's messages per entry: split when a reconnect happened mid-batch
            gens = {it.gen for it in items if it.qos == 1}
            if len(gens) == 1:
                self._unacked.append((self._seq, gens.pop(), mids))
            else:
                for g in sorted(gens):
                    sel = [it.mid for it in items if it.qos == 1 and it.gen == g]
                    self._unacked.append((self._seq, g, sel))
        # an empty batch still carries the position, so dead letters get acknowledged too
        await out.emit(batch, self._seq)
