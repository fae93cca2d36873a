"""The cloud pipeline routes on a running control plane: roles, file:line validation, audit,
and the worker running a pipeline set through the API, whose results `data query` reads under
``cloud:<name>``."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.cloud.app import Running, start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.state import COMMITTER
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store
from edgewise.security import pki
from edgewise.security.tokens import EnrolmentToken, OperatorToken
from edgewise.sync import codec

T0 = 1_764_547_200.0
PIPELINE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata: {name: fleet}
spec:
  sources:
    - {id: ten, type: stream, stream: ten, nodes: {site: farm}, max_wait: 1s, poll: 0.05}
  stages:
    - {id: total, type: window, inputs: [ten], size: 10s, key_by: [], idle_timeout: 1000s,
       aggregates: [count, sum, max]}
  sinks:
    - {id: total-store, type: outbox, inputs: [total], stream: total}
"""


@dataclass
class Cloud:
    running: Running
    store: Store
    http: httpx.AsyncClient
    tokens: dict[str, str]

    async def call(self, method: str, path: str, role: str = "admin", *,
                   json: Any = None, params: dict[str, Any] | None = None) -> httpx.Response:
        return await self.http.request(method, path, json=json, params=params, headers={
            "Authorization": f"Bearer {self.tokens[role]}"})


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0)
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        ctx = ssl.create_default_context(cafile=str(boot.ca_path))
        try:
            async with httpx.AsyncClient(base_url=running.url, verify=ctx, timeout=10) as http:
                assert boot.admin_token is not None
                tokens = {"admin": boot.admin_token}
                for role in ("operator", "viewer"):
                    plain, rec = OperatorToken.issue(f"{role}-1", role)
                    await store.add_operator_token(rec)
                    tokens[role] = plain.get_secret_value()
                for i in range(2):
                    _p, tok = EnrolmentToken.issue({"site": "farm"}, timedelta(hours=1), 1)
                    await store.add_enrolment_token(tok)
                    key = ec.generate_private_key(ec.SECP256R1())
                    await store.enrol_node(tok.hash, f"n-{i}",
                                           boot.ca.sign_node_csr(pki.make_csr(key), f"n-{i}"))
                yield Cloud(running, store, http, tokens)
        finally:
            await running.stop()


async def test_roles_validation_and_audit(cloud: Cloud) -> None:
    r = await cloud.call("PUT", "/v1/cloud/pipelines/fleet", "viewer", json={"text": PIPELINE})
    assert r.status_code == 403
    bad = PIPELINE.replace("type: window", "type: acme-smooth")
    r = await cloud.call("PUT", "/v1/cloud/pipelines/fleet", "operator", json={"text": bad})
    assert r.status_code == 400
    assert r.json()["error"] == ("fleet:8: spec.stages.0.type: 'acme-smooth': the control plane "
                               "runs built-in operators only (it loads no user code)")
    r = await cloud.call("PUT", "/v1/cloud/pipelines/other", "operator",
                         json={"text": PIPELINE})
    assert r.status_code == 400 and "metadata.name is 'fleet'" in r.json()["error"]
    r = await cloud.call("PUT", "/v1/cloud/pipelines/fleet", "operator", json={"text": PIPELINE})
    assert r.status_code == 200 and r.json() == {"name": "fleet", "version": 1, "changed": True}
    r = await cloud.call("GET", "/v1/cloud/pipelines", "viewer")
    assert [p["name"] for p in r.json()["pipelines"]] == ["fleet"]
    r = await cloud.call("DELETE", "/v1/cloud/pipelines/fleet", "viewer")
    assert r.status_code == 403
    r = await cloud.call("DELETE", "/v1/cloud/pipelines/fleet", "operator")
    assert r.status_code == 200
    r = await cloud.call("GET", "/v1/cloud/pipelines/fleet", "viewer")
    assert r.status_code == 404
    audit = await cloud.store.list_audit(target="cloud-pipeline:fleet")
    assert [a.action for a in audit] == ["cloud-pipeline.delete", "cloud-pipeline.set"]
    denied = await cloud.store.list_audit(actor=None, limit=100)
    assert sum(a.action == "denied" and "cloud/pipelines" in a.target for a in denied) == 2
    paths = (await cloud.http.get("/openapi.json")).json()["paths"]
    assert set(paths["/v1/cloud/pipelines/{name}"]) == {"get", "put", "delete"}


async def test_a_pipeline_set_through_the_api_runs_and_its_results_are_queryable(
        cloud: Cloud) -> None:
    committed: list[tuple[str, str, int]] = []

    async def after_commit(chunks: Any, inserted: Any) -> None:  # where data out plugs in
        committed.extend(k for k in inserted if k[0] == "cloud:fleet")

    cloud.running.app[COMMITTER].after_commit = after_commit
    now = datetime.now(UTC)
    for i in range(2):
        ts = np.arange(T0, T0 + 40, 1.0)
        cols = {"sensor": np.array(["s"] * 40, dtype=object), "ts": ts,
                "value": np.full(40, float(i + 1))}
        await cloud.store.commit_ingest([ChunkWrite(f"n-{i}", "ten", 0, 40, 40, False,
                                                    codec.encode(cols), now)], (),
                                        [MarkWrite(f"n-{i}", "ten", 40, now)])
    r = await cloud.call("PUT", "/v1/cloud/pipelines/fleet", "operator", json={"text": PIPELINE})
    assert r.status_code == 200
    deadline = time.monotonic() + 30
    while True:
        r = await cloud.call("GET", "/v1/data/query", "viewer",
                             params={"node": "cloud:fleet", "stream": "total"})
        if r.status_code == 200 and len(r.json()["records"]) >= 3:
            break
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.1)
    recs = [x["data"] for x in r.json()["records"]]
    assert [(d["window_start"], d["count"], d["sum"], d["max"]) for d in recs] == [
        (T0, 20, 30.0, 2.0), (T0 + 10, 20, 30.0, 2.0), (T0 + 20, 20, 30.0, 2.0)]
    show = (await cloud.call("GET", "/v1/cloud/pipelines/fleet", "viewer")).json()
    assert show["state"] == "running" and show["results_node"] == "cloud:fleet"
    assert show["status"]["sources"]["ten"]["watermarks"] == {"n-0": T0 + 39, "n-1": T0 + 39}
    stats = (await cloud.call("GET", "/v1/data/stats", "viewer",
                              params={"node": "cloud:fleet"})).json()
    assert [(s["stream"], s["records_stored"]) for s in stats["streams"]] == [("total", 3)]
    # the results went through the app's group commit, whose after_commit feeds data out
    assert committed and all(k[1] == "total" for k in committed)
