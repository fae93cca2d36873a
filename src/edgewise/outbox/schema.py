"""The outbox database's tables, and the small key-value ``meta`` table.

* ``streams``: per stream its priority, next sequence number and counts;
* ``chunks``: one row per stream per group commit, a contiguous range of sequence numbers;
* ``lost``: sequence ranges whose records are gone and not in the cloud (evicted, dropped when
  full, or lost with a replaced or damaged outbox), each with its reason, kept until the cloud's
  contiguous mark has passed them (`edgewise.outbox.numbering`);
* ``dead_letters``, ``checkpoint``: as in docs/architecture.md;
* ``meta``: ``epoch`` (a random id made with the file: a new file is a new epoch),
  ``numbered_for`` (the node id whose sequence space the numbers are in, once a cloud has
  welcomed this outbox) and ``generation`` (bumped each time the numbers are moved).

An outbox written by an older version gets the new tables when it is opened (``CREATE ... IF NOT
EXISTS``) and an epoch of its own; its ``origin`` is then ``adopted``, a new file's ``new``.
"""

from __future__ import annotations

import secrets
import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    priority INTEGER NOT NULL,
    compact INTEGER NOT NULL DEFAULT 0,
    next_seq INTEGER NOT NULL DEFAULT 0,
    produced INTEGER NOT NULL DEFAULT 0,
    acked INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    compacted INTEGER NOT NULL DEFAULT 0,
    dropped_reported INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the uplink keys its state by id
    stream TEXT NOT NULL,
    priority INTEGER NOT NULL,
    seq_first INTEGER NOT NULL,
    seq_count INTEGER NOT NULL,
    records INTEGER NOT NULL,
    ts_first REAL,
    ts_last REAL,
    created REAL NOT NULL,
    compacted INTEGER NOT NULL DEFAULT 0,
    nbytes INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_priority ON chunks(priority, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB
);
CREATE TABLE IF NOT EXISTS checkpoint (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS lost (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    seq_first INTEGER NOT NULL,
    seq_count INTEGER NOT NULL,
    exact INTEGER NOT NULL DEFAULT 1,  -- 0: an upper bound (the cloud keeps what it has)
    reason TEXT NOT NULL,
    created REAL NOT NULL,
    reported_to TEXT  -- the node id a gap of it was sent as, if any
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def create(db: sqlite3.Connection) -> dict[str, str]:
    """Create what is missing (one transaction) and return ``meta``."""
    db.execute("BEGIN IMMEDIATE")
    try:
        had_streams = db.execute(
            "SELECT 1 FROM sqlite_master WHERE name='streams'").fetchone() is not None
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                db.execute(stmt)
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if "epoch" not in meta:
            meta["epoch"] = secrets.token_hex(8)
            meta["origin"] = "adopted" if had_streams else "new"
            meta["generation"] = "0"
            db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                           list(meta.items()))
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return meta


def set_meta(db: sqlite3.Connection, **values: str) -> None:
    """Inside the caller's transaction."""
    db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(values.items()))
