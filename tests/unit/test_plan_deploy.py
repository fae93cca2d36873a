"""`plan.deploy.split`: a placed pipeline's edge part and cloud part."""

from __future__ import annotations

from edgewise.pipeline.spec import parse_pipeline
from edgewise.plan.deploy import dump, split

DOC = {
    "apiVersion": "edgewise.io/v1", "kind": "Pipeline",
    "metadata": {"name": "p", "labels": {"edgewise.io/site": "farm"}},
    "spec": {
        "sources": [{"id": "sim", "type": "simulator", "placement": "edge"}],
        "stages": [
            {"id": "w", "type": "window", "inputs": ["sim"], "placement": "edge", "size": "1m"},
            {"id": "th", "type": "threshold", "inputs": ["sim"], "placement": "edge",
             "high": 5.0},
            {"id": "fleet", "type": "window", "inputs": ["w"], "placement": "cloud",
             "size": "1h", "key_by": [], "field": "mean", "aggregates": ["count"]},
            {"id": "alarms", "type": "window", "inputs": ["th"], "placement": "cloud",
             "size": "1h", "key_by": [], "aggregates": ["count"]},
        ],
        "sinks": [
            {"id": "w-out", "type": "outbox", "inputs": ["w"], "placement": "edge",
             "stream": "minutes"},
            {"id": "fleet-store", "type": "outbox", "inputs": ["fleet"], "placement": "cloud",
             "stream": "fleet"},
            {"id": "alarms-store", "type": "outbox", "inputs": ["alarms"],
             "placement": "cloud"},
        ],
    },
}


def test_split_edge_and_cloud_parts() -> None:
    edge, cloud = split(DOC, {"site": "farm"})
    assert [c["id"] for c in edge["spec"]["stages"]] == ["w", "th"]
    # th goes to the cloud only for the cloud stage: the edge part gains a sink for it
    assert [(s["id"], s["stream"]) for s in edge["spec"]["sinks"]] == [
        ("w-out", "minutes"), ("th-to-cloud", "th-to-cloud")]
    assert cloud is not None
    assert cloud["spec"]["sources"] == [
        {"id": "w", "type": "stream", "placement": "cloud", "stream": "minutes",
         "nodes": {"site": "farm"}},
        {"id": "th", "type": "stream", "placement": "cloud", "stream": "th-to-cloud",
         "nodes": {"site": "farm"}}]
    assert [c["id"] for c in cloud["spec"]["stages"]] == ["fleet", "alarms"]
    assert [c["id"] for c in cloud["spec"]["sinks"]] == ["fleet-store", "alarms-store"]
    parse_pipeline(dump(edge, "x"), "edge")
    parse_pipeline(dump(cloud, "x"), "cloud")
    assert DOC["spec"]["sinks"][0] == {"id": "w-out", "type": "outbox", "inputs": ["w"],
                                       "placement": "edge", "stream": "minutes"}


def test_split_without_cloud_stages() -> None:
    doc = {**DOC, "spec": {**DOC["spec"], "stages": DOC["spec"]["stages"][:2],
                           "sinks": DOC["spec"]["sinks"][:1]}}
    edge, cloud = split(doc, {"site": "farm"})
    assert cloud is None and edge["spec"] == doc["spec"]


def test_split_window_becomes_partial_and_combine() -> None:
    from types import SimpleNamespace

    from edgewise.plan.artefacts import _split_window

    st = SimpleNamespace(params={"size": "10m", "key_by": [], "field": "mean",
                                 "aggregates": ["count", "mean", "max(mean)", "p95"]})
    partial, combine = _split_window(st)  # type: ignore[arg-type,misc]
    assert partial == {"type": "partial", "size": "10m", "key_by": [], "field": "mean",
                       "sketch": True}
    assert combine == {"type": "combine", "size": "10m", "key_by": [],
                       "aggregates": ["count", "mean", "max", "p95"]}
    # a second field or an aggregate that does not merge: the approximate fallback
    st2 = SimpleNamespace(params={"size": "1h", "field": "mean",
                                  "aggregates": ["count", "max(max)"]})
    assert _split_window(st2) is None  # type: ignore[arg-type]
    st3 = SimpleNamespace(params={"size": "1h", "aggregates": ["first"]})
    assert _split_window(st3) is None  # type: ignore[arg-type]
