"""The settings of one control plane process (`CloudConfig`) and their app key (`CONFIG`).

The CLI builds a `CloudConfig` from the flags of ``edgewise cloud serve``; `app.create_app`
puts it under ``app[CONFIG]`` for the APIs. Why this key is not in `state` with the others is
said there. `ServerLimits` are the limits on what enters through the port (timeouts, the cap
on unauthenticated connections, the per-node request rate); ``--limit NAME=VALUE`` sets them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from edgewise.cloud.dataout.config import DataOutConfig
from edgewise.cloud.server_tls import ServerTls
from edgewise.cloud.session import SessionLimits
from edgewise.cloud.store import database_url
from edgewise.errors import ConfigError
from edgewise.security.pki import NODE_CERT_LIFETIME


@dataclass(frozen=True)
class ServerLimits:
    """Limits on connections and requests (docs/control-plane.md, *Limits*).

    Established device sessions (WebSocket) are not subject to the read and idle timeouts:
    they have their own heartbeat (`SessionLimits`).
    """

    handshake_timeout: float = 10.0  # s from TCP accept to a finished TLS handshake
    read_timeout: float = 30.0  # s to receive a request head, and again to read its body
    idle_timeout: float = 60.0  # s a keep-alive connection may sit between requests
    max_unauthenticated: int = 256  # connections in the handshake or without a client cert
    device_rate: float = 2.0  # requests per second per node on the device API (sustained)
    device_burst: int = 30  # requests a node may make at once before the rate applies
    handshake_rate: float = 300.0  # TLS handshakes started per s (admission control)
    handshake_burst: int = 100  # handshakes started at once before the rate applies
    handshake_queue: int = 4096  # connections waiting for a handshake; one more is closed
    # s a connection may wait from accept for its handshake (a token or a slot under the cap);
    # then closed: well inside the node's 10 s connect timeout
    queue_wait: float = 5.0
    backlog: int = 4096  # the listen queue (the kernel caps it at net.core.somaxconn)
    enrol_rate: float = 50.0  # enrolments handled per s; more wait their turn
    enrol_burst: int = 50
    # enrolments waiting; one more gets 429 with Retry-After. 500 at 50/s is 10 s: within the
    # node's request timeout (15 s), so no queued enrolment is given up on by its node
    enrol_queue: int = 500
    push_fetch_rate: float = 1000.0  # desired-state fetches per s one push is spread for
    push_max_jitter: float = 5.0  # s: the longest fetch jitter hint a push gives its nodes
    store_wait: float = 30.0  # s a store transaction waits for a pooled connection
    # s a replica's hold on a cloud pipeline lasts without renewal: how long the others wait
    # to take over from one that died (docs/cloud-pipelines.md, "Several replicas")
    pipeline_lease: float = 15.0

    def __post_init__(self) -> None:
        rates = {"device_rate": "requests per second", "handshake_rate": "handshakes per second",
                 "enrol_rate": "enrolments per second", "push_fetch_rate": "fetches per second"}
        for name in ("handshake_timeout", "read_timeout", "idle_timeout", "push_max_jitter",
                     "store_wait", "queue_wait",
                     "pipeline_lease", *rates):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"limit {name} must be a positive number of "
                                  f"{rates.get(name, 's')}, not {value!r}")
        for name in ("max_unauthenticated", "device_burst", "handshake_burst",
                     "handshake_queue", "backlog", "enrol_burst", "enrol_queue"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"limit {name} must be a whole number >= 1, not {value!r}")

    @classmethod
    def parse(cls, items: Iterable[str]) -> ServerLimits:
        """``["read_timeout=5", "max_unauthenticated=100"]`` (the ``--limit`` flags)."""
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for item in items:
            name, sep, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in kinds:
                raise ConfigError(f"--limit {item!r}: write NAME=VALUE with NAME one of "
                                  f"{', '.join(kinds)}")
            try:
                values[name] = int(text) if kinds[name] in (int, "int") else float(text)
            except ValueError:
                raise ConfigError(f"--limit {item!r}: {text.strip()!r} is not a number") from None
        return cls(**values)


@dataclass(frozen=True)
class AttestationSettings:
    """TPM enrolment and remote attestation (docs/security.md, "Hardware-rooted trust")."""

    require: bool = False  # enrol only nodes with a TPM; nodes without are quarantined
    agents: tuple[str, ...] = ()  # allowed agent code digests (sha256 hex)
    pcrs: tuple[int, ...] = (16,)  # the PCRs quotes cover (the agent measures into 16)
    manufacturer_cas: tuple[Path, ...] = ()  # TPM makers' CA certificates: EK certs checked
    # label selectors ({label: value} each): a node matching one must attest (no TPM:
    # quarantined at its session's start and at each attestation)
    require_for: tuple[tuple[tuple[str, str], ...], ...] = ()
    # firmware measured-boot PCRs (0-7) whose values must be one of the golden sets (each
    # {pcr: sha256 hex}); none: the firmware PCRs are not checked
    firmware_pcrs: tuple[int, ...] = ()
    golden_firmware: tuple[tuple[tuple[int, str], ...], ...] = ()
    # a TPM node with a live session whose newest attestation is older than this (3 of the
    # agent's 600 s intervals) is quarantined as overdue
    max_age_s: float = 1800.0

    def required(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with ``labels`` must attest (`require`, or a matching selector)."""
        return self.require or any(all(labels.get(k) == v for k, v in sel)
                                   for sel in self.require_for)


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
    # s the group commit waits for more batches: with many nodes each sending rarely, 2 ms
    # made nearly one transaction per batch (issue 11, steady CPU); acks wait at most this more
    commit_linger: float = 0.05
    maintenance_interval: float = 10.0  # s between last-seen flushes / revocation checks
    node_write_interval: float = 1.0  # s between group writes of node status and reports
    limits: SessionLimits = field(default_factory=SessionLimits)
    data_out: DataOutConfig | None = None  # forwarders (MQTT, NATS) and retention
    server: ServerLimits = field(default_factory=ServerLimits)  # connections and requests
    attestation: AttestationSettings = field(default_factory=AttestationSettings)
    tls: ServerTls = field(default_factory=ServerTls)  # an organisation's own PKI (server_tls)
    # `cloud serve --processes N`: this process's number (0..N-1) and whether the port is
    # shared with the others (SO_REUSEPORT); docs/control-plane.md, "Several processes"
    process: int = 0
    reuse_port: bool = False

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def db_url(self) -> str:
        return database_url(self.db, self.data_dir)


CONFIG = web.AppKey("config", CloudConfig)
