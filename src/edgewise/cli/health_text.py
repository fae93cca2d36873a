"""A node's heartbeat health (`sync.health`, as the operator API returns it) as one line of
text, for `edgewise node show`."""

from __future__ import annotations

from typing import Any


def health_line(h: dict[str, Any]) -> str:
    """The heartbeat's health on one line (`sync.health`)."""
    parts = []
    if h.get("cpu") is not None:
        parts.append(f"cpu {h['cpu']:.0f}%")
    if h.get("mem") is not None:
        parts.append(f"mem {h['mem'] / 2**20:,.0f} MiB")
    if h.get("disk_free") is not None:
        parts.append(f"disk free {h['disk_free'] / 2**30:,.1f} GiB")
    for prio, (records, age) in sorted((h.get("outbox") or {}).items(),
                                       key=lambda kv: -int(kv[0])):
        parts.append(f"outbox p{prio} {records:,} waiting, oldest {age:,.0f} s")
    for name, (state, error) in sorted((h.get("pipelines") or {}).items()):
        parts.append(f"pipeline {name} {state}" + (f": {error}" if error else ""))
    if h.get("release"):
        parts.append(f"release {h['release']}")
    if h.get("clock_offset_s") is not None:
        parts.append(f"clock {h['clock_offset_s']:+.1f} s")
    return ", ".join(parts)
