"""Idle and slow clients against a control plane, run as a process of its own by
tests/e2e/test_connection_limits.py (so the clients' CPU does not share an event loop with the
test's node sessions).

``python slow_clients.py PORT CA_PEM COUNT DEADLINE_S`` opens COUNT connections, the kinds in
turn, each behaving badly in its own way, waits until the server has closed every one of them
(or DEADLINE_S has passed) and prints one JSON object per connection:
``{"kind", "refused", "closed", "elapsed"}``, where ``elapsed`` is seconds from the moment the
server's timeout for that kind started (TCP connect, end of the TLS handshake, end of the last
response) to the moment the client saw the connection closed, and ``refused`` says a TLS
handshake the client did right was cut (the cap; for the TCP kinds only ``elapsed`` tells).
"""

from __future__ import annotations

import asyncio
import json
import resource
import ssl
import sys
import time
from dataclasses import asdict, dataclass

from edgewise.security.tls import client_context

KINDS = (
    "tcp-silent",  # TCP connect, never a byte: the handshake timeout
    "tls-stalled",  # the first 5 bytes of a TLS record, then nothing: the handshake timeout
    "tls-silent",  # a full TLS handshake, then nothing: the read timeout
    "slowloris",  # a request head, one header line every 0.5 s: the read timeout
    "slow-body",  # a whole head, then 10 body bytes every 0.5 s: the read timeout (408)
    "keepalive-idle",  # one request answered, then an idle keep-alive connection: idle timeout
)
CONCURRENT_OPENS = 64


@dataclass
class Result:
    kind: str
    refused: bool = False
    closed: bool = False
    elapsed: float = -1.0


async def _until_closed(reader: asyncio.StreamReader) -> None:
    try:
        while await reader.read(65536):
            pass
    except (ConnectionError, ssl.SSLError, OSError):
        pass


async def _drip(writer: asyncio.StreamWriter, first: bytes, line: bytes) -> None:
    try:
        writer.write(first)
        while not writer.is_closing():
            await asyncio.sleep(0.5)
            writer.write(line)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError, RuntimeError):
        pass


async def _read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.decode("latin-1").split("\r\n"):
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    await reader.readexactly(length)


async def one(kind: str, port: int, ctx: ssl.SSLContext, opens: asyncio.Semaphore) -> Result:
    res = Result(kind)
    writer: asyncio.StreamWriter | None = None
    async with opens:
        t0 = time.monotonic()
        try:
            if kind in ("tcp-silent", "tls-stalled"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if kind == "tls-stalled":
                    writer.write(b"\x16\x03\x01\x02\x00")  # a handshake record of 512 bytes...
            else:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1",
                    ssl_handshake_timeout=30)
                t0 = time.monotonic()  # the server's read timer starts with the session
        except (ConnectionError, ssl.SSLError, OSError):
            res.refused, res.closed, res.elapsed = True, True, time.monotonic() - t0
            return res
    drip = None
    try:
        if kind == "slowloris":
            drip = asyncio.create_task(_drip(
                writer, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: 1\r\n"))
        elif kind == "slow-body":
            drip = asyncio.create_task(_drip(
                writer, b"POST /v1/device/reauth/challenge HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
                b'{"node_id"'))
        elif kind == "keepalive-idle":
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await _read_response(reader)
            t0 = time.monotonic()  # the idle timer starts after the answer
        await _until_closed(reader)
        res.closed, res.elapsed = True, time.monotonic() - t0
    except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
        res.closed, res.elapsed = True, time.monotonic() - t0
    finally:
        if drip is not None:
            drip.cancel()
        writer.close()
    return res


async def main(port: int, ca: str, count: int, deadline: float) -> list[Result]:
    ctx = client_context(ca)
    opens = asyncio.Semaphore(CONCURRENT_OPENS)
    tasks = [asyncio.create_task(one(KINDS[i % len(KINDS)], port, ctx, opens))
             for i in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=deadline)
    out = [t.result() for t in done]
    for t in pending:
        t.cancel()
    out += [Result("unknown")] * len(pending)  # still open at the deadline
    return out


if __name__ == "__main__":
    port_, ca_, count_, deadline_ = sys.argv[1:5]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = int(count_) + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want), hard))
    results = asyncio.run(main(int(port_), ca_, int(count_), float(deadline_)))
    for r in results:
        print(json.dumps(asdict(r)))
