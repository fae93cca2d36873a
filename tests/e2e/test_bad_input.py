"""Bad input as a new user would produce it, through `edgewise run` and through the engine.

Bad data must become dead letters (counted once, with a reason a person can act on) or late
records (counted, on the ``late`` port) while the pipeline carries on; bad pipeline files and
missing inputs must end the command with exit code 2 and a one-line message, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from conftest import make_spec
from edgewise.outbox import Outbox
from edgewise.pipeline.engine import Engine

CLI = [sys.executable, "-m", "edgewise.cli"]
BIG = 10 * 1024 * 1024  # the 10 MB line

PIPELINE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: bad-input
spec:
  sources:
    - id: src
      type: file
      path: {path}
      batch: 16
  stages:
    - id: windows
      type: window
      inputs: [src]
      size: 1s
      allowed_lateness: 500ms
      aggregates: [count, min, max]
    - id: alarms
      type: threshold
      inputs: [src]
      high: 100.0
  sinks:
    - id: agg
      type: outbox
      inputs: [windows]
      stream: aggregates
    - id: alarm-out
      type: outbox
      inputs: [alarms]
      stream: alarms
      priority: alarm
    - id: late
      type: file
      inputs: [windows.late]
      path: late.ndjson
"""


def edgewise(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def good(i: int, k: int) -> bytes:
    value = 150.0 if (i, k) == (17, 2) else float(i + k)
    return orjson.dumps({"sensor": f"s{k}", "ts": round(1000 + i / 10, 1), "value": value})


def messy_file(path: Path) -> dict:
    """Good readings (3 sensors, 10 Hz, 4 s) with every kind of bad input mixed in."""
    lines: list[bytes] = []
    dead: dict[int, str] = {}  # line number -> expected reason (after "line N: ")
    late: list[dict] = []

    def bad(raw: bytes, reason: str) -> None:
        lines.append(raw)
        dead[len(lines)] = reason

    for i in range(40):
        for k in range(3):
            lines.append(good(i, k))
        if i == 5:
            bad(b'{"sensor":"s0","ts":1000.5,"value":', "malformed JSON: ")
            bad(b'{"sensor":"s0","ts":1000.5,"value":"abc"}',
                "field 'value' is 'abc' (str), expected a number")
            bad(b'{"sensor":5,"ts":1000.5,"value":1}',
                "field 'sensor' is 5, expected a non-empty string")
            bad(b'{"sensor":"s0","ts":true,"value":1}',
                "field 'ts' is True (bool), expected epoch seconds or ISO 8601 time")
            bad(b'{"sensor":"s0","ts":1000.5,"value":NaN}', "malformed JSON: ")
            bad(b'{"sensor":"s0","ts":1000.5,"value":Infinity}', "malformed JSON: ")
            bad(b'{"sensor":"s0","value":1}',
                "missing field 'ts'; a reading needs sensor, ts and value")
            bad(b'{"ts":1000.5,"value":1}',
                "missing field 'sensor'; a reading needs sensor, ts and value")
            lines.append(b"")  # blank lines are skipped silently
        if i == 12:  # t=1001.2: out of order, but its window is within the allowed lateness
            lines.append(b'{"sensor":"s1","ts":1000.95,"value":7.0}')
        if i == 20:
            huge = b'{"sensor":"s0","ts":1002.0,"value":1,"blob":"' + b"x" * BIG + b'"}'
            bad(huge, f"{len(huge)} bytes, over max_line_bytes=1048576; skipped")
        if i == 30:  # t=1003.0: seconds 1000 and 1001 are closed for good
            for rec in ({"sensor": "s0", "ts": 1000.2, "value": 1.0},
                        {"sensor": "s2", "ts": 1001.1, "value": 2.0},
                        {"sensor": "s1", "ts": 1.0, "value": 3.0}):
                lines.append(orjson.dumps(rec))
                late.append(rec)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {"dead": dead, "late": late, "readings": 120 + 1 + len(late)}


def test_messy_file_through_edgewise_run(tmp_path: Path) -> None:
    expect = messy_file(tmp_path / "in.ndjson")
    (tmp_path / "p.yaml").write_text(PIPELINE.format(path="in.ndjson"))
    data = tmp_path / "data"
    res = edgewise("run", str(tmp_path / "p.yaml"), "--data", str(data), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["readings_in"] == expect["readings"] == 124
    assert summary["dead_lettered"] == len(expect["dead"]) == 9
    assert summary["late"] == 3
    assert summary["alarms"] == 1
    assert summary["sources"]["src"]["too_long"] == 1
    assert summary["outbox"]["dead_letters_stored"] == 9
    assert "Traceback" not in res.stderr

    # the windows hold every reading that was neither bad nor late, once
    with Outbox(data / "outbox.db") as ob:
        agg = {k: v.tolist() for k, v in ob.read_stream("aggregates").items()}
        alarms = {k: v.tolist() for k, v in ob.read_stream("alarms").items()}
    counts = dict(zip(zip(agg["sensor"], agg["window_start"], strict=True), agg["count"],
                      strict=True))
    assert counts == {
        (f"s{k}", float(w)): (11 if (k, w) == (1, 1000) else 10)
        for k in range(3) for w in range(1000, 1004)
    }
    assert sum(counts.values()) == 121
    assert alarms["sensor"] == ["s2"] and alarms["value"] == [150.0]
    assert alarms["ts"] == [1001.7]

    # late records went to the sink on windows.late, exactly
    late = [orjson.loads(x) for x in (data / "late.ndjson").read_bytes().splitlines()]
    assert late == expect["late"]

    # and the dead letters say where and why
    res = edgewise("dead-letters", "--data", str(data), "--json")
    assert res.returncode == 0, res.stderr
    letters = json.loads(res.stdout)
    assert len(letters) == 9
    assert {d["source"] for d in letters} == {"src"}
    got = {int(d["reason"].split(":")[0].removeprefix("line ")): d["reason"] for d in letters}
    assert sorted(got) == sorted(expect["dead"])
    for line, reason in expect["dead"].items():
        assert got[line].startswith(f"line {line}: {reason}"), got[line]
    big = next(d for d in letters if "max_line_bytes" in d["reason"])
    head = '{"sensor":"s0","ts":1002.0,"value":1,"blob":"'
    assert big["payload"] == (head + "x" * 200)[:200]  # the command shows the first 200 bytes
    # running again changes nothing: the file is done, nothing is reported twice
    res = edgewise("run", str(tmp_path / "p.yaml"), "--data", str(data), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["readings_in"] == 0
    assert len(json.loads(edgewise("dead-letters", "--data", str(data), "--json").stdout)) == 9


async def test_csv_with_nan_and_bad_rows_through_the_engine(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text(
        "sensor,ts,value\n"
        "001,1000.0,1.5\n"
        "001,1000.1,nan\n"
        "001,1000.2,NaN\n"
        "001,1000.3,inf\n"
        "001,1000.4,-Infinity\n"
        "001,1000.5\n"
        "001,1000.6,12,extra\n"
        "001,1000.7,abc\n"
        "001,yesterday,1\n"
        "002,1000.8,2.5\n"
    )
    spec = make_spec(textwrap.dedent("""
        sources:
          - {id: src, type: file, path: in.csv}
        stages:
          - {id: w, type: window, inputs: [src], size: 1s, aggregates: [count, max]}
        sinks:
          - {id: out, type: outbox, inputs: [w]}
    """), tmp_path)
    summary = await Engine(spec, tmp_path / "data").run()
    assert summary["readings_in"] == 2
    assert summary["dead_lettered"] == 8
    with Outbox(tmp_path / "data/outbox.db") as ob:
        reasons = [d["reason"] for d in reversed(ob.dead_letters())]
        agg = {k: v.tolist() for k, v in ob.read_stream("out").items()}
    assert reasons == [
        "line 3: field 'value' is nan; NaN and infinity are not readings",
        "line 4: field 'value' is nan; NaN and infinity are not readings",
        "line 5: field 'value' is inf; NaN and infinity are not readings",
        "line 6: field 'value' is -inf; NaN and infinity are not readings",
        "line 7: 2 columns, header has 3",
        "line 8: 4 columns, header has 3",
        "line 9: field 'value' is 'abc' (str), expected a number",
        "line 10: field 'ts' is 'yesterday', not an ISO 8601 time or epoch seconds",
    ]
    assert agg == {"sensor": ["001", "002"], "ts": [1000.0, 1000.0],
                   "window_start": [1000.0, 1000.0], "window_end": [1001.0, 1001.0],
                   "count": [1, 1], "max": [1.5, 2.5]}


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "in.ndjson").write_bytes(b"")
    (tmp_path / "p.yaml").write_text(PIPELINE.format(path="in.ndjson"))
    res = edgewise("run", str(tmp_path / "p.yaml"), "--data", str(tmp_path / "d"), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["readings_in"], summary["dead_lettered"], summary["late"]) == (0, 0, 0)
    assert summary["streams"]["aggregates"]["records"] == 0


def test_input_file_that_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(PIPELINE.format(path="missing.ndjson"))
    res = edgewise("run", str(tmp_path / "p.yaml"), "--data", str(tmp_path / "d"), "--json")
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: source 'src': file {tmp_path / 'missing.ndjson'} does not exist"
    )
    assert "Traceback" not in res.stderr


def test_pipeline_file_that_does_not_exist(tmp_path: Path) -> None:
    res = edgewise("run", str(tmp_path / "nope.yaml"), "--data", str(tmp_path / "d"))
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: no such file"


def test_dead_letters_of_a_directory_without_an_outbox(tmp_path: Path) -> None:
    res = edgewise("dead-letters", "--data", str(tmp_path), "--json")
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"error: {tmp_path / 'outbox.db'}: no outbox here; pass the --data directory of "
        "`edgewise run` (or DATA/engine of an agent)"
    )


SOURCE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: broken
spec:
  sources:
    - id: src
      type: file
      path: in.ndjson
"""

SPEC_ERRORS = {
    "unknown operator": (
        "  stages:\n    - id: w\n      type: windoww\n      inputs: [src]\n",
        "12: spec.stages.0.type: unknown operator type 'windoww'; known: anomaly, combine, "
        "deadband, downsample, fft, filter, map, partial, python, rate_of_change, threshold, "
        "window",
    ),
    "yaml syntax": (
        "  stages:\n    - id: w\n      type: window\n     size: 1s\n",
        "13: not valid YAML: expected <block end>, but found '<block mapping start>'",
    ),
    "wrong field type": (
        "  stages:\n    - id: w\n      type: window\n      inputs: [src]\n      size: later\n",
        "14: spec.stages.0.size: 'later' is not a duration; write e.g. '500ms', '1s', '5m' "
        "or seconds",
    ),
    "unknown key": (
        "  stages:\n    - id: t\n      type: threshold\n      inputs: [src]\n      hihg: 5\n",
        "14: spec.stages.0.hihg: Extra inputs are not permitted (remove it or check its "
        "spelling)",
    ),
    "duplicate id": (
        "  stages:\n    - {id: src, type: threshold, inputs: [src], high: 1}\n",
        "11: spec.stages.0.id: duplicate id 'src' (first used at line 7); ids must be unique",
    ),
    "missing input": (
        "  sinks:\n    - {id: out, type: log, inputs: [sensors]}\n",
        "11: spec.sinks.0.inputs.0: 'sensors' is not the id of a source or stage; known: src",
    ),
    "cycle": (
        "  stages:\n    - {id: a, type: threshold, inputs: [b], high: 1}\n"
        "    - {id: b, type: threshold, inputs: [a], high: 1}\n",
        "10: spec.stages: stages form a cycle: a -> b -> a; break it",
    ),
}


@pytest.mark.parametrize(("body", "message"), SPEC_ERRORS.values(), ids=SPEC_ERRORS.keys())
def test_pipeline_errors_through_edgewise_run(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(SOURCE + body)
    res = edgewise("run", str(path), "--data", str(tmp_path / "d"), "--json")
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.strip() == f"error: {path}:{message}"
    assert not (tmp_path / "d").exists()  # nothing was started
