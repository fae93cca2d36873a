"""A push's fetch jitter: the ``desired`` poke's ``jitter_s`` hint on the wire, and the node
waiting a random part of it before it fetches (issue 11, pushes)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edgewise.edge.twin import Twin
from edgewise.errors import PeerError
from edgewise.sync import protocol
from edgewise.sync.twin_state import DesiredState


@pytest.mark.parametrize(("jitter", "error"), [
    (0, None), (2.5, None), (60, None),
    (-1, "desired.jitter_s must be 0-60 s, got -1"),
    (61.0, "desired.jitter_s must be 0-60 s, got 61.0"),
    (float("nan"), "desired.jitter_s must be 0-60 s, got nan"),
    ("1", "desired.jitter_s must be int/float, got str"),
    (True, "desired.jitter_s must be int/float, got bool"),
])
def test_the_jitter_hint_is_checked(jitter: Any, error: str | None) -> None:
    frame = protocol.encode({"t": protocol.DESIRED, "version": 3, "jitter_s": jitter})
    if error is None:
        assert protocol.decode(frame)["jitter_s"] == jitter
    else:
        with pytest.raises(PeerError) as err:
            protocol.decode(frame)
        assert str(err.value) == error
    # without the hint, as before
    assert protocol.decode(protocol.encode({"t": protocol.DESIRED, "version": 3})) == {
        "t": "desired", "version": 3}


async def test_the_node_waits_a_random_part_of_the_hint_before_it_fetches(
        tmp_path: Path) -> None:
    t = Twin(tmp_path / "twin", "node-1", base_dir=tmp_path, now=lambda: 1.8e9)
    t.load()
    events: list[Any] = []

    async def sleep(s: float) -> None:
        events.append(("sleep", s))

    t.sleep = sleep
    t.uniform = lambda lo, hi: (lo + hi) * 0.25  # what random.uniform drew

    async def fetch() -> dict[str, Any]:
        events.append("fetch")
        return {"version": 1, "desired": DesiredState(1, config={"a": 1}).to_wire()}

    async def apply(_spec: Any, _state: DesiredState) -> str | None:
        return None

    runner = asyncio.create_task(t.run(fetch, apply))
    try:
        t.on_desired(1, 8.0)
        for _ in range(200):
            if t.applied_version() == 1:
                break
            await asyncio.sleep(0.005)
        assert events == [("sleep", 2.0), "fetch"]
        assert t.jitter_waited == 2.0
        # a poke without a hint fetches at once (one node's change: no wait)
        events.clear()

        async def fetch2() -> dict[str, Any]:
            events.append("fetch")
            return {"version": 2, "desired": DesiredState(2, config={"a": 2}).to_wire()}
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    runner = asyncio.create_task(t.run(fetch2, apply))
    try:
        t.on_desired(2)
        for _ in range(200):
            if t.applied_version() == 2:
                break
            await asyncio.sleep(0.005)
        assert events == ["fetch"]
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    # a hint above the protocol's bound is clamped by the node too
    t.on_desired(3, 1e9)
    assert t._jitter == protocol.MAX_JITTER_S


async def test_a_poke_with_the_state_inline_is_applied_without_a_wait_or_a_fetch(
        tmp_path: Path) -> None:
    t = Twin(tmp_path / "twin", "node-1", base_dir=tmp_path, now=lambda: 1.8e9)
    t.load()
    events: list[Any] = []

    async def sleep(s: float) -> None:
        events.append(("sleep", s))

    t.sleep = sleep
    t.uniform = lambda lo, hi: (lo + hi) * 0.25

    async def fetch() -> dict[str, Any]:
        events.append("fetch")
        return {"version": 3, "desired": DesiredState(3, config={"a": 3}).to_wire()}

    async def apply(_spec: Any, _state: DesiredState) -> str | None:
        return None

    runner = asyncio.create_task(t.run(fetch, apply))
    try:
        t.on_desired(1, 8.0, DesiredState(1, config={"a": 1}).to_wire())
        for _ in range(200):
            if t.applied_version() == 1:
                break
            await asyncio.sleep(0.005)
        assert t.desired is not None and t.desired.config == {"a": 1}
        assert events == [("sleep", 0)] and t.jitter_waited == 0.0 and t.pulls == 1
        # a newer poke without its state: the older inline state is not used, v3 is fetched
        t.on_desired(2, 0.0, DesiredState(2, config={"a": 2}).to_wire())
        t.on_desired(3)
        for _ in range(200):
            if t.applied_version() == 3:
                break
            await asyncio.sleep(0.005)
        assert t.desired is not None and t.desired.config == {"a": 3}
        assert events == [("sleep", 0), "fetch"] and t.pulls == 2
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
