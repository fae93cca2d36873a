"""Forward stored records to NATS JetStream (nats-py), subject ``edgewise.{node}.{stream}``.

Every message carries the header ``Nats-Msg-Id: {node}:{stream}:{seq}`` (``seq`` of the record,
or the chunk's first one with ``per: chunk``), so JetStream drops a message it has already
stored within its duplicate window: a chunk forwarded again after a lost acknowledgement, or
after a control-plane restart, is stored once. The acknowledgements say so (``duplicate``) and
are counted as ``duplicates``.

On connect, if ``create_stream`` is set and no stream holds the subjects yet, the forwarder
creates ``stream_name`` with the template's subjects (each ``{...}`` becomes ``*``). Messages are
published asynchronously, at most ``max_inflight`` before their acknowledgements are awaited.
nats-py's own reconnection is turned off: the base class (`dataout.sender.QueuedForwarder`)
reconnects with backoff and resends the chunk that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from edgewise.cloud.dataout.config import NatsForwardConfig
from edgewise.cloud.dataout.render import Chunk, render
from edgewise.cloud.dataout.sender import ForwardRefused, QueuedForwarder
from edgewise.errors import TransportError

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_FIELD = re.compile(r"\{[a-z]+\}")
MSG_ID = "Nats-Msg-Id"


def subject_token(value: str) -> str:
    """A node id or stream name made safe as one subject token (``.``, ``*``, ``>`` → ``_``)."""
    return _UNSAFE.sub("_", value) or "_"


def subject_filter(template: str) -> str:
    """The subjects a template can produce as a JetStream filter: ``a.{node}.{x}`` → ``a.*.*``."""
    return _FIELD.sub("*", template)


def msg_id(node: str, stream: str, seq: int) -> str:
    return f"{node}:{stream}:{seq}"


class NatsForwarder(QueuedForwarder):
    kind = "nats"

    def __init__(self, config: NatsForwardConfig) -> None:
        super().__init__(
            max_queue=config.max_queue,
            retry_min=config.retry_min,
            retry_max=config.retry_max,
            flush_timeout=config.flush_timeout,
        )
        self.config = config
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self.duplicates = 0
        self.stream_created = False

    @property
    def where(self) -> str:
        return ",".join(self.config.servers)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "duplicates": self.duplicates}

    # -- connection ---------------------------------------------------------------------------
    async def _error_cb(self, exc: Exception) -> None:
        log.debug("nats forwarder: %s", exc)

    async def _connect(self) -> None:
        cfg = self.config
        if self._nc is not None:
            await self._close()
        try:
            # nats-py tries each server max_reconnect_attempts + 1 times (0 means forever)
            nc = await asyncio.wait_for(
                nats.connect(
                    servers=cfg.servers,
                    connect_timeout=cfg.connect_timeout,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.0,
                    error_cb=self._error_cb,
                    name="edgewise-forwarder",
                ),
                2 * cfg.connect_timeout * len(cfg.servers) + 1.0,
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            raise TransportError(f"cannot reach NATS at {self.where}: {exc}") from None
        self._nc = nc
        js = nc.jetstream(timeout=cfg.ack_timeout, publish_async_max_pending=cfg.max_inflight)
        self._js = js
        if cfg.create_stream:
            await self._ensure_stream(js)
        log.info("nats forwarder connected to %s", self.where)

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        cfg = self.config
        subjects = subject_filter(cfg.subject)
        try:
            await js.stream_info(cfg.stream_name)
            return
        except nats.js.errors.NotFoundError:
            pass
        try:
            await js.add_stream(
                name=cfg.stream_name,
                subjects=[subjects],
                duplicate_window=cfg.duplicate_window,
            )
        except nats.js.errors.BadRequestError as exc:
            # e.g. another stream already holds these subjects: publish into that one
            log.warning(
                "nats forwarder: cannot create stream %s for %s (%s); publishing anyway",
                cfg.stream_name, subjects, exc.description,
            )
            return
        self.stream_created = True
        log.info("nats forwarder: created JetStream stream %s for %s", cfg.stream_name, subjects)

    async def _close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is None or nc.is_closed:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2.0)

    # -- sending ------------------------------------------------------------------------------
    async def _send(self, chunk: Chunk) -> int:
        nc, js = self._nc, self._js
        if nc is None or js is None or not nc.is_connected:
            raise TransportError(f"not connected to NATS at {self.where}")
        cfg = self.config
        subject = cfg.subject.format(
            node=subject_token(chunk.node), stream=subject_token(chunk.stream)
        )
        messages = render(chunk, cfg.per)
        limit = nc.max_payload
        for start in range(0, len(messages), cfg.max_inflight):
            window = messages[start : start + cfg.max_inflight]
            futures: list[asyncio.Future[Any]] = []
            try:
                for seq, payload in window:
                    if len(payload) > limit:
                        raise ForwardRefused(
                            f"message of {len(payload)} bytes is over the server's max_payload "
                            f"of {limit} bytes (use per: record)"
                        )
                    futures.append(
                        await js.publish_async(
                            subject, payload,
                            headers={MSG_ID: msg_id(chunk.node, chunk.stream, seq)},
                        )
                    )
                acks = await asyncio.wait_for(asyncio.gather(*futures), cfg.ack_timeout)
            except nats.js.errors.TooManyStalledMsgsError:
                # nats-py turns a cancellation while it waits for its semaphore into this
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from None
                raise
            except TimeoutError:
                raise TransportError(
                    f"JetStream at {self.where} did not acknowledge {len(futures)} message(s) "
                    f"within {cfg.ack_timeout} s"
                ) from None
            except nats.js.errors.NoStreamResponseError:
                raise TransportError(
                    f"no JetStream stream holds subject {subject!r} at {self.where}; create one "
                    "or set create_stream: true"
                ) from None
            finally:
                for fut in futures:
                    if not fut.done():
                        fut.cancel()
                    elif not fut.cancelled():
                        fut.exception()  # retrieved: one failure must not warn for the rest
            self.duplicates += sum(1 for a in acks if a.duplicate)
        return len(messages)
