"""The MQTT sink against the real Mosquitto: every alarm arrives once, on its own topic, exactly.

The subscriber is paho-mqtt (a different client than the sink's gmqtt, on its own thread)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest

from conftest import make_spec
from edgewise.errors import SpecError
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.sinks.mqtt import MqttConfig, MqttSink
from edgewise.sim.signals import factory_line

N = 30_000
START_TS = 1_764_547_200.0
SEED = 7


def expected_alarms(seed: int = SEED, n: int = N) -> list[dict]:
    sig = factory_line(seed)
    s, ticks, v = sig.readings(0, n)
    above = v > 100.0
    ts = np.round(START_TS + ticks / sig.rate_hz, 6)
    return [
        {"sensor": name, "ts": t, "value": val, "limit": 100.0, "kind": "high",
         "severity": "alarm"}
        for name, t, val in zip(
            sig.names[s[above]].tolist(), ts[above].tolist(), v[above].tolist(), strict=True
        )
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Subscriber:
    """A paho subscriber collecting (topic, payload) from a background thread."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(5):
            raise RuntimeError("the subscriber did not get a SUBACK within 5 s")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # anything extra would show up now
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def prefix() -> str:
    return f"edgewise-test/{uuid.uuid4().hex[:12]}"


def pipeline(tmp_path: Path, sink: str) -> Engine:
    spec = make_spec(
        f"""
        sources:
          - {{id: sim, type: simulator, seed: {SEED}, realtime: false, limit: {N},
              start: {START_TS}}}
        stages:
          - {{id: alarms, type: threshold, inputs: [sim], high: 100.0}}
        sinks:
          - {sink}
        """,
        tmp_path,
    )
    return Engine(spec, tmp_path / "data")


@pytest.mark.service
@pytest.mark.parametrize("qos", [0, 1])
async def test_every_alarm_is_published_on_its_topic(
    mosquitto: tuple[str, int], tmp_path: Path, prefix: str, qos: int
) -> None:
    host, port = mosquitto
    expected = expected_alarms()
    assert len(expected) == 31  # the seeded workload; about 0.1% of readings are above 100.0
    sub = Subscriber(host, port, f"{prefix}/#")
    try:
        engine = pipeline(
            tmp_path,
            f'{{id: local, type: mqtt, inputs: [alarms], host: {host}, port: {port}, '
            f'topic: "{prefix}/alarms/{{sensor}}", qos: {qos}}}',
        )
        summary = await engine.run()
        got = sub.wait_for(len(expected))
    finally:
        sub.close()

    assert len(got) == len(expected)
    received = [(topic, orjson.loads(payload)) for topic, payload in got]
    want = [(f"{prefix}/alarms/{rec['sensor']}", rec) for rec in expected]
    key = lambda tr: (tr[1]["ts"], tr[1]["sensor"])  # noqa: E731
    assert sorted(received, key=key) == sorted(want, key=key)
    for _topic, payload in got:
        assert b"_accepted" not in payload

    st = summary["sinks"]["local"]
    assert summary["alarms"] == len(expected)
    assert st["written"] == len(expected)
    assert st["published"] == len(expected)
    assert st["delivered"] == len(expected)
    assert (st["dropped"], st["errors"], st["queued"]) == (0, 0, 0)
    assert st["latency"]["count"] == len(expected)
    assert 0 < st["latency"]["p50_ms"] < 1000


async def test_broker_unreachable_keeps_the_pipeline_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens here
    expected = expected_alarms()
    engine = pipeline(
        tmp_path,
        f'{{id: local, type: mqtt, inputs: [alarms], port: {port}, max_queue: 10, '
        f'topic: "edgewise-test/alarms/{{sensor}}", qos: 1}}',
    )
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="edgewise.pipeline.sinks.mqtt"):
        summary = await engine.run()
    assert time.monotonic() - t0 < 10

    assert summary["readings_in"] == N
    assert summary["alarms"] == len(expected)
    st = summary["sinks"]["local"]
    assert st["written"] == len(expected)
    assert st["queued"] == 10
    assert st["dropped"] == len(expected) - 10
    assert st["published"] == 0
    assert st["errors"] >= 1
    assert st["connected"] is False
    text = caplog.text
    assert f"cannot reach the MQTT broker at 127.0.0.1:{port}" in text
    assert "the pipeline keeps running" in text
    assert "stopped with 10 message(s) not delivered" in text


@pytest.mark.service
async def test_queued_messages_drain_in_order_once_connected(
    mosquitto: tuple[str, int], tmp_path: Path, prefix: str
) -> None:
    """Records written before the connection is up are kept (newest max_queue) and sent in order."""
    host, port = mosquitto
    sub = Subscriber(host, port, f"{prefix}/#")
    cfg = MqttConfig(host=host, port=port, topic=f"{prefix}/{{kind}}", max_queue=3, qos=1)
    sink = MqttSink("local", cfg, RunContext("t", tmp_path))
    try:
        # not started yet: nothing can be published, the oldest two are dropped
        sink.write(Batch.from_records([{"kind": "a", "value": float(i)} for i in range(5)]))
        assert sink.stats()["queued"] == 3
        assert sink.stats()["dropped"] == 2
        await sink.start()
        sink.write(Batch.from_records([{"kind": "b", "value": np.float64(5.5), "n": 7}]))
        await sink.stop()
        got = sub.wait_for(4)
    finally:
        sub.close()
    assert [(t, orjson.loads(p)) for t, p in got] == [
        (f"{prefix}/a", {"kind": "a", "value": 2.0}),
        (f"{prefix}/a", {"kind": "a", "value": 3.0}),
        (f"{prefix}/a", {"kind": "a", "value": 4.0}),
        (f"{prefix}/b", {"kind": "b", "value": 5.5, "n": 7}),
    ]
    st = sink.stats()
    assert (st["published"], st["delivered"], st["dropped"], st["queued"]) == (4, 4, 2, 0)
    await asyncio.sleep(0.05)  # stop() leaves no task behind (gmqtt's or ours)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


class Proxy:
    """A TCP relay to the broker on a port of its own, which can be switched on later."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []
        self.hold_replies = False  # drop what the broker sends (CONNACK, PUBACKs) while set

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, reply: bool) -> None:
            try:
                while data := await r.read(65536):
                    if reply and self.hold_replies:
                        continue
                    w.write(data)
                    await w.drain()
            except ConnectionError:
                pass
            finally:
                w.close()

        for r, w, reply in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(pipe(r, w, reply))
            self.tasks.add(task)

    def cut(self) -> None:
        """Close every relayed connection (the server keeps listening)."""
        for w in self.writers:
            w.close()
        self.writers.clear()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for w in self.writers:
            w.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.mark.service
async def test_reconnects_in_the_background_and_drains_the_queue(
    mosquitto: tuple[str, int], tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Broker unreachable at start, reachable a moment later: the newest max_queue arrive."""
    sub = Subscriber(*mosquitto, f"{prefix}/#")
    proxy = Proxy(free_port(), mosquitto)
    cfg = MqttConfig(
        port=proxy.port, topic=f"{prefix}/{{kind}}", max_queue=3, qos=1, reconnect_min=0.2
    )
    sink = MqttSink("local", cfg, RunContext("t", tmp_path))
    try:
        with caplog.at_level(logging.INFO, logger="edgewise.pipeline.sinks.mqtt"):
            await sink.start()  # refused: a warning, not an error
            assert sink.stats()["connected"] is False
            sink.write(Batch.from_records([{"kind": "a", "value": float(i)} for i in range(5)]))
            await proxy.start()
            deadline = time.monotonic() + 8
            while sink.stats()["published"] < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            sink.write(Batch.from_records([{"kind": "b", "value": 9.0}]))
            await sink.stop()
        got = sub.wait_for(4)
    finally:
        sub.close()
        await proxy.close()
    assert [(t, orjson.loads(p)["value"]) for t, p in got] == [
        (f"{prefix}/a", 2.0), (f"{prefix}/a", 3.0), (f"{prefix}/a", 4.0), (f"{prefix}/b", 9.0)
    ]
    st = sink.stats()
    assert (st["published"], st["delivered"], st["dropped"], st["queued"]) == (4, 4, 2, 0)
    assert st["errors"] >= 1
    assert f"cannot reach the MQTT broker at 127.0.0.1:{proxy.port}" in caplog.text
    assert "2 dropped while it was unreachable" in caplog.text


@pytest.mark.service
async def test_in_flight_qos1_messages_are_sent_again_after_a_lost_connection(
    mosquitto: tuple[str, int], tmp_path: Path, prefix: str
) -> None:
    """Published, no PUBACK, connection gone: they go out again on the next connection."""
    sub = Subscriber(*mosquitto, f"{prefix}/#")
    proxy = Proxy(free_port(), mosquitto)
    await proxy.start()
    cfg = MqttConfig(port=proxy.port, topic=f"{prefix}/{{kind}}", qos=1, reconnect_min=0.1)
    sink = MqttSink("local", cfg, RunContext("t", tmp_path))
    try:
        await sink.start()
        assert sink.stats()["connected"] is True
        proxy.hold_replies = True  # the broker gets the messages, we never see their PUBACKs
        sink.write(Batch.from_records([{"kind": "a", "value": float(i)} for i in range(3)]))
        # they reach the broker (the proxy runs on this loop: wait without blocking it)
        deadline = time.monotonic() + 5
        while len(sub.messages) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        st = sink.stats()
        assert (st["published"], st["delivered"], st["queued"]) == (3, 0, 3)
        proxy.hold_replies = False
        proxy.cut()
        deadline = time.monotonic() + 8
        while sink.stats()["delivered"] < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await sink.stop()
        got = sub.wait_for(6)
    finally:
        sub.close()
        await proxy.close()
    values = [orjson.loads(p)["value"] for _t, p in got]
    assert values == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]  # at-least-once: each twice, in order
    st = sink.stats()
    assert (st["published"], st["delivered"], st["dropped"], st["queued"]) == (3, 3, 0, 0)


@pytest.mark.service
async def test_more_qos1_messages_than_the_broker_receive_maximum(
    mosquitto: tuple[str, int], tmp_path: Path, prefix: str
) -> None:
    """Mosquitto takes 20 unacknowledged QoS 1 messages per MQTT 5 client (its Receive Maximum);
    the rest of a large write waits in the queue and follows as PUBACKs come back, in order."""
    host, port = mosquitto
    sub = Subscriber(host, port, f"{prefix}/#")
    cfg = MqttConfig(host=host, port=port, topic=f"{prefix}/x", qos=1, max_queue=1000)
    sink = MqttSink("local", cfg, RunContext("t", tmp_path))
    try:
        await sink.start()
        sink.write(Batch.from_records([{"value": float(i)} for i in range(500)]))
        handed = sink.stats()["published"]
        await sink.stop()
        got = sub.wait_for(500)
    finally:
        sub.close()
    assert 0 < handed < 500  # held back by the broker's Receive Maximum at first
    assert [orjson.loads(p)["value"] for _t, p in got] == [float(i) for i in range(500)]
    st = sink.stats()
    assert (st["published"], st["delivered"], st["dropped"], st["queued"]) == (500, 500, 0, 0)


@pytest.mark.service
async def test_missing_topic_field_is_counted_not_raised(
    mosquitto: tuple[str, int], tmp_path: Path, prefix: str
) -> None:
    host, port = mosquitto
    cfg = MqttConfig(host=host, port=port, topic=f"{prefix}/{{line}}/{{sensor}}")
    sink = MqttSink("local", cfg, RunContext("t", tmp_path))
    await sink.start()
    try:
        sink.write(Batch.from_records([{"sensor": "s1", "value": 1.0}]))  # no 'line'
        sink.write(Batch.from_records([{"line": "a+b", "sensor": "s1", "value": 1.0}]))  # wildcard
    finally:
        await sink.stop()
    st = sink.stats()
    assert (st["written"], st["errors"], st["published"], st["queued"]) == (2, 2, 0, 0)


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        ("alarms/{sensor", "is not valid"),
        ("alarms/{}", "name a record field"),
        ("alarms/{0}", "name a record field"),
        ("alarms/{rec.name}", "name a record field"),
        ("alarms/+/{sensor}", "wildcard"),
        ("alarms/#", "wildcard"),
        ("alarms/{_accepted}", "internal field"),
    ],
)
def test_bad_topic_templates_are_spec_errors(topic: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        make_spec(
            f"""
            sources: [{{id: sim, type: simulator, limit: 10}}]
            sinks:
              - id: local
                type: mqtt
                inputs: [sim]
                topic: "{topic}"
            """
        )
    text = str(info.value)
    assert "spec.sinks.0.topic" in text
    assert message in text


def test_other_config_errors_are_spec_errors() -> None:
    with pytest.raises(SpecError) as info:
        make_spec(
            """
            sources: [{id: sim, type: simulator, limit: 10}]
            sinks:
              - {id: local, type: mqtt, inputs: [sim], topic: t, qos: 2, max_queue: 0}
            """
        )
    text = str(info.value)
    assert "spec.sinks.0.qos" in text
    assert "spec.sinks.0.max_queue" in text
    with pytest.raises(SpecError, match="a password needs a username"):
        make_spec(
            """
            sources: [{id: sim, type: simulator, limit: 10}]
            sinks:
              - {id: local, type: mqtt, inputs: [sim], topic: t, password: x}
            """
        )
    with pytest.raises(SpecError, match="reconnect_max must be at least reconnect_min"):
        make_spec(
            """
            sources: [{id: sim, type: simulator, limit: 10}]
            sinks:
              - {id: local, type: mqtt, inputs: [sim], topic: t, reconnect_min: 5s,
                 reconnect_max: 2s}
            """
        )
