"""Bounded recording of accept-to-action latencies, for sinks and the summary."""

from __future__ import annotations

import time

import numpy as np

from edgewise.pipeline.batch import ACCEPTED, Batch


class LatencyRecorder:
    """Keeps the most recent ``capacity`` latencies (seconds) in a ring buffer."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._buf = np.zeros(capacity, dtype=np.float64)
        self._n = 0
        self.count = 0

    def record_batch(self, batch: Batch, now: float | None = None) -> None:
        acc = batch.columns.get(ACCEPTED)
        if acc is None or batch.n == 0:
            return
        if now is None:
            now = time.perf_counter()
        self.add(now - acc)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        cap = len(self._buf)
        if len(values) >= cap:
            self._buf[:] = values[-cap:]
            self._n = cap
        else:
            start = self.count % cap
            end = start + len(values)
            if end <= cap:
                self._buf[start:end] = values
            else:
                k = cap - start
                self._buf[start:] = values[:k]
                self._buf[: end - cap] = values[k:]
            self._n = min(cap, self._n + len(values))
        self.count += len(values)

    def values(self) -> np.ndarray:
        return self._buf[: self._n].copy()

    def percentile_ms(self, q: float) -> float | None:
        if self._n == 0:
            return None
        return float(np.percentile(self._buf[: self._n], q) * 1000.0)

    def summary(self) -> dict[str, float | int | None]:
        return {
            "count": self.count,
            "p50_ms": self.percentile_ms(50),
            "p99_ms": self.percentile_ms(99),
            "max_ms": float(self._buf[: self._n].max() * 1000.0) if self._n else None,
        }
