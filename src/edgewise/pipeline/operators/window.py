"""Tumbling and sliding event-time windows, keyed by any fields.

Each record falls into the windows ``[k*slide, k*slide + size)`` that contain its event time
(one window when tumbling, ``size/slide`` when sliding). Per key and window the operator keeps
running aggregates and emits one record when the window closes, i.e. when the watermark (the
highest event time seen) passes its end plus ``allowed_lateness``. Records for windows that have
already closed go to the ``late`` port and are counted. If no input arrives for ``idle_timeout``,
the watermark advances with wall time so the last windows still close.

Aggregates: count, sum, mean, min, max, stddev (population), rms, first, last (by event time),
p50, p95, p99. Write ``mean`` for the default field or ``max(pressure)`` for another; the output
column is ``mean`` or ``max_pressure``. Output records carry the key fields, ``ts`` and
``window_start`` (both the window start), ``window_end`` and one column per aggregate.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, Emit, Operator, RunContext
from edgewise.pipeline.operators.keys import KeyIndex
from edgewise.pipeline.units import Duration

AGGREGATES = (
    "count", "sum", "mean", "min", "max", "stddev", "rms", "first", "last", "p50", "p95", "p99",
)
_AGG = re.compile(r"^\s*([a-z0-9]+)\s*(?:\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\))?\s*$")
# accumulator layout per field: count, sum, sumsq, min, max, first_t, first_v, last_t, last_v
C, S, SQ, MN, MX, FT, FV, LT, LV, VALS = range(10)


class WindowConfig(ComponentConfig):
    size: Duration = Field(gt=0)
    """Length of each window in event time."""
    slide: Duration | None = None
    """Distance between window starts (sliding windows; size must be a whole multiple of it);
    none: tumbling windows."""
    key_by: list[str] = ["sensor"]
    """Fields whose values make a key; each key has its own windows."""
    time_field: str = "ts"
    """Field holding the event time (Unix seconds)."""
    field: str = "value"
    """Field the aggregates read unless they name one, as in max(pressure)."""
    aggregates: list[str] = ["count", "mean", "min", "max"]
    """What each window emits: count, sum, mean, min, max, stddev, rms, first, last, p50, p95,
    p99, optionally of a field: max(pressure)."""
    allowed_lateness: Duration = 0.0
    """How long after its end a window stays open for late records."""
    idle_timeout: Duration = 5.0
    """With no input for this long, the watermark advances with wall time so open windows close."""

    @field_validator("aggregates")
    @classmethod
    def _check_aggs(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one aggregate, e.g. [count, mean, min, max]")
        for a in v:
            m = _AGG.match(a)
            if not m or m.group(1) not in AGGREGATES:
                raise ValueError(
                    f"unknown aggregate {a!r}; use one of {', '.join(AGGREGATES)}, "
                    "optionally with a field: max(pressure)"
                )
        return v

    @model_validator(mode="after")
    def _check_slide(self) -> WindowConfig:
        if self.slide is not None:
            if self.slide <= 0 or self.slide > self.size:
                raise ValueError("slide must be > 0 and <= size (omit it for tumbling windows)")
            ratio = self.size / self.slide
            if abs(ratio - round(ratio)) > 1e-9:
                raise ValueError("size must be a whole multiple of slide")
        return self


class Window(Operator):
    Config = WindowConfig
    ports = ("out", "late")

    def __init__(self, id: str, config: WindowConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.size = float(config.size)
        self.slide = float(config.slide or config.size)
        self.slide_us = max(1, round(self.slide * 1e6))
        self.size_us = max(1, round(self.size * 1e6))
        self.per_record = round(self.size / self.slide)
        self.aggs: list[tuple[str, str, str]] = []  # (agg, field, output column)
        for a in config.aggregates:
            m = _AGG.match(a)
            assert m is not None  # validated by WindowConfig
            agg, fld = m.group(1), m.group(2) or config.field
            name = agg if m.group(2) is None else f"{agg}_{fld}"
            self.aggs.append((agg, fld, name))
        self.fields = list(dict.fromkeys(f for a, f, _ in self.aggs if a != "count"))
        self.need_order_by_time = any(a in ("first", "last") for a, _, _ in self.aggs)
        self.need_values = any(a.startswith("p") for a, _, _ in self.aggs)
        self.keys = KeyIndex(config.key_by)
        self.windows: dict[int, dict[int, list[Any]]] = {}
        self.watermark = -math.inf
        self.watermark_at_input = -math.inf

    # -- processing ---------------------------------------------------------------------------
    def process(self, batch: Batch) -> Emit:
        t = batch.columns[self.config.time_field].astype(np.float64, copy=False)
        kid = self.keys.ids_for(batch)
        closed_before = self.watermark - self.config.allowed_lateness
        # integer microseconds: 0.3 / 0.1 is 2.9999999999999996 in floats, and 0.3 must start
        # window 3 (event time resolution is 1 us; epoch times in us fit exactly in int64)
        base = np.round(t * 1e6).astype(np.int64) // self.slide_us
        late_out = None
        if self.per_record == 1:
            widx = base
            rows = np.arange(batch.n)
            late = (widx + 1) * self.slide_us / 1e6 <= closed_before
        else:
            m = self.per_record
            widx = (base[:, None] - np.arange(m)[None, :]).reshape(-1)
            rows = np.repeat(np.arange(batch.n), m)
            ends = (widx * self.slide_us + self.size_us) / 1e6
            inside = ends > np.repeat(t, m)
            open_ = ends > closed_before
            keep = inside & open_
            late = ~np.bincount(rows[keep], minlength=batch.n).astype(bool)
            widx, rows = widx[keep], rows[keep]
            late_rows = late
            late = np.zeros(len(rows), dtype=bool)
            if late_rows.any():
                late_out = batch.take(late_rows)
        if self.per_record == 1 and late.any():
            late_out = batch.take(late)
            keep_rows = ~late
            widx, rows = widx[keep_rows], rows[keep_rows]
        if len(rows):
            self._accumulate(batch, t, kid, widx, rows)
            self.watermark = max(self.watermark, float(t.max()))
            self.watermark_at_input = self.watermark
        out = self._fire(self.watermark)
        result: dict[str, Batch] = {}
        if out is not None:
            result["out"] = out
        if late_out is not None:
            result["late"] = late_out
        return result or None

    def _accumulate(
        self, batch: Batch, t: np.ndarray, kid: np.ndarray, widx: np.ndarray, rows: np.ndarray
    ) -> None:
        wmin = int(widx.min())
        span = int(widx.max()) - wmin + 1
        comp = kid[rows] * span + (widx - wmin)
        tr = t[rows]
        if self.need_order_by_time:
            order = np.lexsort((tr, comp))
        else:
            order = np.argsort(comp, kind="stable")
        sc = comp[order]
        starts = np.flatnonzero(np.concatenate(([True], sc[1:] != sc[:-1])))
        ends = np.concatenate((starts[1:], [len(sc)])) - 1
        groups = sc[starts]
        counts = np.diff(np.concatenate((starts, [len(sc)])))
        g_kid = (groups // span).tolist()
        g_widx = (groups % span + wmin).tolist()
        per_field: list[list[Any]] = []
        for f in self.fields:
            v = batch.columns[f][rows].astype(np.float64, copy=False)[order]
            ts_sorted = tr[order]
            sums = np.add.reduceat(v, starts)
            sumsq = np.add.reduceat(v * v, starts)
            mins = np.minimum.reduceat(v, starts)
            maxs = np.maximum.reduceat(v, starts)
            cols = [sums.tolist(), sumsq.tolist(), mins.tolist(), maxs.tolist()]
            if self.need_order_by_time:
                cols += [ts_sorted[starts].tolist(), v[starts].tolist(),
                         ts_sorted[ends].tolist(), v[ends].tolist()]
            else:
                cols += [None, None, None, None]
            vals = np.split(v, starts[1:]) if self.need_values else None
            per_field.append([cols, vals])
        counts_l = counts.tolist()
        windows = self.windows
        for g in range(len(g_kid)):
            w = windows.get(g_widx[g])
            if w is None:
                w = windows[g_widx[g]] = {}
            acc = w.get(g_kid[g])
            new = acc is None
            if new:
                acc = w[g_kid[g]] = [0, []]
            acc[0] += counts_l[g]
            for j, (cols, vals) in enumerate(per_field):
                s, sq, mn, mx, ft, fv, lt, lv = (c[g] if c is not None else None for c in cols)
                if new:
                    acc[1].append([s, sq, mn, mx, ft, fv, lt, lv,
                                   [vals[g]] if vals is not None else None])
                    continue
                a = acc[1][j]
                a[0] += s
                a[1] += sq
                if mn < a[2]:
                    a[2] = mn
                if mx > a[3]:
                    a[3] = mx
                if ft is not None:
                    if ft < a[4]:
                        a[4], a[5] = ft, fv
                    if lt >= a[6]:
                        a[6], a[7] = lt, lv
                if vals is not None:
                    a[8].append(vals[g])

    def _fire(self, watermark: float) -> Batch | None:
        limit = watermark - self.config.allowed_lateness
        due = [w for w in self.windows if (w * self.slide_us + self.size_us) / 1e6 <= limit]
        if not due:
            return None
        due.sort()
        return self._emit_windows(due)

    def _emit_windows(self, due: list[int]) -> Batch | None:
        kids: list[int] = []
        starts: list[int] = []
        accs: list[list[Any]] = []
        for w in due:
            entries = self.windows.pop(w)
            start = w * self.slide_us
            for k in sorted(entries):
                kids.append(k)
                starts.append(start)
                accs.append(entries[k])
        n = len(kids)
        if n == 0:
            return None
        cols = self.keys.columns(np.array(kids, dtype=np.int64))
        st_us = np.array(starts, dtype=np.int64)
        st = st_us / 1e6
        cols["ts"] = st
        cols["window_start"] = st
        cols["window_end"] = (st_us + self.size_us) / 1e6
        count = np.array([a[0] for a in accs], dtype=np.int64)
        for agg, fld, name in self.aggs:
            if agg == "count":
                cols[name] = count
                continue
            j = self.fields.index(fld)
            if agg == "sum":
                cols[name] = np.array([a[1][j][0] for a in accs])
            elif agg == "mean":
                cols[name] = np.array([a[1][j][0] for a in accs]) / count
            elif agg == "min":
                cols[name] = np.array([a[1][j][2] for a in accs])
            elif agg == "max":
                cols[name] = np.array([a[1][j][3] for a in accs])
            elif agg in ("stddev", "rms"):
                s = np.array([a[1][j][0] for a in accs])
                sq = np.array([a[1][j][1] for a in accs])
                if agg == "rms":
                    cols[name] = np.sqrt(sq / count)
                else:
                    mean = s / count
                    cols[name] = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
            elif agg == "first":
                cols[name] = np.array([a[1][j][5] for a in accs])
            elif agg == "last":
                cols[name] = np.array([a[1][j][7] for a in accs])
            else:  # p50 / p95 / p99
                q = float(agg[1:])
                cols[name] = np.array(
                    [float(np.percentile(np.concatenate(a[1][j][8]), q)) for a in accs]
                )
        return Batch(cols, n)

    def on_timer(self, idle_s: float) -> Emit:
        if not self.windows or idle_s < self.config.idle_timeout:
            return None
        self.watermark = max(self.watermark, self.watermark_at_input + idle_s)
        return self._fire(self.watermark)

    def flush(self) -> Emit:
        if not self.windows:
            return None
        return self._emit_windows(sorted(self.windows))

    # -- state --------------------------------------------------------------------------------
    def snapshot(self) -> Any:
        wins = []
        for w, entries in self.windows.items():
            for k, acc in entries.items():
                fields = []
                for a in acc[1]:
                    vals = None
                    if a[8] is not None:
                        vals = np.concatenate(a[8]).tolist() if a[8] else []
                    fields.append([*a[:8], vals])
                wins.append([w, k, acc[0], fields])
        return {
            "watermark": self.watermark,
            "watermark_at_input": self.watermark_at_input,
            "keys": self.keys.snapshot(),
            "windows": wins,
        }

    def restore(self, state: Any) -> None:
        if not state:
            return
        self.watermark = state["watermark"]
        self.watermark_at_input = state["watermark_at_input"]
        self.keys.restore(state["keys"])
        self.windows = {}
        for w, k, count, fields in state["windows"]:
            accs = []
            for f in fields:
                vals = f[8]
                accs.append([*f[:8], [np.array(vals)] if vals is not None else None])
            self.windows.setdefault(w, {})[k] = [count, accs]
