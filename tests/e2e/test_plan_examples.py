"""`edgewise plan` end to end: every example with --simulate, the estimate-vs-measurement check
on the reference workloads, and the interactive mode."""

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
_RESULTS: dict[str, dict] = {}


def _plan(name: str, out: Path) -> dict:
    if name not in _RESULTS:
        res = CliRunner().invoke(main, ["plan", str(ROOT / "examples" / "workloads" /
                                                    f"{name}.yaml"), "--simulate", "-o",
                                        str(out), "--json"])
        assert res.exit_code == 0, res.output
        _RESULTS[name] = json.loads(res.stdout.strip().splitlines()[-1])
        _RESULTS[name]["_out"] = out
    return _RESULTS[name]


def test_there_are_four_examples() -> None:
    assert [p.stem for p in EXAMPLES] == ["factory-line", "retail", "vibration", "wind-farm"]


@pytest.mark.slow
@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_example_plans_with_simulation(example: str, tmp_path_factory: pytest.TempPathFactory
                                       ) -> None:
    out = tmp_path_factory.mktemp(example)
    summary = _plan(example, out)
    assert summary["simulated"] is True
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
    sites = list(summary["sites"])
    for site in sites:
        spec = load_pipeline(out / "pipelines" / f"{site}.yaml")
        assert all(c.entry.placement in ("edge", "cloud") for c in spec.stages)
        assert load_artefact(out / "agents" / f"{site}.yaml").kind == "AgentConfig"
    assert load_artefact(out / "rollout.yaml").kind == "RolloutPlan"
    assert summary["unmet"] == []
    assert "Model against measurement" in md


@pytest.mark.slow
@pytest.mark.parametrize("example", ["factory-line", "vibration"])
def test_estimate_and_simulation_agree_on_reference_workloads(
        example: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    summary = _plan(example, tmp_path_factory.mktemp(example))
    for site in summary["sites"].values():
        est, meas = site["estimate"], site["measured"]
        for key in ("uplink_bytes_per_s", "records_per_s"):
            assert meas[key] / est[key] == pytest.approx(1.0, abs=0.15), key
        # processing cost (thread CPU of the stages) is noisy on a shared 2-core machine:
        # checked on the factory line, with a wider band (1.0-1.24 seen under load)
        if example == "factory-line":
            assert meas["stage_cpu_us_per_s"] / est["stage_cpu_us_per_s"] == pytest.approx(
                1.0, abs=0.35)


def test_factory_line_placement_and_numbers_without_simulation(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["plan", str(ROOT / "examples/workloads/factory-line.yaml"),
                                    "-o", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout.strip().splitlines()[-1])
    site = s["sites"]["plant"]
    assert site["placement"] == {"windows": "edge", "alarms": "edge"}
    assert s["simulated"] is False and "measured" not in site
    assert site["estimate"]["records_per_s"] == pytest.approx(210.0, rel=0.01)


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
                             input=answers)
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
