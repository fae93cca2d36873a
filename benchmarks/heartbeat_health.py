"""Heartbeat health (issue 12): what carrying the node's health costs, beside a heartbeat
without it, in the same run.

* control plane, per heartbeat: `protocol.decode` of the frame, then (with health) the check
  `sync.health.clean` and the clock offset, as `SessionRegistry.node_health` does;
  baseline: decoding a heartbeat without health;
* wire: the frame's bytes with and without health (msgpack, before WebSocket and TLS);
* node, per heartbeat: `edge.health.HealthProbe.sample` over a real outbox holding CHUNKS
  waiting chunks in three priorities (the outbox lookups run in a worker thread, as in the
  agent); baseline: building the heartbeat map without health.

Run: python benchmarks/heartbeat_health.py [--rounds 20000] [--chunks 2000]
The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit_json, print_table

from edgewise.edge.health import HealthProbe
from edgewise.edge.status_model import EngineStatus
from edgewise.outbox import Outbox, PendingChunk
from edgewise.outbox.view import OutboxView
from edgewise.sync import protocol
from edgewise.sync.health import clean


def per_call_us(fn: Any, rounds: int) -> float:
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t0) / rounds * 1e6


def make_outbox(path: Path, chunks: int) -> Outbox:
    ob = Outbox(path, 256 << 20, sync="normal")
    ob.open()
    for name, prio in (("alarms", 9), ("aggregates", 5), ("raw", 1)):
        ob.register_stream(name, prio)
    cols = {"sensor": np.array(["line1/temp/001"] * 10, dtype=object),
            "ts": np.arange(10, dtype=float), "value": np.arange(10, dtype=float)}
    for _k in range(chunks // 3):
        ob.commit([PendingChunk(n, cols, 10) for n in ("alarms", "aggregates", "raw")])
    return ob


async def node_side(data: Path, chunks: int, rounds: int) -> tuple[float, float, dict[str, Any]]:
    ob = make_outbox(data / "outbox.db", chunks)
    view = OutboxView(data / "outbox.db")
    agent = SimpleNamespace(
        data_dir=data, outbox=ob, view=view,
        supervisor=SimpleNamespace(status=lambda: EngineStatus(state="running",
                                                               pipeline="line")),
        updater=SimpleNamespace(reportable=lambda: True,
                                status=lambda: {"running": "1.4.0", "failed": ["1.3.9"]}),
        identity=SimpleNamespace(cert=SimpleNamespace(not_after=SimpleNamespace(
            timestamp=lambda: time.time() + 86400))))
    probe = HealthProbe(agent)  # type: ignore[arg-type]
    sample = await probe.sample()
    t0 = time.perf_counter()
    for _ in range(rounds):
        await probe.sample()
    with_health = (time.perf_counter() - t0) / rounds * 1e6
    base = per_call_us(lambda: {"t": protocol.HEARTBEAT, "ts": time.time()}, rounds * 10)
    view.close()
    ob.close()
    return with_health, base, sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20000)
    ap.add_argument("--chunks", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        sample_us, build_us, sample = asyncio.run(
            node_side(Path(d), args.chunks, max(args.rounds // 20, 50)))
    plain = protocol.encode({"t": protocol.HEARTBEAT, "ts": time.time()})
    rich = protocol.encode({"t": protocol.HEARTBEAT, "health": sample, "ts": time.time()})

    def check() -> None:
        msg = protocol.decode(rich)
        body = clean(msg["health"])
        body["clock_offset_s"] = round(time.time() - float(msg["ts"]), 3)

    cloud_us = per_call_us(check, args.rounds)
    cloud_base_us = per_call_us(lambda: protocol.decode(plain), args.rounds)
    figures = {
        "cloud_us_per_heartbeat": round(cloud_us, 2),
        "cloud_us_per_heartbeat_without_health": round(cloud_base_us, 2),
        "frame_bytes": len(rich), "frame_bytes_without_health": len(plain),
        "node_us_per_sample": round(sample_us, 1),
        "node_us_per_heartbeat_without_health": round(build_us, 2),
        "outbox_chunks": args.chunks,
        "cloud_cpu_pct_10000_nodes_15s": round(10000 / 15 * cloud_us / 1e6 * 100, 2),
    }
    print_table("heartbeat health", [
        ("control plane, per heartbeat", f"{cloud_us:.1f} us",
         f"{cloud_base_us:.1f} us without health"),
        ("frame", f"{len(rich)} B", f"{len(plain)} B without health"),
        ("node, per sample", f"{sample_us:.0f} us",
         f"{build_us:.2f} us to build a heartbeat without health"),
        ("10,000 nodes, one per 15 s", f"{figures['cloud_cpu_pct_10000_nodes_15s']} % of a core",
         "control plane, checking health"),
    ])
    emit_json(figures)


if __name__ == "__main__":
    main()
