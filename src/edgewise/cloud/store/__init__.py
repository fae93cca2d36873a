"""The control plane's store: one async interface over SQLite (default) or PostgreSQL.

``Store(url)`` or ``Store.for_data_dir(DIR, db=None)``; ``async with store:`` (or ``await
store.open()`` / ``await store.close()``). `open` runs the Alembic migrations in
``edgewise/cloud/migrations`` (safe when several processes open one store). `database_url`
turns ``--db`` / ``--data`` into an async SQLAlchemy URL. Every method is one transaction;
database failures raise `StorageError`. Times are timezone-aware UTC datetimes; every ``now=``
parameter defaults to the current time. Records are frozen dataclasses from `records`.

`store.Store` is one class made of one module per concern: `identity` (enrolment tokens, nodes,
revocations), `chunks` (ingest and data), `twin` (desired and reported state), `audit` (operator
tokens, audit log), `releases` (releases and their TUF metadata), over `db` (engines,
migrations, transactions).

Store methods (all ``async``):

enrolment tokens                                    (identity)
    add_enrolment_token(token: EnrolmentToken)
    use_enrolment_token(hash) -> labels             atomic conditional UPDATE; raises
                                                    TokenInvalid / TokenExpired / TokenUsedUp
    list_enrolment_tokens(include_spent=False) -> [EnrolmentTokenInfo]
    purge_enrolment_tokens() -> int
nodes                                               (identity)
    enrol_node(token_hash, node_id, issued: IssuedCert) -> NodeInfo
                                                    token use + node + audit in one transaction;
                                                    KeyInUse (409) if the key has a node already
    enrol_nodes([EnrolRequest]) -> [NodeInfo | error]   many in one transaction, a savepoint
                                                    each: a refused one fails alone
    get_node(node_id) -> NodeInfo | None
    list_nodes(labels=None, limit=1000, after=None) -> [NodeInfo]   keyset paging by id
    count_nodes() -> int
    set_node_labels(node_id, labels, actor=) -> NodeInfo            audited; KeyError if unknown
    record_renewal(node_id, issued)                 new serial/expiry, same key only
    set_node_status(node_id, status)                "online" / "offline" and last_seen
    touch_nodes({node_id: datetime})                batched last_seen
    revoke_node(node_id, reason=, actor=) -> NodeInfo   revokes serial and key; audited
    decommission_node(node_id, wipe=, reason=, actor=) -> NodeInfo
                                                    revoke + status decommissioned (when, by
                                                    whom, wipe); the record stays; audited
revocations                                         (identity)
    add_revocation(serial=None, fingerprint=None, node_id=None, reason="")
    load_revocations() -> security.tls.RevocationList
    list_revocations() -> ([serial], [fingerprint])
re-authentication nonces                            (nonces; shared by the processes of a db)
    issue_nonce(node_id, ttl, limit=) -> bytes      StorageError when limit are outstanding
    take_nonce(nonce, node_id) -> bool              single use: DELETE ... RETURNING
operator tokens                                     (audit)
    add_operator_token(token: OperatorToken, actor="system")        audited
    get_operator_token(hash) -> OperatorToken | None                None if unknown or revoked
    list_operator_tokens() -> [OperatorTokenInfo]
    revoke_operator_token(hash, actor=) -> bool                     audited
    replace_operator_tokens(token, actor=, reason=) -> int          revoke those of its name
                                                    and role, add it; one transaction, audited
ingest and data                                     (chunks)
    load_streams(node_id) -> {stream: StreamInfo}
    session_start(node_id) -> ({stream: (mark, [SeqRange above])}, desired version)
                                                    a hello's reads, one read transaction
    settled_above(node_id, stream, from_seq) -> [SeqRange]          chunks and gaps above a mark
    commit_ingest(chunks: [ChunkWrite], gaps: [GapWrite], marks: [MarkWrite]) -> IngestResult
                                                    one transaction; PK conflicts skipped
    stream_stats(node_id=None) -> [StreamInfo]       records stored, contiguous mark, lost
    read_chunks(node_id, stream, from_seq=0, since=None, limit=100) -> [StoredChunk]
                                                    payload: edgewise.sync.codec.decode
    chunk_start(node_id, stream, seq) -> int        first seq of the chunk holding seq
    list_gaps(node_id, stream=None) -> [GapInfo]
    purge_chunks(received_before, limit=10000) -> int               retention
desired state (versions per node grow by one)       (twin)
    update_desired_state(node_id, change, setpoints=None, labels=, expires_at=, actor=,
                         release=None)           release: None keeps the assigned one, ""
                                                    assigns none
                                                    -> DesiredState: read the newest, apply
                                                    change(previous) -> (pipelines, config),
                                                    merge setpoints, store, audit: ONE
                                                    transaction; then call the app's session
                                                    registry: notify_desired(node_id, version)
    update_desired_states([(node_id, labels)], change, setpoints=None, expires_at=, actor=)
                                                    -> {node_id: DesiredState}: the same for
                                                    many nodes as one bulk operation (one
                                                    transaction per 1,000 nodes; a selector
                                                    push); KeyError names an unknown node
    put_desired_state(node_id, pipelines=, config=, labels=, expires_at=, actor=) -> DesiredState
                                                    the same with the next state as given
    get_desired_state(node_id, version=None) -> DesiredState | None  newest by default
    desired_version(node_id) -> int                 0 if none
    desired_states({node_id: version}) -> {node_id: DesiredState}   many, 1,000 a query
reported state                                      (twin)
    get_reported_state(node_id) -> ReportedInfo | None
    merge_reported_state(node_id, reported: ReportedState, at=None) -> [AuditRecord]
                                                    setpoints merge by HLC LWW; losses audited
    write_node_batch({node: (status, when)}, {node: NodeReport}, {node: [AuditRecord]})
                                                    statuses and coalesced reports of many
                                                    nodes in ONE transaction (node_writes)
    merge_setpoints(node_id, setpoints: LwwMap, actor=, at=None) -> [AuditRecord]
                                                    cloud-side setpoint writes, same rule
releases and TUF metadata                           (releases)
    tuf_top() -> TopMetadata | None                 the newest signed bytes of each role
    tuf_metadata(role, version=None) -> bytes | None
    update_tuf(change, actor=, action=) -> TopMetadata | None
                                                    newest -> change(newest) -> stored, audited:
                                                    ONE transaction (sign, rotate, re-sign)
    publish_release(version, manifest, digest, files, total, sign, actor=) -> (ReleaseInfo, new)
                                                    the release row and the metadata sign()
                                                    makes, ONE transaction; ReleaseExists (409)
                                                    for another manifest under its version
    get_release(version) -> (ReleaseInfo, manifest bytes) | None
    list_releases(limit=1000) -> [ReleaseInfo]      newest first
    count_releases() -> int
cloud pipelines                                     (cloud_pipelines)
    put_cloud_pipeline(name, text, actor=) -> (CloudPipelineInfo, changed)   audited
    get_cloud_pipeline(name) -> CloudPipelineInfo | None
    list_cloud_pipelines() -> [CloudPipelineInfo]
    delete_cloud_pipeline(name, actor=) -> bool     audited; stored results stay
    stream_marks(stream) -> {node: contiguous}      what a cloud pipeline may read
cloud pipeline runs                                 (cloud_pipeline_runs)
    take_pipeline_lease(name, runner, seconds) -> PipelineLease | None   one replica runs it
    renew_pipeline_lease(lease) -> bool / release_pipeline_lease(lease)
    pipeline_runner(name) -> CloudPipelineRunner | None / pipeline_state(name) -> bytes | None
    commit_pipeline_results(lease, chunks, marks, state) -> IngestResult   fenced by the
                                                    lease; PipelineLeaseLost, nothing stored
audit log                                           (audit)
    audit(actor, action, target, detail=None)
    list_audit(target=None, actor=None, limit=100, before_id=None) -> [AuditEntry]  newest first
other                                               (db)
    schema_revision() -> str | None
"""

from edgewise.cloud.store.db import DB_FILE, database_url
from edgewise.cloud.store.identity import KeyInUse, new_node_id
from edgewise.cloud.store.records import (
    AuditEntry,
    ChunkWrite,
    EnrolmentTokenInfo,
    GapInfo,
    GapWrite,
    IngestResult,
    MarkWrite,
    NodeInfo,
    NodeReport,
    OperatorTokenInfo,
    ReportedInfo,
    SeqRange,
    StoredChunk,
    StreamInfo,
)
from edgewise.cloud.store.store import Store

__all__ = [
    "DB_FILE",
    "AuditEntry",
    "ChunkWrite",
    "EnrolmentTokenInfo",
    "GapInfo",
    "GapWrite",
    "IngestResult",
    "KeyInUse",
    "MarkWrite",
    "NodeInfo",
    "NodeReport",
    "OperatorTokenInfo",
    "ReportedInfo",
    "SeqRange",
    "Store",
    "StoredChunk",
    "StreamInfo",
    "database_url",
    "new_node_id",
]
