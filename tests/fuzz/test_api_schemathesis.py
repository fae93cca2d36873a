"""Schemathesis against a real ``edgewise cloud serve``, from the OpenAPI document it serves.

Every operation of ``/openapi.json`` is fuzzed with schemathesis' strategies, valid requests
(positive) and requests that break the schema (negative), over real TLS: the operator API with a
bearer token drawn per request (admin mostly, also operator, viewer, or none), the device API
with an enrolled node's client certificate (or none). Valid requests name real things half of
the time (the enrolled node, its stream with stored records, a label selector that matches),
so the handlers are reached beyond their 404s. Then a stateful run follows the links
schemathesis infers from the document (list nodes -> get, label, revoke a node).

Every answer must be: below 500; a status the document lists for the operation; JSON
``{"error": ...}`` when it is an error; what the document says it is (schemathesis'
conformance checks); 401 without credentials, 403 for a role below the route's. The server's
resident memory must stay within `RSS_MARGIN` of what it was before fuzzing.

Examples: `conftest.examples` (``EDGEWISE_FUZZ_EXAMPLES``) per operation and mode.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import numpy as np
import pytest
import requests
import schemathesis
from fuzzkit import (
    REQUEST_TIMEOUT,
    Cloud,
    NodeIdentity,
    examples,
    fuzz_settings,
    start_cloud,
    stop_cloud,
)
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from edgewise.cloud import openapi as oa
from edgewise.security.tls import client_context
from edgewise.sync import codec, protocol

pytestmark = pytest.mark.slow

RSS_MARGIN = 150 * 1024 * 1024  # bytes the server may grow by while fuzzed
STREAM = "raw"
LONG = os.environ.get("EDGEWISE_LONG_TESTS") == "1"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]

# the WebSocket is tested below; schemathesis leaves out the document's own path
FUZZED = [r for r in oa.ALL_ROUTES if r.name not in ("device_session", "openapi")]
OPERATOR_ROLES = ("admin", "admin", "admin", "operator", "viewer", None)
RANK = {"viewer": 0, "operator": 1, "admin": 2}


@dataclass
class Target:
    """The fuzzed server with what the requests may name."""

    cloud: Cloud
    schema: Any
    node: NodeIdentity  # its certificate fuzzes the device API; never revoked
    victim: NodeIdentity  # the node that label, revoke and decommission requests may name
    tokens: dict[str, str]  # role -> operator token
    rss_before: int


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """``edgewise cloud serve`` for one test module, with one enrolled node (``nodes[0]``)."""
    tmp = tmp_path_factory.mktemp("fuzz-cloud")
    # fuzzing sends hundreds of device requests a second: lift the per-node rate (429 is
    # tested in tests/integration/test_cloud_hardening.py)
    c = start_cloud(tmp, "--limit", "device_rate=100000", "--limit", "device_burst=100000")
    try:
        c.enrol("fuzz-a")
        yield c
    finally:
        code = stop_cloud(c)
    assert code == 0, c.log_tail()


async def _upload(cloud: Cloud, node: NodeIdentity) -> None:
    """Three chunks of records on ``STREAM`` through a real session, acknowledged."""
    ctx = client_context(cloud.ca, node.cert, node.key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        ws = await http.ws_connect(f"{cloud.url}{protocol.SESSION_PATH}")
        await ws.send_bytes(protocol.encode({"t": "hello", "agent": "fuzz/1", "streams": {},
                                             "applied_version": 0}))
        assert protocol.decode((await ws.receive(timeout=30)).data)["t"] == "welcome"
        for i in range(3):
            n = 50
            cols = {"sensor": np.array([f"s{j % 5}" for j in range(n)], dtype=object),
                    "ts": 1.7e9 + i * n + np.arange(n, dtype=np.float64),
                    "value": np.round(np.linspace(0, 120, n), 2)}
            await ws.send_bytes(protocol.encode({
                "t": "batch", "id": i, "stream": STREAM, "seq": i * n, "count": n,
                "records": n, "compacted": False, "payload": codec.encode(cols)}))
        acked: set[int] = set()
        while len(acked) < 3:
            msg = protocol.decode((await ws.receive(timeout=30)).data)
            assert msg["t"] == "ack", msg
            acked.update(msg["ids"])
        await ws.close()


@pytest.fixture(scope="module")
def target(cloud: Cloud) -> Iterator[Target]:
    node = cloud.nodes[0]
    victim = cloud.enrol("fuzz-victim")
    asyncio.run(_upload(cloud, node))
    tokens = {"admin": cloud.admin}
    with cloud.operator() as op:
        for role in ("operator", "viewer"):
            r = op.post("/v1/tokens/operator", json={"name": f"fuzz-{role}", "role": role})
            assert r.status_code == 201, r.text
            tokens[role] = r.json()["token"]
        r = op.put("/v1/config", json={"node": node.id, "config": {"gain": 1.5},
                                       "setpoints": {"limit": 80}})
        assert r.status_code == 200, r.text
    schema = schemathesis.openapi.from_url(f"{cloud.url}/openapi.json", verify=str(cloud.ca),
                                           timeout=REQUEST_TIMEOUT)
    documented = {(m.upper(), p) for p, item in schema.raw_schema["paths"].items()
                  for m in item}
    # every route fuzzed here is in the document; that the document lists exactly what the
    # server serves (routes other packages register too) is test_operator_api's check
    assert {(r.method, r.path) for r in oa.ALL_ROUTES} <= documented
    yield Target(cloud, schema, node, victim, tokens, cloud.rss())


@pytest.fixture(scope="module")
def sessions() -> Iterator[dict[str, requests.Session]]:
    s = {"plain": requests.Session(), "node": requests.Session()}
    yield s
    for x in s.values():
        x.close()


def _personalize(case: Any, route: oa.Route, t: Target, data: st.DataObject) -> None:
    """Half of the time, name real things (positive cases only)."""
    real = st.booleans()
    node = (t.victim if route.name in ("patch_labels", "revoke_node", "decommission_node")
            else t.node)
    if case.path_parameters and "node_id" in case.path_parameters and data.draw(real):
        case.path_parameters["node_id"] = node.id
    if case.query:
        if "node" in case.query and data.draw(real):
            case.query["node"] = node.id
        if "stream" in case.query and data.draw(real):
            case.query["stream"] = STREAM
        if "selector" in case.query and data.draw(real):
            case.query["selector"] = "fuzz=fuzz-a"
    if isinstance(case.body, dict):
        if "node" in case.body and data.draw(real):
            case.body["node"] = node.id
        if "selector" in case.body and data.draw(real):
            case.body["selector"] = "fuzz=fuzz-a"


def _expect(route: oa.Route, who: str | None, status: int, text: str) -> None:
    """The access rules, whatever the request holds."""
    if route.access in RANK:
        if who is None:
            assert status == 401, (route.name, status, text)
        elif RANK[who] < RANK[route.access] or (
                who == "viewer" and (route.mutating or route.access != "viewer")):
            assert status == 403, (route.name, who, status, text)
    elif route.access == "device" and who is None:
        assert status == 401, (route.name, status, text)


def _fuzz(t: Target, sessions: dict[str, requests.Session], route: oa.Route,
          mode: GenerationMode, data: st.DataObject) -> None:
    op = t.schema[route.path][route.method]
    case = data.draw(op.as_strategy(mode), label="case")
    if mode is GenerationMode.POSITIVE:
        _personalize(case, route, t, data)
    kw: dict[str, Any] = {"verify": str(t.cloud.ca), "timeout": REQUEST_TIMEOUT}
    who: str | None = None
    session = sessions["plain"]
    if route.access in RANK:
        who = data.draw(st.sampled_from(OPERATOR_ROLES), label="token")
        if who is not None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {t.tokens[who]}"}
        elif case.headers:  # schemathesis may add a (made-up) token itself
            case.headers.pop("Authorization", None)
    elif route.access == "device" and data.draw(st.integers(0, 4), label="cert") > 0:
        who = "node"
        session = sessions["node"]
        kw["cert"] = (str(t.node.cert), str(t.node.key))
    response = case.call(session=session, **kw)
    status = response.status_code
    assert status < 500, (case.as_curl_command(), status, response.text[:500])
    if status >= 400:
        content_type = response.headers.get("content-type", [""])[0]
        assert content_type.startswith("application/json"), response.headers
        assert isinstance(json.loads(response.text)["error"], str), response.text[:500]
    _expect(route, who, status, response.text[:300])
    case.validate_response(response, checks=CHECKS, transport_kwargs=kw)


def _modes(route: oa.Route) -> list[GenerationMode]:
    # an operation without parameters or body has nothing to break
    has_input = route.body or route.query or "{" in route.path
    return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if has_input else [
        GenerationMode.POSITIVE]


CASES = [pytest.param(r, m, id=f"{r.method} {r.path} {m.value}")
         for r in FUZZED for m in _modes(r)]


@pytest.mark.parametrize(("route", "mode"), CASES)
def test_operation(target: Target, sessions: dict[str, requests.Session], route: oa.Route,
                   mode: GenerationMode) -> None:
    n = examples(20 if "{" in route.path or route.body or route.query else 3)

    @fuzz_settings(n)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        _fuzz(target, sessions, route, mode, data)

    run()
    target.cloud.alive()


def test_session_endpoint_without_upgrade(target: Target,
                                          sessions: dict[str, requests.Session]) -> None:
    """The WebSocket route answered as plain HTTP: 400 with a certificate, 401 without."""
    kw: dict[str, Any] = {"verify": str(target.cloud.ca), "timeout": REQUEST_TIMEOUT}
    url = f"{target.cloud.url}{protocol.SESSION_PATH}"
    r = sessions["plain"].get(url, **kw)
    assert r.status_code == 401, r.text
    r = sessions["node"].get(url, cert=(str(target.node.cert), str(target.node.key)), **kw)
    assert r.status_code == 400 and "error" in r.json(), r.text


def test_stateful_links(target: Target) -> None:
    """Schemathesis' state machine over the links it infers (list nodes -> get, label, revoke;
    enrol -> the node's routes), as admin. It may revoke or decommission any node but
    ``target.node``."""
    t = target
    base = t.schema.as_state_machine()
    node_kw = {"cert": (str(t.node.cert), str(t.node.key))}

    class Workflow(base):  # type: ignore[misc, valid-type]
        def before_call(self, case: Any) -> None:
            if case.path_parameters.get("node_id") == t.node.id and (
                    "revoke" in case.path or "decommission" in case.path):
                case.path_parameters["node_id"] = t.victim.id
            if not case.path.startswith("/v1/device/"):
                case.headers = {**(case.headers or {}), "Authorization": f"Bearer {t.cloud.admin}"}

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            kw: dict[str, Any] = {"verify": str(t.cloud.ca), "timeout": REQUEST_TIMEOUT}
            if case.path.startswith("/v1/device/") and case.path not in (
                    "/v1/device/enrol", "/v1/device/reauth", "/v1/device/reauth/challenge"):
                kw.update(node_kw)
            return kw

        def validate_response(self, response: Any, case: Any, **kw: Any) -> None:
            assert response.status_code < 500, (case.as_curl_command(), response.status_code,
                                                response.text[:500])
            case.validate_response(response, checks=CHECKS)

    Workflow.run(settings=fuzz_settings(examples(25), stateful_step_count=6))
    t.cloud.alive()


# -- what fuzzing found, kept as explicit cases ------------------------------------------------


@pytest.mark.parametrize(("path", "method", "body"), [
    # timedelta(seconds=6.6e16) overflowed: 500 (OverflowError) before MAX_SECONDS
    ("/v1/tokens/operator", "POST", {"name": "t", "role": "viewer", "ttl_s": 6.6e16}),
    ("/v1/tokens/operator", "POST", {"name": "t", "role": "viewer", "ttl_s": 1e12}),
    ("/v1/config", "PUT", {"node": "NODE", "config": {"a": 1}, "expires_in_s": 1.5e308}),
    ("/v1/config", "PUT", {"node": "NODE", "config": {"a": 1}, "expires_in_s": 1e12}),
])
def test_found_lifetimes_beyond_datetime_are_400(target: Target, path: str, method: str,
                                                 body: dict[str, Any]) -> None:
    body = {k: target.node.id if v == "NODE" else v for k, v in body.items()}
    with target.cloud.operator() as op:
        r = op.request(method, path, json=body)
    assert r.status_code == 400, r.text
    assert "less than or equal to 3162240000" in r.json()["error"], r.text


def test_found_layers_of_an_unknown_node_is_a_documented_404(target: Target) -> None:
    """GET /v1/config/layers?node=<unknown> answered 404, which the document did not list for
    the operation (schemathesis: undocumented status code); the route says not_found now."""
    doc = target.schema.raw_schema["paths"]["/v1/config/layers"]["get"]
    assert "404" in doc["responses"]
    with target.cloud.operator() as op:
        r = op.get("/v1/config/layers", params={"node": "no-such-node"})
    assert r.status_code == 404 and "no-such-node" in r.json()["error"], r.text


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a: " + "{b: " * 3000 + "}" * 3000])
def test_found_deeply_nested_pipeline_yaml_is_400(target: Target, text: str) -> None:
    """parse_pipeline raised RecursionError on YAML nested deeper than the parser's recursion,
    which the operator API answered 500: now the spec loader refuses nesting beyond 64 levels
    (`specfile.marks.check_shape`) and `operator_call` answers any RecursionError 400."""
    with target.cloud.operator() as op:
        r = op.put("/v1/config", json={"node": target.node.id, "pipelines": {"p": text}})
    assert r.status_code == 400, r.text
    assert "nested deeper than 64 levels" in r.json()["error"], r.text


def test_found_a_big_pipeline_does_not_stop_the_event_loop(target: Target) -> None:
    """A 6 MB pipeline within the YAML bounds (99,000 values) takes about 10 s of PyYAML to
    refuse; validated on the event loop it stopped every other request and session meanwhile.
    Now it runs in a worker thread: no /healthz waits for most of the validation (a 2.6 MB one
    here, about 4 s; before, one waited for all of it). Within a second is a timing figure,
    asserted with EDGEWISE_LONG_TESTS=1."""
    text = "a: [" + ",".join(["x" * 60] * 40_000) + "]\n"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        def push() -> httpx.Response:
            with target.cloud.operator() as op:
                return op.put("/v1/config", json={"node": target.node.id,
                                                  "pipelines": {"big": text}})

        began = time.monotonic()
        pushed = pool.submit(push)
        worst = 0.0
        with target.cloud.http() as http:
            time.sleep(0.5)  # the body is on its way and being parsed
            while not pushed.done():
                started = time.monotonic()
                assert http.get("/healthz").status_code == 200
                worst = max(worst, time.monotonic() - started)
                time.sleep(0.1)
        r = pushed.result()
        took = time.monotonic() - began
    assert r.status_code == 400 and "big:1: apiVersion" in r.json()["error"], r.text[:300]
    assert worst < took / 2, f"/healthz took {worst:.2f} s of the push's {took:.2f} s"
    if LONG:
        assert worst < 1.0, f"/healthz took {worst:.2f} s while a pipeline was validated"


def test_server_memory_bounded(target: Target) -> None:
    """After all of the above, the server's RSS is within RSS_MARGIN of where it started."""
    target.cloud.alive()
    grown = target.cloud.rss() - target.rss_before
    assert grown < RSS_MARGIN, f"cloud serve grew by {grown / 2**20:.0f} MiB while fuzzed"
