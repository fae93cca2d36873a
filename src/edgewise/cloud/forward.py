"""Data out: forward stored records to a message broker, and prune the store by age.

The ingest calls `Forwarder.forward` *after* a chunk's durable commit, so a forwarder only ever
sees records the store has; nothing it does can lose or delay an acknowledgement to a node.
`forward` never waits on the network: it puts the chunk on a bounded queue of the forwarder's own
and returns. A worker task sends queued chunks in order, retrying with exponential backoff and
full jitter while the broker is unreachable. When the queue is full the *oldest* queued chunk is
dropped and counted (``dropped_chunks`` / ``dropped_records``); a chunk the broker refuses for
good (e.g. larger than its payload limit) is dropped and counted too (``refused_chunks``).
Delivery to the broker is at-least-once: a chunk sent again after a lost acknowledgement is a
duplicate on MQTT, and is dropped by JetStream through its ``Nats-Msg-Id`` header.

Record ``i`` of a chunk has sequence number ``seq_first + i`` (true for every uncompacted chunk;
a compacted chunk covers more sequence numbers than it has records, and its records are
numbered from ``seq_first`` the same way, which keeps message ids unique and stable).

Messages are JSON. ``per: record`` (default) sends one message per record::

    {"node": "n1", "stream": "alarms", "seq": 41, "data": {"sensor": "...", "ts": ..., ...}}

``per: chunk`` sends one message per chunk::

    {"node": "n1", "stream": "alarms", "seq_first": 40, "count": 2, "records": [{...}, {...}]}

Configuration (`forwarders_from_config`), e.g. from ``edgewise cloud serve`` or a YAML file::

    forwarders:
      - type: mqtt
        host: 127.0.0.1
        port: 1883
        topic: "edgewise/{node}/{stream}"
      - type: nats
        servers: ["nats://127.0.0.1:4222"]
        subject: "edgewise.{node}.{stream}"
        stream_name: EDGEWISE      # JetStream stream, created if missing and create_stream
    retention: 7d

Retention: `prune(store, older_than)` deletes stored chunks received before a time;
`run_retention(store, keep, every)` is the one periodic task for the whole store.

Wiring into the control plane: ``setup_data_out(app, data_out_config(doc))`` sets
``app[FORWARDERS]`` and adds a ``cleanup_ctx`` that starts and stops the forwarders and the
retention task; after each durable group commit the ingest calls ``await
app[FORWARDERS].forward_committed(chunks, result.chunks)``, which forwards only the chunks the
store actually inserted (a duplicate batch is not forwarded twice).

Lifecycle: ``async with forwarders_from_config(cfg) as fwd: ... await fwd.forward(...)``, or
``await fwd.start()`` / ``await fwd.stop()``. `stop` gives queued chunks ``flush_timeout``
seconds to leave, then counts what is left as dropped and cancels the worker.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import random
import string
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import numpy as np
import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgewise.errors import ConfigError, EdgewiseError
from edgewise.pipeline.units import Duration, parse_duration

log = logging.getLogger(__name__)

_FORMATTER = string.Formatter()
TEMPLATE_FIELDS = frozenset({"node", "stream"})


@runtime_checkable
class Forwarder(Protocol):
    """What the ingest calls after each durable commit. Must not block on the network."""

    async def forward(
        self, node_id: str, stream: str, seq_first: int, columns: Mapping[str, np.ndarray]
    ) -> None: ...


class ForwardRefused(EdgewiseError):
    """The broker refused a chunk for good (not worth retrying): it is dropped and counted."""


@dataclass(frozen=True)
class Chunk:
    """One committed chunk waiting to be forwarded."""

    node: str
    stream: str
    seq_first: int
    columns: Mapping[str, np.ndarray]

    @property
    def records(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


# -- message rendering ------------------------------------------------------------------------


def record_dicts(columns: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Columns as a list of plain JSON-able dicts (internal ``_`` columns are left out)."""
    cols = {k: v for k, v in columns.items() if not k.startswith("_")}
    if not cols:
        return []
    names = list(cols)
    lists = [np.asarray(cols[k]).tolist() for k in names]
    return [dict(zip(names, row, strict=True)) for row in zip(*lists, strict=True)]


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY, default=str)


def render(chunk: Chunk, per: Literal["record", "chunk"]) -> list[tuple[int, bytes]]:
    """The messages for a chunk as ``(seq, payload)``; see the module docstring for shapes."""
    rows = record_dicts(chunk.columns)
    if per == "chunk":
        doc = {
            "node": chunk.node,
            "stream": chunk.stream,
            "seq_first": chunk.seq_first,
            "count": len(rows),
            "records": rows,
        }
        return [(chunk.seq_first, _dumps(doc))]
    return [
        (
            chunk.seq_first + i,
            _dumps({"node": chunk.node, "stream": chunk.stream, "seq": chunk.seq_first + i,
                    "data": row}),
        )
        for i, row in enumerate(rows)
    ]


def check_template(template: str, what: str) -> str:
    """A topic/subject template may use only ``{node}`` and ``{stream}``."""
    try:
        parts = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise ValueError(f"{what} template {template!r} is not valid: {exc}") from None
    for _literal, name, spec, conv in parts:
        if name is not None and (name not in TEMPLATE_FIELDS or spec or conv):
            raise ValueError(
                f"{what} template {template!r} uses {{{name}}}; only {{node}} and {{stream}} "
                "are available"
            )
    return template


# -- the queued forwarder ---------------------------------------------------------------------


class QueuedForwarder(abc.ABC):
    """Bounded queue + one worker task that sends chunks in order and retries.

    Subclasses implement `_connect`, `_send` (raise `ForwardRefused` for a chunk that can never
    be sent; any other exception means "retry after reconnecting") and `_close`.
    """

    kind = "forwarder"

    def __init__(
        self,
        *,
        max_queue: int = 1000,
        retry_min: float = 0.2,
        retry_max: float = 30.0,
        flush_timeout: float = 5.0,
    ) -> None:
        if max_queue < 1:
            raise ConfigError(f"max_queue must be at least 1, got {max_queue}")
        self.max_queue = max_queue  # chunks
        self.retry_min = retry_min  # seconds
        self.retry_max = retry_max  # seconds
        self.flush_timeout = flush_timeout  # seconds
        self._queue: deque[Chunk] = deque()
        self._inflight: Chunk | None = None
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = False
        self.forwarded_chunks = 0
        self.forwarded_records = 0
        self.messages = 0
        self.dropped_chunks = 0
        self.dropped_records = 0
        self.refused_chunks = 0
        self.retries = 0
        self.errors = 0
        self.last_error: str | None = None

    @property
    def where(self) -> str:
        return "?"

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.kind} forwarder already started")
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task = asyncio.create_task(self._run(), name=f"edgewise-forward-{self.kind}")

    async def stop(self) -> None:
        """Let queued chunks leave for up to ``flush_timeout`` s, then stop; the rest is dropped."""
        task = self._task
        if task is None:
            return
        self._closing = True
        if self._idle is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.flush_timeout)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        finally:
            self._task = None
            left = list(self._queue) + ([self._inflight] if self._inflight else [])
            if left:
                self.dropped_chunks += len(left)
                self.dropped_records += sum(c.records for c in left)
                log.warning(
                    "%s forwarder to %s stopped with %d chunk(s) not forwarded",
                    self.kind, self.where, len(left),
                )
            self._queue.clear()
            self._inflight = None
            with contextlib.suppress(Exception):
                await self._close()
            self.connected = False

    async def __aenter__(self) -> QueuedForwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the ingest side ----------------------------------------------------------------------
    async def forward(
        self, node_id: str, stream: str, seq_first: int, columns: Mapping[str, np.ndarray]
    ) -> None:
        """Queue a committed chunk; drops (and counts) the oldest queued one when full."""
        if self._task is None or self._wake is None or self._idle is None:
            raise RuntimeError(f"{self.kind} forwarder is not started")
        chunk = Chunk(node_id, stream, seq_first, columns)
        if chunk.records == 0:
            return
        if len(self._queue) >= self.max_queue:
            old = self._queue.popleft()
            self.dropped_chunks += 1
            self.dropped_records += old.records
        self._queue.append(chunk)
        self._idle.clear()
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.where,
            "connected": self.connected,
            "queued_chunks": len(self._queue) + (1 if self._inflight else 0),
            "forwarded_chunks": self.forwarded_chunks,
            "forwarded_records": self.forwarded_records,
            "messages": self.messages,
            "dropped_chunks": self.dropped_chunks,
            "dropped_records": self.dropped_records,
            "refused_chunks": self.refused_chunks,
            "retries": self.retries,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    # -- the worker ---------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wake is not None and self._idle is not None
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            chunk = self._queue.popleft()
            self._inflight = chunk
            await self._deliver(chunk)
            self._inflight = None

    async def _deliver(self, chunk: Chunk) -> None:
        attempt = 0
        while True:
            try:
                if not self.connected:
                    await self._connect()
                    self.connected = True
                sent = await self._send(chunk)
            except ForwardRefused as exc:
                self.refused_chunks += 1
                self.dropped_chunks += 1
                self.dropped_records += chunk.records
                self.last_error = str(exc)
                log.warning(
                    "%s forwarder to %s dropped chunk %s/%s seq %d: %s",
                    self.kind, self.where, chunk.node, chunk.stream, chunk.seq_first, exc,
                )
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if attempt == 0:
                    log.warning(
                        "%s forwarder cannot send to %s (%s); retrying with backoff",
                        self.kind, self.where, self.last_error,
                    )
                self.connected = False
                with contextlib.suppress(Exception):
                    await self._close()
                delay = random.uniform(0, min(self.retry_max, self.retry_min * 2**attempt))
                attempt += 1
                self.retries += 1
                await asyncio.sleep(delay)
                continue
            self.forwarded_chunks += 1
            self.forwarded_records += chunk.records
            self.messages += sent
            return

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Open the connection (raise on failure)."""

    @abc.abstractmethod
    async def _send(self, chunk: Chunk) -> int:
        """Send one chunk and wait until the broker has it; return the messages sent."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """Close the connection, if any (must not raise CancelledError into `stop`)."""


class ForwarderSet:
    """Several forwarders behind one `forward` (what the ingest holds)."""

    def __init__(self, forwarders: Sequence[QueuedForwarder] = ()) -> None:
        self.forwarders = list(forwarders)

    def __bool__(self) -> bool:
        return bool(self.forwarders)

    def __len__(self) -> int:
        return len(self.forwarders)

    async def start(self) -> None:
        started: list[QueuedForwarder] = []
        try:
            for f in self.forwarders:
                await f.start()
                started.append(f)
        except BaseException:
            for f in reversed(started):
                await f.stop()
            raise

    async def stop(self) -> None:
        if self.forwarders:
            await asyncio.gather(*(f.stop() for f in self.forwarders))

    async def __aenter__(self) -> ForwarderSet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def forward(
        self, node_id: str, stream: str, seq_first: int, columns: Mapping[str, np.ndarray]
    ) -> None:
        for f in self.forwarders:
            await f.forward(node_id, stream, seq_first, columns)

    def stats(self) -> list[dict[str, Any]]:
        return [f.stats() for f in self.forwarders]

    async def forward_committed(self, chunks: Sequence[Any], inserted: Any) -> int:
        """Forward the chunks of one group commit that were actually stored.

        ``chunks`` are the `store.ChunkWrite`s given to ``Store.commit_ingest`` and
        ``inserted`` its result's ``chunks`` (keys ``(node, stream, seq_first)``), so a
        duplicate the store skipped is not forwarded again. Each payload is decoded once for
        every forwarder. Returns the number of chunks queued; a payload that does not decode
        (the ingest checked it, so this is a bug) is logged and skipped.
        """
        if not self.forwarders:
            return 0
        from edgewise.sync import codec

        queued = 0
        for c in chunks:
            if (c.node_id, c.stream, c.seq_first) not in inserted:
                continue
            try:
                columns = codec.decode(c.payload)
            except EdgewiseError as exc:
                log.error("not forwarding %s/%s/%d: %s", c.node_id, c.stream, c.seq_first, exc)
                continue
            await self.forward(c.node_id, c.stream, c.seq_first, columns)
            queued += 1
        return queued


FORWARDERS = web.AppKey("forwarders", ForwarderSet)
"""The control plane's forwarders (`setup_data_out`); the ingest calls ``forward_committed``."""


# -- configuration ----------------------------------------------------------------------------


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    per: Literal["record", "chunk"] = "record"
    """One message per record (default) or one per chunk."""
    max_queue: int = Field(default=1000, ge=1)
    """Chunks kept while the broker is unreachable; beyond this the oldest are dropped."""
    retry_min: Duration = 0.2
    retry_max: Duration = 30.0
    flush_timeout: Duration = 5.0
    """On stop, how long queued chunks may take to leave."""
    ack_timeout: Duration = 10.0
    """How long the broker may take to acknowledge a chunk before it is sent again."""


class MqttForwardConfig(_Common):
    type: Literal["mqtt"]
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    client_id: str | None = Field(default=None, max_length=64)
    topic: str = "edgewise/{node}/{stream}"
    qos: Literal[0, 1] = 1
    keepalive: int = Field(default=30, ge=5, le=65535)
    connect_timeout: Duration = 5.0

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        check_template(v, "topic")
        if "+" in v or "#" in v:
            raise ValueError(f"topic template {v!r} contains an MQTT wildcard (+ or #)")
        return v


class NatsForwardConfig(_Common):
    type: Literal["nats"]
    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"], min_length=1)
    subject: str = "edgewise.{node}.{stream}"
    stream_name: str = Field(default="EDGEWISE", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """The JetStream stream that holds the subjects."""
    create_stream: bool = True
    """Create the stream (subjects from the template, ``{...}`` → ``*``) if it does not exist."""
    duplicate_window: Duration = 120.0
    """JetStream's dedupe window for ``Nats-Msg-Id`` when the stream is created here."""
    connect_timeout: Duration = 5.0
    max_inflight: int = Field(default=1000, ge=1, le=4000)
    """Messages published before waiting for their acknowledgements."""

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str) -> str:
        check_template(v, "subject")
        if any(c in v for c in " *>") or v.startswith(".") or v.endswith(".") or ".." in v:
            raise ValueError(f"subject template {v!r} is not a valid NATS subject")
        return v


ForwarderConfig = Annotated[MqttForwardConfig | NatsForwardConfig, Field(discriminator="type")]


class DataOutConfig(BaseModel):
    """The ``forwarders`` and ``retention`` settings of the control plane."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    forwarders: list[ForwarderConfig] = Field(default_factory=list)
    retention: Duration | None = None
    """Keep stored chunks this long (e.g. '7d'); None keeps them forever."""
    prune_every: Duration = 3600.0


def _config_error(exc: ValidationError, where: str) -> ConfigError:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"{where}: {loc}: {e['msg']}" if loc else f"{where}: {e['msg']}")
    return ConfigError("\n".join(lines))


def data_out_config(
    data: Mapping[str, Any] | None, where: str = "data-out config"
) -> DataOutConfig:
    """Validate the ``forwarders``/``retention`` mapping; raises `ConfigError` naming the field."""
    try:
        return DataOutConfig.model_validate(dict(data or {}))
    except ValidationError as exc:
        raise _config_error(exc, where) from None


def build_forwarder(cfg: MqttForwardConfig | NatsForwardConfig) -> QueuedForwarder:
    """One forwarder from its validated config (imports the broker library lazily)."""
    if cfg.type == "mqtt":
        from edgewise.cloud.forward_mqtt import MqttForwarder

        return MqttForwarder(cfg)
    from edgewise.cloud.forward_nats import NatsForwarder

    return NatsForwarder(cfg)


def forwarders_from_config(
    data: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    where: str = "data-out config",
) -> ForwarderSet:
    """A `ForwarderSet` from ``{"forwarders": [...], ...}`` or the bare list. Not started yet."""
    if data is None:
        return ForwarderSet()
    doc: Mapping[str, Any] = {"forwarders": list(data)} if isinstance(data, Sequence) else data
    cfg = data_out_config(doc, where)
    return ForwarderSet([build_forwarder(c) for c in cfg.forwarders])


def load_data_out(path: str) -> DataOutConfig:
    """Read a YAML/JSON file holding ``forwarders`` and ``retention``."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if doc is not None and not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with forwarders and retention")
    return data_out_config(doc, path)


# -- retention --------------------------------------------------------------------------------


def parse_retention(value: str | float | None) -> timedelta | None:
    """``"7d"``, ``"12h"``, seconds, or None/"forever"/"0" (keep everything)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "forever")):
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"retention: {exc}") from None
    return None if seconds == 0 else timedelta(seconds=seconds)


async def prune(store: Any, older_than: datetime | timedelta, *, batch: int = 10_000) -> int:
    """Delete stored chunks received before ``older_than`` (a time, or an age from now).

    Returns the number of chunks deleted. Works over the whole store (not per node), in
    transactions of at most ``batch`` chunks (`Store.purge_chunks`) so writers are not
    blocked for long; stream marks and counters are kept.
    """
    if isinstance(older_than, timedelta):
        cutoff = datetime.now(UTC) - older_than
    else:
        if older_than.tzinfo is None:
            raise ValueError("older_than must be timezone-aware (use datetime.now(UTC))")
        cutoff = older_than
    total = 0
    while True:
        n = int(await store.purge_chunks(cutoff, limit=batch))
        total += n
        if n < batch:
            return total
        await asyncio.sleep(0)  # let sessions and ingest in between batches


async def run_retention(store: Any, keep: timedelta, every: float = 3600.0, *,
                        first_delay: float = 0.0) -> None:
    """Prune chunks older than ``keep`` after ``first_delay`` s and then every ``every`` s,
    until cancelled.

    The control plane runs one of these for the whole store. Errors are logged and retried at
    the next period, never raised (a failed prune must not stop the server).
    """
    if first_delay > 0:
        await asyncio.sleep(first_delay)
    while True:
        started = time.monotonic()
        try:
            n = await prune(store, keep)
            if n:
                log.info("retention: pruned %d chunk(s) older than %s", n, keep)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("retention: pruning failed; will retry in %.0f s", every)
        await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))


# -- wiring into the control plane ------------------------------------------------------------


def setup_data_out(app: web.Application, config: DataOutConfig, *, store_key: Any = None,
                   first_prune_after: float = 10.0) -> ForwarderSet:
    """Give an aiohttp control-plane app its forwarders and its retention task.

    Sets ``app[FORWARDERS]`` and appends a ``cleanup_ctx`` that starts the forwarders and (when
    ``config.retention`` is set) one `run_retention` task for the whole store, and stops both
    on cleanup. Call it after the app's own store lifecycle is in ``cleanup_ctx`` (contexts run
    in order). The ingest then calls ``await app[FORWARDERS].forward_committed(chunks,
    result.chunks)`` after each durable group commit.
    """
    from edgewise.cloud import app as appmod

    forwarders = ForwarderSet([build_forwarder(c) for c in config.forwarders])
    app[FORWARDERS] = forwarders
    key = store_key if store_key is not None else appmod.STORE

    async def data_out(app: web.Application) -> AsyncIterator[None]:
        await forwarders.start()
        task: asyncio.Task[None] | None = None
        if config.retention:
            task = asyncio.create_task(
                run_retention(app[key], timedelta(seconds=config.retention),
                              config.prune_every, first_delay=first_prune_after),
                name="edgewise-retention")
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await forwarders.stop()

    app.cleanup_ctx.append(data_out)
    return forwarders
