"""Health states and drift (`cloud.fleet_state`), and the heartbeat's health map
(`sync.health`): each state and reason from hand-built rows; the wire form's bounds."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edgewise.cloud.fleet_state import Thresholds, classify, drift
from edgewise.cloud.layers import Layer
from edgewise.cloud.store import NodeInfo
from edgewise.cloud.store.fleet import FleetRow
from edgewise.errors import PeerError
from edgewise.sync.health import MAX_TEXT, NodeHealth, OutboxLevel, PipelineHealth
from edgewise.sync.twin_state import DesiredState, ReportedState

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def row(**kw: Any) -> FleetRow:
    node = NodeInfo(id="n1", labels={"site": "x"}, key_fingerprint="f", cert_serial=1,
                    cert_expiry=NOW + timedelta(hours=20), status="online",
                    created=NOW - timedelta(days=1), last_seen=NOW - timedelta(seconds=5),
                    revoked=False)
    node = replace(node, **kw.pop("node", {}))
    base: dict[str, Any] = {"node": node, "desired": None, "reported": None,
                            "pending_setpoints": (), "health": None, "health_at": None,
                            "quarantine": None, "node_layer": None}
    base.update(kw)
    return FleetRow(**base)


@pytest.mark.parametrize(("r", "state", "reasons"), [
    (row(), "online", ()),
    (row(quarantine="bad batch"), "quarantined", ("bad batch",)),
    (row(node={"revoked": True}), "offline", ("revoked",)),
    (row(node={"last_seen": None, "status": "enrolled"}), "offline", ("never connected",)),
    (row(node={"status": "offline"}), "offline", ("session ended; last seen 5 s ago",)),
    (row(node={"last_seen": NOW - timedelta(minutes=10)}), "offline",
     ("no heartbeat for 10 min",)),
    (row(node={"cert_expiry": NOW + timedelta(hours=3)}), "degraded",
     ("certificate expires in 3.0 h",)),
    (row(node={"cert_expiry": NOW - timedelta(hours=1)}), "degraded", ("certificate expired",)),
    (row(health={"pipelines": {"line": ["failed", "disk gone"]},
                 "outbox": {"9": [3, 1000.0], "1": [100, 10_000.0], "5": [0, 99_999.0]},
                 "disk_free": 2**30, "disk_total": 100 * 2**30, "clock_offset_s": 6.5}),
     "degraded", ("pipeline line failed: disk gone",
                  "outbox priority 9: 3 records waiting, oldest 17 min",
                  "outbox priority 1: 100 records waiting, oldest 2.8 h",
                  "disk: 1,024 MiB free (1.0%)", "clock off by +6.5 s")),
    (row(health={"pipelines": {"line": ["running", None]}, "outbox": {"9": [3, 899.0]},
                 "disk_free": 10 * 2**30, "disk_total": 20 * 2**30, "clock_offset_s": -4.9}),
     "online", ()),
    (row(desired=DesiredState(3, None, {}, {}, None, "1.2.0"),
         health={"release": "1.1.0", "release_failed": "1.2.0"}), "degraded",
     ("release 1.2.0 failed on the node; it runs 1.1.0",)),
])
def test_classify(r: FleetRow, state: str, reasons: tuple[str, ...]) -> None:
    got = classify(r, NOW, Thresholds())
    assert (got.state, got.reasons) == (state, reasons)


def test_drift() -> None:
    assert drift(row(), [], NOW) == []
    d = DesiredState(4, None, {"rate": 5}, {}, (NOW - timedelta(minutes=1)).timestamp(), "2.0")
    r = row(desired=d, reported=ReportedState(3, "desired v4 refused: bad pipeline"),
            health={"release": "1.0", "release_failed": "2.0"}, pending_setpoints=("lim",),
            node_layer=Layer("node", "n1", {"rate": 6}))
    assert drift(r, [Layer("fleet", "", {"mode": "a"})], NOW) == [
        "config layers not applied: mode, rate would change (`edgewise config apply`)",
        "desired v4 expired before it was applied (applied v3)",
        "the node says: desired v4 refused: bad pipeline",
        "release 2.0 assigned, running 1.0 (it failed there)",
        "setpoints the node does not hold yet: lim"]
    # applied, and the layers match: no drift; layers None skips that check
    ok = row(desired=DesiredState(4, None, {"rate": 6}, {}), reported=ReportedState(4, "ok"),
             node_layer=Layer("node", "n1", {"rate": 6}))
    assert drift(ok, [], NOW) == [] and drift(replace(ok, node_layer=None), None, NOW) == []
    offline = row(node={"status": "offline"}, desired=DesiredState(2, None, {}, {}),
                  reported=ReportedState(1, "running desired v1"))
    assert drift(offline, None, NOW) == [
        "desired v2 not applied (applied v1) (the node is offline)"]


def test_health_wire_round_trip() -> None:
    h = NodeHealth(cpu_percent=12.5, memory_bytes=10, disk_free_bytes=5, disk_total_bytes=9,
                   outbox={9: OutboxLevel(3, 1.5)},
                   pipelines={"line": PipelineHealth("running")}, release="1.0",
                   cert_expires=1e9)
    assert NodeHealth.from_wire(h.to_wire()) == h
    assert NodeHealth.from_wire({}) == NodeHealth()
    long = NodeHealth.from_wire({"pipelines": {"p" * 1000: ["x" * 1000, None]}})
    assert [len(k) for k in long.pipelines] == [MAX_TEXT]
    assert len(long.pipelines["p" * MAX_TEXT].state) == MAX_TEXT


@pytest.mark.parametrize(("raw", "words"), [
    ([], "must be a map"),
    ({"cpu": float("nan")}, "cpu must be a number"),
    ({"cpu": True}, "cpu must be a number"),
    ({"mem": -1}, "mem must be an integer"),
    ({"mem": 1.5}, "mem must be an integer"),
    ({"outbox": {"x": [1, 2]}}, "is not a number"),
    ({"outbox": {"9": [1]}}, "each priority is [records, age_s]"),
    ({"outbox": {str(i): [0, 0] for i in range(17)}}, "at most 16 priorities"),
    ({"pipelines": {f"p{i}": ["running", None] for i in range(17)}}, "at most 16"),
    ({"pipelines": {"p": "running"}}, "each pipeline is [state, error]"),
    ({"release": 5}, "release must be text"),
])
def test_health_wire_refuses(raw: Any, words: str) -> None:
    with pytest.raises(PeerError, match=words.replace("[", r"\[").replace("]", r"\]")):
        NodeHealth.from_wire(raw)
