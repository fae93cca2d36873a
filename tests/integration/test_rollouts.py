"""Rollouts against the real store (SQLite, and PostgreSQL where marked), nodes simulated in the
store (`testbed.rollout_fleet.StoreFleet`: the status line and counters the node's updater and
engine report). The driver is ticked by hand with a clock of the test's, except in the API
test, where the control plane runs in-process with its own driver."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select

from edgewise.cloud.app import start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.pokes import PokeFanout
from edgewise.cloud.rollouts.driver import Driver
from edgewise.cloud.rollouts.plan import plan_waves
from edgewise.cloud.rollouts.spec import Amount, Gate, RolloutSpec
from edgewise.cloud.store import Store, database_url
from edgewise.cloud.store.models import DesiredStateRow
from edgewise.cloud.store.releases import ReleaseRow
from edgewise.cloud.store.rollouts import Rollouts
from edgewise.security.tokens import OperatorToken
from edgewise.testbed.rollout_fleet import StoreFleet, add_nodes

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return database_url(None, tmp_path)
    return request.getfixturevalue("postgres")


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    async with Store(store_url) as s:
        yield s


async def publish(store: Store, version: str = "2.0") -> None:
    async with store._tx() as conn:
        await conn.execute(insert(ReleaseRow).values(
            version=version, digest="0" * 64, manifest=b"{}", files=0, bytes=0, created=T0,
            created_by="test"))


def pairs_of(n: int) -> list[tuple[str, str]]:
    return [(f"n{i:03d}", f"site{i // 2}") for i in range(n)]


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        return self.t


async def create(store: Store, nodes: list[tuple[str, str]], spec: RolloutSpec,
                 rollout_id: str = "ro-00000001") -> Rollouts:
    rollouts = Rollouts(store)
    waves = plan_waves(rollout_id, [n for n, _ in nodes], spec.canary, spec.waves)
    await rollouts.create(rollout_id, spec.release, spec.to_json(), waves, dict(nodes),
                          actor="test", now=T0)
    return rollouts


async def run(fleet: StoreFleet, drivers: list[Driver], clock: Clock, rollouts: Rollouts,
              until: tuple[str, ...], ticks: int = 60, rollout_id: str = "ro-00000001"
              ) -> dict[str, Any]:
    for _ in range(ticks):
        await fleet.tick(clock())
        clock.t += timedelta(seconds=1)
        for d in drivers:
            await d.tick()
        row = await rollouts.get(rollout_id)
        assert row is not None
        if row["state"] in until:
            return row
    raise AssertionError(f"rollout still {row['state']}: {row['reason']}")


async def release_writes(store: Store, release: str) -> Counter[str]:
    """Desired versions per node that newly assign ``release`` (an update, as the node sees
    it)."""
    async with store._tx(write=False) as conn:
        rows = (await conn.execute(select(DesiredStateRow.node_id, DesiredStateRow.version,
                                          DesiredStateRow.body)
                                   .order_by(DesiredStateRow.node_id,
                                             DesiredStateRow.version))).all()
    out: Counter[str] = Counter()
    last: dict[str, Any] = {}
    for r in rows:
        rel = r.body.get("release")
        if rel == release and last.get(r.node_id) != release:
            out[r.node_id] += 1
        last[r.node_id] = rel
    return out


async def max_in_flight_per_site(store: Store) -> int:
    """From the audit log alone: the most nodes of one site assigned and not yet done."""
    entries = sorted((e for e in await store.list_audit(limit=100_000)
                      if e.action == "rollout.node"), key=lambda e: e.id)
    flying: dict[str, set[str]] = {}
    most = 0
    for e in entries:
        site, node, state = e.detail.get("site"), e.target, e.detail["state"]
        s = flying.setdefault(site, set())
        if state == "assigned":
            s.add(node)
        elif state in ("healthy", "failed", "rolled_back"):
            s.discard(node)
        most = max(most, len(s))
    return most


def spec(**kw: Any) -> RolloutSpec:
    base: dict[str, Any] = {"release": "2.0", "selector": {"fleet": "sim"},
                            "canary": Amount(1, False), "waves": (50.0, 100.0),
                            "max_unavailable_per_site": 1, "node_timeout_s": 30.0}
    base.update(kw)
    return RolloutSpec(**base)


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_a_canary_and_two_waves_complete_within_the_site_budget(store: Store) -> None:
    nodes = pairs_of(12)
    await add_nodes(store, nodes)
    fleet = StoreFleet(store, [n for n, _ in nodes])
    clock = Clock()
    driver = Driver(store, PokeFanout(lambda n: None), owner="a", now=clock)
    rollouts = await create(store, nodes, spec(bake_s=3, gates=(Gate.parse(
        "alarm_rate<=1.5x"), Gate.parse("dropped==0"))))
    row = await run(fleet, [driver], clock, rollouts, ("completed", "paused"))
    assert row["state"] == "completed", row["reason"]
    assert all(n.running == "2.0" for n in fleet.nodes.values())
    assert sorted(await release_writes(store, "2.0")) == [n for n, _ in nodes]
    assert set((await release_writes(store, "2.0")).values()) == {1}  # once each
    assert await max_in_flight_per_site(store) == 1  # an HA pair never updated together
    actions = [e.action for e in await store.list_audit(target="rollout:ro-00000001")]
    assert actions.count("rollout.wave.pass") == 3 and "rollout.complete" in actions


async def test_a_release_that_raises_the_alarm_rate_pauses_at_the_canary_and_abort_rolls_back(
        store: Store) -> None:
    nodes = pairs_of(8)
    await add_nodes(store, nodes)
    fleet = StoreFleet(store, [n for n, _ in nodes], bad_alarms=[n for n, _ in nodes],
                       alarm_factor=2.0)
    clock = Clock()
    driver = Driver(store, PokeFanout(lambda n: None), owner="a", now=clock)
    rollouts = await create(store, nodes, spec(bake_s=5, gates=(Gate.parse(
        "alarm_rate<=1.5x"),)))
    row = await run(fleet, [driver], clock, rollouts, ("paused", "completed"))
    assert (row["state"], row["paused_by"], row["wave"]) == ("paused", "gate", 0)
    assert "alarm_rate<=1.5x" in row["reason"]
    canary = [n for n, s in fleet.nodes.items() if s.updates]
    assert len(canary) == 1 and fleet.nodes[canary[0]].running == "2.0"
    await rollouts.command("ro-00000001", allowed_from=("paused",), to="aborting",
                           actor="test", action="rollout.abort", reason="bad alarms")
    row = await run(fleet, [driver], clock, rollouts, ("aborted",))
    assert fleet.nodes[canary[0]].running is None  # its release before: none
    states = Counter(n["state"] for n in await rollouts.nodes("ro-00000001"))
    assert states == {"rolled_back": 1, "skipped": 7}
    assert sum(s.updates for s in fleet.nodes.values()) == 1


async def test_failures_beyond_the_threshold_pause_and_nothing_more_is_touched(
        store: Store) -> None:
    nodes = pairs_of(40)
    await add_nodes(store, nodes)
    failing = [n for i, (n, _) in enumerate(nodes) if i % 5 == 0]  # 20%
    fleet = StoreFleet(store, [n for n, _ in nodes], failing=failing)
    clock = Clock()
    driver = Driver(store, PokeFanout(lambda n: None), owner="a", now=clock)
    rollouts = await create(store, nodes, spec(canary=Amount(2, False),
                                               waves=(25.0, 50.0, 100.0),
                                               max_failures=Amount(5, True),
                                               max_unavailable_per_site=None))
    row = await run(fleet, [driver], clock, rollouts, ("paused", "completed"))
    assert (row["state"], row["paused_by"]) == ("paused", "failures")
    touched = {n for n, s in fleet.nodes.items() if s.updates}
    for _ in range(5):  # paused: nothing more is assigned
        await fleet.tick(clock())
        clock.t += timedelta(seconds=1)
        await driver.tick()
    assert {n for n, s in fleet.nodes.items() if s.updates} == touched
    members = await rollouts.nodes("ro-00000001")
    assert max(m["wave"] for m in members if m["state"] != "pending") == row["wave"]
    assert Counter(m["state"] for m in members)["failed"] > 2  # 5% of 40 is 2


@pytest.mark.parametrize("crash", ["before the writes", "after the writes"])
async def test_a_killed_driver_is_taken_over_after_its_lease_and_writes_no_node_twice(
        store: Store, crash: str, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = pairs_of(10)
    await add_nodes(store, nodes)
    fleet = StoreFleet(store, [n for n, _ in nodes])
    clock = Clock()
    a = Driver(store, PokeFanout(lambda n: None), owner="a", now=clock, lease_s=15)
    b = Driver(store, PokeFanout(lambda n: None), owner="b", now=clock, lease_s=15)
    rollouts = await create(store, nodes, spec(canary=Amount(2, False), waves=(100.0,),
                                               max_unavailable_per_site=None))
    await fleet.tick(clock())

    class Killed(BaseException):
        pass

    real_write = a._write

    async def dies(*args: Any, **kw: Any) -> Any:
        if crash == "after the writes":
            await real_write(*args, **kw)
        raise Killed

    monkeypatch.setattr(a, "_write", dies)
    with pytest.raises(Killed):
        await a.tick()
    assert Counter(m["state"] for m in await rollouts.nodes("ro-00000001"))["assigning"] == 2
    # the other replica cannot drive it while a's lease lasts...
    await b.tick()
    assert (await rollouts.get("ro-00000001"))["driver"] == "a"  # type: ignore[index]
    assert Counter(m["state"] for m in await rollouts.nodes("ro-00000001"))["assigning"] == 2
    # ...and takes over when it has expired, from exactly where a stopped
    clock.t += timedelta(seconds=16)
    row = await run(fleet, [b], clock, rollouts, ("completed",))
    assert row["driver"] == "b"
    writes = await release_writes(store, "2.0")
    assert sorted(writes) == [n for n, _ in nodes] and set(writes.values()) == {1}
    assert all(s.updates == 1 for s in fleet.nodes.values())


async def test_an_offline_node_gets_the_current_target_when_back_and_nothing_once_aborted(
        store: Store) -> None:
    nodes = pairs_of(6)
    await add_nodes(store, nodes)
    away = nodes[-1][0]
    fleet = StoreFleet(store, [n for n, _ in nodes], offline=[away])
    clock = Clock()
    driver = Driver(store, PokeFanout(lambda n: None), owner="a", now=clock)
    rollouts = await create(store, nodes, spec(canary=Amount(0, False), waves=(100.0,),
                                               max_unavailable_per_site=None))
    row = await run(fleet, [driver], clock, rollouts, ("completed",))
    member = {m["node_id"]: m for m in await rollouts.nodes("ro-00000001")}
    assert member[away]["state"] == "deferred" and fleet.nodes[away].updates == 0
    assert ("ro-00000001", "completed") in await rollouts.driven()  # late nodes: watched
    fleet.offline.clear()
    for _ in range(6):
        await fleet.tick(clock())
        clock.t += timedelta(seconds=1)
        await driver.tick()
    assert fleet.nodes[away].running == "2.0"
    member = {m["node_id"]: m for m in await rollouts.nodes("ro-00000001")}
    assert member[away]["state"] == "healthy"
    assert row["state"] == "completed"

    # a second rollout aborted while a node is away: it gets nothing when it is back
    await publish(store, "3.0")
    fleet.offline.add(away)
    r2 = await create(store, nodes, spec(release="3.0", canary=Amount(0, False),
                                         waves=(100.0,), max_unavailable_per_site=None),
                      rollout_id="ro-00000002")
    for _ in range(3):
        await fleet.tick(clock())
        clock.t += timedelta(seconds=1)
        await driver.tick()
    await r2.command("ro-00000002", allowed_from=("running", "completed"), to="aborting",
                     actor="test", action="rollout.abort", reason="test")
    await run(fleet, [driver], clock, r2, ("aborted",), rollout_id="ro-00000002")
    fleet.offline.clear()
    for _ in range(4):
        await fleet.tick(clock())
        clock.t += timedelta(seconds=1)
        await driver.tick()
    assert fleet.nodes[away].running == "2.0"
    assert all(s.running == "2.0" for s in fleet.nodes.values())
    assert (await release_writes(store, "3.0"))[away] == 0


# -- the API, with the control plane in-process (its own driver) -------------------------------


async def test_the_rollout_routes_create_show_pause_resume_and_refuse(tmp_path: Path) -> None:
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0)
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            ctx = ssl.create_default_context(cafile=str(boot.ca_path))
            plain, rec = OperatorToken.issue("viewer-1", "viewer")
            await store.add_operator_token(rec)
            op = {"Authorization": f"Bearer {boot.admin_token}"}
            viewer = {"Authorization": f"Bearer {plain.get_secret_value()}"}
            nodes = pairs_of(6)
            await add_nodes(store, nodes)
            await publish(store)
            fleet = StoreFleet(store, [n for n, _ in nodes])
            async with httpx.AsyncClient(base_url=running.url, verify=ctx, timeout=10) as http:
                body = {"release": "2.0", "selector": "fleet=sim", "canary": "1",
                        "waves": "50%,100%", "max_unavailable_per_site": 1,
                        "gates": ["dropped==0"]}
                r = await http.post("/v1/rollouts", json=body, headers=viewer)
                assert r.status_code == 403
                for bad, why in ((dict(body, release="9.9"), "no release"),
                                 (dict(body, waves="50%"), "the last wave is 100%"),
                                 (dict(body, gates=["cpu<1"]), "no metric"),
                                 (dict(body, selector="fleet=none"), "no node")):
                    r = await http.post("/v1/rollouts", json=bad, headers=op)
                    assert r.status_code in (400, 404) and why in r.json()["error"], r.text
                r = await http.post("/v1/rollouts", json=body, headers=op)
                assert r.status_code == 201, r.text
                rid = r.json()["id"]
                assert [w["nodes"] for w in r.json()["waves"]] == [1, 2, 3]
                r = await http.post("/v1/rollouts", json=body, headers=op)
                assert r.status_code == 409  # the nodes are in a rollout that is not over
                r = await http.post(f"/v1/rollouts/{rid}/pause", json={"reason": "lunch"},
                                    headers=op)
                assert r.json()["state"] == "paused"
                r = await http.post(f"/v1/rollouts/{rid}/pause", json={}, headers=op)
                assert r.status_code == 400
                r = await http.post(f"/v1/rollouts/{rid}/resume", json={}, headers=op)
                assert r.json()["state"] == "running"
                deadline = time.monotonic() + 60
                while True:  # the app's own driver moves it; the fleet answers
                    await fleet.tick()
                    r = await http.get(f"/v1/rollouts/{rid}", headers=viewer)
                    if r.json()["state"] == "completed":
                        break
                    assert time.monotonic() < deadline, r.json()
                    await asyncio.sleep(0.3)
                assert r.json()["states"] == {"healthy": 6}
                r = await http.get("/v1/rollouts", headers=viewer)
                assert [x["id"] for x in r.json()["rollouts"]] == [rid]
                r = await http.get("/v1/rollouts/ro-ffffffff", headers=viewer)
                assert r.status_code == 404
                audit = [e.action for e in await store.list_audit(target=f"rollout:{rid}")]
                assert {"rollout.create", "rollout.pause", "rollout.resume",
                        "rollout.complete"} <= set(audit)
        finally:
            await running.stop()


async def test_the_rollout_cli_creates_shows_and_pauses(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgewise.cli.main import main

    config = CloudConfig(data_dir=tmp_path / "cloud", port=0)
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            nodes = pairs_of(4)
            await add_nodes(store, nodes)
            await publish(store)
            data = str(config.data_dir)
            cli_json = config.data_dir / "cli.json"  # the port actually bound (port 0 here)
            cli_json.write_text(json.dumps({**json.loads(cli_json.read_text()),
                                            "url": running.url}))

            def cli(*args: str) -> Any:  # the sync client, in a thread beside the server
                res = CliRunner().invoke(main, [*args, "--data", data, "--json"])
                assert res.exit_code == 0, res.output
                return json.loads(res.output)

            created = await asyncio.to_thread(
                cli, "rollout", "create", "--release", "2.0", "--selector", "fleet=sim",
                "--canary", "25%", "--waves", "50%,100%", "--bake", "1m",
                "--max-failures", "1", "--max-unavailable-per-site", "1",
                "--gate", "alarm_rate<=2x", "--gate", "dropped==0")
            assert [w["nodes"] for w in created["waves"]] == [1, 1, 2]
            assert created["spec"]["bake_s"] == 60.0
            assert created["spec"]["gates"] == ["alarm_rate<=2x", "dropped==0"]
            rid = created["id"]
            shown = await asyncio.to_thread(cli, "rollout", "status", rid, "--nodes", "all")
            assert len(shown["nodes"]) == 4 and shown["state"] == "running"
            listed = await asyncio.to_thread(cli, "rollout", "list")
            assert [r["id"] for r in listed["rollouts"]] == [rid]
            paused = await asyncio.to_thread(cli, "rollout", "pause", rid, "--reason", "x")
            assert (paused["state"], paused["reason"]) == ("paused", "x")
        finally:
            await running.stop()
