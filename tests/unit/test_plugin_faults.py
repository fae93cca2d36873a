"""Plugins that fail at run time (raise, hang, are slow): stored records stay exactly once.

A stage that raises fails its batch atomically: nothing of the batch (nor anything else not yet
committed) is committed, operator state included, and the position stays before it, so the run
ends and a restart replays the batch. A plugin that declares ``stateless = True`` is retried on
halves of the batch instead, down to the bad records, which go to dead letters with the error as
reason. A call that does not return within the stage's ``timeout`` is abandoned: a stateless
plugin's batch goes to dead letters and a fresh instance takes the next one; a stateful plugin
fails the run like a raise. The tests run finite files and restart until done, then check the
outbox: every window counts exactly its readings, every alarm is stored once, sequence numbers
tile each stream, dead letters name the record and the error.
"""

from __future__ import annotations

import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import make_spec
from edgewise.outbox import Outbox
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.operators.plugin import PluginError
from edgewise.pipeline.spec import PipelineSpec

SENSORS = 3
HZ = 10
SECONDS = 60
T0 = 1000.0

PLUGINS = """
import threading
import time

RELEASE = threading.Event()  # the test lets hung calls go with this
STARTED = []  # calls that began, as (instance number, batch size)
INSTANCES = []


class Flaky:
    '''Stateful: counts what it passed on (checkpointed); every Nth call of an instance raises.'''

    def __init__(self, options):
        self.every = int(options["every"])
        self.calls = 0
        self.passed = 0

    def process(self, batch):
        self.calls += 1
        if self.calls % self.every == 0:
            raise RuntimeError(f"flaky call {self.calls}")
        self.passed += batch.n
        return batch.with_columns(value=batch["value"] * 2.0)

    def snapshot(self):
        return {"passed": self.passed}

    def restore(self, state):
        self.passed = state["passed"]


class Checker:
    '''Stateless: refuses negative values (the whole call raises), passes the rest on.'''

    stateless = True

    def __init__(self, options):
        pass

    def process(self, batch):
        bad = batch["value"] < 0
        if bad.any():
            raise ValueError(f"negative value {float(batch['value'][bad][0])}")
        return batch


class Stuck:
    '''Passes records on; hangs (until RELEASE, at most 10 s) on a batch holding value 77.'''

    stateless = True

    def __init__(self, options):
        self.n = len(INSTANCES)
        INSTANCES.append(self)

    def process(self, batch):
        STARTED.append((self.n, batch.n))
        if (batch["value"] == 77.0).any():
            RELEASE.wait(10.0)
        return batch


class StuckOnce(Stuck):
    '''Stateful: the first instance hangs on its 5th call; state counts what it passed on.'''

    stateless = False

    def __init__(self, options):
        super().__init__(options)
        self.calls = 0
        self.passed = 0

    def process(self, batch):
        self.calls += 1
        if self.n == 0 and self.calls == 5:
            RELEASE.wait(10.0)
        self.passed += batch.n
        return batch

    def snapshot(self):
        return {"passed": self.passed}

    def restore(self, state):
        self.passed = state["passed"]


class Slow:
    '''Stateless; every call takes `sleep` seconds, the one with value 77 `long` seconds.'''

    stateless = True

    def __init__(self, options):
        self.sleep = float(options.get("sleep", 0.0))
        self.long = float(options.get("long", 0.0))

    def process(self, batch):
        time.sleep(self.long if (batch["value"] == 77.0).any() else self.sleep)
        return batch
"""


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The plugin module above under a unique name; hung calls are released at the end."""
    name = f"faulty_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGINS))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    yield module
    module.RELEASE.set()
    sys.modules.pop(name, None)


def reading_rows(special: Callable[[int], float | None] = lambda i: None) -> list[dict[str, Any]]:
    """SECONDS of SENSORS sensors at HZ, in time order; value 20..69, or ``special(i)``."""
    rows = []
    for i in range(SECONDS * HZ):
        for k in range(SENSORS):
            n = i * SENSORS + k
            value = special(n)
            rows.append({"sensor": f"s{k}", "ts": T0 + i / HZ,
                         "value": float(20 + n % 50) if value is None else value})
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def spikes(n: int) -> float | None:
    """Every 37th reading is an alarm (150.0)."""
    return 150.0 if n % 37 == 5 else None


def spikes_and_negatives(n: int) -> float | None:
    """Alarms as `spikes`, and every 53rd reading a value the Checker refuses."""
    if n % 53 == 11:
        return -1.0 - n
    return spikes(n)


def pipeline(tmp_path: Path, stages: str, sinks: str = "", batch: int = 10) -> PipelineSpec:
    """File → windows (1 s count per sensor) + alarms (> 100), then the given stages and sinks."""
    body = "\n".join([
        "sources:",
        f"  - {{id: src, type: file, path: in.ndjson, batch: {batch}}}",
        "stages:",
        "  - {id: alarms, type: threshold, inputs: [src], high: 100.0}",
        "  - {id: windows, type: window, inputs: [src], size: 1s, aggregates: [count]}",
        textwrap.indent(textwrap.dedent(stages).strip("\n"), "  "),
        "sinks:",
        "  - {id: alarm-out, type: outbox, inputs: [alarms], stream: alarms, priority: alarm}",
        "  - {id: alarm-file, type: file, inputs: [alarms], path: alarms.ndjson}",
        "  - {id: agg-out, type: outbox, inputs: [windows], stream: aggregates}",
        textwrap.indent(textwrap.dedent(sinks).strip("\n"), "  "),
        "outbox: {sync: normal, commit_interval: 0s}",
    ])
    return make_spec(body, tmp_path)


async def run_until_done(spec: PipelineSpec, data: Path, max_runs: int = 400,
                         ) -> tuple[list[Engine], list[str]]:
    """Run the pipeline, restarting after every `PluginError`, until a run ends on its own."""
    engines: list[Engine] = []
    errors: list[str] = []
    while len(engines) < max_runs:
        engine = Engine(spec, data)
        engines.append(engine)
        try:
            await engine.run()
        except PluginError as exc:
            errors.append(str(exc))
            continue
        return engines, errors
    raise AssertionError(f"not done after {max_runs} runs; errors: {errors[:3]}")


def read_stream(ob: Outbox, name: str) -> list[dict[str, Any]]:
    cols = ob.read_stream(name)
    if not cols:
        return []
    keys = list(cols)
    return [dict(zip(keys, vals, strict=True))
            for vals in zip(*(cols[k].tolist() for k in keys), strict=True)]


def check_sequences(ob: Outbox, stream: str, records: int) -> None:
    """The stored chunks of ``stream`` tile [0, produced) with no gap or overlap."""
    rows = ob.db.execute(
        "SELECT seq_first, seq_count FROM chunks WHERE stream=? ORDER BY seq_first", (stream,)
    ).fetchall()
    produced, next_seq = ob.db.execute(
        "SELECT produced, next_seq FROM streams WHERE stream=?", (stream,)
    ).fetchone()
    expect = 0
    for first, count in rows:
        assert first == expect, (stream, rows)
        expect += count
    assert (expect, produced, next_seq) == (records, records, records), stream


def check_windows_and_alarms(ob: Outbox, rows: list[dict[str, Any]]) -> None:
    """Every (sensor, second) once with HZ readings; one stored alarm per reading above 100."""
    agg = read_stream(ob, "aggregates")
    keys = [(r["sensor"], r["window_start"]) for r in agg]
    wrong = sorted({r["count"] for r in agg} - {HZ})
    assert (len(keys) - len(set(keys)), wrong) == (0, []), (
        f"{len(keys) - len(set(keys))} windows stored twice; "
        f"{sum(r['count'] != HZ for r in agg)} of {len(agg)} windows count {wrong}, not {HZ}"
    )
    assert len(keys) == SENSORS * SECONDS
    check_sequences(ob, "aggregates", SENSORS * SECONDS)
    expected = sorted((r["sensor"], r["ts"], r["value"]) for r in rows if r["value"] > 100)
    alarms = read_stream(ob, "alarms")
    got = sorted((a["sensor"], a["ts"], a["value"]) for a in alarms)
    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} of {len(got)} alarms twice"
    assert got == expected
    assert all(a["kind"] == "high" for a in alarms)
    check_sequences(ob, "alarms", len(expected))


# -- raise ----------------------------------------------------------------------------------------
async def test_a_stateful_plugin_raising_every_nth_batch_fails_the_batch_atomically(
    tmp_path: Path, plugins: Any
) -> None:
    rows = reading_rows(spikes)
    write_rows(tmp_path / "in.ndjson", rows)
    spec = pipeline(tmp_path, f"""
        - id: flaky
          type: python
          inputs: [src]
          class: "{plugins.__name__}:Flaky"
          options: {{every: 7}}
        """, "- {id: doubled-out, type: outbox, inputs: [flaky], stream: doubled}")
    engines, errors = await run_until_done(spec, tmp_path / "data")
    assert len(errors) >= 10  # the file is 180 batches; every run fails at its 7th
    assert set(errors) == {
        f"stage 'flaky': {plugins.__name__}:Flaky.process() raised RuntimeError: flaky call 7"
    }
    with Outbox(tmp_path / "data/outbox.db") as ob:
        check_windows_and_alarms(ob, rows)
        doubled = read_stream(ob, "doubled")
        assert sorted((r["sensor"], r["ts"], r["value"]) for r in doubled) == sorted(
            (r["sensor"], r["ts"], 2 * r["value"]) for r in rows
        )
        check_sequences(ob, "doubled", len(rows))
        assert ob.dead_letter_count == 0
    # the plugin's own state counted every reading once (restored, never counting a failed batch)
    assert engines[-1].stages["flaky"].inner.passed == len(rows)


async def test_a_stateless_plugin_sends_its_bad_records_to_dead_letters_exactly_once(
    tmp_path: Path, plugins: Any
) -> None:
    rows = reading_rows(spikes_and_negatives)
    write_rows(tmp_path / "in.ndjson", rows)
    negatives = [r for r in rows if r["value"] < 0]
    assert len(negatives) == len(rows) // 53 + 1 == 34
    spec = pipeline(tmp_path, f"""
        - id: checked
          type: python
          inputs: [src]
          class: "{plugins.__name__}:Checker"
        - id: flaky
          type: python
          inputs: [checked]
          class: "{plugins.__name__}:Flaky"
          options: {{every: 11}}
        """, "- {id: checked-out, type: outbox, inputs: [flaky], stream: checked}")
    _, errors = await run_until_done(spec, tmp_path / "data")
    assert errors and all("Flaky.process() raised RuntimeError" in e for e in errors)
    with Outbox(tmp_path / "data/outbox.db") as ob:
        check_windows_and_alarms(ob, rows)  # the bad records still count in the windows
        checked = read_stream(ob, "checked")
        assert sorted((r["sensor"], r["ts"], r["value"]) for r in checked) == sorted(
            (r["sensor"], r["ts"], 2 * r["value"]) for r in rows if r["value"] >= 0
        )
        check_sequences(ob, "checked", len(rows) - len(negatives))
        letters = ob.dead_letters(limit=1000)
        assert ob.dead_letter_count == len(letters) == len(negatives)  # once, despite replays
    cls = f"{plugins.__name__}:Checker"
    by_value = {orjson.loads(d["payload"])["value"]: d for d in letters}
    assert sorted(by_value) == sorted(r["value"] for r in negatives)
    for r in negatives:
        letter = by_value[r["value"]]
        assert letter["source"] == "checked"
        assert letter["reason"] == (
            f"stage 'checked': {cls}.process() raised ValueError: negative value {r['value']}"
        )
        assert orjson.loads(letter["payload"]) == r
        assert letter["size"] == len(letter["payload"])


async def test_a_stateless_plugin_that_always_raises_dead_letters_every_record(
    tmp_path: Path, write_module: Callable[[str], str]
) -> None:
    mod = write_module("""
        class Broken:
            stateless = True

            def __init__(self, options):
                pass

            def process(self, batch):
                raise KeyError("value2")
        """)
    rows = reading_rows()[:25]
    write_rows(tmp_path / "in.ndjson", rows)
    spec = pipeline(tmp_path, f"""
        - {{id: broken, type: python, inputs: [src], class: "{mod}:Broken"}}
        """, batch=8)
    summary = await Engine(spec, tmp_path / "data").run()
    assert summary["dead_lettered"] == 25
    with Outbox(tmp_path / "data/outbox.db") as ob:
        letters = ob.dead_letters(limit=100)
    assert [orjson.loads(d["payload"]) for d in reversed(letters)] == rows
    assert {d["reason"] for d in letters} == {
        f"stage 'broken': {mod}:Broken.process() raised KeyError: 'value2'"
    }


# -- hang and slow --------------------------------------------------------------------------------
async def test_a_hanging_stateless_plugin_is_abandoned_and_alarms_keep_coming(
    tmp_path: Path, plugins: Any
) -> None:
    rows = reading_rows(lambda n: 77.0 if n == 900 else spikes(n))  # hangs on batch 90 of 180
    write_rows(tmp_path / "in.ndjson", rows)
    spec = pipeline(tmp_path, f"""
        - {{id: stuck, type: python, inputs: [src], class: "{plugins.__name__}:Stuck"}}
        """, "- {id: stuck-out, type: outbox, inputs: [stuck], stream: passed}")
    engine = Engine(spec, tmp_path / "data")
    started = time.monotonic()
    summary = await engine.run()  # the default timeout (1 s) abandons the call
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 9.0, elapsed
    assert summary["dead_lettered"] == 1
    with Outbox(tmp_path / "data/outbox.db") as ob:
        check_windows_and_alarms(ob, rows)
        passed = read_stream(ob, "passed")
        (letter,) = ob.dead_letters()
    hung = rows[900:910]  # the batch the call hung on
    assert sorted((r["sensor"], r["ts"]) for r in passed) == sorted(
        (r["sensor"], r["ts"]) for r in rows[:900] + rows[910:]
    )
    assert letter["source"] == "stuck"
    assert letter["reason"] == (
        f"stage 'stuck': {plugins.__name__}:Stuck.process() did not return within 1 s on 10 "
        "records; the call was abandoned (records in the payload, one JSON line each)"
    )
    assert [orjson.loads(x) for x in letter["payload"].splitlines()] == hung
    # the local alarm sink got every alarm, those after the hang included, each once
    local = [orjson.loads(x) for x in (tmp_path / "data/alarms.ndjson").read_bytes().splitlines()]
    assert sorted((a["sensor"], a["ts"]) for a in local) == sorted(
        (r["sensor"], r["ts"]) for r in rows if r["value"] > 100
    )
    # a fresh instance took over after the hang; the abandoned call ends once released
    assert [n for n, _ in plugins.STARTED] == [0] * 91 + [1] * 89
    stage = engine.stages["stuck"]
    assert stage.abandoned == 1
    plugins.RELEASE.set()
    for _ in range(200):
        if stage.abandoned_running == 0:
            break
        time.sleep(0.01)
    assert stage.abandoned_running == 0


async def test_a_hanging_stateful_plugin_fails_the_run_and_a_restart_loses_nothing(
    tmp_path: Path, plugins: Any
) -> None:
    rows = reading_rows(spikes)
    write_rows(tmp_path / "in.ndjson", rows)
    spec = pipeline(tmp_path, f"""
        - id: stuck
          type: python
          inputs: [src]
          class: "{plugins.__name__}:StuckOnce"
          timeout: 300ms
        """, "- {id: stuck-out, type: outbox, inputs: [stuck], stream: passed}")
    started = time.monotonic()
    engines, errors = await run_until_done(spec, tmp_path / "data")
    assert time.monotonic() - started < 9.0
    assert errors == [
        f"stage 'stuck': {plugins.__name__}:StuckOnce.process() did not return within 0.3 s; "
        "the call was abandoned and the run stops (a stage with state cannot skip a call)"
    ]
    with Outbox(tmp_path / "data/outbox.db") as ob:
        check_windows_and_alarms(ob, rows)
        passed = read_stream(ob, "passed")
        assert ob.dead_letter_count == 0
    assert sorted((r["sensor"], r["ts"]) for r in passed) == sorted(
        (r["sensor"], r["ts"]) for r in rows
    )
    check_sequences_of(tmp_path, "passed", len(rows))
    assert engines[-1].stages["stuck"].inner.passed == len(rows)


def check_sequences_of(tmp_path: Path, stream: str, records: int) -> None:
    with Outbox(tmp_path / "data/outbox.db") as ob:
        check_sequences(ob, stream, records)


async def test_a_slow_plugin_within_its_timeout_loses_nothing(
    tmp_path: Path, plugins: Any
) -> None:
    rows = reading_rows(spikes)[:300]  # 30 batches of 10, 20 ms each
    write_rows(tmp_path / "in.ndjson", rows)
    spec = pipeline(tmp_path, f"""
        - id: slow
          type: python
          inputs: [src]
          class: "{plugins.__name__}:Slow"
          options: {{sleep: 0.02}}
        """, "- {id: slow-out, type: outbox, inputs: [slow], stream: passed}")
    summary = await Engine(spec, tmp_path / "data").run()
    assert summary["dead_lettered"] == 0
    assert summary["stages"]["slow"]["out"] == 300
    with Outbox(tmp_path / "data/outbox.db") as ob:
        check_sequences(ob, "passed", 300)


async def test_a_call_slower_than_its_timeout_is_abandoned_and_its_thread_ends(
    tmp_path: Path, plugins: Any
) -> None:
    rows = reading_rows(lambda n: 77.0 if n == 100 else spikes(n))[:300]
    write_rows(tmp_path / "in.ndjson", rows)
    spec = pipeline(tmp_path, f"""
        - id: slow
          type: python
          inputs: [src]
          class: "{plugins.__name__}:Slow"
          options: {{long: 0.8}}
          timeout: 300ms
        """, "- {id: slow-out, type: outbox, inputs: [slow], stream: passed}")
    engine = Engine(spec, tmp_path / "data")
    summary = await engine.run()
    assert summary["dead_lettered"] == 1
    assert summary["stages"]["slow"]["out"] == 290
    with Outbox(tmp_path / "data/outbox.db") as ob:
        (letter,) = ob.dead_letters()
        check_sequences(ob, "passed", 290)
    assert "Slow.process() did not return within 0.3 s on 10 records" in letter["reason"]
    stage = engine.stages["slow"]
    assert stage.abandoned == 1
    for _ in range(200):  # the late call returns after 0.8 s; its result is dropped
        if stage.abandoned_running == 0:
            break
        time.sleep(0.01)
    assert stage.abandoned_running == 0


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def write(source: str) -> str:
        name = f"userop_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)
