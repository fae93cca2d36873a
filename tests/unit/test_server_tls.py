"""`cloud.server_tls.prepare`: what clients are told to trust for each way of bringing an
organisation's PKI, and what is refused (real TLS: tests/e2e/test_cloud_own_pki.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from edgewise.cloud.server_tls import CLIENT_TRUST, ServerTls, prepare
from edgewise.errors import ConfigError
from edgewise.security.pki import CertificateAuthority, save_key


@pytest.fixture
def files(tmp_path: Path) -> tuple[CertificateAuthority, Path, CertificateAuthority, Path]:
    org = CertificateAuthority.create(tmp_path / "org")
    key, issued = org.issue_server_cert(["localhost"], ["127.0.0.1"])
    save_key(tmp_path / "server.key", key)
    (tmp_path / "leaf.pem").write_bytes(issued.pem)
    (tmp_path / "full.pem").write_bytes(issued.pem + org.cert_pem)
    ours = CertificateAuthority.create(tmp_path / "pki")
    return org, tmp_path, ours, tmp_path / "pki"


def test_what_clients_trust(files: tuple[CertificateAuthority, Path, CertificateAuthority,
                                         Path]) -> None:
    org, d, ours, pki = files
    key = d / "server.key"
    # a chain that ends in its root: the root
    trust = prepare(ServerTls(d / "full.pem", key), ours, pki)
    assert trust == pki / CLIENT_TRUST and trust.read_bytes() == org.cert_pem
    # the leaf alone: refused without --tls-ca, which is then what clients trust
    with pytest.raises(ConfigError, match="does not end in its root CA: give --tls-ca"):
        prepare(ServerTls(d / "leaf.pem", key), ours, pki)
    assert prepare(ServerTls(d / "leaf.pem", key, d / "org" / "ca.pem"), ours,
                   pki).read_bytes() == org.cert_pem
    # back to the control plane's own PKI: its CA, and the old file is gone
    assert prepare(ServerTls(), ours, pki) == pki / "ca.pem"
    assert not (pki / CLIENT_TRUST).exists()
    # a --client-ca that holds the enrolment CA itself is accepted, one that does not is not
    assert prepare(ServerTls(client_ca=pki / "ca.pem"), ours, pki) == pki / "ca.pem"
    with pytest.raises(ConfigError, match="neither in it nor issued by a certificate in it"):
        prepare(ServerTls(client_ca=d / "org" / "ca.pem"), ours, pki)
    with pytest.raises(ConfigError, match="not PEM certificates"):
        prepare(ServerTls(client_ca=key), ours, pki)


def test_a_key_others_can_read_is_warned_about(
        files: tuple[CertificateAuthority, Path, CertificateAuthority, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    _org, d, ours, pki = files
    with caplog.at_level(logging.WARNING, "edgewise.cloud.server_tls"):
        prepare(ServerTls(d / "full.pem", d / "server.key"), ours, pki)
        assert caplog.text == ""
        os.chmod(d / "server.key", 0o644)
        prepare(ServerTls(d / "full.pem", d / "server.key"), ours, pki)
    assert "has mode 644; it should be 0600" in caplog.text
