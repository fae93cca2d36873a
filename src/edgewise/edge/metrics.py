"""The agent's local endpoint: Prometheus metrics, liveness and readiness (``--metrics``).

``edgewise agent run --metrics 127.0.0.1:9464`` serves, over plain HTTP on that address only:

* ``GET /metrics``: Prometheus text, read from the running agent at scrape time
  (`AgentCollector`: `Agent.status` and the outbox's per-stream counts; nothing is kept twice);
* ``GET /healthz``: 200 while the agent is starting or running, 503 once it is stopping, stopped
  or failed (a supervisor restarts it);
* ``GET /readyz``: 200 while the agent runs and its engine runs a pipeline, has finished one
  (its sources ended) or has none assigned (``idle``); 503 while it starts, stops, or waits to
  restart a failed pipeline. The link to the control plane does not count: a node without its
  cloud keeps doing its work (docs/architecture.md, autonomy is the default).

Names follow Prometheus conventions: the ``edgewise_`` prefix, base units in the name
(``_bytes``, ``_seconds``), ``_total`` on counters, state as a label of a gauge that is 1.
Counters of the engine (``edgewise_pipeline_*_total``) are those of the engine that runs now:
they start again at 0 when the agent restarts its pipeline, which Prometheus' ``rate()`` treats
as a counter reset. The outbox's counters (``edgewise_outbox_records_*_total``) are kept in the
outbox itself and survive restarts.

The endpoint answers GET only, reads no request body, and is meant for the local host (or a
pod network): it shows counts and states, never keys, tokens or record contents.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from edgewise import __version__
from edgewise.errors import ConfigError

if TYPE_CHECKING:
    from edgewise.edge.agent import Agent

LIVE_STATES = frozenset({"starting", "running"})
READY_ENGINE_STATES = frozenset({"running", "finished", "idle"})
AGENT_STATES = ("starting", "running", "stopping", "stopped", "failed")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) of ``--metrics``; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--metrics {text!r}: give HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


class AgentCollector(Collector):
    """The agent's figures as metric families, built at each scrape."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        agent = self.agent
        st = agent.status()
        now = time.time()

        info = GaugeMetricFamily("edgewise_agent_info", "The agent: version and node id",
                                 labels=["version", "node_id"])
        info.add_metric([__version__, st.node_id or ""], 1)
        yield info
        state = GaugeMetricFamily("edgewise_agent_state", "The agent's state (1 for the one "
                                  "it is in)", labels=["state"])
        for s in AGENT_STATES:
            state.add_metric([s], 1 if st.state == s else 0)
        yield state
        yield GaugeMetricFamily("edgewise_agent_start_time_seconds",
                                "When the agent started (Unix time)", value=agent.started_at)

        yield from self._engine(st.engine)
        yield from self._outbox(st.outbox)
        yield from self._uplink(st, now)

        cert = st.certificate
        expires = _epoch(cert.expires_at) if cert is not None else None
        if expires is not None:
            yield GaugeMetricFamily("edgewise_certificate_expiry_timestamp_seconds",
                                    "When the node certificate expires (Unix time)",
                                    value=expires)
            yield GaugeMetricFamily("edgewise_certificate_expires_in_seconds",
                                    "Seconds until the node certificate expires (negative: "
                                    "expired)", value=expires - now)
        yield CounterMetricFamily("edgewise_certificate_renewals_total",
                                  "Certificate renewals by this agent process", value=st.renewals)
        yield CounterMetricFamily("edgewise_certificate_reauthentications_total",
                                  "Re-authentications with the node key after expiry",
                                  value=st.reauths)

        release = agent.updater.status() if agent.updater.reportable() else None
        rel = GaugeMetricFamily("edgewise_release_info", "The release running (1), its slot "
                                "and whether it is committed or on trial",
                                labels=["version", "slot", "state"])
        if release is not None and release.get("running"):
            rel.add_metric([str(release["running"]), str(release.get("slot") or ""),
                            str(release.get("state") or "")], 1)
        yield rel
        twin = st.twin
        if twin is not None:
            yield GaugeMetricFamily("edgewise_desired_applied_version",
                                    "The desired-state version applied", twin.applied_version)

    def _engine(self, eng: Any) -> Iterator[Any]:
        state = GaugeMetricFamily("edgewise_pipeline_state", "The engine supervisor's state "
                                  "(1), with the pipeline's name", labels=["pipeline", "state"])
        if eng is not None:
            state.add_metric([eng.pipeline or "", eng.state or ""], 1)
        yield state
        yield CounterMetricFamily("edgewise_pipeline_starts_total", "Engine starts by this "
                                  "agent process (restarts after a failure or a new pipeline "
                                  "included)", value=eng.starts if eng is not None else 0)
        counters = self.agent.supervisor.counters()  # the running engine's; {} when none
        for key, help_ in (("readings_in", "Readings taken in by the running engine"),
                           ("alarms", "Alarms raised by the running engine"),
                           ("late", "Records too late for their window (late port)"),
                           ("dead_lettered", "Input the running engine dead-lettered")):
            if key in counters:
                yield CounterMetricFamily(f"edgewise_pipeline_{key}_total", help_,
                                          value=counters[key])

    def _outbox(self, health: Any) -> Iterator[Any]:
        labels = ["stream", "priority"]
        fams = {
            "produced": CounterMetricFamily("edgewise_outbox_records_produced_total",
                                            "Records written to the outbox", labels=labels),
            "acked": CounterMetricFamily("edgewise_outbox_records_acked_total",
                                         "Records the control plane acknowledged as stored",
                                         labels=labels),
            "dropped": CounterMetricFamily("edgewise_outbox_records_dropped_total",
                                           "Records dropped to stay within the outbox bound",
                                           labels=labels),
            "compacted": CounterMetricFamily("edgewise_outbox_records_compacted_total",
                                             "Records compacted to aggregates under pressure",
                                             labels=labels),
            "pending_records": GaugeMetricFamily("edgewise_outbox_pending_records",
                                                 "Records waiting to be sent", labels=labels),
            "pending_bytes": GaugeMetricFamily("edgewise_outbox_pending_bytes",
                                               "Bytes waiting to be sent", labels=labels),
        }
        for name, s in sorted(self.agent.outbox.stats().items()):
            key = [name, str(s.priority)]  # 9 alarm ... 1 bulk (outbox.PRIORITIES)
            for attr, fam in fams.items():
                fam.add_metric(key, getattr(s, attr))
        yield from fams.values()
        if health is not None:
            if health.disk_bytes is not None:
                yield GaugeMetricFamily("edgewise_outbox_disk_bytes", "Bytes the outbox takes "
                                        "on disk (database, log, reserve)", health.disk_bytes)
            if health.max_bytes is not None:
                yield GaugeMetricFamily("edgewise_outbox_max_bytes", "The outbox's bound",
                                        health.max_bytes)
            yield GaugeMetricFamily("edgewise_outbox_disk_full", "1 while the outbox's disk "
                                    "is full", 1 if health.state == "disk full" else 0)
            yield GaugeMetricFamily("edgewise_outbox_held_records", "Records held in memory "
                                    "while the disk is full", health.held_records)

    def _uplink(self, st: Any, now: float) -> Iterator[Any]:
        link = st.link
        up = GaugeMetricFamily("edgewise_uplink_connected", "1 while the session with the "
                               "control plane is up", 1 if link and link.state == "connected"
                               else 0)
        yield up
        state = GaugeMetricFamily("edgewise_uplink_state", "The uplink's state (1)",
                                  labels=["state"])
        if link is not None and link.state:
            state.add_metric([link.state], 1)
            if link.since is not None:
                yield GaugeMetricFamily("edgewise_uplink_state_seconds", "Seconds in the "
                                        "current uplink state", max(0.0, now - link.since))
        yield state
        if link is not None:
            yield CounterMetricFamily("edgewise_uplink_sessions_total", "Sessions established",
                                      value=link.sessions)
            yield CounterMetricFamily("edgewise_uplink_connect_attempts_total",
                                      "Connection attempts", value=link.attempts)
        b = st.bytes
        if b is not None:
            sent = CounterMetricFamily("edgewise_uplink_sent_bytes_total", "Bytes sent to the "
                                       "control plane: websocket payloads, wire (TCP with TLS)",
                                       labels=["layer"])
            received = CounterMetricFamily("edgewise_uplink_received_bytes_total", "Bytes "
                                           "received, as sent", labels=["layer"])
            sent.add_metric(["websocket"], b.ws_sent)
            received.add_metric(["websocket"], b.ws_received)
            if b.wire_sent is not None:
                sent.add_metric(["wire"], b.wire_sent)
            if b.wire_received is not None:
                received.add_metric(["wire"], b.wire_received)
            yield sent
            yield received
        u = st.uplink
        if u is not None:
            for attr, help_ in (("chunks_sent", "Chunks sent"), ("records_sent", "Records sent"),
                                ("chunks_resent", "Chunks sent again after a reconnect"),
                                ("chunks_acked", "Chunks acknowledged as stored"),
                                ("records_acked", "Records acknowledged as stored")):
                yield CounterMetricFamily(f"edgewise_uplink_{attr}_total", help_,
                                          value=getattr(u, attr))
        w = st.window
        if w is not None:
            yield GaugeMetricFamily("edgewise_uplink_inflight_bytes", "Unacknowledged bytes "
                                    "in flight", w.inflight_bytes)


def readiness(agent: Agent) -> tuple[bool, str]:
    """Whether the agent does its work, and why not."""
    if agent.state != "running":
        return False, f"agent {agent.state}"
    eng = agent.supervisor.state
    if eng not in READY_ENGINE_STATES:
        return False, f"pipeline {eng}"
    return True, f"pipeline {eng}"


def create_app(agent: Agent) -> web.Application:
    """The endpoint's application: /metrics, /healthz, /readyz."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        live = agent.state in LIVE_STATES
        return web.json_response({"status": "ok" if live else agent.state,
                                  "version": __version__}, status=200 if live else 503)

    async def readyz(_request: web.Request) -> web.Response:
        ready, why = readiness(agent)
        return web.json_response({"status": "ready" if ready else "not ready", "why": why},
                                 status=200 if ready else 503)

    app = web.Application(client_max_size=1024)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


@contextlib.asynccontextmanager
async def serve(agent: Agent, host: str, port: int) -> AsyncIterator[int]:
    """Serve the endpoint on ``host:port`` while the block runs; yields the port bound.
    Raises `ConfigError` when the address cannot be bound."""
    runner = web.AppRunner(create_app(agent), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"--metrics {host}:{port}: cannot listen: "
                              f"{exc.strerror or exc}") from None
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
