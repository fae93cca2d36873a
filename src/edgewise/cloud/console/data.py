"""What the console's pages show, read from the store: the fleet page, one node, the alarms.

No HTML here (`pages` renders); each function returns plain values for a template.

* `fleet_page`: one page of nodes (`PAGE` at most, keyset paging by id) by label selector and
  state, each with its state and reasons (`fleet_state.classify`), release, certificate expiry
  and outbox depth and age; and the count of each state over the whole selection. The counts
  and the state filter come from the fleet gauges' last pass (`fleet_metrics`: every node's
  state and labels, every 30 s), so no page classifies the whole fleet; before that pass ends
  (a control plane that just started) there are no counts yet and a state filter reads the
  nodes in `SCAN`-node store pages until it has a page of them.
* `node_view`: one node's identity, state, health, desired and reported state (with the
  setpoints whose values differ: the HLC merge's conflicts the node has not settled), streams,
  audit trail and newest alarms.
* `activity`: records per `BUCKET_S` seconds of each stream of a node over the last hour
  (chunk arrivals; payloads are not read), and `alarms`: the newest records of the streams
  whose name contains "alarm" (of one node or all), decoded in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from edgewise.cloud.dataout.render import record_dicts
from edgewise.cloud.fleet_metrics import FleetSummary
from edgewise.cloud.fleet_state import STATES, NodeState, classify
from edgewise.cloud.store import Store
from edgewise.cloud.store.fleet import FleetRow
from edgewise.cloud.store.records import StoredChunk
from edgewise.errors import PeerError
from edgewise.sync import codec

PAGE = 100  # nodes per fleet page
SCAN = 1000  # nodes per store read while filtering or counting
BUCKET_S = 10  # seconds per point of the activity charts
WINDOW = timedelta(hours=1)  # what the charts show
ALARM_STREAMS = "%alarm%"  # streams whose records the alarms views show (SQL LIKE)
MAX_ALARMS = 100  # records on the alarms page


@dataclass(frozen=True)
class NodeLine:
    """One node of the fleet page."""

    id: str
    site: str
    labels: dict[str, str]
    state: str
    reason: str
    release: str | None
    cert_expiry: datetime
    outbox_records: int | None  # waiting in the outbox, all priorities
    outbox_age_s: float | None  # of the oldest waiting chunk
    last_seen: datetime | None
    attestation: str | None = None  # tpm or none (`_attested`)


@dataclass
class FleetPage:
    nodes: list[NodeLine]
    counts: dict[str, int] | None  # None: not counted yet (the gauges' first pass runs)
    total: int | None
    next_after: str | None  # the next page starts after this id; None: the last page
    counted_at: float | None = None  # Unix time of the fleet gauges' pass the counts are from


def _line(row: FleetRow, st: NodeState) -> NodeLine:
    h: Mapping[str, Any] = row.health or {}
    outbox = h.get("outbox") or {}
    records = sum(int(r) for r, _age in outbox.values()) if outbox else None
    ages = [float(a) for r, a in outbox.values() if r]
    n = row.node
    return NodeLine(n.id, n.labels.get("site", ""), dict(n.labels), st.state, st.reason,
                    h.get("release"), n.cert_expiry, records, max(ages) if ages else None,
                    n.last_seen)


def _matches(labels: Mapping[str, str], want: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in want.items())


async def fleet_page(store: Store, labels: Mapping[str, str],
                     state: str | None, after: str | None, now: datetime,
                     summary: FleetSummary | None = None) -> FleetPage:
    """One page (module docstring). With ``summary`` (the fleet gauges' last pass: every node's
    state and labels) the counts and the state filter read it instead of classifying the fleet;
    the rows shown are classified now either way."""
    if summary is not None and summary.index:
        counts = dict.fromkeys(STATES, 0)
        picked: list[str] = []
        for node_id, (st, node_labels) in summary.index.items():
            if _matches(node_labels, labels):
                counts[st] += 1
                if state is not None and st == state and (after is None or node_id > after):
                    picked.append(node_id)
        total = sum(counts.values())
        as_of: float | None = summary.updated
        if state is not None:
            picked.sort()
            nodes = await store.nodes_by_id(picked[:PAGE + 1])
            rows = await store.fleet_rows(nodes)
            lines = [_line(r, classify(r, now)) for r in rows]
            next_after = lines[PAGE - 1].id if len(lines) > PAGE else None
            return FleetPage(await _attested(store, lines[:PAGE]), counts, total, next_after,
                             as_of)
    else:  # the gauges' first pass is still running (a control plane that just started)
        counts, total, as_of = None, None, None
    lines = []
    cursor = after
    more = True
    while len(lines) <= PAGE and more:
        rows = await store.fleet_page(labels, limit=SCAN if state else PAGE + 1, after=cursor)
        more = len(rows) == (SCAN if state else PAGE + 1)
        for row in rows:
            st = classify(row, now)
            if state is None or st.state == state:
                lines.append(_line(row, st))
        if rows:
            cursor = rows[-1].node.id
    next_after = lines[PAGE - 1].id if len(lines) > PAGE else None
    return FleetPage(await _attested(store, lines[:PAGE]), counts, total, next_after, as_of)


async def _attested(store: Store, lines: list[NodeLine]) -> list[NodeLine]:
    """``lines`` with their attestation (one query for the page)."""
    att = await store.attestations([ln.id for ln in lines])
    return [replace(ln, attestation=att.get(ln.id)) for ln in lines]


def chunk_records(chunk: StoredChunk, last: int) -> list[dict[str, Any]]:
    """The last ``last`` records of a stored chunk, with node, stream and seq (blocking)."""
    try:
        cols = codec.decode(chunk.payload)
    except PeerError:
        return []
    dicts = record_dicts(cols)
    first = chunk.seq_first + max(0, len(dicts) - last)
    return [{"node": chunk.node_id, "stream": chunk.stream, "seq": first + i,
             "ts": d.get("ts"), "record": d} for i, d in enumerate(dicts[-last:])]


async def alarms(store: Store, *, node_id: str | None = None, limit: int = MAX_ALARMS
                 ) -> list[dict[str, Any]]:
    """The newest alarm records (module docstring), newest first."""
    chunks = await store.recent_chunks(ALARM_STREAMS, limit=limit, node_id=node_id)

    def decode() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for c in chunks:  # newest chunk first; its records newest first
            out.extend(reversed(chunk_records(c, limit - len(out))))
            if len(out) >= limit:
                break
        return out

    return await asyncio.to_thread(decode)


async def activity(store: Store, node_id: str, now: datetime
                   ) -> dict[str, list[tuple[float, float]]]:
    """Per stream: (bucket start as Unix seconds, records per second) of the last hour."""
    rows = await store.stream_activity(node_id, now - WINDOW)
    per: dict[str, dict[int, int]] = {}
    for stream, at, records in rows:
        bucket = int(at.timestamp()) // BUCKET_S * BUCKET_S
        b = per.setdefault(stream, {})
        b[bucket] = b.get(bucket, 0) + records
    return {s: [(float(t), n / BUCKET_S) for t, n in sorted(b.items())]
            for s, b in sorted(per.items())}
