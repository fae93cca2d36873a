"""Downsample per key: keep every Nth reading, or one record per key per interval of event time.

    - id: thin
      type: downsample
      inputs: [sensors]
      every: 10             # readings 1, 11, 21, ... of each key pass

    - id: per-second
      type: downsample
      inputs: [sensors]
      interval: 1s
      how: last             # first | last | mean

``every: N`` passes the first reading of each key and then every Nth one, at once.

``interval`` divides event time into buckets ``[k*interval, (k+1)*interval)``. Per key, one record
per bucket is emitted when the bucket is complete, i.e. when a reading of a later bucket arrives
for that key, or at `flush` (end of a finite input); a key that goes quiet keeps its last bucket
until then. ``how: first`` / ``last`` emit the reading with the smallest / largest event time in the
bucket (ties: the one that arrived first / last), unchanged. ``how: mean`` emits the key fields,
``ts`` (the bucket start), the mean of ``field`` and ``count``; its ``_accepted`` is that of the
newest reading in the bucket. A reading for a bucket older than its key's current one goes to the
``late`` port.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import ComponentConfig, Emit, Operator, RunContext
from edgewise.pipeline.operators.filter import require_fields
from edgewise.pipeline.operators.keys import KeyIndex
from edgewise.pipeline.units import Duration

_NO_BUCKET = np.iinfo(np.int64).min
# open bucket per key: bucket, count, sum, newest accept time, kept row's ts, kept row
BUCKET, COUNT, SUM, ACC, ROW_TS, ROW = range(6)


class DownsampleConfig(ComponentConfig):
    every: int | None = Field(default=None, ge=1, description="keep the 1st and every Nth reading")
    interval: Duration | None = Field(
        default=None, gt=0, description="one record per key per interval of event time"
    )
    how: Literal["first", "last", "mean"] = Field(
        default="last", description="which record an interval keeps (mean: of field)"
    )
    field: str = Field(default="value", description="the field averaged by how: mean")
    key_by: list[str] = Field(default=["sensor"], description="fields that identify a series")
    time_field: str = Field(default="ts", description="event time field (epoch seconds)")

    @model_validator(mode="after")
    def _one_mode(self) -> DownsampleConfig:
        if (self.every is None) == (self.interval is None):
            raise ValueError("set exactly one of every (a count) or interval (a duration)")
        return self


class Downsample(Operator):
    Config = DownsampleConfig
    ports = ("out", "late")

    def __init__(self, id: str, config: DownsampleConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.keys = KeyIndex(config.key_by)
        self.seen = np.zeros(0, dtype=np.int64)  # every: readings per key, modulo N
        self.open: dict[int, list[Any]] = {}  # interval: key id -> open bucket

    # -- every N ------------------------------------------------------------------------------
    def _every(self, batch: Batch, kid: np.ndarray) -> Emit:
        n_every = self.config.every
        assert n_every is not None
        nkeys = len(self.keys.values)
        if nkeys > len(self.seen):
            self.seen = np.concatenate((self.seen, np.zeros(nkeys - len(self.seen), np.int64)))
        order = np.argsort(kid, kind="stable")
        sk = kid[order]
        start = np.ones(batch.n, dtype=bool)
        start[1:] = sk[1:] != sk[:-1]
        group_start = np.maximum.accumulate(np.where(start, np.arange(batch.n), 0))
        rank = np.arange(batch.n) - group_start
        keep = np.zeros(batch.n, dtype=bool)
        keep[order] = (self.seen[sk] + rank) % n_every == 0
        self.seen = (self.seen + np.bincount(kid, minlength=nkeys)) % n_every
        if not keep.any():
            return None
        return batch.take(keep)

    # -- interval -----------------------------------------------------------------------------
    def _interval(self, batch: Batch, kid: np.ndarray) -> Emit:
        cfg = self.config
        n = batch.n
        t = batch.columns[cfg.time_field].astype(np.float64, copy=False)
        b = np.floor(np.round(t / cfg.interval, 9)).astype(np.int64)
        order = np.argsort(kid, kind="stable")
        sk, sb = kid[order], b[order]
        start = np.ones(n, dtype=bool)
        start[1:] = sk[1:] != sk[:-1]
        g = np.cumsum(start) - 1
        bmin = int(sb.min())
        span = int(sb.max()) - bmin + 1
        runmax = np.maximum.accumulate((sb - bmin) + g * span) - g * span + bmin
        cur = np.array(
            [self.open[k][BUCKET] if k in self.open else _NO_BUCKET for k in sk.tolist()],
            dtype=np.int64,
        ) if self.open else np.full(n, _NO_BUCKET, dtype=np.int64)
        late_sorted = sb < np.maximum(runmax, cur)
        result: dict[str, Batch] = {}
        if late_sorted.any():
            late = np.zeros(n, dtype=bool)
            late[order] = late_sorted
            result["late"] = batch.take(late)
        ok = ~late_sorted
        rows, gk, gb = order[ok], sk[ok], sb[ok]
        if len(rows) == 0:
            return result or None
        gstart = np.ones(len(rows), dtype=bool)
        gstart[1:] = (gk[1:] != gk[:-1]) | (gb[1:] != gb[:-1])
        starts = np.flatnonzero(gstart)
        ends = np.concatenate((starts[1:], [len(rows)])) - 1
        counts = np.diff(np.concatenate((starts, [len(rows)])))
        v = batch.columns[cfg.field].astype(np.float64, copy=False)
        sums = np.add.reduceat(v[rows], starts)
        acc_col = batch.columns.get(ACCEPTED)
        accs = (
            np.maximum.reduceat(acc_col[rows].astype(np.float64), starts)
            if acc_col is not None else None
        )
        # representative rows: by (group, ts, arrival); first of a group = earliest, last = latest
        gid = np.cumsum(gstart) - 1
        by_time = rows[np.lexsort((np.arange(len(rows)), t[rows], gid))]
        first_rows, last_rows = by_time[starts], by_time[ends]
        pick = first_rows if cfg.how == "first" else last_rows

        emitted: list[list[Any]] = []  # (bucket, key, state entry)
        opened = self.open
        for j, (k, bk) in enumerate(zip(gk[starts].tolist(), gb[starts].tolist(), strict=True)):
            i = int(pick[j])
            ti = float(t[i])
            st = opened.get(k)
            if st is not None and st[BUCKET] == bk:
                st[COUNT] += int(counts[j])
                st[SUM] += float(sums[j])
                if accs is not None:
                    a = float(accs[j])
                    st[ACC] = a if st[ACC] is None else max(st[ACC], a)
                if (cfg.how == "first" and ti < st[ROW_TS]) or (
                    cfg.how == "last" and ti >= st[ROW_TS]
                ):
                    st[ROW_TS], st[ROW] = ti, i
                continue
            if st is not None:
                emitted.append([st[BUCKET], k, st])
            opened[k] = [
                bk, int(counts[j]), float(sums[j]),
                float(accs[j]) if accs is not None else None, ti, i,
            ]
        out = self._emit(emitted, batch)
        # rows still held refer to this batch: keep them as plain values
        for st in opened.values():
            if isinstance(st[ROW], int):
                st[ROW] = _row(batch, st[ROW]) if cfg.how != "mean" else None
        if out is not None:
            result["out"] = out
        return result or None

    def _emit(self, emitted: list[list[Any]], batch: Batch | None) -> Batch | None:
        if not emitted:
            return None
        emitted.sort(key=lambda e: (e[0], e[1]))
        cfg = self.config
        if cfg.how == "mean":
            kids = np.array([e[1] for e in emitted], dtype=np.int64)
            cols = self.keys.columns(kids)
            cols["ts"] = np.round(np.array([e[0] for e in emitted]) * cfg.interval, 9)
            cnt = np.array([e[2][COUNT] for e in emitted], dtype=np.int64)
            cols[cfg.field] = np.array([e[2][SUM] for e in emitted]) / cnt
            cols["count"] = cnt
            if all(e[2][ACC] is not None for e in emitted):
                cols[ACCEPTED] = np.array([e[2][ACC] for e in emitted])
            return Batch(cols, len(emitted))
        held = [e[2][ROW] for e in emitted]
        if batch is not None and all(isinstance(r, int) for r in held):
            return batch.take(np.array(held, dtype=np.int64))
        parts: list[Batch] = []
        for r in held:  # few rows (one per key per interval): one small batch each
            if isinstance(r, int):
                assert batch is not None
                parts.append(batch.take(np.array([r], dtype=np.int64)))
            else:
                parts.append(Batch.from_records([r]))
        return Batch.concat(parts)

    # -- operator -----------------------------------------------------------------------------
    def process(self, batch: Batch) -> Emit:
        if batch.n == 0:
            return None
        cfg = self.config
        need = cfg.key_by if cfg.every is not None else [*cfg.key_by, cfg.field, cfg.time_field]
        require_fields(batch, need, self.id)
        kid = self.keys.ids_for(batch)
        if self.config.every is not None:
            return self._every(batch, kid)
        return self._interval(batch, kid)

    def flush(self) -> Emit:
        if not self.open:
            return None
        emitted = [[st[BUCKET], k, st] for k, st in self.open.items()]
        self.open = {}
        return self._emit(emitted, None)

    def snapshot(self) -> Any:
        return {
            "keys": self.keys.snapshot(),
            "seen": self.seen.tolist(),
            "open": [[k, *st] for k, st in self.open.items()],
        }

    def restore(self, state: Any) -> None:
        if not state:
            return
        self.keys.restore(state["keys"])
        self.seen = np.array(state["seen"], dtype=np.int64)
        self.open = {int(e[0]): list(e[1:]) for e in state["open"]}


def _row(batch: Batch, i: int) -> dict[str, Any]:
    """One record as plain Python values (internal columns included)."""
    out: dict[str, Any] = {}
    for name, col in batch.columns.items():
        x = col[i]
        out[name] = x.item() if isinstance(x, np.generic) else x
    return out
