"""Which MQTT client should the `mqtt` source and sink use? paho-mqtt 2.x against gmqtt.

Receiving: a publisher (this process, pre-encoded packets on a raw socket) sends factory-line
readings (``{"sensor":"line1/temp/001","ts":1764547200.02,"value":61.27}`` on
``<prefix>factory/line1/<kind>/<nnn>``, 200 sensors) to the local Mosquitto, for a bounded count,
at QoS 0 and QoS 1, as fast as possible or at ``--rate`` messages per second. Each receiver runs
in its own subprocess (so its CPU time is its own) and does what the source does per message: a
callback that appends topic, payload and accept time to a list. Figures per (client, QoS):
messages received, publish rate, receive rate (messages per wall second between the first and the
last message) and messages per CPU-second of the receiving process (user + system, all threads).

A third receiver, ``edgewise``, is the `mqtt` source itself (gmqtt underneath, on the event loop)
inside a pipeline that commits every reading to the outbox and, at QoS 1, acknowledges only after
the commit: what a user gets, parse, commit and fsync included. ``--linger`` sets its linger.

The receivers connect with MQTT v5 and Receive Maximum 65535, so Mosquitto's default of 20
in-flight QoS 1 messages per v3.1.1 client does not cap the QoS 1 figures.

Publishing (what the sink does for an alarm): each client publishes ``--publish-count`` single
alarm-sized messages from an asyncio event loop, one every 2 ms, and the time each ``publish()``
call takes on the loop thread is recorded (p50/p99). paho hands the message to its network
thread (``loop_start``); gmqtt writes it to the asyncio transport, i.e. to the socket, at once.

    python benchmarks/mqtt_clients.py [--count 200000] [--rate 10000] [--qos 0 1]
                                      [--clients paho gmqtt edgewise] [--linger 0]

Prints tables, then as its last line one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit_json

KINDS = ("temp", "pressure", "vibration")
IDLE_END_S = 3.0  # a receiver stops this long after its last message
LINGER = [0.0]  # the edgewise source's linger (seconds), from --linger


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def build_messages(count: int, prefix: str) -> list[tuple[str, bytes]]:
    sensors = [f"line1/{KINDS[i % 3]}/{i // 3 + 1:03d}" for i in range(200)]
    topics = [f"{prefix}factory/{s}" for s in sensors]
    t0 = 1764547200.0
    out = []
    for i in range(count):
        j = i % len(sensors)
        tick = i // len(sensors)
        value = round(60.0 + (i * 7919 % 2000) / 100.0, 2)
        body = orjson.dumps({"sensor": sensors[j], "ts": round(t0 + tick / 50, 2), "value": value})
        out.append((topics[j], body))
    return out


# -- receivers (run in a subprocess) ------------------------------------------------------------
class _Tally:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.items: list[tuple[str, bytes, float]] = []
        self.first_wall = self.last_wall = 0.0
        self.first_cpu = self.last_cpu = 0.0
        self.done = threading.Event()

    def add(self, topic: str, payload: bytes) -> None:
        now = time.perf_counter()
        if not self.items:
            self.first_wall, self.first_cpu = now, _cpu()
        self.items.append((topic, payload, now))
        self.last_wall = now
        if len(self.items) >= self.expected:
            self.last_cpu = _cpu()
            self.done.set()

    def result(self) -> dict[str, Any]:
        n = len(self.items)
        if not self.last_cpu:
            self.last_cpu = _cpu()
        wall = self.last_wall - self.first_wall
        cpu = self.last_cpu - self.first_cpu
        return {
            "received": n,
            "wall_s": round(wall, 4),
            "cpu_s": round(cpu, 4),
            "msg_per_s": round((n - 1) / wall) if wall > 0 else None,
            "msg_per_cpu_s": round(n / cpu) if cpu > 0 else None,
        }

    def wait(self) -> None:
        seen = -1
        while not self.done.wait(IDLE_END_S):
            if len(self.items) == seen and seen > 0:
                return  # idle: the rest is not coming
            seen = len(self.items)


def receive_paho(host: str, port: int, topic: str, qos: int, expected: int) -> dict[str, Any]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    tally = _Tally(expected)
    ready = threading.Event()

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe(topic, qos=qos)

    def on_subscribe(*args: Any) -> None:
        ready.set()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        tally.add(msg.topic, msg.payload)

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-paho-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = 65535
    client.connect(host, port, keepalive=30, properties=props)
    client.loop_start()
    ready.wait(10)
    print("READY", flush=True)
    tally.wait()
    client.disconnect()
    client.loop_stop()
    return tally.result()


def receive_gmqtt(host: str, port: int, topic: str, qos: int, expected: int) -> dict[str, Any]:
    import gmqtt

    tally = _Tally(expected)

    async def main() -> None:
        ready = asyncio.Event()
        client = gmqtt.Client(f"bench-gmqtt-{uuid.uuid4().hex[:8]}", receive_maximum=65535)

        def on_message(client: Any, t: str, payload: bytes, q: int, properties: Any) -> int:
            tally.add(t, payload)
            return 0

        def on_subscribe(*args: Any) -> None:
            ready.set()

        client.on_message = on_message
        client.on_subscribe = on_subscribe
        await client.connect(host, port, keepalive=30)
        client.subscribe(topic, qos=qos)
        await asyncio.wait_for(ready.wait(), 10)
        print("READY", flush=True)
        await asyncio.to_thread(tally.wait)
        await client.disconnect()

    asyncio.run(main())
    return tally.result()


def receive_edgewise(host: str, port: int, topic: str, qos: int, expected: int) -> dict[str, Any]:
    """The whole `mqtt` source in a pipeline: parse, batch, commit to the outbox, then (QoS 1)
    acknowledge. Counted when the engine has taken the readings."""
    import tempfile

    from edgewise.pipeline.engine import Engine
    from edgewise.pipeline.spec import parse_pipeline

    text = f"""
apiVersion: edgewise.io/v1
kind: Pipeline
metadata: {{name: bench}}
spec:
  outbox: {{max_bytes: 2GiB}}
  sources:
    - {{id: mq, type: mqtt, host: "{host}", port: {port}, topics: ["{topic}"], qos: {qos},
        receive_maximum: 65535, linger: {LINGER[0]}}}
  sinks:
    - {{id: raw, type: outbox, inputs: [mq]}}
"""

    async def main() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            engine = Engine(parse_pipeline(text), tmp)
            task = asyncio.create_task(engine.run())
            src = engine.sources["mq"]
            while not src.stats()["subscribed"]:
                await asyncio.sleep(0.01)
            print("READY", flush=True)
            while not src.stats()["received"]:
                await asyncio.sleep(0.001)
            w0, c0 = time.perf_counter(), _cpu()
            last, last_change = 0, time.perf_counter()
            while True:
                n = engine.counters.readings_in.get("mq", 0)
                now = time.perf_counter()
                if n != last:
                    last, last_change = n, now
                if n >= expected or now - last_change > IDLE_END_S:
                    break
                await asyncio.sleep(0.005)
            w1, c1 = last_change, _cpu()
            engine.stop()
            summary = await task
        stats = summary["sources"]["mq"]
        wall, cpu = w1 - w0, c1 - c0
        return {
            "received": last,
            "wall_s": round(wall, 4),
            "cpu_s": round(cpu, 4),
            "msg_per_s": round(last / wall) if wall > 0 else None,
            "msg_per_cpu_s": round(last / cpu) if cpu > 0 else None,
            "dead_lettered": stats["dead_lettered"],
            "commits": summary["commits"],
        }

    return asyncio.run(main())


RECEIVERS = {"paho": receive_paho, "gmqtt": receive_gmqtt, "edgewise": receive_edgewise}


# -- publishing from the event loop (what the sink does) ----------------------------------------
ALARM = orjson.dumps({"sensor": "line1/temp/001", "ts": 1764547200.02, "value": 101.27,
                      "limit": 100.0, "kind": "high", "severity": "alarm"})


def publish_cost(host: str, port: int, name: str, qos: int, count: int) -> dict[str, Any]:
    """Time of each ``publish()`` call on the event loop thread, one message every 2 ms."""
    import numpy as np

    topic = f"edgewise-bench/publish/{uuid.uuid4().hex[:6]}/line1/temp/001"

    async def main() -> list[float]:
        times: list[float] = []
        if name == "paho":
            import paho.mqtt.client as mqtt

            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                 client_id=f"bench-pub-paho-{uuid.uuid4().hex[:8]}")
            client.connect(host, port, keepalive=30)
            client.loop_start()

            def send() -> None:
                client.publish(topic, ALARM, qos)
        else:
            import gmqtt

            client = gmqtt.Client(f"bench-pub-gmqtt-{uuid.uuid4().hex[:8]}")
            await client.connect(host, port, keepalive=30)

            def send() -> None:
                client.publish(topic, ALARM, qos)

        await asyncio.sleep(0.2)
        for _ in range(count):
            await asyncio.sleep(0.002)
            t0 = time.perf_counter()
            send()
            times.append(time.perf_counter() - t0)
        await asyncio.sleep(0.2)
        if name == "paho":
            client.disconnect()
            client.loop_stop()
        else:
            await client.disconnect()
        return times

    ms = np.asarray(asyncio.run(main())) * 1000
    return {"client": name, "qos": qos, "count": count,
            "publish_p50_ms": round(float(np.percentile(ms, 50)), 4),
            "publish_p99_ms": round(float(np.percentile(ms, 99)), 4)}


# -- publisher (this process) -------------------------------------------------------------------
# The load generator writes pre-encoded MQTT 3.1.1 PUBLISH packets straight to a socket, so that
# it costs almost no CPU and publishes far faster than either client under test can receive; a
# library publisher (paho manages about 18,000 msg/s at QoS 0 and 5,000 at QoS 1 here) would be
# the bottleneck instead of the receiver.
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


def _utf8(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("!H", len(raw)) + raw


def encode_publishes(messages: list[tuple[str, bytes]], qos: int) -> bytes:
    parts = []
    for i, (topic, payload) in enumerate(messages):
        mid = struct.pack("!H", i % 65535 + 1) if qos else b""
        parts.append(_packet(0x30 | (qos << 1), _utf8(topic) + mid + payload))
    return b"".join(parts)


def publish(host: str, port: int, blob: bytes, count: int, qos: int, rate: float) -> float:
    """Send ``count`` pre-encoded PUBLISH packets; return the wall seconds until the broker has
    them all (QoS 1: every PUBACK received; QoS 0: a PINGRESP after the last one)."""
    connect = _packet(0x10, _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60)
                      + _utf8(f"bench-pub-{uuid.uuid4().hex[:8]}"))
    with socket.create_connection((host, port)) as sock:
        sock.sendall(connect)
        if sock.recv(4)[:1] != b"\x20":
            raise SystemExit("broker refused the publisher's CONNECT")
        acks = threading.Thread(target=_read_acks, args=(sock, count if qos else 0), daemon=True)
        acks.start()
        t0 = time.perf_counter()
        step = len(blob) // max(1, count // 1000) if count >= 1000 else len(blob)
        view = memoryview(blob)
        for k, off in enumerate(range(0, len(blob), step)):
            # pace (roughly, packets may straddle slices) at ``rate`` messages per second
            if rate:
                due = t0 + k * (step / len(blob)) * count / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            sock.sendall(view[off : off + step])
        sock.sendall(b"\xc0\x00")  # PINGREQ: its PINGRESP comes after every PUBACK
        acks.join(300)
        elapsed = time.perf_counter() - t0
        sock.sendall(b"\xe0\x00")  # DISCONNECT
    return elapsed


def _read_acks(sock: socket.socket, expected: int) -> None:
    buf = b""
    acked = 0
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return
        buf += data
        while len(buf) >= 2:
            size = 2 + buf[1]  # PUBACK and PINGRESP have one-byte remaining lengths
            if len(buf) < size:
                break
            kind, buf = buf[0], buf[size:]
            if kind == 0x40:
                acked += 1
            elif kind == 0xD0 and acked >= expected:
                return


def run_case(args: argparse.Namespace, name: str, qos: int, messages: list[Any]) -> dict[str, Any]:
    prefix = f"{args.prefix}{uuid.uuid4().hex[:6]}/"
    topic = f"{prefix}factory/line1/#"
    msgs = [(prefix + t[len(args.prefix) :], b) for t, b in messages]
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--receiver", name, "--host", args.host,
         "--port", str(args.port), "--topic", topic, "--qos", str(qos),
         "--count", str(len(msgs)), "--linger", str(args.linger)],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise SystemExit(f"receiver {name} did not start: {line!r}")
    blob = encode_publishes(msgs, qos)
    pub_s = publish(args.host, args.port, blob, len(msgs), qos, args.rate)
    out, _ = proc.communicate(timeout=300)
    result = json.loads(out.strip().splitlines()[-1])
    result.update(client=name, qos=qos, sent=len(msgs), publish_msg_per_s=round(len(msgs) / pub_s))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--qos", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    ap.add_argument("--rate", type=float, default=0,
                    help="publish rate in msg/s (default 0: as fast as the socket takes them)")
    ap.add_argument("--clients", nargs="+", default=["paho", "gmqtt", "edgewise"],
                    choices=list(RECEIVERS),
                    help="edgewise = the whole mqtt source in a pipeline, committing to an outbox")
    ap.add_argument("--linger", type=float, default=0.0,
                    help="linger (seconds) of the edgewise source (default 0, its default)")
    ap.add_argument("--publish-count", type=int, default=500,
                    help="messages per client and QoS in the publish-call figures (0: skip)")
    ap.add_argument("--prefix", default="edgewise-bench/", help="topic prefix (keeps runs apart)")
    ap.add_argument("--receiver", choices=list(RECEIVERS), help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    args = ap.parse_args()

    LINGER[0] = args.linger
    if args.receiver:
        fn = RECEIVERS[args.receiver]
        res = fn(args.host, args.port, args.topic, args.qos[0], args.count)
        print(json.dumps(res), flush=True)
        return

    messages = build_messages(args.count, args.prefix)
    results = []
    for qos in args.qos:
        for name in args.clients:
            results.append(run_case(args, name, qos, messages))

    print(f"\nMQTT receive rate, {args.count} factory-line messages per case, "
          f"Mosquitto at {args.host}:{args.port}, {os.cpu_count()} CPUs")
    head = f"  {'client':8} {'qos':>3} {'received':>9} {'pub msg/s':>10} {'recv msg/s':>11} "
    head += f"{'msg/CPU-s':>10} {'CPU s':>7}"
    print(head)
    for r in results:
        print(f"  {r['client']:8} {r['qos']:>3} {r['received']:>9} {r['publish_msg_per_s']:>10} "
              f"{r['msg_per_s']!s:>11} {r['msg_per_cpu_s']!s:>10} {r['cpu_s']:>7}")
    print("  (recv msg/s is bounded by the publisher when it is close to pub msg/s; "
          "msg/CPU-s is the receiver's own cost)")
    publishing = []
    if args.publish_count:
        for qos in args.qos:
            for name in ("paho", "gmqtt"):
                publishing.append(publish_cost(args.host, args.port, name, qos,
                                               args.publish_count))
        print(f"\npublish() call on the event loop thread, {args.publish_count} alarm-sized "
              "messages one every 2 ms")
        print(f"  {'client':8} {'qos':>3} {'p50 ms':>8} {'p99 ms':>8}")
        for r in publishing:
            print(f"  {r['client']:8} {r['qos']:>3} {r['publish_p50_ms']:>8} "
                  f"{r['publish_p99_ms']:>8}")
    emit_json({"benchmark": "mqtt_clients", "count": args.count, "rate": args.rate,
               "linger": args.linger, "cases": results, "publishing": publishing})


if __name__ == "__main__":
    main()
