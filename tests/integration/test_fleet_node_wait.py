"""A virtual node in a session waits until its next step is due or a message arrives, and the
stop signal wakes it (issue 11): with a poll of the stop signal every second the simulator cost
more CPU than the control plane it measured, and a step already due (a wait of 0 s, which
aiohttp takes as no timeout) left the node waiting for the server's next message, so the fleet
sent fewer batches than it claimed. Against a real aiohttp WebSocket server that never sends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp import web
from test_agent_fakecloud import FakeCloud

from edgewise.testbed.fleet import NodeSettings, Recorder, VirtualNode
from edgewise.testbed.fleet.node import Shared


@asynccontextmanager
async def silent_session(tmp_path: Path) -> AsyncIterator[tuple[VirtualNode,
                                                                 aiohttp.ClientWebSocketResponse]]:
    """A virtual node and an open WebSocket to a server that reads and never answers."""
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with FakeCloud(tmp_path) as cloud:  # for its CA: Shared makes a client context
        shared = Shared(NodeSettings(cloud.url, cloud.ca_path, cloud.token()),
                        tmp_path / "sim", Recorder())
        try:
            async with aiohttp.ClientSession() as http, \
                    http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                yield VirtualNode(0, shared), ws
        finally:
            await shared.close()
            await runner.cleanup()


async def test_a_step_already_due_does_not_wait_for_the_next_message(tmp_path: Path) -> None:
    async with silent_session(tmp_path) as (node, ws):
        for wait in (0.0, -0.5):  # due now, or overdue: the node goes on at once
            started = time.monotonic()
            assert await asyncio.wait_for(node._receive_or_wake(ws, wait), 5.0) is None
            assert time.monotonic() - started < 1.0


async def test_the_stop_signal_wakes_a_waiting_node_and_nothing_else_does(tmp_path: Path) -> None:
    async with silent_session(tmp_path) as (node, ws):
        waiting = asyncio.create_task(node._receive_or_wake(ws, 60.0))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # no poll: it waits for what is due (60 s away)
        started = time.monotonic()
        node.wake()
        assert await asyncio.wait_for(waiting, 5.0) is None
        assert time.monotonic() - started < 1.0
        node.wake()  # not waiting: nothing to cut short, and the next wait is whole
        again = asyncio.create_task(node._receive_or_wake(ws, 0.5))
        assert await asyncio.wait_for(again, 5.0) is None
        # a cancellation of its own (the run's end) is not swallowed as a wake
        third = asyncio.create_task(node._receive_or_wake(ws, 60.0))
        await asyncio.sleep(0.1)
        third.cancel()
        try:
            await third
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("a cancellation that was not a wake was swallowed")
