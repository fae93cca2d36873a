"""The node's twin without a network: choosing, validating, persisting and applying desired
state; what runs at start; setpoints with a persisted hybrid logical clock; the report."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edgewise.edge.twin import DesiredRefused, Twin, build_spec
from edgewise.errors import PeerError, StorageError
from edgewise.pipeline.spec import PipelineSpec
from edgewise.sync.hlc import HLC
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import DesiredState, ReportedState, load_desired

NOW = 1_700_000_000.0

PIPE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: {name}
spec:
  sources:
    - id: sensors
      type: simulator
  sinks:
    - id: out
      type: outbox
      inputs: [sensors]
"""


def state(version: int, name: str = "line", **kw: Any) -> DesiredState:
    return DesiredState(version, {name: PIPE.format(name=name)}, **kw)


class Recorder:
    """Stands in for the cloud (fetch) and the engine supervisor (apply)."""

    def __init__(self) -> None:
        self.offer: dict[str, Any] = {"version": 0, "desired": None}
        self.applied: list[tuple[str | None, int]] = []

    async def fetch(self) -> dict[str, Any]:
        return self.offer

    def give(self, s: DesiredState) -> None:
        self.offer = {"version": s.version, "desired": s.to_wire()}

    async def apply(self, spec: PipelineSpec | None, s: DesiredState) -> str | None:
        self.applied.append((spec.name if spec else None, s.version))
        return None


def twin(tmp_path: Path, node: str = "node-1") -> Twin:
    t = Twin(tmp_path / "twin", node, base_dir=tmp_path / "pipelines", now=lambda: NOW)
    t.load()
    return t


def test_build_spec_validates_every_rule(tmp_path: Path) -> None:
    spec = build_spec(state(3, "line1"), tmp_path)
    assert spec is not None and spec.name == "line1"
    assert build_spec(DesiredState(4), tmp_path) is None  # nothing assigned
    with pytest.raises(DesiredRefused, match=r"assigns 2 pipelines \(a, b\); this agent runs"):
        build_spec(DesiredState(5, {"a": PIPE.format(name="a"), "b": PIPE.format(name="b")}),
                   tmp_path)
    bad = PIPE.format(name="x").replace("type: simulator", "type: nope")
    with pytest.raises(DesiredRefused) as err:
        build_spec(DesiredState(6, {"x": bad}), tmp_path)
    assert str(err.value) == (
        "desired v6 pipeline 'x' is invalid:\ndesired-v6-x.yaml:8: spec.sources.0.type: "
        "unknown source type 'nope'; known: file, http, modbus, mqtt, opcua, simulator")
    with pytest.raises(DesiredRefused, match=r"v7: config.setpoints: LWW map must be a map"):
        build_spec(DesiredState(7, config={"setpoints": [1]}), tmp_path)


async def test_pull_applies_the_newest_persists_it_and_never_goes_back(tmp_path: Path) -> None:
    t, cloud = twin(tmp_path), Recorder()
    applied_reports: list[int] = []
    t.on_applied = lambda: applied_reports.append(t.applied_version())
    assert not await t.pull(cloud.fetch, cloud.apply)  # the cloud has nothing yet
    cloud.give(state(3, "line3"))
    assert await t.pull(cloud.fetch, cloud.apply)
    assert cloud.applied == [("line3", 3)] and t.applied_version() == 3
    assert load_desired(t.desired_path) == state(3, "line3")
    assert t.status_text == "running desired v3" and applied_reports == [3]
    assert not await t.pull(cloud.fetch, cloud.apply)  # same version: nothing to do
    cloud.give(state(2, "old"))
    assert not await t.pull(cloud.fetch, cloud.apply)  # never backwards
    assert cloud.applied == [("line3", 3)]
    # a new process starts from the persisted state
    again = twin(tmp_path)
    assert again.applied_version() == 3
    spec = again.startup_spec(pipeline_file=None)
    assert spec is not None and spec.name == "line3"


async def test_expired_and_invalid_versions_are_refused_and_not_wanted_again(
    tmp_path: Path,
) -> None:
    t, cloud = twin(tmp_path), Recorder()
    cloud.give(state(1))
    await t.pull(cloud.fetch, cloud.apply)
    cloud.give(state(2, expires_at=NOW - 1))
    assert not await t.pull(cloud.fetch, cloud.apply)
    assert t.refused[2].startswith("v2 expired at 2023-11-14T22:13:19+00:00")
    cloud.give(DesiredState(3, {"x": "not: [valid"}))
    assert not await t.pull(cloud.fetch, cloud.apply)
    assert "desired v3 pipeline 'x' is invalid" in t.refused[3]
    assert t.status_text.startswith("desired v3 refused: desired v3 pipeline 'x' is invalid")
    assert cloud.applied == [("line", 1)] and t.applied_version() == 1
    assert load_desired(t.desired_path) == state(1)
    # the pull loop: pokes for refused or applied versions fetch nothing; a newer one does
    fetches = 0

    async def counting_fetch() -> dict[str, Any]:
        nonlocal fetches
        fetches += 1
        return await cloud.fetch()

    runner = asyncio.create_task(t.run(counting_fetch, cloud.apply))
    try:
        t.on_desired(3)
        t.on_desired(1)
        await asyncio.sleep(0.05)
        assert fetches == 0
        cloud.give(state(4, "line4"))
        t.on_desired(4)
        for _ in range(100):
            if t.applied_version() == 4:
                break
            await asyncio.sleep(0.01)
        assert fetches == 1 and cloud.applied[-1] == ("line4", 4)
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    cloud.offer = {"version": 9, "desired": {"version": 9, "bogus": 1}}
    with pytest.raises(PeerError, match="unknown field"):
        await t.pull(cloud.fetch, cloud.apply)
    assert "malformed" in t.refused[9]
    cloud.offer = {"version": 10, "desired": state(11).to_wire()}
    with pytest.raises(PeerError, match="says version 10 but holds v11"):
        await t.pull(cloud.fetch, cloud.apply)


def test_startup_runs_persisted_state_else_the_pipeline_flag_else_nothing(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "flag.yaml"
    flag.write_text(PIPE.format(name="from-flag"))
    t = twin(tmp_path)
    assert t.startup_spec(None) is None and t.status_text == "idle: no pipeline assigned"
    spec = t.startup_spec(flag)
    assert spec is not None and spec.name == "from-flag"
    from edgewise.sync.twin_state import save_desired

    save_desired(t.desired_path, state(5, "from-cloud"))
    t = twin(tmp_path)
    spec = t.startup_spec(flag)
    assert spec is not None and spec.name == "from-cloud"


def test_setpoints_merge_by_hlc_audit_losers_and_persist_the_clock(tmp_path: Path) -> None:
    t = twin(tmp_path)
    assert t.set_setpoint("line1.high", 100.0) is None
    local = t.setpoints.entry("line1.high")
    assert local is not None
    # an operator's earlier write arrives late: ours wins, theirs is audited
    older = HLC(local.hlc.wall_ms - 1000, 0, "cloud")
    lost = t.merge_setpoints(_one("line1.high", 95.0, older))
    assert [(a.key, a.lost_value, a.lost_origin) for a in lost] == [("line1.high", 95.0, "cloud")]
    assert t.setpoints.get("line1.high") == 100.0
    # a later operator write wins; our value goes to the audit trail
    newer = HLC(local.hlc.wall_ms + 1000, 0, "cloud")
    lost = t.merge_setpoints(_one("line1.high", 105.0, newer))
    assert [(a.lost_value, a.lost_origin) for a in lost] == [(100.0, "node-1")]
    assert t.setpoints.get("line1.high") == 105.0
    # a restart keeps setpoints, audit and a clock that never goes back
    again = twin(tmp_path)
    assert again.setpoints == t.setpoints and len(again.audit) == 2
    assert again.clock.now() > newer
    assert again.clock.node == "node-1"


def _one(key: str, value: Any, hlc: HLC) -> LwwMap:
    m = LwwMap()
    m.set(key, value, hlc)
    return m


def test_report_is_a_valid_reported_state(tmp_path: Path) -> None:
    t = twin(tmp_path)
    t.counters = lambda: {"alarms.produced": 12, "bad": -1, "flag": True, "wire": 5}
    t.set_setpoint("k", "v")
    wire = t.report()
    back = ReportedState.from_wire(wire)
    assert back.applied_version is None and back.status == "starting"
    assert back.counters == {"alarms.produced": 12, "wire": 5}
    assert back.setpoints.get("k") == "v"


def test_an_unreadable_reported_file_is_a_storage_error(tmp_path: Path) -> None:
    t = twin(tmp_path)
    t.reported_path.write_bytes(b"\xc1junk")
    with pytest.raises(StorageError, match="move it away"):
        twin(tmp_path)
