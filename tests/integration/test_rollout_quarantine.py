"""Rollouts skip quarantined nodes (issue 12; docs/operations.md, *Rollouts*): against the real
store (SQLite), nodes simulated in the store (`testbed.rollout_fleet.StoreFleet`), the driver
ticked by hand. A node quarantined when the rollout is created is in no wave; one quarantined
before its wave comes is skipped at its turn; one quarantined while in flight is skipped, not
counted as a failure (the threshold here is 0), and abort rolls it back like any node the
rollout changed. The disruption budget holds throughout (from the audit log). And layered
config: ``config apply`` to a selector leaves a quarantined node out."""

from __future__ import annotations

import ssl
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_rollouts import T0, Clock, max_in_flight_per_site, pairs_of, release_writes

from edgewise.cloud.app import start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.pokes import PokeFanout
from edgewise.cloud.rollouts.api import plan_and_create
from edgewise.cloud.rollouts.driver import Driver
from edgewise.cloud.rollouts.spec import Amount, RolloutSpec
from edgewise.cloud.store import Store, database_url
from edgewise.cloud.store.rollouts import Rollouts
from edgewise.errors import BadRequest
from edgewise.testbed.rollout_fleet import StoreFleet, add_nodes

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]

RID = "ro-0000000a"


async def tick(fleet: StoreFleet, driver: Driver, clock: Clock) -> dict[str, str]:
    await fleet.tick(clock())
    clock.t += timedelta(seconds=1)
    await driver.tick()
    return {m["node_id"]: m["state"] for m in await Rollouts(fleet.store).nodes(RID)}


async def test_quarantined_nodes_are_never_targeted_nor_counted_as_failures(
        tmp_path: Path) -> None:
    async with Store(database_url(None, tmp_path)) as store:
        nodes = pairs_of(12)
        ids = [n for n, _ in nodes]
        await add_nodes(store, nodes, T0)
        fleet = StoreFleet(store, ids)
        clock = Clock()
        driver = Driver(store, PokeFanout(lambda _: None), owner="a", now=clock)
        rollouts = Rollouts(store)
        await store.set_quarantine("n000", "TPM quote: PCR 7 changed", actor="attestation")
        spec = RolloutSpec("2.0", {"fleet": "sim"}, canary=Amount(1, False),
                           waves=(50.0, 100.0), max_failures=Amount(0, False),
                           max_unavailable_per_site=1, node_timeout_s=30.0)
        listed = await store.list_nodes({"fleet": "sim"}, limit=1000)
        await plan_and_create(rollouts, RID, spec, listed, actor="test", now=T0)
        row = await rollouts.get(RID)
        assert row is not None and row["total"] == 11  # n000 is in no wave
        members = {m["node_id"]: m for m in await rollouts.nodes(RID)}
        assert (members["n000"]["state"], members["n000"]["wave"]) == ("skipped", -1)
        assert members["n000"]["reason"] == "quarantined: TPM quote: PCR 7 changed"
        last_wave = [n for n, m in members.items() if m["wave"] == 2]
        later = last_wave[0]  # quarantined before its wave comes
        await store.set_quarantine(later, "operator: cabinet opened", actor="operator:x")
        flight: str | None = None
        for _ in range(60):
            states = await tick(fleet, driver, clock)
            if flight is None:
                flying = sorted(n for n, s in states.items() if s == "assigned"
                                and members[n]["wave"] == 1)
                if flying:  # quarantined while in flight: it never reports back
                    flight = flying[0]
                    del fleet.nodes[flight]
                    await store.set_quarantine(flight, "operator: suspicious", actor="op")
            row = await rollouts.get(RID)
            assert row is not None
            if row["state"] != "running":
                break
        assert row["state"] == "completed", row["reason"]
        assert flight is not None
        members = {m["node_id"]: m for m in await rollouts.nodes(RID)}
        assert Counter(m["state"] for m in members.values()) == {"healthy": 9, "skipped": 3}
        assert members[later]["reason"] == "quarantined: operator: cabinet opened"
        assert members[flight]["reason"] == ("quarantined while in flight (its desired version "
                                             "was written): operator: suspicious")
        writes = await release_writes(store, "2.0")
        assert "n000" not in writes and later not in writes  # never targeted
        assert writes[flight] == 1 and len(writes) == 10 and set(writes.values()) == {1}
        assert await max_in_flight_per_site(store) == 1
        # abort rolls back every node it changed: the one quarantined in flight included
        await rollouts.command(RID, allowed_from=("completed",), to="aborting", actor="test",
                               action="rollout.abort", reason="test")
        for _ in range(10):
            await tick(fleet, driver, clock)
            row = await rollouts.get(RID)
            if row is not None and row["state"] == "aborted":
                break
        members = {m["node_id"]: m for m in await rollouts.nodes(RID)}
        assert Counter(m["state"] for m in members.values()) == {"rolled_back": 10,
                                                                  "skipped": 2}
        assert {members[n]["state"] for n in ("n000", later)} == {"skipped"}


async def test_a_rollout_of_only_quarantined_nodes_is_refused(tmp_path: Path) -> None:
    async with Store(database_url(None, tmp_path)) as store:
        await add_nodes(store, pairs_of(2), T0)
        for n in ("n000", "n001"):
            await store.set_quarantine(n, "held", actor="op")
        listed = await store.list_nodes({"fleet": "sim"}, limit=1000)
        with pytest.raises(BadRequest, match="every node the selector names is quarantined"):
            await plan_and_create(Rollouts(store), RID, RolloutSpec("2.0", {"fleet": "sim"}),
                                  listed, actor="test", now=T0)
        assert await Rollouts(store).get(RID) is None


async def test_config_apply_to_a_selector_leaves_quarantined_nodes_out(tmp_path: Path) -> None:
    """Layered config: ``config apply --selector`` stores the effective config for the other
    nodes and names the quarantined one as held; it gets no desired version."""
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0)
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            await add_nodes(store, pairs_of(3), T0)
            await store.write_layer("fleet", set_={"rate": 10}, actor="test")
            await store.set_quarantine("n001", "TPM quote: PCR 0 changed", actor="attestation")
            ctx = ssl.create_default_context(cafile=str(boot.ca_path))
            async with httpx.AsyncClient(base_url=running.url, verify=ctx, timeout=30) as http:
                r = await http.post("/v1/config/apply", json={"selector": "fleet=sim"},
                                    headers={"Authorization": f"Bearer {boot.admin_token}"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert [n["node"] for n in body["nodes"]] == ["n000", "n002"]
            assert body["held"] == [{"node": "n001", "reason": "TPM quote: PCR 0 changed"}]
            assert body["unchanged"] == 0
            assert await store.get_desired_state("n001") is None
            for n in ("n000", "n002"):
                state = await store.get_desired_state(n)
                assert state is not None and state.config == {"rate": 10}
        finally:
            await running.stop()


async def test_the_rollout_pokes_carry_the_new_state_inline(tmp_path: Path) -> None:
    """As ``config set``: a node poked by a rollout gets its new desired state in the poke
    (small states), so it applies it without a fetch (a TLS handshake and a request each: at
    10,000 nodes the fetches were what bounded a wave)."""
    class Session:
        def __init__(self) -> None:
            self.pokes: list[tuple[int, dict[str, Any] | None]] = []

        def poke_desired(self, version: int, jitter: float = 0.0,
                         state: dict[str, Any] | None = None) -> None:
            self.pokes.append((version, state))

    async with Store(database_url(None, tmp_path)) as store:
        nodes = pairs_of(4)
        await add_nodes(store, nodes, T0)
        sessions = {n: Session() for n, _ in nodes}
        pokes = PokeFanout(sessions.get)
        clock = Clock()
        driver = Driver(store, pokes, owner="a", now=clock)
        listed = await store.list_nodes({"fleet": "sim"}, limit=1000)
        await plan_and_create(Rollouts(store), RID, RolloutSpec(
            "2.0", {"fleet": "sim"}, canary=Amount(0, False), waves=(100.0,)), listed,
            actor="test", now=T0)
        await StoreFleet(store, [n for n, _ in nodes]).tick(clock())
        await driver.tick()
        pokes.flush()
        for n, _ in nodes:
            ((version, state),) = sessions[n].pokes
            assert state is not None, "the poke carries no state: the node must fetch"
            assert (state["version"], state["release"]) == (version, "2.0")
