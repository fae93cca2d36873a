"""The webhook sink against a real aiohttp server on 127.0.0.1: exact bodies, retries, drops."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiohttp import web

from conftest import make_spec
from edgewise.errors import SpecError
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.sinks.webhook import WebhookConfig, WebhookSink
from edgewise.sim.signals import factory_line

N = 30_000
START_TS = 1_764_547_200.0
SEED = 7


def expected_alarms(seed: int = SEED, n: int = N) -> list[dict]:
    sig = factory_line(seed)
    s, ticks, v = sig.readings(0, n)
    above = v > 100.0
    ts = np.round(START_TS + ticks / sig.rate_hz, 6)
    return [
        {"sensor": name, "ts": t, "value": val, "limit": 100.0, "kind": "high",
         "severity": "alarm"}
        for name, t, val in zip(
            sig.names[s[above]].tolist(), ts[above].tolist(), v[above].tolist(), strict=True
        )
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """Records every request; answers with the statuses in ``script``, then 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.script: list[int] = []
        self.hang = False
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        if self.hang:
            await self.release.wait()
        status = self.script.pop(0) if self.script else 200
        return web.Response(status=status, text="nope" if status >= 400 else "ok")


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    app = web.Application()
    app.router.add_post("/hook", srv.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    srv.url = f"http://{host}:{port}/hook"
    try:
        yield srv
    finally:
        srv.release.set()
        await runner.cleanup()


def sink_for(url: str, tmp_path: Path, **params: object) -> WebhookSink:
    cfg = WebhookConfig.model_validate({"url": url, **params})
    return WebhookSink("hook", cfg, RunContext("t", tmp_path))


def alarm_batch(values: list[float]) -> Batch:
    now = time.perf_counter()
    return Batch(
        {
            "sensor": np.array([f"s{i}" for i in range(len(values))], dtype=object),
            "value": np.array(values, dtype=np.float64),
            ACCEPTED: np.full(len(values), now),
        }
    )


@pytest.mark.parametrize("batched", [True, False])
async def test_pipeline_posts_exactly_the_alarms(
    server: Server, tmp_path: Path, batched: bool
) -> None:
    expected = expected_alarms()
    assert len(expected) == 31
    spec = make_spec(
        f"""
        sources:
          - {{id: sim, type: simulator, seed: {SEED}, realtime: false, limit: {N},
              start: {START_TS}}}
        stages:
          - {{id: alarms, type: threshold, inputs: [sim], high: 100.0}}
        sinks:
          - id: hook
            type: webhook
            inputs: [alarms]
            url: {server.url}
            bearer_token: s3cret
            headers: {{X-Site: plant-7}}
            batch: {str(batched).lower()}
        """,
        tmp_path,
    )
    summary = await Engine(spec, tmp_path / "data").run()

    received: list[dict] = []
    for headers, body in server.requests:
        assert headers["Authorization"] == "Bearer s3cret"
        assert headers["X-Site"] == "plant-7"
        assert headers["Content-Type"] == "application/json"
        doc = orjson.loads(body)
        if batched:
            assert isinstance(doc, list)
            received.extend(doc)
        else:
            assert isinstance(doc, dict)
            received.append(doc)
    if not batched:
        assert len(server.requests) == len(expected)
    assert sorted(received, key=lambda r: (r["ts"], r["sensor"])) == sorted(
        expected, key=lambda r: (r["ts"], r["sensor"])
    )
    st = summary["sinks"]["hook"]
    assert (st["written"], st["sent"]) == (len(expected), len(expected))
    assert (st["failed"], st["dropped"], st["unsent"], st["retries"], st["queued"]) == (
        0, 0, 0, 0, 0
    )
    assert st["requests"] == len(server.requests)
    assert st["latency"]["count"] == len(expected)
    assert st["handoff_latency"]["count"] == len(expected)
    assert st["handoff_latency"]["p50_ms"] <= st["latency"]["p50_ms"]


async def test_retries_on_5xx_then_delivers_once(server: Server, tmp_path: Path) -> None:
    server.script = [500, 503]
    sink = sink_for(server.url, tmp_path, backoff="10ms", retries=3)
    await sink.start()
    sink.write(alarm_batch([101.5, 102.25, 130.0]))
    await sink.stop()
    bodies = [orjson.loads(body) for _h, body in server.requests]
    records = [{"sensor": "s0", "value": 101.5}, {"sensor": "s1", "value": 102.25},
               {"sensor": "s2", "value": 130.0}]
    assert bodies == [records, records, records]  # two failures, then the one delivery
    st = sink.stats()
    assert (st["sent"], st["requests"], st["retries"], st["failed"], st["unsent"]) == (
        3, 1, 2, 0, 0
    )
    assert st["latency"]["count"] == 3


async def test_gives_up_after_retries_and_does_not_retry_4xx(
    server: Server, tmp_path: Path
) -> None:
    server.script = [500, 500, 500, 400]
    sink = sink_for(server.url, tmp_path, backoff="1ms", retries=2, batch=False)
    await sink.start()
    sink.write(alarm_batch([101.0, 102.0]))
    await sink.stop()
    # record 1: 500, 500, 500 -> failed after 2 retries; record 2: 400 -> failed at once
    assert [orjson.loads(b)["value"] for _h, b in server.requests] == [101.0] * 3 + [102.0]
    st = sink.stats()
    assert (st["sent"], st["failed"], st["retries"], st["requests"]) == (0, 2, 2, 0)


async def test_server_down_drops_oldest_beyond_max_queue(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens
    sink = sink_for(url, tmp_path, max_queue=2, retries=1, backoff="10ms", flush_timeout=5)
    await sink.start()
    for i in range(5):  # written faster than the sender can try: 3 requests dropped at once
        sink.write(alarm_batch([100.0 + i, 200.0 + i]))
    st = sink.stats()
    assert (st["written"], st["dropped"], st["queued"]) == (10, 6, 4)
    t0 = time.monotonic()
    await sink.stop()
    assert time.monotonic() - t0 < 5
    st = sink.stats()
    # the two newest requests were each tried twice (one retry), then given up
    assert (st["sent"], st["failed"], st["dropped"], st["retries"], st["unsent"]) == (
        0, 4, 6, 2, 0
    )
    assert st["queued"] == 0


async def test_stop_does_not_hang_on_a_server_that_never_answers(
    server: Server, tmp_path: Path
) -> None:
    server.hang = True
    sink = sink_for(server.url, tmp_path, timeout=30, flush_timeout="200ms")
    await sink.start()
    sink.write(alarm_batch([101.0]))
    sink.write(alarm_batch([102.0, 103.0]))
    while not server.requests:
        await asyncio.sleep(0.01)
    task = sink._task
    t0 = time.monotonic()
    await sink.stop()
    assert time.monotonic() - t0 < 2
    assert task is not None and task.done()
    st = sink.stats()
    assert (st["sent"], st["failed"], st["unsent"], st["queued"]) == (0, 0, 3, 0)
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ("url: ftp://example/x", "url", "is not an http:// or https:// URL"),
        ("url: 'http://'", "url", "http"),
        ("url: http://h/x, retries: -1", "retries", "greater than or equal to 0"),
        ("url: http://h/x, timeout: 0", "timeout", "more than 0 seconds"),
        ("url: http://h/x, max_queue: 0", "max_queue", "greater than or equal to 1"),
        ("url: http://h/x, bearer_token: t, headers: {Authorization: x}", "",
         "either bearer_token or an Authorization header"),
        ("url: http://h/x, batch: maybe", "batch", "valid boolean"),
    ],
)
def test_config_errors_are_spec_errors(params: str, field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        make_spec(
            f"""
            sources: [{{id: sim, type: simulator, limit: 10}}]
            sinks:
              - {{id: hook, type: webhook, inputs: [sim], {params}}}
            """
        )
    text = str(info.value)
    assert f"spec.sinks.0{'.' + field if field else ''}" in text
    assert message in text
