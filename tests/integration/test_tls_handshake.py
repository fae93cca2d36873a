"""Mutual TLS over real sockets on 127.0.0.1: who gets in, who is refused, and why.

Every case runs twice against the same `server_context`:

* the production path, ``asyncio.start_server(ssl=ctx)`` (what aiohttp does): the handler is only
  called after a successful handshake; it reads the node id from the verified certificate and
  checks the revocation list, answering one line. A refused handshake never reaches the handler.
  (asyncio closes the socket on a failed handshake without sending the TLS alert, so the client
  sees EOF or a reset, not the reason.)
* a probe server that upgrades a plain connection with ``writer.start_tls(ctx)``, so the test
  sees the server's handshake error and can check it is the expected one.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import types
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgewise.errors import ConfigError
from edgewise.security import pki
from edgewise.security.pki import CertificateAuthority, IdentityError
from edgewise.security.tls import (
    CertificateRevoked,
    RevocationList,
    authenticate_peer,
    client_context,
    peer_node_id,
    server_context,
)

TD = "edgewise.local"
HOST = "127.0.0.1"
TIMEOUT = 5.0


@dataclass(frozen=True)
class Env:
    dir: Path
    ca: CertificateAuthority
    revocations: RevocationList

    def creds(self, name: str | None) -> tuple[Path | None, Path | None]:
        if name is None:
            return None, None
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"

    @property
    def ca_pem(self) -> Path:
        return self.dir / "ca" / "ca.pem"

    @property
    def other_ca_pem(self) -> Path:
        return self.dir / "other-ca" / "ca.pem"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    d = tmp_path_factory.mktemp("tls")
    now = datetime.now(UTC)
    ca = CertificateAuthority.create(d / "ca", TD, now=now - timedelta(days=7))
    other = CertificateAuthority.create(d / "other-ca", TD)
    key, server = ca.issue_server_cert(["plant.example", "localhost"], [HOST])
    pki.save_key(d / "server.key", key)
    pki.write_atomic(d / "server.pem", server.pem)

    def node(name: str, node_id: str, issuer: CertificateAuthority = ca,
             key_from: str | None = None, **kwargs) -> pki.IssuedCert:
        if key_from is None:
            key = pki.generate_key(d / f"{name}.key")
        else:
            key = pki.load_key(d / f"{key_from}.key")
            pki.save_key(d / f"{name}.key", key)
        issued = issuer.sign_node_csr(pki.make_csr(key), node_id, **kwargs)
        pki.write_atomic(d / f"{name}.pem", issued.pem)
        return issued

    node("valid", "pump-01")
    node("valid-2", "pump-02")
    node("other-ca", "pump-01", other)
    node("expired", "pump-01", lifetime=timedelta(hours=1), now=now - timedelta(days=2))
    node("not-yet-valid", "pump-01", now=now + timedelta(days=1))
    revoked = node("revoked", "pump-03")
    node("revoked-key-old", "pump-04")
    node("revoked-key-new", "pump-04", key_from="revoked-key-old")  # renewed, same key
    pki.save_key(d / "server-as-client.key", key)
    pki.write_atomic(d / "server-as-client.pem", server.pem)
    revocations = RevocationList(serials=[revoked.serial])
    revocations.revoke_key(pki.public_key_fingerprint(pki.load_key(d / "revoked-key-old.key")))
    return Env(d, ca, revocations)


@dataclass(frozen=True)
class Case:
    name: str
    cert: str | None  # client credentials (file stem in the env directory), None for none
    reply: str | None = None  # the line the handler answers when the handshake succeeds
    server_error: str | None = None  # "REASON: verify message" the server's handshake raises
    client_error: str | None = None  # the same, raised by the client's handshake
    client: str = "node"  # node | tls12 | trusts-other-ca | wrong-name
    require_client_cert: bool = True


VERIFY_FAILED = "CERTIFICATE_VERIFY_FAILED"
CASES = [
    Case("valid node certificate", "valid", reply="200 pump-01"),
    Case("another valid node", "valid-2", reply="200 pump-02"),
    Case("no client certificate", None,
         server_error="PEER_DID_NOT_RETURN_A_CERTIFICATE: None"),
    Case("certificate from another CA", "other-ca",
         server_error=f"{VERIFY_FAILED}: unable to get local issuer certificate"),
    Case("expired certificate", "expired",
         server_error=f"{VERIFY_FAILED}: certificate has expired"),
    Case("certificate not valid yet", "not-yet-valid",
         server_error=f"{VERIFY_FAILED}: certificate is not yet valid"),
    Case("server certificate used as client certificate", "server-as-client",
         server_error=f"{VERIFY_FAILED}: unsuitable certificate purpose"),
    Case("TLS 1.2-only client", "valid", client="tls12",
         server_error="UNSUPPORTED_PROTOCOL: None"),
    Case("revoked serial", "revoked", reply="403 revoked"),
    Case("renewed certificate of a revoked key", "revoked-key-new", reply="403 revoked"),
    # OpenSSL sends our CA along with the server certificate (built from the verify store), so
    # the node sees a self-signed certificate it does not trust
    Case("node does not trust a server of another CA", "valid", client="trusts-other-ca",
         client_error=f"{VERIFY_FAILED}: self-signed certificate in certificate chain"),
    Case("server name does not match", "valid", client="wrong-name",
         client_error=f"{VERIFY_FAILED}: Hostname mismatch, certificate is not valid for "
                      "'cloud.example'."),
    Case("enrolment endpoint without certificate", None, require_client_cert=False,
         reply="401 the peer presented no client certificate"),
    Case("enrolment endpoint with valid certificate", "valid", require_client_cert=False,
         reply="200 pump-01"),
    Case("enrolment endpoint with expired certificate", "expired", require_client_cert=False,
         server_error=f"{VERIFY_FAILED}: certificate has expired"),
]


def make_client(env: Env, case: Case) -> tuple[ssl.SSLContext, str]:
    cert, key = env.creds(case.cert)
    if case.client == "tls12":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(env.ca_pem)
        ctx.load_cert_chain(cert, key)
        return ctx, HOST
    ca = env.other_ca_pem if case.client == "trusts-other-ca" else env.ca_pem
    name = "cloud.example" if case.client == "wrong-name" else HOST
    return client_context(ca, cert, key), name


def error_text(exc: BaseException) -> str:
    return f"{getattr(exc, 'reason', None)}: {getattr(exc, 'verify_message', None)}"


async def connect(ctx: ssl.SSLContext, server_hostname: str, port: int) -> bytes | BaseException:
    """The line the server answers, or b"" when it closes, or the client's exception."""
    try:
        reader, writer = await asyncio.open_connection(
            HOST, port, ssl=ctx, server_hostname=server_hostname
        )
    except (OSError, ssl.SSLError) as exc:
        return exc
    try:
        line = await reader.readline()
        if line:
            assert await reader.read() == b""  # and then the server closes the session
        return line
    except OSError as exc:
        return exc
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass  # the server may already have reset the connection


@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
async def test_handshake(env: Env, case: Case) -> None:
    sctx = server_context(env.dir / "server.pem", env.dir / "server.key", env.ca_pem,
                          require_client_cert=case.require_client_cert)
    handled: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            node_id = authenticate_peer(ssl_object, TD, env.revocations)
            answer = f"200 {node_id}"
        except CertificateRevoked:
            answer = "403 revoked"
        except IdentityError as exc:
            answer = f"401 {exc}"
        handled.append(answer)
        writer.write(answer.encode() + b"\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    probe_result: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def probe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(sctx)
        except (OSError, ssl.SSLError) as exc:
            probe_result.set_result(error_text(exc))
            writer.transport.abort()
            return
        probe_result.set_result("ok")
        writer.close()

    async with asyncio.timeout(TIMEOUT):
        server = await asyncio.start_server(handle, HOST, 0, ssl=sctx)
        prober = await asyncio.start_server(probe, HOST, 0)
        try:
            ctx, name = make_client(env, case)
            got = await connect(ctx, name, server.sockets[0].getsockname()[1])
            ctx, name = make_client(env, case)
            await connect(ctx, name, prober.sockets[0].getsockname()[1])
            probed = await probe_result
        finally:
            server.close()
            prober.close()
            await server.wait_closed()
            await prober.wait_closed()

    if case.reply is not None:
        assert got == case.reply.encode() + b"\n"
        assert handled == [case.reply]
        assert probed == "ok"
    elif case.client_error is not None:
        assert isinstance(got, ssl.SSLCertVerificationError), got
        assert error_text(got) == case.client_error
        assert handled == []
    else:
        # refused by the server at the handshake: the handler never ran; the client sees the
        # connection end without a reply
        assert handled == []
        assert got == b"" or isinstance(got, ConnectionResetError | ssl.SSLError), got
        assert probed == case.server_error


# --- settings and configuration errors ---------------------------------------------------------


def test_context_settings(env: Env) -> None:
    s = server_context(env.dir / "server.pem", env.dir / "server.key", env.ca_pem)
    assert (s.minimum_version, s.maximum_version) == (ssl.TLSVersion.TLSv1_3,) * 2
    assert s.verify_mode == ssl.CERT_REQUIRED
    assert s.verify_flags & ssl.VERIFY_X509_STRICT
    assert s.num_tickets == 0
    optional = server_context(env.dir / "server.pem", env.dir / "server.key", env.ca_pem,
                              require_client_cert=False)
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    c = client_context(env.ca_pem, env.dir / "valid.pem", env.dir / "valid.key")
    assert (c.minimum_version, c.maximum_version) == (ssl.TLSVersion.TLSv1_3,) * 2
    assert (c.check_hostname, c.verify_mode) == (True, ssl.CERT_REQUIRED)
    # trusts exactly our CA, not the system's store
    assert [x["subject"] for x in c.get_ca_certs()] == [
        ((("organizationName", "Edgewise"),),
         (("commonName", f"Edgewise CA {TD} {pki.public_key_fingerprint(env.ca.cert)[:8]}"),))
    ]


def test_context_configuration_errors(env: Env) -> None:
    d = env.dir
    with pytest.raises(ConfigError, match=r"missing\.pem not found"):
        server_context(d / "missing.pem", d / "server.key", env.ca_pem)
    with pytest.raises(ConfigError, match="do they belong together"):
        server_context(d / "server.pem", d / "valid.key", env.ca_pem)
    with pytest.raises(ConfigError, match=r"CA certificate .*nope\.pem not found"):
        client_context(d / "nope.pem")
    (d / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError, match="cannot load CA certificate"):
        client_context(d / "junk.pem")
    with pytest.raises(ConfigError, match="give both the client certificate and its key"):
        client_context(env.ca_pem, d / "valid.pem")


def test_peer_identity_needs_a_verifying_context(env: Env) -> None:
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert unverified.verify_mode == ssl.CERT_NONE
    fake = types.SimpleNamespace(context=unverified, getpeercert=lambda binary_form=False: b"x")
    with pytest.raises(IdentityError, match="does not verify peer certificates"):
        peer_node_id(fake, TD)
    with pytest.raises(IdentityError, match="not a TLS session"):
        peer_node_id(None, TD)  # type: ignore[arg-type]


def test_revocation_list(env: Env) -> None:
    valid = x509.load_pem_x509_certificate((env.dir / "valid.pem").read_bytes())
    revoked = x509.load_pem_x509_certificate((env.dir / "revoked.pem").read_bytes())
    assert env.revocations.is_revoked(valid) is False
    assert env.revocations.is_revoked(revoked) is True
    assert len(env.revocations) == 2
    assert repr(env.revocations) == "RevocationList(1 serials, 1 keys)"
    rl = RevocationList()
    rl.check(valid)
    rl.revoke_key(pki.public_key_fingerprint(valid).upper())
    with pytest.raises(CertificateRevoked, match=f"serial {valid.serial_number:x}") as info:
        rl.check(valid)
    assert info.value.status == 403


# --- expiry after the handshake ------------------------------------------------------------------


def blocking_client(ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None):
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock, ctx.wrap_socket(
        sock, server_hostname=HOST, session=session
    ) as tls_sock:
        return tls_sock.recv(100), tls_sock.session_reused, tls_sock.session


async def test_no_session_resumption_past_certificate_expiry(env: Env) -> None:
    """A TLS 1.3 resumed session is not re-verified; the server must not resume a node whose
    certificate expired in between (OpenSSL would, with its default two tickets)."""
    now = datetime.now(UTC)
    key = pki.generate_key(env.dir / "short.key")
    issued = env.ca.sign_node_csr(
        pki.make_csr(key), "pump-09", timedelta(hours=1, seconds=2), now=now - timedelta(hours=1)
    )
    pki.write_atomic(env.dir / "short.pem", issued.pem)
    sctx = server_context(env.dir / "server.pem", env.dir / "server.key", env.ca_pem)
    cctx = client_context(env.ca_pem, env.dir / "short.pem", env.dir / "short.key")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        node_id = authenticate_peer(writer.get_extra_info("ssl_object"), TD, env.revocations)
        writer.write(f"200 {node_id}\n".encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async with asyncio.timeout(TIMEOUT + 3):
        server = await asyncio.start_server(handle, HOST, 0, ssl=sctx)
        port = server.sockets[0].getsockname()[1]
        try:
            line, reused, session = await asyncio.to_thread(blocking_client, cctx, port, None)
            assert (line, reused) == (b"200 pump-09\n", False)
            await asyncio.sleep((issued.not_after - datetime.now(UTC)).total_seconds() + 1.1)
            try:
                line, reused, _ = await asyncio.to_thread(blocking_client, cctx, port, session)
                got: object = (line, reused)
            except OSError as exc:
                got = exc
        finally:
            server.close()
            await server.wait_closed()
    # refused at the handshake: the connection ends with no reply, nothing was resumed
    assert got == (b"", False) or isinstance(got, ConnectionResetError | ssl.SSLError), got


def test_authenticate_peer_checks_validity_again(env: Env) -> None:
    """Belt and braces for resumed sessions: the validity period is checked after the
    handshake too, against the certificate the TLS layer verified."""
    der = x509.load_pem_x509_certificate((env.dir / "expired.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    verifying = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    verifying.verify_mode = ssl.CERT_REQUIRED
    session = types.SimpleNamespace(context=verifying, getpeercert=lambda binary_form=False: der)
    with pytest.raises(IdentityError, match="certificate of node pump-01 is not valid at"):
        authenticate_peer(session, TD)
    expired_at = x509.load_der_x509_certificate(der).not_valid_after_utc
    assert authenticate_peer(session, TD, now=expired_at) == "pump-01"
    assert time.time() > expired_at.timestamp()
