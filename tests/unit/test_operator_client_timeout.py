"""The operator client waits for a bulk call as long as the call takes (issue 11: the CLI gave
up on a selector ``config set`` after 30 s while the server was still storing versions)."""

from __future__ import annotations

from pathlib import Path

import httpx
from pydantic import SecretStr

from edgewise.cloud import openapi as oa
from edgewise.cloud.client import BULK_READ_TIMEOUT, CliConfig, OperatorClient
from edgewise.security.pki import CertificateAuthority


def test_config_set_waits_for_the_bulk_answer_other_calls_do_not(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "pki", "edgewise.local")
    pem = (tmp_path / "pki" / "ca.pem").read_text()
    seen: dict[str, dict[str, float | None]] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen[request.method] = dict(request.extensions["timeout"])
        if request.method == "PUT":
            return httpx.Response(200, json={"nodes": []})
        return httpx.Response(200, json={"node": "n1", "desired": None, "reported": None})

    config = CliConfig("https://127.0.0.1:1", SecretStr("ewo_x"), pem, "test", tmp_path / "c")
    with OperatorClient(config, timeout=30.0, transport=httpx.MockTransport(answer)) as client:
        client.set_config(oa.ConfigSetRequest(selector="site=a", config={"rate": 1}))
        client.get_config("n1")
    assert ca is not None and BULK_READ_TIMEOUT == 600.0
    assert seen["PUT"] == {"connect": 30.0, "read": 600.0, "write": 30.0, "pool": 30.0}
    assert seen["GET"] == {"connect": 30.0, "read": 30.0, "write": 30.0, "pool": 30.0}
