"""The engine: routing by port, end of input, stop and restart, dead letters, backpressure."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from conftest import make_spec
from edgewise.errors import ConfigError, StorageError
from edgewise.outbox import Outbox
from edgewise.outbox.numbering import REWOUND
from edgewise.pipeline import checkpoint as ckpt
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import Source, SourceOutput
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.engine_state import CHECKPOINT_KEY

WINDOW_PIPELINE = """
sources:
  - id: src
    type: file
    path: in.ndjson
    batch: {batch}
stages:
  - id: windows
    type: window
    inputs: [src]
    size: 1s
    aggregates: [count, mean, min, max]
    allowed_lateness: {lateness}
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
  - id: late-file
    type: file
    inputs: [windows.late]
    path: late.ndjson
"""


def readings(n_per_sensor: int, sensors: int = 3, hz: int = 10, t0: float = 1000.0) -> Batch:
    """Readings in time order: ``sensors`` sensors at ``hz``; value = reading number."""
    rows = [
        {"sensor": f"s{k}", "ts": t0 + i / hz, "value": float(i * sensors + k)}
        for i in range(n_per_sensor)
        for k in range(sensors)
    ]
    return Batch.from_records(rows)


def write_ndjson(path: Path, batch: Batch) -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in batch.to_records()))


def slices(batch: Batch, size: int) -> list[Batch]:
    return [batch.take(np.arange(i, min(i + size, batch.n))) for i in range(0, batch.n, size)]


class ScriptedSource(Source):
    """Emits given batches with position {"i": batches emitted}; can hold after one of them."""

    finite = True

    def __init__(self, batches: list[Batch], hold_after: int | None = None) -> None:
        self.id = "src"
        self.batches = batches
        self.hold_after = hold_after
        self.i = 0
        self.restored: Any = None

    def restore(self, position: Any) -> None:
        self.restored = position
        self.i = position["i"]

    async def run(self, out: SourceOutput) -> None:
        while self.i < len(self.batches):
            batch = self.batches[self.i]
            self.i += 1
            await out.emit(batch, {"i": self.i})
            if self.i == self.hold_after:
                await asyncio.Event().wait()  # until the engine stops us


def durable(db: Path) -> tuple[int, Any]:
    """(dead letters, source position) as stored, read through a separate connection."""
    con = sqlite3.connect(db)
    try:
        dead = con.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        row = con.execute("SELECT value FROM checkpoint WHERE key=?", (CHECKPOINT_KEY,)).fetchone()
    finally:
        con.close()
    entry = ckpt.unpack(row[0])["positions"].get("src") if row else None
    pos = entry["position"] if entry else None
    return dead, pos


def stream(data: Path, name: str) -> dict[str, list[Any]]:
    with Outbox(data / "outbox.db") as ob:
        return {k: v.tolist() for k, v in ob.read_stream(name).items()}


def engine_for(tmp_path: Path, source: Source | None = None, batch: int = 8192,
               lateness: str = "0s", **kw: Any) -> Engine:
    spec = make_spec(WINDOW_PIPELINE.format(batch=batch, lateness=lateness), tmp_path)
    eng = Engine(spec, tmp_path / "data", **kw)
    if source is not None:
        eng.sources = {"src": source}
    return eng


async def test_file_to_windows_alarms_and_late_port(tmp_path: Path) -> None:
    rows = readings(30).to_records()  # 3 s of 3 sensors at 10 Hz
    rows[40]["value"] = 150.0  # an alarm
    # after t=1001.2: out of order, its window has ended but is within the 0.5 s lateness
    in_time = {"sensor": "s1", "ts": 1000.9, "value": 7.0}
    # after t=1002.0: the first second is closed for good
    late = [
        {"sensor": "s0", "ts": 1000.5, "value": 1.0},
        {"sensor": "s9", "ts": 999.0, "value": 2.0},
    ]
    stream_rows = [*rows[:39], in_time, *rows[39:63], *late, *rows[63:]]
    write_ndjson(tmp_path / "in.ndjson", Batch.from_records(stream_rows))
    eng = engine_for(tmp_path, batch=7, lateness="500ms")
    summary = await eng.run()

    assert summary["readings_in"] == 93
    assert summary["late"] == 2
    assert summary["alarms"] == 1
    assert summary["dead_lettered"] == 0
    assert summary["stages"] == {"windows": {"out": 9}, "alarms": {"out": 1}}
    # late records went to the sink on windows.late, nowhere else
    late_out = [orjson.loads(x) for x in (tmp_path / "data/late.ndjson").read_bytes().splitlines()]
    assert late_out == late
    agg = stream(tmp_path / "data", "aggregates")
    assert sorted(zip(agg["sensor"], agg["window_start"], agg["count"], strict=True)) == [
        ("s0", 1000.0, 10), ("s0", 1001.0, 10), ("s0", 1002.0, 10),
        ("s1", 1000.0, 11), ("s1", 1001.0, 10), ("s1", 1002.0, 10),
        ("s2", 1000.0, 10), ("s2", 1001.0, 10), ("s2", 1002.0, 10),
    ]
    alarms = stream(tmp_path / "data", "alarms")
    assert alarms["value"] == [150.0] and alarms["kind"] == ["high"]
    assert alarms["ts"] == [rows[40]["ts"]] and alarms["sensor"] == [rows[40]["sensor"]]


async def test_finite_source_flushes_open_windows(tmp_path: Path) -> None:
    write_ndjson(tmp_path / "in.ndjson", readings(5))  # half a second: no window closes by time
    summary = await engine_for(tmp_path).run()
    assert summary["stages"]["windows"]["out"] == 3
    agg = stream(tmp_path / "data", "aggregates")
    assert agg["count"] == [5, 5, 5]
    assert agg["min"] == [0.0, 1.0, 2.0] and agg["max"] == [12.0, 13.0, 14.0]
    assert agg["mean"] == [6.0, 7.0, 8.0]
    # a second run finds the file done and its windows already emitted
    again = await engine_for(tmp_path).run()
    assert again["readings_in"] == 0 and again["stages"]["windows"]["out"] == 0
    assert stream(tmp_path / "data", "aggregates")["count"] == [5, 5, 5]


async def _run_until_held(eng: Engine, batches_in: int) -> dict[str, Any]:
    task = asyncio.create_task(eng.run())
    for _ in range(500):
        await asyncio.sleep(0.01)
        if eng.counters.batches_in == batches_in:
            break
    assert eng.counters.batches_in == batches_in
    eng.stop()
    return await asyncio.wait_for(task, 10)


async def test_stop_keeps_window_state_and_restart_counts_exactly_once(tmp_path: Path) -> None:
    data = readings(50)  # 5 s, 150 readings
    parts = slices(data, 10)  # 15 batches; after 7 the third second is half full
    first = engine_for(tmp_path, ScriptedSource(parts, hold_after=7))
    s1 = await _run_until_held(first, 7)
    assert s1["readings_in"] == 70
    assert s1["stages"]["windows"]["out"] == 6  # seconds 0 and 1 closed, second 2 still open
    with Outbox(tmp_path / "data/outbox.db") as ob:
        state = ckpt.unpack(ob.load_checkpoint()[CHECKPOINT_KEY])
    assert state["positions"]["src"]["position"] == {"i": 7}
    held = state["operators"]["windows"]["state"]["windows"]
    assert sorted((w, k, count) for w, k, count, _ in held) == [
        (1002, 0, 4), (1002, 1, 3), (1002, 2, 3)
    ]

    src = ScriptedSource(parts)
    second = engine_for(tmp_path, src)
    s2 = await second.run()
    assert src.restored == {"i": 7}
    assert s2["readings_in"] == 80
    agg = stream(tmp_path / "data", "aggregates")
    keys = list(zip(agg["sensor"], agg["window_start"], strict=True))
    assert len(keys) == len(set(keys)) == 15
    assert agg["count"] == [10] * 15
    assert sum(agg["count"]) == 150
    by_key = dict(zip(keys, agg["max"], strict=True))
    assert by_key[("s0", 1002.0)] == 87.0 and by_key[("s2", 1004.0)] == 149.0


async def test_stop_with_flush_emits_open_windows(tmp_path: Path) -> None:
    parts = slices(readings(50), 10)
    eng = engine_for(tmp_path, ScriptedSource(parts, hold_after=7), flush_on_stop=True)
    s1 = await _run_until_held(eng, 7)
    assert s1["stages"]["windows"]["out"] == 9
    agg = stream(tmp_path / "data", "aggregates")
    assert agg["count"][-3:] == [4, 3, 3]


async def test_dead_letter_is_committed_with_the_position_that_passes_it(tmp_path: Path) -> None:
    db = tmp_path / "data/outbox.db"
    part = slices(readings(10), 10)

    class Source_(ScriptedSource):
        seen: tuple[int, Any] = (-1, None)

        async def run(self, out: SourceOutput) -> None:
            await out.emit(part[0], {"i": 1})
            out.dead_letter("line 11: malformed JSON", b"{oops")
            await asyncio.sleep(0.35)  # the engine ticks and commits meanwhile
            self.seen = durable(db)
            await out.emit(part[1], {"i": 2})

    src = Source_([])
    summary = await engine_for(tmp_path, src).run()
    # while its position was not yet passed, the dead letter was not durable (a crash then
    # replays the line and reports it again: once in all)
    assert src.seen == (0, {"i": 1})
    assert durable(db) == (1, {"i": 2})
    assert summary["dead_lettered"] == 1
    with Outbox(db) as ob:
        (letter,) = ob.dead_letters()
    assert letter["reason"] == "line 11: malformed JSON" and letter["payload"] == b"{oops"
    assert letter["source"] == "src" and letter["size"] == 5


async def test_dead_letter_of_a_silent_source_is_committed_after_a_second(tmp_path: Path) -> None:
    db = tmp_path / "data/outbox.db"

    class Quiet(ScriptedSource):
        seen: tuple[int, Any] = (-1, None)

        async def run(self, out: SourceOutput) -> None:
            out.dead_letter("not a reading", b"?")
            await asyncio.sleep(1.4)
            self.seen = durable(db)

    src = Quiet([])
    summary = await engine_for(tmp_path, src).run()
    assert src.seen == (1, None)
    assert summary["dead_lettered"] == 1 and durable(db)[0] == 1


async def test_source_waits_when_the_engine_is_behind(tmp_path: Path) -> None:
    parts = slices(readings(100), 3)  # 100 batches
    spec_text = WINDOW_PIPELINE.format(batch=1, lateness=0) + "batching: {queue_batches: 2}\n"
    eng = Engine(make_spec(spec_text, tmp_path), tmp_path / "data")
    lags: list[int] = []

    class Eager(ScriptedSource):
        async def run(self, out: SourceOutput) -> None:
            for i, b in enumerate(self.batches):
                lags.append(i - eng.counters.batches_in)  # emitted but not yet taken
                await out.emit(b, {"i": i + 1})

    eng.sources = {"src": Eager(parts)}
    summary = await eng.run()
    assert summary["readings_in"] == 300
    assert len(lags) == 100
    assert max(lags) in (2, 3)  # the queue holds 2; one more may be in the source's hand


async def test_missing_input_file_fails_the_run_cleanly(tmp_path: Path) -> None:
    eng = engine_for(tmp_path)
    with pytest.raises(ConfigError, match=r"source 'src': file .*in.ndjson does not exist"):
        await eng.run()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_duration_stops_an_endless_source(tmp_path: Path) -> None:
    class Endless(ScriptedSource):
        finite = False

        async def run(self, out: SourceOutput) -> None:
            await asyncio.Event().wait()

    eng = engine_for(tmp_path, Endless([]), duration=0.3)
    summary = await asyncio.wait_for(eng.run(), 5)
    assert summary["readings_in"] == 0
    assert 0.3 <= summary["elapsed_s"] < 2
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_failed_commit_stops_the_run_and_a_restart_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_ndjson(tmp_path / "in.ndjson", readings(200))  # 20 s of 3 sensors: 600 readings
    commit = Outbox.commit
    calls = 0

    def failing(self: Outbox, *args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise StorageError("disk full (simulated)")
        return commit(self, *args, **kw)

    monkeypatch.setattr(Outbox, "commit", failing)
    with pytest.raises(StorageError, match="disk full"):
        # at most 20 records wait for a commit, so the failure lands mid-file
        await engine_for(tmp_path, batch=5, max_pending_records=20).run()
    assert calls == 3  # nothing was committed after the failure
    assert asyncio.all_tasks() == {asyncio.current_task()}
    done = durable(tmp_path / "data/outbox.db")[1]["offset"]
    assert 0 < done < (tmp_path / "in.ndjson").stat().st_size

    monkeypatch.setattr(Outbox, "commit", commit)
    summary = await engine_for(tmp_path, batch=5).run()
    assert summary["readings_in"] < 600  # it went on from the last durable position
    agg = stream(tmp_path / "data", "aggregates")
    keys = list(zip(agg["sensor"], agg["window_start"], strict=True))
    assert len(keys) == len(set(keys)) == 60
    assert agg["count"] == [10] * 60


async def test_an_error_after_a_batch_was_routed_commits_nothing_of_it(tmp_path: Path) -> None:
    """The batch reached every stage and its outputs were queued when the error came: the run
    ends without committing any of it (records, window state, position), as a crash would, and
    a restart replays it; every window then counts its readings once."""
    data = readings(50)
    data = data.with_columns(value=data["value"] / 10)  # 0.0 to 14.9
    data.columns["value"][[17, 80, 81]] = 150.0  # the alarms, in batches 2 and 9
    parts = slices(data, 10)  # 15 batches
    seen = 0

    def observe(node: str, port: str, batch: Batch) -> Any:
        nonlocal seen
        if node != "src":
            return None
        seen += 1

        def after() -> None:
            if seen == 9:  # batch 9 went through every stage (alarm and window state)
                raise RuntimeError("failed after routing batch 9")

        return after

    db = tmp_path / "data/outbox.db"
    first = engine_for(tmp_path, ScriptedSource(parts), observer=observe)
    with pytest.raises(RuntimeError, match="batch 9"):
        await first.run()
    assert first.counters.batches_in == 9 and first.counters.alarms == 3
    done = durable(db)[1]["i"]
    assert 1 <= done <= 8  # committed before batch 9, never with it
    with Outbox(db) as ob:
        held = ckpt.unpack(ob.load_checkpoint()[CHECKPOINT_KEY])["operators"]["windows"]
        in_windows = sum(count for *_, count, _ in held["state"]["windows"])
        closed = sum(ob.read_stream("aggregates").get("count", np.zeros(0)).tolist())
        alarms = ob.read_stream("alarms").get("ts", np.zeros(0)).tolist()
    assert in_windows + closed == 10 * done  # the window state is that of the position
    assert alarms == [data["ts"][17]] * (done >= 2)

    src = ScriptedSource(parts)
    summary = await engine_for(tmp_path, src).run()
    assert src.restored == {"i": done} and summary["readings_in"] == 150 - 10 * done
    agg = stream(tmp_path / "data", "aggregates")
    keys = list(zip(agg["sensor"], agg["window_start"], strict=True))
    assert len(keys) == len(set(keys)) == 15
    assert agg["count"] == [10] * 15
    assert stream(tmp_path / "data", "alarms")["ts"] == [data["ts"][i] for i in (17, 80, 81)]


async def test_a_changed_source_starts_afresh_instead_of_reusing_an_old_position(
    tmp_path: Path,
) -> None:
    write_ndjson(tmp_path / "in.ndjson", readings(10))  # 30 readings
    first = await engine_for(tmp_path).run()
    assert first["readings_in"] == 30
    again = await engine_for(tmp_path).run()  # same source: continues at the end of the file
    assert again["readings_in"] == 0
    other = tmp_path / "other.ndjson"
    write_ndjson(other, readings(5))  # 15 readings
    spec_text = WINDOW_PIPELINE.format(batch=8192, lateness="0s").replace("in.ndjson", str(other))
    changed = Engine(make_spec(spec_text, tmp_path), tmp_path / "data")
    assert (await changed.run())["readings_in"] == 15  # not resumed at the old file's offset


async def test_a_file_that_lost_its_latest_commits_does_not_produce_them_again(
        tmp_path: Path) -> None:
    """The outbox file goes back to an earlier commit (its write-ahead log deleted, a power loss
    with sync: normal) after the uplink sent (and the cloud stored) what came since. The run
    continues its source from the positions of the last commit made, kept in the outbox's note,
    not from the file's older checkpoint: replaying would store the same windows twice under
    new sequence numbers, which the cloud cannot see as duplicates."""
    parts = slices(readings(60), 30)  # 6 batches of one second each
    db = tmp_path / "data/outbox.db"
    await _run_until_held(engine_for(tmp_path, ScriptedSource(parts, hold_after=2)), 2)
    shutil.copy(db, tmp_path / "earlier.db")  # closed: the log was copied into the file
    await _run_until_held(engine_for(tmp_path, ScriptedSource(parts, hold_after=4)), 2)
    agg = stream(tmp_path / "data", "aggregates")
    before = set(zip(agg["sensor"], agg["window_start"], strict=True))  # all "in the cloud"
    assert len(before) == 9  # seconds 0..2 closed (3 sensors)
    with Outbox(tmp_path / "earlier.db") as ob:
        kept = len(ob.read_stream("aggregates").get("sensor", []))
    os.replace(tmp_path / "earlier.db", db)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)

    src = ScriptedSource(parts)
    await engine_for(tmp_path, src).run()
    assert src.restored == {"i": 4}  # not {"i": 2}, the file's own checkpoint
    with Outbox(db) as ob:
        first = ob.lost_ranges()[0]
        assert (first.stream, first.reason) == ("aggregates", REWOUND)
        agg = {k: v.tolist() for k, v in ob.read_stream("aggregates").items()}
    after = list(zip(agg["sensor"], agg["window_start"], strict=True))
    # what the rewound file still held (the first run's windows), then the new ones
    new = after[kept:]
    assert sorted(new) == [(f"s{k}", float(t)) for k in range(3) for t in (1004, 1005)]
    assert not set(new) & before
