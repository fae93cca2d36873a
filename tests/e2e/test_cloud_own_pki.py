"""`edgewise cloud serve --tls-cert/--tls-key/--tls-ca/--client-ca`: an organisation's own PKI,
with a real control plane process and real TLS (docs/security.md, "Bringing your own PKI").

* The server presents the organisation's certificate; the enrolment CA still issues node
  certificates; an agent given the organisation's CA as --ca enrols and is authenticated; the
  operator CLI reads cli.json, whose ca is the organisation's CA.
* With --client-ca, node certificates are verified against the organisation's root: the
  enrolment CA is an intermediate it issued; a certificate of another CA for the same node id
  and key is refused in the handshake; a start whose enrolment CA is not under --client-ca
  (or is an intermediate without --client-ca) is refused with one line, exit 2.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import ssl
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr

from edgewise.edge.identity import NodeIdentity
from edgewise.errors import TransportError
from edgewise.security import pki
from edgewise.security.tls import client_context
from edgewise.testbed.system import free_port

CLI = [sys.executable, "-m", "edgewise.cli"]
NOW = datetime.now(UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False)


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool,
          sans: list[x509.GeneralName] | None = None, days: int = 800) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Org"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer.subject if issuer is not None else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - timedelta(hours=1)).not_valid_after(NOW + timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=(1 if issuer is None else 0)
                                              if ca else None), critical=True)
         .add_extension(_usage(ca), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                        critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             issuer_key.public_key()), critical=False))
    if not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                            critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class OrgPki:
    """An organisation's root CA, what it issued, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.root_key = _key()
        self.root = _cert("Example Org Root", self.root_key, None, self.root_key, ca=True,
                          days=3000)
        self.root_pem = directory / "org-root.pem"
        self.root_pem.write_bytes(_pem(self.root))

    def server(self) -> tuple[Path, Path, x509.Certificate]:
        key = _key()
        cert = _cert("cloud.example.org", key, self.root, self.root_key, ca=False,
                     sans=[x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))])
        (self.dir / "server.pem").write_bytes(_pem(cert))
        (self.dir / "server.key").write_bytes(_key_pem(key))
        (self.dir / "server.key").chmod(0o600)
        return self.dir / "server.pem", self.dir / "server.key", cert

    def enrolment_ca(self, pki_dir: Path, trust_domain: str = "edgewise.local") -> None:
        """An intermediate CA for Edgewise, placed as the control plane's enrolment CA."""
        key = _key()
        cert = _cert("Example Org Edgewise CA", key, self.root, self.root_key, ca=True,
                     sans=[x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")])
        pki_dir.mkdir(parents=True, mode=0o700)
        (pki_dir / "ca.pem").write_bytes(_pem(cert))
        pki.save_key(pki_dir / "ca.key", key)


class Serve:
    """``edgewise cloud serve`` with extra flags, stopped by `stop`."""

    def __init__(self, data: Path, *flags: str | Path) -> None:
        self.data, self.port = data, free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*CLI, "cloud", "serve", "--data", str(data), "--port", str(self.port),
             *map(str, flags)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_healthy(self, trust: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.communicate()}")
            try:
                with httpx.Client(verify=client_context(trust), timeout=2) as http:
                    if http.get(f"{self.url}/healthz").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not become healthy")

    def presented(self) -> bytes:
        """The DER of the certificate the server presents (not verified here)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        import socket

        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw, \
                ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    def handshake_failures(self, trust: Path) -> float:
        """``edgewise_connections_closed{reason="handshake"}`` from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        with httpx.Client(verify=client_context(trust), timeout=10) as http:
            text = http.get(f"{self.url}/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name.startswith("edgewise_connections_closed")
                   and s.labels.get("reason") == "handshake")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=30)


def edgewise(*args: str | Path) -> tuple[int, str, str]:
    """The CLI in this process (the server is the real process; this saves a start each):
    exit code, stdout, and stdout with stderr."""
    from click.testing import CliRunner

    from edgewise.cli.main import main

    r = CliRunner().invoke(main, list(map(str, args)), env={"EDGEWISE_CONFIG": None,
                                                            "HOME": "/nonexistent"})
    return r.exit_code, r.stdout, r.output


def enrolment_token(data: Path) -> str:
    code, out, both = edgewise("cloud", "token", "create", "--data", data, "--json")
    assert code == 0, both
    return str(json.loads(out)["token"])


async def enrol(node_dir: Path, url: str, ca: Path, token: str) -> NodeIdentity:
    ident = NodeIdentity(node_dir, url, ca, SecretStr(token))
    ident.prepare()
    await ident.ensure_usable()
    return ident


def test_the_organisations_server_certificate(tmp_path: Path) -> None:
    org = OrgPki(tmp_path / "org")
    cert, key, leaf = org.server()
    data = tmp_path / "cloud"
    server = Serve(data, "--tls-cert", cert, "--tls-key", key, "--tls-ca", org.root_pem)
    try:
        server.wait_healthy(org.root_pem)
        assert server.presented() == leaf.public_bytes(serialization.Encoding.DER)
        assert not (data / "pki" / "server.pem").exists()  # nothing issued for the server
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), \
                httpx.Client(verify=client_context(data / "pki" / "ca.pem"), timeout=5) as h:
            h.get(f"{server.url}/healthz")
        # the operator CLI trusts the organisation's CA through cli.json
        cli = json.loads((data / "cli.json").read_text())
        assert Path(cli["ca"]).read_bytes() == org.root_pem.read_bytes()
        # a node given the organisation's CA enrols; its certificate comes from the enrolment CA
        ident = asyncio.run(enrol(tmp_path / "node", server.url, org.root_pem,
                                  enrolment_token(data)))
        node_cert = x509.load_pem_x509_certificate(ident.cert_path.read_bytes())
        enrolment_ca = pki.CertificateAuthority.load(data / "pki")
        node_cert.verify_directly_issued_by(enrolment_ca.cert)
        answer = asyncio.run(ident.request("GET", "/v1/device/desired"))
        assert isinstance(answer, dict)
        code, out, both = edgewise("node", "list", "--data", data, "--format", "json")
        assert code == 0, both
        assert [n["id"] for n in json.loads(out)["nodes"]] == [ident.node_id]
    finally:
        server.stop()


def test_the_organisations_root_verifies_node_certificates(tmp_path: Path) -> None:
    org = OrgPki(tmp_path / "org")
    data = tmp_path / "cloud"
    org.enrolment_ca(data / "pki")
    server = Serve(data, "--client-ca", org.root_pem)
    try:
        server.wait_healthy(org.root_pem)  # server.pem: leaf + the intermediate
        cli = json.loads((data / "cli.json").read_text())
        assert Path(cli["ca"]).read_bytes() == org.root_pem.read_bytes()
        ident = asyncio.run(enrol(tmp_path / "node", server.url, org.root_pem,
                                  enrolment_token(data)))
        assert isinstance(asyncio.run(ident.request("GET", "/v1/device/desired")), dict)
        # the same node id and key, certified by a CA outside the organisation's root
        stranger = pki.CertificateAuthority.create(tmp_path / "stranger")
        csr = pki.make_csr(pki.load_key(ident.key_path))
        forged = stranger.sign_node_csr(csr, ident.node_id or "")
        ident.cert_path.write_bytes(forged.pem)
        before = server.handshake_failures(org.root_pem)
        # the server closes the connection after the failed handshake: the node sees a
        # disconnect or a reset, never the reason (security.md, "What a refused node sees")
        with pytest.raises(TransportError, match=r"disconnected|reset by peer"):
            asyncio.run(ident.request("GET", "/v1/device/desired"))
        assert before == 0  # the genuine certificate passed
        assert server.handshake_failures(org.root_pem) >= 1  # refused in the handshake (the
        # client library tries a disconnected request once more)
    finally:
        server.stop()
    digest = hashlib.sha256(org.root_pem.read_bytes()).hexdigest()
    assert hashlib.sha256((data / "pki" / "clients-ca.pem").read_bytes()).hexdigest() == digest


def test_a_client_ca_the_enrolment_ca_is_not_under_is_refused(tmp_path: Path) -> None:
    """Refused before the port is bound (in-process: the same command, no server process)."""
    def serve(*flags: str | Path) -> tuple[int, str]:
        code, _out, both = edgewise("cloud", "serve", "--port", "0", *flags)
        return code, both

    org = OrgPki(tmp_path / "org")
    data = tmp_path / "cloud"
    org.enrolment_ca(data / "pki")
    code, out = serve("--data", data)
    assert code == 2, out
    assert "is not self-signed (an intermediate CA): give --client-ca" in out
    other = OrgPki(tmp_path / "other")
    code, out = serve("--data", data, "--client-ca", other.root_pem)
    assert code == 2, out
    assert "is neither in it nor issued by a certificate in it" in out
    code, out = serve("--data", tmp_path / "c2", "--tls-cert", org.root_pem)
    assert code == 2, out
    assert "give --tls-cert and --tls-key together" in out
