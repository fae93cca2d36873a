"""Data out, the wiring: forwarders built from their settings, and plugged into the app.

``setup_data_out(app, data_out_config(doc))`` sets ``app[FORWARDERS]`` and adds a
``cleanup_ctx`` that starts and stops the forwarders and the retention task
(`edgewise.cloud.retention`); after each durable group commit the ingest calls ``await
app[FORWARDERS].forward_committed(chunks, result.chunks)``, which forwards only the chunks the
store actually inserted (a duplicate batch is not forwarded twice). `app.create_app` calls it
when ``CloudConfig.data_out`` is set, and hands ``forward_committed`` to the group commit.

Outside the app: ``async with forwarders_from_config(cfg) as fwd: ... await fwd.forward(...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

from aiohttp import web

from edgewise.cloud.dataout.config import (
    DataOutConfig,
    MqttForwardConfig,
    NatsForwardConfig,
    data_out_config,
)
from edgewise.cloud.dataout.sender import ForwarderSet, QueuedForwarder
from edgewise.cloud.retention import run_retention
from edgewise.cloud.state import STORE
from edgewise.cloud.store import Store

FORWARDERS = web.AppKey("forwarders", ForwarderSet)
"""The control plane's forwarders (`setup_data_out`); the ingest calls ``forward_committed``."""


def build_forwarder(cfg: MqttForwardConfig | NatsForwardConfig) -> QueuedForwarder:
    """One forwarder from its validated config (imports the broker library lazily)."""
    if cfg.type == "mqtt":
        from edgewise.cloud.dataout.mqtt import MqttForwarder

        return MqttForwarder(cfg)
    from edgewise.cloud.dataout.nats import NatsForwarder

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


def setup_data_out(app: web.Application, config: DataOutConfig, *,
                   store_key: web.AppKey[Store] = STORE,
                   first_prune_after: float = 10.0) -> ForwarderSet:
    """Give an aiohttp control-plane app its forwarders and its retention task.

    Sets ``app[FORWARDERS]`` and appends a ``cleanup_ctx`` that starts the forwarders and (when
    ``config.retention`` is set) one `run_retention` task for the whole store, and stops both
    on cleanup. Call it after the app's own store lifecycle is in ``cleanup_ctx`` (contexts run
    in order). The ingest then calls ``await app[FORWARDERS].forward_committed(chunks,
    result.chunks)`` after each durable group commit.
    """
    forwarders = ForwarderSet([build_forwarder(c) for c in config.forwarders])
    app[FORWARDERS] = forwarders

    async def data_out(app: web.Application) -> AsyncIterator[None]:
        await forwarders.start()
        task: asyncio.Task[None] | None = None
        if config.retention:
            task = asyncio.create_task(
                run_retention(app[store_key], timedelta(seconds=config.retention),
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
