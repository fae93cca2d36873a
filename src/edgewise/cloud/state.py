"""The control plane app's shared state: typed keys, below the APIs that use them.

`app.create_app` fills these; the device API, the operator API and data out read them:

    STORE        store.Store (opened on startup, closed on cleanup)
    CA           security.pki.CertificateAuthority
    REVOCATIONS  security.tls.RevocationList (loaded from the store on startup)
    SESSIONS     sessions.SessionRegistry: ``await app[SESSIONS].notify_desired(node_id, v)``
                 after storing desired version v; `revoke_node` / `decommission_node`
                 below for a revocation; `set_quarantine` below for a quarantine
    COMMITTER    ingest.GroupCommitter
    POKES        pokes.PokeFanout: desired-state pokes from one fan-out task (`desired.assign`)
    BUS          replicas.ReplicaBus, or None: what the other processes of a PostgreSQL
                 database hear (the functions below tell them)
    METRICS      metrics.Metrics
    OPENAPI      dict of OpenAPI path items served at /openapi.json (add yours)

The settings are ``app[config.CONFIG]`` (`config.CloudConfig`). That key lives with its class,
which names data out's settings, and data out's wiring needs `STORE`: kept apart, nothing here
imports ``dataout`` and the package has no import circle.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from edgewise.cloud.ingest import GroupCommitter
from edgewise.cloud.metrics import Metrics
from edgewise.cloud.pokes import PokeFanout
from edgewise.cloud.replicas import ReplicaBus
from edgewise.cloud.sessions import SessionRegistry
from edgewise.cloud.store import NodeInfo, Store
from edgewise.security.pki import CertificateAuthority
from edgewise.security.tls import RevocationList

STORE = web.AppKey("store", Store)
CA = web.AppKey("ca", CertificateAuthority)
REVOCATIONS = web.AppKey("revocations", RevocationList)
SESSIONS = web.AppKey("sessions", SessionRegistry)
COMMITTER = web.AppKey("committer", GroupCommitter)
METRICS = web.AppKey("metrics", Metrics)
POKES = web.AppKey("pokes", PokeFanout)
BUS: web.AppKey[ReplicaBus | None] = web.AppKey("bus", ReplicaBus)
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi", dict)


async def revoke_node(app: web.Application, node_id: str, *, reason: str, actor: str
                      ) -> NodeInfo:
    """Revoke a node everywhere: in the store (serial and key, audited), in this process's
    revocation list, and its live session (``revoked`` then close). `KeyError` if unknown."""
    node = await app[STORE].revoke_node(node_id, reason=reason, actor=actor)
    app[REVOCATIONS].revoke_serial(node.cert_serial)
    app[REVOCATIONS].revoke_key(node.key_fingerprint)
    said = f"revoked: {reason}" if reason else "revoked"
    await app[SESSIONS].revoke(node_id, said)
    if (bus := app.get(BUS)) is not None:
        bus.revoked(node_id, said, serial=node.cert_serial, fingerprint=node.key_fingerprint)
    return node


async def decommission_node(app: web.Application, node_id: str, *, wipe: bool, reason: str,
                            actor: str) -> NodeInfo:
    """Decommission a node everywhere, as `revoke_node` does, and tell its live session
    (``revoked`` with ``decommissioned`` and ``wipe``). `KeyError` if unknown."""
    node = await app[STORE].decommission_node(node_id, wipe=wipe, reason=reason, actor=actor)
    app[REVOCATIONS].revoke_serial(node.cert_serial)
    app[REVOCATIONS].revoke_key(node.key_fingerprint)
    what = "decommissioned, wipe" if node.wipe else "decommissioned"
    said = f"{what}: {reason}" if reason else what
    await app[SESSIONS].revoke(node_id, said, decommissioned=True, wipe=node.wipe)
    if (bus := app.get(BUS)) is not None:
        bus.revoked(node_id, said, serial=node.cert_serial, fingerprint=node.key_fingerprint,
                    decommissioned=True, wipe=node.wipe)
    return node


async def set_quarantine(app: web.Application, node_id: str, reason: str | None, *,
                         actor: str, now: datetime | None = None) -> None:
    """Quarantine a node (``reason``) or lift it (None): in the store (audited) and for its
    live session here, which stores its chunks apart while it is quarantined. `KeyError` if
    unknown."""
    await app[STORE].set_quarantine(node_id, reason, actor=actor, now=now)
    app[SESSIONS].set_quarantined(node_id, reason is not None)
    if (bus := app.get(BUS)) is not None:
        bus.quarantined(node_id, reason is not None)
