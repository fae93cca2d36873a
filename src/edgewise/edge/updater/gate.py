"""The health gate: is the release on trial healthy? A pure judgement, and the probe runner.

The gate watches the release for ``window_s`` after its pipeline starts (`judge` on the samples
the agent takes every ``sample_s``). It fails as soon as one of these holds:

* the engine failed or was restarted (``error`` set, a state of ``restarting``/``failed``,
  more than one engine start), or it is not running ``start_s`` after the agent started;
* the probe (``probe`` command or ``probe_url``) failed;
* alarms beyond their bound: more than ``alarm_factor`` times the rate of the release before, plus
  ``alarm_allowance`` per second (so a release before without alarms is not held to zero) over
  the window, with room for chance: alarms come at random, so a count is beyond the bound only
  when it exceeds the bound's expected count ``n`` by more than ``3 * sqrt(n) + 3`` (for a
  Poisson count, a chance below 1 in 10,000 for a release as healthy as the bound; a flood of
  hundreds per second is still caught within its first second); judged early once the count is
  past that for the whole window;

and at the end of the window also if no records came in (readings_in did not grow). Otherwise
it passes. A release without a pipeline is judged by the probe alone.

`GateConfig.from_release` reads the release's own ``config/edgewise-gate.json`` (any subset of
``window_s``, ``probe``, ``probe_url``, ``probe_timeout_s``, ``alarm_factor``,
``alarm_allowance``) over the agent's defaults, bounded.
"""

from __future__ import annotations

import math
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import orjson

from edgewise.errors import ConfigError

GATE_FILE = "config/edgewise-gate.json"
MAX_GATE_FILE = 16 << 10
MAX_WINDOW_S = 3600.0


@dataclass(frozen=True)
class GateConfig:
    window_s: float = 30.0  # seconds of good health that commit a release
    start_s: float = 60.0  # seconds the pipeline may take to be running
    sample_s: float = 0.25  # seconds between samples
    max_attempts: int = 3  # starts of a release on trial before a start rolls it back
    alarm_factor: float = 3.0  # alarms/s may be this many times the rate before...
    alarm_allowance: float = 1.0  # ...plus this many per second
    probe: tuple[str, ...] = ()  # a command (argv): exit 0 means healthy
    probe_url: str | None = None  # an HTTP(S) URL: a 2xx answer means healthy
    probe_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.window_s <= MAX_WINDOW_S or not 0 < self.start_s <= MAX_WINDOW_S:
            raise ConfigError(f"gate window_s and start_s must be in (0, {MAX_WINDOW_S:.0f}] s")
        if self.max_attempts < 1 or self.alarm_factor < 0 or self.alarm_allowance < 0:
            raise ConfigError("gate max_attempts must be >= 1, alarm bounds >= 0")
        if self.probe_url is not None and not self.probe_url.startswith(("http://",
                                                                         "https://")):
            raise ConfigError(f"gate probe_url must be http(s)://, got {self.probe_url!r:.80}")

    def from_release(self, files: Path) -> GateConfig:
        """These settings with the release's ``config/edgewise-gate.json`` (if any) over them.
        Raises `ConfigError` for a file that is too big, not JSON or has unknown keys."""
        path = files / GATE_FILE
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_GATE_FILE + 1)
        except FileNotFoundError:
            return self
        except OSError as exc:
            raise ConfigError(f"{GATE_FILE}: {exc.strerror or exc}") from None
        if len(raw) > MAX_GATE_FILE:
            raise ConfigError(f"{GATE_FILE}: more than {MAX_GATE_FILE} bytes")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{GATE_FILE}: not JSON: {exc}") from None
        return self.merged(doc)

    def merged(self, doc: Any) -> GateConfig:
        allowed = {"window_s", "probe", "probe_url", "probe_timeout_s", "alarm_factor",
                   "alarm_allowance"}
        if not isinstance(doc, dict) or not set(doc) <= allowed:
            raise ConfigError(f"{GATE_FILE}: an object with keys among {sorted(allowed)}")
        changes: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(self)}
        for key, value in doc.items():
            if key == "probe":
                if not isinstance(value, list) or not value or len(value) > 64 or not all(
                        isinstance(a, str) and len(a) <= 4096 for a in value):
                    raise ConfigError(f"{GATE_FILE}: probe: a list of 1-64 strings (argv)")
                changes[key] = tuple(value)
            elif key == "probe_url":
                if not isinstance(value, str) or len(value) > 2048:
                    raise ConfigError(f"{GATE_FILE}: probe_url: a URL")
                changes[key] = value
            else:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"{GATE_FILE}: {key}: a number ({types[key]})")
                changes[key] = float(value)
        if "probe_timeout_s" in changes and not 0 < changes["probe_timeout_s"] <= 600:
            raise ConfigError(f"{GATE_FILE}: probe_timeout_s: in (0, 600]")
        return replace(self, **changes)


@dataclass(frozen=True)
class Sample:
    """What the agent saw at ``t`` (seconds since the trial's start)."""

    t: float
    state: str  # the engine supervisor's state
    starts: int
    error: str | None
    readings_in: int
    alarms: int


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "wait", "pass" or "fail"
    reason: str = ""


def judge(cfg: GateConfig, samples: Sequence[Sample], *, baseline: float | None,
          has_pipeline: bool, probe_error: str | None = None) -> Verdict:
    """The gate's verdict from the samples so far (module docstring)."""
    if probe_error is not None:
        return Verdict("fail", f"the health probe failed: {probe_error}")
    if not samples:
        return Verdict("wait")
    last = samples[-1]
    if not has_pipeline:
        return Verdict("pass") if last.t >= cfg.window_s else Verdict("wait")
    running = [s for s in samples if s.state in ("running", "finished")]
    for s in samples:
        if s.error or s.state in ("restarting", "failed") or s.starts > 1:
            why = s.error or ("the engine was restarted" if s.starts > 1
                              else f"the engine was {s.state}")
            return Verdict("fail", f"the pipeline failed {s.t:.1f} s after the start: {why}")
    if not running:
        if last.t >= cfg.start_s:
            return Verdict("fail", f"the pipeline was not running {cfg.start_s:.0f} s after "
                           f"the start (engine {last.state})")
        return Verdict("wait")
    first = running[0]
    span = last.t - first.t
    bound = cfg.alarm_factor * (baseline or 0.0) + cfg.alarm_allowance  # alarms per second
    alarms = last.alarms - first.alarms
    if alarms > alarm_limit(bound * cfg.window_s):
        rate = alarms / span if span > 0 else float(alarms)
        return Verdict("fail", f"{alarms} alarms in {span:.1f} s ({rate:.1f}/s), beyond the "
                       f"bound of {bound:.1f}/s ({cfg.alarm_factor:g} x {baseline or 0:.2f}/s "
                       f"before + {cfg.alarm_allowance:g}/s)")
    if span < cfg.window_s:
        return Verdict("wait")
    if last.readings_in <= first.readings_in and last.state != "finished":
        return Verdict("fail", f"no records came in during the {cfg.window_s:.0f} s window")
    return Verdict("pass")


def alarm_limit(expected: float) -> float:
    """The most alarms a healthy release may raise when ``expected`` are expected (module
    docstring): a Poisson count beyond 3 standard deviations and 3 more."""
    return expected + 3.0 * math.sqrt(expected) + 3.0


def run_probe(cfg: GateConfig, cwd: Path, env: Mapping[str, str]) -> str | None:
    """Run the probe command and/or HTTP check; None if healthy, else why not (blocking:
    call it in a worker thread)."""
    if cfg.probe:
        try:
            done = subprocess.run(list(cfg.probe), cwd=cwd, env=dict(env), capture_output=True,
                                  timeout=cfg.probe_timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return f"{cfg.probe[0]} did not finish within {cfg.probe_timeout_s:g} s"
        except OSError as exc:
            return f"cannot run {cfg.probe[0]}: {exc.strerror or exc}"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout)[-300:].decode("utf-8", "replace").strip()
            return f"{cfg.probe[0]} exited with code {done.returncode}" + (
                f": {tail}" if tail else "")
    if cfg.probe_url:
        try:
            with urllib.request.urlopen(cfg.probe_url, timeout=cfg.probe_timeout_s) as answer:
                if not 200 <= answer.status < 300:
                    return f"{cfg.probe_url} answered {answer.status}"
        except urllib.error.HTTPError as exc:
            return f"{cfg.probe_url} answered {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            return f"{cfg.probe_url}: {exc}"
    return None
