"""File replay: NDJSON or CSV readings, read in chunks, resumable at a byte offset.

The position committed with each batch is the byte offset just past its last line (and the line
number), so after a crash the file is read again from exactly there. Lines that are not valid
readings become dead letters with their line number; a line longer than ``max_line_bytes`` is
skipped without being held in memory. ``follow: true`` keeps reading as the file grows.
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import io
from typing import Any, Literal

from pydantic import Field

from edgewise.errors import ConfigError
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import (
    ComponentConfig,
    FilePath,
    RunContext,
    Source,
    SourceOutput,
)
from edgewise.pipeline.sources.parse import parse_json_lines, readings_from_dicts

READ_SIZE = 1 << 20


class FileConfig(ComponentConfig):
    path: FilePath
    """The file to read; relative to the pipeline file's folder. From the control plane: it
    must lie in the node's DATA/pipelines (relative paths are taken from there) or in a folder
    allowed with --allow-path (docs/security.md)."""
    format: Literal["auto", "ndjson", "csv"] = "auto"
    """ndjson or csv; auto: csv for a .csv file name, else ndjson."""
    batch: int = Field(default=8192, ge=1, le=1_000_000)
    """Lines per emitted batch, at most."""
    max_line_bytes: int = Field(default=1 << 20, ge=64)
    """A longer line is skipped (a dead letter) without being held in memory."""
    follow: bool = False
    """true: keep reading as the file grows (the source never ends); false: stop at its end."""
    poll_interval: float = Field(default=0.2, gt=0)
    """With follow: seconds between looks for new lines at the end of the file."""


class FileSource(Source):
    Config = FileConfig

    def __init__(self, id: str, config: FileConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.path = config.file_path("path", ctx.spec_dir)
        fmt = config.format
        if fmt == "auto":
            fmt = "csv" if self.path.suffix.lower() == ".csv" else "ndjson"
        self.format = fmt
        self.finite = not config.follow
        self.offset = 0
        self.line = 0
        self.header: list[str] | None = None
        self.skipped_long = 0

    def restore(self, position: Any) -> None:
        self.offset = int(position["offset"])
        self.line = int(position["line"])
        self.header = position.get("header")

    def stats(self) -> dict[str, Any]:
        return {"offset": self.offset, "lines": self.line, "too_long": self.skipped_long}

    def _position(self) -> dict[str, Any]:
        return {"offset": self.offset, "line": self.line, "header": self.header}

    async def run(self, out: SourceOutput) -> None:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below; held across awaits
        except FileNotFoundError:
            raise ConfigError(f"source {self.id!r}: file {self.path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"source {self.id!r}: cannot open {self.path}: {exc}") from None
        limit = self.config.max_line_bytes
        size = self.config.batch
        with f:
            f.seek(self.offset)
            pos = self.offset  # file offset just past the last complete line seen
            buf = b""
            # an over-long line being skipped: [line number, bytes so far, its first 4 KiB]
            skip: list[Any] | None = None
            pending: list[bytes] = []
            numbers: list[tuple[int, int]] = []  # runs of (index in pending, line number)
            while True:
                data = await asyncio.to_thread(f.read, READ_SIZE)
                if not data:
                    if not self.config.follow and skip is not None:
                        pos += self._end_skip(out, skip, 0)  # the file ends inside it
                        skip = None
                    if not self.config.follow and buf.strip():
                        # the last line has no newline: take it as it is
                        data, buf = buf + b"\n", b""
                    else:
                        # emit also when only skipped lines moved the position, so their dead
                        # letters are committed with a position that passes them
                        if pending or pos != self.offset:
                            await self._emit(out, pending, numbers, pos)
                            pending, numbers = [], []
                        if not self.config.follow:
                            return
                        await asyncio.sleep(self.config.poll_interval)
                        continue
                parts = (buf + data).split(b"\n")
                buf = parts.pop()
                if skip is not None and parts:
                    pos += self._end_skip(out, skip, len(parts[0]) + 1)
                    skip = None
                    parts = parts[1:]
                i = 0
                while i < len(parts):
                    chunk = parts[i : i + size - len(pending)]
                    i += len(chunk)
                    first = self.line + 1
                    self.line += len(chunk)
                    lens = list(map(len, chunk))
                    if min(lens) < 3 or max(lens) > limit:  # blank or over-long lines
                        for k, raw in enumerate(chunk):
                            if len(raw) > limit:
                                self._too_long(out, raw[:4096], len(raw), first + k)
                            elif raw.strip():
                                numbers.append((len(pending), first + k))
                                pending.append(raw)
                    else:
                        numbers.append((len(pending), first))
                        pending.extend(chunk)
                    pos += sum(lens) + len(chunk)
                    if len(pending) >= size:
                        await self._emit(out, pending, numbers, pos)
                        pending, numbers = [], []
                if skip is not None:
                    skip[1] += len(buf)
                    buf = b""
                elif len(buf) > limit:
                    # an over-long line still without its newline: keep none of it in memory;
                    # it is dead-lettered (with its size) when its end is found
                    skip = [self.line + 1, len(buf), buf[:4096]]
                    buf = b""

    def _end_skip(self, out: SourceOutput, skip: list[Any], rest: int) -> int:
        """The over-long line ``skip`` ends ``rest`` bytes (its newline included) into the data
        just read: dead-letter it with its full size and return how many bytes it took."""
        line, size, head = skip
        self.line = line
        self._too_long(out, head, size + max(rest - 1, 0), line)
        return size + rest

    def _too_long(self, out: SourceOutput, head: bytes, size: int, line: int) -> None:
        self.skipped_long += 1
        limit = self.config.max_line_bytes
        out.dead_letter(f"line {line}: {size} bytes, over max_line_bytes={limit}; skipped", head)

    async def _emit(
        self, out: SourceOutput, lines: list[bytes], numbers: list[tuple[int, int]], end: int
    ) -> None:
        if self.format == "csv":
            batch, bad = self._parse_csv(lines)
        else:
            batch, bad = parse_json_lines(lines)
        if bad:
            starts = [a for a, _ in numbers]
            for i, reason in bad:
                run = bisect.bisect_right(starts, i) - 1
                line_no = numbers[run][1] + i - numbers[run][0]
                out.dead_letter(f"line {line_no}: {reason}", lines[i])
        self.offset = end
        await out.emit(batch, self._position())

    def _parse_csv(self, lines: list[bytes]) -> tuple[Batch, list[tuple[int, str]]]:
        start = 0
        if not lines:
            return Batch.empty(), []
        if self.header is None:
            self.header = next(csv.reader([lines[0].decode("utf-8", "replace")]))
            start = 1
        text = "\n".join(x.decode("utf-8", "replace") for x in lines[start:])
        recs: list[Any] = []
        bad: list[tuple[int, str]] = []
        index: list[int] = []
        for j, row in enumerate(csv.reader(io.StringIO(text))):
            i = j + start
            if len(row) != len(self.header):
                bad.append((i, f"{len(row)} columns, header has {len(self.header)}"))
                continue
            rec: dict[str, Any] = {}
            for k, v in zip(self.header, row, strict=True):
                rec[k] = v.strip() if k == "sensor" else _csv_value(v)  # "007" stays text
            recs.append(rec)
            index.append(i)
        batch, rejected = readings_from_dicts(recs)
        bad.extend((index[j], reason) for j, reason in rejected)
        bad.sort()  # dead letters in line order
        return batch, bad


def _csv_value(v: str) -> Any:
    s = v.strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s
