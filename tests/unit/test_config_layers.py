"""Config layers (`cloud.layers`, `store.fleet`): the merge order, diff and write rules, and
property tests that a node's effective config is the merge of its layers, fleet < groups (by
position, then name) < node, whatever the order of the writes (pure, and through a real SQLite
store with the layers' writers running concurrently)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert

from edgewise.cloud.layers import Change, Layer, diff, effective, order, write
from edgewise.cloud.store import Store
from edgewise.cloud.store.models import ConfigLayerRow, Node
from edgewise.errors import BadRequest

# (kind, name, selector, position): two groups whose order is drawn, one that never matches
LAYERS = [("fleet", "", {}, 0), ("group", "plant", {"site": "x"}, 0),
          ("group", "all", {}, 0), ("group", "other", {"site": "nowhere"}, 0),
          ("node", "n1", {}, 0)]


def test_order_and_merge() -> None:
    layers = [Layer("node", "n1", {"a": 4}), Layer("group", "b", {"a": 3, "c": 1}, {}, 5),
              Layer("group", "a", {"a": 2}, {"site": "x"}, 5), Layer("fleet", "", {"a": 1, "b": 1}),
              Layer("group", "z", {"c": 9}, {}, 1), Layer("node", "n2", {"a": 99})]
    assert [la.key for la in order(layers)] == [
        "fleet", "group:z", "group:a", "group:b", "node:n1", "node:n2"]
    eff = effective(layers, "n1", {"site": "x"})
    assert eff.values == {"a": 4, "b": 1, "c": 1}
    assert eff.source == {"a": "node:n1", "b": "fleet", "c": "group:b"}
    assert eff.layers == ("fleet", "group:z", "group:a", "group:b", "node:n1")
    other = effective(layers, "n3", {"site": "y"})
    assert other.values == {"a": 3, "b": 1, "c": 1} and "group:a" not in other.layers
    assert diff({"a": 4, "b": 2, "old": 1, "setpoints": {"x": 1}}, eff) == [
        Change("b", 2, 1, "fleet"), Change("c", None, 1, "group:b"),
        Change("old", 1, None, None)]
    assert diff({"a": 4, "b": 1, "c": 1, "setpoints": {}}, eff) == []


@pytest.mark.parametrize(("set_", "remove", "words"), [
    ({"setpoints": 1}, [], "not a layer key"),
    ({"a": None}, [], "set to null"),
    ({"a": 1}, ["a"], "both set and removed"),
    ({"": 1}, [], "config keys are 1 to 128"),
    ({f"k{i}": i for i in range(513)}, [], "at most 512 keys"),
])
def test_write_refuses(set_: dict[str, Any], remove: list[str], words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        write({}, set_, remove)


def test_write_merges_and_removes() -> None:
    assert write({"a": 1, "b": 2}, {"b": 3, "c": 4}, ["a", "zzz"]) == {"b": 3, "c": 4}


# -- properties -------------------------------------------------------------------------------

ops = st.tuples(st.integers(0, len(LAYERS) - 1), st.sampled_from("abcd"),
                st.one_of(st.none(), st.integers(0, 9)))  # None: remove the key
scenario = st.tuples(
    st.lists(ops, max_size=14), st.randoms(use_true_random=False),
    st.sampled_from(["x", "y"]),  # the node's site label
    st.tuples(st.integers(0, 3), st.integers(0, 3)))  # positions of the two groups


def interleave(writes: list[tuple[int, str, int | None]], rnd: Any
               ) -> list[tuple[int, str, int | None]]:
    """Another order of ``writes`` that keeps each layer's own writes in their order."""
    per: dict[int, list[tuple[int, str, int | None]]] = {}
    for w in writes:
        per.setdefault(w[0], []).append(w)
    turns = [w[0] for w in writes]
    rnd.shuffle(turns)
    return [per[i].pop(0) for i in turns]


def reference(writes: list[tuple[int, str, int | None]], site: str,
              positions: tuple[int, int]) -> dict[str, Any]:
    """The merge written out by hand: each layer's final values, then per key the value of
    the last layer in precedence that applies and has it."""
    final: dict[int, dict[str, Any]] = {}
    for i, key, value in writes:
        d = final.setdefault(i, {})
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    groups = sorted((i for i in (1, 2, 3)),
                    key=lambda i: ((*positions, 0)[i - 1], LAYERS[i][1]))
    applies = {0: True, 1: site == "x", 2: True, 3: False, 4: True}
    out: dict[str, Any] = {}
    for i in [0, *groups, 4]:
        if applies[i]:
            out.update(final.get(i, {}))
    return out


def build(writes: list[tuple[int, str, int | None]], positions: tuple[int, int]
          ) -> list[Layer]:
    values: dict[int, dict[str, Any]] = {}
    for i, key, value in writes:
        values[i] = write(values.get(i, {}), {} if value is None else {key: value},
                          [key] if value is None else [])
    pos = (*positions, 0)
    return [Layer(LAYERS[i][0], LAYERS[i][1], v, LAYERS[i][2],  # type: ignore[arg-type]
                  pos[i - 1] if LAYERS[i][0] == "group" else 0) for i, v in values.items()]


@settings(max_examples=300, deadline=None)
@given(scenario)
def test_effective_is_the_layer_merge_for_any_order_of_writes(case: Any) -> None:
    writes, rnd, site, positions = case
    want = reference(writes, site, positions)
    for order_ in (writes, interleave(writes, rnd)):
        assert effective(build(order_, positions), "n1", {"site": site}).values == want


@pytest.fixture
def store_loop(tmp_path: Path) -> Iterator[tuple[Store, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    store = Store.for_data_dir(tmp_path / "cloud")
    loop.run_until_complete(store.open())

    async def node() -> None:
        now = datetime.now(UTC)
        async with store._tx() as conn:
            await conn.execute(insert(Node).values(
                id="n1", labels={}, key_fingerprint="f" * 64, cert_serial="1",
                cert_expiry=now + timedelta(days=1), status="online", created=now,
                last_seen=now, revoked=False))

    loop.run_until_complete(node())
    try:
        yield store, loop
    finally:
        loop.run_until_complete(store.close())
        loop.close()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario)
def test_stored_layers_merge_alike_whatever_the_order_of_concurrent_writes(
        store_loop: tuple[Store, asyncio.AbstractEventLoop], case: Any) -> None:
    """Each layer's writes run in their order, the layers' writers concurrently (so their
    transactions interleave as they may); the stored layers' effective config is the merge,
    and each layer's version counts its writes."""
    store, loop = store_loop
    writes, _rnd, site, positions = case
    pos = (*positions, 0)

    async def chain(i: int) -> None:
        kind, name, selector, _ = LAYERS[i]
        for j, key, value in writes:
            if j == i:
                await store.write_layer(
                    kind, name, set_={} if value is None else {key: value},  # type: ignore[arg-type]
                    remove=[key] if value is None else [],
                    selector=selector if kind == "group" else None,
                    position=pos[i - 1] if kind == "group" else None, actor="test")

    async def run() -> list[Layer]:
        async with store._tx() as conn:
            await conn.execute(delete(ConfigLayerRow))
        await asyncio.gather(*(chain(i) for i in range(len(LAYERS))))
        return await store.get_layers(["n1"])

    stored = loop.run_until_complete(run())
    assert effective(stored, "n1", {"site": site}).values == reference(writes, site, positions)
    counts: dict[str, int] = {}
    for i, _k, _v in writes:
        key = "fleet" if i == 0 else f"{LAYERS[i][0]}:{LAYERS[i][1]}"
        counts[key] = counts.get(key, 0) + 1
    assert {la.key: la.version for la in stored} == counts
