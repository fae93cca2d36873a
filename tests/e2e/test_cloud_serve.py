"""`edgewise cloud serve` as a real process: first start, token, enrolment over HTTPS, restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from edgewise.security import pki
from edgewise.security.tls import client_context

CLI = [sys.executable, "-m", "edgewise.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edgewise(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


class Server:
    def __init__(self, data: Path, port: int) -> None:
        self.data, self.port = data, port
        self.url = f"https://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [*CLI, "cloud", "serve", "--data", str(data), "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def wait_healthy(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        ca = self.data / "pki" / "ca.pem"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.communicate()}")
            if ca.exists():
                try:
                    with httpx.Client(verify=client_context(ca), timeout=2) as http:
                        if http.get(f"{self.url}/healthz").status_code == 200:
                            return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise AssertionError("server did not become healthy")

    def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=15)
        return self.proc.returncode, out, err


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "cloud"


def test_serve_enrol_restart(data: Path, tmp_path: Path) -> None:
    port = free_port()
    server = Server(data, port)
    try:
        server.wait_healthy()
        ca = data / "pki" / "ca.pem"
        cli_config = json.loads((data / "cli.json").read_text())
        assert cli_config["url"] == f"https://127.0.0.1:{port}"
        assert cli_config["ca"] == str(ca.resolve())
        assert cli_config["token"].startswith("ewo_")
        assert (data / "cli.json").stat().st_mode & 0o777 == 0o600

        res = edgewise("cloud", "token", "create", "--data", str(data),
                       "--labels", "site=plant1,line=1", "--json")
        assert res.returncode == 0, res.stderr
        token = json.loads(res.stdout)
        assert (token["labels"], token["uses"]) == ({"site": "plant1", "line": "1"}, 1)

        key = pki.generate_key(tmp_path / "node.key")
        body = {"token": token["token"], "csr": pki.make_csr(key).decode()}
        with httpx.Client(verify=client_context(ca), timeout=5) as http:
            r = http.post(f"{server.url}/v1/device/enrol", json=body)
            assert r.status_code == 201, r.text
            node_id = r.json()["node_id"]
            (tmp_path / "node.pem").write_text(r.json()["certificate"])
            again = http.post(f"{server.url}/v1/device/enrol", json=body)
            assert again.status_code == 401
        node_ctx = client_context(ca, tmp_path / "node.pem", tmp_path / "node.key")
        with httpx.Client(verify=node_ctx, timeout=5) as http:
            r = http.get(f"{server.url}/v1/device/desired")
            assert (r.status_code, r.json()) == (200, {"version": 0, "desired": None})
    finally:
        code, out, err = server.stop()
    assert code == 0, err
    assert f"admin token (shown once): {cli_config['token']}" in out
    assert "created CA for trust domain edgewise.local" in err
    assert f"control plane listening on https://127.0.0.1:{port}" in err

    # restart on another port: same CA and store, no new admin token, the node still gets in
    port2 = free_port()
    server = Server(data, port2)
    try:
        server.wait_healthy()
        assert json.loads((data / "cli.json").read_text()) == cli_config | {
            "url": f"https://127.0.0.1:{port2}"}
        with httpx.Client(verify=node_ctx, timeout=5) as http:
            assert http.get(f"{server.url}/v1/device/desired").status_code == 200
        with httpx.Client(verify=client_context(ca), timeout=5) as http:
            assert http.get(f"{server.url}/v1/device/desired").status_code == 401
            metrics = http.get(f"{server.url}/metrics").text
        assert "edgewise_sessions 0.0" in metrics
    finally:
        code, out, err = server.stop()
    assert code == 0, err
    assert "admin token" not in out
    assert "created" not in err
    assert node_id.startswith("node-")


def test_user_errors_are_one_line(data: Path) -> None:
    res = edgewise("cloud", "serve", "--data", str(data), "--db", "mysql://h/d")
    assert res.returncode == 2
    assert "error: --db: unsupported database 'mysql'" in res.stderr
    assert "Traceback" not in res.stderr
    res = edgewise("cloud", "token", "create", "--data", str(data))
    assert res.returncode == 2
    assert "no control plane store in" in res.stderr
    res = edgewise("cloud", "token", "create", "--data", str(data), "--ttl", "soon")
    assert res.returncode == 2
    assert "--ttl 'soon': use a positive duration" in res.stderr
    res = edgewise("cloud", "token", "create", "--data", str(data), "--labels", "Bad Key=1")
    assert res.returncode == 2
    assert "invalid label key 'Bad Key'" in res.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        res = edgewise("cloud", "serve", "--data", str(data), "--port",
                       str(busy.getsockname()[1]))
    finally:
        busy.close()
    assert res.returncode == 2, res.stderr
    assert "cannot listen on 127.0.0.1:" in res.stderr
    assert "Traceback" not in res.stderr
    assert os.path.exists(data / "pki" / "ca.pem")
