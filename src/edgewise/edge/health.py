"""The node's health for its heartbeat (`sync.health.NodeHealth`; docs/operations.md,
"Health states"): what the control plane needs to tell a degraded node from a healthy one.

`HealthProbe.sample` reads, each heartbeat (every 15 s by default), only what is cheap:
the agent process's CPU share since the previous sample (``time.process_time``), its resident
memory (``/proc/self/statm``, or the peak from ``getrusage`` where there is no /proc), free and
total space where the node's data lives (``shutil.disk_usage``), the outbox's waiting records
per priority (its in-memory counts) and the age of the oldest waiting chunk per priority (one
indexed lookup each, `OutboxView.oldest_pending`, in a worker thread), the engine supervisor's
state and error, the release running and the newest that failed (the updater's status), and
the certificate's expiry. No sample fails the heartbeat: a figure that cannot be read is left
out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from edgewise.errors import StorageError
from edgewise.outbox import Outbox
from edgewise.outbox.view import OutboxView
from edgewise.sync import protocol as P
from edgewise.sync.health import NodeHealth, OutboxLevel, PipelineHealth

log = logging.getLogger(__name__)


HealthSource = Callable[[], Awaitable[dict[str, Any]]]  # `HealthProbe.sample`


async def heartbeat(health: HealthSource | None) -> dict[str, Any]:
    """The uplink's next heartbeat: with the node's health when there is a source (a sample
    that fails is logged and left out, the heartbeat still goes) and ``ts``, the node's
    time when it is built (the control plane reads the clock offset from it)."""
    msg: dict[str, Any] = {"t": P.HEARTBEAT}
    if health is not None:
        try:
            msg["health"] = await health()
        except Exception as exc:
            log.warning("cannot sample the node's health: %s", exc)
    msg["ts"] = time.time()
    return msg


class AgentParts(Protocol):
    """What the probe reads of the agent (`edge.agent.Agent`)."""

    data_dir: Path
    outbox: Outbox
    view: OutboxView
    supervisor: Any  # .status() -> EngineStatus
    updater: Any  # .reportable(), .status() -> dict
    identity: Any  # .cert: CertInfo | None


def _rss() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        with contextlib.suppress(Exception):
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return None


class HealthProbe:
    def __init__(self, agent: AgentParts) -> None:
        self.agent = agent
        self._cpu = (time.monotonic(), time.process_time())

    def _cpu_percent(self) -> float | None:
        wall, cpu = time.monotonic(), time.process_time()
        (wall0, cpu0), self._cpu = self._cpu, (wall, cpu)
        if wall - wall0 <= 0:
            return None
        return round(min(max(100.0 * (cpu - cpu0) / (wall - wall0), 0.0), 100_000.0), 1)

    async def sample(self) -> dict[str, Any]:
        """The health map for the next heartbeat (`NodeHealth.to_wire`)."""
        a = self.agent
        now = time.time()
        waiting: dict[int, int] = {}
        for s in a.outbox.stats().values():
            waiting[s.priority] = waiting.get(s.priority, 0) + s.pending_records
        try:
            oldest = await asyncio.to_thread(a.view.oldest_pending, waiting)
        except StorageError:
            oldest = {}
        outbox = {p: OutboxLevel(n, round(max(now - oldest[p], 0.0), 1) if p in oldest else 0.0)
                  for p, n in waiting.items()}
        eng = a.supervisor.status()
        pipelines = {eng.pipeline or "-": PipelineHealth(eng.state or "-", eng.error)} \
            if eng.pipeline or eng.error else {}
        release = failed = None
        if a.updater.reportable():
            st = a.updater.status()
            release = st.get("running")
            failed = (st.get("failed") or [None])[-1]
        free = total = None
        with contextlib.suppress(OSError):
            usage = shutil.disk_usage(a.data_dir)
            free, total = usage.free, usage.total
        cert = a.identity.cert
        return NodeHealth(
            cpu_percent=self._cpu_percent(), memory_bytes=_rss(), disk_free_bytes=free,
            disk_total_bytes=total, outbox=outbox, pipelines=pipelines, release=release,
            release_failed=failed,
            cert_expires=cert.not_after.timestamp() if cert is not None else None,
        ).to_wire()
