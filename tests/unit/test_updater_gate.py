"""The health gate's judgement (edgewise.edge.updater.gate.judge) as a table, its settings from
a release, and the probe runner with real commands and a real HTTP server."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgewise.edge.updater.gate import GATE_FILE, GateConfig, Sample, judge, run_probe
from edgewise.errors import ConfigError

CFG = GateConfig(window_s=10.0, start_s=5.0, alarm_factor=3.0, alarm_allowance=1.0)


def run(*rows: tuple[float, str, int, str | None, int, int]) -> list[Sample]:
    return [Sample(*r) for r in rows]


HEALTHY = run((0, "starting", 1, None, 0, 0), (1, "running", 1, None, 100, 1),
              (11, "running", 1, None, 2000, 11))

TABLE = [
    # name, samples, baseline, has_pipeline, probe_error, outcome, reason (start of)
    ("no samples yet", [], 0.0, True, None, "wait", ""),
    ("starting within start_s", run((4.9, "starting", 1, None, 0, 0)), 0.0, True, None,
     "wait", ""),
    ("not running after start_s", run((5.0, "starting", 1, None, 0, 0)), 0.0, True, None,
     "fail", "the pipeline was not running 5 s after the start (engine starting)"),
    ("running, window not over", HEALTHY[:2], 0.0, True, None, "wait", ""),
    ("healthy for the window", HEALTHY, 0.0, True, None, "pass", ""),
    ("an engine error", HEALTHY[:2] + run((2, "restarting", 1, "PluginError: boom", 100, 1)),
     0.0, True, None, "fail", "the pipeline failed 2.0 s after the start: PluginError: boom"),
    ("a second engine start", HEALTHY[:2] + run((3, "running", 2, None, 150, 1)), 0.0, True,
     None, "fail", "the pipeline failed 3.0 s after the start: the engine was restarted"),
    ("no records", run((0, "running", 1, None, 0, 0), (10, "running", 1, None, 0, 0)), 0.0,
     True, None, "fail", "no records came in during the 10 s window"),
    ("a finite pipeline that finished", run((0, "running", 1, None, 5, 0),
                                            (10, "finished", 1, None, 5, 0)), 0.0, True, None,
     "pass", ""),
    # bound: 3 x 2/s + 1/s = 7/s over 10 s = 70 alarms expected; a healthy release may raise
    # 70 + 3 x sqrt(70) + 3 = 98.1 of them by chance
    ("alarms at the bound", run((0, "running", 1, None, 0, 0), (10, "running", 1, None, 9, 98)),
     2.0, True, None, "pass", ""),
    ("alarms beyond the bound, early", run((0, "running", 1, None, 0, 0),
                                          (2, "running", 1, None, 9, 99)),
     2.0, True, None, "fail", "99 alarms in 2.0 s (49.5/s), beyond the bound of 7.0/s"),
    # no baseline: 1/s over 10 s = 10 expected, 10 + 3 x sqrt(10) + 3 = 22.5 allowed
    ("no baseline: the allowance only", run((0, "running", 1, None, 0, 0),
                                           (1, "running", 1, None, 9, 23)),
     None, True, None, "fail", "23 alarms in 1.0 s (23.0/s), beyond the bound of 1.0/s"),
    # a CI failure: a release as healthy as the one before (about 1 alarm/s), the baseline
    # measured as 0/s over the second the release before had run; a burst of alarms by chance
    # in its first second failed it (the bound was 1/s x 10 s + 1 = 11)
    ("a burst of alarms by chance", run((0, "running", 1, None, 0, 0),
                                        (1, "running", 1, None, 50, 12),
                                        (10, "running", 1, None, 500, 20)),
     0.0, True, None, "pass", ""),
    ("a flood within its first second", run((0, "running", 1, None, 0, 0),
                                            (0.3, "running", 1, None, 300, 240)),
     0.5, True, None, "fail", "240 alarms in 0.3 s"),
    ("the probe failed", HEALTHY, 0.0, True, "exit 3", "fail", "the health probe failed: exit 3"),
    ("no pipeline: time only", run((10, "idle", 0, None, 0, 0)), None, False, None, "pass", ""),
    ("no pipeline, early", run((9, "idle", 0, None, 0, 0)), None, False, None, "wait", ""),
]


@pytest.mark.parametrize(("name", "samples", "baseline", "has_pipeline", "probe", "outcome",
                          "reason"), TABLE, ids=[r[0] for r in TABLE])
def test_judge(name: str, samples: list[Sample], baseline: float | None, has_pipeline: bool,
               probe: str | None, outcome: str, reason: str) -> None:
    v = judge(CFG, samples, baseline=baseline, has_pipeline=has_pipeline, probe_error=probe)
    assert v.outcome == outcome
    assert v.reason.startswith(reason), v.reason
    if outcome != "fail":
        assert v.reason == ""


def test_release_settings_override_the_agents(tmp_path: Path) -> None:
    assert CFG.from_release(tmp_path) == CFG
    (tmp_path / "config").mkdir()
    (tmp_path / GATE_FILE).write_text('{"window_s": 4, "probe": ["true"], "alarm_factor": 5}')
    got = CFG.from_release(tmp_path)
    assert (got.window_s, got.probe, got.alarm_factor, got.start_s) == (4.0, ("true",), 5.0, 5.0)


@pytest.mark.parametrize("text", ['{"window_s": 0}', '{"shell": "rm -rf /"}', '{"probe": "x"}',
                                  "[1]", "{", '{"probe_url": "file:///etc/passwd"}',
                                  '{"window_s": true}', " " * (17 << 10)])
def test_bad_release_settings(tmp_path: Path, text: str) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / GATE_FILE).write_text(text)
    with pytest.raises(ConfigError):
        CFG.from_release(tmp_path)


def test_probe_command(tmp_path: Path) -> None:
    ok = GateConfig(probe=("sh", "-c", 'test "$EDGEWISE_RELEASE" = 7'))
    assert run_probe(ok, tmp_path, {"EDGEWISE_RELEASE": "7", "PATH": "/usr/bin:/bin"}) is None
    bad = GateConfig(probe=("sh", "-c", "echo nope >&2; exit 3"))
    assert run_probe(bad, tmp_path, {"PATH": "/usr/bin:/bin"}) == \
        "sh exited with code 3: nope"
    slow = GateConfig(probe=("sleep", "5"), probe_timeout_s=0.2)
    assert run_probe(slow, tmp_path, {"PATH": "/usr/bin:/bin"}) == \
        "sleep did not finish within 0.2 s"
    missing = GateConfig(probe=(str(tmp_path / "nope"),))
    assert run_probe(missing, tmp_path, {}).startswith("cannot run ")


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_probe_url(tmp_path: Path, http_server: str) -> None:
    assert run_probe(GateConfig(probe_url=f"{http_server}/ok"), tmp_path, {}) is None
    assert run_probe(GateConfig(probe_url=f"{http_server}/bad"), tmp_path, {}) == \
        f"{http_server}/bad answered 503"
