"""The MQTT source against real Mosquitto brokers: the shared one on 127.0.0.1:1883, and private
ones started here on free ports for outages, credentials and crash recovery. The test's own
publisher is paho-mqtt (a different client than the source's gmqtt, on its own thread)."""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from gmqtt.mqtt.handler import MqttPackageHandler
from gmqtt.mqtt.package import Package

from conftest import make_spec
from edgewise.errors import ConfigError, SpecError
from edgewise.outbox import Outbox
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.sources.mqtt_link import GmqttClient, gmqtt_handler

pytestmark = [pytest.mark.service, pytest.mark.timeout(60)]


# -- helpers ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A private Mosquitto on a free 127.0.0.1 port (so tests may stop and restart it)."""

    def __init__(self, tmp: Path, port: int | None = None, extra: str = "") -> None:
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto binary not installed")
        self.port = port or free_port()
        self.conf = tmp / f"mosquitto-{self.port}.conf"
        # 'user': when the tests run as root, do not switch to the mosquitto user (which could
        # not read files under the test's private tmp directory)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\npersistence false\nuser {getpass.getuser()}\n"
            f"{extra or 'allow_anonymous true'}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        err = b""
        if self.proc.poll() is not None and self.proc.stderr is not None:
            err = self.proc.stderr.read()
        self.stop()
        raise RuntimeError(f"private mosquitto did not start on port {self.port}: {err!r}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    made: list[Broker] = []

    def make(**kw: Any) -> Broker:
        b = Broker(tmp_path, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


class Publisher:
    """A paho client publishing from the test (its own network thread)."""

    def __init__(self, port: int = 1883) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4()}")
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def reading(sensor: str, ts: float, value: float) -> bytes:
    return orjson.dumps({"sensor": sensor, "ts": ts, "value": value})


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.02)


def spec_for(topic: str, port: int = 1883, extra: str = "", stream: str = "raw") -> str:
    return f"""
        sources:
          - id: mq
            type: mqtt
            port: {port}
            topics: ["{topic}"]
            {extra}
        sinks:
          - id: {stream}
            type: outbox
            inputs: [mq]
    """


def outbox_records(data: Path, stream: str = "raw") -> dict[str, Any]:
    with Outbox(data / "outbox.db") as ob:
        return ob.read_stream(stream)


def dead_letters(data: Path) -> list[dict[str, Any]]:
    with Outbox(data / "outbox.db") as ob:
        return list(reversed(ob.dead_letters(1000)))


# -- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("qos", [0, 1])
async def test_readings_dead_letters_and_later_messages(
    mosquitto: tuple[str, int], tmp_path: Path, qos: int
) -> None:
    base = f"edgewise-test/{uuid.uuid4().hex[:8]}/factory"
    spec = make_spec(
        spec_for(f"{base}/#", extra=f"qos: {qos}\n            sensor_from_topic: true\n"
                 "            topic_strip_levels: 3"),
        tmp_path,
    )
    data = tmp_path / "data"
    engine = Engine(spec, data)
    task = asyncio.create_task(engine.run())
    src = engine.sources["mq"]
    await wait_for(lambda: src.stats()["subscribed"], what="subscription")
    pub = Publisher()
    try:
        expected: list[tuple[str, float, float]] = []
        for i in range(100):  # one reading per message
            s = f"line1/temp/{i % 10:03d}"
            pub.send(f"{base}/{s}", reading(s, 1764547200.0 + i / 50, round(60 + i * 0.25, 2)), qos)
            expected.append((s, 1764547200.0 + i / 50, round(60 + i * 0.25, 2)))
        # an array of readings in one message
        arr = [{"sensor": "line1/pressure/001", "ts": 1764547300.0 + k, "value": 1.5 * k}
               for k in range(5)]
        pub.send(f"{base}/line1/pressure/001", orjson.dumps(arr), qos)
        expected += [(r["sensor"], r["ts"], r["value"]) for r in arr]
        # no sensor in the payload: named after the topic minus 3 levels
        pub.send(f"{base}/line1/vibration/007", b'{"ts": 1764547400.5, "value": 3.25}', qos)
        expected.append(("line1/vibration/007", 1764547400.5, 3.25))

        bad_topic = f"{base}/bad/x"
        pub.send(bad_topic, b'{"sensor": "a", "ts": 1, "value": ', qos)  # malformed
        pub.send(bad_topic, b'{"sensor": "a", "ts": 1, "value": "hot"}', qos)  # wrong type
        pub.send(bad_topic, b'{"sensor": "a", "ts": 1, "value": NaN}', qos)  # NaN
        pub.send(bad_topic, b'{"sensor": "a", "value": 2.0}', qos)  # missing ts
        pub.send(bad_topic, b'"just a string"', qos)
        big = b'{"sensor": "a", "ts": 1, "value": 1, "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
        pub.send(bad_topic, big, qos)  # 10 MiB
        # one bad record inside an array: the rest of the array still counts
        pub.send(f"{base}/line1/temp/099", orjson.dumps(
            [{"sensor": "line1/temp/099", "ts": 1764547500.0, "value": 7.0},
             {"sensor": "line1/temp/099", "ts": 1764547501.0, "value": None}]), qos)
        expected.append(("line1/temp/099", 1764547500.0, 7.0))

        # the pipeline is still running: later good messages count
        await asyncio.sleep(0.3)
        assert not task.done()
        for i in range(50):
            s = f"line1/temp/{i % 5:03d}"
            pub.send(f"{base}/{s}", reading(s, 1764547600.0 + i, float(i)), qos)
            expected.append((s, 1764547600.0 + i, float(i)))
        await wait_for(lambda: engine.summary()["readings_in"] >= len(expected), what="readings")
        await asyncio.sleep(0.2)  # nothing more is coming
    finally:
        pub.close()
        engine.stop()
        summary = await task

    assert summary["readings_in"] == len(expected) == 157
    stats = summary["sources"]["mq"]
    assert stats["received"] == 100 + 1 + 1 + 6 + 1 + 50
    assert stats["dead_lettered"] == 7
    assert stats["reconnects"] == 0
    cols = outbox_records(data)
    got = list(zip(cols["sensor"].tolist(), cols["ts"].tolist(), cols["value"].tolist(),
                   strict=True))
    assert got == expected
    assert "_accepted" not in cols

    letters = dead_letters(data)
    assert len(letters) == 7
    reasons = [d["reason"] for d in letters]
    for r in reasons[:6]:
        assert r.startswith(f"topic {bad_topic}: "), r
    assert "malformed JSON" in reasons[0]
    assert "field 'value' is 'hot' (str), expected a number" in reasons[1]
    assert "malformed JSON" in reasons[2]  # JSON has no NaN: such a payload is not JSON
    assert "missing field 'ts'" in reasons[3]
    assert "expected a JSON object or an array of objects, got str" in reasons[4]
    assert f"is {len(big)} bytes, over max_message_bytes=1048576" in reasons[5]
    assert letters[5]["size"] == 4096  # only the head of the 10 MiB message is kept
    assert reasons[6].startswith(f"topic {base}/line1/temp/099: field 'value' is None")
    assert orjson.loads(letters[6]["payload"]) == {
        "sensor": "line1/temp/099", "ts": 1764547501.0, "value": None}


@pytest.mark.parametrize("linger", [0.0, 0.2])
async def test_accept_time_is_stamped_per_message(
    mosquitto: tuple[str, int], tmp_path: Path, linger: float
) -> None:
    """``_accepted`` is the arrival time of each message, before the engine saw the batch; with
    ``linger`` the first message of a batch waits that long for the others."""
    topic = f"edgewise-test/{uuid.uuid4().hex[:8]}/t"
    spec = make_spec(f"""
        sources:
          - id: mq
            type: mqtt
            topics: ["{topic}"]
            linger: {linger}
        sinks:
          - id: out
            type: log
            inputs: [mq]
    """, tmp_path)
    engine = Engine(spec, tmp_path / "data")
    seen: list[Any] = []
    sink = engine.sinks["out"]
    original = sink.write

    def spy(batch: Any) -> None:
        seen.append((time.perf_counter(), batch["_accepted"].copy()))
        original(batch)

    sink.write = spy  # type: ignore[method-assign]
    task = asyncio.create_task(engine.run())
    await wait_for(lambda: engine.sources["mq"].stats()["subscribed"], what="subscription")
    pub = Publisher()
    before = time.perf_counter()
    try:
        for i in range(20):
            pub.send(topic, reading("s", 1764547200 + i, float(i)), qos=0)
        await wait_for(lambda: engine.summary()["readings_in"] == 20, what="readings")
    finally:
        pub.close()
        engine.stop()
        await task
    stamps = [float(x) for _, acc in seen for x in acc]
    assert len(stamps) == 20
    assert stamps == sorted(stamps)
    assert before < stamps[0]
    for written_at, acc in seen:
        assert (acc <= written_at).all()
    if linger:
        assert len(seen) == 1  # all 20 arrived within the linger: one batch
        assert seen[0][0] - stamps[0] >= linger


async def test_unreachable_at_start_then_outage_and_reconnect(
    tmp_path: Path, broker_factory: Callable[..., Broker], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edgewise.pipeline.sources.mqtt")
    broker = broker_factory()
    topic = "plant/t"
    spec = make_spec(
        spec_for(topic, port=broker.port,
                 extra="qos: 1\n            reconnect_min: 0.1\n            reconnect_max: 0.3"),
        tmp_path,
    )
    data = tmp_path / "data"
    engine = Engine(spec, data)
    task = asyncio.create_task(engine.run())
    src = engine.sources["mq"]
    try:
        # nothing listens yet: the pipeline keeps running and keeps trying
        await wait_for(lambda: src.stats()["connect_failures"] >= 2, what="retries")
        assert not task.done()
        assert any("cannot connect to MQTT broker" in r.getMessage() for r in caplog.records)

        broker.start()
        await wait_for(lambda: src.stats()["subscribed"], what="first connection")
        pub = Publisher(broker.port)
        for i in range(10):
            pub.send(topic, reading("s", 1764547200 + i, float(i)))
        pub.close()
        await wait_for(lambda: engine.summary()["readings_in"] == 10, what="first readings")

        broker.stop()  # outage
        await wait_for(lambda: not src.stats()["connected"], what="disconnect")
        await asyncio.sleep(0.5)
        assert not task.done()
        broker.start()
        await wait_for(lambda: src.stats()["subscribed"], what="reconnection")
        pub = Publisher(broker.port)
        for i in range(10, 25):
            pub.send(topic, reading("s", 1764547200 + i, float(i)))
        pub.close()
        await wait_for(lambda: engine.summary()["readings_in"] == 25, what="later readings")
    finally:
        engine.stop()
        summary = await asyncio.wait_for(task, 10)
    stats = summary["sources"]["mq"]
    assert stats["reconnects"] == 1
    assert stats["received"] == 25
    assert outbox_records(data)["value"].tolist() == [float(i) for i in range(25)]
    assert any("lost the connection" in r.getMessage() for r in caplog.records)
    assert any("reconnected to MQTT broker" in r.getMessage() for r in caplog.records)
    # no task left behind (gmqtt's own reconnect task would still be sleeping here)
    await asyncio.sleep(0.05)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_refused_credentials_are_a_config_error(
    tmp_path: Path, broker_factory: Callable[..., Broker]
) -> None:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed")
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "edge", "s3cret"], check=True)
    broker = broker_factory(extra=f"allow_anonymous false\npassword_file {pw}").start()
    spec = make_spec(
        spec_for("t", port=broker.port, extra="username: edge\n            password: wrong"),
        tmp_path,
    )
    with pytest.raises(ConfigError, match=r"refused the connection: .*(not authorized|bad user)"):
        await asyncio.wait_for(Engine(spec, tmp_path / "data").run(), 10)

    spec = make_spec(
        spec_for("t", port=broker.port, extra="username: edge\n            password: s3cret"),
        tmp_path,
    )
    engine = Engine(spec, tmp_path / "data2")
    task = asyncio.create_task(engine.run())
    await wait_for(lambda: engine.sources["mq"].stats()["subscribed"], what="login")
    engine.stop()
    await task


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="clean_session: false needs a fixed client_id"):
        make_spec(spec_for("t", extra="clean_session: false"), tmp_path)
    with pytest.raises(SpecError, match="'#' must be a whole level and the last one"):
        make_spec(spec_for("a/#/b"), tmp_path)
    with pytest.raises(SpecError, match="qos"):
        make_spec(spec_for("a", extra="qos: 2"), tmp_path)


# -- the gmqtt internals the source relies on ----------------------------------------------------
class _FakeConnection:
    """Stands in for gmqtt's MQTTConnection: records the packets-with-id the client sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, bool, int]] = []

    def send_command_with_mid(self, cmd: int, mid: int, dup: bool, reason_code: int = 0) -> None:
        self.sent.append((cmd, mid, dup, reason_code))

    def is_closing(self) -> bool:
        return False


def publish_packet(topic: str, mid: int, payload: bytes) -> Package:
    """An inbound MQTT 5 QoS 1 PUBLISH as gmqtt's reader hands it to the handler."""
    raw = topic.encode()
    return Package(0x32, struct.pack("!H", len(raw)) + raw + struct.pack("!H", mid) + b"\x00"
                   + payload)


def test_gmqtt_internals_the_source_relies_on(tmp_path: Path) -> None:
    """Fails when a gmqtt release changes what QoS 1 acknowledgements depend on: the packet id of
    each inbound QoS 1 message reaches the source, no PUBACK goes out by itself, and the PUBACK
    method sends exactly one PUBACK for that id; gmqtt's own reconnect is replaced by ours."""
    spec = make_spec(spec_for("plant/#", extra="qos: 1"), tmp_path)
    src = Engine(spec, tmp_path / "data").sources["mq"]
    src._wake = asyncio.Event()
    gmqtt_handler(GmqttClient("x"), "test", manual_ack=True)  # what _new_client checks
    client = src._new_client()
    assert isinstance(client, GmqttClient)
    handler = client._package_handler
    assert handler._reconnect_callback.__func__ is GmqttClient.reconnect
    conn = _FakeConnection()
    client._connection = conn  # what the PUBACK method writes to

    handler(publish_packet("plant/s1", 4242, reading("s1", 1764547200.0, 1.5)))
    handler(publish_packet("plant/s2", 7, reading("s2", 1764547200.0, 2.5)))
    assert [(it.topic, it.mid, it.qos, it.gen) for it in src._buf] == [
        ("plant/s1", 4242, 1, src._gen), ("plant/s2", 7, 1, src._gen)]
    assert orjson.loads(src._buf[0].payload) == {"sensor": "s1", "ts": 1764547200.0, "value": 1.5}
    assert conn.sent == []  # nothing acknowledged before the commit

    src._puback(4242)
    assert conn.sent == [(0x40, 4242, False, 0)]  # PUBACK, packet id 4242, success


def test_a_gmqtt_without_those_internals_is_a_clear_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = GmqttClient("x")
    gmqtt_handler(client, "source 'mq'", manual_ack=True)  # the installed gmqtt has them
    monkeypatch.delattr(MqttPackageHandler, "_send_puback")  # as if a release renamed it
    with pytest.raises(ConfigError) as info:
        gmqtt_handler(client, "source 'mq'", manual_ack=True)
    text = str(info.value)
    assert "source 'mq': the installed gmqtt" in text
    assert "MqttPackageHandler._send_puback(mid, reason_code)" in text
    assert "pip install 'gmqtt>=" in text
    gmqtt_handler(client, "source 'mq'", manual_ack=False)  # QoS 0 does not need it


async def test_acknowledged_messages_are_not_delivered_again(
    tmp_path: Path, broker_factory: Callable[..., Broker]
) -> None:
    """PUBACKs carry the right packet ids: after a clean restart of a persistent session the
    broker delivers only what arrived while the pipeline was down, nothing it already had."""
    broker = broker_factory().start()
    client_id = f"edgewise-ack-{uuid.uuid4().hex[:8]}"
    spec = make_spec(
        spec_for("plant/#", port=broker.port,
                 extra="qos: 1\n            clean_session: false\n"
                       f"            client_id: {client_id}"),
        tmp_path,
    )
    data = tmp_path / "data"
    pub = Publisher(broker.port)
    try:
        engine = Engine(spec, data)
        task = asyncio.create_task(engine.run())
        src = engine.sources["mq"]
        await wait_for(lambda: src.stats()["subscribed"], what="subscription")
        for i in range(5):
            pub.send(f"plant/s{i}", reading(f"s{i}", 1764547200 + i, float(i)))
        await wait_for(lambda: src.stats()["acked"] == 5, what="acknowledgements")
        engine.stop()
        first = await task

        for i in range(5, 8):  # the broker keeps these for the session while we are away
            pub.send(f"plant/s{i}", reading(f"s{i}", 1764547200 + i, float(i)))
        engine = Engine(spec, data)
        task = asyncio.create_task(engine.run())
        src = engine.sources["mq"]
        await wait_for(lambda: engine.summary()["readings_in"] == 3, what="queued readings")
        await asyncio.sleep(0.3)  # a redelivery of the first five would arrive by now
        engine.stop()
        second = await task
    finally:
        pub.close()
    assert first["sources"]["mq"]["received"] == 5
    assert second["sources"]["mq"]["received"] == 3
    assert second["sources"]["mq"]["acked"] == 3
    assert outbox_records(data)["value"].tolist() == [float(i) for i in range(8)]


# -- crash recovery -----------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import asyncio, logging, os, sys, time
    from pathlib import Path
    from edgewise.outbox import Outbox
    from edgewise.pipeline.engine import Engine
    from edgewise.pipeline.spec import parse_pipeline

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    delay = float(os.environ.get("SLOW_DISK_S", "0"))
    if delay:  # a slow disk: every group commit takes this much longer
        commit = Outbox.commit
        def slow_commit(self, *args, **kwargs):
            time.sleep(delay)
            return commit(self, *args, **kwargs)
        Outbox.commit = slow_commit
    text = Path(sys.argv[1]).read_text()
    asyncio.run(Engine(parse_pipeline(text, sys.argv[1]), sys.argv[2]).run())
""")


def committed_count(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT COALESCE(SUM(records), 0) FROM chunks").fetchone()
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()
    return int(row[0])


def start_child(
    script: Path, spec: Path, data: Path, slow_disk_s: float = 0.0
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SLOW_DISK_S": str(slow_disk_s)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(spec), str(data)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 15
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "subscribed to" in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe open
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("child pipeline did not subscribe:\n" + "".join(lines))


def test_qos1_messages_not_committed_at_a_crash_are_redelivered(
    tmp_path: Path, broker_factory: Callable[..., Broker]
) -> None:
    """kill -9 while messages are received but not committed: after a restart nothing is lost."""
    broker = broker_factory().start()
    n = 4000
    client_id = f"edgewise-crash-{uuid.uuid4().hex[:8]}"
    # small batches and (first run) a slow disk, so the crash lands mid-stream
    (tmp_path / "p.yaml").write_text(textwrap.dedent(f"""
        apiVersion: edgewise.io/v1
        kind: Pipeline
        metadata: {{name: crash}}
        spec:
          batching: {{queue_batches: 1}}
          sources:
            - id: mq
              type: mqtt
              port: {broker.port}
              topics: ["plant/#"]
              qos: 1
              clean_session: false
              client_id: {client_id}
              batch: 5
          sinks:
            - id: raw
              type: outbox
              inputs: [mq]
    """))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    data = tmp_path / "data"
    db = data / "outbox.db"

    # 1 s per commit: the kill must land between the first commit and the second
    child = start_child(script, tmp_path / "p.yaml", data, slow_disk_s=1.0)
    pub = Publisher(broker.port)
    try:
        infos = [
            pub.client.publish(f"plant/s{i % 20}", reading(f"s{i % 20}", 1764547200 + i, i), 1)
            for i in range(n)
        ]
        for info in infos:  # the broker holds all of them before the crash
            info.wait_for_publish(10)
        deadline = time.monotonic() + 20
        while committed_count(db) < 1:
            assert time.monotonic() < deadline, "child committed nothing"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)  # all received by now, few committed (slow disk)
        child.wait(5)
        before = committed_count(db)
        assert 1 <= before < n // 2, f"the crash came too late to test anything ({before})"

        child = start_child(script, tmp_path / "p.yaml", data)  # same client_id, same session
        deadline = time.monotonic() + 20
        while committed_count(db) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # redeliveries are duplicates of committed readings: let them land
        with Outbox(db) as ob:
            values = [int(v) for v in ob.read_stream("raw")["value"].tolist()]
    finally:
        pub.close()
        child.send_signal(signal.SIGINT)
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
    lost = set(range(n)) - set(values)
    assert not lost, f"lost {len(lost)} of {n} readings"
    assert set(values) == set(range(n))
    # at-least-once: what was committed before the crash may come again, nothing else
    assert len(values) - n <= before
