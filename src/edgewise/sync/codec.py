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

Chunks come from peers, so reading one is bounded whatever it holds (`edgewise.sync.bounded`):
the zstd frame is inflated as a stream with a running cap, the msgpack document is walked
item by item (never unpacked whole), every binary is checked against the record count before
it is read, and the Python objects that text tables and ``any`` columns make are counted
against `MAX_VALUES`. `check` validates a chunk exactly as `decode` reads it but keeps
nothing, so its memory stays small (a few MiB plus one value) for any input; `decode` then
needs memory in proportion to the records, as the columns it returns do.

Limits a chunk must keep (the edge's chunks keep them: at most 8 x ``batching.max_records``
= 8,000,000 records, one frame of 4 MiB):

* `MAX_RECORDS` records, `MAX_COLUMNS` columns;
* `MAX_VALUES` Python objects in text tables and ``any`` columns together (a value each, plus
  one per list or map and its items), i.e. two such columns of 8,000,000 plain values;
* `MAX_VALUE_BYTES` for one text value or one packed ``any`` value, `MAX_VALUE_OBJECTS`
  lists, maps and items in one ``any`` value;
* a zstd window of at most 8 MiB (compression levels 1-19).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import zstandard

from edgewise.errors import PeerError
from edgewise.sync.bounded import (
    READ_SIZE,
    BinStream,
    Budget,
    Inflater,
    pieces,
    read_bin_header,
)

VERSION = 1
_MAX_DECIMALS = 4
_LIMIT = 2**52
ZSTD_LEVEL = 3
MAX_DECODED_BYTES = 256 * 1024 * 1024  # decompressed, for `decode`; ingest checks 64 MiB
MAX_RECORDS = 10_000_000  # per chunk; bounds what a peer can make us allocate
MAX_COLUMNS = 4096
MAX_VALUES = 1 << 24  # objects of text tables and `any` columns in one chunk (16,777,216)
MAX_VALUE_BYTES = 1 << 20  # one text value, or one packed `any` value
MAX_VALUE_OBJECTS = 1 << 16  # lists, maps and their items in one `any` value
_INT_DTYPES = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


_INT_RANGES = tuple((np.dtype(dt), int(np.iinfo(dt).min), int(np.iinfo(dt).max))
                    for dt in (np.int8, np.int16, np.int32))
_POWERS = (10.0 ** np.arange(_MAX_DECIMALS + 1, dtype=np.float64))[:, None]  # a column
_FEW = 8  # values: up to this many, `_decimals` works in Python floats
_SMALL = 64  # values: up to this many, `_decimals` tries every resolution in one pass


def _small_int(a: np.ndarray) -> np.ndarray:
    if a.size == 0:
        return a.astype(np.int8)
    lo, hi = int(a.min()), int(a.max())
    for dt, low, high in _INT_RANGES:
        if low <= lo and hi <= high:
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
    wide = v.dtype == np.float64  # the fast paths compute in float64, as numpy does for it
    if wide and v.size <= _FEW:
        return _decimals_few(v.tolist())
    if not np.all(np.isfinite(v)):
        return None
    if np.max(np.abs(v)) >= _LIMIT / 10**_MAX_DECIMALS:
        return None
    if wide and v.size <= _SMALL:  # a small batch: numpy's cost is per call, so all d at once
        # the same operations as `np.round(np.round(v * f) / f, d)` (numpy rounds to d
        # decimals as rint(x * f) / f), row d for f = 10^d
        scaled = v * _POWERS
        back = np.rint(np.rint(scaled) / _POWERS * _POWERS) / _POWERS
        fits = np.flatnonzero((back == v).all(axis=1))
        return int(fits[0]) if fits.size else None
    for d in range(_MAX_DECIMALS + 1):
        # accept d only if decoding gives back exactly the same floats
        back = np.round(np.round(v * 10.0**d) / 10.0**d, d)
        if np.array_equal(back, v):
            return d
    return None


def _decimals_few(values: list[float]) -> int | None:
    """`_decimals` of a few values in Python floats: the same IEEE operations as numpy's
    (``round`` of a float is rint's round-half-even, exact as an int below 2^52, and an int
    that size divides as the float it equals), without numpy's cost per call."""
    if not all(math.isfinite(x) for x in values):
        return None
    if max(abs(x) for x in values) >= _LIMIT / 10**_MAX_DECIMALS:
        return None
    for d in range(_MAX_DECIMALS + 1):
        f = 10.0**d
        if all(round(round(x * f) / f * f) / f == x for x in values):
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
            out.append([name, "dict", values, small.tobytes(), _INT_DTYPES[small.itemsize]])
        elif col.dtype.kind == "b":
            out.append([name, "bool", None, np.packbits(col).tobytes(), "u1"])
        elif col.dtype.kind in ("i", "u"):
            d = _small_int(_delta(col.astype(np.int64), order, starts))
            out.append([name, "int", None, d.tobytes(), _INT_DTYPES[d.itemsize]])
        elif col.dtype.kind == "f":
            dec = _decimals(col)
            if dec is None:
                out.append([name, "f8", None, col.astype("<f8").tobytes(), "f8"])
            else:
                ints = np.round(col * 10.0**dec).astype(np.int64)
                d = _small_int(_delta(ints, order, starts))
                out.append([name, "dec", dec, d.tobytes(), _INT_DTYPES[d.itemsize]])
        else:
            out.append([name, "any", None, msgpack.packb(col.tolist(), default=str), ""])
    key = next(iter(encoded_text), None)
    packed = msgpack.packb({"v": VERSION, "n": n, "k": key, "c": out}, use_bin_type=True)
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(packed)


class CountMismatch(PeerError):
    """The chunk holds another number of records than the caller expected."""

    def __init__(self, found: int, expected: int) -> None:
        super().__init__(f"chunk holds {found} records, expected {expected}")
        self.found = found
        self.expected = expected


@dataclass
class _Column:
    name: str
    kind: str
    meta: Any  # dict: the table (np object array, or its length when not kept); dec: decimals
    data: Any  # bytes of the column, the values of an `any` column, or None when not kept
    dtype: str


def _itemsize(size: int, n: int) -> int:
    """The integer width a binary of ``size`` bytes has for ``n`` records (0 when n is 0)."""
    if n == 0:
        if size:
            raise ValueError(f"{size} bytes of data for 0 records")
        return 0
    width = size // n
    if size % n or width not in _INT_DTYPES:
        raise ValueError(f"{size} bytes of data do not fit {n} integers")
    return width


class _Reader:
    """Walks one chunk item by item (see the module docstring); ``keep`` says whether to
    return the columns' data (`decode`) or only to check it (`check`)."""

    def __init__(self, data: bytes, limit: int, keep: bool) -> None:
        self.keep = keep
        self.budget = Budget(MAX_VALUES, "text or `any` values in one chunk",
                             item_limit=MAX_VALUE_OBJECTS)
        # scalars only: containers are walked through their headers, binaries in pieces
        self.u = msgpack.Unpacker(
            Inflater(data, limit), read_size=READ_SIZE, raw=False,
            max_buffer_size=MAX_VALUE_BYTES + READ_SIZE, max_str_len=MAX_VALUE_BYTES,
            max_bin_len=0, max_array_len=0, max_map_len=0, max_ext_len=0)

    def read(self, records: int | None) -> tuple[int, str | None, list[_Column]]:
        u = self.u
        fields = u.read_map_header()
        if fields > 16:
            raise ValueError(f"{fields} fields in the chunk header")
        n: int | None = None
        key: str | None = None
        cols: list[_Column] | None = None
        seen: set[str] = set()
        for _ in range(fields):
            name = u.unpack()
            if type(name) is not str or name in seen:
                raise ValueError(f"bad or repeated field {name!r:.40}")
            seen.add(name)
            if name == "n":
                n = u.unpack()
                if type(n) is not int or not 0 <= n <= MAX_RECORDS:
                    raise ValueError(f"{n!r:.40} records in one chunk; at most {MAX_RECORDS} "
                                     "are allowed")
                if records is not None and n != records:
                    raise CountMismatch(n, records)
            elif name == "k":
                key = u.unpack()
                if key is not None and type(key) is not str:
                    raise ValueError("the key column must be named by a string")
            elif name == "c":
                if n is None:
                    raise ValueError("columns before the record count")
                cols = self._columns(n)
            else:
                u.skip()  # "v", and fields a newer encoder may add
        if n is None or cols is None:
            raise ValueError("no record count or no columns")
        try:  # the frame ends here (reading to its end also verifies the checksum)
            u.skip()
        except msgpack.OutOfData:
            return n, key, cols
        raise ValueError("data after the chunk")

    def _columns(self, n: int) -> list[_Column]:
        u = self.u
        count = u.read_array_header()
        if count > MAX_COLUMNS:
            raise ValueError(f"{count} columns; at most {MAX_COLUMNS} are allowed")
        cols = []
        for _ in range(count):
            if u.read_array_header() != 5:
                raise ValueError("a column is [name, kind, meta, data, dtype]")
            name, kind = u.unpack(), u.unpack()
            if type(name) is not str or type(kind) is not str:
                raise ValueError("column name and kind must be strings")
            meta = self._table(n) if kind == "dict" else u.unpack()
            size = read_bin_header(u)
            if kind == "any":
                data = self._values(n, size)
                width = 0
            elif kind in ("dict", "int", "dec"):
                width = _itemsize(size, n)
                data = self._blob(size, width, meta if kind == "dict" else None)
                if kind == "dec" and (type(meta) is not int or not 0 <= meta <= _MAX_DECIMALS):
                    raise ValueError(f"bad decimals {meta!r:.40} in column {name!r}")
            elif kind in ("f8", "bool"):
                want = 8 * n if kind == "f8" else (n + 7) // 8
                if size != want:
                    raise ValueError(f"column {name!r} has {size} bytes, expected {want}")
                data = self._blob(size, 0, None)
            else:
                raise ValueError(f"unknown column kind {kind!r:.40}")
            dtype = u.unpack()
            if type(dtype) is not str:
                raise ValueError(f"column {name!r}: dtype must be a string")
            if kind in ("dict", "int", "dec") and (
                    dtype not in _INT_DTYPES.values() or (width and dtype != _INT_DTYPES[width])):
                raise ValueError(f"column {name!r}: dtype {dtype!r:.40} does not fit its data")
            cols.append(_Column(name, kind, meta, data, dtype))
        return cols

    def _table(self, n: int) -> Any:
        """The distinct values of a text column, one string at a time."""
        u = self.u
        size = u.read_array_header()
        if size > n:
            raise ValueError(f"{size} distinct text values for {n} records")
        self.budget.charge(size)
        table = np.empty(size, dtype=object) if self.keep else None
        for i in range(size):
            s = u.unpack()
            if type(s) is not str:
                raise ValueError("text values must be strings")
            if table is not None:
                table[i] = s
        return size if table is None else table

    def _blob(self, size: int, width: int, table: Any) -> bytes | None:
        """A column's bytes, read in pieces; dictionary codes are checked against the table."""
        kept: list[bytes] = []
        entries = table if isinstance(table, int) else None if table is None else len(table)
        for piece in pieces(self.u, size):
            if entries is not None:
                codes = np.frombuffer(piece, dtype=_INT_DTYPES[width])
                if codes.min() < 0 or codes.max() >= entries:
                    raise ValueError(f"text codes outside a table of {entries} values")
            if self.keep:
                kept.append(piece)
        return b"".join(kept) if self.keep else None

    def _values(self, n: int, size: int) -> np.ndarray | None:
        """An `any` column: msgpack nested in the binary, unpacked one value at a time."""
        budget = self.budget
        stream = BinStream(self.u, size, MAX_VALUE_BYTES)
        inner = msgpack.Unpacker(
            stream, read_size=READ_SIZE, raw=False, max_buffer_size=MAX_VALUE_BYTES + READ_SIZE,
            max_str_len=MAX_VALUE_BYTES, max_bin_len=MAX_VALUE_BYTES, max_ext_len=0,
            max_array_len=MAX_VALUE_OBJECTS, max_map_len=MAX_VALUE_OBJECTS,
            list_hook=budget.list_hook, object_hook=budget.map_hook)
        if inner.read_array_header() != n:
            raise ValueError(f"an `any` column without exactly {n} values")
        budget.charge(n)
        unpack = inner.unpack
        if not self.keep:
            for _ in range(n):
                stream.mark = stream.pulled  # stream.start_item(), inline: this loop is hot
                budget.item = 0
                unpack()
            out = None
        else:
            out = np.empty(n, dtype=object)
            for i in range(n):
                stream.mark = stream.pulled
                budget.item = 0
                out[i] = unpack()
        try:
            inner.skip()
        except msgpack.OutOfData:
            return out
        raise ValueError("data after the last value of an `any` column")


def _read(data: bytes, limit: int, keep: bool,
          records: int | None) -> tuple[int, str | None, list[_Column]]:
    try:
        return _Reader(data, limit, keep).read(records)
    except PeerError:
        raise
    except Exception as exc:  # zstd, msgpack and our own checks all mean: not a chunk
        raise PeerError(f"not a valid Edgewise chunk: {exc}") from None


def check(data: bytes, *, records: int | None = None, limit: int = MAX_DECODED_BYTES) -> int:
    """Check ``data`` exactly as `decode` reads it, keeping nothing; its record count.

    At most ``limit`` bytes are inflated. Raises `CountMismatch` as soon as the header says
    another count than ``records`` (when given), `PeerError` for anything `decode` refuses.
    """
    return _read(data, limit, False, records)[0]


def decode(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode`. Raises `PeerError` on bytes that are not a valid chunk."""
    n, key, items = _read(data, MAX_DECODED_BYTES, True, None)
    try:
        key_codes = None
        for c in items:
            if c.name == key and c.kind == "dict":
                key_codes = np.frombuffer(c.data, dtype=c.dtype).astype(np.int64)
        order, starts = _group_order(key_codes, n)
        cols: dict[str, np.ndarray] = {}
        for c in items:
            if c.kind == "dict":
                codes = np.frombuffer(c.data, dtype=c.dtype)
                cols[c.name] = c.meta[codes] if n else np.empty(0, dtype=object)
            elif c.kind == "bool":
                bits = np.unpackbits(np.frombuffer(c.data, dtype=np.uint8))
                cols[c.name] = bits[:n].astype(bool)
            elif c.kind == "int":
                d = np.frombuffer(c.data, dtype=c.dtype).astype(np.int64)
                cols[c.name] = _undelta(d, order, starts)
            elif c.kind == "dec":
                d = np.frombuffer(c.data, dtype=c.dtype).astype(np.int64)
                cols[c.name] = np.round(_undelta(d, order, starts) / 10.0**c.meta, c.meta)
            elif c.kind == "f8":
                cols[c.name] = np.frombuffer(c.data, dtype="<f8").astype(np.float64)
            else:  # any
                cols[c.name] = c.data
    except Exception as exc:
        raise PeerError(f"not a valid Edgewise chunk: {exc}") from None
    return cols
