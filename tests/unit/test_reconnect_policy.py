"""Every reconnecting source and sink paces its retries with the shared `common.backoff` policy.

Each test builds the component from its config, checks that its `Retry` has the config's fields
as the ceiling's base and cap, then injects a `Retry` with the same `Backoff` and a scripted
random source: 0 (no wait) for the first few delays, then 1 (the full ceiling). The configured
ceilings are a minute long, so the component fails exactly once more than the zero delays allow
and then waits: it sleeps the policy's delays, not delays of its own. Nothing listens on the
ports used, so every attempt fails at once. The sources also stop when told to just as an attempt
fails (Python 3.11's ``asyncio.wait_for`` swallows that stop; `sources.cancel`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from edgewise.common.backoff import Backoff, Retry
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import RunContext, Source, SourceOutput
from edgewise.pipeline.sinks.mqtt import MqttConfig as MqttSinkConfig
from edgewise.pipeline.sinks.mqtt import MqttSink
from edgewise.pipeline.sinks.webhook import WebhookConfig, WebhookSink
from edgewise.pipeline.sources.modbus import ModbusConfig, ModbusSource
from edgewise.pipeline.sources.mqtt import MqttConfig as MqttSourceConfig
from edgewise.pipeline.sources.mqtt import MqttSource
from edgewise.pipeline.sources.opcua import OpcUaConfig, OpcUaSource

MINUTE = 60.0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FREE = 3  # delays of 0 before the scripted random source asks for the full ceiling


class Rng:
    """Says 0 (no wait) ``free`` times, then 1 (the full ceiling); counts the calls."""

    def __init__(self, free: int = FREE) -> None:
        self.free = free
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return 0.0 if self.calls <= self.free else 1.0


def inject(component: Any, base: float, cap: float, free: int = FREE) -> Rng:
    """Check the component's policy is built from its config; replace it by a scripted one."""
    assert isinstance(component.retry, Retry)
    assert component.retry.backoff == Backoff(base, cap)
    rng = Rng(free)
    component.retry = Retry(component.retry.backoff, component.retry.reset_after, rng=rng)
    return rng


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def ctx(tmp_path: Path) -> RunContext:
    return RunContext("policy", tmp_path)


async def fails_with_policy(source: Source, rng: Rng) -> None:
    """Run ``source`` against a closed port: FREE failures without a wait, one more, then the
    policy's full (one minute) ceiling, during which it is stopped (a stop during an attempt:
    `stops_as_an_attempt_fails`)."""

    async def emit(batch: Batch, position: Any) -> None:
        raise AssertionError("nothing can be received from a closed port")

    out = SourceOutput(emit, lambda dead: None, source.id)
    task = asyncio.create_task(source.run(out))
    try:
        await wait_for(lambda: rng.calls > rng.free or task.done(), "connection failures")
        await asyncio.sleep(0.3)  # now it waits a minute: no further attempt
        assert not task.done(), task.exception()
    finally:
        task.cancel()
        await asyncio.wait([task])
    stats = source.stats()
    assert (stats["connect_failures"], rng.calls) == (rng.free + 1, rng.free + 1)
    assert source.retry.attempts == rng.free + 1  # type: ignore[attr-defined]


async def test_modbus_source_reconnects_with_the_shared_policy(tmp_path: Path) -> None:
    cfg = ModbusConfig.model_validate({
        "host": "127.0.0.1", "port": closed_port(), "timeout": 0.5,
        "reconnect_min": MINUTE, "reconnect_max": 2 * MINUTE,
        "registers": [{"name": "t", "address": 0}],
    })
    src = ModbusSource("plc", cfg, ctx(tmp_path))
    rng = inject(src, MINUTE, 2 * MINUTE)
    await fails_with_policy(src, rng)


async def test_opcua_source_reconnects_with_the_shared_policy(tmp_path: Path) -> None:
    cfg = OpcUaConfig.model_validate({
        "endpoint": f"opc.tcp://127.0.0.1:{closed_port()}", "timeout": 0.5,
        "reconnect_min": MINUTE, "reconnect_max": 2 * MINUTE,
        "nodes": [{"node_id": "ns=2;i=2", "sensor": "t"}],
    })
    src = OpcUaSource("ua", cfg, ctx(tmp_path))
    rng = inject(src, MINUTE, 2 * MINUTE)
    await fails_with_policy(src, rng)


async def test_mqtt_source_reconnects_with_the_shared_policy(tmp_path: Path) -> None:
    cfg = MqttSourceConfig.model_validate({
        "topics": ["t/#"], "port": closed_port(),
        "reconnect_min": MINUTE, "reconnect_max": 2 * MINUTE,
    })
    src = MqttSource("broker", cfg, ctx(tmp_path))
    rng = inject(src, MINUTE, 2 * MINUTE)
    await fails_with_policy(src, rng)


async def test_mqtt_sink_reconnects_with_the_shared_policy(tmp_path: Path) -> None:
    cfg = MqttSinkConfig.model_validate({
        "topic": "t/{sensor}", "port": closed_port(), "connect_timeout": 0.5,
        "reconnect_min": MINUTE, "reconnect_max": 2 * MINUTE,
    })
    sink = MqttSink("local", cfg, ctx(tmp_path))
    rng = inject(sink, MINUTE, 2 * MINUTE)
    await sink.start()  # the broker is down: a warning, and reconnects in the background
    try:
        await wait_for(lambda: rng.calls > rng.free, "connection failures")
        await asyncio.sleep(0.3)  # now it waits a minute: no further attempt
    finally:
        await sink.stop()
    assert (sink.errors, rng.calls, sink.retry.attempts) == (FREE + 1, FREE + 1, FREE + 1)


async def stops_as_an_attempt_fails(source: Source, refuse: Callable[[asyncio.Task[None]], Any],
                                    ) -> None:
    """Run ``source`` whose first connect attempt is refused just as the source is told to stop
    (``refuse(task)`` installs that); it must end cancelled, not wait a minute and retry."""

    async def emit(batch: Batch, position: Any) -> None:
        raise AssertionError("nothing can be received")

    rng = inject(source, MINUTE, 2 * MINUTE, free=0)  # a retry would first wait a minute
    task = asyncio.create_task(source.run(SourceOutput(emit, lambda dead: None, source.id)))
    refuse(task)
    try:
        done, _ = await asyncio.wait([task], timeout=5.0)
        assert task in done, "the source missed its stop and went on reconnecting"
        assert task.cancelled(), task.exception()
    finally:
        task.cancel()
        await asyncio.wait([task])
    assert (rng.calls, source.retry.attempts) == (0, 0)  # type: ignore[attr-defined]


async def test_modbus_source_stops_when_told_to_as_a_connect_attempt_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ModbusConfig.model_validate({
        "host": "127.0.0.1", "port": closed_port(), "timeout": 0.5,
        "reconnect_min": MINUTE, "reconnect_max": 2 * MINUTE,
        "registers": [{"name": "t", "address": 0}],
    })
    src = ModbusSource("plc", cfg, ctx(tmp_path))
    loop = asyncio.get_running_loop()

    def refuse(task: asyncio.Task[None]) -> None:
        async def create_connection(*args: Any, **kw: Any) -> Any:
            task.cancel()  # the stop arrives while pymodbus's wait_for waits for this attempt
            raise ConnectionRefusedError(111, "Connection refused")

        monkeypatch.setattr(loop, "create_connection", create_connection)

    await stops_as_an_attempt_fails(src, refuse)
    assert src.stats()["connect_failures"] == 0


async def test_opcua_source_stops_when_told_to_as_a_connect_attempt_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncua import Client

    cfg = OpcUaConfig.model_validate({
        "endpoint": f"opc.tcp://127.0.0.1:{closed_port()}", "timeout": 0.5,
        "reconnect_min": MINUTE, "reconnect_max": 2 * MINUTE,
        "nodes": [{"node_id": "ns=2;i=2", "sensor": "t"}],
    })
    src = OpcUaSource("ua", cfg, ctx(tmp_path))

    def refuse(task: asyncio.Task[None]) -> None:
        async def connect(self: Any) -> None:
            task.cancel()  # the stop arrives just as the attempt fails
            raise ConnectionRefusedError(111, "Connection refused")

        monkeypatch.setattr(Client, "connect", connect)

    await stops_as_an_attempt_fails(src, refuse)
    assert src.stats()["connect_failures"] == 0


def test_zero_ceilings_are_refused_in_the_config() -> None:
    """The shared policy needs a positive base; a spec with 0 says so at validation."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="reconnect_min must be more than 0"):
        ModbusConfig.model_validate({"host": "h", "reconnect_min": 0,
                                     "registers": [{"name": "t", "address": 0}]})
    with pytest.raises(ValidationError, match="reconnect_min must be more than 0"):
        OpcUaConfig.model_validate({"endpoint": "opc.tcp://h:4840", "reconnect_min": 0,
                                    "nodes": [{"node_id": "ns=2;i=2", "sensor": "t"}]})
    with pytest.raises(ValidationError, match="reconnect_min must be more than 0"):
        MqttSourceConfig.model_validate({"topics": ["t"], "reconnect_min": 0})
    with pytest.raises(ValidationError, match="backoff must be more than 0"):
        WebhookConfig.model_validate({"url": "http://h/x", "backoff": 0})


# -- the webhook sink: per-request retries, and Retry-After within backoff_max ------------------
class Hook:
    """Answers 503 (with ``retry_after``, if set) ``fail`` times, then 200."""

    def __init__(self, fail: int, retry_after: str | None = None) -> None:
        self.fail = fail
        self.retry_after = retry_after
        self.times: list[float] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.times.append(time.monotonic())
        if len(self.times) <= self.fail:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=503, text="busy", headers=headers)
        return web.Response(text="ok")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Hook], Any]]:
    runners: list[web.AppRunner] = []

    async def start(hook: Hook) -> Hook:
        app = web.Application()
        app.router.add_post("/hook", hook.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        hook.url = f"http://{host}:{port}/hook"
        return hook

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


def one_record() -> Batch:
    return Batch({"sensor": np.array(["s"], dtype=object), "value": np.array([1.0])})


async def deliver(sink: WebhookSink) -> None:
    await sink.start()
    try:
        sink.write(one_record())
        await wait_for(lambda: sink.sent + sink.failed >= 1, "the request to finish")
    finally:
        await sink.stop()


async def test_webhook_sink_retries_with_the_shared_policy(serve: Any, tmp_path: Path) -> None:
    hook = await serve(Hook(fail=2))
    cfg = WebhookConfig.model_validate({"url": hook.url, "retries": 3,
                                        "backoff": MINUTE, "backoff_max": 2 * MINUTE})
    sink = WebhookSink("hook", cfg, ctx(tmp_path))
    rng = inject(sink, MINUTE, 2 * MINUTE)
    await deliver(sink)
    assert (sink.sent, sink.failed, sink.retries, rng.calls) == (1, 0, 2, 2)
    assert sink.retry.attempts == 2  # counted per request: the next one starts from 0
    await deliver(sink)
    assert (sink.sent, sink.retries, rng.calls) == (2, 2, 2)


async def test_webhook_sink_honours_retry_after_within_backoff_max(
    serve: Any, tmp_path: Path
) -> None:
    # the policy says 0 (rng), Retry-After says 0.2 s: the sink waits 0.2 s
    hook = await serve(Hook(fail=1, retry_after="0.2"))
    cfg = WebhookConfig.model_validate({"url": hook.url, "backoff": 0.1, "backoff_max": 1.0})
    sink = WebhookSink("hook", cfg, ctx(tmp_path))
    inject(sink, 0.1, 1.0)
    await deliver(sink)
    assert sink.sent == 1
    assert hook.times[1] - hook.times[0] >= 0.2
    # Retry-After beyond backoff_max: the wait is backoff_max
    hook = await serve(Hook(fail=1, retry_after="3600"))
    cfg = WebhookConfig.model_validate({"url": hook.url, "backoff": 0.05, "backoff_max": 0.1})
    sink = WebhookSink("hook", cfg, ctx(tmp_path))
    inject(sink, 0.05, 0.1)
    await deliver(sink)
    assert sink.sent == 1
    assert 0.1 <= hook.times[1] - hook.times[0] < 5.0
