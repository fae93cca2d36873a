"""Quarantine enforced by the control plane (issue 16: "its session may only report and receive
a new release, its data is kept apart and flagged, operators see why"), in-process control plane
over real TLS, swtpm: a TPM node's live session goes on and its batches are acknowledged while
it is quarantined, but they are stored flagged and left out of queries unless asked; pushes
other than a release are refused (409) or held; after a new release the node attests again,
leaves quarantine, and its data flows normally; every transition is audited. Also the selector
policy (``--require-attestation-for``) and the operator views (attestation, quarantine)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from sqlalchemy import insert
from test_tpm_cloud_api import Cloud, attest, enrol

import swtpm
from edgewise.cloud.config import AttestationSettings
from edgewise.cloud.store.releases import ReleaseRow
from edgewise.edge.tpm_node import TpmNode
from edgewise.security import pki
from edgewise.security.tls import client_context
from edgewise.security.tokens import EnrolmentToken, OperatorToken, Role
from edgewise.security.tpm.measure import agent_code_digest
from edgewise.sync import codec, protocol

swtpm_factory = swtpm.swtpm_factory  # fixture
TIMEOUT = aiohttp.ClientTimeout(total=30)
AGENT = agent_code_digest()
TAMPERED = "ab" * 32
RELEASE, RELEASE_DIGEST = "2.0.0", "cd" * 32


@pytest.fixture
def backend() -> str:
    return "sqlite"  # the tests marked with BOTH run on PostgreSQL too


BOTH = pytest.mark.parametrize("backend", ["sqlite", "postgres"])


@pytest.fixture
async def cloud(tmp_path: Path, backend: str, request: pytest.FixtureRequest
                ) -> AsyncIterator[Cloud]:
    from edgewise.cloud.app import start
    from edgewise.cloud.bootstrap import bootstrap
    from edgewise.cloud.config import CloudConfig
    from edgewise.cloud.store import Store

    config = CloudConfig(
        data_dir=tmp_path / "cloud", port=0, maintenance_interval=0.2, node_write_interval=0.05,
        db=request.getfixturevalue("postgres") if backend == "postgres" else None,
        attestation=AttestationSettings(agents=(AGENT,), require_for=((("site", "strict"),),)))
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            yield Cloud(config.data_dir, running, store)
        finally:
            await running.stop()


class Operator:
    def __init__(self, cloud: Cloud, token: str) -> None:
        self.cloud, self.token = cloud, token

    async def call(self, method: str, path: str, body: Any = None,
                   params: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.cloud.http() as http:
            r = await http.request(method, self.cloud.running.url + path, json=body,
                                   params=params,
                                   headers={"Authorization": f"Bearer {self.token}"})
            return r.status, await r.json()

    async def records(self, node: str, **params: str) -> dict[str, Any]:
        status, body = await self.call("GET", "/v1/data/query",
                                       params={"node": node, "stream": "raw", **params})
        assert status == 200, body
        return body


async def operator(cloud: Cloud) -> Operator:
    plain, record = OperatorToken.issue("admin-q", Role.ADMIN)
    await cloud.store.add_operator_token(record)
    return Operator(cloud, plain.get_secret_value())


async def plain_node(cloud: Cloud, tmp_path: Path, name: str, labels: dict[str, str]
                     ) -> tuple[str, Path, Path]:
    """A node enrolled without a TPM: (id, key, certificate)."""
    plain, record = EnrolmentToken.issue(labels, timedelta(hours=1), 1)
    await cloud.store.add_enrolment_token(record)
    key_path = tmp_path / f"{name}.key"
    key = pki.generate_key(key_path)
    status, body = await cloud.post("/v1/device/enrol", {
        "token": plain.get_secret_value(), "csr": pki.make_csr(key).decode()})
    assert status == 201, body
    cert = tmp_path / f"{name}.pem"
    cert.write_text(body["certificate"])
    return body["node_id"], key_path, cert


class NodeSession:
    """A node's device session, spoken frame by frame."""

    def __init__(self, cloud: Cloud, key: Path, cert: Path) -> None:
        self.ctx = client_context(cloud.dir / "pki" / "ca.pem", cert, key)
        self.url = cloud.running.url
        self.pokes: list[dict[str, Any]] = []

    async def __aenter__(self) -> NodeSession:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ctx),
                                          timeout=TIMEOUT)
        self.ws = await self.http.ws_connect(f"{self.url}{protocol.SESSION_PATH}")
        await self.ws.send_bytes(protocol.encode({"t": "hello", "agent": "t/1",
                                                  "streams": {"raw": 5},
                                                  "applied_version": 0}))
        assert protocol.decode((await self.ws.receive(timeout=10)).data)["t"] == "welcome"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.http.close()

    async def send(self, cid: int, seq: int, n: int) -> dict[str, Any]:
        """One batch of ``n`` records from ``seq``; the cloud's answer (its ack)."""
        payload = codec.encode({"v": np.arange(seq, seq + n, dtype=np.int64)})
        await self.ws.send_bytes(protocol.encode({
            "t": "batch", "id": cid, "stream": "raw", "seq": seq, "count": n, "records": n,
            "compacted": False, "payload": payload}))
        while True:  # desired-state pokes are kept in ``pokes``
            frame = protocol.decode((await self.ws.receive(timeout=10)).data)
            if frame["t"] != protocol.DESIRED:
                return frame
            self.pokes.append(frame)

    async def heartbeat(self) -> None:
        await self.ws.send_bytes(protocol.encode({"t": "heartbeat", "ts": 1.0}))


def reboot(node: TpmNode) -> None:
    """What a power cycle does to the software PCR: reset to zeros (PCR 16 is resettable)."""
    from tpm2_pytss.constants import ESYS_TR

    node.tpm._ctx.pcr_reset(ESYS_TR.PCR16)


@BOTH
async def test_quarantined_tpm_node_is_kept_apart_then_attests_again_after_a_release(
    cloud: Cloud, swtpm_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    op = await operator(cloud)
    other_id, _, _ = await plain_node(cloud, tmp_path, "other", {"site": "p1"})
    with TpmNode(swtpm_factory("a"), tmp_path / "a") as a:
        key = tmp_path / "a" / "node.key"
        node_id, cert = await enrol(cloud, a, key)
        a.measure(AGENT, None)
        assert not (await attest(cloud, a, key, cert))["quarantined"]
        async with NodeSession(cloud, key, cert) as session:
            assert await session.send(1, 0, 10) == {"t": "ack", "ids": [1]}
            # the agent is replaced by a tampered one and restarts: measured, quarantined
            a.measure(TAMPERED, None)
            verdict = await attest(cloud, a, key, cert)
            reason = "measurement: agent code not in the allowed set"
            assert (verdict["quarantined"], verdict["reason"]) == (True, reason)
            # the live session goes on: heartbeats and batches, acknowledged (the outbox
            # drains), but stored apart
            await session.heartbeat()
            assert await session.send(2, 10, 5) == {"t": "ack", "ids": [2]}
            [stats] = await cloud.store.stream_stats(node_id)
            assert (stats.contiguous, stats.stored_records) == (15, 15)
            default = await cloud.store.read_chunks(node_id, "raw")
            assert [(c.seq_first, c.quarantined) for c in default] == [(0, False)]
            every = await cloud.store.read_chunks(node_id, "raw", include_quarantined=True)
            assert [(c.seq_first, c.quarantined) for c in every] == [(0, False), (10, True)]
            body = await op.records(node_id)
            assert ([r["seq"] for r in body["records"]], body["quarantined"]) == \
                (list(range(10)), [])
            body = await op.records(node_id, include_quarantined="true")
            assert [r["seq"] for r in body["records"]] == list(range(15))
            assert [r["data"]["v"] for r in body["records"]] == list(range(15))
            assert body["quarantined"] == [{"first": 10, "count": 5,
                                            "reason": "sent while quarantined"}]
            # operators see why, without the expected digest
            status, shown = await op.call("GET", f"/v1/nodes/{node_id}")
            assert status == 200, shown
            assert (shown["attestation"], shown["quarantine"], shown["state"]) == \
                ("tpm", reason, "quarantined")
            assert AGENT not in str(shown)
            # pushes other than a release are refused with the reason
            for path, method, push in (
                    ("/v1/config", "PUT", {"node": node_id, "config": {"mode": "x"}}),
                    ("/v1/config", "PUT", {"node": node_id, "setpoints": {"sp": 1}}),
                    (f"/v1/nodes/{node_id}/labels", "PATCH", {"set": {"zone": "a"}}),
                    ("/v1/config/apply", "POST", {"node": node_id})):
                status, answer = await op.call(method, path, push)
                assert status == 409, (path, answer)
                assert f"node {node_id} is quarantined ({reason})" in answer["error"]
            # a push to a selector goes to the others and names the held node
            status, answer = await op.call("PUT", "/v1/config", {
                "selector": "site=p1", "config": {"mode": "x"}})
            assert status == 200, answer
            assert [n["node"] for n in answer["nodes"]] == [other_id]
            assert answer["held"] == [{"node": node_id, "reason": reason}]
            # a new release does reach it
            async with cloud.store._tx() as conn:
                await conn.execute(insert(ReleaseRow).values(
                    version=RELEASE, digest=RELEASE_DIGEST, manifest=b"{}", files=0,
                    bytes=0, created=datetime.now(UTC), created_by="test"))
            status, answer = await op.call("PUT", "/v1/config", {"node": node_id,
                                                                 "release": RELEASE})
            assert status == 200, answer
            desired = await cloud.store.get_desired_state(node_id)
            assert desired is not None and desired.release == RELEASE
            assert desired.config == {}  # the held config change never reached it
            # the node reboots into the new release with the allowed agent: attests again
            reboot(a)
            a.measure(AGENT, RELEASE_DIGEST)
            verdict = await attest(cloud, a, key, cert)
            assert (verdict["quarantined"], verdict["measurements"]) == \
                (False, {"agent": AGENT, "release": RELEASE_DIGEST})
            # out of quarantine: its data flows normally again, on the same session
            assert await session.send(3, 15, 5) == {"t": "ack", "ids": [3]}
            # the release reached it on its session (the held config never did)
            assert [(p["version"], p["state"]["release"]) for p in session.pokes] == \
                [(desired.version, RELEASE)]
            body = await op.records(node_id)
            assert [r["seq"] for r in body["records"]] == [*range(10), *range(15, 20)]
            status, shown = await op.call("GET", f"/v1/nodes/{node_id}")
            assert (shown["quarantine"], shown["state"]) == (None, "online"), shown
    # every transition audited, by the attestation
    status, audit = await op.call("GET", "/v1/audit", params={"target": f"node:{node_id}"})
    assert status == 200, audit
    moves = [(e["action"], e["actor"], e["detail"].get("reason"))
             for e in reversed(audit["entries"]) if "quarantine" in e["action"]]
    assert moves == [("node.quarantine", "attestation", reason),
                     ("node.unquarantine", "attestation", None)]


async def strict_node(cloud: Cloud, tmp_path: Path) -> tuple[str, Path, Path]:
    """A node without a TPM under the policy's selector: a token with the selector's labels
    cannot enrol it (403, the token not used up), so it enrols as another site and is
    relabelled (an operator moving it, or a node enrolled before the policy)."""
    plain, record = EnrolmentToken.issue({"site": "strict"}, timedelta(hours=1), 1)
    await cloud.store.add_enrolment_token(record)
    key = pki.generate_key(tmp_path / "refused.key")
    status, body = await cloud.post("/v1/device/enrol", {
        "token": plain.get_secret_value(), "csr": pki.make_csr(key).decode()})
    assert (status, body["error"]) == (403, "nodes with this token's labels must enrol with a "
                                            "TPM (--require-attestation-for; enrol with --tpm)")
    [left] = [t for t in await cloud.store.list_enrolment_tokens()
              if t.hash_prefix == record.hash[:12]]
    assert left.uses_left == 1
    node_id, key_path, cert = await plain_node(cloud, tmp_path, "strict", {"site": "moved"})
    await cloud.store.patch_node_labels(node_id, {"site": "strict"}, (), actor="test")
    return node_id, key_path, cert


@BOTH
async def test_selector_policy_quarantines_nodes_without_a_tpm_and_views_show_it(
    cloud: Cloud, tmp_path: Path,
) -> None:
    op = await operator(cloud)
    strict_id, key, cert = await strict_node(cloud, tmp_path)
    lax_id, lax_key, lax_cert = await plain_node(cloud, tmp_path, "lax", {"site": "lax"})
    reason = "attestation required: this node has no TPM"
    async with NodeSession(cloud, key, cert) as session, \
            NodeSession(cloud, lax_key, lax_cert) as lax:
        assert await session.send(1, 0, 4) == {"t": "ack", "ids": [1]}
        assert await lax.send(1, 0, 4) == {"t": "ack", "ids": [1]}
    assert [c.quarantined for c in await cloud.store.read_chunks(
        strict_id, "raw", include_quarantined=True)] == [True]
    assert [c.quarantined for c in await cloud.store.read_chunks(lax_id, "raw")] == [False]
    status, listed = await op.call("GET", "/v1/nodes")
    assert status == 200, listed
    assert {n["id"]: (n["attestation"], n["quarantine"]) for n in listed["nodes"]} == {
        strict_id: ("none", reason), lax_id: ("none", None)}
    status, fleet = await op.call("GET", "/v1/fleet/nodes", params={"state": "quarantined"})
    assert [(n["id"], n["attestation"], n["quarantine"]) for n in fleet["nodes"]] == \
        [(strict_id, "none", reason)]
    # the console's fleet page shows it with its attestation
    ctx = client_context(cloud.dir / "pki" / "ca.pem")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=TIMEOUT,
                                     cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        r = await http.post(cloud.running.url + "/console/login", allow_redirects=False,
                            data={"token": op.token, "next": "/console/fleet"})
        assert r.status == 303, await r.text()
        r = await http.get(cloud.running.url + "/console/fleet",
                           params={"state": "quarantined"})
        page = await r.text()
    assert r.status == 200 and ">Attestation</th>" in page
    assert strict_id in page and lax_id not in page and "<td>none</td>" in page
    # relabelling it out of the policy's selector is refused while it is quarantined
    status, answer = await op.call("PATCH", f"/v1/nodes/{strict_id}/labels",
                                   {"set": {"site": "lax"}})
    assert status == 409, answer
    # an operator lifts the quarantine (audited); its next session is checked again
    status, answer = await op.call("POST", f"/v1/nodes/{strict_id}/quarantine",
                                   {"reason": None})
    assert (status, answer["quarantine"]) == (200, None), answer
    async with NodeSession(cloud, key, cert) as session:
        assert await session.send(2, 4, 3) == {"t": "ack", "ids": [2]}
    assert [c.quarantined for c in await cloud.store.read_chunks(
        strict_id, "raw", include_quarantined=True)] == [True, True]
    status, audit = await op.call("GET", "/v1/audit", params={"target": f"node:{strict_id}"})
    assert [(e["action"], e["actor"].split(":")[0]) for e in reversed(audit["entries"])
            if "quarantine" in e["action"]] == [
        ("node.quarantine", "attestation"), ("node.unquarantine", "operator"),
        ("node.quarantine", "attestation")]


@pytest.mark.service
async def test_data_out_forwards_nothing_a_quarantined_node_sent(
    tmp_path: Path, mosquitto: tuple[str, int],
) -> None:
    import uuid

    import orjson
    from test_forward_mqtt import Subscriber

    from edgewise.cloud.app import start
    from edgewise.cloud.bootstrap import bootstrap
    from edgewise.cloud.config import CloudConfig
    from edgewise.cloud.dataout.config import data_out_config
    from edgewise.cloud.store import Store

    prefix = f"edgewise-test/{uuid.uuid4().hex[:12]}"
    subscriber = Subscriber(*mosquitto, f"{prefix}/#")
    config = CloudConfig(
        data_dir=tmp_path / "cloud", port=0, maintenance_interval=0.2,
        attestation=AttestationSettings(require_for=((("site", "strict"),),)),
        data_out=data_out_config({"forwarders": [
            {"type": "mqtt", "host": mosquitto[0], "port": mosquitto[1],
             "topic": prefix + "/{node}/{stream}"}]}))
    try:
        async with Store(config.db_url) as store:
            boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                                   trust_domain="edgewise.local")
            running = await start(config, boot.ca, store=store)
            try:
                cloud = Cloud(config.data_dir, running, store)
                strict = await strict_node(cloud, tmp_path)
                lax = await plain_node(cloud, tmp_path, "lax", {"site": "lax"})
                async with NodeSession(cloud, *strict[1:]) as s, \
                        NodeSession(cloud, *lax[1:]) as lx:
                    assert await s.send(1, 0, 3) == {"t": "ack", "ids": [1]}
                    assert await lx.send(1, 0, 3) == {"t": "ack", "ids": [1]}
                got = await subscriber.wait_for(3)
            finally:
                await running.stop()
    finally:
        subscriber.close()
    assert sorted((t.split("/")[-2], orjson.loads(p)["seq"]) for t, p in got) == \
        [(lax[0], 0), (lax[0], 1), (lax[0], 2)]


async def test_a_quarantine_set_by_another_replica_reaches_the_live_session(
    cloud: Cloud, tmp_path: Path,
) -> None:
    node_id, key, cert = await plain_node(cloud, tmp_path, "n", {"site": "lax"})
    async with NodeSession(cloud, key, cert) as session:
        assert await session.send(1, 0, 2) == {"t": "ack", "ids": [1]}
        # another control-plane process quarantines it: only the store changes here
        await cloud.store.set_quarantine(node_id, "seen elsewhere", actor="operator:other")
        seq, cid, deadline = 2, 2, time.monotonic() + 30
        while True:  # this process's maintenance round (every 3 x 0.2 s here) picks it up
            assert await session.send(cid, seq, 1) == {"t": "ack", "ids": [cid]}
            chunks = await cloud.store.read_chunks(node_id, "raw", from_seq=seq,
                                                   include_quarantined=True)
            if chunks[0].quarantined:
                break
            assert time.monotonic() < deadline, "the live session never heard of it"
            seq, cid = seq + 1, cid + 1
            await asyncio.sleep(0.1)
    [stats] = await cloud.store.stream_stats(node_id)
    assert stats.contiguous == seq + 1  # every batch acknowledged and accounted for


async def test_a_tpm_node_that_stops_attesting_is_quarantined_as_overdue(
    swtpm_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    """The control plane wants a fresh quote from every TPM node with a live session (the
    agent attests every 600 s; here the allowed age is 3 s): one that stops attesting, or a
    copy of its TLS key that never does, is quarantined; a quote lifts it."""
    from test_tpm_cloud_api import _cloud

    overdue = "attestation overdue: no attestation within the allowed time"
    async for cloud in _cloud(tmp_path, AttestationSettings(agents=(AGENT,), max_age_s=3.0)):
        with TpmNode(swtpm_factory("a"), tmp_path / "a") as a:
            key = tmp_path / "a" / "node.key"
            node_id, cert = await enrol(cloud, a, key)
            a.measure(AGENT, None)
            assert not (await attest(cloud, a, key, cert))["quarantined"]
            async with NodeSession(cloud, key, cert) as session:
                deadline = time.monotonic() + 30
                while not await cloud.store.quarantines([node_id]):
                    assert time.monotonic() < deadline, "never found overdue"
                    await asyncio.sleep(0.1)
                assert await cloud.store.quarantines([node_id]) == {node_id: overdue}
                assert await session.send(1, 0, 2) == {"t": "ack", "ids": [1]}
                [chunk] = await cloud.store.read_chunks(node_id, "raw", include_quarantined=True)
                assert chunk.quarantined
                verdict = await attest(cloud, a, key, cert)  # a fresh quote lifts it at once
                assert not verdict["quarantined"]
                assert await cloud.store.quarantines([node_id]) == {}
        audit = await cloud.store.list_audit(target=f"node:{node_id}", limit=10)
        assert [(e.action, e.actor, e.detail.get("reason")) for e in reversed(audit)
                if "quarantine" in e.action][:2] == [
            ("node.quarantine", "attestation", overdue), ("node.unquarantine", "attestation", None)]
