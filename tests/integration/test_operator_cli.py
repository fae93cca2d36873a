"""`edgewise node|config|data` against a real control plane (TLS, SQLite) running in a thread:
tables, --json answers with exact values, and the errors a user meets (no config, server down,
wrong role, bad pipeline file)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.cli import main
from edgewise.cloud.app import Running, start
from edgewise.cloud.bootstrap import bootstrap, write_cli_config
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store
from edgewise.security import pki
from edgewise.security.pki import CertificateAuthority
from edgewise.security.tokens import EnrolmentToken, OperatorToken
from edgewise.sync import codec

T0 = 1_764_547_200.0

PIPELINE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: line
spec:
  sources:
    - {id: sim, type: simulator, seed: 1}
  sinks:
    - {id: out, type: log, inputs: [sim]}
"""


class Server:
    """A control plane on its own event loop thread; `run` executes a coroutine there."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.store: Store
        self.ca: CertificateAuthority
        self.running: Running

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> None:
        config = CloudConfig(data_dir=self.data_dir, port=0)
        self.store = await Store(config.db_url).open()
        boot = await bootstrap(self.data_dir, self.store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        self.ca = boot.ca
        self.running = await start(config, boot.ca, store=self.store)
        write_cli_config(boot.cli_config, self.running.url, boot.ca_path, boot.admin_token)

    async def _stop(self) -> None:
        await self.running.stop()
        await self.store.close()

    async def _node(self, node_id: str, labels: dict[str, str]) -> None:
        _plain, record = EnrolmentToken.issue(labels, timedelta(hours=1), 1)
        await self.store.add_enrolment_token(record)
        key = ec.generate_private_key(ec.SECP256R1())
        await self.store.enrol_node(record.hash, node_id,
                                    self.ca.sign_node_csr(pki.make_csr(key), node_id))

    def node(self, node_id: str, labels: dict[str, str]) -> None:
        self.run(self._node(node_id, labels))

    def close(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "cloud")
    s.run(s._start())
    try:
        yield s
    finally:
        s.close()


def cli(*args: str, home: Path, env: dict[str, str | None] | None = None) -> Result:
    environment: dict[str, str | None] = {"HOME": str(home), "EDGEWISE_CONFIG": None,
                                          "COLUMNS": "200"}
    environment.update(env or {})
    return CliRunner().invoke(main, list(args), env=environment)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_nodes_labels_and_revoke(server: Server, tmp_path: Path) -> None:
    server.node("a1", {"site": "plant1", "line": "1"})
    server.node("a2", {"site": "plant1", "line": "2"})
    server.node("b1", {"site": "plant2", "line": "1"})
    data = ["--data", str(server.data_dir)]
    out = ok(cli("node", "list", *data, home=tmp_path))
    assert "3 node(s)" in out
    for nid in ("a1", "a2", "b1"):
        assert nid in out
    listed = json.loads(ok(cli("node", "list", "--selector", "line=1", "--json", *data,
                               home=tmp_path)))
    assert [(n["id"], n["labels"], n["status"]) for n in listed["nodes"]] == [
        ("a1", {"site": "plant1", "line": "1"}, "enrolled"),
        ("b1", {"site": "plant2", "line": "1"}, "enrolled")]
    labelled = json.loads(ok(cli("node", "label", "a2", "rack=7", "line=9", "--remove", "site",
                                 "--json", *data, home=tmp_path)))
    assert labelled["labels"] == {"line": "9", "rack": "7"}
    out = ok(cli("node", "show", "a2", *data, home=tmp_path))
    assert "line=9,rack=7" in out and "enrolled" in out
    shown = json.loads(ok(cli("node", "show", "a2", "--json", *data, home=tmp_path)))
    assert (shown["id"], shown["desired_version"], shown["streams"]) == ("a2", 0, [])
    out = ok(cli("node", "revoke", "b1", "--reason", "stolen", "--yes", *data, home=tmp_path))
    assert "b1: revoked" in out
    shown = json.loads(ok(cli("node", "show", "b1", "--json", *data, home=tmp_path)))
    assert (shown["revoked"], shown["status"]) == (True, "revoked")
    r = cli("node", "show", "zz", *data, home=tmp_path)
    assert r.exit_code == 2
    assert "no node 'zz'" in r.stderr
    r = cli("node", "label", "a1", "oops", *data, home=tmp_path)
    assert r.exit_code == 2 and "label 'oops': write key=value" in r.stderr
    r = cli("node", "revoke", "a1", *data, home=tmp_path, env=None)  # no --yes, says no
    assert r.exit_code == 1 and "Aborted" in r.output


def test_config_set_and_get(server: Server, tmp_path: Path) -> None:
    server.node("a1", {"site": "plant1"})
    server.node("a2", {"site": "plant1"})
    data = ["--data", str(server.data_dir)]
    pipeline = tmp_path / "line.yaml"
    pipeline.write_text(PIPELINE)
    res = json.loads(ok(cli("config", "set", "--selector", "site=plant1", "--pipeline",
                            str(pipeline), "--set", "rate=50", "--set", "mode=fast",
                            "--setpoint", "limit=99.5", "--expires", "1h", "--json", *data,
                            home=tmp_path)))
    assert res == {"nodes": [{"node": "a1", "version": 1, "notified": False},
                             {"node": "a2", "version": 1, "notified": False}], "held": []}
    got = json.loads(ok(cli("config", "get", "--node", "a2", "--json", *data, home=tmp_path)))
    d = got["desired"]
    assert d["pipelines"] == {"line": PIPELINE}
    assert d["config"]["rate"] == 50 and d["config"]["mode"] == "fast"
    assert d["config"]["setpoints"]["limit"][0] == 99.5
    assert got["reported"]["setpoints"] == {"limit": 99.5}
    out = ok(cli("config", "set", "--node", "a2", "--set", "mode=null", *data, home=tmp_path))
    assert "a2" in out and "2" in out
    out = ok(cli("config", "get", "--node", "a2", *data, home=tmp_path))
    assert "config rate" in out and "config mode" not in out and "line" in out
    # errors: a bad pipeline file is reported with file:line before anything is sent
    bad = tmp_path / "bad.yaml"
    bad.write_text(PIPELINE.replace("type: log", "type: lgo"))
    r = cli("config", "set", "--node", "a1", "--pipeline", str(bad), *data, home=tmp_path)
    assert r.exit_code == 2
    assert f"{bad}:9: spec.sinks.0.type: unknown sink type 'lgo'" in r.stderr
    r = cli("config", "set", "--node", "a1", "--selector", "a=b", "--set", "x=1", *data,
            home=tmp_path)
    assert r.exit_code == 2 and "exactly one of --node ID and --selector" in r.stderr
    r = cli("config", "set", "--node", "a1", *data, home=tmp_path)
    assert r.exit_code == 2 and "nothing to set" in r.stderr
    r = cli("config", "set", "--selector", "site=mars", "--set", "x=1", *data, home=tmp_path)
    assert r.exit_code == 2 and "no node (that is not revoked) matches selector" in r.stderr
    r = cli("config", "set", "--node", "a1", "--set", "x=1", "--expires", "soon", *data,
            home=tmp_path)
    assert r.exit_code == 2 and "--expires" in r.stderr


def test_data_stats_and_query(server: Server, tmp_path: Path) -> None:
    server.node("n1", {})
    now = datetime.now(UTC)
    seq = np.arange(0, 40)
    cols = {"sensor": np.array([f"s{i % 2}" for i in seq], dtype=object),
            "ts": np.round(T0 + seq * 0.5, 2), "value": np.round(seq * 1.25, 2)}
    part = [{k: v[a:b] for k, v in cols.items()} for a, b in ((0, 25), (25, 40))]
    server.run(server.store.commit_ingest(
        [ChunkWrite("n1", "raw", 0, 25, 25, False, codec.encode(part[0]), now),
         ChunkWrite("n1", "raw", 25, 15, 15, False, codec.encode(part[1]), now)],
        [], [MarkWrite("n1", "raw", 40, now)]))
    data = ["--data", str(server.data_dir)]
    stats = json.loads(ok(cli("data", "stats", "--json", *data, home=tmp_path)))
    assert [(s["node"], s["stream"], s["records_stored"], s["highest_contiguous_seq"],
             s["lost_records"]) for s in stats["streams"]] == [("n1", "raw", 40, 39, 0)]
    out = ok(cli("data", "stats", "--node", "n1", *data, home=tmp_path))
    assert "raw" in out and "40" in out and "39" in out
    got = json.loads(ok(cli("data", "query", "--node", "n1", "--stream", "raw", "--since",
                            str(T0 + 10), "--limit", "5", "--json", *data, home=tmp_path)))
    assert got["records"] == [
        {"seq": s, "data": {"sensor": f"s{s % 2}", "ts": T0 + s * 0.5, "value": s * 1.25}}
        for s in range(20, 25)]
    assert got["next_seq"] == 25
    iso = datetime.fromtimestamp(T0 + 19, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    got = json.loads(ok(cli("data", "query", "--node", "n1", "--stream", "raw", "--since", iso,
                            "--json", *data, home=tmp_path)))
    assert [r["seq"] for r in got["records"]] == [38, 39]
    out = ok(cli("data", "query", "--node", "n1", "--stream", "raw", "--limit", "3", *data,
                 home=tmp_path))
    assert "3 record(s); more from seq 3" in out
    assert "2025-12-01T00:00:00.500" in out and "s1" in out  # ISO 8601 (cli/operator.py)
    r = cli("data", "query", "--node", "n1", "--stream", "raw", "--since", "yesterday", *data,
            home=tmp_path)
    assert r.exit_code == 2 and "--since 'yesterday'" in r.stderr


def test_errors_name_the_fix(server: Server, tmp_path: Path) -> None:
    data = ["--data", str(server.data_dir)]
    # no config anywhere
    r = cli("node", "list", "--data", str(tmp_path / "nowhere"), home=tmp_path)
    assert r.exit_code == 2
    assert "no CLI config found" in r.stderr and "edgewise cloud serve --data DIR" in r.stderr
    # a viewer token: reads work, changes are refused naming the role needed
    plain, rec = OperatorToken.issue("ro", "viewer")
    server.run(server.store.add_operator_token(rec))
    cfg = json.loads((server.data_dir / "cli.json").read_text())
    viewer = tmp_path / "viewer.json"
    viewer.write_text(json.dumps({**cfg, "token": plain.get_secret_value()}))
    ok(cli("node", "list", "--config", str(viewer), home=tmp_path))
    server.node("a1", {})
    r = cli("node", "label", "a1", "x=1", "--config", str(viewer), home=tmp_path)
    assert r.exit_code == 2
    assert "role viewer is read-only; this call needs role operator or admin" in r.stderr
    # $EDGEWISE_CONFIG is used when there is no --config
    r = cli("node", "label", "a1", "x=1", home=tmp_path, env={"EDGEWISE_CONFIG": str(viewer)})
    assert r.exit_code == 2 and "read-only" in r.stderr
    # ~/.config/edgewise/cli.json wins over --data
    user_cfg = tmp_path / ".config" / "edgewise" / "cli.json"
    user_cfg.parent.mkdir(parents=True)
    user_cfg.write_text(viewer.read_text())
    r = cli("node", "label", "a1", "x=1", *data, home=tmp_path)
    assert r.exit_code == 2 and "read-only" in r.stderr
    user_cfg.unlink()
    # an unknown token
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**cfg, "token": "ewo_" + "B" * 43}))
    r = cli("node", "list", "--config", str(bad), home=tmp_path)
    assert r.exit_code == 2
    assert "refused the operator token" in r.stderr and "unknown or revoked" in r.stderr
    # a server that is not running: which URL, and how to start one
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = tmp_path / "down.json"
    down.write_text(json.dumps({**cfg, "url": f"https://127.0.0.1:{port}"}))
    r = cli("data", "stats", "--config", str(down), home=tmp_path)
    assert r.exit_code == 1
    assert f"cannot reach the control plane at https://127.0.0.1:{port}" in r.stderr
    assert "edgewise cloud serve --data DIR" in r.stderr
    # a CA that did not sign the server's certificate
    other = CertificateAuthority.create(tmp_path / "other-ca", "other.local")
    wrong_ca = tmp_path / "wrong-ca.json"
    wrong_ca.write_text(json.dumps({**cfg, "ca": other.cert_pem.decode()}))
    r = cli("data", "stats", "--config", str(wrong_ca), home=tmp_path)
    assert r.exit_code == 1 and "is not trusted by the CA" in r.stderr
    # a broken config file
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"url": "http://x", "token": "t", "ca": "ca.pem"}))
    r = cli("data", "stats", "--config", str(broken), home=tmp_path)
    assert r.exit_code == 2 and "must start with https://" in r.stderr
