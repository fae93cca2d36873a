"""`edgewise plan apply` and `edgewise cloud pipeline` against a real control plane (TLS,
SQLite) running in a thread: a placed pipeline's edge part set on the site's nodes, its cloud
part set and run; --dry-run changes nothing; applying again changes nothing; the cloud
pipeline commands list, show, refuse a bad file with file:line, delete."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.cli import main
from edgewise.cloud.app import Running, start
from edgewise.cloud.bootstrap import bootstrap, write_cli_config
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store
from edgewise.security import pki
from edgewise.security.pki import CertificateAuthority
from edgewise.security.tokens import EnrolmentToken
from edgewise.sync import codec

T0 = 1_764_547_200.0
PLANNED = {
    "apiVersion": "edgewise.io/v1", "kind": "Pipeline",
    "metadata": {"name": "farms", "labels": {"edgewise.io/site": "farm"}},
    "spec": {
        "sources": [{"id": "sim", "type": "simulator", "placement": "edge", "limit": 10}],
        "stages": [
            {"id": "minutes", "type": "window", "inputs": ["sim"], "placement": "edge",
             "size": "1m"},
            {"id": "fleet", "type": "window", "inputs": ["minutes"], "placement": "cloud",
             "size": "10m", "key_by": [], "field": "mean", "aggregates": ["count", "max(max)"]},
        ],
        "sinks": [
            {"id": "minutes-out", "type": "outbox", "inputs": ["minutes"],
             "placement": "edge", "stream": "minutes"},
            {"id": "fleet-store", "type": "outbox", "inputs": ["fleet"], "placement": "cloud",
             "stream": "fleet"},
        ],
    },
}


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

    async def start(self) -> None:
        config = CloudConfig(data_dir=self.data_dir, port=0)
        self.store = await Store(config.db_url).open()
        boot = await bootstrap(self.data_dir, self.store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        self.ca = boot.ca
        self.running = await start(config, boot.ca, store=self.store)
        write_cli_config(boot.cli_config, self.running.url, boot.ca_path, boot.admin_token)

    async def node(self, node_id: str, labels: dict[str, str]) -> None:
        _plain, record = EnrolmentToken.issue(labels, timedelta(hours=1), 1)
        await self.store.add_enrolment_token(record)
        key = ec.generate_private_key(ec.SECP256R1())
        await self.store.enrol_node(record.hash, node_id,
                                    self.ca.sign_node_csr(pki.make_csr(key), node_id))

    def close(self) -> None:
        async def stop() -> None:
            await self.running.stop()
            await self.store.close()

        try:
            self.run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "cloud")
    s.run(s.start())
    try:
        yield s
    finally:
        s.close()


def cli(server: Server, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--data", str(server.data_dir)], env={
        "HOME": str(server.data_dir.parent), "EDGEWISE_CONFIG": None, "COLUMNS": "200"})


def test_plan_apply_and_cloud_pipeline_commands(server: Server, tmp_path: Path) -> None:
    for n, site in (("a", "farm"), ("b", "farm"), ("c", "farm"), ("x", "depot")):
        server.run(server.node(n, {"site": site}))
    out = tmp_path / "plan"
    (out / "pipelines").mkdir(parents=True)
    (out / "pipelines" / "farm.yaml").write_text(yaml.safe_dump(PLANNED, sort_keys=False))
    url = server.running.url
    dry = cli(server, "plan", "apply", str(out), "--cloud", url, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines() == [
        "edge  farms: nodes site=farm: would set on 3 of 3 node(s)",
        "cloud farms: would create"]
    assert server.run(server.store.list_cloud_pipelines()) == []
    assert server.run(server.store.get_desired_state("a")) is None
    done = cli(server, "plan", "apply", str(out), "--cloud", url, "--json")
    assert done.exit_code == 0, done.output
    changes = json.loads(done.output)["changes"]
    assert [(c["part"], c["action"], c.get("to_change")) for c in changes] == [
        ("edge", "set", 3), ("cloud", "new", None)]
    again = cli(server, "plan", "apply", str(out), "--cloud", url)
    assert again.output.splitlines() == [
        "edge  farms: nodes site=farm: already as planned",
        "cloud farms: already as planned"]
    for n in "abc":
        edge = server.run(server.store.get_desired_state(n)).pipelines["farms"]
        assert "minutes-out" in edge and "fleet" not in edge.replace("fleet-", "")
    assert server.run(server.store.get_desired_state("x")) is None
    # the cloud part runs: minute records of the three nodes become one fleet window
    now = datetime.now(UTC)
    for i, n in enumerate("abc"):
        starts = T0 + 60 * np.arange(11)
        cols = {"sensor": np.array(["s"] * 11, dtype=object), "ts": starts,
                "mean": np.full(11, 1.0), "max": starts - T0 + i}
        server.run(server.store.commit_ingest(
            [ChunkWrite(n, "minutes", 0, 11, 11, False, codec.encode(cols), now)], (),
            [MarkWrite(n, "minutes", 11, now)]))
    deadline = time.monotonic() + 30
    while True:
        res = cli(server, "data", "query", "--node", "cloud:farms", "--stream", "fleet",
                  "--json")
        recs = json.loads(res.output)["records"] if res.exit_code == 0 else []
        if recs:
            break
        assert time.monotonic() < deadline, res.output
        time.sleep(0.2)
    assert [(r["data"]["count"], r["data"]["max_max"]) for r in recs] == [(30, 542.0)]
    listed = cli(server, "cloud", "pipeline", "list", "--json")
    assert [(p["name"], p["version"], p["state"]) for p in
            json.loads(listed.output)["pipelines"]] == [("farms", 1, "running")]
    shown = cli(server, "cloud", "pipeline", "show", "farms")
    assert "results: edgewise data query --node cloud:farms --stream STREAM" in shown.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**PLANNED, "metadata": {"name": "bad"}}, sort_keys=False))
    refused = cli(server, "cloud", "pipeline", "set", str(bad))
    assert refused.exit_code == 2
    lines = refused.output.splitlines()
    assert f"{bad}:8: spec.sources.0.type: a cloud pipeline's sources must be of type stream, " \
           "not 'simulator'" in lines
    assert lines[0].startswith(f"error: {bad}:9: spec.sources.0.placement: placed on the edge")
    assert server.run(server.store.get_cloud_pipeline("bad")) is None
    gone = cli(server, "cloud", "pipeline", "delete", "farms")
    assert gone.exit_code == 0 and gone.output.strip() == "cloud pipeline farms deleted"
    assert server.run(server.store.list_cloud_pipelines()) == []
