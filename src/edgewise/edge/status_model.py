"""The agent's status as typed values, shared by the agent that writes it and every reader.

* `AgentStatus`: the document ``DATA/status.json``, rebuilt by the running agent every second
  (`edgewise.edge.agent.Agent.status`) from one block per part: `EngineStatus` (the engine
  supervisor), `TwinStatus`, `CertificateStatus`, and from the uplink `LinkStatus`,
  `BytesStatus`, `WindowStatus`, `UplinkCounters` (together `UplinkStatus`).
* `NodeStatus`: what ``edgewise agent status`` shows (`edgewise.edge.status.read_status`): the
  blocks of the status file plus per-stream counts from the outbox (`StreamStatus`).

The JSON is the contract (the CLI's ``--json``, the system tests and the demo read it), so
`to_json()` writes exactly the keys a block was given, by the writer or read from a file
(``exclude_unset``): the agent leaves out what it does not know (no uplink yet: no ``link``;
no engine summary yet: no ``readings_in``) by not passing it, and a block read from an older or
newer agent's file is shown with the keys it had; keys this version does not know are kept
(``extra="allow"``). A block that is absent or ``{}`` in the file is None here, and ``{}`` in
the JSON of a `NodeStatus`. `AgentStatus.parse` tolerates damaged files: a block whose values
have the wrong types is dropped, as if the file did not have it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_serializer,
    field_validator,
)

STATUS_FORMAT = 1  # "format" of status.json


class StatusBlock(BaseModel):
    """A block of the status: every field has a default so that partial blocks (an older
    agent's) read; unknown keys (a newer agent's) are kept."""

    model_config = ConfigDict(extra="allow")

    def to_json(self) -> dict[str, Any]:
        """The block as it is written: the keys it was given, in field order, then unknown
        ones (values as `json.dumps` takes them)."""
        return self.model_dump(exclude_unset=True)


def _empty_is_none(value: Any) -> Any:
    return None if isinstance(value, dict) and not value else value


# -- the blocks ---------------------------------------------------------------------------------


class CertificateStatus(StatusBlock):
    """The node certificate (`edgewise.edge.identity.CertInfo.to_json`); times are ISO 8601."""

    serial: str  # hexadecimal
    not_before: str
    expires_at: str
    renew_at: str


class LatencyStatus(StatusBlock):
    """Accept-to-action latency of a local sink (`edgewise.pipeline.latency`)."""

    count: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None


class EngineStatus(StatusBlock):
    """The engine supervisor; the figures (``readings_in``...) are the live engine's, else those
    of the last engine that ended, and absent before any engine reported."""

    state: str | None = None  # starting, running, restarting, finished, idle, stopped
    pipeline: str | None = None
    error: str | None = None
    starts: int = 0
    readings_in: int | None = None
    alarms: int | None = None
    late: int | None = None
    dead_lettered: int | None = None
    elapsed_s: float | None = None
    sinks: dict[str, LatencyStatus] | None = None  # per local sink that measures latency


class TwinStatus(StatusBlock):
    """Desired state as applied by the twin (`edgewise.edge.twin.Twin.status`)."""

    applied_version: int = 0
    wanted_version: int = 0
    status: str = ""
    refused: dict[str, str] = {}  # version -> why
    held: dict[str, str] = {}  # version -> why it is not applied yet (tried again)
    skipped_versions: list[int] = []
    setpoints: dict[str, Any] = {}
    audit_records: int = 0
    pulls: int = 0


class LinkStatus(StatusBlock):
    """The uplink's session with the control plane."""

    state: str | None = None  # starting, connecting, connected, offline, ...
    since: float | None = None  # epoch seconds
    last_error: str | None = None
    next_attempt_at: float | None = None  # epoch seconds
    sessions: int = 0
    attempts: int = 0
    url: str | None = None


class BytesStatus(StatusBlock):
    """Bytes on the session: ``wire_*`` TCP payload with TLS (None where not measurable),
    ``ws_*`` WebSocket message payloads."""

    wire_sent: int | None = None
    wire_received: int | None = None
    ws_sent: int = 0
    ws_received: int = 0
    counted: str | None = None  # how the counts are taken, for a human


class WindowStatus(StatusBlock):
    """Unacknowledged chunks in flight."""

    limit_bytes: int = 0
    inflight_bytes: int = 0
    inflight_chunks: int = 0
    acking_chunks: int = 0


class RefusedStream(StatusBlock):
    """Chunks of one stream the control plane refused (never sent again)."""

    chunks: int = 0
    records: int = 0
    last_reason: str = ""


class UplinkCounters(StatusBlock):
    """What the uplink sent and what came back (the ``uplink`` block)."""

    chunks_sent: int = 0
    records_sent: int = 0
    chunks_resent: int = 0
    chunks_acked: int = 0
    records_acked: int = 0
    acked_below_mark: int = 0
    gaps_reported: dict[str, int] = {}
    reports_sent: int = 0
    refused: dict[str, RefusedStream] = {}
    cloud_marks: dict[str, int] = {}


class OutboxStatus(StatusBlock):
    """The outbox's condition (`edgewise.outbox.Outbox.health`): a full disk, what the outbox
    takes on disk against its bound, records held in memory, what happened when it opened."""

    state: str | None = None  # ok, disk full
    since: float | None = None  # epoch seconds
    error: str | None = None
    disk_bytes: int | None = None  # database, write-ahead log and reserve file
    max_bytes: int | None = None  # the bound
    free_bytes: int | None = None  # free on its file system
    held_records: int = 0  # waiting in memory for the disk
    lost_in_memory: int = 0  # given up in memory while the disk was full (reported as gaps)
    notes: list[str] = []  # continuity and quarantine at open


class UplinkStatus(BaseModel):
    """The four blocks `edgewise.edge.uplink.Uplink.status` contributes to `AgentStatus`."""

    link: LinkStatus
    bytes: BytesStatus
    window: WindowStatus
    uplink: UplinkCounters


class _Document(StatusBlock):
    """A status document: its blocks are None when absent or ``{}``, and ``{}`` when None."""

    BLOCKS: ClassVar[tuple[str, ...]] = ("engine", "twin", "link", "bytes", "window", "uplink",
                                         "outbox")

    @field_validator(*BLOCKS, mode="before", check_fields=False)
    @classmethod
    def _read_block(cls, value: Any) -> Any:
        return _empty_is_none(value)

    @field_serializer(*BLOCKS, mode="wrap", check_fields=False)
    def _write_block(self, value: Any, handler: SerializerFunctionWrapHandler) -> Any:
        return {} if value is None else handler(value)


# -- the documents ------------------------------------------------------------------------------


class ReleaseStatus(StatusBlock):
    """The release block (`edgewise.edge.updater.updater.Updater.status`, docs/updates.md):
    written once the node has a release, a failure or work under way."""

    running: str | None = None  # the release version really running; None: no release
    slot: str | None = None
    state: str | None = None  # none, on trial, committed
    previous: str | None = None
    phase: str | None = None  # what the updater is doing
    failed: list[str] = []
    attempts: int | None = None  # starts of the release on trial
    staging: str | None = None
    last_failure: dict[str, Any] | None = None  # version, phase, reason, at


class AgentStatus(_Document):
    """``DATA/status.json``. ``error`` and the uplink's blocks (``link``, ``bytes``, ``window``,
    ``uplink``) are written only when given; ``twin`` is ``{}`` before the twin exists."""

    format: int = STATUS_FORMAT
    updated_at: float | None = None  # epoch seconds; a stale file means a stopped agent
    pid: int | None = None
    state: str | None = None  # starting, running, stopping, stopped, failed
    started_at: float | None = None
    node_id: str | None = None
    cloud: str | None = None
    certificate: CertificateStatus | None = None
    renewals: int = 0
    reauths: int = 0
    engine: EngineStatus | None = None
    twin: TwinStatus | None = None
    problem: str | None = None  # what the operator must do
    error: str | None = None  # why the agent stopped
    link: LinkStatus | None = None
    bytes: BytesStatus | None = None
    window: WindowStatus | None = None
    uplink: UplinkCounters | None = None
    outbox: OutboxStatus | None = None
    release: ReleaseStatus | None = None

    @classmethod
    def parse(cls, raw: object) -> AgentStatus:
        """Whatever a status file held (`json.loads`): anything but an object reads as an
        empty status; a key whose value does not fit (strictly: no "12" for 12) is dropped
        with all it holds (a block with one bad value reads as absent)."""
        if not isinstance(raw, dict):
            return cls()
        data = dict(raw)
        while True:
            try:
                return cls.model_validate(data, strict=True)
            except ValidationError as exc:
                bad = {e["loc"][0] for e in exc.errors() if e["loc"]} & data.keys()
                if not bad:
                    return cls()
                for key in bad:
                    del data[key]

    def refused_records(self, stream: str) -> int:
        """Records of ``stream`` the control plane refused, per the uplink block."""
        refused = self.uplink.refused.get(stream) if self.uplink is not None else None
        return refused.records if refused is not None else 0


class StreamStatus(BaseModel):
    """One outbox stream, counted in the outbox itself (exact also while the agent is
    stopped); ``refused`` is from the status file."""

    priority: int
    produced: int
    acknowledged: int
    pending: int  # records
    pending_chunks: int
    pending_bytes: int
    dropped: int
    compacted: int
    refused: int


class NodeStatus(_Document):
    """What ``edgewise agent status`` shows. ``link.state`` is ``"agent not running"`` when the
    status file is stale or its process is gone; the other blocks are the file's as written."""

    data_dir: str
    running: bool
    status_age_s: float | None
    state: str  # the agent's, or "never started"
    node_id: str | None
    cloud: str | None
    streams: dict[str, StreamStatus]  # highest priority first
    link: LinkStatus | None
    bytes: BytesStatus | None
    window: WindowStatus | None
    uplink: UplinkCounters | None
    twin: TwinStatus | None
    engine: EngineStatus | None
    certificate: CertificateStatus | None  # from DATA/identity/node.pem
    certificate_expires_in_s: int | None
    problem: str | None
    outbox: OutboxStatus | None = None  # from the status file
    release: ReleaseStatus | None = None  # from the status file

    @property
    def link_state(self) -> str:
        """The link's state, ``"-"`` if the status has none."""
        return (self.link.state if self.link is not None else None) or "-"
