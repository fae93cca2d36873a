"""The link proxy used for partition tests: forwards, blackholes, resets, shapes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from edgewise.testbed.linkproxy import LinkProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def _roundtrip(port: int, payload: bytes, timeout: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), timeout)
    finally:
        writer.close()


async def test_forwards_both_ways_and_counts_bytes(echo_port: int) -> None:
    async with LinkProxy("127.0.0.1", echo_port) as link:
        assert await _roundtrip(link.port, b"x" * 100_000) == b"x" * 100_000
        assert link.stats.bytes_up == 100_000
        assert link.stats.bytes_down == 100_000
        assert link.stats.connections == 1


async def test_blackhole_holds_data_until_restored(echo_port: int) -> None:
    async with LinkProxy("127.0.0.1", echo_port) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), 2) == b"before"
        link.cut("blackhole")
        writer.write(b"during")
        await writer.drain()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readexactly(6), 0.3)
        # a new connection hangs too
        with pytest.raises(asyncio.TimeoutError):
            await _roundtrip(link.port, b"new", timeout=0.3)
        link.restore()
        assert await asyncio.wait_for(reader.readexactly(6), 2) == b"during"
        writer.close()
        assert await _roundtrip(link.port, b"after") == b"after"


async def test_reset_closes_connections_and_refuses_new_ones(echo_port: int) -> None:
    async with LinkProxy("127.0.0.1", echo_port) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"hi")
        assert await asyncio.wait_for(reader.readexactly(2), 2) == b"hi"
        link.cut("reset")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 2)
        assert link.stats.resets == 1
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(link.port, b"no")
        link.restore()
        assert await _roundtrip(link.port, b"yes") == b"yes"


async def test_rate_limit_slows_a_transfer_to_the_link_capacity(echo_port: int) -> None:
    # 60 kB each way at 100 kB/s per direction cannot take less than ~0.5 s (a lower bound:
    # the shaper must wait; an upper bound would depend on the machine's load)
    async with LinkProxy("127.0.0.1", echo_port, rate=100_000) as link:
        t0 = time.monotonic()
        assert await _roundtrip(link.port, b"y" * 60_000, timeout=10) == b"y" * 60_000
        assert time.monotonic() - t0 >= 0.45


async def test_closing_with_open_connections_logs_no_error(
    echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Leaving the proxy while connections are open (one forwarding, one held by a blackhole)
    ends its handlers without asyncio logging 'Exception in callback' for them."""
    async with LinkProxy("127.0.0.1", echo_port) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"ping"
        link.cut("blackhole")
        _r2, w2 = await asyncio.open_connection("127.0.0.1", link.port)
        await asyncio.sleep(0.05)
    for _ in range(5):
        await asyncio.sleep(0)
    writer.close()
    w2.close()
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelname == "ERROR"]
    assert errors == [], [r.getMessage() for r in errors]


async def test_peer_reset_mid_stream_ends_the_connection_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The target resets the connection while data flows: the proxy closes the client side
    and nothing is logged as an unretrieved task exception."""
    import gc
    import socket
    import struct

    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(resetter, "127.0.0.1", 0)
    try:
        async with LinkProxy("127.0.0.1", server.sockets[0].getsockname()[1]) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            try:
                for _ in range(200):
                    writer.write(b"x" * 65536)
                    await writer.drain()
                    await asyncio.sleep(0.001)
            except ConnectionError:
                pass
            try:  # closed towards us
                assert await asyncio.wait_for(reader.read(), 5) == b""
            except ConnectionError:
                pass
            writer.close()
            await asyncio.sleep(0.3)  # both directions of the proxied connection end
            gc.collect()
    finally:
        server.close()
        await server.wait_closed()
    gc.collect()
    await asyncio.sleep(0)
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelname == "ERROR"]
    assert errors == [], [r.getMessage() for r in errors]


async def test_one_direction_failing_ends_the_other(caplog: pytest.LogCaptureFixture) -> None:
    """The target streams to a client that does not read, then resets; the client's writes
    towards it fail that direction. The other direction, stuck on a peer that does not read,
    ends with it: none of the proxy's tasks outlives its connection, nothing is logged."""
    import gc
    import socket
    import struct

    async def streamer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(100):
            writer.write(b"y" * 65536)
            await asyncio.sleep(0.005)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(streamer, "127.0.0.1", 0)
    try:
        async with LinkProxy("127.0.0.1", server.sockets[0].getsockname()[1]) as link:
            _reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            await asyncio.sleep(1.0)  # the target has streamed and reset; we never read
            with contextlib.suppress(ConnectionError):
                for _ in range(50):  # writing towards the reset target fails that direction
                    writer.write(b"x" * 65536)
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            leftover = [t for t in asyncio.all_tasks()
                        if "LinkProxy" in repr(t.get_coro()) and not t.done()]
            assert leftover == []
            writer.transport.abort()
    finally:
        server.close()
        await server.wait_closed()
    gc.collect()
    await asyncio.sleep(0)
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelname == "ERROR"]
    assert errors == [], [r.getMessage() for r in errors]
