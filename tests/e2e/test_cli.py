"""The `edgewise` command as a user runs it: the factory-line example, validate, help, sim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgewise.outbox import Outbox
from edgewise.sim.signals import factory_line

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "factory-line.yaml"
CLI = [sys.executable, "-m", "edgewise.cli"]


def edgewise(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_factory_line_example_runs_for_ten_seconds(tmp_path: Path) -> None:
    data = tmp_path / "data"
    res = edgewise("run", str(EXAMPLE), "--duration", "10", "--data", str(data), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    n = summary["readings_in"]
    # real time at 10,000 readings/s; allow a slow start on a busy machine
    assert 60_000 <= n <= 101_000, n
    assert 10.0 <= summary["elapsed_s"] < 15.0
    sig = factory_line(42)
    sensors, _ticks, values = sig.readings(0, n)
    above = values > 100.0
    assert summary["alarms"] == int(np.count_nonzero(above))
    assert summary["alarms"] > 0
    assert summary["streams"]["alarms"]["records"] == summary["alarms"]
    assert summary["stages"]["alarms"]["out"] == summary["alarms"]
    assert summary["sinks"]["alarm-log"]["written"] == summary["alarms"]
    assert summary["dead_lettered"] == 0 and summary["late"] == 0
    # the stored alarms are exactly those readings, in order
    with Outbox(data / "outbox.db") as ob:
        alarms = ob.read_stream("alarms")
        agg = ob.read_stream("aggregates")
    assert alarms["sensor"].tolist() == sig.names[sensors[above]].tolist()
    assert alarms["value"].tolist() == values[above].tolist()
    # each closed window of a sensor holds its 50 readings a second (first and last may be cut)
    full = agg["count"][(agg["count"] != 50)]
    assert len(agg["count"]) >= 200 * 8 and len(full) <= 2 * 200
    assert summary["streams"]["aggregates"]["records"] == len(agg["count"])


def test_validate_ok() -> None:
    res = edgewise("validate", str(EXAMPLE))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (
        f"{EXAMPLE}: ok - pipeline 'factory-line': 1 source(s), 2 stage(s), 3 sink(s)"
    )


def test_validate_reports_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        EXAMPLE.read_text()
        .replace("size: 1s", "size: one second")
        .replace("high: 100.0", "high: 100.0\n      hgih: 5")
    )
    res = edgewise("validate", str(path))
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        f"error: {path}:19: spec.stages.0.size: 'one second' is not a duration; write e.g. "
        "'500ms', '1s', '5m' or seconds",
        f"{path}:26: spec.stages.1.hgih: Extra inputs are not permitted (remove it or check "
        "its spelling)",
    ]


def test_validate_missing_file(tmp_path: Path) -> None:
    res = edgewise("validate", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: no such file"


def test_error_messages_keep_their_brackets(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    text = EXAMPLE.read_text().replace("      inputs: [sensors]\n      key_by", "      key_by")
    path.write_text(text)
    res = edgewise("validate", str(path))
    assert res.returncode == 2
    assert res.stderr.strip().endswith("e.g. inputs: [sensors]")


def test_run_rejects_a_non_positive_duration(tmp_path: Path) -> None:
    res = edgewise("run", str(EXAMPLE), "--duration", "0", "--data", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip() == "error: --duration must be a positive number of seconds"


def test_run_moves_a_damaged_outbox_aside_and_runs(tmp_path: Path) -> None:
    """As the agent does: the damaged file is kept beside, one warning names it, the run
    goes on in a new outbox (it used to stop with "file is not a database")."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "outbox.db").write_bytes(b"\xc1 not a database \x9c" * 300)
    res = edgewise("run", str(EXAMPLE), "--duration", "1", "--data", str(data), "--json")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    moved = [p.name for p in data.glob("outbox.db.damaged-*")]
    assert len(moved) == 1, moved
    assert (data / moved[0]).read_bytes() == b"\xc1 not a database \x9c" * 300
    assert "outbox was damaged" in " ".join(res.stderr.split())
    assert moved[0] in "".join(res.stderr.split())  # however the console wrapped it
    assert json.loads(res.stdout)["readings_in"] > 0


def test_help_and_version() -> None:
    res = edgewise("--help")
    assert res.returncode == 0
    for command in ("run", "validate", "dead-letters", "sim"):
        assert f"  {command} " in res.stdout
    res = edgewise("run", "--help")
    assert res.returncode == 0
    for option in ("--duration", "--data", "--json", "--flush / --no-flush"):
        assert option in res.stdout
    res = edgewise("--version")
    assert res.returncode == 0 and res.stdout.startswith("edgewise, version ")


def test_sim_writes_the_factory_line(tmp_path: Path) -> None:
    out = tmp_path / "r.ndjson"
    res = edgewise("sim", "factory-line", "--count", "5000", "--seed", "42", "-o", str(out))
    assert res.returncode == 0, res.stderr
    _, _, values = factory_line(42).readings(0, 5000)
    above = int(np.count_nonzero(values > 100.0))
    assert res.stdout.strip() == f"wrote 5,000 readings to {out} ({above:,} above 100.0)"
    lines = out.read_text().splitlines()
    assert len(lines) == 5000
    first = json.loads(lines[0])
    assert first == {"sensor": "line1/temp/000", "ts": 1764547200.0, "value": values[0]}
