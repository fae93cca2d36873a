"""`sync.bounded`: the per-thread zstd context an `Inflater` reuses, and `no_gc`."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import zstandard

from edgewise.errors import PeerError
from edgewise.sync import bounded, codec
from edgewise.sync.bounded import Inflater, no_gc

COMPRESS = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True)


def chunk(i: int) -> bytes:
    return codec.encode({"sensor": np.array([f"s/{i}/{k}" for k in range(5)], dtype=object),
                         "value": np.arange(5, dtype=np.float64) + i})


def read_all(f: Inflater) -> bytes:
    out = b""
    while piece := f.read(7):
        out += piece
    return out


def test_a_frame_read_to_its_end_hands_its_context_to_the_next_inflater() -> None:
    read_all(Inflater(COMPRESS.compress(b"warm up"), 100))
    ctx = bounded._local.dctx
    assert ctx is not None
    f = Inflater(COMPRESS.compress(b"abc" * 10), 100)
    assert (f._dctx, bounded._local.dctx) == (ctx, None)  # taken while in use
    assert read_all(f) == b"abc" * 10
    assert bounded._local.dctx is ctx and f.read() == b""  # handed back; the reader is done


def test_inflaters_alive_at_once_do_not_share_a_context() -> None:
    read_all(Inflater(COMPRESS.compress(b"warm up"), 100))
    a = Inflater(COMPRESS.compress(b"a" * 300), 1000)
    b = Inflater(COMPRESS.compress(b"b" * 200), 1000)
    assert a._dctx is not b._dctx
    got = {"a": b"", "b": b""}
    while True:  # interleaved reads
        pa, pb = a.read(10), b.read(10)
        got["a"] += pa
        got["b"] += pb
        if not pa and not pb:
            break
    assert got == {"a": b"a" * 300, "b": b"b" * 200}


@pytest.mark.parametrize("bad", [
    lambda c: c[:len(c) // 2],  # truncated
    lambda c: c[:-4] + b"\0\0\0\0",  # checksum wrong
    lambda c: c[:20] + bytes(b ^ 0x55 for b in c[20:]),  # corrupted
])
def test_a_bad_frame_never_spoils_the_next_check(bad) -> None:  # type: ignore[no-untyped-def]
    good = chunk(1)
    assert codec.check(good, records=5) == 5
    with pytest.raises(PeerError):
        codec.check(bad(chunk(2)), records=5)
    assert codec.check(good, records=5) == 5
    assert codec.decode(good)["value"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_over_the_limit_drops_the_context() -> None:
    read_all(Inflater(COMPRESS.compress(b"warm up"), 100))
    f = Inflater(COMPRESS.compress(b"x" * 1000), 100)
    with pytest.raises(ValueError, match="more than 100 bytes"):
        read_all(f)
    assert bounded._local.dctx is None  # dropped with the failed reader; the next makes one
    assert read_all(Inflater(COMPRESS.compress(b"y" * 50), 100)) == b"y" * 50
    assert bounded._local.dctx is not None


def test_each_thread_has_its_own_context() -> None:
    read_all(Inflater(COMPRESS.compress(b"main"), 100))
    seen: list[object] = []

    def work() -> None:
        seen.append(getattr(bounded._local, "dctx", None))
        assert codec.check(chunk(3), records=5) == 5
        seen.append(bounded._local.dctx)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen[0] is None and seen[1] is not None and seen[1] is not bounded._local.dctx


def test_no_gc_pauses_the_collector_and_restores_its_state() -> None:
    assert gc.isenabled()
    with no_gc():
        assert not gc.isenabled()
        with no_gc():  # nested: the outer one re-enables
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), no_gc():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with no_gc():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
