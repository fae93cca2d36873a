"""Outbox payloads encrypted at rest (AES-GCM, edgewise.security.payload): stored ciphertext,
plain codec bytes to the uplink, compaction through the cipher, another key or a moved or
modified row unreadable."""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import pytest

from edgewise.outbox import Outbox, PendingChunk
from edgewise.outbox.disk import row_cost
from edgewise.security.payload import OVERHEAD, PayloadCipher, PayloadUnreadable, file_key
from edgewise.sync import codec


def raw(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    names = np.empty(n, dtype=object)
    names[:] = [f"s{i % 4}" for i in range(n)]
    return {"sensor": names, "ts": 1000.0 + np.arange(n) / 10,
            "value": np.round(rng.uniform(0, 100, n), 2)}


def test_payloads_are_stored_encrypted_and_read_back_plain(tmp_path: Path) -> None:
    key = file_key(tmp_path / "outbox.key")
    assert (tmp_path / "outbox.key").stat().st_mode & 0o777 == 0o600
    cols = raw(500)
    plain = codec.encode(cols)
    with Outbox(tmp_path / "o.db", cipher=PayloadCipher(key)) as ob:
        ob.register_stream("agg", 5)
        ob.commit([PendingChunk("agg", cols, 500)])
        stored = ob.db.execute("SELECT payload FROM chunks").fetchone()[0]
        assert len(stored) == len(plain) + OVERHEAD
        with pytest.raises(Exception):  # noqa: B017 - whatever the codec raises on noise
            codec.decode(stored)
        (sent,) = ob.peek()
        assert codec.decode(sent.payload)["value"].tolist() == cols["value"].tolist()
        assert ob.read_stream("agg")["sensor"].tolist() == cols["sensor"].tolist()
    # reopened with the same key file: still readable
    with Outbox(tmp_path / "o.db", cipher=PayloadCipher(file_key(tmp_path / "outbox.key"))) \
            as ob:
        assert ob.read_stream("agg")["ts"].tolist() == cols["ts"].tolist()


def test_another_key_or_a_moved_or_modified_row_is_unreadable(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", cipher=PayloadCipher(secrets.token_bytes(32))) as ob:
        ob.register_stream("a", 5)
        ob.register_stream("b", 5)
        ob.commit([PendingChunk("a", raw(10), 10)])
    with Outbox(tmp_path / "o.db", cipher=PayloadCipher(secrets.token_bytes(32))) as ob, \
            pytest.raises(PayloadUnreadable, match="does not decrypt"):
        ob.peek()
    key = secrets.token_bytes(32)
    with Outbox(tmp_path / "p.db", cipher=PayloadCipher(key)) as ob:
        ob.register_stream("a", 5)
        ob.register_stream("b", 5)
        ob.commit([PendingChunk("a", raw(10), 10)])
        ob.db.execute("UPDATE chunks SET stream='b'")  # bound to its stream's name
        with pytest.raises(PayloadUnreadable):
            ob.read_stream("b")
        (stored,) = ob.db.execute("SELECT payload FROM chunks").fetchone()
        flipped = stored[:-1] + bytes([stored[-1] ^ 1])
        ob.db.execute("UPDATE chunks SET stream='a', payload=?", (flipped,))
        with pytest.raises(PayloadUnreadable):
            ob.read_stream("a")


def bound(ob: Outbox, room: int) -> None:
    """The smallest bound (bytes on disk) that leaves the chunks ``room`` bytes."""
    lo, hi = 0, 1 << 34
    while lo < hi:
        mid = (lo + hi) // 2
        ob.max_bytes = mid
        if ob.capacity() >= room:
            hi = mid
        else:
            lo = mid + 1
    ob.configure(lo, ob.sync)


def test_compaction_goes_through_the_cipher(tmp_path: Path) -> None:
    a, b, c = raw(3000, 1), raw(3000, 2), raw(3000, 3)
    cost = max(row_cost(len(codec.encode(x)) + OVERHEAD) for x in (a, b, c))
    with Outbox(tmp_path / "o.db", cipher=PayloadCipher(secrets.token_bytes(32))) as ob:
        ob.register_stream("raw", 3, compact=True)
        ob.commit([PendingChunk("raw", a, 3000)])
        ob.commit([PendingChunk("raw", b, 3000)])
        bound(ob, 2 * cost + cost // 2)  # measured with two chunks in
        report = ob.commit([PendingChunk("raw", c, 3000)])
        assert report.compacted == {"raw": 3000}
        first = next(ch for ch in ob.peek() if ch.compacted)
        assert codec.decode(first.payload)["count"].tolist() == [750] * 4
