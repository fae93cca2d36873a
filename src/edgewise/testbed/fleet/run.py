"""Running a fleet: worker processes of virtual nodes, the end of a run, and the exact check.

`run_fleet` splits ``nodes`` over ``processes`` worker processes (``spawn``; one process runs
in this one), each running `run_worker`: its `node.VirtualNode` tasks, one aiohttp session, an
optional `LinkProxy` adding latency in front of the control plane. A run ends after
``duration`` seconds or at SIGTERM/SIGINT (forwarded to the workers): nodes stop making
telemetry, wait up to ``drain_s`` for their last acknowledgements, close, and report.

`verify` then checks every sequence number each node sent against what the control plane
stored, through the operator API: ``GET /v1/data/query`` page by page for each node (every
stored record's seq) and ``GET /v1/data/stats`` (records stored per node, which must agree).
A record acknowledged but not stored is lost; a seq stored twice, or stored without being sent,
is duplicated / unexpected. Chunks sent but never acknowledged (the run ended first) are
counted apart: the protocol allows either outcome for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import signal
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgewise.common.tls import READ_BUFFER, lean_read_buffer
from edgewise.errors import ConfigError, EdgewiseError
from edgewise.testbed.fleet.node import STREAM, VirtualNode
from edgewise.testbed.fleet.shared import NodeSettings, Shared
from edgewise.testbed.fleet.stats import NodeResult, Recorder, percentile, rss_kb
from edgewise.testbed.linkproxy import LinkProxy


@dataclass(frozen=True)
class FleetConfig:
    nodes: int
    settings: NodeSettings
    processes: int = 1
    duration: float = 60.0  # s from the start; SIGTERM/SIGINT ends a run sooner
    ramp: float = 0.0  # s over which node starts are spread (uniformly at random)
    latency: float = 0.0  # s added each way by a link proxy per process
    state_dir: Path | None = None  # node keys and certificates; a temporary folder if None
    events: Path | None = None  # JSON lines: enrolled / up / down / desired, per node
    # local addresses the sessions connect from, worker process i the (i mod K)-th; () the
    # system's choice. One address has ~28,000 source ports to one server port (Linux's
    # ip_local_port_range), so a larger fleet on one machine needs several (127.0.0.2, ...)
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Part:
    first: int
    count: int
    config: FleetConfig
    index: int = 0  # the worker process's number


def parse_link(text: str | None) -> tuple[float, float]:
    """``latency=50ms,loss=0.01`` → (latency s, loss probability). Units: ms or s."""
    latency = loss = 0.0
    if not text:
        return latency, loss
    for item in text.split(","):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        try:
            if key == "latency":
                latency = (float(value[:-2]) / 1000.0 if value.endswith("ms")
                           else float(value.removesuffix("s")))
            elif key == "loss":
                loss = float(value.removesuffix("%")) / (100.0 if value.endswith("%") else 1.0)
            else:
                raise ConfigError(f"--link: unknown setting {key!r} (latency=, loss=)")
        except ValueError:
            raise ConfigError(f"--link: {item!r} is not a number") from None
    if not (0.0 <= latency <= 10.0 and 0.0 <= loss < 1.0):
        raise ConfigError("--link: latency 0-10 s, loss 0 to below 1")
    return latency, loss


SSL_READ_BUFFER = READ_BUFFER  # bytes: one TLS record at most


def lean_tls_buffers() -> None:
    """16 KiB TLS reads in simulator processes (`edgewise.common.tls`): the virtual nodes are
    this process's only TLS connections."""
    lean_read_buffer(SSL_READ_BUFFER)


async def _worker(part: _Part) -> Recorder:
    cfg = part.config
    lean_tls_buffers()
    rec = Recorder()
    base_kb = rss_kb()
    settings = cfg.settings
    state = cfg.state_dir or Path(tempfile.mkdtemp(prefix="edgewise-fleet-"))
    async with contextlib.AsyncExitStack() as stack:
        if cfg.latency > 0:
            url = urlsplit(settings.cloud)
            proxy = await stack.enter_async_context(
                LinkProxy(url.hostname or "127.0.0.1", url.port or 443, delay=cfg.latency))
            settings = replace(settings, cloud=f"https://{url.hostname}:{proxy.port}")
        source = cfg.sources[part.index % len(cfg.sources)] if cfg.sources else None
        shared = Shared(settings, state, rec, cfg.events, source=source)
        stack.push_async_callback(shared.close)
        loop = asyncio.get_running_loop()
        nodes: list[VirtualNode] = []

        def stop() -> None:
            # counted before the stop is set: a node that sees it ends its session at once
            # (counted after the waiter below wakes, those are missing: CI saw 99 of 100)
            if not shared.stop.is_set():
                rec.count("connected_at_stop", sum(1 for n in nodes if n.connected))
                shared.stop.set()
                for n in nodes:  # those waiting in a session look at the stop signal now
                    n.wake()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        if cfg.events is not None:
            acks = loop.create_task(shared.ack_events())
            stack.callback(acks.cancel)
        nodes.extend(VirtualNode(i, shared) for i in range(part.first, part.first + part.count))
        tasks = [loop.create_task(n.run(random.random() * cfg.ramp)) for n in nodes]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shared.stop.wait(), cfg.duration)
        stop()
        shared.drain_deadline = loop.time() + settings.drain_s
        rec.sim_rss_kb = max(0, rss_kb() - base_kb)  # what the nodes added
        _, late = await asyncio.wait(tasks, timeout=settings.drain_s + 30.0)
        for t in late:  # a connect or welcome wait still running: bounded, but do not wait
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        rec.count("nodes_cut_short", len(late))
        rec.nodes = [n.result() for n in nodes]
    return rec


def run_worker(part: _Part, conn: Any = None) -> dict[str, Any]:
    """A worker process's body (also run in-process for one process): its nodes to the end;
    the recorder in wire form (sent through ``conn`` when given)."""
    if conn is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards it as SIGTERM
    wire = asyncio.run(_worker(part)).to_wire()
    if conn is not None:
        conn.send(wire)
        conn.close()
    return wire


def run_fleet(cfg: FleetConfig) -> Recorder:
    """Run the fleet to its end; the merged recorder (samples, counters, node results)."""
    if cfg.nodes < 1 or cfg.processes < 1:
        raise ConfigError("--nodes and --processes must be at least 1")
    procs = min(cfg.processes, cfg.nodes)
    share, extra = divmod(cfg.nodes, procs)
    parts, first = [], 0
    for i in range(procs):
        n = share + (1 if i < extra else 0)
        parts.append(_Part(first, n, cfg, i))
        first += n
    if procs == 1:
        return Recorder.from_wire(run_worker(parts[0]))
    ctx = multiprocessing.get_context("spawn")
    children = []
    for part in parts:
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=run_worker, args=(part, send), daemon=True)
        p.start()
        send.close()
        children.append((p, recv))

    def forward(signum: int, _frame: Any) -> None:
        for p, _ in children:
            if p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    total = Recorder()
    try:
        for p, recv in children:
            try:
                total.merge(Recorder.from_wire(recv.recv()))
            except EOFError:
                raise EdgewiseError(f"fleet worker {p.pid} ended without its results "
                                    f"(exit code {p.exitcode})") from None
            p.join()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p, _ in children:
            if p.is_alive():
                p.kill()
    return total


# -- the exact check ---------------------------------------------------------------------------


@dataclass
class Verdict:
    checked_nodes: int = 0
    records_acked: int = 0
    records_lost: int = 0  # acknowledged, not stored
    records_duplicated: int = 0  # a seq stored more than once
    records_unexpected: int = 0  # stored, never sent
    unacked_sent: int = 0  # sent, never acknowledged (the run ended): may be stored or not
    unacked_stored: int = 0
    stats_mismatch: int = 0  # nodes whose data stats count differs from the records read


def _ranges(pairs: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for first, count in pairs:
        out.update(range(first, first + count))
    return out


def check_node(result: NodeResult, stored: list[int], stats_count: int | None,
               verdict: Verdict) -> None:
    """Compare one node's sent sequence numbers with the seqs the control plane stored."""
    unacked = _ranges(result.unacked)
    sent = set(range(result.sent_upto))
    acked = sent - unacked
    have = set(stored)
    verdict.checked_nodes += 1
    verdict.records_acked += len(acked)
    verdict.records_lost += len(acked - have)
    verdict.records_duplicated += len(stored) - len(have)
    verdict.records_unexpected += len(have - sent)
    verdict.unacked_sent += len(unacked)
    verdict.unacked_stored += len(unacked & have)
    if stats_count is not None and stats_count != len(stored):
        verdict.stats_mismatch += 1


def stored_seqs(client: Any, node_id: str, stream: str = STREAM) -> list[int]:
    """Every stored record's seq of one node's stream, read page by page (duplicates kept)."""
    seqs: list[int] = []
    from_seq = 0
    while True:
        page = client.data_query(node_id, stream, from_seq=from_seq, limit=10_000)
        seqs.extend(r.seq for r in page.records)
        if page.next_seq is None:
            return seqs
        from_seq = page.next_seq


def verify(client: Any, results: list[NodeResult], threads: int = 4) -> Verdict:
    """The exact check of every node that enrolled (see the module docstring)."""
    stats = {s.node: s.records_stored for s in client.data_stats().streams
             if s.stream == STREAM}
    verdict = Verdict()
    todo = [r for r in results if r.node_id is not None]

    def one(r: NodeResult) -> tuple[NodeResult, list[int]]:
        assert r.node_id is not None
        if r.node_id not in stats:  # nothing stored: no stream row, and no query to make
            return r, []
        return r, stored_seqs(client, r.node_id)

    with ThreadPoolExecutor(threads) as pool:
        for r, seqs in pool.map(one, todo):
            check_node(r, seqs, stats.get(r.node_id, 0), verdict)
    return verdict


# -- the summary -------------------------------------------------------------------------------


def releases(rec: Recorder) -> dict[str, Any]:
    """What the nodes did with releases: steps taken, update time, what runs at the end."""
    running: Counter[str] = Counter(n.release or "none" for n in rec.nodes)
    failed: Counter[str] = Counter(v for n in rec.nodes for v in n.failed_releases)
    apply = rec.samples["apply_s"]
    return {"steps": {k.removeprefix("release_"): v for k, v in sorted(rec.counts.items())
                      if k.startswith("release_")},
            "apply_p50_s": None if not apply else round(percentile(apply, 50) or 0, 2),
            "apply_p99_s": None if not apply else round(percentile(apply, 99) or 0, 2),
            "running": dict(running), "failed": dict(failed)}



def summary(rec: Recorder, cfg: FleetConfig, started: float, verdict: Verdict | None,
            verify_note: str) -> dict[str, Any]:
    """The run in one JSON-able dict (the CLI prints it, `--json` as one line)."""
    def p(kind: str, q: float, scale: float = 1.0) -> float | None:
        v = percentile(rec.samples[kind], q)
        return None if v is None else round(v * scale, 3)

    enrolled = sum(1 for n in rec.nodes if n.node_id is not None)
    span = (rec.last_enrol_at - started) if rec.last_enrol_at is not None else None
    out: dict[str, Any] = {
        "nodes": cfg.nodes, "processes": min(cfg.processes, cfg.nodes), "enrolled": enrolled,
        "connected_at_stop": rec.counts["connected_at_stop"],
        "enrol_rate_per_s": round(enrolled / span, 2) if span and span > 0 else None,
        "enrol_p50_s": p("enrol_s", 50), "enrol_p99_s": p("enrol_s", 99),
        "connect_p50_s": p("connect_s", 50), "connect_p99_s": p("connect_s", 99),
        "ack_p50_ms": p("ack_ms", 50), "ack_p99_ms": p("ack_ms", 99),
        "fetch_p50_s": p("fetch_s", 50), "fetch_p99_s": p("fetch_s", 99),
        "fetches": rec.counts["fetches"], "inline_states": rec.counts["inline_states"],
        "reconnects": rec.counts["reconnects"],
        # sessions opened per local address (what each session's socket was bound to)
        "sessions_from": {k.removeprefix("from "): v for k, v in sorted(rec.counts.items())
                          if k.startswith("from ")},
        "enrol_retries": rec.counts["enrol_retries"],
        "batches_sent": rec.counts["batches_sent"],
        "records_produced": sum(n.produced for n in rec.nodes),
        "records_acked_by_nodes": sum(n.acked for n in rec.nodes),
        "sim_kb_per_node": round(rec.sim_rss_kb / max(cfg.nodes, 1), 1),
        "verify": verify_note,
        "releases": releases(rec),
        "failures": dict(rec.failures.most_common(8)),
        "problems": sorted({n.problem for n in rec.nodes if n.problem})[:5],
    }
    if verdict is not None:
        out.update({"records_acked": verdict.records_acked,
                    "records_lost": verdict.records_lost,
                    "records_duplicated": verdict.records_duplicated,
                    "records_unexpected": verdict.records_unexpected,
                    "records_unacked": verdict.unacked_sent,
                    "records_unacked_stored": verdict.unacked_stored,
                    "stats_mismatch_nodes": verdict.stats_mismatch})
    return out
