"""The pipeline engine: runs sources, operators and sinks of one pipeline on one asyncio loop.

Data path: each source task hands batches to a bounded queue (backpressure: a source waits when
the engine is behind). The engine takes one batch at a time, pushes it synchronously through the
operators in dependency order, hands results to local sinks at once (alarms go out before the
batch is even committed) and to the `Committer`, which group-commits outbox records, dead letters,
operator state and source positions in one transaction in a writer thread. A dead letter travels
with the next batch its source emits, so it is committed together with the position that passes
the bad input: after a crash the input is either replayed and reported again, or neither.

Lifecycle: `Engine.run()` opens everything, restores the last checkpoint, runs until every
finite source is exhausted, `stop()` is called or the duration is over, then commits what is left
and closes every sink; no task outlives it. When finite sources end, operators are flushed (open
windows emitted); when stopped early they are not: their state is in the checkpoint and a restart
continues them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgewise.edge.outbox import PRIORITIES, CommitReport, Outbox
from edgewise.errors import EdgewiseError
from edgewise.pipeline import checkpoint as ckpt
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.commit import Committer
from edgewise.pipeline.component import (
    DeadLetter,
    Emit,
    Operator,
    RunContext,
    Sink,
    Source,
    SourceOutput,
)
from edgewise.pipeline.spec import PipelineSpec, topological_stages

log = logging.getLogger(__name__)

_DONE = object()
CHECKPOINT_KEY = "engine"
DEAD_LETTER_HOLD_S = 1.0  # a source silent this long after a dead letter has it committed alone


@dataclass
class Counters:
    readings_in: dict[str, int] = field(default_factory=dict)
    batches_in: int = 0
    out: dict[str, int] = field(default_factory=dict)  # per stage id: records emitted on 'out'
    late: int = 0
    alarms: int = 0
    dead_lettered: int = 0
    streams: dict[str, int] = field(default_factory=dict)  # records sent to each outbox stream


class Engine:
    """Runs one pipeline. Use ``summary = await Engine(spec, data_dir).run()``."""

    def __init__(
        self,
        spec: PipelineSpec,
        data_dir: str | Path,
        *,
        duration: float | None = None,
        flush_on_stop: bool = False,
        max_pending_records: int | None = None,
    ) -> None:
        self.spec = spec
        self.data_dir = Path(data_dir)
        self.duration = duration
        self.flush_on_stop = flush_on_stop
        self.max_pending_records = max_pending_records
        self.ctx = RunContext(spec.name, self.data_dir, spec.path.parent)
        self.counters = Counters()
        self.sources: dict[str, Source] = {
            c.id: c.cls(c.id, c.config, self.ctx) for c in spec.sources
        }
        self.stages: dict[str, Operator] = {
            c.id: c.cls(c.id, c.config, self.ctx) for c in topological_stages(spec)
        }
        self._stage_digest = {c.id: ckpt.config_digest(c.config) for c in spec.stages}
        self._source_digest = {
            c.id: ckpt.config_digest(c.config) + c.entry.type for c in spec.sources
        }
        self.sinks: dict[str, Sink] = {c.id: c.cls(c.id, c.config, self.ctx) for c in spec.sinks}
        self._routes: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for kind, comps in (("stage", spec.stages), ("sink", spec.sinks)):
            for c in comps:
                for ref in c.entry.inputs:
                    node, _, port = ref.partition(".")
                    self._routes.setdefault((node, port or "out"), []).append((kind, c.id))
        # alarms first: a stage that raises alarms (and what it feeds) runs before its siblings,
        # so the local action does not wait for e.g. window bookkeeping of the same batch
        for targets in self._routes.values():
            targets.sort(key=lambda t: not self._alarm_path(t))
        self.outbox = Outbox(
            self.data_dir / "outbox.db", spec.body.outbox.max_bytes, spec.body.outbox.sync
        )
        self._streams: dict[str, str] = {}  # outbox sink id -> stream
        self._queue: asyncio.Queue[tuple[str, Any, Any, list[DeadLetter]]] | None = None
        self._held: dict[str, list[DeadLetter]] = {}  # per source: waiting for its next emit
        self._held_since: dict[str, float] = {}
        self._positional: set[str] = set()  # sources that give positions (so replay after a crash)
        self._stop = asyncio.Event()
        self._committer: Committer | None = None
        self._started = 0.0
        self._last_input = time.monotonic()
        self.error: BaseException | None = None
        self.finished_sources: set[str] = set()
        self.running = False
        self.started = asyncio.Event()  # set once sinks are open and sources run

    def _alarm_path(self, target: tuple[str, str]) -> bool:
        kind, tid = target
        if kind == "stage":
            return bool(getattr(self.stages[tid], "raises_alarms", False))
        return False

    # -- control ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the run to end: pending output is committed, then `run()` returns."""
        self._stop.set()
        if self._queue is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(("", _DONE, None, []))

    # -- main ---------------------------------------------------------------------------------
    async def run(
        self, on_status: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        self._queue = asyncio.Queue(maxsize=self.spec.body.batching.queue_batches)
        self._started = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.outbox:
            for c in self.spec.sinks:
                stream = getattr(c.config, "stream", None)
                if c.entry.type == "outbox":
                    stream = stream or c.id
                    prio = c.config.priority
                    prio = PRIORITIES[prio] if isinstance(prio, str) else prio
                    self.outbox.register_stream(stream, prio, c.config.compact)
                    self._streams[c.id] = stream
            self._committer = Committer(
                self.outbox,
                self._snapshot,
                self._on_durable,
                max_pending_records=self.max_pending_records
                or 8 * self.spec.body.batching.max_records,
                min_interval=self.spec.body.outbox.commit_interval,
            )
            self._restore()
            try:
                async with contextlib.AsyncExitStack() as stack:
                    for sink in self.sinks.values():
                        await stack.enter_async_context(sink)
                    self.running = True
                    self.started.set()
                    try:
                        await self._run_tasks(on_status)
                    except BaseExceptionGroup as group:
                        # surface the one real error rather than a group of one
                        if len(group.exceptions) == 1:
                            raise group.exceptions[0] from None
                        raise
                    finally:
                        self.running = False
                        self._release_held(stopping=True)
                        await self._committer.drain()
            finally:
                self._committer.close()
        if self.error is not None:
            raise self.error
        return self.summary()

    async def _run_tasks(self, on_status: Callable[[dict[str, Any]], None] | None) -> None:
        assert self._queue is not None
        async with asyncio.TaskGroup() as tg:
            source_tasks = [tg.create_task(self._run_source(s)) for s in self.sources.values()]
            helpers = [tg.create_task(self._ticker(on_status))]
            if self.duration is not None:
                helpers.append(tg.create_task(self._deadline(self.duration)))
            try:
                await self._consume()
                # commit while the sources still run, so the acknowledgements of this last commit
                # reach them (an MQTT source can only PUBACK on the connection it received on)
                assert self._committer is not None
                await self._committer.drain()
            finally:
                for t in source_tasks + helpers:
                    t.cancel()

    async def _deadline(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.stop()

    async def _run_source(self, source: Source) -> None:
        assert self._queue is not None
        queue = self._queue

        async def emit(batch: Batch, position: Any) -> None:
            if position is not None:
                self._positional.add(source.id)
            await queue.put((source.id, batch, position, self._take_held(source.id)))

        def dead(letter: DeadLetter) -> None:
            self._held.setdefault(source.id, []).append(letter)
            self._held_since.setdefault(source.id, time.monotonic())

        out = SourceOutput(emit, dead, source.id)
        try:
            await source.run(out)
        except asyncio.CancelledError:
            raise
        except EdgewiseError as exc:
            log.error("source %s failed: %s", source.id, exc)
            self.error = exc
            self.stop()
            return
        except Exception as exc:
            log.exception("source %s crashed", source.id)
            self.error = EdgewiseError(f"source {source.id!r} crashed: {exc!r}")
            self.stop()
            return
        await queue.put((source.id, _DONE, None, self._take_held(source.id)))

    def _take_held(self, source_id: str) -> list[DeadLetter]:
        self._held_since.pop(source_id, None)
        return self._held.pop(source_id, [])

    def _dead_letters(self, letters: list[DeadLetter]) -> None:
        assert self._committer is not None
        self.counters.dead_lettered += len(letters)
        for letter in letters:
            self._committer.dead(letter)

    def _release_held(self, stopping: bool = False) -> None:
        """Commit dead letters no emit has picked up: after DEAD_LETTER_HOLD_S (at least once
        then), or at the end of the run unless their source replays from its position anyway."""
        now = time.monotonic()
        for sid, since in list(self._held_since.items()):
            if stopping and sid in self._positional:
                self._take_held(sid)  # not passed by a committed position: reported again
            elif stopping or now - since >= DEAD_LETTER_HOLD_S:
                self._dead_letters(self._take_held(sid))

    async def _consume(self) -> None:
        assert self._queue is not None and self._committer is not None
        queue, committer = self._queue, self._committer
        finite = {sid for sid, s in self.sources.items() if s.finite}
        live = set(self.sources)
        while live and not self._stop.is_set():
            source_id, batch, position, letters = await queue.get()
            if letters:  # committed with this batch's position, never before it
                self._dead_letters(letters)
            if batch is _DONE:
                if source_id in live:
                    live.discard(source_id)
                    self.finished_sources.add(source_id)
                continue
            self._last_input = time.monotonic()
            self.counters.batches_in += 1
            self.counters.readings_in[source_id] = (
                self.counters.readings_in.get(source_id, 0) + batch.n
            )
            self._route(source_id, "out", batch)
            committer.position(source_id, position)
            committer.mark_dirty()
            committer.kick()
            if committer.overloaded:
                await committer.wait()
        ended_naturally = not live and finite and self.finished_sources >= finite
        if ended_naturally or self.flush_on_stop:
            for sid, op in self.stages.items():
                self._emit(sid, op.flush())
            committer.mark_dirty()

    async def _ticker(self, on_status: Callable[[dict[str, Any]], None] | None) -> None:
        tick = self.spec.body.tick
        last_status = 0.0
        while True:
            await asyncio.sleep(tick)
            idle = time.monotonic() - self._last_input
            for sid, op in self.stages.items():
                self._emit(sid, op.on_timer(idle))
            self._release_held()
            if self._committer is not None:
                self._committer.kick()
            now = time.monotonic()
            if on_status is not None and now - last_status >= 0.5:
                last_status = now
                on_status(self.summary())

    # -- routing ------------------------------------------------------------------------------
    def _route(self, node: str, port: str, batch: Batch) -> None:
        if batch.n == 0:
            return
        for kind, target in self._routes.get((node, port), ()):
            if kind == "stage":
                self._emit(target, self.stages[target].process(batch))
            elif target in self._streams:
                assert self._committer is not None
                stream = self._streams[target]
                self._committer.add(stream, batch)
                self.sinks[target].written += batch.n
                self.counters.streams[stream] = self.counters.streams.get(stream, 0) + batch.n
            else:
                sink = self.sinks[target]
                try:
                    sink.write(batch)
                except Exception as exc:  # a failing local action must not stop the pipeline
                    sink.errors += 1
                    log.warning("sink %s failed: %s", target, exc)

    def _emit(self, stage_id: str, result: Emit) -> None:
        if result is None:
            return
        if isinstance(result, Batch):
            result = {"out": result}
        op = self.stages[stage_id]
        for port, batch in result.items():
            if batch is None or batch.n == 0:
                continue
            if port == "late":
                self.counters.late += batch.n
            elif port == "out":
                self.counters.out[stage_id] = self.counters.out.get(stage_id, 0) + batch.n
                if getattr(op, "raises_alarms", False):
                    self.counters.alarms += batch.n
            self._route(stage_id, port, batch)

    # -- checkpoint ---------------------------------------------------------------------------
    def _snapshot(self, positions: dict[str, Any]) -> dict[str, bytes]:
        state = {
            "operators": {
                sid: {"digest": self._stage_digest[sid], "state": op.snapshot()}
                for sid, op in self.stages.items()
            },
            "positions": {
                sid: {"digest": self._source_digest.get(sid), "position": pos}
                for sid, pos in positions.items()
            },
        }
        return {CHECKPOINT_KEY: ckpt.pack(state)}

    def _restore(self) -> None:
        saved = self.outbox.load_checkpoint().get(CHECKPOINT_KEY)
        if saved is None:
            return
        state = ckpt.unpack(saved)
        for sid, entry in state.get("operators", {}).items():
            op = self.stages.get(sid)
            if op is None:
                continue
            if entry.get("digest") != self._stage_digest[sid]:
                log.warning("stage %s changed since the last run; starting it fresh", sid)
                continue
            op.restore(entry.get("state"))
        assert self._committer is not None
        for sid, entry in state.get("positions", {}).items():
            src = self.sources.get(sid)
            if src is None or not isinstance(entry, dict) or entry.get("position") is None:
                continue
            if entry.get("digest") != self._source_digest[sid]:
                log.warning("source %s changed since the last run; starting it afresh", sid)
                continue
            pos = entry["position"]
            src.restore(pos)
            self._positional.add(sid)
            self._committer.position(sid, pos)

    def _on_durable(self, positions: dict[str, Any], report: CommitReport) -> None:
        for sid, pos in positions.items():
            src = self.sources.get(sid)
            if src is not None:
                try:
                    src.ack(pos)
                except Exception as exc:
                    log.warning("source %s ack failed: %s", sid, exc)

    # -- reporting ----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        streams = {}
        for name, st in self.outbox.stats().items():
            streams[name] = {
                "priority": st.priority,
                "records": self.counters.streams.get(name, 0),
                "records_total": st.produced,
                "pending": st.pending_records,
                "acked": st.acked,
                "dropped": st.dropped,
                "compacted": st.compacted,
                "bytes_pending": st.pending_bytes,
            }
        sinks = {}
        for sid, sink in self.sinks.items():
            if sid in self._streams:
                continue
            sinks[sid] = sink.stats()
        sources = {}
        for sid, src in self.sources.items():
            info = {"readings": self.counters.readings_in.get(sid, 0)}
            info.update(src.stats())
            sources[sid] = info
        return {
            "pipeline": self.spec.name,
            "elapsed_s": round(time.monotonic() - self._started, 3) if self._started else 0.0,
            "readings_in": sum(self.counters.readings_in.values()),
            "sources": sources,
            "stages": {sid: {"out": self.counters.out.get(sid, 0)} for sid in self.stages},
            "streams": streams,
            "sinks": sinks,
            "alarms": self.counters.alarms,
            "late": self.counters.late,
            "dead_lettered": self.counters.dead_lettered,
            "outbox": {
                "path": str(self.outbox.path),
                "depth_records": sum(s.pending_records for s in self.outbox.stats().values()),
                "bytes": self.outbox.used_bytes,
                "max_bytes": self.outbox.max_bytes,
                "dead_letters_stored": self.outbox.dead_letter_count,
            },
            "commits": self._committer.commits if self._committer else 0,
        }
