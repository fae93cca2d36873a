"""Deterministic sensor signals: a slow drift plus noise plus rare spikes, by seed and tick.

Every value depends only on (seed, group, block of ticks), never on wall time or on how the
caller slices the stream, so a run can be replayed exactly and a restart continues the same
sequence. The reference "factory line" (docs/architecture.md) is `FACTORY_LINE`: 200 sensors at
50 Hz, values with two decimals, about 0.1% of readings above 100.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_TICKS = 50


@dataclass(frozen=True)
class SignalGroup:
    """``count`` sensors named ``{prefix}/{i:03d}``."""

    prefix: str
    count: int
    base_low: float = 40.0
    base_high: float = 80.0
    drift: float = 5.0  # amplitude of the slow sine drift
    period_s: float = 600.0  # period of the drift
    noise: float = 0.5  # standard deviation of the noise
    spike_prob: float = 0.001  # chance per reading of a spike
    spike_value: float = 100.5  # spikes are this plus |N(0, 5)|
    decimals: int = 2


FACTORY_LINE: tuple[SignalGroup, ...] = (
    SignalGroup("line1/temp", 67, 40.0, 80.0),
    SignalGroup("line1/pressure", 67, 30.0, 70.0),
    SignalGroup("line1/vibration", 66, 10.0, 40.0),
)
FACTORY_RATE_HZ = 50.0


class SignalSet:
    """All sensors of a profile; `block(b)` gives the values of ticks [b*50, (b+1)*50)."""

    def __init__(self, groups: tuple[SignalGroup, ...], seed: int, rate_hz: float) -> None:
        self.groups = groups
        self.seed = seed
        self.rate_hz = rate_hz
        names: list[str] = []
        for g in groups:
            names.extend(f"{g.prefix}/{i:03d}" for i in range(g.count))
        self.names = np.array(names, dtype=object)
        self.n_sensors = len(names)
        rng = np.random.default_rng([seed, 0xBA5E])
        self._base = np.concatenate(
            [rng.uniform(g.base_low, g.base_high, g.count) for g in groups]
        )
        self._phase = rng.uniform(0, 2 * np.pi, self.n_sensors)
        self._drift = np.concatenate([np.full(g.count, g.drift) for g in groups])
        self._period = np.concatenate([np.full(g.count, g.period_s) for g in groups])
        self._noise = np.concatenate([np.full(g.count, g.noise) for g in groups])
        self._spike_p = np.concatenate([np.full(g.count, g.spike_prob) for g in groups])
        self._spike_v = np.concatenate([np.full(g.count, g.spike_value) for g in groups])
        self._decimals = np.concatenate([np.full(g.count, g.decimals) for g in groups])
        self._cache: tuple[int, np.ndarray] | None = None

    def block(self, b: int) -> np.ndarray:
        """Values of ticks [b*50, (b+1)*50): shape (50, n_sensors)."""
        if self._cache is not None and self._cache[0] == b:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, b])
        ticks = np.arange(b * BLOCK_TICKS, (b + 1) * BLOCK_TICKS)[:, None]
        t = ticks / self.rate_hz
        v = self._base + self._drift * np.sin(2 * np.pi * t / self._period + self._phase)
        v = v + rng.normal(0.0, 1.0, v.shape) * self._noise
        spikes = rng.random(v.shape) < self._spike_p
        spike_vals = self._spike_v + np.abs(rng.normal(0.0, 5.0, v.shape))
        v = np.where(spikes, spike_vals, v)
        scale = 10.0**self._decimals
        v = np.round(v * scale) / scale
        self._cache = (b, v)
        return v

    def readings(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Readings number ``first`` .. ``first+count-1`` in stream order.

        Returns (sensor index, tick, value). Stream order is tick by tick, sensors in order.
        """
        n = self.n_sensors
        idx = np.arange(first, first + count, dtype=np.int64)
        ticks = idx // n
        sensors = idx % n
        values = np.empty(count, dtype=np.float64)
        if count:
            for b in range(int(ticks[0] // BLOCK_TICKS), int(ticks[-1] // BLOCK_TICKS) + 1):
                sel = (ticks // BLOCK_TICKS) == b
                blk = self.block(b)
                values[sel] = blk[ticks[sel] - b * BLOCK_TICKS, sensors[sel]]
        return sensors, ticks, values


def factory_line(seed: int = 42) -> SignalSet:
    return SignalSet(FACTORY_LINE, seed, FACTORY_RATE_HZ)


def write_ndjson(path: str, count: int, seed: int = 42, start_ts: float = 1_764_547_200.0,
                 chunk: int = 100_000) -> int:
    """Write ``count`` factory-line readings as NDJSON; returns how many exceed 100.0."""
    sig = factory_line(seed)
    above = 0
    with open(path, "w", encoding="utf-8") as f:
        for first in range(0, count, chunk):
            k = min(chunk, count - first)
            s, t, v = sig.readings(first, k)
            above += int(np.count_nonzero(v > 100.0))
            ts = np.round(start_ts + t / sig.rate_hz, 2)
            names = sig.names[s]
            f.write(
                "".join(
                    f'{{"sensor":"{n}","ts":{a:.2f},"value":{b:.2f}}}\n'
                    for n, a, b in zip(names.tolist(), ts.tolist(), v.tolist(), strict=True)
                )
            )
    return above
