"""The MQTT connection shared by the MQTT source and sink: gmqtt glue and `MqttLink`.

`MqttLink` keeps one connection up from one task of ours: it connects, waits for the connection
to end and reconnects, paced by the shared reconnect policy (`edgewise.common.backoff.Retry`:
full jitter under a ceiling that starts at the owner's ``reconnect_min`` and doubles up to its
``reconnect_max``; failures are forgotten once a connection has stayed up for
``RESET_AFTER_S``). Every attempt uses a fresh gmqtt client, whose own reconnect is switched off:
gmqtt reconnects with a fixed delay, always without a clean start, and from a task nobody owns,
which reconnects even after ``disconnect()`` (docs/decisions/0005-mqtt-client.md). The owner
hears of each connection, failed attempt and lost connection (`LinkEvents`) and decides what to
log and whether a refusal ends the run (`refused_for_good`).

gmqtt internals this relies on (checked by `gmqtt_handler` whenever a client is made, so a gmqtt
that changed them fails at start with a clear error; tests/integration/test_source_mqtt.py guards
them too): the client's ``_package_handler`` calls ``client.reconnect(delay=True)`` when a
connection ends, passes each inbound QoS 1 PUBLISH to ``_handle_qos_1_publish_packet(mid, packet,
print_topic, properties)`` (the only place the packet id is known; with a plain on_message and
``optimistic_acknowledgement=False`` gmqtt then sends no PUBACK) and sends a PUBACK with
``_send_puback(mid, reason_code=0)``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

import gmqtt
from gmqtt.mqtt.handler import MQTTConnectError

from edgewise.common.backoff import Retry
from edgewise.errors import ConfigError

log = logging.getLogger(__name__)

GMQTT_TESTED = ">=0.8,<0.9"  # the gmqtt versions whose internals (below) were checked
CLOSE_TIMEOUT_S = 2.0  # waiting for our DISCONNECT to close the socket
RESET_AFTER_S = 30.0  # connected this long: earlier connection failures are forgotten
# CONNACK reason codes that retrying will not fix: the configuration has to change
REFUSED_FOR_GOOD = {
    5: {
        0x85: "client identifier not valid",
        0x86: "bad user name or password",
        0x87: "not authorized",
        0x8A: "banned",
        0x8C: "bad authentication method",
    },
    4: {  # MQTT 3.1.1 return codes
        2: "client identifier rejected",
        4: "bad user name or password",
        5: "not authorized",
    },
}


class GmqttClient(gmqtt.Client):
    """gmqtt's client without its own reconnect: `MqttLink` reconnects instead."""

    async def reconnect(self, delay: bool = False) -> None:
        """gmqtt calls this when a connection ends; our link task takes care of it."""
        return None


def gmqtt_version() -> str:
    try:
        return version("gmqtt")
    except PackageNotFoundError:  # pragma: no cover - an unpackaged checkout
        return str(getattr(gmqtt, "__version__", "?"))


_HOOKS = {  # private gmqtt methods we call or replace, with the parameters we rely on
    "_handle_qos_1_publish_packet": ["mid", "packet", "print_topic", "properties"],
    "_send_puback": ["mid", "reason_code"],
}


def gmqtt_handler(client: gmqtt.Client, who: str, manual_ack: bool) -> Any:
    """gmqtt's packet handler of ``client``, once the private parts we rely on are checked.

    Raises ConfigError naming what is missing when the installed gmqtt differs from the ones
    tested (``GMQTT_TESTED``): better to refuse at start than to lose acknowledgements.
    """
    missing = []
    handler = getattr(client, "_package_handler", None)
    if handler is None:
        missing.append("Client._package_handler")
    else:
        callback = getattr(handler, "_reconnect_callback", None)
        if getattr(callback, "__func__", None) is not GmqttClient.reconnect:
            missing.append("MqttPackageHandler._reconnect_callback = Client.reconnect")
        if manual_ack:
            for name, params in _HOOKS.items():
                fn = getattr(handler, name, None)
                if not callable(fn) or list(inspect.signature(fn).parameters) != params:
                    missing.append(f"MqttPackageHandler.{name}({', '.join(params)})")
    if missing:
        raise ConfigError(
            f"{who}: the installed gmqtt {gmqtt_version()} does not have {'; '.join(missing)}, "
            f"which Edgewise relies on; install a tested version: pip install 'gmqtt{GMQTT_TESTED}'"
        )
    return handler


def refused_for_good(exc: MQTTConnectError, protocol: int) -> str | None:
    """Why the broker refused, when retrying will not help (else None)."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    return REFUSED_FOR_GOOD[protocol].get(code) if code is not None else None


class LinkEvents(Protocol):
    """What `MqttLink` tells its owner, on the event loop."""

    def link_connected(self, client: gmqtt.Client) -> None: ...

    def link_failed(self, client: gmqtt.Client, error: Exception) -> None:
        """An attempt failed: OSError, TimeoutError or MQTTConnectError. May raise to end."""

    def link_lost(self, client: gmqtt.Client) -> None: ...


def _setter(event: asyncio.Event) -> Callable[..., None]:
    return lambda *_: event.set()


class MqttLink:
    """Keeps one MQTT connection up from one task (`run`); cancel the task to disconnect.

    Each attempt uses a fresh client from ``make_client`` (a `GmqttClient`), so a connection's
    state (packet ids, in-flight messages, callbacks) never leaks into the next one. After a
    failed attempt or a lost connection it waits what ``retry`` (the owner's
    `edgewise.common.backoff.Retry`) says: a connection that stayed up for its ``reset_after``
    starts again from the shortest ceiling, one that keeps dropping right away backs off.
    """

    def __init__(
        self,
        make_client: Callable[[], gmqtt.Client],
        events: LinkEvents,
        *,
        host: str,
        port: int,
        keepalive: int,
        protocol: int,
        connect_timeout: float,
        retry: Retry,
    ) -> None:
        self.make_client = make_client
        self.events = events
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.protocol = protocol
        self.connect_timeout = connect_timeout
        self.retry = retry

    async def run(self) -> None:
        retry = self.retry
        client: gmqtt.Client | None = None
        lost = asyncio.Event()
        open_ = False  # may the client's socket be open (so it needs our DISCONNECT)
        try:
            while True:
                client = self.make_client()
                lost = asyncio.Event()
                client.on_disconnect = _setter(lost)  # bound now: old clients may call late
                open_ = True
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        await client.connect(
                            self.host, self.port, keepalive=self.keepalive, version=self.protocol
                        )
                except TimeoutError as exc:  # TCP or CONNACK too slow: close what is open
                    await self._close(client)
                    open_ = False
                    self.events.link_failed(client, exc)
                except (OSError, MQTTConnectError) as exc:
                    if client.is_connected:  # refused, and the broker left the socket open
                        await self._close(client)
                    open_ = False
                    self.events.link_failed(client, exc)
                else:
                    retry.connected()
                    self.events.link_connected(client)
                    await lost.wait()
                    open_ = False
                    self.events.link_lost(client)
                await asyncio.sleep(retry.failed())
        finally:
            if client is not None and open_ and not lost.is_set():
                await self._close(client)

    @staticmethod
    async def _close(client: gmqtt.Client) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await client.disconnect()
        except (OSError, TimeoutError) as exc:
            log.debug("closing an MQTT connection: %r", exc)
