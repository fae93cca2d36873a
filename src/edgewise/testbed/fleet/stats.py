"""What a fleet run measured: latency samples, counters, per-node results, and their merge.

A worker process fills one `Recorder`; `Recorder.to_wire` / `from_wire` carry it to the parent
(plain lists and dicts, picklable), `Recorder.merge` adds the workers up, `percentile` reads
the samples. Samples are kept whole (a float each, in `array('d')`): a run of thousands of nodes
for minutes makes at most a few hundred thousand of them.
"""

from __future__ import annotations

import math
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SAMPLES = ("enrol_s", "connect_s", "ack_ms", "fetch_s", "apply_s")


def percentile(values: array[float] | list[float], q: float) -> float | None:
    """The ``q`` percentile (0-100, nearest rank) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class NodeResult:
    """One virtual node at the end of a run: what it sent and what was acknowledged.

    Sequence numbers of its one stream start at 0 and run without holes: ``produced`` of them
    were made; every chunk up to ``sent_upto`` was sent at least once; ``unacked`` lists the
    chunks (first seq, count) sent but never acknowledged (they may or may not be stored)."""

    index: int
    node_id: str | None
    produced: int = 0
    sent_upto: int = 0
    acked: int = 0
    unacked: list[tuple[int, int]] = field(default_factory=list)
    connected: bool = False
    applied_version: int = 0
    problem: str | None = None
    release: str | None = None  # the release it runs at the end
    failed_releases: list[str] = field(default_factory=list)  # releases that failed on it

    def to_wire(self) -> dict[str, Any]:
        return {"index": self.index, "node_id": self.node_id, "produced": self.produced,
                "sent_upto": self.sent_upto, "acked": self.acked,
                "unacked": [list(u) for u in self.unacked], "connected": self.connected,
                "applied_version": self.applied_version, "problem": self.problem,
                "release": self.release, "failed_releases": self.failed_releases}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> NodeResult:
        return cls(d["index"], d["node_id"], d["produced"], d["sent_upto"], d["acked"],
                   [(a, b) for a, b in d["unacked"]], d["connected"], d["applied_version"],
                   d["problem"], d.get("release"), list(d.get("failed_releases") or []))


class Recorder:
    """Samples and counters of one process (or, after `merge`, of the whole fleet)."""

    def __init__(self) -> None:
        self.samples: dict[str, array[float]] = {k: array("d") for k in SAMPLES}
        self.counts: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()  # why sessions or enrolments failed
        self.nodes: list[NodeResult] = []
        self.first_enrol_at: float | None = None  # wall clock (time.time())
        self.last_enrol_at: float | None = None
        self.sim_rss_kb = 0  # resident memory the nodes added to their process(es), at the stop

    def sample(self, kind: str, value: float) -> None:
        self.samples[kind].append(value)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def failure(self, reason: str) -> None:
        self.failures[reason[:120]] += 1

    def enrolled(self, at: float) -> None:
        if self.first_enrol_at is None or at < self.first_enrol_at:
            self.first_enrol_at = at
        if self.last_enrol_at is None or at > self.last_enrol_at:
            self.last_enrol_at = at

    def to_wire(self) -> dict[str, Any]:
        return {"samples": {k: v.tolist() for k, v in self.samples.items()},
                "counts": dict(self.counts), "failures": dict(self.failures),
                "nodes": [n.to_wire() for n in self.nodes],
                "first_enrol_at": self.first_enrol_at, "last_enrol_at": self.last_enrol_at,
                "sim_rss_kb": self.sim_rss_kb}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Recorder:
        r = cls()
        for k, v in d["samples"].items():
            r.samples[k] = array("d", v)
        r.counts.update(d["counts"])
        r.failures.update(d["failures"])
        r.nodes = [NodeResult.from_wire(n) for n in d["nodes"]]
        r.first_enrol_at, r.last_enrol_at = d["first_enrol_at"], d["last_enrol_at"]
        r.sim_rss_kb = d["sim_rss_kb"]
        return r

    def merge(self, other: Recorder) -> None:
        for k, v in other.samples.items():
            self.samples[k].extend(v)
        self.counts.update(other.counts)
        self.failures.update(other.failures)
        self.nodes.extend(other.nodes)
        for at in (other.first_enrol_at, other.last_enrol_at):
            if at is not None:
                self.enrolled(at)
        self.sim_rss_kb += other.sim_rss_kb


def rss_kb(pid: int | str = "self") -> int:
    """Resident memory of a process in KiB (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process in seconds (Linux /proc; 0.0 elsewhere)."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc; ``[pid]`` elsewhere): `cloud serve
    --processes N` is a supervisor and its N serving processes."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def tree_cpu_seconds(pid: int) -> float:
    """`cpu_seconds` summed over `process_tree` (the processes alive now)."""
    return sum(cpu_seconds(p) for p in process_tree(pid))


def tree_rss_kb(pid: int) -> int:
    """`rss_kb` summed over `process_tree` (pages shared after a fork count once each)."""
    return sum(rss_kb(p) for p in process_tree(pid))


def named_cpu_seconds(comm: str) -> float:
    """`cpu_seconds` summed over the processes named ``comm`` (``postgres``: the local
    database server's backends, on this machine only)."""
    total = 0.0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != comm:
                    continue
        except OSError:
            continue
        total += cpu_seconds(pid)
    return total
