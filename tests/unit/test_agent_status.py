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
from edgewise.cli.agent import status_tables
from edgewise.edge.agent import Agent, AgentConfig
from edgewise.edge.identity import NodeIdentity, check_cloud_url
from edgewise.edge.status import load_status, outbox_path, read_status, write_status
from edgewise.edge.status_model import AgentStatus
from edgewise.edge.twin import Twin
from edgewise.edge.uplink import Uplink, UplinkConfig
from edgewise.errors import ConfigError
from edgewise.outbox import Outbox, PendingChunk
from edgewise.pipeline.summary import EngineSummary
from edgewise.security import pki
from edgewise.testbed.system import link_state, sink_p99


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
    write_status(data, AgentStatus.model_validate({
        "updated_at": time.time() - 60, "pid": 2**22 + 12345, "state": "running",
        "node_id": "node-7", "link": {"state": "connected", "since": time.time() - 100},
        "uplink": {"refused": {"aggregates": {"chunks": 1, "records": 3}}}}))
    st = read_status(data)
    assert st.running is False and st.node_id == "node-7"
    assert st.link is not None and st.link.state == "agent not running"
    assert list(st.streams) == ["alarms", "aggregates"]  # highest priority first
    assert st.streams["alarms"].model_dump() == {
        "priority": 9, "produced": 12, "acknowledged": 9, "pending": 3, "pending_chunks": 1,
        "pending_bytes": st.streams["alarms"].pending_bytes, "dropped": 0,
        "compacted": 0, "refused": 0,
    }
    assert st.streams["aggregates"].pending == 12
    assert st.streams["aggregates"].refused == 3
    assert st.certificate is None
    tables = status_tables(st)
    assert [t.title for t in tables] == ["edgewise agent: node-7", "streams (from the outbox)"]


def test_status_of_a_running_agent_is_its_fresh_status_file(tmp_path: Path) -> None:
    data = tmp_path / "node"
    data.mkdir()
    write_status(data, AgentStatus.model_validate({
        "updated_at": time.time(), "pid": os.getpid(), "state": "running",
        "link": {"state": "connected"}}))
    st = read_status(data)
    assert st.running is True and st.link is not None and st.link.state == "connected"
    assert st.streams == {}


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


STATUS_KEYS = ["format", "updated_at", "pid", "state", "started_at", "node_id", "cloud",
               "certificate", "renewals", "reauths", "engine", "twin", "problem"]
UPLINK_KEYS = ["link", "bytes", "window", "uplink"]


def _enrolled_agent(tmp_path: Path) -> Agent:
    """An agent with identity, twin and uplink as `Agent.run` sets them up, and no network."""
    ca = pki.CertificateAuthority.create(tmp_path / "ca")
    data = tmp_path / "node"
    ident_dir = data / "identity"
    ident_dir.mkdir(parents=True)
    key = pki.generate_key(ident_dir / "node.key")
    pki.write_atomic(ident_dir / "node.pem", ca.sign_node_csr(pki.make_csr(key), "n1").pem)
    (ident_dir / "node_id").write_text("n1\n")
    agent = Agent(AgentConfig(data_dir=data, cloud="https://127.0.0.1:1",
                              ca=tmp_path / "ca" / "ca.pem"))
    agent.identity.prepare()
    twin = agent.twin = Twin(data / "twin", agent.identity.label, base_dir=data / "pipelines")
    twin.load()
    agent.uplink = Uplink(agent.identity, agent.outbox, agent.view, twin, data / "uplink",
                          UplinkConfig())
    return agent


def _summary() -> EngineSummary:
    latency = {"count": 5, "p50_ms": 1.5, "p99_ms": 2.25, "max_ms": 3.0}
    return {
        "pipeline": "line", "elapsed_s": 12.5, "readings_in": 500, "sources": {},
        "stages": {}, "streams": {},
        "sinks": {"local": {"written": 5, "errors": 0, "latency": latency},
                  "quiet": {"written": 0, "errors": 0}},
        "alarms": 5, "late": 1, "dead_lettered": 2,
        "outbox": {"path": "outbox.db", "depth_records": 0, "bytes": 0, "max_bytes": 1 << 20,
                   "dead_letters_stored": 0},
        "commits": 3,
    }


def test_status_written_by_the_agent_reads_back_as_equal_typed_values(tmp_path: Path) -> None:
    agent = _enrolled_agent(tmp_path)
    data = agent.data_dir
    up = agent.uplink
    assert up is not None and agent.twin is not None
    up.refused[4] = {"stream": "alarms", "records": 10, "reason": "too old"}
    up.marks, up.gaps_sent = {"alarms": 7}, {"alarms": 2}
    up.state, up.last_error, up.next_attempt_at = "offline", "cannot connect", time.time() + 3
    agent.twin.refused[3] = "bad spec"
    agent.twin.skipped = [2]
    agent.supervisor.last_summary = _summary()
    agent.error = ConfigError("stopped for the test")

    status = agent.status()
    write_status(data, status)
    written = json.loads((data / "status.json").read_text())
    assert list(written) == [*STATUS_KEYS, "error", *UPLINK_KEYS]
    assert written["engine"] == {
        "state": "starting", "pipeline": None, "error": None, "starts": 0,
        "readings_in": 500, "alarms": 5, "late": 1, "dead_lettered": 2, "elapsed_s": 12.5,
        "sinks": {"local": {"count": 5, "p50_ms": 1.5, "p99_ms": 2.25, "max_ms": 3.0}},
    }
    assert written["uplink"]["refused"] == {
        "alarms": {"chunks": 1, "records": 10, "last_reason": "too old"}}
    assert written["twin"]["refused"] == {"3": "bad spec"}
    assert written["error"] == "stopped for the test"
    assert load_status(data) == status

    st = read_status(data, now=status.updated_at)
    assert st.running and st.state == status.state == "starting"
    assert (st.node_id, st.cloud, st.problem) == ("n1", "https://127.0.0.1:1", None)
    assert (st.link, st.bytes, st.window, st.uplink, st.twin, st.engine) == (
        status.link, status.bytes, status.window, status.uplink, status.twin, status.engine)
    assert st.certificate == status.certificate is not None
    shown = st.to_json()  # what `edgewise agent status --json` prints
    for key in ("node_id", "cloud", "state", "problem", "certificate", *UPLINK_KEYS, "twin",
                "engine"):
        assert shown[key] == written[key], key
    assert sink_p99(st) == 2.25 and link_state(st) == "offline"
    assert status_tables(st)[0].title == "edgewise agent: n1"


def test_status_of_an_agent_before_its_uplink_and_twin(tmp_path: Path) -> None:
    data = tmp_path / "node"
    status = Agent(AgentConfig(data_dir=data)).status()
    data.mkdir()
    write_status(data, status)
    written = json.loads((data / "status.json").read_text())
    assert list(written) == STATUS_KEYS  # no error, no link, bytes, window, uplink
    assert written["twin"] == {}
    assert written["engine"] == {"state": "starting", "pipeline": None, "error": None,
                                 "starts": 0}
    assert load_status(data) == status
    st = read_status(data, now=status.updated_at)
    assert st.twin is None and st.link is None and st.engine == status.engine
    assert st.to_json()["link"] == {} and st.to_json()["twin"] == {}


def test_status_file_of_an_older_or_newer_agent_still_reads(tmp_path: Path) -> None:
    data = tmp_path / "node"
    data.mkdir()
    now = time.time()
    doc = {
        "format": 2, "updated_at": now, "pid": os.getpid(), "state": "running",
        "node_id": "n9", "satellite": {"beam": 3},  # a newer agent's block
        "link": {"state": "connected", "since": now - 5, "rtt_ms": 12.5},  # and field
        "window": {"limit_bytes": "lots"},  # damaged: read as absent
        # no started_at, engine, twin, bytes, uplink, certificate: an older agent's
    }
    (data / "status.json").write_text(json.dumps(doc))
    st = read_status(data, now=now)
    assert st.running and st.state == "running" and st.node_id == "n9"
    assert st.link is not None and st.link.state == "connected"
    assert st.link.model_extra == {"rtt_ms": 12.5}
    assert st.engine is None and st.twin is None and st.window is None and st.bytes is None
    shown = st.to_json()
    assert shown["link"] == doc["link"]  # as the agent wrote it, its unknown field included
    assert [shown[k] for k in ("bytes", "window", "uplink", "twin", "engine")] == [{}] * 5
    assert load_status(data).model_extra == {"satellite": {"beam": 3}}
    status_tables(st)
    for text in ("", "[1, 2]", "{not json", '{"updated_at": "yesterday"}'):
        (data / "status.json").write_text(text)
        st = read_status(data)
        assert (st.state, st.running, st.link_state) == (
            "never started", False, "agent not running")
        assert st.to_json()["link"] == {"state": "agent not running"}


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


def test_status_is_written_over_itself_when_the_disk_has_no_room(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk leaves no room for the temp file of an atomic write: the agent writes the
    status over its own (padded) bytes, so `agent status` still sees a live agent."""
    from edgewise.edge import status as status_mod
    from edgewise.errors import StorageError

    data = tmp_path / "node"
    data.mkdir()
    write_status(data, AgentStatus(updated_at=1.0, pid=os.getpid(), state="running"))

    def full(*a: object, **kw: object) -> None:
        raise StorageError("cannot write status.json: No space left on device")

    monkeypatch.setattr(status_mod, "write_atomic", full)
    now = time.time()
    write_status(data, AgentStatus(updated_at=now, pid=os.getpid(), state="running",
                                   problem="the disk of x is full"))
    st = read_status(data, now=now + 1)
    assert st.running and st.problem == "the disk of x is full"


def test_status_of_a_damaged_outbox_is_a_problem_line_with_the_fix(tmp_path: Path) -> None:
    data = tmp_path / "node"
    _fill(data)
    with open(outbox_path(data), "r+b") as f:
        f.write(b"\0" * 8192)
    st = read_status(data)  # no exception: `agent status` exits 0
    assert st.streams == {}
    assert st.problem is not None and "not a database" in st.problem
    assert f"edgewise agent run --data {data}" in st.problem
    res = CliRunner().invoke(main, ["agent", "status", "--data", str(data), "--json"])
    assert res.exit_code == 0, res.output
