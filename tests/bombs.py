"""Inputs built to exhaust a decoder: small on the wire, huge once decoded.

Shared by the unit tests of the codec and the protocol and by tests/e2e/test_bombs.py.
Every builder is cheap to run (zstd compresses runs of one byte to almost nothing).
"""

from __future__ import annotations

from typing import Any

import msgpack
import zstandard

MiB = 1024 * 1024


def array_header(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big")


def map_header(n: int) -> bytes:
    return b"\xdf" + n.to_bytes(4, "big")


def bin_header(n: int) -> bytes:
    return b"\xc6" + n.to_bytes(4, "big")


def zstd(raw: bytes, *, declare: bool = True) -> bytes:
    """One zstd frame of ``raw``; ``declare=False`` leaves out the content size."""
    if declare:
        return zstandard.ZstdCompressor(level=3).compress(raw)
    cobj = zstandard.ZstdCompressor(level=3, write_content_size=False).compressobj()
    return cobj.compress(raw) + cobj.flush()


def chunk(n: int, columns: list[bytes]) -> bytes:
    """A chunk document (uncompressed) with ``n`` records and pre-packed column arrays."""
    head = msgpack.packb({"v": 1, "n": n, "k": None}, use_bin_type=True)
    # the map header says 3 fields; make it 4 and append "c"
    return bytes([head[0] + 1]) + head[1:] + msgpack.packb("c") + array_header(
        len(columns)) + b"".join(columns)


def any_column(name: str, values: bytes) -> bytes:
    """A packed ``any`` column whose data is the msgpack bytes ``values``."""
    return (b"\x95" + msgpack.packb(name) + msgpack.packb("any") + b"\xc0"
            + bin_header(len(values)) + values + msgpack.packb(""))


def empty_arrays(size: int = 64 * MiB) -> bytes:
    """The attack report's bomb: a zstd frame declaring ``size`` bytes of msgpack, all empty
    arrays in one array (about 64 bytes of Python per byte)."""
    return zstd(array_header(size - 5) + b"\x90" * (size - 5))


def empty_arrays_in_a_column(n: int = 10_000_000) -> bytes:
    """A chunk that is valid up to its ``any`` column of ``n`` empty arrays."""
    return zstd(chunk(n, [any_column("x", array_header(n) + b"\x90" * n)]))


def nones(n: int = 10_000_000, columns: int = 2) -> bytes:
    """``columns`` ``any`` columns of ``n`` None each: millions of values, kilobytes on the
    wire."""
    col = array_header(n) + b"\xc0" * n
    return zstd(chunk(n, [any_column(f"c{i}", col) for i in range(columns)]))


def nested_value(width: int = 4000, depth: int = 90) -> bytes:
    """One record whose ``any`` value nests ``depth`` lists of ``width`` - 1 two-character
    strings each, none of them complete until the end: the costliest single value there is
    (every string is a new object, and no list is counted before it completes)."""
    level = array_header(width) + b"\xa2ab" * (width - 1)
    return zstd(chunk(1, [any_column("x", array_header(1) + level * depth + b"\xc0")]))


def text_table(n: int = 10_000_000, *, valid: bool = False) -> bytes:
    """A text column whose table holds ``n`` (empty) strings; unless ``valid``, its dtype
    does not fit its codes, which only shows after the table."""
    width = 4 if n > 32768 else 2
    dtype = f"int{8 * width}" if valid else "int8"
    col = (b"\x95" + msgpack.packb("s") + msgpack.packb("dict") + array_header(n)
           + b"\xa0" * n + bin_header(n * width) + bytes(n * width) + msgpack.packb(dtype))
    return zstd(chunk(n, [col]))


def padded(size: int, *, declare: bool = True) -> bytes:
    """A chunk header with an unknown field of ``size`` bytes of nil before its columns: a
    decoder must inflate all of it (and build nothing) before it finds anything wrong."""
    head = msgpack.packb({"v": 1, "n": 0, "k": None}, use_bin_type=True)
    return zstd(bytes([head[0] + 2]) + head[1:] + msgpack.packb("pad") + array_header(size)
                + b"\xc0" * size + msgpack.packb("c") + b"\x90", declare=declare)


def undeclared(size: int = 300 * MiB) -> bytes:
    """A zstd frame that does not declare its size: ``size`` bytes of empty arrays."""
    return zstd(array_header(size - 5) + b"\x90" * (size - 5), declare=False)


def declared(size: int = 300 * MiB) -> bytes:
    """A zstd frame declaring (and holding) ``size`` bytes."""
    return zstd(bytes(size))


# -- session frames (at most 4 MiB each) ------------------------------------------------------

FRAME = 4 * MiB - 1024


def batch_fields(**extra: Any) -> dict[str, Any]:
    return {"t": "batch", "id": 1, "stream": "raw", "seq": 0, "count": 1, "records": 1,
            "compacted": False, "payload": b"", **extra}


def frame_with(field: bytes) -> bytes:
    """A batch frame with one more field ``x`` whose packed value is ``field``."""
    head = msgpack.packb(batch_fields(), use_bin_type=True)
    return bytes([head[0] + 1]) + head[1:] + msgpack.packb("x") + field


def frame_empty_arrays(size: int = FRAME) -> bytes:
    n = size - 100
    return frame_with(array_header(n) + b"\x90" * n)


def frame_nested(size: int = FRAME, width: int = 4000) -> bytes:
    """Arrays nested as deep as msgpack allows, each with ``width`` - 1 small integers
    (none of them completes before the frame ends)."""
    depth = min(1000, size // (width * 3))
    level = array_header(width) + b"\xd1\x01\x01" * (width - 1)
    return frame_with(level * depth + b"\xc0")


def frame_huge_map(size: int = FRAME) -> bytes:
    n = (size - 100) // 12
    body = b"".join(msgpack.packb(f"k{i:08d}") + b"\xc0" for i in range(n))
    return frame_with(map_header(n) + body)


def frame_long_strings(size: int = FRAME) -> bytes:
    n = (size - 100) // 4
    return frame_with(b"\x94" + (b"\xdb" + n.to_bytes(4, "big") + b"a" * n) * 3
                       + b"\xc0")


FRAMES = {
    "empty arrays": frame_empty_arrays,
    "nested arrays": frame_nested,
    "huge map": frame_huge_map,
    "long strings": frame_long_strings,
}
