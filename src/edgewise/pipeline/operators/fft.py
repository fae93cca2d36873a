"""Vibration features per block of samples: RMS, peak frequency and band powers (numpy FFT).

    - id: vib
      type: fft
      inputs: [accelerometers]
      samples: 1024         # readings per block, per key
      sample_rate: 2048     # Hz: the sensor's sampling rate (readings are assumed evenly spaced)
      window: hann          # hann | none
      bands: [[0, 100], [100, 400], [400, 1024]]

Per key the operator collects ``samples`` readings; every full block becomes one record with the
key fields, ``ts`` (event time of the block's first reading), ``rms`` (root mean square of the raw
readings, offset included), ``peak_hz`` (frequency of the largest non-DC bin) and one
``band_<lo>_<hi>`` column per band (a ``.`` in a number is written ``p``: ``band_12p5_25``). The
record's ``_accepted`` is that of the reading that completed the block. Gaps in event time are not
detected: readings are taken as consecutive samples.

Normalisation. With ``x`` the block (its mean removed when ``remove_mean`` is on, the default),
``w`` the window (periodic Hann, or all ones) and ``X = rfft(w * x)``, the power of bin ``k``
(frequency ``k * sample_rate / samples``) is

    P[k] = c[k] * |X[k]|^2 / (samples * sum(w^2))     c = 1 at DC and Nyquist, 2 elsewhere

so the sum of ``P`` over all bins is the mean square of the (windowed, power-corrected) block, in
the field's units squared. A band's value is the sum of ``P[k]`` over bins with ``lo <= f < hi``.
A sine of amplitude ``A`` centred on a bin puts ``A^2 / 2`` into a band that holds that bin (and,
with Hann, its two neighbours).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import ComponentConfig, Emit, Operator, RunContext
from edgewise.pipeline.operators.filter import require_fields
from edgewise.pipeline.operators.keys import KeyIndex


def _num(x: float) -> str:
    return f"{x:g}".replace(".", "p").replace("-", "m").replace("+", "")


def band_name(lo: float, hi: float) -> str:
    return f"band_{_num(lo)}_{_num(hi)}"


class FftConfig(ComponentConfig):
    field: str = Field(default="value", description="the sampled signal")
    samples: int = Field(ge=4, le=1 << 22, description="readings per block (per key)")
    sample_rate: float = Field(gt=0, description="sampling rate of the sensor, Hz")
    bands: list[tuple[float, float]] = Field(
        default=[], description="[lo, hi) Hz ranges; each gives a band_<lo>_<hi> power column"
    )
    window: Literal["hann", "none"] = Field(default="hann", description="taper before the FFT")
    remove_mean: bool = Field(default=True, description="subtract the block mean before the FFT")
    key_by: list[str] = Field(default=["sensor"], description="fields that identify a series")
    time_field: str = Field(default="ts", description="event time field (epoch seconds)")

    @field_validator("bands")
    @classmethod
    def _bands(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        names = set()
        for lo, hi in v:
            if not 0 <= lo < hi:
                raise ValueError(f"band [{lo:g}, {hi:g}]: need 0 <= lo < hi (in Hz)")
            name = band_name(lo, hi)
            if name in names:
                raise ValueError(f"band [{lo:g}, {hi:g}] is listed twice")
            names.add(name)
        return v

    @model_validator(mode="after")
    def _below_nyquist(self) -> FftConfig:
        nyquist = self.sample_rate / 2
        for lo, hi in self.bands:
            if lo > nyquist:
                raise ValueError(
                    f"band [{lo:g}, {hi:g}] starts above the Nyquist frequency {nyquist:g} Hz "
                    f"(sample_rate / 2); it could never hold energy"
                )
        return self


class FftBands(Operator):
    Config = FftConfig

    def __init__(self, id: str, config: FftConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        n = config.samples
        self.keys = KeyIndex(config.key_by)
        if config.window == "hann":
            self.w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)  # periodic Hann
        else:
            self.w = np.ones(n)
        self.freqs = np.fft.rfftfreq(n, d=1.0 / config.sample_rate)
        scale = np.full(len(self.freqs), 2.0)
        scale[0] = 1.0
        if n % 2 == 0:
            scale[-1] = 1.0
        self.scale = scale / (n * float(np.sum(self.w * self.w)))
        self.bands = [
            (band_name(lo, hi), (self.freqs >= lo) & (self.freqs < hi)) for lo, hi in config.bands
        ]
        self.buf: dict[int, np.ndarray] = {}  # key id -> readings of the unfinished block
        self.buf_t0: dict[int, float] = {}  # key id -> event time of its first reading

    def spectrum(self, block: np.ndarray) -> np.ndarray:
        """Power per bin (see the module docstring) of one block.

        One block at a time on purpose: numpy's FFT of a stack of blocks can differ from the
        FFT of one block in the last bit, and a block's features must not depend on how the
        readings happened to be batched (or on a restart in between).
        """
        x = block - block.mean() if self.config.remove_mean else block
        spec = np.fft.rfft(x * self.w)
        return (spec.real**2 + spec.imag**2) * self.scale

    def process(self, batch: Batch) -> Emit:
        if batch.n == 0:
            return None
        cfg = self.config
        require_fields(batch, [*cfg.key_by, cfg.field, cfg.time_field], self.id)
        n = cfg.samples
        kid = self.keys.ids_for(batch)
        v = batch.columns[cfg.field].astype(np.float64, copy=False)
        t = batch.columns[cfg.time_field].astype(np.float64, copy=False)
        order = np.argsort(kid, kind="stable")
        sk = kid[order]
        bounds = np.flatnonzero(np.concatenate(([True], sk[1:] != sk[:-1], [True])))
        blocks: list[np.ndarray] = []
        block_kid: list[int] = []
        block_t0: list[float] = []
        block_end: list[int] = []  # batch row that completed the block
        for a, z in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            k = int(sk[a])
            rows = order[a:z]
            old = self.buf.get(k)
            held = 0 if old is None else len(old)
            seq = v[rows] if old is None else np.concatenate((old, v[rows]))
            nb = len(seq) // n
            for j in range(nb):
                start = j * n - held
                block_t0.append(self.buf_t0[k] if start < 0 else float(t[rows[start]]))
                block_end.append(int(rows[(j + 1) * n - 1 - held]))
                block_kid.append(k)
            if nb:
                blocks.append(seq[: nb * n].reshape(nb, n))
            rest = seq[nb * n :]
            if len(rest):
                if nb or old is None:
                    self.buf_t0[k] = float(t[rows[nb * n - held]])
                self.buf[k] = rest.copy()
            else:
                self.buf.pop(k, None)
                self.buf_t0.pop(k, None)
        if not blocks:
            return None
        data = np.concatenate(blocks)
        by_completion = np.argsort(np.array(block_end), kind="stable")
        data = data[by_completion]
        kids = np.array(block_kid, dtype=np.int64)[by_completion]
        m = len(kids)
        rms = np.empty(m)
        peak = np.empty(m)
        band_power = np.empty((len(self.bands), m))
        for j in range(m):
            block = data[j].copy()  # its own buffer, however the blocks were stacked
            power = self.spectrum(block)
            rms[j] = math.sqrt(float(np.mean(block * block)))
            peak[j] = self.freqs[1 + int(np.argmax(power[1:]))]
            for b, (_, mask) in enumerate(self.bands):
                band_power[b, j] = power[mask].sum()
        cols = self.keys.columns(kids)
        cols["ts"] = np.array(block_t0)[by_completion]
        cols["rms"] = rms
        cols["peak_hz"] = peak
        for b, (name, _) in enumerate(self.bands):
            cols[name] = band_power[b]
        acc = batch.columns.get(ACCEPTED)
        if acc is not None:
            cols[ACCEPTED] = acc[np.array(block_end, dtype=np.int64)[by_completion]]
        return Batch(cols, len(kids))

    def snapshot(self) -> Any:
        return {
            "keys": self.keys.snapshot(),
            # readings as little-endian float64 bytes: exact, and cheap to pack at every commit
            "buffers": [
                [k, self.buf_t0[k], b.astype("<f8").tobytes()] for k, b in self.buf.items()
            ],
        }

    def restore(self, state: Any) -> None:
        if not state:
            return
        self.keys.restore(state["keys"])
        self.buf = {
            int(k): np.frombuffer(raw, dtype="<f8").astype(np.float64)
            for k, _, raw in state["buffers"]
        }
        self.buf_t0 = {int(k): float(t0) for k, t0, _ in state["buffers"]}
