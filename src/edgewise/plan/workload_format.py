"""The workload format's parts beyond sources and stages, and the checks that span fields.

`edgewise.plan.workload` holds the document (sites, sources, stages, requirements) and its
loader; this module holds what was added for realistic workloads (issue 14) and the checks that
pydantic cannot make field by field, each reported as ``file:line: field: message``:

* `ValueField`: one value column of a multi-field record (``fields:`` on a source: lat/lon,
  systolic/diastolic); each has its own signal and resolution.
* `COMPLIANCE`: the compliance tags a source may carry (``compliance: [personal, phi]``).
* `DutyCycle`: a source that reports only ``on`` seconds of every ``period``.
* `SecondLink`: a site's second link, for failover or for offloading bulk data in a window.
* `ModelArtefact`: a model a stage runs, with its size and accelerator needs (``spec.models``;
  a stage names it with ``model:``).
* `CodeLocation`: where the package of the user functions is (``spec.code.path``), so that
  ``--simulate`` can import them.
* `TIERS`: the tiers a site's data passes on its way to the cloud (``tiers:`` on a site).

`check_extensions` finds the problems; `complete_extensions` fills in what follows from them
(HA mode of a multi-node site, a model's GPU need on its stage, a duty cycle's average rate),
each stated as an inferred value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from edgewise.pipeline.units import ByteSize, Duration
from edgewise.specfile import Problem
from edgewise.specfile.marks import Path as KeyPath
from edgewise.specfile.marks import line_of

COMPLIANCE = ("personal", "phi", "pci", "biometric", "location", "confidential")
Compliance = Literal["personal", "phi", "pci", "biometric", "location", "confidential"]
TIERS = ("device", "gateway", "site", "region")
Tier = Literal["device", "gateway", "site", "region"]
HaMode = Literal["active-standby", "active-active"]
RESERVED_COLUMNS = ("sensor", "ts", "_accepted")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_CLOCK = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_BANDWIDTH = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(bit/s|bps|b/s|B/s)\s*$")
_BW_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_bandwidth(value: Any) -> float:
    """Bits per second from a number or a string such as '20Mbit/s', '512kbps', '1MB/s'."""
    if isinstance(value, bool):
        raise ValueError("expected a bandwidth such as '20Mbit/s'")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError("a bandwidth must be positive")
        return float(value)
    if isinstance(value, str):
        m = _BANDWIDTH.match(value)
        if m:
            bits = float(m.group(1)) * _BW_PREFIX[m.group(2).lower()]
            if m.group(3) == "B/s":
                bits *= 8
            if bits <= 0:
                raise ValueError("a bandwidth must be positive")
            return bits
    raise ValueError(
        f"{value!r} is not a bandwidth; write e.g. '20Mbit/s', '512kbps' or bits per second"
    )


Bandwidth = Annotated[float, BeforeValidator(parse_bandwidth)]



def fmt_seconds(seconds: float) -> str:
    if seconds >= 86400 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 1:
        return f"{seconds:g} s"
    return f"{seconds * 1000:g} ms"


def decimals_of_resolution(resolution: float) -> int:
    """Decimal places of a reading at this resolution (0 for whole units)."""
    d = -math.floor(math.log10(resolution) + 1e-9)
    return max(0, min(6, d))


class Signal(_Strict):
    """What the readings look like: a base level per sensor in [low, high], a slow drift, noise
    and rare spikes. Used for the estimates (alarm rates, compression) and to generate data."""

    low: float = 40.0
    high: float = 80.0
    drift: float = Field(default=5.0, ge=0)
    period: Duration = Field(default=600.0, gt=0)
    noise: float = Field(default=0.5, ge=0)
    spike_prob: float = Field(default=0.001, ge=0, le=1)
    spike_value: float = 100.5

    @model_validator(mode="after")
    def _range(self) -> Signal:
        if self.high < self.low:
            raise ValueError("signal.high must not be below signal.low")
        return self


class Rtt(_Strict):
    p50: Duration = Field(gt=0)
    p99: Duration = Field(gt=0)

    @model_validator(mode="after")
    def _order(self) -> Rtt:
        if self.p99 < self.p50:
            raise ValueError("p99 must not be below p50")
        return self


class ValueField(_Strict):
    """One value column of a multi-field record. Its signal describes the values like a
    source's ``signal`` (base level per sensor in [low, high], drift, noise, spikes)."""

    name: str
    unit: str = ""
    resolution: float = Field(default=0.01, gt=0, le=1000)
    signal: Signal = Signal()

    @property
    def decimals(self) -> int:
        return decimals_of_resolution(self.resolution)

    @model_validator(mode="after")
    def _name(self) -> ValueField:
        if not _COLUMN.match(self.name):
            raise ValueError(f"field name {self.name!r} must be a column name: letters, digits "
                             "and '_', not starting with a digit")
        if self.name in RESERVED_COLUMNS:
            raise ValueError(f"field name {self.name!r} is reserved "
                             f"({', '.join(RESERVED_COLUMNS)})")
        return self


class DutyCycle(_Strict):
    """The source reports only ``active`` seconds of every ``period`` (e.g. a pump that runs
    10 minutes an hour). The planner plans it at its average rate. (Not ``on``: YAML reads
    that key as a boolean.)"""

    active: Duration = Field(gt=0)
    period: Duration = Field(gt=0)

    @model_validator(mode="after")
    def _order(self) -> DutyCycle:
        if self.active > self.period:
            raise ValueError("duty_cycle.active must not be longer than duty_cycle.period")
        return self

    @property
    def share(self) -> float:
        return self.active / self.period


class OffloadWindow(_Strict):
    start: str  # "HH:MM", UTC
    length: Duration = Field(gt=0, le=86400)

    @model_validator(mode="after")
    def _clock(self) -> OffloadWindow:
        if not _CLOCK.match(self.start):
            raise ValueError(f"start {self.start!r} must be a time of day such as '02:00'")
        return self


class ModelArtefact(_Strict):
    """A model a stage runs at the edge or in the cloud."""

    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$")
    size: ByteSize
    accelerator: Literal["none", "gpu", "npu"] = "none"
    accelerator_memory: ByteSize | None = None
    format: str = ""

    @model_validator(mode="after")
    def _memory(self) -> ModelArtefact:
        if self.accelerator == "none" and self.accelerator_memory is not None:
            raise ValueError("accelerator_memory needs an accelerator (gpu or npu)")
        return self


class CodeLocation(_Strict):
    """Where the user functions' package lives: a folder put on ``sys.path`` for ``--simulate``
    (relative to the workload file)."""

    path: str = Field(min_length=1)


# -- checks across fields ------------------------------------------------------------------------

def _at(lines: dict[KeyPath, int], where: KeyPath) -> int | None:
    return line_of(lines, where)


def check_extensions(body: Any, lines: dict[KeyPath, int], base: Path) -> list[Problem]:
    """Problems of the newer fields that need more than one field to see."""
    problems: list[Problem] = []

    def add(where: KeyPath, message: str) -> None:
        problems.append((_at(lines, where), ".".join(map(str, where)), message))

    for i, site in enumerate(body.sites):
        sw: KeyPath = ("spec", "sites", i)
        if site.ha is not None and site.nodes < 2:
            add((*sw, "ha"), f"ha: {site.ha} needs two nodes or more; add 'nodes: 2'")
        if site.tiers:
            order = [TIERS.index(t) for t in site.tiers]
            if order != sorted(set(order)):
                add((*sw, "tiers"), "tiers must be distinct and in order from the data's "
                    f"birth to the cloud: {' -> '.join(TIERS)}")
            if "site" not in site.tiers:
                add((*sw, "tiers"), "tiers must include 'site' (where the Edgewise node runs)")
        if site.second_link is not None:
            sl = site.second_link
            if sl.role == "offload" and sl.window is None:
                add((*sw, "second_link", "role"),
                    "an offload link needs a window: {start: 'HH:MM', length: 4h}")
            if sl.role == "failover" and sl.window is not None:
                add((*sw, "second_link", "window"),
                    "a failover link is used whenever the first is down; remove the window "
                    "or set role: offload")
        for j, src in enumerate(site.sources):
            w: KeyPath = (*sw, "sources", j)
            if src.fields:
                names = [f.name for f in src.fields]
                dup = sorted({n for n in names if names.count(n) > 1})
                if dup:
                    add((*w, "fields"), f"duplicate field name(s): {', '.join(dup)}")
                if "signal" in src.model_fields_set:
                    add((*w, "signal"), "a multi-field source gives a signal per field; move "
                        "it into fields[]")
                if any(g.signal is not None for g in src.groups):
                    add((*w, "groups"), "a multi-field source cannot have a signal per group "
                        "(give one per field)")
                if src.alarm is not None:
                    add((*w, "alarm"), "alarm limits of a multi-field source need a field: "
                        "write a threshold stage with params.field instead")
    models = {m.name for m in body.models}
    seen: set[str] = set()
    for i, m in enumerate(body.models):
        if m.name in seen:
            add(("spec", "models", i, "name"), f"duplicate model name {m.name!r}")
        seen.add(m.name)
    for i, st in enumerate(body.stages):
        if st.model is not None and st.model not in models:
            known = ", ".join(sorted(models)) or "none declared under spec.models"
            add(("spec", "stages", i, "model"), f"unknown model {st.model!r}; known: {known}")
    if body.code is not None and not (base / body.code.path).is_dir():
        add(("spec", "code", "path"), f"{body.code.path!r} is not a folder (relative to the "
            "workload file)")
    if any(st.function is not None for st in body.stages) and body.code is None:
        i = next(k for k, st in enumerate(body.stages) if st.function is not None)
        add(("spec", "stages", i, "function"), "a user function needs spec.code.path: the "
            "folder holding its package, so that --simulate can import and run it")
    return problems


@dataclass(frozen=True)
class Note:
    """A value the loader filled in (becomes a `edgewise.plan.workload.Inferred`)."""

    field: str
    value: str
    why: str


def complete_extensions(body: Any) -> tuple[Any, list[Note]]:
    """The body with what follows from the newer fields filled in, and a note for each:

    * a site with two nodes or more and no ``ha`` runs them active-standby;
    * a duty-cycled source is planned at its average rate (``rate_hz`` times the share of
      time it reports; the declared rate is kept as ``peak_rate_hz``);
    * a source whose groups have rates of their own is planned as one source per rate
      (``<id>``, ``<id>-r2``, ...), and every stage reading it reads all of them;
    * a stage running a model gets the model's needs (``gpu`` for an accelerator,
      ``large_model`` from 8 GiB)."""
    notes: list[Note] = []
    sites = []
    renamed: dict[str, list[str]] = {}
    for i, site in enumerate(body.sites):
        upd: dict[str, Any] = {}
        if site.nodes >= 2 and site.ha is None:
            upd["ha"] = "active-standby"
            notes.append(Note(f"sites.{i}.ha", "active-standby",
                              f"{site.nodes} nodes and no ha mode given"))
        sources = []
        for j, src in enumerate(site.sources):
            if src.duty_cycle is not None:
                share = src.duty_cycle.share
                notes.append(Note(
                    f"sites.{i}.sources.{j}.rate_hz", f"{src.rate_hz * share:g} Hz on average",
                    f"reports {src.duty_cycle.active:g} s of every {src.duty_cycle.period:g} s at "
                    f"{src.rate_hz:g} Hz; planned at the average rate"))
                src = src.model_copy(update={"rate_hz": src.rate_hz * share,
                                             "peak_rate_hz": src.rate_hz})
            sources.extend(_split_by_rate(src, i, j, notes, renamed))
        upd["sources"] = sources
        sites.append(site.model_copy(update=upd))
    models = {m.name: m for m in body.models}
    stages = []
    for i, st in enumerate(body.stages):
        upd = {}
        inputs = [x for r in st.inputs for x in renamed.get(r, [r])]
        if inputs != list(st.inputs):
            upd["inputs"] = inputs
        if st.model is not None:
            extra = [n for n in model_needs(models[st.model]) if n not in st.needs]
            if extra:
                upd["needs"] = [*st.needs, *extra]
                notes.append(Note(f"stages.{i}.needs", ", ".join(extra),
                                  f"it runs model {st.model!r}"))
        stages.append(st.model_copy(update=upd) if upd else st)
    return body.model_copy(update={"sites": sites, "stages": stages}), notes


def _split_by_rate(src: Any, i: int, j: int, notes: list[Note],
                   renamed: dict[str, list[str]]) -> list[Any]:
    rates = [g.rate_hz or src.rate_hz for g in src.groups]
    distinct = list(dict.fromkeys(rates))
    if len(distinct) <= 1:
        if src.groups and distinct and distinct[0] != src.rate_hz:
            return [src.model_copy(update={"rate_hz": distinct[0]})]
        return [src]
    out = []
    scale = src.rate_hz / (src.peak_rate_hz or src.rate_hz)  # a duty cycle's share
    for k, rate in enumerate(distinct):
        groups = [g for g, r in zip(src.groups, rates, strict=True) if r == rate]
        sid = src.id if k == 0 else f"{src.id}-r{k + 1}"
        out.append(src.model_copy(update={
            "id": sid, "groups": groups, "count": sum(g.count for g in groups),
            "rate_hz": rate * scale if src.peak_rate_hz else rate}))
    renamed[src.id] = [s.id for s in out]
    notes.append(Note(f"sites.{i}.sources.{j}.groups",
                      ", ".join(f"{s.id} at {s.rate_hz:g} Hz" for s in out),
                      "its groups have different rates: one planned source per rate"))
    return out


def field_problems(st: Any, cls: Any, body: Any, where: KeyPath,
                   lines: dict[KeyPath, int]) -> list[Problem]:
    """A stage that reads multi-field sources directly must name one of their fields."""
    if "field" not in getattr(cls.Config, "model_fields", {}):
        return []
    fields_of = {src.id: [f.name for f in src.fields] or ["value"]
                 for site in body.sites for src in site.sources}
    if not st.inputs or not all(r in fields_of for r in st.inputs):
        return []
    want = st.params.get("field", cls.Config.model_fields["field"].default)
    for r in st.inputs:
        if want not in fields_of[r]:
            return [(line_of(lines, (*where, "field")) or line_of(lines, where),
                     ".".join(map(str, (*where, "field"))),
                     f"source {r!r} has no field {want!r}; its fields: "
                     f"{', '.join(fields_of[r])}")]
    return []


def model_needs(model: ModelArtefact) -> list[str]:
    """The placement needs a model brings to its stage."""
    needs = []
    if model.accelerator != "none":
        needs.append("gpu")
    if model.size >= 8 * 1024**3:
        needs.append("large_model")
    return needs
