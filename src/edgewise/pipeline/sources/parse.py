"""Turning raw input (JSON documents, CSV rows) into batches, and bad input into dead letters.

A *reading* has ``sensor`` (text), ``ts`` (event time: epoch seconds or milliseconds, or an ISO
8601 string) and ``value`` (a finite number); other fields are kept. The fast path parses a whole
chunk of lines with one orjson call and builds numpy columns; only when that fails does the slow
path look at records one by one, so one bad line costs its own dead letter and nothing else.
"""

from __future__ import annotations

import math
from datetime import datetime
from operator import itemgetter
from typing import Any

import numpy as np
import orjson

from edgewise.pipeline.batch import Batch, column

REQUIRED = ("sensor", "ts", "value")
_SENSOR, _TS, _VALUE = (itemgetter(f) for f in REQUIRED)
MS_THRESHOLD = 1e11  # a numeric ts above this is taken as milliseconds


class BadRecord(ValueError):
    """One record that cannot be a reading; the message says why."""


def _ts_value(x: Any) -> float:
    if isinstance(x, bool):
        raise BadRecord(f"field 'ts' is {x!r} (bool), expected epoch seconds or ISO 8601 time")
    if isinstance(x, (int, float)):
        t = float(x)
        if not math.isfinite(t):
            raise BadRecord(f"field 'ts' is {x!r}, expected a finite time")
        return t / 1000.0 if t > MS_THRESHOLD else t
    if isinstance(x, str):
        try:
            dt = datetime.fromisoformat(x.replace("Z", "+00:00"))
        except ValueError:
            raise BadRecord(
                f"field 'ts' is {x!r}, not an ISO 8601 time or epoch seconds"
            ) from None
        if dt.tzinfo is None:
            raise BadRecord(f"field 'ts' is {x!r} without a time zone; add 'Z' or '+00:00'")
        return dt.timestamp()
    raise BadRecord(f"field 'ts' is {type(x).__name__}, expected epoch seconds or ISO 8601 time")


def check_reading(rec: Any) -> dict[str, Any]:
    """Validate one decoded record; return it normalised or raise `BadRecord`."""
    if not isinstance(rec, dict):
        raise BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    missing = [f for f in REQUIRED if f not in rec]
    if missing:
        raise BadRecord(
            f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
            "a reading needs sensor, ts and value"
        )
    sensor = rec["sensor"]
    if not isinstance(sensor, str) or not sensor:
        raise BadRecord(f"field 'sensor' is {sensor!r}, expected a non-empty string")
    value = rec["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(f"field 'value' is {value!r} ({type(value).__name__}), expected a number")
    if not math.isfinite(value):
        raise BadRecord(f"field 'value' is {value!r}; NaN and infinity are not readings")
    out = dict(rec)
    out["ts"] = _ts_value(rec["ts"])
    out["value"] = float(value)
    return out


def readings_from_dicts(
    recs: list[Any], labels: list[str] | None = None
) -> tuple[Batch, list[tuple[int, str]]]:
    """Columns from decoded records; returns (batch, [(index, reason)] of rejected records)."""
    n = len(recs)
    if n == 0:
        return Batch.empty(), []
    try:  # fast path: every record is exactly {sensor, ts, value} with good types
        sensors = list(map(_SENSOR, recs))
        ts_list = list(map(_TS, recs))
        val_list = list(map(_VALUE, recs))
        # numpy makes True 1.0 next to numbers, so bools must be ruled out by type, not dtype
        numeric = set(map(type, ts_list)) | set(map(type, val_list))
        ts = np.array(ts_list)
        vals = np.array(val_list)
        if (
            numeric <= {float, int}
            and ts.dtype.kind in "fi"
            and vals.dtype.kind in "fi"
            and set(map(len, recs)) == {3}
            and set(map(type, sensors)) == {str}
            and "" not in sensors
        ):
            ts = ts.astype(np.float64)
            vals = vals.astype(np.float64)
            good = np.isfinite(vals) & np.isfinite(ts)
            if good.all():
                if ts.size and ts.max() > MS_THRESHOLD:
                    ts = np.where(ts > MS_THRESHOLD, ts / 1000.0, ts)
                scol = np.empty(n, dtype=object)
                scol[:] = sensors
                return Batch({"sensor": scol, "ts": ts, "value": vals}, n), []
    except (KeyError, TypeError, ValueError):
        pass
    # slow path: one by one
    ok: list[dict[str, Any]] = []
    bad: list[tuple[int, str]] = []
    for i, r in enumerate(recs):
        try:
            ok.append(check_reading(r))
        except BadRecord as exc:
            bad.append((i, str(exc)))
    if not ok:
        return Batch.empty(), bad
    names: dict[str, None] = {"sensor": None, "ts": None, "value": None}
    for r in ok:
        for k in r:
            names.setdefault(k, None)
    cols = {}
    for name in names:
        values = [r.get(name) for r in ok]
        cols[name] = column(values)
    cols["ts"] = cols["ts"].astype(np.float64)
    cols["value"] = cols["value"].astype(np.float64)
    return Batch(cols, len(ok)), bad


def parse_json_lines(lines: list[bytes]) -> tuple[Batch, list[tuple[int, str]]]:
    """NDJSON lines (without newlines) → readings; bad lines come back with their reason."""
    if not lines:
        return Batch.empty(), []
    try:
        recs = orjson.loads(b"[" + b",".join(lines) + b"]")
        if len(recs) == len(lines):
            return readings_from_dicts(recs)
    except orjson.JSONDecodeError:
        pass
    parsed: list[Any] = []
    index: list[int] = []
    bad: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        try:
            parsed.append(orjson.loads(line))
            index.append(i)
        except orjson.JSONDecodeError as exc:
            bad.append((i, f"malformed JSON: {exc}"))
    batch, rejected = readings_from_dicts(parsed)
    bad.extend((index[j], reason) for j, reason in rejected)
    bad.sort()
    return batch, bad


def parse_json_document(data: bytes) -> tuple[Batch, list[tuple[int, str]]]:
    """One JSON document: an object (one reading) or an array of readings."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return Batch.empty(), [(0, f"malformed JSON: {exc}")]
    if isinstance(doc, list):
        return readings_from_dicts(doc)
    return readings_from_dicts([doc])
