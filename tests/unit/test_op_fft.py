"""The fft operator: per-block RMS, peak frequency and band powers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from conftest import make_spec
from edgewise.errors import SpecError
from edgewise.pipeline import checkpoint as ckpt
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.operators.fft import FftBands, FftConfig, band_name
from edgewise.pipeline.operators.filter import MissingFieldError

FS = 1024.0  # Hz
N = 1024  # samples per block: 1 Hz bins


def make(**cfg: Any) -> FftBands:
    cfg = {"samples": N, "sample_rate": FS, **cfg}
    return FftBands("f", FftConfig.model_validate(cfg), RunContext("t", Path(".")))


def sine(freq: float, amp: float, n: int, offset: float = 0.0, start: int = 0) -> np.ndarray:
    k = np.arange(start, start + n)
    return offset + amp * np.sin(2 * np.pi * freq * k / FS)


def readings(values: np.ndarray, sensor: str = "v1", t0: float = 1000.0, start: int = 0) -> Batch:
    n = len(values)
    ts = t0 + (start + np.arange(n)) / FS
    s = np.empty(n, dtype=object)
    s[:] = sensor
    return Batch({"sensor": s, "ts": ts, "value": values,
                  ACCEPTED: np.arange(start, start + n, dtype=float)}, n)


BANDS = [[0, 40], [40, 60], [60, 200], [200, 512]]


@pytest.mark.parametrize("window", ["none", "hann"])
def test_sine_on_a_bin(window: str) -> None:
    op = make(bands=BANDS, window=window)
    out = op.process(readings(sine(50.0, 2.0, N, offset=5.0)))
    assert out.n == 1
    rec = out.to_records()[0]
    assert list(rec) == ["sensor", "ts", "rms", "peak_hz", "band_0_40", "band_40_60",
                         "band_60_200", "band_200_512"]
    assert rec["sensor"] == "v1"
    assert rec["ts"] == 1000.0
    assert rec["peak_hz"] == 50.0
    assert rec["rms"] == pytest.approx(math.sqrt(5.0**2 + 2.0**2 / 2), rel=1e-12)
    assert rec["band_40_60"] == pytest.approx(2.0, rel=1e-9)  # A^2 / 2
    for other in ("band_0_40", "band_60_200", "band_200_512"):
        assert rec[other] == pytest.approx(0.0, abs=1e-18)


def test_hann_spreads_a_tone_over_three_bins() -> None:
    op = make(bands=[[49, 50], [50, 51], [51, 52]], window="hann")
    rec = op.process(readings(sine(50.0, 2.0, N))).to_records()[0]
    assert rec["band_49_50"] == pytest.approx(1 / 3, rel=1e-9)
    assert rec["band_50_51"] == pytest.approx(4 / 3, rel=1e-9)
    assert rec["band_51_52"] == pytest.approx(1 / 3, rel=1e-9)


def test_two_tones_peak_is_the_larger_and_bands_split() -> None:
    x = sine(120.0, 1.0, N) + sine(300.0, 3.0, N)
    rec = make(bands=BANDS, window="none").process(readings(x)).to_records()[0]
    assert rec["peak_hz"] == 300.0
    assert rec["band_60_200"] == pytest.approx(0.5, rel=1e-9)
    assert rec["band_200_512"] == pytest.approx(4.5, rel=1e-9)
    assert rec["rms"] == pytest.approx(math.sqrt(0.5 + 4.5), rel=1e-12)


def test_parseval_bands_over_the_whole_spectrum_give_the_variance() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, N)
    op = make(bands=[[0, 513]], window="none")
    rec = op.process(readings(x)).to_records()[0]
    assert rec["band_0_513"] == pytest.approx(float(np.var(x)), rel=1e-9)
    op = make(bands=[[0, 513]], window="none", remove_mean=False)
    rec = op.process(readings(x)).to_records()[0]
    assert rec["band_0_513"] == pytest.approx(float(np.mean(x * x)), rel=1e-9)


def test_peak_to_the_bin_at_another_rate_and_odd_block_size() -> None:
    op = FftBands("f", FftConfig(samples=1000, sample_rate=2000.0, bands=[[100, 200]],
                                 window="hann"), RunContext("t", Path(".")))
    k = np.arange(1000)
    x = np.sin(2 * np.pi * 146.0 * k / 2000.0)  # bin 73 of 2 Hz bins
    s = np.array(["m"] * 1000, dtype=object)
    rec = op.process(Batch({"sensor": s, "ts": k / 2000.0, "value": x})).to_records()[0]
    assert rec["peak_hz"] == 146.0
    assert rec["band_100_200"] == pytest.approx(0.5, rel=1e-9)


def test_blocks_across_batches_and_keys() -> None:
    op = make(bands=[[40, 60]], window="hann")
    xa = sine(50.0, 1.0, 3 * N)
    xb = sine(200.0, 1.0, 2 * N)
    outs = []
    # interleave: batches of 700 readings of a, then of b
    for i in range(0, 3 * N, 700):
        parts = [readings(xa[i:i + 700], "a", start=i)]
        if i < 2 * N:
            parts.append(readings(xb[i:i + 700], "b", start=i))
        r = op.process(Batch.concat(parts))
        if r is not None:
            outs += r.to_records(internal=True)
    assert [(r["sensor"], r["ts"], r["peak_hz"]) for r in outs] == [
        ("a", 1000.0, 50.0), ("b", 1000.0, 200.0), ("a", 1001.0, 50.0), ("b", 1001.0, 200.0),
        ("a", 1002.0, 50.0),
    ]
    # the block's accept time is that of the reading that completed it
    assert [r[ACCEPTED] for r in outs] == [1023.0, 1023.0, 2047.0, 2047.0, 3071.0]
    assert [r["band_40_60"] for r in outs if r["sensor"] == "a"] == pytest.approx([0.5] * 3)
    assert [r["band_40_60"] for r in outs if r["sensor"] == "b"] == pytest.approx(
        [0.0] * 2, abs=1e-18)


def test_partial_block_is_held_not_emitted() -> None:
    op = make()
    assert op.process(readings(sine(50.0, 1.0, N - 1))) is None
    out = op.process(readings(sine(50.0, 1.0, 1, start=N - 1), start=N - 1))
    assert out.n == 1
    assert out["ts"].tolist() == [1000.0]
    assert op.flush() is None  # partial blocks are never emitted


def test_snapshot_restore_mid_block_matches_uninterrupted() -> None:
    x = sine(77.0, 1.5, 2 * N, offset=1.0) + np.random.default_rng(2).normal(0, 0.1, 2 * N)
    whole = make(bands=BANDS).process(readings(x)).to_records(internal=True)
    op = make(bands=BANDS)
    got = op.process(readings(x[:1500])).to_records(internal=True)
    state = ckpt.unpack(ckpt.pack(op.snapshot()))
    fresh = make(bands=BANDS)
    fresh.restore(state)
    got += fresh.process(readings(x[1500:], start=1500)).to_records(internal=True)
    assert got == whole
    assert [r["peak_hz"] for r in got] == [77.0, 77.0]


def test_band_names() -> None:
    assert band_name(0, 100) == "band_0_100"
    assert band_name(12.5, 25) == "band_12p5_25"
    assert band_name(1000, 2500.75) == "band_1000_2500p75"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("sample_rate: 1000", "spec.stages.0.samples: Field required (add it)"),
        ("samples: 2, sample_rate: 1000",
         "spec.stages.0.samples: Input should be greater than or equal to 4"),
        ("samples: 8, sample_rate: 1000, bands: [[50, 10]]",
         "spec.stages.0.bands: band [50, 10]: need 0 <= lo < hi (in Hz)"),
        ("samples: 8, sample_rate: 1000, bands: [[10, 50], [10, 50]]",
         "spec.stages.0.bands: band [10, 50] is listed twice"),
        ("samples: 8, sample_rate: 1000, bands: [[600, 700]]",
         "spec.stages.0: band [600, 700] starts above the Nyquist frequency 500 Hz"),
        ("samples: 8, sample_rate: 1000, window: hamming",
         "spec.stages.0.window: Input should be 'hann' or 'none'"),
    ],
)
def test_spec_errors(params: str, message: str) -> None:
    body = f"""
    sources:
      - {{id: s, type: simulator, realtime: false, limit: 10}}
    stages:
      - {{id: f, type: fft, inputs: [s], {params}}}
    """
    with pytest.raises(SpecError) as err:
        make_spec(body)
    text = str(err.value)
    assert text.startswith("<test>:9: "), text
    assert text.split(": ", 1)[1].startswith(message), text


async def test_fft_in_the_engine(tmp_path: Path) -> None:
    src = tmp_path / "vib.ndjson"
    k = np.arange(4 * 256)
    x = np.round(np.sin(2 * np.pi * 64.0 * k / 512.0), 6)
    src.write_bytes(b"".join(
        orjson.dumps({"sensor": "vib1", "ts": 1000.0 + i / 512.0, "value": float(v)}) + b"\n"
        for i, v in enumerate(x)
    ))
    spec = make_spec(
        f"""
        sources:
          - {{id: s, type: file, path: "{src}", batch: 300}}
        stages:
          - id: vib
            type: fft
            inputs: [s]
            samples: 256
            sample_rate: 512
            bands: [[0, 50], [50, 100], [100, 256]]
        sinks:
          - {{id: out, type: file, inputs: [vib], path: out.ndjson}}
        """
    )
    await Engine(spec, tmp_path / "data").run()
    got = [orjson.loads(x) for x in (tmp_path / "data" / "out.ndjson").read_bytes().splitlines()]
    assert [(r["ts"], r["peak_hz"]) for r in got] == [
        (1000.0, 64.0), (1000.5, 64.0), (1001.0, 64.0), (1001.5, 64.0),
    ]
    assert [r["band_50_100"] for r in got] == pytest.approx([0.5] * 4, rel=1e-5)


def test_missing_field_is_a_clear_error() -> None:
    b = Batch.from_records([{"sensor": "a", "ts": 1.0, "value": 2.0}])
    with pytest.raises(MissingFieldError) as err:
        make(field="accel").process(b)
    assert str(err.value) == (
        "stage 'f': field 'accel' is not in the records (they have: sensor, ts, value); "
        "check the stage's field, key_by and time_field"
    )
