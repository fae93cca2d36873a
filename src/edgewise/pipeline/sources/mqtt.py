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

Connection (`MqttLink`, shared with the MQTT sink): one task of ours connects, waits for the
connection to end and reconnects with exponential backoff (``reconnect_min``..``reconnect_max``),
logging each outage once. Every attempt uses a fresh gmqtt client, whose own reconnect is switched
off: gmqtt reconnects with a fixed delay, always without a clean start, and from a task nobody
owns, which reconnects even after ``disconnect()`` (docs/decisions/0005-mqtt-client.md). An
unreachable broker, at start or later, is retried in the background; a broker that refuses the
credentials before the first successful connection is a configuration error that ends the run.

gmqtt internals this relies on (checked by `gmqtt_handler` whenever a client is made, so a gmqtt
that changed them fails at start with a clear error; tests/integration/test_source_mqtt.py guards
them too): the client's ``_package_handler`` calls ``client.reconnect(delay=True)`` when a
connection ends, passes each inbound QoS 1 PUBLISH to ``_handle_qos_1_publish_packet(mid, packet,
print_topic, properties)`` (the only place the packet id is known; with a plain on_message and
``optimistic_acknowledgement=False`` gmqtt then sends no PUBACK) and sends a PUBACK with
``_send_puback(mid, reason_code=0)``.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time
import uuid
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal, Protocol

import gmqtt
import numpy as np
import orjson
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.mqtt.handler import MQTTConnectError
from pydantic import Field, field_validator, model_validator

from edgewise.errors import ConfigError
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import ComponentConfig, RunContext, Source, SourceOutput
from edgewise.pipeline.sources.parse import readings_from_dicts
from edgewise.pipeline.units import ByteSize, Duration

log = logging.getLogger(__name__)

GMQTT_TESTED = ">=0.8,<0.9"  # the gmqtt versions whose internals (below) were checked
KEEP_BYTES = 4096  # of an oversize message, only this much is kept (for its dead letter)
CONNECT_TIMEOUT_S = 10.0  # one connection attempt of the source: TCP connect until CONNACK
CLOSE_TIMEOUT_S = 2.0  # waiting for our DISCONNECT to close the socket
# CONNACK reason codes that retrying will not fix: the configuration has to change
REFUSED_FOR_GOOD = {
    5: {
        0x85: "client identifier not valid",
        0x86: "bad user name or password",
        0x87: "not authorized",
        0x8A: "banned",
        0x8C: "bad authentication method",
    },
    4: {  # MQTT 3.1.1 return codes
        2: "client identifier rejected",
        4: "bad user name or password",
        5: "not authorized",
    },
}


# -- gmqtt glue (also used by the MQTT sink) ----------------------------------------------------
class GmqttClient(gmqtt.Client):
    """gmqtt's client without its own reconnect: `MqttLink` reconnects instead."""

    async def reconnect(self, delay: bool = False) -> None:
        """gmqtt calls this when a connection ends; our link task takes care of it."""
        return None


def gmqtt_version() -> str:
    try:
        return version("gmqtt")
    except PackageNotFoundError:  # pragma: no cover - an unpackaged checkout
        return str(getattr(gmqtt, "__version__", "?"))


_HOOKS = {  # private gmqtt methods we call or replace, with the parameters we rely on
    "_handle_qos_1_publish_packet": ["mid", "packet", "print_topic", "properties"],
    "_send_puback": ["mid", "reason_code"],
}


def gmqtt_handler(client: gmqtt.Client, who: str, manual_ack: bool) -> Any:
    """gmqtt's packet handler of ``client``, once the private parts we rely on are checked.

    Raises ConfigError naming what is missing when the installed gmqtt differs from the ones
    tested (``GMQTT_TESTED``): better to refuse at start than to lose acknowledgements.
    """
    missing = []
    handler = getattr(client, "_package_handler", None)
    if handler is None:
        missing.append("Client._package_handler")
    else:
        callback = getattr(handler, "_reconnect_callback", None)
        if getattr(callback, "__func__", None) is not GmqttClient.reconnect:
            missing.append("MqttPackageHandler._reconnect_callback = Client.reconnect")
        if manual_ack:
            for name, params in _HOOKS.items():
                fn = getattr(handler, name, None)
                if not callable(fn) or list(inspect.signature(fn).parameters) != params:
                    missing.append(f"MqttPackageHandler.{name}({', '.join(params)})")
    if missing:
        raise ConfigError(
            f"{who}: the installed gmqtt {gmqtt_version()} does not have {'; '.join(missing)}, "
            f"which Edgewise relies on; install a tested version: pip install 'gmqtt{GMQTT_TESTED}'"
        )
    return handler


def refused_for_good(exc: MQTTConnectError, protocol: int) -> str | None:
    """Why the broker refused, when retrying will not help (else None)."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    return REFUSED_FOR_GOOD[protocol].get(code) if code is not None else None


class LinkEvents(Protocol):
    """What `MqttLink` tells its owner, on the event loop."""

    def link_connected(self, client: gmqtt.Client) -> None: ...

    def link_failed(self, client: gmqtt.Client, error: Exception) -> None:
        """An attempt failed: OSError, TimeoutError or MQTTConnectError. May raise to end."""

    def link_lost(self, client: gmqtt.Client) -> None: ...


def _setter(event: asyncio.Event) -> Callable[..., None]:
    return lambda *_: event.set()


class MqttLink:
    """Keeps one MQTT connection up from one task (`run`); cancel the task to disconnect.

    Each attempt uses a fresh client from ``make_client`` (a `GmqttClient`), so a connection's
    state (packet ids, in-flight messages, callbacks) never leaks into the next one. After a
    failed attempt it waits ``reconnect_min``, doubling up to ``reconnect_max``; after a lost
    connection it waits ``reconnect_min`` again.
    """

    def __init__(
        self,
        make_client: Callable[[], gmqtt.Client],
        events: LinkEvents,
        *,
        host: str,
        port: int,
        keepalive: int,
        protocol: int,
        connect_timeout: float,
        reconnect_min: float,
        reconnect_max: float,
    ) -> None:
        self.make_client = make_client
        self.events = events
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.protocol = protocol
        self.connect_timeout = connect_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max

    async def run(self) -> None:
        delay = self.reconnect_min
        client: gmqtt.Client | None = None
        lost = asyncio.Event()
        open_ = False  # may the client's socket be open (so it needs our DISCONNECT)
        try:
            while True:
                client = self.make_client()
                lost = asyncio.Event()
                client.on_disconnect = _setter(lost)  # bound now: old clients may call late
                open_ = True
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        await client.connect(
                            self.host, self.port, keepalive=self.keepalive, version=self.protocol
                        )
                except TimeoutError as exc:  # TCP or CONNACK too slow: close what is open
                    await self._close(client)
                    open_ = False
                    self.events.link_failed(client, exc)
                except (OSError, MQTTConnectError) as exc:
                    if client.is_connected:  # refused, and the broker left the socket open
                        await self._close(client)
                    open_ = False
                    self.events.link_failed(client, exc)
                else:
                    delay = self.reconnect_min
                    self.events.link_connected(client)
                    await lost.wait()
                    open_ = False
                    self.events.link_lost(client)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max)
        finally:
            if client is not None and open_ and not lost.is_set():
                await self._close(client)

    @staticmethod
    async def _close(client: gmqtt.Client) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await client.disconnect()
        except (OSError, TimeoutError) as exc:
            log.debug("closing an MQTT connection: %r", exc)


# -- the source ---------------------------------------------------------------------------------
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
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be at least reconnect_min")
        if self.topic_strip_levels and not self.sensor_from_topic:
            raise ValueError("topic_strip_levels only applies with sensor_from_topic: true")
        return self


class _Item:
    """One received message, as `MqttSource._take` keeps it."""

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
        self._protocol = MQTTv50 if config.protocol == "5" else MQTTv311
        self._buf: list[_Item] = []
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
            connect_timeout=CONNECT_TIMEOUT_S, reconnect_min=cfg.reconnect_min,
            reconnect_max=cfg.reconnect_max,
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
            buf.append(_Item(topic, payload, size, qos, mid, gen, time.perf_counter()))
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
