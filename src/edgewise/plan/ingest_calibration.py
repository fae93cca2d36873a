"""Calibrating what a node pays before its engine sees a reading, and per user-function call.

* **MQTT decoding** (`calibrate_mqtt`): the real `mqtt` source (gmqtt on the event loop, the
  source's own parsing into a batch) receives QoS 0 JSON readings from a minimal broker on the
  loopback interface in this process: it answers CONNECT and SUBSCRIBE, then writes pre-encoded
  PUBLISH packets, one message per loop turn and then in bursts of ``BURST``; the process CPU
  per message of the two runs gives a cost per message and one per wake-up of the source (the
  read, gmqtt's turn, the hand-over of a batch). The planner charges a site's MQTT sources
  ``rate x per message + batches x per wake-up``. The broker's own work (``write`` calls of
  pre-encoded bytes) is measured apart and subtracted. The batches go to a counter, not an
  engine (the engine is costed separately). On the development VM: about 5.5 us per message
  and 26 us per wake-up, i.e. 32 us for a message that arrives alone and 6 us in bursts of 50.
* **A user function's call** (`calibrate_plugin_call`): the event-loop thread's CPU of one call
  of a ``type: python`` stage whose class does nothing (the hand-over to the stage's worker
  thread and back), back to back, and what a call costs on top at the real pace (both threads
  woken up: about 100-170 us more on the development VM); the function's own work is
  calibrated with the site or declared.

Both are cached per machine by `edgewise.plan.costs.Calibrator` like the engine's costs.
Modbus and OPC UA are calibrated by `edgewise.plan.device_calibration`; HTTP and files keep
the constants of `edgewise.plan.cost_model.INGEST_US`.
"""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path
from typing import Any

import orjson

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import RunContext, SourceOutput

MESSAGES = 30_000
PACE_S = 0.01  # the pause before a paced user-function call
BURST = 50  # messages per write of the broker
TOPIC = "plan/calibration"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


def _publishes(count: int) -> list[bytes]:
    """QoS 0 MQTT 5 PUBLISH packets of factory-line-like readings, one per message."""
    out = []
    for i in range(count):
        sensor = f"line1/temp/{i % 200:03d}"
        payload = orjson.dumps({"sensor": sensor, "ts": 1_764_547_200.0 + i / 10_000,
                                "value": round(40 + (i * 7919 % 4000) / 100, 2)})
        topic = f"{TOPIC}/{sensor}".encode()
        body = struct.pack("!H", len(topic)) + topic + b"\x00" + payload  # no properties
        out.append(_packet(0x30, body))
    return out


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = (await reader.readexactly(1))[0]
    n, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return head, await reader.readexactly(n)


async def _measure_mqtt(count: int, burst: int) -> float:
    from edgewise.pipeline.sources.mqtt import MqttConfig, MqttSource

    bursts = [b"".join(p) for p in _chunks(_publishes(count), burst)]
    subscribed = asyncio.Event()
    send_cpu = [0.0]
    conns: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head, body = await _read_packet(reader)
                kind = head >> 4
                if kind == 1:  # CONNECT -> CONNACK (v5: flags, reason, no properties)
                    writer.write(_packet(0x20, b"\x00\x00\x00"))
                elif kind == 8:  # SUBSCRIBE -> SUBACK, granted QoS 0
                    writer.write(_packet(0x90, body[:2] + b"\x00\x00"))
                    conns.append(writer)
                    subscribed.set()
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    got = [0]

    async def emit(batch: Batch, _pos: Any) -> None:
        got[0] += batch.n

    cfg = MqttConfig.model_validate({"topics": [f"{TOPIC}/#"], "port": port})
    src = MqttSource("calibration", cfg, RunContext("calibration", Path("."), Path(".")))
    out = SourceOutput(emit, lambda _d: None, "calibration")
    task = asyncio.create_task(src.run(out))
    try:
        await asyncio.wait_for(subscribed.wait(), 10.0)
        await asyncio.sleep(0.05)
        c0 = time.process_time()
        for blob in bursts:
            t = time.process_time()
            for w in conns:
                w.write(blob)
            send_cpu[0] += time.process_time() - t
            await asyncio.sleep(0)
        deadline = time.monotonic() + 30.0
        while got[0] < count and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        cpu = time.process_time() - c0 - send_cpu[0]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()
    if got[0] < count:
        raise RuntimeError(f"MQTT calibration: {got[0]} of {count} messages arrived")
    return cpu / count * 1e6


def _chunks(items: list[bytes], n: int) -> list[list[bytes]]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def calibrate_mqtt(count: int = MESSAGES) -> dict[str, Any]:
    """CPU microseconds of the `mqtt` source per QoS 0 message and per wake-up: messages
    arriving one per loop turn and in bursts of ``BURST`` (best of two runs each), a straight
    line through the two."""
    t0 = time.perf_counter()
    single = min(asyncio.run(_measure_mqtt(count // 3, 1)) for _ in range(2))
    burst = min(asyncio.run(_measure_mqtt(count, BURST)) for _ in range(2))
    per_message = max(0.0, (burst * BURST - single) / (BURST - 1))
    return {"us_per_message": per_message, "us_per_wake": max(0.0, single - per_message),
            "single_us": single, "burst_us": burst, "messages": count,
            "seconds": time.perf_counter() - t0}


class _Nothing:
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def process(self, batch: Batch) -> None:
        return None


def calibrate_plugin_call(calls: int = 3000, paced: int = 100,
                          pause: float = PACE_S) -> dict[str, Any]:
    """Event-loop thread CPU of one call of a ``type: python`` stage (hand-over and back),
    back to back; and what a call costs beyond that at the real pace (``wake_us``: process CPU
    of calls ``pause`` apart, both threads and the kernel's wake-ups, less the sleeping loop's
    own cost and the hot call)."""
    import numpy as np

    from edgewise.pipeline.operators.plugin import PythonConfig, PythonOperator

    cfg = PythonConfig.model_validate({"class": f"{__name__}:_Nothing"})
    op = PythonOperator("calibration", cfg, RunContext("calibration", Path("."), Path(".")))
    batch = Batch({"sensor": np.array(["s/000"] * 4, dtype=object), "ts": np.zeros(4),
                   "value": np.zeros(4)}, 4)
    best = float("inf")
    for _ in range(3):
        c0 = time.thread_time()
        for _ in range(calls):
            op.process(batch)
        best = min(best, (time.thread_time() - c0) / calls * 1e6)
    c0 = time.process_time()
    for _ in range(paced):
        time.sleep(pause)
    idle = (time.process_time() - c0) / paced * 1e6
    c0 = time.process_time()
    for _ in range(paced):
        time.sleep(pause)
        op.process(batch)
    slow = (time.process_time() - c0) / paced * 1e6
    return {"call_us": best, "calls": calls, "wake_us": max(0.0, slow - idle - best),
            "pause_s": pause}
