"""The Modbus source against pymodbus's own async TCP server on a free 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import make_spec
from edgewise.errors import SpecError
from edgewise.outbox import Outbox
from edgewise.pipeline.engine import Engine

pytest.importorskip("pymodbus")
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer

simulator = pytest.importorskip("pymodbus.simulator")  # SimData / SimDevice: pymodbus >= 3.10
SimData, SimDevice, DataType = simulator.SimData, simulator.SimDevice, simulator.DataType

pytestmark = pytest.mark.timeout(30)


def words(fmt: str, value: float, little: bool = False) -> list[int]:
    raw = struct.pack(fmt, value)
    w = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    return list(reversed(w)) if little else w


PI32 = float(np.float32(np.pi))
HOLDING = [
    7,  # 0 uint16
    *words(">h", -2),  # 1 int16
    *words(">f", PI32),  # 2-3 float32
    *words(">i", -100000),  # 4-5 int32
    655,  # 6 uint16, scaled
    0,  # 7 unused
    *words(">f", -12.5, little=True),  # 8-9 float32, little word order
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_server(port: int, holding: list[int] | None = None) -> ModbusTcpServer:
    device = SimDevice(
        1,
        simdata=(
            [SimData(0, values=[True, False, True], datatype=DataType.BITS)],  # coils
            [SimData(0, values=[False, True], datatype=DataType.BITS)],  # discrete inputs
            [SimData(0, values=holding or HOLDING, datatype=DataType.REGISTERS)],
            [SimData(0, values=[200, 3], datatype=DataType.REGISTERS)],  # input registers
        ),
    )
    server = ModbusTcpServer(device, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    return server


REGISTERS = """
              - {name: hr-u16, address: 0}
              - {name: hr-i16, address: 1, type: int16}
              - {name: hr-f32, address: 2, type: float32, count: 2}
              - {name: hr-i32, address: 4, type: int32}
              - {name: temp, address: 6, type: uint16, scale: 0.1, offset: -40}
              - {name: hr-f32le, address: 8, type: float32, word_order: little}
              - {name: missing, address: 10}
              - {name: far, address: 50, type: int32}
              - {name: ir0, address: 0, kind: input, scale: 2}
              - {name: ir1, address: 1, kind: input}
              - {name: coil0, address: 0, kind: coil}
              - {name: coil1, address: 1, kind: coil}
              - {name: di1, address: 1, kind: discrete}
"""
EXPECTED = [
    ("hr-u16", 7.0), ("hr-i16", -2.0), ("hr-f32", PI32), ("hr-i32", -100000.0),
    ("temp", 655 * 0.1 + -40.0), ("hr-f32le", -12.5),
    ("ir0", 400.0), ("ir1", 3.0), ("coil0", 1.0), ("coil1", 0.0), ("di1", 1.0),
]


def spec_text(port: int, interval: str = "50ms", extra: str = "") -> str:
    return f"""
        sources:
          - id: plc
            type: modbus
            host: 127.0.0.1
            port: {port}
            unit: 1
            interval: {interval}
            timeout: 0.5
            reconnect_min: 0.05
            reconnect_max: 0.2
            {extra}
            registers:
{REGISTERS}
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


def outbox(tmp_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with Outbox(tmp_path / "data" / "outbox.db") as ob:
        return ob.read_stream("raw"), list(reversed(ob.dead_letters(1000)))


async def test_exact_values_every_poll(tmp_path: Path) -> None:
    port = free_port()
    server = await start_server(port)
    try:
        engine = Engine(make_spec(spec_text(port), tmp_path), tmp_path / "data")
        t0 = time.time()
        task = asyncio.create_task(engine.run())
        await wait_for(lambda: engine.summary()["readings_in"] >= 4 * len(EXPECTED), what="polls")
        engine.stop()
        summary = await task
        t1 = time.time()
    finally:
        await server.shutdown()

    cols, dead = outbox(tmp_path)
    n = len(cols["sensor"])
    assert n == summary["readings_in"] and n % len(EXPECTED) == 0 and n >= 4 * len(EXPECTED)
    polls = n // len(EXPECTED)
    got = list(zip(cols["sensor"].tolist(), cols["value"].tolist(), strict=True))
    assert got == EXPECTED * polls
    ts = cols["ts"].reshape(polls, len(EXPECTED))
    assert (ts == ts[:, :1]).all()  # one timestamp per poll
    assert t0 <= ts.min() and ts.max() <= t1
    assert np.all(np.diff(ts[:, 0]) >= 0.04)  # interval: 50 ms

    stats = summary["sources"]["plc"]
    assert stats["read_errors"] == 2 * stats["polls"]
    assert stats["reconnects"] == 0
    # two registers fail every poll; emitted polls may be one fewer than attempted at the stop
    assert len(dead) == stats["read_errors"] and polls in (stats["polls"], stats["polls"] - 1)
    assert dead[0]["reason"] == (
        f"Modbus device 1 at 127.0.0.1:{port}: register 'missing' (holding 10, uint16): "
        "device answered with Modbus exception 2 (illegal data address)")
    assert dead[1]["reason"].startswith(
        f"Modbus device 1 at 127.0.0.1:{port}: register 'far' (holding 50, int32): ")


async def test_written_values_show_up_in_order(tmp_path: Path) -> None:
    port = free_port()
    server = await start_server(port)
    writer = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0, reconnect_delay=0)
    try:
        engine = Engine(make_spec(spec_text(port, "20ms"), tmp_path), tmp_path / "data")
        task = asyncio.create_task(engine.run())
        await wait_for(lambda: engine.summary()["readings_in"] >= 2 * len(EXPECTED))
        assert await writer.connect()
        for v in (700, 701, 702):  # temp = v * 0.1 - 40
            before = engine.summary()["readings_in"]
            rr = await writer.write_register(6, v, device_id=1)
            assert not rr.isError()
            await wait_for(lambda b=before: engine.summary()["readings_in"] >= b + 3 * 11)
        engine.stop()
        await task
    finally:
        writer.close()
        await server.shutdown()
    cols, _ = outbox(tmp_path)
    temps = cols["value"][cols["sensor"] == "temp"].tolist()
    seen = [t for i, t in enumerate(temps) if i == 0 or temps[i - 1] != t]
    assert seen == [655 * 0.1 - 40, 700 * 0.1 - 40, 701 * 0.1 - 40, 702 * 0.1 - 40]


async def test_device_down_at_start_then_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edgewise.pipeline.sources.modbus")
    port = free_port()
    engine = Engine(make_spec(spec_text(port, "20ms"), tmp_path), tmp_path / "data")
    task = asyncio.create_task(engine.run())
    src = engine.sources["plc"]
    server = None
    try:
        await wait_for(lambda: src.stats()["connect_failures"] >= 2, what="retries")
        assert not task.done()
        assert sum("cannot connect to Modbus device" in r.getMessage()
                   for r in caplog.records) == 1
        server = await start_server(port)
        await wait_for(lambda: engine.summary()["readings_in"] >= 22, what="first readings")
        await server.shutdown()
        server = None
        await wait_for(lambda: not src.stats()["connected"], what="outage noticed")
        held = engine.summary()["readings_in"]
        await asyncio.sleep(0.3)
        assert engine.summary()["readings_in"] == held  # nothing invented during the outage
        assert not task.done()
        server = await start_server(port, holding=[9, *HOLDING[1:]])
        await wait_for(lambda: engine.summary()["readings_in"] >= held + 22, what="reconnect")
    finally:
        engine.stop()
        summary = await task
        if server is not None:
            await server.shutdown()
    assert summary["sources"]["plc"]["reconnects"] == 1
    assert any("lost Modbus device" in r.getMessage() or "reconnected" in r.getMessage()
               for r in caplog.records)
    cols, _ = outbox(tmp_path)
    first = cols["value"][cols["sensor"] == "hr-u16"].tolist()
    assert set(first) == {7.0, 9.0} and first == sorted(first)


def test_config_errors(tmp_path: Path) -> None:
    def spec(regs: str) -> str:
        return f"""
            sources:
              - id: plc
                type: modbus
                host: 127.0.0.1
                registers: {regs}
        """

    with pytest.raises(SpecError, match="type float32 takes 2 register"):
        make_spec(spec("[{name: x, address: 0, type: float32, count: 1}]"), tmp_path)
    with pytest.raises(SpecError, match="registers"):
        make_spec(spec("[]"), tmp_path)
    with pytest.raises(SpecError, match="kind"):
        make_spec(spec("[{name: x, address: 0, kind: analog}]"), tmp_path)
    with pytest.raises(SpecError, match="address"):
        make_spec(spec("[{name: x, address: 70000}]"), tmp_path)
