"""Measured launch and the event log without a TPM: replay, kinds bound into the extend value,
bounds on a peer's log, the agent code digest, the log file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edgewise.errors import PeerError, StorageError
from edgewise.security.tpm.measure import (
    MAX_EVENTS,
    Event,
    MeasurementLog,
    agent_code_digest,
    events_from_json,
    replay,
)

D = "ab" * 32


def test_replay_extends_from_zero_in_order_and_binds_the_kind() -> None:
    agent, release = Event(16, "agent", D), Event(16, "release", D)
    one = hashlib.sha256(bytes(32) + agent.extend_value()).digest()
    assert replay([agent], [16]) == {16: one}
    assert replay([agent, release], [16]) == {
        16: hashlib.sha256(one + release.extend_value()).digest()}
    assert agent.extend_value() != release.extend_value()  # same digest, another kind
    assert replay([agent], [16, 23]) == {16: one, 23: bytes(32)}
    assert replay([Event(23, "agent", D)], [16]) == {16: bytes(32)}


@pytest.mark.parametrize(("event", "why"), [
    ({"pcr": 24, "kind": "agent", "digest": D}, "pcr must be 0 to 23"),
    ({"pcr": True, "kind": "agent", "digest": D}, "pcr must be 0 to 23"),
    ({"pcr": 16, "kind": "kernel", "digest": D}, "kind must be one of agent, release"),
    ({"pcr": 16, "kind": "agent", "digest": D.upper()}, "64 lower-case hex"),
    ({"pcr": 16, "kind": "agent"}, "an event is {pcr, kind, digest}"),
    ({"pcr": 16, "kind": "agent", "digest": D, "x": 1}, "an event is {pcr, kind, digest}"),
])
def test_a_peers_event_is_checked_field_by_field(event: dict[str, object], why: str) -> None:
    with pytest.raises(PeerError, match=why.replace("{", r"\{").replace("}", r"\}")):
        events_from_json([event])


def test_a_peers_log_is_bounded_before_it_is_read() -> None:
    event = {"pcr": 16, "kind": "agent", "digest": D}
    assert len(events_from_json([event] * MAX_EVENTS)) == MAX_EVENTS
    with pytest.raises(PeerError, match=f"at most {MAX_EVENTS} events"):
        events_from_json([event] * (MAX_EVENTS + 1))
    with pytest.raises(PeerError, match="expected a list"):
        events_from_json({"events": []})


def test_agent_code_digest_follows_content_and_names_not_bytecode(tmp_path: Path) -> None:
    root = tmp_path / "edgewise"
    (root / "__pycache__").mkdir(parents=True)
    (root / "a.py").write_text("x = 1\n")
    first = agent_code_digest(root)
    (root / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert agent_code_digest(root) == first
    (root / "a.py").write_text("x = 2\n")
    assert agent_code_digest(root) != first
    (root / "a.py").write_text("x = 1\n")
    (root / "a.py").rename(root / "b.py")
    assert agent_code_digest(root) != first


def test_log_file_appends_reads_back_and_refuses_damage(tmp_path: Path) -> None:
    log = MeasurementLog(tmp_path / "m.log")
    assert log.events() == []
    log.append(Event(16, "agent", D))
    log.append(Event(16, "release", "cd" * 32))
    assert [e.kind for e in log.events()] == ["agent", "release"]
    (tmp_path / "m.log").write_bytes(b'{"pcr": 16}\n')
    with pytest.raises(StorageError, match="is damaged"):
        log.events()
    log.reset()
    assert log.events() == []
