"""Bounded decoding of what a peer sends: every budget is checked before memory is spent.

A peer's bytes are small; what they *describe* need not be. A 2 KB zstd frame can declare
64 MiB, and 64 MiB of msgpack can describe 64 million empty lists (about 4.5 GB of Python
objects). So nothing a peer sends is decoded by trusting what it declares:

* **bytes**: a zstd frame is decompressed as a stream (`Inflater`) with a running cap and a
  bounded window, never into one buffer sized by what the frame says;
* **objects**: msgpack containers are counted as they complete (`Budget`, through msgpack's
  ``list_hook`` and ``object_hook``), against a budget for the whole message and one for each
  item; lengths of containers, strings and binaries are capped by the unpacker's limits;
* **pieces**: large binaries are read from the stream in pieces of at most `PIECE` bytes
  (`read_bin_header`, `pieces`), and msgpack nested in a binary is unpacked from the stream
  (`BinStream`), so no binary is ever held twice.

What each message may hold is decided by its decoder (`edgewise.sync.codec` for chunks,
`edgewise.sync.protocol` for session frames); this module only enforces it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import zstandard

PIECE = 1 << 20  # bytes of a binary read at once
READ_SIZE = 1 << 16  # bytes an unpacker pulls from its stream at once
MAX_WINDOW = 1 << 23  # zstd window; the encoder's levels 1-19 use at most 8 MiB


class BudgetExceeded(ValueError):
    """A message would build more objects than its budget allows."""


class Budget:
    """Counts the objects msgpack builds: a completed list or map costs 1 plus its length.

    Scalars are counted by their container (or by the caller, for top-level items). ``limit``
    is for the whole message, ``item_limit`` for one item (reset by `start_item`).
    """

    __slots__ = ("item", "item_limit", "limit", "total", "what")

    def __init__(self, limit: int, what: str, item_limit: int | None = None) -> None:
        self.limit = limit
        self.what = what
        self.item_limit = limit if item_limit is None else item_limit
        self.total = 0
        self.item = 0

    def charge(self, n: int) -> None:
        """Count ``n`` objects of the message (not of the current item)."""
        self.total += n
        if self.total > self.limit:
            raise BudgetExceeded(f"more than {self.limit} {self.what}")

    def start_item(self) -> None:
        self.item = 0

    def _over(self) -> None:
        if self.total > self.limit:
            raise BudgetExceeded(f"more than {self.limit} {self.what}")
        raise BudgetExceeded(f"more than {self.item_limit} objects in one value")

    # one function each, no calls unless over budget: msgpack may call them millions of times
    def list_hook(self, obj: list[Any]) -> list[Any]:
        size = 1 + len(obj)
        self.item += size
        self.total += size
        if self.item > self.item_limit or self.total > self.limit:
            self._over()
        return obj

    def map_hook(self, obj: dict[Any, Any]) -> dict[Any, Any]:
        size = 1 + len(obj)
        self.item += size
        self.total += size
        if self.item > self.item_limit or self.total > self.limit:
            self._over()
        return obj


class no_gc:
    """The cyclic garbage collector paused while a bounded unpack builds its objects (the
    msgpack docs' advice): objects that are freed right after never survive a collection, so
    they never add up to a full one (tens of ms of a big heap, on the event loop). A class,
    not a generator-based context manager: it runs for every session frame, and contextlib's
    machinery cost more than the pause itself."""

    __slots__ = ("enabled",)

    def __enter__(self) -> None:
        self.enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            gc.enable()


_local = threading.local()  # per thread: a zstd decompression context not in use


class Inflater:
    """The decompressed bytes of one zstd frame as a file-like; raises `ValueError` as soon as
    more than ``limit`` bytes have come out, whatever the frame declares (or does not).

    Making a zstd decompression context cost more than checking a small chunk with it (12 of
    some 50 µs for a 5-reading chunk), so each thread keeps one: an Inflater takes it (or
    makes one if it is in use) and hands it back once it has read its frame to the end (a
    new stream resets the context; the window limit stays). One that stops early (a bad
    frame, the limit) drops it."""

    def __init__(self, data: bytes, limit: int) -> None:
        dctx = getattr(_local, "dctx", None)
        if dctx is None:
            dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        else:
            _local.dctx = None  # taken: another Inflater meanwhile makes its own
        self._dctx: zstandard.ZstdDecompressor | None = dctx
        self._reader: Any = dctx.stream_reader(data)
        self.limit = limit
        self.total = 0

    def read(self, size: int = READ_SIZE) -> bytes:
        if self._reader is None:
            return b""
        out = self._reader.read(min(size, PIECE) if size >= 0 else PIECE)
        if not out:  # the frame's end (its checksum verified): the context is free again
            self._reader = None
            _local.dctx, self._dctx = self._dctx, None
            return out
        self.total += len(out)
        if self.total > self.limit:
            raise ValueError(f"decompresses to more than {self.limit} bytes")
        return out


def read_exact(u: msgpack.Unpacker, n: int) -> bytes:
    """The next ``n`` raw bytes of ``u``'s stream; `ValueError` if it ends first."""
    data = u.read_bytes(n)
    while len(data) < n:
        more = u.read_bytes(n - len(data))
        if not more:
            raise ValueError("truncated data")
        data += more
    return data


_BIN_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def read_bin_header(u: msgpack.Unpacker) -> int:
    """Consume the header of the msgpack binary that comes next in ``u``; its length. The
    body is left in the stream for `pieces` or `BinStream`."""
    width = _BIN_WIDTH.get(read_exact(u, 1)[0])
    if width is None:
        raise ValueError("expected binary data")
    return int.from_bytes(read_exact(u, width), "big")


def pieces(u: msgpack.Unpacker, size: int) -> Iterator[bytes]:
    """The next ``size`` bytes of ``u``'s stream, in pieces of at most `PIECE` bytes."""
    while size > 0:
        n = min(size, PIECE)
        yield read_exact(u, n)
        size -= n


class BinStream:
    """The next ``size`` bytes of ``u``'s stream as a file-like, to unpack msgpack that is
    nested in a binary without holding the binary. One item may pull at most ``item_bytes``
    (plus one read ahead) after `start_item`."""

    def __init__(self, u: msgpack.Unpacker, size: int, item_bytes: int) -> None:
        self._u = u
        self.left = size
        self.item_bytes = item_bytes
        self.pulled = 0
        self.mark = 0

    def start_item(self) -> None:
        self.mark = self.pulled

    def read(self, size: int = READ_SIZE) -> bytes:
        n = min(size if size >= 0 else READ_SIZE, self.left, PIECE)
        if n <= 0:
            return b""
        if self.pulled - self.mark > self.item_bytes + READ_SIZE:
            raise ValueError(f"a value of more than {self.item_bytes} bytes")
        data = read_exact(self._u, n)
        self.left -= n
        self.pulled += n
        return data
