"""`edgewise agent status` without a running agent, and the identity checks that need no
network (flags, files, key creation)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from edgewise.cli import main
from edgewise.edge.cli import status_tables
from edgewise.edge.identity import NodeIdentity, check_cloud_url
from edgewise.edge.outbox import Outbox, PendingChunk
from edgewise.edge.status import outbox_path, read_status, write_status
from edgewise.errors import ConfigError
from edgewise.security import pki


def _fill(data: Path) -> None:
    with Outbox(outbox_path(data), sync="normal") as ob:
        ob.register_stream("alarms", 9)
        ob.register_stream("aggregates", 5)
        cols = {"sensor": np.array(["a", "b", "c"], dtype=object), "value": np.ones(3)}
        ids = []
        for _ in range(4):
            ob.commit([PendingChunk("alarms", cols, 3), PendingChunk("aggregates", cols, 3)])
        ids = [c.id for c in ob.peek() if c.stream == "alarms"][:3]
        ob.ack(ids)


def test_status_of_a_stopped_agent_comes_from_the_outbox(tmp_path: Path) -> None:
    data = tmp_path / "node"
    _fill(data)
    write_status(data, {"updated_at": time.time() - 60, "pid": 2**22 + 12345,
                        "state": "running", "node_id": "node-7",
                        "link": {"state": "connected", "since": time.time() - 100},
                        "uplink": {"refused": {"aggregates": {"chunks": 1, "records": 3}}}})
    st = read_status(data)
    assert st["running"] is False and st["node_id"] == "node-7"
    assert st["link"]["state"] == "agent not running"
    assert list(st["streams"]) == ["alarms", "aggregates"]  # highest priority first
    assert st["streams"]["alarms"] == {
        "priority": 9, "produced": 12, "acknowledged": 9, "pending": 3, "pending_chunks": 1,
        "pending_bytes": st["streams"]["alarms"]["pending_bytes"], "dropped": 0,
        "compacted": 0, "refused": 0,
    }
    assert st["streams"]["aggregates"]["pending"] == 12
    assert st["streams"]["aggregates"]["refused"] == 3
    assert st["certificate"] is None
    tables = status_tables(st)
    assert [t.title for t in tables] == ["edgewise agent: node-7", "streams (from the outbox)"]


def test_status_of_a_running_agent_is_its_fresh_status_file(tmp_path: Path) -> None:
    data = tmp_path / "node"
    data.mkdir()
    write_status(data, {"updated_at": time.time(), "pid": os.getpid(), "state": "running",
                        "link": {"state": "connected"}})
    st = read_status(data)
    assert st["running"] is True and st["link"]["state"] == "connected"
    assert st["streams"] == {}


def test_status_cli_json_and_table(tmp_path: Path) -> None:
    data = tmp_path / "node"
    _fill(data)
    runner = CliRunner()
    res = runner.invoke(main, ["agent", "status", "--data", str(data), "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert st["state"] == "never started" and st["streams"]["alarms"]["acknowledged"] == 9
    res = runner.invoke(main, ["agent", "status", "--data", str(data)])
    assert res.exit_code == 0
    assert "never started" in res.output and "aggregates" in res.output
    res = runner.invoke(main, ["agent", "status", "--data", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such directory" in res.output


@pytest.mark.parametrize("url, problem", [
    ("http://h:1", "use https://HOST:PORT"),
    ("https://h:1/v1", "without a path"),
    ("https://h:99999", "Port out of range"),
    ("h:1", "use https://HOST:PORT"),
])
def test_cloud_url_must_be_https_host_port(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        check_cloud_url(url)
    assert check_cloud_url("https://127.0.0.1:8443/") == "https://127.0.0.1:8443"


def test_identity_needs_cloud_ca_and_token_on_first_run_and_makes_a_private_key(
    tmp_path: Path,
) -> None:
    ca = pki.CertificateAuthority.create(tmp_path / "ca")
    ca_pem = tmp_path / "ca" / "ca.pem"
    with pytest.raises(ConfigError, match="pass --cloud"):
        NodeIdentity(tmp_path / "n").prepare()
    with pytest.raises(ConfigError, match=r"pass --ca CA\.pem"):
        NodeIdentity(tmp_path / "n", "https://127.0.0.1:1").prepare()
    with pytest.raises(ConfigError, match=r"--ca .*missing\.pem: no such file"):
        NodeIdentity(tmp_path / "n", "https://127.0.0.1:1", tmp_path / "missing.pem").prepare()
    with pytest.raises(ConfigError, match="is not enrolled yet: pass --token"):
        NodeIdentity(tmp_path / "n", "https://127.0.0.1:1", ca_pem).prepare()
    ident = NodeIdentity(tmp_path / "n", "https://127.0.0.1:1", ca_pem,
                         SecretStr("ewe_secret"))
    ident.prepare()
    key = tmp_path / "n" / "identity" / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert (tmp_path / "n" / "identity" / "ca.pem").read_bytes() == ca.cert_pem
    assert not ident.enrolled and ident.label.startswith("key-")
    assert "ewe_secret" not in repr(ident.__dict__)


def test_identity_refuses_a_certificate_of_another_key(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority.create(tmp_path / "ca")
    ident_dir = tmp_path / "n" / "identity"
    ident_dir.mkdir(parents=True)
    pki.generate_key(ident_dir / "node.key")
    other = pki.generate_key(tmp_path / "other.key")
    pki.write_atomic(ident_dir / "node.pem", ca.sign_node_csr(pki.make_csr(other), "n1").pem)
    (ident_dir / "node_id").write_text("n1\n")
    with pytest.raises(ConfigError, match="does not belong to"):
        NodeIdentity(tmp_path / "n", "https://127.0.0.1:1", tmp_path / "ca" / "ca.pem").prepare()
