"""Durations ("500ms", "1s", "2m") and byte sizes ("256MiB") as pydantic-friendly types."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {
    "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0,
}
_BYTES = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_BYTE_UNITS = {
    "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4, "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2,
    "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4,
}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as '250ms', '1s', '5m'."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '500ms', '1s' or '5m'")
    if isinstance(value, (int, float)):
        if value != value:  # NaN
            raise ValueError("a duration must be a number of seconds, not NaN")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration; write e.g. '500ms', '1s', '5m' or seconds")


def parse_bytes(value: Any) -> int:
    """Bytes from a number or a string such as '64MiB', '1GB'."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '64MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _BYTES.match(value)
        if m:
            unit = (m.group(2) or "b").lower()
            return int(float(m.group(1)) * _BYTE_UNITS[unit])
    raise ValueError(f"{value!r} is not a size; write e.g. '64MiB', '1GB' or a number of bytes")


Duration = Annotated[float, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_bytes)]
