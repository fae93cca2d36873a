"""The wire codec: every column comes back exactly; anything that is not a chunk is a PeerError."""

from __future__ import annotations

import math
import re
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgewise.errors import PeerError
from edgewise.sync import codec

sys.path.insert(0, str(Path(__file__).parents[1]))
import bombs  # tests/bombs.py

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
NAMES = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(
    lambda s: not s.startswith("_")
)


def decimal_floats(n: int) -> st.SearchStrategy[np.ndarray]:
    """Values with 0-4 decimals, as a sensor at that resolution reports them."""
    return st.integers(0, 4).flatmap(
        lambda d: st.lists(
            st.integers(-(10**11), 10**11).map(lambda k: k / 10**d), min_size=n, max_size=n
        )
    ).map(lambda v: np.array(v, dtype=np.float64))


def floats_with_nan(n: int) -> st.SearchStrategy[np.ndarray]:
    special = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0])
    value = st.one_of(special, st.integers(-(10**6), 10**6).map(lambda k: k / 100))
    return st.lists(value, min_size=n, max_size=n).map(lambda v: np.array(v, dtype=np.float64))


def any_floats(n: int) -> st.SearchStrategy[np.ndarray]:
    return st.lists(
        st.floats(allow_nan=True, allow_infinity=True), min_size=n, max_size=n
    ).map(lambda v: np.array(v, dtype=np.float64))


def ints(n: int) -> st.SearchStrategy[np.ndarray]:
    small = st.integers(-1000, 1000)
    return st.lists(st.one_of(INT64, small), min_size=n, max_size=n).map(
        lambda v: np.array(v, dtype=np.int64)
    )


def strings(n: int) -> st.SearchStrategy[np.ndarray]:
    few = st.sampled_from(["line1/temp/000", "line1/temp/001", "pump", "", "ü-Δ-✓"])
    return st.lists(st.one_of(few, st.text(max_size=20)), min_size=n, max_size=n).map(obj)


def bools(n: int) -> st.SearchStrategy[np.ndarray]:
    return st.lists(st.booleans(), min_size=n, max_size=n).map(lambda v: np.array(v, dtype=bool))


def mixed_objects(n: int) -> st.SearchStrategy[np.ndarray]:
    item = st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=5))
    return st.lists(item, min_size=n, max_size=n).map(obj)


def obj(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


KINDS = [decimal_floats, floats_with_nan, ints, strings, bools, mixed_objects]


@st.composite
def batches(draw: st.DrawFn, kinds: list = KINDS) -> dict[str, np.ndarray]:
    n = draw(st.integers(0, 100))
    names = draw(st.lists(NAMES, min_size=1, max_size=6, unique=True))
    return {name: draw(draw(st.sampled_from(kinds))(n)) for name in names}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        assert len(g) == len(w), name
        if w.dtype.kind == "f":
            assert g.dtype == np.float64, name
            assert np.array_equal(g, w, equal_nan=True), (name, g, w)
        elif w.dtype.kind == "i":
            assert g.dtype == np.int64, name
            assert g.tolist() == w.tolist(), name
        elif w.dtype.kind == "b":
            assert g.dtype == bool and g.tolist() == w.tolist(), name
        else:
            assert g.dtype == object and g.tolist() == w.tolist(), name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_round_trip(cols: dict[str, np.ndarray]) -> None:
    assert_same(codec.decode(codec.encode(cols)), cols)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.integers(1, 19))
def test_round_trip_at_any_compression_level(cols: dict[str, np.ndarray], level: int) -> None:
    assert_same(codec.decode(codec.encode(cols, level=level)), cols)


def test_values_finer_than_four_decimals_are_not_rounded() -> None:
    cols = {"v": np.array([1.5e-7, 2.5e-7]), "w": np.array([0.30000001, 1.0])}
    assert_same(codec.decode(codec.encode(cols)), cols)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@settings(max_examples=200, deadline=None)
@given(st.integers(0, 50).flatmap(any_floats))
def test_arbitrary_floats_round_trip(v: np.ndarray) -> None:
    cols = {"v": v}
    assert_same(codec.decode(codec.encode(cols)), cols)


def test_factory_line_chunk_is_small_and_exact() -> None:
    from edgewise.sim.signals import factory_line

    sig = factory_line(42)
    s, t, v = sig.readings(0, 10_000)
    cols = {"sensor": sig.names[s], "ts": np.round(1_764_547_200.0 + t / 50, 2), "value": v}
    data = codec.encode(cols)
    assert_same(codec.decode(data), cols)
    assert len(data) < 10_000 * 4  # under 4 bytes a reading (JSON is about 60)


def test_internal_columns_are_not_sent() -> None:
    cols = {"v": np.array([1.0, 2.0]), "_accepted": np.array([0.1, 0.2])}
    assert list(codec.decode(codec.encode(cols))) == ["v"]


def test_empty_batch() -> None:
    assert codec.decode(codec.encode({})) == {}
    got = codec.decode(codec.encode({"s": obj([]), "v": np.array([], dtype=np.float64)}))
    assert got["s"].tolist() == [] and got["v"].tolist() == []


def _pack(doc: dict) -> bytes:
    return zstandard.ZstdCompressor().compress(msgpack.packb(doc, use_bin_type=True))


GOOD = codec.encode({"sensor": obj(["a", "b", "a"]), "v": np.array([1.5, 2.25, 3.0])})

GARBAGE = {
    "empty": b"",
    "text": b"hello world",
    "truncated": GOOD[: len(GOOD) // 2],
    "flipped": GOOD[:10] + bytes([GOOD[10] ^ 0xFF]) + GOOD[11:],
    "zstd of non-msgpack": zstandard.ZstdCompressor().compress(b"\xc1\xc1\xc1"),
    "not a map": _pack([1, 2, 3]),
    "no columns": _pack({"v": 1, "n": 3}),
    "wrong length": _pack(
        {"v": 1, "n": 5, "k": None, "c": [["v", "int", None, b"\x01\x02\x03", "int8"]]}
    ),
    "unknown kind": _pack({"v": 1, "n": 1, "k": None, "c": [["v", "zzz", None, b"", ""]]}),
    "bad dtype": _pack({"v": 1, "n": 1, "k": None, "c": [["v", "int", None, b"\0" * 8, "O"]]}),
    "code out of range": _pack({"v": 1, "n": 1, "k": "s",
                                "c": [["s", "dict", ["a"], b"\x07", "int8"]]}),
    "negative n": _pack({"v": 1, "n": -1, "k": None, "c": [["v", "int", None, b"", "int8"]]}),
    "column not a list": _pack({"v": 1, "n": 1, "k": None, "c": [7]}),
}


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_a_peer_error(data: bytes) -> None:
    with pytest.raises(PeerError, match="not a valid Edgewise chunk"):
        codec.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_are_a_peer_error(data: bytes) -> None:
    with pytest.raises(PeerError):
        codec.decode(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.integers(1, 255))
def test_corrupted_chunks_never_crash_the_decoder(pos: int, flip: int) -> None:
    data = GOOD[:pos] + bytes([GOOD[pos] ^ flip]) + GOOD[pos + 1 :]
    try:
        cols = codec.decode(data)
    except PeerError:
        return
    # without a frame checksum some flips go unnoticed; what comes back is still well formed
    assert len({len(v) for v in cols.values()}) <= 1


def test_a_flipped_byte_never_changes_the_data_silently() -> None:
    cols = {"sensor": np.array(["line1/temp/001"] * 50, dtype=object), "v": np.arange(50.0)}
    data = codec.encode(cols)
    refused = 0
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        try:
            decoded = codec.decode(bytes(flipped))
        except PeerError:
            refused += 1
        else:
            assert_same(decoded, cols)  # a flip that still decodes must not change the data
    assert refused >= len(data) - 8  # only a few frame-header bits are harmless


def test_a_chunk_claiming_too_many_records_is_refused_before_allocating() -> None:
    packed = msgpack.packb({"v": 1, "n": 10**9, "k": None, "c": []}, use_bin_type=True)
    with pytest.raises(PeerError, match="at most 10000000"):
        codec.decode(zstandard.ZstdCompressor().compress(packed))


# -- bounded reading: bombs and the largest legitimate chunks -----------------------------------

MB = 1024 * 1024


def peak_traced(fn: Callable[[], object]) -> tuple[int, object]:
    """Peak bytes Python allocated while ``fn`` ran, and what it returned or raised."""
    tracemalloc.start()
    try:
        try:
            out: object = fn()
        except PeerError as exc:
            out = exc
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


BOMBS = {  # small on the wire; hundreds of MB to GB if unpacked whole
    "64 MiB of empty arrays": lambda: bombs.empty_arrays(64 * MB),
    "no declared size, 300 MiB": lambda: bombs.undeclared(300 * MB),
    "10M empty arrays in an any column": lambda: bombs.empty_arrays_in_a_column(10_000_000),
    "two any columns of 10M None": lambda: bombs.nones(10_000_000, 2),
    "text table of 10M values": lambda: bombs.text_table(10_000_000),
}


@pytest.mark.parametrize("name", BOMBS)
def test_bombs_are_refused(name: str) -> None:
    data = BOMBS[name]()
    assert len(data) < 100_000
    for read in (codec.check, codec.decode):
        with pytest.raises(PeerError, match="not a valid Edgewise chunk"):
            read(data)


@pytest.mark.parametrize(
    "make",
    [lambda: bombs.empty_arrays(8 * MB), lambda: bombs.empty_arrays_in_a_column(1_000_000),
     lambda: bombs.nones(1_000_000, 2), lambda: bombs.text_table(1_000_000, valid=True),
     lambda: bombs.padded(8 * MB)],
    ids=["empty arrays", "empty arrays in an any column", "any columns of None", "text table",
         "padding"],
)
def test_checking_a_chunk_keeps_memory_small_whatever_it_holds(make: Callable[[], bytes]) -> None:
    data = make()
    peak, _ = peak_traced(lambda: codec.check(data))
    assert peak < 4 * MB, peak  # read buffers and one value; unpacked whole: 60-500 MB


def test_the_costliest_single_value_is_bounded() -> None:
    """One `any` value is built whole (and dropped) before the next: at most 1 MiB packed and
    65,536 counted objects, plus what its unfinished lists hold, about 20 MB at worst."""
    peak, out = peak_traced(lambda: codec.check(bombs.nested_value()))
    assert isinstance(out, PeerError) and "more than 65536 objects in one value" in str(out)
    assert peak < 32 * MB, peak


def test_decode_caps_what_a_frame_without_declared_size_inflates() -> None:
    assert codec.decode(bombs.padded(1000, declare=False)) == {}  # valid, just padded
    data = bombs.padded(codec.MAX_DECODED_BYTES, declare=False)
    with pytest.raises(PeerError, match=f"decompresses to more than {codec.MAX_DECODED_BYTES}"):
        codec.decode(data)
    with pytest.raises(PeerError, match="decompresses to more than 65536 bytes"):
        codec.check(data, limit=65536)


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ([["v", "any", None, msgpack.packb([[[]] * 70_000]), ""]],
         "70000 exceeds max_array_len"),  # one value: at most 65,536 items
        ([["v", "any", None, msgpack.packb(["x" * (MB + 1)]), ""]],
         "exceeds max_str_len"),  # one value: at most 1 MiB
        ([["v", "any", None, msgpack.packb([[[0] * 60_000, [0] * 60_000]]), ""]],
         "more than 65536 objects in one value"),
        ([["v", "any", None, b"\x91" * 1100 + b"\xc0", ""]], "not a valid"),  # too deep
        ([["v", "any", None, msgpack.packb([{1: 2}]), ""]], "int is not allowed for map key"),
        ([["v", "any", None, msgpack.packb([1, 2]), ""]], "without exactly 1 values"),
        ([["v", "any", None, msgpack.packb([1]) + b"\xc0", ""]], "data after the last value"),
        ([["v", "dict", [1], b"\x00", "int8"]], "text values must be strings"),
        ([["v", "dict", ["a", "b"], b"\x00", "int8"]], "2 distinct text values for 1 records"),
        ([["v", "dict", ["a"], b"\xff", "int8"]], "text codes outside a table of 1 values"),
        ([["v", "int", None, b"\x00\x00\x00", ""]], "3 bytes of data do not fit 1 integers"),
        ([["v", "int", None, b"\x00\x00", "int8"]], "dtype 'int8' does not fit its data"),
        ([["v", "dec", 9, b"\x00", "int8"]], "bad decimals 9"),
        ([["v", "bool", None, b"\x00\x00", "u1"]], "has 2 bytes, expected 1"),
        ([["v", "f8", None, "not bytes", "f8"]], "expected binary data"),
        ([["v", "int", None, b"\x00", "int8"]] * (codec.MAX_COLUMNS + 1), "4097 columns"),
    ],
)
def test_limits_of_one_chunk(doc: list, reason: str) -> None:
    data = _pack({"v": 1, "n": 1, "k": None, "c": doc})
    for read in (codec.check, codec.decode):
        with pytest.raises(PeerError, match=re.escape(reason)):
            read(data)


def test_record_count_is_compared_before_the_columns_are_read() -> None:
    data = bombs.nones(10_000_000, 1)
    started = time.perf_counter()
    with pytest.raises(codec.CountMismatch) as info:
        codec.check(data, records=5)
    assert (info.value.found, info.value.expected) == (10_000_000, 5)
    assert time.perf_counter() - started < 1  # the header says it; nothing else is read


def test_a_large_chunk_with_every_kind_of_column_decodes() -> None:
    n = 1_000_000
    rng = np.random.default_rng(7)
    mixed = obj([None, 7, "x", {"a": [1, 2]}, [3, [4]], 2.5] * (n // 6) + [None] * (n % 6))
    cols = {
        "sensor": obj([f"dev/{i:07d}" for i in range(n)]),  # a million distinct texts
        "ts": np.round(1_764_547_200.0 + np.arange(n) * 0.02, 2),
        "value": rng.normal(size=n),
        "count": rng.integers(-(2**62), 2**62, size=n),
        "ok": rng.random(n) < 0.5,
        "extra": mixed,
    }
    data = codec.encode(cols)
    assert codec.check(data) == n
    assert_same(codec.decode(data), cols)


@pytest.mark.slow
def test_the_largest_chunk_the_edge_makes_passes() -> None:
    """8 x the largest batching.max_records: 8,000,000 records in one chunk that a frame can
    carry, with two per-value columns (text and `any`) beside the numbers."""
    n = 8 * 1_000_000
    assert n <= codec.MAX_RECORDS and 2 * n <= codec.MAX_VALUES
    anys = np.empty(n, dtype=object)  # mostly None, a few values that are not
    anys[::1000] = 1.5
    texts = np.array([f"line1/temp/{i:03d}" for i in range(200)], dtype=object)[
        np.arange(n) % 200]
    cols = {"t": texts, "a": anys, "v": np.arange(n, dtype=np.int64)}
    data = codec.encode(cols)
    assert len(data) < 4 * MB  # fits one frame
    assert codec.check(data, records=n, limit=64 * MB) == n  # ingest's limit
    got = codec.decode(data)
    assert got["a"][1000] == 1.5 and got["a"][1] is None and got["t"][n - 1] == texts[-1]
    assert got["v"][-1] == n - 1


def _decimals_one_at_a_time(v: np.ndarray) -> int | None:
    """The resolution check as it was written first: each d in turn, through np.round."""
    if v.size == 0:
        return 0
    if not np.all(np.isfinite(v)):
        return None
    if np.max(np.abs(v)) >= codec._LIMIT / 10**codec._MAX_DECIMALS:
        return None
    for d in range(codec._MAX_DECIMALS + 1):
        back = np.round(np.round(v * 10.0**d) / 10.0**d, d)
        if np.array_equal(back, v):
            return d
    return None


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10**9, 10**9).map(lambda i: i / 100.0),
    st.integers(-10**7, 10**7).map(lambda i: i / 10_000.0),
    st.integers(-10**6, 10**6).map(lambda i: i / 100_000.0),
    st.floats(-1e12, 1e12).map(lambda f: round(f, 3))), min_size=1, max_size=80))
def test_a_small_batchs_resolution_is_the_one_a_check_of_each_resolution_finds(
        values: list[float]) -> None:
    # small batches take every resolution in one numpy pass; it must pick the same d (and so
    # the same bytes) as checking one resolution after another
    v = np.array(values, dtype=np.float64)
    assert codec._decimals(v) == _decimals_one_at_a_time(v)


@pytest.mark.parametrize("values", [
    [0.125], [2.5, -0.0, 0.5], [1.005], [0.1 + 0.2], [1e11 / 3], [123456789.1234],
    [4.35, 4.45, -4.55], [1e15], [float("inf")], [float("nan"), 1.0], [0.00005, 0.00015],
    [20.25 + k * 0.01 for k in range(8)], [20.25 + k * 0.01 for k in range(9)],
    [1.0 / 3 + k for k in range(64)], [0.5 * k for k in range(65)]])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_the_resolution_of_tricky_values_is_the_one_a_check_of_each_resolution_finds(
        values: list[float], dtype: type) -> None:
    # narrower floats are checked in their own precision, as numpy computes for them
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.array(values, dtype=dtype)
        assert codec._decimals(v) == _decimals_one_at_a_time(v)
