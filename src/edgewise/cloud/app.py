"""The control plane's aiohttp application: factory, lifecycle, serving.

`create_app(config, ca)` builds the application: it fills the shared state (`state`: the store,
CA, revocation list, sessions, group commit, metrics, OpenAPI paths; `config.CONFIG`) and plugs
in the device API (`device_api.setup`), the operator API (`operator_api.setup`), the release
routes (`releases.api.setup`: publishing, and TUF metadata and files for the nodes; the
lifecycle re-signs TUF metadata before it expires) and, when
``config.data_out`` is set, data out (`dataout.setup.setup_data_out`). This module imports the
APIs; they import `state` and `config`, never this module.

Routes here: ``GET /healthz`` (no auth), ``GET /readyz`` (`health`: store reachable and
migrated; no auth), ``GET /metrics`` (Prometheus text; no auth, bind the
port to a trusted network or put it behind the operator token if that matters to you),
``GET /openapi.json``; the operator console under ``/console`` (`console.setup`). There is
one port, TLS 1.3 only, with client certificates optional at the TLS layer and required by
each device endpoint. Every error answer is JSON
(`http_errors.json_errors`, the outermost middleware).

`start(config, ca)` runs it (the CLI: `edgewise cloud serve`) behind `listener.GatedSite`
(handshake and read timeouts, the cap on unauthenticated connections) with aiohttp's
``keepalive_timeout`` as the idle timeout (``config.server``); `Running.stop` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edgewise import __version__
from edgewise.cloud import console, device_api, health, operator_api, server_tls
from edgewise.cloud import openapi as oa
from edgewise.cloud.attestation import api as attestation_api
from edgewise.cloud.config import CONFIG, CloudConfig
from edgewise.cloud.dataout.setup import setup_data_out
from edgewise.cloud.fleet_metrics import FLEET_GAUGES, FleetGauges
from edgewise.cloud.http_errors import json_errors
from edgewise.cloud.ingest import GroupCommitter
from edgewise.cloud.listener import Gate, GatedSite, track_requests
from edgewise.cloud.metrics import Metrics
from edgewise.cloud.node_writes import NodeWrites
from edgewise.cloud.pipelines import api as pipelines_api
from edgewise.cloud.pokes import PokeFanout
from edgewise.cloud.releases import api as releases_api
from edgewise.cloud.releases.service import ReleaseService
from edgewise.cloud.replicas import Handlers, ReplicaBus
from edgewise.cloud.rollouts import api as rollouts_api
from edgewise.cloud.session_admission import StartAdmission
from edgewise.cloud.sessions import SessionRegistry
from edgewise.cloud.state import (
    BUS,
    CA,
    COMMITTER,
    METRICS,
    OPENAPI,
    POKES,
    REVOCATIONS,
    SESSIONS,
    STORE,
)
from edgewise.cloud.store import Store
from edgewise.errors import ConfigError
from edgewise.security.pki import CertificateAuthority
from edgewise.security.tls import RevocationList

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__,
                              "sessions": len(request.app[SESSIONS]),
                              "process": request.app[CONFIG].process})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(oa.document(request.app[OPENAPI], __version__))


LINGERING_TIME = 2.0  # s aiohttp keeps reading (and dropping) a body it did not need


class GateMetrics(Collector):
    """The listener's counters (`listener.Gate`) as Prometheus metrics, read at scrape time."""

    def __init__(self) -> None:
        self.gate: Gate | None = None

    def collect(self) -> Any:
        g = self.gate
        if g is None:
            return
        gauge = GaugeMetricFamily("edgewise_unauthenticated_connections",
                                  "Connections in the TLS handshake or without a client "
                                  "certificate (capped)")
        gauge.add_metric([], g.unauthenticated)
        yield gauge
        closed = CounterMetricFamily("edgewise_connections_closed",
                                     "Connections the server closed early, by reason",
                                     labels=["reason"])
        closed.add_metric(["cap"], g.refused)
        closed.add_metric(["handshake"], g.handshake_failures)
        closed.add_metric(["read_timeout"], g.read_timeouts)
        closed.add_metric(["queue_wait"], g.expired)
        yield closed
        queued = CounterMetricFamily("edgewise_handshakes_queued",
                                     "Connections that waited for a handshake token "
                                     "(admission control)")
        queued.add_metric([], g.queued)
        yield queued


class WriteMetrics(Collector):
    """The counters of the poke fan-out and the node status/report group writes."""

    def __init__(self, pokes: PokeFanout, node_writes: NodeWrites) -> None:
        self.pokes = pokes
        self.node_writes = node_writes

    def collect(self) -> Any:
        p, w = self.pokes, self.node_writes
        pokes = CounterMetricFamily("edgewise_pokes", "Desired-state pokes, by outcome",
                                    labels=["outcome"])
        pokes.add_metric(["sent"], p.sent)
        pokes.add_metric(["coalesced"], p.coalesced)
        pokes.add_metric(["dropped"], p.dropped)
        yield pokes
        yield CounterMetricFamily("edgewise_pokes_inline", "Pokes sent with the desired state "
                                  "in them (no fetch needed)", value=p.inlined)
        writes = CounterMetricFamily("edgewise_node_writes",
                                     "Group writes of node status and reports, by outcome",
                                     labels=["outcome"])
        writes.add_metric(["written"], w.writes)
        writes.add_metric(["failed"], w.failures)
        writes.add_metric(["dropped"], w.dropped)
        yield writes
        pending = GaugeMetricFamily("edgewise_pending_writes",
                                    "Nodes waiting for a poke or a status/report write",
                                    labels=["kind"])
        pending.add_metric(["pokes"], len(p))
        pending.add_metric(["node_writes"], len(w))
        yield pending


class AdmissionMetrics(Collector):
    """The session upgrades starting and in line (`session_admission.StartAdmission`)."""

    def __init__(self, admission: StartAdmission) -> None:
        self.admission = admission

    def collect(self) -> Any:
        a = self.admission
        yield GaugeMetricFamily("edgewise_sessions_starting", "Session upgrades whose hello is "
                                "not answered yet (bounded; beyond, they wait in line)",
                                value=a.starting)
        yield GaugeMetricFamily("edgewise_sessions_waiting", "Session upgrades in line for a "
                                "start slot", value=a.waiting)
        yield CounterMetricFamily("edgewise_sessions_admitted_after_wait", "Session upgrades "
                                  "admitted after waiting in line", value=a.waited)


GATE_METRICS = web.AppKey("gate_metrics", GateMetrics)


class BusMetrics(Collector):
    """The replica bus's counters (`replicas.ReplicaBus`, PostgreSQL only)."""

    def __init__(self, bus: ReplicaBus, sessions: SessionRegistry, pokes: PokeFanout) -> None:
        self.bus, self.sessions, self.pokes = bus, sessions, pokes

    def collect(self) -> Any:
        b = self.bus
        notes = CounterMetricFamily("edgewise_replica_notifications", "Notifications between "
                                    "the control-plane processes of the database, by outcome",
                                    labels=["outcome"])
        for outcome, value in (("sent", b.sent), ("received", b.received),
                               ("malformed", b.malformed), ("dropped", b.dropped),
                               ("lost", b.lost)):
            notes.add_metric([outcome], value)
        yield notes
        yield CounterMetricFamily("edgewise_pokes_forwarded", "Pokes handed to the other "
                                  "processes (their nodes were not connected here)",
                                  value=self.pokes.forwarded)
        yield CounterMetricFamily("edgewise_sessions_replaced_elsewhere", "Sessions closed "
                                  "because their node opened a newer one at another process",
                                  value=self.sessions.replaced_elsewhere)


def replica_bus(store: Store, sessions: SessionRegistry, pokes: PokeFanout,
                revocations: RevocationList) -> ReplicaBus:
    """The bus of this process, wired: pokes for nodes not connected here go out on it,
    sessions opened here are announced on it, and what the other processes say is done here
    (`replicas`)."""
    handlers = Handlers()
    bus = ReplicaBus(store.url, handlers)
    pokes.forward = bus.poke
    sessions.on_open = bus.opened

    async def poke_here(versions: dict[str, int], jitter: float) -> None:
        here = {n: v for n, v in versions.items() if sessions.get(n) is not None}
        if here:
            states = await store.desired_states(here)
            pokes.poke(here, jitter, states, forward=False)

    async def revoke_here(msg: dict[str, Any]) -> None:
        revocations.revoke_serial(msg["serial"])
        revocations.revoke_key(msg["fp"])
        await sessions.revoke(msg["n"], msg["reason"], decommissioned=msg["d"], wipe=msg["w"])

    handlers.poke = poke_here
    handlers.opened = sessions.opened_elsewhere
    handlers.revoke = revoke_here
    handlers.quarantine = sessions.set_quarantined
    return bus


def create_app(config: CloudConfig, ca: CertificateAuthority, *,
               store: Store | None = None) -> web.Application:
    """The application (not started). The store is opened on startup unless given open."""
    app = web.Application(client_max_size=8 * 1024 * 1024,
                          middlewares=[track_requests, json_errors])
    metrics_ = Metrics()
    app[GATE_METRICS] = GateMetrics()
    metrics_.registry.register(app[GATE_METRICS])
    own_store = store is None
    store_ = store or Store(config.db_url, wait=config.server.store_wait)
    revocations = RevocationList()
    committer = GroupCommitter(store_, metrics_, linger=config.commit_linger)
    sessions = SessionRegistry(store_, committer, metrics_, revocations, limits=config.limits,
                               maintenance_interval=config.maintenance_interval,
                               node_write_interval=config.node_write_interval)
    app[CONFIG] = config
    app[CA] = ca
    app[METRICS] = metrics_
    app[STORE] = store_
    app[REVOCATIONS] = revocations
    app[COMMITTER] = committer
    app[SESSIONS] = sessions
    pokes = PokeFanout(sessions.get)
    app[POKES] = pokes
    metrics_.registry.register(WriteMetrics(pokes, sessions.node_writes))
    metrics_.registry.register(AdmissionMetrics(sessions.admission))
    bus = None
    if store_.shared:  # other processes may use the database too
        bus = replica_bus(store_, sessions, pokes, revocations)
        metrics_.registry.register(BusMetrics(bus, sessions, pokes))
    app[BUS] = bus
    app[OPENAPI] = {}
    app.router.add_get("/healthz", healthz)
    health.setup(app)  # /readyz: store reachable, schema migrated
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    device_api.setup(app)
    attestation_api.setup(app)  # TPM enrolment and attestation routes
    operator_api.setup(app)
    release_service = ReleaseService(store_, config.data_dir)
    releases_api.setup(app, release_service)
    pipelines_api.setup(app)  # /v1/cloud/pipelines; the worker starts in lifecycle
    console.setup(app)  # /console: the operator console in a browser (docs/console.md)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if own_store:
            await store_.open()
        try:
            serials, fingerprints = await store_.list_revocations()
            for s in serials:
                revocations.revoke_serial(s)
            for f in fingerprints:
                revocations.revoke_key(f)
            async with committer, sessions.node_writes:
                task = asyncio.create_task(sessions.maintenance(), name="edgewise-maintenance")
                resign = asyncio.create_task(release_service.maintain(),
                                             name="edgewise-tuf-resign")
                fanout = asyncio.create_task(pokes.run(), name="edgewise-pokes")
                tasks = [task, resign, fanout]
                if bus is not None:
                    tasks.append(asyncio.create_task(bus.run(), name="edgewise-replica-bus"))
                await pipelines_api.start_worker(app, store_.url, config.data_dir, committer,
                                                 config.server.pipeline_lease,
                                                 process=config.process)
                try:
                    yield
                finally:
                    await pipelines_api.stop_worker(app)  # ships, releases its leases
                    for t in tasks:
                        t.cancel()
                    for t in tasks:
                        with contextlib.suppress(asyncio.CancelledError):
                            await t
                    await sessions.close_all()
        finally:
            if own_store:
                await store_.close()

    async def end_sessions(app: web.Application) -> None:
        # before aiohttp closes the connections: each session says why, and its submitted
        # commits finish and are acknowledged while the socket is still open
        await sessions.close_all()

    app.cleanup_ctx.append(lifecycle)
    fleet_gauges = app[FLEET_GAUGES] = FleetGauges(store_)  # after lifecycle: the store is open
    metrics_.registry.register(fleet_gauges)
    app.cleanup_ctx.append(fleet_gauges.context)
    app.on_shutdown.append(end_sessions)
    rollouts_api.setup(app)  # routes, and the driver while the store is open
    if config.data_out is not None:
        forwarders = setup_data_out(app, config.data_out)
        committer.after_commit = forwarders.forward_committed
    return app


def tls_context(config: CloudConfig) -> ssl.SSLContext:
    """TLS 1.3, client certificates optional at the TLS layer (enrolment, re-authentication)
    but verified when presented; device endpoints require one (`server_tls.tls_context`:
    the control plane's own PKI, or the organisation's)."""
    return server_tls.tls_context(config.pki_dir, config.tls)


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


async def start(config: CloudConfig, ca: CertificateAuthority, *,
                store: Store | None = None) -> Running:
    """Start the app on ``config.host:config.port`` with TLS; `Running.stop` to stop."""
    app = create_app(config, ca, store=store)
    limits = config.server
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0,
                           keepalive_timeout=limits.idle_timeout,
                           lingering_time=min(LINGERING_TIME, limits.read_timeout))
    await runner.setup()
    site = GatedSite(runner, config.host, config.port, ssl_context=tls_context(config),
                     handshake_timeout=limits.handshake_timeout,
                     read_timeout=limits.read_timeout,
                     max_unauthenticated=limits.max_unauthenticated, backlog=limits.backlog,
                     handshake_rate=limits.handshake_rate,
                     handshake_burst=limits.handshake_burst,
                     handshake_queue=limits.handshake_queue, queue_wait=limits.queue_wait,
                     reuse_port=config.reuse_port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: "
                          f"{exc.strerror or exc}") from None
    app[GATE_METRICS].gate = site.gate
    port = runner.addresses[0][1]  # the port actually bound (port 0 in tests)
    return Running(runner, port, app)
