"""`edgewise components`: every parameter described, one component with its example, --json."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgewise.cli.main import main
from edgewise.pipeline import registry
from edgewise.pipeline.component_examples import EXAMPLES
from edgewise.pipeline.reference import parameters
from edgewise.pipeline.spec import parse_pipeline

ALL = [(kind, name) for kind, table in registry.KINDS.items() for name in table]


def test_no_component_parameter_has_a_blank_description() -> None:
    blank = [f"{kind} {name}: {p['name']}" for kind, name in ALL
             for p in parameters(kind, name) if not p["meaning"].strip()]
    assert blank == []
    assert sum(len(parameters(kind, name)) for kind, name in ALL) == 173


@pytest.mark.parametrize(("kind", "name"), ALL)
def test_each_example_is_a_valid_part_of_a_pipeline(kind: str, name: str) -> None:
    assert (kind, name) in EXAMPLES
    src = "- id: sensors\n  type: simulator\n  limit: 10\n" if kind != "source" else ""
    parts = {"source": src, "operator": "", "sink": ""}
    parts[kind] += EXAMPLES[(kind, name)]
    if kind != "sink":  # a pipeline needs a sink
        feed = "windows" if kind == "operator" else "sensors"
        ids = EXAMPLES[(kind, name)].split("\n", 1)[0].removeprefix("- id: ")
        feed = ids if kind == "operator" else feed
        parts["sink"] = f"- id: out\n  type: outbox\n  inputs: [{feed}]\n"
    indent = lambda text: "".join(f"    {line}\n" for line in text.splitlines())  # noqa: E731
    doc = ("apiVersion: edgewise.io/v1\nkind: Pipeline\nmetadata:\n  name: example\nspec:\n"
           f"  sources:\n{indent(parts['source'])}  stages:{' []' if not parts['operator'] else ''}"
           f"\n{indent(parts['operator'])}  sinks:\n{indent(parts['sink'])}")
    spec = parse_pipeline(doc, load_code=False)
    assert len(spec.sources) == 1 and len(spec.sinks) == 1


def test_components_type_shows_one_component_with_its_example() -> None:
    res = CliRunner().invoke(main, ["components", "threshold"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "threshold" in out and "hysteresis" in out and "Example" in out
    assert "high: 100.0" in out
    assert "simulator" not in out  # only the one component


def test_components_type_of_two_kinds_and_kind_filter() -> None:
    res = CliRunner().invoke(main, ["components", "mqtt", "--json"])
    assert res.exit_code == 0
    got = json.loads(res.output)
    assert [(c["kind"], c["type"]) for c in got] == [("source", "mqtt"), ("sink", "mqtt")]
    res = CliRunner().invoke(main, ["components", "mqtt", "--kind", "sink", "--json"])
    (sink,) = json.loads(res.output)
    topic = next(p for p in sink["parameters"] if p["name"] == "topic")
    assert topic["required"] is True and topic["default"] is None and topic["type"] == "str"
    qos = next(p for p in sink["parameters"] if p["name"] == "qos")
    assert qos == {"name": "qos", "type": "0 | 1", "required": False, "default": "1",
                   "meaning": "Publish QoS: 0 at most once, 1 at least once."}
    assert sink["example"].startswith("- id: local-alarms")


def test_components_json_lists_all_and_unknown_type_exits_2() -> None:
    res = CliRunner().invoke(main, ["components", "--json"])
    assert res.exit_code == 0
    assert len(json.loads(res.output)) == len(ALL) == 24
    res = CliRunner().invoke(main, ["components", "nosuch"])
    assert res.exit_code == 2
    assert "no component 'nosuch'; the built-in ones: anomaly," in res.output
