"""A software TPM (swtpm) per test: ``tpm_tcti`` gives a TCTI string for `edgewise.security.tpm`.

Skips with the reason when swtpm or tpm2-pytss is missing (fails instead under
EDGEWISE_REQUIRE_SERVICES=1, as the other services in tests/conftest.py). Each swtpm keeps its
state in the test's own directory and listens on 127.0.0.1 (the TCTI talks to ``port`` and to
the control channel on ``port + 1``).
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import REQUIRE


def need_swtpm() -> None:
    from edgewise.security.tpm import available

    why = available()
    if why is None and shutil.which("swtpm") is None:
        why = "swtpm is not installed (Debian: apt-get install swtpm swtpm-tools)"
    if why is not None:
        if REQUIRE:
            pytest.fail(f"{why} and EDGEWISE_REQUIRE_SERVICES=1")
        pytest.skip(why)


def _free_pair() -> int:
    for _ in range(100):
        port = random.randrange(20000, 32000, 2)  # below Linux's ephemeral ports (32768-)
        socks = []
        try:
            for p in (port, port + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no two free consecutive ports")


def _ready(port: int) -> bool:
    """Both the TPM's port and its control port accept connections (a full run once saw the
    TCTI refused on the TPM's port right after the control port answered)."""
    try:
        for p in (port + 1, port):
            with socket.create_connection(("127.0.0.1", p), timeout=1.0):
                pass
        return True
    except OSError:
        return False


def localca_issuer() -> Path:
    """The CA certificate swtpm_setup's local CA signs EK certificates with (skips without)."""
    conf = Path("/etc/swtpm-localca.conf")
    if shutil.which("swtpm_setup") is None or not conf.exists():
        why = "swtpm_setup or /etc/swtpm-localca.conf is missing (Debian: swtpm-tools)"
        if REQUIRE:
            pytest.fail(f"{why} and EDGEWISE_REQUIRE_SERVICES=1")
        pytest.skip(why)
    for line in conf.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "issuercert":
            return Path(value.strip())
    pytest.fail(f"{conf} names no issuercert")


def manufacture(state: Path) -> None:
    """swtpm_setup: an EK certificate by swtpm's local CA in the TPM's NV, as a maker does."""
    localca_issuer()
    state.mkdir(parents=True, exist_ok=True)
    subprocess.run(["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--create-ek-cert",
                    "--overwrite"], check=True, capture_output=True, timeout=120)


def start_swtpm(state: Path) -> tuple[subprocess.Popen[bytes], str]:
    state.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        port = _free_pair()
        proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
             "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if _ready(port):
                return proc, f"swtpm:host=127.0.0.1,port={port}"
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    raise RuntimeError("swtpm did not start (5 attempts)")


@pytest.fixture
def swtpm_factory(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start a swtpm named ``name`` (its own state dir) and return its TCTI; all stopped after.
    ``ek_cert=True``: manufactured first, with an EK certificate in NV (`manufacture`)."""
    need_swtpm()
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str = "tpm", ek_cert: bool = False) -> str:
        if ek_cert:
            manufacture(tmp_path / f"swtpm-{name}")
        proc, tcti = start_swtpm(tmp_path / f"swtpm-{name}")
        procs.append(proc)
        return tcti

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def tpm_tcti(swtpm_factory: Callable[[str], str]) -> str:
    return swtpm_factory("tpm")
