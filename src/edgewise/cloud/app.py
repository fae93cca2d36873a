"""The control plane's aiohttp application: factory, shared state, lifecycle, serving.

`create_app(config, ca)` builds the application; its state lives under the typed keys below,
which the device API, the sessions and the operator API share:

    STORE        edgewise.cloud.store.Store (opened on startup, closed on cleanup)
    CA           security.pki.CertificateAuthority
    REVOCATIONS  security.tls.RevocationList (loaded from the store on startup)
    SESSIONS     session.SessionRegistry: ``await app[SESSIONS].notify_desired(node_id, v)``
                 after storing desired version v; `revoke_node` below after a revocation
    COMMITTER    ingest.GroupCommitter
    METRICS      metrics.Metrics
    CONFIG       CloudConfig
    OPENAPI      dict of OpenAPI path items served at /openapi.json (add yours)

The operator API plugs in through ``edgewise.cloud.operator_api.setup(app)`` if that module
exists: it adds its routes (and OpenAPI paths) to the app before it starts.

Routes here: ``GET /healthz`` (no auth), ``GET /metrics`` (Prometheus text; no auth, bind the
port to a trusted network or put it behind the operator token if that matters to you),
``GET /openapi.json``, and the device API (`device_api`). There is one port, TLS 1.3 only, with
client certificates optional at the TLS layer and required by each device endpoint.

`serve(config)` runs it until cancelled (the CLI: `edgewise cloud serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgewise import __version__
from edgewise.cloud.ingest import GroupCommitter
from edgewise.cloud.metrics import Metrics
from edgewise.cloud.session import SessionLimits, SessionRegistry
from edgewise.cloud.store import NodeInfo, Store, database_url
from edgewise.errors import ConfigError
from edgewise.security.pki import NODE_CERT_LIFETIME, CertificateAuthority
from edgewise.security.tls import RevocationList, server_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CloudConfig:
    """Settings of one control plane process (the CLI builds it from its flags)."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8443  # 0: pick a free port (tests)
    db: str | None = None  # database URL; SQLite in data_dir when None
    trust_domain: str = "edgewise.local"
    server_names: tuple[str, ...] = ()  # extra DNS names / IPs for the server certificate
    node_cert_lifetime: timedelta = NODE_CERT_LIFETIME
    reauth_grace: timedelta = timedelta(days=7)  # expired certificates re-authenticate within
    nonce_ttl: float = 60.0  # s a re-authentication nonce stays valid
    commit_linger: float = 0.002  # s the group commit waits for more batches
    maintenance_interval: float = 10.0  # s between last-seen flushes / revocation checks
    limits: SessionLimits = field(default_factory=SessionLimits)
    data_out: Any = None  # forward.DataOutConfig: forwarders (MQTT, NATS) and retention

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def db_url(self) -> str:
        return database_url(self.db, self.data_dir)


STORE = web.AppKey("store", Store)
CA = web.AppKey("ca", CertificateAuthority)
REVOCATIONS = web.AppKey("revocations", RevocationList)
SESSIONS = web.AppKey("sessions", SessionRegistry)
COMMITTER = web.AppKey("committer", GroupCommitter)
METRICS = web.AppKey("metrics", Metrics)
CONFIG = web.AppKey("config", CloudConfig)
OPENAPI = web.AppKey("openapi", dict)


async def revoke_node(app: web.Application, node_id: str, *, reason: str, actor: str
                      ) -> NodeInfo:
    """Revoke a node everywhere: in the store (serial and key, audited), in this process's
    revocation list, and its live session (``revoked`` then close). `KeyError` if unknown."""
    node = await app[STORE].revoke_node(node_id, reason=reason, actor=actor)
    app[REVOCATIONS].revoke_serial(node.cert_serial)
    app[REVOCATIONS].revoke_key(node.key_fingerprint)
    await app[SESSIONS].revoke(node_id, f"revoked: {reason}" if reason else "revoked")
    return node


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__,
                              "sessions": len(request.app[SESSIONS])})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response({
        "openapi": "3.1.0",
        "info": {"title": "Edgewise control plane", "version": __version__},
        "paths": dict(sorted(request.app[OPENAPI].items())),
    })


def create_app(config: CloudConfig, ca: CertificateAuthority, *,
               store: Store | None = None) -> web.Application:
    """The application (not started). The store is opened on startup unless given open."""
    from edgewise.cloud import device_api

    app = web.Application(client_max_size=8 * 1024 * 1024)
    metrics_ = Metrics()
    own_store = store is None
    store_ = store or Store(config.db_url)
    revocations = RevocationList()
    committer = GroupCommitter(store_, metrics_, linger=config.commit_linger)
    sessions = SessionRegistry(store_, committer, metrics_, revocations, limits=config.limits,
                               maintenance_interval=config.maintenance_interval)
    app[CONFIG] = config
    app[CA] = ca
    app[METRICS] = metrics_
    app[STORE] = store_
    app[REVOCATIONS] = revocations
    app[COMMITTER] = committer
    app[SESSIONS] = sessions
    app[OPENAPI] = {}
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    device_api.setup(app)
    if importlib.util.find_spec("edgewise.cloud.operator_api") is not None:
        operator_api = importlib.import_module("edgewise.cloud.operator_api")
        setup: Callable[[web.Application], None] | None = getattr(operator_api, "setup", None)
        if setup is not None:
            setup(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if own_store:
            await store_.open()
        try:
            serials, fingerprints = await store_.list_revocations()
            for s in serials:
                revocations.revoke_serial(s)
            for f in fingerprints:
                revocations.revoke_key(f)
            async with committer:
                task = asyncio.create_task(sessions.maintenance(), name="edgewise-maintenance")
                try:
                    yield
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    await sessions.close_all()
        finally:
            if own_store:
                await store_.close()

    async def end_sessions(app: web.Application) -> None:
        # before aiohttp closes the connections: each session says why, and its submitted
        # commits finish and are acknowledged while the socket is still open
        await sessions.close_all()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(end_sessions)
    if config.data_out is not None:
        from edgewise.cloud.forward import setup_data_out

        forwarders = setup_data_out(app, config.data_out)
        committer.after_commit = forwarders.forward_committed
    return app


def tls_context(config: CloudConfig) -> ssl.SSLContext:
    """TLS 1.3, client certificates optional at the TLS layer (enrolment, re-authentication)
    but verified when presented; device endpoints require one."""
    pki = config.pki_dir
    return server_context(pki / "server.pem", pki / "server.key", pki / "ca.pem",
                          require_client_cert=False)


@dataclass
class Running:
    """A started server: its runner and the port it listens on."""

    runner: web.AppRunner
    port: int
    app: web.Application

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start(config: CloudConfig, ca: CertificateAuthority, **kw: Any) -> Running:
    """Start the app on ``config.host:config.port`` with TLS; `Running.stop` to stop."""
    app = create_app(config, ca, **kw)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=tls_context(config),
                       reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: "
                          f"{exc.strerror or exc}") from None
    port = runner.addresses[0][1]  # the port actually bound (port 0 in tests)
    return Running(runner, port, app)
