"""`edgewise token|audit` and `data query` (unknown stream, ISO times) against a real control
plane (TLS, SQLite) in a thread, the harness of test_operator_cli."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_operator_cli import T0, Server, cli, ok

from edgewise.cloud.store import ChunkWrite, MarkWrite
from edgewise.sync import codec


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "cloud")
    s.run(s._start())
    try:
        yield s
    finally:
        s.close()


def test_token_create_list_revoke_and_audit(server: Server, tmp_path: Path) -> None:
    data = ["--data", str(server.data_dir)]
    r = cli("token", "create", "alice", "--role", "viewer", "--ttl", "2d", *data, home=tmp_path)
    token = ok(r).strip()
    assert token.startswith("ewo_") and len(token.splitlines()) == 1  # stdout: the token only
    assert "operator token for alice (role viewer, expires " in r.stderr
    made = json.loads(ok(cli("token", "create", "ci-bot", "--role", "operator", "--json", *data,
                             home=tmp_path)))
    assert made["name"] == "ci-bot" and made["role"] == "operator"
    assert made["expires_at"] is None and made["token"].startswith("ewo_")
    listed = json.loads(ok(cli("token", "list", "--json", *data, home=tmp_path)))["tokens"]
    assert sorted((t["name"], t["role"], t["revoked"]) for t in listed) == [
        ("admin", "admin", False), ("alice", "viewer", False), ("ci-bot", "operator", False)]
    assert token not in json.dumps(listed)
    table = ok(cli("token", "list", *data, home=tmp_path))
    assert "3 operator token(s)" in table and "alice" in table and "viewer" in table

    # the viewer token works for reading, is refused for token management (role admin)
    cfg = json.loads((server.data_dir / "cli.json").read_text())
    viewer = tmp_path / "viewer.json"
    viewer.write_text(json.dumps({**cfg, "token": token}))
    ok(cli("audit", "list", "--config", str(viewer), home=tmp_path))
    r = cli("token", "list", "--config", str(viewer), home=tmp_path)
    assert r.exit_code == 2 and "needs role admin" in r.stderr, r.stderr

    r = cli("token", "revoke", token, *data, home=tmp_path)
    assert ok(r).strip() == "revoked: the token is refused from now on"
    r = cli("audit", "list", "--config", str(viewer), home=tmp_path)
    assert r.exit_code == 2 and "refused the operator token" in r.stderr
    r = cli("token", "revoke", "ewo_" + "B" * 43, *data, home=tmp_path)  # never issued
    assert r.exit_code == 2 and "no such operator token" in r.stderr
    r = cli("token", "revoke", "abc123", *data, home=tmp_path)
    assert r.exit_code == 2 and "starts with ewo_" in r.stderr
    r = cli("token", "create", "bob", "--role", "root", *data, home=tmp_path)
    assert r.exit_code == 2 and "'root' is not one of 'viewer', 'operator', 'admin'" in r.stderr

    entries = json.loads(ok(cli("audit", "list", "--json", *data, home=tmp_path)))["entries"]
    actions = [e["action"] for e in entries]
    # newest first: the revocation, our two tokens, the admin token cloud serve made
    assert actions == ["token.revoke", "token.create", "token.create", "token.create"]
    assert entries == sorted(entries, key=lambda e: -e["id"])  # newest first
    page = json.loads(ok(cli("audit", "list", "--limit", "1", "--json", *data, home=tmp_path)))
    assert len(page["entries"]) == 1 and page["next_before_id"] == entries[0]["id"]
    older = json.loads(ok(cli("audit", "list", "--limit", "1", "--before-id",
                              str(page["next_before_id"]), "--json", *data, home=tmp_path)))
    assert older["entries"] == entries[1:2]
    out = ok(cli("audit", "list", "--utc", *data, home=tmp_path))
    newest = entries[0]["ts"][:19].replace("T", " ")  # ISO from the API, to the second
    assert "token.revoke" in out and f"{newest} UTC" in out
    yaml_doc = yaml.safe_load(ok(cli("audit", "list", "--format", "yaml", *data,
                                     home=tmp_path)))
    assert yaml_doc["entries"] == entries


def test_data_query_unknown_stream_and_iso_times(server: Server, tmp_path: Path) -> None:
    data = ["--data", str(server.data_dir)]
    server.node("n1", {})
    r = cli("data", "query", "--node", "n1", "--stream", "raw", *data, home=tmp_path)
    assert r.exit_code == 2
    assert "node n1 has no stream 'raw' in the cloud store; its streams: none yet" in r.stderr
    now = datetime.now(UTC)
    cols = {"sensor": np.array(["s0", "s1"], dtype=object), "ts": np.array([T0 + 0.5, T0 + 1]),
            "value": np.array([1.5, 2.0])}
    server.run(server.store.commit_ingest(
        [ChunkWrite("n1", "raw", 0, 2, 2, False, codec.encode(cols), now),
         ChunkWrite("n1", "alarms", 0, 2, 2, False, codec.encode(cols), now)],
        [], [MarkWrite("n1", "raw", 2, now), MarkWrite("n1", "alarms", 2, now)]))
    r = cli("data", "query", "--node", "n1", "--stream", "nosuch", *data, home=tmp_path)
    assert r.exit_code == 2 and r.stdout == ""
    assert "node n1 has no stream 'nosuch' in the cloud store; its streams: alarms, raw" \
        in r.stderr
    # an existing stream past its end is an empty table, exit 0
    out = ok(cli("data", "query", "--node", "n1", "--stream", "raw", "--from-seq", "5", *data,
                 home=tmp_path))
    assert "0 record(s)" in out
    out = ok(cli("data", "query", "--node", "n1", "--stream", "raw", "--utc", *data,
                 home=tmp_path))
    assert "2025-12-01T00:00:00.500Z" in out and "2025-12-01T00:00:01.000Z" in out
    local = datetime.fromtimestamp(T0 + 0.5, UTC).astimezone().isoformat(timespec="milliseconds")
    out = ok(cli("data", "query", "--node", "n1", "--stream", "raw", *data, home=tmp_path))
    assert local in out
    got = json.loads(ok(cli("data", "query", "--node", "n1", "--stream", "raw", "--json",
                            *data, home=tmp_path)))
    assert [r["data"]["ts"] for r in got["records"]] == [T0 + 0.5, T0 + 1]  # JSON: as stored
