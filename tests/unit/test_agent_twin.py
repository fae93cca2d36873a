"""The node's twin without a network: choosing, validating, persisting and applying desired
state; what runs at start; setpoints with a persisted hybrid logical clock; the report."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edgewise.edge.damaged import DamagedFile
from edgewise.edge.twin import LOCAL, DesiredRefused, Twin, build_spec, pipeline_key
from edgewise.errors import PeerError
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
        "unknown source type 'nope'; known: file, http, modbus, mqtt, opcua, simulator, "
        "stream")
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


def test_a_damaged_reported_file_is_the_operators_to_fix(tmp_path: Path) -> None:
    t = twin(tmp_path)
    t.reported_path.write_bytes(b"\xc1junk")
    with pytest.raises(DamagedFile, match=r"reported\.msgpack is damaged .*: restore it"):
        twin(tmp_path)


# -- a desired state that names no pipelines keeps --pipeline running -------------------------


def _setpoints(now_ms: int, **values: Any) -> dict[str, Any]:
    m = LwwMap()
    for i, (k, v) in enumerate(sorted(values.items())):
        m.set(k, v, HLC(now_ms, i, "cloud"), "operator:alice")
    return {"setpoints": m.to_wire()}


async def test_a_setpoint_only_state_keeps_the_pipeline_flag_running_and_after_a_restart(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "flag.yaml"
    flag.write_text(PIPE.format(name="from-flag"))
    t, cloud = twin(tmp_path), Recorder()
    spec = t.startup_spec(flag)
    assert spec is not None and spec.name == "from-flag"
    cloud.give(DesiredState(1, config=_setpoints(int(NOW * 1000), mode="auto")))
    assert await t.pull(cloud.fetch, cloud.apply)
    assert t.applied_version() == 1 and t.setpoints.to_dict() == {"mode": "auto"}
    assert cloud.applied == []  # the engine keeps running: not stopped, not even restarted
    assert t.status_text == f"running --pipeline {flag} (desired v1 names no pipeline)"
    assert ReportedState.from_wire(t.report()).applied_version == 1
    # config only, again: still the flag's pipeline
    cloud.give(DesiredState(2, config={"rate": 5, **_setpoints(int(NOW * 1000), mode="auto")}))
    assert await t.pull(cloud.fetch, cloud.apply) and cloud.applied == []
    # a restart (no network) still runs --pipeline: the persisted state names no pipeline
    again = twin(tmp_path)
    assert again.applied_version() == 2
    spec = again.startup_spec(flag)
    assert spec is not None and spec.name == "from-flag"
    assert again.status_text == f"running --pipeline {flag} (desired v2 names no pipeline)"
    assert again.startup_spec(None) is None  # without the flag: nothing to run


async def test_an_explicit_empty_pipeline_set_stops_the_pipeline_flag(tmp_path: Path) -> None:
    flag = tmp_path / "flag.yaml"
    flag.write_text(PIPE.format(name="from-flag"))
    t, cloud = twin(tmp_path), Recorder()
    t.startup_spec(flag)
    cloud.give(DesiredState(1, {}))
    assert await t.pull(cloud.fetch, cloud.apply)
    assert cloud.applied == [(None, 1)] and t.status_text == "idle: desired v1 has no pipeline"
    again = twin(tmp_path)
    assert again.startup_spec(flag) is None  # "none" persists: the flag is not used
    assert again.status_text == "idle: no pipeline assigned"


async def test_the_engine_restarts_only_when_the_pipeline_to_run_changes(tmp_path: Path) -> None:
    flag = tmp_path / "flag.yaml"
    flag.write_text(PIPE.format(name="from-flag"))
    t, cloud = twin(tmp_path), Recorder()
    t.startup_spec(flag)
    cloud.give(state(1, "line1"))
    assert await t.pull(cloud.fetch, cloud.apply)
    setpoint_only = DesiredState(2, {"line1": PIPE.format(name="line1")},
                                 _setpoints(int(NOW * 1000), mode="auto"))
    cloud.give(setpoint_only)
    assert await t.pull(cloud.fetch, cloud.apply)
    assert cloud.applied == [("line1", 1)] and t.status_text == "running desired v2"
    assert t.setpoints.to_dict() == {"mode": "auto"}
    cloud.give(state(3, "line3"))
    assert await t.pull(cloud.fetch, cloud.apply)
    assert cloud.applied == [("line1", 1), ("line3", 3)]


def test_pipeline_key_tells_the_flag_from_none_and_from_named_pipelines() -> None:
    assert pipeline_key(None) == pipeline_key(DesiredState(1, config={"x": 1})) == LOCAL
    assert pipeline_key(DesiredState(1, {})) == ()
    assert pipeline_key(state(1, "a")) == pipeline_key(state(2, "a", config={"x": 1}))
    assert pipeline_key(state(1, "a")) != pipeline_key(state(1, "b"))


# -- setpoints stamped ahead of this node's clock: held, reported, retried --------------------


class WallClock:
    """The node's clock, ``offset_s`` off the real time ``NOW``."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def now(self) -> float:
        return NOW + self.offset_s

    def now_ms(self) -> int:
        return int(self.now() * 1000)


async def test_setpoints_ahead_of_a_slow_clock_are_held_not_applied_and_retried(
    tmp_path: Path,
) -> None:
    wall = WallClock(-3600)  # this node's clock is 1 h behind
    t = Twin(tmp_path / "twin", "node-1", base_dir=tmp_path, now=wall.now, now_ms=wall.now_ms)
    t.load()
    cloud = Recorder()
    reports: list[str] = []
    t.on_applied = lambda: reports.append(t.status_text)
    cloud.give(state(1, "line1"))
    assert await t.pull(cloud.fetch, cloud.apply)  # no setpoints: applies whatever the clock
    cloud.give(DesiredState(2, {"line1": PIPE.format(name="line1")},
                            _setpoints(int(NOW * 1000), mode="auto")))
    assert not await t.pull(cloud.fetch, cloud.apply)
    why = ("its setpoints are stamped 3600.0 s ahead of this node's clock (allowed: 60.0 s); "
           "retrying until the clock is right (check NTP/chrony)")
    assert t.status_text == f"desired v2 not applied: {why}"
    assert reports[-1] == t.status_text  # a report goes up at once
    assert t.applied_version() == 1 and load_desired(t.desired_path) == state(1, "line1")
    assert t.setpoints.to_dict() == {} and "mode" not in t.status().setpoints
    rep = ReportedState.from_wire(t.report())
    assert rep.applied_version == 1 and rep.status == f"desired v2 not applied: {why}"
    assert rep.setpoints.to_dict() == {}
    st = t.status()
    assert st.applied_version == 1 and st.held == {"2": why} and st.refused == {}
    # still behind: still held, not refused (the cloud may poke it again), one report only
    wall.offset_s = -3000
    assert not await t.retry_held(cloud.apply)
    assert t.held is not None and 2 not in t.refused and len(reports) == 2
    # the clock is put right: the version applies, setpoints merged, reported
    wall.offset_s = 0
    assert await t.retry_held(cloud.apply)
    assert t.applied_version() == 2 and t.setpoints.to_dict() == {"mode": "auto"}
    assert t.held is None and t.status().held == {}
    assert t.status_text == "running desired v2" and reports[-1] == "running desired v2"
    assert load_desired(t.desired_path).version == 2
    assert cloud.applied == [("line1", 1)]  # same pipeline: not restarted
    assert not await t.retry_held(cloud.apply)  # nothing held


async def test_the_pull_loop_retries_a_held_version_and_drops_it_for_a_newer_one(
    tmp_path: Path,
) -> None:
    wall = WallClock(-3600)
    t = Twin(tmp_path / "twin", "node-1", base_dir=tmp_path, now=wall.now, now_ms=wall.now_ms)
    t.load()
    cloud = Recorder()
    cloud.give(DesiredState(1, config=_setpoints(int(NOW * 1000), mode="auto")))
    retries: list[int] = []

    def retry(n: int) -> float:
        retries.append(n)
        return 0.01

    runner = asyncio.create_task(t.run(cloud.fetch, cloud.apply, retry))
    try:
        t.on_desired(1)
        for _ in range(200):
            if len(retries) >= 3:
                break
            await asyncio.sleep(0.01)
        assert t.held is not None and t.held.version == 1 and t.applied_version() == 0
        assert retries[:3] == [1, 2, 3] and t.pulls == 1  # retried locally, not re-fetched
        # a newer version supersedes the held one; it is held too while the clock is slow
        cloud.give(DesiredState(2, config=_setpoints(int(NOW * 1000) + 5, mode="eco")))
        t.on_desired(2)
        for _ in range(200):
            if t.held is not None and t.held.version == 2:
                break
            await asyncio.sleep(0.01)
        assert t.held is not None and t.held.version == 2
        wall.offset_s = 0
        for _ in range(200):
            if t.applied_version() == 2:
                break
            await asyncio.sleep(0.01)
        assert t.applied_version() == 2 and t.setpoints.to_dict() == {"mode": "eco"}
        assert t.held is None
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_a_held_version_that_expires_is_refused(tmp_path: Path) -> None:
    wall = WallClock(-3600)
    t = Twin(tmp_path / "twin", "node-1", base_dir=tmp_path, now=wall.now, now_ms=wall.now_ms)
    t.load()
    cloud = Recorder()
    cloud.give(DesiredState(1, config=_setpoints(int(NOW * 1000), mode="auto"),
                            expires_at=NOW + 60))
    assert not await t.pull(cloud.fetch, cloud.apply) and t.held is not None
    wall.offset_s = 120  # the clock jumps past the expiry: never applied
    assert not await t.retry_held(cloud.apply)
    assert t.held is None and "v1 expired at" in t.refused[1] and t.applied_version() == 0


FILES = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: files
spec:
  sources:
    - {{id: replay, type: file, path: "{source}"}}
  sinks:
    - {{id: copy, type: file, inputs: [replay], path: "{sink}"}}
"""


async def test_a_cloud_pipeline_naming_files_outside_the_allowed_folders_is_refused(
        tmp_path: Path) -> None:
    outside = (tmp_path / "outside").resolve()
    outside.mkdir()
    base = (tmp_path / "pipelines").resolve()
    t, cloud = twin(tmp_path), Recorder()
    cloud.give(DesiredState(1, {"files": FILES.format(source="in.ndjson",
                                                      sink="../../escape/y.ndjson")}))
    assert not await t.pull(cloud.fetch, cloud.apply)
    assert t.refused[1] == (
        "desired v1 pipeline 'files' is invalid:\ndesired-v1-files.yaml:9: spec.sinks.0.path: "
        "'../../escape/y.ndjson' is outside the folders this node allows for pipelines from the "
        f"control plane (it resolves to {base.parents[1]}/escape/y.ndjson); allowed: {base}; "
        f"name a file inside one of them (relative paths are taken from {base}), or allow its "
        "folder on the node with `edgewise agent run --allow-path DIR`")
    assert t.status_text == "desired v1 refused: desired v1 pipeline 'files' is invalid:"
    cloud.give(DesiredState(2, {"files": FILES.format(source=outside / "in.ndjson",
                                                      sink="out.ndjson")}))
    assert not await t.pull(cloud.fetch, cloud.apply)
    assert f"spec.sources.0.path: '{outside}/in.ndjson' is outside the folders" in t.refused[2]
    assert cloud.applied == [] and t.applied_version() == 0
    assert not t.desired_path.exists() and not (base.parents[1] / "escape").exists()

    # the node's operator allowed the folder (`agent run --allow-path`): applied
    t = Twin(tmp_path / "twin", "node-1", base_dir=tmp_path / "pipelines",
             allowed_roots=(outside,), now=lambda: NOW)
    t.load()
    cloud.give(DesiredState(3, {"files": FILES.format(source=outside / "in.ndjson",
                                                      sink="../outside/copy.ndjson")}))
    assert await t.pull(cloud.fetch, cloud.apply)
    assert cloud.applied == [("files", 3)]
    spec = build_spec(load_desired(t.desired_path), tmp_path / "pipelines", (outside,))
    assert spec is not None
    assert spec.sinks[0].config.file_path("path", tmp_path) == outside / "copy.ndjson"
    # restarted without the flag, the persisted pipeline is refused: the operator must see it
    with pytest.raises(DesiredRefused, match=r"spec\.sources\.0\.path"):
        twin(tmp_path).startup_spec(None)


def test_an_allowed_folder_must_not_overlap_the_data_directory(tmp_path: Path) -> None:
    from edgewise.errors import ConfigError
    from edgewise.pipeline.paths import check_allowed_roots

    data = (tmp_path / "node").resolve()
    check_allowed_roots(data, [tmp_path / "beside"])
    with pytest.raises(ConfigError) as err:
        check_allowed_roots(data, [tmp_path / "beside", tmp_path])
    assert str(err.value) == (
        f"--allow-path {tmp_path}: it holds the node's data directory {data} (node key, outbox, "
        "state), which pipelines from the control plane must not reach; allow a folder beside "
        f"it ({data}/pipelines is allowed anyway)")
    with pytest.raises(ConfigError, match="it is inside the node's data directory"):
        check_allowed_roots(data, [data / "engine"])
