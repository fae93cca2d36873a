"""Fleet gauges for Prometheus (docs/operations.md, "Alert rules"): the whole fleet in a
handful of series, computed by one task every `FleetGauges.interval` seconds, never per scrape
and never one series per node (10,000 nodes would be 10,000 series a gauge).

`FleetGauges.refresh` pages through the nodes (`Store.fleet_page`, 1,000 at a time, without
the desired states' pipelines and config), gives
each its state (`fleet_state.classify`) and sums:

    edgewise_fleet_nodes{state}                       nodes per state (all four, 0 included)
    edgewise_fleet_outbox_oldest_seconds{priority}    the oldest waiting outbox chunk of any
                                                      node that is not offline, per priority
    edgewise_fleet_outbox_waiting_records{priority}   records waiting, summed over those nodes
    edgewise_fleet_certificates_expiring              nodes (not revoked) whose certificate
                                                      has less than the threshold left
    edgewise_fleet_failed_updates                     nodes whose assigned release failed on
                                                      them (they run another)
    edgewise_fleet_clock_offset_max_seconds           the largest |clock offset| reported
    edgewise_rollouts{state}                          rollouts per state (the newest 1,000)
    edgewise_fleet_gauges_updated_timestamp_seconds   when these were computed (stale: the
                                                      task or the store is failing)

The collector serves the newest sums at scrape time; before the first refresh it yields
nothing. The rules in deploy/prometheus/edgewise-rules.yml read these names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgewise.cloud.fleet_state import STATES, Thresholds, classify, failed_release
from edgewise.cloud.store import Store
from edgewise.cloud.store.rollouts import Rollouts
from edgewise.errors import StorageError

log = logging.getLogger(__name__)

FLEET_GAUGES: web.AppKey[FleetGauges] = web.AppKey("fleet_gauges")
"""The app's `FleetGauges` (tests call ``refresh``)."""

ROLLOUT_STATES = ("running", "paused", "aborting", "completed", "aborted", "cancelled")
PAGE = 1000


@dataclass
class FleetSummary:
    nodes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    outbox_oldest: dict[int, float] = field(default_factory=dict)
    outbox_waiting: dict[int, int] = field(default_factory=dict)
    certs_expiring: int = 0
    failed_updates: int = 0
    clock_offset_max: float = 0.0
    rollouts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLLOUT_STATES, 0))
    updated: float = 0.0  # epoch seconds
    # every node's state and labels as classified in this pass (the console's fleet counts and
    # state filter read them instead of classifying the whole fleet per page)
    index: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)


class FleetGauges(Collector):
    """See the module docstring. `context` is an aiohttp cleanup context running the task."""

    def __init__(self, store: Store, thresholds: Thresholds | None = None, *,
                 interval: float = 30.0) -> None:
        self.store = store
        self.thresholds = thresholds or Thresholds()
        self.interval = interval
        self.summary: FleetSummary | None = None
        self.failures = 0

    async def refresh(self, now: datetime | None = None) -> FleetSummary:
        t = now or datetime.now(UTC)
        th = self.thresholds
        s = FleetSummary()
        after: str | None = None
        while True:
            page = await self.store.fleet_page(limit=PAGE, after=after, light=True)
            for row in page:
                state = classify(row, t, th).state
                s.nodes[state] += 1
                s.index[row.node.id] = (state, row.node.labels)
                if row.node.revoked:
                    continue
                if (row.node.cert_expiry - t).total_seconds() < th.cert_expiry_s:
                    s.certs_expiring += 1
                if failed_release(row):
                    s.failed_updates += 1
                h: dict[str, Any] = row.health or {}
                offset = h.get("clock_offset_s")
                if offset is not None and state != "offline":
                    s.clock_offset_max = max(s.clock_offset_max, abs(float(offset)))
                if state == "offline":
                    continue
                for prio, (records, age) in (h.get("outbox") or {}).items():
                    p = int(prio)
                    s.outbox_waiting[p] = s.outbox_waiting.get(p, 0) + int(records)
                    s.outbox_oldest[p] = max(s.outbox_oldest.get(p, 0.0),
                                             float(age) if records else 0.0)
            if len(page) < PAGE:
                break
            after = page[-1].node.id
        for r in await Rollouts(self.store).list(limit=1000):
            s.rollouts[r["state"]] = s.rollouts.get(r["state"], 0) + 1
        s.updated = time.time()
        self.summary = s
        return s

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except StorageError as exc:
                self.failures += 1
                log.warning("fleet gauges: %s (tried again in %g s)", exc, self.interval)
            except Exception:  # a bug or a row that does not read: the gauges go stale (an
                self.failures += 1  # alert says so), the task keeps trying
                log.exception("fleet gauges failed (tried again in %g s)", self.interval)
            await asyncio.sleep(self.interval)

    async def context(self, _app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self.run(), name="edgewise-fleet-gauges")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def collect(self) -> Iterator[Any]:
        s = self.summary
        if s is None:
            return
        nodes = GaugeMetricFamily("edgewise_fleet_nodes", "Nodes per health state",
                                  labels=["state"])
        for state, n in s.nodes.items():
            nodes.add_metric([state], n)
        yield nodes
        oldest = GaugeMetricFamily(
            "edgewise_fleet_outbox_oldest_seconds", "Age of the oldest waiting outbox chunk "
            "of any node that is not offline, per priority", labels=["priority"])
        waiting = GaugeMetricFamily(
            "edgewise_fleet_outbox_waiting_records", "Outbox records waiting on the nodes "
            "that are not offline, per priority", labels=["priority"])
        for p in sorted(set(s.outbox_oldest) | set(s.outbox_waiting)):
            oldest.add_metric([str(p)], s.outbox_oldest.get(p, 0.0))
            waiting.add_metric([str(p)], s.outbox_waiting.get(p, 0))
        yield oldest
        yield waiting
        yield GaugeMetricFamily("edgewise_fleet_certificates_expiring",
                                "Nodes whose certificate has less than the threshold left "
                                "(renewal failing)", value=s.certs_expiring)
        yield GaugeMetricFamily("edgewise_fleet_failed_updates", "Nodes whose assigned "
                                "release failed on them", value=s.failed_updates)
        yield GaugeMetricFamily("edgewise_fleet_clock_offset_max_seconds",
                                "The largest clock offset a node that is not offline "
                                "reported", value=s.clock_offset_max)
        rollouts = GaugeMetricFamily("edgewise_rollouts", "Rollouts per state",
                                     labels=["state"])
        for state, n in s.rollouts.items():
            rollouts.add_metric([state], n)
        yield rollouts
        yield GaugeMetricFamily("edgewise_fleet_gauges_updated_timestamp_seconds",
                                "When the fleet gauges were computed", value=s.updated)
