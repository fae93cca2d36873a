"""The webhook sink: records POSTed as JSON to an HTTP endpoint on site (a local action).

`write()` runs on the event loop and never waits on the network: it serialises the batch (one
request body, a JSON array; or one body per record, a JSON object, with ``batch: false``) and
appends it to a bounded queue. One background sender task, owned by the sink (started in
`start()`, cancelled and awaited in `stop()`), posts the bodies in order with httpx. A 5xx, 408
or 429 answer or a connection error is retried up to ``retries`` times, paced by the shared
reconnect policy (`edgewise.common.backoff.Retry`: full jitter under a ceiling that starts at
``backoff`` and doubles for each further retry of the request, at most ``backoff_max``; a numeric
Retry-After is honoured within that bound); other 4xx answers are the endpoint rejecting the data
and are not retried.

The queue holds at most ``max_queue`` requests; beyond that the oldest are dropped and counted.
`stop()` gives the sender ``flush_timeout`` to empty the queue, then cancels it; what was left is
reported as ``unsent``.

Counters (``stats()``, in records unless named otherwise): ``written``, ``sent`` (delivered with a
2xx answer), ``failed`` (given up: retries exhausted or rejected), ``dropped`` (queue overflow),
``unsent`` (still queued when stopped), ``queued``, ``requests`` (successful requests),
``retries`` (retried attempts). ``latency`` is accept-to-delivered (the 2xx answer came back),
``handoff_latency`` accept-to-handoff (the sender passed the body to httpx for the first time).

    sinks:
      - id: alarm-hook
        type: webhook
        inputs: [alarms]
        url: http://127.0.0.1:8080/alarms
        bearer_token: s3cret
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import orjson
from pydantic import Field, field_validator, model_validator

from edgewise.common.backoff import Backoff, Retry
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import ComponentConfig, RunContext, Sink
from edgewise.pipeline.latency import LatencyRecorder
from edgewise.pipeline.units import Duration

log = logging.getLogger(__name__)

_OPTS = orjson.OPT_SERIALIZE_NUMPY
_RETRY_STATUS = frozenset({408, 429})


class WebhookConfig(ComponentConfig):
    url: str
    """The http:// or https:// URL records are POSTed to."""
    headers: dict[str, str] = {}
    """Extra HTTP headers sent with every request."""
    bearer_token: str | None = Field(default=None, min_length=1)
    """Sent as Authorization: Bearer <token>; none: no such header."""
    timeout: Duration = 5.0
    """Per request: connect, write, and wait for the answer."""
    retries: int = Field(default=3, ge=0, le=100)
    """Attempts after a failed request (connection error, timeout, 5xx, 408 or 429) before the
    request is dropped and counted."""
    backoff: Duration = 0.2
    """Longest wait before the first retry (the wait is random up to it); doubled for each further
    retry."""
    backoff_max: Duration = 10.0
    """Longest wait between retries."""
    batch: bool = True
    """One request per batch (a JSON array); false: one request per record (a JSON object)."""
    max_queue: int = Field(default=1000, ge=1)
    """Requests waiting to be sent; beyond this the oldest are dropped."""
    flush_timeout: Duration = 2.0
    """On stop, how long the sender may keep going to empty the queue."""
    verify_tls: bool = True
    """false: accept any server certificate (test setups only)."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        try:
            url = httpx.URL(v)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ValueError(f"{v!r} is not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{v!r} is not an http:// or https:// URL with a host")
        return v

    @field_validator("timeout")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be more than 0 seconds")
        return v

    @model_validator(mode="after")
    def _check_auth(self) -> WebhookConfig:
        if self.bearer_token is not None and any(
            k.lower() == "authorization" for k in self.headers
        ):
            raise ValueError("set either bearer_token or an Authorization header, not both")
        if self.backoff <= 0:
            raise ValueError("backoff must be more than 0")
        if self.backoff_max < self.backoff:
            raise ValueError("backoff_max must be at least backoff")
        return self


@dataclass(slots=True)
class _Request:
    body: bytes
    n: int  # records in the body
    accepted: np.ndarray  # accept times of those records (may be empty)


class WebhookSink(Sink):
    """POSTs records as JSON from a bounded queue; see the module docstring."""

    Config = WebhookConfig

    def __init__(self, id: str, config: WebhookConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.latency = LatencyRecorder()
        self.handoff_latency = LatencyRecorder()
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.unsent = 0
        self.requests = 0
        self.retries = 0
        self._queue: deque[_Request] = deque()
        self._inflight: _Request | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._failing_since: float | None = None
        # retry pacing, per request (reset for each); a test may replace it (e.g. with a fixed
        # rng) before start()
        self.retry = Retry(Backoff(config.backoff, config.backoff_max))

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"webhook sink {self.id} is already started")
        cfg = self.config
        headers = {"content-type": "application/json", **cfg.headers}
        if cfg.bearer_token is not None:
            headers["authorization"] = f"Bearer {cfg.bearer_token}"
        self._client = httpx.AsyncClient(
            headers=headers, timeout=cfg.timeout, verify=cfg.verify_tls, trust_env=False
        )
        self._wake = asyncio.Event()
        if self._queue:
            self._wake.set()
        self._task = asyncio.create_task(self._sender(), name=f"webhook-sink-{self.id}")

    async def stop(self) -> None:
        task, client = self._task, self._client
        if task is None or client is None:
            return
        try:
            deadline = time.monotonic() + self.config.flush_timeout
            while (self._queue or self._inflight is not None) and not task.done():
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.005)
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            except Exception as exc:  # the sender guards itself; this is a last resort
                log.error("webhook sink %s: sender failed: %r", self.id, exc)
            finally:
                self._task = None
                self._client = None
                left = list(self._queue)
                if self._inflight is not None:
                    left.append(self._inflight)
                self._queue.clear()
                self._inflight = None
                self.unsent += sum(r.n for r in left)
                if self.unsent:
                    log.warning(
                        "webhook sink %s: stopped with %d record(s) not delivered to %s",
                        self.id, self.unsent, self.config.url,
                    )
                await client.aclose()

    # -- data path (event loop) ---------------------------------------------------------------
    def write(self, batch: Batch) -> None:
        n = batch.n
        if n == 0:
            return
        self.written += n
        records = batch.to_records()
        acc = batch.columns.get(ACCEPTED)
        accepted = (
            np.asarray(acc, dtype=np.float64) if acc is not None else np.empty(0, np.float64)
        )
        queue = self._queue
        if self.config.batch:
            queue.append(_Request(orjson.dumps(records, option=_OPTS), n, accepted))
        else:
            for i, rec in enumerate(records):
                queue.append(_Request(orjson.dumps(rec, option=_OPTS), 1, accepted[i : i + 1]))
        over = len(queue) - self.config.max_queue
        if over > 0:
            lost = 0
            for _ in range(over):
                lost += queue.popleft().n
            if not self.dropped:
                log.warning(
                    "webhook sink %s: queue full (%d requests); dropping the oldest",
                    self.id, self.config.max_queue,
                )
            self.dropped += lost
        if self._wake is not None:
            self._wake.set()

    # -- sender task --------------------------------------------------------------------------
    async def _sender(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            while not self._queue:
                wake.clear()
                await wake.wait()
            req = self._queue.popleft()
            self._inflight = req
            try:
                await self._deliver(req)
            except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:
                # e.g. an answer that cannot be decoded: count it and keep the sender alive
                self.failed += req.n
                log.warning("webhook sink %s: request to %s failed: %r",
                            self.id, self.config.url, exc)
            self._inflight = None

    async def _deliver(self, req: _Request) -> None:
        client = self._client
        assert client is not None
        cfg = self.config
        if len(req.accepted):
            self.handoff_latency.add(time.perf_counter() - req.accepted)
        retry = self.retry
        retry.reset()  # retries are counted per request
        while True:
            delay: float | None = None
            try:
                resp = await client.post(cfg.url, content=req.body)
            except httpx.TransportError as exc:  # refused, reset, timed out, TLS failure
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                retryable = True
            else:
                if resp.is_success:
                    now = time.perf_counter()
                    self.sent += req.n
                    self.requests += 1
                    if len(req.accepted):
                        self.latency.add(now - req.accepted)
                    if self._failing_since is not None:
                        log.info(
                            "webhook sink %s: %s answers again after %.1f s",
                            self.id, cfg.url, time.monotonic() - self._failing_since,
                        )
                        self._failing_since = None
                    return
                code = resp.status_code
                retryable = code >= 500 or code in _RETRY_STATUS
                problem = f"HTTP {code} {resp.reason_phrase}: {resp.text[:200]!r}"
                delay = _retry_after(resp)
            if not retryable or retry.attempts >= cfg.retries:
                self.failed += req.n
                log.warning(
                    "webhook sink %s: giving up on %d record(s) for %s after %d attempt(s): %s",
                    self.id, req.n, cfg.url, retry.attempts + 1, problem,
                )
                return
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.warning(
                    "webhook sink %s: %s failed (%s); retrying with backoff",
                    self.id, cfg.url, problem,
                )
            wait = retry.failed()
            if delay is not None:  # Retry-After: at least that long, within backoff_max
                wait = min(max(delay, wait), cfg.backoff_max)
            self.retries += 1
            await asyncio.sleep(wait)

    # -- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        queued = sum(r.n for r in self._queue)
        if self._inflight is not None:
            queued += self._inflight.n
        return {
            **super().stats(),
            "sent": self.sent,
            "failed": self.failed,
            "dropped": self.dropped,
            "unsent": self.unsent,
            "queued": queued,
            "requests": self.requests,
            "retries": self.retries,
            "latency": self.latency.summary(),
            "handoff_latency": self.handoff_latency.summary(),
        }


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
