"""Twin state: choosing the newest desired state, wire forms, atomic persistence."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.common import files
from edgewise.errors import PeerError, StorageError
from edgewise.sync.hlc import HLC
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import (
    Decision,
    DesiredState,
    ReportedState,
    choose_newest,
    load,
    load_desired,
    save_desired,
)

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
PIPE = "name: line1\nspec:\n  source: {type: simulator}\n"


def ds(version: int, expires_at: float | None = None, **kw: Any) -> DesiredState:
    return DesiredState(version, {"line1": PIPE}, kw.get("config", {}), {"site": "plant1"},
                        expires_at)


# -- choose_newest ------------------------------------------------------------------------------


def test_reconnecting_node_applies_only_the_newest_version() -> None:
    d = choose_newest(ds(3), [ds(4), ds(7), ds(5), ds(2)], now=NOW)
    assert d == Decision(ds(7), "apply v7 (was v3), skipping 2 intermediate version(s)", (4, 5))


def test_first_state_for_a_new_node() -> None:
    d = choose_newest(None, [ds(1)], now=NOW)
    assert d == Decision(ds(1), "apply v1 (was no desired state)")


def test_nothing_newer_keeps_current() -> None:
    assert choose_newest(ds(3), [ds(2), ds(3)], now=NOW) == Decision(
        None, "already at v3; offered v3 is not newer"
    )
    assert choose_newest(ds(3), [], now=NOW) == Decision(
        None, "no desired state offered; keeping v3"
    )
    assert choose_newest(None, [], now=NOW) == Decision(
        None, "no desired state offered; keeping no desired state"
    )


def test_expired_newest_is_refused_without_falling_back_to_an_older_one() -> None:
    d = choose_newest(ds(3), [ds(4), ds(5, expires_at=NOW - 3600)], now=NOW)
    why = "v5 expired at 2023-11-14T21:13:20+00:00 (3600 s ago)"
    assert d == Decision(None, f"{why}; keeping v3", (4,), ((5, why),))


def test_expiry_boundary_and_unexpired_intent() -> None:
    assert choose_newest(ds(1), [ds(2, expires_at=NOW)], now=NOW).apply is None
    assert choose_newest(ds(1), [ds(2, expires_at=NOW + 0.5)], now=NOW).apply == ds(2, NOW + 0.5)
    # expiry gates applying, not running: an expired current state is kept
    assert choose_newest(ds(2, expires_at=NOW - 1), [ds(2, expires_at=NOW - 1)], now=NOW).apply \
        is None
    assert ds(2, expires_at=NOW).expired(NOW) and not ds(2).expired(NOW)


def test_two_states_claiming_one_version_is_a_peer_error() -> None:
    with pytest.raises(PeerError, match="two different desired states claim version 4"):
        choose_newest(ds(3), [ds(4), ds(4, config={"x": 1})], now=NOW)
    assert choose_newest(ds(3), [ds(4), ds(4)], now=NOW).apply == ds(4)  # duplicates are fine


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.none(), st.integers(1, 20)),
    st.lists(st.tuples(st.integers(1, 20), st.booleans()), max_size=10, unique_by=lambda t: t[0]),
)
def test_choose_newest_never_goes_back_and_only_applies_the_top_version(
    current: int | None, offered: list[tuple[int, bool]]
) -> None:
    states = [ds(v, NOW - 1 if expired else None) for v, expired in offered]
    d = choose_newest(None if current is None else ds(current), states, now=NOW)
    newer = sorted(v for v, _ in offered if v > (current or 0))
    if not newer:
        assert d.apply is None and d.skipped == () and d.refused == ()
        return
    top_expired = dict(offered)[newer[-1]]
    assert d.skipped == tuple(newer[:-1])
    if top_expired:
        assert d.apply is None
        assert [v for v, _ in d.refused] == [newer[-1]]
    else:
        assert d.apply is not None and d.apply.version == newer[-1]
        assert d.refused == ()


# -- validation and wire forms ------------------------------------------------------------------


def test_desired_state_round_trips_through_msgpack() -> None:
    s = DesiredState(9, {"line1": PIPE, "vib": "name: vib\n"}, {"threshold": 100.0,
                     "nested": {"a": [1, 2]}}, {"site": "plant1", "line": "1"}, NOW + 60)
    wire = msgpack.packb(s.to_wire(), use_bin_type=True)
    assert DesiredState.from_wire(msgpack.unpackb(wire)) == s
    assert DesiredState.from_wire(s.to_wire()).to_wire() == {
        "version": 9,
        "pipelines": {"line1": PIPE, "vib": "name: vib\n"},
        "config": {"threshold": 100.0, "nested": {"a": [1, 2]}},
        "labels": {"site": "plant1", "line": "1"},
        "expires_at": NOW + 60,
    }


GOOD = ds(2).to_wire()


@pytest.mark.parametrize(
    ("wire", "fragment"),
    [
        ([], "desired state must be a map, got list"),
        ({**GOOD, "rollout": "r1"}, "unknown field\\(s\\) rollout: sent by a newer peer"),
        ({**GOOD, "release": "../1.2"}, "release: bad release version '../1.2'"),
        ({**GOOD, "release": 12}, "release: bad release version 12"),
        ({k: v for k, v in GOOD.items() if k != "labels"}, "missing field\\(s\\) labels"),
        ({**GOOD, "version": 0}, "version must be an integer from 1"),
        ({**GOOD, "version": True}, "version must be an integer from 1"),
        ({**GOOD, "version": "3"}, "version must be an integer from 1"),
        ({**GOOD, "pipelines": {"p": 1}}, "pipelines\\['p'\\] must be str, got int"),
        ({**GOOD, "pipelines": {"": "x"}}, "pipelines keys must be non-empty strings"),
        ({**GOOD, "labels": {"site": 1}}, "labels\\['site'\\] must be str, got int"),
        ({**GOOD, "config": [1]}, "config must be a map, got list"),
        ({**GOOD, "expires_at": "tomorrow"}, "expires_at must be a finite number"),
        ({**GOOD, "expires_at": float("inf")}, "expires_at must be a finite number"),
    ],
)
def test_desired_state_from_wire_refuses_malformed(wire: Any, fragment: str) -> None:
    with pytest.raises(PeerError, match=fragment):
        DesiredState.from_wire(wire)


def test_desired_state_release_is_sent_only_when_assigned() -> None:
    assert "release" not in GOOD  # an agent from before releases reads it as before
    assigned = DesiredState(3, None, {}, {}, None, "2026.12.1")
    wire = assigned.to_wire()
    assert wire["release"] == "2026.12.1"
    assert DesiredState.from_wire(wire) == assigned
    assert DesiredState.from_wire(GOOD).release is None


def test_desired_state_constructor_refuses_non_msgpack_config() -> None:
    with pytest.raises(ValueError, match=r"config: value .* is not msgpack-able"):
        DesiredState(1, config={"x": object()})


def test_reported_state_round_trips_with_setpoints_and_tombstones() -> None:
    sp = LwwMap()
    sp.set("line1/temp_high", 97.5, HLC(2_000, 0, "edge-1"), "hmi")
    sp.delete("line1/old", HLC(2_001, 0, "cloud"), "operator:alice")
    r = ReportedState(7, "running", {"records": 120, "dropped": 0}, sp)
    wire = msgpack.packb(r.to_wire(), use_bin_type=True)
    back = ReportedState.from_wire(msgpack.unpackb(wire))
    assert back == r
    assert back.setpoints.to_dict() == {"line1/temp_high": 97.5}
    assert back.to_wire() == {
        "applied_version": 7,
        "status": "running",
        "counters": {"dropped": 0, "records": 120},
        "setpoints": {
            "line1/old": [None, [2_001, 0, "cloud"], "operator:alice", True],
            "line1/temp_high": [97.5, [2_000, 0, "edge-1"], "hmi", False],
        },
    }
    assert ReportedState(None, "starting").to_wire()["applied_version"] is None


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"applied_version": -1}, "applied_version must be an integer from 1"),
        ({"status": ""}, "status must be a non-empty string"),
        ({"counters": {"records": -1}}, "counters\\['records'\\] must be a non-negative"),
        ({"counters": {"records": 1.5}}, "counters\\['records'\\] must be int, got float"),
        ({"setpoints": {"a": [1]}}, "expected \\[value, hlc, origin, deleted\\]"),
        ({"extra": 1}, "unknown field\\(s\\) extra"),
    ],
)
def test_reported_state_from_wire_refuses_malformed(patch: dict, fragment: str) -> None:
    wire = {**ReportedState(1, "running").to_wire(), **patch}
    with pytest.raises(PeerError, match=fragment):
        ReportedState.from_wire(wire)


# -- persistence --------------------------------------------------------------------------------


def save_atomic(path: Path, data: bytes) -> None:
    """What the agent uses for desired and reported state: the one atomic write, mode 0600."""
    files.write_atomic(path, data, mode=0o600)


def test_save_atomic_writes_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    p = tmp_path / "desired.msgpack"
    assert load(p) is None
    save_atomic(p, b"one")
    assert load(p) == b"one"
    save_atomic(p, b"two")
    assert load(p) == b"two"
    assert [f.name for f in tmp_path.iterdir()] == ["desired.msgpack"]
    assert p.stat().st_mode & 0o777 == 0o600


def test_save_atomic_fsyncs_the_file_then_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    save_atomic(tmp_path / "x", b"data")
    assert calls == ["fsync-file", "replace", "fsync-dir"]


def test_failed_save_keeps_the_old_file_and_removes_the_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "desired.msgpack"
    save_atomic(p, b"old")

    def replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(StorageError, match=re.escape(f"cannot write {p}: No space left on device")):
        save_atomic(p, b"new")
    assert load(p) == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["desired.msgpack"]


def test_storage_errors_are_clear(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "desired.msgpack"
    msg = f"cannot write {missing}: No such file or directory"
    with pytest.raises(StorageError, match=re.escape(msg)):
        save_atomic(missing, b"x")
    with pytest.raises(StorageError, match=re.escape(f"cannot read {tmp_path}: Is a directory")):
        load(tmp_path)


def test_node_without_network_starts_from_its_last_persisted_desired_state(
    tmp_path: Path,
) -> None:
    p = tmp_path / "desired.msgpack"
    assert load_desired(p) is None
    save_desired(p, ds(4))
    save_desired(p, ds(5, config={"threshold": 100.0}))
    # a restart: nothing in memory, only the file
    assert load_desired(p) == ds(5, config={"threshold": 100.0})


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        msgpack.packb([1, 2]),
        msgpack.packb({"format": 99, "desired": GOOD}),
        msgpack.packb({"format": 1, "desired": {**GOOD, "version": 0}}),
    ],
)
def test_corrupt_persisted_state_is_a_storage_error(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "desired.msgpack"
    p.write_bytes(content)
    with pytest.raises(StorageError, match=re.escape(f"persisted desired state {p} is unreadable")):
        load_desired(p)


# -- pipelines named or not (a setpoint-only desired state keeps the node's --pipeline) ----------


def test_a_state_that_names_no_pipelines_says_so_on_the_wire() -> None:
    """Only config/setpoints/labels: ``pipelines`` is None (not {}), so the node can tell "run
    your own --pipeline" from "run no pipeline"."""
    s = DesiredState(3, config={"mode": "auto"})
    assert s.pipelines is None and not s.names_pipelines
    wire = s.to_wire()
    assert wire["pipelines"] is None
    back = DesiredState.from_wire(msgpack.unpackb(msgpack.packb(wire, use_bin_type=True)))
    assert back == s and not back.names_pipelines
    explicit = DesiredState.from_wire({**wire, "pipelines": {}})
    assert explicit.pipelines == {} and explicit.names_pipelines
    assert explicit != s
    assert ds(4).names_pipelines


def test_a_state_that_names_no_pipelines_persists_as_such(tmp_path: Path) -> None:
    path = tmp_path / "desired.msgpack"
    save_desired(path, DesiredState(5, config={"mode": "auto"}))
    loaded = load_desired(path)
    assert loaded is not None and loaded.pipelines is None
    save_desired(path, DesiredState(6, {}))
    loaded = load_desired(path)
    assert loaded is not None and loaded.pipelines == {}
