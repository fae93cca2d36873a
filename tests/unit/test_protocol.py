"""Session frames: what `protocol.decode` accepts, and that no frame can make it build much or
run long (it runs on the event loop of both sides)."""

from __future__ import annotations

import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import pytest

from edgewise.errors import PeerError
from edgewise.sync import protocol
from edgewise.sync.hlc import HLC
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import ReportedState

sys.path.insert(0, str(Path(__file__).parents[1]))
import bombs  # tests/bombs.py

MB = 1024 * 1024


def decode_measured(frame: bytes) -> tuple[float, int, Any]:
    """Seconds, peak bytes Python allocated, and the message (or the PeerError)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        try:
            out: Any = protocol.decode(frame)
        except PeerError as exc:
            out = exc
        return time.perf_counter() - started, tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", bombs.FRAMES)
def test_frame_bombs_are_refused_cheaply(name: str) -> None:
    frame = bombs.FRAMES[name]()
    assert len(frame) <= protocol.MAX_FRAME_BYTES
    seconds, peak, out = decode_measured(frame)
    assert isinstance(out, PeerError), type(out)
    assert "besides a batch payload" in str(out)
    assert peak < 2 * len(frame) + MB, peak  # a copy of the frame, never what it describes
    assert seconds < 1.0  # about 10 ms; unpacked whole these took 0.2-5 s


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        (bombs.array_header(20) + (bombs.array_header(50_000) + b"\x90" * 50_000) * 20,
         "frame holds more than 65536 lists, maps and items in one frame"),
        (b"\x91" * 1100 + b"\xc0", "frame is not valid msgpack"),  # deeper than msgpack goes
        (bombs.map_header(70_000) + b"".join(
            msgpack.packb(f"k{i:05d}") + b"\xc0" for i in range(70_000)),
         "70000 exceeds max_map_len(65536)"),
        (b"\xd4\x01\x00", "frame is not valid msgpack"),  # no ext types
    ],
)
def test_fields_are_bounded_in_objects_too(field: bytes, reason: str) -> None:
    seconds, peak, out = decode_measured(bombs.frame_with(field))
    assert isinstance(out, PeerError) and reason in str(out), out
    assert peak < 8 * MB and seconds < 1.0, (peak, seconds)


def test_the_largest_legitimate_frames_decode() -> None:
    payload = os.urandom(protocol.MAX_FRAME_BYTES - 200)
    msg = protocol.decode(protocol.encode(bombs.batch_fields(payload=payload)))
    assert msg["payload"] == payload
    streams = {f"stream-{i:04d}-{'x' * 100}": i % 10 for i in range(2000)}
    hello = {"t": "hello", "agent": "edgewise/1", "streams": streams, "applied_version": 3}
    assert protocol.decode(protocol.encode(hello)) == hello
    setpoints = LwwMap()
    for i in range(2000):
        setpoints.set(f"line1/setpoint/{i:04d}", {"value": i * 0.5, "unit": "bar"},
                      HLC(1_764_547_200_000 + i, 0, "node-a"))
    report = ReportedState(7, "running", {f"s{i}": i for i in range(500)}, setpoints)
    got = protocol.decode(protocol.encode({"t": "report", "report": report.to_wire()}))
    assert ReportedState.from_wire(got["report"]) == report
    ack = {"t": "ack", "ids": list(range(20_000))}
    assert protocol.decode(protocol.encode(ack)) == ack


MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("fields", "ok"),
    [
        ({"seq": MAX - 1, "count": 1, "records": 1}, True),
        ({"seq": 0, "count": MAX, "records": 5, "compacted": True}, True),
        ({"seq": MAX, "count": 1, "records": 1}, False),  # ends past 2**63 - 1
        ({"seq": 2**63, "count": 1, "records": 1}, False),
        ({"seq": 2**64 - 1, "count": 1, "records": 1}, False),
        ({"seq": 2**62, "count": 2**62, "records": 2**62}, False),
        ({"seq": 0, "count": 2**64 - 1, "records": 1, "compacted": True}, False),
        ({"seq": 0, "count": 3, "records": 4, "compacted": True}, False),  # more than count
        ({"seq": -1, "count": 1, "records": 1}, False),
    ],
)
def test_sequence_numbers_must_fit_64_bit_integers(fields: dict[str, Any], ok: bool) -> None:
    for msg in (bombs.batch_fields(**fields),
                {"t": "gap", "stream": "raw", "seq": fields["seq"], "count": fields["count"],
                 "reason": "evicted"}):
        frame = msgpack.packb(msg, use_bin_type=True)
        if ok:
            assert protocol.decode(frame)["seq"] == fields["seq"]
        elif msg["t"] == "batch" or fields["seq"] + fields["count"] > MAX or fields["seq"] < 0:
            with pytest.raises(PeerError, match=f"{msg['t']} "):
                protocol.decode(frame)
