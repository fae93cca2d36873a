"""The MQTT forwarder against the real Mosquitto: exact messages, retries, bounded queue."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest

from edgewise.cloud.dataout.mqtt import MqttForwarder
from edgewise.cloud.dataout.setup import forwarders_from_config
from edgewise.errors import ConfigError

pytestmark = pytest.mark.service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Subscriber:
    """A paho subscriber collecting (topic, payload) in its own thread."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect(host, port)
        self.client.loop_start()
        if not subscribed.wait(5):
            raise RuntimeError("the subscriber did not get a SUBACK within 5 s")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # anything extra would show up now
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def prefix() -> str:
    return f"edgewise-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def subscriber(mosquitto: tuple[str, int], prefix: str):
    sub = Subscriber(*mosquitto, f"{prefix}/#")
    yield sub
    sub.close()


def columns(n: int, start: float = 1_764_547_200.0) -> dict[str, np.ndarray]:
    return {
        "sensor": np.array([f"line1/temp/{i % 3:03d}" for i in range(n)], dtype=object),
        "ts": np.round(start + np.arange(n) * 0.02, 2),
        "value": np.round(20.0 + np.arange(n) * 0.25, 2),
        "_accepted": np.zeros(n),  # internal columns never leave
    }


async def test_one_message_per_record(mosquitto, prefix, subscriber) -> None:
    host, port = mosquitto
    fwd = forwarders_from_config(
        {"forwarders": [{"type": "mqtt", "host": host, "port": port,
                         "topic": prefix + "/{node}/{stream}"}]}
    )
    async with fwd:
        await fwd.forward("node-a", "alarms", 40, columns(3))
        await fwd.forward("node-b", "aggregates", 7, columns(2))
        got = await subscriber.wait_for(5)
        stats = fwd.stats()[0]
    assert [(t, orjson.loads(p)) for t, p in got] == [
        (f"{prefix}/node-a/alarms", {"node": "node-a", "stream": "alarms", "seq": 40,
                                     "data": {"sensor": "line1/temp/000",
                                              "ts": 1764547200.0, "value": 20.0}}),
        (f"{prefix}/node-a/alarms", {"node": "node-a", "stream": "alarms", "seq": 41,
                                     "data": {"sensor": "line1/temp/001",
                                              "ts": 1764547200.02, "value": 20.25}}),
        (f"{prefix}/node-a/alarms", {"node": "node-a", "stream": "alarms", "seq": 42,
                                     "data": {"sensor": "line1/temp/002",
                                              "ts": 1764547200.04, "value": 20.5}}),
        (f"{prefix}/node-b/aggregates", {"node": "node-b", "stream": "aggregates", "seq": 7,
                                         "data": {"sensor": "line1/temp/000",
                                                  "ts": 1764547200.0, "value": 20.0}}),
        (f"{prefix}/node-b/aggregates", {"node": "node-b", "stream": "aggregates", "seq": 8,
                                         "data": {"sensor": "line1/temp/001",
                                                  "ts": 1764547200.02, "value": 20.25}}),
    ]
    assert stats["forwarded_chunks"] == 2
    assert stats["forwarded_records"] == 5
    assert stats["messages"] == 5
    assert stats["dropped_chunks"] == 0
    assert stats["errors"] == 0


async def test_one_message_per_chunk_qos0(mosquitto, prefix, subscriber) -> None:
    host, port = mosquitto
    fwd = forwarders_from_config(
        [{"type": "mqtt", "host": host, "port": port, "qos": 0, "per": "chunk",
          "topic": prefix + "/{node}/{stream}"}]
    )
    async with fwd:
        await fwd.forward("n1", "raw", 0, columns(1000))
        got = await subscriber.wait_for(1)
    assert len(got) == 1
    topic, payload = got[0]
    doc = orjson.loads(payload)
    assert topic == f"{prefix}/n1/raw"
    assert (doc["node"], doc["stream"], doc["seq_first"], doc["count"]) == ("n1", "raw", 0, 1000)
    assert [r["value"] for r in doc["records"]] == [round(20.0 + i * 0.25, 2) for i in range(1000)]
    assert doc["records"][999] == {"sensor": "line1/temp/000", "ts": 1764547219.98,
                                   "value": 269.75}


async def test_retries_until_the_broker_is_reachable(mosquitto, prefix, subscriber) -> None:
    """Nothing listens at first; a relay to Mosquitto appears later; every record arrives once."""
    host, port = mosquitto
    relay_port = free_port()
    fwd = forwarders_from_config(
        [{"type": "mqtt", "host": "127.0.0.1", "port": relay_port, "retry_min": 0.05,
          "retry_max": 0.1, "connect_timeout": 1.0, "topic": prefix + "/{node}/{stream}"}]
    )

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    tasks: set[asyncio.Task] = set()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(host, port)
        for t in (asyncio.create_task(pipe(reader, up_w)), asyncio.create_task(pipe(up_r, writer))):
            tasks.add(t)

    async with fwd:
        for i in range(4):
            await fwd.forward("node-r", "alarms", i * 10, columns(10))
        await asyncio.sleep(0.5)
        before = fwd.stats()[0]
        assert before["forwarded_chunks"] == 0
        assert before["errors"] >= 2 and before["retries"] >= 2
        assert before["connected"] is False
        server = await asyncio.start_server(relay, "127.0.0.1", relay_port)
        try:
            got = await subscriber.wait_for(40, timeout=10)
            after = fwd.stats()[0]
        finally:
            server.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()
    seqs = [orjson.loads(p)["seq"] for _t, p in got]
    assert seqs == list(range(40))
    assert after["forwarded_chunks"] == 4
    assert after["forwarded_records"] == 40
    assert after["dropped_chunks"] == 0


async def test_bounded_queue_drops_oldest_and_stop_counts_the_rest() -> None:
    port = free_port()  # nothing listens here
    fwd = forwarders_from_config(
        [{"type": "mqtt", "host": "127.0.0.1", "port": port, "max_queue": 2,
          "retry_min": 0.05, "retry_max": 0.05, "flush_timeout": 0.2}]
    )
    (f,) = fwd.forwarders
    assert isinstance(f, MqttForwarder)
    await fwd.start()
    try:
        for i in range(5):  # no await yields to the worker in between: 3 oldest dropped
            await fwd.forward("n", "s", i * 7, columns(7))
        assert f.stats()["dropped_chunks"] == 3
        assert f.stats()["dropped_records"] == 21
        assert [c.seq_first for c in f._queue] == [21, 28]
    finally:
        await fwd.stop()
    st = f.stats()
    assert st["dropped_chunks"] == 5
    assert st["dropped_records"] == 35
    assert st["forwarded_chunks"] == 0
    assert st["queued_chunks"] == 0
    assert f._task is None
    with contextlib.suppress(RuntimeError):
        await f.forward("n", "s", 0, columns(1))
        pytest.fail("a stopped forwarder must refuse chunks")


def test_bad_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as e:
        forwarders_from_config([{"type": "mqtt", "topic": "a/{sensor}"}])
    assert "only {node} and {stream}" in str(e.value)
    with pytest.raises(ConfigError) as e:
        forwarders_from_config([{"type": "mqtt", "topic": "a/#/{node}"}])
    assert "wildcard" in str(e.value)
    with pytest.raises(ConfigError) as e:
        forwarders_from_config([{"type": "kafka"}])
    assert "forwarders.0" in str(e.value)
    with pytest.raises(ConfigError) as e:
        forwarders_from_config([{"type": "mqtt", "porrt": 1}])
    assert "porrt" in str(e.value)


async def test_committed_chunks_are_forwarded_once_through_the_app(
    mosquitto, prefix, subscriber, tmp_path
) -> None:
    """The control plane's app with data out: only chunks the store inserted leave."""
    from datetime import UTC, datetime

    from aiohttp import web

    from edgewise.cloud.app import create_app
    from edgewise.cloud.bootstrap import bootstrap
    from edgewise.cloud.config import CloudConfig
    from edgewise.cloud.dataout.config import data_out_config
    from edgewise.cloud.dataout.setup import FORWARDERS, setup_data_out
    from edgewise.cloud.state import STORE
    from edgewise.cloud.store import ChunkWrite, Store
    from edgewise.sync import codec

    host, port = mosquitto
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0)
    cfg = data_out_config({"retention": "7d", "forwarders": [
        {"type": "mqtt", "host": host, "port": port, "topic": prefix + "/{node}/{stream}"}]})
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        app = create_app(config, boot.ca, store=store)
        setup_data_out(app, cfg)
        runner = web.AppRunner(app)
        await runner.setup()  # runs the startup contexts: forwarders and retention start
        try:
            now = datetime.now(UTC)
            chunks = [ChunkWrite("n1", "alarms", s, 2, 2, False,
                                 codec.encode({k: v[s:s + 2] for k, v in columns(4).items()}),
                                 now) for s in (0, 2)]
            result = await app[STORE].commit_ingest(chunks)
            assert await app[FORWARDERS].forward_committed(chunks, result.chunks) == 2
            again = await app[STORE].commit_ingest(chunks)  # a resent batch: a duplicate
            assert await app[FORWARDERS].forward_committed(chunks, again.chunks) == 0
            got = await subscriber.wait_for(4)
        finally:
            await runner.cleanup()
    assert [orjson.loads(p)["seq"] for _t, p in got] == [0, 1, 2, 3]
    assert [orjson.loads(p)["data"]["value"] for _t, p in got] == [20.0, 20.25, 20.5, 20.75]
    stats = app[FORWARDERS].stats()[0]
    assert (stats["forwarded_chunks"], stats["queued_chunks"], stats["connected"]) == (2, 0, False)
