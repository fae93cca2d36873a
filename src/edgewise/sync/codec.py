"""The wire codec: batches of records as compressed columns.

Used for every chunk stored in the outbox and sent on the uplink, by edge and cloud alike.

Encoding, per column:
* text  -> a dictionary of distinct values plus small integer codes;
* float -> if every value is a multiple of 10^-d (d <= 4, the sensor resolution), the scaled
  integers; otherwise raw float64;
* int   -> the integers;
* numbers are then delta-encoded, per key when the batch has a text column (the first one, e.g.
  ``sensor``), so a slowly drifting signal becomes a stream of small integers;
* the smallest integer type that fits is used, everything is packed with msgpack and compressed
  with zstd.

`decode` gives back exactly the columns that went in (floats at their detected resolution).
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import zstandard

from edgewise.errors import PeerError

VERSION = 1
_MAX_DECIMALS = 4
_LIMIT = 2**52
ZSTD_LEVEL = 3
MAX_DECODED_BYTES = 256 * 1024 * 1024
MAX_RECORDS = 10_000_000  # per chunk; bounds what a peer can make us allocate


def _small_int(a: np.ndarray) -> np.ndarray:
    if a.size == 0:
        return a.astype(np.int8)
    lo, hi = int(a.min()), int(a.max())
    for dt in (np.int8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return a.astype(dt)
    return a.astype(np.int64)


def _group_order(codes: np.ndarray | None, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    if codes is None or n < 2:
        return None, None
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    starts[1:] = sc[1:] != sc[:-1]
    return order, starts


def _delta(a: np.ndarray, order: np.ndarray | None, starts: np.ndarray | None) -> np.ndarray:
    if a.size == 0:
        return a
    if order is None:
        d = np.empty_like(a)
        d[0] = a[0]
        d[1:] = a[1:] - a[:-1]
        return d
    s = a[order]
    d = np.empty_like(s)
    d[0] = s[0]
    d[1:] = s[1:] - s[:-1]
    d[starts] = s[starts]
    out = np.empty_like(a)
    out[order] = d
    return out


def _undelta(d: np.ndarray, order: np.ndarray | None, starts: np.ndarray | None) -> np.ndarray:
    if d.size == 0:
        return d
    if order is None:
        return np.cumsum(d)
    s = d[order]
    cs = np.cumsum(s)
    idx = np.flatnonzero(starts)
    base = cs[idx] - s[idx]
    group = np.cumsum(starts) - 1
    vals = cs - base[group]
    out = np.empty_like(vals)
    out[order] = vals
    return out


def _decimals(v: np.ndarray) -> int | None:
    if v.size == 0:
        return 0
    if not np.all(np.isfinite(v)):
        return None
    if np.max(np.abs(v)) >= _LIMIT / 10**_MAX_DECIMALS:
        return None
    for d in range(_MAX_DECIMALS + 1):
        # accept d only if decoding gives back exactly the same floats
        back = np.round(np.round(v * 10.0**d) / 10.0**d, d)
        if np.array_equal(back, v):
            return d
    return None


def encode(columns: dict[str, np.ndarray], level: int = ZSTD_LEVEL) -> bytes:
    """Encode equally long columns (internal ``_`` columns are skipped) into bytes."""
    cols = {k: v for k, v in columns.items() if not k.startswith("_")}
    n = len(next(iter(cols.values()))) if cols else 0
    key_codes: np.ndarray | None = None
    out: list[list[Any]] = []
    # dictionary-encode text first so its codes can drive per-key deltas
    encoded_text: dict[str, tuple[list[str], np.ndarray]] = {}
    for name, col in cols.items():
        if col.dtype.kind in ("O", "U") and all(isinstance(x, str) for x in col.tolist()):
            table: dict[str, int] = {}
            codes = np.fromiter(
                (table.setdefault(x, len(table)) for x in col.tolist()), dtype=np.int64, count=n
            )
            encoded_text[name] = (list(table), codes)
            if key_codes is None:
                key_codes = codes
    order, starts = _group_order(key_codes, n)
    for name, col in cols.items():
        if name in encoded_text:
            values, codes = encoded_text[name]
            small = _small_int(codes)
            out.append([name, "dict", values, small.tobytes(), str(small.dtype)])
        elif col.dtype.kind == "b":
            out.append([name, "bool", None, np.packbits(col).tobytes(), "u1"])
        elif col.dtype.kind in ("i", "u"):
            d = _small_int(_delta(col.astype(np.int64), order, starts))
            out.append([name, "int", None, d.tobytes(), str(d.dtype)])
        elif col.dtype.kind == "f":
            dec = _decimals(col)
            if dec is None:
                out.append([name, "f8", None, col.astype("<f8").tobytes(), "f8"])
            else:
                ints = np.round(col * 10.0**dec).astype(np.int64)
                d = _small_int(_delta(ints, order, starts))
                out.append([name, "dec", dec, d.tobytes(), str(d.dtype)])
        else:
            out.append([name, "any", None, msgpack.packb(col.tolist(), default=str), ""])
    key = next(iter(encoded_text), None)
    packed = msgpack.packb({"v": VERSION, "n": n, "k": key, "c": out}, use_bin_type=True)
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(packed)


def decode(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode`. Raises `PeerError` on bytes that are not a valid chunk."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_DECODED_BYTES)
        doc = msgpack.unpackb(raw, raw=False)
        n = int(doc["n"])
        items = doc["c"]
        if not 0 <= n <= MAX_RECORDS:
            raise ValueError(f"{n} records in one chunk; at most {MAX_RECORDS} are allowed")
        key = doc.get("k")
    except Exception as exc:  # zstd, msgpack and key errors all mean the same: not a chunk
        raise PeerError(f"not a valid Edgewise chunk: {exc}") from None
    cols: dict[str, np.ndarray] = {}
    try:
        key_codes = None
        for name, kind, _meta, blob, dtype in items:
            if name == key and kind == "dict":
                key_codes = np.frombuffer(blob, dtype=dtype).astype(np.int64)
        order, starts = _group_order(key_codes, n)
        for name, kind, meta, blob, dtype in items:
            if kind == "dict":
                codes = np.frombuffer(blob, dtype=dtype)
                table = np.array(meta, dtype=object)
                cols[name] = table[codes] if n else np.empty(0, dtype=object)
            elif kind == "bool":
                cols[name] = np.unpackbits(np.frombuffer(blob, dtype=np.uint8))[:n].astype(bool)
            elif kind == "int":
                d = np.frombuffer(blob, dtype=dtype).astype(np.int64)
                cols[name] = _undelta(d, order, starts)
            elif kind == "dec":
                d = np.frombuffer(blob, dtype=dtype).astype(np.int64)
                cols[name] = np.round(_undelta(d, order, starts) / 10.0**meta, int(meta))
            elif kind == "f8":
                cols[name] = np.frombuffer(blob, dtype="<f8").astype(np.float64)
            elif kind == "any":
                arr = np.empty(n, dtype=object)
                arr[:] = msgpack.unpackb(blob, raw=False)
                cols[name] = arr
            else:
                raise ValueError(f"unknown column kind {kind!r}")
            if len(cols[name]) != n:
                raise ValueError(f"column {name!r} has {len(cols[name])} values, expected {n}")
    except PeerError:
        raise
    except Exception as exc:
        raise PeerError(f"not a valid Edgewise chunk: {exc}") from None
    return cols
