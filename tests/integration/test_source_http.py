"""The HTTP ingest source: a real aiohttp server on a free 127.0.0.1 port, real httpx requests,
the real engine and outbox."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import make_spec
from edgewise.errors import ConfigError, SpecError
from edgewise.outbox import Outbox
from edgewise.pipeline.engine import Engine

pytestmark = pytest.mark.timeout(30)

NDJSON = {"Content-Type": "application/x-ndjson"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


class Running:
    def __init__(self, engine: Engine, task: asyncio.Task[dict[str, Any]], url: str) -> None:
        self.engine = engine
        self.task = task
        self.url = url
        self.summary: dict[str, Any] = {}


async def start(tmp_path: Path, extra: str = "", port: int | None = None) -> Running:
    port = port or free_port()
    spec = make_spec(f"""
        sources:
          - id: web
            type: http
            port: {port}
            {extra}
        sinks:
          - id: raw
            type: outbox
            inputs: [web]
    """, tmp_path)
    engine = Engine(spec, tmp_path / "data")
    task = asyncio.create_task(engine.run())
    await wait_for(lambda: engine.sources["web"].stats()["port"] is not None or task.done(),
                   what="server")
    if task.done():
        await task
    return Running(engine, task, f"http://127.0.0.1:{port}/ingest")


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Running] = []

    async def go(extra: str = "") -> Running:
        r = await start(tmp_path, extra)
        started.append(r)
        return r

    yield go
    for r in started:
        if not r.task.done():
            r.engine.stop()
            r.summary = await r.task


def records(tmp_path: Path) -> list[tuple[str, float, float]]:
    with Outbox(tmp_path / "data" / "outbox.db") as ob:
        cols = ob.read_stream("raw")
    if not cols:
        return []
    return list(zip(cols["sensor"].tolist(), cols["ts"].tolist(), cols["value"].tolist(),
                    strict=True))


def letters(tmp_path: Path) -> list[dict[str, Any]]:
    with Outbox(tmp_path / "data" / "outbox.db") as ob:
        return list(reversed(ob.dead_letters(1000)))


async def stop(r: Running) -> dict[str, Any]:
    r.engine.stop()
    r.summary = await r.task
    return r.summary


# -- tests --------------------------------------------------------------------------------------
async def test_ndjson_and_json_with_rejects(run: Callable[..., Any], tmp_path: Path) -> None:
    r = await run()
    good = [{"sensor": f"line1/temp/{i:03d}", "ts": 1764547200 + i / 50, "value": 60 + i / 4}
            for i in range(200)]
    body = b"\n".join(orjson.dumps(x) for x in good[:100])
    body += b"\n\n" + b'{"sensor": "s", "ts": 1, "value": "warm"}'  # line 102: wrong type
    body += b"\n" + b'{"sensor": "s", "ts": 1, "value": NaN}'  # line 103: not JSON
    body += b"\n" + b'{"sensor": "s", "value": 1.0}'  # line 104: missing ts
    body += b"\n" + b"{broken"  # line 105
    body += b"\n" + orjson.dumps(good[100]) + b"\n"
    async with httpx.AsyncClient() as client:
        resp = await client.post(r.url, content=body, headers=NDJSON)
        assert resp.status_code == 202, resp.text
        reply = resp.json()
        assert reply["accepted"] == 101
        assert reply["rejected"] == 4
        assert reply["errors"][0] == "line 102: field 'value' is 'warm' (str), expected a number"
        assert reply["errors"][1].startswith("line 103: malformed JSON")
        assert reply["errors"][2].startswith("line 104: missing field 'ts'")
        assert reply["errors"][3].startswith("line 105: malformed JSON")

        # a JSON array, one bad record in it
        arr = [*good[101:150], {"sensor": "x", "ts": 2, "value": None}, *good[150:]]
        resp = await client.post(r.url, content=orjson.dumps(arr),
                                 headers={"Content-Type": "application/json"})
        assert resp.status_code == 202
        assert resp.json() == {"accepted": 99, "rejected": 1,
                               "errors": ["record 50: field 'value' is None (NoneType), "
                                          "expected a number"]}
        # one object, no content type at all
        resp = await client.post(r.url, content=orjson.dumps(
            {"sensor": "line1/pressure/001", "ts": "2025-12-01T00:00:00Z", "value": 2.5}))
        assert resp.status_code == 202
        assert resp.json() == {"accepted": 1, "rejected": 0}
    summary = await stop(r)
    assert summary["readings_in"] == 201
    stats = summary["sources"]["web"]
    assert (stats["requests"], stats["accepted"], stats["rejected"]) == (3, 201, 5)
    expected = [(g["sensor"], g["ts"], float(g["value"])) for g in good]
    expected.append(("line1/pressure/001", 1764547200.0, 2.5))
    assert records(tmp_path) == expected
    dl = letters(tmp_path)
    assert [d["reason"].split(": ", 1)[1][:20] for d in dl] == [
        "line 102: field 'val", "line 103: malformed ", "line 104: missing fi",
        "line 105: malformed ", "record 50: field 'va"]
    assert all(d["reason"].startswith("POST /ingest from 127.0.0.1: ") for d in dl)
    assert dl[0]["payload"] == b'{"sensor": "s", "ts": 1, "value": "warm"}'
    assert orjson.loads(dl[4]["payload"]) == {"sensor": "x", "ts": 2, "value": None}


async def test_nothing_usable_is_400_and_the_server_keeps_going(
    run: Callable[..., Any], tmp_path: Path
) -> None:
    r = await run()
    async with httpx.AsyncClient() as client:
        resp = await client.post(r.url, content=b"{not json", headers=NDJSON)
        assert resp.status_code == 400
        assert resp.json()["error"] == "no usable readings in the body"
        assert resp.json()["errors"][0].startswith("line 1: malformed JSON")
        resp = await client.post(r.url, content=b'{"a": 1}',
                                 headers={"Content-Type": "application/json"})
        assert resp.status_code == 400
        assert resp.json()["errors"] == [
            "missing fields 'sensor', 'ts', 'value'; a reading needs sensor, ts and value"]
        resp = await client.post(r.url, content=b"   ", headers=NDJSON)
        assert resp.status_code == 400
        assert resp.json() == {"error": "empty body; send readings"}
        resp = await client.post(r.url, content=b"a,b", headers={"Content-Type": "text/csv"})
        assert resp.status_code == 415
        assert "unsupported Content-Type 'text/csv'" in resp.json()["error"]
        resp = await client.get(r.url)
        assert resp.status_code == 405
        resp = await client.post(r.url, content=b'{"sensor": "ok", "ts": 5, "value": 1}',
                                 headers=NDJSON)
        assert resp.status_code == 202
    summary = await stop(r)
    assert summary["readings_in"] == 1
    assert summary["sources"]["web"]["bad_requests"] == 4
    assert records(tmp_path) == [("ok", 5.0, 1.0)]
    assert len(letters(tmp_path)) == 2


async def test_body_over_the_limit_is_413(run: Callable[..., Any], tmp_path: Path) -> None:
    r = await run("max_body_bytes: 1MiB")
    line = orjson.dumps({"sensor": "s", "ts": 1, "value": 1.0})
    big = b"\n".join([line] * (2 * 1024 * 1024 // len(line)))
    async with httpx.AsyncClient() as client:
        resp = await client.post(r.url, content=big, headers=NDJSON)
        assert resp.status_code == 413
        assert "max_body_bytes=1048576" in resp.json()["error"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: cut off while reading
            for k in range(0, len(big), 65536):
                yield big[k : k + 65536]

        resp = await client.post(r.url, content=chunks(), headers=NDJSON)
        assert resp.status_code == 413
        resp = await client.post(r.url, content=line, headers=NDJSON)
        assert resp.status_code == 202
    summary = await stop(r)
    assert summary["readings_in"] == 1
    assert summary["sources"]["web"]["too_large"] == 2


async def test_bearer_token(run: Callable[..., Any], tmp_path: Path) -> None:
    r = await run("token: correct-horse-battery")
    line = orjson.dumps({"sensor": "s", "ts": 1, "value": 1.0})
    async with httpx.AsyncClient() as client:
        resp = await client.post(r.url, content=line, headers=NDJSON)
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        resp = await client.post(
            r.url, content=line, headers={**NDJSON, "Authorization": "Bearer wrong-horse-battery"})
        assert resp.status_code == 401
        resp = await client.post(
            r.url, content=line,
            headers={**NDJSON, "Authorization": "Bearer correct-horse-battery"})
        assert resp.status_code == 202
    summary = await stop(r)
    assert summary["readings_in"] == 1
    assert summary["sources"]["web"]["unauthorized"] == 2


async def test_respond_after_committed(run: Callable[..., Any], tmp_path: Path) -> None:
    """With respond_after: committed, a 202 means the readings are already in the outbox."""
    r = await run("respond_after: committed")
    async with httpx.AsyncClient() as client:

        async def post(k: int) -> int:
            body = b"\n".join(orjson.dumps({"sensor": f"s{k}", "ts": 1 + j, "value": k * 100 + j})
                              for j in range(50))
            resp = await client.post(r.url, content=body, headers=NDJSON)
            assert resp.status_code == 202
            # committed before the reply: visible to another connection to the outbox
            assert sum(1 for rec in records(tmp_path) if rec[0] == f"s{k}") == 50
            return resp.json()["accepted"]

        accepted = await asyncio.gather(*(post(k) for k in range(10)))
    assert accepted == [50] * 10
    summary = await stop(r)
    assert summary["readings_in"] == 500
    assert sorted(v for _, _, v in records(tmp_path)) == sorted(
        float(k * 100 + j) for k in range(10) for j in range(50))


async def test_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            await start(tmp_path, port=port)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="must start with '/'"):
        make_spec("""
            sources: [{id: web, type: http, path: ingest}]
        """, tmp_path)
    with pytest.raises(SpecError, match="max_body_bytes"):
        make_spec("""
            sources: [{id: web, type: http, max_body_bytes: lots}]
        """, tmp_path)
