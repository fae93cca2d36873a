"""Threshold alarms: every reading beyond a limit, or alarm states with hysteresis and debounce.

``mode: every`` (the factory line's rule) raises one alarm per reading above ``high`` (or below
``low``), immediately, fully vectorised. ``mode: state`` tracks an alarm state per key: it raises
once after ``debounce`` consecutive readings beyond the limit and clears (a record with
``kind: clear``) once the value is back inside the limit by ``hysteresis``, so a value hovering
around the limit does not flood anyone.

Output records: the key fields, ``ts``, ``value``, ``limit``, ``kind`` (high, low or clear),
``severity``, and the reading's accept time so sinks can measure latency.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import ComponentConfig, Emit, Operator, RunContext
from edgewise.pipeline.operators.keys import KeyIndex


class ThresholdConfig(ComponentConfig):
    field: str = "value"
    """Field compared with the limits."""
    high: float | None = None
    """Alarm when the value is above this; none: no upper limit (set high, low or both)."""
    low: float | None = None
    """Alarm when the value is below this; none: no lower limit."""
    mode: Literal["every", "state"] = "every"
    """every: one alarm per reading beyond a limit; state: raise once per key, clear when back
    inside."""
    hysteresis: float = Field(default=0.0, ge=0)
    """mode: state: how far back inside the limit the value must be to clear."""
    debounce: int = Field(default=1, ge=1)
    """mode: state: consecutive readings beyond the limit before the alarm is raised."""
    key_by: list[str] = ["sensor"]
    """mode: state: fields whose values make a key; each key has its own alarm state."""
    time_field: str = "ts"
    """Field holding the event time, copied to the alarm's ts."""
    severity: str = "alarm"
    """Text put in each alarm record's severity field."""

    @model_validator(mode="after")
    def _limits(self) -> ThresholdConfig:
        if self.high is None and self.low is None:
            raise ValueError("set high, low or both")
        if self.high is not None and self.low is not None and self.low >= self.high:
            raise ValueError("low must be below high")
        return self


class Threshold(Operator):
    Config = ThresholdConfig
    raises_alarms = True

    def __init__(self, id: str, config: ThresholdConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.keys = KeyIndex(config.key_by)
        # per key id: [state (0 normal, 1 high, -1 low), consecutive count, pending kind]
        self.state: dict[int, list[int]] = {}

    def process(self, batch: Batch) -> Emit:
        cfg = self.config
        v = batch.columns[cfg.field]
        if v.dtype.kind not in "fiu":
            v = v.astype(np.float64)
        if cfg.mode == "every":
            hi = v > cfg.high if cfg.high is not None else np.zeros(batch.n, dtype=bool)
            lo = v < cfg.low if cfg.low is not None else np.zeros(batch.n, dtype=bool)
            mask = hi | lo
            if not mask.any():
                return None
            kinds = np.where(hi[mask], "high", "low").astype(object)
            return self._alarms(batch, np.flatnonzero(mask), kinds)
        return self._stateful(batch, v)

    def _alarms(
        self, batch: Batch, rows: np.ndarray, kinds: np.ndarray, low_side: np.ndarray | None = None
    ) -> Batch:
        """Alarm records for ``rows``; ``low_side`` marks rows whose limit is ``low``."""
        cfg = self.config
        cols: dict[str, np.ndarray] = {}
        for k in cfg.key_by:
            cols[k] = batch.columns[k][rows]
        if cfg.time_field in batch.columns:
            cols["ts"] = batch.columns[cfg.time_field][rows]
        cols["value"] = batch.columns[cfg.field][rows].astype(np.float64)
        if low_side is None:
            low_side = kinds == "low"
        limits = np.where(
            low_side,
            cfg.low if cfg.low is not None else np.nan,
            cfg.high if cfg.high is not None else np.nan,
        )
        cols["limit"] = limits.astype(np.float64)
        cols["kind"] = kinds
        sev = np.empty(len(rows), dtype=object)
        sev[:] = cfg.severity
        cols["severity"] = sev
        acc = batch.columns.get(ACCEPTED)
        if acc is not None:
            cols[ACCEPTED] = acc[rows]
        return Batch(cols, len(rows))

    def _stateful(self, batch: Batch, v: np.ndarray) -> Emit:
        cfg = self.config
        kid = self.keys.ids_for(batch)
        hi = v > cfg.high if cfg.high is not None else np.zeros(batch.n, dtype=bool)
        lo = v < cfg.low if cfg.low is not None else np.zeros(batch.n, dtype=bool)
        # every reading of a key that is (or may become) active in this batch is looked at in
        # order; keys that stay normal throughout are skipped without a Python loop
        keys = set(np.unique(kid[hi | lo]).tolist())
        keys.update(k for k, st in self.state.items() if st[0] or st[1])
        if not keys:
            return None
        rows = np.flatnonzero(np.isin(kid, np.fromiter(keys, dtype=np.int64, count=len(keys))))
        rows_out: list[int] = []
        kinds_out: list[str] = []
        low_out: list[bool] = []
        vals = v.tolist()
        kids = kid.tolist()
        his, los = hi.tolist(), lo.tolist()
        for i in rows.tolist():
            k = kids[i]
            st = self.state.get(k)
            if st is None:
                st = self.state[k] = [0, 0]
            beyond = 1 if his[i] else (-1 if los[i] else 0)
            if st[0] == 0:
                if beyond:
                    st[1] = st[1] + beyond if st[1] * beyond > 0 else beyond
                    if abs(st[1]) >= cfg.debounce:
                        st[0], st[1] = beyond, 0
                        rows_out.append(i)
                        kinds_out.append("high" if beyond > 0 else "low")
                        low_out.append(beyond < 0)
                else:
                    st[1] = 0
            else:
                x = vals[i]
                if st[0] > 0:
                    back = x <= cfg.high - cfg.hysteresis  # type: ignore[operator]
                else:
                    back = x >= cfg.low + cfg.hysteresis  # type: ignore[operator]
                if back:
                    low_out.append(st[0] < 0)
                    st[0], st[1] = 0, 0
                    rows_out.append(i)
                    kinds_out.append("clear")
        if not rows_out:
            return None
        kinds = np.empty(len(kinds_out), dtype=object)
        kinds[:] = kinds_out
        return self._alarms(
            batch, np.array(rows_out, dtype=np.int64), kinds, np.array(low_out, dtype=bool)
        )

    def snapshot(self) -> Any:
        return {"keys": self.keys.snapshot(), "state": [[k, *s] for k, s in self.state.items()]}

    def restore(self, state: Any) -> None:
        if not state:
            return
        self.keys.restore(state["keys"])
        self.state = {k: [a, b] for k, a, b in state["state"]}
