"""The replica bus's own logic without a database (`edgewise.cloud.replicas`): what it packs
fits PostgreSQL's NOTIFY and reads back as sent, what it hears is checked, pokes for nodes not
connected here are handed over once (never sent back round), and a session is closed only by
a newer one elsewhere. `cloud serve --processes` refuses what cannot work. Over a real
database: tests/integration/test_replicas.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from click.testing import CliRunner

from edgewise.cli import main
from edgewise.cloud.pokes import PokeFanout
from edgewise.cloud.replicas import MAX_POKE_NODES, MAX_QUEUED, Handlers, ReplicaBus, _pack
from edgewise.cloud.sessions import SessionRegistry
from edgewise.cloud.store.notify import MAX_PAYLOAD

URL = "postgresql+asyncpg://u@127.0.0.1:1/none"  # never connected in these tests


def test_packs_fit_a_notification_and_read_back_whole() -> None:
    versions = {f"node-{i:012x}-{'x' * (i % 40)}": i for i in range(3000)}
    payloads = _pack("poke", "v", versions.items(), {"j": 1.5})
    assert len(payloads) > 1
    got: dict[str, int] = {}
    for p in payloads:
        assert len(p.encode()) <= MAX_PAYLOAD
        msg = json.loads(p)
        assert (msg["k"], msg["j"]) == ("poke", 1.5)
        got.update(msg["v"])
    assert got == versions
    assert _pack("open", "s", []) == []


def test_what_is_heard_is_handed_on_and_what_is_malformed_is_counted() -> None:
    opened: list[dict[str, float]] = []
    quarantined: list[tuple[str, bool]] = []
    handlers = Handlers()
    handlers.opened = opened.append
    handlers.quarantine = lambda n, q: quarantined.append((n, q))
    bus = ReplicaBus(URL, handlers)
    for p in _pack("open", "s", [("a", 1.5), ("b", 2.0)]):
        bus._received(p)
    bus._received(json.dumps({"k": "quarantine", "n": "a", "q": True}))
    for bad in ("[]", "{}", '{"k": "open", "s": {"a": "1"}}', '{"k": "open", "s": {"a": true}}',
                '{"k": "quarantine", "n": 1, "q": true}', '{"k": "poke", "v": {}, "j": "x"}',
                '{"k": "revoke", "n": "a", "reason": "r", "serial": "zz", "fp": "f", '
                '"d": false, "w": false}', '{"k": "open", "s": {"' + "n" * 129 + '": 1}}'):
        bus._received(bad)
    assert opened == [{"a": 1.5, "b": 2.0}]
    assert quarantined == [("a", True)]
    assert (bus.received, bus.malformed) == (2, 8)


def test_the_outgoing_queue_is_bounded() -> None:
    bus = ReplicaBus(URL, Handlers())
    for i in range(MAX_QUEUED - 1):
        bus.opened(f"o{i}")
    bus.quarantined("x", True)
    bus.opened("y")  # one too many
    bus.poke({f"n{i}": 1 for i in range(MAX_POKE_NODES - 1)}, 0.0)
    bus.poke({"p": 1}, 0.0)
    bus.poke({"q": 1}, 0.0)  # one too many
    assert bus.dropped == 2
    payloads = bus._turn()
    opened, poked, told = set(), set(), 0
    for p in payloads:
        msg = json.loads(p)
        if msg["k"] == "poke":
            poked |= set(msg["v"])
        elif msg["k"] == "open":
            opened |= set(msg["s"])
        else:
            told += 1
    assert len(opened) == MAX_QUEUED - 1 and "y" not in opened and told == 1
    assert len(poked) == MAX_POKE_NODES and "p" in poked and "q" not in poked
    assert bus._turn() == []


def test_a_push_to_more_nodes_than_messages_queued_is_kept_whole() -> None:
    """A fleet-wide push hands every node held elsewhere to the bus at once: 15,016 of them
    were dropped whole when pokes counted against the 10,000 queued messages (a 30,000-node
    push over two processes reached half the fleet)."""
    bus = ReplicaBus(URL, Handlers())
    bus.poke({f"n{i}": 7 for i in range(15_016)}, 2.5)
    assert bus.dropped == 0
    poked = {}
    for p in bus._turn():
        msg = json.loads(p)
        assert msg["k"] == "poke"
        poked.update(msg["v"])
    assert len(poked) == 15_016 and set(poked.values()) == {7}


class FakeSession:
    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at
        self.replaced = False
        self.pokes: list[tuple[int, Any]] = []

    def replace(self, elsewhere: bool = False) -> None:
        assert elsewhere
        self.replaced = True

    def poke_desired(self, version: int, jitter: float = 0.0, state: Any = None) -> None:
        self.pokes.append((version, state))


def test_pokes_for_nodes_not_here_are_forwarded_once() -> None:
    live = {"here": FakeSession(0.0)}
    forwarded: list[tuple[dict[str, int], float]] = []
    pokes = PokeFanout(live.get, forward=lambda v, j: forwarded.append((dict(v), j)))
    assert pokes.poke({"here": 2, "away": 3, "gone": 4}, 0.5) == {"here"}
    assert forwarded == [({"away": 3, "gone": 4}, 0.5)]
    assert pokes.forwarded == 2
    # what another process handed over is poked here only, never sent back round
    assert pokes.poke({"here": 5, "elsewhere": 6}, 0.5, forward=False) == {"here"}
    assert len(forwarded) == 1
    pokes.flush()
    assert live["here"].pokes == [(5, None)]


@pytest.mark.asyncio
async def test_only_a_newer_session_elsewhere_closes_one_here() -> None:
    registry = SessionRegistry.__new__(SessionRegistry)  # the method under test needs these
    older, newer = FakeSession(100.0), FakeSession(300.0)
    registry._sessions = {"a": older, "b": newer}  # type: ignore[dict-item]
    registry.replaced_elsewhere = 0
    assert registry.opened_elsewhere({"a": 200.0, "b": 200.0, "c": 1.0}) == 1
    assert (older.replaced, newer.replaced) == (True, False)
    assert registry.opened_elsewhere({"a": 400.0}) == 0  # closing already
    assert registry.replaced_elsewhere == 1
    await asyncio.sleep(0)


@pytest.mark.parametrize("args,message", [
    (["--processes", "2"], "--processes 2 needs PostgreSQL"),
    (["--processes", "2", "--db", "postgresql://u@127.0.0.1/x", "--port", "0"],
     "--processes 2 needs a fixed --port"),
    (["--processes", "0"], "0 is not in the range 1<=x<=64"),
])
def test_serve_refuses_processes_it_cannot_run(tmp_path: Any, args: list[str],
                                               message: str) -> None:
    res = CliRunner().invoke(main, ["cloud", "serve", "--data", str(tmp_path / "d"), *args])
    assert res.exit_code != 0
    assert message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "d").exists()  # refused before anything was made
