"""Constraint checks computed from the plan: privacy, alarm latency, link capacity, CPU,
memory and disk, each with the number that decides it.

* **Privacy and compliance** (`leaving`, `privacy_checks`): what crosses the uplink, stream by
  stream, derived from which sources and through which stages; a stream that carries every
  record of a source with a compliance tag (``personal``, ``phi``, ...; ``personal_data: true``
  counts as ``personal``) fails the check, aggregates of it are named but pass.
* **Alarm latency** (`alarm_latency`): from the event to the local action, the sum of the sample
  period (an event waits up to one period for the next reading), the debounce (``debounce - 1``
  further readings), the wait for an upstream window or FFT block to close, and the p99 of the
  path (site LAN, the source's batching, engine processing; through the cloud: commit, link RTT
  and ingest). A debounced 10 Hz alarm cannot meet 100 ms whatever runs where.
* **Link capacity** (`capacity_checks`): the edge design's streams against the share of the
  uplink data may use, every stream's share named; the naive baseline is compared with the link
  too and said when the link could not carry it (a note, not a check: it is not the design).
* **Resources** (`resource_checks`): CPU per node against the chosen node's cores and against
  one core for the engine's single event loop; memory; disk for the outbox through the longest
  outage.

All pure functions of the plan's figures; `edgewise.plan.model` adds them to the plan's
requirement checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgewise.pipeline.units import parse_duration
from edgewise.plan.results import Check, SitePlan, Stream, is_alarm
from edgewise.plan.site_figures import DATA_SHARE
from edgewise.plan.workload import SourceSpec, StageSpec, Workload

# operators whose output is one record per input record that passes (no aggregation)
PER_RECORD = {"filter", "map", "threshold", "deadband", "downsample", "rate_of_change",
              "anomaly", None}


def source_tags(src: SourceSpec) -> frozenset[str]:
    """A source's compliance tags (``personal_data: true`` is ``personal``)."""
    tags = getattr(src, "tags", None)
    if tags is not None:
        return frozenset(tags)
    return frozenset({"personal"} if src.personal_data else set())


@dataclass(frozen=True)
class Leaving:
    """One stream that leaves the site: what it is made of."""

    stream: str
    sources: tuple[str, ...]  # the sources it derives from
    tags: frozenset[str]  # compliance tags of those sources
    path: tuple[str, ...]  # stages between the sources and the stream (nearest last)
    per_record: bool  # carries every (passing) record, not aggregates
    bytes_per_s: float
    records_per_s: float


def _lineage(origin: str, stages: dict[str, StageSpec],
             sources: dict[str, SourceSpec]) -> tuple[set[str], list[str], bool]:
    """Sources behind ``origin``, the stages on the way, and whether every path is
    per-record (no window or FFT between a source and the stream)."""
    if origin in sources:
        return {origin}, [], True
    st = stages[origin]
    srcs: set[str] = set()
    path: list[str] = []
    per_record = (st.operator in PER_RECORD and st.function is None) or (
        st.function is not None and (st.reduction or 1.0) >= 1.0)
    upstream_per_record = False
    for ref in st.inputs:
        s, p, r = _lineage(ref, stages, sources)
        srcs |= s
        path.extend(x for x in p if x not in path)
        upstream_per_record = upstream_per_record or r
    path.append(origin)
    return srcs, path, per_record and upstream_per_record


def leaving(sp: SitePlan) -> list[Leaving]:
    """Every stream of the site that crosses the uplink, with its lineage."""
    stages = {st.id: st for st in sp.stages}
    sources = {s.id: s for s in sp.site.sources}
    cal = sp.final.calibration
    out = []
    for s in sp.streams:
        srcs, path, per_record = _lineage(s.origin, stages, sources)
        if s.kind == "raw":
            per_record = True
        tags = frozenset().union(*(source_tags(sources[x]) for x in srcs)) if srcs \
            else frozenset()
        out.append(Leaving(s.name, tuple(sorted(srcs)), tags, tuple(path), per_record,
                           cal.stream_wire.get(s.name, 0.0), cal.stream_records.get(s.name, 0.0)))
    return out


def privacy_checks(sites: list[SitePlan]) -> list[Check]:
    out = []
    for sp in sites:
        tagged = {s.id: source_tags(s) for s in sp.site.sources if source_tags(s)}
        if not tagged:
            continue
        names = ", ".join(f"{k} ({', '.join(sorted(v))})" for k, v in sorted(tagged.items()))
        lv = [x for x in leaving(sp) if x.tags]
        bad = [x for x in lv if x.per_record]
        agg = [x for x in lv if not x.per_record]
        if bad:
            detail = "; ".join(
                f"stream {x.stream} carries every record of {', '.join(x.sources)} "
                f"({', '.join(sorted(x.tags))}) off the site at {x.records_per_s:,.2f} "
                f"records/s" for x in bad)
        else:
            detail = f"no record of {names} leaves the site"
            if agg:
                detail += "; aggregates of them do: " + ", ".join(
                    f"{x.stream} (via {', '.join(x.path)})" for x in agg)
        out.append(Check(f"{sp.name}: tagged data stays on site", not bad, detail))
    return out


# -- latency --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlarmLatency:
    """An alarm stage's latency from the event to the local action, by part (seconds)."""

    stage: str
    where: str
    sample_period: float
    debounce: float
    window: float
    path_p99: float
    budget: float  # the stricter of the stage's budget and the workload's maximum

    @property
    def total(self) -> float:
        return self.sample_period + self.debounce + self.window + self.path_p99

    def parts(self) -> str:
        text = f"sample period {_ms(self.sample_period)}"
        if self.debounce:
            text += f" + debounce {_ms(self.debounce)}"
        if self.window:
            text += f" + window/block close {_ms(self.window)}"
        return text + f" + {self.where} path p99 {_ms(self.path_p99)} = {_ms(self.total)}"


def _ms(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:,.0f} us"
    return f"{s * 1000:,.1f} ms" if s < 10 else f"{s:,.1f} s"


def _source_period(src: SourceSpec) -> float:
    peak = getattr(src, "peak_rate_hz", None) or src.rate_hz
    return 1.0 / peak


def _upstream(stage_id: str, stages: dict[str, StageSpec],
              sources: dict[str, SourceSpec]) -> tuple[float, float]:
    """The longest sample period of the sources behind ``stage_id`` and the longest wait for a
    window or FFT block between them and it."""
    st = stages[stage_id]
    period = 0.0
    wait = 0.0
    for ref in st.inputs:
        if ref in sources:
            period = max(period, _source_period(sources[ref]))
            continue
        p, w = _upstream(ref, stages, sources)
        period = max(period, p)
        wait = max(wait, w + _close_wait(stages[ref]))
    return period, wait


def _close_wait(st: StageSpec) -> float:
    if st.operator == "window":
        size = st.params.get("size")
        return float(parse_duration(size)) if size else 0.0
    if st.operator == "fft":
        rate = float(st.params.get("sample_rate", 0) or 0)
        return int(st.params.get("samples", 1024)) / rate if rate > 0 else 0.0
    return 0.0


def alarm_latency(workload: Workload, sp: SitePlan) -> list[AlarmLatency]:
    stages = {st.id: st for st in sp.stages}
    sources = {s.id: s for s in sp.site.sources}
    lat = sp.final.latency
    out = []
    for st in sp.stages:
        if not is_alarm(st):
            continue
        period, wait = _upstream(st.id, stages, sources)
        debounce = int(st.params.get("debounce", 1) or 1) if st.operator == "threshold" else 1
        where = sp.where(st.id)
        path = lat.cloud_p99 if where == "cloud" else lat.edge_p99
        budget = workload.requirements.max_alarm_latency
        if st.latency_budget is not None:
            budget = min(budget, st.latency_budget)
        out.append(AlarmLatency(st.id, "cloud" if where == "cloud" else "edge", period,
                                (debounce - 1) * period, wait, path, budget))
    return out


def latency_checks(workload: Workload, sites: list[SitePlan]) -> list[Check]:
    out = []
    for sp in sites:
        for a in alarm_latency(workload, sp):
            ok = a.total <= a.budget
            detail = f"{a.parts()} against {_ms(a.budget)}"
            if not ok:
                floor = a.sample_period + a.debounce + a.window
                if floor > a.budget:
                    detail += (" - unmeetable wherever it runs: sampling, debounce and "
                               f"windows alone take {_ms(floor)}")
                else:
                    detail += " - no placement meets it"
            out.append(Check(f"{sp.name}: {a.stage} alarm latency", ok, detail))
    return out


# -- link -----------------------------------------------------------------------------------------

def usable_uplink(sp: SitePlan) -> float:
    """Bytes per second of the uplink data may use."""
    return sp.site.link.uplink / 8 * DATA_SHARE


def capacity_checks(sites: list[SitePlan]) -> list[Check]:
    out = []
    for sp in sites:
        f = sp.final
        cap = usable_uplink(sp)
        streams = sorted(f.calibration.stream_wire.items(), key=lambda kv: -kv[1])
        shares = ", ".join(f"{n} {b * 8 / 1e3:,.1f} kbit/s ({b / cap:.1%})"
                           for n, b in streams) or "no streams"
        out.append(Check(
            f"{sp.name}: uplink capacity", f.edge_wire_per_s < cap,
            f"{f.edge_wire_per_s * 8 / 1e3:,.1f} kbit/s of {cap * 8 / 1e3:,.0f} kbit/s usable "
            f"for data ({shares})"))
    return out


def baseline_fits(sp: SitePlan) -> tuple[bool, float]:
    """Whether the link could carry the naive baseline, and its share of the usable uplink."""
    share = sp.final.naive_per_s / usable_uplink(sp)
    return share < 1.0, share


def stream_kinds(streams: list[Stream]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in streams:
        out[s.kind] = out.get(s.kind, 0) + 1
    return out


# -- resources ------------------------------------------------------------------------------------

def resource_checks(workload: Workload, sites: list[SitePlan]) -> list[Check]:
    util = workload.requirements.utilisation
    out = []
    for sp in sites:
        s = sp.final.sizing
        f = sp.final
        out.append(Check(
            f"{sp.name}: CPU per node", s.cores_required <= s.option.cores,
            f"{s.cores_needed:,.2f} cores busy, {s.cores_required:,.2f} at {util:.0%} "
            f"utilisation, of {s.option.cores} on {s.option.name}"))
        loop = s.cores_needed
        out.append(Check(
            f"{sp.name}: one event loop", loop <= util,
            f"the engine runs on one event loop: {loop:,.2f} of one core busy, at most "
            f"{util:.0%} planned" + ("" if loop <= util else
                                     "; split the site's sources over several pipelines")))
        out.append(Check(
            f"{sp.name}: memory per node", s.ram <= s.option.ram,
            f"{s.ram / 1024**3:,.1f} GiB with headroom of {s.option.ram / 1024**3:,.0f} GiB"))
        out.append(Check(
            f"{sp.name}: disk for the outbox", s.disk <= s.option.disk,
            f"{f.backlog_bytes / 1024**2:,.0f} MiB of backlog after {f.outage_s / 3600:,.1f} h "
            f"without the link, outbox {f.outbox_bytes / 1024**2:,.0f} MiB; "
            f"{s.disk / 1024**3:,.1f} GiB needed with OS, release slots and logs, of "
            f"{s.option.disk / 1024**3:,.0f} GiB"))
    return out


def computed_checks(workload: Workload, sites: list[SitePlan]) -> list[Check]:
    """Every check of this module, unmet ones first."""
    checks = (latency_checks(workload, sites) + capacity_checks(sites)
              + privacy_checks(sites) + resource_checks(workload, sites))
    return sorted(checks, key=lambda c: c.met)
