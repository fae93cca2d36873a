"""The engine's supported hooks for tools that drive it (the planner): an observer of routed
batches, substituted sources, and the commit count."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import make_spec
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import Source, SourceOutput
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.spec import PipelineSpec

# the spec's source reads a file that does not exist: a run that used it would fail
PIPELINE = """
sources:
  - id: src
    type: file
    path: missing.ndjson
stages:
  - id: alarms
    type: threshold
    inputs: [src]
    high: 100.0
  - id: windows
    type: window
    inputs: [src]
    size: 1s
    aggregates: [count, mean]
sinks:
  - id: alarm-out
    type: outbox
    inputs: [alarms]
    stream: alarms
    priority: alarm
  - id: agg
    type: outbox
    inputs: [windows]
    stream: aggregates
"""
SENSORS, HZ, SECONDS = 3, 10, 3  # 90 readings, 30 per second


def second(k: int) -> Batch:
    """Second ``k`` of the input: 3 sensors at 10 Hz; one reading above 100 in seconds 0 and 2."""
    rows = [{"sensor": f"s{j}", "ts": 1000.0 + k + i / HZ, "value": 50.0}
            for i in range(HZ) for j in range(SENSORS)]
    if k in (0, 2):
        rows[4 + k]["value"] = 150.0  # a different sensor each time
    return Batch.from_records(rows)


class Scripted(Source):
    """Emits the given batches, then ends."""

    finite = True

    def __init__(self, batches: list[Batch], id: str = "src") -> None:
        self.id = id
        self.batches = batches
        self.ran = False

    async def run(self, out: SourceOutput) -> None:
        self.ran = True
        for i, batch in enumerate(self.batches):
            await out.emit(batch, {"i": i + 1})


def spec_for(tmp_path: Path) -> PipelineSpec:
    return make_spec(PIPELINE, tmp_path)


def run(engine: Engine) -> dict[str, Any]:
    return asyncio.run(engine.run())


def test_the_observer_sees_every_batch_routed_with_its_node_and_port(tmp_path: Path) -> None:
    batches: Counter[tuple[str, str]] = Counter()
    records: Counter[tuple[str, str]] = Counter()

    def observe(node: str, port: str, batch: Batch) -> None:
        batches[(node, port)] += 1
        records[(node, port)] += batch.n

    source = Scripted([second(k) for k in range(SECONDS)])
    engine = Engine(spec_for(tmp_path), tmp_path / "data", observer=observe,
                    sources={"src": source})
    summary = run(engine)
    assert summary["readings_in"] == 90
    assert batches[("src", "out")] == 3
    # input, the two alarms, and one count per sensor and second (closed, or flushed at the end)
    assert records == {("src", "out"): 90, ("alarms", "out"): 2, ("windows", "out"): 9}
    assert summary["streams"]["alarms"]["records"] == 2
    assert summary["streams"]["aggregates"]["records"] == 9


def test_what_the_observer_returns_runs_once_the_batch_is_through(tmp_path: Path) -> None:
    log: list[str] = []

    def observe(node: str, port: str, batch: Batch) -> Callable[[], None] | None:
        log.append(f"> {node}.{port}")
        if node != "src":
            return None
        return lambda: log.append(f"< {node}.{port} {batch.n}")

    # one second with an alarm: the threshold emits at once, the window only at the end (flush)
    engine = Engine(spec_for(tmp_path), tmp_path / "data", observer=observe,
                    sources={"src": Scripted([second(0)])})
    run(engine)
    assert log == ["> src.out", "> alarms.out", "< src.out 30", "> windows.out"]


def test_a_substituted_source_is_the_one_that_runs(tmp_path: Path) -> None:
    mine = Scripted([second(k) for k in range(SECONDS)])
    engine = Engine(spec_for(tmp_path), tmp_path / "data", sources={"src": mine})
    assert engine.sources == {"src": mine}
    summary = run(engine)
    assert mine.ran
    assert summary["readings_in"] == 90
    assert summary["sources"]["src"]["readings"] == 90
    assert summary["stages"]["windows"]["out"] == 9


def test_without_a_substitute_the_spec_source_runs(tmp_path: Path) -> None:
    from edgewise.errors import EdgewiseError

    engine = Engine(spec_for(tmp_path), tmp_path / "data")
    assert type(engine.sources["src"]).__name__ == "FileSource"
    with pytest.raises(EdgewiseError, match=r"missing\.ndjson"):
        run(engine)


def test_substitutes_must_match_the_spec(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no source other"):
        Engine(spec_for(tmp_path), tmp_path / "data", sources={"other": Scripted([], "other")})
    with pytest.raises(ValueError, match="the id it replaces"):
        Engine(spec_for(tmp_path), tmp_path / "data", sources={"src": Scripted([], "x")})


def test_commits_are_counted(tmp_path: Path) -> None:
    engine = Engine(spec_for(tmp_path), tmp_path / "data",
                    sources={"src": Scripted([second(k) for k in range(SECONDS)])})
    assert engine.commits == 0
    summary = run(engine)
    assert engine.commits == summary["commits"] >= 1


def test_without_an_observer_routing_is_the_plain_method(tmp_path: Path) -> None:
    """No observer, no extra work per batch: the engine keeps the class's own `_route`."""
    plain = Engine(spec_for(tmp_path), tmp_path / "a")
    assert "_route" not in vars(plain)
    watched = Engine(spec_for(tmp_path), tmp_path / "b", observer=lambda *_: None)
    assert "_route" in vars(watched)
