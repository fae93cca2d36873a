"""The whole system with real processes under partitions, restarts and a kill -9.

A control plane (``edgewise cloud serve``) and two agents (``edgewise agent run``) run the
factory line (10,000 readings/s each, a fixed number of readings) with their alarms also
published to the local Mosquitto, each agent behind its own `LinkProxy`. While they run:

* agent A's link is blackholed for 30 s (5 min in the long variant);
* agent B's link is reset three times;
* the control plane is stopped with SIGTERM and started again on the same directory and port;
* agent B is killed with SIGKILL and started again.

Afterwards, for each node and stream, checked with the real CLIs and the store itself: the
records produced (agent outbox) are all in the cloud, once each (chunk ranges contiguous and
disjoint, counts equal, no gap, nothing pending), the alarms in the cloud are exactly the
readings above 100.0 of the simulator's sequence, the aggregates count every reading once; and
agent A's alarms reached Mosquitto during its cut as fast as outside it. The agents' reconnect
backoff is capped at 5 s (30 s by default), so that a link that is back is used within seconds.

The long variant runs only with EDGEWISE_LONG_TESTS=1 (about 6 minutes).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgewise.pipeline import checkpoint as ckpt
from edgewise.sim.signals import factory_line
from edgewise.sync import codec
from edgewise.testbed.system import (
    AgentProcess,
    System,
    durable_readings,
    factory_pipeline,
    link_state,
)

CLI = [sys.executable, "-m", "edgewise.cli"]
RATE = 10_000  # factory line readings/s
LONG = os.environ.get("EDGEWISE_LONG_TESTS") == "1"


def cli_json(*args: str) -> Any:
    res = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    return json.loads(res.stdout)


# -- alarms as the plant sees them ---------------------------------------------------------


@dataclass
class AlarmLog:
    """Alarms received from Mosquitto: (receipt time, accept time) on CLOCK_MONOTONIC, which
    `time.perf_counter` reads in every process of this machine."""

    received: list[tuple[float, float, str, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class AlarmSubscriber:
    def __init__(self, host: str, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.log = AlarmLog()
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"e2e-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.connect(host, port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert self.ready.wait(10), "no SUBACK from Mosquitto"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.perf_counter()
        rec = json.loads(msg.payload)
        with self.log.lock:
            self.log.received.append((now, float(rec["accepted_at"]), rec["sensor"],
                                      float(rec["ts"])))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def alarm_stages_and_sinks(host: str, port: int, topic: str) -> tuple[list[dict[str, Any]],
                                                                     list[dict[str, Any]]]:
    """A map stage that copies each alarm's accept time into the record, and an MQTT sink."""
    stages = [{"id": "stamped", "type": "map", "inputs": ["alarms"],
               "set": {"accepted_at": "_accepted"}}]
    sinks = [{"id": "alarms-mqtt", "type": "mqtt", "inputs": ["stamped"], "host": host,
              "port": port, "topic": topic, "qos": 1}]
    return stages, sinks


# -- checks ---------------------------------------------------------------------------------


def start_ts_of(data_dir: Path) -> float:
    db = sqlite3.connect(f"file:{data_dir / 'engine' / 'outbox.db'}?mode=ro", uri=True)
    try:
        (value,) = db.execute("SELECT value FROM checkpoint WHERE key = 'engine'").fetchone()
    finally:
        db.close()
    return float(ckpt.unpack(value)["positions"]["sensors"]["position"]["start_ts"])


def expected_alarms(readings: int, start_ts: float) -> list[tuple[str, float, float]]:
    sig = factory_line(42)
    s, t, v = sig.readings(0, readings)
    above = v > 100.0
    ts = np.round(start_ts + t[above] / sig.rate_hz, 6)
    return list(zip(sig.names[s[above]].tolist(), ts.tolist(), v[above].tolist(), strict=True))


def stored_chunks(cloud_db: Path, node: str) -> dict[str, list[tuple[int, int, int, bytes]]]:
    db = sqlite3.connect(f"file:{cloud_db}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT stream, seq_first, seq_count, records, payload FROM chunks "
                          "WHERE node_id = ? ORDER BY stream, seq_first", (node,)).fetchall()
    finally:
        db.close()
    out: dict[str, list[tuple[int, int, int, bytes]]] = {}
    for stream, first, count, records, payload in rows:
        out.setdefault(stream, []).append((first, count, records, payload))
    return out


def check_exactly_once(agent: AgentProcess, cloud_dir: Path, readings: int) -> dict[str, int]:
    """Every record the agent produced is in the cloud store once; returns produced counts."""
    node = agent.node_id
    assert node is not None
    with ThreadPoolExecutor(3) as pool:  # the three CLIs at once: the agent has stopped
        answers = [pool.submit(cli_json, *args) for args in (
            ("agent", "status", "--data", str(agent.data_dir)),
            ("data", "stats", "--node", node, "--data", str(cloud_dir)),
            ("data", "query", "--node", node, "--stream", "alarms", "--limit", "100000",
             "--data", str(cloud_dir)))]
    status, stats_doc, alarms_doc = (a.result() for a in answers)
    assert status["node_id"] == node and status["running"] is False
    streams = status["streams"]
    assert set(streams) == {"alarms", "aggregates"}, streams
    for name, s in streams.items():
        assert (s["pending"], s["dropped"], s["refused"], s["compacted"]) == (0, 0, 0, 0), \
            (name, s)
        assert s["acknowledged"] == s["produced"] > 0, (name, s)
    stats = {s["stream"]: s for s in stats_doc["streams"]}
    chunks = stored_chunks(cloud_dir / "edgewise.db", node)
    for name, s in streams.items():
        c = stats[name]
        assert (c["records_stored"], c["contiguous_mark"], c["lost_records"]) == (
            s["produced"], s["produced"], 0), (name, c, s)
        assert not c["gaps"] and not c["missing"], c
        # the chunk ranges tile [0, produced) exactly: no overlap (a duplicate), no hole
        expect = 0
        for first, count, records, payload in chunks[name]:
            assert first == expect, (name, first, expect)
            assert count == records == len(next(iter(codec.decode(payload).values())))
            expect = first + count
        assert expect == s["produced"]
    # the content: the alarms are exactly the readings above 100.0, in order
    alarms = alarms_doc["records"]
    assert [r["seq"] for r in alarms] == list(range(streams["alarms"]["produced"]))
    got = [(r["data"]["sensor"], r["data"]["ts"], r["data"]["value"]) for r in alarms]
    want = expected_alarms(readings, start_ts_of(agent.data_dir))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g[0] == w[0] and abs(g[1] - w[1]) < 1e-6 and g[2] == w[2], (g, w)
    # the aggregates count every reading exactly once (1-s windows per sensor)
    total = 0
    for _first, _count, _records, payload in chunks["aggregates"]:
        total += int(codec.decode(payload)["count"].sum())
    assert total == readings
    assert durable_readings(agent.data_dir) == readings
    return {name: s["produced"] for name, s in streams.items()}


def p99(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values), 99))


# -- the scenario ---------------------------------------------------------------------------


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


def acked(agent: AgentProcess) -> int:
    return sum(s.acknowledged for s in agent.status().streams.values())


def connected(agent: AgentProcess) -> bool:
    return link_state(agent.status()) == "connected"


def finished(agent: AgentProcess) -> bool:
    engine = agent.status().engine
    return engine is not None and engine.state == "finished"


def pending(agent: AgentProcess) -> int:
    return sum(s.pending for s in agent.status().streams.values())


async def reconnects(agent: AgentProcess, timeout: float = 60) -> None:
    """The agent's session is back: connected, and new acknowledgements arrive (or there is
    nothing left to acknowledge: on a slow machine, with the reconnect backoff growing over the
    short sessions of this scenario, a pipeline can have read all its readings by then)."""
    before = acked(agent)
    try:
        await until(lambda: connected(agent) and (acked(agent) > before or pending(agent) == 0),
                    timeout, f"{agent.name} to reconnect")
    except AssertionError as exc:  # say what the agent was doing
        st = agent.status()
        tail = agent.child.log_tail() if agent.child else ""
        raise AssertionError(f"{exc}; acked {before} -> {acked(agent)}, link "
                             f"{link_state(st)}, engine {st.engine}; log:\n{tail}") from None


async def scenario(tmp_path: Path, mosquitto: tuple[str, int], cut_s: float) -> None:
    host, port = mosquitto
    prefix = f"e2e/{uuid.uuid4().hex[:10]}"
    readings = int((cut_s + 30) * RATE)
    sub = AlarmSubscriber(host, port, f"{prefix}/a/#")
    try:
        async with System(tmp_path) as system:
            cloud = await system.start_cloud()
            tokens = await asyncio.gather(cloud.token({"site": "e2e", "node": "a"}),
                                          cloud.token({"site": "e2e", "node": "b"}))
            agents = []
            for name, token in zip("ab", tokens, strict=True):
                stages, sinks = alarm_stages_and_sinks(host, port, f"{prefix}/{name}/{{sensor}}")
                text, _ = factory_pipeline(readings, stages=stages, sinks=sinks)
                path = tmp_path / f"pipeline-{name}.yaml"
                path.write_text(text)
                agents.append(await system.add_agent(name, path, token,
                                                     extra_args=["--backoff-cap", "5"]))
            a, b = agents
            assert a.link is not None and b.link is not None
            await until(lambda: all(connected(x) for x in agents), 60, "both agents online")
            t0 = time.monotonic()

            # (a) A's link blackholed for cut_s, after about 60 alarms outside the cut (about
            # 10/s; the steps below can stretch the cut well past cut_s on a loaded machine, and
            # the pipeline may then read its last readings before the link is back)
            await asyncio.sleep(6)
            a.link.cut("blackhole")
            t_cut = time.perf_counter()
            await asyncio.sleep(1.0)  # acks that arrived just before the cut are applied
            acked_at_cut = acked(a)

            # (b) B's link reset three times
            for _ in range(3):
                await asyncio.sleep(2)
                b.link.cut("reset")
                await asyncio.sleep(1.5)
                b.link.restore()
                await reconnects(b)
            assert b.link.stats.resets >= 3

            # (c) the control plane restarted (SIGTERM, then the same directory and port)
            assert await system.restart_cloud() == 0
            await reconnects(b)

            # (d) B killed with SIGKILL mid-stream and started again (no token needed)
            await asyncio.sleep(2)
            assert b.child is not None
            b.child.signal(signal.SIGKILL)
            assert await b.child.wait(10) == -signal.SIGKILL
            b.start()
            await reconnects(b)

            # A stays cut for cut_s in all: nothing of it reached the cloud meanwhile
            await until(lambda: time.perf_counter() - t_cut >= cut_s, cut_s + 10, "the cut")
            assert acked(a) == acked_at_cut
            # it kept working offline (a slow run may have read all its readings by now)
            engine = a.status().engine
            assert engine is not None and engine.state in ("running", "finished")
            assert engine.readings_in is not None and engine.readings_in > 0
            a.link.restore()
            t_restore = time.perf_counter()
            await reconnects(a, timeout=60)

            await until(lambda: finished(a) and finished(b), readings / RATE + 120,
                        "both pipelines to read their readings")
            await until(lambda: all(x.status().streams["alarms"].pending == 0
                                    and x.status().streams["aggregates"].pending == 0
                                    for x in agents), 120, "both outboxes to drain")
            codes = await asyncio.gather(a.stop(), b.stop())
            assert codes == [0, 0], [x.child.log_tail() for x in agents if x.child]
            elapsed = time.monotonic() - t0

            # both nodes checked at once (each check waits on three CLI processes)
            produced = dict(zip("ab", await asyncio.gather(*(asyncio.to_thread(
                check_exactly_once, x, cloud.data_dir, readings) for x in agents)), strict=True))
            assert produced["a"] == produced["b"]  # same seed, same readings, same records
            assert b.starts == 2
    finally:
        sub.close()

    # alarms during A's cut were acted on locally as fast as outside it
    with sub.log.lock:
        got = list(sub.log.received)
    lat = [(acc, (now - acc) * 1000) for now, acc, _s, _ts in got]
    during = [ms for acc, ms in lat if t_cut <= acc <= t_restore]
    outside = [ms for acc, ms in lat if not t_cut <= acc <= t_restore]
    assert len({(s, ts) for _n, _a, s, ts in got}) == produced["a"]["alarms"]  # all arrived
    assert len(during) >= 8 * cut_s and len(outside) >= 50, (len(during), len(outside))
    p_during, p_outside = p99(during), p99(outside)
    print(f"\n{elapsed:.0f} s; alarm latency p99 during the cut {p_during:.2f} ms "
          f"({len(during)} alarms), outside {p_outside:.2f} ms ({len(outside)}); "
          f"produced {produced}")
    # as fast as outside it, or within the 100 ms budget of a local action. An alarm path that
    # waited on the link would take seconds (the cut is 30 s); the tail of some 80 alarms is
    # itself noisy on a loaded 2-core machine (18 ms outside next to 36 ms during the cut in
    # one run, 6.6 ms next to 64.9 ms at load 9 in another); the alarm latency itself is
    # measured in benchmarks/edge_pipeline.py, not here
    assert p_during <= max(2 * p_outside + 5.0, 100.0), (p_during, p_outside)


async def test_partitions_restart_and_kill_every_record_once(
    tmp_path: Path, mosquitto: tuple[str, int]
) -> None:
    await scenario(tmp_path, mosquitto, cut_s=30.0)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="the 5-minute cut runs with EDGEWISE_LONG_TESTS=1")
@pytest.mark.timeout(900)
async def test_five_minute_cut_every_record_once(
    tmp_path: Path, mosquitto: tuple[str, int]
) -> None:
    await scenario(tmp_path, mosquitto, cut_s=300.0)
