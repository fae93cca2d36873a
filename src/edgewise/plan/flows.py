"""The data-flow model: how many records each source and stage emits, what they look like, what
they cost to process and to encode. Pure functions of the workload; no engine, no I/O.

A `Flow` describes the records leaving a source or a stage at ONE site: their rate, how many
distinct keys they carry, and a `FieldModel` per column (a statistical description, e.g. "a
reading with a base level in [40, 80], noise 0.5 at two decimals, 0.1% spikes at 100.5"). Each
operator has a transfer function (input flows -> output flow) and a CPU cost model; both are
the planner's *estimates*, which `--simulate` then checks against the real engine.

What a flow costs on the wire (a representative chunk through the real codec) is
`edgewise.plan.encoding`. A flow also says how many batches per second carry its records
(``calls``): the CPU model (`edgewise.plan.costs`) charges operators per call, per record, per
key and per window.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgewise.pipeline import registry
from edgewise.plan.workload import Signal, SourceSpec, StageSpec

# -- batching -----------------------------------------------------------------------------------
LINGER_S = {  # how long a source collects readings before handing a batch over
    "mqtt": 0.005, "http": 0.0, "modbus": 0.0, "opcua": 0.0, "file": 0.0, "simulator": 0.0,
}
MAX_BATCH = 4096
_AGG = re.compile(r"^\s*([a-z0-9]+)\s*(?:\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\))?\s*$")


@dataclass(frozen=True)
class FieldModel:
    """A statistical description of one column. ``kind`` is one of:
    key, time_tick, time_window, time_random, reading, level, mean, spike, const_num,
    const_text, count, float, grid."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Flow:
    """Records leaving a source or stage at one site."""

    rate: float  # records per second
    keys: int  # distinct keys
    fields: dict[str, FieldModel]
    key_fields: tuple[str, ...] = ("sensor",)
    windowed: float | None = None  # all keys emitted together every this many seconds
    tick_hz: float = 1.0  # sampling rate of the underlying readings, per key
    key_prefixes: tuple[tuple[str, int], ...] = (("s", 1),)
    bytes_per_record: float | None = None  # declared (user functions): skip the codec model
    scales_with_keys: bool = True
    assumed: tuple[str, ...] = ()  # notes on figures that are guesses, not derived
    calls: float = 1.0  # batches per second that carry these records to the next stage
    frame_bytes: float = 0.0  # a binary frame each record carries beside its columns (sources)

    @property
    def batch(self) -> float:
        """Records per batch (per call of the next stage)."""
        return self.rate / self.calls if self.calls > 0 else 0.0

    @property
    def per_key_rate(self) -> float:
        return self.rate / max(1, self.keys)


def source_groups(src: SourceSpec, site: str) -> list[tuple[str, int, Signal]]:
    """(prefix, count, signal) per group of sensors; keys are ``{prefix}/{i:03d}``."""
    if src.groups:
        return [(g.prefix, g.count, g.signal or src.signal) for g in src.groups]
    return [(f"{site}/{src.id}", src.count, src.signal)]


def source_flow(src: SourceSpec, site: str) -> Flow:
    groups = source_groups(src, site)
    fields = {
        "sensor": FieldModel("key"),
        "ts": FieldModel("time_tick", {"hz": src.rate_hz}),
    }
    if src.fields:  # a multi-field record: one reading column per field, its own signal
        for vf in src.fields:
            fields[vf.name] = FieldModel("reading", {
                "groups": [(c, vf.signal) for _, c, _s in groups], "decimals": vf.decimals,
            })
    else:
        fields["value"] = FieldModel("reading", {
            "groups": [(c, s) for _, c, s in groups], "decimals": src.decimals,
        })
    rate = src.count * src.rate_hz
    return Flow(
        rate=rate, keys=src.count, fields=fields, tick_hz=src.rate_hz,
        key_prefixes=tuple((p, c) for p, c, _ in groups),
        calls=rate / batch_records(rate, src.count, src.protocol),
        frame_bytes=float(src.frame_bytes or 0),
    )


def batch_records(rate: float, keys: int, protocol: str = "mqtt") -> int:
    """Records per batch a source hands to the engine: one sampling tick of all its sensors,
    or what arrives within the source's linger time, whichever is more (at most MAX_BATCH)."""
    return int(max(1, min(MAX_BATCH, max(keys, round(rate * LINGER_S[protocol])))))


# -- statistics ----------------------------------------------------------------------------------

def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _tail_normal(x: float) -> float:
    """P(N(0,1) > x)."""
    return 1.0 - _phi(x)


def exceed_fraction(fm: FieldModel, high: float | None, low: float | None) -> float | None:
    """Fraction of values beyond the limits, for readings; None if the model cannot tell."""
    if fm.kind != "reading":
        return None
    total = 0.0
    weight = 0
    bases = np.linspace(0.0, 1.0, 41)
    phases = np.sin(np.linspace(0, 2 * np.pi, 48, endpoint=False))
    for count, sig in fm.params["groups"]:
        base = sig.low + (sig.high - sig.low) * bases[:, None] + sig.drift * phases[None, :]
        p_norm = 0.0
        p_spike = 0.0
        sd = max(sig.noise, 1e-9)
        if high is not None:
            z = (high - base) / sd
            p_norm += float(np.mean(0.5 * np.vectorize(math.erfc)(z / math.sqrt(2))))
            p_spike += 1.0 if high < sig.spike_value else 2 * _tail_normal(
                (high - sig.spike_value) / 5.0)
        if low is not None:
            z = (base - low) / sd
            p_norm += float(np.mean(0.5 * np.vectorize(math.erfc)(z / math.sqrt(2))))
            p_spike += 0.0 if low < sig.spike_value else 1.0
        total += count * ((1 - sig.spike_prob) * p_norm + sig.spike_prob * min(1.0, p_spike))
        weight += count
    return total / max(weight, 1)


def _reading_noise(fm: FieldModel) -> tuple[float, float]:
    """(noise, spike probability) averaged over the groups of a reading field."""
    groups = fm.params.get("groups", [])
    n = sum(c for c, _ in groups) or 1
    return (sum(c * s.noise for c, s in groups) / n, sum(c * s.spike_prob for c, s in groups) / n)


# -- transfer functions --------------------------------------------------------------------------

def merge(flows: list[Flow]) -> Flow:
    if len(flows) == 1:
        return flows[0]
    first = flows[0]
    return replace(
        first, rate=sum(f.rate for f in flows), keys=sum(f.keys for f in flows),
        key_prefixes=tuple(p for f in flows for p in f.key_prefixes),
        assumed=tuple(a for f in flows for a in f.assumed), calls=sum(f.calls for f in flows),
    )


def decimals_of(step: float) -> int:
    for d in range(7):
        if abs(step * 10**d - round(step * 10**d)) < 1e-9:
            return d
    return 6


def stage_flow(stage: StageSpec, inputs: list[Flow]) -> Flow:
    """The estimated output of a stage at one site."""
    fin = merge(inputs)
    if stage.function is not None:
        red = stage.reduction if stage.reduction is not None else 1.0
        notes = () if stage.reduction is not None else (
            f"{stage.id}: output reduction of user function not given; 1.0 assumed",)
        return replace(
            fin, rate=fin.rate * red, windowed=None,
            bytes_per_record=stage.output_bytes_per_record or 32.0, frame_bytes=0.0,
            assumed=fin.assumed + notes, calls=_calls_with_output(fin, red),
        )
    cls = registry.resolve("operator", stage.operator or "")
    cfg = cls.Config.model_validate(stage.params)
    op = stage.operator
    out = _operator_flow(op or "", cfg, fin, stage)
    if stage.reduction is not None:
        out = replace(out, rate=fin.rate * stage.reduction)
    return out


def _calls_with_output(fin: Flow, fraction: float) -> float:
    """Input batches per second that yield at least one record when each record passes with
    probability ``fraction``."""
    batch = max(1.0, fin.batch)
    return fin.calls * (1.0 - (1.0 - min(1.0, max(0.0, fraction))) ** batch)


def _key_count(key_by: list[str], fin: Flow) -> tuple[int, bool]:
    if not key_by:
        return 1, False
    return fin.keys, True


def _operator_flow(op: str, cfg: Any, fin: Flow, stage: StageSpec) -> Flow:
    keys_fields = {k: FieldModel("key") for k in getattr(cfg, "key_by", list(fin.key_fields))}
    if op == "window":
        slide = float(cfg.slide or cfg.size)
        keys, scales = _key_count(cfg.key_by, fin)
        count = fin.rate / keys * float(cfg.size)
        src = fin.fields.get(cfg.field, FieldModel("float"))
        fields: dict[str, FieldModel] = dict(keys_fields)
        tdec = decimals_of(slide)
        for name in ("ts", "window_start"):
            fields[name] = FieldModel("time_window", {"decimals": tdec})
        fields["window_end"] = FieldModel("time_window", {"decimals": tdec, "offset": cfg.size})
        for agg in cfg.aggregates:
            m = _AGG.match(agg)
            if m is None:  # validated by the operator's Config
                continue
            name = m.group(1) if m.group(2) is None else f"{m.group(1)}_{m.group(2)}"
            kind = m.group(1)
            fsrc = fin.fields.get(m.group(2) or cfg.field, src)
            if kind == "count":
                fields[name] = FieldModel("count", {"value": max(1, round(count))})
            elif kind == "mean":
                fields[name] = FieldModel("mean", {"of": fsrc, "count": max(1, round(count))})
            elif kind == "sum":
                fields[name] = FieldModel("mean", {"of": fsrc, "count": 1})
            elif kind in ("min", "max", "first", "last"):
                fields[name] = FieldModel("level", {"of": fsrc})
            elif kind.startswith("p"):
                fields[name] = FieldModel("level", {"of": fsrc, "half": True})
            else:
                fields[name] = FieldModel("float")
        # every window closes when the first batch past its end arrives: one call per slide
        return Flow(keys / slide, keys, fields, tuple(cfg.key_by), slide, fin.tick_hz,
                    fin.key_prefixes if scales else (("all", 1),), None, scales, fin.assumed,
                    calls=min(fin.calls, 1.0 / slide))
    if op in ("threshold", "anomaly", "rate_of_change", "deadband", "filter", "downsample"):
        frac, note = _selectivity(op, cfg, fin, stage)
        fields = dict(fin.fields)
        if op == "threshold":
            fields = dict(keys_fields)
            fields["ts"] = FieldModel("time_random", {"hz": fin.tick_hz})
            vsrc = fin.fields.get(cfg.field, FieldModel("float"))
            fields["value"] = FieldModel("spike", {"of": vsrc}) if vsrc.kind == "reading" else vsrc
            fields["limit"] = FieldModel("const_num", {"value": cfg.high if cfg.high is not None
                                                       else cfg.low})
            fields["kind"] = FieldModel("const_text", {"value": "high"})
            fields["severity"] = FieldModel("const_text", {"value": cfg.severity})
        elif op == "anomaly":
            fields = {**fields, "ts": FieldModel("time_random", {"hz": fin.tick_hz}),
                      "zscore": FieldModel("float"), "mean": FieldModel("float"),
                      "std": FieldModel("float")}
        elif op == "rate_of_change":
            fields = {**fields, cfg.output: FieldModel("float")}
        sparse = frac < 0.2
        if sparse and "ts" in fields and fields["ts"].kind == "time_tick":
            fields["ts"] = FieldModel("time_random", {"hz": fin.tick_hz})
        windowed = None
        rate = fin.rate * frac
        calls = _calls_with_output(fin, frac)
        if op == "downsample" and cfg.interval is not None:
            windowed = float(cfg.interval)
            rate = fin.keys / windowed
            calls = min(fin.calls, 1.0 / windowed)
            if cfg.how == "mean":
                fields = {**keys_fields, "ts": FieldModel("time_window", {"decimals": 3}),
                          "value": FieldModel("mean", {"of": fin.fields.get(cfg.field),
                                                       "count": 10}),
                          "count": FieldModel("count", {"value": 10})}
        assumed = fin.assumed + ((note,) if note else ())
        return Flow(rate, fin.keys, fields, fin.key_fields, windowed, fin.tick_hz,
                    fin.key_prefixes, None, True, assumed, calls=calls)
    if op == "fft":
        keys = fin.keys
        rate = fin.rate / cfg.samples
        from edgewise.pipeline.operators.fft import band_name

        freqs = np.fft.rfftfreq(cfg.samples, d=1.0 / cfg.sample_rate)[1:]
        # keys arrive in step (a batch holds the same ticks of every sensor it carries), so
        # their blocks complete in the same call: once per block time per group of keys; when
        # a batch holds all keys, every key's block starts at the same time, like a window's
        per_call_keys = max(1.0, min(float(keys), fin.batch))
        block_s = cfg.samples / max(fin.per_key_rate, 1e-9)
        calls = min(fin.calls, math.ceil(keys / per_call_keys) / block_s)
        windowed = block_s if per_call_keys >= keys else None
        fields = dict(keys_fields)
        fields["ts"] = FieldModel("time_window", {"decimals": decimals_of(block_s)}) \
            if windowed else FieldModel("time_random", {"hz": fin.tick_hz})
        fields["rms"] = FieldModel("float")
        peaks = _spectral_peaks(fin.fields.get(cfg.field), cfg.samples, cfg.sample_rate)
        fields["peak_hz"] = FieldModel("grid", {"values": freqs if peaks is None else peaks})
        for lo, hi in cfg.bands:
            fields[band_name(lo, hi)] = FieldModel("float")
        return Flow(rate, keys, fields, tuple(cfg.key_by), windowed, fin.tick_hz,
                    fin.key_prefixes, None, True, fin.assumed, calls=calls)
    if op == "map":
        fields = dict(fin.fields)
        for name in cfg.set:
            fields[name] = FieldModel("float")
        for name in cfg.drop:
            fields.pop(name, None)
        for old, new in cfg.rename.items():
            if old in fields:
                fields[new] = fields.pop(old)
        return replace(fin, fields=fields)
    # an operator from a plugin: pass-through unless a reduction is declared
    note = f"{stage.id}: operator {op!r} has no model; output = input assumed"
    return replace(fin, assumed=(*fin.assumed, note))


def _spectral_peaks(fm: FieldModel | None, samples: int,
                    sample_rate: float) -> np.ndarray | None:
    """The frequencies an FFT block's largest bin takes, from the declared signal: a drift of
    amplitude A puts about A^2/3 (Hann) into its bin, noise of deviation s about 2 s^2/samples
    into each; the drift's bin is the peak when it stands ten times above the noise. None when
    that cannot be told (no reading, no drift, or drift drowned in noise)."""
    if fm is None or fm.kind != "reading":
        return None
    freqs = np.fft.rfftfreq(samples, d=1.0 / sample_rate)
    peaks = set()
    for _count, sig in fm.params["groups"]:
        k = round(samples / (float(sig.period) * sample_rate))
        if sig.drift <= 0 or not 1 <= k < len(freqs):
            return None
        if sig.drift**2 / 3 < 10 * 2 * sig.noise**2 / samples:
            return None
        peaks.add(float(freqs[k]))
    return np.array(sorted(peaks))


def _selectivity(op: str, cfg: Any, fin: Flow, stage: StageSpec) -> tuple[float, str | None]:
    """Fraction of input records a selecting operator emits, and a note if it is a guess."""
    if stage.reduction is not None:
        return stage.reduction, None
    fm = fin.fields.get(getattr(cfg, "field", "value"), FieldModel("float"))
    if op == "threshold":
        frac = exceed_fraction(fm, cfg.high, cfg.low)
        if frac is not None:
            return frac, None
        return 0.001, f"{stage.id}: alarm rate on {cfg.field!r} unknown; 0.1% assumed"
    if op == "filter":
        return 0.5, f"{stage.id}: filter selectivity unknown; 50% assumed (set reduction)"
    if op == "downsample":
        if cfg.every is not None:
            return 1.0 / cfg.every, None
        return 1.0, None
    noise, spikes = _reading_noise(fm) if fm.kind == "reading" else (0.0, 0.0)
    if fm.kind != "reading":
        return 1.0, f"{stage.id}: selectivity unknown; all records assumed to pass"
    if op == "anomaly":
        return spikes + (1 - spikes) * 2 * _tail_normal(cfg.z), None
    if op == "deadband":
        p = 1.0
        if cfg.deadband is not None and noise > 0:
            p = spikes + (1 - spikes) * 2 * _tail_normal(cfg.deadband / (noise * math.sqrt(2)))
        if cfg.max_interval is not None:
            p = max(p, 1.0 / (float(cfg.max_interval) * fin.per_key_rate))
        return min(1.0, p), None
    if op == "rate_of_change":
        if cfg.limit is None:
            return 1.0, None
        step = noise * math.sqrt(2) * fin.per_key_rate * float(cfg.per)
        p = 2 * _tail_normal(cfg.limit / step) if step > 0 else 0.0
        return min(1.0, p + 2 * spikes), None
    return 1.0, None
