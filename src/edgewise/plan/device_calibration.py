"""Calibrating what the node pays to read industrial devices: the Modbus TCP and OPC UA sources.

Like the MQTT calibration (`edgewise.plan.ingest_calibration`), the real source runs in this
process and hands its batches to a counter; the device is a server in a child process (pymodbus's
simulator, an asyncua server), so that only the source's CPU counts (``time.process_time`` of
this process), with nothing of the server's. Each protocol is measured twice, with one value and
with ``MANY`` values per poll (or per notification), which gives a cost per batch handed over
(the request or publish, its round trip on the event loop, the wake-up) and one per reading:

* **Modbus** (`calibrate_modbus`): the `modbus` source polls ``MANY`` contiguous holding
  registers (one read request) or one, every PACE_S;
* **OPC UA** (`calibrate_opcua`): the `opcua` source subscribes to ``MANY`` variables (or one)
  that the server changes every OPCUA_PACE_S, with a publishing interval of OPCUA_PACE_S.

The planner charges a site's sources ``readings/s x per reading + batches/s x per batch``, as
for MQTT. Without pymodbus or asyncua (the `industrial` extra), or when the device server does
not start (a `RuntimeError`), the static table is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import RunContext, SourceOutput

MANY = 100  # values per poll or notification in the second measurement
PACE_S = 0.01  # between polls (Modbus)
OPCUA_PACE_S = 0.05  # between value changes and publishes (OPC UA: the server is slow)
MEASURE_S = 1.5  # the measured span of each run, after WARM_S
WARM_S = 0.5
READY_S = 60.0  # a device server must listen within this (asyncua's takes 10-20 s loaded)

MODBUS_SERVER = """
import asyncio, sys
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

async def main():
    bits = [SimData(0, values=[False] * 8, datatype=DataType.BITS)]
    regs = [SimData(0, values=[i % 1000 for i in range(128)], datatype=DataType.REGISTERS)]
    dev = SimDevice(1, simdata=(bits, bits, regs, regs))
    await ModbusTcpServer(dev, address=("127.0.0.1", int(sys.argv[1]))).serve_forever()

asyncio.run(main())
"""

OPCUA_SERVER = """
import asyncio, sys
import asyncua

async def main():
    server = asyncua.Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{sys.argv[1]}/edgewise")
    idx = await server.register_namespace("urn:edgewise:calibration")
    obj = await server.nodes.objects.add_object(idx, "Line")
    nodes = [await obj.add_variable(idx, f"v{i}", 0.0) for i in range(int(sys.argv[2]))]
    await server.start()
    k = 0
    while True:
        k += 1
        for i, n in enumerate(nodes):
            await server.write_attribute_value(
                n.nodeid, asyncua.ua.DataValue(asyncua.ua.Variant(float(k + i) / 10)))
        await asyncio.sleep(float(sys.argv[3]))

asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(script: str, *args: str) -> Any:
    """A device server in a child process listening on a free port (yielded)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", script, str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_S
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"device calibration: the server did not start "
                                   f"(exit code {proc.poll()})")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _measure(make: Callable[[], Any], started: Callable[[Any], Awaitable[None]]
                   ) -> tuple[float, int, int]:
    """Run a source until it delivers, then measure (process CPU, readings, batches)."""
    got = [0, 0]

    async def emit(batch: Batch, _pos: Any) -> None:
        got[0] += batch.n
        got[1] += 1

    src = make()
    task = asyncio.create_task(src.run(SourceOutput(emit, lambda _d: None, "calibration")))
    try:
        await started(got)
        await asyncio.sleep(WARM_S)
        c0, n0, b0 = time.process_time(), got[0], got[1]
        await asyncio.sleep(MEASURE_S)
        return time.process_time() - c0, got[0] - n0, got[1] - b0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _first(got: list[int]) -> None:
    deadline = time.monotonic() + READY_S
    while not got[0]:
        if time.monotonic() > deadline:
            raise RuntimeError("device calibration: the source delivered nothing")
        await asyncio.sleep(0.01)


def _line(one: tuple[float, int, int], many: tuple[float, int, int]) -> dict[str, float]:
    """Per reading and per batch from two runs: (CPU, readings, batches) each."""
    per_batch_1 = one[0] / max(one[2], 1) * 1e6
    per_batch_m = many[0] / max(many[2], 1) * 1e6
    size = many[1] / max(many[2], 1)
    per_reading = max(0.0, (per_batch_m - per_batch_1) / max(size - 1.0, 1.0))
    return {"us_per_reading": per_reading, "us_per_batch": max(0.0, per_batch_1 - per_reading),
            "one_us": per_batch_1, "many_us": per_batch_m, "values": size,
            "batches": float(one[2] + many[2])}


def calibrate_modbus() -> dict[str, Any]:
    """CPU microseconds of the `modbus` source per register read and per poll."""
    from edgewise.pipeline.sources.modbus import ModbusConfig, ModbusSource

    t0 = time.perf_counter()
    runs = []
    with _server(MODBUS_SERVER) as port:
        for n in (1, MANY):
            cfg = ModbusConfig.model_validate({
                "host": "127.0.0.1", "port": port, "interval": PACE_S,
                "registers": [{"name": f"r{i}", "address": i} for i in range(n)]})

            def make(cfg: ModbusConfig = cfg) -> ModbusSource:
                return ModbusSource("calibration", cfg, RunContext("calibration", Path("."),
                                                                   Path(".")))

            runs.append(asyncio.run(_measure(make, _first)))
    out: dict[str, Any] = _line(runs[0], runs[1])
    out["seconds"] = time.perf_counter() - t0
    return out


def calibrate_opcua() -> dict[str, Any]:
    """CPU microseconds of the `opcua` source per value notified and per publish."""
    from edgewise.pipeline.sources.opcua import OpcUaConfig, OpcUaSource

    t0 = time.perf_counter()
    runs = []
    quiet = logging.getLogger("asyncua")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on revised session and publishing values
    with contextlib.ExitStack() as stack:
        stack.callback(quiet.setLevel, level)
        port = stack.enter_context(_server(OPCUA_SERVER, str(MANY), str(OPCUA_PACE_S)))
        for n in (1, MANY):
            cfg = OpcUaConfig.model_validate({
                "endpoint": f"opc.tcp://127.0.0.1:{port}/edgewise",
                "publishing_interval": OPCUA_PACE_S, "queue_size": 10,
                "nodes": [{"node_id": f"ns=2;i={2 + i}", "sensor": f"v{i}"} for i in range(n)]})

            def make(cfg: OpcUaConfig = cfg) -> OpcUaSource:
                return OpcUaSource("calibration", cfg, RunContext("calibration", Path("."),
                                                                  Path(".")))

            runs.append(asyncio.run(_measure(make, _first)))
    out: dict[str, Any] = _line(runs[0], runs[1])
    out["seconds"] = time.perf_counter() - t0
    return out
