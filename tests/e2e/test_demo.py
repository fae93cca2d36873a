"""`edgewise demo` as a user runs it: a short run ends with every count matching, and Ctrl-C
mid-run leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from edgewise.sim.signals import write_ndjson
from edgewise.testbed.system import json_mqtt_baseline, mqtt_packet_bytes

CLI = [sys.executable, "-m", "edgewise.cli"]


def processes_mentioning(text: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if text in cmd and p.pid != os.getpid():
            out.append(p)
    return out


def test_baseline_is_the_benchmarks_json_over_mqtt(tmp_path: Path) -> None:
    path = tmp_path / "r.ndjson"
    write_ndjson(str(path), 5_000)
    want = 0
    for line in path.read_bytes().splitlines():
        sensor = json.loads(line)["sensor"]
        want += mqtt_packet_bytes(f"factory/{sensor}", line)
    assert json_mqtt_baseline(5_000) == want
    assert mqtt_packet_bytes("t", b"x" * 200) == 1 + 2 + 2 + 1 + 200


def test_demo_short_run_every_count_matches(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    res = subprocess.run(
        [*CLI, "demo", "--agents", "2", "--cut-seconds", "4", "--duration", "12",
         "--keep", str(keep)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "200"},
    )
    assert res.returncode == 0, (res.stdout, res.stderr)
    out = res.stdout
    row = {}
    for line in out.splitlines():  # "  label   value-1   value-2"
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 3:
            row[cells[0]] = cells[1:]
    assert row["readings"] == ["120,000", "120,000"]
    assert row["exactly once"] == ["OK", "OK"]
    assert row["records produced"] == row["stored in cloud"]
    assert row["link cut"] == ["-", "4 s (blackhole)"]
    produced = int(row["records produced"][0].replace(",", ""))
    assert produced == 2_400 + int(row["alarms"][0].replace(",", ""))  # 12 s x 200 windows
    for ratio in row["wire vs JSON"]:
        assert 0 < float(ratio.rstrip("%")) < 5.0
    # 4 s, measured: the demo looks at the clock every 0.2 s, later on a loaded machine
    assert re.search(r"edge-2: link cut \(blackhole\) for 4\.\d s", out), out
    assert "MISMATCH" not in out
    # the console's address and a viewer token were printed while it ran
    assert re.search(r"console: https://127\.0\.0\.1:\d+/console  viewer token: ewo_\S{43}",
                     res.stderr), res.stderr[-2000:]
    # the progress went to stderr, phase by phase
    for phase in ("starting the control plane", "CUT (blackhole)", "restored",
                  "waiting until every outbox has drained", "done"):
        assert phase in res.stderr, phase
    # the kept directory has each node's data, and nothing is still running
    assert sorted(p.name for p in keep.iterdir()) == [
        "cloud", "edge-1", "edge-2", "factory-line.yaml", "logs"]
    assert processes_mentioning(str(keep)) == []


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    demo = subprocess.Popen(
        [*CLI, "demo", "--agents", "2", "--duration", "120"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp)},
    )
    try:
        assert demo.stderr is not None
        lines = []
        deadline = time.monotonic() + 90
        for line in demo.stderr:  # wait until both agents run their pipelines
            lines.append(line)
            if "running; the link of edge-2 is cut" in line:
                break
            assert time.monotonic() < deadline, lines
        [work] = list(tmp.iterdir())
        children = psutil.Process(demo.pid).children(recursive=True)
        names = sorted(" ".join(c.cmdline()[3:5]) for c in children)
        assert names == ["agent run", "agent run", "cloud serve"], names
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, (out, err)
    assert "interrupted: every process the demo started is stopped" in err
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
    assert processes_mentioning(str(work)) == []
    assert list(tmp.iterdir()) == []  # the temporary directory is gone


@pytest.mark.parametrize("args", [["--agents", "0"], ["--duration", "0"],
                                  ["--cut-seconds", "-1"]])
def test_bad_flags_exit_2(args: list[str]) -> None:
    res = subprocess.run([*CLI, "demo", *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert re.search(r"Invalid value for '--(agents|duration|cut-seconds)'", res.stderr)


def test_keep_needs_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "old").write_text("x")
    res = subprocess.run([*CLI, "demo", "--keep", str(tmp_path)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2
    assert f"--keep {tmp_path}: the directory is not empty" in res.stderr
