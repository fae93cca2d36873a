"""`edgewise plan` end to end: the factory line with --simulate (the other examples have a file
each, so that no file runs for long), estimate against measurement, the plan without
simulation, a bad workload file, and the interactive mode.

`plan_example` and `check_example` are shared with test_plan_retail.py, test_plan_vibration.py
and test_plan_wind_farm.py. `check_example` holds what does not depend on the machine's speed:
the document's structure, the artefacts, uplink bytes and records (seeded data, the real
codec) within 15%. CPU figures (stage CPU, node cores) are timing figures: on a loaded machine
they move by a fifth or more from one run to the next (a CI run saw the factory line's stage
CPU at 1.17), so their agreement is checked in the long suite (`check_cpu`, EDGEWISE_LONG_TESTS=1)
and recorded by `benchmarks/plan_accuracy.py` in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import LONG_ONLY
from edgewise.cli import main
from edgewise.pipeline.spec import load_pipeline
from edgewise.plan.blocks import word_count
from edgewise.plan.document import SECTIONS
from edgewise.plan.workload import load_workload

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "workloads").glob("*.yaml"))
AGREEMENT = 0.15  # estimate and measurement within 15% (the acceptance criterion)


def plan_example(name: str, out: Path, cache: Path, *extra: str) -> dict:
    """Run `edgewise plan` on an example; the summary it prints with --json."""
    res = CliRunner().invoke(
        main, ["plan", str(ROOT / "examples" / "workloads" / f"{name}.yaml"), "-o", str(out),
               "--json", *extra], env={"EDGEWISE_CACHE_DIR": str(cache)})
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_example(name: str, out: Path, cache: Path, unmet: tuple[str, ...] = (),
                  rounds: int | None = 1) -> dict:
    """Plan an example with --simulate; check the document, figures and artefacts, and that
    estimate and measurement agree within 15% for uplink bytes and records (no timing figure:
    see `check_cpu`). ``unmet``: how the checks the example does not meet begin (in order),
    none by default (an unmet check that depends on CPU figures, e.g. one event loop, is one
    the example misses by far). ``rounds``: realtime runs per site (`--rounds`; one by
    default, as no timing figure is checked here; None: the planner's default)."""
    summary = plan_example(name, out, cache, "--simulate",
                           *(("--rounds", str(rounds)) if rounds else ()))
    assert summary["simulated"] is True
    assert summary["cpu_model"] == "calibrated"
    md = (out / "architecture.md").read_text()
    headings = re.findall(r"^## \d\. (.+)$", md, flags=re.M)
    assert headings == list(SECTIONS)
    words = word_count(md)
    assert 1500 <= words <= 2500
    assert summary["words"] == words
    html = (out / "architecture.html").read_text()
    for section in SECTIONS:
        assert section in html
    for fig in ("topology.png", "latency.png", "bandwidth.png", "backlog.png"):
        data = (out / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"({fig})" in md
    for site in summary["sites"]:
        spec = load_pipeline(out / "pipelines" / f"{site}.yaml")
        assert all(c.entry.placement in ("edge", "cloud") for c in spec.stages)
    assert not (out / "agents").exists() and not (out / "rollout.yaml").exists()
    assert len(summary["unmet"]) == len(unmet), summary["unmet"]
    assert all(u.startswith(p) for u, p in zip(summary["unmet"], unmet, strict=True)), \
        summary["unmet"]
    assert "Model against measurement" in md
    assert f"Estimated CPU for {summary['workload']}: CPU coefficients calibrated on this " \
        "machine" in md
    assert "Measured: thread CPU of every operator call in the engine" in md
    for site in summary["sites"].values():
        est, meas = site["estimate"], site["measured"]
        for key in ("uplink_bytes_per_s", "records_per_s"):
            assert est[key] > 0, key
            assert meas[key] / est[key] == pytest.approx(1.0, abs=AGREEMENT), (key, est, meas)
        # every edge stage is estimated and measured
        assert set(est["stage_cpu_us"]) == set(meas["stage_cpu_us"])
        assert all(v > 0 for v in meas["stage_cpu_us"].values())
        assert est["stage_cpu_us_per_s"] > 0 and est["cores"] > 0 and meas["cores"] > 0
        assert site["simulation"]["cpu_sample_fraction"] == 1.0
    return summary


def check_cpu(summary: dict, cores_band: float = AGREEMENT) -> None:
    """Stage CPU within 15% and node cores within ``cores_band`` (timing figures: the long
    suite only)."""
    for name, site in summary["sites"].items():
        est, meas = site["estimate"], site["measured"]
        for key, band in (("stage_cpu_us_per_s", AGREEMENT), ("cores", cores_band)):
            assert meas[key] / est[key] == pytest.approx(1.0, abs=band), (name, key, est, meas)


def test_there_are_seven_examples() -> None:
    assert [p.stem for p in EXAMPLES] == [
        "factory-line", "hospital-monitors", "retail", "vehicle-fleet", "vibration",
        "water-utility", "wind-farm"]


@pytest.mark.slow
def test_factory_line_with_simulation_agrees_with_its_estimate(
        tmp_path_factory: pytest.TempPathFactory, plan_cache: Path) -> None:
    cache = plan_cache
    # the planner's default rounds: node cores are the median of three realtime runs
    summary = check_example("factory-line", tmp_path_factory.mktemp("factory"), cache,
                            rounds=None)
    site = summary["sites"]["plant"]
    rounds = site["simulation"]["cores_rounds"]
    assert len(rounds) == 3 and len(site["estimate"]["engine_site_rounds"]) == 3
    assert len(site["estimate"]["engine_site_halves"]) == 4
    assert site["measured"]["cores_parts"]["engine (measured)"] == pytest.approx(
        sorted(rounds)[1])
    assert set(site["measured"]["stage_cpu_us"]) == {"windows", "alarms"}
    # node cores: protocol decoding is the model's on both sides (the simulator does none):
    # MQTT calibrated on this machine, 10,000 messages and 50 batches (wake-ups) a second
    mqtt = json.loads((cache / "plan-calibration.json").read_text())["entries"]["ingest:mqtt"]
    ingest = (10_000 * mqtt["us_per_message"] + 50 * mqtt["us_per_wake"]) / 1e6
    assert site["estimate"]["cores_parts"]["ingest"] == pytest.approx(ingest)
    assert site["measured"]["cores_parts"]["ingest"] == pytest.approx(ingest)
    assert site["measured"]["cores_parts"]["engine (measured)"] > 0


@LONG_ONLY  # timing figures: stage CPU and node cores move with the machine's load
@pytest.mark.slow
# node cores: 15% on each (docs/benchmarks.md: 0.90-1.09 in every run since the garbage
# collector is a part of the model; the wind farm was 1.33-1.46 before it)
@pytest.mark.parametrize(("name", "cores_band"), [
    ("factory-line", AGREEMENT), ("retail", AGREEMENT), ("vibration", AGREEMENT),
    ("wind-farm", AGREEMENT)])
def test_cpu_estimate_agrees_with_the_measurement(
        name: str, cores_band: float, tmp_path_factory: pytest.TempPathFactory) -> None:
    check_cpu(plan_example(name, tmp_path_factory.mktemp(name),
                           tmp_path_factory.mktemp("cache"), "--simulate"), cores_band)


def test_factory_line_without_simulation_or_calibration(tmp_path: Path) -> None:
    s = plan_example("factory-line", tmp_path / "out", tmp_path / "cache", "--no-calibrate")
    site = s["sites"]["plant"]
    assert site["placement"] == {"windows": "edge", "alarms": "edge"}
    assert s["simulated"] is False and "measured" not in site
    assert s["cpu_model"] == "static"
    assert site["estimate"]["records_per_s"] == pytest.approx(210.0, rel=0.01)
    # the static table: windows 50 calls/s x 50 us + 10,000 records x (1.0 + 1.0 groups) us
    # + 1 close/s x 20 us + 200 records out x 3 us; alarms 50 x 20 + 10,000 x 0.02 + 10 x 10
    assert site["estimate"]["stage_cpu_us"]["windows"] == pytest.approx(23_120.0)
    assert site["estimate"]["stage_cpu_us"]["alarms"] == pytest.approx(1_300.0, rel=0.01)
    md = (tmp_path / "out" / "architecture.md").read_text()
    assert "Estimated CPU for factory-line: CPU coefficients from the planner's static table" \
        in md
    assert not (tmp_path / "cache").exists()


def test_calibration_is_cached_per_machine(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = plan_example("factory-line", tmp_path / "a", cache)
    saved = json.loads((cache / "plan-calibration.json").read_text())
    assert saved["version"] >= 1 and set(saved["machine"]) >= {"cpu", "python", "code"}
    # the MQTT source's decoding is calibrated too (the factory line's sensors speak MQTT),
    # and the engine with the site's sources alone at the real pace
    assert {k.split(":")[0] for k in saved["entries"]} == {
        "engine", "ingest", "site", "site-engine", "stream"}
    second = plan_example("factory-line", tmp_path / "b", cache)
    md = (tmp_path / "b" / "architecture.md").read_text()
    assert "0.0 s of calibration in this run" in md
    # the same coefficients, so the same estimate
    assert second["sites"]["plant"]["estimate"]["stage_cpu_us"] == \
        first["sites"]["plant"]["estimate"]["stage_cpu_us"]


def test_bad_workload_exits_2_with_file_line_field(tmp_path: Path) -> None:
    bad = tmp_path / "w.yaml"
    bad.write_text((ROOT / "examples/workloads/factory-line.yaml").read_text().replace(
        "rate_hz: 50", "rate_hz: fast"))
    res = CliRunner().invoke(main, ["plan", str(bad), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert f"{bad}:20: spec.sites.0.sources.0.rate_hz: Input should be a valid number" in \
        " ".join(res.output.split())


def test_interactive_asks_writes_the_workload_and_plans(tmp_path: Path, plan_cache: Path) -> None:
    answers = "\n".join([
        "cold-store", "temperatures of cold rooms", "room", "3",
        "temps", "40", "0.5", "8.5", "gdpr", "personal", "n",
        "120", "250ms", "12h",  # a latency without a unit is asked again
        "120", "2Mbit/s", "4.5", "30", "30m", "2", "active-active", ""])
    res = CliRunner().invoke(main, ["plan", "--interactive", "-o", str(tmp_path)],
                             input=answers, env={"EDGEWISE_CACHE_DIR": str(plan_cache)})
    assert res.exit_code == 0, res.output
    assert "Inferred for everything else:" in res.output
    assert "  unknown tag(s) gdpr; use personal, phi, pci, biometric, location, " \
        "confidential" in res.output
    assert "  '120' has no unit; write e.g. '120ms', '120s', '120m' or '120h'" in res.output
    assert "  '120' has no unit; write e.g. '120kbit/s' or '120Mbit/s'" in res.output
    assert "  '30' has no unit; write e.g. '30ms', '30s', '30m' or '30h'" in res.output
    assert "  hardware: k3s-small (2 cores, 4 GiB, $350)" in res.output
    text = (tmp_path / "workload.yaml").read_text()
    assert "rate_hz: 0.5" in text and "high: 8.5" in text and "offline_autonomy: 12h" in text
    wl = load_workload(tmp_path / "workload.yaml")
    site = wl.sites[0]
    assert (site.nodes, site.ha) == (2, "active-active")
    assert site.sources[0].compliance == ["personal"]
    assert (site.link.uplink, site.link.cost_per_gb, site.link.longest_outage) == (
        2e6, 4.5, 1800.0)
    md = (tmp_path / "architecture.md").read_text()
    assert "## 2. Processing Distribution" in md
    spec = load_pipeline(tmp_path / "pipelines" / "room.yaml")
    assert {c.id: c.entry.placement for c in spec.stages} == {
        "temps-aggregates": "edge", "temps-alarms": "edge"}
