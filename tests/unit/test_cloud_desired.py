"""`cloud.desired.DesiredChange.apply`, the pure rule behind ``config set``: pipelines are kept
when a change does not name them, and a node whose desired state never named any keeps that
"none named" (its own ``--pipeline`` runs), while an explicit empty set stays explicit."""

from __future__ import annotations

from edgewise.cloud.desired import DesiredChange, setpoint_writes
from edgewise.sync.hlc import Clock
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import DesiredState

PIPE = "name: line\n"


def _next(change: DesiredChange, previous: DesiredState | None) -> DesiredState:
    pipelines, config = change.apply(previous)
    return DesiredState((previous.version if previous else 0) + 1, pipelines, config)


def _setpoint(key: str, value: object) -> DesiredChange:
    clock = Clock("cloud", lambda: 1_700_000_000_000)
    return DesiredChange(setpoints=setpoint_writes(clock, {key: value}, "operator:alice"))


def test_a_setpoint_only_change_names_no_pipelines() -> None:
    v1 = _next(_setpoint("mode", "auto"), None)
    assert v1.pipelines is None and not v1.names_pipelines
    assert LwwMap.from_wire(v1.config["setpoints"]).to_dict() == {"mode": "auto"}
    v2 = _next(DesiredChange(config={"rate": 5}), v1)  # config only: still none named
    assert v2.pipelines is None and v2.config["rate"] == 5
    assert LwwMap.from_wire(v2.config["setpoints"]).to_dict() == {"mode": "auto"}


def test_named_pipelines_are_kept_by_a_setpoint_only_change() -> None:
    v1 = _next(DesiredChange(pipelines={"line": PIPE}), None)
    v2 = _next(_setpoint("mode", "auto"), v1)
    assert v2.pipelines == {"line": PIPE}


def test_an_explicit_empty_set_stays_explicit() -> None:
    v1 = _next(DesiredChange(pipelines={"line": PIPE}), None)
    v2 = _next(DesiredChange(pipelines={}), v1)
    assert v2.pipelines == {} and v2.names_pipelines
    v3 = _next(_setpoint("mode", "auto"), v2)
    assert v3.pipelines == {} and v3.names_pipelines
    v4 = _next(DesiredChange(pipelines={}), None)  # a first version may say "none" too
    assert v4.pipelines == {}
