"""What a flow costs on the wire: uplink bytes from the data-flow model, and the naive baseline.

`encoded_bytes` builds one representative uplink chunk from a `Flow`'s field models
(`synth_chunk`: seeded random values with the declared statistics) and encodes it with the real
wire codec, so the per-record cost includes the codec's dictionary, delta and zstd behaviour;
`wire_overhead` adds framing, TLS and TCP/IP. The naive design it is compared with sends one
JSON message per reading over MQTT (`json_reading_bytes`, `mqtt_message_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgewise.plan.flows import FieldModel, Flow, decimals_of, source_groups
from edgewise.plan.workload import SourceSpec
from edgewise.sync import codec

# -- wire overheads (bytes) ----------------------------------------------------------------------
UPLINK_FRAMING = 32  # uplink session frame per chunk: stream, sequence range, checksum
TLS_RECORD = 22  # TLS 1.3: 5-byte header, 16-byte tag, 1 content-type byte per record
TLS_RECORD_MAX = 16384
TCP_IP_SEGMENT = 40  # IPv4 + TCP headers per segment
TCP_MSS = 1448
MAX_SYNTH_RECORDS = 100_000  # larger chunks are encoded at this size and scaled


def _key_names(flow: Flow) -> np.ndarray:
    names: list[str] = []
    for prefix, count in flow.key_prefixes:
        names.extend(f"{prefix}/{i:03d}" for i in range(count))
    if len(names) < flow.keys:
        names.extend(f"key/{i:05d}" for i in range(len(names), flow.keys))
    out = np.empty(max(1, flow.keys), dtype=object)
    out[:] = names[: max(1, flow.keys)] if names else ["all"]
    return out


def _levels(fm: FieldModel | None, n_keys: int, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                    float, int]:
    """Per-key base levels, noise and decimals of the reading a field derives from."""
    while fm is not None and fm.kind in ("level", "mean", "spike"):
        fm = fm.params.get("of")
    if fm is None or fm.kind != "reading":
        return rng.uniform(0, 100, n_keys), 1.0, 2
    levels = []
    noise = []
    for count, sig in fm.params["groups"]:
        levels.append(rng.uniform(sig.low, sig.high, count))
        noise.append(np.full(count, sig.noise))
    lv = np.concatenate(levels)
    reps = math.ceil(n_keys / len(lv))
    return np.tile(lv, reps)[:n_keys], float(np.mean(np.concatenate(noise))), \
        fm.params["decimals"]


def synth_chunk(flow: Flow, n: int, t0: float, span: float,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A representative chunk of ``n`` records covering ``span`` seconds from ``t0``."""
    names = _key_names(flow)
    k = len(names)
    if flow.windowed is not None:
        kid = np.tile(np.arange(k), math.ceil(n / k))[:n]
        windows = np.repeat(np.arange(math.ceil(n / k)), k)[:n]
    elif flow.rate >= flow.keys * flow.tick_hz * 0.5:  # every key at every tick: stream order
        kid = np.arange(n) % k
        windows = np.arange(n) // k
    else:
        kid = rng.integers(0, k, n)
        windows = np.zeros(n, dtype=np.int64)
    levels, noise, dec = _levels(flow.fields.get("value"), k, rng)
    cols: dict[str, np.ndarray] = {}
    for name, fm in flow.fields.items():
        cols[name] = _synth_field(fm, name, names, kid, windows, n, t0, span, flow, rng,
                                  levels, noise, dec)
    return cols


def _synth_field(fm: FieldModel, name: str, names: np.ndarray, kid: np.ndarray,
                 windows: np.ndarray, n: int, t0: float, span: float, flow: Flow,
                 rng: np.random.Generator, levels: np.ndarray, noise: float,
                 dec: int) -> np.ndarray:
    kind = fm.kind
    if kind == "key" or kind == "const_text":
        if kind == "key":
            return names[kid]
        out = np.empty(n, dtype=object)
        out[:] = fm.params["value"]
        return out
    if kind == "time_tick":
        hz = fm.params["hz"]
        return np.round(t0 + windows / hz, 6)
    if kind == "time_window":
        step = flow.windowed or 1.0
        return np.round(t0 + windows * step + fm.params.get("offset", 0.0), 9)
    if kind == "time_random":
        hz = fm.params["hz"]
        ticks = np.sort(rng.integers(0, max(1, int(span * hz)), n))
        return np.round(t0 + ticks / hz, 6)
    if kind == "count":
        return np.full(n, int(fm.params["value"]), dtype=np.int64)
    if kind == "const_num":
        return np.full(n, float(fm.params["value"] or 0.0))
    if kind == "float":  # derived statistics: full float64, similar magnitudes
        return rng.normal(1.0, 0.15, n)
    if kind == "grid":
        return rng.choice(np.asarray(fm.params["values"]), n)
    lv, nz, dd = _levels(fm, len(names), rng)
    scale = 10.0**dd  # quantise the way the sensors (and the simulator) do: round(v*s)/s
    if kind == "reading":
        v = lv[kid] + rng.normal(0, 1, n) * nz
        return np.round(v * scale) / scale
    if kind == "level":
        v = lv[kid] + rng.normal(0, 1, n) * nz * 2
        if fm.params.get("half"):
            return np.round(v * scale * 2) / (scale * 2)
        return np.round(v * scale) / scale
    if kind == "mean":
        c = int(fm.params.get("count", 1))
        total = np.round((lv[kid] + rng.normal(0, 1, n) * nz / math.sqrt(c)) * c * scale)
        return total / scale / c
    if kind == "spike":
        src = fm.params.get("of")
        spike = src.params["groups"][0][1].spike_value if src is not None and \
            src.kind == "reading" else 100.5
        return np.round((spike + np.abs(rng.normal(0, 5, n))) * scale) / scale
    return rng.normal(0, 1, n)


def wire_overhead(payload: int) -> int:
    """Bytes on the socket for one chunk of ``payload`` bytes: framing, TLS, TCP/IP."""
    framed = payload + UPLINK_FRAMING
    tls = framed + TLS_RECORD * max(1, math.ceil(framed / TLS_RECORD_MAX))
    return tls + TCP_IP_SEGMENT * max(1, math.ceil(tls / TCP_MSS)) - payload


@dataclass(frozen=True)
class StreamBytes:
    chunks_per_s: float
    records_per_chunk: float
    payload_per_chunk: float  # codec bytes
    wire_per_s: float  # bytes/s on the socket, all overheads included

    @property
    def payload_per_s(self) -> float:
        return self.chunks_per_s * self.payload_per_chunk


def encoded_bytes(flow: Flow, interval: float, seed: int = 7) -> StreamBytes:
    """Uplink bytes of a stream sent as one chunk per ``interval`` seconds."""
    if flow.rate <= 0:
        return StreamBytes(0.0, 0.0, 0.0, 0.0)
    if flow.windowed is not None:
        per_window = flow.keys
        windows_per_chunk = max(1.0, interval / flow.windowed)
        chunks_per_s = 1.0 / max(interval, flow.windowed)
        n = per_window * windows_per_chunk
    else:
        lam = flow.rate * interval
        chunks_per_s = (1 - math.exp(-lam)) / interval if lam < 50 else 1.0 / interval
        n = flow.rate / chunks_per_s
    if flow.bytes_per_record is not None:
        payload = n * flow.bytes_per_record
    else:
        rng = np.random.default_rng(seed)
        m = int(min(max(1, round(n)), MAX_SYNTH_RECORDS))
        cols = synth_chunk(flow, m, 1_764_547_200.0, interval, rng)
        payload = len(codec.encode(cols)) * (n / m)
    payload += n * flow.frame_bytes  # frames (images, waveform blocks) do not compress here
    wire = chunks_per_s * (payload + wire_overhead(int(payload)))
    return StreamBytes(chunks_per_s, n, payload, wire)


# -- the naive baseline ---------------------------------------------------------------------------

def json_reading_bytes(src: SourceSpec, site: str) -> float:
    """Size of ``{"sensor": ..., "ts": ..., "value": ...}`` for a typical reading (with every
    field of a multi-field record)."""
    if src.bytes_per_sample is not None:
        return float(src.bytes_per_sample)
    prefix = source_groups(src, site)[0][0]
    tdec = max(2, decimals_of(1.0 / src.rate_hz))
    ts = f"{1_764_547_200.0:.{min(tdec, 6)}f}"
    values = [(f.name, f.signal, f.decimals) for f in src.fields] or \
        [("value", src.signal, src.decimals)]
    body = "".join(f',"{name}":{(sig.low + sig.high) / 2:.{dec}f}' for name, sig, dec in values)
    frame = math.ceil((src.frame_bytes or 0) * 4 / 3)  # base64 in JSON
    frame_field = f',"frame":"{"A" * frame}"' if frame else ""
    return float(len(f'{{"sensor":"{prefix}/000","ts":{ts}{body}{frame_field}}}'))


def mqtt_message_bytes(topic_len: int, payload: float) -> float:
    """One MQTT PUBLISH (QoS 0) in its own TLS record; TCP/IP headers not counted."""
    body = 2 + topic_len + payload
    length_bytes = 1 if body < 128 else 2 if body < 16384 else 3
    return 1 + length_bytes + body + TLS_RECORD
