"""The wire codec: every column comes back exactly; anything that is not a chunk is a PeerError."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgewise.errors import PeerError
from edgewise.sync import codec

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
