"""`edgewise config layer|layers|diff|apply|drift` and `edgewise node list --state`,
`node quarantine|unquarantine` against a real control plane (TLS, SQLite) in a thread: tables,
--json answers with exact values, refusals with exit code 2."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from test_operator_cli import Server, cli, ok, server  # noqa: F401 (fixture)

# ruff: noqa: F811 (the server fixture is imported by name)


def test_layers_diff_apply_drift_and_states(server: Server, tmp_path: Path) -> None:
    server.node("a1", {"site": "plant1"})
    server.node("b1", {"site": "plant2"})
    data = ["--data", str(server.data_dir)]
    out = ok(cli("config", "layer", "--fleet", "rate=10", "mode=slow", *data, home=tmp_path))
    assert "fleet v1: mode=\"slow\", rate=10; not applied yet" in out
    res = json.loads(ok(cli("config", "layer", "--group", "p1", "--selector", "site=plant1",
                            "--position", "5", "rate=20", "--json", *data, home=tmp_path)))
    assert res["layer"]["key"] == "group:p1" and res["layer"]["selector"] == {"site": "plant1"}
    ok(cli("config", "layer", "--node", "a1", "mode=fast", *data, home=tmp_path))
    out = ok(cli("config", "layers", "--node", "a1", *data, home=tmp_path))
    assert out.index("fleet") < out.index("group:p1") < out.index("node:a1")
    d = json.loads(ok(cli("config", "diff", "--node", "a1", "--json", *data, home=tmp_path)))
    assert d["effective"] == {"rate": 20, "mode": "fast"}
    assert d["sources"] == {"rate": "group:p1", "mode": "node:a1"}
    out = ok(cli("config", "diff", "--node", "a1", *data, home=tmp_path))
    assert "2 change(s) `edgewise config apply` would make" in out
    applied = json.loads(ok(cli("config", "apply", "--all", "--yes", "--json", *data,
                                home=tmp_path)))
    assert [(n["node"], n["version"]) for n in applied["nodes"]] == [("a1", 1), ("b1", 1)]
    out = ok(cli("config", "diff", "--node", "a1", *data, home=tmp_path))
    assert "no change" in out
    r = cli("config", "layer", "--fleet", "rate=11", "--if-version", "0", *data, home=tmp_path)
    assert r.exit_code == 2 and "at version 1, not 0" in r.stderr
    r = cli("config", "layer", "--fleet", "--node", "a1", "x=1", *data, home=tmp_path)
    assert r.exit_code == 2 and "exactly one of --fleet" in r.stderr
    r = cli("config", "apply", "--selector", "site=plant1", *data, home=tmp_path)
    assert r.exit_code == 1 and "Aborted" in r.output  # asked, and no answer is no
    drift = json.loads(ok(cli("config", "drift", "--json", *data, home=tmp_path)))
    assert [(e["node"], e["reasons"]) for e in drift["nodes"]] == [
        ("a1", ["never reported (desired v1)"]), ("b1", ["never reported (desired v1)"])]
    # states: both never connected; one quarantined
    now = datetime.now(UTC)
    server.run(server.store.set_node_status("a1", "online", now=now))
    out = ok(cli("node", "quarantine", "b1", "--reason", "flaky disk", *data, home=tmp_path))
    assert "b1: quarantined (flaky disk)" in out
    listed = json.loads(ok(cli("node", "list", "--state", "any", "--json", *data,
                               home=tmp_path)))
    assert [(n["id"], n["state"], n["reasons"]) for n in listed["nodes"]] == [
        ("a1", "online", []), ("b1", "quarantined", ["flaky disk"])]
    out = ok(cli("node", "list", "--state", "quarantined", *data, home=tmp_path))
    assert "1 node(s) quarantined" in out and "flaky disk" in out
    out = ok(cli("node", "unquarantine", "b1", *data, home=tmp_path))
    assert "b1: offline (never connected)" in out
    listed = json.loads(ok(cli("node", "list", "--state", "degraded", "--json", *data,
                               home=tmp_path)))
    assert listed == {"nodes": []}
    # node show: the state and the newest health
    health = {"outbox": {"9": [3, 400.0]}, "pipelines": {"line": ["running", None]},
              "cpu": 2.0, "mem": 64 * 2**20, "disk_free": 2**30, "disk_total": 8 * 2**30,
              "release": "1.4.0", "clock_offset_s": 0.5}
    server.run(server.store.write_health({"a1": (health, now)}))
    shown = json.loads(ok(cli("node", "show", "a1", "--json", *data, home=tmp_path)))
    assert (shown["state"], shown["reasons"], shown["health"]) == ("online", [], health)
    out = ok(cli("node", "show", "a1", *data, home=tmp_path))
    assert ("cpu 2%, mem 64 MiB, disk free 1.0 GiB, outbox p9 3 waiting, oldest 400 s, "
            "pipeline line running, release 1.4.0, clock +0.5 s") in out
