"""Forward stored records to an MQTT broker (paho-mqtt), topic ``edgewise/{node}/{stream}``.

One paho client per forwarder, its network thread started with ``loop_start``; paho's callbacks
hop onto the event loop with ``call_soon_threadsafe``. A chunk counts as forwarded once every
message of it is acknowledged (PUBACK for QoS 1, written to the socket for QoS 0). When the
connection drops, the chunk being sent fails, the client is closed and the base class
(`dataout.sender.QueuedForwarder`) reconnects with backoff and sends the chunk again
(at-least-once: an MQTT subscriber can see a message twice after a reconnect; ``seq`` in each
message identifies it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from edgewise.cloud.dataout.config import MqttForwardConfig
from edgewise.cloud.dataout.render import Chunk, render
from edgewise.cloud.dataout.sender import ForwardRefused, QueuedForwarder
from edgewise.errors import TransportError

log = logging.getLogger(__name__)

# QoS 1 messages paho keeps unacknowledged on the wire; per-record forwarding measured 3.5k,
# 4.2k and 5.7k records/s with 20, 100 and 1000 (docs/operations.md)
MAX_INFLIGHT = 1000


def topic_part(value: str) -> str:
    """A node id or stream name made safe as part of a topic (no wildcards, no NUL)."""
    return value.replace("+", "_").replace("#", "_").replace("\x00", "_")


class MqttForwarder(QueuedForwarder):
    kind = "mqtt"

    def __init__(self, config: MqttForwardConfig) -> None:
        super().__init__(
            max_queue=config.max_queue,
            retry_min=config.retry_min,
            retry_max=config.retry_max,
            flush_timeout=config.flush_timeout,
        )
        self.config = config
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connack: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}

    @property
    def where(self) -> str:
        return f"mqtt://{self.config.host}:{self.config.port}"

    # -- connection ---------------------------------------------------------------------------
    async def _connect(self) -> None:
        cfg = self.config
        if self._client is not None:  # dropped between chunks: start from a fresh client
            await self._close()
        self._loop = asyncio.get_running_loop()
        self._connack = self._loop.create_future()
        client_id = cfg.client_id or f"edgewise-forward-{uuid.uuid4().hex[:12]}"
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        client.connect_timeout = cfg.connect_timeout
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        try:
            await asyncio.to_thread(client.connect, cfg.host, cfg.port, cfg.keepalive)
        except OSError as exc:
            self._client = None
            raise TransportError(f"cannot reach the MQTT broker at {self.where}: {exc}") from None
        client.loop_start()
        try:
            await asyncio.wait_for(self._connack, cfg.connect_timeout)
        except TimeoutError:
            raise TransportError(
                f"the MQTT broker at {self.where} did not answer within {cfg.connect_timeout} s"
            ) from None
        log.info("mqtt forwarder connected to %s", self.where)

    async def _close(self) -> None:
        client, self._client = self._client, None
        self._fail_pending(TransportError(f"connection to {self.where} closed"))
        if client is None:
            return
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)

    # -- sending ------------------------------------------------------------------------------
    async def _send(self, chunk: Chunk) -> int:
        client = self._client
        loop = self._loop
        if client is None or loop is None or not client.is_connected():
            raise TransportError(f"not connected to {self.where}")
        cfg = self.config
        topic = cfg.topic.format(node=topic_part(chunk.node), stream=topic_part(chunk.stream))
        messages = render(chunk, cfg.per)
        waits: list[asyncio.Future[None]] = []
        for _seq, payload in messages:
            try:
                info = client.publish(topic, payload, cfg.qos)
            except ValueError as exc:  # e.g. payload over MQTT's 256 MiB limit, bad topic
                raise ForwardRefused(f"cannot publish to {topic!r}: {exc}") from None
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise TransportError(
                    f"publishing to {self.where} failed: {mqtt.error_string(info.rc)}"
                )
            fut = loop.create_future()
            self._pending[info.mid] = fut
            waits.append(fut)
        try:
            await asyncio.wait_for(asyncio.gather(*waits), cfg.ack_timeout)
        except TimeoutError:
            raise TransportError(
                f"the MQTT broker at {self.where} did not acknowledge {len(waits)} message(s) "
                f"within {cfg.ack_timeout} s"
            ) from None
        finally:
            for fut in waits:
                fut.cancel()  # no-op for the done ones
        return len(messages)

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: a chunk may have failed on another message

    # -- paho callbacks (paho's thread) -------------------------------------------------------
    def _call(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(fn, *args)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if client is self._client:
            self._call(self._connected, None if not reason.is_failure else str(reason))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if client is self._client:
            self._call(self._disconnected, str(reason))

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        if client is self._client:
            self._call(self._acked, mid)

    # -- on the event loop --------------------------------------------------------------------
    def _connected(self, refused: str | None) -> None:
        fut = self._connack
        if fut is None or fut.done():
            return
        if refused is None:
            fut.set_result(None)
        else:
            fut.set_exception(
                TransportError(f"the MQTT broker at {self.where} refused the connection: "
                               f"{refused}")
            )

    def _disconnected(self, reason: str) -> None:
        self.connected = False
        self._fail_pending(TransportError(f"lost the connection to {self.where}: {reason}"))

    def _acked(self, mid: int) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
