"""The operator API over real TLS on 127.0.0.1 (the control plane's own app and SQLite store):
roles table, audit entries, selectors, config validation, data stats and query exactness,
revocation, token management, and the OpenAPI document against the router."""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from openapi_spec_validator import validate

from edgewise.cloud import openapi as oa
from edgewise.cloud.app import Running, start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.state import POKES, REVOCATIONS
from edgewise.cloud.store import ChunkWrite, GapWrite, MarkWrite, Store
from edgewise.security import pki
from edgewise.security.pki import CertificateAuthority
from edgewise.security.tokens import EnrolmentToken, OperatorToken
from edgewise.sync import codec
from edgewise.sync.merge import LwwMap

T0 = 1_764_547_200.0

PIPELINE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: line
spec:
  sources:
    - {id: sim, type: simulator, seed: 1}
  stages:
    - {id: alarms, type: threshold, inputs: [sim], high: 100.0}
  sinks:
    - {id: out, type: log, inputs: [alarms]}
"""

BAD_PIPELINE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: bad
spec:
  sources:
    - {id: sim, type: simulator, seed: 1}
  stages:
    - {id: alarms, type: "threshold!", inputs: [sim]}
  sinks:
    - {id: out, type: log, inputs: [alarms]}
"""


@dataclass
class Cloud:
    running: Running
    store: Store
    ca: CertificateAuthority
    http: httpx.AsyncClient
    tokens: dict[str, str] = field(default_factory=dict)
    keys: dict[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict)

    async def call(self, method: str, path: str, role: str | None = "admin", *,
                   token: str | None = None, json: Any = None,
                   params: dict[str, Any] | None = None) -> httpx.Response:
        headers = {}
        tok = token if token is not None else (self.tokens[role] if role else None)
        if tok is not None:
            headers["Authorization"] = f"Bearer {tok}"
        return await self.http.request(method, path, json=json, params=params, headers=headers)

    async def node(self, labels: dict[str, str], node_id: str | None = None) -> str:
        """Enrol a node straight through the store (the device API has its own tests)."""
        _plain, record = EnrolmentToken.issue(labels, timedelta(hours=1), 1)
        await self.store.add_enrolment_token(record)
        key = ec.generate_private_key(ec.SECP256R1())
        node_id = node_id or f"n-{len(await self.store.list_nodes())}"
        issued = self.ca.sign_node_csr(pki.make_csr(key), node_id)
        await self.store.enrol_node(record.hash, node_id, issued)
        self.keys[node_id] = key
        return node_id


@pytest.fixture
def backend() -> str:
    return "sqlite"  # the tests marked with BOTH run on PostgreSQL too


@pytest.fixture
def db(backend: str, request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("postgres") if backend == "postgres" else None


BOTH = pytest.mark.parametrize("backend", ["sqlite", "postgres"])


@pytest.fixture
async def cloud(tmp_path: Path, db: str | None) -> AsyncIterator[Cloud]:
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0, db=db, maintenance_interval=0.5)
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        ctx = ssl.create_default_context(cafile=str(boot.ca_path))
        try:
            async with httpx.AsyncClient(base_url=running.url, verify=ctx, timeout=10) as http:
                c = Cloud(running, store, boot.ca, http)
                assert boot.admin_token is not None
                c.tokens["admin"] = boot.admin_token
                for role in ("operator", "viewer"):
                    plain, rec = OperatorToken.issue(f"{role}-1", role)
                    await store.add_operator_token(rec)
                    c.tokens[role] = plain.get_secret_value()
                yield c
        finally:
            await running.stop()


# -- roles ------------------------------------------------------------------------------------


def requests_for(node: str, victim: str) -> dict[str, tuple[str, str, Any, dict | None]]:
    """One valid request per operator route (name -> method, path, body, query)."""
    return {
        "create_enrolment_token": ("POST", "/v1/tokens/enrolment",
                                   {"labels": {"site": "a"}, "ttl_s": 60, "uses": 2}, None),
        "create_operator_token": ("POST", "/v1/tokens/operator",
                                  {"name": "ci", "role": "viewer"}, None),
        "list_operator_tokens": ("GET", "/v1/tokens/operator", None, None),
        "revoke_operator_token": ("POST", "/v1/tokens/operator/revoke", None, None),  # below
        "list_nodes": ("GET", "/v1/nodes", None, {"selector": "site=plant1"}),
        "get_node": ("GET", f"/v1/nodes/{node}", None, None),
        "patch_labels": ("PATCH", f"/v1/nodes/{node}/labels", {"set": {"rack": "7"}}, None),
        "revoke_node": ("POST", f"/v1/nodes/{victim}/revoke", {"reason": "test"}, None),
        "decommission_node": ("POST", f"/v1/nodes/{victim}/decommission",
                              {"wipe": True, "reason": "test"}, None),
        "set_config": ("PUT", "/v1/config", {"node": node, "config": {"rate": 5}}, None),
        "get_config": ("GET", "/v1/config", None, {"node": node}),
        "data_stats": ("GET", "/v1/data/stats", None, None),
        "data_query": ("GET", "/v1/data/query", None, {"node": node, "stream": "s"}),
        "list_audit": ("GET", "/v1/audit", None, None),
        "list_layers": ("GET", "/v1/config/layers", None, {"node": node}),
        "write_layer": ("PUT", "/v1/config/layers", {"kind": "fleet", "set": {"a": 1}}, None),
        "diff_config": ("GET", "/v1/config/diff", None, {"node": node}),
        "apply_config": ("POST", "/v1/config/apply", {"node": node}, None),
        "config_drift": ("GET", "/v1/config/drift", None, None),
        "fleet_nodes": ("GET", "/v1/fleet/nodes", None, {"state": "offline"}),
        "quarantine_node": ("POST", f"/v1/nodes/{node}/quarantine", {"reason": "x"}, None),
    }


EXPECTED = {  # route name -> status for viewer, operator, admin
    "create_enrolment_token": (403, 201, 201),
    "create_operator_token": (403, 403, 201),
    "list_operator_tokens": (403, 403, 200),
    "revoke_operator_token": (403, 403, 200),
    "list_nodes": (200, 200, 200),
    "get_node": (200, 200, 200),
    "patch_labels": (403, 200, 200),
    "revoke_node": (403, 403, 200),
    "decommission_node": (403, 403, 200),
    "set_config": (403, 200, 200),
    "get_config": (200, 200, 200),
    "data_stats": (200, 200, 200),
    "data_query": (200, 200, 200),
    "list_audit": (200, 200, 200),
    "list_layers": (200, 200, 200),
    "write_layer": (403, 200, 200),
    "diff_config": (200, 200, 200),
    "apply_config": (403, 200, 200),
    "config_drift": (200, 200, 200),
    "fleet_nodes": (200, 200, 200),
    "quarantine_node": (403, 200, 200),
}


async def test_roles_table(cloud: Cloud) -> None:
    assert set(EXPECTED) == {r.name for r in oa.OPERATOR_ROUTES}
    node = await cloud.node({"site": "plant1"})
    seen: dict[str, tuple[int, int, int]] = {}
    for name in EXPECTED:
        statuses = []
        for role in ("viewer", "operator", "admin"):
            victim = (await cloud.node({"site": "x"})
                      if name in ("revoke_node", "decommission_node") else node)
            method, path, body, query = requests_for(node, victim)[name]
            if name == "revoke_operator_token":
                plain, rec = OperatorToken.issue("doomed", "viewer")
                await cloud.store.add_operator_token(rec)
                body = {"token": plain.get_secret_value()}
            r = await cloud.call(method, path, role, json=body, params=query)
            statuses.append(r.status_code)
            if r.status_code == 403:
                need = "admin" if EXPECTED[name][1] == 403 else "operator or admin"
                assert f"needs role {need}" in r.json()["error"], (name, role, r.text)
        seen[name] = tuple(statuses)
    assert seen == EXPECTED


async def test_no_or_bad_token_is_401_on_every_route(cloud: Cloud) -> None:
    node = await cloud.node({"site": "plant1"})
    plain, rec = OperatorToken.issue("old", "admin", timedelta(seconds=1),
                                     now=datetime.now(UTC) - timedelta(hours=1))
    await cloud.store.add_operator_token(rec)
    expired = plain.get_secret_value()
    revoked_plain, revoked = OperatorToken.issue("gone", "admin")
    await cloud.store.add_operator_token(revoked)
    await cloud.store.revoke_operator_token(revoked.hash, actor="test")
    enrolment, _ = EnrolmentToken.issue({}, timedelta(hours=1), 1)
    unknown, _ = OperatorToken.issue("never-stored", "admin")
    cases = {
        "none": (None, "no operator token"),
        "garbage": ("hello", "malformed token"),
        "enrolment token": (enrolment.get_secret_value(), "wrong kind of token"),
        "unknown": (unknown.get_secret_value(), "unknown or revoked"),
        "revoked": (revoked_plain.get_secret_value(), "unknown or revoked"),
        "expired": (expired, "expired"),
    }
    reqs = requests_for(node, node)
    for case, (token, words) in cases.items():
        for route in oa.OPERATOR_ROUTES:
            method, path, body, query = reqs[route.name]
            r = await cloud.call(method, path, None, token=token, json=body, params=query)
            assert r.status_code == 401, (case, route.name, r.text)
            assert words in r.json()["error"], (case, route.name, r.text)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = await cloud.http.get("/v1/nodes", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    assert "Bearer" in r.json()["error"]
    # a refused token changed nothing and left no audit entries but bootstrap's and enrolment's
    actions = [e.action for e in await cloud.store.list_audit(limit=100)]
    assert set(actions) == {"token.create", "node.enrol", "token.revoke"}


# -- audit ------------------------------------------------------------------------------------


async def test_every_mutating_call_is_audited(cloud: Cloud) -> None:
    node = await cloud.node({"site": "plant1"})
    victim = await cloud.node({"site": "x"})
    before = {e.id for e in await cloud.store.list_audit(limit=1000)}
    op, admin = "operator:operator-1#", "operator:admin#"
    r = await cloud.call("POST", "/v1/tokens/enrolment", "operator",
                         json={"labels": {"site": "b"}, "uses": 3})
    assert r.status_code == 201
    r = await cloud.call("POST", "/v1/tokens/operator", "admin",
                         json={"name": "bob", "role": "operator"})
    bob = r.json()["token"]
    r = await cloud.call("POST", "/v1/tokens/operator/revoke", "admin", json={"token": bob})
    assert r.json() == {"revoked": True}
    r = await cloud.call("PATCH", f"/v1/nodes/{node}/labels", "operator",
                         json={"set": {"rack": "7"}, "remove": ["site"]})
    assert r.json()["labels"] == {"rack": "7"}
    r = await cloud.call("PUT", "/v1/config", "operator",
                         json={"node": node, "pipelines": {"line": PIPELINE}})
    assert r.status_code == 200
    r = await cloud.call("POST", f"/v1/nodes/{victim}/revoke", "admin", json={"reason": "lost"})
    assert r.status_code == 200
    r = await cloud.call("PUT", "/v1/config", "viewer", json={"node": node, "config": {"a": 1}})
    assert r.status_code == 403
    new = [e for e in await cloud.store.list_audit(limit=1000) if e.id not in before]
    got = [(e.actor.split("#")[0] + "#", e.action, e.target) for e in reversed(new)]
    enrol_hash = got[0][2]
    assert enrol_hash.startswith("enrolment-token:") and len(enrol_hash) == 16 + 12
    assert got == [
        (op, "token.enrolment.create", enrol_hash),
        (admin, "token.create", "operator-token:bob"),
        (admin, "token.revoke", "operator-token"),
        (op, "node.label", f"node:{node}"),
        (op, "desired.set", f"node:{node}"),
        (op, "config.set", f"node:{node}"),
        (admin, "node.revoke", f"node:{victim}"),
        ("operator:viewer-1#", "denied", "/v1/config"),
    ]
    details = {e.action: e.detail for e in new}
    assert details["token.enrolment.create"]["labels"] == {"site": "b"}
    assert details["token.enrolment.create"]["uses"] == 3
    assert details["node.label"] == {"labels": {"rack": "7"}}
    assert details["config.set"]["pipelines"] == ["line"]
    assert details["config.set"]["versions"] == {node: 1}
    assert details["node.revoke"]["reason"] == "lost"
    assert details["denied"]["method"] == "PUT"
    assert "needs role operator or admin" in details["denied"]["reason"]
    # the audit log through the API: newest first, paged
    r = await cloud.call("GET", "/v1/audit", "viewer", params={"limit": 3})
    page = r.json()
    assert [e["action"] for e in page["entries"]] == ["denied", "node.revoke", "config.set"]
    r = await cloud.call("GET", "/v1/audit", "viewer",
                         params={"limit": 2, "before_id": page["next_before_id"]})
    assert [e["action"] for e in r.json()["entries"]] == ["desired.set", "node.label"]
    r = await cloud.call("GET", "/v1/audit", "viewer", params={"target": f"node:{victim}"})
    assert [e["action"] for e in r.json()["entries"]] == ["node.revoke", "node.enrol"]


# -- nodes and selectors ----------------------------------------------------------------------


@BOTH
async def test_selectors(cloud: Cloud) -> None:
    await cloud.node({"site": "plant1", "line": "1"}, "a1")
    await cloud.node({"site": "plant1", "line": "2"}, "a2")
    await cloud.node({"site": "plant2", "line": "1"}, "b1")
    await cloud.node({}, "c0")

    async def ids(selector: str | None, **params: Any) -> list[str]:
        r = await cloud.call("GET", "/v1/nodes", "viewer",
                             params={"selector": selector, **params} if selector else params)
        assert r.status_code == 200, r.text
        return [n["id"] for n in r.json()["nodes"]]

    assert await ids(None) == ["a1", "a2", "b1", "c0"]
    assert await ids("site=plant1") == ["a1", "a2"]
    assert await ids("site=plant1,line=1") == ["a1"]
    assert await ids(" line = 1 ") == ["a1", "b1"]
    assert await ids("line=1,line=1") == ["a1", "b1"]
    assert await ids("site=nowhere") == []
    assert await ids("site=plant1,line=3") == []
    r = await cloud.call("GET", "/v1/nodes", "viewer", params={"limit": 2})
    assert [n["id"] for n in r.json()["nodes"]] == ["a1", "a2"]
    assert r.json()["next"] == "a2"
    r = await cloud.call("GET", "/v1/nodes", "viewer", params={"limit": 2, "after": "a2"})
    assert [n["id"] for n in r.json()["nodes"]] == ["b1", "c0"]
    for bad, words in [("site", "is not key=value"), ("Site=x", "invalid label key"),
                       ("line=1,line=2", "line=1 and line=2"), (",", "empty selector")]:
        r = await cloud.call("GET", "/v1/nodes", "viewer", params={"selector": bad})
        assert r.status_code == 400, bad
        assert words in r.json()["error"], (bad, r.text)
    r = await cloud.call("GET", "/v1/nodes", "viewer", params={"limit": 0})
    assert r.status_code == 400 and "limit" in r.json()["error"]
    r = await cloud.call("GET", "/v1/nodes", "viewer", params={"colour": "red"})
    assert r.status_code == 400 and "colour" in r.json()["error"]
    # a label change shows up in selectors at once
    r = await cloud.call("PATCH", "/v1/nodes/c0/labels", "operator",
                         json={"set": {"site": "plant1", "line": "1"}})
    assert r.status_code == 200
    assert await ids("site=plant1,line=1") == ["a1", "c0"]
    r = await cloud.call("GET", "/v1/nodes/c0", "viewer")
    detail = r.json()
    assert detail["labels"] == {"line": "1", "site": "plant1"}
    assert (detail["desired_version"], detail["reported"], detail["streams"]) == (0, None, [])
    r = await cloud.call("PATCH", "/v1/nodes/c0/labels", "operator",
                         json={"set": {"a": "1"}, "remove": ["a"]})
    assert r.status_code == 400 and "both set and removed" in r.json()["error"]
    r = await cloud.call("PATCH", "/v1/nodes/zz/labels", "operator", json={"set": {"a": "1"}})
    assert r.status_code == 404 and "no node 'zz'" in r.json()["error"]


# -- config -----------------------------------------------------------------------------------


@BOTH
async def test_config_set_by_selector_and_node(cloud: Cloud, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    for nid, labels in (("a1", {"site": "p1"}), ("a2", {"site": "p1"}), ("b1", {"site": "p2"})):
        await cloud.node(labels, nid)
    pokes: list[tuple[str, int]] = []
    inline: list[dict[str, Any] | None] = []

    class Live:  # a1 has a live session here
        def poke_desired(self, version: int, jitter: float = 0.0,
                         state: dict[str, Any] | None = None) -> None:
            pokes.append(("a1", version))
            inline.append(state)

    monkeypatch.setattr(cloud.running.app[POKES], "lookup",
                        lambda node_id: Live() if node_id == "a1" else None)
    r = await cloud.call("PUT", "/v1/config", "operator", json={
        "selector": "site=p1", "pipelines": {"line": PIPELINE},
        "config": {"rate": 50, "mode": "fast"}, "expires_in_s": 3600})
    assert r.status_code == 200, r.text
    assert r.json() == {"nodes": [{"node": "a1", "version": 1, "notified": True},
                                  {"node": "a2", "version": 1, "notified": False}],
                        "held": []}
    for _ in range(100):  # the fan-out task pokes the node connected here, and only it
        if pokes:
            break
        await asyncio.sleep(0.01)
    assert pokes == [("a1", 1)]
    # the poke carries a1's stored v1 itself (small): the node need not fetch it
    stored = await cloud.store.get_desired_state("a1")
    assert stored is not None and inline == [stored.to_wire()]
    r = await cloud.call("PUT", "/v1/config", "operator", json={
        "node": "a2", "config": {"mode": None, "extra": [1, 2]}, "setpoints": {"limit": 99.5}})
    assert r.json()["nodes"] == [{"node": "a2", "version": 2, "notified": False}]
    r = await cloud.call("GET", "/v1/config", "viewer", params={"node": "a2"})
    got = r.json()
    d = got["desired"]
    assert d["version"] == 2
    assert d["pipelines"] == {"line": PIPELINE}  # kept from v1
    assert d["labels"] == {"site": "p1"}
    assert d["expires_at"] is None  # v2 has no expiry
    assert {k: v for k, v in d["config"].items() if k != "setpoints"} == {
        "rate": 50, "extra": [1, 2]}
    sp = LwwMap.from_wire(d["config"]["setpoints"])
    assert sp.to_dict() == {"limit": 99.5}
    assert sp.entry("limit").origin.startswith("operator:operator-1#")
    assert got["reported"]["setpoints"] == {"limit": 99.5}
    r = await cloud.call("GET", "/v1/config", "viewer", params={"node": "a1"})
    d1 = r.json()["desired"]
    assert d1["version"] == 1 and d1["config"] == {"rate": 50, "mode": "fast"}
    now = datetime.now(UTC).timestamp()
    assert now + 3590 < d1["expires_at"] <= now + 3600
    # a second setpoint write wins by the hybrid logical clock
    await cloud.call("PUT", "/v1/config", "operator", json={"node": "a2",
                                                            "setpoints": {"limit": 80}})
    r = await cloud.call("GET", "/v1/config", "viewer", params={"node": "a2"})
    assert LwwMap.from_wire(r.json()["desired"]["config"]["setpoints"]).to_dict() == {
        "limit": 80}
    r = await cloud.call("GET", "/v1/config", "viewer", params={"node": "b1"})
    assert r.json() == {"node": "b1", "desired": None, "reported": None}


@BOTH
async def test_concurrent_config_sets_for_one_node_all_survive(cloud: Cloud) -> None:
    """Operators writing different setpoints and config keys of one node at the same time all
    keep their write: the desired state is read, merged and written in one transaction (two
    transactions lost all but one of them)."""
    await cloud.node({"site": "p1"}, "a1")
    writes = {f"k{i}": i for i in range(8)}
    answers = await asyncio.gather(*(
        cloud.call("PUT", "/v1/config", "operator",
                   json={"node": "a1", "setpoints": {k: v}, "config": {k: v}})
        for k, v in writes.items()))
    assert [r.status_code for r in answers] == [200] * len(writes), [r.text for r in answers]
    assert sorted(r.json()["nodes"][0]["version"] for r in answers) == list(
        range(1, len(writes) + 1))
    r = await cloud.call("GET", "/v1/config", "viewer", params={"node": "a1"})
    got = r.json()
    desired = got["desired"]
    assert desired["version"] == len(writes)
    assert LwwMap.from_wire(desired["config"]["setpoints"]).to_dict() == writes
    assert {k: v for k, v in desired["config"].items() if k != "setpoints"} == writes
    assert got["reported"]["setpoints"] == writes


async def test_config_set_refuses_bad_input(cloud: Cloud) -> None:
    await cloud.node({"site": "p1"}, "a1")
    revoked = await cloud.node({"site": "p9"}, "r1")
    await cloud.call("POST", f"/v1/nodes/{revoked}/revoke", "admin", json={})
    cases = [
        ({"node": "a1", "pipelines": {"bad": BAD_PIPELINE}}, 400,
         "bad:9: spec.stages.0.type: unknown operator type 'threshold!': neither built in"),
        ({"node": "a1", "pipelines": {"x": "a: [1"}}, 400, "x:"),
        ({"node": "a1", "selector": "site=p1", "config": {"a": 1}}, 400,
         "exactly one of node and selector"),
        ({"config": {"a": 1}}, 400, "exactly one of node and selector"),
        ({"node": "a1"}, 400, "nothing to set"),
        ({"node": "a1", "config": {"setpoints": 1}}, 400, "managed by the setpoints field"),
        ({"node": "a1", "config": {"a": 1}, "expires_in_s": -5}, 400, "expires_in_s"),
        ({"node": "a1", "config": {"a": 1}, "colour": "red"}, 400, "colour"),
        ({"node": "nope", "config": {"a": 1}}, 404, "no node 'nope'"),
        ({"selector": "site=p0", "config": {"a": 1}}, 404, "matches selector 'site=p0'"),
        ({"selector": "site=p9", "config": {"a": 1}}, 404, "matches selector"),
        ({"node": "r1", "config": {"a": 1}}, 400, "is revoked"),
    ]
    for body, status, words in cases:
        r = await cloud.call("PUT", "/v1/config", "operator", json=body)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["error"], (body, r.text)
    r = await cloud.http.put("/v1/config", content=b"{not json",
                             headers={"Authorization": f"Bearer {cloud.tokens['operator']}"})
    assert r.status_code == 400 and r.json()["error"] == "request body is not JSON"
    assert await cloud.store.desired_version("a1") == 0  # nothing was stored


PLUGGED = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: plugged
spec:
  sources:
    - {{id: sim, type: simulator, seed: 1}}
  stages:
    - {{id: p, type: python, inputs: [sim], class: "{ref}", options: {{any: 1}}}}
    - {{id: q, type: {name}, inputs: [p], any: [1, 2]}}
  sinks:
    - {{id: out, type: log, inputs: [q.alarms]}}
"""

PROBE = """\
from pathlib import Path
Path({marker!r}).write_text("imported by " + __name__)


class Probe:
    def process(self, batch):
        return batch
"""


async def test_config_set_imports_no_plugin_code_and_answers_alike_whatever_is_installed(
        cloud: Cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pushed pipeline's plugins are checked by their form: the control plane imports
    nothing (a module with side effects, an entry point, `this`) and its answers do not tell
    what is installed on it. The node checks the rest when it applies the pipeline."""
    marker = tmp_path / "imported.txt"
    site = tmp_path / "site"
    (site / "ew_probe_mod").mkdir(parents=True)
    (site / "ew_probe_mod" / "__init__.py").write_text(PROBE.format(marker=str(marker)))
    info = site / "ew_probe_dist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ew_probe_dist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[edgewise.operators]\new_probe_op = ew_probe_mod:Probe\n")
    monkeypatch.syspath_prepend(str(site))
    await cloud.node({"site": "p1"}, "a1")
    monkeypatch.delitem(sys.modules, "this", raising=False)
    versions = []
    for ref, name in (("ew_probe_mod:Probe", "ew_probe_op"),  # installed here
                      ("not_installed_xyz:Op", "not_installed_op"),  # nowhere
                      ("ew_probe_mod:Nope", "ew_probe_op"),  # a module without the class
                      ("this:Zen", "unit_convert"),  # prints the Zen of Python when imported
                      ("json:JSONDecoder", "vendor.op-2")):  # not an operator
        r = await cloud.call("PUT", "/v1/config", "operator", json={
            "node": "a1", "pipelines": {"plugged": PLUGGED.format(ref=ref, name=name)}})
        assert r.status_code == 200, (ref, r.text)
        versions.append(r.json()["nodes"][0]["version"])
    assert versions == [1, 2, 3, 4, 5]
    assert not marker.exists()
    assert "ew_probe_mod" not in sys.modules and "this" not in sys.modules
    # refused by form only, with the same words whatever the name
    for ref in ("ew_probe_mod", "not_installed_xyz", "this.Zen"):
        r = await cloud.call("PUT", "/v1/config", "operator", json={
            "node": "a1", "pipelines": {"plugged": PLUGGED.format(ref=ref, name="x")}})
        assert r.status_code == 400
        assert r.json()["error"] == (
            f"plugged:9: spec.stages.0.class: '{ref}' is not an import path; write it as "
            "'package.module:ClassName'")
    r = await cloud.call("PUT", "/v1/config", "operator", json={
        "node": "a1", "pipelines": {"plugged": PLUGGED.format(ref="a:B", name="'no way'")}})
    assert r.status_code == 400
    assert "plugged:10: spec.stages.1.type: unknown operator type 'no way': neither built in" \
        in r.json()["error"]
    assert not marker.exists() and await cloud.store.desired_version("a1") == 5


# -- data -------------------------------------------------------------------------------------


def cols(first: int, n: int) -> dict[str, np.ndarray]:
    seq = np.arange(first, first + n)
    return {"sensor": np.array([f"s{i % 4}" for i in seq], dtype=object),
            "ts": np.round(T0 + seq * 0.5, 2), "value": np.round(seq * 1.25, 2)}


@BOTH
async def test_data_stats_and_query_are_exact(cloud: Cloud) -> None:
    await cloud.node({}, "n1")
    await cloud.node({}, "n2")
    now = datetime.now(UTC)
    chunks = [ChunkWrite("n1", "raw", f, n, n, False, codec.encode(cols(f, n)), now)
              for f, n in ((0, 100), (100, 50), (180, 10))]
    chunks.append(ChunkWrite("n2", "alarms", 0, 3, 3, False, codec.encode(cols(0, 3)), now))
    await cloud.store.commit_ingest(
        chunks, [GapWrite("n1", "raw", 150, 10, "outbox full", now)],
        [MarkWrite("n1", "raw", 160, now), MarkWrite("n2", "alarms", 3, now)])

    r = await cloud.call("GET", "/v1/data/stats", "viewer")
    rows = [(s["node"], s["stream"], s["records_stored"], s["contiguous_mark"],
             s["highest_contiguous_seq"], s["lost_records"], s["gaps"], s["missing"])
            for s in r.json()["streams"]]
    assert rows == [("n1", "raw", 160, 160, 159, 10, None, None),
                    ("n2", "alarms", 3, 3, 2, 0, None, None)]
    r = await cloud.call("GET", "/v1/data/stats", "viewer", params={"node": "n1"})
    (s,) = r.json()["streams"]
    assert s["gaps"] == [{"first": 150, "count": 10, "reason": "outbox full"}]
    assert s["missing"] == [{"first": 160, "count": 20, "reason": None}]
    r = await cloud.call("GET", "/v1/data/stats", "viewer", params={"node": "zz"})
    assert r.status_code == 404

    async def query(**params: Any) -> dict[str, Any]:
        r = await cloud.call("GET", "/v1/data/query", "viewer",
                             params={"node": "n1", "stream": "raw", **params})
        assert r.status_code == 200, r.text
        return r.json()

    everything = await query(limit=1000)
    seqs = list(range(150)) + list(range(180, 190))
    assert [x["seq"] for x in everything["records"]] == seqs
    assert everything["next_seq"] is None
    assert everything["records"][137] == {
        "seq": 137, "data": {"sensor": "s1", "ts": 1764547268.5, "value": 171.25}}
    page = await query(from_seq=90, limit=30)  # across the chunk boundary at 100
    assert [x["seq"] for x in page["records"]] == list(range(90, 120))
    assert page["next_seq"] == 120
    page = await query(from_seq=120, limit=30)  # starts inside the chunk 100..149
    assert [x["seq"] for x in page["records"]] == list(range(120, 150))
    assert page["next_seq"] == 180
    page = await query(from_seq=180, limit=30)
    assert [x["seq"] for x in page["records"]] == list(range(180, 190))
    assert page["next_seq"] is None
    since = await query(since=T0 + 140 * 0.5)
    assert [x["seq"] for x in since["records"]] == list(range(140, 150)) + list(range(180, 190))
    assert (await query(since=T0 + 1000))["records"] == []
    assert (await query(limit=5))["next_seq"] == 5
    r = await cloud.call("GET", "/v1/data/query", "viewer",
                         params={"node": "n1", "stream": "nothing"})
    assert r.json() == {"node": "n1", "stream": "nothing", "records": [], "next_seq": None,
                        "quarantined": []}
    r = await cloud.call("GET", "/v1/data/query", "viewer", params={"node": "n1"})
    assert r.status_code == 400 and "stream" in r.json()["error"]
    r = await cloud.call("GET", "/v1/data/query", "viewer",
                         params={"node": "n1", "stream": "raw", "limit": 100_001})
    assert r.status_code == 400 and "limit" in r.json()["error"]


# -- revocation and operator tokens -----------------------------------------------------------


async def test_revoke_node_everywhere(cloud: Cloud) -> None:
    nid = await cloud.node({"site": "p1"})
    node = await cloud.store.get_node(nid)
    assert node is not None
    r = await cloud.call("POST", f"/v1/nodes/{nid}/revoke", "admin", json={"reason": "stolen"})
    assert r.status_code == 200
    assert (r.json()["revoked"], r.json()["status"]) == (True, "revoked")
    revocations = cloud.running.app[REVOCATIONS]
    renewed = cloud.ca.sign_node_csr(pki.make_csr(cloud.keys[nid]), nid)  # same key, new serial
    assert revocations.is_revoked(renewed.cert)
    other = await cloud.node({"site": "p1"})
    fresh = cloud.ca.sign_node_csr(pki.make_csr(cloud.keys[other]), other)
    assert not revocations.is_revoked(fresh.cert)
    serials, keys = await cloud.store.list_revocations()
    assert (serials, keys) == ([node.cert_serial], [node.key_fingerprint])
    r = await cloud.call("POST", "/v1/nodes/nobody/revoke", "admin", json={})
    assert r.status_code == 404


async def test_operator_token_lifecycle(cloud: Cloud) -> None:
    r = await cloud.call("POST", "/v1/tokens/operator", "admin",
                         json={"name": "grafana", "role": "viewer", "ttl_s": 3600})
    assert r.status_code == 201
    body = r.json()
    assert (body["name"], body["role"]) == ("grafana", "viewer")
    assert body["token"].startswith("ewo_")
    r = await cloud.call("GET", "/v1/nodes", None, token=body["token"])
    assert r.status_code == 200
    r = await cloud.call("PUT", "/v1/config", None, token=body["token"],
                         json={"selector": "a=b", "config": {"x": 1}})
    assert r.status_code == 403
    assert r.json()["error"] == "role viewer is read-only; this call needs role operator or admin"
    r = await cloud.call("GET", "/v1/tokens/operator", "admin")
    listed = {t["name"]: t for t in r.json()["tokens"]}
    assert set(listed) == {"admin", "operator-1", "viewer-1", "grafana"}
    assert listed["grafana"]["role"] == "viewer" and not listed["grafana"]["revoked"]
    assert "token" not in listed["grafana"]  # plaintext is never listed
    r = await cloud.call("POST", "/v1/tokens/operator/revoke", "admin",
                         json={"token": body["token"]})
    assert r.json() == {"revoked": True}
    r = await cloud.call("GET", "/v1/nodes", None, token=body["token"])
    assert r.status_code == 401
    r = await cloud.call("POST", "/v1/tokens/operator/revoke", "admin",
                         json={"token": "ewo_" + "A" * 43})
    assert r.status_code == 404
    r = await cloud.call("POST", "/v1/tokens/operator/revoke", "admin", json={"token": "x"})
    assert r.status_code == 400
    r = await cloud.call("POST", "/v1/tokens/operator", "admin",
                         json={"name": "x", "role": "root"})
    assert r.status_code == 400 and "role" in r.json()["error"]
    r = await cloud.call("POST", "/v1/tokens/enrolment", "operator",
                         json={"labels": {"Bad Key": "x"}})
    assert r.status_code == 400 and "invalid label key" in r.json()["error"]


# -- OpenAPI ----------------------------------------------------------------------------------


async def test_openapi_document_is_valid_and_lists_every_route(cloud: Cloud) -> None:
    from edgewise.cloud.attestation.api import ROUTES as attestation_routes
    from edgewise.cloud.pipelines.api import ROUTES as cloud_pipeline_routes
    from edgewise.cloud.rollouts.api import ROUTES as rollout_routes  # registered by rollouts

    r = await cloud.http.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    validate(doc)
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    served = {(route.method, route.resource.canonical)
              for route in cloud.running.app.router.routes() if route.method != "HEAD"
              and not route.resource.canonical.startswith("/console")}  # HTML pages, no API
    assert documented == served
    assert documented == {(r.method, r.path) for r in (*oa.ALL_ROUTES, *rollout_routes,
                                                       *cloud_pipeline_routes,
                                                       *attestation_routes)}
    op = doc["paths"]["/v1/config"]["put"]
    assert op["operationId"] == "set_config"
    # 413: a body over the documented limit (finding 7b) is an answer of its own; 409: the
    # node is quarantined (docs/security.md)
    assert set(op["responses"]) == {"200", "400", "401", "403", "404", "409", "413", "503"}
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"node", "selector", "pipelines", "config", "setpoints",
                                       "expires_in_s", "release"}
    assert "$ref" not in r.text
