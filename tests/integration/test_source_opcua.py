"""The OPC UA source against an asyncua Server started here on a free 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from conftest import make_spec
from edgewise.errors import SpecError
from edgewise.outbox import Outbox
from edgewise.pipeline.engine import Engine

asyncua = pytest.importorskip("asyncua")
ua = asyncua.ua

pytestmark = pytest.mark.timeout(30)
T0 = 1764547200.0  # 2025-12-01T00:00:00Z


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Plant:
    """An OPC UA server with a few variables whose values the test writes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/edgewise/"
        self.server: Any = None
        self.temp: Any = None
        self.label: Any = None
        self.ok: Any = None

    async def start(self, temp: float = 20.0) -> Plant:
        logging.getLogger("asyncua").setLevel(logging.ERROR)
        server = asyncua.Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        idx = await server.register_namespace("urn:edgewise:test")
        line = await server.nodes.objects.add_object(idx, "Line1")
        self.temp = await line.add_variable(ua.NodeId(1001, idx), "Temp", temp)
        self.label = await line.add_variable(ua.NodeId(1002, idx), "Label", "idle")
        self.ok = await line.add_variable(ua.NodeId("Line1.Running", idx), "Running", True)
        await server.start()
        self.server = server
        return self

    async def write(self, node: Any, value: Any, ts: float | None = None,
                    status: int = ua.StatusCodes.Good) -> None:
        variant = ua.Variant(value, ua.VariantType.Double) if isinstance(value, float) \
            else ua.Variant(value)
        dv = ua.DataValue(variant, StatusCode=ua.StatusCode(status),
                          SourceTimestamp=datetime.fromtimestamp(ts, UTC) if ts else None)
        await node.write_value(dv)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None


def spec_text(endpoint: str, extra: str = "", nodes: str = "") -> str:
    nodes = nodes or """
              - {node_id: "ns=2;i=1001", sensor: line1/temp/001}
              - {node_id: "ns=2;i=1002", sensor: line1/label}
              - {node_id: "ns=2;s=Line1.Running", sensor: line1/running}
              - {node_id: "ns=2;i=9999", sensor: line1/ghost}
"""
    return f"""
        sources:
          - id: plc
            type: opcua
            endpoint: "{endpoint}"
            publishing_interval: 50ms
            reconnect_min: 0.1
            reconnect_max: 0.5
            watchdog_interval: 0.3
            timeout: 1
            {extra}
            nodes:
{nodes}
        sinks:
          - id: raw
            type: outbox
            inputs: [plc]
    """


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


def outbox(tmp_path: Path) -> tuple[list[tuple[str, float, float]], list[str]]:
    with Outbox(tmp_path / "data" / "outbox.db") as ob:
        cols = ob.read_stream("raw")
        dead = [d["reason"] for d in reversed(ob.dead_letters(1000))]
    recs = list(zip(cols["sensor"].tolist(), cols["ts"].tolist(), cols["value"].tolist(),
                    strict=True)) if cols else []
    return recs, dead


async def test_subscription_delivers_the_exact_sequence(tmp_path: Path) -> None:
    plant = await Plant(free_port()).start()
    try:
        await plant.write(plant.temp, 20.0, T0)
        engine = Engine(make_spec(spec_text(plant.endpoint), tmp_path), tmp_path / "data")
        task = asyncio.create_task(engine.run())
        # the first notifications: current values of temp and running (label is text)
        await wait_for(lambda: engine.summary()["readings_in"] == 2, what="initial values")
        for i in range(1, 31):  # faster than the publishing interval: the queue keeps them all
            await plant.write(plant.temp, 20.0 + i / 4, T0 + i / 10)
            if i % 10 == 0:
                await asyncio.sleep(0.06)
        await plant.write(plant.temp, 99.0, T0 + 5, status=ua.StatusCodes.BadSensorFailure)
        await plant.write(plant.ok, False, T0 + 6)
        await plant.write(plant.temp, 42.5, T0 + 7)
        await wait_for(lambda: engine.summary()["readings_in"] == 34, what="all changes")
        await asyncio.sleep(0.2)
        engine.stop()
        summary = await task
    finally:
        await plant.stop()
    recs, dead = outbox(tmp_path)
    temps = [(ts, v) for s, ts, v in recs if s == "line1/temp/001"]
    assert temps == [(T0, 20.0)] + [(T0 + i / 10, 20.0 + i / 4) for i in range(1, 31)] + [
        (T0 + 7, 42.5)]
    running = [(ts, v) for s, ts, v in recs if s == "line1/running"]
    assert [v for _, v in running] == [1.0, 0.0] and running[1][0] == T0 + 6
    assert summary["readings_in"] == 34
    assert len(dead) == 3
    assert dead[0] == "OPC UA node ns=2;i=9999 (line1/ghost): cannot monitor: BadNodeIdUnknown"
    assert dead[1] == ("OPC UA node ns=2;i=1002 (line1/label): value 'idle' (str) is not a "
                       "finite number")
    assert dead[2] == "OPC UA node ns=2;i=1001 (line1/temp/001): status BadSensorFailure"
    assert summary["sources"]["plc"]["reconnects"] == 0


async def test_poll_mode_and_server_timestamps(tmp_path: Path) -> None:
    plant = await Plant(free_port()).start(temp=5.25)
    try:
        await plant.write(plant.temp, 5.25, T0 + 1)
        spec = spec_text(plant.endpoint, extra="mode: poll\n            interval: 50ms",
                         nodes='              - {node_id: "ns=2;i=1001", sensor: t}\n')
        engine = Engine(make_spec(spec, tmp_path), tmp_path / "data")
        t_start = time.time()
        task = asyncio.create_task(engine.run())
        await wait_for(lambda: engine.summary()["readings_in"] >= 3, what="polls")
        await plant.write(plant.temp, 6.5, T0 + 2)
        n = engine.summary()["readings_in"]
        await wait_for(lambda: engine.summary()["readings_in"] >= n + 3, what="more polls")
        engine.stop()
        await task
    finally:
        await plant.stop()
    recs, dead = outbox(tmp_path)
    assert dead == []
    values = [(ts, v) for _, ts, v in recs]
    first = values.index((T0 + 2, 6.5))
    assert first >= 3
    assert set(values[:first]) == {(T0 + 1, 5.25)}  # each poll reads the same, unchanged value
    assert set(values[first:]) == {(T0 + 2, 6.5)}

    # timestamp: server: the time the server produced the value, not the source's
    spec = spec_text(plant.endpoint, extra="mode: poll\n            timestamp: server",
                     nodes='              - {node_id: "ns=2;i=1001", sensor: t}\n')
    plant = await Plant(plant.port).start()
    try:
        await plant.write(plant.temp, 7.0, T0)
        engine = Engine(make_spec(spec, tmp_path / "b"), tmp_path / "b" / "data")
        task = asyncio.create_task(engine.run())
        await wait_for(lambda: engine.summary()["readings_in"] >= 1, what="a poll")
        engine.stop()
        await task
    finally:
        await plant.stop()
    recs, _ = outbox(tmp_path / "b")
    assert recs[0][2] == 7.0 and t_start <= recs[0][1] <= time.time()


async def test_server_down_at_start_then_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edgewise.pipeline.sources.opcua")
    port = free_port()
    nodes = '              - {node_id: "ns=2;i=1001", sensor: t}\n'
    engine = Engine(make_spec(spec_text(f"opc.tcp://127.0.0.1:{port}/edgewise/", nodes=nodes),
                              tmp_path), tmp_path / "data")
    task = asyncio.create_task(engine.run())
    src = engine.sources["plc"]
    plant = Plant(port)
    try:
        await wait_for(lambda: src.stats()["connect_failures"] >= 2, what="retries")
        assert not task.done()
        assert sum("cannot connect to OPC UA server" in r.getMessage()
                   for r in caplog.records) == 1
        await plant.start(temp=1.0)
        await wait_for(lambda: engine.summary()["readings_in"] == 1, what="first value")
        await plant.write(plant.temp, 2.0, T0 + 2)
        await wait_for(lambda: engine.summary()["readings_in"] == 2, what="second value")
        await plant.stop()
        await wait_for(lambda: not src.stats()["connected"], timeout=10, what="loss noticed")
        assert not task.done()
        await plant.start(temp=3.0)
        await wait_for(lambda: engine.summary()["readings_in"] == 3, timeout=10, what="reconnect")
    finally:
        engine.stop()
        summary = await task
        await plant.stop()
    assert summary["sources"]["plc"]["reconnects"] == 1
    recs, _ = outbox(tmp_path)
    assert [v for _, _, v in recs] == [1.0, 2.0, 3.0]
    assert any("lost the OPC UA server" in r.getMessage() for r in caplog.records)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is not an OPC UA node id"):
        make_spec(spec_text("opc.tcp://127.0.0.1:4840/", nodes="              - "
                            "{node_id: 'ns=x;q=1', sensor: a}\n"), tmp_path)
    with pytest.raises(SpecError, match="endpoint"):
        make_spec(spec_text("http://127.0.0.1:4840/"), tmp_path)
    with pytest.raises(SpecError, match="sensor names must be unique"):
        make_spec(spec_text("opc.tcp://h:1/", nodes="""
              - {node_id: "ns=2;i=1", sensor: a}
              - {node_id: "ns=2;i=2", sensor: a}
"""), tmp_path)


def test_asyncua_is_imported_lazily() -> None:
    code = ("import sys; import edgewise.pipeline.sources.opcua as m; "
            "print('asyncua' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
