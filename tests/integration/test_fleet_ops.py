"""Fleet operations through the operator API (real TLS, the control plane's own app; SQLite,
and PostgreSQL where marked): config layers, diff, apply, drift, health states, quarantine,
and the lost-update races of layer writes and label patches."""

# ruff: noqa: F811 (the fixtures of test_operator_api are imported by name)

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from test_operator_api import BOTH, Cloud, backend, cloud, db  # noqa: F401 (fixtures)

from edgewise.cloud.fleet_metrics import FLEET_GAUGES
from edgewise.sync.twin_state import ReportedState


async def _layers(cloud: Cloud) -> None:
    writes = [
        {"kind": "fleet", "set": {"rate": 10, "mode": "normal"}},
        {"kind": "group", "name": "plant1", "selector": "site=p1", "position": 10,
         "set": {"rate": 20}},
        {"kind": "group", "name": "line1", "selector": "site=p1,line=1", "position": 20,
         "set": {"mode": "fast"}},
        {"kind": "node", "name": "a1", "set": {"rate": 30}},
    ]
    for w in writes:
        r = await cloud.call("PUT", "/v1/config/layers", "operator", json=w)
        assert r.status_code == 200, r.text
        assert r.json()["layer"]["version"] == 1


@BOTH
async def test_layers_diff_apply_and_drift(cloud: Cloud) -> None:
    for labels, nid in (({"site": "p1", "line": "1"}, "a1"), ({"site": "p1", "line": "2"}, "a2"),
                        ({"site": "p2"}, "b1")):
        await cloud.node(labels, nid)
    await _layers(cloud)
    r = await cloud.call("GET", "/v1/config/layers", "viewer", params={"node": "a1"})
    assert [la["key"] for la in r.json()["layers"]] == [
        "fleet", "group:plant1", "group:line1", "node:a1"]
    r = await cloud.call("GET", "/v1/config/diff", "viewer", params={"node": "a1"})
    d = r.json()
    assert d["effective"] == {"rate": 30, "mode": "fast"}
    assert d["sources"] == {"rate": "node:a1", "mode": "group:line1"}
    assert d["desired_version"] == 0
    assert [(c["key"], c["before"], c["after"]) for c in d["changes"]] == [
        ("mode", None, "fast"), ("rate", None, 30)]
    r = await cloud.call("GET", "/v1/config/diff", "viewer", params={"node": "b1"})
    assert r.json()["effective"] == {"rate": 10, "mode": "normal"}
    # apply to all: a version each, the setpoints and pipelines of a node stay
    await cloud.call("PUT", "/v1/config", "operator",
                     json={"node": "a2", "setpoints": {"limit": 5}, "config": {"extra": 1}})
    r = await cloud.call("POST", "/v1/config/apply", "operator", json={"all": True})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [(n["node"], n["version"], n["changes"]) for n in got["nodes"]] == [
        ("a1", 1, 2), ("a2", 2, 3), ("b1", 1, 2)]
    assert got["unchanged"] == 0
    r = await cloud.call("GET", "/v1/config", "viewer", params={"node": "a2"})
    config = r.json()["desired"]["config"]
    assert {k: v for k, v in config.items() if k != "setpoints"} == {"rate": 20,
                                                                    "mode": "normal"}
    assert "limit" in str(config["setpoints"])
    r = await cloud.call("POST", "/v1/config/apply", "operator", json={"all": True})
    assert r.json() == {"nodes": [], "unchanged": 3, "held": []}
    # a direct write drifts from the layers; the node reports v1 of a1 only
    await cloud.call("PUT", "/v1/config", "operator", json={"node": "b1", "config": {"x": 1}})
    await cloud.store.merge_reported_state("a1", ReportedState(1, "running desired v1"))
    await cloud.store.merge_reported_state("b1", ReportedState(1, "desired v2 refused: bad"))
    r = await cloud.call("GET", "/v1/config/drift", "viewer")
    drift = {e["node"]: e for e in r.json()["nodes"]}
    assert r.json()["checked"] == 3 and r.json()["next"] is None
    assert sorted(drift) == ["a2", "b1"]
    assert drift["a2"]["reasons"] == [  # the setpoint write made its reported state
        "desired v2 not applied (applied none) (the node is offline)",
                                      "setpoints the node does not hold yet: limit"]
    assert drift["b1"]["reasons"] == [
        "config layers not applied: x would change (`edgewise config apply`)",
        "desired v2 not applied (applied v1) (the node is offline)",
        "the node says: desired v2 refused: bad"]
    assert (drift["b1"]["desired_version"], drift["b1"]["applied_version"]) == (2, 1)
    # a stale version is refused; the group can be deleted; audit says who
    r = await cloud.call("PUT", "/v1/config/layers", "operator",
                         json={"kind": "fleet", "set": {"rate": 1}, "if_version": 0})
    assert r.status_code == 409 and "at version 1, not 0" in r.json()["error"]
    r = await cloud.call("PUT", "/v1/config/layers", "operator",
                         json={"kind": "group", "name": "line1", "delete": True})
    assert r.json() == {"layer": None, "deleted": True}
    r = await cloud.call("GET", "/v1/config/diff", "viewer", params={"node": "a1"})
    assert [(c["key"], c["after"], c["source"]) for c in r.json()["changes"]] == [
        ("mode", "normal", "fleet")]
    actions = [e.action for e in await cloud.store.list_audit(limit=100)]
    assert actions.count("config.layer") == 4 and actions.count("config.apply") == 2
    assert "config.layer.delete" in actions


async def test_layer_writes_refuse_bad_input(cloud: Cloud) -> None:
    await cloud.node({"site": "p1"}, "a1")
    cases = [
        ({"kind": "group", "name": "g", "set": {"a": 1}}, 400, "group 'g' is new: give its"),
        ({"kind": "fleet", "set": {"setpoints": 1}}, 400, "'setpoints' is not a layer key"),
        ({"kind": "fleet", "set": {"a": None}}, 400, "set to null: remove them instead"),
        ({"kind": "fleet", "set": {"a": 1}, "remove": ["a"]}, 400, "both set and removed"),
        ({"kind": "fleet", "name": "x", "set": {"a": 1}}, 400, "the fleet layer has no name"),
        ({"kind": "node", "name": "ghost", "set": {"a": 1}}, 404, "no node 'ghost'"),
        ({"kind": "group", "name": "g", "selector": "a", "set": {"a": 1}}, 400, "selector"),
        ({"kind": "group", "name": "nope", "delete": True}, 404, "no config layer"),
    ]
    for body, status, words in cases:
        r = await cloud.call("PUT", "/v1/config/layers", "operator", json=body)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["error"], (body, r.text)
    r = await cloud.call("POST", "/v1/config/apply", "operator",
                         json={"node": "a1", "all": True})
    assert r.status_code == 400


@BOTH
async def test_concurrent_layer_writes_all_survive(cloud: Cloud) -> None:
    """Operators writing different keys of one layer at the same time all keep their write:
    the layer is read, changed and written in one transaction."""
    writes = {f"k{i}": i for i in range(8)}
    answers = await asyncio.gather(*(
        cloud.call("PUT", "/v1/config/layers", "operator",
                   json={"kind": "fleet", "set": {k: v}}) for k, v in writes.items()))
    assert [r.status_code for r in answers] == [200] * len(writes), [r.text for r in answers]
    assert sorted(r.json()["layer"]["version"] for r in answers) == list(range(1, 9))
    r = await cloud.call("GET", "/v1/config/layers", "viewer")
    (fleet,) = r.json()["layers"]
    assert fleet["values"] == writes and fleet["version"] == 8
    # with if_version, of two writers that read the same version exactly one wins
    answers = await asyncio.gather(*(
        cloud.call("PUT", "/v1/config/layers", "operator",
                   json={"kind": "fleet", "set": {"k0": v}, "if_version": 8})
        for v in (100, 200)))
    assert sorted(r.status_code for r in answers) == [200, 409]


@BOTH
async def test_concurrent_label_patches_all_survive(cloud: Cloud) -> None:
    """Label patches of one node at the same time all keep their change (the labels were
    read in one transaction and written in another: all but one were lost)."""
    await cloud.node({"site": "p1"}, "a1")
    answers = await asyncio.gather(*(
        cloud.call("PATCH", "/v1/nodes/a1/labels", "operator", json={"set": {f"k{i}": "v"}})
        for i in range(8)))
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    node = await cloud.store.get_node("a1")
    assert node is not None
    assert node.labels == {"site": "p1", **{f"k{i}": "v" for i in range(8)}}


@BOTH
async def test_health_states_and_quarantine(cloud: Cloud) -> None:
    for nid in ("ok", "sick", "gone", "never", "held"):
        await cloud.node({"site": "p1"}, nid)
    now = datetime.now(UTC)
    for nid in ("ok", "sick", "held"):
        await cloud.store.set_node_status(nid, "online", now=now)
    await cloud.store.set_node_status("gone", "offline", now=now - timedelta(hours=1))
    healthy = {"outbox": {"9": [0, 0.0]}, "pipelines": {"line": ["running", None]},
               "disk_free": 10 * 2**30, "disk_total": 20 * 2**30, "clock_offset_s": 0.2}
    sick = {"outbox": {"9": [50, 3600.0], "1": [0, 0.0]},
            "pipelines": {"line": ["restarting", "boom"]},
            "disk_free": 100 * 2**20, "disk_total": 20 * 2**30, "clock_offset_s": -9.0}
    await cloud.store.write_health({"ok": (healthy, now), "sick": (sick, now),
                                    "held": (healthy, now)})
    r = await cloud.call("POST", "/v1/nodes/held/quarantine", "operator",
                         json={"reason": "bad sensor firmware"})
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["reasons"]) == ("quarantined", ["bad sensor firmware"])
    r = await cloud.call("GET", "/v1/fleet/nodes", "viewer")
    states = {n["id"]: (n["state"], n["reasons"]) for n in r.json()["nodes"]}
    assert states == {
        "ok": ("online", []),
        "sick": ("degraded", ["pipeline line restarting: boom",
                              "outbox priority 9: 50 records waiting, oldest 60 min",
                              "disk: 100 MiB free (0.5%)", "clock off by -9.0 s"]),
        "gone": ("offline", ["session ended; last seen 60 min ago"]),
        "never": ("offline", ["never connected"]),
        "held": ("quarantined", ["bad sensor firmware"]),
    }
    r = await cloud.call("GET", "/v1/fleet/nodes", "viewer", params={"state": "degraded"})
    assert [n["id"] for n in r.json()["nodes"]] == ["sick"]
    assert r.json()["nodes"][0]["health"]["outbox"]["9"] == [50, 3600.0]
    r = await cloud.call("POST", "/v1/nodes/held/quarantine", "operator", json={})
    assert r.json()["state"] == "online"
    r = await cloud.call("POST", "/v1/nodes/ghost/quarantine", "operator", json={"reason": "x"})
    assert r.status_code == 404
    actions = [e.action for e in await cloud.store.list_audit(target="node:held")]
    assert actions[:2] == ["node.unquarantine", "node.quarantine"]
    # the fleet gauges: sums over the nodes, served at /metrics
    s = await cloud.running.app[FLEET_GAUGES].refresh()
    assert s.nodes == {"online": 2, "degraded": 1, "offline": 2, "quarantined": 0}
    assert (s.outbox_oldest, s.outbox_waiting) == ({9: 3600.0, 1: 0.0}, {9: 50, 1: 0})
    assert (s.certs_expiring, s.failed_updates, s.clock_offset_max) == (0, 0, 9.0)
    text = (await cloud.http.get("/metrics")).text
    assert 'edgewise_fleet_nodes{state="degraded"} 1.0' in text
    assert 'edgewise_fleet_outbox_oldest_seconds{priority="9"} 3600.0' in text
    assert 'edgewise_rollouts{state="paused"} 0.0' in text
    # a release assigned to "ok" failed there: read from the desired state's release alone
    await cloud.store.update_desired_state("ok", lambda _p: (None, {}), release="1.2.0",
                                           actor="test")
    await cloud.store.write_health({"ok": ({**healthy, "release": "1.1.0",
                                            "release_failed": "1.2.0"}, now)})
    s = await cloud.running.app[FLEET_GAUGES].refresh()
    assert (s.failed_updates, s.nodes["degraded"]) == (1, 2)
    r = await cloud.call("GET", "/v1/fleet/nodes", "viewer", params={"state": "degraded"})
    assert [(n["id"], n["reasons"]) for n in r.json()["nodes"]] == [
        ("ok", ["release 1.2.0 failed on the node; it runs 1.1.0"]),
        ("sick", ["pipeline line restarting: boom",
                  "outbox priority 9: 50 records waiting, oldest 60 min",
                  "disk: 100 MiB free (0.5%)", "clock off by -9.0 s"])]
