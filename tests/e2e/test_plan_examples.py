"""`edgewise plan` end to end: the factory line with --simulate (the other examples have a file
each, so that no file runs for long), estimate against measurement, the plan without
simulation, a bad workload file, and the interactive mode.

`plan_example` and `check_example` are shared with test_plan_retail.py, test_plan_vibration.py
and test_plan_wind_farm.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgewise.cli import main
from edgewise.pipeline.spec import load_pipeline
from edgewise.plan.artefacts import load_artefact
from edgewise.plan.document import SECTIONS, word_count

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


def check_example(name: str, out: Path, cache: Path) -> dict:
    """Plan an example with --simulate; check the document, figures and artefacts, and that
    estimate and measurement agree within 15% for uplink bytes, records and stage CPU."""
    summary = plan_example(name, out, cache, "--simulate")
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
        assert load_artefact(out / "agents" / f"{site}.yaml").kind == "AgentConfig"
    assert load_artefact(out / "rollout.yaml").kind == "RolloutPlan"
    assert summary["unmet"] == []
    assert "Model against measurement" in md
    assert "Estimated CPU: CPU coefficients calibrated on this machine" in md
    assert "Measured: thread CPU of every operator call in the engine" in md
    for site in summary["sites"].values():
        est, meas = site["estimate"], site["measured"]
        for key in ("uplink_bytes_per_s", "records_per_s", "stage_cpu_us_per_s"):
            assert est[key] > 0, key
            assert meas[key] / est[key] == pytest.approx(1.0, abs=AGREEMENT), (key, est, meas)
        # every edge stage is estimated and measured
        assert set(est["stage_cpu_us"]) == set(meas["stage_cpu_us"])
        assert all(v > 0 for v in meas["stage_cpu_us"].values())
        assert site["simulation"]["cpu_sample_fraction"] == 1.0
    return summary


def test_there_are_four_examples() -> None:
    assert [p.stem for p in EXAMPLES] == ["factory-line", "retail", "vibration", "wind-farm"]


@pytest.mark.slow
def test_factory_line_with_simulation_agrees_with_its_estimate(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    summary = check_example("factory-line", tmp_path_factory.mktemp("factory"),
                            tmp_path_factory.mktemp("cache"))
    site = summary["sites"]["plant"]
    assert set(site["measured"]["stage_cpu_us"]) == {"windows", "alarms"}
    # node cores: protocol decoding is the model's on both sides (the simulator does none)
    assert site["estimate"]["cores_parts"]["ingest"] == pytest.approx(0.04)
    assert site["measured"]["cores_parts"]["ingest"] == pytest.approx(0.04)
    assert site["measured"]["cores_parts"]["engine (measured)"] > 0


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
    assert "Estimated CPU: CPU coefficients from the planner's static table" in md
    assert not (tmp_path / "cache").exists()


def test_calibration_is_cached_per_machine(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = plan_example("factory-line", tmp_path / "a", cache)
    saved = json.loads((cache / "plan-calibration.json").read_text())
    assert saved["version"] >= 1 and set(saved["machine"]) >= {"cpu", "python", "code"}
    assert {k.split(":")[0] for k in saved["entries"]} == {"engine", "site", "stream"}
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


def test_interactive_asks_writes_the_workload_and_plans(tmp_path: Path) -> None:
    answers = "\n".join([
        "cold-store", "temperatures of cold rooms", "room", "3",
        "temps", "40", "0.5", "8.5", "n", "250ms", "12h", ""])
    res = CliRunner().invoke(main, ["plan", "--interactive", "-o", str(tmp_path)],
                             input=answers, env={"EDGEWISE_CACHE_DIR": str(tmp_path / "c")})
    assert res.exit_code == 0, res.output
    assert "Inferred for everything else:" in res.output
    assert "  hardware: k3s-small (2 cores, 4 GiB, $350)" in res.output
    text = (tmp_path / "workload.yaml").read_text()
    assert "rate_hz: 0.5" in text and "high: 8.5" in text and "offline_autonomy: 12h" in text
    md = (tmp_path / "architecture.md").read_text()
    assert "## 2. Processing Distribution" in md
    spec = load_pipeline(tmp_path / "pipelines" / "room.yaml")
    assert {c.id: c.entry.placement for c in spec.stages} == {
        "temps-aggregates": "edge", "temps-alarms": "edge"}
