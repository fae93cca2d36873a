"""HTTP ingest source: devices and gateways POST readings to the node.

An aiohttp server listens on ``host``:``port`` (default 127.0.0.1:8080) and takes ``POST`` on
``path`` (default ``/ingest``) with either

* NDJSON (``Content-Type: application/x-ndjson``): one reading object per line, or
* JSON (``application/json``, also assumed when no type is given): one reading object or an array.

Each request becomes one batch, every record stamped with the request's arrival time
(``_accepted``). Replies:

* ``202 {"accepted": n, "rejected": m, "errors": [...]}`` once the batch is in the engine's queue
  (``respond_after: queued``, the default) or once it is durably committed to the outbox
  (``respond_after: committed``: a 202 then means the node owns those readings even if it crashes
  the next moment). Rejected records become dead letters; ``errors`` lists the first few reasons.
* ``400`` when nothing in the body was a usable reading (the reasons are in the reply and, per
  record, in the dead letters), ``401`` without the right bearer ``token`` (when one is set),
  ``413`` for a body over ``max_body_bytes``, ``415`` for another content type.

``max_body_bytes`` defaults to 8 MiB: room for about 100,000 readings of the factory line per
request, while bounding the memory one request can take on a small node.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Literal

import numpy as np
import orjson
from aiohttp import web
from pydantic import Field, field_validator

from edgewise.errors import ConfigError
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import ComponentConfig, RunContext, Source, SourceOutput
from edgewise.pipeline.sources.parse import parse_json_lines, readings_from_dicts
from edgewise.pipeline.units import ByteSize, Duration

log = logging.getLogger(__name__)

NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl",
                "application/x-jsonlines"}
JSON_TYPES = {"application/json", "text/json", "application/octet-stream", ""}
MAX_ERRORS_IN_REPLY = 20


class HttpConfig(ComponentConfig):
    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)."""
    port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port (see `HttpSource.port`)
    """TCP port to listen on; 0: any free port."""
    path: str = "/ingest"
    """URL path that accepts readings (POST); must start with '/'."""
    token: str | None = Field(default=None, min_length=8)
    """Bearer token required in ``Authorization: Bearer <token>``; none: no authentication."""
    max_body_bytes: ByteSize = 8 * 1024 * 1024
    """A larger request body is refused (413) before it is read whole."""
    respond_after: Literal["queued", "committed"] = "queued"
    """queued: answer 202 once the readings are in the engine's queue; committed: once they are
    durably in the outbox."""
    commit_timeout: Duration = 30.0
    """respond_after: committed: reply 503 when the commit takes longer than this (seconds)."""

    @field_validator("path")
    @classmethod
    def _path_absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r} must start with '/'")
        return v


class HttpSource(Source):
    Config = HttpConfig

    def __init__(self, id: str, config: HttpConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.port: int | None = None  # bound port, once listening
        self._seq = 0
        self._acked = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._emit_lock: asyncio.Lock | None = None
        self.requests = 0
        self.accepted = 0
        self.rejected = 0
        self.bad_requests = 0
        self.unauthorized = 0
        self.too_large = 0

    # -- engine interface ---------------------------------------------------------------------
    def restore(self, position: Any) -> None:
        if isinstance(position, int):
            self._seq = self._acked = position

    def ack(self, position: Any) -> None:
        if not isinstance(position, int) or position <= self._acked:
            return
        self._acked = position
        still = []
        for seq, fut in self._waiters:
            if seq <= position:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((seq, fut))
        self._waiters = still

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "bad_requests": self.bad_requests,
            "unauthorized": self.unauthorized,
            "too_large": self.too_large,
            "port": self.port,
        }

    async def run(self, out: SourceOutput) -> None:
        cfg = self.config
        self._emit_lock = asyncio.Lock()
        app = web.Application(client_max_size=cfg.max_body_bytes)
        app.router.add_post(cfg.path, self._handler(out))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, cfg.host, cfg.port)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(
                    f"source {self.id!r}: cannot listen on {cfg.host}:{cfg.port}: "
                    f"{exc.strerror or exc}; pick another port or stop what uses it"
                ) from None
            self.port = int(runner.addresses[0][1])
            log.info("source %s: accepting readings on http://%s:%d%s",
                     self.id, cfg.host, self.port, cfg.path)
            await asyncio.Event().wait()  # serve until cancelled
        finally:
            for _, fut in self._waiters:
                fut.cancel()
            self._waiters.clear()
            await runner.cleanup()

    # -- requests -----------------------------------------------------------------------------
    def _handler(self, out: SourceOutput) -> Any:
        cfg = self.config

        async def ingest(request: web.Request) -> web.Response:
            arrived = time.perf_counter()
            self.requests += 1
            if cfg.token is not None and not self._authorized(request):
                self.unauthorized += 1
                return web.json_response(
                    {"error": "missing or wrong bearer token"}, status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="edgewise"'},
                )
            if request.content_length is not None and request.content_length > cfg.max_body_bytes:
                return self._too_large(request.content_length)
            ctype = request.content_type if request.headers.get("Content-Type") else ""
            if ctype not in NDJSON_TYPES and ctype not in JSON_TYPES:
                self.bad_requests += 1
                return web.json_response(
                    {"error": f"unsupported Content-Type {ctype!r}; send application/x-ndjson "
                              "or application/json"}, status=415)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._too_large(None)
            if not body.strip():
                self.bad_requests += 1
                return web.json_response({"error": "empty body; send readings"}, status=400)

            if ctype in NDJSON_TYPES:
                numbered = [(k, ln) for k, ln in enumerate(body.split(b"\n"), 1) if ln.strip()]
                raws = [ln for _, ln in numbered]
                batch, bad = parse_json_lines(raws)
                errors = [f"line {numbered[i][0]}: {reason}" for i, reason in bad]
            else:
                batch, bad, errors, raws = self._parse_json(body)
            for (i, _), text in zip(bad, errors, strict=True):
                out.dead_letter(f"POST {cfg.path} from {request.remote}: {text}", raws[i])
            self.rejected += len(bad)
            if batch.n == 0:
                self.bad_requests += 1
                return web.json_response(
                    {"error": "no usable readings in the body", "accepted": 0,
                     "rejected": len(bad), "errors": errors[:MAX_ERRORS_IN_REPLY]},
                    status=400,
                )
            batch = batch.with_columns(**{ACCEPTED: np.full(batch.n, arrived)})
            status = await self._hand_over(out, batch)
            if status is not None:
                return status
            self.accepted += batch.n
            reply: dict[str, Any] = {"accepted": batch.n, "rejected": len(bad)}
            if errors:
                reply["errors"] = errors[:MAX_ERRORS_IN_REPLY]
            return web.json_response(reply, status=202)

        return ingest

    async def _hand_over(self, out: SourceOutput, batch: Batch) -> web.Response | None:
        """Put the batch in the engine's queue; with respond_after: committed, wait for it."""
        fut: asyncio.Future[None] | None = None
        # one emit at a time, so batches enter the engine in position order (a position then
        # acknowledges exactly the batches up to it)
        assert self._emit_lock is not None
        async with self._emit_lock:
            self._seq += 1
            seq = self._seq
            if self.config.respond_after == "committed":
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append((seq, fut))
            await out.emit(batch, seq)
        if fut is None:
            return None
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.config.commit_timeout)
        except TimeoutError:
            return web.json_response(
                {"error": "queued but not yet committed; it may still be stored",
                 "accepted": batch.n}, status=503)
        return None

    @staticmethod
    def _parse_json(
        body: bytes,
    ) -> tuple[Batch, list[tuple[int, str]], list[str], list[bytes]]:
        """A JSON object or array → (batch, bad, error texts, raw bytes per record index)."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return Batch.empty(), [(0, "")], [f"malformed JSON: {exc}"], [body]
        if isinstance(doc, list):
            batch, bad = readings_from_dicts(doc)
            raws = [b""] * len(doc)
            for i, _ in bad:
                raws[i] = orjson.dumps(doc[i], default=str)
            return batch, bad, [f"record {i + 1}: {reason}" for i, reason in bad], raws
        batch, bad = readings_from_dicts([doc])
        return batch, bad, [reason for _, reason in bad], [body]

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        assert self.config.token is not None
        return hmac.compare_digest(token.strip().encode(), self.config.token.encode())

    def _too_large(self, size: int | None) -> web.Response:
        self.too_large += 1
        limit = self.config.max_body_bytes
        what = f"{size} bytes" if size is not None else "the body"
        return web.json_response(
            {"error": f"{what} is over max_body_bytes={limit}; split it into smaller requests"},
            status=413,
        )
