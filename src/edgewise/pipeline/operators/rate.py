"""Rate of change per key: (value - previous value) / (ts - previous ts), in units per ``per``.

    - id: ramp
      type: rate_of_change
      inputs: [sensors]
      output: rate        # the new field
      per: 1m             # units per minute (default: per second)
      limit: 5.0          # optional: emit only records with |rate| > 5 (then they are alarms)

The previous reading is the one received just before, for the same key, in this batch or an
earlier one (the state is checkpointed, so a restart continues). The first reading of a key has
no rate and is not emitted; neither is a reading whose time is not after its predecessor's
(duplicate or out of order; counted in ``skipped``). Emitted records are the input records with
the rate added (``_accepted`` included). With ``limit`` set the stage's output counts as alarms.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, field_validator

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, Emit, Operator, RunContext
from edgewise.pipeline.operators.filter import require_fields
from edgewise.pipeline.operators.keys import KeyIndex
from edgewise.pipeline.units import Duration


class RateConfig(ComponentConfig):
    field: str = Field(default="value", description="the numeric field differentiated")
    output: str = Field(default="rate", description="name of the new field")
    per: Duration = Field(default=1.0, gt=0, description="rate unit: change per this duration")
    limit: float | None = Field(
        default=None, ge=0, description="emit only |rate| above this (and count them as alarms)"
    )
    key_by: list[str] = Field(default=["sensor"], description="fields that identify a series")
    time_field: str = Field(default="ts", description="event time field (epoch seconds)")

    @field_validator("output")
    @classmethod
    def _public(cls, v: str) -> str:
        if not v or v.startswith("_"):
            raise ValueError("output must be a field name not starting with '_'")
        return v


class RateOfChange(Operator):
    Config = RateConfig
    raises_alarms = False

    def __init__(self, id: str, config: RateConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.raises_alarms = config.limit is not None
        self.keys = KeyIndex(config.key_by)
        self.prev_v = np.empty(0, dtype=np.float64)
        self.prev_t = np.empty(0, dtype=np.float64)  # NaN: no reading yet
        self.skipped = 0

    def _grow(self) -> None:
        n = len(self.keys.values)
        if n > len(self.prev_v):
            extra = n - len(self.prev_v)
            self.prev_v = np.concatenate((self.prev_v, np.full(extra, np.nan)))
            self.prev_t = np.concatenate((self.prev_t, np.full(extra, np.nan)))

    def process(self, batch: Batch) -> Emit:
        cfg = self.config
        require_fields(batch, [*cfg.key_by, cfg.field, cfg.time_field], self.id)
        kid = self.keys.ids_for(batch)
        self._grow()
        v = batch.columns[cfg.field].astype(np.float64, copy=False)
        t = batch.columns[cfg.time_field].astype(np.float64, copy=False)
        order = np.argsort(kid, kind="stable")
        sk = kid[order]
        first = np.ones(batch.n, dtype=bool)
        first[1:] = sk[1:] != sk[:-1]
        sv, st = v[order], t[order]
        pv = np.empty(batch.n)
        pt = np.empty(batch.n)
        pv[1:], pt[1:] = sv[:-1], st[:-1]
        pv[first] = self.prev_v[sk[first]]
        pt[first] = self.prev_t[sk[first]]
        last = np.ones(batch.n, dtype=bool)
        last[:-1] = first[1:]
        self.prev_v[sk[last]] = sv[last]
        self.prev_t[sk[last]] = st[last]
        dt = st - pt
        has_prev = ~np.isnan(pt)
        ok = has_prev & (dt > 0)
        self.skipped += int(np.count_nonzero(has_prev & ~ok))
        rate_sorted = np.full(batch.n, np.nan)
        rate_sorted[ok] = (sv[ok] - pv[ok]) / dt[ok] * cfg.per
        rate = np.empty(batch.n)
        rate[order] = rate_sorted
        keep = np.zeros(batch.n, dtype=bool)
        keep[order] = ok
        if cfg.limit is not None:
            with np.errstate(invalid="ignore"):
                keep &= np.abs(rate) > cfg.limit
        if not keep.any():
            return None
        return batch.with_columns(**{cfg.output: rate}).take(keep)

    def snapshot(self) -> Any:
        n = len(self.keys.values)
        return {
            "keys": self.keys.snapshot(),
            "prev_v": [None if np.isnan(x) else x for x in self.prev_v[:n].tolist()],
            "prev_t": [None if np.isnan(x) else x for x in self.prev_t[:n].tolist()],
        }

    def restore(self, state: Any) -> None:
        if not state:
            return
        self.keys.restore(state["keys"])
        self.prev_v = np.array([np.nan if x is None else x for x in state["prev_v"]], dtype=float)
        self.prev_t = np.array([np.nan if x is None else x for x in state["prev_t"]], dtype=float)
        self._grow()
