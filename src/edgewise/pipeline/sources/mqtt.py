"""MQTT subscriber source: JSON readings from a broker, acknowledged only once durable.

paho-mqtt's network thread receives messages and appends them to a list under a lock; the asyncio
side is woken with ``loop.call_soon_threadsafe`` only when that list goes from empty to non-empty
(one wake per batch, not per message). `run()` takes everything accumulated, parses it in one go
(one orjson call on the fast path) into a `Batch`, stamps each record with the time its message
arrived (``_accepted``) and hands it to the engine.

Delivery (``qos: 1``): the client uses paho's ``manual_ack``. The position emitted with each
batch is a counter; the engine calls `ack()` with it after the batch's records (and dead letters)
are durably committed, and only then are the PUBACKs of every message up to it sent. With
``clean_session: false`` and a fixed ``client_id`` the broker keeps the session, so messages that
were received but not committed when the process died are delivered again after a restart
(at-least-once; the outbox's sequence numbers make the cloud side exactly-once). Acknowledgements
are sent only on the connection that received the message; after a reconnect the broker
redelivers what was not acknowledged.

MQTT 5 is the default protocol: it lets the source announce a Receive Maximum, so the broker may
keep thousands of QoS 1 messages in flight while a commit is running (Mosquitto allows only 20 to a
3.1.1 client, which would cap the rate at 20 messages per commit).

Bad input never stops the source: malformed JSON, a reading with a missing field, a wrong type, a
NaN, or a message over ``max_message_bytes`` becomes a dead letter whose reason names the topic.
QoS 0 messages arriving faster than the engine takes them are held up to ``max_buffered`` and then
dropped and counted (``dropped_overflow``); QoS 1 messages are never dropped, the broker's flow
control (Receive Maximum) bounds them.

Connection: an unreachable broker, at start or later, is retried with exponential backoff
(``reconnect_min``..``reconnect_max``) and logged; a broker that refuses the credentials before
the first successful connection is a configuration error that ends the run.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import Field, field_validator, model_validator

from edgewise.errors import ConfigError
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import ComponentConfig, RunContext, Source, SourceOutput
from edgewise.pipeline.sources.parse import readings_from_dicts
from edgewise.pipeline.units import ByteSize, Duration

log = logging.getLogger(__name__)

KEEP_BYTES = 4096  # of an oversize message, only this much is kept (for its dead letter)
# CONNACK reason codes that retrying will not fix: the configuration has to change
REFUSED_FOR_GOOD = {
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8A: "banned",
    0x8C: "bad authentication method",
}


class MqttConfig(ComponentConfig):
    topics: list[str] = Field(min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    qos: Literal[0, 1] = 0
    clean_session: bool = True
    """false keeps the broker session (subscriptions and unacknowledged QoS 1 messages) across
    restarts; needs a fixed client_id."""
    session_expiry: Duration = 7 * 86400.0
    """MQTT 5: how long the broker keeps a session (clean_session: false) while disconnected."""
    protocol: Literal["5", "3.1.1"] = "5"
    receive_maximum: int = Field(default=10_000, ge=1, le=65535)
    """MQTT 5: QoS 1 messages the broker may have in flight to us (received, not yet acked)."""
    keepalive: int = Field(default=30, ge=5, le=65535)  # seconds
    reconnect_min: Duration = 0.5
    reconnect_max: Duration = 30.0
    payload: Literal["json"] = "json"
    max_message_bytes: ByteSize = 1 << 20
    sensor_from_topic: bool = False
    """Readings without a 'sensor' field are named after their topic."""
    topic_strip_levels: int = Field(default=0, ge=0)
    """With sensor_from_topic: leading topic levels to drop (1: factory/line1/t/1 -> line1/t/1)."""
    batch: int = Field(default=8192, ge=1, le=1_000_000)  # messages per emitted batch, at most
    linger: Duration = 0.005
    """Wait this long after a batch's first message for more to arrive. Fewer, larger batches
    cost less per message: at 10,000 msg/s (benchmarks/mqtt_clients.py, 2 cores) 5ms cut the CPU
    per message by a quarter to a half, and without it QoS 1 did not keep up. Costs up to that
    much latency; 0 hands each wake-up's messages over at once."""
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
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be at least reconnect_min")
        if self.topic_strip_levels and not self.sensor_from_topic:
            raise ValueError("topic_strip_levels only applies with sensor_from_topic: true")
        return self


class _Item:
    """One received message, as the network thread hands it over."""

    __slots__ = ("accepted", "gen", "mid", "payload", "qos", "size", "topic")

    def __init__(
        self, topic: str, payload: bytes, size: int, qos: int, mid: int, gen: int, accepted: float
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.size = size
        self.qos = qos
        self.mid = mid
        self.gen = gen
        self.accepted = accepted


class MqttSource(Source):
    Config = MqttConfig

    def __init__(self, id: str, config: MqttConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.client_id = config.client_id or f"edgewise-{ctx.pipeline}-{id}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._buf: list[_Item] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._client: Any = None
        self._fatal: ConfigError | None = None
        self._gen = 0  # connection generation: bumped on every successful connect
        self._seq = 0  # position counter
        self._unacked: collections.deque[tuple[int, int, list[int]]] = collections.deque()
        self._ever_connected = False
        self._fail_streak = 0
        self._overflow_warned = -1e9
        # counters (written by the network thread or the loop, read anywhere)
        self.received = 0
        self.dead_lettered = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.dropped_overflow = 0
        self.acked = 0
        self.connected = False
        self.subscribed = False

    # -- engine interface ---------------------------------------------------------------------
    def restore(self, position: Any) -> None:
        # positions only order this process's acknowledgements; continue above the saved one so
        # the engine's first ack (of the restored position) acknowledges nothing new
        if isinstance(position, int):
            self._seq = position

    def ack(self, position: Any) -> None:
        client = self._client
        gen = self._gen
        unacked = self._unacked
        while unacked and unacked[0][0] <= position:
            _, msg_gen, mids = unacked.popleft()
            if client is None or msg_gen != gen:
                continue  # that connection is gone; the broker redelivers these
            for mid in mids:
                client.ack(mid, 1)
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
        self._loop = asyncio.get_running_loop()
        self._wake = wake = asyncio.Event()
        client = self._make_client()
        cfg = self.config
        try:
            client.connect_async(cfg.host, cfg.port, cfg.keepalive, **self._connect_args())
        except ValueError as exc:
            raise ConfigError(
                f"source {self.id!r}: cannot use {cfg.host}:{cfg.port}: {exc}"
            ) from None
        self._client = client
        client.loop_start()
        try:
            while True:
                await wake.wait()
                if cfg.linger and len(self._buf) < cfg.batch:
                    await asyncio.sleep(cfg.linger)  # gather more messages into this batch
                wake.clear()
                if self._fatal is not None:
                    raise self._fatal
                with self._lock:
                    items, self._buf = self._buf, []
                for i in range(0, len(items), cfg.batch):
                    await self._emit(items[i : i + cfg.batch], out)
        finally:
            self._client = None
            self.connected = self.subscribed = False
            client.disconnect()
            client.loop_stop()  # the thread ends within milliseconds once disconnecting

    # -- paho side (network thread) -----------------------------------------------------------
    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt

        cfg = self.config
        v5 = cfg.protocol == "5"
        kwargs: dict[str, Any] = {}
        if not v5:
            kwargs["clean_session"] = cfg.clean_session
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            manual_ack=cfg.qos == 1,
            **kwargs,
        )
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        client.reconnect_delay_set(cfg.reconnect_min, cfg.reconnect_max)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect_args(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.protocol != "5":
            return {}
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = cfg.receive_maximum
        if not cfg.clean_session:
            props.SessionExpiryInterval = min(int(cfg.session_expiry), 0xFFFFFFFF)
        return {"clean_start": cfg.clean_session, "properties": props}

    def _where(self) -> str:
        return f"MQTT broker {self.config.host}:{self.config.port}"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        try:
            if rc.is_failure:
                self.connect_failures += 1
                if rc.value in REFUSED_FOR_GOOD and not self._ever_connected:
                    self._fatal = ConfigError(
                        f"source {self.id!r}: {self._where()} refused the connection: "
                        f"{REFUSED_FOR_GOOD[rc.value]}; check username, password and client_id"
                    )
                    self._wake_loop()
                    return
                log.warning("source %s: %s refused the connection: %s; retrying",
                            self.id, self._where(), rc)
                return
            self._gen += 1
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
            client.subscribe([(t, self.config.qos) for t in self.config.topics])
        except Exception:  # never let an exception kill paho's network thread
            log.exception("source %s: error in on_connect", self.id)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        bad = [str(c) for c in codes if c.is_failure]
        if bad:
            log.warning("source %s: the broker refused subscriptions to %s: %s",
                        self.id, self.config.topics, ", ".join(bad))
        else:
            self.subscribed = True
            log.info("source %s: subscribed to %s", self.id, ", ".join(self.config.topics))

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self.connect_failures += 1
        self._fail_streak += 1
        if self._fail_streak == 1:
            log.warning(
                "source %s: cannot connect to %s; retrying with backoff (up to every %gs)",
                self.id, self._where(), self.config.reconnect_max,
            )

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        was = self.connected
        self.connected = self.subscribed = False
        if rc.is_failure and was:
            log.warning("source %s: lost the connection to %s (%s); reconnecting",
                        self.id, self._where(), rc)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            payload = msg.payload
            size = len(payload)
            if size > self.config.max_message_bytes:
                payload = payload[:KEEP_BYTES]
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                topic = repr(msg._topic)
            item = _Item(topic, payload, size, msg.qos, msg.mid, self._gen, time.perf_counter())
            with self._lock:
                buf = self._buf
                if msg.qos == 0 and len(buf) >= self.config.max_buffered:
                    self.dropped_overflow += 1
                    now = time.monotonic()
                    if now - self._overflow_warned >= 10.0:
                        self._overflow_warned = now
                        log.warning(
                            "source %s: the engine is behind; %d messages waiting, dropping "
                            "QoS 0 messages (%d so far, see dropped_overflow)",
                            self.id, len(buf), self.dropped_overflow,
                        )
                    return
                buf.append(item)
                first = len(buf) == 1
            self.received += 1
            if first:
                self._wake_loop()
        except Exception:
            log.exception("source %s: error in on_message", self.id)

    def _wake_loop(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop is closed: we are shutting down
            pass

    # -- asyncio side -------------------------------------------------------------------------
    async def _emit(self, items: list[_Item], out: SourceOutput) -> None:
        batch = self._parse(items, out)
        if self.config.qos == 0:
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

    def _parse(self, items: list[_Item], out: SourceOutput) -> Batch:
        """Readings of ``items``; what cannot be used goes to dead letters, in message order."""
        cfg = self.config
        limit = cfg.max_message_bytes
        dead: list[tuple[int, int, str, bytes]] = []  # (message, record, reason, raw)
        good = [i for i, it in enumerate(items) if it.size <= limit]
        if len(good) != len(items):
            for i, it in enumerate(items):
                if it.size > limit:
                    dead.append((i, 0, f"message is {it.size} bytes, over max_message_bytes="
                                       f"{limit}; dropped", it.payload))
        recs: list[Any] = []
        owners: list[int] = []  # the message (index in ``items``) each record came from
        docs: Any = None
        if good:
            try:
                docs = orjson.loads(b"[" + b",".join(items[i].payload for i in good) + b"]")
            except orjson.JSONDecodeError:
                pass
        if (
            isinstance(docs, list)
            and len(docs) == len(good)
            and all(type(d) is dict for d in docs)
        ):
            recs = docs
            owners = good
        else:
            for i in good:
                payload = items[i].payload
                try:
                    doc = orjson.loads(payload)
                except orjson.JSONDecodeError as exc:
                    dead.append((i, 0, f"malformed JSON: {exc}", payload))
                    continue
                if isinstance(doc, list):
                    recs.extend(doc)
                    owners.extend([i] * len(doc))
                elif isinstance(doc, dict):
                    recs.append(doc)
                    owners.append(i)
                else:
                    dead.append((i, 0, "expected a JSON object or an array of objects, got "
                                       f"{type(doc).__name__}", payload))
        if cfg.sensor_from_topic:
            skip = cfg.topic_strip_levels
            for rec, i in zip(recs, owners, strict=True):
                if type(rec) is dict and "sensor" not in rec:
                    topic = items[i].topic
                    rec["sensor"] = topic.split("/", skip)[-1] if skip else topic
        batch, bad = readings_from_dicts(recs)
        if bad:
            per_message = collections.Counter(owners)
            for j, reason in bad:
                i = owners[j]
                # a message holding one reading keeps its raw payload; an array, the one record
                raw = items[i].payload
                if per_message[i] > 1:
                    raw = orjson.dumps(recs[j], default=str)
                dead.append((i, j, reason, raw))
        if dead:
            dead.sort(key=lambda d: (d[0], d[1]))
            for i, _, reason, raw in dead:
                self.dead_lettered += 1
                out.dead_letter(f"topic {items[i].topic}: {reason}", raw)
        if batch.n:
            accepted = np.fromiter((items[i].accepted for i in owners), np.float64, len(owners))
            if bad:
                keep = np.ones(len(owners), dtype=bool)
                keep[[j for j, _ in bad]] = False
                accepted = accepted[keep]
            batch = batch.with_columns(**{ACCEPTED: accepted})
        return batch
