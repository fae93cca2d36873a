"""An enrolment or renewal whose answer is lost on the way back, against the real
``edgewise cloud serve``: a TCP proxy forwards the TLS handshake and the request, then resets
the connection as the control plane's answer starts, so the control plane did the work and the
node never heard of it.

* Enrolment (the real ``edgewise agent run``): the agent retries with the same key and token
  and gets the same node (before: the token was used up, the agent exited with 2 and the
  control plane kept an orphan node). The store holds exactly one node for that token.
* Renewal (the node's identity in-process, so the dropped connection is the renewal): the
  retry succeeds, and the certificate the control plane has on record is the one the node
  holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from pydantic import SecretStr

from edgewise.edge.identity import NodeIdentity
from edgewise.errors import TransportError
from edgewise.testbed.system import ControlPlane, System

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CLI = [sys.executable, "-m", "edgewise.cli"]


class AnswerDropper:
    """A TCP proxy to ``127.0.0.1:port`` that loses the answer on the connections numbered in
    ``drop`` (from 1). TLS is opaque to it, so it goes by turns: the client speaks (hello), the
    server answers (its handshake flight), the client speaks again (its Finished and the
    request); the next bytes from the server are the answer, and the proxy resets both sides
    instead of forwarding them. The control plane issues no session tickets, so nothing else
    comes from it in between."""

    def __init__(self, port: int, drop: set[int]) -> None:
        self.target = port
        self.drop = drop
        self.connections = 0
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"https://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> AnswerDropper:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        lose = self.connections in self.drop
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        turns = {"last": "", "asked": False}

        async def up() -> None:
            while data := await reader.read(65536):
                if turns["last"] == "down":
                    turns["asked"] = True  # the client's second turn: the request
                turns["last"] = "up"
                up_writer.write(data)
                await up_writer.drain()
            with contextlib.suppress(OSError):
                up_writer.write_eof()

        async def down() -> None:
            while data := await up_reader.read(65536):
                if lose and turns["asked"]:
                    self.dropped += 1
                    writer.transport.abort()
                    up_writer.transport.abort()
                    return
                turns["last"] = "down"
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()

        try:
            await asyncio.gather(up(), down())
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
            up_writer.transport.abort()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cloud(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ControlPlane]:
    async with System(tmp_path_factory.mktemp("lost")) as system:
        yield await system.start_cloud()


async def _wait(what: str, cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def _read_json(path: Path) -> dict[str, object]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


@pytest.mark.asyncio(loop_scope="module")
async def test_a_lost_enrolment_answer_is_retried_as_the_same_node(
    cloud: ControlPlane, tmp_path: Path,
) -> None:
    token = await cloud.token({"site": "lost-answer"})
    data = tmp_path / "node"
    err_path = tmp_path / "agent.err"
    async with AnswerDropper(cloud.port, drop={1}) as proxy:
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [*CLI, "agent", "run", "--cloud", proxy.url, "--ca", str(cloud.ca), "--data",
                 str(data), "--backoff-base", "0.1", "--backoff-cap", "0.5"],
                env={**os.environ, "EDGEWISE_ENROL_TOKEN": token}, stdout=subprocess.DEVNULL,
                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            def connected() -> bool:
                st = _read_json(data / "status.json")
                link = st.get("link")
                return isinstance(link, dict) and link.get("state") == "connected"

            await _wait("the agent to enrol and connect",
                        lambda: proc.poll() is not None or connected())
            assert proc.poll() is None, err_path.read_text()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proxy.dropped == 1 and proxy.connections >= 3
    log = err_path.read_text()
    assert code == 0, log
    assert "Traceback" not in log and "refused the enrolment token" not in log
    node_id = (data / "identity" / "node_id").read_text().strip()
    operator = cloud.operator()
    nodes = await asyncio.to_thread(operator.list_nodes, "site=lost-answer")
    assert [n.id for n in nodes] == [node_id]  # one node for the token, no orphan
    cert = x509.load_pem_x509_certificate((data / "identity" / "node.pem").read_bytes())
    assert nodes[0].cert_serial == f"{cert.serial_number:x}"  # the one the node holds
    audit = await asyncio.to_thread(operator.audit, target=f"node:{node_id}")
    assert sorted(e.action for e in audit.entries if e.action.startswith("node.enrol")) == [
        "node.enrol", "node.enrol.retry"]


@pytest.mark.asyncio(loop_scope="module")
async def test_a_lost_renewal_answer_is_retried_and_leaves_nothing_behind(
    cloud: ControlPlane, tmp_path: Path,
) -> None:
    token = await cloud.token({"site": "lost-renewal"})
    async with AnswerDropper(cloud.port, drop={2}) as proxy:  # 1 enrols, 2 renews
        ident = NodeIdentity(tmp_path / "node", proxy.url, cloud.ca, SecretStr(token))
        ident.prepare()
        await ident.ensure_usable()
        assert ident.node_id is not None and ident.cert is not None
        enrolled_serial = ident.cert.serial
        with pytest.raises(TransportError):
            await ident.renew()  # the control plane renewed; the node never heard
        assert proxy.dropped == 1
        assert ident.cert.serial == enrolled_serial  # the node still holds its certificate
        await ident.renew()  # the retry, with the certificate the node holds
        assert ident.renewals == 1 and ident.cert.serial != enrolled_serial
        answer = await ident.request("GET", "/v1/device/desired")  # the new one works
        assert answer["version"] == 0
    operator = cloud.operator()
    nodes = await asyncio.to_thread(operator.list_nodes, "site=lost-renewal")
    assert [n.id for n in nodes] == [ident.node_id]
    assert nodes[0].cert_serial == f"{ident.cert.serial:x}"  # on record: the one it holds
    on_disk = x509.load_pem_x509_certificate(ident.cert_path.read_bytes())
    assert on_disk.serial_number == ident.cert.serial
