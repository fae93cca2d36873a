"""Edge-to-cloud bytes on the wire per reading for the factory line, against JSON over MQTT.

Real processes: ``edgewise cloud serve`` and one ``edgewise agent run`` running the factory line
(examples/factory-line.yaml, 10,000 readings/s) for ``--seconds`` seconds of readings, connected
through a `LinkProxy` that counts every byte it forwards in each direction: TLS records,
WebSocket framing, the protocol's heartbeats, reports and acknowledgements, and the enrolment
and desired-state HTTPS requests. The run ends when the pipeline has read its readings and the
cloud has stored every record (checked: produced == stored per stream).

Baseline: one JSON message per reading over MQTT, computed as benchmarks/edge_pipeline.py does
(the NDJSON reading as payload, topic ``factory/<sensor>``, MQTT fixed header and topic length;
no TCP/IP headers and no TLS, which favours the baseline).

Run: python benchmarks/sync_bytes.py [--seconds 60]
The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit_json, print_table

from edgewise.testbed.system import System, factory_pipeline, json_mqtt_baseline, link_state

RATE = 10_000


async def measure(seconds: float, work: Path) -> dict:
    readings = round(seconds * RATE)
    async with System(work) as system:
        cloud = await system.start_cloud()
        text, seed = factory_pipeline(readings)
        (work / "factory-line.yaml").write_text(text)
        agent = await system.add_agent("edge", work / "factory-line.yaml",
                                       await cloud.token({"bench": "sync-bytes"}))
        link = agent.link
        assert link is not None
        deadline = time.monotonic() + 60
        while link_state(agent.status()) != "connected":
            if time.monotonic() > deadline or not agent.running:
                raise SystemExit(f"the agent did not connect:\n{agent.child.log_tail()}")
            await asyncio.sleep(0.1)
        connected = (link.stats.bytes_up, link.stats.bytes_down)
        t0 = time.monotonic()
        while True:
            st = agent.status()
            if st.engine is not None and st.engine.state == "finished" and all(
                    s.pending == 0 for s in st.streams.values()):
                break
            if time.monotonic() - t0 > seconds * 3 + 120:
                raise SystemExit("the agent did not finish and drain in time")
            await asyncio.sleep(0.5)
        stats = await cloud.stats()
        if await agent.stop() != 0:
            raise SystemExit(f"the agent did not stop cleanly:\n{agent.child.log_tail()}")
        final = agent.status()
        node = agent.node_id
        produced = {k: v.produced for k, v in final.streams.items()}
        stored = {k: stats[(node, k)].records_stored for k in produced}
        if produced != stored:
            raise SystemExit(f"records produced {produced} != stored {stored}")
        up, down = link.stats.bytes_up, link.stats.bytes_down
        wire = final.bytes
    base = json_mqtt_baseline(readings, seed)
    total = up + down
    return {
        "readings": readings,
        "records_uploaded": sum(produced.values()),
        "records_by_stream": produced,
        "wire_bytes_up": up,
        "wire_bytes_down": down,
        "wire_bytes_total": total,
        "wire_bytes_before_session": connected[0] + connected[1],
        "agent_tcp_info_sent": wire.wire_sent if wire else None,
        "agent_tcp_info_received": wire.wire_received if wire else None,
        "websocket_payload_sent": wire.ws_sent if wire else None,
        "bytes_per_reading": round(total / readings, 4),
        "bytes_up_per_reading": round(up / readings, 4),
        "baseline_bytes": base,
        "baseline_bytes_per_reading": round(base / readings, 3),
        "ratio_total_to_baseline": round(total / base, 5),
        "ratio_up_to_baseline": round(up / base, 5),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0,
                    help="seconds of factory-line readings (10,000/s)")
    args = ap.parse_args()
    print(f"factory line for {args.seconds:.0f} s of readings through a counting proxy ...",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="edgewise-bench-") as work:
        f = asyncio.run(measure(args.seconds, Path(work)))
    rows = [
        ("readings", f"{f['readings']:,}", f"{f['records_uploaded']:,} records uploaded "
         f"{f['records_by_stream']}"),
        ("bytes on the wire, both ways", f"{f['wire_bytes_total']:,}",
         f"{f['baseline_bytes']:,} JSON per reading over MQTT "
         f"(ratio {f['ratio_total_to_baseline']:.4%})"),
        ("  of which until the session was up", f"{f['wire_bytes_before_session']:,}",
         "enrolment, TLS handshakes, hello and welcome"),
        ("bytes on the wire, up", f"{f['wire_bytes_up']:,}",
         f"ratio {f['ratio_up_to_baseline']:.4%} of the baseline"),
        ("bytes per reading, both ways", f"{f['bytes_per_reading']}",
         f"{f['baseline_bytes_per_reading']} JSON over MQTT"),
        ("agent's TCP_INFO, session socket", f"{f['agent_tcp_info_sent']:,} sent",
         f"{f['agent_tcp_info_received']:,} received (proxy counts the enrolment too)"),
    ]
    print_table("Edge to cloud bytes, factory line (TLS, framing, heartbeats included)", rows)
    emit_json(f)


if __name__ == "__main__":
    main()
