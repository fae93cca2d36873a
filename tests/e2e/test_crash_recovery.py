"""Crash recovery: `edgewise run` killed with SIGKILL 20 times, then left to finish.

The issue's acceptance test. A file of factory-line readings goes through a 1 s tumbling window
per sensor and a threshold alarm, both into the outbox. The process is killed at seeded random
moments while it is working and restarted with the same --data each time. Afterwards the outbox
must hold exactly what one uninterrupted run would have produced: every reading counted in exactly
one window, one alarm per reading above 100.0, no (sensor, window) twice, sequence numbers that
tile [0, produced) with no gap or overlap, and every bad line dead-lettered exactly once.
"""

from __future__ import annotations

import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgewise.outbox import Outbox
from edgewise.pipeline import checkpoint as ckpt
from edgewise.sim.signals import factory_line, write_ndjson

pytestmark = pytest.mark.slow

READINGS = 300_000
KILLS = 20
START_TS = 1_764_547_200.0
CLI = [sys.executable, "-m", "edgewise.cli"]

PIPELINE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: crash-test
spec:
  sources:
    - id: readings
      type: file
      path: {path}
      batch: 10            # small batches so the run lasts a few seconds and kills land mid-run
  stages:
    - id: windows
      type: window
      inputs: [readings]
      key_by: [sensor]
      size: 1s
      aggregates: [count, mean, min, max]
    - id: alarms
      type: threshold
      inputs: [readings]
      high: 100.0
  sinks:
    - id: alarms-out
      type: outbox
      inputs: [alarms]
      stream: alarms
      priority: alarm
    - id: aggregates-out
      type: outbox
      inputs: [windows]
      stream: aggregates
"""

# malformed lines inserted into the variant, each a different way to be wrong
BAD_LINES = [
    b'{"sensor":"line1/temp/000","ts":1764547200.0,"value":',
    b'{"sensor":"line1/temp/000","ts":1764547200.0,"value":"abc"}',
    b'{"sensor":5,"ts":1764547200.0,"value":1.0}',
    b'{"sensor":"line1/temp/000","ts":true,"value":1.0}',
    b'{"sensor":"line1/temp/000","value":1.0}',
    b'{"sensor":"line1/temp/000","ts":1764547200.0,"value":NaN}',
    b"not json at all",
    b"[1, 2, 3]",
]


def _committed_offset(db: Path) -> int:
    """The file offset in the last durable checkpoint, read without disturbing the writer."""
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            row = con.execute("SELECT value FROM checkpoint WHERE key='engine'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return 0
    if row is None:
        return 0
    entry = ckpt.unpack(row[0])["positions"].get("readings")
    return int(entry["position"]["offset"]) if entry else 0


def _run_with_kills(
    tmp_path: Path, data_file: Path, kills: int, seed: int, sig: int = signal.SIGKILL
) -> dict:
    """Start, kill at a random moment while it works, restart; finally run to the end."""
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINE.format(path=data_file.name))
    data = tmp_path / "data"
    db = data / "outbox.db"
    size = data_file.stat().st_size
    rng = random.Random(seed)
    offsets = []
    for i in range(kills):
        before = _committed_offset(db)
        with open(tmp_path / f"run{i}.err", "wb") as err:
            proc = subprocess.Popen(
                [*CLI, "run", str(pipeline), "--data", str(data), "--json"],
                stdout=subprocess.DEVNULL, stderr=err,
            )
            try:
                # wait until this run has committed progress of its own, then a random moment more
                deadline = time.monotonic() + 30
                while _committed_offset(db) <= before:
                    assert proc.poll() is None, (
                        f"run {i} exited with {proc.returncode} before it was killed: "
                        + (tmp_path / f"run{i}.err").read_text()
                    )
                    assert time.monotonic() < deadline, f"run {i} made no progress in 30 s"
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.12))
                assert proc.poll() is None, f"run {i} finished before the kill; use more input"
                proc.send_signal(sig)
                proc.wait(timeout=30)
            finally:
                proc.kill()
                proc.wait()
        # SIGKILL: dead on the spot; SIGTERM: a clean stop that commits what it has, exit 0
        assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 0), (
            (tmp_path / f"run{i}.err").read_text()
        )
        offsets.append(_committed_offset(db))
    # every kill landed mid-file, after this run had moved the position on
    assert all(0 < off < size for off in offsets), offsets
    assert offsets == sorted(offsets) and len(set(offsets)) == kills, offsets
    final = subprocess.run(
        [*CLI, "run", str(pipeline), "--data", str(data), "--json"],
        capture_output=True, timeout=120,
    )
    assert final.returncode == 0, final.stderr.decode()
    assert _committed_offset(db) == size
    return {"db": db, "offsets": offsets, "final": final}


def _expected_windows() -> dict[tuple[str, float], tuple[int, float, float, float]]:
    """(sensor, window_start) -> (count, mean, min, max) computed straight from the signals."""
    sig = factory_line(42)
    s, t, v = sig.readings(0, READINGS)
    ts = np.round(START_TS + t / sig.rate_hz, 2)
    start = np.floor(ts)
    out: dict[tuple[str, float], list[float]] = {}
    for name, w, x in zip(sig.names[s].tolist(), start.tolist(), v.tolist(), strict=True):
        out.setdefault((name, w), []).append(x)
    return {k: (len(x), float(np.mean(x)), min(x), max(x)) for k, x in out.items()}


def _check_outbox(db: Path, above: int) -> Outbox:
    ob = Outbox(db).open()
    agg = ob.read_stream("aggregates")
    alarms = ob.read_stream("alarms")

    # windows: every reading in exactly one window, every (sensor, window) exactly once
    assert int(agg["count"].sum()) == READINGS
    keys = list(zip(agg["sensor"].tolist(), agg["window_start"].tolist(), strict=True))
    assert len(keys) == len(set(keys)) == 200 * (READINGS // 200 // 50)
    expected = _expected_windows()
    assert set(keys) == set(expected)
    for i, k in enumerate(keys):
        count, mean, lo, hi = expected[k]
        assert int(agg["count"][i]) == count
        assert float(agg["min"][i]) == lo and float(agg["max"][i]) == hi
        assert float(agg["mean"][i]) == pytest.approx(mean, abs=1e-9)

    # alarms: one per reading above 100.0, none twice
    assert len(alarms["value"]) == above
    assert np.all(alarms["value"] > 100.0)
    alarm_keys = set(zip(alarms["sensor"].tolist(), alarms["ts"].tolist(), strict=True))
    assert len(alarm_keys) == above

    # sequence numbers: the stored chunks tile [0, produced) of each stream exactly
    for stream, records in (("aggregates", len(keys)), ("alarms", above)):
        rows = ob.db.execute(
            "SELECT seq_first, seq_count FROM chunks WHERE stream=? ORDER BY seq_first", (stream,)
        ).fetchall()
        produced, next_seq = ob.db.execute(
            "SELECT produced, next_seq FROM streams WHERE stream=?", (stream,)
        ).fetchone()
        assert produced == next_seq == records
        expect = 0
        for first, count in rows:
            assert first == expect, (stream, rows)
            expect += count
        assert expect == produced
    return ob


def test_sigkill_20_times_loses_and_repeats_nothing(tmp_path: Path) -> None:
    data_file = tmp_path / "readings.ndjson"
    above = write_ndjson(str(data_file), READINGS, seed=42, start_ts=START_TS)
    assert above == 322  # the seeded factory line: a fixed number of readings above 100.0
    result = _run_with_kills(tmp_path, data_file, KILLS, seed=20251127)
    ob = _check_outbox(result["db"], above)
    try:
        assert ob.dead_letter_count == 0
    finally:
        ob.close()


def _file_with_bad_lines(tmp_path: Path) -> tuple[Path, int, list[int]]:
    """The readings with one bad line after every 997th, cycling through the kinds of bad."""
    clean = tmp_path / "clean.ndjson"
    above = write_ndjson(str(clean), READINGS, seed=42, start_ts=START_TS)
    data_file = tmp_path / "readings.ndjson"
    bad_line_numbers = []
    line_no = 0
    with open(clean, "rb") as src, open(data_file, "wb") as dst:
        for i, line in enumerate(src):
            dst.write(line)
            line_no += 1
            if i % 997 == 996:
                dst.write(BAD_LINES[len(bad_line_numbers) % len(BAD_LINES)] + b"\n")
                line_no += 1
                bad_line_numbers.append(line_no)
    assert len(bad_line_numbers) == READINGS // 997 == 300
    return data_file, above, bad_line_numbers


def _check_dead_letters(ob: Outbox, bad_line_numbers: list[int]) -> None:
    letters = ob.dead_letters(limit=10_000)
    assert ob.dead_letter_count == len(letters) == len(bad_line_numbers)
    lines = sorted(int(re.match(r"line (\d+): ", d["reason"]).group(1)) for d in letters)
    assert lines == bad_line_numbers


def test_sigkill_with_malformed_lines_dead_letters_exactly_once(tmp_path: Path) -> None:
    data_file, above, bad_line_numbers = _file_with_bad_lines(tmp_path)
    result = _run_with_kills(tmp_path, data_file, 12, seed=7)
    ob = _check_outbox(result["db"], above)
    try:
        _check_dead_letters(ob, bad_line_numbers)
        letters = ob.dead_letters(limit=10_000)
        by_line = {int(re.match(r"line (\d+): ", d["reason"]).group(1)): d for d in letters}
        assert by_line[bad_line_numbers[0]]["reason"].startswith(
            f"line {bad_line_numbers[0]}: malformed JSON"
        )
        assert by_line[bad_line_numbers[1]]["payload"] == BAD_LINES[1]
        assert "field 'value' is 'abc'" in by_line[bad_line_numbers[1]]["reason"]
        assert "field 'sensor' is 5" in by_line[bad_line_numbers[2]]["reason"]
        assert "field 'ts' is True" in by_line[bad_line_numbers[3]]["reason"]
        assert "missing field 'ts'" in by_line[bad_line_numbers[4]]["reason"]
        assert "malformed JSON" in by_line[bad_line_numbers[5]]["reason"]
        assert "expected a JSON object, got list" in by_line[bad_line_numbers[7]]["reason"]
        assert all(d["source"] == "readings" for d in letters)
    finally:
        ob.close()


def test_sigterm_stops_cleanly_and_a_restart_continues_exactly(tmp_path: Path) -> None:
    data_file, above, bad_line_numbers = _file_with_bad_lines(tmp_path)
    result = _run_with_kills(tmp_path, data_file, 3, seed=3, sig=signal.SIGTERM)
    ob = _check_outbox(result["db"], above)
    try:
        _check_dead_letters(ob, bad_line_numbers)
    finally:
        ob.close()
