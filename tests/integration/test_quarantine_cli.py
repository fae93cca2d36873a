"""The operator CLI against a real control plane: what a quarantined node sent is left out of
`edgewise data query` and shown, marked, with --include-quarantined; `node list` and `node
show` carry the attestation and the quarantine reason; a push to it is refused with the reason
and a selector push names it as held."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from test_operator_cli import T0, Server, cli, ok, server

from edgewise.cloud.store import ChunkWrite, MarkWrite
from edgewise.sync import codec

__all__ = ["server"]  # the fixture


def test_cli_shows_quarantine_and_keeps_its_data_apart(server: Server, tmp_path: Path) -> None:
    server.node("n1", {"site": "a"})
    server.node("n2", {"site": "a"})
    now = datetime.now(UTC)
    cols = {"ts": np.round(T0 + np.arange(6) * 0.5, 2), "value": np.arange(6) * 1.5}
    part = [{k: v[a:b] for k, v in cols.items()} for a, b in ((0, 4), (4, 6))]
    server.run(server.store.set_quarantine("n1", "seen tampering", actor="operator:test"))
    server.run(server.store.commit_ingest(
        [ChunkWrite("n1", "raw", 0, 4, 4, False, codec.encode(part[0]), now),
         ChunkWrite("n1", "raw", 4, 2, 2, False, codec.encode(part[1]), now, True)],
        [], [MarkWrite("n1", "raw", 6, now)]))
    data = ["--data", str(server.data_dir)]
    got = json.loads(ok(cli("data", "query", "--node", "n1", "--stream", "raw", "--json", *data,
                            home=tmp_path)))
    assert ([r["seq"] for r in got["records"]], got["quarantined"]) == ([0, 1, 2, 3], [])
    got = json.loads(ok(cli("data", "query", "--node", "n1", "--stream", "raw",
                            "--include-quarantined", "--json", *data, home=tmp_path)))
    assert [r["seq"] for r in got["records"]] == [0, 1, 2, 3, 4, 5]
    assert got["quarantined"] == [{"first": 4, "count": 2, "reason": "sent while quarantined"}]
    table = ok(cli("data", "query", "--node", "n1", "--stream", "raw", "--include-quarantined",
                   *data, home=tmp_path))
    assert "quarantined" in table and table.count("yes") == 2
    listed = json.loads(ok(cli("node", "list", "--json", *data, home=tmp_path)))
    assert [(n["id"], n["attestation"], n["quarantine"]) for n in listed["nodes"]] == [
        ("n1", "none", "seen tampering"), ("n2", "none", None)]
    shown = ok(cli("node", "show", "n1", *data, home=tmp_path))
    assert "attestation" in shown and "quarantined (seen tampering)" in shown
    r = cli("config", "set", "--node", "n1", "--set", "mode=x", *data, home=tmp_path)
    assert r.exit_code != 0 and "node n1 is quarantined (seen tampering)" in r.stderr, r.stderr
    res = json.loads(ok(cli("config", "set", "--selector", "site=a", "--set", "mode=x",
                            "--json", *data, home=tmp_path)))
    assert ([n["node"] for n in res["nodes"]], res["held"]) == (
        ["n2"], [{"node": "n1", "reason": "seen tampering"}])
