"""Fuzzing helpers: example budgets, and a real ``edgewise cloud serve`` to fuzz.

Budgets. Every fuzz test takes its number of examples from `examples(default)`: the default
keeps the whole fuzz run near 40 s on the 2-core machine; ``EDGEWISE_FUZZ_EXAMPLES=N``
runs N examples in each fuzz test instead (per operation for the API tests), e.g. 2000 for a
long run before a release. Generation is derandomized (hypothesis ``derandomize=True``; the
schemathesis strategies are driven by hypothesis too), so a run is the same on every machine
and a failure reproduces with the same command; ``database=None`` leaves no example database
in the repository.

The server. `start_cloud` starts ``edgewise cloud serve`` as a child process on a free port (its
own data directory, SQLite, extra flags such as the lifted per-node device rate the API tests
use so fuzzing reaches the handlers instead of 429) and waits for ``/healthz``; `Cloud.enrol`
makes an enrolment token through the operator API and enrols a node over HTTPS with a CSR of a
fresh key, so the device API can be fuzzed with that node's certificate. `Cloud.rss` is the
server's resident memory (psutil), which the API tests compare before and after fuzzing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, Phase, settings

from edgewise.security import pki
from edgewise.security.tls import client_context

ENV = "EDGEWISE_FUZZ_EXAMPLES"
CLI = [sys.executable, "-m", "edgewise.cli"]
REQUEST_TIMEOUT = 60.0  # s per request: generous, the 2-core machine may be busy


def examples(default: int) -> int:
    """The number of examples of one fuzz test: ``$EDGEWISE_FUZZ_EXAMPLES`` or ``default``."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return default
    try:
        n = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{ENV}={raw!r}: give a number of examples") from None
    if n < 1:
        raise pytest.UsageError(f"{ENV}={raw!r}: give at least 1 example")
    return n


def fuzz_settings(default: int, **kw: object) -> settings:
    """Hypothesis settings of a fuzz test: ``examples(default)`` examples, derandomized, no
    example database, no deadline (a loaded machine is slow), no health checks that refuse
    slow or filtered generation."""
    if os.environ.get("EDGEWISE_FUZZ_NO_SHRINK"):  # exploring: report failures unshrunk
        kw.setdefault("phases", [Phase.explicit, Phase.generate])
    return settings(
        max_examples=examples(default), derandomize=True, database=None, deadline=None,
        suppress_health_check=list(HealthCheck), print_blob=True, **kw)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeIdentity:
    id: str
    cert: Path
    key: Path


@dataclass
class Cloud:
    """A running ``edgewise cloud serve`` (see the module docstring)."""

    data: Path
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    admin: str = ""
    nodes: list[NodeIdentity] = field(default_factory=list)

    @property
    def ca(self) -> Path:
        return self.data / "pki" / "ca.pem"

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"cloud serve exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")

    def http(self, node: NodeIdentity | None = None) -> httpx.Client:
        files = (node.cert, node.key) if node else (None, None)
        return httpx.Client(base_url=self.url, verify=client_context(self.ca, *files),
                            timeout=REQUEST_TIMEOUT)

    def operator(self, token: str | None = None) -> httpx.Client:
        client = self.http()
        client.headers["Authorization"] = f"Bearer {token or self.admin}"
        return client

    def enrol(self, name: str) -> NodeIdentity:
        """A new node: enrolment token from the operator API, CSR of a fresh key."""
        with self.operator() as op:
            r = op.post("/v1/tokens/enrolment", json={"labels": {"fuzz": name}})
            assert r.status_code == 201, r.text
            token = r.json()["token"]
        key_path = self.data.parent / f"{name}.key"
        key = pki.generate_key(key_path)
        with self.http() as http:
            r = http.post("/v1/device/enrol",
                          json={"token": token, "csr": pki.make_csr(key).decode()})
        assert r.status_code == 201, r.text
        cert = self.data.parent / f"{name}.pem"
        cert.write_text(r.json()["certificate"])
        node = NodeIdentity(r.json()["node_id"], cert, key_path)
        self.nodes.append(node)
        return node


def start_cloud(tmp: Path, *extra: str, timeout: float = 60.0) -> Cloud:
    port = free_port()
    data = tmp / "cloud"
    log = tmp / "cloud.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*CLI, "cloud", "serve", "--data", str(data), "--port", str(port), *extra],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    cloud = Cloud(data, f"https://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while True:
        cloud.alive()
        if cloud.ca.exists() and (data / "cli.json").exists():
            try:
                with httpx.Client(verify=client_context(cloud.ca), timeout=5) as http:
                    if http.get(f"{cloud.url}/healthz").status_code == 200:
                        break
            except httpx.TransportError:
                pass
        if time.monotonic() > deadline:
            stop_cloud(cloud)
            raise AssertionError(f"cloud serve did not answer in {timeout:.0f} s:\n"
                                 f"{cloud.log_tail()}")
        time.sleep(0.1)
    cloud.admin = json.loads((data / "cli.json").read_text())["token"]
    return cloud


def stop_cloud(cloud: Cloud) -> int | None:
    if cloud.proc.poll() is None:
        os.killpg(cloud.proc.pid, signal.SIGTERM)
        try:
            cloud.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(cloud.proc.pid, signal.SIGKILL)
            cloud.proc.wait(5)
    return cloud.proc.returncode
