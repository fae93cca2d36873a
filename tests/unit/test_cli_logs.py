"""Log output of the CLI (src/edgewise/cli/logs.py): UTC timestamps, one JSON object a line, and
`edgewise run` without a terminal writing its log sink's records (they were dropped under the
WARNING default before)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

from edgewise.cli.logs import TEXT_FORMAT, JsonFormatter, UtcFormatter

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"

PIPELINE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: logs
spec:
  sources:
    - id: sensors
      type: simulator
      profile: factory-line
      seed: 42
      limit: 20000
  stages:
    - id: alarms
      type: threshold
      inputs: [sensors]
      field: value
      high: 100.0
  sinks:
    - id: alarm-log
      type: log
      inputs: [alarms]
      max_per_batch: 100000
"""


def record(msg: str, level: int = logging.WARNING, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("edgewise.edge.uplink", level, __file__, 1, msg, (), exc_info)
    rec.created, rec.msecs = 1_796_542_730.25, 250.0
    return rec


def test_json_line_parses() -> None:
    line = JsonFormatter().format(record('link to "x" down: ünïcode'))
    assert "\n" not in line
    assert json.loads(line) == {"ts": "2026-12-06T07:38:50.250Z", "level": "WARNING",
                                "logger": "edgewise.edge.uplink",
                                "message": 'link to "x" down: ünïcode'}
    with_exc = json.loads(JsonFormatter().format(record("failed", logging.ERROR, exc=True)))
    assert with_exc["level"] == "ERROR"
    assert with_exc["exc"].startswith("Traceback") and "ValueError: boom" in with_exc["exc"]


def test_text_line_has_utc_timestamp() -> None:
    line = UtcFormatter(TEXT_FORMAT).format(record("link down"))
    assert line == "2026-12-06T07:38:50.250Z WARNING edgewise.edge.uplink: link down"


def run(tmp_path: Path, *args: str) -> tuple[dict, list[str]]:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(PIPELINE, encoding="utf-8")
    res = subprocess.run([sys.executable, "-m", "edgewise.cli", *args, "run", str(pipeline),
                          "--data", str(tmp_path / "d"), "--json"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), res.stderr.splitlines()


def test_run_without_terminal_writes_log_sink(tmp_path: Path) -> None:
    summary, lines = run(tmp_path)
    sink = [ln for ln in lines if re.match(rf"^{TS} INFO edgewise\.sink: alarm-log \{{", ln)]
    assert summary["alarms"] > 0
    assert len(sink) == summary["alarms"]  # every alarm, at the sink's level (INFO)
    assert len(sink) == len(lines)  # and nothing else on stderr


def test_run_json_logs(tmp_path: Path) -> None:
    summary, lines = run(tmp_path, "--log-format", "json")
    records = [json.loads(ln) for ln in lines]  # every line parses
    assert len(records) == summary["alarms"] > 0
    assert {(r["level"], r["logger"]) for r in records} == {("INFO", "edgewise.sink")}
    assert all(re.fullmatch(TS, r["ts"]) for r in records)
    assert json.loads(records[0]["message"].removeprefix("alarm-log "))["value"] > 100.0
