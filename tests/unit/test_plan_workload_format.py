"""The workload format's newer fields (issue 14): HA, multi-field records, tiers, compliance
tags, models, per-group rates, duty cycles, second links, the user code's folder; each error
names file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgewise.errors import SpecError
from edgewise.plan import flows as F
from edgewise.plan.encoding import json_reading_bytes
from edgewise.plan.model import build_plan
from edgewise.plan.workload import load_workload, parse_workload

HEAD = """\
apiVersion: edgewise.io/v1
kind: Workload
metadata: {name: fmt}
spec:
  use_case: patient monitors on a ward
  sites:
    - name: ward
"""
TAIL = """\
  requirements:
    max_alarm_latency: 2s
    offline_autonomy: 4h
"""
SOURCE = """\
      sources:
        - {id: vitals, count: 8, rate_hz: 1}
"""


def doc(site: str = "", sources: str = SOURCE, spec: str = "") -> str:
    return HEAD + site + sources + spec + TAIL


def errors(text: str, source: str = "w.yaml") -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_workload(text, source)
    return str(err.value).splitlines()


def test_ha_pair_is_stated_and_counted() -> None:
    wl = parse_workload(doc("      nodes: 2\n      ha: active-active\n      count: 3\n"))
    assert wl.sites[0].ha == "active-active"
    assert wl.total_nodes == 6
    wl = parse_workload(doc("      nodes: 2\n"))
    assert wl.sites[0].ha == "active-standby"
    assert [(i.field, i.value) for i in wl.inferred if i.field == "sites.0.ha"] == [
        ("sites.0.ha", "active-standby")]


def test_ha_errors() -> None:
    assert errors(doc("      ha: active-standby\n")) == [
        "w.yaml:8: spec.sites.0.ha: ha: active-standby needs two nodes or more; add 'nodes: 2'"]
    assert errors(doc("      nodes: 2\n      ha: hot-spare\n")) == [
        "w.yaml:9: spec.sites.0.ha: Input should be 'active-standby' or 'active-active' "
        "(use one of the allowed values)"]


MULTI = """\
      sources:
        - id: bp
          count: 4
          rate_hz: 0.5
          fields:
            - {name: systolic, unit: mmHg, resolution: 1,
               signal: {low: 110, high: 140, noise: 4, spike_prob: 0.01, spike_value: 185}}
            - {name: diastolic, unit: mmHg, resolution: 1, signal: {low: 70, high: 90}}
"""


def test_multi_field_records_have_a_column_per_field() -> None:
    stages = """\
  stages:
    - {id: bp-high, operator: threshold, inputs: [bp], params: {field: systolic, high: 180}}
"""
    wl = parse_workload(doc(sources=MULTI, spec=stages))
    src = wl.sites[0].sources[0]
    assert src.value_fields == ["systolic", "diastolic"]
    flow = F.source_flow(src, "ward")
    assert list(flow.fields) == ["sensor", "ts", "systolic", "diastolic"]
    assert flow.fields["systolic"].params["decimals"] == 0
    # the naive baseline carries both fields: {"sensor":"ward/bp/000","ts":..,"systolic":125,..}
    assert json_reading_bytes(src, "ward") == len(
        '{"sensor":"ward/bp/000","ts":1764547200.00,"systolic":125,"diastolic":80}')
    # an alarm rate is estimated from the systolic signal: 1% spikes at 185+ over 180
    plan = build_plan(wl)
    rate = plan.sites[0].flows["bp-high"].rate
    assert rate == pytest.approx(4 * 0.5 * 0.01, rel=0.05)


def test_default_stages_of_a_multi_field_source_use_its_first_field() -> None:
    wl = parse_workload(doc(sources=MULTI))
    assert [(s.id, s.params.get("field")) for s in wl.stages] == [("bp-aggregates", "systolic")]


def test_multi_field_errors() -> None:
    bad = MULTI.replace("name: diastolic", "name: systolic")
    assert errors(doc(sources=bad)) == [
        "w.yaml:12: spec.sites.0.sources.0.fields: duplicate field name(s): systolic"]
    stages = """\
  stages:
    - {id: bp-high, operator: threshold, inputs: [bp], params: {high: 180}}
"""
    assert errors(doc(sources=MULTI, spec=stages)) == [
        "w.yaml:17: spec.stages.0.params.field: source 'bp' has no field 'value'; its "
        "fields: systolic, diastolic"]
    reserved = MULTI.replace("name: diastolic", "name: ts")
    assert errors(doc(sources=reserved))[0].startswith(
        "w.yaml:15: spec.sites.0.sources.0.fields.1: field name 'ts' is reserved")
    with_alarm = MULTI.replace("rate_hz: 0.5\n", "rate_hz: 0.5\n          alarm: {high: 1}\n")
    assert errors(doc(sources=with_alarm)) == [
        "w.yaml:12: spec.sites.0.sources.0.alarm: alarm limits of a multi-field source need a "
        "field: write a threshold stage with params.field instead"]


def test_compliance_tags_drive_placement() -> None:
    sources = """\
      sources:
        - {id: gps, count: 10, rate_hz: 1, compliance: [personal, location]}
"""
    stages = """\
  stages:
    - {id: trips, operator: window, inputs: [gps], params: {size: 1m, aggregates: [count]}}
"""
    wl = parse_workload(doc(sources=sources, spec=stages))
    assert wl.sites[0].sources[0].tags == frozenset({"personal", "location"})
    plan = build_plan(wl)
    reasons = [s for s in plan.sites[0].decisions["trips"].scores if s.criterion == "privacy"]
    assert [(s.value, s.why) for s in reasons] == [
        (1, "reads personal data: keeping it on site is safer")]
    assert errors(doc(sources=sources.replace("location", "gdpr")))[0].startswith(
        "w.yaml:9: spec.sites.0.sources.0.compliance.1: Input should be 'personal', 'phi'")


def test_tiers_in_order_and_with_the_site() -> None:
    wl = parse_workload(doc("      tiers: [device, gateway, site, region]\n      region: eu\n"))
    assert wl.sites[0].tiers == ["device", "gateway", "site", "region"]
    assert errors(doc("      tiers: [site, device]\n")) == [
        "w.yaml:8: spec.sites.0.tiers: tiers must be distinct and in order from the data's "
        "birth to the cloud: device -> gateway -> site -> region"]
    assert errors(doc("      tiers: [device, gateway]\n")) == [
        "w.yaml:8: spec.sites.0.tiers: tiers must include 'site' (where the Edgewise node runs)"]


def test_models_give_their_stage_needs() -> None:
    spec = """\
  models:
    - {name: detector, size: 12GiB, accelerator: gpu, accelerator_memory: 16GiB}
  stages:
    - {id: detect, function: "ward_fn.detect:Detector", inputs: [vitals], model: detector,
       cpu_us_per_record: 50, reduction: 0.1, output_bytes_per_record: 40}
  code: {path: .}
"""
    wl = parse_workload(doc(spec=spec), "w.yaml")
    assert wl.stages[0].needs == ["gpu", "large_model"]
    assert any(i.field == "stages.0.needs" and i.value == "gpu, large_model"
               for i in wl.inferred)
    bad = spec.replace("model: detector", "model: tracker")
    assert errors(doc(spec=bad)) == [
        "w.yaml:13: spec.stages.0.model: unknown model 'tracker'; known: detector"]
    no_acc = spec.replace("accelerator: gpu, ", "")
    assert errors(doc(spec=no_acc))[0].startswith(
        "w.yaml:11: spec.models.0: accelerator_memory needs an accelerator")


def test_user_function_needs_its_code_folder(tmp_path: Path) -> None:
    spec = """\
  stages:
    - {id: detect, function: "ward_fn.detect:Detector", inputs: [vitals]}
"""
    assert errors(doc(spec=spec)) == [
        "w.yaml:11: spec.stages.0.function: a user function needs spec.code.path: the folder "
        "holding its package, so that --simulate can import and run it"]
    path = tmp_path / "w.yaml"
    path.write_text(doc(spec=spec + "  code: {path: functions}\n"))
    with pytest.raises(SpecError) as err:
        load_workload(path)
    assert str(err.value) == (f"{path}:12: spec.code.path: 'functions' is not a folder "
                              "(relative to the workload file)")
    (tmp_path / "functions").mkdir()
    assert load_workload(path).body.code.path == "functions"


def test_per_group_rates_become_one_source_per_rate() -> None:
    sources = """\
      sources:
        - id: pumps
          count: 10
          rate_hz: 1
          groups:
            - {prefix: ward/pumps/flow, count: 6}
            - {prefix: ward/pumps/door, count: 4, rate_hz: 0.1}
"""
    stages = """\
  stages:
    - {id: agg, operator: window, inputs: [pumps], params: {size: 1m, aggregates: [count]}}
"""
    wl = parse_workload(doc(sources=sources, spec=stages))
    srcs = wl.sites[0].sources
    assert [(s.id, s.count, s.rate_hz) for s in srcs] == [("pumps", 6, 1.0),
                                                          ("pumps-r2", 4, 0.1)]
    assert wl.stages[0].inputs == ["pumps", "pumps-r2"]
    plan = build_plan(wl)
    assert plan.sites[0].flows["agg"].rate == pytest.approx(10 / 60)


def test_duty_cycle_plans_the_average_rate() -> None:
    sources = """\
      sources:
        - {id: pump, count: 5, rate_hz: 10, duty_cycle: {active: 10m, period: 1h}}
"""
    wl = parse_workload(doc(sources=sources))
    src = wl.sites[0].sources[0]
    assert (src.rate_hz, src.peak_rate_hz) == (pytest.approx(10 / 6), 10)
    bad = sources.replace("active: 10m", "active: 2h")
    assert errors(doc(sources=bad))[0].startswith(
        "w.yaml:9: spec.sites.0.sources.0.duty_cycle: duty_cycle.active must not be "
        "longer than duty_cycle.period")


def test_second_link_roles() -> None:
    site = """\
      second_link: {kind: satellite, uplink: 2Mbit/s, cost_per_gb: 4.0, role: offload,
                    window: {start: "01:00", length: 4h}}
"""
    wl = parse_workload(doc(site))
    sl = wl.sites[0].second_link
    assert (sl.role, sl.window.start, sl.window.length, sl.uplink) == ("offload", "01:00",
                                                                       14400.0, 2e6)
    assert errors(doc(site.replace(',\n                    window: {start: "01:00", '
                                   'length: 4h}', ''))) == [
        "w.yaml:8: spec.sites.0.second_link.role: an offload link needs a window: "
        "{start: 'HH:MM', length: 4h}"]
    assert errors(doc(site.replace('"01:00"', '"25:00"')))[0].startswith(
        "w.yaml:9: spec.sites.0.second_link.window: start '25:00' must be a time of day")
    assert errors(doc(site.replace("role: offload", "role: failover"))) == [
        "w.yaml:9: spec.sites.0.second_link.window: a failover link is used whenever the first "
        "is down; remove the window or set role: offload"]


def test_frame_bytes_count_in_raw_streams_and_the_baseline() -> None:
    sources = """\
      sources:
        - {id: cams, count: 4, rate_hz: 2, frame_bytes: 50KiB}
"""
    stages = """\
  stages:
    - {id: fleet-view, operator: window, inputs: [cams],
       params: {size: 1m, key_by: [], aggregates: [count]}, needs: [global_context]}
"""
    wl = parse_workload(doc(sources=sources, spec=stages))
    src = wl.sites[0].sources[0]
    plain = src.model_copy(update={"frame_bytes": None})
    # the naive baseline: the frame base64-encoded in the JSON message
    assert json_reading_bytes(src, "ward") - json_reading_bytes(plain, "ward") == \
        len(',"frame":""') + 4 * 50 * 1024 // 3 + 1
    plan = build_plan(wl)
    sp = plan.sites[0]
    assert sp.where("fleet-view") == "cloud"  # its raw input goes up: 8 frames a second
    raw = sp.estimate.calibration.stream_wire["cams-raw"]
    assert raw > 8 * 50 * 1024
    assert sp.flows["fleet-view"].frame_bytes == 0.0  # an aggregate carries no frame


def test_an_inexpressible_need_is_an_error_naming_the_allowed_ones() -> None:
    stages = """\
  stages:
    - {id: agg, operator: window, inputs: [vitals], params: {size: 1m}, needs: [fpga]}
"""
    assert errors(doc(spec=stages)) == [
        "w.yaml:11: spec.stages.0.needs.0: Input should be 'global_context', 'gpu', "
        "'large_model' or 'privacy' (use one of the allowed values)"]
    bad_field = doc(sources=SOURCE.replace("rate_hz: 1}", "rate_hz: 1, gps: true}"))
    assert errors(bad_field) == [
        "w.yaml:9: spec.sites.0.sources.0.gps: Extra inputs are not permitted (remove it or "
        "check its spelling)"]
