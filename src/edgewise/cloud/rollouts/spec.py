"""What a rollout is asked to do, and its fleet gates: pure parsing and judgement, no I/O.

`RolloutSpec` is the operator's request as stored (``rollouts.spec``): the release, the label
selector, the canary (a count or a percent of the selected nodes), the waves (cumulative
percents, the last 100%), the bake after each wave, the failure threshold (a count or a
percent), the disruption budget per site label, the fleet gates, how long a node may take
to run the release, and how long the rollout's intents live.

**Gates** (`Gate`, ``NAME OP VALUE`` or ``NAME OP FACTORx``), judged by `judge` over the nodes
of a wave that run the release, on the counters they report (`Sample`):

    alarm_rate   alarms per reading (``alarms / readings_in`` of the node's engine)
    error_rate   dead letters per reading
    dropped      records the outbox dropped since the node was assigned the release
    errors       dead letters of the node's engine since it runs the release

``alarm_rate<=2x`` is relative: the wave's alarms since the release runs must not exceed 2
times the alarm rate of the same nodes before (their engine's counters when they were
assigned) times their readings since, with room for chance as the node's own gate has it
(alarms come at random: a count is beyond its bound ``n`` only past ``n + 3 sqrt(n) + 3``).
Such a gate *passes* only once its bound is at least `MIN_EXPECTED` (100) alarms, so that a
rate well above the bound cannot hide in the room for chance (a wave without alarms before
is judged at once: its bound is the room alone); it *fails* as soon as the count is past it.
``dropped==0`` and ``errors<=5`` are absolute sums over the wave. A gate is *unknown* (the
wave waits) while the wave has fewer than `MIN_READINGS` readings since the release runs
(and, for a relative gate, before).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from edgewise.errors import BadRequest

METRICS = ("alarm_rate", "error_rate", "dropped", "errors")
RATES = ("alarm_rate", "error_rate")
OPS = ("<=", "<", "==")
MIN_READINGS = 1000  # readings of a wave (since the release runs, and before) to judge a rate
MIN_EXPECTED = 100  # a relative gate passes only once its bound is this many alarms (or none)
MAX_WAVES = 20
MAX_GATES = 10
_GATE = re.compile(r"^\s*([a-z_]+)\s*(<=|<|==)\s*([0-9]+(?:\.[0-9]+)?)\s*(x?)\s*$")
_AMOUNT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(%?)\s*$")

Verdict = Literal["pass", "fail", "unknown"]


@dataclass(frozen=True)
class Amount:
    """A count of nodes, or a percent of them."""

    value: float
    percent: bool

    @classmethod
    def parse(cls, text: str, what: str) -> Amount:
        m = _AMOUNT.match(str(text))
        if m is None:
            raise BadRequest(f"{what}: {text!r} is not a count (e.g. 2) or a percent (e.g. 5%)")
        value, percent = float(m.group(1)), bool(m.group(2))
        if percent and value > 100:
            raise BadRequest(f"{what}: {text!r} is more than 100%")
        if not percent and value != int(value):
            raise BadRequest(f"{what}: {text!r}: a count is a whole number")
        return cls(value, percent)

    def of(self, total: int) -> int:
        """Nodes out of ``total``: a percent rounds up (5% of 10 is 1), a count is capped."""
        if self.percent:
            return min(total, math.ceil(total * self.value / 100 - 1e-9))
        return min(total, int(self.value))

    def allowed(self, total: int) -> int:
        """A threshold out of ``total``: a percent rounds down (2% of 10 is 0)."""
        if self.percent:
            return math.floor(total * self.value / 100 + 1e-9)
        return int(self.value)

    def __str__(self) -> str:
        v = f"{self.value:g}"
        return f"{v}%" if self.percent else v


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    value: float
    relative: bool  # VALUE is a factor of the same nodes' rate before

    @classmethod
    def parse(cls, text: str) -> Gate:
        m = _GATE.match(text)
        if m is None:
            raise BadRequest(f"gate {text!r}: write NAME OP VALUE, e.g. 'alarm_rate<=2x', "
                             f"'dropped==0' (OP one of {', '.join(OPS)})")
        metric, op, value, x = m.group(1), m.group(2), float(m.group(3)), bool(m.group(4))
        if metric not in METRICS:
            raise BadRequest(f"gate {text!r}: no metric {metric!r}; one of "
                             f"{', '.join(METRICS)}")
        if x and metric not in RATES:
            raise BadRequest(f"gate {text!r}: only a rate ({', '.join(RATES)}) compares with "
                             "the same nodes before (the x suffix)")
        return cls(metric, op, value, x)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}{'x' if self.relative else ''}"


@dataclass(frozen=True)
class Sample:
    """What one node's counters say (the reported state's ``counters``)."""

    readings: int = 0
    alarms: int = 0
    dead_letters: int = 0
    dropped: int = 0  # the outbox's, summed over its streams (kept across restarts)

    @classmethod
    def from_counters(cls, counters: Mapping[str, Any]) -> Sample:
        def num(key: str) -> int:
            v = counters.get(key, 0)
            return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

        dropped = sum(num(k) for k in counters if k.endswith(".dropped"))
        return cls(num("readings_in"), num("alarms"), num("dead_lettered"), dropped)

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Sample:
        if not isinstance(data, dict):
            return cls()
        return cls(**{k: int(data.get(k, 0) or 0) for k in
                      ("readings", "alarms", "dead_letters", "dropped")})


@dataclass(frozen=True)
class GateResult:
    gate: str
    verdict: Verdict
    detail: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def _poisson_bound(expected: float) -> float:
    return expected + 3 * math.sqrt(expected) + 3


def _compare(op: str, observed: float, limit: float) -> bool:
    return {"<=": observed <= limit, "<": observed < limit, "==": observed == limit}[op]


def judge(gate: Gate, pairs: Iterable[tuple[Sample, Sample]]) -> GateResult:
    """One gate over the wave: ``(before, after)`` per node running the release, ``before``
    its counters when it was assigned, ``after`` now (its engine restarted with the release,
    so its engine counters count the release alone; the outbox's ``dropped`` does not
    restart, so it is the growth since ``before``)."""
    pairs = list(pairs)
    name = str(gate)
    if gate.metric == "dropped":
        total = sum(max(0, a.dropped - b.dropped) for b, a in pairs)
        ok = _compare(gate.op, total, gate.value)
        return GateResult(name, "pass" if ok else "fail", f"dropped {total}")
    if gate.metric == "errors":
        total = sum(a.dead_letters for _, a in pairs)
        ok = _compare(gate.op, total, gate.value)
        return GateResult(name, "pass" if ok else "fail", f"dead letters {total}")
    read_after = sum(a.readings for _, a in pairs)
    count_after = sum(a.alarms if gate.metric == "alarm_rate" else a.dead_letters
                      for _, a in pairs)
    if read_after < MIN_READINGS:
        return GateResult(name, "unknown", f"{read_after} readings since the release runs; "
                                           f"waiting for {MIN_READINGS}")
    rate_after = count_after / read_after
    if not gate.relative:
        ok = _compare(gate.op, rate_after, gate.value)
        return GateResult(name, "pass" if ok else "fail", f"{gate.metric} {rate_after:.6g}")
    read_before = sum(b.readings for b, _ in pairs)
    count_before = sum(b.alarms if gate.metric == "alarm_rate" else b.dead_letters
                       for b, _ in pairs)
    if read_before < MIN_READINGS:
        return GateResult(name, "unknown", f"{read_before} readings before the release; "
                                           f"{MIN_READINGS} needed to compare")
    rate_before = count_before / read_before
    expected = gate.value * rate_before * read_after  # the bound, as a count
    if 0 < expected < MIN_EXPECTED and count_after <= _poisson_bound(expected):
        return GateResult(name, "unknown", f"{gate.metric} bound of {expected:.1f} in "
                                           f"{read_after} readings; waiting for a bound of "
                                           f"{MIN_EXPECTED} to tell")
    if gate.op == "==":
        ok = abs(count_after - expected) <= _poisson_bound(expected) - expected
    elif gate.op == "<":
        ok = count_after < _poisson_bound(expected)
    else:
        ok = count_after <= _poisson_bound(expected)
    return GateResult(name, "pass" if ok else "fail",
                      f"{gate.metric} {rate_after:.6g} after vs {rate_before:.6g} before "
                      f"({count_after} in {read_after} readings; bound "
                      f"{_poisson_bound(expected):.1f})")


def judge_all(gates: Iterable[Gate], pairs: Iterable[tuple[Sample, Sample]]
              ) -> tuple[Verdict, list[GateResult]]:
    """Every gate: ``fail`` if one fails, ``unknown`` if one cannot be judged yet, else
    ``pass`` (no gates: ``pass``)."""
    pairs = list(pairs)
    results = [judge(g, pairs) for g in gates]
    if any(r.verdict == "fail" for r in results):
        return "fail", results
    if any(r.verdict == "unknown" for r in results):
        return "unknown", results
    return "pass", results


def parse_waves(text: str | Iterable[str]) -> tuple[float, ...]:
    """``10%,50%,100%`` → (10, 50, 100): cumulative percents, rising, the last 100."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    out: list[float] = []
    for p in parts:
        a = Amount.parse(p, "waves")
        if not a.percent or a.value <= 0:
            raise BadRequest(f"waves: {p!r}: each wave is a percent above 0 (e.g. 10%)")
        if out and a.value <= out[-1]:
            raise BadRequest("waves: the percents are cumulative and must rise "
                             f"({', '.join(parts)})")
        out.append(a.value)
    if not out or out[-1] != 100:
        raise BadRequest("waves: the last wave is 100%")
    if len(out) > MAX_WAVES:
        raise BadRequest(f"waves: at most {MAX_WAVES}")
    return tuple(out)


@dataclass(frozen=True)
class RolloutSpec:
    release: str
    selector: dict[str, str]
    canary: Amount = Amount(1, False)
    waves: tuple[float, ...] = (100.0,)
    bake_s: float = 0.0
    max_failures: Amount = Amount(0, False)
    max_unavailable_per_site: int | None = None
    site_label: str = "site"
    gates: tuple[Gate, ...] = ()
    node_timeout_s: float = 600.0
    intent_ttl_s: float = 86400.0

    def to_json(self) -> dict[str, Any]:
        return {"release": self.release, "selector": dict(self.selector),
                "canary": str(self.canary), "waves": [f"{w:g}%" for w in self.waves],
                "bake_s": self.bake_s, "max_failures": str(self.max_failures),
                "max_unavailable_per_site": self.max_unavailable_per_site,
                "site_label": self.site_label, "gates": [str(g) for g in self.gates],
                "node_timeout_s": self.node_timeout_s, "intent_ttl_s": self.intent_ttl_s}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RolloutSpec:
        return cls(
            release=str(d["release"]), selector=dict(d.get("selector") or {}),
            canary=Amount.parse(str(d.get("canary", "1")), "canary"),
            waves=parse_waves(d.get("waves") or ["100%"]),
            bake_s=float(d.get("bake_s", 0.0)),
            max_failures=Amount.parse(str(d.get("max_failures", "0")), "max_failures"),
            max_unavailable_per_site=d.get("max_unavailable_per_site"),
            site_label=str(d.get("site_label", "site")),
            gates=tuple(Gate.parse(g) for g in d.get("gates") or ()),
            node_timeout_s=float(d.get("node_timeout_s", 600.0)),
            intent_ttl_s=float(d.get("intent_ttl_s", 86400.0)))
