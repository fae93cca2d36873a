"""The workload loader: clear errors with file, line and field; stated defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgewise.errors import ConfigError, SpecError
from edgewise.plan.workload import load_workload, parse_bandwidth, parse_workload

MINIMAL = """\
apiVersion: edgewise.io/v1
kind: Workload
metadata: {name: mini}
spec:
  use_case: temperatures of a cold store
  sites:
    - name: store
      sources:
        - {id: temps, count: 20, rate_hz: 1, alarm: {high: 8.0}}
  requirements:
    max_alarm_latency: 500ms
    offline_autonomy: 4h
"""


def test_bad_workload_file_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL.replace("rate_hz: 1,", "rate_hz: -5,").replace(
        "    offline_autonomy: 4h\n", "    offline_autonomy: 4h\n    latency_budgt: 3\n"))
    with pytest.raises(SpecError) as err:
        load_workload(path)
    lines = str(err.value).splitlines()
    assert lines == [
        f"{path}:9: spec.sites.0.sources.0.rate_hz: Input should be greater than 0",
        f"{path}:13: spec.requirements.latency_budgt: Extra inputs are not permitted "
        "(remove it or check its spelling)",
    ]


def test_unknown_operator_and_bad_params_point_at_their_lines() -> None:
    text = MINIMAL.replace("  requirements:", """\
  stages:
    - id: agg
      operator: windw
      inputs: [temps]
    - id: agg2
      operator: window
      inputs: [temps]
      params: {size: 1s, aggregates: [median]}
    - id: agg3
      operator: window
      inputs: [nothing]
      params: {size: 1s}
  requirements:""")
    with pytest.raises(SpecError) as err:
        parse_workload(text, "w.yaml")
    msg = str(err.value).splitlines()
    assert msg[0].startswith("w.yaml:12: spec.stages.0.operator: unknown operator 'windw'; "
                             "known: anomaly, combine, deadband, downsample, fft, filter, map,")
    assert msg[1].startswith("w.yaml:17: spec.stages.1.params.aggregates: unknown aggregate "
                             "'median'")
    assert msg[2] == ("w.yaml:20: spec.stages.2.inputs.0: 'nothing' is not the id of a source "
                      "or stage; known: temps, agg, agg2, agg3")


def test_not_yaml_and_missing_file() -> None:
    with pytest.raises(SpecError) as err:
        parse_workload("spec: [\n", "x.yaml")
    assert str(err.value).startswith("x.yaml:2: not valid YAML")
    with pytest.raises(ConfigError) as err2:
        load_workload("/nonexistent/w.yaml")
    assert str(err2.value) == "/nonexistent/w.yaml: no such file"


def test_required_inputs_only_get_stated_defaults() -> None:
    w = parse_workload(MINIMAL, "mini.yaml")
    fields = [i.field for i in w.inferred]
    assert fields == [
        "sites.0.link", "sites.0.sources.0.bytes_per_sample", "stages.temps-aggregates",
        "stages.temps-alarms", "hardware", "requirements.fleet_size",
        "architecture.edge nodes", "architecture.consistency", "architecture.security",
    ]
    assert [s.id for s in w.stages] == ["temps-aggregates", "temps-alarms"]
    alarm = w.stages[1]
    assert alarm.operator == "threshold" and alarm.params == {"high": 8.0}
    assert alarm.latency_budget == 0.5 and alarm.during_outage
    assert [h.name for h in w.hardware] == ["k3s-small", "k3s-standard", "k3s-large", "k3s-gpu"]
    assert w.sites[0].link.uplink == 20e6


def test_missing_required_requirement() -> None:
    with pytest.raises(SpecError) as err:
        parse_workload(MINIMAL.replace("    offline_autonomy: 4h\n", ""), "m.yaml")
    assert str(err.value) == ("m.yaml:10: spec.requirements.offline_autonomy: Field required "
                              "(add it)")


@pytest.mark.parametrize(("text", "bits"), [
    ("20Mbit/s", 20e6), ("512kbps", 512e3), ("1MB/s", 8e6), (1000, 1000.0), ("2 Gbit/s", 2e9)])
def test_bandwidth_units(text: object, bits: float) -> None:
    assert parse_bandwidth(text) == bits


def test_bad_bandwidth_message() -> None:
    with pytest.raises(SpecError) as err:
        parse_workload(MINIMAL.replace("  requirements:", "      link: {uplink: fast}\n"
                                                         "  requirements:"), "b.yaml")
    assert str(err.value) == ("b.yaml:10: spec.sites.0.link.uplink: 'fast' is not a bandwidth; "
                              "write e.g. '20Mbit/s', '512kbps' or bits per second")
