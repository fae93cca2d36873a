"""Backlog drain after an outage: bytes/s on the wire against the link's capacity, alarms first.

Real processes: ``edgewise cloud serve`` and one ``edgewise agent run`` running the factory line
(10,000 readings/s; by default also forwarding every raw reading on a ``raw`` stream of
priority bulk, so the backlog is large enough to measure a rate) behind a `LinkProxy`. The link
is blackholed for ``--outage`` seconds while the pipeline keeps running and the outbox fills;
then it is restored, shaped to ``--link-mbit`` Mbit/s in each direction. The drain rate is the
bytes the proxy forwarded upstream (TLS, framing, everything) from the first byte after the
restore until every stream's backlog at the restore was acknowledged, divided by that time
(the agent's reconnect backoff is inside that time; the rate from the first acknowledgement of
the new session is reported too); the pipeline keeps producing meanwhile, and what it produces
shares the link. Also reported: when each stream's backlog was fully acknowledged (alarms
should finish first).

Run: python benchmarks/sync_drain.py [--outage 300] [--link-mbit 2] [--no-raw]
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

from edgewise.testbed.system import System, factory_pipeline, link_state

RAW_SINK = {"id": "raw-out", "type": "outbox", "inputs": ["sensors"], "stream": "raw",
            "priority": "bulk"}


async def measure(outage: float, capacity: float, raw: bool, work: Path) -> dict:
    async with System(work) as system:
        cloud = await system.start_cloud()
        text, _ = factory_pipeline(None, sinks=[RAW_SINK] if raw else [])
        (work / "pipeline.yaml").write_text(text)
        agent = await system.add_agent("edge", work / "pipeline.yaml",
                                       await cloud.token({"bench": "sync-drain"}))
        link = agent.link
        assert link is not None
        deadline = time.monotonic() + 60
        while link_state(agent.status()) != "connected":
            if time.monotonic() > deadline or not agent.running:
                raise SystemExit(f"the agent did not connect:\n{agent.child.log_tail()}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)
        link.cut("blackhole")
        t_cut = time.monotonic()
        print(f"link cut (blackhole) for {outage:.0f} s ...", flush=True)
        while (left := outage - (time.monotonic() - t_cut)) > 0:
            await asyncio.sleep(min(left, 30.0))
            st = agent.status().streams
            print(f"  {time.monotonic() - t_cut:5.0f} s: backlog "
                  + ", ".join(f"{k} {v.pending:,} records / {v.pending_bytes:,} B"
                              for k, v in st.items()), flush=True)
        st = agent.status()
        if not agent.running:
            raise SystemExit(f"the agent stopped:\n{agent.child.log_tail()}")
        target = {k: v.produced for k, v in st.streams.items()}
        backlog = {k: v.pending for k, v in st.streams.items()}
        backlog_bytes = sum(v.pending_bytes for v in st.streams.values())
        up0 = link.stats.bytes_up
        link.rate = capacity
        link.restore()
        t_restore = time.monotonic()
        print(f"link restored at {capacity * 8 / 1e6:g} Mbit/s; draining "
              f"{backlog_bytes:,} B of chunk payload ...", flush=True)
        t_flow: float | None = None
        up_flow = up0
        drained: dict[str, float] = {}
        first_ack: float | None = None
        up_first_ack = up0
        acked0 = {k: v.acknowledged for k, v in st.streams.items()}
        while len(drained) < len(target):
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if t_flow is None and link.stats.bytes_up > up0:
                t_flow, up_flow = now, up0
            streams = agent.status().streams
            for k, v in streams.items():
                if first_ack is None and v.acknowledged > acked0.get(k, 0):
                    first_ack, up_first_ack = now - t_restore, link.stats.bytes_up
                if k not in drained and v.acknowledged >= target.get(k, 0):
                    drained[k] = now - t_restore
            if now - t_restore > outage * 4 + 300:
                raise SystemExit(f"the backlog did not drain: {streams}")
        t_end = time.monotonic()
        up_end = link.stats.bytes_up
        assert t_flow is not None
        final = agent.status()
        stats = await cloud.stats()
        node = agent.node_id
        stored = {k: stats[(node, k)].records_stored for k in target}
    seconds = t_end - t_flow
    rate = (up_end - up_flow) / seconds
    assert first_ack is not None
    session_s = t_end - (t_restore + first_ack)
    session_rate = (up_end - up_first_ack) / session_s if session_s > 0 else 0.0
    order = sorted(drained, key=lambda k: drained[k])
    priorities = {k: v.priority for k, v in final.streams.items()}
    return {
        "outage_s": outage,
        "link_capacity_bytes_per_s": capacity,
        "backlog_records": backlog,
        "backlog_payload_bytes": backlog_bytes,
        "first_byte_after_restore_s": round(t_flow - t_restore, 3),
        "first_ack_after_restore_s": round(first_ack or 0.0, 3),
        "drain_s": round(seconds, 2),
        "drain_wire_bytes_up": up_end - up_flow,
        "drain_rate_bytes_per_s": round(rate),
        "link_utilisation": round(rate / capacity, 4),
        "session_drain_s": round(session_s, 2),
        "session_drain_rate_bytes_per_s": round(session_rate),
        "session_link_utilisation": round(session_rate / capacity, 4),
        "stream_drained_after_s": {k: round(v, 2) for k, v in drained.items()},
        "drain_order": order,
        "alarms_first": order == sorted(order, key=lambda k: -priorities[k]),
        "stored_at_end": stored,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outage", type=float, default=300.0, help="seconds the link is cut")
    ap.add_argument("--link-mbit", type=float, default=2.0,
                    help="capacity of the restored link, Mbit/s each way")
    ap.add_argument("--no-raw", action="store_true",
                    help="factory line only (aggregates and alarms: a small backlog)")
    args = ap.parse_args()
    capacity = args.link_mbit * 1e6 / 8
    with tempfile.TemporaryDirectory(prefix="edgewise-bench-") as work:
        f = asyncio.run(measure(args.outage, capacity, not args.no_raw, Path(work)))
    rows = [
        ("backlog after the outage", f"{f['backlog_payload_bytes']:,} B",
         f"{f['backlog_records']} records, {f['outage_s']:.0f} s outage"),
        ("drain rate, wire bytes up", f"{f['drain_rate_bytes_per_s']:,} B/s",
         f"link {f['link_capacity_bytes_per_s']:,.0f} B/s: {f['link_utilisation']:.1%} "
         "(target: close to 100%), from the first byte after the restore"),
        ("  once the session is back", f"{f['session_drain_rate_bytes_per_s']:,} B/s",
         f"{f['session_link_utilisation']:.1%} of the link, from the first acknowledgement "
         f"({f['session_drain_s']} s)"),
        ("drain time", f"{f['drain_s']} s",
         f"first byte {f['first_byte_after_restore_s']} s, first ack "
         f"{f['first_ack_after_restore_s']} s after the restore"),
        ("streams drained (s after restore)", ", ".join(
            f"{k} {v}" for k, v in sorted(f["stream_drained_after_s"].items(),
                                          key=lambda kv: kv[1])),
         f"alarms first: {'yes' if f['alarms_first'] else 'NO'}"),
    ]
    print_table("Backlog drain after an outage", rows)
    emit_json(f)


if __name__ == "__main__":
    main()
