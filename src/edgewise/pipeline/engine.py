"""The pipeline engine: runs sources, operators and sinks of one pipeline on one asyncio loop.

Data path: each source task hands batches to a bounded queue (backpressure: a source waits when
the engine is behind). The engine takes one batch at a time, pushes it synchronously through the
operators in dependency order, hands results to local sinks at once (alarms go out before the
batch is even committed) and to the `Committer`, which group-commits outbox records, dead letters,
operator state and source positions in one transaction in a writer thread. A dead letter travels
with the next batch its source emits, so it is committed together with the position that passes
the bad input: after a crash the input is either replayed and reported again, or neither.

A stage that raises while a batch is routed fails the batch atomically: operators may hold part
of it, so the committer is told to `abandon` (nothing not yet cut is committed: no records, no
operator state, no position past the batch) and the run ends with the error, like a crash; the
restart resumes from the last commit and replays the batch. Records already handed to local
sinks are handed to them again then (local actions are at least once, stored records exactly
once). User plugins can avoid failing at all: see `operators.plugin` (stateless classes, time
budget) and docs/plugins.md.

The outbox (`edgewise.outbox`) is lent to the engine by whoever runs pipelines: the agent keeps
one open for its lifetime and hands it to each engine it starts, and its uplink reads and
acknowledges through the same object; `edgewise run` does the same for one run. An engine given
no outbox opens its own in ``data_dir`` for the run. An engine never closes a lent outbox.

Lifecycle: `Engine.run()` opens everything, restores the last checkpoint, runs until every
finite source is exhausted, `stop()` is called or the duration is over, then commits what is left
and closes every sink; no task outlives it. `Engine.started` is set once sinks are open and
sources run. When finite sources end, operators are flushed (open
windows emitted); when stopped early they are not: their state is in the checkpoint and a restart
continues them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgewise.errors import EdgewiseError
from edgewise.outbox import PRIORITIES, CommitReport, Outbox, outbox_file
from edgewise.pipeline import engine_state as state
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
from edgewise.pipeline.summary import EngineSummary, SinkStats, SourceStats, StreamSummary

log = logging.getLogger(__name__)

_DONE = object()
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


RouteObserver = Callable[[str, str, Batch], Callable[[], None] | None]
"""``observer(node, port, batch)``, given as ``Engine(..., observer=...)``: called for every
non-empty batch the engine routes, before any target has it. ``node`` is a source id (its
input; ``port`` is ``"out"``) or a stage id (its output on ``port``). It may return a callable,
which is then called once the batch and everything it caused synchronously (the stages
downstream, the sinks) has been handled; return None otherwise. It runs on the engine's loop,
inside the hot path: keep it short. An exception from either ends the run like one from a
stage."""


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
        outbox: Outbox | None = None,
        observer: RouteObserver | None = None,
        sources: Mapping[str, Source] | None = None,
    ) -> None:
        self.spec = spec
        self.data_dir = Path(data_dir)
        self.duration = duration
        self.flush_on_stop = flush_on_stop
        self.max_pending_records = max_pending_records
        self.ctx = RunContext(spec.name, self.data_dir, spec.path.parent,
                              dead_letter=self._stage_dead_letter)
        self.counters = Counters()
        self.sources: dict[str, Source] = self._build_sources(sources or {})
        self.stages: dict[str, Operator] = {
            c.id: c.cls(c.id, c.config, self.ctx) for c in topological_stages(spec)
        }
        self._stage_digest, self._source_digest = state.digests(spec)
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
        # the outbox is lent by whoever runs pipelines (the agent for its lifetime, `edgewise
        # run`); without one the engine opens its own in data_dir for the run (tests, tools)
        self._owns_outbox = outbox is None
        self.outbox = outbox if outbox is not None else Outbox(
            outbox_file(self.data_dir), spec.body.outbox.max_bytes, spec.body.outbox.sync
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
        self._observer = observer
        if observer is not None:  # see "hooks" below; without one, routing is untouched
            self._route = self._route_observed  # type: ignore[method-assign]

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
        with self.outbox if self._owns_outbox else contextlib.nullcontext(self.outbox):
            if not self._owns_outbox:
                self.outbox.configure(self.spec.body.outbox.max_bytes, self.spec.body.outbox.sync)
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
                note=functools.partial(state.positions_note, self._source_digest),
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

    def _stage_dead_letter(self, letter: DeadLetter) -> None:
        """A stage could not process a record of the batch it is given: committed with that
        batch's position (no commit is cut while a batch is routed)."""
        self._dead_letters([letter])

    async def _consume(self) -> None:
        try:
            await self._consume_batches()
        except asyncio.CancelledError:  # only ever at an await: between batches
            raise
        except BaseException:  # a plugin's SystemExit too
            self._fail()
            raise

    def _fail(self) -> None:
        """Routing (a stage, the observer) or committing raised: the operators may hold part
        of a batch, so nothing more is committed; the restart resumes from the last commit."""
        assert self._committer is not None
        if not self._committer.abandoned:
            log.error("pipeline %s failed; what is not yet committed is dropped and replayed "
                      "from the last commit on restart", self.spec.name)
            self._committer.abandon()

    async def _consume_batches(self) -> None:
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
            try:
                for sid, op in self.stages.items():
                    self._emit(sid, op.on_timer(idle))
            except BaseException:
                self._fail()
                raise
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
        return state.snapshot(self.stages, self._stage_digest, self._source_digest, positions)

    def _restore(self) -> None:
        assert self._committer is not None
        given = state.resume(self.outbox, self.stages, self.sources, self._stage_digest,
                             self._source_digest)
        for sid, pos in given.items():
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
    def summary(self) -> EngineSummary:
        streams: dict[str, StreamSummary] = {}
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
        sinks: dict[str, SinkStats] = {}
        for sid, sink in self.sinks.items():
            if sid in self._streams:
                continue
            sinks[sid] = sink.stats()
        sources: dict[str, SourceStats] = {}
        for sid, src in self.sources.items():
            info: SourceStats = {"readings": self.counters.readings_in.get(sid, 0)}
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

    # -- hooks: supported ways for a tool (the planner) to watch and drive a run ----------------
    # ``Engine(..., observer=...)`` sees every batch routed (`RouteObserver`); ``sources={id:
    # Source}`` runs the given sources instead of building those from the spec; `commits` counts
    # group commits. Without an observer nothing here runs per batch: only then does `__init__`
    # put `_route_observed` in place of `_route` for this engine.

    def _build_sources(self, given: Mapping[str, Source]) -> dict[str, Source]:
        """The spec's sources, in spec order, each built from its config, except those
        ``given`` by id, which run as they are (a stand-in, e.g. synthetic data). Positions are
        checkpointed under the spec's id and config, as for any source."""
        spec_ids = {c.id for c in self.spec.sources}
        unknown = sorted(set(given) - spec_ids)
        if unknown:
            raise ValueError(f"pipeline {self.spec.name!r} has no source {', '.join(unknown)}")
        misnamed = sorted(sid for sid, src in given.items() if src.id != sid)
        if misnamed:
            raise ValueError(f"a substituted source must have the id it replaces: {misnamed}")
        return {
            c.id: given[c.id] if c.id in given else c.cls(c.id, c.config, self.ctx)
            for c in self.spec.sources
        }

    def _route_observed(self, node: str, port: str, batch: Batch) -> None:
        """`_route` with the observer called before it (and what that returns, after it)."""
        if batch.n == 0:
            return
        assert self._observer is not None
        after = self._observer(node, port, batch)
        Engine._route(self, node, port, batch)  # its own routing calls come back here
        if after is not None:
            after()

    @property
    def commits(self) -> int:
        """Group commits made so far in the run (the last one once it ended; 0 before it)."""
        return self._committer.commits if self._committer is not None else 0
