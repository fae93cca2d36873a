"""`Store`: the control plane's database behind one async interface (SQLite or PostgreSQL).

One class for its callers, put together from one module per concern (each a `db.Database`
subclass; the method list is in the package docstring):

    identity   enrolment tokens, nodes, revocations
    chunks     chunks, gaps and stream marks (ingest, data queries, retention)
    twin       desired and reported state (setpoints by HLC last-writer-wins)
    audit      operator tokens and the audit log (`write_audit` inside other transactions)
    releases   published releases and their signed TUF metadata
    fleet      config layers, node health and quarantine, pages for the fleet views
    cloud_pipelines  the pipelines the control plane runs over ingested streams
    tpm        nodes' TPMs (EK, AK) and their attestation verdicts
    views      reads for the operator console (chunk activity, newest chunks of a stream)
    nonces     re-authentication nonces, shared by the processes of one database
    db         engines, migrations and `_tx`, the one way into a transaction

SQLAlchemy 2.0 Core statements on the ORM tables of `models`. Every public method is one
transaction; nothing outside this package opens one (`_tx` is the store's own).
"""

from __future__ import annotations

from edgewise.cloud.store.audit import AuditStore
from edgewise.cloud.store.chunks import ChunkStore
from edgewise.cloud.store.cloud_pipelines import CloudPipelineStore
from edgewise.cloud.store.db import DB_FILE, database_url
from edgewise.cloud.store.fleet import FleetStore
from edgewise.cloud.store.identity import IdentityStore, new_node_id
from edgewise.cloud.store.nonces import NonceStore
from edgewise.cloud.store.releases import ReleaseStore
from edgewise.cloud.store.tpm import TpmStore
from edgewise.cloud.store.twin import TwinStore
from edgewise.cloud.store.views import ViewStore

__all__ = ["DB_FILE", "Store", "database_url", "new_node_id"]


class Store(IdentityStore, ChunkStore, TwinStore, AuditStore, ReleaseStore,
            CloudPipelineStore, FleetStore, ViewStore, TpmStore, NonceStore):
    """The control plane's store. ``async with Store(url) as store:`` or `open` / `close`.

    See the package docstring (`edgewise.cloud.store`) for the method list.
    """
