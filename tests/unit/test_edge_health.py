"""`edge.health`: the probe's health map from the agent's parts (outbox counts and ages per
priority, pipeline, release, certificate, disk), and a heartbeat with and without it."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from edgewise.edge.health import HealthProbe, heartbeat
from edgewise.edge.status_model import EngineStatus
from edgewise.outbox import Outbox, PendingChunk
from edgewise.outbox.view import OutboxView
from edgewise.sync.health import NodeHealth


def cols(n: int) -> dict[str, np.ndarray]:
    return {"sensor": np.array(["s"] * n, dtype=object), "ts": np.arange(n, dtype=float),
            "value": np.arange(n, dtype=float)}


async def test_probe_reads_the_agent(tmp_path: Path) -> None:
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    with Outbox(tmp_path / "outbox.db", 64 << 20, sync="normal") as ob, \
            OutboxView(tmp_path / "outbox.db") as view:
        for name, prio in (("alarms", 9), ("raw", 5), ("bulk", 1)):
            ob.register_stream(name, prio)
        ob.commit([PendingChunk("alarms", cols(3), 3), PendingChunk("raw", cols(7), 7)])
        agent: Any = SimpleNamespace(
            data_dir=tmp_path, outbox=ob, view=view,
            supervisor=SimpleNamespace(status=lambda: EngineStatus(
                state="restarting", pipeline="line", error="sink mqtt: refused")),
            updater=SimpleNamespace(reportable=lambda: True, status=lambda: {
                "running": "1.4.0", "failed": ["1.3.0", "1.5.0"]}),
            identity=SimpleNamespace(cert=SimpleNamespace(not_after=expires)))
        h = NodeHealth.from_wire(await HealthProbe(agent).sample())
    assert {p: o.records for p, o in h.outbox.items()} == {9: 3, 5: 7, 1: 0}
    assert h.outbox[1].age_s == 0.0 and 0 <= h.outbox[9].age_s < 60
    assert {n: (p.state, p.error) for n, p in h.pipelines.items()} == {
        "line": ("restarting", "sink mqtt: refused")}
    assert (h.release, h.release_failed) == ("1.4.0", "1.5.0")
    assert h.cert_expires == expires.timestamp()
    usage = shutil.disk_usage(tmp_path)
    assert h.disk_total_bytes == usage.total and h.disk_free_bytes is not None
    assert h.memory_bytes is not None and h.memory_bytes > 0
    assert h.cpu_percent is not None and h.cpu_percent >= 0


async def test_heartbeat_with_and_without_health() -> None:
    async def good() -> dict[str, Any]:
        return {"outbox": {}, "pipelines": {}}

    async def broken() -> dict[str, Any]:
        raise OSError("no /proc")

    msg = await heartbeat(good)
    assert list(msg) == ["t", "health", "ts"] and msg["health"] == {"outbox": {},
                                                                    "pipelines": {}}
    assert list(await heartbeat(None)) == ["t", "ts"]
    assert list(await heartbeat(broken)) == ["t", "ts"]  # the heartbeat still goes
    assert abs(msg["ts"] - datetime.now(UTC).timestamp()) < timedelta(minutes=1).seconds
