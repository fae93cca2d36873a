"""The cloud half of a split window: merge the sites' partial aggregates (`partial`).

Partials of the same key and window (``window_start``) from every site are merged: counts,
sums, sums of squares add up, minima and maxima take the extreme, sketches merge. A window is
emitted when the watermark (the highest ``window_start`` seen: a partial of a later window)
passes its end plus ``allowed_lateness``; a partial for a window already emitted goes to the
``late`` port.

Outputs: the key fields, ``ts`` and ``window_start`` (the window start), ``window_end`` and
the aggregates asked for: count, sum, mean, min, max, stddev (population) and rms are exact
(the same as one window over all the sites' records, up to float rounding of sums); p50, p95,
p99 come from the merged sketch, within its rank error (`sketch.rank_error`: 1.33% of the
records at k=200, 99% confidence) - approximate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, Emit, Operator, RunContext
from edgewise.pipeline.operators import sketch as sk
from edgewise.pipeline.units import Duration

EXACT = ("count", "sum", "mean", "min", "max", "stddev", "rms")
PERCENTILES = ("p50", "p95", "p99")


class CombineConfig(ComponentConfig):
    size: Duration = Field(gt=0)
    """Window length: the same as the partial windows'."""
    key_by: list[str] = []
    """Key fields to keep apart (a subset of the partials' keys); none: one fleet-wide result
    per window."""
    aggregates: list[str] = ["count", "mean", "min", "max"]
    """What each window emits: count, sum, mean, min, max, stddev, rms (exact); p50, p95, p99
    (from the sketches: the partials need sketch: true)."""
    allowed_lateness: Duration = 0.0
    """How long after its end a window waits for partials of late sites."""
    idle_timeout: Duration = 5.0
    """With no input for this long, the watermark advances with wall time so open windows
    close."""
    k: int = Field(default=sk.DEFAULT_K, ge=8, le=65535)
    """Size of the merged sketch (as the partials')."""

    @field_validator("aggregates")
    @classmethod
    def _aggs(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in EXACT + PERCENTILES]
        if bad or not v:
            raise ValueError(f"unknown aggregate(s) {', '.join(bad) or 'none given'}; use "
                             f"{', '.join(EXACT + PERCENTILES)}")
        return v


class Combine(Operator):
    Config = CombineConfig
    ports = ("out", "late")

    def __init__(self, id: str, config: CombineConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.size = float(config.size)
        self.sketches = any(a in PERCENTILES for a in config.aggregates)
        if self.sketches:
            sk.require()
        # (window_start, key values) -> [count, sum, sumsq, min, max, [sketch texts]]
        self.groups: dict[tuple[float, tuple[Any, ...]], list[Any]] = {}
        self.watermark = -math.inf
        self.watermark_at_input = -math.inf

    def process(self, batch: Batch) -> Emit:
        c = batch.columns
        starts = c["window_start"].astype(np.float64).tolist()
        keys = list(zip(*(c[k].tolist() for k in self.config.key_by), strict=True)) \
            if self.config.key_by else [()] * batch.n
        cols = [c[f].tolist() for f in ("count", "sum", "sumsq", "min", "max")]
        texts = c["sketch"].tolist() if self.sketches and "sketch" in c else [""] * batch.n
        closed = self.watermark - self.config.allowed_lateness
        late_rows = []
        for i, w in enumerate(starts):
            if w + self.size <= closed:
                late_rows.append(i)
                continue
            g = self.groups.get((w, keys[i]))
            n, s, sq, lo, hi = (row[i] for row in cols)
            if g is None:
                self.groups[(w, keys[i])] = [int(n), s, sq, lo, hi, [texts[i]]]
            else:
                g[0] += int(n)
                g[1] += s
                g[2] += sq
                g[3] = min(g[3], lo)
                g[4] = max(g[4], hi)
                g[5].append(texts[i])
            self.watermark = max(self.watermark, w)
        self.watermark_at_input = self.watermark
        result: dict[str, Batch] = {}
        out = self._fire(self.watermark - self.config.allowed_lateness)
        if out is not None:
            result["out"] = out
        if late_rows:
            result["late"] = batch.take(np.array(late_rows, dtype=np.int64))
        return result or None

    def _fire(self, limit: float) -> Batch | None:
        due = sorted((k for k in self.groups if k[0] + self.size <= limit),
                     key=lambda k: (k[0], tuple(map(str, k[1]))))
        return self._emit(due) if due else None

    def _emit(self, due: list[tuple[float, tuple[Any, ...]]]) -> Batch:
        groups = [self.groups.pop(k) for k in due]
        cols: dict[str, np.ndarray] = {}
        for j, name in enumerate(self.config.key_by):
            cols[name] = np.array([k[1][j] for k in due], dtype=object)
        st = np.array([k[0] for k in due], dtype=np.float64)
        cols["ts"] = st
        cols["window_start"] = st
        cols["window_end"] = st + self.size
        n = np.array([g[0] for g in groups], dtype=np.int64)
        s = np.array([g[1] for g in groups], dtype=np.float64)
        sq = np.array([g[2] for g in groups], dtype=np.float64)
        merged = [sk.merge(g[5], self.config.k) for g in groups] if self.sketches else []
        for a in self.config.aggregates:
            if a == "count":
                cols[a] = n
            elif a == "sum":
                cols[a] = s
            elif a == "mean":
                cols[a] = s / n
            elif a == "min":
                cols[a] = np.array([g[3] for g in groups], dtype=np.float64)
            elif a == "max":
                cols[a] = np.array([g[4] for g in groups], dtype=np.float64)
            elif a == "rms":
                cols[a] = np.sqrt(sq / n)
            elif a == "stddev":
                mean = s / n
                cols[a] = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
            else:
                q = float(a[1:]) / 100
                cols[a] = np.array([sk.quantile(m, q) for m in merged], dtype=np.float64)
        return Batch(cols, len(due))

    def on_timer(self, idle_s: float) -> Emit:
        if not self.groups or idle_s < self.config.idle_timeout:
            return None
        self.watermark = max(self.watermark, self.watermark_at_input + idle_s)
        return self._fire(self.watermark - self.config.allowed_lateness)

    def flush(self) -> Emit:
        if not self.groups:
            return None
        return self._emit(sorted(self.groups, key=lambda k: (k[0], tuple(map(str, k[1])))))

    def snapshot(self) -> Any:
        return {"watermark": self.watermark, "watermark_at_input": self.watermark_at_input,
                "groups": [[w, list(key), g] for (w, key), g in self.groups.items()]}

    def restore(self, state: Any) -> None:
        if not state:
            return
        self.watermark = state["watermark"]
        self.watermark_at_input = state["watermark_at_input"]
        self.groups = {(float(w), tuple(key)): g for w, key, g in state["groups"]}
