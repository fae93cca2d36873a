"""Rollout at scale with nodes simulated in the store (`edgewise.testbed.rollout_fleet`): N
nodes, canary 1% + waves 10%,50%,100%, no bake, max failures 2%, failing node fractions 0%, 1%
and 5%. Not the network fleet simulator (`edgewise sim fleet`): nodes answer through the store
(their reports written as the sessions write them), so this times the driver and the store,
not sessions or fetches.

Prints, per failure rate: the outcome, driver ticks, wall time (the simulated fleet's own
reads and report writes included; ``driver_seconds`` is the driver's ticks alone), nodes
updated, and the nodes first assigned after the tick where the threshold was crossed (target
0: only the wave in flight). The baseline in the same run: one ``config set``-style bulk
assignment of the release to every node (`Store.update_desired_states`), the all-at-once push
a rollout replaces.

    python benchmarks/rollout_scale.py [--nodes 10000] [--db URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import insert

from edgewise.cloud.desired import DesiredChange
from edgewise.cloud.pokes import PokeFanout
from edgewise.cloud.rollouts.driver import Driver
from edgewise.cloud.rollouts.plan import plan_waves
from edgewise.cloud.rollouts.spec import Amount, RolloutSpec
from edgewise.cloud.store import Store, database_url
from edgewise.cloud.store.releases import ReleaseRow
from edgewise.cloud.store.rollouts import Rollouts
from edgewise.testbed.rollout_fleet import StoreFleet, add_nodes

T0 = datetime(2026, 3, 1, tzinfo=UTC)


async def one(n: int, fail: float, db: str | None) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        async with Store(db or database_url(None, d)) as store:
            nodes = [(f"n{i:05d}", f"site{i // 2}") for i in range(n)]
            await add_nodes(store, nodes, T0)
            async with store._tx() as conn:
                await conn.execute(insert(ReleaseRow).values(
                    version="2.0", digest="0" * 64, manifest=b"{}", files=0, bytes=0,
                    created=T0, created_by="bench"))
            step = round(1 / fail) if fail else 0
            failing = [x for i, (x, _) in enumerate(nodes) if step and i % step == 0]
            fleet = StoreFleet(store, [x for x, _ in nodes], failing=failing)
            clock = [T0]
            driver = Driver(store, PokeFanout(lambda _: None), owner="bench",
                            now=lambda: clock[0])
            spec = RolloutSpec("2.0", {"fleet": "sim"}, Amount(1, True), (10.0, 50.0, 100.0),
                               0.0, Amount(2, True), None, "site", (), 600.0, 86400.0)
            ro = Rollouts(store)
            await ro.create("ro-bench", "2.0", spec.to_json(),
                            plan_waves("ro-bench", [x for x, _ in nodes], spec.canary,
                                       spec.waves), dict(nodes), actor="bench", now=T0)
            start = time.perf_counter()
            ticks = 0
            touched_at_pause: set[str] | None = None
            row = await ro.get("ro-bench")
            assert row is not None
            driver_s = 0.0
            while row["state"] == "running" and ticks < 200:
                await fleet.tick(clock[0])
                clock[0] += timedelta(seconds=1)
                t = time.perf_counter()
                await driver.tick()
                driver_s += time.perf_counter() - t
                ticks += 1
                row = await ro.get("ro-bench")
                assert row is not None
            elapsed = time.perf_counter() - start
            members = await ro.nodes("ro-bench")
            touched_at_pause = {m["node_id"] for m in members if m["state"] not in
                                ("pending", "deferred", "skipped")}
            for _ in range(3):  # after a pause: nothing more may be assigned
                await fleet.tick(clock[0])
                clock[0] += timedelta(seconds=1)
                await driver.tick()
            after = {m["node_id"] for m in await ro.nodes("ro-bench") if m["state"] not in
                     ("pending", "deferred", "skipped")}
            counts: dict[str, int] = {}
            for m in members:
                counts[m["state"]] = counts.get(m["state"], 0) + 1
            base_start = time.perf_counter()
            await store.update_desired_states(
                [(x, {"site": s}) for x, s in nodes], DesiredChange(release="2.0").apply,
                actor="bench", now=T0, release="2.0")
            baseline = time.perf_counter() - base_start
            return {"nodes": n, "failing": fail, "state": row["state"], "wave": row["wave"],
                    "reason": row["reason"], "ticks": ticks, "seconds": round(elapsed, 1),
                    "driver_seconds": round(driver_s, 1),
                    "states": counts, "touched_after_threshold": len(after - touched_at_pause),
                    "updated": sum(1 for s in fleet.nodes.values() if s.updates),
                    "baseline_bulk_assign_s": round(baseline, 1)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--db", default=None)
    ap.add_argument("--fail", type=float, nargs="*", default=[0.0, 0.01, 0.05])
    args = ap.parse_args()
    for fail in args.fail:
        print(json.dumps(await one(args.nodes, fail, args.db)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
