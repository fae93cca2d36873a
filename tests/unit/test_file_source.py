"""The file source on its own: batches, positions, resume, bad and over-long lines, CSV, follow."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edgewise.errors import ConfigError
from edgewise.pipeline.component import DeadLetter, RunContext, SourceOutput
from edgewise.pipeline.sources.file import FileConfig, FileSource


def reading(i: int, sensor: str = "s1") -> bytes:
    return b'{"sensor":"%s","ts":%d,"value":%d.5}' % (sensor.encode(), 1000 + i, i)


class Recorder:
    """Collects what a source hands the engine, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.out = SourceOutput(self._emit, self._dead, "src")

    async def _emit(self, batch: Any, position: Any) -> None:
        self.events.append(("emit", (batch, dict(position))))

    def _dead(self, letter: DeadLetter) -> None:
        self.events.append(("dead", letter))

    @property
    def batches(self) -> list[Any]:
        return [v[0] for k, v in self.events if k == "emit"]

    @property
    def positions(self) -> list[dict[str, Any]]:
        return [v[1] for k, v in self.events if k == "emit"]

    @property
    def dead(self) -> list[DeadLetter]:
        return [v for k, v in self.events if k == "dead"]

    def values(self) -> list[float]:
        return [v for b in self.batches if b.n for v in b["value"].tolist()]


def source(tmp_path: Path, name: str = "in.ndjson", **cfg: Any) -> FileSource:
    return FileSource("src", FileConfig(path=name, **cfg), RunContext("t", tmp_path, tmp_path))


async def run(src: FileSource) -> Recorder:
    rec = Recorder()
    await asyncio.wait_for(src.run(rec.out), 10)
    return rec


async def test_batches_and_positions(tmp_path: Path) -> None:
    lines = [reading(i) for i in range(25)]
    (tmp_path / "in.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    rec = await run(source(tmp_path, batch=10))
    assert [b.n for b in rec.batches] == [10, 10, 5]
    ends = [sum(len(x) + 1 for x in lines[:k]) for k in (10, 20, 25)]
    assert [p["offset"] for p in rec.positions] == ends
    assert [p["line"] for p in rec.positions] == [10, 20, 25]
    assert rec.values() == [i + 0.5 for i in range(25)]
    assert rec.batches[0]["sensor"].tolist() == ["s1"] * 10
    assert rec.batches[0]["ts"].tolist() == [float(1000 + i) for i in range(10)]
    assert rec.dead == []


async def test_restore_resumes_after_the_position(tmp_path: Path) -> None:
    lines = [reading(i) for i in range(25)]
    (tmp_path / "in.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    first = await run(source(tmp_path, batch=10))
    src = source(tmp_path, batch=10)
    src.restore(first.positions[1])  # as if the last commit held the second batch
    rec = await run(src)
    assert rec.values() == [i + 0.5 for i in range(20, 25)]
    assert rec.positions[-1]["line"] == 25


async def test_bad_lines_are_dead_letters_with_their_line_numbers(tmp_path: Path) -> None:
    content = b"\n".join([
        reading(0),
        b"",
        b"{broken",
        reading(1),
        b'{"sensor":"s1","ts":1,"value":"abc"}',
        b"   ",
        reading(2),
    ]) + b"\n"
    (tmp_path / "in.ndjson").write_bytes(content)
    rec = await run(source(tmp_path, batch=100))
    assert rec.values() == [0.5, 1.5, 2.5]
    assert [d.reason.split(":")[0] for d in rec.dead] == ["line 3", "line 5"]
    assert rec.dead[0].reason.startswith("line 3: malformed JSON")
    assert rec.dead[0].payload == b"{broken" and rec.dead[0].size == 7
    assert rec.dead[1].reason == (
        "line 5: field 'value' is 'abc' (str), expected a number"
    )
    assert rec.positions[-1] == {"offset": len(content), "line": 7, "header": None}
    # dead letters are reported before the emit whose position passes them
    assert [k for k, _ in rec.events] == ["dead", "dead", "emit"]


async def test_last_line_without_newline_is_read(tmp_path: Path) -> None:
    (tmp_path / "in.ndjson").write_bytes(reading(0) + b"\n" + reading(1))
    rec = await run(source(tmp_path))
    assert rec.values() == [0.5, 1.5]


async def test_empty_file_emits_nothing(tmp_path: Path) -> None:
    (tmp_path / "in.ndjson").write_bytes(b"")
    rec = await run(source(tmp_path))
    assert rec.events == []


async def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"source 'src': file .*nope.ndjson does not exist"):
        await run(source(tmp_path, name="nope.ndjson"))


async def test_over_long_line_in_the_middle_is_skipped_with_its_size(tmp_path: Path) -> None:
    big = b'{"sensor":"s1","ts":1,"value":1,"pad":"' + b"x" * 3_000_000 + b'"}'
    content = reading(0) + b"\n" + big + b"\n" + reading(1) + b"\n"
    (tmp_path / "in.ndjson").write_bytes(content)
    rec = await run(source(tmp_path, max_line_bytes=1 << 20))
    assert rec.values() == [0.5, 1.5]
    assert len(rec.dead) == 1
    d = rec.dead[0]
    assert d.reason == f"line 2: {len(big)} bytes, over max_line_bytes=1048576; skipped"
    assert d.payload == big[:4096] and d.size == 4096
    assert rec.positions[-1] == {"offset": len(content), "line": 3, "header": None}


async def test_over_long_line_that_fits_one_read(tmp_path: Path) -> None:
    big = b"y" * 200
    content = reading(0) + b"\n" + big + b"\n" + reading(1) + b"\n"
    (tmp_path / "in.ndjson").write_bytes(content)
    rec = await run(source(tmp_path, max_line_bytes=100))
    assert rec.values() == [0.5, 1.5]
    assert [d.reason for d in rec.dead] == [
        "line 2: 200 bytes, over max_line_bytes=100; skipped"
    ]


async def test_over_long_last_line_moves_the_position_past_it(tmp_path: Path) -> None:
    big = b"z" * 1_500_000
    content = reading(0) + b"\n" + big + b"\n"
    (tmp_path / "in.ndjson").write_bytes(content)
    rec = await run(source(tmp_path, max_line_bytes=1 << 20, batch=1))
    assert rec.values() == [0.5]
    assert [d.reason for d in rec.dead] == [
        "line 2: 1500000 bytes, over max_line_bytes=1048576; skipped"
    ]
    # the dead letter is followed by an emit (empty batch) whose position passes the line
    assert [k for k, _ in rec.events] == ["emit", "dead", "emit"]
    assert rec.batches[-1].n == 0
    assert rec.positions[-1] == {"offset": len(content), "line": 2, "header": None}
    # and a restart from there finds nothing more to say
    src = source(tmp_path, max_line_bytes=1 << 20)
    src.restore(rec.positions[-1])
    again = await run(src)
    assert again.events == []


async def test_over_long_line_without_newline_at_end_of_file(tmp_path: Path) -> None:
    content = reading(0) + b"\n" + b"q" * 2_500_000
    (tmp_path / "in.ndjson").write_bytes(content)
    rec = await run(source(tmp_path, max_line_bytes=1 << 20))
    assert [d.reason for d in rec.dead] == [
        "line 2: 2500000 bytes, over max_line_bytes=1048576; skipped"
    ]
    assert rec.positions[-1] == {"offset": len(content), "line": 2, "header": None}


async def test_csv_with_header_nan_and_text_sensor_ids(tmp_path: Path) -> None:
    content = (
        "sensor,ts,value\n"
        "007,1000,1.25\n"
        "pump-1,1001,nan\n"
        "pump-1,1002,inf\n"
        "pump-1,1003\n"
        "pump-1,2024-01-01T00:00:00Z,2\n"
        "pump-1,1004,abc\n"
    )
    (tmp_path / "in.csv").write_text(content)
    rec = await run(source(tmp_path, name="in.csv"))
    (batch,) = rec.batches
    assert batch["sensor"].tolist() == ["007", "pump-1"]
    assert batch["ts"].tolist() == [1000.0, 1704067200.0]
    assert batch["value"].tolist() == [1.25, 2.0]
    assert [d.reason for d in rec.dead] == [
        "line 3: field 'value' is nan; NaN and infinity are not readings",
        "line 4: field 'value' is inf; NaN and infinity are not readings",
        "line 5: 2 columns, header has 3",
        "line 7: field 'value' is 'abc' (str), expected a number",
    ]
    assert rec.positions[-1]["header"] == ["sensor", "ts", "value"]


async def test_csv_resume_keeps_the_header(tmp_path: Path) -> None:
    rows = "".join(f"s{i % 3},{1000 + i},{i}\n" for i in range(9))
    (tmp_path / "in.csv").write_text("sensor,ts,value\n" + rows)
    first = await run(source(tmp_path, name="in.csv", batch=5))
    assert [b.n for b in first.batches] == [4, 5]  # the header is the first of the 5 lines
    src = source(tmp_path, name="in.csv", batch=5)
    src.restore(first.positions[0])
    rec = await run(src)
    assert rec.values() == [4.0, 5.0, 6.0, 7.0, 8.0]
    assert rec.batches[0]["sensor"].tolist() == ["s1", "s2", "s0", "s1", "s2"]


async def test_follow_reads_lines_appended_later(tmp_path: Path) -> None:
    path = tmp_path / "in.ndjson"
    path.write_bytes(reading(0) + b"\n" + reading(1)[:10])  # the second line is incomplete
    src = source(tmp_path, follow=True, poll_interval=0.02)
    assert src.finite is False
    rec = Recorder()
    task = asyncio.create_task(src.run(rec.out))
    try:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if rec.values() == [0.5]:
                break
        assert rec.values() == [0.5]
        assert rec.positions[-1]["offset"] == len(reading(0)) + 1  # not into the partial line
        with open(path, "ab") as f:
            f.write(reading(1)[10:] + b"\n" + reading(2) + b"\n")
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(rec.values()) == 3:
                break
        assert rec.values() == [0.5, 1.5, 2.5]
        assert rec.positions[-1]["line"] == 3
        assert rec.dead == []
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
