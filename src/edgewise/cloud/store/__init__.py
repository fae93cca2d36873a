"""The control plane's store: one async interface over SQLite (default) or PostgreSQL.

``Store(url)`` or ``Store.for_data_dir(DIR, db=None)``; ``async with store:`` (or ``await
store.open()`` / ``await store.close()``). `open` runs the Alembic migrations in
``edgewise/cloud/migrations`` (safe when several processes open one store). `database_url`
turns ``--db`` / ``--data`` into an async SQLAlchemy URL. Every method is one transaction;
database failures raise `StorageError`. Times are timezone-aware UTC datetimes; every ``now=``
parameter defaults to the current time. Records are frozen dataclasses from `records`.

Store methods (all ``async``):

enrolment tokens
    add_enrolment_token(token: EnrolmentToken)
    use_enrolment_token(hash) -> labels             atomic conditional UPDATE; raises
                                                    TokenInvalid / TokenExpired / TokenUsedUp
    list_enrolment_tokens(include_spent=False) -> [EnrolmentTokenInfo]
    purge_enrolment_tokens() -> int
nodes
    enrol_node(token_hash, node_id, issued: IssuedCert) -> NodeInfo
                                                    token use + node + audit in one transaction
    get_node(node_id) -> NodeInfo | None
    list_nodes(labels=None, limit=1000, after=None) -> [NodeInfo]   keyset paging by id
    count_nodes() -> int
    set_node_labels(node_id, labels, actor=) -> NodeInfo            audited; KeyError if unknown
    record_renewal(node_id, issued)                 new serial/expiry, same key only
    set_node_status(node_id, status)                "online" / "offline" and last_seen
    touch_nodes({node_id: datetime})                batched last_seen
    revoke_node(node_id, reason=, actor=) -> NodeInfo   revokes serial and key; audited
revocations
    add_revocation(serial=None, fingerprint=None, node_id=None, reason="")
    load_revocations() -> security.tls.RevocationList
    list_revocations() -> ([serial], [fingerprint])
operator tokens
    add_operator_token(token: OperatorToken, actor="system")        audited
    get_operator_token(hash) -> OperatorToken | None                None if unknown or revoked
    list_operator_tokens() -> [OperatorTokenInfo]
    revoke_operator_token(hash, actor=) -> bool                     audited
ingest and data
    load_streams(node_id) -> {stream: StreamInfo}
    settled_above(node_id, stream, from_seq) -> [SeqRange]          chunks and gaps above a mark
    commit_ingest(chunks: [ChunkWrite], gaps: [GapWrite], marks: [MarkWrite]) -> IngestResult
                                                    one transaction; PK conflicts skipped
    stream_stats(node_id=None) -> [StreamInfo]       records stored, contiguous mark, lost
    read_chunks(node_id, stream, from_seq=0, since=None, limit=100) -> [StoredChunk]
                                                    payload: edgewise.sync.codec.decode
    list_gaps(node_id, stream=None) -> [GapInfo]
    purge_chunks(received_before, limit=10000) -> int               retention
desired state (versions per node grow by one)
    put_desired_state(node_id, pipelines=, config=, labels=, expires_at=, actor=) -> DesiredState
                                                    audited; then call the app's session
                                                    registry: notify_desired(node_id, version)
    get_desired_state(node_id, version=None) -> DesiredState | None  newest by default
    desired_version(node_id) -> int                 0 if none
reported state
    get_reported_state(node_id) -> ReportedInfo | None
    merge_reported_state(node_id, reported: ReportedState, at=None) -> [AuditRecord]
                                                    setpoints merge by HLC LWW; losses audited
    merge_setpoints(node_id, setpoints: LwwMap, actor=, at=None) -> [AuditRecord]
                                                    cloud-side setpoint writes, same rule
audit log
    audit(actor, action, target, detail=None)
    list_audit(target=None, actor=None, limit=100, before_id=None) -> [AuditEntry]  newest first
other
    schema_revision() -> str | None
"""

from edgewise.cloud.store.records import (
    AuditEntry,
    ChunkWrite,
    EnrolmentTokenInfo,
    GapInfo,
    GapWrite,
    IngestResult,
    MarkWrite,
    NodeInfo,
    OperatorTokenInfo,
    ReportedInfo,
    SeqRange,
    StoredChunk,
    StreamInfo,
)
from edgewise.cloud.store.store import DB_FILE, Store, database_url, new_node_id

__all__ = [
    "DB_FILE",
    "AuditEntry",
    "ChunkWrite",
    "EnrolmentTokenInfo",
    "GapInfo",
    "GapWrite",
    "IngestResult",
    "MarkWrite",
    "NodeInfo",
    "OperatorTokenInfo",
    "ReportedInfo",
    "SeqRange",
    "Store",
    "StoredChunk",
    "StreamInfo",
    "database_url",
    "new_node_id",
]
